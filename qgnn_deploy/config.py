"""Model configuration and presets.

``ModelConfig`` fixes the architecture (ResNet-12 + DPGN) and the quantization
bit-widths. ``bits`` is the default for both operands of every quantizable layer;
``layer_bits`` overrides it per layer (mixed precision, docs/mixed-precision.md) by the
layer's qualified name in the model, e.g. ``"backbone.layer2.0.conv2"`` or
``"gnn.point_sim_generation_0.point_sim_transform.0"``, or
``"gnn.distribution2point_generation_3.aggregation"`` for a graph aggregation, with a
:class:`LayerBits` pair ``(w, a)``: the weight and the input-activation bit-widths (for an
aggregation ``A @ V``: w = the adjacency ``A``, a = the node features ``V``). A bit-width of
32 means the layer runs in floating point, for both operands together.

``layer_bits`` accepts a plain ``bits`` value per layer (w = a, the form of older
checkpoints and artifacts) or ``{"w": ..., "a": ...}``; it is stored as ``LayerBits`` and
written as ``{"w": ..., "a": ...}``. Resolving a bits-config file
(:mod:`qgnn_deploy.bits_config`) lists every quantizable layer.

``node_bits`` (A2Q-style per-node aggregation bits, docs/mixed-precision.md): the bit-widths
a node's feature row entering a quantized aggregation may take, e.g. ``(2, 4, 8)``. Each
aggregation's node quantizer then runs at ``max(node_bits)`` on one learned grid, and every
node of every episode is stored at the fewest bits of the set that hold its codes after
subtracting the node's own minimum code (:func:`qgnn_deploy.ops.reference.ref_node_rows`).
Empty: one bit-width for all nodes (``LayerBits.a`` of the aggregation).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, NamedTuple, Tuple

from .errors import ConfigError

SUPPORTED_BITS = (2, 3, 4, 8, 32)
QUANT_BITS = (2, 3, 4, 8)
AGGREGATION_SUFFIX = ".aggregation"  # how graph aggregations are named (node_bits applies to them)
SUPPORTED_IMAGE_SIZES = (32, 84)


class LayerBits(NamedTuple):
    """Bit-widths of one layer: ``w`` the weight (aggregation: adjacency), ``a`` the input
    activation (aggregation: node features). Both 32 = the layer runs in FP32."""

    w: int
    a: int

    @property
    def quantized(self) -> bool:
        return self.w < 32

    def to_dict(self) -> Dict[str, int]:
        return {"w": self.w, "a": self.a}


FP32_LAYER = LayerBits(32, 32)


def check_layer_bits(bits: Any, what: str) -> LayerBits:
    """``bits`` (an int for w = a, ``{"w", "a"}`` or a LayerBits) as a valid LayerBits."""
    if isinstance(bits, dict):
        if set(bits) != {"w", "a"}:
            raise ConfigError(f"{what} must have exactly the keys 'w' and 'a', got {sorted(bits)}")
        pair = LayerBits(bits["w"], bits["a"])
    elif isinstance(bits, tuple) and len(bits) == 2:
        pair = LayerBits(*bits)
    else:
        pair = LayerBits(bits, bits)
    for key, b in zip("wa", pair):
        check_bits(b, f"{what}.{key}")
    if (pair.w == 32) != (pair.a == 32):
        raise ConfigError(f"{what}: 32 (FP32) goes for both operands together, got w={pair.w} a={pair.a}")
    return pair


class EpisodeConfig:
    """What every model family's config shares, mixed into its frozen dataclass: the
    episode (``way``, ``shot``, ``image_size``), the encoder's four ``widths``, ``dropout``
    and the quantization (``bits``, ``layer_bits``, ``weight_granularity``). Each family
    declares the fields (its own defaults), ``_what`` (the name errors give it) and its
    own checks in ``validate``, which calls :meth:`_validate_episode` first."""

    _what = "model"

    def _normalise(self, **tuples: Callable[[Any], Any]) -> None:
        """One stored form (set through ``object.__setattr__``: the dataclass is frozen) for
        ``layer_bits``, ``widths`` (a tuple of ints) and the family's ``tuples`` fields
        (``name=element type``)."""
        if not isinstance(self.layer_bits, dict):
            raise ConfigError(f"layer_bits must be a dict, got {type(self.layer_bits).__name__}")
        object.__setattr__(self, "layer_bits", {
            str(name): check_layer_bits(b, f"layer_bits[{name!r}]") for name, b in self.layer_bits.items()})
        try:
            for name, kind in {"widths": int, **tuples}.items():
                object.__setattr__(self, name, tuple(kind(v) for v in getattr(self, name)))
        except (TypeError, ValueError) as e:
            raise ConfigError(f"invalid {self._what} config: {e}") from None

    @property
    def num_supports(self) -> int:
        return self.way * self.shot

    @property
    def num_nodes(self) -> int:
        return self.way * self.shot + self.way

    @property
    def quantized(self) -> bool:
        """Whether any layer is quantized (``bits`` or an override below 32)."""
        return self.bits < 32 or any(b.quantized for b in self.layer_bits.values())

    def bits_for(self, name: str) -> LayerBits:
        """The (w, a) bit-widths of layer ``name`` (32 = FP)."""
        return self.layer_bits.get(name, LayerBits(self.bits, self.bits))

    def _validate_episode(self) -> None:
        if self.way < 2:
            raise ConfigError(f"way must be >= 2, got {self.way}")
        if self.shot < 1:
            raise ConfigError(f"shot must be >= 1, got {self.shot}")
        if self.image_size not in SUPPORTED_IMAGE_SIZES:
            raise ConfigError(
                f"image_size must be one of {SUPPORTED_IMAGE_SIZES}, got {self.image_size}")
        if len(self.widths) != 4 or any(w < 1 for w in self.widths):
            raise ConfigError(f"widths must be 4 positive ints, got {self.widths}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        check_bits(self.bits, "bits")
        if self.weight_granularity not in ("tensor", "channel"):
            raise ConfigError(
                f"weight_granularity must be 'tensor' or 'channel', got {self.weight_granularity!r}")

    def replace(self, **changes: Any):
        return dataclasses.replace(self, **changes).validate()

    def to_dict(self) -> Dict[str, Any]:
        """JSON-ready: tuples as lists, ``layer_bits`` as ``{"w", "a"}`` dicts."""
        d = dataclasses.asdict(self)
        for name, v in d.items():
            if isinstance(v, tuple):
                d[name] = list(v)
        d["layer_bits"] = {name: b.to_dict() for name, b in self.layer_bits.items()}
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]):
        if not isinstance(d, dict):
            raise ConfigError(f"{cls._what} config must be a dict, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown {cls._what} config keys: {unknown}")
        try:
            config = cls(**d)
        except (TypeError, ValueError) as e:
            if isinstance(e, ConfigError):
                raise
            raise ConfigError(f"invalid {cls._what} config: {e}") from None
        return config.validate()


@dataclass(frozen=True)
class ModelConfig(EpisodeConfig):
    """Architecture and quantization of a QGNN-IC model.

    Attributes:
        way, shot: N-way K-shot episode; the graph has ``way*shot`` support nodes and
            one query per class, ``N = way*shot + way`` nodes.
        image_size: 32 (CIFAR-FS) or 84 (miniImageNet, CUB).
        widths: ResNet-12 block widths.
        emb_dim: embedding size (point-graph node features).
        generations: number of DPGN generations.
        dropout: Dropout2d rate in every generation but the last (as DPGN).
        bits: default bit-width of weights and input activations of quantized layers.
        layer_bits: per-layer overrides ``{qualified_name: LayerBits(w, a)}`` (given as
            ints or ``{"w", "a"}`` dicts too).
        weight_granularity: ``"tensor"`` (the paper) or ``"channel"`` (per output channel).
        leaky_slope_backbone: LeakyReLU slope inside the residual blocks (0.2).
        node_bits: per-node aggregation bit-widths (ascending, from QUANT_BITS), or ``()``.
    """

    way: int = 5
    shot: int = 1
    image_size: int = 32
    widths: Tuple[int, int, int, int] = (64, 128, 256, 512)
    emb_dim: int = 128
    generations: int = 6
    dropout: float = 0.1
    bits: int = 32
    layer_bits: Dict[str, LayerBits] = field(default_factory=dict)
    weight_granularity: str = "tensor"
    leaky_slope_backbone: float = 0.2
    node_bits: Tuple[int, ...] = ()

    def __post_init__(self) -> None:
        self._normalise()
        object.__setattr__(self, "node_bits", check_node_bits(self.node_bits))

    def validate(self) -> "ModelConfig":
        self._validate_episode()
        if self.emb_dim < 1 or self.generations < 1:
            raise ConfigError("emb_dim and generations must be >= 1")
        return self

    def bits_for(self, name: str) -> LayerBits:
        """The (w, a) bit-widths of layer ``name``; a quantized aggregation's node grid is
        ``max(node_bits)`` when per-node widths are on."""
        bits = super().bits_for(name)
        if self.node_bits and bits.quantized and name.endswith(AGGREGATION_SUFFIX):
            return LayerBits(bits.w, self.node_bits[-1])
        return bits


def check_node_bits(node_bits: Any, what: str = "node_bits") -> Tuple[int, ...]:
    """``node_bits`` as an ascending tuple of distinct widths from QUANT_BITS (``()``: off)."""
    if isinstance(node_bits, str):
        try:
            node_bits = [int(v) for v in node_bits.split(",") if v.strip()]
        except ValueError:
            raise ConfigError(f"{what} must be comma-separated bit-widths like 2,4,8, got {node_bits!r}") from None
    try:
        vals = tuple(node_bits)
    except TypeError:
        raise ConfigError(f"{what} must be a list of bit-widths, got {node_bits!r}") from None
    for b in vals:
        if isinstance(b, bool) or not isinstance(b, int) or b not in QUANT_BITS:
            raise ConfigError(f"{what}: every width must be one of {QUANT_BITS}, got {b!r}")
    if len(set(vals)) != len(vals):
        raise ConfigError(f"{what} repeats a width: {list(vals)}")
    if len(vals) == 1:
        raise ConfigError(f"{what} needs at least two widths to choose from, got {list(vals)} "
                          f"(one width for all nodes is the aggregation's 'a' bits)")
    return tuple(sorted(vals))


def check_bits(bits: Any, what: str = "bits") -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in SUPPORTED_BITS:
        raise ConfigError(f"{what} must be one of {SUPPORTED_BITS}, got {bits!r}")
    return bits


PRESETS: Dict[str, ModelConfig] = {
    # Small widths for tests and the demo: seconds per training step on 2 CPU cores.
    "tiny": ModelConfig(widths=(16, 32, 64, 128), emb_dim=32, generations=2, dropout=0.1),
    # The paper's model: ResNet-12, CIFAR-FS, 5-way 1-shot, 6 generations.
    "resnet12-cifarfs": ModelConfig(),
}


DPGN_FAMILY = "dpgn"
EGNN_FAMILY = "egnn"
FAMILIES = (DPGN_FAMILY, EGNN_FAMILY)


def preset_names() -> List[str]:
    """Every preset name: the DPGN ones (:data:`PRESETS`), then the EGNN ones
    (:data:`qgnn_deploy.models.egnn.EGNN_PRESETS`)."""
    from .models.egnn import EGNN_PRESETS
    return sorted(PRESETS) + sorted(EGNN_PRESETS)


def preset_family(name: str) -> str:
    """``"dpgn"`` or ``"egnn"``: the model family of preset ``name`` (ConfigError if unknown)."""
    if name in PRESETS:
        return DPGN_FAMILY
    from .models.egnn import EGNN_PRESETS
    if name in EGNN_PRESETS:
        return EGNN_FAMILY
    raise ConfigError(f"unknown preset {name!r}; choose one of {preset_names()}")


def preset_config(name: str, bits: int = 32, **overrides: Any):
    """The configuration of preset ``name`` at ``bits`` (32 = FP model): a
    :class:`ModelConfig` for the DPGN presets (``tiny``, ``resnet12-cifarfs``), an
    :class:`~qgnn_deploy.models.egnn.EGNNConfig` for the EGNN ones (``egnn-tiny``,
    ``egnn-miniimagenet``). ``overrides`` are fields of that config class."""
    if preset_family(name) == DPGN_FAMILY:
        return PRESETS[name].replace(bits=check_bits(bits), **overrides)
    from .models.egnn import EGNN_PRESETS, EGNNConfig
    fields = {f.name for f in dataclasses.fields(EGNNConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ConfigError(f"{', '.join(unknown)} {'is not a setting' if len(unknown) == 1 else 'are not settings'} "
                          f"of the EGNN preset {name!r} (DPGN-only)")
    return EGNN_PRESETS[name].replace(bits=check_bits(bits), **overrides)


def config_family(config: Any) -> str:
    """The model family of a config or model object (``family`` attribute; DPGN's
    :class:`ModelConfig` and ``QGNNModel`` have none and are ``"dpgn"``)."""
    return str(getattr(config, "family", DPGN_FAMILY))


def config_from_dict(d: Any):
    """A config from its ``to_dict()`` form, by its ``family`` key: ``"egnn"`` ->
    :class:`~qgnn_deploy.models.egnn.EGNNConfig`; absent (every DPGN checkpoint and
    artifact) or ``"dpgn"`` -> :class:`ModelConfig`."""
    if not isinstance(d, dict):
        raise ConfigError(f"model config must be a dict, got {type(d).__name__}")
    family = d.get("family", DPGN_FAMILY)
    if family == EGNN_FAMILY:
        from .models.egnn import EGNNConfig
        return EGNNConfig.from_dict(d)
    if family == DPGN_FAMILY:
        return ModelConfig.from_dict({k: v for k, v in d.items() if k != "family"})
    raise ConfigError(f"unknown model family {family!r}; this qgnn-deploy knows {list(FAMILIES)}")
