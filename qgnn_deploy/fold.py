"""Fold a QAT (fake-quant) QGNN-IC model into an :class:`~qgnn_deploy.intmodel.IntModel`.

What folding does, layer by layer (docs/integer-contract.md):

* weights -> unsigned n-bit codes under the layer's PQ range (per tensor or per output
  channel; per-tensor (l, s) broadcast to [O] vectors), conv weights reordered to
  (kh, kw, C_in) and packed canonically (ops/packing.py);
* BatchNorm (eval statistics) and bias -> ``post_scale``/``post_shift``:
  ``BN(y + b) = y * g/sqrt(v+eps) + (beta + (b - mean) * g/sqrt(v+eps))``;
  the weight/activation offsets stay in the exact identity of ops/reference.py
  (including the border terms of zero padding), so nothing about them is approximated;
* LeakyReLU slopes and the ResNet residual add go into the epilogue; where a quantized
  layer has exactly one consumer and that consumer is quantized (conv1 -> conv2 -> conv3
  in a block, the two quantized convs of each graph MLP), the epilogue ends by
  quantizing to the consumer's input codes;
* FP32 layers (stem conv, last conv of each edge MLP, any bits=32 layer) stay FP32;
* AQD / SQD / training state (quantizer ``initialized`` flags, optimiser state,
  dropout) is not carried over: only inference constants reach the IntModel;
* ``generations=K`` keeps the first K generations (prediction from generation K's
  point edges);
* ``zero_point="snap"`` rounds every offset to its grid, ``l = -z s`` with integer
  ``z = round(-l / s)`` (weights per channel when per-channel, activations per tensor),
  keeping ``s``. :func:`snap_zero_points` writes the snapped ranges into a *copy* of the
  QAT model, which is the fake-quant model a snapped IntModel is compared with.

Use :func:`compare_engines` to check an IntModel against its fake-quant model.
"""
from __future__ import annotations

import contextlib
import copy
import math
from typing import Dict, Iterable, List, Optional, Tuple

import torch
from torch import nn

from .errors import CheckpointError, ConfigError
from .intmodel import (FloatAggregation, FloatConv2d, FloatLinear, IntAggregation, IntConv2d,
                       IntLinear, IntModel)
from .models.dpgn import DPGN
from .models.layers import QAggregation
from .models.qgnn import QGNNModel, quantizable_layers
from .models.resnet12 import ResNet12, ResNet12Block
from .ops.packing import PACKABLE_BITS, pack_codes
from .quant.pauta import PautaQuantizer, pauta_codes

ZERO_POINT_MODES = ("exact", "snap")
STEM_SLOPE = 0.01  # models.resnet12: the official stem uses nn.LeakyReLU()


# --------------------------------------------------------------------- checks

def _quantizers(layer: nn.Module) -> List[Tuple[str, PautaQuantizer]]:
    return [(n, q) for n in ("weight_quant", "act_quant", "adj_quant", "node_quant")
            if isinstance(q := getattr(layer, n, None), PautaQuantizer)]


def _is_egnn(model) -> bool:
    from .models.egnn import EGNNModel
    return isinstance(model, EGNNModel)


def check_foldable(model: QGNNModel) -> None:
    """Raise unless every quantized layer has supported bits and calibrated, finite ranges."""
    if not isinstance(model, QGNNModel) and not _is_egnn(model):
        raise ConfigError(f"fold expects a QGNNModel or an EGNNModel, got {type(model).__name__}")
    for name, layer in quantizable_layers(model).items():
        if not layer.quantized:
            continue
        quants = _quantizers(layer)
        if len(quants) != 2:
            raise CheckpointError(f"layer {name} has bits={tuple(layer.bits)} but lacks its quantizers")
        for (qname, q), want in zip(quants, layer.bits):  # (weight | adjacency, input | nodes)
            where = f"{name}.{qname}"
            if want not in PACKABLE_BITS:
                raise ConfigError(f"layer {name}: {want}-bit {qname} is not supported by the integer "
                                  f"engine (supported: {PACKABLE_BITS} and 32 for FP32)")
            if q.bits != want:
                raise ConfigError(f"{where}: quantizer has {q.bits} bits, layer says {want}")
            if not bool(q.initialized):
                raise CheckpointError(
                    f"{where} is uninitialised: its PQ range never saw data (a checkpoint without "
                    "quantizer parameters, e.g. an FP model loaded into a quantized one). Calibrate "
                    "it (one forward pass over episodes) or train it before folding")
            l, r = q.l.detach(), q.r.detach()
            if not (bool(torch.isfinite(l).all()) and bool(torch.isfinite(r).all())):
                raise CheckpointError(f"{where} has a non-finite range l={l.tolist()} r={r.tolist()}")
            if not bool((r > l).all()):
                raise CheckpointError(f"{where} has an empty range (r <= l somewhere): fix or retrain")


# ----------------------------------------------------------------- snapping

@torch.no_grad()
def snap_quantizer(q: PautaQuantizer) -> None:
    """In place: ``l <- -round(-l/s) * s``, ``r <- l + s (2^n - 1)`` (s kept)."""
    s = q.step()
    z = torch.round(-q.l.detach() / s)
    l = -z * s
    q.l.copy_(l)
    q.r.copy_(l + s * float(2 ** q.bits - 1))


def snap_zero_points(model: QGNNModel) -> QGNNModel:
    """A deep copy of ``model`` whose every PQ offset lies on its grid (``l = -z s``)."""
    check_foldable(model)
    snapped = copy.deepcopy(model)
    for layer in quantizable_layers(snapped).values():
        for _, q in _quantizers(layer):
            snap_quantizer(q)
    return snapped


def pruned_view(model: QGNNModel, generations: Optional[int]) -> QGNNModel:
    """A shallow-state copy of ``model`` that runs only the first ``generations`` generations
    (the fake-quant counterpart of ``fold(..., generations=K)``)."""
    egnn = _is_egnn(model)
    depth = model.config.num_layers if egnn else model.config.generations
    if generations is None or generations == depth:
        return model
    m = copy.deepcopy(model)
    if egnn:
        m.gnn.num_layers = int(generations)
    else:
        m.gnn.generations = int(generations)
    return m


# ------------------------------------------------------------ folding pieces

def bn_affine(bn: nn.Module, name: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode BatchNorm as ``y * scale + shift``, fp32, computed the way torch's CPU
    kernel does (``invstd = 1/sqrt(var + eps)``, ``scale = gamma * invstd``, ``shift = beta -
    mean * scale``) so the folded epilogue rounds like the fake-quant model's BN."""
    if not isinstance(bn, nn.modules.batchnorm._BatchNorm):
        raise ConfigError(f"{name}: expected a BatchNorm, got {type(bn).__name__}")
    if bn.running_mean is None or bn.running_var is None:
        raise ConfigError(f"{name}: BatchNorm without running statistics cannot be folded")
    var, mean = bn.running_var.detach().float(), bn.running_mean.detach().float()
    invstd = 1.0 / torch.sqrt(var + torch.tensor(bn.eps, dtype=torch.float32))
    gamma = bn.weight.detach().float() if bn.weight is not None else torch.ones_like(invstd)
    beta = bn.bias.detach().float() if bn.bias is not None else torch.zeros_like(invstd)
    scale = invstd * gamma
    return scale, beta - mean * scale


def epilogue_constants(bias: Optional[torch.Tensor], bn: Optional[nn.Module], name: str):
    """(post_scale, post_shift) fp32 [O] or None for ``BN(y + bias)``."""
    if bn is None:
        return None, (None if bias is None else bias.detach().float())
    scale, shift = bn_affine(bn, name)
    if bias is not None:
        shift = shift + bias.detach().float() * scale
    return scale, shift


def act_params(q: PautaQuantizer) -> Tuple[float, float, int]:
    """(offset l, step s, bits) of a per-tensor activation quantizer, as fp32 values."""
    return float(q.l.detach().float()), float(q.step().float()), int(q.bits)


def weight_codes(layer: nn.Module) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, str]:
    """Codes of the layer's weight exactly as its fake-quant forward rounds them.

    Returns: codes uint8 (weight's shape), w_scale fp32 [O], w_offset fp32 [O], granularity.
    """
    q = layer.weight_quant
    w = layer.weight.detach().float()
    o = w.shape[0]
    l, s = q.l.detach().float(), q.step().float()
    bshape = (-1,) + (1,) * (w.dim() - 1)
    if q.channels is None:
        codes = pauta_codes(w, l, s, q.bits)
        return codes, s.expand(o).clone(), l.expand(o).clone(), "tensor"
    codes = pauta_codes(w, l.view(bshape), s.view(bshape), q.bits)
    return codes, s.clone(), l.clone(), "channel"


def fold_conv(name: str, conv: nn.Conv2d, bn: Optional[nn.Module], slope: Optional[float],
              residual: bool = False) -> nn.Module:
    """QConv2d / nn.Conv2d (+BN, +LeakyReLU) -> IntConv2d or FloatConv2d (NHWC)."""
    k, st, pad = conv.kernel_size, conv.stride, conv.padding
    if k[0] != k[1] or st[0] != st[1] or pad[0] != pad[1] or conv.groups != 1 or conv.dilation != (1, 1):
        raise ConfigError(f"{name}: only square, ungrouped, undilated convs fold (got k={k} "
                          f"stride={st} padding={pad} groups={conv.groups})")
    post_scale, post_shift = epilogue_constants(conv.bias, bn, name)
    if not getattr(conv, "quantized", False):
        return FloatConv2d(name, conv.weight, conv.bias if bn is None else None, st[0], pad[0],
                           post_scale, None if bn is None else post_shift, slope, residual)
    codes, w_scale, w_offset, gran = weight_codes(conv)
    o = codes.shape[0]
    rows = codes.permute(0, 2, 3, 1).reshape(o, -1).contiguous()  # (kh, kw, C_in) order
    a_l, a_s, a_bits = act_params(conv.act_quant)
    return IntConv2d(name, conv.in_channels, conv.out_channels, k[0], st[0], pad[0], residual=residual,
                     w_packed=pack_codes(rows, conv.bits.w), w_bits=conv.bits.w, a_bits=a_bits,
                     w_scale=w_scale, w_offset=w_offset, a_scale=a_s, a_offset=a_l,
                     post_scale=post_scale, post_shift=post_shift, slope=slope, out_quant=None,
                     w_granularity=gran)


def fold_linear(name: str, lin: nn.Linear, bn: Optional[nn.Module], slope: Optional[float],
                input_hwc: Optional[Tuple[int, int, int]] = None) -> nn.Module:
    """QLinear / nn.Linear (+BN1d, +LeakyReLU) -> IntLinear or FloatLinear.

    ``input_hwc=(h, w, C)``: the input is an NCHW map flattened; reorder the weight's
    columns to (h, w, C) so the integer model can flatten its NHWC map directly.
    """
    def reorder(t: torch.Tensor) -> torch.Tensor:
        if input_hwc is None:
            return t
        h, w, c = input_hwc
        return t.reshape(t.shape[0], c, h, w).permute(0, 2, 3, 1).reshape(t.shape[0], -1).contiguous()

    post_scale, post_shift = epilogue_constants(lin.bias, bn, name)
    if not getattr(lin, "quantized", False):
        return FloatLinear(name, reorder(lin.weight.detach().float()), lin.bias if bn is None else None,
                           post_scale, None if bn is None else post_shift, slope, input_hwc)
    codes, w_scale, w_offset, gran = weight_codes(lin)
    a_l, a_s, a_bits = act_params(lin.act_quant)
    return IntLinear(name, lin.in_features, lin.out_features, input_hwc=input_hwc,
                     w_packed=pack_codes(reorder(codes), lin.bits.w), w_bits=lin.bits.w, a_bits=a_bits,
                     w_scale=w_scale, w_offset=w_offset, a_scale=a_s, a_offset=a_l,
                     post_scale=post_scale, post_shift=post_shift, slope=slope, out_quant=None,
                     w_granularity=gran)


def fold_aggregation(name: str, agg: QAggregation) -> nn.Module:
    if not agg.quantized:
        return FloatAggregation(name)
    a_l, a_s, a_bits = act_params(agg.adj_quant)
    v_l, v_s, v_bits = act_params(agg.node_quant)
    return IntAggregation(name, a_bits, v_bits, a_s, a_l, v_s, v_l, agg.node_bits)


def fuse_requant(producer: nn.Module, consumer: nn.Module) -> None:
    """Let ``producer`` emit ``consumer``'s input codes when both are integer layers."""
    if isinstance(producer, (IntConv2d, IntLinear)) and isinstance(consumer, (IntConv2d, IntLinear)):
        producer.set_out_quant(consumer.in_quant)


def _is_pool(m: nn.Module, kernel: int) -> bool:
    """``m`` is a MaxPool2d(kernel) with stride = kernel, no padding, no dilation / ceil."""
    def one(v):
        return v if isinstance(v, int) else (v[0] if len(set(v)) == 1 else None)
    return (isinstance(m, nn.MaxPool2d) and one(m.kernel_size) == kernel and one(m.stride) == kernel
            and one(m.padding) == 0 and one(m.dilation) == 1 and not m.ceil_mode)


def fold_sequential(prefix: str, seq: nn.Sequential, pool: Optional[int] = None) -> Dict[str, nn.Module]:
    """Fold ``[conv|linear, (BN), (LeakyReLU), (Dropout)]*`` into ``{name.i: layer}`` and fuse
    the requantization between consecutive integer layers.

    ``pool=k``: a ``MaxPool2d(k)`` may sit between the BN and the activation (EGNN's encoder
    stage ``conv, BN, MaxPool, LeakyReLU``); the activation is folded into the conv's
    epilogue and the integer model pools after it -- a monotone activation commutes with the
    max, so the values are the same -- and a pooled layer does not fuse a requantization."""
    out: Dict[str, nn.Module] = {}
    pooled = set()
    children = list(seq.named_children())
    i = 0
    while i < len(children):
        idx, m = children[i]
        name = f"{prefix}.{idx}"
        if not isinstance(m, (nn.Conv2d, nn.Linear)):
            if isinstance(m, nn.modules.dropout._DropoutNd):
                i += 1
                continue
            raise ConfigError(f"{name}: cannot fold a {type(m).__name__} here")
        bn = slope = None
        j = i + 1
        if j < len(children) and isinstance(children[j][1], nn.modules.batchnorm._BatchNorm):
            bn = children[j][1]
            j += 1
        if pool is not None and j < len(children) and isinstance(children[j][1], nn.MaxPool2d):
            if not _is_pool(children[j][1], pool):
                raise ConfigError(f"{prefix}.{children[j][0]}: only MaxPool2d({pool}) folds here, got "
                                  f"{children[j][1]}")
            pooled.add(name)
            j += 1
        if j < len(children) and isinstance(children[j][1], (nn.LeakyReLU, nn.ReLU)):
            act = children[j][1]
            slope = float(act.negative_slope) if isinstance(act, nn.LeakyReLU) else 0.0
            j += 1
        out[name] = (fold_conv(name, m, bn, slope) if isinstance(m, nn.Conv2d)
                     else fold_linear(name, m, bn, slope))
        i = j
    if pool is not None and len(pooled) != len(out):
        raise ConfigError(f"{prefix}: expected every layer followed by MaxPool2d({pool})")
    chain = list(out.values())
    for a, b in zip(chain[:-1], chain[1:]):
        if a.name not in pooled:
            fuse_requant(a, b)
    return out


def fold_block(prefix: str, blk: ResNet12Block) -> Dict[str, nn.Module]:
    s = blk.slope
    out = {
        f"{prefix}.conv1": fold_conv(f"{prefix}.conv1", blk.conv1, blk.bn1, s),
        f"{prefix}.conv2": fold_conv(f"{prefix}.conv2", blk.conv2, blk.bn2, s),
        f"{prefix}.conv3": fold_conv(f"{prefix}.conv3", blk.conv3, blk.bn3, s, residual=True),
        f"{prefix}.conv": fold_conv(f"{prefix}.conv", blk.conv, blk.bn, None),
    }
    fuse_requant(out[f"{prefix}.conv1"], out[f"{prefix}.conv2"])
    fuse_requant(out[f"{prefix}.conv2"], out[f"{prefix}.conv3"])
    return out


def fold_backbone(bb: ResNet12, config, prefix: str = "backbone") -> Dict[str, nn.Module]:
    out = {f"{prefix}.conv1": fold_conv(f"{prefix}.conv1", bb.conv1, bb.bn1, STEM_SLOPE)}
    for i in range(1, 5):
        out.update(fold_block(f"{prefix}.layer{i}.0", getattr(bb, f"layer{i}")[0]))
    out.update(fold_sequential(f"{prefix}.layer_last", bb.layer_last))
    side = config.image_size
    for _ in range(3):
        side = (side - 1) // 2 + 1  # three MaxPool(3, 2, 1)
    hwc = (side // 2, side // 2, config.widths[2])
    lin, bn = bb.layer_second[0], bb.layer_second[1]
    if hwc[0] * hwc[1] * hwc[2] != lin.in_features:
        raise ConfigError(f"{prefix}.layer_second.0 takes {lin.in_features} features, expected "
                          f"{hwc[0]}x{hwc[1]}x{hwc[2]} for image size {config.image_size}")
    out[f"{prefix}.layer_second.0"] = fold_linear(f"{prefix}.layer_second.0", lin, bn, None, hwc)
    return out


def fold_gnn(gnn: DPGN, generations: int, prefix: str = "gnn") -> Dict[str, nn.Module]:
    out = fold_sequential(f"{prefix}.initial_edge.point_sim_transform", gnn.initial_edge.point_sim_transform)
    for l in range(generations):
        p_sim, p2d, d_sim, d2p = gnn.generation(l)
        for part, mod in ((f"point_sim_generation_{l}", p_sim), (f"distribution_sim_generation_{l}", d_sim)):
            out.update(fold_sequential(f"{prefix}.{part}.point_sim_transform", mod.point_sim_transform))
        out.update(fold_sequential(f"{prefix}.point2distribution_generation_{l}.p2d_transform",
                                   p2d.p2d_transform))
        name = f"{prefix}.distribution2point_generation_{l}"
        out[f"{name}.aggregation"] = fold_aggregation(f"{name}.aggregation", d2p.aggregation)
        out.update(fold_sequential(f"{name}.point_node_transform", d2p.point_node_transform))
    return out


def fold_egnn_encoder(enc, config, prefix: str = "backbone") -> Dict[str, nn.Module]:
    """EGNN's encoder (models.egnn.EmbeddingImagenet): each stage ``conv_i`` = conv 3x3, BN,
    MaxPool(2), LeakyReLU(0.2)[, Dropout] -> ``{prefix}.conv_i.0`` (BN and LeakyReLU in the
    epilogue, the pool in the integer model); ``layer_last`` = Linear + BN1d on the NCHW
    flatten -> ``{prefix}.layer_last.0`` with its columns in (h, w, C) order."""
    from .intmodel import EGNN_POOL
    out: Dict[str, nn.Module] = {}
    for i in range(1, 5):
        stage = getattr(enc, f"conv_{i}")
        folded = fold_sequential(f"{prefix}.conv_{i}", stage, pool=EGNN_POOL)
        if list(folded) != [f"{prefix}.conv_{i}.0"]:
            raise ConfigError(f"{prefix}.conv_{i}: expected one conv stage, got {list(folded)}")
        out.update(folded)
    side = config.feature_side
    lin, bn = enc.layer_last[0], enc.layer_last[1]
    hwc = (side, side, config.widths[3])
    if hwc[0] * hwc[1] * hwc[2] != lin.in_features:
        raise ConfigError(f"{prefix}.layer_last.0 takes {lin.in_features} features, expected "
                          f"{hwc[0]}x{hwc[1]}x{hwc[2]} for image size {config.image_size}")
    out[f"{prefix}.layer_last.0"] = fold_linear(f"{prefix}.layer_last.0", lin, bn, None, hwc)
    return out


def fold_egnn_graph(gnn, layers: int, prefix: str = "gnn") -> Dict[str, nn.Module]:
    """EGNN's graph (models.egnn.GraphNetwork), its first ``layers`` layers: each node
    update's aggregation and MLP, each edge update's MLP (``conv_out`` stays FP32)."""
    out: Dict[str, nn.Module] = {}
    for l in range(layers):
        node_net, edge_net = gnn.layer(l)
        name = f"{prefix}.edge2node_net{l}"
        out[f"{name}.aggregation"] = fold_aggregation(f"{name}.aggregation", node_net.aggregation)
        out.update(fold_sequential(f"{name}.network", node_net.network))
        out.update(fold_sequential(f"{prefix}.node2edge_net{l}.sim_network", edge_net.sim_network))
    return out


@torch.no_grad()
def fold(model: QGNNModel, zero_point: str = "exact", generations: Optional[int] = None,
         backend: Optional[str] = None) -> IntModel:
    """Fold a calibrated / trained QAT model into an :class:`IntModel`.

    Args:
        model: a :class:`QGNNModel` (DPGN) or a models.egnn :class:`EGNNModel` (FP32, quantized, or
            mixed precision); it is not modified.
        zero_point: ``"exact"`` (real offsets) or ``"snap"`` (offsets on the grid).
        generations: keep the first K generations (EGNN: graph layers; default: all).
        backend: the IntModel's op backend (None: the one in force).
    Raises:
        ConfigError: unsupported bits / modules / arguments (names the layer).
        CheckpointError: uninitialised or broken quantizer ranges (names the layer).
    """
    if zero_point not in ZERO_POINT_MODES:
        raise ConfigError(f"zero_point must be one of {ZERO_POINT_MODES}, got {zero_point!r}")
    check_foldable(model)
    config = model.config
    egnn = _is_egnn(model)
    depth = config.num_layers if egnn else config.generations
    k = depth if generations is None else generations
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= depth:
        raise ConfigError(f"generations must be an int in [1, {depth}], got {generations!r}")
    src = snap_zero_points(model) if zero_point == "snap" else model
    if egnn:
        layers = fold_egnn_encoder(src.backbone, config)
        layers.update(fold_egnn_graph(src.gnn, k))
    else:
        layers = fold_backbone(src.backbone, config)
        layers.update(fold_gnn(src.gnn, k))
    return IntModel(config, layers, generations=k, zero_point=zero_point, backend=backend)


def fake_quant_counterpart(model: QGNNModel, zero_point: str = "exact",
                           generations: Optional[int] = None) -> QGNNModel:
    """The fake-quant model an IntModel folded with these options must reproduce
    (snapped copy for "snap", pruned to ``generations``), in eval mode."""
    m = snap_zero_points(model) if zero_point == "snap" else model
    return pruned_view(m, generations).eval()


# -------------------------------------------------------------- verification

@torch.no_grad()
def compare_engines(reference_logits: torch.Tensor, candidate_logits: torch.Tensor) -> Dict[str, float]:
    """Agreement of two engines' logits [E, way, way]: fraction of queries with the same
    argmax, and max |logit difference| (the parity metrics of docs/integer-contract.md)."""
    if reference_logits.shape != candidate_logits.shape:
        raise ConfigError(f"logit shapes differ: {tuple(reference_logits.shape)} vs "
                          f"{tuple(candidate_logits.shape)}")
    a, b = reference_logits.float(), candidate_logits.float()
    same = (a.argmax(-1) == b.argmax(-1)).float()
    diff = (a - b).abs().max().item() if a.numel() else 0.0
    return {"agreement": float(same.mean().item()) if same.numel() else float("nan"),
            "max_logit_diff": float(diff), "queries": int(same.numel()),
            "disagreements": int((1 - same).sum().item())}


def episode_logits_of(predict, batches: Iterable) -> Tuple[torch.Tensor, torch.Tensor]:
    """Run ``predict(images, support) -> logits`` over ``(images, support, query)`` batches;
    returns (logits [E, way, way], query_labels [E, way])."""
    logits, labels = [], []
    for images, support, query in batches:
        logits.append(torch.as_tensor(predict(images, support)).detach().float().cpu())
        labels.append(query)
    return torch.cat(logits), torch.cat(labels)


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(-1) == labels).float().mean().item()) if labels.numel() else math.nan




# ------------------------------------------------------- layer-wise parity

#: docs/integer-contract.md: output codes may differ only at fp32 rounding ties, on at most
#: 0.1% of a layer's elements, by 1.
CODE_MISMATCH_BAR = 1e-3
CODE_DIFF_BAR = 1
#: fp32 outputs (a layer's epilogue without requantization, FP32 layers, aggregations):
#: ``max |int - fake-quant| / max |fake-quant|`` per layer. Both sides are one fp32
#: evaluation of the same real number (measured ~1e-7..1e-6); 1e-4 leaves room for long
#: reductions and still catches any folding mistake (a wrong BN constant, a transposed
#: layout, a missing border term are all >= 1e-2).
REL_ERROR_BAR = 1e-4
#: episode level (docs/integer-contract.md)
AGREEMENT_BAR = 0.999
LOGIT_DIFF_BAR = 1e-3
#: verdicts of a parity check, what ``fold --json`` and ``run --json`` carry as ``verdict``
VERDICTS = ("pass", "layerwise-only", "fail")


def episode_parity_ok(agreement: float, max_logit_diff: float) -> bool:
    """The episode-level bars: >= 99.9% same predictions, max |logit diff| <= 1e-3."""
    return bool(agreement >= AGREEMENT_BAR and max_logit_diff <= LOGIT_DIFF_BAR)


def parity_verdict(episode_ok: bool, layerwise_ok: bool) -> str:
    """One of :data:`VERDICTS`: ``pass`` -- the episode-level bars are met (and every layer,
    where checked); ``layerwise-only`` -- every layer reproduces its counterpart fed the same
    input, but the episode bars are missed: the model amplifies fp32 rounding ties (a code
    flipped at a rounding boundary cascades), not a wrong fold; ``fail`` -- a layer is wrong."""
    if not layerwise_ok:
        return "fail"
    return "pass" if episode_ok else "layerwise-only"


def _fq_output_points(fq: QGNNModel) -> Dict[str, Tuple[nn.Module, Optional[float], Optional[nn.Module]]]:
    """For every foldable layer of the fake-quant model (qualified name, as the IntModel
    names it): ``(module whose output is the value the folded layer emits, LeakyReLU slope
    still to apply or None, module whose output is the residual added before it or None)``.

    Sequential chains end their group in a BN / LeakyReLU module, so its output is the
    value itself; the ResNet block and the stem apply LeakyReLU functionally, so the
    slope (and conv3's residual) is applied here with the same torch calls the block makes.
    """
    points: Dict[str, Tuple[nn.Module, Optional[float], Optional[nn.Module]]] = {}
    bb = fq.backbone
    egnn = _is_egnn(fq)
    if not egnn:
        points["backbone.conv1"] = (bb.bn1, STEM_SLOPE, None)
        for i in range(1, 5):
            blk = getattr(bb, f"layer{i}")[0]
            p = f"backbone.layer{i}.0"
            points[f"{p}.conv1"] = (blk.bn1, blk.slope, None)
            points[f"{p}.conv2"] = (blk.bn2, blk.slope, None)
            points[f"{p}.conv3"] = (blk.bn3, blk.slope, blk.bn)
            points[f"{p}.conv"] = (blk.bn, None, None)
    for name, mod in fq.named_modules():
        if egnn and name.startswith("backbone.conv_"):
            continue
        if (not egnn and name.startswith("backbone.layer")
                and not name.startswith(("backbone.layer_last", "backbone.layer_second"))):
            continue
        if isinstance(mod, nn.Sequential):
            children = list(mod.named_children())
            for i, (idx, m) in enumerate(children):
                if not isinstance(m, (nn.Conv2d, nn.Linear)):
                    continue
                j = i + 1
                while j < len(children) and isinstance(
                        children[j][1], (nn.modules.batchnorm._BatchNorm, nn.LeakyReLU, nn.ReLU)):
                    j += 1
                points[f"{name}.{idx}"] = (children[j - 1][1], None, None)
        elif isinstance(mod, QAggregation):
            points[name] = (mod, None, None)
    if egnn:  # encoder stage: conv, BN, MaxPool, LeakyReLU; the folded conv emits LeakyReLU(BN)
        for i in range(1, 5):
            stage = getattr(bb, f"conv_{i}")
            points[f"backbone.conv_{i}.0"] = (stage[1], float(stage[3].negative_slope), None)
    return points


def _nhwc(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 2, 3, 1).contiguous()


def _hwc_rows(x: torch.Tensor, hwc: Optional[Tuple[int, int, int]]) -> torch.Tensor:
    """An NCHW-flattened [B, C*h*w] batch in the IntLinear's (h, w, C) column order."""
    if hwc is None:
        return x
    h, w, c = hwc
    return x.reshape(x.shape[0], c, h, w).permute(0, 2, 3, 1).reshape(x.shape[0], -1).contiguous()


def _new_stats(kind: str, fused: bool) -> Dict[str, object]:
    return {"kind": kind, "output": "codes" if fused else "fp32", "elements": 0,
            "input_code_mismatches": 0, "code_mismatches": 0, "code_max_diff": 0,
            "flip_margin": 0.0, "max_abs_error": 0.0, "max_ref": 0.0}


def _code_stats(st: Dict[str, object], got: torch.Tensor, want_value: torch.Tensor,
                l: float, s: float, bits: int) -> None:
    """Compare emitted codes with the fake-quant value quantized the same way; for the
    flipped elements record how far the fake-quant value lies from the rounding boundary
    (in steps: a tie-level flip is ~1e-6, a folding error is ~0.5)."""
    want = pauta_codes(want_value, torch.tensor(l, dtype=torch.float32),
                       torch.tensor(s, dtype=torch.float32), bits)
    d = (got.to(torch.int16) - want.to(torch.int16)).abs()
    bad = d > 0
    st["elements"] += d.numel()
    st["code_mismatches"] += int(bad.sum())
    st["code_max_diff"] = max(st["code_max_diff"], int(d.max()) if d.numel() else 0)
    if bool(bad.any()):
        u = (want_value.double()[bad] - l) / s
        margin = (u - torch.floor(u) - 0.5).abs()
        st["flip_margin"] = max(st["flip_margin"], float(margin.max()))


def _value_stats(st: Dict[str, object], got: torch.Tensor, want: torch.Tensor) -> None:
    st["elements"] += want.numel()
    if want.numel():
        st["max_abs_error"] = max(st["max_abs_error"], float((got.double() - want.double()).abs().max()))
        st["max_ref"] = max(st["max_ref"], float(want.abs().max()))


def _input_codes(q: PautaQuantizer, x: torch.Tensor) -> torch.Tensor:
    """The codes the fake-quant layer's quantizer gives ``x`` (what its forward rounds to)."""
    return q.codes(x.float())


class LayerwiseParity:
    """Accumulates :func:`layerwise_parity` over episode batches (``update`` per batch,
    ``result`` at the end)."""

    def __init__(self, fq_model: QGNNModel, int_model: IntModel):
        self.fq, self.im = fq_model.eval(), int_model
        points = _fq_output_points(fq_model)
        modules = dict(fq_model.named_modules())
        self.layers = list(int_model.named_layers())
        missing = [n for n, _ in self.layers if n not in modules or n not in points]
        if missing:
            raise ConfigError(f"the fake-quant model has no layers {missing[:5]} of the integer "
                              "model (not its fake-quant counterpart?)")
        self.src = {n: modules[n] for n, _ in self.layers}
        self.points = {n: points[n] for n, _ in self.layers}
        self.stats: Dict[str, Dict[str, object]] = {}
        self.batches = 0

    @torch.no_grad()
    def update(self, images: torch.Tensor, support_labels: torch.Tensor) -> None:
        inputs: Dict[str, tuple] = {}
        outputs: Dict[int, torch.Tensor] = {}
        watched = {id(m): m for n in self.points for m in (self.points[n][0], self.points[n][2])
                   if m is not None}
        handles = []
        try:
            for name, mod in self.src.items():
                handles.append(mod.register_forward_pre_hook(
                    lambda m, args, name=name: inputs.__setitem__(name, tuple(a.detach() for a in args))))
            for key, mod in watched.items():
                handles.append(mod.register_forward_hook(
                    lambda m, args, out, key=key: outputs.__setitem__(key, out.detach())))
            self.fq(images, support_labels)
        finally:
            for h in handles:
                h.remove()
        ctx = contextlib.nullcontext()
        if self.im.backend is not None:
            from .backends import use_backend
            ctx = use_backend(self.im.backend)
        with ctx:
            for name, layer in self.layers:
                if name not in inputs:  # pragma: no cover - pruned generations are not in the IntModel
                    raise ConfigError(f"{name} did not run in the fake-quant model")
                self._compare(name, layer, inputs[name], outputs)
        self.batches += 1

    def _want(self, name: str, outputs: Dict[int, torch.Tensor]) -> torch.Tensor:
        mod, slope, res = self.points[name]
        v = outputs[id(mod)]
        if res is not None:
            v = v + outputs[id(res)]
        if slope is not None:
            v = torch.nn.functional.leaky_relu(v, slope)
        return v

    def _compare(self, name: str, layer: nn.Module, args: tuple, outputs) -> None:
        from .ops import registry as qops
        src = self.src[name]
        fused = getattr(layer, "out_quant", None) is not None
        st = self.stats.setdefault(name, _new_stats(getattr(layer, "kind", "?"), fused))
        want = self._want(name, outputs)
        if isinstance(layer, IntAggregation):
            adj, nodes = args[0].float(), args[1].float()
            qa, qv = _input_codes(src.adj_quant, adj), _input_codes(src.node_quant, nodes)
            st["input_code_mismatches"] += int(
                (qops.quantize(adj.contiguous(), layer.a_offset, layer.a_scale, layer.a_bits) != qa).sum()
                + (qops.quantize(nodes.contiguous(), layer.v_offset, layer.v_scale, layer.v_bits) != qv).sum())
            # EGNN stacks its edge channels' adjacencies as [T, kN, N] rows (one bmm); the
            # integer model aggregates each N x N block on its own (the same rows)
            t, n, d = nodes.shape
            k = adj.shape[1] // n
            qa = qa.reshape(t * k, n, n)
            qv = qv.unsqueeze(1).expand(t, k, n, d).reshape(t * k, n, d)
            got = qops.qbmm(qa.contiguous(), qv.contiguous(), layer.a_bits, layer.v_bits, layer.a_scale,
                            layer.a_offset, layer.v_scale, layer.v_offset).reshape(t, k * n, d)
            _value_stats(st, got, want)
            return
        if isinstance(layer, FloatAggregation):
            _value_stats(st, layer(args[0].float(), args[1].float()), want)
            return
        x = args[0].float()
        conv = isinstance(layer, (IntConv2d, FloatConv2d))
        if conv:
            x, want = _nhwc(x), _nhwc(want)
        else:
            x = _hwc_rows(x, getattr(layer, "input_hwc", None))
        residual = None
        if conv and layer.residual:
            residual = _nhwc(outputs[id(self.points[name][2])])
        if isinstance(layer, (IntConv2d, IntLinear)):
            codes = _input_codes(src.act_quant, x)
            own = layer._codes(x.contiguous())
            st["input_code_mismatches"] += int((own != codes).sum())
            got = layer(codes, residual=residual) if conv else layer(codes)
        else:
            got = layer(x, residual=residual) if conv else layer(x)
        if fused:
            _code_stats(st, got, want, layer.out_l, layer.out_s, layer.out_bits)
        else:
            _value_stats(st, got, want)

    def result(self) -> Dict[str, object]:
        """Per layer (``layers``) and worst-case figures; ``passed`` against the bars above."""
        per_layer: Dict[str, Dict[str, object]] = {}
        worst_rate = worst_rel = flip_margin = 0.0
        worst_diff = input_mism = 0
        worst_layer, worst_key = None, (-1.0, -1.0)
        for name, st in self.stats.items():
            row = dict(st)
            n = max(int(st["elements"]), 1)
            if st["output"] == "codes":
                row["code_mismatch_rate"] = st["code_mismatches"] / n
                worst_rate = max(worst_rate, row["code_mismatch_rate"])
                worst_diff = max(worst_diff, int(st["code_max_diff"]))
                flip_margin = max(flip_margin, float(st["flip_margin"]))
                key = (row["code_mismatch_rate"] / CODE_MISMATCH_BAR
                       + (10.0 if st["code_max_diff"] > CODE_DIFF_BAR else 0.0), 0.0)
                for k in ("max_abs_error", "max_ref"):
                    row.pop(k)
            else:
                row["max_rel_error"] = st["max_abs_error"] / st["max_ref"] if st["max_ref"] > 0 \
                    else (0.0 if st["max_abs_error"] == 0 else math.inf)
                worst_rel = max(worst_rel, row["max_rel_error"])
                key = (row["max_rel_error"] / REL_ERROR_BAR, 0.0)
                for k in ("code_mismatches", "code_max_diff", "flip_margin"):
                    row.pop(k)
            input_mism += int(st["input_code_mismatches"])
            if st["input_code_mismatches"]:
                key = (key[0] + 100.0, 0.0)
            if key > worst_key:
                worst_key, worst_layer = key, name
            per_layer[name] = row
        passed = (worst_rate <= CODE_MISMATCH_BAR and worst_diff <= CODE_DIFF_BAR
                  and worst_rel <= REL_ERROR_BAR and input_mism == 0)
        return {"layers_checked": len(per_layer), "batches": self.batches,
                "max_code_mismatch_rate": worst_rate, "max_code_diff": worst_diff,
                "max_flip_margin": flip_margin, "max_rel_error": worst_rel,
                "input_code_mismatches": input_mism, "worst_layer": worst_layer,
                "passed": bool(passed), "layers": per_layer}


def layerwise_parity(fq_model: QGNNModel, int_model: IntModel, images: torch.Tensor,
                     support_labels: torch.Tensor) -> Dict[str, object]:
    """Layer-wise, input-resynced parity of ``int_model`` with its fake-quant model.

    ``fq_model`` must be the fake-quant counterpart of ``int_model``
    (:func:`fake_quant_counterpart` with the IntModel's ``zero_point``; generations may be
    more than the IntModel's). The fake-quant model runs once with hooks; then every layer
    of the IntModel runs on exactly the input the fake-quant layer saw -- integer layers on
    the codes its quantizer rounded that input to (and its residual, for a block's conv3)
    -- so errors cannot cascade, and its output is compared with the fake-quant model's
    value at the same point:

    * layers that requantize (fused ``out_quant``): emitted codes vs the fake-quant value
      quantized the same way -- ``code_mismatch_rate`` (bar 0.1%), ``code_max_diff``
      (bar 1), and ``flip_margin``: for flipped elements, how far the fake-quant value
      lies from the rounding boundary, in steps (a tie is ~1e-6; a fold error is not);
    * other layers (fp32 out; FP32 layers; aggregations): ``max_rel_error`` =
      ``max |int - fq| / max |fq|`` (bar :data:`REL_ERROR_BAR`);
    * ``input_code_mismatches``: the integer layer's own quantizer vs the fake-quant
      one on the same fp32 input (must be 0: same (l, s, bits)).

    Returns ``{"max_code_mismatch_rate", "max_code_diff", "max_flip_margin",
    "max_rel_error", "input_code_mismatches", "worst_layer", "passed", "layers":
    {name: per-layer figures}, ...}``. This proves the fold (BN folding, layouts, packing,
    fusions, padded borders) on any model, random or trained, where episode-level parity
    can be masked by the model's own sensitivity to fp32 rounding.
    """
    check = LayerwiseParity(fq_model, int_model)
    check.update(images, support_labels)
    return check.result()


def layerwise_parity_batches(fq_model: QGNNModel, int_model: IntModel,
                             batches: Iterable) -> Dict[str, object]:
    """:func:`layerwise_parity` accumulated over ``(images, support_labels, ...)`` batches."""
    check = LayerwiseParity(fq_model, int_model)
    for batch in batches:
        check.update(batch[0], batch[1])
    return check.result()


def format_layerwise(lw: Dict[str, object]) -> str:
    """One line summarising a :func:`layerwise_parity` result."""
    return (f"layer-wise {'PASS' if lw['passed'] else 'FAIL'} ({lw['layers_checked']} layers): "
            f"codes off on <= {100 * lw['max_code_mismatch_rate']:.4f}% (max diff "
            f"{lw['max_code_diff']}, flips within {lw['max_flip_margin']:.1e} step of a tie), "
            f"fp32 rel err <= {lw['max_rel_error']:.1e}, input-code mismatches "
            f"{lw['input_code_mismatches']}, worst {lw['worst_layer']}")


__all__ = ["fold", "check_foldable", "snap_zero_points", "snap_quantizer", "pruned_view",
           "fake_quant_counterpart", "compare_engines", "episode_logits_of", "accuracy",
           "ZERO_POINT_MODES", "layerwise_parity", "layerwise_parity_batches", "LayerwiseParity",
           "format_layerwise", "CODE_MISMATCH_BAR", "CODE_DIFF_BAR", "REL_ERROR_BAR",
           "AGREEMENT_BAR", "LOGIT_DIFF_BAR", "VERDICTS", "episode_parity_ok", "parity_verdict"]
