"""Fixtures of the trainer tests: a locally trained tokenizer and argument defaults for quick CPU runs."""

import pytest

from tests.trainer.tiny import build_tokenizer, no_checkpointing


@pytest.fixture(scope="session")
def tok():
    return build_tokenizer()


@pytest.fixture
def quick_args(tmp_path):
    """Keyword arguments of a TISDPOConfig for a short, quiet, CPU-only run writing under tmp_path."""
    return dict(
        output_dir=str(tmp_path / "out"),
        use_cpu=True,
        report_to="none",
        disable_tqdm=True,
        save_strategy="no",
        logging_steps=1,
        per_device_train_batch_size=3,
        per_device_eval_batch_size=3,
        **no_checkpointing(),
        ref_logps_cache_dir=str(tmp_path / "ref_cache"),
        dataloader_num_workers=0,
        seed=0,
    )
