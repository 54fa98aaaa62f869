"""Context parallelism on CPU (2 gloo processes, tests/trainer/sharded_run.py `cp`): the trainer's loss with the
cp group, FSDP2 over the same ranks, each rank holding its half of every sequence (ids, mask, labels), the
attention side emulated (each rank runs the decoder on the whole sequences and keeps its slice's hidden rows, so
its parameters get its rows' share of the gradient, as under ring attention). The loss, the reduced gradient, its
norm and a clipped SGD update equal one process's on the same pairs.

Without the cp factor (`tisdpo.distributed.context_parallel_loss`) FSDP2 averages the two shares: gradient and
grad_norm 0.50x, and the clipped step differs. Tolerances (float32): the two runs add the same terms in another
order (per-rank sums all-reduced, two shares summed by the reduce-scatter): loss rel 1e-5, gradients and
parameters rtol 1e-4 / atol 1e-6 as in tests/trainer/test_distributed.py; grad_norm rel 1e-5.
"""

import pytest
import torch

from tests.trainer import sharded_run
from tests.trainer.test_distributed import _launch


@pytest.fixture(scope="module")
def cp(tmp_path_factory):
    return _launch("cp", tmp_path_factory.mktemp("cp"))


@pytest.mark.parametrize("case", list(sharded_run.CP_CASES))
def test_context_parallel_gradient_equals_one_process(cp, tmp_path, case):
    single, sharded = sharded_run.cp_single(case, str(tmp_path)), cp[case]
    assert single["history"][0]["grad_norm"] > sharded_run.CP_MAX_NORM  # step 1 is clipped
    for k, (a, b) in enumerate(zip(single["history"], sharded["history"], strict=True)):
        print(f"step {k}: loss {a['loss']:.8f} vs {b['loss']:.8f}, grad_norm {a['grad_norm']:.6f} vs "
              f"{b['grad_norm']:.6f}")
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        for name, value in a["metrics"].items():
            assert b["metrics"][name] == pytest.approx(value, rel=1e-5, abs=1e-6), name
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)
        assert set(a["grads"]) == set(b["grads"])
        for name, value in a["grads"].items():
            torch.testing.assert_close(b["grads"][name], value, rtol=1e-4, atol=1e-6, msg=f"step {k}: {name}")
    for name, value in single["params"].items():
        torch.testing.assert_close(sharded["params"][name], value, rtol=1e-4, atol=1e-6, msg=name)


def test_context_parallel_loss_keeps_the_value_and_scales_the_gradient():
    """The cp factor keeps the loss value and multiplies its gradient by the group size."""
    from tisdpo.distributed import _SumOverGroup

    x = torch.tensor(0.7, requires_grad=True)
    y = _SumOverGroup.apply(x * 3, 4)
    y.backward()
    assert y.item() == pytest.approx(2.1) and x.grad.item() == pytest.approx(12.0)


def test_context_parallel_refuses_prefix_sharing():
    """Prefix sharing with the cp group is refused by name: its explicit `row_index` rows do not follow the
    Trainer's split along the sequence."""
    from tisdpo.trainer import _local_cu_seqlens

    labels = torch.zeros(4, 6, dtype=torch.long)
    with pytest.raises(ValueError, match="context parallelism with prefix_sharing is not supported"):
        _local_cu_seqlens({"labels": labels, "row_index": torch.arange(10)})


def test_context_parallel_refuses_sft_alone(tok, quick_args, monkeypatch):
    """`loss_type='sft'` alone is a token mean the cp group does not sum: refused by name, not a silently
    different gradient."""
    import tisdpo.trainer
    from tests.trainer.tiny import tiny_llama
    from tisdpo import TISDPOConfig, TISDPOTrainer
    from tisdpo.data import tokenize_row

    trainer = TISDPOTrainer(tiny_llama(len(tok)), args=TISDPOConfig(**quick_args, loss_type="sft"),
                            processing_class=tok)
    batch = trainer.data_collator([tokenize_row(r, tok) for r in sharded_run.synthetic_pairs(2)])
    monkeypatch.setattr(tisdpo.trainer, "context_parallel_group", lambda accelerator: object())
    with pytest.raises(ValueError, match="loss_type='sft' alone under context parallelism"):
        trainer.compute_loss(trainer.model, batch)
