"""tisdpo.visualize on real-format dialogues: a multi-turn HH-style pair with a 600-word
prompt gives a bounded picture whose text boxes do not overlap, headers sit on their own pair, newlines are kept."""

import re

import matplotlib.image
import numpy as np
import pytest

from tests.trainer.tiny import build_tokenizer, dataset_of, hh_records
from tisdpo.data import tokenize_row
from tisdpo.visualize import pair_tokens, render_html, render_png, weights_figure


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def hh_dialogue(words: int, index: int = 0) -> dict:
    """An implicit-prompt HH-RLHF-style pair whose shared multi-turn history has at least ``words`` words."""
    records = hh_records()
    history, j = "", index
    while len(history.split()) < words:
        history += records[j % len(records)]["chosen"]
        j += 1
    last = records[index % len(records)]
    return {"chosen": history + last["chosen"], "rejected": history + last["rejected"]}


def with_weights(rows, tokenizer, keep=None):
    """Hand-made columns: chosen x_t = sin(t), rejected x_t = cos(t); ``keep`` cuts them (truncated estimate)."""
    out = []
    for row in rows:
        ids = tokenize_row(row, tokenizer)
        n_c, n_r = len(ids["chosen_input_ids"]), len(ids["rejected_input_ids"])
        n_c, n_r = (n_c, n_r) if keep is None else (min(keep, n_c), min(keep, n_r))
        out.append({**row, "chosen_weights": np.sin(np.arange(n_c)).tolist(),
                    "rejected_weights": np.cos(np.arange(n_r)).tolist()})
    return dataset_of(out)


@pytest.fixture(scope="module")
def long_pairs(tokenizer):
    rows = [hh_dialogue(600, 0), hh_dialogue(10, 3)]
    assert len(rows[0]["chosen"].split()) > 600 and rows[0]["chosen"].count("\n\nHuman:") > 10
    return with_weights(rows, tokenizer)


def _boxes(fig):
    """(gid, [x0, y0, x1, y1]) in pixels of every text artist, including its coloured box if it has one."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    out = []
    for text in fig.axes[0].texts:
        bbox = text.get_window_extent(renderer)
        patch = text.get_bbox_patch()
        if patch is not None:
            bbox = type(bbox).union([bbox, patch.get_window_extent(renderer)])
        out.append((text.get_gid(), np.array([bbox.x0, bbox.y0, bbox.x1, bbox.y1])))
    return out


def test_a_600_word_dialogue_gives_a_bounded_figure_without_overlaps(long_pairs, tokenizer, tmp_path):
    fig = weights_figure(long_pairs, tokenizer, transform="threshold")
    width, height = fig.get_size_inches() * fig.dpi
    assert width < 1400 and height < 2000, (width, height)  # was 48,226 x 518 px for the 600-word prompt
    boxes = _boxes(fig)
    assert len(boxes) > 100
    for gid, (x0, y0, x1, y1) in boxes:  # nothing cut off at the figure's edges (the first header was)
        assert 0 <= x0 and x1 <= width and 0 <= y0 and y1 <= height, (gid, x0, y0, x1, y1)
    xy = np.stack([b for _, b in boxes])  # [n, 4]: every pair of boxes at once
    overlap_x = np.minimum(xy[:, None, 2], xy[None, :, 2]) - np.maximum(xy[:, None, 0], xy[None, :, 0])
    overlap_y = np.minimum(xy[:, None, 3], xy[None, :, 3]) - np.maximum(xy[:, None, 1], xy[None, :, 1])
    clash = (overlap_x > 0.5) & (overlap_y > 0.5)  # half a pixel: antialiased edges may touch
    np.fill_diagonal(clash, False)
    assert not clash.any(), [(boxes[i], boxes[j]) for i, j in zip(*np.nonzero(clash), strict=True)][:3]
    # each pair's "#k" header is above everything of pair k and below everything of pair k-1 (y grows upwards)
    for k in range(2):
        header = [b for g, b in boxes if g == f"{k}:header"]
        assert len(header) == 1
        own = [b for g, b in boxes if g.startswith(f"{k}:") and g != f"{k}:header"]
        assert all(b[3] <= header[0][1] for b in own)
        if k:
            assert all(b[1] >= header[0][3] for g, b in boxes if g.startswith(f"{k - 1}:"))
    # the long prompt is cut in the middle with a marker; the short one is shown whole, its turns on their lines
    texts = {t.get_gid(): [] for t in fig.axes[0].texts}
    for t in fig.axes[0].texts:
        texts[t.get_gid()].append(t.get_text())
    assert any(re.fullmatch(r"\[… \d+ lines \([\d,]+ characters\) omitted …\]", s) for s in texts["0:marker"])
    assert all(len(s) <= 90 for s in texts["0:prompt"] + texts["1:prompt"])
    prompt = pair_tokens(long_pairs[1], tokenizer)["prompt"]
    for turn in ("Human:", "Assistant:"):  # every turn starts a line, as its newlines say
        assert sum(s.startswith(turn) for s in texts["1:prompt"]) == prompt.count(turn) > 1
    assert "" not in texts["1:prompt"]  # blank lines take a row but draw no text
    # the colour bar is next to the content: within half an inch of the first pair's header
    colour_bar = fig.axes[1].get_window_extent()
    assert colour_bar.y0 - [b for g, b in boxes if g == "0:header"][0][3] < 0.5 * fig.dpi

    path = render_png(long_pairs, tokenizer, str(tmp_path / "long.png"), transform="threshold")
    image = matplotlib.image.imread(path)
    assert abs(image.shape[0] - height) <= 1 and abs(image.shape[1] - width) <= 1


def test_long_responses_are_cut_in_the_middle(tokenizer):
    row = hh_dialogue(20)
    row = {"chosen": row["chosen"] + " and more" * 300, "rejected": row["rejected"]}
    fig = weights_figure(with_weights([row], tokenizer), tokenizer, max_response_lines=6)
    markers = [t.get_text() for t in fig.axes[0].texts if t.get_gid() == "0:marker"]
    assert len(markers) == 1 and re.fullmatch(r"\[… \d+ tokens omitted …\]", markers[0])
    assert fig.get_size_inches()[1] * fig.dpi < 1000


def test_html_keeps_newlines_and_folds_long_prompts(long_pairs, tokenizer, tmp_path):
    text = open(render_html(long_pairs, tokenizer, str(tmp_path / "w.html")), encoding="utf-8").read()
    assert re.search(r"\.prompt\{[^}]*white-space:pre-wrap", text)
    short = re.findall(r"<div class='prompt'>(.*?)</div>", text, flags=re.S)[1]
    assert "Human: " in short and "\n\nAssistant:" in short  # the turns stay on their own lines
    assert text.count("characters omitted &hellip;]</summary>") == 1  # only the 600-word prompt is folded
    assert "<div class='head'>#0 (row 0)</div>" in text and "<div class='head'>#1 (row 1)</div>" in text


def test_weights_of_a_truncated_response_cover_its_start(tokenizer, tmp_path):
    """Columns written under the trainer's truncation are shorter than the full response: the rest is shown as
    not scored (grey), never misaligned; a column longer than the response is an error."""
    data = with_weights([hh_dialogue(30, 2)], tokenizer, keep=3)
    pair = pair_tokens(data[0], tokenizer)
    assert [w is None for _, _, w in pair["chosen"]] == [False] * 3 + [True] * (len(pair["chosen"]) - 3)
    assert pair["chosen"][1][2] == pytest.approx(np.sin(1.0))
    text = open(render_html(data, tokenizer, str(tmp_path / "t.html")), encoding="utf-8").read()
    assert text.count("class='tok unscored'") == len(pair["chosen"]) + len(pair["rejected"]) - 6
    too_long = dict(data[0], chosen_weights=data[0]["chosen_weights"] + [0.0] * 500)
    with pytest.raises(ValueError, match="chosen_weights"):
        pair_tokens(too_long, tokenizer)
