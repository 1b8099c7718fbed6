"""Instance profiles as data: memory, vCPUs, NVMe and price of the machine shapes the gateway targets.

The numbers live in `gateway/data/profiles.json` (one file, so prices are updated in one place); an
operator can pass another file. A GPU profile's model memory is GPU memory; a CPU profile's is host RAM.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

DEFAULT_PROFILES = Path(__file__).with_name("data") / "profiles.json"
GIB = 1 << 30
GB = 1000**3


@dataclass(frozen=True)
class InstanceProfile:
    name: str
    vcpus: int
    ram_gib: float
    gpu: str | None
    gpu_gib: float
    nvme_gb: float | None
    price_per_hour: float

    @property
    def model_memory_bytes(self) -> int:
        """Memory that loaded models draw on: the GPU's when there is one, else the host's."""
        return int((self.gpu_gib if self.gpu else self.ram_gib) * GIB)

    @property
    def nvme_bytes(self) -> int | None:
        return int(self.nvme_gb * GB) if self.nvme_gb else None


def load_profiles(path: Path = DEFAULT_PROFILES) -> dict[str, InstanceProfile]:
    data = json.loads(path.read_text())["profiles"]
    return {name: InstanceProfile(name=name, **fields) for name, fields in data.items()}


def get_profile(name: str, path: Path = DEFAULT_PROFILES) -> InstanceProfile:
    profiles = load_profiles(path)
    try:
        return profiles[name]
    except KeyError:
        raise ValueError(f"unknown instance type {name!r}; known: {', '.join(sorted(profiles))}") from None
