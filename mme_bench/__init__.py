"""`mme-gateway bench`: benchmark gateways and report latency, cache behaviour and cost.

Modules, one job each: `config` (the validated config file), `workload` (Zipf popularity, arrivals,
payloads), `models` (the model set, synthetic artifacts), `launcher` (gateway subprocesses), `client`
(one invocation, routes, error classes), `scrape` (the gateway's /metrics), `loadgen` (sequential,
closed- and open-loop drivers), `perf` (perf_analyzer passes), `runner` (sessions), `stats`, `cost`,
`analysis` (tables), `charts`, `results` (the directory) and `report` (the HTML page).
"""

from __future__ import annotations

from pathlib import Path


def run_benchmark(config_path: str | Path, out_dir: str | Path, progress: bool = True) -> dict[str, Path]:
    """Run the benchmark a config file describes and write the results directory; returns name -> path."""
    from mme_bench.cli import execute
    from mme_bench.config import load_config

    return execute(load_config(config_path), Path(out_dir), progress)
