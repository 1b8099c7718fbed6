"""Measuring what loaded models really take: their stub processes, or the change around an in-process load.

A Python-backend model lives in its own stub processes, so it is measured there, at any time: right after
its load and again in the background while it serves (models grow: onnxruntime's arena, caches, leaks).
Other backends load inside tritonserver, so only the change of the whole device (NVML) or of Triton's own
RSS (host) around their load can be attributed to them, and only while no other load runs.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from pathlib import Path
from typing import Protocol

from gateway.memory import MemoryProbe, stub_pids_by_model


class Meter(Protocol):
    """What the manager measures models with."""

    def stub_bytes(self, names: Collection[str]) -> dict[str, int]:
        """Memory of each named model's stub processes; a model with no stub found is left out."""
        ...

    def process_wide_bytes(self) -> int | None:
        """What in-process backends grow when they load a model, or None when it cannot be read."""
        ...


class TritonMeter:
    """Measures the models of one Triton: stubs found under its pid by their model directory in `repo`."""

    def __init__(self, probe: MemoryProbe, triton_pid: Callable[[], int | None] | None, repo: Path) -> None:
        self.probe = probe
        self._triton_pid = triton_pid  # None when Triton runs elsewhere: its processes cannot be seen
        self.repo = repo

    def _pid(self) -> int | None:
        return self._triton_pid() if self._triton_pid else None

    @property
    def sees_stubs(self) -> bool:
        """Whether a stub-backed model with no stub found really has none: the embedded Triton is there and
        alive (a Triton that just died took every stub with it; that is the supervisor's business)."""
        pid = self._pid()
        if pid is None:
            return False
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return False
        return state not in ("Z", "X")

    def stub_bytes(self, names: Collection[str]) -> dict[str, int]:
        pid = self._pid()
        if pid is None or not names:
            return {}
        stubs = {name: pids for name, pids in stub_pids_by_model(pid, self.repo).items() if name in names}
        per_pid = self.probe.per_process([p for pids in stubs.values() for p in pids])
        return {name: sum(per_pid.get(p, 0) for p in pids) for name, pids in stubs.items()}

    def process_wide_bytes(self) -> int | None:
        """GPU memory of the whole device (NVML), or the RSS of tritonserver itself on the host."""
        if self.probe.kind == "nvml":
            return self.probe.device().used_bytes
        pid = self._pid()
        return self.probe.process_bytes([pid]) if pid else None
