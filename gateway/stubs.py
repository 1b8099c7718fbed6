"""The embedded Triton's Python-backend stub processes, per model: found, and killed when a model is wedged.

A stub that hangs in `initialize` keeps its model LOADING in Triton for good, and one that hangs or died in
`execute` turns every request for its model into a wait with no end: Triton neither times the call out nor
restarts the stub. Killing the model's stubs is what frees Triton from it (the load fails, the queued
requests fail), after which the model can be unloaded and loaded again. Only the embedded Triton's stubs are
visible; in front of an external Triton this does nothing and the gateway relies on Triton's own unload.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Callable
from pathlib import Path

from gateway.memory import stub_pids_by_model

log = logging.getLogger(__name__)


class Stubs:
    def __init__(self, triton_pid: Callable[[], int | None] | None, repo: Path) -> None:
        self._triton_pid = triton_pid
        self.repo = repo

    def pids(self, name: str) -> list[int]:
        pid = self._triton_pid() if self._triton_pid else None
        return [] if pid is None else stub_pids_by_model(pid, self.repo).get(name, [])

    def kill(self, name: str) -> int:
        """SIGKILL every stub of model `name`; how many there were."""
        killed = 0
        for pid in self.pids(name):
            try:
                os.kill(pid, signal.SIGKILL)
                killed += 1
            except ProcessLookupError:
                pass
        if killed:
            log.warning("model.stubs_killed", extra={"triton_name": name, "stubs": killed})
        return killed
