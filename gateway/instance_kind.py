"""Which Triton instance kind rendered models get: from what the machine has, or from `--instance-kind`.

Two answers, because two things serve rendered models. Triton's native backends (onnxruntime on a full
Triton) run on the GPU whenever the machine has one. The Python-backend ONNX runner runs on the GPU only
if onnxruntime in the stub's environment offers the CUDA execution provider: a KIND_GPU stub without it
would hold a GPU slot and run on the CPU anyway, so it is rendered KIND_CPU with one log line saying why.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

log = logging.getLogger(__name__)

KIND_CPU = "KIND_CPU"
KIND_GPU = "KIND_GPU"
CHOICES = ("auto", "cpu", "gpu")
_CUDA = "CUDAExecutionProvider"


@dataclass(frozen=True)
class InstanceKinds:
    native: str  # Triton's own backends (onnxruntime)
    runner: str  # the Python-backend ONNX runner
    reason: str  # one sentence for the log


def choose_instance_kinds(requested: str, gpu_present: bool, onnxruntime_providers: Sequence[str]) -> InstanceKinds:
    """`requested` is auto, cpu or gpu; auto follows `gpu_present` (NVML sees a GPU)."""
    if requested not in CHOICES:
        raise ValueError(f"unknown instance kind {requested!r}; valid: {', '.join(CHOICES)}")
    if requested == "cpu" or (requested == "auto" and not gpu_present):
        why = "--instance-kind cpu" if requested == "cpu" else "no GPU is visible through NVML"
        return InstanceKinds(KIND_CPU, KIND_CPU, f"models run on the CPU: {why}")
    why = "--instance-kind gpu" if requested == "gpu" else "NVML sees a GPU"
    if _CUDA in onnxruntime_providers:
        return InstanceKinds(KIND_GPU, KIND_GPU, f"models run on the GPU: {why}")
    return InstanceKinds(
        KIND_GPU, KIND_CPU,
        f"native backends run on the GPU ({why}), but the Python ONNX runner runs on the CPU: onnxruntime here "
        f"offers only {list(onnxruntime_providers)} (install onnxruntime-gpu with a matching CUDA for {_CUDA})",
    )


def onnxruntime_providers() -> list[str]:
    """The execution providers of the onnxruntime the stubs import (the gateway's own environment)."""
    try:
        import onnxruntime
    except ImportError:
        return []
    return list(onnxruntime.get_available_providers())


def resolve_instance_kinds(requested: str, gpu_present: bool) -> InstanceKinds:
    wants_gpu = requested == "gpu" or (requested == "auto" and gpu_present)
    kinds = choose_instance_kinds(requested, gpu_present, onnxruntime_providers() if wants_gpu else [])
    log.info("instance_kind.chosen", extra={"native": kinds.native, "runner": kinds.runner, "reason": kinds.reason})
    return kinds
