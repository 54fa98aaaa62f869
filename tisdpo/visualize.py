"""``tisdpo visualize``: token weights of preference pairs as an HTML page and a PNG figure.

Input: a dataset with ``chosen_weights`` / ``rejected_weights`` columns in the convention of
``tisdpo.response_weights`` (chosen: ``r_t``, rejected: ``-r_t``, one value per response token of
``tisdpo.data.tokenize_row``'s tokenisation). Each response token is coloured by its training weight
``w = T(x)`` for the chosen transform (green: above the neutral weight, red: below); the HTML page shows
the raw reward ``r_t = log pi_plus - log pi_minus`` and the weight on hover.
"""

from __future__ import annotations

import html
import logging
import os
import textwrap

import torch

from .data import tokenize_row
from .response_weights import WEIGHT_TRANSFORMS, example_generator, response_transform_params, response_weights

logger = logging.getLogger(__name__)

_NEUTRAL = {"rank_based": None, "random": None, "binary": 0.5}  # None: middle of [min_weight, max_weight]


def neutral_weight(transform: str, transform_kwargs: dict | None = None) -> float:
    """The weight that means "no preference" for a transform: ``T(0)`` for elementwise transforms, the
    middle of the range for ``rank_based`` / ``random``, 0.5 for ``binary``."""
    params = response_transform_params(transform, transform_kwargs)
    if transform in _NEUTRAL:
        value = _NEUTRAL[transform]
        return (params["min_weight"] + params["max_weight"]) / 2 if value is None else value
    return float(response_weights([0.0], transform, params)[0])


def pair_tokens(example: dict, tokenizer, transform: str = "origin", transform_kwargs: dict | None = None,
                eos_weight: float | None = None, index: int = 0) -> dict:
    """Tokens, raw rewards and weights of one pair.

    Returns ``{"prompt": str, "chosen": [(token, r_t, w_t), ...], "rejected": [...]}`` where ``r_t`` is
    the raw reward (the rejected column's sign undone) and ``w_t`` the transformed weight. A weight column
    shorter than its response covers the part that truncation keeps (``tisdpo estimate-weights`` with the
    trainer's ``max_length``): the tokens after it get ``r_t = w_t = None`` (not trained on).
    """
    for column in ("chosen_weights", "rejected_weights"):
        if example.get(column) is None:
            raise ValueError(f"example has no {column!r}; estimate weights first (tisdpo estimate-weights)")
    text = {k: v for k, v in example.items() if k not in ("chosen_weights", "rejected_weights")}
    row = tokenize_row(text, tokenizer)
    if row is None:
        raise ValueError("example has an empty prompt or response after tokenisation")
    seed = response_transform_params(transform, transform_kwargs).get("seed", 0)
    out = {"prompt": tokenizer.decode(row["prompt_input_ids"], skip_special_tokens=True)}
    for side, sign in (("chosen", 1.0), ("rejected", -1.0)):
        ids, x = row[f"{side}_input_ids"], [float(v) for v in example[f"{side}_weights"]]
        if not 0 < len(x) <= len(ids):
            raise ValueError(f"`{side}_weights` has {len(x)} values but the {side} response has {len(ids)} tokens")
        w = response_weights(torch.tensor(x, dtype=torch.float64), transform, transform_kwargs,
                             eos_weight=eos_weight, generator=example_generator(seed, index, side)).tolist()
        out[side] = [(tokenizer.decode([i]), None if t >= len(x) else sign * x[t], None if t >= len(x) else w[t])
                     for t, i in enumerate(ids)]
    return out


def _collect(dataset, tokenizer, transform, transform_kwargs, eos_weight, max_pairs):
    if transform not in WEIGHT_TRANSFORMS:
        raise ValueError(f"transform must be one of {WEIGHT_TRANSFORMS}, got {transform!r}")
    n = len(dataset) if max_pairs is None else min(max_pairs, len(dataset))
    if n == 0:
        raise ValueError("dataset is empty")
    pairs, skipped = [], 0
    for i in range(len(dataset)):
        if len(pairs) == n:
            break
        example = dataset[i]
        if example.get("chosen_weights") is None and example.get("rejected_weights") is None \
                and "chosen_weights" in example:
            skipped += 1  # a pair the trainer drops under its truncation (estimate-weights wrote None)
            continue
        pairs.append((i, pair_tokens(example, tokenizer, transform, transform_kwargs, eos_weight, i)))
    if skipped:
        logger.warning("visualize: skipped %d pairs without weights (dropped by the trainer's truncation)", skipped)
    if not pairs:
        raise ValueError("no pair of the dataset has weights")
    centre = neutral_weight(transform, transform_kwargs)
    spread = max((abs(w - centre) for _, p in pairs for side in ("chosen", "rejected") for _, _, w in p[side]
                  if w is not None), default=0.0)
    return pairs, centre, spread or 1.0


def _html_colour(w: float, centre: float, spread: float) -> str:
    a = max(-1.0, min(1.0, (w - centre) / spread))
    rgb = (46, 160, 67) if a >= 0 else (215, 58, 73)
    return f"rgba({rgb[0]},{rgb[1]},{rgb[2]},{abs(a) * 0.85:.3f})"


def _html_prompt(prompt: str, max_chars: int) -> str:
    """The prompt, escaped, its newlines kept (the element is ``white-space: pre-wrap``); a prompt longer than
    ``max_chars`` shows its first quarter and last three quarters, the middle folded behind a marker."""
    prompt = prompt.strip("\n")
    if len(prompt) <= max_chars:
        return html.escape(prompt)
    head, tail = max_chars // 4, max_chars - max_chars // 4
    middle = prompt[head:len(prompt) - tail]
    return (f"{html.escape(prompt[:head])}<details class='cut'><summary>[&hellip; {len(middle):,} characters "
            f"omitted &hellip;]</summary>{html.escape(middle)}</details>{html.escape(prompt[len(prompt) - tail:])}")


def render_html(dataset, tokenizer, path: str, *, transform: str = "origin", transform_kwargs: dict | None = None,
                eos_weight: float | None = None, max_pairs: int | None = 20, max_prompt_chars: int = 1500) -> str:
    """Write an HTML page of the first ``max_pairs`` pairs (with weights), each response token coloured by its
    weight (hover: token, raw reward ``r_t`` and weight; grey: not scored, cut by truncation). Newlines of
    prompts and tokens are kept; a prompt longer than ``max_prompt_chars`` is folded in the middle. Returns
    ``path``."""
    pairs, centre, spread = _collect(dataset, tokenizer, transform, transform_kwargs, eos_weight, max_pairs)
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>TIS-DPO token weights</title><style>",
        "body{font-family:sans-serif;max-width:60em;margin:2em auto}"
        ".pair{border-top:1px solid #ccc;padding:.5em 0}.head{font-weight:bold}"
        ".prompt{color:#555;white-space:pre-wrap;font-family:monospace;margin:.3em 0 .3em 6em}"
        ".cut summary{color:#888;cursor:pointer}"
        ".tok{white-space:pre-wrap;font-family:monospace;padding:1px 2px;margin:0 1px;border-radius:3px}"
        ".unscored{color:#999;background:#eee}"
        ".label{font-weight:bold;display:inline-block;width:6em}",
        "</style></head><body>",
        f"<h1>Token weights</h1><p>transform <code>{html.escape(transform)}</code>"
        f"{html.escape(' ' + repr(transform_kwargs)) if transform_kwargs else ''}; green: weight above the "
        f"neutral {centre:.3g}, red: below (full colour at &plusmn;{spread:.3g}); grey: not scored (after the "
        "truncation the weights were estimated with). Hover a token for its "
        "reward r = log &pi;<sub>+</sub> &minus; log &pi;<sub>&minus;</sub> and weight.</p>",
    ]
    for k, (index, pair) in enumerate(pairs):
        parts.append(f"<div class='pair'><div class='head'>#{k} (row {index})</div>"
                     f"<div class='prompt'>{_html_prompt(pair['prompt'], max_prompt_chars)}</div>")
        for side in ("chosen", "rejected"):
            spans = "".join(
                f"<span class='tok unscored' title='{html.escape(repr(tok))}  not scored'>{html.escape(tok)}</span>"
                if w is None else
                f"<span class='tok' style='background:{_html_colour(w, centre, spread)}' "
                f"title='{html.escape(repr(tok))}  r={r:+.4f}  w={w:.4f}'>{html.escape(tok)}</span>"
                for tok, r, w in pair[side]
            )
            parts.append(f"<div><span class='label'>{side}</span>{spans}</div>")
        parts.append("</div>")
    parts.append("</body></html>")
    _write_text(path, "\n".join(parts))
    return path


_LABEL_CHARS = 9  # the label column ("rejected" + a space) of the figure


def _shown_token(tok: str, width: int) -> tuple[str, bool]:
    """How a token is drawn in the figure: newlines as "↵" (and the line breaks after it), surrounding spaces
    dropped, a blank token as "␣", clipped to ``width`` characters. Returns ``(text, breaks_line)``."""
    shown = tok.replace("\n", "↵").strip() or "␣"
    if len(shown) > width:
        shown = shown[: width - 1] + "…"
    return shown, "\n" in tok


def _middle_cut(lines: list, limit: int, marker) -> list:
    """``lines`` if at most ``limit``, else its first third and last two thirds around ``marker(n_omitted)``."""
    if len(lines) <= limit:
        return lines
    head = max(1, (limit - 1) // 3)
    tail = limit - 1 - head
    return [*lines[:head], marker(lines[head:len(lines) - tail]), *lines[len(lines) - tail:]]


def _prompt_lines(prompt: str, width: int, limit: int) -> list[str]:
    """The prompt's lines (each of its own lines starts a row, wrapped to ``width``; blank lines, such as the
    empty line between HH-RLHF turns, take no row), at most ``limit`` of them."""
    lines = []
    for paragraph in prompt.split("\n"):
        lines += textwrap.wrap(paragraph, width, break_long_words=True, replace_whitespace=False)

    def marker(cut):
        return f"[… {len(cut)} lines ({sum(len(x) for x in cut):,} characters) omitted …]"

    return _middle_cut(lines, limit, marker)


def _token_lines(tokens: list[tuple], width: int, limit: int) -> list:
    """Response tokens ``(token, r, w)`` wrapped into lines of at most ``width`` characters (a newline inside
    a token ends its line): each line a list of ``(shown, w)``, or a marker string; at most ``limit`` lines."""
    lines, row, used = [], [], 0
    for tok, _, w in tokens:
        shown, breaks = _shown_token(tok, width)
        if row and used + len(shown) > width:
            lines.append(row)
            row, used = [], 0
        row.append((shown, w))
        used += len(shown) + 1
        if breaks:
            lines.append(row)
            row, used = [], 0
    if row:
        lines.append(row)
    return _middle_cut(lines, limit, lambda cut: f"[… {sum(len(x) for x in cut)} tokens omitted …]")


def weights_figure(dataset, tokenizer, *, transform: str = "origin", transform_kwargs: dict | None = None,
                   eos_weight: float | None = None, max_pairs: int | None = 6, line_chars: int = 90,
                   max_prompt_lines: int = 12, max_response_lines: int = 12, dpi: int = 120):
    """The matplotlib figure of ``render_png``: per pair a ``#k`` header line, the prompt (newlines kept:
    each of its lines starts a row, blank lines skipped; wrapped to ``line_chars``; at most
    ``max_prompt_lines`` rows: a longer one loses its middle, marked), then the chosen and rejected tokens
    in boxes coloured by weight (wrapped to ``line_chars``, at most ``max_response_lines`` rows each,
    likewise cut in the middle). The size is bounded by these limits: about ``1.1 * (line_chars + 11)``
    characters wide and 0.3 inch per row. A horizontal colour bar sits at the
    top, above the first pair. Every text artist has a gid ``"<k>:<part>"`` (``part``: header, prompt,
    label, token, marker)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import TwoSlopeNorm

    if not isinstance(line_chars, int) or line_chars < 20:
        raise ValueError(f"line_chars must be an int >= 20, got {line_chars!r}")
    pairs, centre, spread = _collect(dataset, tokenizer, transform, transform_kwargs, eos_weight, max_pairs)
    norm = TwoSlopeNorm(vcenter=centre, vmin=centre - spread, vmax=centre + spread)
    cmap = plt.get_cmap("RdYlGn")
    rows = []  # (k, label, payload): payload a str (header / prompt / marker line) or a list of (shown, w)
    for k, (index, pair) in enumerate(pairs):
        rows.append((k, "header", f"#{k}  (row {index})"))
        for i, line in enumerate(_prompt_lines(pair["prompt"], line_chars, max_prompt_lines)):
            rows.append((k, "prompt" if i == 0 else "", line))
        for side in ("chosen", "rejected"):
            for i, line in enumerate(_token_lines(pair[side], line_chars, max_response_lines)):
                rows.append((k, side if i == 0 else "", line))
        rows.append((k, "gap", ""))

    font = {"family": "monospace", "fontsize": 9, "parse_math": False}
    probe = plt.figure(dpi=dpi)
    sample = probe.text(0, 0, "M" * 50, **font)
    char_w = sample.get_window_extent(probe.canvas.get_renderer()).width / 50 / dpi  # inches per character
    plt.close(probe)
    line_h, margin, top = 0.3, 0.25, 1.1  # inches: per text line, around the content, title + colour bar
    columns = _LABEL_CHARS + line_chars + 2
    content_w, content_h = columns * char_w * 1.1, line_h * len(rows)  # 10% slack for token gaps and box pads
    fig_w, fig_h = content_w + 2 * margin, top + content_h + margin
    fig = plt.figure(figsize=(fig_w, fig_h), dpi=dpi)
    ax = fig.add_axes((margin / fig_w, margin / fig_h, content_w / fig_w, content_h / fig_h))
    ax.set_xlim(0, columns * 1.1)
    ax.set_ylim(len(rows) - 0.5, -0.5)
    ax.axis("off")
    step = 1.1  # x units per character (the 10% slack)
    for y, (k, label, payload) in enumerate(rows):
        if label == "header":
            ax.text(0, y, payload, weight="bold", va="center", gid=f"{k}:header", **font)
            continue
        if label and label != "gap":
            ax.text(0, y, label, weight="bold", va="center", gid=f"{k}:label", **font)
        x = _LABEL_CHARS * step
        if isinstance(payload, str):
            if payload:
                kind = "marker" if payload.startswith("[…") else "prompt"
                ax.text(x, y, payload, color="#888" if kind == "marker" else "#444", va="center",
                        style="italic" if kind == "marker" else "normal", gid=f"{k}:{kind}", **font)
            continue
        for shown, w in payload:
            box = {"boxstyle": "round,pad=0.15", "edgecolor": "none",
                   "facecolor": "#e6e6e6" if w is None else cmap(norm(w))}
            ax.text(x, y, shown, va="center", bbox=box, color="#999" if w is None else "black",
                    gid=f"{k}:token", **font)
            x += (len(shown) + 1) * step
    bar_w = min(4.0, content_w)
    cax = fig.add_axes((margin / fig_w, (fig_h - 0.75) / fig_h, bar_w / fig_w, 0.13 / fig_h))
    bar = fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap=cmap), cax=cax, orientation="horizontal")
    bar.ax.tick_params(labelsize=7)
    fig.text(margin / fig_w, (fig_h - 0.12) / fig_h, f"token weight ({transform}); neutral {centre:.3g}; "
             "grey: not scored (truncated)", va="top", fontsize=9, parse_math=False)
    return fig


def render_png(dataset, tokenizer, path: str, *, transform: str = "origin", transform_kwargs: dict | None = None,
               eos_weight: float | None = None, max_pairs: int | None = 6, line_chars: int = 90,
               max_prompt_lines: int = 12, max_response_lines: int = 12) -> str:
    """Write a PNG figure of the first ``max_pairs`` pairs (``weights_figure``): each response token in a box
    coloured by its weight on a diverging colour map centred at the neutral weight, with a colour bar.
    Returns ``path``."""
    import matplotlib.pyplot as plt

    fig = weights_figure(dataset, tokenizer, transform=transform, transform_kwargs=transform_kwargs,
                         eos_weight=eos_weight, max_pairs=max_pairs, line_chars=line_chars,
                         max_prompt_lines=max_prompt_lines, max_response_lines=max_response_lines)
    _ensure_dir(path)
    fig.savefig(path, dpi=fig.dpi)
    plt.close(fig)
    return path


def _ensure_dir(path: str) -> None:
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)


def _write_text(path: str, text: str) -> None:
    _ensure_dir(path)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
