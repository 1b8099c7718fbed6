"""Cache benchmark: LRU against GreedyDual-Size-Frequency on Zipf traces, side by side in one run.

The trace is replayed through the real ModelManager and the real policy code (single flight, leases,
admission, eviction, footprint accounting). Triton and the store are replaced by a timing model, so 200
models and tens of thousands of requests run in seconds: a load "takes" a time proportional to the model's
size (plus a fixed cost) and that time is slept scaled down by --time-scale. Model sizes are log-uniform,
so the size- and cost-aware policy has something to be aware of.

A second scenario starts cold: nothing has ever been measured (an empty ledger), 64 clients at once, and
the artifacts say nothing about the memory their models take. It prints the peak of committed memory over
the budget, read after every step of the event loop, beside the hit ratio.

    python benchmarks/cache_policies.py              # 200 models, room for about 20, alpha 0.6 / 0.9 / 1.2
"""

from __future__ import annotations

import argparse
import asyncio
import math
import random
import sys
import tempfile
import time
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.budget import BudgetConfig  # noqa: E402
from gateway.config import Settings  # noqa: E402
from gateway.manager import ManagerConfig, ModelManager  # noqa: E402
from gateway.ledger import FootprintLedger  # noqa: E402
from gateway.memory import DeviceMemory  # noqa: E402
from gateway.metrics import Metrics  # noqa: E402
from gateway.naming import ModelKey, model_key  # noqa: E402
from gateway.policy import make_policy  # noqa: E402
from gateway.staging import StagedArtifact  # noqa: E402
from gateway.store.base import ObjectInfo  # noqa: E402
from mme_bench.workload import zipf_weights  # noqa: E402

MB = 1_000_000


@dataclass(frozen=True)
class ModelSpec:
    key: str
    footprint: int  # bytes in memory once loaded
    load_s: float  # modelled time to download and load


class TimingStore:
    """The store of the timing model: every key exists, with a fixed ETag."""

    url = "timing://models"

    def __init__(self, specs: dict[str, ModelSpec]) -> None:
        self.specs = specs

    def head(self, key: str) -> ObjectInfo:
        return ObjectInfo(key=key, etag=f"etag-{key}", size=self.specs[key].footprint // self.size_ratio)

    size_ratio = 4  # artifact bytes = footprint / this: the cold-start scenario makes artifacts say nothing

    def fetch(self, info: ObjectInfo, dest: Path, progress: object = None) -> None:
        raise AssertionError("the timing staging area never fetches")

    def list_keys(self, limit: int = 1000) -> list[ObjectInfo]:
        return []


class TimingStaging:
    """Stands in for the NVMe tier: staging is instant and always succeeds (disk is not what is measured)."""

    budget_bytes: int | None = None

    def __init__(self, store: TimingStore) -> None:
        self.store = store
        self.staged_names: dict[str, StagedArtifact] = {}

    def staged(self, name: str) -> StagedArtifact | None:
        return self.staged_names.get(name)

    def stage(self, model: ModelKey, info: ObjectInfo, source: object = None,
              protected: object = ()) -> StagedArtifact:
        artifact = StagedArtifact(key=model.key, triton_name=model.triton_name, namespace=model.namespace,
                                  etag=info.etag, artifact_bytes=info.size, disk_bytes=info.size, framework="onnx",
                                  backend="python", instance_count=1, staged_at=time.time(), download_s=0.0)
        self.staged_names[model.triton_name] = artifact
        return artifact

    def make_room(self, need: int, protected: object) -> list[str]:
        return []

    def used_bytes(self) -> int:
        return 0

    def touch(self, name: str) -> None:
        pass

    def all_staged(self) -> list[StagedArtifact]:
        return list(self.staged_names.values())

    def remove(self, name: str) -> None:
        self.staged_names.pop(name, None)


class TimingTriton:
    """Stands in for Triton's control API: a load sleeps the model's modelled time, scaled down."""

    grpc_url = "timing"

    def __init__(self, specs_by_name: dict[str, ModelSpec], time_scale: float) -> None:
        self.specs_by_name = specs_by_name
        self.time_scale = time_scale
        self.loaded_bytes = 0
        self.modelled_load_s = 0.0
        self.resident: set[str] = set()

    async def load(self, name: str) -> None:
        spec = self.specs_by_name[name]
        self.loaded_bytes += spec.footprint
        self.modelled_load_s += spec.load_s
        await asyncio.sleep(spec.load_s * self.time_scale)
        self.resident.add(name)

    async def unload(self, name: str) -> None:
        self.resident.discard(name)
        await asyncio.sleep(0)

    async def wait_unloaded(self, name: str, timeout_s: float = 30.0, poll_s: float = 0.05) -> bool:
        return True

    async def index(self) -> list:
        return []


class NoProbe:
    """The timing model has no device: the budget is the only limit (BudgetConfig.device_check is off)."""

    kind = "timing"

    def device(self) -> DeviceMemory:
        return DeviceMemory(total_bytes=0, used_bytes=0, free_bytes=0)

    def process_bytes(self, pids: object) -> int:
        return 0

    def per_process(self, pids: object) -> dict[int, int]:
        return {}


class TimingMeter:
    """A loaded model measures its true footprint, as a stub process would."""

    def __init__(self, triton: TimingTriton) -> None:
        self.triton = triton

    def stub_bytes(self, names: Collection[str]) -> dict[str, int]:
        return {n: self.triton.specs_by_name[n].footprint for n in names if n in self.triton.resident}

    def process_wide_bytes(self) -> int | None:
        return None


def make_specs(n: int, rng: random.Random) -> list[ModelSpec]:
    specs = []
    for i in range(n):
        footprint = int(math.exp(rng.uniform(math.log(20 * MB), math.log(800 * MB))))
        specs.append(ModelSpec(key=f"m{i:03d}.tar.gz", footprint=footprint, load_s=0.5 + footprint / (200 * MB)))
    rng.shuffle(specs)  # popularity rank independent of size
    return specs


def zipf_trace(n_models: int, alpha: float, length: int, rng: random.Random) -> list[int]:
    return rng.choices(range(n_models), weights=zipf_weights(n_models, alpha).tolist(), k=length)


async def replay(policy: str, specs: list[ModelSpec], trace: list[int], budget: int, scale: float,
                 clients: int = 1, measured_before: bool = True) -> dict:
    """Replay `trace` split over `clients` concurrent callers; with `measured_before`, every footprint is in
    the ledger already (admission uses the true sizes), else the ledger starts empty and artifacts are tiny."""
    store = TimingStore({s.key: s for s in specs})
    staging = TimingStaging(store)
    metrics = Metrics()
    if not measured_before:
        store.size_ratio = 10_000  # a 1 KB-ish artifact for a model of hundreds of MB
    with tempfile.TemporaryDirectory() as tmp:
        ledger = FootprintLedger(Path(tmp) / "ledger.json")
        for spec in specs if measured_before else []:
            ledger.record(f"etag-{spec.key}", spec.footprint, "python/onnx/KIND_CPU")
        triton = TimingTriton({model_key(s.key, store.url).triton_name: s for s in specs}, scale)
        manager = ModelManager(store, staging, triton, metrics, policy=make_policy(policy),
                               probe=NoProbe(), meter=TimingMeter(triton), ledger=ledger,
                               config=ManagerConfig(etag_ttl_s=1e9, wait_timeout_s=1e9),
                               budget=BudgetConfig.from_settings(Settings(store=store.url), memory_budget_bytes=budget,
                                                                 device_check=False, admission_wait_s=1e9,
                                                                 # wall seconds are 10,000 modelled ones here:
                                                                 # a 2 s churn guard would make every model young
                                                                 min_residency_s=0.0))
        peak = [0]

        async def watch() -> None:  # every step of the event loop: nothing between two awaits is missed
            while True:
                peak[0] = max(peak[0], manager.committed_bytes())
                await asyncio.sleep(0)

        async def client(part: list[int]) -> None:
            for index in part:
                async with manager.lease(specs[index].key):
                    await asyncio.sleep(0)

        watcher = asyncio.create_task(watch())
        started = time.monotonic()
        await asyncio.gather(*(client(trace[i::clients]) for i in range(clients)))
        wall = time.monotonic() - started
        watcher.cancel()
    hits = metrics.cache_requests.labels(result="hit")._value.get()
    misses = metrics.cache_requests.labels(result="miss")._value.get()
    return {
        "hit_ratio": hits / (hits + misses),
        "loaded_gb": triton.loaded_bytes / 1e9,
        "modelled_load_s": triton.modelled_load_s,
        "evictions": sum(metrics.evictions.labels(tier="memory", reason=r)._value.get()
                         for r in ("memory_pressure", "measured_over_budget")),
        "peak_over_budget": max(peak[0] - budget, 0),
        "wall_s": wall,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=int, default=200)
    parser.add_argument("--room", type=int, default=20, help="budget = this many models of the mean size")
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.6, 0.9, 1.2])
    parser.add_argument("--time-scale", type=float, default=1e-4, help="wall seconds slept per modelled second")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--clients", type=int, default=64, help="concurrent clients in the cold-start scenario")
    args = parser.parse_args()

    rng = random.Random(args.seed)
    specs = make_specs(args.models, rng)
    mean = sum(s.footprint for s in specs) / len(specs)
    budget = int(mean * args.room)
    print("Cache policies replayed through the real ModelManager and policy code; Triton and the store are a")
    print(f"TIMING MODEL (load = 0.5 s + size / 200 MB/s, slept x{args.time_scale:g}). {args.models} models, "
          f"sizes 20-800 MB log-uniform (mean {mean / MB:.0f} MB),")
    print(f"budget {budget / 1e9:.2f} GB (room for ~{args.room} mean-size models), {args.requests} requests per trace.\n")
    header = f"{'alpha':>5} | {'policy':>6} | {'hit ratio':>9} | {'GB loaded':>9} | {'load time (modelled s)':>22} | {'evictions':>9}"
    print(header)
    print("-" * len(header))
    for alpha in args.alphas:
        trace = zipf_trace(args.models, alpha, args.requests, random.Random(args.seed + int(alpha * 100)))
        results = {p: asyncio.run(replay(p, specs, trace, budget, args.time_scale)) for p in ("lru", "gdsf")}
        for policy, r in results.items():
            print(f"{alpha:>5} | {policy:>6} | {r['hit_ratio']:>9.3f} | {r['loaded_gb']:>9.1f} | "
                  f"{r['modelled_load_s']:>22.0f} | {r['evictions']:>9.0f}")
        lru, gdsf = results["lru"], results["gdsf"]
        print(f"{'':>5} | {'ratio':>6} | {gdsf['hit_ratio'] / lru['hit_ratio']:>8.2f}x | "
              f"{gdsf['loaded_gb'] / lru['loaded_gb']:>8.2f}x | {gdsf['modelled_load_s'] / lru['modelled_load_s']:>21.2f}x |"
              f"  (gdsf / lru)")

    print(f"\nConcurrent cold start: an empty ledger, artifacts 1/10,000 of their models' memory, {args.clients} clients "
          f"at once, alpha 0.9, {args.requests} requests.")
    print("Peak over budget is committed memory (loaded, loading, unloading) minus the budget, at its highest.\n")
    header = (f"{'sizes':>10} | {'policy':>6} | {'hit ratio':>9} | {'evictions':>9} | {'peak over budget (MB)':>21} | "
              f"{'peak / budget':>13}")
    print(header)
    print("-" * len(header))
    trace = zipf_trace(args.models, 0.9, args.requests, random.Random(args.seed + 90))
    uniform = [ModelSpec(key=s.key, footprint=250 * MB, load_s=0.5 + 250 / 200) for s in specs]
    for sizes, population in (("20-800 MB", specs), ("all 250 MB", uniform)):
        for policy in ("lru", "gdsf"):
            r = asyncio.run(replay(policy, population, trace, budget, args.time_scale, args.clients,
                                   measured_before=False))
            print(f"{sizes:>10} | {policy:>6} | {r['hit_ratio']:>9.3f} | {r['evictions']:>9.0f} | "
                  f"{r['peak_over_budget'] / MB:>21.1f} | {1 + r['peak_over_budget'] / budget:>13.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
