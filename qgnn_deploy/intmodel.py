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

Graph pieces: a 1x1 conv over the N x N grid is ``qgnn::qconv2d`` with B=T, H=W=N;
the D2P node MLP is ``qgnn::qconv2d`` on [T, N, 1, 2E]; P2D is ``qgnn::qlinear`` on
[T*N, 2NS]; the aggregation is ``qgnn::qbmm``.
"""
from __future__ import annotations

import contextlib
from typing import Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .config import LayerBits, ModelConfig, check_node_bits
from .errors import ArtifactError, ConfigError
from .models.qgnn import EpisodeOutput, check_episode, episode_graph
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
    int64 [T, way*shot]) -> EpisodeOutput`` (``.logits`` [T, way, way]).

    Args:
        config: the source model's ModelConfig (layer names follow it).
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
        self.generations = int(config.generations if generations is None else generations)
        if not 1 <= self.generations <= config.generations:
            raise ConfigError(f"generations must be in [1, {config.generations}], got {self.generations}")
        if zero_point not in ("exact", "snap"):
            raise ConfigError(f"zero_point must be 'exact' or 'snap', got {zero_point!r}")
        self.zero_point = zero_point
        layers = dict(layers)
        bad = [k for k, v in layers.items() if not isinstance(v, LAYER_TYPES)]
        if bad:
            raise ConfigError(f"not integer-model layers: {bad[:5]}")
        self.backbone = IntBackbone(layers)
        self.gnn = IntDPGN(layers, config.num_supports, self.generations)
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

    def episode(self, ops, images, graph) -> EpisodeOutput:
        """The episode, written once against the episode-op vocabulary ``ops``
        (ops/episode_ops.py): ``TORCH_OPS`` runs it, ``plan.PlanBuilder`` compiles it.

        images [T, N, 3, S, S]; graph: DPGN's initial (distribution_node [T, N, NS],
        point_edge [T, N, N], distribution_edge [T, N, N]) and the support one-hot labels
        [T, NS, way] (:func:`~qgnn_deploy.models.qgnn.episode_graph`)."""
        dist_node, point_edge, dist_edge, onehot = graph
        last, second = self.backbone(ops.images_nhwc(images), ops)
        point_sims, node_sims, dist_sims = self.gnn(second, last, dist_node, dist_edge, point_edge, ops)
        return EpisodeOutput(ops.label_scores(point_sims[-1], onehot), point_sims, node_sims, dist_sims)

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
        check_episode(images, support_labels, self.config)
        from .backends import current_backend
        if (self._backend or current_backend()) == "cpu":
            return self.compiled().run(images, support_labels)
        graph = episode_graph(support_labels.long(), self.config.way, images.device)
        with self._backend_context():
            return self.episode(TORCH_OPS, images, graph)

    def extra_repr(self) -> str:
        return (f"generations={self.generations}, zero_point={self.zero_point}, "
                f"backend={self._backend}")


__all__ = ["IntModel", "IntConv2d", "IntLinear", "IntAggregation", "FloatConv2d", "FloatLinear",
           "FloatAggregation", "INTEGER_LAYER_TYPES", "FP32_LAYER_TYPES", "LAYER_TYPES"]
