"""Sharded training steps for the multi-process tests:
`torchrun --nproc_per_node 2 -m tests.trainer.sharded_run {fsdp2|cp|zero3} OUT`.

Each rank takes its half of every global batch and runs the trainer's own loss path (`TISDPOTrainer.compute_loss`)
on a policy sharded by the engine: FSDP2 `fully_shard` applied as accelerate's FSDP2 plugin does (each decoder
layer, the input embedding when untied, the tail group [final norm, (tied embedding,) LM head], the root), or a
DeepSpeed ZeRO-3 engine (its CPU accelerator, gloo). The reference model is sharded and frozen the same way
(`tisdpo.distributed.shard_frozen` / `deepspeed_frozen`). Without a GPU accelerate would turn an FSDP config into
DDP, so the sharding is applied here directly. `run_single` is the one-process run on the whole global batch that
the tests compare against. Rank 0 writes OUT/<mode>.pt: per case, per step, the global loss and the metrics, and
the full parameters after the steps; plus the sharded-checkpoint resume and the `group=` loss results.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

from tests.trainer.tiny import build_tokenizer, no_checkpointing, synthetic_pairs, tiny_llama
from tisdpo import TISDPOConfig, TISDPOTrainer
from tisdpo.data import tokenize_row
from tisdpo.distributed import deepspeed_frozen, layer_classes, shard_frozen
from tisdpo_kernels import fused_tis_dpo_loss

PAIRS, STEPS, LR = 4, 3, 0.5  # global batch (pairs), steps, SGD learning rate

# name: (tied embeddings, padding_free, kl, tail group's reshard_after_forward). With the tail resharded the head
# weight is a DTensor again after the decoder's forward: only the head's own forward call unshards it.
CASES = {
    "untied-padded": (False, False, None, False),
    "tied-packed-kl": (True, True, "tisdpo", False),
    "untied-packed-tdpo2-resharded-head": (False, True, "tdpo2", True),
    "tied-padded-resharded-head": (True, False, None, True),
}
ZERO3_CASES = ("untied-padded", "tied-packed-kl")


def records(tok, n: int = PAIRS * STEPS) -> list[dict]:
    """Synthetic pairs with random per-token weights (raw values; the trainer applies `threshold_and_scale`)."""
    g = torch.Generator().manual_seed(0)
    out = []
    for r in synthetic_pairs(n):
        row = tokenize_row(r, tok)
        out.append(dict(r, chosen_weights=(2 * torch.randn(len(row["chosen_input_ids"]), generator=g)).tolist(),
                        rejected_weights=(2 * torch.randn(len(row["rejected_input_ids"]), generator=g)).tolist()))
    return out


def make_trainer(tok, case: str, tmp: str):
    tied, padding_free, kl, _ = CASES[case]
    overrides = {"tie_word_embeddings": True} if tied else {}
    policy, ref = tiny_llama(len(tok), seed=0, **overrides), tiny_llama(len(tok), seed=1, **overrides)
    args = TISDPOConfig(
        output_dir=os.path.join(tmp, case), use_cpu=True, report_to="none", disable_tqdm=True, save_strategy="no",
        ddp_backend="gloo" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None, **no_checkpointing(), seed=0,
        padding_free=padding_free, kl=kl, beta=0.3, weight_transform="threshold_and_scale",
    )
    trainer = TISDPOTrainer(policy, ref_model=ref, args=args, processing_class=tok)
    return trainer, ref


def batches(trainer, tok, rank: int, world: int) -> list[dict]:
    """Per step, this rank's share (PAIRS // world pairs) of the global batch, collated by the trainer."""
    rows = [tokenize_row(r, tok) for r in records(tok)]
    per = PAIRS // world
    return [trainer.data_collator(rows[s * PAIRS + rank * per: s * PAIRS + (rank + 1) * per]) for s in range(STEPS)]


def step(trainer, model, batch, world: int) -> dict:
    """One loss + metrics of the global batch (the rank-local loss averaged over ranks; the trainer's metrics are
    already gathered over ranks)."""
    trainer._metrics["train"].clear()
    loss = trainer.compute_loss(model, batch)
    value = loss.detach().clone()
    if world > 1:
        dist.all_reduce(value)
        value /= world
    metrics = {name: values[-1] for name, values in trainer._metrics["train"].items()}
    return {"loss": float(value), "metrics": metrics, "local_loss": loss}


def full_parameters(model) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in model.named_parameters():
        out[name] = (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
    return out


def run_single(case: str, tmp: str) -> dict:
    """One process, the whole global batch per step, plain SGD: the truth the sharded runs must reproduce."""
    tok = build_tokenizer()
    trainer, _ = make_trainer(tok, case, tmp)
    model = trainer.model
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    history = []
    for batch in batches(trainer, tok, 0, 1):
        out = step(trainer, model, batch, 1)
        out.pop("local_loss").backward()
        opt.step()
        opt.zero_grad()
        history.append(out)
    return {"history": history, "params": full_parameters(model)}


# --------------------------------------------------------------------------------------------------------------
# FSDP2
# --------------------------------------------------------------------------------------------------------------


def shard_like_accelerate(model, tail_reshard: bool):
    """`fully_shard` as accelerate's `fsdp2_prepare_model` applies it (accelerate 1.15): every decoder layer, the
    input embedding (untied), the tail [final norm, (tied embedding,) LM head] and the root."""
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer)
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = embed.weight is head.weight
    if not tied:
        fully_shard(embed)
    fully_shard([model.model.norm, embed, head] if tied else [model.model.norm, head],
                reshard_after_forward=tail_reshard)
    fully_shard(model)
    return model


def fsdp2_case(tok, case: str, tmp: str, rank: int, world: int) -> dict:
    trainer, ref = make_trainer(tok, case, tmp)
    model = shard_like_accelerate(trainer.model, CASES[case][3])
    trainer.ref_model = shard_frozen(ref, layer_classes(ref))
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    history = []
    for batch in batches(trainer, tok, rank, world):
        out = step(trainer, model, batch, world)
        out.pop("local_loss").backward()
        opt.step()
        opt.zero_grad()
        history.append(out)
    return {"history": history, "params": full_parameters(model)}


def fsdp2_resume(tok, tmp: str, rank: int, world: int) -> dict:
    """AdamW, 3 steps straight through vs. a sharded checkpoint (torch.distributed.checkpoint of the model's and
    the optimizer's sharded state dicts, as the Trainer saves them under FSDP2) after step 1, loaded into a fresh
    sharded model (other initial weights) and optimizer, then steps 2 and 3."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    case = "tied-packed-kl"
    checkpoint = os.path.join(tmp, "dcp-checkpoint")

    def sharded(seed):
        trainer, ref = make_trainer(tok, case, tmp)
        if seed:
            trainer.model.load_state_dict(tiny_llama(len(tok), seed=seed, tie_word_embeddings=True).state_dict())
        model = shard_like_accelerate(trainer.model, False)
        trainer.ref_model = shard_frozen(ref, layer_classes(ref))
        return trainer, model, torch.optim.AdamW(model.parameters(), lr=1e-2)

    def train(trainer, model, opt, steps):
        for batch in steps:
            trainer.compute_loss(model, batch).backward()
            opt.step()
            opt.zero_grad()

    trainer, model, opt = sharded(0)
    data = batches(trainer, tok, rank, world)
    train(trainer, model, opt, data[:1])
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=checkpoint)
    train(trainer, model, opt, data[1:])
    straight = full_parameters(model)

    trainer, model, opt = sharded(7)
    model_sd, optim_sd = get_state_dict(model, opt)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=checkpoint)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    train(trainer, model, opt, data[1:])
    return {"straight": straight, "resumed": full_parameters(model),
            "shard_files": sorted(f for f in os.listdir(checkpoint) if f.endswith(".distcp"))}


# --------------------------------------------------------------------------------------------------------------
# the group= loss (context parallelism, loss side)
# --------------------------------------------------------------------------------------------------------------

# response-token rows of each of the 4 sequences (2 pairs) held by rank 0 and rank 1: uneven, and some rank holds
# no row of a sequence; "prompt" rows (ignore_index) lie in front of each sequence's first slice.
GROUP_SPLIT = [(5, 0), (0, 4), (3, 6), (1, 2)]
GROUP_PROMPT = 2


def group_problem(dtype=torch.float64):
    """Seeded data of the `group=` test: per rank, packed rows [N_r, D] with cu_seqlens (zero-length segments
    where a rank holds nothing of a sequence); and the whole batch in one process. Returns (shards, whole), each
    a dict of the loss's tensor arguments plus `index`, each row's position in the whole batch."""
    d, v = 16, 37
    g = torch.Generator().manual_seed(3)
    weight = torch.randn(v, d, generator=g, dtype=dtype) * 0.5
    ref_weight = weight + 0.1 * torch.randn(v, d, generator=g, dtype=dtype)
    seqs, offset = [], 0
    for rows in GROUP_SPLIT:
        n = GROUP_PROMPT + sum(rows)
        labels = torch.randint(0, v, (n,), generator=g)
        labels[:GROUP_PROMPT] = -100
        seqs.append(dict(hidden=torch.randn(n, d, generator=g, dtype=dtype), labels=labels,
                         ref_hidden=torch.randn(n, d, generator=g, dtype=dtype),
                         token_weights=torch.rand(n, generator=g, dtype=dtype) + 0.5,
                         index=torch.arange(offset, offset + n)))  # rows' positions in the one-process batch
        offset += n

    def pack(parts):
        cu = torch.tensor([0] + [p["labels"].numel() for p in parts]).cumsum(0)
        out = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        return dict(out, cu_seqlens=cu, weight=weight, ref_weight=ref_weight)

    shards = []
    for r in range(2):
        parts = []
        for seq, rows in zip(seqs, GROUP_SPLIT, strict=True):
            start = 0 if r == 0 else GROUP_PROMPT + rows[0]
            stop = GROUP_PROMPT + rows[0] if r == 0 else GROUP_PROMPT + sum(rows)
            parts.append({k: t[start:stop] for k, t in seq.items()})
        shards.append(pack(parts))
    return shards, pack(seqs)


# `group=` cases: name -> loss options (WPO's use_weighting adds the optional per-sequence sum LPA)
GROUP_CASES = {"dpo": {}, "tisdpo-kl": {"kl": "tisdpo"}, "wpo": {"use_weighting": True},
               "token-stats": {"kl": "tisdpo", "token_stats": True}}


def group_loss(tensors, options, group=None):
    """Loss, metrics and the gradients of hidden and weight (the head) for `group_problem` tensors."""
    hidden = tensors["hidden"].clone().requires_grad_(True)
    weight = tensors["weight"].clone().requires_grad_(True)
    loss, metrics = fused_tis_dpo_loss(
        hidden, weight, tensors["labels"], ref_hidden=tensors["ref_hidden"], ref_weight=tensors["ref_weight"],
        token_weights=tensors["token_weights"], cu_seqlens=tensors["cu_seqlens"], beta=0.4, backend="torch",
        group=group, **options)
    loss.backward()
    return {"loss": loss.detach(), "metrics": metrics, "d_hidden": hidden.grad, "d_weight": weight.grad}


def group_case(rank: int) -> dict:
    shards, _ = group_problem()
    out = {}
    for name, options in GROUP_CASES.items():
        got = group_loss(shards[rank], options, group=dist.group.WORLD)
        dist.all_reduce(got["d_weight"])  # each rank's dW is its rows' share: the group sums them
        gathered = [None, None]
        dist.all_gather_object(gathered, (shards[rank]["index"], got["d_hidden"]))
        d_hidden = torch.zeros(sum(i.numel() for i, _ in gathered), got["d_hidden"].shape[1], dtype=torch.float64)
        for index, rows in gathered:
            d_hidden[index] = rows
        out[name] = dict(got, d_hidden=d_hidden)
    return out


# --------------------------------------------------------------------------------------------------------------
# context parallelism, emulated: the trainer's loss with the cp group + FSDP2 over the same ranks
# --------------------------------------------------------------------------------------------------------------

# name: (tied embeddings, kl). Padded batches (context parallelism refuses packed ones), no weight columns (the
# Trainer does not split them along the sequence).
CP_CASES = {"untied-dpo": (False, None), "tied-tisdpo-kl": (True, "tisdpo")}
CP_STEPS = 2
# step 1 clips to this norm: between half and all of the one-process gradient's norm (measured 3.1 and 3.3), so a
# run whose gradient is 0.5x (1.5, 1.7) is not clipped and steps differently from one process
CP_MAX_NORM = 2.5


def cp_trainer(tok, case: str, tmp: str):
    tied, kl = CP_CASES[case]
    overrides = {"tie_word_embeddings": True} if tied else {}
    args = TISDPOConfig(
        output_dir=os.path.join(tmp, f"cp-{case}"), use_cpu=True, report_to="none", disable_tqdm=True,
        save_strategy="no", ddp_backend="gloo" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
        **no_checkpointing(), seed=0, padding_free=False, pad_to_multiple_of=2, kl=kl, beta=0.3,
    )
    policy, ref = tiny_llama(len(tok), seed=0, **overrides), tiny_llama(len(tok), seed=1, **overrides)
    return TISDPOTrainer(policy, ref_model=ref, args=args, processing_class=tok), ref


def cp_batches(trainer, tok) -> list[dict]:
    """Per step, the whole global batch (PAIRS pairs, padded to an even width); every cp rank holds all of it."""
    rows = [tokenize_row(r, tok) for r in synthetic_pairs(PAIRS * CP_STEPS)]
    return [trainer.data_collator(rows[s * PAIRS:(s + 1) * PAIRS]) for s in range(CP_STEPS)]


def cp_slice(batch: dict, rank: int, world: int) -> dict:
    """This rank's contiguous slice of every sequence, as the Trainer's context-parallel split gives it:
    input_ids, attention_mask and labels along the sequence dimension; cu_seqlens as collated."""
    width = batch["labels"].shape[1] // world
    out = dict(batch)
    for key in ("input_ids", "attention_mask", "labels"):
        out[key] = batch[key][:, rank * width:(rank + 1) * width]
    return out


def emulate_cp_attention(trainer, group) -> None:
    """The attention side of context parallelism, emulated: each rank gathers the token ids of the whole
    sequences from the group, runs the (FSDP2-sharded) decoder on them and keeps the hidden rows of its own
    slice. Like ring attention, a rank's rows see the whole prefix, and the parameters' gradient on a rank is its
    rows' share of the full gradient."""
    own = trainer._hidden_states
    rank, world = dist.get_rank(group), dist.get_world_size(group)

    def hidden_states(model, inputs, router_aux=False):
        whole = dict(inputs)
        for key in ("input_ids", "attention_mask"):
            parts = [torch.empty_like(inputs[key]) for _ in range(world)]
            dist.all_gather(parts, inputs[key].contiguous(), group=group)
            whole[key] = torch.cat(parts, dim=1)
        width = inputs["input_ids"].shape[1]
        return own(model, whole, router_aux)[:, rank * width:(rank + 1) * width]

    trainer._hidden_states = hidden_states


def cp_train(trainer, model, batches_: list[dict], world: int) -> dict:
    """CP_STEPS SGD steps (step 1 clipped to CP_MAX_NORM): per step the loss, the full gradient and its norm."""
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    history = []
    for k, batch in enumerate(batches_):
        out = step(trainer, model, batch, 1)  # every cp rank returns the global loss: no average over ranks
        out.pop("local_loss").backward()
        grads = {name: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).detach().clone()
                 for name, p in model.named_parameters()}
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), CP_MAX_NORM if k == 0 else float("inf"))
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        opt.step()
        opt.zero_grad()
        history.append(dict(out, grads=grads, grad_norm=float(norm)))
    return {"history": history, "params": full_parameters(model)}


def cp_single(case: str, tmp: str) -> dict:
    """One process, whole sequences, no group: the truth of the context-parallel run."""
    tok = build_tokenizer()
    trainer, _ = cp_trainer(tok, case, tmp)
    return cp_train(trainer, trainer.model, cp_batches(trainer, tok), 1)


def cp_case(tok, case: str, tmp: str, rank: int, world: int) -> dict:
    """FSDP2 over all ranks (dp 1 x cp world), the trainer's loss given the group of all ranks as its cp group."""
    import tisdpo.trainer

    trainer, ref = cp_trainer(tok, case, tmp)
    model = shard_like_accelerate(trainer.model, False)
    trainer.ref_model = shard_frozen(ref, layer_classes(ref))
    tisdpo.trainer.context_parallel_group = lambda accelerator: dist.group.WORLD
    emulate_cp_attention(trainer, dist.group.WORLD)
    return cp_train(trainer, model, [cp_slice(b, rank, world) for b in cp_batches(trainer, tok)], world)


# --------------------------------------------------------------------------------------------------------------
# DeepSpeed ZeRO-3
# --------------------------------------------------------------------------------------------------------------

# gradient_clipping 0: DeepSpeed 0.19 clips to norm 1.0 unless told otherwise; the one-process run does not clip
ZERO3_CONFIG = {"train_micro_batch_size_per_gpu": PAIRS // 2, "gradient_accumulation_steps": 1,
                "gradient_clipping": 0.0, "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}


def zero3_case(tok, case: str, tmp: str, rank: int, world: int) -> dict:
    import deepspeed

    # skip DeepSpeed's optional CPU shared-memory all-reduce: a C++ JIT build of minutes on a small CI machine;
    # gloo does every collective here
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    trainer, ref = make_trainer(tok, case, tmp)
    policy = trainer.model
    opt = torch.optim.SGD(policy.parameters(), lr=LR)
    engine, *_ = deepspeed.initialize(model=policy, optimizer=opt,
                                      config=dict(ZERO3_CONFIG, zero_allow_untested_optimizer=True))
    trainer.ref_model = deepspeed_frozen(ref, ZERO3_CONFIG)
    history = []
    for batch in batches(trainer, tok, rank, world):
        out = step(trainer, engine, batch, world)
        engine.backward(out.pop("local_loss"))
        engine.step()
        history.append(out)
    params = dict(engine.module.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values())):
        full = {name: p.detach().clone() for name, p in params.items()}
    return {"history": history, "params": full}


def main(mode: str, out_dir: str) -> None:
    tok = build_tokenizer()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    results = {}
    if mode == "fsdp2":
        for case in CASES:
            results[case] = fsdp2_case(tok, case, out_dir, rank, world)
        results["resume"] = fsdp2_resume(tok, out_dir, rank, world)
        results["group"] = group_case(rank)
    elif mode == "cp":
        for case in CP_CASES:
            results[case] = cp_case(tok, case, out_dir, rank, world)
    elif mode == "zero3":
        for case in ZERO3_CASES:
            results[case] = zero3_case(tok, case, out_dir, rank, world)
    else:
        raise ValueError(f"mode must be fsdp2, cp or zero3, got {mode!r}")
    if rank == 0:
        torch.save(results, os.path.join(out_dir, f"{mode}.pt"))
    dist.barrier()
    dist.destroy_process_group()  # an orderly gloo shutdown before the interpreter exits


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
