"""Optional single-model passes through Triton's perf_analyzer, pointed at the gateway's KServe v2 edge.

perf_analyzer reads `/v2`, `/v2/models/{m}` and `/v2/models/{m}/config` (and `/stats`) before it sends
anything; a gateway that does not answer those makes it fail, so the pass checks `/v2/models/{m}` first
and is skipped with a note that says why. Its CSV (`-f`) has one row per concurrency level, in
microseconds, sorted by throughput rather than concurrency, and it exits 0 even when a later level did
not stabilise, so success is judged by the rows that came back, not by the exit code.
"""

from __future__ import annotations

import csv
import logging
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlparse

from mme_bench.config import PerfAnalyzerConfig

log = logging.getLogger(__name__)

PA_COLUMNS = (
    "Concurrency", "Inferences/Second", "Client Send", "Network+Server Send/Recv", "Server Queue",
    "Server Compute Input", "Server Compute Infer", "Server Compute Output", "Client Recv",
    "p50 latency", "p90 latency", "p95 latency", "p99 latency",
)
_US_COLUMNS = PA_COLUMNS[2:]


@dataclass
class PerfResult:
    target: str
    model: str
    status: str  # ok | skipped | failed
    note: str = ""
    rows: list[dict[str, Any]] = field(default_factory=list)
    raw_csv: Path | None = None


def find_binary(configured: str | None) -> str | None:
    """The configured binary, else perf_analyzer beside this interpreter (the venv's), else on PATH."""
    if configured:
        return configured if Path(configured).exists() or shutil.which(configured) else None
    beside = Path(sys.executable).parent / "perf_analyzer"
    return str(beside) if beside.exists() else shutil.which("perf_analyzer")


def parse_pa_csv(path: Path) -> list[dict[str, Any]]:
    """perf_analyzer's CSV into rows sorted by concurrency, latencies converted to milliseconds."""
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in ("Concurrency", "Inferences/Second", "p99 latency") if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"perf_analyzer CSV lacks columns {missing}")
        rows = []
        for raw in reader:
            if not raw.get("Concurrency"):
                continue
            row: dict[str, Any] = {"concurrency": int(raw["Concurrency"]),
                                   "inferences_per_s": float(raw["Inferences/Second"])}
            for col in _US_COLUMNS:
                if raw.get(col) not in (None, ""):
                    name = col.lower().replace("+", "_").replace("/", "_").replace(" ", "_")
                    row[f"{name}_ms"] = float(raw[col]) / 1000.0
            rows.append(row)
    return sorted(rows, key=lambda r: r["concurrency"])


def perf_command(binary: str, cfg: PerfAnalyzerConfig, model: str, address: str, csv_path: Path,
                 protocol: str = "http") -> list[str]:
    """perf_analyzer's command line for one pass on `model` at `address` (host:port), its CSV into `csv_path`."""
    return [binary, "-m", model, "-i", protocol, "-u", address, "--shape", cfg.shape,
            "-p", str(cfg.measurement_interval_ms), "-s", str(cfg.stability_percentage), "-r", str(cfg.max_trials),
            "--concurrency-range", cfg.concurrency_range, "-f", str(csv_path), *cfg.extra_args]


def _answers_model(url: str, model: str) -> tuple[bool, str]:
    try:
        with urllib.request.urlopen(f"{url}/v2/models/{quote(model, safe='/')}", timeout=10) as resp:
            return resp.status == 200, f"HTTP {resp.status}"
    except urllib.error.HTTPError as err:
        return False, f"HTTP {err.code}"
    except (urllib.error.URLError, OSError) as exc:
        return False, str(exc)


def run_perf_analyzer(cfg: PerfAnalyzerConfig, target: str, url: str, model: str, out_dir: Path) -> PerfResult:
    """One perf_analyzer pass on `model`; never raises for a gateway or tool problem, reports it instead."""
    binary = find_binary(cfg.binary)
    if binary is None:
        return PerfResult(target, model, "skipped", "perf_analyzer not found (make perf-analyzer installs it)")
    ok, why = _answers_model(url, model)
    if not ok:
        return PerfResult(target, model, "skipped", (
            f"the gateway does not answer GET /v2/models/{model} ({why}); perf_analyzer needs /v2, "
            "/v2/models/{m} and /v2/models/{m}/config"))
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = out_dir / f"perf_analyzer_{target}.csv"
    csv_path.unlink(missing_ok=True)
    cmd = perf_command(binary, cfg, model, urlparse(url).netloc, csv_path)
    log.info("bench.perf_analyzer", extra={"target": target, "cmd": " ".join(cmd)})
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=cfg.timeout_s)
    except subprocess.TimeoutExpired:
        return PerfResult(target, model, "failed", f"perf_analyzer ran past {cfg.timeout_s:g}s")
    (out_dir / f"perf_analyzer_{target}.log").write_text(proc.stdout + proc.stderr)
    if not csv_path.exists():
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-3:]
        return PerfResult(target, model, "failed", f"perf_analyzer wrote no CSV (exit {proc.returncode}): "
                                                   + " | ".join(tail))
    try:
        rows = parse_pa_csv(csv_path)
    except ValueError as exc:
        return PerfResult(target, model, "failed", str(exc), raw_csv=csv_path)
    note = "" if rows else "perf_analyzer produced no rows"
    if "error" in proc.stderr.lower() or "failed" in proc.stdout.lower():
        note = (note + " " if note else "") + "perf_analyzer reported problems, see its log"
    return PerfResult(target, model, "ok" if rows else "failed", note, rows, csv_path)
