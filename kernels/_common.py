"""Building blocks shared by the kernel families: weight-tile unpacking, exact
round-half-to-even, and the fused fp32 epilogue of DESIGN.md section 3.

Signedness: ``tl.dot`` on int8 needs signed operands. Codes of <= 7 bits (every
2/3/4-bit layer) are already valid int8 and go in unchanged (shift 0). 8-bit codes are
shifted by 128 into [-128, 127]; the caller sets ``A_SHIFT`` / ``W_SHIFT`` and undoes
the shift exactly with the sums it has anyway::

    ACC = ACC' + A_SHIFT * WS + W_SHIFT * AS - A_SHIFT * W_SHIFT * CNT

where ACC' is the dot of the shifted operands over the valid taps (shifted values are
forced to 0 at padded taps and K tails, so those contribute nothing).
"""
import triton
import triton.language as tl

# Out modes of the GEMM / conv kernels.
OUT_RAW = 0    # store the int32 parts (ACC, AS, WS, CNT) for exact tests
OUT_FP32 = 1   # store the fp32 epilogue result
OUT_CODES = 2  # store uint8 codes of the next layer


@triton.jit
def unpack_tile(w_ptr, wh_ptr, widx, wsh, widx_hi, wsh_hi, rn, mask, O, BITS: tl.constexpr):
    """Load and unpack a [BLOCK_K, BLOCK_N] tile of weight codes (int32 0..2^bits-1).

    widx / wsh: int32 [BLOCK_K] word row and bit shift of each K row (the shift
    table; constant across K blocks because blocks start on 32-code boundaries).
    widx_hi / wsh_hi: the same for the 1-bit plane (3 bits only).
    """
    ptrs = w_ptr + widx[:, None] * O + rn[None, :]
    wd = tl.load(ptrs, mask=mask, other=0)
    if BITS == 3:
        hi = tl.load(wh_ptr + widx_hi[:, None] * O + rn[None, :], mask=mask, other=0)
        q = ((wd >> wsh[:, None]) & 3) | (((hi >> wsh_hi[:, None]) & 1) << 2)
    else:
        q = (wd >> wsh[:, None]) & ((1 << BITS) - 1)
    return q


@triton.jit
def shift_table(rk, BITS: tl.constexpr):
    """Per-K-row (word offset, shift) for the main plane and the 1-bit plane."""
    if BITS == 3:
        widx = rk // 16
        wsh = (rk % 16) * 2
        widx_hi = rk // 32
        wsh_hi = rk % 32
    else:
        widx = rk // (32 // BITS)
        wsh = (rk % (32 // BITS)) * BITS
        widx_hi = widx
        wsh_hi = wsh
    return widx, wsh, widx_hi, wsh_hi


@triton.jit
def round_half_even(u):
    """Exact fp32 round-half-to-even without libdevice (so the interpreter runs it too)."""
    f = tl.floor(u)
    d = u - f  # exact: u and floor(u) share the exponent range
    odd = (f - 2.0 * tl.floor(f * 0.5)) == 1.0
    up = (d > 0.5) | ((d == 0.5) & odd)
    return tl.where(up, f + 1.0, f)


@triton.jit
def quantize_codes(y, out_l, out_s, QMAX: tl.constexpr):
    """fp32 -> codes: clamp(rne((y - l) / s), 0, QMAX), NaN -> 0 (as ``pauta_codes``)."""
    u = tl.math.div_rn(y - out_l, out_s)  # IEEE division: '/' is approximate on GPU
    r = round_half_even(u)
    r = tl.where(u == u, r, 0.0)
    r = tl.minimum(tl.maximum(r, 0.0), QMAX)
    return r.to(tl.uint8)


@triton.jit
def epilogue_store(acc, as_, ws, cnt, rm, rn, mask_m, mask_n, O,
                   wscale_ptr, woff_ptr, sa, la, ps_ptr, psh_ptr, res_ptr, slope,
                   out_l, out_s, out_ptr,
                   HAS_PS: tl.constexpr, HAS_PSH: tl.constexpr, HAS_RES: tl.constexpr,
                   HAS_SLOPE: tl.constexpr, OUT_MODE: tl.constexpr, QMAX: tl.constexpr):
    """The fp32 epilogue, in the reference's exact operation order, and the store.

    acc int32 [BM, BN] (true ACC); as_ int32 [BM]; ws int32 [BM, BN] or [1, BN];
    cnt int32 [BM]. Output / residual are row-major [M, O].
    Launch with enable_fp_fusion=False: an FMA would round differently.
    """
    cs = tl.load(wscale_ptr + rn, mask=mask_n, other=0.0)
    co = tl.load(woff_ptr + rn, mask=mask_n, other=0.0)
    y = (cs * sa)[None, :] * acc.to(tl.float32)
    y = y + (cs * la)[None, :] * ws.to(tl.float32)
    y = y + (co * sa)[None, :] * as_.to(tl.float32)[:, None]
    y = y + (co * la)[None, :] * cnt.to(tl.float32)[:, None]
    if HAS_PS:
        y = y * tl.load(ps_ptr + rn, mask=mask_n, other=0.0)[None, :]
    if HAS_PSH:
        y = y + tl.load(psh_ptr + rn, mask=mask_n, other=0.0)[None, :]
    offs = rm[:, None] * O + rn[None, :]
    mask = mask_m[:, None] & mask_n[None, :]
    if HAS_RES:
        y = y + tl.load(res_ptr + offs, mask=mask, other=0.0)
    if HAS_SLOPE:
        y = tl.where(y >= 0, y, y * slope)
    if OUT_MODE == 2:
        tl.store(out_ptr + offs, quantize_codes(y, out_l, out_s, QMAX), mask=mask)
    else:
        tl.store(out_ptr + offs, y, mask=mask)
