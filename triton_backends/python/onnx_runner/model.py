"""A generic ONNX runner for Triton's Python backend.

The bundled Triton (the `nvidia-pytriton` wheel) has no onnxruntime backend, so the gateway serves ONNX
artifacts through this model: one onnxruntime session per model instance, the CUDA execution provider on a
KIND_GPU instance, the CPU provider otherwise. On a full Triton the native
onnxruntime backend serves the same artifact instead (see model_repo_templates/onnx).

The gateway copies this file next to the artifact's `model.onnx` as `<version>/model.py`.
"""

from __future__ import annotations

import json
import os

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


def _parameter(config: dict, key: str, default: str) -> str:
    return str(config.get("parameters", {}).get(key, {}).get("string_value", default))


def _providers(instance_kind: str, device_id: int) -> list:
    """CUDA for a KIND_GPU instance when onnxruntime has it; the gateway renders KIND_GPU only then, and a
    KIND_CPU instance stays on the CPU even on a GPU machine (`--instance-kind cpu`)."""
    available = ort.get_available_providers()
    if instance_kind.upper() == "GPU" and "CUDAExecutionProvider" in available:
        return [("CUDAExecutionProvider", {"device_id": device_id}), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class TritonPythonModel:
    """Runs `onnx_file` from the model's version directory for every request."""

    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        version_dir = os.path.join(args["model_repository"], args["model_version"])
        onnx_path = os.path.join(version_dir, _parameter(config, "onnx_file", "model.onnx"))
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(_parameter(config, "intra_op_threads", "1"))
        options.inter_op_num_threads = 1
        device_id = int(args.get("model_instance_device_id", "0") or 0)
        providers = _providers(str(args.get("model_instance_kind", "CPU")), device_id)
        self.session = ort.InferenceSession(onnx_path, sess_options=options, providers=providers)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.output_dtypes = {
            o["name"]: pb_utils.triton_string_to_numpy(o["data_type"]) for o in config.get("output", [])
        }

    def execute(self, requests: list) -> list:
        responses = []
        for request in requests:
            try:
                feeds = {}
                for name in self.input_names:
                    tensor = pb_utils.get_input_tensor_by_name(request, name)
                    if tensor is None:
                        raise ValueError(f"missing input tensor {name!r}")
                    feeds[name] = tensor.as_numpy()
                requested = request.requested_output_names() or self.output_names
                results = self.session.run(list(requested), feeds)
                outputs = [
                    pb_utils.Tensor(name, np.asarray(value, dtype=self.output_dtypes.get(name, value.dtype)))
                    for name, value in zip(requested, results)
                ]
                responses.append(pb_utils.InferenceResponse(output_tensors=outputs))
            except Exception as exc:  # one bad request must not fail the others in the batch
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"onnx runner: {exc}")))
        return responses

    def finalize(self) -> None:
        self.session = None
