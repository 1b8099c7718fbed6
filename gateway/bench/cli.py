"""The `bench` subcommand's arguments and entry point.

Only the standard library is imported at module level: `mme-gateway serve` registers this subcommand
too, and must not pay for matplotlib or aiohttp at start.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gateway.bench.config import BenchConfig

log = logging.getLogger("gateway.bench")


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="benchmark config (YAML or JSON), e.g. benchmarks/bench-demo.yaml")
    parser.add_argument("--out", default="bench-results", help="results directory (default: bench-results)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--log-level", default="info", help="debug, info, warning or error")


def execute(cfg: BenchConfig, out: Path, progress: bool = True) -> dict[str, Path]:
    """Measure, analyse, write raw results, summaries, charts and the HTML report into `out`."""
    from tqdm.contrib.logging import logging_redirect_tqdm

    from gateway.bench.analysis import analyse
    from gateway.bench.charts import draw_all
    from gateway.bench.report import write_report
    from gateway.bench.results import write_results
    from gateway.bench.runner import BenchRunner

    out.mkdir(parents=True, exist_ok=True)
    runner = BenchRunner(cfg, out, progress)
    try:
        with logging_redirect_tqdm():
            data = asyncio.run(runner.run())
        analysis = analyse(data)  # meanwhile the last gateways finish stopping
        files = write_results(data, analysis, out)
        charts = draw_all(data, analysis, out / "charts")
        files.update({f"chart_{k}": v for k, v in charts.items()})
        files["report"] = write_report(data, analysis, charts, out)
    finally:
        runner.close()
    log.info("bench.report", extra={"report": str(files["report"]), "recommendation":
                                    analysis.recommendation.get("reason"), "wall_s": round(data.wall_s, 1)})
    return files


def run(args: argparse.Namespace) -> int:
    from gateway import logs
    from gateway.bench.config import BenchConfigError, load_config
    from gateway.bench.launcher import LaunchError

    logs.configure(args.log_level)
    try:
        cfg = load_config(args.config)
        files = execute(cfg, Path(args.out), progress=not args.no_progress)
    except BenchConfigError as exc:
        print(f"mme-gateway bench: bad config: {exc}", file=sys.stderr)
        return 2
    except LaunchError as exc:
        print(f"mme-gateway bench: {exc}", file=sys.stderr)
        return 1
    print(files["report"])
    return 0
