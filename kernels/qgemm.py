"""Packed 2/3/4/8-bit quantized GEMM (linear layers, 1x1 convs over rows), ``tl.dot``.

    out[M, O] = epilogue( x[M, K] (uint8 codes) @ W^T (packed codes, Triton layout) )

Per program: a [BLOCK_M, BLOCK_N] output tile. The K loop loads an activation tile
(uint8, row-major), loads the packed weight words of BLOCK_K rows (each word row is
read once per 32/bits K rows; repeats hit L1), unpacks them in registers with the
per-K-row shift table computed once before the loop, and accumulates
``tl.dot(int8, int8) -> int32``. AS (activation row sums) comes from the same tiles;
WS (weight row sums) and CNT = K are load-time constants. Then the exact int32
centring and the fused fp32 epilogue (``_common.epilogue_store``).
"""
import triton
import triton.language as tl

from ._common import epilogue_store, grouped_tile, shift_table, unpack_tile, unshift


@triton.jit
def qgemm_kernel(x_ptr, w_ptr, wh_ptr, wsum_ptr, coef_ptr, zw_ptr, ps_ptr, psh_ptr,
                 res_ptr, out_ptr, as_out_ptr,
                 M, O, K, KP, stride_xm, za, slope, out_l, out_s,
                 BITS: tl.constexpr, A_SHIFT: tl.constexpr, W_SHIFT: tl.constexpr,
                 HAS_PS: tl.constexpr, HAS_PSH: tl.constexpr, HAS_RES: tl.constexpr,
                 HAS_SLOPE: tl.constexpr, OUT_MODE: tl.constexpr, QMAX: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 GROUP_M: tl.constexpr):
    """x uint8 [M, K] (row stride stride_xm); words int32 [KP*bits/32, O]; out [M, O]."""
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, O, BLOCK_M, BLOCK_N, GROUP_M)

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    mask_m = rm < M
    mask_n = rn < O
    widx, wsh, widx_hi, wsh_hi = shift_table(rk, BITS)
    # word rows advanced per K block, main plane and 1-bit plane
    WSTEP_LO = BLOCK_K // 16 if BITS == 3 else BLOCK_K * BITS // 32
    WSTEP_HI = BLOCK_K // 32 if BITS == 3 else WSTEP_LO

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    as_ = tl.zeros((BLOCK_M,), dtype=tl.int32)
    x_rows = x_ptr + rm[:, None] * stride_xm
    for kb in range(0, tl.cdiv(KP, BLOCK_K)):
        k0 = kb * BLOCK_K
        ka = k0 + rk
        amask = mask_m[:, None] & (ka < K)[None, :]
        a = tl.load(x_rows + ka[None, :], mask=amask, other=0).to(tl.int32)
        as_ += tl.sum(a, axis=1)
        a8 = tl.where(amask, a - A_SHIFT, 0).to(tl.int8)
        wmask = (ka < KP)[:, None] & mask_n[None, :]
        q = unpack_tile(w_ptr, wh_ptr, widx + kb * WSTEP_LO, wsh, widx_hi + kb * WSTEP_HI,
                        wsh_hi, rn, wmask, O, BITS)
        acc = tl.dot(a8, (q - W_SHIFT).to(tl.int8), acc, out_dtype=tl.int32)

    ws = tl.load(wsum_ptr + rn, mask=mask_n, other=0)[None, :]
    cnt = tl.zeros((BLOCK_M,), dtype=tl.int32) + K
    if A_SHIFT != 0 or W_SHIFT != 0:
        acc = unshift(acc, as_[:, None], ws, cnt[:, None], A_SHIFT, W_SHIFT)
    if OUT_MODE == 0:
        mask = mask_m[:, None] & mask_n[None, :]
        tl.store(out_ptr + rm[:, None] * O + rn[None, :], acc, mask=mask)
        tl.store(as_out_ptr + rm, as_, mask=mask_m & ((rm * 0 + pid_n) == 0))  # vector form for the interpreter
    else:
        epilogue_store(acc, as_, ws, cnt, rm, rn, mask_m, mask_n, O, coef_ptr, zw_ptr, za,
                       ps_ptr, psh_ptr, res_ptr, slope, out_l, out_s, out_ptr,
                       HAS_PS, HAS_PSH, HAS_RES, HAS_SLOPE, OUT_MODE, QMAX)
