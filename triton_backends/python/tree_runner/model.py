"""A tree-model runner (XGBoost or LightGBM) for Triton's Python backend.

The bundled Triton has no FIL backend, so the gateway serves XGBoost artifacts (`xgboost.json`, `.ubj`,
`.model`) and LightGBM ones (`model.txt`) through this model, the config's `framework` parameter naming the
library: one Booster per model instance. XGBoost predicts on the GPU for a KIND_GPU instance (the gateway
renders KIND_GPU only when the installed XGBoost is built with CUDA) and on the CPU otherwise; LightGBM
predicts on the CPU. With dynamic batching Triton hands several requests to one `execute`; their rows are
predicted in one call. It answers what `Booster.predict` answers, as FP32 `output__0` of shape
[rows, outputs].

The gateway copies this file next to the model file as `<version>/model.py`.
"""

from __future__ import annotations

import json
import os

import numpy as np
import triton_python_backend_utils as pb_utils

INPUT_NAME = "input__0"
OUTPUT_NAME = "output__0"


def _parameter(config: dict, key: str, default: str) -> str:
    return str(config.get("parameters", {}).get(key, {}).get("string_value", default))


class _XGBoost:
    def __init__(self, path: str, threads: int, args: dict) -> None:
        import xgboost

        self.booster = xgboost.Booster(model_file=path)
        params = {"nthread": threads}
        if str(args.get("model_instance_kind", "CPU")).upper() == "GPU" and xgboost.build_info().get("USE_CUDA"):
            params["device"] = f"cuda:{int(args.get('model_instance_device_id', '0') or 0)}"
        self.booster.set_param(params)
        self.features = self.booster.num_features()

    def predict(self, rows: np.ndarray) -> np.ndarray:
        return np.asarray(self.booster.inplace_predict(rows), dtype=np.float32)


class _LightGBM:
    def __init__(self, path: str, threads: int, args: dict) -> None:
        import lightgbm

        self.booster = lightgbm.Booster(model_file=path)
        self.threads = threads
        self.features = self.booster.num_feature()

    def predict(self, rows: np.ndarray) -> np.ndarray:
        return np.asarray(self.booster.predict(rows, num_threads=self.threads), dtype=np.float32)


_FRAMEWORKS = {"xgboost": (_XGBoost, "xgboost.json"), "lightgbm": (_LightGBM, "model.txt")}


class TritonPythonModel:
    """Predicts with the Booster in `model_file` for every request."""

    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        self.framework = _parameter(config, "framework", "xgboost")
        kind, default_file = _FRAMEWORKS[self.framework]
        version_dir = os.path.join(args["model_repository"], args["model_version"])
        self.model = kind(os.path.join(version_dir, _parameter(config, "model_file", default_file)),
                          int(_parameter(config, "threads", "1")), args)

    def execute(self, requests: list) -> list:
        rows, responses, ok = [], [None] * len(requests), []
        for i, request in enumerate(requests):
            tensor = pb_utils.get_input_tensor_by_name(request, INPUT_NAME)
            if tensor is None:
                responses[i] = pb_utils.InferenceResponse(
                    error=pb_utils.TritonError(f"{self.framework} runner: missing input tensor {INPUT_NAME!r}"))
                continue
            rows.append(np.asarray(tensor.as_numpy(), dtype=np.float32).reshape(-1, self.model.features))
            ok.append(i)
        if ok:
            try:  # one call for the whole batch; a failure answers every request in it with the error
                predicted = self.model.predict(np.concatenate(rows))
                predicted = predicted.reshape(predicted.shape[0], -1)
                start = 0
                for i, part in zip(ok, rows):
                    answer = predicted[start:start + len(part)]
                    start += len(part)
                    responses[i] = pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(OUTPUT_NAME, answer)])
            except Exception as exc:
                for i in ok:
                    responses[i] = pb_utils.InferenceResponse(
                        error=pb_utils.TritonError(f"{self.framework} runner: {exc}"))
        return responses

    def finalize(self) -> None:
        self.model = None
