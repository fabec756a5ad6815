"""Elementwise quantizer: fp32 -> uint8 codes ``clamp(rne((x - l) / s), 0, 2^bits - 1)``.

Used for the first quantized layer's input and anywhere a float tensor must become
codes outside a fused epilogue. IEEE division and an exact round-half-to-even make it
bit-identical to ``pauta_codes`` (the reference).
"""
import triton
import triton.language as tl

from ._common import quantize_codes


@triton.jit
def quantize_kernel(x_ptr, out_ptr, n, l, s, QMAX: tl.constexpr, BLOCK: tl.constexpr):
    """x fp32 [n] (flat, contiguous) -> out uint8 [n]."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    tl.store(out_ptr + offs, quantize_codes(x, l, s, QMAX), mask=mask)
