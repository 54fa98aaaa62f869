"""`tisdpo estimate-weights` on several processes, observed, for tests/weights/test_distributed.py:
`torchrun --nproc_per_node 2 -m tests.weights.estimate_run LOG_DIR [kill] ARGS` (ARGS: the command's flags).

Each rank appends the name of every shard file it writes to LOG_DIR/rank-<RANK>.txt. With `kill`, rank 1 dies
(`os._exit`, no cleanup) in the first batch of its second shard, its first shard written and the temporary file
of the second open; torchrun then stops rank 0 wherever it is.
"""

import os
import sys

import tisdpo.weights as W
from tisdpo.cli import main


def _observe(log_dir: str, kill: bool) -> None:
    original, rank, calls = W._write_shard, os.environ["RANK"], {"n": 0}

    def write_shard(path, batches, identity):
        calls["n"] += 1
        if kill and rank == "1" and calls["n"] == 2:
            def dying():
                yield next(iter(batches))
                os._exit(17)
            original(path, dying(), identity)
        original(path, batches, identity)
        with open(os.path.join(log_dir, f"rank-{rank}.txt"), "a") as f:
            f.write(os.path.basename(path) + "\n")

    W._write_shard = write_shard


if __name__ == "__main__":
    log_dir, rest = sys.argv[1], sys.argv[2:]
    kill = bool(rest) and rest[0] == "kill"
    _observe(log_dir, kill)
    sys.exit(main(["estimate-weights", *rest[kill:]]))
