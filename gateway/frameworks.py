"""The model formats a bare artifact may hold, recognised by file name, and which template serves each.

One table, so detection, the error for an artifact with no model and the README agree. A format names the
Triton backend that serves it natively (on a full Triton, such as the NGC image) and, where one exists, the
template that serves it on a Triton without that backend (the bundled one, which has only the Python
backend). Names follow what Triton's backends look for by default (`model.plan`, `xgboost.json`,
`checkpoint.tl`, ...), so an artifact made for a plain Triton repository is recognised as it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Format:
    """One recognised model format."""

    framework: str  # what the model class in the ledger and the logs calls it
    files: tuple[str, ...]  # names looked for in the version directory, in order of preference
    backend: str  # the Triton backend that serves it natively
    native_template: str  # model_repo_templates/<this> on a Triton with `backend`
    runner_template: str | None = None  # on a Triton without it: a Python-backend runner, or None (refused)
    converted_to_onnx: bool = False  # scikit-learn: converted at staging, then served as ONNX
    pickle: bool = False  # a pickle is code: loaded only when the operator allows it (--allow-pickle)


FORMATS: tuple[Format, ...] = (
    Format("python", ("model.py",), "python", "python"),
    Format("onnx", ("model.onnx",), "onnxruntime", "onnx", "onnx_python"),
    Format("torchscript", ("model.pt",), "pytorch", "pytorch_libtorch"),
    Format("tensorrt", ("model.plan",), "tensorrt", "tensorrt"),
    Format("xgboost", ("xgboost.json", "xgboost.ubj", "xgboost.model"), "fil", "fil", "xgboost_python"),
    Format("lightgbm", ("model.txt",), "fil", "fil", "lightgbm_python"),
    Format("treelite", ("checkpoint.tl",), "fil", "fil"),
    Format("sklearn", ("model.skops",), "onnxruntime", "onnx", "onnx_python", converted_to_onnx=True),
    Format("sklearn", ("model.joblib", "model.pkl", "model.pickle"), "onnxruntime", "onnx", "onnx_python",
           converted_to_onnx=True, pickle=True),
)

# FIL's model_type parameter for each file name it reads.
FIL_MODEL_TYPES = {
    "xgboost.json": "xgboost_json",
    "xgboost.ubj": "xgboost_ubj",
    "xgboost.model": "xgboost",
    "model.txt": "lightgbm",
    "checkpoint.tl": "treelite_checkpoint",
}

# Where the backend supports it, small tabular models batch across requests: dynamic batching on with a
# short queue delay (a tree model answers a row in microseconds, so waiting longer only adds latency).
# Both can be overridden per artifact with a config.pbtxt fragment (`max_batch_size: 0`, `dynamic_batching {}`).
TABULAR_MAX_BATCH_SIZE = 32768
TABULAR_QUEUE_DELAY_US = 100


def fil_model_type(path: Path) -> str:
    """FIL's model_type for a model file: by its name, except `xgboost.model`, which XGBoost 2+ writes as JSON or
    UBJSON (sniffed: both open with `{`, JSON then text) and older XGBoost in its legacy binary format."""
    if path.name != "xgboost.model":
        return FIL_MODEL_TYPES.get(path.name, "")  # "" for files FIL does not read
    with path.open("rb") as fh:
        head = fh.read(64)
    if not head.startswith(b"{"):
        return "xgboost"
    return "xgboost_json" if head[1:].lstrip()[:1] in (b'"', b"}") else "xgboost_ubj"


def detect(version: Path) -> tuple[Format, str] | None:
    """The first format (in table order) with a file in `version`, and that file's name."""
    for fmt in FORMATS:
        for name in fmt.files:
            if (version / name).is_file():
                return fmt, name
    return None


def expected_files() -> str:
    """'model.py, model.onnx, ...': every name detection looks for, for error messages."""
    return ", ".join(name for fmt in FORMATS for name in fmt.files)
