"""The int32 accumulator bound of the integer kernels (docs/integer-contract.md).

Every backend accumulates ``ACC = sum_k qw[o,k] * qa[k,p]`` (and ``AS``, ``WS``, ``CNT``)
in int32. This module proves that no supported layer can overflow it and gives the
check that fold / the kernels call for anything outside the proven range.

Proof
-----
Codes are unsigned: ``0 <= qw <= 2^bw - 1`` and ``0 <= qa <= 2^ba - 1`` (the
quantizer clamps, the kernels reject codes >= 2^bits). Every product is therefore
in ``[0, (2^bw - 1)(2^ba - 1)]`` and a sum of K of them lies in

    0 <= ACC <= K * (2^bw - 1) * (2^ba - 1)                               (1)

so ACC fits int32 exactly when ``K * (2^bw - 1) * (2^ba - 1) <= 2^31 - 1``, i.e.

    K <= K_max(bw, ba) = floor((2^31 - 1) / ((2^bw - 1)(2^ba - 1)))        (2)

    bw\\ba      2           3          4          8
    2      238,609,294 102,261,126 47,721,858  2,807,168
    3      102,261,126  43,826,196 20,452,225  1,203,072
    4       47,721,858  20,452,225  9,544,371    561,433
    8        2,807,168   1,203,072    561,433     33,025

AS, WS <= K * (2^8 - 1) and CNT <= K are smaller than (1) for the same K, so (2)
covers them too.

Centred accumulators. The reference epilogue (ops/reference.py, ref_centered_parts) also
forms ``ACC' = sum_k (qw - zw)(qa - za)`` in int32, with zero points
``z = clamp(rne(-l/s), 0, 255)``. Then ``|qw - zw| <= max(2^bw - 1, 255) = 255`` (z may
exceed the code range when a quantizer's range lies entirely below 0), so

    |ACC'| <= K * 255 * 255,   i.e.  K <= 33,025 for every bit-width           (3)

and |WS'|, |AS'| <= 255 K, |CNT| <= K are smaller. (3) is the binding limit whenever
centred parts are formed; :func:`check_reduction` applies it by default
(``centred=True``); ``centred=False`` gives the plain bound (2). Kernels that re-centre 8-bit codes to int8 (``q - 128``) sum terms of
magnitude <= 128 * 255 < 255 * 255, again inside (1); partial sums of a split-K or tiled
reduction are sums of fewer non-negative (or smaller-magnitude) terms, so they are
bounded by (1) as well. (Int16 pair sums inside SIMD instructions such as
``vpmaddubsw`` are a separate, per-instruction concern of the kernel, not of this bound.)

Supported layer sizes. The reduction length K of each integer layer of the model is

    3x3 conv of block i:      9 * C_in        (C_in <= widths[3])
    1x1 shortcut conv:        C_in
    layer_last linear:        widths[3]
    layer_second linear:      (S/16)^2 * widths[2]   (block-3 output S/8, max-pooled by 2)
    graph 1x1 convs / MLPs:   <= 2 * emb_dim, or 2 * N * num_supports (P2D)
    aggregation A @ V:        N = way*shot + way nodes

For the paper's presets (widths (64,128,256,512), emb_dim 128, 32 or 84 px, up to
5-way 5-shot) the largest K is 6400 (layer_second at 84 px: 5*5*256), far below the
tightest entry of the table (33,025 at 8x8 bits). :func:`config_reductions` lists the K
of every layer of a config and :func:`check_config` applies (2) to each, so a custom
config (wider layers, bigger images) is checked rather than assumed.
"""
from __future__ import annotations

from typing import Dict, Optional

from ..errors import KernelArgumentError

INT32_MAX = 2 ** 31 - 1
BOUND_BITS = (2, 3, 4, 8)


def _bits(b: int, what: str) -> int:
    if isinstance(b, bool) or not isinstance(b, int) or b not in BOUND_BITS:
        raise KernelArgumentError(f"{what} must be one of {BOUND_BITS}, got {b!r}")
    return b


def max_code_product(w_bits: int, a_bits: int) -> int:
    """Largest product of one weight code and one activation code."""
    return (2 ** _bits(w_bits, "w_bits") - 1) * (2 ** _bits(a_bits, "a_bits") - 1)


#: zero points of the centred identity are clamped to [0, ZERO_POINT_MAX]
ZERO_POINT_MAX = 255


def max_reduction(w_bits: int, a_bits: int, centred: bool = False) -> int:
    """K_max of (2) (``centred=False``) or (3): the longest reduction whose int32
    accumulators cannot overflow."""
    if centred:
        wmax = max(2 ** _bits(w_bits, "w_bits") - 1, ZERO_POINT_MAX)
        amax = max(2 ** _bits(a_bits, "a_bits") - 1, ZERO_POINT_MAX)
        return INT32_MAX // (wmax * amax)
    return INT32_MAX // max_code_product(w_bits, a_bits)


def worst_case_accumulator(k: int, w_bits: int, a_bits: int) -> int:
    """The exact largest ACC a layer of reduction length ``k`` can produce (all codes max)."""
    return int(k) * max_code_product(w_bits, a_bits)


def check_reduction(k: int, w_bits: int, a_bits: int, layer: Optional[str] = None,
                    centred: bool = True) -> int:
    """Raise :class:`KernelArgumentError` unless ``k`` codes of these widths fit int32
    (bound (3) by default, (2) with ``centred=False``)."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise KernelArgumentError(f"reduction length must be a non-negative int, got {k!r}")
    limit = max_reduction(w_bits, a_bits, centred=centred)
    if k > limit:
        where = f"layer {layer}: " if layer else ""
        raise KernelArgumentError(
            f"{where}a reduction of K={k} {w_bits}-bit x {a_bits}-bit codes can exceed "
            f"2^31 - 1 in an int32 accumulator; K must be <= {limit} "
            f"({'centred parts, zero points up to 255' if centred else 'codes only'}): "
            "split the layer into smaller reductions")
    return k


def config_reductions(config) -> Dict[str, int]:
    """``{layer name (or kind): K}`` for the integer layers of a :class:`ModelConfig`."""
    w = [int(x) for x in config.widths]
    s = int(config.image_size)
    e = int(config.emb_dim)
    n = int(config.num_nodes)
    ns = int(config.num_supports)
    out: Dict[str, int] = {}
    cin = 3
    for i, c in enumerate(w, 1):
        out[f"backbone.layer{i}.conv1"] = 9 * cin
        out[f"backbone.layer{i}.conv2"] = 9 * c
        out[f"backbone.layer{i}.conv3"] = 9 * c
        out[f"backbone.layer{i}.downsample"] = cin
        cin = c
    side = s
    for _ in range(3):
        side //= 2
    out["backbone.layer_second.0"] = max(1, side // 2) ** 2 * w[2]
    out["backbone.layer_last.0"] = w[3]
    # graph MLPs: 1x1 convs over at most 2*emb_dim channels (4*emb_dim: a safe over-count)
    out["gnn.mlp (max)"] = 4 * e
    out["gnn.p2d"] = 2 * n * ns
    out["gnn.aggregation"] = n
    return out


def check_config(config) -> None:
    """Apply the bound to every layer of ``config`` at its bit-widths (8 where a layer is
    FP32, which is conservative)."""
    for name, k in config_reductions(config).items():
        b = config.bits_for(name).w if hasattr(config, "bits_for") else 8
        b = b if b in BOUND_BITS else 8
        check_reduction(k, b, 8, layer=name)


def check_int_model(model) -> None:
    """Apply the bound to every integer layer of a loaded :class:`IntModel`."""
    for name, m in model.integer_layers().items():
        if hasattr(m, "reduction"):
            check_reduction(int(m.reduction), int(m.w_bits), int(m.a_bits), layer=name)
        else:  # aggregation: K = number of nodes, both operands activations
            check_reduction(int(model.config.num_nodes), int(m.a_bits), int(m.v_bits), layer=name)


__all__ = ["INT32_MAX", "ZERO_POINT_MAX", "max_code_product", "max_reduction", "worst_case_accumulator",
           "check_reduction", "config_reductions", "check_config", "check_int_model"]
