"""Turn a pytest-benchmark JSON of ``pytest benchmarks`` into tables and plots.

    pytest benchmarks --benchmark-json=bench.json
    python -m benchmarks.report --json bench.json

writes, under ``benchmarks/results/`` (``--out``), for the device the JSON was measured on:
``<device>.md`` (tables: median time, peak extra memory, TFLOP/s, each against ours),
``<device>-time.png`` and ``<device>-memory.png`` (vs response tokens, one line per provider) and
``<device>.json`` (the raw JSON, with the device, library versions and both commands inside).
Without ``--json`` the newest run saved by ``--benchmark-autosave`` (``.benchmarks/``) is used.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import shlex
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"
PROVIDER_ORDER = ("tisdpo_split", "tisdpo_triton", "tisdpo_torch", "naive", "torch_compile_chunked", "liger",
                  "liger_flce", "cce",
                  "step_tisdpo", "step_naive")
OURS = ("tisdpo_split", "tisdpo_triton", "tisdpo_torch", "step_tisdpo")  # in order of preference as the ratio baseline
VARIANT_TITLES = {
    "tisdpo": "TIS-DPO loss (token weights, precomputed reference log-probs)",
    "tisdpo_kl": "TIS-DPO with token-level KL (kl=\"tisdpo\", reference head computed inside)",
    "step": "Whole-model forward+backward (bf16, gradient checkpointing), our loss vs the naive loss",
}
MIB = 2**20


@dataclass(frozen=True)
class Result:
    """One provider at one case: ``status`` is ``"ok"``, ``"OOM"`` or ``"unavailable"``."""

    provider: str
    variant: str
    head: str
    hidden_size: int
    vocab_size: int
    logits: str
    sequences: int
    tokens: int
    flops: int
    status: str
    median_s: float | None = None
    peak_bytes: int | None = None
    entropy: float | None = None
    reason: str = ""

    @property
    def section(self) -> tuple[str, str, str]:
        return self.variant, self.head, self.logits

    @property
    def response_tokens(self) -> int:
        return self.sequences * self.tokens


def load_results(data: dict) -> list[Result]:
    """The successful benchmarks of a pytest-benchmark JSON plus the ones recorded as not run."""

    def common(info):
        return dict(provider=info["provider"], variant=info["variant"], head=info["head"],
                    hidden_size=info["hidden_size"], vocab_size=info["vocab_size"], logits=info["logits"],
                    sequences=info["sequences"], tokens=info["tokens_per_sequence"], flops=info["flops"])

    results = [Result(**common(b["extra_info"]), status="ok", median_s=b["stats"]["median"],
                      peak_bytes=b["extra_info"].get("peak_memory_bytes"), entropy=b["extra_info"].get("entropy_nats"))
               for b in data.get("benchmarks", []) if "provider" in b.get("extra_info", {})]
    results += [Result(**common(r), status=r["status"], reason=r["reason"])
                for r in data.get("tisdpo", {}).get("not_run", [])]
    return results


def ours_for(results: list[Result]) -> str | None:
    """The provider that ratios are taken against: our Triton path when it ran, else our torch path."""
    ran = {r.provider for r in results if r.status == "ok"}
    return next((p for p in OURS if p in ran), None)


def _providers(results):
    present = {r.provider for r in results}
    return [p for p in PROVIDER_ORDER if p in present] + sorted(present - set(PROVIDER_ORDER))


def _fmt_ratio(value, base):
    return "" if not value or not base else f" ({value / base:.2f}x)"


def _cell(result: Result | None, metric: str, base: Result | None, peak_tflops: float | None) -> str:
    if result is None:
        return "—"
    if result.status != "ok":
        return "OOM" if result.status == "OOM" else "n/a"
    base_ok = base if base is not None and base.status == "ok" else None
    if metric == "time":
        return f"{result.median_s * 1e3:.1f}{_fmt_ratio(result.median_s, base_ok and base_ok.median_s)}"
    if metric == "memory":
        if result.peak_bytes is None:
            return "?"
        mib = result.peak_bytes / MIB
        return f"{mib:.{1 if mib < 10 else 0}f}{_fmt_ratio(result.peak_bytes, base_ok and base_ok.peak_bytes)}"
    if peak_tflops is None:  # CPU: GFLOP/s, no peak to compare with
        return f"{result.flops / result.median_s / 1e9:.1f}"
    tflops = result.flops / result.median_s / 1e12
    return f"{tflops:.1f} ({100 * tflops / peak_tflops:.0f}%)"


def _matrix(rows: list[Result], metric: str, ours: str | None, peak_tflops: float | None) -> list[str]:
    providers = [p for p in _providers(rows) if any(r.provider == p and r.status != "unavailable" for r in rows)]
    by_key = {(r.provider, r.tokens): r for r in rows}
    lines = ["| response tokens | " + " | ".join(providers) + " |", "|---" * (len(providers) + 1) + "|"]
    for tokens in sorted({r.tokens for r in rows}):
        n = next(r.sequences for r in rows if r.tokens == tokens)
        base = by_key.get((ours, tokens))
        cells = [_cell(by_key.get((p, tokens)), metric, base, peak_tflops) for p in providers]
        lines.append(f"| {n} x {tokens} | " + " | ".join(cells) + " |")
    return lines


def render_markdown(data: dict, results: list[Result], plot_names: list[str]) -> str:
    meta = data.get("tisdpo", {})
    peak = meta.get("bf16_peak_tflops")
    versions = ", ".join(f"{k} {v}" for k, v in meta.get("versions", {}).items())
    lines = [
        f"# Benchmarks on {meta.get('device', 'unknown device')}",
        "",
        f"Measured {data.get('datetime', '?')} with `{meta.get('command', '?')}`"
        + (" (SMOKE RUN: tiny shapes)" if meta.get("smoke") else "")
        + f"; rendered with `{meta.get('report_command')}`.",
        f"Versions: {versions}.",
        "",
        "Each figure is one forward+backward of the loss over the LM head: gradients w.r.t. the hidden states "
        "and the head weight, one preference pair (2 sequences) with ragged prompts, the same inputs for every "
        "provider. Ratios in parentheses are against ours (`tisdpo_split` where it ran, else `tisdpo_triton`, "
        "else `tisdpo_torch`); "
        "above 1 means slower or larger than ours. OOM: out of memory at that size.",
        "",
        "- **time**: median wall-clock ms over {} timed rounds, after {} warm-up round(s) that absorb "
        "compilation.".format(*meta.get("rounds", ("?", "?"))),
        "- **memory**: peak memory above the inputs during one step, gradients included (CUDA "
        "`max_memory_allocated`; on CPU the peak RSS of a fresh subprocess, see `benchmarks/memory.py`), MiB.",
        "- **throughput**: model FLOPs `6·N·D·V` (`8·N·D·V` with the KL's reference head) over N response "
        "tokens divided by the median time" + (f"; in parentheses the fraction of the {peak:g} TFLOP/s bf16 peak."
                                               if peak else "."),
        "- `liger` runs `LigerFusedLinearDPOLoss(use_ref_model=False)`: it accepts neither token weights nor "
        "precomputed reference log-probs, so it computes plain DPO with a zero reference term — the same head "
        "work, a different loss value.",
        "- `naive` materialises fp32 logits for every row, prompt and padding included, as TRL and the official "
        "TIS-DPO code do; ours, `torch_compile_chunked` and `cce` skip ignored rows.",
        "",
    ]
    if meta.get("note"):
        lines += [f"Note: {meta['note']}", ""]
    unavailable = {}
    for r in results:
        if r.status == "unavailable":
            unavailable.setdefault(r.provider, r.reason)
    if unavailable:
        lines += ["Not run on this device:", ""]
        lines += [f"- `{p}`: {reason}" for p, reason in unavailable.items()]
        lines.append("")
    sections = defaultdict(list)
    for r in results:
        sections[r.section].append(r)
    for (variant, head, logits) in sorted(sections, key=lambda s: (s[0], s[1], s[2] != "random", s[2])):
        rows = sections[(variant, head, logits)]
        ours = ours_for(rows)
        entropies = [r.entropy for r in rows if r.entropy is not None]
        entropy = f", mean entropy {entropies[0]:.1f} nats" if entropies else ""
        lines += [f"## {VARIANT_TITLES.get(variant, variant)}: {head} (D={rows[0].hidden_size}, "
                  f"V={rows[0].vocab_size}), {logits} logits{entropy}", ""]
        throughput = "Achieved TFLOP/s (fraction of the bf16 peak)" if peak else "Achieved GFLOP/s"
        for title, metric in (("Median time, ms", "time"), ("Peak extra memory, MiB", "memory"),
                              (throughput, "throughput")):
            lines += [f"{title}:", ""] + _matrix(rows, metric, ours, peak) + [""]
    lines += ["Plots: " + ", ".join(f"[{name}]({name})" for name in plot_names), ""]
    return "\n".join(lines)


def render_plots(results: list[Result], stem: Path) -> list[str]:
    """``<stem>-time.png`` and ``<stem>-memory.png``; one panel per (variant, head, logits)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ok = [r for r in results if r.status == "ok"]
    sections = sorted({r.section for r in ok}, key=lambda s: (s[0], s[1], s[2] != "random", s[2]))
    providers = _providers(ok)
    colors = {p: plt.get_cmap("tab10")(i) for i, p in enumerate(PROVIDER_ORDER)}
    names = []
    for metric, label in (("time", "median time (ms)"), ("memory", "peak extra memory (MiB)")):
        cols = min(4, math.ceil(math.sqrt(len(sections))))
        nrows = -(-len(sections) // cols)
        fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.4 * nrows), squeeze=False)
        for ax, section in zip(axes.flat, sections, strict=True):
            for p in providers:
                pts = sorted((r.response_tokens, r.median_s * 1e3 if metric == "time" else r.peak_bytes / MIB)
                             for r in ok if r.section == section and r.provider == p
                             and (metric == "time" or r.peak_bytes is not None))
                if pts:
                    ours = p in OURS
                    ax.plot(*zip(*pts, strict=True), marker="o", label=p, color=colors.get(p),
                            linewidth=2.5 if ours else 1.2, linestyle="-" if ours else "--")
            variant, head, logits = section
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ticks = sorted({r.response_tokens for r in ok if r.section == section})
            ax.set_xticks(ticks, [f"{t // 1024}k" if t % 1024 == 0 else str(t) for t in ticks])
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}" if v >= 1 else f"{v:.2g}"))
            ax.yaxis.set_minor_formatter(NullFormatter())
            ax.set_title(f"{variant} | {head} | {logits}", fontsize=9)
            ax.set_xlabel("response tokens (chosen + rejected)")
            ax.set_ylabel(label)
            ax.grid(True, which="both", alpha=0.3)
        for ax in list(axes.flat)[len(sections):]:
            ax.set_visible(False)
        handles, labels = axes.flat[0].get_legend_handles_labels()
        for ax in axes.flat:
            for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
                if lab not in labels:
                    handles.append(h)
                    labels.append(lab)
        fig.legend(handles, labels, loc="lower center", ncol=min(7, len(labels)), frameon=False)
        fig.tight_layout(rect=(0, 0.08 if nrows == 1 else 0.04, 1, 1))
        path = stem.with_name(f"{stem.name}-{metric}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        names.append(path.name)
    return names


def newest_autosave(root: Path = Path(".benchmarks")) -> Path:
    runs = sorted(root.glob("**/*.json"), key=lambda p: p.stat().st_mtime)
    if not runs:
        raise SystemExit("no --json given and no saved run under .benchmarks/ "
                         "(run `pytest benchmarks --benchmark-json=bench.json` first)")
    return runs[-1]


def merge_runs(json_paths: list[Path]) -> dict:
    """One JSON from several runs on the same device (e.g. a GPU suite split with ``-k``)."""
    runs = []
    for path in json_paths:
        data = json.loads(path.read_text())
        if "tisdpo" not in data:
            raise SystemExit(f"{path} was not written by `pytest benchmarks` (no 'tisdpo' section)")
        runs.append(data)
    merged = runs[0]
    meta = merged["tisdpo"]
    for data in runs[1:]:
        if data["tisdpo"]["device_slug"] != meta["device_slug"]:
            raise SystemExit(f"cannot merge runs from {meta['device']} and {data['tisdpo']['device']}")
        merged["benchmarks"] += data["benchmarks"]
        meta["not_run"] += data["tisdpo"]["not_run"]
        meta["command"] += " && " + data["tisdpo"]["command"]
    return merged


def write_report(json_paths: list[Path], out_dir: Path, command: str, note: str | None = None) -> list[Path]:
    """Write the markdown, the plots and the annotated raw JSON; return their paths."""
    data = merge_runs(json_paths)
    meta = data["tisdpo"]
    if note:
        meta["note"] = note
    meta["report_command"] = command
    meta["report_generated"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    results = load_results(data)
    if not any(r.status == "ok" for r in results):
        raise SystemExit("no timed benchmark in the JSON (was it run with --benchmark-disable?)")
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / (meta["device_slug"] + ("-smoke" if meta.get("smoke") else ""))
    plots = render_plots(results, stem)
    md = stem.with_suffix(".md")
    md.write_text(render_markdown(data, results, plots))
    raw = stem.with_suffix(".json")
    raw.write_text(json.dumps(data, indent=2) + "\n")
    return [md, raw, *(out_dir / p for p in plots)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, nargs="+",
                        help="pytest-benchmark JSON, or several from one device (default: newest under .benchmarks/)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="output folder (default: benchmarks/results)")
    parser.add_argument("--note", help="a sentence about the conditions of the run, shown under the header")
    args = parser.parse_args(argv)
    command = shlex.join(["python", "-m", "benchmarks.report", *(sys.argv[1:] if argv is None else argv)])
    for path in write_report(args.json or [newest_autosave()], args.out, command, args.note):
        print(path)


if __name__ == "__main__":
    main()
