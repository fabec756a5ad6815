"""Small-M quantized linear: broadcast-multiply + ``tl.sum`` with optional split-K.

``tl.dot`` needs at least 16 rows per tile, so an M of 1..8 (one task's nodes, a
single image's head) would waste >= half of every MMA. Here each program owns a
[BLOCK_M (= next pow2 of M), BLOCK_N] tile, multiplies [BM, BK, 1] x [1, BK, BN] in int32
and reduces over K with ``tl.sum``. With few output columns the K range is split over
SPLIT_K programs (grid axis 1) that write int32 partials; ``qgemv_finish_kernel`` sums
them in a fixed order (deterministic, no atomics) and runs the shared epilogue. With
SPLIT_K == 1 the epilogue is fused into the first kernel.
"""
import triton
import triton.language as tl

from ._common import epilogue_store, shift_table, unpack_tile, unshift


@triton.jit
def qgemv_kernel(x_ptr, w_ptr, wh_ptr, wsum_ptr, coef_ptr, zw_ptr, ps_ptr, psh_ptr,
                 res_ptr, out_ptr, as_out_ptr, part_ptr, part_as_ptr,
                 M, O, K, KP, stride_xm, K_PER_SPLIT, za, slope, out_l, out_s,
                 BITS: tl.constexpr, A_SHIFT: tl.constexpr, W_SHIFT: tl.constexpr,
                 HAS_PS: tl.constexpr, HAS_PSH: tl.constexpr, HAS_RES: tl.constexpr,
                 HAS_SLOPE: tl.constexpr, OUT_MODE: tl.constexpr, QMAX: tl.constexpr,
                 SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr):
    """x uint8 [M, K]; K_PER_SPLIT a multiple of BLOCK_K. Partials: int32 [SPLIT_K, M, O]
    (shifted-domain ACC') and [SPLIT_K, M] (AS)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rm = tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    mask_m = rm < M
    mask_n = rn < O
    widx, wsh, widx_hi, wsh_hi = shift_table(rk, BITS)
    WSTEP_LO = BLOCK_K // 16 if BITS == 3 else BLOCK_K * BITS // 32
    WSTEP_HI = BLOCK_K // 32 if BITS == 3 else WSTEP_LO

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    as_ = tl.zeros((BLOCK_M,), dtype=tl.int32)
    kb0 = pid_k * (K_PER_SPLIT // BLOCK_K)
    kb1 = tl.minimum(kb0 + K_PER_SPLIT // BLOCK_K, tl.cdiv(KP, BLOCK_K))
    for kb in range(kb0, kb1):
        ka = kb * BLOCK_K + rk
        amask = mask_m[:, None] & (ka < K)[None, :]
        a = tl.load(x_ptr + rm[:, None] * stride_xm + ka[None, :], mask=amask, other=0).to(tl.int32)
        as_ += tl.sum(a, axis=1)
        a = tl.where(amask, a - A_SHIFT, 0)
        wmask = (ka < KP)[:, None] & mask_n[None, :]
        q = unpack_tile(w_ptr, wh_ptr, widx + kb * WSTEP_LO, wsh, widx_hi + kb * WSTEP_HI,
                        wsh_hi, rn, wmask, O, BITS) - W_SHIFT
        acc += tl.sum(a[:, :, None] * q[None, :, :], axis=1)

    if SPLIT_K > 1:
        mask = mask_m[:, None] & mask_n[None, :]
        tl.store(part_ptr + (pid_k * M + rm[:, None]) * O + rn[None, :], acc, mask=mask)
        tl.store(part_as_ptr + pid_k * M + rm, as_, mask=mask_m & ((rm * 0 + pid_n) == 0))
    else:
        _finish(acc, as_, rm, rn, mask_m, mask_n, O, K, wsum_ptr, coef_ptr, zw_ptr, ps_ptr,
                psh_ptr, res_ptr, out_ptr, as_out_ptr, pid_n, za, slope, out_l, out_s,
                A_SHIFT, W_SHIFT, HAS_PS, HAS_PSH, HAS_RES, HAS_SLOPE, OUT_MODE, QMAX)


@triton.jit
def qgemv_finish_kernel(part_ptr, part_as_ptr, wsum_ptr, coef_ptr, zw_ptr, ps_ptr, psh_ptr,
                        res_ptr, out_ptr, as_out_ptr, M, O, K, za, slope, out_l, out_s,
                        A_SHIFT: tl.constexpr, W_SHIFT: tl.constexpr,
                        HAS_PS: tl.constexpr, HAS_PSH: tl.constexpr, HAS_RES: tl.constexpr,
                        HAS_SLOPE: tl.constexpr, OUT_MODE: tl.constexpr, QMAX: tl.constexpr,
                        SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Sum the SPLIT_K partials in order and run the epilogue."""
    pid_n = tl.program_id(0)
    rm = tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = rm < M
    mask_n = rn < O
    mask = mask_m[:, None] & mask_n[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    as_ = tl.zeros((BLOCK_M,), dtype=tl.int32)
    for s in range(SPLIT_K):
        acc += tl.load(part_ptr + (s * M + rm[:, None]) * O + rn[None, :], mask=mask, other=0)
        as_ += tl.load(part_as_ptr + s * M + rm, mask=mask_m, other=0)
    _finish(acc, as_, rm, rn, mask_m, mask_n, O, K, wsum_ptr, coef_ptr, zw_ptr, ps_ptr,
            psh_ptr, res_ptr, out_ptr, as_out_ptr, pid_n, za, slope, out_l, out_s,
            A_SHIFT, W_SHIFT, HAS_PS, HAS_PSH, HAS_RES, HAS_SLOPE, OUT_MODE, QMAX)


@triton.jit
def _finish(acc, as_, rm, rn, mask_m, mask_n, O, K, wsum_ptr, coef_ptr, zw_ptr, ps_ptr,
            psh_ptr, res_ptr, out_ptr, as_out_ptr, pid_n, za, slope, out_l, out_s,
            A_SHIFT: tl.constexpr, W_SHIFT: tl.constexpr,
            HAS_PS: tl.constexpr, HAS_PSH: tl.constexpr, HAS_RES: tl.constexpr,
            HAS_SLOPE: tl.constexpr, OUT_MODE: tl.constexpr, QMAX: tl.constexpr):
    ws = tl.load(wsum_ptr + rn, mask=mask_n, other=0)[None, :]
    cnt = tl.zeros_like(as_) + K
    if A_SHIFT != 0 or W_SHIFT != 0:
        acc = unshift(acc, as_[:, None], ws, cnt[:, None], A_SHIFT, W_SHIFT)
    if OUT_MODE == 0:
        mask = mask_m[:, None] & mask_n[None, :]
        tl.store(out_ptr + rm[:, None] * O + rn[None, :], acc, mask=mask)
        tl.store(as_out_ptr + rm, as_, mask=mask_m & ((rm * 0 + pid_n) == 0))
    else:
        epilogue_store(acc, as_, ws, cnt, rm, rn, mask_m, mask_n, O, coef_ptr, zw_ptr, za,
                       ps_ptr, psh_ptr, res_ptr, slope, out_l, out_s, out_ptr,
                       HAS_PS, HAS_PSH, HAS_RES, HAS_SLOPE, OUT_MODE, QMAX)
