"""What keeps model code away from the gateway's secrets: an allow-listed environment for every child, a
gateway process its children cannot read, and an optional refusal of artifacts that carry code.

Model code runs beside the gateway: Triton's Python-backend stubs run an artifact's `model.py`, and the
scikit-learn conversion child unpickles what an operator allowed. Whatever the gateway holds in its
environment (`MME_SIGV4_SECRET_ACCESS_KEY`, AWS credentials, the web-identity token path, API key lines)
would reach that code if children inherited it, so they get only the variables named here. A process of the
same user could still read `/proc/<gateway>/environ` and its memory; a non-dumpable gateway closes that to
every such process that is not root (`make_undumpable`). Operators who do not trust the writers of their
store can refuse code altogether (`--model-code refuse`, `check_model_code`).
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
from pathlib import Path
from typing import Any, Mapping

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from gateway.errors import InvalidArtifact

log = logging.getLogger(__name__)

# Variables a child may see: what locates programs, libraries, temporary files and the device, and what sizes
# thread pools. Nothing else passes: a secret added to the gateway's environment later stays out by default.
CHILD_ENV_NAMES = frozenset({
    "PATH", "HOME", "LANG", "LANGUAGE", "TZ", "TMPDIR", "TMP", "TEMP", "LD_LIBRARY_PATH", "PYTHONPATH",
})
CHILD_ENV_PREFIXES = ("LC_", "CUDA_", "NVIDIA_", "OMP_", "KMP_", "MKL_", "OPENBLAS_", "NUMEXPR_")

_PR_SET_DUMPABLE = 4
_PR_GET_DUMPABLE = 3

MODEL_CODE_CHOICES = ("allow", "refuse")
# Files an artifact may not carry under --model-code refuse: Python (the Python backend runs `model.py`, or any
# file a config names), native libraries (Triton loads `libtriton_<backend>.so` from a model's own directory
# before its backend directory, and onnxruntime custom-op libraries), a custom Python-backend stub, and pickles.
_CODE_SUFFIXES = (".py", ".pyc", ".pyo", ".so", ".dylib", ".pkl", ".pickle", ".joblib")
_CODE_NAMES = frozenset({"triton_python_backend_stub"})
# Config parameters that make the Python backend run another interpreter environment (a packed one from the
# artifact, with whatever site-packages it carries).
_CODE_PARAMETERS = frozenset({"EXECUTION_ENV_PATH"})


def child_env(overrides: Mapping[str, str] | None = None, source: Mapping[str, str] | None = None) -> dict[str, str]:
    """The allow-listed part of `source` (the gateway's environment), with `overrides` on top."""
    env = os.environ if source is None else source
    kept = {name: value for name, value in env.items()
            if name in CHILD_ENV_NAMES or name.startswith(CHILD_ENV_PREFIXES)}
    kept.update(overrides or {})
    return kept


def _prctl() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def make_undumpable() -> bool:
    """Mark this process non-dumpable, so that a process of the same user that is not root (model code in a
    stub, a conversion child) can neither read its `/proc/<pid>/environ` and memory nor attach to it. Exec
    resets the flag, so children are unaffected. False, logged, where the platform has no prctl."""
    prctl = _prctl()
    if prctl is None or prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        log.warning("process.dumpable", extra={"reason": "prctl(PR_SET_DUMPABLE) is not available here: a process "
                                                         "of the same user can read this one's environment"})
        return False
    return True


def is_dumpable() -> bool | None:
    """This process's dumpable flag (None without prctl)."""
    prctl = _prctl()
    return None if prctl is None else bool(prctl(_PR_GET_DUMPABLE, 0, 0, 0, 0))


def _config_code(config_path: Path) -> str | None:
    """What in an artifact's config.pbtxt would run code, or None (an unreadable config is render's to refuse)."""
    config = mc.ModelConfig()
    try:
        text_format.Parse(config_path.read_text(errors="replace"), config)
    except (text_format.ParseError, OSError):
        return None
    if config.backend == "python":
        return f'{config_path.name} names backend "python"'
    if config.model_operations.op_library_filename:
        return f"{config_path.name} loads an operator library (model_operations)"
    named = sorted(_CODE_PARAMETERS & set(config.parameters))
    if named:
        return f"{config_path.name} sets {named[0]}"
    return None


def check_model_code(root: Path, key: str, model_code: str) -> None:
    """Under `--model-code refuse`, InvalidArtifact (422) naming the TargetModel and the first thing in the
    extracted artifact at `root` that is code: a Python, native-library or pickle file, or a config that
    runs the Python backend, loads an operator library or selects an interpreter environment. Runs before
    rendering, so the gateway's own runners (copied in by rendering) are never mistaken for the artifact's."""
    if model_code != "refuse":
        return
    for path in sorted(root.rglob("*")):
        if path.is_dir() and not path.is_symlink():
            continue  # files and links alike: a link named model.py runs whatever it points at
        name = path.name.lower()
        inside = path.relative_to(root).as_posix()
        why = None
        if name in _CODE_NAMES or name.endswith(_CODE_SUFFIXES) or ".so." in name:
            why = f"it holds {inside}"
        elif name == "config.pbtxt" and path.is_file():
            found = _config_code(path)
            why = found and f"{inside[: -len(path.name)]}{found}"
        if why:
            raise InvalidArtifact(
                f"artifact {key!r} carries code, which this gateway does not run (--model-code refuse): {why}; "
                "serve it as ONNX, TorchScript, TensorRT, XGBoost, LightGBM, treelite or skops instead")
