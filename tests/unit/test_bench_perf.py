"""perf_analyzer's CSV, and the pass being skipped with a reason when it cannot run."""

from __future__ import annotations

from pathlib import Path

import pytest

from mme_bench.config import PerfAnalyzerConfig
from mme_bench.perf import parse_pa_csv, run_perf_analyzer
from gateway.triton.process import free_port

# As perf_analyzer 2.48 writes it: microseconds, rows sorted by throughput rather than concurrency.
PA_CSV = """\
Concurrency,Inferences/Second,Client Send,Network+Server Send/Recv,Server Queue,Server Compute Input,\
Server Compute Infer,Server Compute Output,Client Recv,p50 latency,p90 latency,p95 latency,p99 latency
1,2074.4,57,51,24,28,309,4,0,421,680,745,1277
3,2300.5,75,110,400,30,330,6,0,1200,1500,1700,2500
2,2414.05,70,102,288,28,324,6,0,751,1147,1261,1856
"""


def test_csv_rows_sorted_by_concurrency_in_milliseconds(tmp_path: Path) -> None:
    path = tmp_path / "pa.csv"
    path.write_text(PA_CSV)
    rows = parse_pa_csv(path)
    assert [r["concurrency"] for r in rows] == [1, 2, 3]
    two = rows[1]
    assert two["inferences_per_s"] == 2414.05
    assert two["p50_latency_ms"] == pytest.approx(0.751) and two["p99_latency_ms"] == pytest.approx(1.856)
    assert two["server_queue_ms"] == pytest.approx(0.288)
    assert two["network_server_send_recv_ms"] == pytest.approx(0.102)


def test_csv_without_the_expected_columns_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "pa.csv"
    path.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="lacks columns"):
        parse_pa_csv(path)


def test_pass_is_skipped_when_the_gateway_does_not_answer_model_metadata(tmp_path: Path) -> None:
    result = run_perf_analyzer(PerfAnalyzerConfig(enabled=True, binary=__file__), "t",
                               f"http://127.0.0.1:{free_port()}", "a.tar.gz", tmp_path)
    assert result.status == "skipped" and "/v2/models/a.tar.gz" in result.note and not result.rows


def test_pass_is_skipped_without_the_binary(tmp_path: Path) -> None:
    result = run_perf_analyzer(PerfAnalyzerConfig(enabled=True, binary=str(tmp_path / "nope")), "t",
                               "http://127.0.0.1:1", "a.tar.gz", tmp_path)
    assert result.status == "skipped" and "perf_analyzer not found" in result.note
