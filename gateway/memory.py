"""Memory probes and process discovery: how much memory the device and given processes really use.

Admission control needs two numbers: how much memory the device has left, and how much a model takes once
loaded. The first comes from a probe (NVML on a GPU machine, /proc on a CPU-only one). The second is only
known after a load, by measuring the processes Triton started for the model (its Python-backend stub
processes), which this module finds; `gateway.footprint` does the measuring and `gateway.ledger` remembers.

Everything here reads /proc directly (Linux only) rather than depending on psutil.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol, runtime_checkable

log = logging.getLogger(__name__)

MIB = 1024 * 1024
_PROC = Path("/proc")


class ProbeUnavailable(RuntimeError):
    """The requested probe cannot work here (no NVML library, no driver, or no GPU)."""


@dataclass(frozen=True)
class DeviceMemory:
    """A snapshot of one device's memory, in bytes."""

    total_bytes: int
    used_bytes: int
    free_bytes: int


@runtime_checkable
class MemoryProbe(Protocol):
    """Reads device-wide memory and the memory attributable to given processes."""

    kind: str  # "nvml" or "host"

    def device(self) -> DeviceMemory:
        """Memory of the whole device."""
        ...

    def process_bytes(self, pids: Iterable[int]) -> int:
        """Memory these processes use on the device; pids that are gone count 0."""
        ...

    def per_process(self, pids: Iterable[int]) -> dict[int, int]:
        """Memory of each of these processes on the device, read in one pass; pids that are gone count 0."""
        ...


# --------------------------------------------------------------------------------------------------- host


def _read_text(path: Path) -> str | None:
    """File contents, or None when the process/file vanished or is unreadable (processes exit at any time)."""
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None


def _meminfo_kib(text: str, field: str) -> int | None:
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        if name == field:
            parts = rest.split()
            if parts:
                return int(parts[0])
    return None


class HostProbe:
    """Host RAM as the "device": for CPU-only machines, where models live in the stubs' resident memory.

    Free memory is MemAvailable, not MemFree: page cache is reclaimable and counting it as used would make
    a machine with a warm disk cache look full.
    """

    kind: str = "host"

    def __init__(self, proc_root: Path = _PROC) -> None:
        self._proc = proc_root

    def device(self) -> DeviceMemory:
        text = _read_text(self._proc / "meminfo")
        if text is None:
            raise ProbeUnavailable(f"cannot read {self._proc / 'meminfo'}")
        total = _meminfo_kib(text, "MemTotal")
        available = _meminfo_kib(text, "MemAvailable")
        if total is None:
            raise ProbeUnavailable("MemTotal missing from /proc/meminfo")
        if available is None:  # kernels before 3.14: approximate with free + page cache
            available = (_meminfo_kib(text, "MemFree") or 0) + (_meminfo_kib(text, "Cached") or 0)
        total_b, free_b = total * 1024, min(available, total) * 1024
        return DeviceMemory(total_bytes=total_b, used_bytes=total_b - free_b, free_bytes=free_b)

    def process_bytes(self, pids: Iterable[int]) -> int:
        """Summed VmRSS of the processes; gone pids and kernel threads (no VmRSS) count 0.

        RSS double-counts pages shared between processes (the Python runtime's libraries); that errs on the
        side of over-estimating a model, which is the safe side for admission.
        """
        return sum(self.per_process(pids).values())

    def per_process(self, pids: Iterable[int]) -> dict[int, int]:
        found: dict[int, int] = {}
        for pid in set(pids):
            text = _read_text(self._proc / str(pid) / "status")
            kib = _meminfo_kib(text, "VmRSS") if text is not None else None
            found[pid] = (kib or 0) * 1024
        return found


# --------------------------------------------------------------------------------------------------- nvml


def _import_pynvml() -> ModuleType:
    """pynvml imported on demand, so a CPU-only install never needs the NVML library to import this module."""
    try:
        import pynvml
    except ImportError as exc:  # pragma: no cover - nvidia-ml-py is a declared dependency
        raise ProbeUnavailable("pynvml (nvidia-ml-py) is not installed") from exc
    return pynvml


class NvmlProbe:
    """GPU memory through NVML, for one GPU (index 0 by default).

    NVML is initialised lazily on first use, so constructing a probe never fails; the first call raises
    ProbeUnavailable if there is no driver or no such GPU. Call close() (or use it as a context manager) to
    release NVML; it is idempotent.

    Per-process numbers come from nvmlDeviceGetComputeRunningProcesses. NVML reports pids in the host's pid
    namespace: inside a container without the host pid namespace they may not match our /proc pids, in which
    case process_bytes returns 0 and callers should fall back to device-wide deltas.
    """

    kind: str = "nvml"

    def __init__(self, index: int = 0) -> None:
        self._index = index
        self._nvml: ModuleType | None = None
        self._handle: Any = None
        self._lock = threading.Lock()

    def _ensure(self) -> tuple[ModuleType, Any]:
        with self._lock:
            if self._nvml is not None:
                return self._nvml, self._handle
            nvml = _import_pynvml()
            try:
                nvml.nvmlInit()
            except nvml.NVMLError as exc:
                raise ProbeUnavailable(f"NVML failed to initialise: {exc}") from exc
            try:
                count = nvml.nvmlDeviceGetCount()
                if self._index >= count:
                    raise ProbeUnavailable(f"NVML sees {count} GPU(s); GPU index {self._index} does not exist")
                handle = nvml.nvmlDeviceGetHandleByIndex(self._index)
            except nvml.NVMLError as exc:
                nvml.nvmlShutdown()
                raise ProbeUnavailable(f"NVML cannot open GPU {self._index}: {exc}") from exc
            except ProbeUnavailable:
                nvml.nvmlShutdown()
                raise
            self._nvml, self._handle = nvml, handle
            return nvml, handle

    def device(self) -> DeviceMemory:
        nvml, handle = self._ensure()
        info = nvml.nvmlDeviceGetMemoryInfo(handle)
        return DeviceMemory(total_bytes=int(info.total), used_bytes=int(info.used), free_bytes=int(info.free))

    def process_bytes(self, pids: Iterable[int]) -> int:
        """Summed usedGpuMemory of the matching compute processes; None (not reported, e.g. MIG) counts 0."""
        return sum(self.per_process(pids).values())

    def per_process(self, pids: Iterable[int]) -> dict[int, int]:
        """One NVML query for all of them, however many models are measured."""
        found = dict.fromkeys(set(pids), 0)
        if not found:
            return found
        nvml, handle = self._ensure()
        for proc in nvml.nvmlDeviceGetComputeRunningProcesses(handle):
            if proc.pid in found:
                found[proc.pid] += int(proc.usedGpuMemory or 0)
        return found

    def close(self) -> None:
        with self._lock:
            if self._nvml is not None:
                try:
                    self._nvml.nvmlShutdown()
                except self._nvml.NVMLError as exc:
                    log.warning("nvmlShutdown failed: %s", exc)
                self._nvml, self._handle = None, None

    def __enter__(self) -> NvmlProbe:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def detect_probe(prefer: str = "auto") -> MemoryProbe:
    """The probe to use: "nvml" (GPU 0, raising ProbeUnavailable without one), "host", or "auto" (NVML when
    it initialises and sees at least one GPU, host RAM otherwise)."""
    choice = prefer.strip().lower()
    if choice == "host":
        return HostProbe()
    if choice not in ("auto", "nvml"):
        raise ValueError(f"unknown memory probe {prefer!r}; valid probes: auto, nvml, host")
    probe = NvmlProbe()
    try:
        probe.device()  # forces init and a real read, so a half-working NVML is caught here
    except ProbeUnavailable as exc:
        if choice == "nvml":
            raise ProbeUnavailable(f"memory probe 'nvml' requested but unusable: {exc}") from exc
        log.info("no usable GPU (%s); measuring host memory instead", exc)
        return HostProbe()
    except Exception as exc:  # any other NVML failure (e.g. NVMLError from GetMemoryInfo)
        probe.close()
        if choice == "nvml":
            raise ProbeUnavailable(f"memory probe 'nvml' requested but unusable: {exc}") from exc
        log.warning("NVML initialised but cannot read GPU memory (%s); measuring host memory instead", exc)
        return HostProbe()
    return probe


# -------------------------------------------------------------------------------------------- processes


def _children_files_supported(pid: int) -> bool:
    """Whether the kernel exposes /proc/<pid>/task/<tid>/children (CONFIG_PROC_CHILDREN; not everywhere)."""
    return (_PROC / str(pid) / "task" / str(pid) / "children").exists()


def _children_via_task_files(pid: int) -> list[int]:
    children: list[int] = []
    try:
        tasks = list((_PROC / str(pid) / "task").iterdir())
    except OSError:
        return children
    for task in tasks:
        text = _read_text(task / "children")
        if text:
            children.extend(int(tok) for tok in text.split())
    return children


def _parent_pid(stat_text: str) -> int | None:
    """ppid from /proc/<pid>/stat; the comm field may hold spaces and ')' so split after the last ')'."""
    _, sep, rest = stat_text.rpartition(")")
    fields = rest.split()
    if not sep or len(fields) < 2:
        return None
    try:
        return int(fields[1])
    except ValueError:
        return None


def _children_map_by_scan() -> dict[int, list[int]]:
    """parent pid -> child pids, from every /proc/<pid>/stat: the portable (and slower) way."""
    children: dict[int, list[int]] = {}
    try:
        entries = list(_PROC.iterdir())
    except OSError:
        return children
    for entry in entries:
        if not entry.name.isdigit():
            continue
        text = _read_text(entry / "stat")
        if text is None:
            continue
        ppid = _parent_pid(text)
        if ppid is not None:
            children.setdefault(ppid, []).append(int(entry.name))
    return children


def descendant_pids(root_pid: int) -> list[int]:
    """All live descendants of `root_pid` (not itself), parents before children.

    Used to find Triton's Python-backend stub processes, which are Triton's children. Reads
    /proc/<pid>/task/*/children where the kernel provides it, else scans every /proc/<pid>/stat for ppids.
    The process tree changes while we read it: a process that exits mid-walk is simply skipped.
    """
    if not (_PROC / str(root_pid)).exists():
        return []
    children_of: Callable[[int], list[int]]
    if _children_files_supported(root_pid):
        children_of = _children_via_task_files
    else:
        table = _children_map_by_scan()
        children_of = lambda pid: table.get(pid, [])  # noqa: E731

    found: list[int] = []
    seen = {root_pid}
    queue = [root_pid]
    while queue:
        pid = queue.pop(0)
        for child in children_of(pid):
            if child not in seen:  # guards against pid reuse making a cycle mid-walk
                seen.add(child)
                found.append(child)
                queue.append(child)
    return found


def _cmdline(pid: int) -> str | None:
    try:
        raw = (_PROC / str(pid) / "cmdline").read_bytes()
    except OSError:
        return None
    return raw.rstrip(b"\0").replace(b"\0", b" ").decode("utf-8", errors="surrogateescape")


def stub_pids_by_model(root_pid: int, repo: Path) -> dict[str, list[int]]:
    """Descendants of `root_pid` that serve a model of the repository `repo`, by model directory name.

    A Triton Python-backend stub is started with its model's path on the command line
    (`<repo>/<model name>/1/model.py`), so one walk of the process tree attributes every stub to its model,
    however many models are loaded.
    """
    marker = f"{repo}/"
    found: dict[str, list[int]] = {}
    for pid in descendant_pids(root_pid):
        cmdline = _cmdline(pid)
        if cmdline is None:
            continue
        start = cmdline.find(marker)
        if start < 0:
            continue
        name = cmdline[start + len(marker):].split("/", 1)[0].split(" ", 1)[0]
        if name:
            found.setdefault(name, []).append(pid)
    return found
