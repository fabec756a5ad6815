"""Building blocks shared by the kernel families: weight-tile unpacking, exact
round-half-to-even, the exact int32 corrections and the fused (centred) fp32 epilogue
of docs/integer-contract.md.

Signedness: ``tl.dot`` on int8 needs signed operands. Codes of <= 7 bits (every
2/3/4-bit layer) are already valid int8 and go in unchanged (shift 0). 8-bit codes are
shifted by 128 into [-128, 127]; the caller sets ``A_SHIFT`` / ``W_SHIFT`` and undoes
the shift exactly with the sums it has anyway (:func:`unshift`)::

    ACC = D + A_SHIFT * (WS - W_SHIFT * CNT) + W_SHIFT * AS

where D is the dot of the shifted operands over the valid taps (shifted values are
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
def grouped_tile(pid, M, O, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(row tile, column tile) of program ``pid``: GROUP_M row tiles share the same weight
    columns while they are hot in L2."""
    n_m = tl.cdiv(M, BLOCK_M)
    n_n = tl.cdiv(O, BLOCK_N)
    group = pid // (GROUP_M * n_n)
    first_m = group * GROUP_M
    size_m = tl.minimum(n_m - first_m, GROUP_M)
    return first_m + (pid % (GROUP_M * n_n)) % size_m, (pid % (GROUP_M * n_n)) // size_m


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


#: Longest reduction (K = kh*kw*C_in, or N for the aggregation) whose int32 parts are
#: exact. Every code and every zero point lies in [0, 255], so each of
#:     ACC = sum qa*qw,  zw*AS,  sum qa*(qw - zw),  za*WS',  ACC' = sum (qa - za)*(qw - zw)
#: (and every partial sum of the shift correction below) is at most K * 255 * 255 in
#: magnitude: < 2^31 for K <= 33025. The launchers refuse longer reductions.
MAX_REDUCTION = (2 ** 31 - 1) // (255 * 255)


@triton.jit
def unshift(acc, as_, ws, cnt, A_SHIFT: tl.constexpr, W_SHIFT: tl.constexpr):
    """True ACC from the dot of shifted operands D = sum (qa - A)(qw - W) (int32, exact).

    Evaluated as ``D + A*(WS - W*CNT) + W*AS``: the partial sums are ``sum (qa-A)(qw-W)``,
    ``sum qa*(qw-W)`` and ``sum qa*qw``, each bounded by K*255*255 (see MAX_REDUCTION).
    acc [BM, BN]; as_ / cnt [BM, 1]; ws [BM, BN] or [1, BN].
    """
    return acc + A_SHIFT * (ws - W_SHIFT * cnt) + W_SHIFT * as_


@triton.jit
def centred_parts(acc, as_, ws, cnt, zw, za):
    """The integer parts of the centred identity (``ref_centered_parts``), int32, exact.

    acc [BM, BN] (true ACC); as_ / cnt [BM, 1]; ws [BM, BN] or [1, BN]; zw int32 [1, BN]
    (weight zero points, in [0, 255]); za the activation zero point (in [0, 255]).
    Returns ACC' = ACC - zw*AS - za*WS + zw*za*CNT, WS' = WS - zw*CNT, AS' = AS - za*CNT,
    evaluated as ACC' = (ACC - zw*AS) - za*WS' so that no intermediate exceeds
    K*255*255 in magnitude (ACC - zw*AS = sum qa*(qw - zw); |WS'| <= 255*K): int32-safe
    for K <= MAX_REDUCTION = 33025, which the launchers enforce.
    """
    wsp = ws - zw * cnt
    asp = as_ - za * cnt
    accp = (acc - zw * as_) - za * wsp
    return accp, wsp, asp


@triton.jit
def epilogue_store(acc, as_, ws, cnt, rm, rn, mask_m, mask_n, O,
                   coef_ptr, zw_ptr, za, ps_ptr, psh_ptr, res_ptr, slope,
                   out_l, out_s, out_ptr,
                   HAS_PS: tl.constexpr, HAS_PSH: tl.constexpr, HAS_RES: tl.constexpr,
                   HAS_SLOPE: tl.constexpr, OUT_MODE: tl.constexpr, QMAX: tl.constexpr):
    """The centred fp32 epilogue, in the reference's exact operation order, and the store.

    acc int32 [BM, BN] (true ACC); as_ int32 [BM]; ws int32 [BM, BN] or [1, BN];
    cnt int32 [BM]. Output / residual are row-major [M, O].

    Per-channel constants come from the host, computed there exactly as
    ``ref_epilogue`` does (``ref_zero_split`` of the offsets, fp32 products):
    coef fp32 [4, O] = (sw*sa, sw*da, dw*sa, dw*da); zw int32 [O]; za int scalar.
    In-kernel: the exact int32 corrections (:func:`centred_parts`), then
        y = (sw*sa)*ACC' + (sw*da)*WS' + (dw*sa)*AS' + (dw*da)*CNT     fp32, in this order.
    Launch with enable_fp_fusion=False: an FMA would round differently.
    """
    zw = tl.load(zw_ptr + rn, mask=mask_n, other=0)[None, :]
    c_acc = tl.load(coef_ptr + rn, mask=mask_n, other=0.0)[None, :]
    c_ws = tl.load(coef_ptr + O + rn, mask=mask_n, other=0.0)[None, :]
    c_as = tl.load(coef_ptr + 2 * O + rn, mask=mask_n, other=0.0)[None, :]
    c_cnt = tl.load(coef_ptr + 3 * O + rn, mask=mask_n, other=0.0)[None, :]
    cnt2 = cnt[:, None]
    accp, wsp, asp = centred_parts(acc, as_[:, None], ws, cnt2, zw, za)
    y = c_acc * accp.to(tl.float32)
    y = y + c_ws * wsp.to(tl.float32)
    y = y + c_as * asp.to(tl.float32)
    y = y + c_cnt * cnt2.to(tl.float32)
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
