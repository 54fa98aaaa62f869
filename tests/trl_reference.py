"""TRL 1.16's own preference tokenisation, for comparing ids with ours (`tokenization="joint"`)."""

from __future__ import annotations

import tempfile
from types import SimpleNamespace

import datasets


def trl_tokenized(rows: list[dict], tokenizer) -> list[dict[str, list[int]]]:
    """`rows` (TRL preference examples) tokenised by `trl.DPOTrainer._prepare_dataset` itself (prompt extraction,
    EOS text, tokenisation and split, no truncation): one `{"prompt_ids", "chosen_ids", "rejected_ids"}` per row."""
    from trl import DPOConfig, DPOTrainer

    with tempfile.TemporaryDirectory() as out:
        args = DPOConfig(output_dir=out, max_length=None, report_to="none", use_cpu=True)
        # the method reads only `self._tokenizer` (the EOS text it appends)
        prepared = DPOTrainer._prepare_dataset(SimpleNamespace(_tokenizer=tokenizer), datasets.Dataset.from_list(rows),
                                               tokenizer, args, "train")
    return [{key: list(row[key]) for key in ("prompt_ids", "chosen_ids", "rejected_ids")} for row in prepared]
