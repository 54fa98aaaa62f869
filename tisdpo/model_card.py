"""The model card (`README.md`) `TISDPOTrainer` writes next to a saved model, as TRL's trainers do.

Hub metadata in a YAML header (`library_name`, `tags`, `base_model`, `datasets` when known), then what was trained
(objective, loss type, beta, token weights), the framework versions and the citations of the method's papers.
"""

from __future__ import annotations

import os
import textwrap

import torch
import transformers

TAGS = ("tisdpo", "dpo", "trl-compatible", "preference-optimization")

CITATIONS = {
    "TIS-DPO": textwrap.dedent("""\
        @inproceedings{liu2025tisdpo,
            title     = {{TIS-DPO: Token-level Importance Sampling for Direct Preference Optimization With
                          Estimated Weights}},
            author    = {Aiwei Liu and Haoping Bai and Zhiyun Lu and Yanchao Sun and Xiang Kong and Simon Wang
                         and Jiulong Shan and Albin Madappally Jose and Xiaojiang Liu and Lijie Wen and
                         Philip S. Yu and Meng Cao},
            booktitle = {The Thirteenth International Conference on Learning Representations, ICLR 2025},
            year      = 2025,
            url       = {https://arxiv.org/abs/2410.04350},
        }"""),
    "DPO": textwrap.dedent("""\
        @inproceedings{rafailov2023direct,
            title     = {{Direct Preference Optimization: Your Language Model is Secretly a Reward Model}},
            author    = {Rafael Rafailov and Archit Sharma and Eric Mitchell and Christopher D. Manning and
                         Stefano Ermon and Chelsea Finn},
            booktitle = {Advances in Neural Information Processing Systems 36, NeurIPS 2023},
            year      = 2023,
            url       = {https://arxiv.org/abs/2305.18290},
        }"""),
    "TDPO": textwrap.dedent("""\
        @inproceedings{zeng2024tdpo,
            title     = {{Token-level Direct Preference Optimization}},
            author    = {Yongcheng Zeng and Guoqing Liu and Weiyu Ma and Ning Yang and Haifeng Zhang and Jun Wang},
            booktitle = {Forty-first International Conference on Machine Learning, ICML 2024},
            year      = 2024,
            url       = {https://arxiv.org/abs/2404.11999},
        }"""),
}


def model_card(*, base_model: str | None, objective: str, loss_type, beta: float, kl: str | None,
               weighted: bool | None, dataset_name: str | None = None, model_name: str | None = None) -> str:
    """The card's text. `objective`: "TIS-DPO", "DPO", "TDPO" or "SFT"; `weighted`: whether the training data carried
    token-weight columns (None: not known yet)."""
    header = ["---", "library_name: transformers"]
    if base_model:
        header.append(f"base_model: {base_model}")
    if dataset_name:
        header.append(f"datasets: [{dataset_name}]")
    tags = list(dict.fromkeys([*TAGS, objective.lower()]))
    header += ["tags:", *(f"- {t}" for t in tags), "---", ""]
    title = model_name or "Model"
    weights = {True: "per-token weights from the data's `chosen_weights` / `rejected_weights` columns",
               False: "no token weights (plain DPO)", None: "token weights as the data provides"}[weighted]
    body = [
        f"# {title}",
        "",
        f"Trained from `{base_model}`" if base_model else "Trained",
        f"with `tisdpo`'s `TISDPOTrainer` ({objective}: loss_type={loss_type!r}, beta={beta}, kl={kl!r}; {weights}).",
        "",
        "## Framework versions",
        "",
        f"- transformers: {transformers.__version__}",
        f"- torch: {torch.__version__}",
        "",
        "## Citations",
        "",
    ]
    papers = ["TIS-DPO", "DPO"] + (["TDPO"] if kl in ("tdpo1", "tdpo2") else [])
    for paper in papers:
        body += [f"{paper}:", "", "```bibtex", CITATIONS[paper], "```", ""]
    return "\n".join(header + body)


def write_model_card(output_dir: str, **kwargs) -> str:
    """Write `model_card(**kwargs)` to `output_dir/README.md`; returns the path."""
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, "README.md")
    with open(path, "w", encoding="utf-8") as f:
        f.write(model_card(**kwargs))
    return path


__all__ = ["CITATIONS", "TAGS", "model_card", "write_model_card"]
