"""``tisdpo visualize``: token weights of preference pairs as an HTML page and a PNG figure.

Input: a dataset with ``chosen_weights`` / ``rejected_weights`` columns in the convention of
``tisdpo.weights`` (chosen: ``r_t``, rejected: ``-r_t``, one value per response token of
``tisdpo.data.tokenize_row``'s tokenisation). Each response token is coloured by its training weight
``w = T(x)`` for the chosen transform (green: above the neutral weight, red: below); the HTML page shows
the raw reward ``r_t = log pi_plus - log pi_minus`` and the weight on hover.
"""

from __future__ import annotations

import argparse
import html
import os
from collections.abc import Sequence

import torch

from .data import tokenize_row
from .weights import WEIGHT_TRANSFORMS, example_generator, response_weights, transform_params

_NEUTRAL = {"rank_based": None, "random": None, "binary": 0.5}  # None: middle of [min_weight, max_weight]


def neutral_weight(transform: str, transform_kwargs: dict | None = None) -> float:
    """The weight that means "no preference" for a transform: ``T(0)`` for elementwise transforms, the
    middle of the range for ``rank_based`` / ``random``, 0.5 for ``binary``."""
    params = transform_params(transform, transform_kwargs)
    if transform in _NEUTRAL:
        value = _NEUTRAL[transform]
        return (params["min_weight"] + params["max_weight"]) / 2 if value is None else value
    return float(response_weights([0.0], transform, params)[0])


def pair_tokens(example: dict, tokenizer, transform: str = "origin", transform_kwargs: dict | None = None,
                eos_weight: float | None = None, index: int = 0) -> dict:
    """Tokens, raw rewards and weights of one pair.

    Returns ``{"prompt": str, "chosen": [(token, r_t, w_t), ...], "rejected": [...]}`` where ``r_t`` is
    the raw reward (the rejected column's sign undone) and ``w_t`` the transformed weight.
    """
    for column in ("chosen_weights", "rejected_weights"):
        if example.get(column) is None:
            raise ValueError(f"example has no {column!r}; estimate weights first (tisdpo estimate-weights)")
    row = tokenize_row(example, tokenizer)
    if row is None:
        raise ValueError("example has an empty prompt or response after tokenisation")
    seed = transform_params(transform, transform_kwargs).get("seed", 0)
    out = {"prompt": tokenizer.decode(row["prompt_input_ids"], skip_special_tokens=True)}
    for side, sign in (("chosen", 1.0), ("rejected", -1.0)):
        ids, x = row[f"{side}_input_ids"], row[f"{side}_weights"]
        w = response_weights(torch.tensor(x, dtype=torch.float64), transform, transform_kwargs,
                             eos_weight=eos_weight, generator=example_generator(seed, index, side))
        triples = zip(ids, x, w.tolist(), strict=True)
        out[side] = [(tokenizer.decode([i]), sign * xi, float(wi)) for i, xi, wi in triples]
    return out


def _collect(dataset, tokenizer, transform, transform_kwargs, eos_weight, max_pairs):
    if transform not in WEIGHT_TRANSFORMS:
        raise ValueError(f"transform must be one of {WEIGHT_TRANSFORMS}, got {transform!r}")
    n = len(dataset) if max_pairs is None else min(max_pairs, len(dataset))
    if n == 0:
        raise ValueError("dataset is empty")
    pairs = [pair_tokens(dataset[i], tokenizer, transform, transform_kwargs, eos_weight, i) for i in range(n)]
    centre = neutral_weight(transform, transform_kwargs)
    spread = max(abs(w - centre) for p in pairs for side in ("chosen", "rejected") for _, _, w in p[side])
    return pairs, centre, spread or 1.0


def _html_colour(w: float, centre: float, spread: float) -> str:
    a = max(-1.0, min(1.0, (w - centre) / spread))
    rgb = (46, 160, 67) if a >= 0 else (215, 58, 73)
    return f"rgba({rgb[0]},{rgb[1]},{rgb[2]},{abs(a) * 0.85:.3f})"


def render_html(dataset, tokenizer, path: str, *, transform: str = "origin", transform_kwargs: dict | None = None,
                eos_weight: float | None = None, max_pairs: int | None = 20) -> str:
    """Write an HTML page of the first ``max_pairs`` pairs, each response token coloured by its weight
    (hover: token, raw reward ``r_t`` and weight). Returns ``path``."""
    pairs, centre, spread = _collect(dataset, tokenizer, transform, transform_kwargs, eos_weight, max_pairs)
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>TIS-DPO token weights</title><style>",
        "body{font-family:sans-serif;max-width:60em;margin:2em auto}"
        ".pair{border-top:1px solid #ccc;padding:.5em 0}.prompt{color:#555}"
        ".tok{white-space:pre-wrap;font-family:monospace;padding:1px 2px;margin:0 1px;border-radius:3px}"
        ".label{font-weight:bold;display:inline-block;width:6em}",
        "</style></head><body>",
        f"<h1>Token weights</h1><p>transform <code>{html.escape(transform)}</code>"
        f"{html.escape(' ' + repr(transform_kwargs)) if transform_kwargs else ''}; green: weight above the "
        f"neutral {centre:.3g}, red: below (full colour at &plusmn;{spread:.3g}). Hover a token for its "
        "reward r = log &pi;<sub>+</sub> &minus; log &pi;<sub>&minus;</sub> and weight.</p>",
    ]
    for k, pair in enumerate(pairs):
        parts.append(f"<div class='pair'><div class='prompt'>#{k}: {html.escape(pair['prompt'])}</div>")
        for side in ("chosen", "rejected"):
            spans = "".join(
                f"<span class='tok' style='background:{_html_colour(w, centre, spread)}' "
                f"title='{html.escape(repr(tok))}  r={r:+.4f}  w={w:.4f}'>{html.escape(tok)}</span>"
                for tok, r, w in pair[side]
            )
            parts.append(f"<div><span class='label'>{side}</span>{spans}</div>")
        parts.append("</div>")
    parts.append("</body></html>")
    _write_text(path, "\n".join(parts))
    return path


def render_png(dataset, tokenizer, path: str, *, transform: str = "origin", transform_kwargs: dict | None = None,
               eos_weight: float | None = None, max_pairs: int | None = 6, line_chars: int = 90) -> str:
    """Write a PNG figure of the first ``max_pairs`` pairs: each response token in a box coloured by its
    weight on a diverging colour map centred at the neutral weight, with a colour bar. Returns ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import TwoSlopeNorm

    pairs, centre, spread = _collect(dataset, tokenizer, transform, transform_kwargs, eos_weight, max_pairs)
    norm = TwoSlopeNorm(vcenter=centre, vmin=centre - spread, vmax=centre + spread)
    cmap = plt.get_cmap("RdYlGn")
    lines = []  # (kind, payload): "prompt" text, or (label, [(token, weight), ...]) wrapped to line_chars
    for k, pair in enumerate(pairs):
        lines.append(("prompt", f"#{k}  {pair['prompt']}"))
        for side in ("chosen", "rejected"):
            row, used = [], 0
            for tok, _, w in pair[side]:
                shown = tok.replace("\n", "\\n").strip() or repr(tok)
                if used + len(shown) + 1 > line_chars and row:
                    lines.append((side, row))
                    row, used, side = [], 0, ""
                row.append((shown, w))
                used += len(shown) + 1
            lines.append((side, row))
    label_chars = 10
    width = label_chars + max(len(p) - label_chars if k == "prompt" else sum(len(t) + 1 for t, _ in p)
                              for k, p in lines)
    char_w, line_h = 0.085, 0.32  # inches per character / per line at fontsize 9 monospace
    fig_w = char_w * width + 1.2
    fig = plt.figure(figsize=(fig_w, line_h * len(lines) + 0.8))
    ax = fig.add_axes((0.0, 0.0, 1 - 1.0 / fig_w, 1.0))
    ax.set_xlim(0, width)
    ax.set_ylim(len(lines), -0.5)
    ax.axis("off")
    for y, (kind, payload) in enumerate(lines):
        if kind == "prompt":
            ax.text(0, y, payload, family="monospace", fontsize=9, color="#444", va="center")
            continue
        ax.text(0, y, kind, family="monospace", fontsize=9, weight="bold", va="center")
        x = label_chars
        for tok, w in payload:
            ax.text(x, y, tok, family="monospace", fontsize=9, va="center",
                    bbox={"boxstyle": "round,pad=0.15", "facecolor": cmap(norm(w)), "edgecolor": "none"})
            x += len(tok) + 1
    cax = fig.add_axes((1 - 0.8 / fig_w, 0.1, 0.25 / fig_w, 0.8))
    fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap=cmap), cax=cax, label=f"weight ({transform})")
    _ensure_dir(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _ensure_dir(path: str) -> None:
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)


def _write_text(path: str, text: str) -> None:
    _ensure_dir(path)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def main(argv: Sequence[str] | None = None) -> int:
    """Draw token weights of preference pairs as an HTML page and a PNG figure."""
    import json

    from transformers import AutoTokenizer

    from .data import load_preference_dataset

    parser = argparse.ArgumentParser(prog="tisdpo visualize", description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", required=True,
                        help="dataset with weight columns (save_to_disk directory, JSON/JSONL/Parquet file, hub name)")
    parser.add_argument("--split", default="train")
    parser.add_argument("--tokenizer", required=True, help="tokenizer name or path (the training tokenizer)")
    parser.add_argument("--output-dir", default=".")
    parser.add_argument("--transform", default="origin", choices=WEIGHT_TRANSFORMS)
    parser.add_argument("--transform-kwargs", type=json.loads, default=None, help="JSON object")
    parser.add_argument("--eos-weight", type=float, default=None)
    parser.add_argument("--num-pairs", type=int, default=8)
    args = parser.parse_args(argv)
    dataset = load_preference_dataset(args.dataset, split=args.split)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    options = {"transform": args.transform, "transform_kwargs": args.transform_kwargs, "eos_weight": args.eos_weight,
               "max_pairs": args.num_pairs}
    for out in (render_html(dataset, tokenizer, os.path.join(args.output_dir, "weights.html"), **options),
                render_png(dataset, tokenizer, os.path.join(args.output_dir, "weights.png"), **options)):
        print(out)
    return 0


CLI_COMMANDS = {"visualize": main}

if __name__ == "__main__":
    raise SystemExit(main())
