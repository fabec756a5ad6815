"""A small ONNX graph builder on top of ``onnx.helper``.

Every node gets a unique, readable name (``<layer>/<op>``) so onnxruntime profiles and
error messages point at the model layer; initializers are deduplicated by name.
Tensors are referred to by their string names, as in ONNX itself.
"""
from __future__ import annotations

import json
from typing import Dict, Iterable, List, Optional, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

FLOAT = TensorProto.FLOAT
DOUBLE = TensorProto.DOUBLE
INT64 = TensorProto.INT64
INT32 = TensorProto.INT32
UINT8 = TensorProto.UINT8
INT8 = TensorProto.INT8

#: the IR version onnxruntime 1.31 accepts for each opset we emit (onnx 1.23 defaults
#: to IR 14, which onnxruntime rejects: always set it explicitly)
IR_FOR_OPSET = {17: 8, 18: 8, 19: 9, 20: 9, 21: 10, 22: 10, 23: 11, 24: 11, 25: 13, 26: 13}


class GraphBuilder:
    """Accumulates nodes, initializers, inputs and outputs of one ONNX graph."""

    def __init__(self, name: str = "qgnn"):
        self.name = name
        self.nodes: List[onnx.NodeProto] = []
        self.initializers: Dict[str, onnx.TensorProto] = {}
        self.inputs: List[onnx.ValueInfoProto] = []
        self.outputs: List[onnx.ValueInfoProto] = []
        self._counts: Dict[str, int] = {}
        self.scope = ""

    # ------------------------------------------------------------------ names
    def fresh(self, hint: str) -> str:
        """A unique tensor / node name starting with ``scope/hint``."""
        base = f"{self.scope}/{hint}" if self.scope else hint
        n = self._counts.get(base, 0)
        self._counts[base] = n + 1
        return base if n == 0 else f"{base}_{n}"

    # ----------------------------------------------------------- initializers
    def const(self, value, name: Optional[str] = None, dtype=None) -> str:
        """An initializer from a numpy array / scalar / torch tensor; returns its name."""
        arr = value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)
        if dtype is not None:
            arr = arr.astype(dtype)
        name = name or self.fresh("const")
        if name not in self.initializers:
            self.initializers[name] = numpy_helper.from_array(np.ascontiguousarray(arr), name)
        return name

    def f32(self, value, name: Optional[str] = None) -> str:
        return self.const(np.asarray(value, dtype=np.float32), name)

    def i64(self, value, name: Optional[str] = None) -> str:
        return self.const(np.asarray(value, dtype=np.int64), name)

    def raw_initializer(self, tensor: onnx.TensorProto) -> str:
        self.initializers[tensor.name] = tensor
        return tensor.name

    # ------------------------------------------------------------------ nodes
    def op(self, op_type: str, inputs: Sequence[str], hint: Optional[str] = None,
           n_out: int = 1, domain: str = "", **attrs) -> str:
        """Append a node; returns its output name (the first when ``n_out > 1``, see
        :meth:`op_multi`)."""
        return self.op_multi(op_type, inputs, hint, n_out, domain, **attrs)[0]

    def op_multi(self, op_type: str, inputs: Sequence[str], hint: Optional[str] = None,
                 n_out: int = 1, domain: str = "", **attrs) -> List[str]:
        node_name = self.fresh(hint or op_type)
        outs = [node_name if i == 0 else f"{node_name}:{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=node_name,
                                           domain=domain or None, **attrs))
        return outs

    # ------------------------------------------------------------- graph i/o
    def add_input(self, name: str, elem_type: int, shape: Iterable) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, elem_type, list(shape)))
        return name

    def add_output(self, src: str, name: str, elem_type: int, shape: Iterable) -> str:
        self.nodes.append(helper.make_node("Identity", [src], [name], name=f"{name}/output"))
        self.outputs.append(helper.make_tensor_value_info(name, elem_type, list(shape)))
        return name

    # ------------------------------------------------------------------ model
    def model(self, opset: int, metadata: Dict[str, object], doc: str = "") -> onnx.ModelProto:
        if opset not in IR_FOR_OPSET:
            raise ValueError(f"opset {opset} not supported; choose one of {sorted(IR_FOR_OPSET)}")
        graph = helper.make_graph(self.nodes, self.name, self.inputs, self.outputs,
                                  list(self.initializers.values()))
        imports = [helper.make_opsetid("", opset)]
        if any(n.domain == "com.microsoft" for n in self.nodes):
            imports.append(helper.make_opsetid("com.microsoft", 1))
        model = helper.make_model(graph, opset_imports=imports,
                                  ir_version=IR_FOR_OPSET[opset], producer_name="qgnn-deploy",
                                  doc_string=doc)
        for k, v in metadata.items():
            entry = model.metadata_props.add()
            entry.key = k
            entry.value = v if isinstance(v, str) else json.dumps(v, sort_keys=True)
        return model
