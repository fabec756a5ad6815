"""Fold a QAT (fake-quant) QGNN-IC model into an :class:`~qgnn_deploy.intmodel.IntModel`.

What folding does, layer by layer (DESIGN.md sections 3-4):

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

import copy
import math
from typing import Dict, Iterable, List, Optional, Tuple

import torch
from torch import nn

from .errors import CheckpointError, ConfigError
from .intmodel import (FloatAggregation, FloatConv2d, FloatLinear, IntAggregation, IntConv2d,
                       IntLinear, IntModel)
from .models.dpgn import DPGN
from .models.layers import QAggregation, QConv2d, QLinear
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


def check_foldable(model: QGNNModel) -> None:
    """Raise unless every quantized layer has supported bits and calibrated, finite ranges."""
    if not isinstance(model, QGNNModel):
        raise ConfigError(f"fold expects a QGNNModel, got {type(model).__name__}")
    for name, layer in quantizable_layers(model).items():
        if layer.bits == 32:
            continue
        if layer.bits not in PACKABLE_BITS:
            raise ConfigError(f"layer {name}: {layer.bits}-bit quantization is not supported by "
                              f"the integer engine (supported: {PACKABLE_BITS} and 32 for FP32)")
        quants = _quantizers(layer)
        if len(quants) != 2:
            raise CheckpointError(f"layer {name} has bits={layer.bits} but lacks its quantizers")
        for qname, q in quants:
            where = f"{name}.{qname}"
            if q.bits != layer.bits:
                raise ConfigError(f"{where}: quantizer has {q.bits} bits, layer says {layer.bits}")
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
    if generations is None or generations == model.config.generations:
        return model
    m = copy.deepcopy(model)
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
                     w_packed=pack_codes(rows, conv.bits), w_bits=conv.bits, a_bits=a_bits,
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
                     w_packed=pack_codes(reorder(codes), lin.bits), w_bits=lin.bits, a_bits=a_bits,
                     w_scale=w_scale, w_offset=w_offset, a_scale=a_s, a_offset=a_l,
                     post_scale=post_scale, post_shift=post_shift, slope=slope, out_quant=None,
                     w_granularity=gran)


def fold_aggregation(name: str, agg: QAggregation) -> nn.Module:
    if not agg.quantized:
        return FloatAggregation(name)
    a_l, a_s, a_bits = act_params(agg.adj_quant)
    v_l, v_s, v_bits = act_params(agg.node_quant)
    return IntAggregation(name, a_bits, v_bits, a_s, a_l, v_s, v_l)


def fuse_requant(producer: nn.Module, consumer: nn.Module) -> None:
    """Let ``producer`` emit ``consumer``'s input codes when both are integer layers."""
    if isinstance(producer, (IntConv2d, IntLinear)) and isinstance(consumer, (IntConv2d, IntLinear)):
        producer.set_out_quant(consumer.in_quant)


def fold_sequential(prefix: str, seq: nn.Sequential) -> Dict[str, nn.Module]:
    """Fold ``[conv|linear, (BN), (LeakyReLU), (Dropout)]*`` into ``{name.i: layer}`` and fuse
    the requantization between consecutive integer layers."""
    out: Dict[str, nn.Module] = {}
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
        if j < len(children) and isinstance(children[j][1], (nn.LeakyReLU, nn.ReLU)):
            act = children[j][1]
            slope = float(act.negative_slope) if isinstance(act, nn.LeakyReLU) else 0.0
            j += 1
        out[name] = (fold_conv(name, m, bn, slope) if isinstance(m, nn.Conv2d)
                     else fold_linear(name, m, bn, slope))
        i = j
    chain = list(out.values())
    for a, b in zip(chain[:-1], chain[1:]):
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


@torch.no_grad()
def fold(model: QGNNModel, zero_point: str = "exact", generations: Optional[int] = None,
         backend: Optional[str] = None) -> IntModel:
    """Fold a calibrated / trained QAT model into an :class:`IntModel`.

    Args:
        model: a :class:`QGNNModel` (FP32, quantized, or mixed precision); it is not modified.
        zero_point: ``"exact"`` (real offsets) or ``"snap"`` (offsets on the grid).
        generations: keep the first K generations (default: all).
        backend: the IntModel's op backend (None: the one in force).
    Raises:
        ConfigError: unsupported bits / modules / arguments (names the layer).
        CheckpointError: uninitialised or broken quantizer ranges (names the layer).
    """
    if zero_point not in ZERO_POINT_MODES:
        raise ConfigError(f"zero_point must be one of {ZERO_POINT_MODES}, got {zero_point!r}")
    check_foldable(model)
    config = model.config
    k = config.generations if generations is None else generations
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= config.generations:
        raise ConfigError(f"generations must be an int in [1, {config.generations}], got {generations!r}")
    src = snap_zero_points(model) if zero_point == "snap" else model
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
    argmax, and max |logit difference| (the parity metrics of DESIGN.md section 3)."""
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


__all__ = ["fold", "check_foldable", "snap_zero_points", "snap_quantizer", "pruned_view",
           "fake_quant_counterpart", "compare_engines", "episode_logits_of", "accuracy",
           "ZERO_POINT_MODES"]
