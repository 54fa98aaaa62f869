"""A short TISDPOTrainer run for the multi-process tests:
`torchrun --nproc_per_node 2 -m tests.trainer.ddp_run OUT B [precompute]`.

Trains a tiny Llama on 16 synthetic pairs for 3 steps with per-device batch size B and writes the per-step losses
and metrics to OUT/log_history.json and the final model to OUT (main process).
"""

from __future__ import annotations

import json
import os
import sys

from tests.trainer.tiny import build_tokenizer, dataset_of, no_checkpointing, synthetic_pairs, tiny_llama
from tisdpo import TISDPOConfig, TISDPOTrainer


def run(
    output_dir: str, per_device_batch: int, gradient_accumulation_steps: int = 1, precompute: bool = False
) -> tuple[list[dict], dict]:
    """Train; returns the per-step log entries and the final state dict (on CPU). `precompute` caches the
    reference log-probs under OUT/ref_cache first."""
    tok = build_tokenizer()
    args = TISDPOConfig(
        output_dir=output_dir,
        use_cpu=True,
        ddp_backend="gloo" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
        report_to="none",
        disable_tqdm=True,
        save_strategy="no",
        logging_steps=1,
        max_steps=3,
        # plain SGD: Adam's normalisation would blow float noise in near-zero gradients up to full-size steps,
        # hiding a real mismatch of the final weights behind a loose tolerance
        optim="sgd",
        learning_rate=0.5,
        per_device_train_batch_size=per_device_batch,
        gradient_accumulation_steps=gradient_accumulation_steps,
        **no_checkpointing(),
        seed=0,
        precompute_ref_log_probs=precompute,
        ref_logps_cache_dir=os.path.join(output_dir, "ref_cache"),
    )
    trainer = TISDPOTrainer(
        tiny_llama(len(tok), seed=0),
        ref_model=tiny_llama(len(tok), seed=1),
        args=args,
        train_dataset=dataset_of(synthetic_pairs(16)),
        processing_class=tok,
    )
    trainer.train()
    history = [entry for entry in trainer.state.log_history if "loss" in entry]
    if trainer.accelerator.is_main_process:
        os.makedirs(output_dir, exist_ok=True)
        with open(os.path.join(output_dir, "log_history.json"), "w") as f:
            json.dump({"world_size": trainer.accelerator.num_processes, "history": history}, f)
        trainer.save_model(output_dir)
    return history, {k: v.detach().cpu() for k, v in trainer.model.state_dict().items()}


if __name__ == "__main__":
    run(sys.argv[1], int(sys.argv[2]), precompute=len(sys.argv) > 3 and sys.argv[3] == "precompute")
