"""A saved contrastive pair of tiny models for the estimation tests that run `estimate-weights` on disk."""

from tisdpo.demo import build_model, build_tokenizer


def save_contrastive_pair(root, num_layers: int):
    """Writes `root/plus` (model + tokenizer) and `root/minus` (model), tiny Llamas of hidden size 32 seeded 1 and 2;
    returns the tokenizer."""
    tok = build_tokenizer()
    for name, seed in (("plus", 1), ("minus", 2)):
        build_model(tok, hidden_size=32, num_layers=num_layers, seed=seed).save_pretrained(root / name)
    tok.save_pretrained(root / "plus")
    return tok
