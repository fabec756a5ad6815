"""Implicit-GEMM quantized conv2d, NHWC uint8 codes, square kernel, stride, zero padding.

    GEMM view: rows m = (b, ho, wo) (M = B*Ho*Wo), columns o, K = kh*kw*C in (tap, c) order.

No im2col buffer: for each tap (i, j) the program computes the input pixel of each of its
rows, ``h = ho*stride - pad + i``, ``w = wo*stride - pad + j``, and streams that pixel's
channels in BLOCK_K chunks (contiguous in NHWC). Padded taps load 0 and are excluded
from every sum, which is exactly "zero in the real domain". The border-dependent terms
are built per row as the taps go by::

    WS[m, o] += valid(m, tap) * tap_sums[tap, o]      CNT[m] += valid(m, tap) * C

Weights are the Triton layout of ``layout.py`` (each tap's channels padded to a
multiple of 32, so the shift table is loop-invariant). Epilogue as in ``qgemm``.
"""
import triton
import triton.language as tl

from ._common import epilogue_store, grouped_tile, shift_table, unpack_tile, unshift


@triton.jit
def qconv_kernel(x_ptr, w_ptr, wh_ptr, tsum_ptr, coef_ptr, zw_ptr, ps_ptr, psh_ptr,
                 res_ptr, out_ptr, as_out_ptr, ws_out_ptr, cnt_out_ptr,
                 M, O, H, W, C, CP, HO, WO, za, slope, out_l, out_s,
                 KSIZE: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr,
                 BITS: tl.constexpr, A_SHIFT: tl.constexpr, W_SHIFT: tl.constexpr,
                 HAS_PS: tl.constexpr, HAS_PSH: tl.constexpr, HAS_RES: tl.constexpr,
                 HAS_SLOPE: tl.constexpr, OUT_MODE: tl.constexpr, QMAX: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 GROUP_M: tl.constexpr):
    """x uint8 [B, H, W, C]; words int32 [KSIZE^2*CP*bits/32, O]; tap sums int32
    [KSIZE^2, O]; out [B*HO*WO, O] (NHWC). Raw mode also writes AS [M], WS [M, O], CNT [M].
    """
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, O, BLOCK_M, BLOCK_N, GROUP_M)

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    mask_m = rm < M
    mask_n = rn < O
    hw = HO * WO
    b = rm // hw
    r = rm % hw
    h0 = (r // WO) * STRIDE - PAD
    w0 = (r % WO) * STRIDE - PAD
    widx, wsh, widx_hi, wsh_hi = shift_table(rk, BITS)
    WPER = 16 if BITS == 3 else 32 // BITS      # codes per word, main plane
    WPER_HI = 32 if BITS == 3 else WPER

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    ws = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    as_ = tl.zeros((BLOCK_M,), dtype=tl.int32)
    cnt = tl.zeros((BLOCK_M,), dtype=tl.int32)
    for tap in tl.static_range(KSIZE * KSIZE):
        hi_ = h0 + tap // KSIZE
        wi_ = w0 + tap % KSIZE
        valid = mask_m & (hi_ >= 0) & (hi_ < H) & (wi_ >= 0) & (wi_ < W)
        pix = ((b * H + hi_) * W + wi_) * C
        pix = tl.where(valid, pix, 0)  # keep masked-off addresses in range
        tsum = tl.load(tsum_ptr + tap * O + rn, mask=mask_n, other=0)
        ws += tl.where(valid[:, None], tsum[None, :], 0)
        cnt += tl.where(valid, C, 0)
        for c0 in range(0, CP, BLOCK_K):
            kc = c0 + rk
            amask = valid[:, None] & (kc < C)[None, :]
            a = tl.load(x_ptr + pix[:, None] + kc[None, :], mask=amask, other=0).to(tl.int32)
            as_ += tl.sum(a, axis=1)
            a8 = tl.where(amask, a - A_SHIFT, 0).to(tl.int8)
            kq = tap * CP + c0  # first repacked K row of this block (a multiple of 32)
            wmask = (kc < CP)[:, None] & mask_n[None, :]
            q = unpack_tile(w_ptr, wh_ptr, widx + kq // WPER, wsh, widx_hi + kq // WPER_HI,
                            wsh_hi, rn, wmask, O, BITS)
            acc = tl.dot(a8, (q - W_SHIFT).to(tl.int8), acc, out_dtype=tl.int32)

    if A_SHIFT != 0 or W_SHIFT != 0:
        acc = unshift(acc, as_[:, None], ws, cnt[:, None], A_SHIFT, W_SHIFT)
    if OUT_MODE == 0:
        mask = mask_m[:, None] & mask_n[None, :]
        offs = rm[:, None] * O + rn[None, :]
        tl.store(out_ptr + offs, acc, mask=mask)
        tl.store(ws_out_ptr + offs, ws, mask=mask)
        tl.store(as_out_ptr + rm, as_, mask=mask_m & ((rm * 0 + pid_n) == 0))
        tl.store(cnt_out_ptr + rm, cnt, mask=mask_m & ((rm * 0 + pid_n) == 0))
    else:
        epilogue_store(acc, as_, ws, cnt, rm, rn, mask_m, mask_n, O, coef_ptr, zw_ptr, za,
                       ps_ptr, psh_ptr, res_ptr, slope, out_l, out_s, out_ptr,
                       HAS_PS, HAS_PSH, HAS_RES, HAS_SLOPE, OUT_MODE, QMAX)
