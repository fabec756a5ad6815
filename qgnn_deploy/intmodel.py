"""IntModel: the folded integer QGNN-IC model, an ``nn.Module`` tree calling the ``qgnn::`` ops.

Interface note for the other engineers (stable; names may gain siblings, not lose these)
======================================================================================

Getting one::

    from qgnn_deploy import fold, load_int_model, save_int_model
    im = fold(qat_model)                        # zero_point="exact"|"snap", generations=K
    im = load_int_model("model.qgnn")
    out = im(images, support_labels)            # EpisodeOutput, .logits [T, way, way]
    im.backend = "cpu"                          # reference | cpu | triton | None (= default)

``im.config`` is the *source* model's ModelConfig (so ``build_model(im.config)`` has the
same layer names); ``im.generations`` is the number of generations actually run (<=
config.generations when pruned); ``im.zero_point`` is ``"exact"`` or ``"snap"``.

Walking layers: ``im.integer_layers()`` -> ``{qualified name: layer}`` of
:class:`IntConv2d`, :class:`IntLinear`, :class:`IntAggregation`; ``im.fp32_layers()``
-> ``{name: FloatConv2d | FloatLinear | FloatAggregation}``; ``im.named_layers()`` both,
in execution order. Names equal the float model's (``backbone.layer2.0.conv2``,
``gnn.point_sim_generation_0.point_sim_transform.4``, ``gnn.distribution2point_generation_1.aggregation``,
``backbone.conv1`` for the FP32 stem).

Attributes of IntConv2d / IntLinear (python scalars unless noted):
    w_bits, a_bits                 weight / input-activation bit-widths
    w_packed   uint8 [O, ceil(K/8)*w_bits]   canonical packing (ops/packing.py), K order:
               conv (kh, kw, C_in); linear: input features, except
               ``backbone.layer_second.0`` whose K is in (h, w, C) order (NHWC flatten;
               ``input_hwc`` gives (h, w, C))
    w_scale, w_offset   fp32 [O]   weight step / offset (per-tensor values repeated)
    a_scale, a_offset              input quantizer step / offset (per tensor)
    post_scale, post_shift  fp32 [O] or None   folded BatchNorm (+ bias)
    slope          LeakyReLU negative slope or None
    out_l, out_s, out_bits         requantize to the next layer's codes (fused), or None
    residual       IntConv2d only: bool, True when forward adds a residual before the slope
    kernel_size, stride, padding, in_channels, out_channels (conv); in_features, out_features (linear)
    w_zero_point / a_zero_point    round(-offset/scale): exact grid points under "snap"
IntAggregation: a_bits (adjacency), v_bits (nodes), a_scale, a_offset, v_scale, v_offset,
    node_bits (per-node widths ending at v_bits, or ()).
FloatConv2d / FloatLinear: weight, bias (fp32), post_scale, post_shift, slope.

Data flow and layouts: activations are NHWC float32, or uint8 codes when the producer
fused the requantization (a layer's forward accepts either: float is quantized with the
layer's own (a_offset, a_scale, a_bits) by ``qgnn::quantize``; uint8 is taken as already
quantized that way). The ResNet block chain conv1 -> conv2 -> conv3 and the two
quantized convs of each graph MLP pass codes; every other layer outputs fp32.
Max-pool, global average pool, the pairwise squared differences, sigmoid, edge
normalisation and concatenation run in fp32 torch (max-pool in float: it commutes
with the monotonic quantizer, so running it on codes would give the same codes, but
the block output feeds two quantizers, the shortcut's and conv1's).

Model families: ``im.family`` is ``"dpgn"`` (``config`` a ModelConfig; the containers
IntBackbone / IntDPGN below) or ``"egnn"`` (``config`` a models.egnn.EGNNConfig; IntEGNNEncoder /
IntEGNNGraph, ``generations`` = graph layers run, ``im(...)`` returns a models.egnn.EGNNOutput).
Each family's episode is written once against the episode ops (``IntModel.episode``);
:data:`FAMILIES` says what else a family supplies (label-derived inputs, named outputs).

Graph pieces: a 1x1 conv over the N x N grid is ``qgnn::qconv2d`` with B=T, H=W=N;
the D2P node MLP is ``qgnn::qconv2d`` on [T, N, 1, 2E]; P2D is ``qgnn::qlinear`` on
[T*N, 2NS]; the aggregation is ``qgnn::qbmm``.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .backends import cpu as cpu_ops
from .backends import current_backend
from .config import LayerBits, ModelConfig, check_node_bits
from .errors import ArtifactError, ConfigError
from .models.qgnn import EpisodeOutput, check_episode, check_episode_shapes, episode_graph, episode_graph_arrays
from .ops import registry as qops
from .ops.episode_ops import TORCH_OPS, f32_conv2d, f32_linear
from .ops.reference import count_node_widths

Tensor = torch.Tensor


def _opt_buffer(module: nn.Module, name: str, value: Optional[Tensor]) -> None:
    module.register_buffer(name, None if value is None else value.detach().float().contiguous().clone())


def _f(x) -> Optional[float]:
    return None if x is None else float(x)


def layer_bits(layer: nn.Module) -> LayerBits:
    """(w, a) of an IntModel layer as ModelConfig.layer_bits names them: weight and input
    bits, for an aggregation the adjacency (``a_bits``) and node (``v_bits``) bits."""
    if hasattr(layer, "v_bits"):
        return LayerBits(layer.a_bits, layer.v_bits)
    return LayerBits(layer.w_bits, layer.a_bits)


# ------------------------------------------------------------------ integer layers

class _IntWeightLayer(nn.Module):
    """Common part of IntConv2d / IntLinear: packed weights, quantizers, epilogue."""

    kind = "?"

    def __init__(self, name: str, w_packed: Tensor, w_bits: int, a_bits: int, w_scale: Tensor,
                 w_offset: Tensor, a_scale: float, a_offset: float,
                 post_scale: Optional[Tensor], post_shift: Optional[Tensor],
                 slope: Optional[float], out_quant: Optional[Tuple[float, float, int]],
                 w_granularity: str):
        super().__init__()
        self.name = name
        self.w_bits, self.a_bits = int(w_bits), int(a_bits)
        self.register_buffer("w_packed", w_packed.contiguous().clone())
        self.register_buffer("w_scale", w_scale.detach().float().contiguous().clone())
        self.register_buffer("w_offset", w_offset.detach().float().contiguous().clone())
        self.a_scale, self.a_offset = float(a_scale), float(a_offset)
        _opt_buffer(self, "post_scale", post_scale)
        _opt_buffer(self, "post_shift", post_shift)
        self.slope = _f(slope)
        self.w_granularity = w_granularity
        self.set_out_quant(out_quant)

    def set_out_quant(self, out_quant: Optional[Tuple[float, float, int]]) -> None:
        """Fuse requantization to ``(l, s, bits)`` codes into the epilogue (None: fp32 out)."""
        if out_quant is None:
            self.out_l = self.out_s = self.out_bits = None
        else:
            self.out_l, self.out_s, self.out_bits = float(out_quant[0]), float(out_quant[1]), int(out_quant[2])

    @property
    def out_quant(self) -> Optional[Tuple[float, float, int]]:
        return None if self.out_s is None else (self.out_l, self.out_s, self.out_bits)

    @property
    def in_quant(self) -> Tuple[float, float, int]:
        return (self.a_offset, self.a_scale, self.a_bits)

    @property
    def w_zero_point(self) -> Tensor:
        """int32 [O] ``round(-w_offset / w_scale)`` (grid-exact under zero_point="snap")."""
        return torch.round(-self.w_offset / self.w_scale).to(torch.int32)

    @property
    def a_zero_point(self) -> int:
        return int(round(-self.a_offset / self.a_scale))

    def _codes(self, x: Tensor) -> Tensor:
        if x.dtype == torch.uint8:
            return x.contiguous()
        return qops.quantize(x.float().contiguous(), self.a_offset, self.a_scale, self.a_bits)

    def extra_repr(self) -> str:
        fused = f", out_bits={self.out_bits}" if self.out_s is not None else ""
        return f"{self.name}: w_bits={self.w_bits}, a_bits={self.a_bits}, slope={self.slope}{fused}"


class _ConvShape:
    """The ``pointwise`` test of a conv layer with kernel_size, stride and padding."""

    @property
    def pointwise(self) -> bool:
        """1x1, stride 1, no padding: a linear map of the last dim (any leading shape)."""
        return self.kernel_size == 1 and self.stride == 1 and self.padding == 0


class IntConv2d(_ConvShape, _IntWeightLayer):
    """Quantized conv, NHWC: uint8 codes or fp32 [B, H, W, C] -> fp32 [B, Ho, Wo, O]
    (uint8 codes when requantization is fused)."""

    kind = "conv2d"
    is_conv = True

    def __init__(self, name: str, in_channels: int, out_channels: int, kernel_size: int,
                 stride: int, padding: int, residual: bool = False, **common):
        super().__init__(name, **common)
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.kernel_size, self.stride, self.padding = int(kernel_size), int(stride), int(padding)
        self.residual = bool(residual)

    @property
    def reduction(self) -> int:
        return self.kernel_size * self.kernel_size * self.in_channels

    def forward(self, x: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        return qops.qconv2d(self._codes(x), self.w_packed, self.w_bits, self.a_bits, self.kernel_size,
                            self.stride, self.padding, self.w_scale, self.w_offset, self.a_scale,
                            self.a_offset, self.post_scale, self.post_shift, residual, self.slope,
                            self.out_l, self.out_s, self.out_bits)


class IntLinear(_IntWeightLayer):
    """Quantized linear over the last dim: [..., K] codes or fp32 -> fp32 [..., O]."""

    kind = "linear"

    def __init__(self, name: str, in_features: int, out_features: int,
                 input_hwc: Optional[Tuple[int, int, int]] = None, **common):
        super().__init__(name, **common)
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.input_hwc = None if input_hwc is None else tuple(int(v) for v in input_hwc)

    @property
    def reduction(self) -> int:
        return self.in_features

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        rows = self._codes(x.reshape(-1, x.shape[-1]))
        y = qops.qlinear(rows, self.w_packed, self.w_bits, self.a_bits, self.w_scale, self.w_offset,
                         self.a_scale, self.a_offset, self.post_scale, self.post_shift, None,
                         self.slope, self.out_l, self.out_s, self.out_bits)
        return y.reshape(*lead, self.out_features)


class IntAggregation(nn.Module):
    """Quantized graph aggregation ``A @ V``: fp32 adj [T, N, N], nodes [T, N, D] -> fp32 [T, N, D].

    ``node_bits`` (ascending widths, or ``()``): per-node codes -- the nodes are quantized on
    the ``v_bits = max(node_bits)`` grid, then ``qgnn::node_rows`` gives each node the fewest
    widths holding its codes minus its minimum code, and ``qgnn::qbmm`` takes those codes
    with the per-node widths and offsets (same result as the shared grid: lossless).
    ``node_stats``: when set to a dict, each forward adds ``{width: nodes}`` counts to it."""

    kind = "bmm"

    def __init__(self, name: str, a_bits: int, v_bits: int, a_scale: float, a_offset: float,
                 v_scale: float, v_offset: float, node_bits: Tuple[int, ...] = ()):
        super().__init__()
        self.name = name
        self.a_bits, self.v_bits = int(a_bits), int(v_bits)
        self.a_scale, self.a_offset = float(a_scale), float(a_offset)
        self.v_scale, self.v_offset = float(v_scale), float(v_offset)
        self.node_bits = check_node_bits(node_bits, f"{name}.node_bits") if node_bits else ()
        if self.node_bits and self.node_bits[-1] != self.v_bits:
            raise ArtifactError(f"{name}: node_bits {list(self.node_bits)} must end at v_bits={self.v_bits}")
        self.node_stats: Optional[Dict[int, int]] = None

    @property
    def w_bits(self) -> int:  # the "weight" operand of a Bit-FLOPs count is the adjacency
        return self.a_bits

    def forward(self, adj: Tensor, nodes: Tensor) -> Tensor:
        qa = qops.quantize(adj.float().contiguous(), self.a_offset, self.a_scale, self.a_bits)
        qv = qops.quantize(nodes.float().contiguous(), self.v_offset, self.v_scale, self.v_bits)
        rows = (None, None)
        if self.node_bits:
            qv, *rows = qops.node_rows(qv, list(self.node_bits))
            if self.node_stats is not None:
                count_node_widths(self.node_stats, rows[0])
        return qops.qbmm(qa, qv, self.a_bits, self.v_bits, self.a_scale, self.a_offset,
                         self.v_scale, self.v_offset, *rows)

    def extra_repr(self) -> str:
        nb = f", node_bits={list(self.node_bits)}" if self.node_bits else ""
        return f"{self.name}: a_bits={self.a_bits}, v_bits={self.v_bits}{nb}"


# --------------------------------------------------------------------- FP32 layers

def _epilogue(y: Tensor, post_scale, post_shift, residual, slope, channel_dim: int) -> Tensor:
    """fp32 epilogue in the order of the integer ops: *scale, +shift, +residual, LeakyReLU.

    In place on ``y`` (a fresh layer output): one memory pass per step, no temporaries.
    ``leaky_relu`` equals the contract's ``where(y >= 0, y, y * slope)`` bit for bit (zeros
    keep their sign either way)."""
    shape = [1] * y.dim()
    shape[channel_dim] = -1
    if post_scale is not None:
        y.mul_(post_scale.view(shape))
    if post_shift is not None:
        y.add_(post_shift.view(shape))
    if residual is not None:
        y.add_(residual)
    if slope is not None:
        F.leaky_relu_(y, slope)
    return y


class FloatConv2d(_ConvShape, nn.Module):
    """An FP32 conv (stem, last edge-MLP convs, bits=32 layers), NHWC in and out; products
    summed in float64 and rounded once (ops/episode_ops.py: identical on every engine)."""

    kind = "conv2d_fp32"
    is_conv = True

    def __init__(self, name: str, weight: Tensor, bias: Optional[Tensor], stride: int, padding: int,
                 post_scale: Optional[Tensor], post_shift: Optional[Tensor], slope: Optional[float],
                 residual: bool = False):
        super().__init__()
        self.name = name
        self.register_buffer("weight", weight.detach().float().contiguous().clone())
        _opt_buffer(self, "bias", bias)
        _opt_buffer(self, "post_scale", post_scale)
        _opt_buffer(self, "post_shift", post_shift)
        self.out_channels, self.in_channels, self.kernel_size = (int(v) for v in weight.shape[:3])
        self.stride, self.padding = int(stride), int(padding)
        self.slope = _f(slope)
        self.residual = bool(residual)
        self.w_bits = self.a_bits = 32

    def forward(self, x: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        if x.dtype == torch.uint8:
            raise ConfigError(f"{self.name}: an FP32 layer received integer codes (bad fold)")
        if self.pointwise:
            y = f32_linear(x, self.weight.view(self.out_channels, self.in_channels), self.bias)
        else:
            y = f32_conv2d(x.permute(0, 3, 1, 2), self.weight, self.bias, self.stride, self.padding)
            y = y.permute(0, 2, 3, 1)
        return _epilogue(y, self.post_scale, self.post_shift, residual, self.slope, -1).contiguous()


class FloatLinear(nn.Module):
    """An FP32 linear layer (bits=32 layers in a mixed-precision model), float64 sums."""

    kind = "linear_fp32"

    def __init__(self, name: str, weight: Tensor, bias: Optional[Tensor],
                 post_scale: Optional[Tensor], post_shift: Optional[Tensor], slope: Optional[float],
                 input_hwc: Optional[Tuple[int, int, int]] = None):
        super().__init__()
        self.name = name
        self.register_buffer("weight", weight.detach().float().contiguous().clone())
        _opt_buffer(self, "bias", bias)
        _opt_buffer(self, "post_scale", post_scale)
        _opt_buffer(self, "post_shift", post_shift)
        self.out_features, self.in_features = (int(v) for v in weight.shape)
        self.slope = _f(slope)
        self.input_hwc = None if input_hwc is None else tuple(int(v) for v in input_hwc)
        self.w_bits = self.a_bits = 32

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.uint8:
            raise ConfigError(f"{self.name}: an FP32 layer received integer codes (bad fold)")
        y = f32_linear(x, self.weight, self.bias)
        return _epilogue(y, self.post_scale, self.post_shift, None, self.slope, -1)


class FloatAggregation(nn.Module):
    """FP32 graph aggregation (a bits=32 aggregation in a mixed-precision model), float64 sums."""

    kind = "bmm_fp32"

    def __init__(self, name: str):
        super().__init__()
        self.name = name
        self.a_bits = self.v_bits = self.w_bits = 32

    def forward(self, adj: Tensor, nodes: Tensor) -> Tensor:
        return torch.bmm(adj.double(), nodes.double()).float()


INTEGER_LAYER_TYPES = (IntConv2d, IntLinear, IntAggregation)
FP32_LAYER_TYPES = (FloatConv2d, FloatLinear, FloatAggregation)
LAYER_TYPES = INTEGER_LAYER_TYPES + FP32_LAYER_TYPES


# ------------------------------------------------------------------- containers

def _indexed(layers: Dict[str, nn.Module], prefix: str) -> nn.ModuleDict:
    """The layers named ``{prefix}.{i}``, as a ModuleDict keyed by ``i`` in index order."""
    found = sorted(((int(k[len(prefix) + 1:]), k) for k in layers
                    if k.startswith(prefix + ".") and k[len(prefix) + 1:].isdigit()))
    if not found:
        raise ArtifactError(f"no layers {prefix}.<i> in the integer model")
    return nn.ModuleDict([(str(i), layers[k]) for i, k in found])


def _take(layers: Dict[str, nn.Module], name: str) -> nn.Module:
    if name not in layers:
        raise ArtifactError(f"integer model has no layer {name!r}")
    return layers[name]


def _run_chain(ops, chain: nn.ModuleDict, x):
    for layer in chain.values():
        x = ops.layer(layer, x)
    return x


# The containers below describe the DPGN episode once, against the episode-op vocabulary
# ``ops`` (ops/episode_ops.py): TORCH_OPS runs it eagerly, plan.PlanBuilder records it as a
# compiled plan. Tensors carry the tasks axis first.

class IntResNetBlock(nn.Module):
    """ResNet-12 block on [T, N, H, W, C] fp32 maps: shortcut conv (+BN); conv1 -> conv2 ->
    conv3 passing codes; conv3's epilogue adds the shortcut then LeakyReLU; MaxPool(3, 2, 1)."""

    def __init__(self, layers: Dict[str, nn.Module], prefix: str):
        super().__init__()
        for part in ("conv1", "conv2", "conv3", "conv"):
            self.add_module(part, _take(layers, f"{prefix}.{part}"))

    def forward(self, x, ops=TORCH_OPS):
        residual = ops.layer(self.conv, x)
        out = ops.layer(self.conv3, ops.layer(self.conv2, ops.layer(self.conv1, x)), residual=residual)
        return ops.max_pool(out, 3, 2, 1)


class IntBackbone(nn.Module):
    """ResNet-12: images [T, N, S, S, 3] fp32 -> (last [T, N, E], second [T, N, E])."""

    def __init__(self, layers: Dict[str, nn.Module], prefix: str = "backbone"):
        super().__init__()
        self.conv1 = _take(layers, f"{prefix}.conv1")
        for i in range(1, 5):
            self.add_module(f"layer{i}", nn.ModuleList([IntResNetBlock(layers, f"{prefix}.layer{i}.0")]))
        self.layer_last = nn.ModuleList([_take(layers, f"{prefix}.layer_last.0")])
        self.layer_second = nn.ModuleList([_take(layers, f"{prefix}.layer_second.0")])

    def forward(self, x, ops=TORCH_OPS):
        x = ops.layer(self.conv1, x)
        x = self.layer1[0](x, ops)
        x = self.layer2[0](x, ops)
        inter = self.layer3[0](x, ops)
        x = self.layer4[0](inter, ops)
        last = ops.layer(self.layer_last[0], ops.mean_hw(x))
        # (h, w, C) flatten; layer_second's weight columns were permuted to match at fold time
        second = ops.layer(self.layer_second[0], ops.flatten_hwc(ops.max_pool(inter, 2, 2)))
        return last, second


class IntPointSimilarity(nn.Module):
    """``sigmoid(MLP((v_i - v_j)^2))`` over the N x N pairs + DPGN edge update; also returns
    the node similarity ``-sum (v_i - v_j)^2``."""

    def __init__(self, layers: Dict[str, nn.Module], prefix: str):
        super().__init__()
        self.point_sim_transform = _indexed(layers, f"{prefix}.point_sim_transform")

    def forward(self, nodes, prev_edge, ops=TORCH_OPS):
        pairs = ops.pairwise_sqdiff(nodes)                                   # [T, N, N, C]
        sim = ops.sigmoid(ops.squeeze_last(_run_chain(ops, self.point_sim_transform, pairs)))
        return ops.edge_update(sim, prev_edge), ops.neg_sum_last(pairs)


class IntP2D(nn.Module):
    """``V_d = LeakyReLU(Linear([E_p[:, :, :NS] || V_d]))``."""

    def __init__(self, layers: Dict[str, nn.Module], prefix: str, num_supports: int):
        super().__init__()
        self.num_supports = num_supports
        self.p2d_transform = _indexed(layers, f"{prefix}.p2d_transform")

    def forward(self, point_edge, distribution_node, ops=TORCH_OPS):
        x = ops.concat_last([(point_edge, 0, self.num_supports), distribution_node])
        return _run_chain(ops, self.p2d_transform, x)


class IntD2P(nn.Module):
    """``V_p = MLP([V_p || rownorm(E_d (1 - I)) @ V_p])`` (1x1 convs on the last dim)."""

    def __init__(self, layers: Dict[str, nn.Module], prefix: str):
        super().__init__()
        self.aggregation = _take(layers, f"{prefix}.aggregation")
        self.point_node_transform = _indexed(layers, f"{prefix}.point_node_transform")

    def forward(self, distribution_edge, point_node, ops=TORCH_OPS):
        agg = ops.aggregate(self.aggregation, ops.offdiag_l1_normalize(distribution_edge), point_node)
        return _run_chain(ops, self.point_node_transform, ops.concat_last([point_node, agg]))


class IntDPGN(nn.Module):
    """The dual graph over ``generations`` generations (same module names as models.DPGN)."""

    def __init__(self, layers: Dict[str, nn.Module], num_supports: int, generations: int,
                 prefix: str = "gnn"):
        super().__init__()
        self.generations = generations
        self.initial_edge = IntPointSimilarity(layers, f"{prefix}.initial_edge")
        for l in range(generations):
            self.add_module(f"point2distribution_generation_{l}",
                            IntP2D(layers, f"{prefix}.point2distribution_generation_{l}", num_supports))
            self.add_module(f"distribution2point_generation_{l}",
                            IntD2P(layers, f"{prefix}.distribution2point_generation_{l}"))
            self.add_module(f"point_sim_generation_{l}",
                            IntPointSimilarity(layers, f"{prefix}.point_sim_generation_{l}"))
            self.add_module(f"distribution_sim_generation_{l}",
                            IntPointSimilarity(layers, f"{prefix}.distribution_sim_generation_{l}"))

    def forward(self, middle_node, point_node, distribution_node, distribution_edge, point_edge,
                ops=TORCH_OPS):
        point_sims, node_sims, dist_sims = [], [], []
        point_edge, _ = self.initial_edge(middle_node, point_edge, ops)
        for l in range(self.generations):
            point_edge, node_sim = getattr(self, f"point_sim_generation_{l}")(point_node, point_edge, ops)
            distribution_node = getattr(self, f"point2distribution_generation_{l}")(
                point_edge, distribution_node, ops)
            distribution_edge, _ = getattr(self, f"distribution_sim_generation_{l}")(
                distribution_node, distribution_edge, ops)
            point_node = getattr(self, f"distribution2point_generation_{l}")(distribution_edge, point_node, ops)
            point_sims.append(point_edge)
            node_sims.append(node_sim)
            dist_sims.append(distribution_edge)
        return point_sims, node_sims, dist_sims


# The containers below describe the EGNN episode (models/egnn.py, Kim et al. 2019) once,
# against the same vocabulary. An EGNN graph's edges are two [T, G, M, M] tensors, the
# similarity and the dissimilarity channel (G graphs of M nodes per task: G = way query
# graphs of the supports plus one query when non-transductive, G = 1 graph of all N nodes
# when transductive).

def _named_chain(layers: Dict[str, nn.Module], prefix: str) -> nn.ModuleDict:
    """The layers ``{prefix}.conv{i}`` in index order, then ``{prefix}.conv_out`` if present,
    as a ModuleDict keyed by those names (EGNN's MLP chains, official module names)."""
    found = sorted((int(k[len(prefix) + 5:]), k) for k in layers
                   if k.startswith(prefix + ".conv") and k[len(prefix) + 5:].isdigit())
    if not found:
        raise ArtifactError(f"no layers {prefix}.conv<i> in the integer model")
    items = [(k[len(prefix) + 1:], layers[k]) for _, k in found]
    if f"{prefix}.conv_out" in layers:
        items.append(("conv_out", layers[f"{prefix}.conv_out"]))
    return nn.ModuleDict(items)


#: every EGNN encoder stage ends in MaxPool2d(2)
EGNN_POOL = 2


class IntEGNNEncoder(nn.Module):
    """EGNN's encoder: images [T, N, S, S, 3] -> embeddings [T, N, emb_dim]. Stage i: 3x3 conv
    whose epilogue applies the BatchNorm and the LeakyReLU(0.2), then MaxPool(2) (the
    official stage pools before its LeakyReLU; a monotone activation commutes with the max,
    so the values are the same); ``layer_last``: Linear + BN1d on the (h, w, C) flatten
    (its weight columns permuted at fold time)."""

    def __init__(self, layers: Dict[str, nn.Module], prefix: str = "backbone"):
        super().__init__()
        for i in range(1, 5):
            self.add_module(f"conv_{i}", nn.ModuleList([_take(layers, f"{prefix}.conv_{i}.0")]))
        self.layer_last = nn.ModuleList([_take(layers, f"{prefix}.layer_last.0")])

    def forward(self, x, ops=TORCH_OPS):
        for i in range(1, 5):
            x = ops.max_pool(ops.layer(getattr(self, f"conv_{i}")[0], x), EGNN_POOL, EGNN_POOL)
        return ops.layer(self.layer_last[0], ops.flatten_hwc(x))


class IntNodeUpdate(nn.Module):
    """``V' = MLP([V || A_sim V || A_dsim V])`` with ``A_c = rownorm_L1(E_c (1 - I))``; the
    one aggregation layer runs once per edge channel (the official single bmm over the
    stacked [2N, N] adjacency, row by row the same products)."""

    def __init__(self, layers: Dict[str, nn.Module], prefix: str):
        super().__init__()
        self.aggregation = _take(layers, f"{prefix}.aggregation")
        self.network = _named_chain(layers, f"{prefix}.network")

    def forward(self, nodes, edge_sim, edge_dsim, ops=TORCH_OPS):
        agg_sim = ops.aggregate(self.aggregation, ops.offdiag_l1_normalize(edge_sim), nodes)
        agg_dsim = ops.aggregate(self.aggregation, ops.offdiag_l1_normalize(edge_dsim), nodes)
        return _run_chain(ops, self.network, ops.concat_last([nodes, agg_sim, agg_dsim]))


class IntEdgeUpdate(nn.Module):
    """``s = sigmoid(MLP(|v_i - v_j|))`` (MLP ending in the FP32 ``conv_out``), then EGNN's
    two-channel edge update with ``(s, 1 - s)``."""

    def __init__(self, layers: Dict[str, nn.Module], prefix: str):
        super().__init__()
        self.sim_network = _named_chain(layers, f"{prefix}.sim_network")

    def forward(self, nodes, edge_sim, edge_dsim, ops=TORCH_OPS):
        pairs = ops.pairwise_absdiff(nodes)                                  # [T, G, M, M, F]
        sim = ops.sigmoid(ops.squeeze_last(_run_chain(ops, self.sim_network, pairs)))
        return ops.edge_update_2ch(sim, edge_sim, edge_dsim)


class IntEGNNGraph(nn.Module):
    """EGNN's graph over ``layers`` layers (same module names as models.egnn.GraphNetwork):
    per layer the node update then the edge update."""

    def __init__(self, layers: Dict[str, nn.Module], num_layers: int, prefix: str = "gnn"):
        super().__init__()
        self.num_layers = num_layers
        for l in range(num_layers):
            self.add_module(f"edge2node_net{l}", IntNodeUpdate(layers, f"{prefix}.edge2node_net{l}"))
            self.add_module(f"node2edge_net{l}", IntEdgeUpdate(layers, f"{prefix}.node2edge_net{l}"))

    def forward(self, nodes, edge_sim, edge_dsim, ops=TORCH_OPS):
        sims, dsims = [], []
        for l in range(self.num_layers):
            nodes = getattr(self, f"edge2node_net{l}")(nodes, edge_sim, edge_dsim, ops)
            edge_sim, edge_dsim = getattr(self, f"node2edge_net{l}")(nodes, edge_sim, edge_dsim, ops)
            sims.append(edge_sim)
            dsims.append(edge_dsim)
        return sims, dsims


@dataclass
class EGNNEpisode:
    """What the EGNN episode computes (``IntModel.episode``): logits [T, Q, way], the
    embeddings [T, N, emb_dim] and, per graph layer, the similarity / dissimilarity edges
    of every graph [T, G, M, M]; :meth:`IntModel.episode_output` turns it into the
    :class:`~qgnn_deploy.models.egnn.EGNNOutput` the float model returns."""

    logits: object
    embeddings: object
    sim_edges: List[object]
    dsim_edges: List[object]


def egnn_graph_rows(config) -> np.ndarray:
    """The embeddings' rows making each graph's nodes, [G, M]: non-transductive, query graph
    q = the supports then query q; transductive, one graph of all N nodes."""
    n, ns = config.num_nodes, config.num_supports
    if config.transductive:
        return np.arange(n).reshape(1, n)
    return np.array([list(range(ns)) + [ns + q] for q in range(config.num_queries)])


def egnn_query_rows(config) -> np.ndarray:
    """The rows of the last similarity edges [G * M, M] holding each query's edges, [Q]."""
    ns = config.num_supports
    if config.transductive:
        return np.arange(ns, config.num_nodes)
    return np.arange(config.num_queries) * (ns + 1) + ns


def egnn_graph_arrays(support_labels: np.ndarray, config) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """EGNN's label-derived episode inputs (models.egnn's initial edges): similarity and
    dissimilarity edges [T, G, M, M] and the support one-hot labels [T, NS, way], float32."""
    from .models.egnn import initial_edges, query_graph_edges
    labels = torch.from_numpy(np.asarray(support_labels, dtype=np.int64))
    t, way = labels.shape[0], config.way
    if config.transductive:
        edges = initial_edges(labels, way).unsqueeze(2)                      # [T, 2, 1, N, N]
    else:
        e = query_graph_edges(labels)                                        # [T, 2, M, M]
        edges = e.unsqueeze(2).expand(t, 2, config.num_queries, *e.shape[-2:])
    onehot = (np.asarray(support_labels)[:, :, None] == np.arange(way)).astype(np.float32)
    return (np.ascontiguousarray(edges[:, 0].numpy()), np.ascontiguousarray(edges[:, 1].numpy()), onehot)


# ------------------------------------------------------------------------ families

class _Family:
    """What an IntModel needs to know about its model family: its containers, its episode
    (written once against the episode-op vocabulary), its label-derived inputs and its
    outputs. Stateless; :data:`FAMILIES` holds one per family."""

    name = "?"
    #: episode ops the description uses beyond the DPGN vocabulary (an ``ops`` lacking one,
    #: e.g. an exporter that does not know the family, is refused with a clear error)
    extra_ops: Tuple[str, ...] = ()

    def depth(self, config) -> int:
        """Graph generations / layers of ``config``'s model."""
        raise NotImplementedError

    def build(self, model: "IntModel", layers: Dict[str, nn.Module]) -> None:
        raise NotImplementedError

    def episode(self, model: "IntModel", ops, images, graph):
        raise NotImplementedError

    def graph_inputs(self, config) -> List[Tuple[str, Tuple[int, ...]]]:
        """(name, per-task shape) of the label-derived inputs, in ``graph`` order."""
        raise NotImplementedError

    def graph_arrays(self, support_labels: np.ndarray, config) -> Tuple[np.ndarray, ...]:
        """Those inputs as float32 arrays with the tasks axis first."""
        raise NotImplementedError

    def graph(self, support_labels: Tensor, config, device) -> Tuple[Tensor, ...]:
        arrays = self.graph_arrays(support_labels.detach().cpu().numpy(), config)
        return tuple(torch.from_numpy(a).to(device) for a in arrays)

    def named_outputs(self, out) -> Dict[str, object]:
        """The episode's result as ``{name: value or list of values}`` (the plan's outputs)."""
        raise NotImplementedError

    def output(self, named: Dict[str, object], config):
        """The model's output object from :meth:`named_outputs`' dict (tensors)."""
        raise NotImplementedError


class _DPGNFamily(_Family):
    name = "dpgn"
    GRAPH_INPUTS = ("distribution_node", "point_edge", "distribution_edge", "onehot")

    def depth(self, config) -> int:
        return int(config.generations)

    def build(self, model, layers):
        model.backbone = IntBackbone(layers)
        model.gnn = IntDPGN(layers, model.config.num_supports, model.generations)

    def episode(self, model, ops, images, graph):
        dist_node, point_edge, dist_edge, onehot = graph
        last, second = model.backbone(ops.images_nhwc(images), ops)
        point_sims, node_sims, dist_sims = model.gnn(second, last, dist_node, dist_edge, point_edge, ops)
        return EpisodeOutput(ops.label_scores(point_sims[-1], onehot), point_sims, node_sims, dist_sims)

    def graph_inputs(self, config):
        n, ns = config.num_nodes, config.num_supports
        shapes = {"distribution_node": (n, ns), "point_edge": (n, n), "distribution_edge": (n, n),
                  "onehot": (ns, config.way)}
        return [(name, shapes[name]) for name in self.GRAPH_INPUTS]

    def graph_arrays(self, support_labels, config):
        return episode_graph_arrays(support_labels, config.way)

    def graph(self, support_labels, config, device):
        return episode_graph(support_labels.long(), config.way, device)

    def named_outputs(self, out):
        return {"logits": out.logits, "point_edges": list(out.point_edges),
                "node_similarities": list(out.node_similarities),
                "distribution_edges": list(out.distribution_edges)}

    def output(self, named, config):
        return EpisodeOutput(named["logits"], named["point_edges"], named["node_similarities"],
                             named["distribution_edges"])


class _EGNNFamily(_Family):
    name = "egnn"
    extra_ops = ("pairwise_absdiff", "take_rows", "edge_update_2ch")

    def depth(self, config) -> int:
        return int(config.num_layers)

    def build(self, model, layers):
        model.backbone = IntEGNNEncoder(layers)
        model.gnn = IntEGNNGraph(layers, model.generations)

    def episode(self, model, ops, images, graph):
        edge_sim, edge_dsim, onehot = graph
        cfg = model.config
        emb = model.backbone(ops.images_nhwc(images), ops)                  # [T, N, E]
        nodes = ops.take_rows(emb, egnn_graph_rows(cfg))                     # [T, G, M, E]
        sims, dsims = model.gnn(nodes, edge_sim, edge_dsim, ops)
        queries = ops.take_rows(sims[-1], egnn_query_rows(cfg))              # [T, Q, M]
        return EGNNEpisode(ops.label_scores(queries, onehot, first_row=0), emb, sims, dsims)

    @staticmethod
    def _graph_shape(config) -> Tuple[int, int]:
        if config.transductive:
            return 1, config.num_nodes
        return config.num_queries, config.num_supports + 1

    def graph_inputs(self, config):
        g, m = self._graph_shape(config)
        return [("edge_sim", (g, m, m)), ("edge_dsim", (g, m, m)), ("onehot", (config.num_supports, config.way))]

    def graph_arrays(self, support_labels, config):
        return egnn_graph_arrays(support_labels, config)

    def named_outputs(self, out):
        return {"logits": out.logits, "embeddings": out.embeddings, "sim_edges": list(out.sim_edges),
                "dsim_edges": list(out.dsim_edges)}

    def output(self, named, config):
        """models.egnn.EGNNOutput: edges per layer [T, 2, N, N] (non-transductive: assembled
        from the query graphs as the float model does, ``assemble_query_graphs``), the query
        graphs' own edges [T, Q, 2, M, M]; both built when first read."""
        from .models.egnn import EGNNOutput, assemble_query_graphs
        sims, dsims = named["sim_edges"], named["dsim_edges"]

        def graphs():
            # all layers in one stack and one assembly: a dozen torch calls per layer were 20%
            # of the cpu backend's egnn-tiny episode at T=1
            layers = len(sims)
            both = torch.stack(sims + dsims).unflatten(0, (2, layers))          # [2, L, T, G, M, M]
            per_layer = both.permute(1, 2, 3, 0, 4, 5)                           # [L, T, G, 2, M, M]
            if config.transductive:
                return list(per_layer[:, :, 0].unbind(0)), None
            flat = per_layer.flatten(0, 1)                                       # [L*T, Q, 2, M, M]
            edges = assemble_query_graphs(flat, config.num_nodes).unflatten(0, (layers, -1))
            return list(edges.unbind(0)), list(per_layer.unbind(0))
        return EGNNOutput.deferred(named["logits"], named["embeddings"], bool(config.transductive), graphs)


FAMILIES: Dict[str, _Family] = {"dpgn": _DPGNFamily(), "egnn": _EGNNFamily()}


def family_of(config) -> _Family:
    """The :class:`_Family` of a model config (DPGN's ModelConfig or models.egnn.EGNNConfig)."""
    from .models.egnn import EGNNConfig
    name = "egnn" if isinstance(config, EGNNConfig) else str(getattr(config, "family", "dpgn"))
    if name not in FAMILIES:
        raise ConfigError(f"no integer engine for model family {name!r}; known: {sorted(FAMILIES)}")
    return FAMILIES[name]



# ---------------------------------------------------------------------- IntModel

class _PlanSlot:
    """Holds an IntModel's compiled plan; copies and pickles of the model start empty
    (the native plan is rebuilt on first use)."""

    def __init__(self):
        self._plan = None

    def get(self):
        return self._plan

    def set(self, plan) -> None:
        self._plan = plan

    def __deepcopy__(self, memo):
        return _PlanSlot()

    def __getstate__(self):
        return {}

    def __setstate__(self, state):
        self._plan = None


class IntModel(nn.Module):
    """The folded integer model. ``forward(images [T, N, 3, S, S] fp32, support_labels
    int64 [T, way*shot]) -> EpisodeOutput`` (``.logits`` [T, way, way]; an EGNN model returns
    a models.egnn.EGNNOutput).

    Args:
        config: the source model's ModelConfig or EGNNConfig (layer names follow it; its type
            selects the family).
        layers: ``{qualified name: layer module}`` for every layer of the pruned model.
        generations: generations to run (default: ``config.generations``).
        zero_point: ``"exact"`` or ``"snap"`` (how the offsets were folded).
        backend: op backend (``reference``/``cpu``/``triton``) or None for the one in force.
    """

    def __init__(self, config: ModelConfig, layers: Dict[str, nn.Module],
                 generations: Optional[int] = None, zero_point: str = "exact",
                 backend: Optional[str] = None):
        super().__init__()
        self.config = config.validate()
        self._family = family_of(self.config)
        depth = self._family.depth(self.config)
        self.generations = int(depth if generations is None else generations)
        if not 1 <= self.generations <= depth:
            raise ConfigError(f"generations must be in [1, {depth}], got {self.generations}")
        if zero_point not in ("exact", "snap"):
            raise ConfigError(f"zero_point must be 'exact' or 'snap', got {zero_point!r}")
        self.zero_point = zero_point
        layers = dict(layers)
        bad = [k for k, v in layers.items() if not isinstance(v, LAYER_TYPES)]
        if bad:
            raise ConfigError(f"not integer-model layers: {bad[:5]}")
        self._family.build(self, layers)
        used = {name for name, _ in self.named_layers()}
        extra = sorted(set(layers) - used)
        if extra:
            raise ArtifactError(f"layers not part of the {self.generations}-generation model: {extra[:5]}")
        self._check_fusions()
        self._backend: Optional[str] = None
        self.backend = backend
        self._plan = _PlanSlot()

    # -- backend ------------------------------------------------------------
    @property
    def backend(self) -> Optional[str]:
        """The op backend this model runs on; None = the one in force (``use_backend``/default)."""
        return self._backend

    @backend.setter
    def backend(self, name: Optional[str]) -> None:
        from .backends import INT_MODEL_BACKENDS
        if name is not None and name not in INT_MODEL_BACKENDS:
            raise ConfigError(f"IntModel backend must be one of {list(INT_MODEL_BACKENDS)} or None, got {name!r}")
        self._backend = name

    # -- layers -------------------------------------------------------------
    def named_layers(self) -> Iterator[Tuple[str, nn.Module]]:
        """``(qualified name, layer)`` of every integer and FP32 layer, in execution order
        within each container."""
        for _, m in self.named_modules():
            if isinstance(m, LAYER_TYPES):
                yield m.name, m

    def integer_layers(self) -> Dict[str, nn.Module]:
        return {n: m for n, m in self.named_layers() if isinstance(m, INTEGER_LAYER_TYPES)}

    def fp32_layers(self) -> Dict[str, nn.Module]:
        return {n: m for n, m in self.named_layers() if isinstance(m, FP32_LAYER_TYPES)}

    def layer(self, name: str) -> nn.Module:
        for n, m in self.named_layers():
            if n == name:
                return m
        raise KeyError(name)

    def _fused_pairs(self) -> List[Tuple[nn.Module, nn.Module]]:
        pairs = []
        for blk in self.modules():
            if isinstance(blk, IntResNetBlock):
                pairs += [(blk.conv1, blk.conv2), (blk.conv2, blk.conv3)]
        for chain in self.modules():
            if isinstance(chain, nn.ModuleDict):
                seq = list(chain.values())
                pairs += list(zip(seq[:-1], seq[1:]))
        return pairs

    def _check_fusions(self) -> None:
        """A layer emitting codes must feed exactly an integer layer quantizing the same way."""
        consumers = {id(a): b for a, b in self._fused_pairs()}
        for name, m in self.named_layers():
            oq = getattr(m, "out_quant", None)
            if oq is None:
                continue
            nxt = consumers.get(id(m))
            if not isinstance(nxt, (IntConv2d, IntLinear)) or nxt.in_quant != oq:
                raise ArtifactError(
                    f"layer {name} requantizes its output to {oq}, but its consumer "
                    f"{getattr(nxt, 'name', None)} does not take codes quantized that way")

    # -- forward ------------------------------------------------------------
    def _backend_context(self):
        if self._backend is None:
            return contextlib.nullcontext()
        from .backends import op_backend_of, use_backend
        return use_backend(op_backend_of(self._backend))

    @property
    def family(self) -> str:
        """The model family: ``"dpgn"`` (ResNet-12 + DPGN) or ``"egnn"`` (models/egnn.py)."""
        return self._family.name

    @property
    def family_spec(self) -> _Family:
        return self._family

    def episode(self, ops, images, graph):
        """The episode, written once against the episode-op vocabulary ``ops``
        (ops/episode_ops.py): ``TORCH_OPS`` runs it, ``plan.PlanBuilder`` compiles it.

        images [T, N, 3, S, S]; graph: the family's label-derived inputs
        (``family_spec.graph_inputs``). DPGN: the initial (distribution_node [T, N, NS],
        point_edge [T, N, N], distribution_edge [T, N, N]) and the support one-hot labels
        [T, NS, way] (:func:`~qgnn_deploy.models.qgnn.episode_graph`); returns an
        EpisodeOutput. EGNN: the initial similarity / dissimilarity edges [T, G, M, M] and the
        one-hot labels; returns an :class:`EGNNEpisode` (:meth:`episode_output` makes the
        EGNNOutput of it)."""
        missing = [op for op in self._family.extra_ops if not hasattr(ops, op)]
        if missing:
            raise ConfigError(f"{type(ops).__name__} cannot run a {self.family} integer model: it lacks the "
                              f"episode ops {missing} (not supported for this family yet)")
        return self._family.episode(self, ops, images, graph)

    def episode_output(self, named: Dict[str, object]):
        """The model's output (EpisodeOutput / EGNNOutput) from the episode's named results."""
        return self._family.output(named, self.config)

    def compiled(self):
        """The compiled plan on the cpu executor (:class:`~qgnn_deploy.backends.cpu_plan.CpuPlan`),
        built on first use. It is a snapshot of the layers' constants: after editing a layer's
        tensors in place (or its requantization), call :meth:`recompile`; ``load_state_dict``
        and device / dtype moves discard it themselves."""
        plan = self._plan.get()
        if plan is None:
            from .backends.cpu_plan import CpuPlan
            plan = CpuPlan(self)
            self._plan.set(plan)
        return plan

    def recompile(self) -> None:
        """Discard the compiled plan; the next cpu call lowers the model again."""
        self._plan.set(None)

    def load_state_dict(self, *args, **kwargs):
        self.recompile()
        return super().load_state_dict(*args, **kwargs)

    def _apply(self, fn, *args, **kwargs):
        self.recompile()
        return super()._apply(fn, *args, **kwargs)

    @torch.no_grad()
    def profile(self, images: Tensor, support_labels: Tensor, repeats: int = 1):
        """Per-step wall times of the compiled plan on this episode batch (cpu backend):
        [{index, kind, name, ms}] in plan order, medians over ``repeats`` runs."""
        check_episode(images, support_labels, self.config)
        return self.compiled().profile(images, support_labels, repeats)

    @torch.no_grad()
    def forward(self, images: Tensor, support_labels: Tensor) -> EpisodeOutput:
        if (self._backend or current_backend()) == "cpu":
            threads = cpu_ops.wake_workers()  # the workers' wake-up overlaps the checks
            # the plan checks the values: labels once per distinct batch, NaN / Inf natively
            check_episode_shapes(images, support_labels, self.config)
            return self.compiled().run(images, support_labels, threads)
        check_episode(images, support_labels, self.config)
        graph = self._family.graph(support_labels, self.config, images.device)
        with self._backend_context():
            out = self.episode(TORCH_OPS, images, graph)
        if isinstance(out, EpisodeOutput):
            return out
        return self.episode_output(self._family.named_outputs(out))

    def extra_repr(self) -> str:
        fam = "" if self.family == "dpgn" else f"family={self.family}, "
        return (f"{fam}generations={self.generations}, zero_point={self.zero_point}, "
                f"backend={self._backend}")


__all__ = ["IntModel", "EGNNEpisode", "FAMILIES", "family_of", "IntConv2d", "IntLinear", "IntAggregation", "FloatConv2d", "FloatLinear",
           "FloatAggregation", "INTEGER_LAYER_TYPES", "FP32_LAYER_TYPES", "LAYER_TYPES"]
