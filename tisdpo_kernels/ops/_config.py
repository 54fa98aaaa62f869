"""Block sizes and launch options of the linear-head kernels (``linear_logprobs.py``, ``linear_kl.py``).

All tile shapes live here, keyed by the hidden size ``D`` bucket and whether the kernels run compiled
(CUDA) or under the Triton interpreter (``TRITON_INTERPRET=1``, CPU tensors). The GPU entries are
starting points chosen for Hopper-class GPUs (bf16 ``tl.dot`` tiles of at least 16 in every
dimension, fp32 accumulators within the register budget); they have not been autotuned yet. The
interpreter entries favour few, large tiles because every tile operation costs Python time there.

Tested through ``tests/kernels/test_linear_logprobs.py`` and ``tests/kernels/test_linear_kl.py``
(which also pass explicit small configs to force several row, vocabulary and hidden-size tiles).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class TileConfig:
    """One kernel launch shape: rows x vocabulary tile, hidden-size chunk, warps and pipeline stages."""

    block_n: int
    block_v: int
    block_d: int
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self):
        for name in ("block_n", "block_v", "block_d"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"TileConfig.{name} must be a power of two >= 16 (tl.dot needs it), got {value}")


@dataclass(frozen=True)
class LinearConfig:
    """Tile configs of the forward and backward kernels plus how far to split the work.

    ``fwd_splits``: vocabulary splits of the forward (each a separate program writing a partial
    log-sum-exp; ``None`` picks enough to fill the device). ``bwd_splits``: vocabulary splits of the
    backward's row-major pass (``None``: one tile per program, the most parallel launch).
    """

    fwd: TileConfig
    bwd: TileConfig
    fwd_splits: int | None = None
    bwd_splits: int | None = None
    fwd_kl: TileConfig | None = None  # forward with a KL mode (two logit tiles live); None: ``fwd``
    bwd_filtered: TileConfig | None = None  # backward with gradient filtering (``filter_eps``); None: ``bwd``

    def forward_tile(self, kl_mode: int) -> TileConfig:
        return self.fwd if kl_mode == 0 or self.fwd_kl is None else self.fwd_kl

    def backward_tile(self, filtered: bool) -> TileConfig:
        return self.bwd if not filtered or self.bwd_filtered is None else self.bwd_filtered


def interpreting() -> bool:
    """True when Triton kernels run on CPU tensors through the interpreter (``TRITON_INTERPRET=1``);
    raises if the installed Triton's interpreter cannot run next to the installed NumPy."""
    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        return False
    import numpy
    import triton

    check_interpreter_versions(triton.__version__, numpy.__version__)
    return True


def _major_minor(version: str) -> tuple[int, int]:
    major, minor = version.split(".")[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


@functools.cache
def check_interpreter_versions(triton_version: str, numpy_version: str) -> None:
    """Triton's interpreter before 3.7 turns every scalar (a one-element array there) into a Python int with
    ``int(array)``, which NumPy 2.4 refuses for arrays with a dimension: every loop over a runtime bound
    (``range(lo, hi, BLOCK)``) then fails with "only 0-dimensional arrays can be converted to Python
    scalars". Triton 3.7 fixed it (``int(array.squeeze())``). Raise a clear error instead of that one."""
    if _major_minor(triton_version) < (3, 7) and _major_minor(numpy_version) >= (2, 4):
        raise RuntimeError(
            f"the Triton interpreter (TRITON_INTERPRET=1) of triton {triton_version} cannot run with numpy "
            f"{numpy_version}: Triton before 3.7 needs numpy<2.4 there. Install 'numpy<2.4' or 'triton>=3.7' "
            "(compiled GPU kernels are not affected)"
        )


# Interpreter: one large tile per op keeps the Python overhead down; shapes in tests are small.
_INTERPRETER = LinearConfig(fwd=TileConfig(32, 128, 64), bwd=TileConfig(32, 128, 64), fwd_splits=1, bwd_splits=1)

# GPU, keyed by the hidden-size bucket (upper bound of D, inclusive).
_GPU_BY_D = (
    (1024, LinearConfig(fwd=TileConfig(64, 128, 64, num_warps=4, num_stages=3),
                        bwd=TileConfig(64, 128, 64, num_warps=4, num_stages=2))),
    # the KL forward holds two [BLOCK_N, BLOCK_V] fp32 logit tiles: at 128 rows it spilled (255 registers,
    # 264 B with kl="tis", tests/kernels/compile_for_gpu.py); 64 rows keep it in registers. The filtered
    # backward (its tile-mass reduction live beside the gradient tile) spilled 68 B at 255 registers with
    # Triton 3.6 (the GPU image's version; 217 registers with 3.9): 64-column tiles keep it in registers.
    (None, LinearConfig(fwd=TileConfig(128, 128, 64, num_warps=8, num_stages=3),
                        bwd=TileConfig(64, 128, 64, num_warps=8, num_stages=2),
                        fwd_kl=TileConfig(64, 128, 64, num_warps=8, num_stages=3),
                        bwd_filtered=TileConfig(64, 64, 64, num_warps=8, num_stages=2))),
)


# Small vocabularies (toy and test models) get narrower vocabulary tiles so that a launch still
# has several programs along V.
_SMALL_VOCAB = 4096


def linear_config(vocab: int, dim: int) -> LinearConfig:
    """The checked-in config for a ``[V, D]`` head, bucketed by ``D`` and by small/large ``V``."""
    if interpreting():
        return _INTERPRETER
    cfg = next(c for bound, c in _GPU_BY_D if bound is None or dim <= bound)
    if vocab <= _SMALL_VOCAB:
        cfg = LinearConfig(fwd=replace(cfg.fwd, block_v=64), bwd=replace(cfg.bwd, block_v=64),
                           fwd_splits=cfg.fwd_splits, bwd_splits=cfg.bwd_splits,
                           fwd_kl=None if cfg.fwd_kl is None else replace(cfg.fwd_kl, block_v=64),
                           bwd_filtered=None if cfg.bwd_filtered is None else replace(cfg.bwd_filtered, block_v=64))
    return cfg


# A launch aims for this many programs per streaming multiprocessor before the forward splits the
# vocabulary across programs (each split writes a partial log-sum-exp, merged on the host side).
TARGET_WAVES = 4
# The all-Triton forward splits the vocabulary at least this many ways, on the fast grid axis: the
# programs that run together then share a few ``hidden`` row panels in L2 instead of each streaming
# its own (~141 GB of hidden re-reads at the Llama-3-8B shape otherwise, by the byte count of docs/design.md §4).
FWD_SPLITS = 16


# ----------------------------------------------------------------------------------------------
# the vocabulary-split path (``linear_split.py``)
# ----------------------------------------------------------------------------------------------

# Split widths are multiples of this: the 256-column edge of a Hopper bf16 GEMM tile, so that no split
# leaves a partly filled column of tiles (a 1152-column split at 2 x 8192 rows is 4.5 tile columns, and
# its tail costs a wave on 132 SMs). At most SPLIT_MAX_COLUMNS (Megatron-LM's Hopper splits are ~3072
# columns; wider buys no GEMM efficiency and costs scratch). The plan prefers splits of at least
# SPLIT_PREFERRED_COLUMNS, with row chunks of at least SPLIT_MIN_CHUNK_ROWS when all rows do not fit
# (a 4096 x 2048 logits block is 256 such tiles, about two waves), over narrower splits of all rows.
SPLIT_COLUMN_MULTIPLE = 256
SPLIT_MAX_COLUMNS = 4096
SPLIT_PREFERRED_COLUMNS = 2048
SPLIT_MIN_CHUNK_ROWS = 4096
# Default cap of the split buffers (fp32 logits, dz, the per-split dW accumulator when rows are
# chunked). At the Llama-3-8B shape (2 x 8192 rows, D=4096, bf16) it gives 2048-column splits of all
# rows (two chunks of 8192 rows with a KL mode or a bias), and with the fp32 [n, D] dH accumulator
# (256 MiB) the extra memory stays under the 0.5 GiB target (448 MiB counted,
# tests/kernels/test_linear_split_memory.py).
SPLIT_SCRATCH_BYTES = 192 * 2**20


@dataclass(frozen=True)
class SplitTiles:
    """Block shapes of the split path's elementwise kernels (rows x columns of one program, warps)."""

    stats_rows: int
    stats_cols: int
    stats_warps: int
    dz_rows: int
    dz_cols: int
    dz_warps: int


# GPU: ~16 fp32 elements per thread and array, so the KL variants stay far from the register limit.
_SPLIT_GPU = SplitTiles(stats_rows=4, stats_cols=512, stats_warps=4, dz_rows=16, dz_cols=256, dz_warps=8)


def split_tiles(cols: int) -> SplitTiles:
    """Tiles of the split kernels for a split of ``cols`` columns; the interpreter takes few, large blocks."""
    if interpreting():
        width = min(1024, 1 << max(4, (cols - 1).bit_length()))
        return SplitTiles(stats_rows=32, stats_cols=width, stats_warps=4, dz_rows=32, dz_cols=width, dz_warps=4)
    return _SPLIT_GPU
