"""TIS-DPO against DPO over seeds, for every weight transform: is the algorithm any better, and with which transform?

Two tasks (``--task``):

- ``synthetic``: ``tisdpo demo``'s task (``tisdpo/demo.py``): a tiny word-level Llama, true reward ``#good - #bad``
  key words. Per seed: new data, model initialisation and batch order; SFT, the method D contrastive pair (DPO and
  reverse DPO) and the token weights once; then DPO and TIS-DPO with each transform from the same SFT model on the
  same batches. Metrics: the weights' key-token AUC (per seed), and per run the held-out implicit reward accuracy,
  the mean held-out implicit reward margin and the mean true reward of sampled responses.
- ``smollm2``: the pretrained SmolLM2-135M-Instruct (``tisdpo.pretrained.fetch_model("smollm2")``, float32 on CPU)
  on the shipped dialogues (``tisdpo/assets/dialogues.jsonl``), a fixed split (even lines train, odd lines held
  out). Method P weights (pi_plus = pi_minus = the model, under ``tisdpo.weights.DEFAULT_SYSTEM_PROMPTS``) once;
  per seed (batch order, and the ``random`` transform's draw) DPO and TIS-DPO for a few steps. Metrics: held-out
  implicit reward accuracy and mean margin.

Every transform runs with its library defaults (``docs/design.md §1.4``; ``exp_clamp``, the paper's weight
formula, with ``k = 1, mu = 1, L = -0.5, U = 1.5``) except ``random``, whose ``seed`` is the run's seed.

Results (``--json``): the settings, the machine and versions, every run's numbers, mean and std (``ddof = 1``) over
seeds and a paired comparison with DPO per seed (wins / ties / losses, mean and std of the difference). Each
finished run is written at once (atomically), so an interruption loses nothing and a rerun with the same settings
skips the finished runs. ``--report`` turns result files into the markdown tables of
``benchmarks/results/algorithm-study.md``::

    python -m benchmarks.algorithm_study --task synthetic --seeds 0 1 2 3 4 5 6 7 8 9 \\
        --json benchmarks/results/algorithm-study-synthetic.json
    python -m benchmarks.algorithm_study --task smollm2 --seeds 0 1 2 \\
        --json benchmarks/results/algorithm-study-smollm2.json
    python -m benchmarks.algorithm_study --report benchmarks/results/algorithm-study-synthetic.json \\
        benchmarks/results/algorithm-study-smollm2.json --markdown benchmarks/results/algorithm-study.md
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import shlex
import statistics
import sys
import tempfile
import time
from importlib import resources

import datasets
import torch

from tisdpo.contrastive import train_contrastive_models
from tisdpo.data import PreferenceCollator, tokenize_row
from tisdpo.demo import (
    DemoConfig,
    QUICK,
    _config,
    _copy,
    _quiet,
    build_model,
    build_tokenizer,
    key_token_auc,
    make_preference_dataset,
    make_prompt,
    reward_accuracy,
    sampled_true_reward,
    train_run,
)
from tisdpo.modeling import token_logps
from tisdpo.response_weights import PER_RESPONSE_TRANSFORMS, WEIGHT_TRANSFORMS, transform_token_weights
from tisdpo.weights import estimate_token_weights

from .env import device_name, library_versions

DPO = "DPO"
MIN_SEEDS = 3  # paired seeds needed before a win can be called reliable
# run metrics, higher is better; the synthetic task also has the sampled responses' true reward
METRICS = {"synthetic": ("reward_accuracy", "reward_margin", "true_reward"),
           "smollm2": ("reward_accuracy", "reward_margin")}
_SYNTHETIC_FIELDS = ("train_pairs", "eval_pairs", "sft_steps", "contrastive_steps", "policy_steps", "batch_size",
                     "sft_learning_rate", "dpo_learning_rate", "beta", "hidden_size", "num_layers", "eval_prompts")
PRESETS = {
    "synthetic": {
        # DemoConfig's defaults (`tisdpo demo`), evaluated on 4x the held-out pairs and 2x the prompts
        "study": {"eval_pairs": 1024, "eval_prompts": 128},
        "quick": dict(QUICK),  # `tisdpo demo --quick`
        "tiny": {"train_pairs": 32, "eval_pairs": 32, "sft_steps": 4, "contrastive_steps": 4, "policy_steps": 3,
                 "batch_size": 8, "eval_prompts": 4, "hidden_size": 16, "num_layers": 1},
    },
    "smollm2": {
        "study": {"steps": 6, "batch_size": 3, "learning_rate": 1e-5, "beta": 0.1},  # one epoch of the 18 pairs
        "tiny": {"steps": 1, "batch_size": 2, "learning_rate": 1e-5, "beta": 0.1, "max_pairs": 8},
    },
}


def run_names(transforms) -> list[str]:
    return [DPO] + [f"TIS-DPO/{t}" for t in transforms]


def transform_of(name: str) -> str | None:
    return None if name == DPO else name.split("/", 1)[1]


def transform_kwargs(transform: str, seed: int) -> dict:
    """The kwargs a run passes: none (library defaults) except the ``random`` transform's seed."""
    return {"seed": seed} if transform == "random" else {}


def settings_of(task: str, preset: str) -> dict:
    if task == "synthetic":
        cfg = DemoConfig(**PRESETS[task][preset])
        return {"preset": preset, **{k: getattr(cfg, k) for k in _SYNTHETIC_FIELDS}}
    return {"preset": preset, "model": "smollm2", "split": "even lines train, odd lines held out",
            "weights": "method P, tisdpo.weights.DEFAULT_SYSTEM_PROMPTS", **PRESETS[task][preset]}


# ----------------------------------------------------------------------------------------------------------------
# evaluation
# ----------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def reward_margins(model, ref_model, dataset: datasets.Dataset, tokenizer, beta: float,
                   batch_size: int = 64) -> list[float]:
    """Per held-out pair, the implicit reward margin ``beta * (sum_t (log pi - log pi_ref) over chosen - the same
    over rejected)`` (unweighted, float32 sums; ``tisdpo.demo.reward_accuracy`` counts the pairs where it is > 0)."""
    collate = PreferenceCollator(pad_token_id=tokenizer.pad_token_id)
    rows = [tokenize_row({k: ex[k] for k in ("prompt", "chosen", "rejected")}, tokenizer) for ex in dataset]
    margins = []
    for start in range(0, len(rows), batch_size):
        batch = collate(rows[start:start + batch_size])
        logratio = (token_logps(model, batch) - token_logps(ref_model, batch)).sum(1)
        b = logratio.shape[0] // 2
        margins += (beta * (logratio[:b] - logratio[b:])).tolist()
    return margins


def final_train_loss(history: list[dict]) -> float | None:
    losses = [h["loss"] for h in history if "loss" in h]
    return losses[-1] if losses else None


def policy_data(weighted: datasets.Dataset, plain: datasets.Dataset, name: str, seed: int):
    """``(dataset, weight_transform, transform_kwargs)`` of run ``name``: the plain pairs for DPO; the weighted pairs
    for TIS-DPO, per-response transforms applied here (the trainer applies elementwise ones)."""
    transform = transform_of(name)
    if transform is None:
        return plain, "origin", None
    kwargs = transform_kwargs(transform, seed) or None
    if transform in PER_RESPONSE_TRANSFORMS:
        return transform_token_weights(weighted, transform, kwargs), "origin", None
    return weighted, transform, kwargs


# ----------------------------------------------------------------------------------------------------------------
# the tasks: each yields (name, record) per finished run
# ----------------------------------------------------------------------------------------------------------------


def synthetic_seed(settings: dict, seed: int, names: list[str], work: str, log):
    """One seed of the synthetic task: ``("seed", info)`` once, then ``(name, record)`` per run of ``names``."""
    cfg = DemoConfig(**{k: settings[k] for k in _SYNTHETIC_FIELDS}, seed=seed)
    start = time.perf_counter()
    tokenizer = build_tokenizer()
    train = make_preference_dataset(cfg.train_pairs, seed=seed)
    held_out = make_preference_dataset(cfg.eval_pairs, seed=10_000 + seed)
    prompts = [make_prompt(random.Random(20_000 + 1000 * seed + i)) for i in range(cfg.eval_prompts)]
    common = {"batch_size": cfg.batch_size, "beta": cfg.beta, "seed": seed}
    sft = build_model(tokenizer, hidden_size=cfg.hidden_size, num_layers=cfg.num_layers, seed=seed)
    train_run(sft, train, tokenizer, output_dir=os.path.join(work, "sft"), loss_type="sft", steps=cfg.sft_steps,
              learning_rate=cfg.sft_learning_rate, **common)
    base = _config(os.path.join(work, "contrastive"), "sigmoid", cfg.contrastive_steps, cfg.dpo_learning_rate,
                   **common)
    with _quiet(False):
        pi_plus, pi_minus = train_contrastive_models(sft, train, "D", base, processing_class=tokenizer, save=False)
    weighted = estimate_token_weights(train, pi_plus, pi_minus, tokenizer, method="D", batch_size=64,
                                      cache_dir=os.path.join(work, "weights"), progress=False)
    info = {"key_token_auc": key_token_auc(weighted, tokenizer),
            "sft_true_reward": sampled_true_reward(sft, tokenizer, prompts, seed=seed),
            "setup_seconds": time.perf_counter() - start}
    log(f"[seed {seed}] SFT + contrastive pair (method D) + weights: key-token AUC {info['key_token_auc']:.3f}, "
        f"SFT true reward {info['sft_true_reward']:.3f} ({info['setup_seconds']:.0f} s)")
    yield "seed", info
    for name in names:
        t0 = time.perf_counter()
        data, transform, kwargs = policy_data(weighted, train, name, seed)
        policy = _copy(sft)
        history = train_run(policy, data, tokenizer, output_dir=os.path.join(work, "policy"), loss_type="sigmoid",
                            steps=cfg.policy_steps, learning_rate=cfg.dpo_learning_rate, weight_transform=transform,
                            transform_kwargs=kwargs, **common)
        margins = reward_margins(policy, sft, held_out, tokenizer, cfg.beta)
        yield name, {"reward_accuracy": reward_accuracy(policy, sft, held_out, tokenizer),
                     "reward_margin": statistics.fmean(margins),
                     "true_reward": sampled_true_reward(policy, tokenizer, prompts, seed=seed),
                     "final_train_loss": final_train_loss(history), "seconds": time.perf_counter() - t0}


def load_dialogues(max_pairs: int | None = None) -> tuple[datasets.Dataset, datasets.Dataset]:
    """The shipped dialogues split into ``(train, held_out)``: even lines train, odd lines held out (18 / 18)."""
    text = resources.files("tisdpo").joinpath("assets", "dialogues.jsonl").read_text(encoding="utf-8")
    rows = [json.loads(line) for line in text.splitlines() if line.strip()][:max_pairs]
    return datasets.Dataset.from_list(rows[0::2]), datasets.Dataset.from_list(rows[1::2])


class SmolLM2Study:
    """The shared part of the ``smollm2`` task (model, tokenizer, split, method P weights), built once."""

    def __init__(self, settings: dict, work: str, log):
        from tisdpo.modeling import load_causal_lm
        from tisdpo.pretrained import fetch_model, load_tokenizer

        start = time.perf_counter()
        path = fetch_model("smollm2")
        self.settings = settings
        self.tokenizer = load_tokenizer(path)
        self.model = load_causal_lm(path, device="cpu", dtype="float32")
        self.model.requires_grad_(False)
        self.model.eval()
        self.train, self.held_out = load_dialogues(settings.get("max_pairs"))
        self.weighted = estimate_token_weights(self.train, self.model, None, self.tokenizer, method="P",
                                               batch_size=8, cache_dir=os.path.join(work, "weights"), progress=False)
        values = [w for col in ("chosen_weights", "rejected_weights") for ws in self.weighted[col] for w in ws]
        self.info = {"model_path": path, "train_pairs": len(self.train), "held_out_pairs": len(self.held_out),
                     "weight_tokens": len(values), "weight_mean": statistics.fmean(values),
                     "weight_std": statistics.stdev(values), "setup_seconds": time.perf_counter() - start}
        log(f"smollm2: {len(self.train)} training / {len(self.held_out)} held-out pairs, method P weights on "
            f"{len(values)} tokens (mean {self.info['weight_mean']:.3f}, std {self.info['weight_std']:.3f}) "
            f"({self.info['setup_seconds']:.0f} s)")

    def run(self, name: str, seed: int, work: str) -> dict:
        s, t0 = self.settings, time.perf_counter()
        data, transform, kwargs = policy_data(self.weighted, self.train, name, seed)
        policy = copy.deepcopy(self.model).requires_grad_(True)
        history = train_run(policy, data, self.tokenizer, output_dir=os.path.join(work, "policy"),
                            loss_type="sigmoid", steps=s["steps"], learning_rate=s["learning_rate"],
                            batch_size=s["batch_size"], beta=s["beta"], weight_transform=transform,
                            transform_kwargs=kwargs, seed=seed)
        margins = reward_margins(policy, self.model, self.held_out, self.tokenizer, s["beta"], batch_size=8)
        return {"reward_accuracy": sum(m > 0 for m in margins) / len(margins),
                "reward_margin": statistics.fmean(margins), "final_train_loss": final_train_loss(history),
                "seconds": time.perf_counter() - t0}


# ----------------------------------------------------------------------------------------------------------------
# results: resumable JSON, summary
# ----------------------------------------------------------------------------------------------------------------


def _std(values: list[float]) -> float | None:
    return statistics.stdev(values) if len(values) > 1 else None


def summarize(results: dict) -> dict:
    """Mean/std over seeds per run name and metric, and the paired comparison with DPO (seeds where both ran)."""
    by_name: dict[str, dict[int, dict]] = {}
    for run in results["runs"]:
        by_name.setdefault(run["name"], {})[run["seed"]] = run
    summary = {}
    for name, runs in by_name.items():
        entry = {"seeds": sorted(runs)}
        for metric in METRICS[results["task"]]:
            values = [runs[s][metric] for s in sorted(runs)]
            entry[metric] = {"mean": statistics.fmean(values), "std": _std(values), "values": values}
            dpo = by_name.get(DPO, {})
            paired = [s for s in sorted(runs) if s in dpo]
            if name != DPO and paired:
                diffs = [runs[s][metric] - dpo[s][metric] for s in paired]
                mean, std = statistics.fmean(diffs), _std(diffs)
                entry[metric]["vs_dpo"] = {
                    "seeds": paired, "differences": diffs,
                    "wins": sum(d > 0 for d in diffs), "ties": sum(d == 0 for d in diffs),
                    "losses": sum(d < 0 for d in diffs), "mean_difference": mean, "std_difference": std,
                    # a reliable win (from MIN_SEEDS seeds on): better in every seed, or better on average by more
                    # than the seed spread
                    "reliable_win": len(diffs) >= MIN_SEEDS and (all(d > 0 for d in diffs) or mean > std),
                }
        summary[name] = entry
    return summary


def save(results: dict, path: str) -> None:
    results["summary"] = summarize(results)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(results, f, indent=1)
    os.replace(tmp, path)


def open_results(path: str, task: str, settings: dict, threads: int | None = None) -> dict:
    """The results in ``path`` (to resume) or a new record; a file of another task or settings is an error."""
    if os.path.exists(path):
        with open(path) as f:
            results = json.load(f)
        if results.get("task") != task or results.get("settings") != settings:
            raise SystemExit(f"--json {path} holds a study with other settings ({results.get('task')}, "
                             f"{results.get('settings')}); give another file to run {task} with {settings}")
    else:
        results = {"task": task, "settings": settings, "transform_kwargs": "library defaults (docs/design.md §1.4); "
                   "random: seed = the run's seed", "invocations": [], "seed_info": {}, "shared": None, "runs": []}
    results["invocations"].append({
        "command": "python -m benchmarks.algorithm_study " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "machine": device_name(torch.device("cpu")), "cpu_count": os.cpu_count(), "torch_threads": threads,
        "load_average_1min": os.getloadavg()[0], "versions": library_versions()})
    return results


def run_study(task: str, seeds: list[int], path: str, *, preset: str = "study", transforms=WEIGHT_TRANSFORMS,
              threads: int | None = 1, log=print) -> dict:
    """Run every ``(name, seed)`` not yet in ``path``, appending each finished run to it; returns the results."""
    unknown = [t for t in transforms if t not in WEIGHT_TRANSFORMS]
    if unknown:
        raise ValueError(f"transforms: unknown {unknown}; known: {list(WEIGHT_TRANSFORMS)}")
    settings = settings_of(task, preset)
    results = open_results(path, task, settings, threads)
    save(results, path)
    done = {(r["seed"], r["name"]) for r in results["runs"]}
    names = run_names(transforms)
    todo = {seed: [n for n in names if (seed, n) not in done] for seed in seeds}
    total, count = sum(map(len, todo.values())), 0
    log(f"{task} ({preset}): {total} runs to do, {len(done)} already in {path}")
    if not total:
        return results
    saved_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    study_start = time.perf_counter()

    def record(seed, name, rec):
        nonlocal count
        count += 1
        results["runs"].append({"seed": seed, "name": name, "transform": transform_of(name),
                                "transform_kwargs": transform_kwargs(transform_of(name), seed)
                                if name != DPO else None, **rec})
        save(results, path)
        numbers = ", ".join(f"{m} {rec[m]:.4f}" for m in METRICS[task])
        log(f"[{count}/{total}] seed {seed} {name}: {numbers} ({rec['seconds']:.0f} s; "
            f"{time.perf_counter() - study_start:.0f} s so far)")

    try:
        with tempfile.TemporaryDirectory(prefix="tisdpo-study-") as work:
            if task == "synthetic":
                for seed in seeds:
                    if not todo[seed]:
                        continue
                    for name, rec in synthetic_seed(settings, seed, todo[seed], os.path.join(work, str(seed)), log):
                        if name == "seed":
                            results["seed_info"][str(seed)] = rec
                            save(results, path)
                        else:
                            record(seed, name, rec)
            else:
                study = SmolLM2Study(settings, work, log)
                results["shared"] = study.info
                save(results, path)
                for seed in seeds:
                    for name in todo[seed]:
                        record(seed, name, study.run(name, seed, os.path.join(work, str(seed))))
    finally:
        torch.set_num_threads(saved_threads)
        if bars:
            datasets.enable_progress_bars()
    return results


# ----------------------------------------------------------------------------------------------------------------
# markdown report
# ----------------------------------------------------------------------------------------------------------------


def _pm(entry: dict) -> str:
    std = entry["std"]
    return f"{entry['mean']:.3f}" + ("" if std is None else f" ± {std:.3f}")


def _vs(entry: dict) -> str:
    v = entry.get("vs_dpo")
    if v is None:
        return "-"
    std = "" if v["std_difference"] is None else f" ± {v['std_difference']:.3f}"
    mark = " **reliable**" if v["reliable_win"] else ""
    return f"{v['mean_difference']:+.3f}{std} ({v['wins']}/{v['ties']}/{v['losses']}){mark}"


def markdown(results: dict) -> str:
    """One task's section: settings, the table (mean ± std over seeds; vs DPO: mean paired difference ± std,
    (wins/ties/losses)), the reliable wins, the commands and machines."""
    task, summary = results["task"], summarize(results)
    metrics = METRICS[task]
    seeds = sorted({r["seed"] for r in results["runs"]})
    lines = [f"## {task}", "", f"Settings: `{json.dumps(results['settings'])}`; seeds {seeds}.", ""]
    if task == "synthetic" and results["seed_info"]:
        aucs = [results["seed_info"][str(s)]["key_token_auc"] for s in seeds if str(s) in results["seed_info"]]
        sft = [results["seed_info"][str(s)]["sft_true_reward"] for s in seeds if str(s) in results["seed_info"]]
        lines += [f"Key-token AUC of the method D weights: {_pm({'mean': statistics.fmean(aucs), 'std': _std(aucs)})}"
                  "; true reward of the SFT model's samples: "
                  f"{_pm({'mean': statistics.fmean(sft), 'std': _std(sft)})}.",
                  ""]
    if results.get("shared"):
        sh = results["shared"]
        lines += [f"{sh['train_pairs']} training / {sh['held_out_pairs']} held-out pairs; method P weights on "
                  f"{sh['weight_tokens']} response tokens: mean {sh['weight_mean']:.3f}, std {sh['weight_std']:.3f}.",
                  ""]
    header = ["run"] + [f"{m} | vs DPO" for m in metrics]
    lines += ["| " + " | ".join(header) + " |", "|---" * (1 + 2 * len(metrics)) + "|"]
    for name in [DPO] + sorted(n for n in summary if n != DPO):
        e = summary[name]
        cells = [name] + [f"{_pm(e[m])} | {_vs(e[m])}" for m in metrics]
        lines.append("| " + " | ".join(cells) + " |")
    reliable = {m: [n for n in summary if n != DPO and summary[n][m].get("vs_dpo", {}).get("reliable_win")]
                for m in metrics}
    lines += ["", f"Reliable wins over DPO (at least {MIN_SEEDS} seeds; better in every seed, or mean paired "
              "difference > its std over seeds): "
              + "; ".join(f"{m}: {', '.join(sorted(reliable[m])) or 'none'}" for m in metrics) + ".", ""]
    lines += ["Runs:", ""]
    for inv in results["invocations"]:
        # torch_threads: set by --threads (default 1); "machine" names the threads before that
        threads = inv.get("torch_threads", 1)
        lines.append(f"- `{inv['command']}` ({inv['started']}; {inv['machine']}, {inv['cpu_count']} cores, "
                     f"the runs on {threads} torch thread(s), "
                     f"1-min load {inv['load_average_1min']:.1f} at start; "
                     + ", ".join(f"{k} {v}" for k, v in inv["versions"].items()) + ")")
    seconds = [r["seconds"] for r in results["runs"]]
    lines += ["", f"{len(seconds)} runs, median {statistics.median(seconds):.0f} s each (shared machine)."]
    return "\n".join(lines) + "\n"


def report(paths: list[str], output: str) -> str:
    sections = []
    for path in paths:
        with open(path) as f:
            sections.append(markdown(json.load(f)))
    text = ("# TIS-DPO against DPO: weight transforms over seeds\n\n"
            "Made by `python -m benchmarks.algorithm_study --report " + " ".join(paths) + f" --markdown {output}` "
            "from the result files (their runs below). Each cell: mean ± std over seeds (std with ddof = 1); "
            "vs DPO: the mean ± std over seeds of the paired difference (TIS-DPO minus DPO, same seed, data and "
            "batches), then (wins/ties/losses). Higher is better for every metric. reward_accuracy / reward_margin: "
            "held-out implicit DPO reward (unweighted sum of log pi - log pi_ref; margin scaled by beta); "
            "true_reward: mean #good - #bad key words of sampled responses. Transforms at their library defaults "
            "(docs/design.md §1.4).\n\n" + "\n".join(sections))
    with open(output, "w") as f:
        f.write(text)
    return text


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.algorithm_study", description=__doc__.split("\n")[0])
    parser.add_argument("--task", choices=sorted(METRICS), help="which task to run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--json", help="results file: created, or resumed when it exists")
    parser.add_argument("--preset", default="study", help="sizes: study (default), quick (synthetic), tiny (tests)")
    parser.add_argument("--transforms", nargs="+", default=list(WEIGHT_TRANSFORMS), choices=list(WEIGHT_TRANSFORMS))
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--report", nargs="+", metavar="JSON", help="write the markdown of these result files")
    parser.add_argument("--markdown", default="benchmarks/results/algorithm-study.md", help="--report's output")
    args = parser.parse_args(argv)
    if args.report:
        print(report(args.report, args.markdown))
        return
    if args.task is None or args.json is None:
        parser.error("--task and --json are needed (or --report)")
    if args.preset not in PRESETS[args.task]:
        parser.error(f"--preset for {args.task} must be one of {sorted(PRESETS[args.task])}, got {args.preset!r}")
    run_study(args.task, args.seeds, args.json, preset=args.preset, transforms=args.transforms, threads=args.threads,
              log=lambda msg: print(msg, flush=True))


if __name__ == "__main__":
    main()
