"""Bit-FLOPs, parameters and bytes per layer, against the FP32 model (issue 8).

The counter runs the model once under a ``TorchDispatchMode`` while forward hooks keep
a stack of the modules being executed, so every aten (or ``qgnn::``) op is attributed
to the module that owns it. Nothing is inferred from the module tree alone: ops in
functional code (``torch.bmm``, ``F.leaky_relu``, the pairwise differences of the edge
MLPs, the row normalisations) are seen like any other.

Units, everywhere in this module and in every table it prints:

* **MAC**: one multiply-accumulate of a conv / linear / matmul.
* **FLOPs** = 2 x MACs (one multiply + one add). Elementwise work is counted in FLOPs
  directly (cost table :data:`ELEMENTWISE_COST`) and kept apart from the layer FLOPs.
* **Bit-FLOPs** = FLOPs x b_w x b_a (docs/bit-flops.md): FP32 layers at 32 x 32,
  the graph aggregation ``A @ V`` at b_adjacency x b_nodes (both are activations).
  ``fp32_bit_flops`` is the same layer at 32 x 32.
* **OPs (binary-net convention)** = FLOPs of the FP32 layers + Bit-FLOPs of the
  quantized layers / 64.
* Bytes: ``fp32_bytes`` = 4 x parameters; ``packed_bytes`` = packed n-bit weight codes
  (canonical layout of :mod:`qgnn_deploy.ops.packing`: rows of ceil(K/8)*b bytes) +
  fp32 weight step/offset (per tensor or per channel) + fp32 input step/offset + fp32
  bias. FP32 layers keep their fp32 bytes.

Parameters (``params``) are the model's weights: the learnable PQ ranges ``l, r`` are
reported apart as ``quantizer_params`` so the FP32 and the quantized model have the same
count (5,101,377 for ``resnet12-cifarfs``).

Ops that are neither a layer, nor elementwise work, nor pure data movement are listed
under ``uncounted`` with their owner module: nothing is dropped silently. The fake-quant
arithmetic of a QAT model (``PautaQuantizer``) simulates what the integer model does
with one ``quantize`` per activation; it is listed under ``fake_quant`` and left out of
the totals.
"""
from __future__ import annotations

import csv
import io
import math
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

FP32_BITS = 32
#: the paper's Table 6 (QGNN-IC, 4-bit ResNet-12 DPGN, CIFAR-FS 5-way 1-shot, inference)
PAPER_TABLE6 = {"fp32_params": 5.1031e6, "quant_params": 5.1032e6,
                "fp32_bit_flops": 503.9534e9, "quant_bit_flops": 1.0005e9, "bits": 4}

# ------------------------------------------------------------------ op tables

#: matmul-like aten ops: name -> MACs(args, out)
def _conv_macs(args, out) -> Optional[int]:
    weight, transposed = args[1], bool(args[6]) if len(args) > 6 else False
    if transposed:
        return None  # not used by these models; listed as uncounted rather than guessed
    return int(out.numel()) * int(weight.shape[1]) * int(math.prod(weight.shape[2:]))


def _mm_macs(a, b) -> int:
    return int(a.shape[0]) * int(a.shape[1]) * int(b.shape[1])


def _bmm_macs(a, b) -> int:
    return int(a.shape[0]) * int(a.shape[1]) * int(a.shape[2]) * int(b.shape[2])


MATMUL_OPS: Dict[str, Callable] = {
    "convolution": _conv_macs,
    "mm": lambda args, out: _mm_macs(args[0], args[1]),
    "addmm": lambda args, out: _mm_macs(args[1], args[2]),
    "bmm": lambda args, out: _bmm_macs(args[0], args[1]),
    "baddbmm": lambda args, out: _bmm_macs(args[1], args[2]),
}
#: ops whose bias / input term is an extra elementwise add per output
_BIASED = {"addmm", "baddbmm"}

#: elementwise FLOPs per output element (reductions: per input element)
ELEMENTWISE_COST: Dict[str, float] = {
    # one arithmetic op per element
    "add": 1, "sub": 1, "rsub": 1, "mul": 1, "div": 1, "neg": 1, "abs": 1, "pow": 1,
    "square": 1, "clamp": 1, "clamp_min": 1, "clamp_max": 1, "maximum": 1, "minimum": 1,
    "where": 1, "round": 1, "floor": 1, "ceil": 1, "reciprocal": 1, "sqrt": 1, "rsqrt": 1,
    "exp": 1, "log": 1, "masked_fill": 1, "eq": 1, "ne": 1, "gt": 1, "lt": 1, "ge": 1,
    "le": 1, "relu": 1, "leaky_relu": 1, "hardtanh": 1, "elu": 1, "gelu": 1, "tanh": 1,
    "nan_to_num": 1, "addcmul": 2, "addcdiv": 2, "lerp": 2,
    # sigmoid = neg, exp, add, divide
    "sigmoid": 4,
    # BatchNorm (eval): subtract mean, divide by std, scale by gamma, add beta; the
    # convention of the common per-module counters, which the paper's Table 6 uses
    "native_batch_norm": 4, "_native_batch_norm_legit_no_training": 4,
    "_native_batch_norm_legit": 4, "cudnn_batch_norm": 4, "batch_norm": 4,
    "native_layer_norm": 4,
    "_softmax": 3, "_log_softmax": 3,
}
#: reductions, FLOPs per *input* element
REDUCTION_COST: Dict[str, float] = {"sum": 1, "mean": 1, "amax": 1, "amin": 1, "max": 1,
                                    "min": 1, "linalg_vector_norm": 2, "norm": 2, "prod": 1,
                                    "aminmax": 2, "argmax": 1, "argmin": 1, "all": 1, "any": 1}
#: pooling, FLOPs per output element x kernel area
POOL_OPS = ("max_pool2d_with_indices", "max_pool2d", "avg_pool2d", "_adaptive_avg_pool2d")

#: shape, copy and creation ops: no arithmetic
DATA_MOVEMENT = frozenset("""
view _unsafe_view reshape _reshape_alias view_as permute transpose t unsqueeze squeeze expand
expand_as slice select cat stack clone contiguous _to_copy to copy copy_ detach alias lift_fresh
lift_fresh_copy empty empty_like new_empty new_empty_strided empty_strided zeros zeros_like ones
ones_like full full_like fill fill_ zero_ eye arange scatter scatter_ index index_select gather
split split_with_sizes unbind narrow as_strided _local_scalar_dense is_nonzero item repeat flatten
unflatten diagonal triu tril rand randn randint rand_like randn_like bernoulli set_ resize_
constant_pad_nd new_zeros new_ones new_full _unsafe_index unfold roll flip nonzero
masked_select _has_compatible_shallow_copy_type sym_size sym_stride sym_numel max_pool2d_backward
""".split())

#: integer op set (qgnn::*): name -> MAC count and bits from the op's own arguments
def _int_conv(args, out):
    x, w_packed, w_bits, a_bits, k = args[0], args[1], args[2], args[3], args[4]
    c = int(x.shape[3])
    macs = int(out.numel()) * k * k * c
    return macs, int(w_bits), int(a_bits), int(w_packed.shape[0]) * k * k * c


def _int_linear(args, out):
    x, w_packed, w_bits, a_bits = args[0], args[1], args[2], args[3]
    k = int(x.shape[1])
    return int(out.numel()) * k, int(w_bits), int(a_bits), int(w_packed.shape[0]) * k


def _int_bmm(args, out):
    a, v, a_bits, v_bits = args[0], args[1], args[2], args[3]
    return _bmm_macs(a, v), int(a_bits), int(v_bits), 0


INT_OPS = {"qconv2d": ("conv", _int_conv), "qlinear": ("linear", _int_linear),
           "qbmm": ("aggregation", _int_bmm)}


# ------------------------------------------------------------------ records

@dataclass
class LayerCount:
    """One conv / linear / matmul / aggregation of the model (all calls summed)."""

    name: str
    kind: str            # conv | linear | aggregation | matmul
    op: str              # the aten / qgnn op counted
    w_bits: int          # weight bits (aggregation: adjacency bits)
    a_bits: int          # input activation bits (aggregation: node-feature bits)
    calls: int = 0
    params: int = 0
    macs: int = 0        # multiply-accumulates
    flops: int = 0       # 2 x MACs
    bit_flops: int = 0   # FLOPs x w_bits x a_bits
    fp32_bit_flops: int = 0
    packed_bytes: int = 0
    fp32_bytes: int = 0
    shape: str = ""
    share: float = 0.0   # of the model's total Bit-FLOPs
    fp32_share: float = 0.0
    scale: float = 1.0   # counts were multiplied by this (per-image backbone)
    # per-node aggregation widths (ModelConfig.node_bits), measured on real episodes:
    node_bits: Optional[Dict[str, int]] = None   # {width: nodes}
    node_bits_mean: Optional[float] = None
    node_bytes: Optional[int] = None             # node features of one call at those widths
    uniform_node_bytes: Optional[int] = None     # ... at a_bits (the shared grid) for every node
    uniform_bit_flops: Optional[int] = None      # Bit-FLOPs at a_bits for every node

    @property
    def quantized(self) -> bool:
        return self.w_bits < FP32_BITS or self.a_bits < FP32_BITS

    @property
    def compression(self) -> Optional[float]:
        return self.fp32_bytes / self.packed_bytes if self.packed_bytes else None

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d.pop("scale")
        d["compression"] = self.compression
        d["bit_flops_reduction"] = (self.fp32_bit_flops / self.bit_flops) if self.bit_flops else None
        return d


@dataclass
class BitFlopReport:
    """What :func:`count_bit_flops` returns. ``to_dict()`` is the ``report --json`` schema."""

    model: str
    workload: Dict[str, Any]
    layers: List[LayerCount]
    elementwise: Dict[str, Dict[str, Any]]
    other_params: Dict[str, int]
    quantizer_params: int
    extra_bytes: Dict[str, int]
    uncounted: List[Dict[str, Any]]
    fake_quant: Dict[str, Any]
    data_movement: Dict[str, int]
    notes: List[str] = field(default_factory=list)

    # ---------------------------------------------------------------- totals
    def total(self) -> Dict[str, Any]:
        L = self.layers
        params = sum(l.params for l in L) + sum(self.other_params.values())
        other_bytes = 4 * sum(self.other_params.values())
        flops = sum(l.flops for l in L)
        bit_flops = sum(l.bit_flops for l in L)
        fp32_bit_flops = sum(l.fp32_bit_flops for l in L)
        ew = sum(v["flops"] for v in self.elementwise.values())
        fp_layer_flops = sum(l.flops for l in L if not l.quantized)
        q_bit_flops = sum(l.bit_flops for l in L if l.quantized)
        packed = sum(l.packed_bytes for l in L) + other_bytes + sum(self.extra_bytes.values())
        fp32_bytes = sum(l.fp32_bytes for l in L) + other_bytes
        return {
            "params": int(params),
            "macs": int(sum(l.macs for l in L)),
            "flops": int(flops),
            "bit_flops": int(bit_flops),
            "fp32_bit_flops": int(fp32_bit_flops),
            "bit_flops_reduction": fp32_bit_flops / bit_flops if bit_flops else None,
            "packed_bytes": int(packed),
            "fp32_bytes": int(fp32_bytes),
            "compression": fp32_bytes / packed if packed else None,
            "quantized_layers": sum(1 for l in L if l.quantized),
            "fp32_layers": sum(1 for l in L if not l.quantized),
            "quantizer_params": int(self.quantizer_params),
            "elementwise_flops": int(ew),
            # elementwise work runs in fp32 in every engine here: 32 x 32
            "bit_flops_with_elementwise": int(bit_flops + ew * FP32_BITS * FP32_BITS),
            "fp32_bit_flops_with_elementwise": int(fp32_bit_flops + ew * FP32_BITS * FP32_BITS),
            # binary-net convention: FLOPs of FP32 layers + BOPs / 64
            "ops_binary_net": fp_layer_flops + q_bit_flops / 64.0,
            "fp32_ops_binary_net": float(flops),
            "uncounted_ops": len(self.uncounted),
            **self._node_totals(),
        }

    def _node_totals(self) -> Dict[str, Any]:
        per_node = [l for l in self.layers if l.node_bits]
        if not per_node:
            return {}
        nodes = sum(sum(l.node_bits.values()) for l in per_node)
        return {"node_bits_mean": sum(int(b) * c for l in per_node for b, c in l.node_bits.items()) / nodes,
                "node_bytes": sum(l.node_bytes for l in per_node),
                "uniform_node_bytes": sum(l.uniform_node_bytes for l in per_node),
                "uniform_bit_flops": int(sum((l.uniform_bit_flops or l.bit_flops) for l in self.layers))}

    def to_dict(self) -> Dict[str, Any]:
        return {
            "model": self.model,
            "workload": dict(self.workload),
            "units": UNITS,
            "layers": [l.to_dict() for l in self.layers],
            "total": self.total(),
            "elementwise": {k: dict(v) for k, v in self.elementwise.items()},
            "other_params": dict(self.other_params),
            "uncounted": list(self.uncounted),
            "fake_quant": dict(self.fake_quant),
            "data_movement": dict(self.data_movement),
            "notes": list(self.notes),
        }

    # ---------------------------------------------------------------- tables
    def to_markdown(self) -> str:
        return render_markdown(self.to_dict())

    def to_csv(self) -> str:
        return render_csv(self.to_dict())


UNITS = {
    "macs": "multiply-accumulates",
    "flops": "floating-point operations = 2 x MACs (layers); elementwise work in FLOPs per its cost table",
    "bit_flops": "FLOPs x b_w x b_a (FP32 layers at 32 x 32; aggregation: b_adjacency x b_nodes)",
    "fp32_bit_flops": "FLOPs x 32 x 32",
    "ops_binary_net": "FLOPs of FP32 layers + Bit-FLOPs of quantized layers / 64",
    "packed_bytes": "bytes: packed weight codes + fp32 steps/offsets + fp32 bias (+ fp32 BN, FP32 layers)",
    "fp32_bytes": "bytes: 4 x parameters",
}


# ------------------------------------------------------------------ the counter

def _layer_bits(module: nn.Module) -> Tuple[int, int]:
    """(w_bits, a_bits) of a float / fake-quant layer."""
    if hasattr(module, "v_bits"):  # integer-model aggregation: adjacency x node bits
        return int(module.a_bits), int(module.v_bits)
    if hasattr(module, "w_bits"):  # integer-model layers
        return int(module.w_bits), int(module.a_bits)
    bits = getattr(module, "bits", None)  # fake-quant layers: LayerBits (w | adjacency, a | nodes)
    if bits is None:
        return FP32_BITS, FP32_BITS
    return int(bits.w), int(bits.a)


def _is_quantizer(module: nn.Module) -> bool:
    return type(module).__name__ in ("PautaQuantizer",) or hasattr(module, "initialize") and hasattr(module, "codes")


def _first_tensor(x):
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, (tuple, list)):
        for y in x:
            t = _first_tensor(y)
            if t is not None:
                return t
    return None


def _float_layer_bytes(module: nn.Module, w_bits: int, a_bits: int) -> Tuple[int, int, int]:
    """(params, packed_bytes, fp32_bytes) of a float / fake-quant conv or linear."""
    from .ops.packing import packed_row_bytes
    weight = getattr(module, "weight", None)
    bias = getattr(module, "bias", None)
    if not isinstance(weight, torch.Tensor):
        return 0, 0, 0
    n_w = int(weight.numel())
    n_b = int(bias.numel()) if isinstance(bias, torch.Tensor) else 0
    fp32_bytes = 4 * (n_w + n_b)
    if w_bits >= FP32_BITS:
        return n_w + n_b, fp32_bytes, fp32_bytes
    o = int(weight.shape[0])
    k = n_w // o
    ranges = 8 * o                               # fp32 step + offset per row, as folded
    act_ranges = 8 if a_bits < FP32_BITS else 0  # input quantizer step + offset
    packed = o * packed_row_bytes(k, w_bits) + ranges + act_ranges + 4 * n_b
    return n_w + n_b, packed, fp32_bytes


def _tensor_bytes(*ts) -> int:
    return sum(int(t.numel()) * t.element_size() for t in ts if isinstance(t, torch.Tensor))


class BitFlopCounter(TorchDispatchMode):
    """Count what a model executes, op by op, attributed to the owning module.

    ``with BitFlopCounter(model) as c: model(...)`` then ``c.report()``. Several calls
    (e.g. the backbone on one image, then the graph on one task) add up.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self._names = {id(m): n for n, m in model.named_modules()}
        self._stack: List[nn.Module] = []
        self._handles: list = []
        self.layers: "OrderedDict[str, LayerCount]" = OrderedDict()
        self._layer_module: Dict[str, nn.Module] = {}
        # (category, op, owner module) -> [flops, elements, calls]
        self._ew: "OrderedDict[Tuple[str, str, str], List[int]]" = OrderedDict()
        self.uncounted: "OrderedDict[Tuple[str, str], Dict[str, Any]]" = OrderedDict()
        self.fake_quant = {"calls": 0, "elements": 0, "flops": 0}
        self.data_movement: Dict[str, int] = {}
        self.extra_bytes: Dict[str, int] = {}

    # ------------------------------------------------------------- hooks
    def __enter__(self):
        for m in self.model.modules():
            self._handles.append(m.register_forward_pre_hook(self._push))
            self._handles.append(m.register_forward_hook(self._pop, always_call=True))
        return super().__enter__()

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        return super().__exit__(*exc)

    def _push(self, module, args):
        self._stack.append(module)

    def _pop(self, module, args, out):
        if self._stack and self._stack[-1] is module:
            self._stack.pop()

    def _name(self, m: Optional[nn.Module]) -> str:
        return self._names.get(id(m), "?") if m is not None else ""

    # ------------------------------------------------------------- dispatch
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        try:
            self._count(func, args, kwargs, out)
        except Exception as e:  # noqa: BLE001 - a counting bug must not break inference
            self._uncounted(func, f"counter error: {type(e).__name__}: {e}", out)
        return out

    def _count(self, func, args, kwargs, out) -> None:
        ns = getattr(func, "namespace", "aten")
        op = func.overloadpacket.__name__
        base = op[:-1] if op.endswith("_") and not op.startswith("_") else op
        inner = self._stack[-1] if self._stack else None
        if ns == "qgnn":
            self._count_int_op(op, args, out)
            return
        if inner is not None and _is_quantizer(inner) and base not in DATA_MOVEMENT:
            t = _first_tensor(out)
            n = int(t.numel()) if t is not None else 0
            self.fake_quant["calls"] += 1
            self.fake_quant["elements"] += n
            self.fake_quant["flops"] += int(n * ELEMENTWISE_COST.get(base, REDUCTION_COST.get(base, 1)))
            return
        if base in MATMUL_OPS:
            macs = MATMUL_OPS[base](args, out)
            if macs is None:
                self._uncounted(func, "unsupported variant", out)
                return
            self._add_matmul(base, macs, args, out)
            return
        if base in DATA_MOVEMENT:
            self.data_movement[base] = self.data_movement.get(base, 0) + 1
            return
        if base in POOL_OPS:
            t = _first_tensor(out)
            ks = args[1] if len(args) > 1 else None
            area = int(math.prod(ks)) if isinstance(ks, (list, tuple)) else (int(ks) ** 2 if ks else 1)
            if base == "_adaptive_avg_pool2d":
                area = max(1, int(args[0].numel()) // max(1, int(t.numel())))
            if isinstance(ks, (list, tuple)) and len(ks) == 1:
                area = int(ks[0]) ** 2
            self._add_elementwise("pooling", base, int(t.numel()), int(t.numel()) * area)
            return
        if base in REDUCTION_COST:
            x = _first_tensor(args)
            n = int(x.numel()) if x is not None else 0
            self._add_elementwise(self._category(base, inner), base, n, int(n * REDUCTION_COST[base]))
            return
        if base in ELEMENTWISE_COST:
            if "batch_norm" in base or "layer_norm" in base:
                t = _first_tensor(args)  # work is per input element
            else:
                t = _first_tensor(out)
            n = int(t.numel()) if t is not None else 0
            self._add_elementwise(self._category(base, inner), base, n, int(n * ELEMENTWISE_COST[base]))
            return
        self._uncounted(func, "no cost rule", out)

    def _category(self, op: str, inner: Optional[nn.Module]) -> str:
        owner = type(inner).__name__ if inner is not None else ""
        if "batch_norm" in op or "layer_norm" in op:
            return "batch_norm"
        if op in ("leaky_relu", "relu", "hardtanh", "elu", "gelu", "tanh"):
            return "activation"
        if op == "sigmoid":
            return "sigmoid"
        if op == "mean" and ("ResNet" in owner or "Backbone" in owner):
            return "pooling"  # global average pool
        if "PointSimilarity" in owner and op in ("sub", "pow"):
            return "pairwise_difference"
        if "EdgeUpdateNetwork" in owner and op in ("sub", "abs"):
            return "pairwise_difference"  # EGNN: |v_i - v_j|
        if "PointSimilarity" in owner or "D2P" in owner:
            return "normalization"
        if "NodeUpdateNetwork" in owner or "EdgeUpdateNetwork" in owner:
            return "normalization"  # EGNN: masked L1 row norms, the edge update
        if "Block" in owner and op == "add":
            return "residual_add"
        if inner is not None and hasattr(inner, "w_bits"):
            return "epilogue"  # fp32 epilogue of an integer-model FP32 layer
        if inner is self.model:
            return "model_glue"  # input checks, initial graph, episode logits
        return "other"

    def _add_elementwise(self, category: str, op: str, elements: int, flops: int) -> None:
        owner = self._name(self._stack[-1]) if self._stack else ""
        d = self._ew.setdefault((category, op, owner), [0, 0, 0])
        d[0] += int(flops)
        d[1] += int(elements)
        d[2] += 1

    def elementwise(self, scale: Optional[Callable[[str], float]] = None) -> Dict[str, Dict[str, Any]]:
        """Elementwise work by category: flops, elements, calls and flops per op."""
        out: Dict[str, Dict[str, Any]] = OrderedDict()
        for (cat, op, owner), (flops, elems, calls) in self._ew.items():
            f = scale(owner) if scale is not None else 1.0
            d = out.setdefault(cat, {"flops": 0, "elements": 0, "calls": 0, "ops": {}})
            d["flops"] += _scaled(flops, f)
            d["elements"] += _scaled(elems, f)
            d["calls"] += calls
            d["ops"][op] = d["ops"].get(op, 0) + _scaled(flops, f)
        return out

    def _uncounted(self, func, why: str, out) -> None:
        inner = self._stack[-1] if self._stack else None
        key = (str(func), self._name(inner))
        t = _first_tensor(out)
        d = self.uncounted.setdefault(key, {"op": str(func), "module": self._name(inner) or "(top level)",
                                            "reason": why, "calls": 0, "output_elements": 0})
        d["calls"] += 1
        d["output_elements"] += int(t.numel()) if t is not None else 0

    def _owner_layer(self) -> Tuple[Optional[nn.Module], str]:
        """Innermost module on the stack that is a layer (has weights or bits)."""
        for m in reversed(self._stack):
            if hasattr(m, "bits") or hasattr(m, "w_bits") or isinstance(m, (nn.Conv2d, nn.Linear)):
                return m, self._name(m)
        inner = self._stack[-1] if self._stack else None
        return None, self._name(inner)

    def _add_matmul(self, op: str, macs: int, args, out) -> None:
        module, name = self._owner_layer()
        if module is None:
            # a matmul in functional code of a container (e.g. the episode logits): FP32
            key = f"{name or '(model)'}:{op}"
            w_bits = a_bits = FP32_BITS
            kind = "matmul"
        else:
            key = name
            w_bits, a_bits = _layer_bits(module)
            mkind = str(getattr(module, "kind", ""))
            kind = ("conv" if isinstance(module, nn.Conv2d) or mkind.startswith("conv") else "linear"
                    if isinstance(module, nn.Linear) or mkind.startswith("linear")
                    else "aggregation" if op in ("bmm", "baddbmm") else "matmul")
        rec = self.layers.get(key)
        if rec is None:
            rec = LayerCount(key, kind, f"aten.{op}", w_bits, a_bits)
            if module is not None:
                rec.params, rec.packed_bytes, rec.fp32_bytes = _float_layer_bytes(module, w_bits, a_bits)
                if kind == "aggregation" and w_bits < FP32_BITS:
                    rec.packed_bytes = 16  # fp32 step + offset of both operand quantizers
                rec.shape = _shape_str(module, args, op)
            else:
                rec.shape = " x ".join(str(tuple(a.shape)) for a in args if isinstance(a, torch.Tensor))
            self.layers[key] = rec
        rec.calls += 1
        rec.macs += macs
        if op == "convolution" and len(args) > 2 and isinstance(args[2], torch.Tensor):
            self._add_elementwise("bias", "bias_add", int(out.numel()), int(out.numel()))
        elif op in _BIASED:
            self._add_elementwise("bias", "bias_add", int(out.numel()), int(out.numel()))

    def _count_int_op(self, op: str, args, out) -> None:
        inner = self._stack[-1] if self._stack else None
        name = self._name(inner) or "(model)"
        t = _first_tensor(out)
        if op == "quantize":
            n = int(t.numel())
            self._add_elementwise("quantize", "qgnn.quantize", n, 3 * n)  # sub, div, round (+clamp)
            return
        if op in ("pack", "unpack"):
            self.data_movement[f"qgnn.{op}"] = self.data_movement.get(f"qgnn.{op}", 0) + 1
            return
        if op not in INT_OPS:
            self._uncounted(getattr(torch.ops.qgnn, op).default, "unknown integer op", out)
            return
        kind, fn = INT_OPS[op]
        macs, w_bits, a_bits, n_weights = fn(args, out)
        rec = self.layers.get(name)
        if rec is None:
            rec = LayerCount(name, kind, f"qgnn.{op}", w_bits, a_bits)
            if kind == "aggregation":
                rec.packed_bytes = 16
                rec.shape = f"{tuple(args[0].shape)} @ {tuple(args[1].shape)}"
            else:
                # packed codes + fp32 weight step/offset + fp32 input step/offset; the
                # post_scale/post_shift (folded BN and bias) are "other params" (fp32)
                w_packed, w_scale, w_offset = args[1], args[7 if op == "qconv2d" else 4], args[8 if op == "qconv2d" else 5]
                rec.params = n_weights
                rec.packed_bytes = _tensor_bytes(w_packed, w_scale, w_offset) + 8
                rec.fp32_bytes = 4 * n_weights
                rec.shape = (f"k{args[4]} s{args[5]} p{args[6]} {tuple(args[0].shape)} -> {tuple(t.shape)}"
                             if op == "qconv2d" else f"{tuple(args[0].shape)} -> {tuple(t.shape)}")
            self.layers[name] = rec
        rec.calls += 1
        rec.macs += macs
        # fused fp32 epilogue: 4 offset terms (7 FLOPs) + optional BN/bias, residual, activation,
        # requantization; counted as elementwise work next to the layer
        n = int(t.numel())
        extra = 7
        if op != "qbmm":
            post_at = 11 if op == "qconv2d" else 8
            tail = list(args[post_at:]) + [None] * 8
            extra += sum(1 for a in tail[:2] if a is not None)        # post_scale, post_shift
            extra += 1 if tail[2] is not None else 0                   # residual
            extra += 2 if tail[3] is not None else 0                   # LeakyReLU
            extra += 3 if tail[5] is not None else 0                   # requantize
        self._add_elementwise("epilogue", f"qgnn.{op}", n, n * extra)

    # ------------------------------------------------------------- result
    def report(self, model_label: str = "", workload: Optional[Dict[str, Any]] = None,
               scale: Optional[Callable[[str], float]] = None) -> BitFlopReport:
        layers = list(self.layers.values())
        if scale is not None:
            for l in layers:
                f = scale(l.name)
                if f != 1.0:
                    l.scale = f
                    l.macs = _scaled(l.macs, f)
        for l in layers:
            l.flops = 2 * l.macs
            l.bit_flops = l.flops * l.w_bits * l.a_bits
            l.fp32_bit_flops = l.flops * FP32_BITS * FP32_BITS
            if l.node_bits_mean is not None:
                # node j's products at its own width; the row offsets add one [N, N] x [N, 1]
                # product per task at the shared grid's width (qbmm's correction)
                nodes = _node_rows_per_call(l)
                l.uniform_bit_flops = l.bit_flops
                l.bit_flops = int(round(l.flops * l.w_bits * l.node_bits_mean
                                        + 2 * l.calls * nodes * nodes * l.w_bits * l.a_bits))
        tb = sum(l.bit_flops for l in layers) or 1
        tf = sum(l.fp32_bit_flops for l in layers) or 1
        for l in layers:
            l.share = l.bit_flops / tb
            l.fp32_share = l.fp32_bit_flops / tf
        in_layers = {id(self._layer_module_for(l.name)) for l in layers}
        other, qparams = _other_params(self.model, in_layers)
        return BitFlopReport(
            model=model_label or type(self.model).__name__, workload=dict(workload or {}),
            layers=layers, elementwise=self.elementwise(scale), other_params=other,
            quantizer_params=qparams, extra_bytes=dict(self.extra_bytes),
            uncounted=list(self.uncounted.values()), fake_quant=dict(self.fake_quant),
            data_movement=dict(sorted(self.data_movement.items())))

    def _layer_module_for(self, name: str):
        for n, m in self.model.named_modules():
            if n == name:
                return m
        return None


def _node_rows_per_call(l: LayerCount) -> int:
    """N of an aggregation's [T, N, N] adjacency (from its recorded shape)."""
    return int(l.shape.split("(")[1].split(",")[1])


def measure_node_widths(model: nn.Module, episodes: int = 20, seed: int = 0) -> Dict[str, Dict[int, int]]:
    """``{aggregation: {width: nodes}}`` of the per-node widths on ``episodes`` synthetic
    test episodes (the widths depend on the data, unlike the other counts); {} without
    per-node aggregations."""
    layers = {n: m for n, m in model.named_modules() if getattr(m, "node_bits", ())}
    if not layers:
        return {}
    from .data import episode_batches
    was_training = model.training
    model.eval()
    for m in layers.values():
        m.node_stats = {}
    prev = getattr(model, "backend", None)
    if hasattr(model, "compiled"):  # the compiled plan keeps no statistics: run module by module
        from .backends import is_backend_available
        model.backend = "cpu-eager" if is_backend_available("cpu") else "reference"
    try:
        with torch.no_grad():
            for images, labels, _ in episode_batches(model.config, episodes, seed=seed, split="test",
                                                     tasks_per_batch=min(10, episodes)):
                model(images, labels)
        return {getattr(m, "name", n) or n: dict(sorted(m.node_stats.items())) for n, m in layers.items()}
    finally:
        for m in layers.values():
            m.node_stats = None
        if hasattr(model, "compiled"):
            model.backend = prev
        model.train(was_training)


def _scaled(v: int, f: float) -> int:
    x = v * f
    return int(round(x))


def _shape_str(module: nn.Module, args, op: str) -> str:
    if op == "convolution":
        w = args[1]
        return (f"{w.shape[1]}->{w.shape[0]} k{w.shape[-1]} s{args[3][0]} p{args[4][0]} "
                f"on {tuple(args[0].shape[-2:])}")
    if isinstance(module, nn.Conv2d):
        x = args[0]
        return (f"{module.in_channels}->{module.out_channels} k{module.kernel_size[0]} "
                f"s{module.stride[0]} p{module.padding[0]} on {tuple(x.shape[-2:])}")
    if isinstance(module, nn.Linear):
        return f"{module.in_features}->{module.out_features}"
    return " @ ".join(str(tuple(a.shape)) for a in args if isinstance(a, torch.Tensor))


def _other_params(model: nn.Module, layer_ids) -> Tuple[Dict[str, int], int]:
    """Parameters outside the counted layers, by module type; and the PQ range count."""
    other: Dict[str, int] = {}
    qparams = 0
    for m in model.modules():
        # integer model: BatchNorm and bias live on as fp32 post_scale / post_shift buffers
        folded = [b for n, b in m.named_buffers(recurse=False)
                  if n in ("post_scale", "post_shift") and b is not None]
        if folded:
            other["folded_batch_norm_bias"] = other.get("folded_batch_norm_bias", 0) + sum(
                int(b.numel()) for b in folded)
        own = list(m.parameters(recurse=False))
        if not own:
            continue
        n = sum(int(p.numel()) for p in own)
        if _is_quantizer(m):
            qparams += n
        elif id(m) in layer_ids:
            continue
        else:
            key = "batch_norm" if isinstance(m, nn.modules.batchnorm._BatchNorm) else type(m).__name__
            other[key] = other.get(key, 0) + n
    return other, qparams


# ------------------------------------------------------------------ public API

def _is_qgnn_model(model) -> bool:
    return hasattr(model, "config") and hasattr(model, "backbone") and hasattr(model, "gnn")


def default_episode(config, tasks: int = 1, seed: int = 0):
    """A random episode batch (counts do not depend on the values): images [T, N, 3, S, S],
    support labels [T, way*shot] with every class present."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(tasks, config.num_nodes, 3, config.image_size, config.image_size, generator=g)
    labels = torch.arange(config.way).repeat_interleave(config.shot).repeat(tasks, 1)
    return images, labels.long()


def count_bit_flops(model: nn.Module, images: Optional[torch.Tensor] = None,
                    support_labels: Optional[torch.Tensor] = None, *, tasks: int = 1,
                    per_image_backbone: bool = False, label: str = "",
                    node_episodes: int = 20) -> BitFlopReport:
    """Run ``model`` once on an episode batch and count it (see the module docstring).

    Args:
        model: a :class:`~qgnn_deploy.models.QGNNModel` (FP32 or fake-quant; bits from each
            layer's ``.bits`` pair) or an IntModel (bits from the ``qgnn::`` ops' arguments).
        images, support_labels: the episode; default a random batch of ``tasks`` tasks.
        per_image_backbone: count the backbone for ONE image (rows under ``backbone``
            divided by the images per batch, exact since the backbone is per image) next to
            the graph of ONE task: the workload of the paper's Table 6 (needs ``tasks == 1``).
        node_episodes: synthetic test episodes on which per-node aggregation widths are
            measured (models with ``config.node_bits``); their mean width enters Bit-FLOPs.
    Returns: a :class:`BitFlopReport`; ``.to_dict()`` is the ``report --json`` object.
    """
    config = getattr(model, "config", None)
    if images is None:
        if config is None:
            raise ValueError("count_bit_flops needs images/support_labels for a model without .config")
        images, support_labels = default_episode(config, tasks)
    t, n = int(images.shape[0]), int(images.shape[1])
    if per_image_backbone and t != 1:
        raise ValueError("per_image_backbone counts one graph task: pass a single-task batch")
    was_training = model.training
    model.eval()
    counter = BitFlopCounter(model)
    # the counter sees torch and qgnn:: ops; an IntModel's compiled plan (backend cpu) runs
    # natively in one call, so count its module path, which executes the same layers
    plan_backend = getattr(model, "backend", None) in ("cpu", None) and hasattr(model, "compiled")
    prev = getattr(model, "backend", None)
    try:
        if plan_backend:
            from .backends import is_backend_available
            model.backend = "cpu-eager" if is_backend_available("cpu") else "reference"
        with torch.no_grad(), counter:
            model(images, support_labels)
    finally:
        model.train(was_training)
        if plan_backend:
            model.backend = prev
    scale = None
    workload = {"tasks": t, "nodes_per_task": n, "images": t * n,
                "image_size": int(images.shape[-1]),
                "description": f"{t} task(s) x {n} images of {images.shape[-1]} px + graph"}
    graph = f"{n} nodes"
    if config is not None and getattr(config, "family", "dpgn") == "egnn":
        if config.transductive:
            graph = f"{n} nodes (EGNN, transductive: one graph)"
        else:
            graph = (f"{n} nodes (EGNN, non-transductive: {config.num_queries} query graphs of "
                     f"{config.num_supports + 1} nodes)")
        workload["transductive"] = bool(config.transductive)
        workload["description"] = f"{t} task(s) x {n} images of {images.shape[-1]} px + graph of {graph}"
    if per_image_backbone:
        scale = lambda name: (1.0 / n) if name.startswith("backbone") else 1.0  # noqa: E731
        workload.update(images=1, description=f"1 image of {images.shape[-1]} px through the backbone "
                        f"+ 1 graph task of {graph} (the paper's Table 6 workload)")
    widths = measure_node_widths(model, node_episodes) if node_episodes else {}
    for name, hist in widths.items():
        rec = counter.layers.get(name)
        if rec is None or not hist:
            continue
        nodes = sum(hist.values())
        d = int(rec.shape.rsplit(",", 1)[1].strip(" )"))   # node features per node
        rec.node_bits = {str(b): c for b, c in hist.items()}
        rec.node_bits_mean = sum(b * c for b, c in hist.items()) / nodes
        per_call = nodes / node_episodes  # nodes of one task
        rec.node_bytes = int(round(per_call * (d * rec.node_bits_mean / 8 + 2)))  # + width and offset bytes
        rec.uniform_node_bytes = int(round(per_call * d * rec.a_bits / 8))
    rep = counter.report(label or _model_label(model), workload, scale)
    if rep.uncounted:
        rep.notes.append(f"{len(rep.uncounted)} op kind(s) have no cost rule and are listed under "
                         "'uncounted' (not in the totals)")
    if rep.fake_quant["calls"]:
        rep.notes.append("fake-quant arithmetic of the QAT model (PautaQuantizer) is listed under "
                         "'fake_quant' and excluded: the integer model replaces it by one quantize per input")
    return rep


def _model_label(model) -> str:
    cfg = getattr(model, "config", None)
    if cfg is None:
        return type(model).__name__
    pairs = {(int(cfg.bits), int(cfg.bits)), *getattr(cfg, "layer_bits", {}).values()}
    if all(w == a for w, a in pairs):
        return f"{type(model).__name__} bits={'/'.join(str(w) for w, _ in sorted(pairs))}"
    return f"{type(model).__name__} bits={'/'.join(f'w{w}a{a}' for w, a in sorted(pairs))}"


# ------------------------------------------------------------------ paper comparison

PAPER_4BIT_NOTE = (
    "the paper's 1.0005 G is 1/504 of its FP32 figure, but FLOPs x b_w x b_a at 4x4 bits "
    "can cut at most 32*32/(4*4) = 64x (503.95 G / 64 = 7.87 G), less with the FP32 stem conv, "
    "edge-MLP ends and BatchNorm; no standard formula gives 504x, so the figure cannot be reproduced")

PAPER_COUNT_NOTE = (
    "the paper's FP32 figure is 2 x 32 x 32 x (conv/linear MACs without bias + 4 ops per "
    "BatchNorm element (subtract mean, divide by std, scale, shift), eval mode) for ONE 32 px "
    "image through the backbone + ONE 10-node, 6-generation graph task; the BatchNorm ops are "
    "doubled along with the MACs. This is what the common per-module counters report "
    "(thop >= 0.1: conv/linear MACs without bias, affine BatchNorm 4 ops per element, "
    "activations, pooling, bmm and functional code 0). Counting BatchNorm at 2 ops per element "
    "gives 500.44 G (-0.7%), outside 0.1%.")

PAPER_PARAMS_NOTE = (
    "ours counts the weights of the DPGN ResNet-12 + graph exactly as the official code "
    "builds them (backbone 4,040,768 + graph 1,060,609); the paper's 5.1031 M FP32 / 5.1032 M "
    "4-bit is ~1.7 k (0.03%) more, which no module of the published architecture accounts for "
    "(the paper gives no breakdown); its +0.0001 M at 4 bits matches learnable PQ ranges, of "
    "which our model has {qp} (2 per quantizer)")


def is_paper_model(config) -> bool:
    """The configuration of the paper's Table 6 (resnet12-cifarfs)."""
    if config is None or getattr(config, "family", "dpgn") != "dpgn":
        return False  # EGNN: the paper's Table 6 is the DPGN model's
    return (tuple(config.widths) == (64, 128, 256, 512) and config.image_size == 32
            and config.way == 5 and config.shot == 1 and config.generations == 6
            and config.emb_dim == 128)


def paper_convention_count(rep: BitFlopReport) -> Dict[str, int]:
    """The Table 6 counting on a per-image-backbone report: MACs and BatchNorm ops."""
    bn = rep.elementwise.get("batch_norm", {}).get("flops", 0)
    # module counters see conv / linear modules only: bmm in functional code is not counted
    mods = [l for l in rep.layers if l.kind in ("conv", "linear")]
    macs = sum(l.macs for l in mods)
    q_macs_bits = sum(l.macs * l.w_bits * l.a_bits for l in mods)
    return {"macs": int(macs), "batch_norm_ops": int(bn), "count": int(macs + bn),
            "not_counted_by_module_counters_macs": int(sum(l.macs for l in rep.layers) - macs),
            "fp32_bit_flops": int(2 * FP32_BITS * FP32_BITS * (macs + bn)),
            "bit_flops": int(2 * (q_macs_bits + FP32_BITS * FP32_BITS * bn))}


def paper_comparison(rep: BitFlopReport) -> Dict[str, Any]:
    """Our figures next to the paper's Table 6. ``rep`` must be a per-image-backbone
    count (``count_bit_flops(..., per_image_backbone=True)``) of the paper's model."""
    if rep.workload.get("images") != 1:
        raise ValueError("paper_comparison needs the per-image-backbone workload (images == 1)")
    tot = rep.total()
    pc = paper_convention_count(rep)
    p = PAPER_TABLE6
    qbits = sorted({(l.w_bits, l.a_bits) for l in rep.layers if l.quantized})
    rel = lambda ours, paper: (ours - paper) / paper  # noqa: E731
    rows = [
        {"quantity": "params, FP32 model", "unit": "parameters", "paper": p["fp32_params"],
         "ours": tot["params"], "rel_diff": rel(tot["params"], p["fp32_params"])},
        {"quantity": "params, quantized model (+ PQ ranges)", "unit": "parameters",
         "paper": p["quant_params"], "ours": tot["params"] + tot["quantizer_params"],
         "rel_diff": rel(tot["params"] + tot["quantizer_params"], p["quant_params"])},
        {"quantity": "FP32 Bit-FLOPs, paper convention 2x32x32x(MACs + BN ops)", "unit": "Bit-FLOPs",
         "paper": p["fp32_bit_flops"], "ours": pc["fp32_bit_flops"],
         "rel_diff": rel(pc["fp32_bit_flops"], p["fp32_bit_flops"])},
        {"quantity": "FP32 Bit-FLOPs, layers only (FLOPs x 32 x 32)", "unit": "Bit-FLOPs",
         "paper": None, "ours": tot["fp32_bit_flops"], "rel_diff": None},
    ]
    qrows = [
        {"quantity": "quantized Bit-FLOPs, FLOPs x b_w x b_a (layers)", "unit": "Bit-FLOPs",
         "paper": p["quant_bit_flops"], "ours": tot["bit_flops"],
         "rel_diff": rel(tot["bit_flops"], p["quant_bit_flops"])},
        {"quantity": "quantized Bit-FLOPs, paper convention (BN at 32x32)", "unit": "Bit-FLOPs",
         "paper": p["quant_bit_flops"], "ours": pc["bit_flops"],
         "rel_diff": rel(pc["bit_flops"], p["quant_bit_flops"])},
    ]
    rows += qrows if qbits else []
    rows += [
        {"quantity": "OPs, binary-net convention FLOPs_fp + BOPs/64", "unit": "OPs",
         "paper": None, "ours": tot["ops_binary_net"], "rel_diff": None,
         "fp32": tot["fp32_ops_binary_net"]},
    ]
    return {"rows": rows, "paper_count": pc, "quantized_bits": [list(b) for b in qbits],
            "fp32_match_within_0.1pct": abs(rel(pc["fp32_bit_flops"], p["fp32_bit_flops"])) <= 1e-3,
            "notes": {"fp32_bit_flops": PAPER_COUNT_NOTE, "quant_bit_flops": PAPER_4BIT_NOTE,
                      "params": PAPER_PARAMS_NOTE.format(qp=tot["quantizer_params"])}}


# ------------------------------------------------------------------ rendering

def human(x: Optional[float], unit: str = "") -> str:
    """1234567 -> '1.235 M' (SI, 1000-based)."""
    if x is None:
        return "-"
    x = float(x)
    for f, s in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= f:
            return f"{x / f:.4g} {s}{unit}".rstrip()
    return f"{x:.4g} {unit}".rstrip()


def _ratio(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.2f}x"


LAYER_COLUMNS = ["name", "kind", "shape", "w_bits", "a_bits", "calls", "params", "macs", "flops",
                 "bit_flops", "fp32_bit_flops", "bit_flops_reduction", "packed_bytes",
                 "fp32_bytes", "compression", "share", "fp32_share"]


def render_markdown(d: Dict[str, Any], paper: Optional[Dict[str, Any]] = None) -> str:
    """Human tables of a ``to_dict()`` report (and a paper comparison, if given)."""
    t = d["total"]
    out = [f"# Bit-FLOPs report: {d['model']}", "",
           f"Workload: {d['workload'].get('description', '')}.",
           "Units: MACs = multiply-accumulates; FLOPs = 2 x MACs; Bit-FLOPs = FLOPs x b_w x b_a "
           "(FP32 at 32 x 32); bytes are bytes.", "",
           "## Per layer", "",
           "| layer | kind | shape | b_w | b_a | params | MACs | FLOPs | Bit-FLOPs | FP32 Bit-FLOPs "
           "| packed bytes | FP32 bytes | compr. | share |",
           "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for l in d["layers"]:
        out.append(f"| {l['name']} | {l['kind']} | {l['shape']} | {l['w_bits']} | {l['a_bits']} | "
                   f"{l['params']:,} | {human(l['macs'])} | {human(l['flops'])} | {human(l['bit_flops'])} | "
                   f"{human(l['fp32_bit_flops'])} | {l['packed_bytes']:,} | {l['fp32_bytes']:,} | "
                   f"{_ratio(l['compression'])} | {100 * l['share']:.2f}% |")
    out += ["", "## Totals: quantized vs FP32", "",
            "| quantity | quantized | FP32 | FP32 / quantized |", "|---|---:|---:|---:|",
            f"| parameters | {t['params']:,} (+{t['quantizer_params']} PQ ranges) | {t['params']:,} | 1.00x |",
            f"| MACs (layers) | {human(t['macs'])} | {human(t['macs'])} | 1.00x |",
            f"| FLOPs (layers, 2 x MACs) | {human(t['flops'])} | {human(t['flops'])} | 1.00x |",
            f"| Bit-FLOPs (layers) | {human(t['bit_flops'])} | {human(t['fp32_bit_flops'])} | "
            f"{_ratio(t['bit_flops_reduction'])} |",
            f"| Bit-FLOPs incl. elementwise at 32x32 | {human(t['bit_flops_with_elementwise'])} | "
            f"{human(t['fp32_bit_flops_with_elementwise'])} | "
            f"{_ratio(t['fp32_bit_flops_with_elementwise'] / max(1, t['bit_flops_with_elementwise']))} |",
            f"| OPs (FLOPs_fp + BOPs/64) | {human(t['ops_binary_net'])} | {human(t['fp32_ops_binary_net'])} | "
            f"{_ratio(t['fp32_ops_binary_net'] / t['ops_binary_net'] if t['ops_binary_net'] else None)} |",
            f"| weight bytes | {human(t['packed_bytes'], 'B')} | {human(t['fp32_bytes'], 'B')} | "
            f"{_ratio(t['compression'])} |",
            f"| layers quantized / FP32 | {t['quantized_layers']} / {t['fp32_layers']} | | |", "",
            "## Elementwise work (FP32, not in the layer totals)", "",
            "| category | FLOPs | elements | calls |", "|---|---:|---:|---:|"]
    for cat, v in d["elementwise"].items():
        out.append(f"| {cat} | {human(v['flops'])} | {human(v['elements'])} | {v['calls']} |")
    out.append(f"| **total** | {human(t['elementwise_flops'])} | | |")
    if d.get("other_params"):
        out += ["", "Parameters outside the counted layers: " + ", ".join(
            f"{k} {v:,}" for k, v in d["other_params"].items()) + " (kept as fp32 bytes)."]
    fq = d.get("fake_quant") or {}
    if fq.get("calls"):
        out.append(f"Fake-quant simulation ops (excluded): {fq['calls']} calls, {human(fq['flops'])} FLOPs.")
    if d["uncounted"]:
        out += ["", "## Uncounted ops (no cost rule; NOT in the totals)", "",
                "| op | module | calls | output elements | reason |", "|---|---|---:|---:|---|"]
        for u in d["uncounted"]:
            out.append(f"| {u['op']} | {u['module']} | {u['calls']} | {u['output_elements']:,} | {u['reason']} |")
    else:
        out += ["", "Every op executed was counted (layers, elementwise, or data movement)."]
    if paper:
        out += ["", "## Paper comparison (QGNN-IC Table 6, inference)", "",
                "| quantity | paper | ours | ours vs paper |", "|---|---:|---:|---:|"]
        for r in paper["rows"]:
            fmt = (lambda v: "-" if v is None else f"{v / 1e6:.4f} M") if r["unit"] == "parameters" else \
                (lambda v: "-" if v is None else f"{v / 1e9:.4f} G")
            diff = "-" if r["rel_diff"] is None else f"{100 * r['rel_diff']:+.4f}%"
            extra = f" (FP32: {fmt(r['fp32'])})" if r.get("fp32") is not None else ""
            out.append(f"| {r['quantity']} | {fmt(r['paper'])} | {fmt(r['ours'])}{extra} | {diff} |")
        pc = paper["paper_count"]
        out += ["", f"Paper-convention count: {pc['macs']:,} MACs + {pc['batch_norm_ops']:,} BN ops = "
                f"{pc['count']:,}; x 2 x 32 x 32 = {pc['fp32_bit_flops']:,} Bit-FLOPs.",
                "", "- FP32 figure: " + paper["notes"]["fp32_bit_flops"],
                "- 4-bit figure: " + paper["notes"]["quant_bit_flops"],
                "- Parameters: " + paper["notes"]["params"]]
    if d.get("notes"):
        out += [""] + [f"Note: {n}" for n in d["notes"]]
    return "\n".join(out) + "\n"


def render_csv(d: Dict[str, Any]) -> str:
    """One row per layer, then a TOTAL row (raw numbers, units in the header)."""
    buf = io.StringIO()
    w = csv.writer(buf)
    head = ["name", "kind", "shape", "w_bits", "a_bits", "calls", "params", "macs", "flops (2 x MACs)",
            "bit_flops", "fp32_bit_flops", "bit_flops_reduction", "packed_bytes", "fp32_bytes",
            "compression", "share", "fp32_share"]
    w.writerow(head)
    for l in d["layers"]:
        w.writerow([l[c] if l[c] is not None else "" for c in LAYER_COLUMNS])
    t = d["total"]
    w.writerow(["TOTAL", "", "", "", "", "", t["params"], t["macs"], t["flops"], t["bit_flops"],
                t["fp32_bit_flops"], t["bit_flops_reduction"] or "", t["packed_bytes"],
                t["fp32_bytes"], t["compression"] or "", 1.0, 1.0])
    for cat, v in d["elementwise"].items():
        w.writerow([f"elementwise:{cat}", "elementwise", "", 32, 32, v["calls"], 0, 0, v["flops"],
                    v["flops"] * 1024, v["flops"] * 1024, 1.0, 0, 0, "", "", ""])
    return buf.getvalue()


__all__ = ["count_bit_flops", "BitFlopCounter", "BitFlopReport", "LayerCount", "paper_comparison",
           "paper_convention_count", "is_paper_model", "render_markdown", "render_csv",
           "PAPER_TABLE6", "ELEMENTWISE_COST", "UNITS", "default_episode", "human"]
