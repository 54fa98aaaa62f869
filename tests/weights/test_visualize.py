"""tisdpo.visualize: tokens, rewards and weights of pairs; the HTML page; the PNG figure; the command."""

import matplotlib.image
import pytest
from datasets import Dataset

from tisdpo.data import tokenize_row
from tisdpo.demo import build_tokenizer, make_preference_dataset
from tisdpo.visualize import neutral_weight, pair_tokens, render_html, render_png


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def weighted(tokenizer):
    """Three demo pairs with hand-made columns: chosen x_t = t - 2, rejected x_t = 0.5 * t."""
    data = make_preference_dataset(3, seed=11)
    rows = [tokenize_row(ex, tokenizer) for ex in data]
    data = data.add_column("chosen_weights", [[t - 2.0 for t in range(len(r["chosen_input_ids"]))] for r in rows])
    return data.add_column("rejected_weights",
                           [[0.5 * t for t in range(len(r["rejected_input_ids"]))] for r in rows])


def test_pair_tokens_undo_the_rejected_sign_and_apply_the_transform(weighted, tokenizer):
    pair = pair_tokens(weighted[0], tokenizer, "threshold")
    row = tokenize_row(weighted[0], tokenizer)
    assert [t for t, _, _ in pair["chosen"]] == [tokenizer.decode([i]) for i in row["chosen_input_ids"]]
    assert pair["chosen"][-1][0] == "</s>"
    for t, (_, r, w) in enumerate(pair["chosen"]):
        assert r == t - 2.0 and w == max(-1.0, min(1.0, t - 2.0))
    for t, (_, r, w) in enumerate(pair["rejected"]):
        assert r == -0.5 * t and w == pytest.approx(min(1.0, 0.5 * t))  # column holds -r, weight T(-r)
    assert pair["prompt"].startswith("question") and pair["prompt"].endswith("answer")


def test_neutral_weights():
    assert neutral_weight("origin") == 0.0
    assert neutral_weight("threshold_and_scale") == pytest.approx(1.0)
    assert neutral_weight("exp_clamp", {"k": 2.0}) == pytest.approx(2.0)
    assert neutral_weight("rank_based", {"min_weight": 0.5, "max_weight": 2.5}) == pytest.approx(1.5)
    assert neutral_weight("binary") == 0.5


def test_html_page(weighted, tokenizer, tmp_path):
    path = render_html(weighted, tokenizer, str(tmp_path / "sub" / "w.html"), transform="origin")
    text = open(path, encoding="utf-8").read()
    assert text.count("class='pair'") == 3 and text.count("class='tok'") == sum(
        len(w) for col in ("chosen_weights", "rejected_weights") for w in weighted[col])
    assert "&lt;/s&gt;" in text and "</s></span>" not in text  # token text is escaped
    assert "r=-2.0000  w=-2.0000" in text  # first chosen token: r = x = -2
    assert "r=-0.5000  w=0.5000" in text  # second rejected token: r = -x = -0.5, w = T(-r) = 0.5
    assert "rgba(46,160,67,0.850)" in text  # the weight farthest from neutral (0) is full green
    assert "rgba(215,58,73," in text  # negative weights are red
    one = render_html(weighted, tokenizer, str(tmp_path / "one.html"), max_pairs=1)
    assert open(one, encoding="utf-8").read().count("class='pair'") == 1


def test_png_figure(weighted, tokenizer, tmp_path):
    path = render_png(weighted, tokenizer, str(tmp_path / "w.png"), transform="rank_based")
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(path)
    assert image.shape[0] > 200 and image.shape[1] > 300
    assert image[..., :3].std() > 0.05  # not a blank canvas


def test_bad_input(weighted, tokenizer, tmp_path):
    with pytest.raises(ValueError, match="chosen_weights"):
        pair_tokens({"prompt": "question a answer", "chosen": " a", "rejected": " b"}, tokenizer)
    with pytest.raises(ValueError, match="transform must be one of"):
        render_html(weighted, tokenizer, str(tmp_path / "x.html"), transform="nope")
    with pytest.raises(ValueError, match="empty"):
        render_png(weighted.select([]), tokenizer, str(tmp_path / "x.png"))


def test_command_line(weighted, tokenizer, tmp_path):
    from tisdpo.cli import main

    weighted.save_to_disk(str(tmp_path / "data"))
    tokenizer.save_pretrained(str(tmp_path / "tok"))
    assert main(["visualize", "--dataset", str(tmp_path / "data"), "--tokenizer", str(tmp_path / "tok"),
                 "--output-dir", str(tmp_path / "out"), "--transform", "binary", "--num-pairs", "2"]) == 0
    assert (tmp_path / "out" / "weights.png").stat().st_size > 1000
    html = (tmp_path / "out" / "weights.html").read_text()
    assert html.count("class='pair'") == 2 and "binary" in html
    assert isinstance(Dataset.load_from_disk(str(tmp_path / "data")), Dataset)
