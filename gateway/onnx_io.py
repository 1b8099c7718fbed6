"""Read an ONNX graph's inputs and outputs to write a Triton config for it.

Only the graph's signature is read (no weights are loaded into memory beyond the protobuf itself), so the
gateway never runs a model it is staging.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import onnx

from gateway.errors import InvalidArtifact

# ONNX TensorProto element types -> Triton data types.
_ONNX_TO_TRITON: dict[int, str] = {
    onnx.TensorProto.FLOAT: "TYPE_FP32",
    onnx.TensorProto.DOUBLE: "TYPE_FP64",
    onnx.TensorProto.FLOAT16: "TYPE_FP16",
    onnx.TensorProto.BFLOAT16: "TYPE_BF16",
    onnx.TensorProto.INT8: "TYPE_INT8",
    onnx.TensorProto.INT16: "TYPE_INT16",
    onnx.TensorProto.INT32: "TYPE_INT32",
    onnx.TensorProto.INT64: "TYPE_INT64",
    onnx.TensorProto.UINT8: "TYPE_UINT8",
    onnx.TensorProto.UINT16: "TYPE_UINT16",
    onnx.TensorProto.UINT32: "TYPE_UINT32",
    onnx.TensorProto.UINT64: "TYPE_UINT64",
    onnx.TensorProto.BOOL: "TYPE_BOOL",
    onnx.TensorProto.STRING: "TYPE_STRING",
}


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output, as Triton's config describes it (-1 for a dynamic dimension)."""

    name: str
    data_type: str
    dims: tuple[int, ...]


@dataclass(frozen=True)
class Signature:
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]


def _spec(value: onnx.ValueInfoProto, path: Path, key: str) -> TensorSpec:
    tensor_type = value.type.tensor_type
    data_type = _ONNX_TO_TRITON.get(tensor_type.elem_type)
    if data_type is None:
        raise InvalidArtifact(f"artifact {key!r}: tensor {value.name!r} of {path.name} has a type Triton cannot serve")
    dims = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else -1 for d in tensor_type.shape.dim)
    return TensorSpec(name=value.name, data_type=data_type, dims=dims or (1,))


def read_signature(path: Path, key: str) -> Signature:
    """The graph's inputs (initializers excluded) and outputs; InvalidArtifact if it is not ONNX."""
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError and others; all mean "not a model"
        raise InvalidArtifact(f"artifact {key!r}: {path.name} is not a readable ONNX model: {exc}") from None
    initializers = {init.name for init in model.graph.initializer}
    inputs = tuple(_spec(v, path, key) for v in model.graph.input if v.name not in initializers)
    outputs = tuple(_spec(v, path, key) for v in model.graph.output)
    if not inputs or not outputs:
        raise InvalidArtifact(f"artifact {key!r}: {path.name} declares no inputs or no outputs")
    return Signature(inputs=inputs, outputs=outputs)
