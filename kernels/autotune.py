"""Explicit autotune configurations, pruned for shared memory and for the problem size.

On a GPU each kernel family is wrapped in ``triton.autotune`` keyed on the shape
arguments (and the bit-width, which changes the weight bytes per tile). Configs whose
pipelined tiles do not fit the device's shared memory, or whose tiles dwarf the
problem (a 256-wide N tile for 64 output channels), are pruned before timing.

Under ``TRITON_INTERPRET=1`` there is no autotuning: every launch uses the configuration
from ``interpreter_meta`` (tiles sized to the problem) so CPU tests stay fast.
"""
from __future__ import annotations

import functools

import triton
import triton.language as tl

from .qbmm import qbmm_kernel
from .qconv import qconv_kernel
from .qgemm import qgemm_kernel

INTERPRETED = type(qgemm_kernel).__name__ == "InterpretedFunction"
# triton's own @jit helpers (tl.zeros, tl.cdiv, ...) are decorated when triton.language is
# first imported; interpreted kernels cannot call compiled-mode helpers.
STDLIB_INTERPRETED = type(tl.zeros).__name__ == "InterpretedFunction"


def _cfg(bm, bn, bk, warps, stages, group=8):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group},
                         num_warps=warps, num_stages=stages)


# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages). BLOCK_K is always a multiple of 32 (the
# repacked layout's word alignment) and >= 32 (int8 MMA K granularity).
GEMM_CONFIGS = [
    _cfg(128, 256, 64, 8, 3), _cfg(256, 128, 64, 8, 3), _cfg(128, 128, 128, 8, 3),
    _cfg(128, 128, 64, 8, 4), _cfg(128, 128, 64, 4, 4), _cfg(128, 64, 64, 4, 4),
    _cfg(64, 128, 64, 4, 4), _cfg(64, 64, 128, 4, 4), _cfg(64, 64, 64, 4, 5),
    _cfg(32, 64, 128, 4, 4), _cfg(16, 64, 128, 4, 4), _cfg(16, 128, 64, 4, 3),
]
CONV_CONFIGS = [
    _cfg(128, 128, 64, 8, 3), _cfg(128, 128, 32, 8, 4), _cfg(128, 64, 64, 4, 3),
    _cfg(64, 128, 64, 4, 3), _cfg(64, 64, 64, 4, 4), _cfg(64, 64, 32, 4, 4),
    _cfg(128, 256, 64, 8, 3), _cfg(256, 64, 64, 8, 3), _cfg(32, 64, 64, 4, 4),
]
BMM_CONFIGS = [
    triton.Config({"TASKS_PER_PROG": t, "BLOCK_D": d}, num_warps=w, num_stages=2)
    for t in (1, 4) for d in (64, 128) for w in (4, 8)
]


def _max_smem() -> int:
    try:
        dev = triton.runtime.driver.active.get_current_device()
        return int(triton.runtime.driver.active.utils.get_device_properties(dev)["max_shared_mem"])
    except Exception:  # noqa: BLE001 - unknown device: assume a conservative 96 KiB
        return 96 * 1024


def smem_bytes(cfg: triton.Config, bits: int) -> int:
    """Pipelined activation + packed weight tiles, plus the unpacked int8 operand."""
    bm, bn, bk = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], cfg.kwargs["BLOCK_K"]
    wbytes = bk * bn * (bits + (1 if bits == 3 else 0)) // 8
    return cfg.num_stages * (bm * bk + wbytes) + bk * bn


def _prune(configs, named_args, **kwargs):
    limit = _max_smem()
    bits = named_args.get("BITS", kwargs.get("BITS", 4))
    m, o = named_args["M"], named_args["O"]
    keep = [c for c in configs if smem_bytes(c, bits) <= limit
            and c.kwargs["BLOCK_N"] <= max(64, triton.next_power_of_2(o))
            and c.kwargs["BLOCK_M"] <= max(64, triton.next_power_of_2(m))]
    return keep or [min(configs, key=lambda c: smem_bytes(c, bits))]


def _prune_bmm(configs, named_args, **kwargs):
    d = named_args["D"]
    keep = [c for c in configs if c.kwargs["BLOCK_D"] <= max(64, triton.next_power_of_2(d))]
    return keep or configs[:1]


@functools.lru_cache(maxsize=None)
def tuned(name: str):
    """The autotuned wrapper of a kernel (GPU only; built on first use)."""
    if name == "qgemm":
        return triton.autotune(GEMM_CONFIGS, key=["M", "O", "K", "BITS", "OUT_MODE"],
                               prune_configs_by={"early_config_prune": _prune})(qgemm_kernel)
    if name == "qconv":
        return triton.autotune(CONV_CONFIGS, key=["M", "O", "C", "H", "KSIZE", "STRIDE", "BITS",
                                                  "OUT_MODE"],
                               prune_configs_by={"early_config_prune": _prune})(qconv_kernel)
    if name == "qbmm":
        return triton.autotune(BMM_CONFIGS, key=["T", "N", "D", "OUT_MODE"],
                               prune_configs_by={"early_config_prune": _prune_bmm})(qbmm_kernel)
    raise KeyError(name)


def interpreter_rows(rows: int, smallest: int = 16, largest: int = 4096) -> int:
    """Rows (or elements) per program under TRITON_INTERPRET=1: a quarter of ``rows``,
    a power of two in [smallest, largest]. The interpreter's cost is Python work per
    program and op, nearly independent of the tile size (a 10x32x32x16 3x3 conv: 61 s
    with 16-row tiles, under 1 s with 1024), so big problems get big tiles, and the small
    shapes of the kernel tests still span several tiles."""
    return min(largest, max(smallest, triton.next_power_of_2(-(-rows // 4))))


def interpreter_meta(name: str, rows: int, cols: int) -> dict:
    """The configuration used under TRITON_INTERPRET=1 for a launch over ``rows`` output
    rows and ``cols`` output channels (the aggregation: tasks and feature columns)."""
    if name in ("qgemm", "qconv"):
        return {"BLOCK_M": interpreter_rows(rows), "BLOCK_N": 64 if cols >= 64 else 32,
                "BLOCK_K": 32, "GROUP_M": 2}
    if name == "qbmm":
        return {"TASKS_PER_PROG": 2, "BLOCK_D": 32}
    raise KeyError(name)
