"""Which backends the Triton in front of the gateway can load, so rendering picks what it has.

The embedded Triton (the `nvidia-pytriton` wheel) is asked directly: its backends are the folders of the
wheel's backend directory (today only `python`). An external Triton is told by `--triton-backends`
(`onnxruntime,python,fil`, ...); left at `auto` it is taken to be a full Triton image, which has every backend
the templates name. Triton's API does not list backends, so the flag is the way to say otherwise.
"""

from __future__ import annotations

import logging
from pathlib import Path

from gateway.render import OnnxBackend

log = logging.getLogger(__name__)

# The backends of the NGC tritonserver image that the templates use (`-py3` tags; FIL included).
FULL_TRITON = frozenset({"onnxruntime", "python", "pytorch", "tensorrt", "fil", "openvino", "tensorflow"})


def embedded_backends() -> frozenset[str]:
    """The folders of the bundled Triton's backend directory."""
    from gateway.triton.process import TritonPaths

    backend_dir = TritonPaths.from_wheel().python_backend.parent
    return frozenset(p.name for p in backend_dir.iterdir() if p.is_dir())


def parse_backends(value: str) -> frozenset[str]:
    """'onnxruntime, python' -> {'onnxruntime', 'python'}; ValueError for an empty list."""
    names = frozenset(name.strip() for name in value.split(",") if name.strip())
    if not names:
        raise ValueError("--triton-backends names no backend")
    return names


def resolve_backends(setting: str, embedded: bool, backend_dir: Path | None = None) -> frozenset[str]:
    """`setting` is 'auto' or a comma-separated list; auto asks the embedded Triton or assumes a full one."""
    if setting != "auto":
        try:
            backends = parse_backends(setting)
        except ValueError as exc:
            raise SystemExit(str(exc)) from None
        source = "--triton-backends"
    elif embedded:
        backends = (frozenset(p.name for p in backend_dir.iterdir() if p.is_dir()) if backend_dir
                    else embedded_backends())
        source = "the embedded Triton's backend directory"
    else:
        backends = FULL_TRITON
        source = "an external Triton, taken to be a full image (--triton-backends to say otherwise)"
    log.info("triton.backends", extra={"backends": sorted(backends), "source": source})
    return backends


def resolve_onnx_backend(setting: str, backends: frozenset[str]) -> OnnxBackend:
    """`--onnx-backend auto` follows the backends Triton has: its onnxruntime backend when present."""
    if setting != "auto":
        return OnnxBackend(setting)
    return OnnxBackend.ONNXRUNTIME if "onnxruntime" in backends else OnnxBackend.PYTHON
