"""Read an artifact's `io.json`: the inputs and outputs of a model whose file does not declare them.

TorchScript does not carry tensor names and shapes reliably and a treelite checkpoint does not name its
tensors, so such an artifact says them in a small JSON file beside the model:

    {"inputs":  [{"name": "INPUT__0", "data_type": "TYPE_FP32", "dims": [-1, 6]}],
     "outputs": [{"name": "OUTPUT__0", "data_type": "FP32", "dims": [-1, 1]}]}

`data_type` is Triton's config name (`TYPE_FP32`) or the KServe one (`FP32`); `dims` are as in
`config.pbtxt` (without the batch dimension when the config batches). The same can be said in a
`config.pbtxt` fragment instead.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tritonclient.grpc import model_config_pb2 as mc

from gateway.errors import InvalidArtifact
from gateway.onnx_io import Signature, TensorSpec

_KSERVE_ONLY = {"BYTES": "TYPE_STRING"}
_MAX_SIDECAR_BYTES = 1 << 20


def read_sidecar(path: Path, key: str) -> Signature:
    """The tensors `path` declares; InvalidArtifact naming what is wrong with it."""
    if path.stat().st_size > _MAX_SIDECAR_BYTES:
        raise InvalidArtifact(f"artifact {key!r}: {path.name} is over {_MAX_SIDECAR_BYTES} bytes")
    try:
        data = json.loads(path.read_text())
        inputs = tuple(_tensor(t) for t in data.get("inputs", []))
        outputs = tuple(_tensor(t) for t in data.get("outputs", []))
    except (ValueError, TypeError, KeyError, AttributeError, UnicodeDecodeError) as exc:
        raise InvalidArtifact(
            f"artifact {key!r}: {path.name} must be {{\"inputs\": [...], \"outputs\": [...]}} with a name, "
            f"data_type and dims for each tensor ({type(exc).__name__}: {exc})") from None
    return Signature(inputs=inputs, outputs=outputs)


def _tensor(entry: dict[str, Any]) -> TensorSpec:
    data_type = str(entry["data_type"]).upper()
    data_type = _KSERVE_ONLY.get(data_type, data_type if data_type.startswith("TYPE_") else f"TYPE_{data_type}")
    if data_type not in mc.DataType.keys() or data_type == "TYPE_INVALID":
        raise ValueError(f"unknown data_type {entry['data_type']!r}")
    dims = tuple(int(d) for d in entry["dims"])
    name = str(entry["name"])
    if not name or not dims or any(d < -1 or d == 0 for d in dims):
        raise ValueError(f"tensor {name!r} needs a name and dims of -1 or positive sizes")
    return TensorSpec(name=name, data_type=data_type, dims=dims)
