"""Read tree models and convert scikit-learn models to ONNX at staging, in a child process.

Why a child process: the libraries parse untrusted files (a corrupt XGBoost or LightGBM file, or a
scikit-learn tree whose node indices point out of range, can crash the process reading it), and a pickle,
when the operator allows one (`--allow-pickle`), runs code. Staging runs `python -m gateway.convert`, so a
crash fails that one artifact with a 422, the libraries never sit in the gateway's memory, and the gateway
process itself never unpickles anything. The child answers one JSON line; its messages name files by their
name inside the artifact only, and details go to the gateway's log. The child gets the allow-listed
environment (`gateway.isolation`: none of the gateway's secrets) and, before it reads anything, limits its
own memory, CPU time, open files and file size, so a hostile file fails that artifact (422) and nothing else.

scikit-learn models become ONNX (skl2onnx) and are then served like any ONNX model; a `model.skops` file
(skops' format, which builds only allowed types instead of running code) needs no opt-in.
"""

from __future__ import annotations

import errno
import json
import logging
import resource
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.errors import InvalidArtifact
from gateway.isolation import child_env

log = logging.getLogger(__name__)

CHILD_TIMEOUT_S = 120.0
# The child's limits. Memory (RLIMIT_DATA: heap and anonymous mappings) and the largest file it may write grow
# with the model file; CPU time matches the wall-clock bound; file descriptors are what Python and the
# libraries need, with room.
CHILD_MEMORY_FLOOR_BYTES = 2 << 30
CHILD_MEMORY_PER_MODEL_BYTE = 8
CHILD_MAX_FILES = 256
INPUT_NAME = "input__0"  # FIL's names, so an artifact answers to the same names on every Triton
OUTPUT_NAME = "output__0"
# skops refuses scikit-learn's tree storage by default because predicting with corrupt node indices can
# crash; the child only reads the arrays to write ONNX (onnxruntime checks the indices again at load).
_SKOPS_TRUSTED = ("sklearn.tree._tree.Tree",)


@dataclass(frozen=True)
class TabularModel:
    """What rendering needs to know of a tree model: its row width and what it answers per row."""

    num_features: int
    num_outputs: int
    classifier: bool
    gpu: bool  # the installed library can predict on a GPU (XGBoost built with CUDA)


def inspect_model(framework: str, path: Path, key: str) -> TabularModel:
    """Read an XGBoost or LightGBM model file in a child process; InvalidArtifact if it is not one."""
    answer = _run_child(["inspect", framework, str(path)], key, path)
    return TabularModel(**answer)


def sklearn_to_onnx(path: Path, dest: Path, key: str, allow_pickle: bool) -> None:
    """Write the scikit-learn model in `path` (skops, or a pickle when allowed) to `dest` as ONNX."""
    _run_child(["sklearn", str(path), str(dest), "pickle" if allow_pickle else "no-pickle"], key, path)


def child_memory_bytes(model_bytes: int) -> int:
    """The child's memory (and written-file) limit for a model file of `model_bytes`."""
    return CHILD_MEMORY_FLOOR_BYTES + CHILD_MEMORY_PER_MODEL_BYTE * model_bytes


def _run_child(args: list[str], key: str, model: Path) -> dict[str, Any]:
    memory = child_memory_bytes(model.stat().st_size)
    try:
        proc = subprocess.run([sys.executable, "-m", "gateway.convert", str(memory), *args], capture_output=True,
                              timeout=CHILD_TIMEOUT_S, check=False, env=child_env())
    except subprocess.TimeoutExpired:
        raise InvalidArtifact(f"artifact {key!r}: reading the model took over {CHILD_TIMEOUT_S:.0f}s") from None
    lines = proc.stdout.decode(errors="replace").strip().splitlines()
    try:
        answer = json.loads(lines[-1]) if lines else {}
    except ValueError:
        answer = {}
    if proc.returncode == 0 and "ok" in answer:
        return dict(answer["ok"])
    log.warning("model.convert_failed", extra={"model": key, "code": proc.returncode,
                                                "stderr": proc.stderr.decode(errors="replace")[-4000:]})
    why = answer.get("error") or _ended(proc.returncode)
    raise InvalidArtifact(f"artifact {key!r}: {why}")


def _ended(code: int) -> str:
    """Why the child ended without an answer, in the client's terms."""
    if code == -signal.SIGXCPU:
        return f"reading the model used more than its {CHILD_TIMEOUT_S:.0f} s of CPU time"
    if code == -signal.SIGKILL:
        return "the process reading it was killed (past its CPU time, or out of memory)"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"the process reading it crashed ({name})"
    return f"the process reading it ended with code {code}"


def _limit_self(memory: int) -> None:
    """Lower this process's limits (for good: the hard limits too) before it reads anything."""
    cpu = int(CHILD_TIMEOUT_S)
    for limit, soft, hard in ((resource.RLIMIT_DATA, memory, memory), (resource.RLIMIT_FSIZE, memory, memory),
                              (resource.RLIMIT_CPU, cpu, cpu + 5),  # SIGXCPU at the soft limit, SIGKILL after
                              (resource.RLIMIT_NOFILE, CHILD_MAX_FILES, CHILD_MAX_FILES),
                              (resource.RLIMIT_CORE, 0, 0)):
        _, current = resource.getrlimit(limit)
        if current != resource.RLIM_INFINITY:
            soft, hard = min(soft, current), min(hard, current)
        resource.setrlimit(limit, (soft, hard))


# -- the child -------------------------------------------------------------------------------------------


class _Refused(Exception):
    """A message for the client (file names inside the artifact only)."""


def _inspect_xgboost(path: Path) -> dict[str, Any]:
    import xgboost

    try:
        booster = xgboost.Booster(model_file=str(path))
        learner = json.loads(booster.save_config())["learner"]
    except Exception as exc:
        raise _Refused(f"{path.name} is not a model XGBoost can read") from exc
    objective = learner["objective"]["name"]
    num_class = int(learner["learner_model_param"].get("num_class", "0") or 0)
    num_target = int(learner["learner_model_param"].get("num_target", "1") or 1)
    outputs = num_class if objective == "multi:softprob" else num_target
    gpu = bool(xgboost.build_info().get("USE_CUDA", False))
    return {"num_features": booster.num_features(), "num_outputs": max(outputs, 1),
            "classifier": objective.startswith(("binary:", "multi:")), "gpu": gpu}


def _inspect_lightgbm(path: Path) -> dict[str, Any]:
    import lightgbm

    try:
        booster = lightgbm.Booster(model_file=str(path))
        objective = str(booster.dump_model(num_iteration=0).get("objective", ""))
    except Exception as exc:
        raise _Refused(f"{path.name} is not a model LightGBM can read") from exc
    return {"num_features": booster.num_feature(), "num_outputs": booster.num_model_per_iteration(),
            "classifier": objective.startswith(("binary", "multiclass")), "gpu": False}


def _load_sklearn(path: Path, allow_pickle: bool) -> Any:
    if path.suffix == ".skops":
        import skops.io

        try:
            untrusted = skops.io.get_untrusted_types(file=str(path))
        except Exception as exc:
            raise _Refused(f"{path.name} is not a readable skops file") from exc
        refused = sorted(set(untrusted) - set(_SKOPS_TRUSTED))
        if refused:
            raise _Refused(f"{path.name} holds types this gateway does not load from skops files: {refused}")
        return skops.io.load(str(path), trusted=list(untrusted))
    if not allow_pickle:  # staging checks first; this is the second lock on the same door
        raise _Refused(f"{path.name} is a pickle, which runs code when loaded; pickles are refused")
    import joblib

    try:
        return joblib.load(str(path))
    except Exception as exc:
        raise _Refused(f"{path.name} could not be unpickled") from exc


def _sklearn_to_onnx(path: Path, dest: Path, allow_pickle: bool) -> dict[str, Any]:
    from sklearn.base import BaseEstimator, is_classifier
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import FloatTensorType

    model = _load_sklearn(path, allow_pickle)
    if not isinstance(model, BaseEstimator) or not hasattr(model, "n_features_in_"):
        raise _Refused(f"{path.name} does not hold a fitted scikit-learn model")
    options = {id(model): {"zipmap": False}} if is_classifier(model) else None
    try:
        onnx_model = to_onnx(model, initial_types=[(INPUT_NAME, FloatTensorType([None, int(model.n_features_in_)]))],
                             options=options)
    except Exception as exc:
        raise _Refused(f"{type(model).__name__} in {path.name} cannot be converted to ONNX: {exc}") from exc
    dest.write_bytes(onnx_model.SerializeToString())
    return {"num_features": int(model.n_features_in_)}


def _child(args: list[str]) -> dict[str, Any]:
    if args[0] == "inspect" and args[1] == "xgboost":
        return _inspect_xgboost(Path(args[2]))
    if args[0] == "inspect" and args[1] == "lightgbm":
        return _inspect_lightgbm(Path(args[2]))
    if args[0] == "sklearn":
        return _sklearn_to_onnx(Path(args[1]), Path(args[2]), args[3] == "pickle")
    raise _Refused(f"unknown request {args[:2]}")


def main(argv: list[str]) -> int:
    """`python -m gateway.convert MEMORY_BYTES REQUEST...`: one JSON line, {"ok": ...} or {"error": ...}."""
    memory = int(argv[0])
    _limit_self(memory)
    try:
        print(json.dumps({"ok": _child(argv[1:])}))
        return 0
    except (MemoryError, OSError) as exc:
        over = _over_limit(exc, memory)
        if over is None:
            raise
        print(json.dumps({"error": over}))
        return 1
    except _Refused as exc:
        print(json.dumps({"error": _over_limit(exc.__cause__, memory) or str(exc)}))
        if exc.__cause__ is not None:
            print(f"{type(exc.__cause__).__name__}: {exc.__cause__}", file=sys.stderr)
        return 1


def _over_limit(exc: BaseException | None, memory: int) -> str | None:
    """The client's message when `exc` is one of the child's limits being reached (Python ignores SIGXFSZ,
    so a write past RLIMIT_FSIZE is an EFBIG error here, not a signal), else None."""
    if isinstance(exc, MemoryError):
        return f"reading the model needed more than its limit of {memory} bytes of memory"
    if isinstance(exc, OSError) and exc.errno == errno.EFBIG:
        return f"reading the model wrote a file over its limit of {memory} bytes"
    return None


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
