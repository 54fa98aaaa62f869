"""Sharded training on CPU (2 gloo processes): FSDP2 and DeepSpeed ZeRO-3 steps equal one process on the same global
batch, a sharded checkpoint resumes, and the context-parallel `group=` loss equals the one-process loss.

The sharded runs live in tests/trainer/sharded_run.py (started with torchrun, one launch per engine); the
one-process truth is computed here with the same batches. Tolerances (float32 runs): the sharded and the
one-process runs add the same numbers in another order (per-rank padding widths, per-rank means averaged by the
gradient reduction), so losses and metrics agree to a few float32 ulps of their size (measured <= 7e-6 relative);
parameters after 3 SGD steps of lr 0.5 agree to ~1e-6 of their size (measured). The bounds, rel 1e-5 for losses
and metrics and rtol 1e-4 / atol 1e-6 for parameters (as the DDP test), are float32's eps 1.2e-7 times a size
factor of ~100 (reduction lengths ~V x rows, three steps) and far below the step's own effect (parameters move by
0.2-0.3, losses fall from 0.78 to 0.12).
"""

import os
import socket
import subprocess
import sys

import pytest
import torch

from tests.trainer import sharded_run
from tisdpo_kernels import fused_tis_dpo_loss

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _launch(mode: str, out_dir) -> dict:
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port,
           "-m", "tests.trainer.sharded_run", mode, str(out_dir)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return torch.load(os.path.join(out_dir, f"{mode}.pt"), weights_only=False)


@pytest.fixture(scope="module")
def fsdp2(tmp_path_factory):
    return _launch("fsdp2", tmp_path_factory.mktemp("fsdp2"))


def _assert_same_run(single, sharded):
    assert len(single["history"]) == len(sharded["history"]) == sharded_run.STEPS
    for k, (a, b) in enumerate(zip(single["history"], sharded["history"], strict=True)):
        print(f"step {k}: 1 process {a['loss']:.8f}, 2 sharded processes {b['loss']:.8f}")
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert set(a["metrics"]) == set(b["metrics"])
        for name, value in a["metrics"].items():
            assert b["metrics"][name] == pytest.approx(value, rel=1e-5, abs=1e-6), name
    assert single["history"][-1]["loss"] < 0.5 * single["history"][0]["loss"]  # the steps did move the weights
    assert set(single["params"]) == set(sharded["params"])  # tied: one parameter on both sides
    for name, value in single["params"].items():
        torch.testing.assert_close(sharded["params"][name], value, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("case", list(sharded_run.CASES))
def test_fsdp2_steps_match_one_process(fsdp2, tmp_path, case):
    """3 SGD steps under FSDP2 (each decoder layer, embedding, the [norm, head] tail group and the root sharded as
    accelerate does; the reference sharded and frozen; 2 of the 4 pairs per rank) give the one-process losses,
    metrics and parameters. In the `resharded-head` cases the head weight is a DTensor after the decoder's
    forward (the old trainer raised NotImplementedError there); the tied cases train the shared weight once."""
    _assert_same_run(sharded_run.run_single(case, str(tmp_path)), fsdp2[case])


def test_fsdp2_sharded_checkpoint_resumes(fsdp2):
    """A torch.distributed.checkpoint of the sharded model and AdamW state after step 1 (one shard file per rank),
    loaded into a fresh sharded model with other weights, continues to the parameters of the uninterrupted run:
    same ranks, same reduction order, so equal to float32 rounding of the checkpoint round trip (exact)."""
    result = fsdp2["resume"]
    assert result["shard_files"] == ["__0_0.distcp", "__1_0.distcp"]
    for name, value in result["straight"].items():
        torch.testing.assert_close(result["resumed"][name], value, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("case", list(sharded_run.GROUP_CASES))
def test_group_loss_matches_one_process(fsdp2, case):
    """`fused_tis_dpo_loss(..., group=)` with the rows of each of 4 sequences split unevenly across 2 ranks (rank 1
    holds no row of sequence 0, rank 0 only prompt rows of sequence 1): the one-process loss and metrics on every
    rank; the ranks' hidden-row gradients, gathered, and their head gradients, summed, are the one-process
    gradients. Float64: equal up to the reduction order (1e-12)."""
    _, whole = sharded_run.group_problem()
    want = sharded_run.group_loss(whole, sharded_run.GROUP_CASES[case])
    got = fsdp2["group"][case]
    torch.testing.assert_close(got["loss"], want["loss"], rtol=1e-12, atol=1e-12)
    for name, value in want["metrics"].items():
        torch.testing.assert_close(got["metrics"][name], value, rtol=1e-12, atol=1e-12, msg=name)
    torch.testing.assert_close(got["d_hidden"], want["d_hidden"], rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(got["d_weight"], want["d_weight"], rtol=1e-12, atol=1e-13)


def test_group_needs_an_initialised_process_group():
    shards, _ = sharded_run.group_problem()
    t = shards[0]
    with pytest.raises(ValueError, match="group= needs an initialised torch.distributed"):
        fused_tis_dpo_loss(t["hidden"], t["weight"], t["labels"], ref_hidden=t["ref_hidden"],
                           ref_weight=t["ref_weight"], cu_seqlens=t["cu_seqlens"], group=object())


@pytest.mark.slow
def test_zero3_steps_match_one_process(tmp_path):
    """DeepSpeed ZeRO-3 (its CPU accelerator, gloo; parameters partitioned, gathered per module call; the reference
    a frozen ZeRO-3 inference engine): 3 SGD steps give the one-process losses, metrics and parameters, untied and
    padded, tied and packed with the TIS-DPO KL."""
    pytest.importorskip("deepspeed", reason="DeepSpeed is in the `deepspeed` and `test` extras")
    results = _launch("zero3", tmp_path)
    for case in sharded_run.ZERO3_CASES:
        _assert_same_run(sharded_run.run_single(case, str(tmp_path / "single")), results[case])


def test_head_forward_runs_fn_as_the_head_modules_call():
    """Outside FSDP2 the loss runs as the head module's forward (the hooks DeepSpeed relies on fire around it),
    and the module's own forward is back afterwards."""
    from tisdpo.distributed import head_forward

    head = torch.nn.Linear(4, 6, bias=False)
    seen = []
    head.register_forward_pre_hook(lambda module, args: seen.append(("pre", tuple(args[0].shape))))
    head.register_forward_hook(lambda module, args, out: seen.append(("post", tuple(out.shape))))
    h = torch.randn(3, 4)
    out = head_forward(head, lambda weight, bias, rows: (rows @ weight.T).sum(-1), h)
    torch.testing.assert_close(out, (h @ head.weight.T).sum(-1))
    assert seen == [("pre", (3, 4)), ("post", (3,))]
    assert "forward" not in head.__dict__
    torch.testing.assert_close(head(h), h @ head.weight.T)


def test_context_parallel_local_layout():
    """Under context parallelism each rank's padded slice gets its own row boundaries; packed batches and
    per-token columns the Trainer does not split are refused."""
    from tisdpo.trainer import _local_cu_seqlens

    labels = torch.zeros(4, 5, dtype=torch.long)
    assert _local_cu_seqlens({"labels": labels}).tolist() == [0, 5, 10, 15, 20]
    with pytest.raises(ValueError, match="padded batches"):
        _local_cu_seqlens({"labels": torch.zeros(1, 9, dtype=torch.long)})
    with pytest.raises(ValueError, match="not `token_weights`"):
        _local_cu_seqlens({"labels": labels, "token_weights": torch.ones(4, 10)})
