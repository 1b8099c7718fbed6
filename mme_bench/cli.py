"""What `mme-gateway bench` runs; its arguments are defined in gateway/cli.py.

gateway/cli.py imports this module only when the bench command runs, so the server never loads
matplotlib, pyyaml or tqdm; an ImportError here means the bench extra (`mme-gateway[bench]`) is missing.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

from tqdm.contrib.logging import logging_redirect_tqdm

from gateway import logs
from mme_bench.analysis import analyse
from mme_bench.charts import draw_all
from mme_bench.config import BenchConfig, BenchConfigError, load_config
from mme_bench.launcher import LaunchError
from mme_bench.report import write_report
from mme_bench.results import write_results
from mme_bench.runner import BenchRunner

log = logging.getLogger("mme_bench")


def execute(cfg: BenchConfig, out: Path, progress: bool = True) -> dict[str, Path]:
    """Measure, analyse, write raw results, summaries, charts and the HTML report into `out`."""
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
    """`args` as gateway.cli.add_bench_arguments parses them: config, out, no_progress, log_level."""
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
