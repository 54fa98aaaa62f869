"""`tisdpo estimate-weights` on 2 gloo processes (torchrun, CPU): the ranks take disjoint shards of the cache, rank
0 writes the output, byte-identical to one process's (output file and every shard file); with rank 1 killed
mid-run (tests/weights/estimate_run.py), a rerun reuses the finished shards and gives the same bytes."""

import os
import socket
import subprocess
import sys

import pytest

from tisdpo.cli import main as cli_main
from tisdpo.demo import make_preference_dataset

from .pairs import save_contrastive_pair

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PAIRS, SHARD, BATCH = 13, 2, 1  # 7 shards of 2 pairs (the last of 1), one pair per forward pass


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("estimate")
    save_contrastive_pair(root, num_layers=1)
    make_preference_dataset(PAIRS, seed=5).to_json(str(root / "pairs.jsonl"), lines=True)
    return root


def _flags(root, name: str) -> list[str]:
    return ["--dataset", str(root / "pairs.jsonl"), "--method", "D", "--plus-model", str(root / "plus"),
            "--minus-model", str(root / "minus"), "--batch-size", str(BATCH), "--shard-size", str(SHARD),
            "--cache-dir", str(root / f"cache-{name}"), "--output", str(root / f"{name}.jsonl"), "--no-progress",
            "--device", "cpu"]


def _torchrun(module_args: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port,
           *module_args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def _shards(root, name: str) -> dict[str, bytes]:
    (run_dir,) = [p for p in (root / f"cache-{name}").iterdir()]
    return {p.name: p.read_bytes() for p in sorted(run_dir.glob("shard-*.parquet"))}


@pytest.fixture(scope="module")
def single(setup):
    assert cli_main(["estimate-weights", *_flags(setup, "single")]) == 0
    return (setup / "single.jsonl").read_bytes(), _shards(setup, "single")


def _written(log_dir) -> list[set[str]]:
    return [set((log_dir / f"rank-{r}.txt").read_text().split()) if (log_dir / f"rank-{r}.txt").exists() else set()
            for r in range(2)]


def test_two_processes_equal_one(setup, single):
    """The ranks write disjoint shards, all of them between them; output and shards equal one process's."""
    log_dir = setup / "log-two"
    log_dir.mkdir()
    proc = _torchrun(["-m", "tests.weights.estimate_run", str(log_dir), *_flags(setup, "two")])
    assert proc.returncode == 0, proc.stderr[-6000:]
    output, shards = single
    assert len(shards) == 7
    rank0, rank1 = _written(log_dir)
    assert rank0 and rank1 and not rank0 & rank1 and rank0 | rank1 == set(shards), (rank0, rank1)
    assert (setup / "two.jsonl").read_bytes() == output
    assert _shards(setup, "two") == shards


def test_a_rank_killed_mid_run_then_rerun_equals_one_process(setup, single):
    """Rank 1 dies in its second shard; the rerun, launched as the README shows (`torchrun ... -m tisdpo
    estimate-weights`), reuses every finished shard and writes the one-process bytes."""
    log_dir = setup / "log-killed"
    log_dir.mkdir()
    proc = _torchrun(["-m", "tests.weights.estimate_run", str(log_dir), "kill", *_flags(setup, "killed")])
    assert proc.returncode != 0 and not (setup / "killed.jsonl").exists()
    partial = _shards(setup, "killed")
    assert 1 <= len(partial) < 7, sorted(partial)  # rank 1's first shard (and whatever rank 0 finished)
    (run_dir,) = [p for p in (setup / "cache-killed").iterdir()]
    finished = {p.name: p.stat().st_mtime_ns for p in run_dir.glob("shard-*.parquet")}
    proc = _torchrun(["-m", "tisdpo", "estimate-weights", *_flags(setup, "killed")])
    assert proc.returncode == 0, proc.stderr[-6000:]
    output, shards = single
    assert (setup / "killed.jsonl").read_bytes() == output
    assert _shards(setup, "killed") == shards
    for name, mtime in finished.items():  # the rerun reused every finished shard
        assert (run_dir / name).stat().st_mtime_ns == mtime, name
