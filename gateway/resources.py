"""Resolve the gateway's budgets: memory for loaded models, NVMe bytes, concurrent invocations.

Sources, strongest first: explicit flags, the instance profile (`--instance-type`), the real machine. A
profile is checked against the machine at start: where the machine has less, the gateway warns and uses
the smaller number, so a profile never promises memory that is not there.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from gateway.config import Settings
from gateway.memory import MemoryProbe
from gateway.profiles import InstanceProfile, get_profile
from gateway.staging import dir_bytes

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Resources:
    memory_budget_bytes: int
    disk_budget_bytes: int
    max_concurrency: int | None
    profile: str | None


def _smaller(what: str, profile_value: int, machine_value: int, profile: str) -> int:
    if machine_value < profile_value:
        log.warning(
            "resources.profile_exceeds_machine",
            extra={"what": what, "profile": profile, "profile_bytes": profile_value, "machine_bytes": machine_value},
        )
        return machine_value
    return profile_value


def resolve(settings: Settings, probe: MemoryProbe, cache_dir: Path) -> Resources:
    machine_memory = probe.device().total_bytes
    cache_dir.mkdir(parents=True, exist_ok=True)
    disk = shutil.disk_usage(cache_dir)
    machine_disk = disk.free + dir_bytes(cache_dir)  # what the cache holds already is ours to budget
    profile: InstanceProfile | None = None
    if settings.instance_type and settings.instance_type != "auto":
        profile = get_profile(settings.instance_type)

    if profile is not None:
        memory = _smaller("memory", profile.model_memory_bytes, machine_memory, profile.name)
        disk_bytes = _smaller("disk", profile.nvme_bytes or machine_disk, machine_disk, profile.name)
        concurrency: int | None = profile.vcpus
    else:
        memory, disk_bytes = machine_memory, machine_disk
        concurrency = os.cpu_count() if settings.instance_type == "auto" else None

    if settings.memory_budget_bytes is not None:
        budget = settings.memory_budget_bytes  # an explicit budget is taken as given, slack included
    else:
        budget = int(memory * (1.0 - settings.memory_slack))
    resources = Resources(
        memory_budget_bytes=budget,
        disk_budget_bytes=settings.disk_budget_bytes if settings.disk_budget_bytes is not None else int(disk_bytes * 0.9),
        max_concurrency=settings.max_concurrency if settings.max_concurrency is not None else concurrency,
        profile=profile.name if profile else settings.instance_type,
    )
    log.info("resources.resolved", extra={**resources.__dict__, "probe": probe.kind})
    return resources

