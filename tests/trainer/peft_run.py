"""A LoRA run of TISDPOTrainer for tests/trainer/test_launch.py, started as a user starts one:
`accelerate launch --config_file CONFIG -m tests.trainer.peft_run MODEL_DIR OUT [B]` (or plain `python -m`).

2 SGD steps on tests/assets/tiny_run.yaml's pairs with a LoRA adapter (r 4 on q_proj and v_proj; the reference
is the base model with the adapter disabled), per-device batch B; the main process writes OUT/log_history.json and
the adapter with `save_model(OUT)`.
"""

import json
import os
import sys

from peft import LoraConfig

from tisdpo import TISDPOConfig, TISDPOTrainer
from tisdpo.data import load_preference_dataset

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(model_dir: str, out: str, per_device: int) -> None:
    args = TISDPOConfig(
        output_dir=out, use_cpu=True, report_to="none", disable_tqdm=True, save_strategy="no", logging_steps=1,
        max_steps=2, optim="sgd", learning_rate=0.5, per_device_train_batch_size=per_device, seed=0, beta=0.1,
        max_length=128, max_prompt_length=96, gradient_checkpointing=False, model_init_kwargs={"dtype": "float32"},
        ddp_backend="gloo" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
    )
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                      task_type="CAUSAL_LM")
    data = load_preference_dataset(os.path.join(REPO, "tests", "assets", "tiny_hh.jsonl"), split="train")
    trainer = TISDPOTrainer(model_dir, args=args, train_dataset=data, peft_config=lora)
    trainer.train()
    trainer.save_model(out)
    if trainer.accelerator.is_main_process:
        history = [e for e in trainer.state.log_history if "loss" in e]
        with open(os.path.join(out, "log_history.json"), "w") as f:
            json.dump(history, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 1)
