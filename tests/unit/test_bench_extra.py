"""The benchmark toolkit is an extra: the server never imports it, and `bench` says how to install it."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.helpers import REPO_ROOT

BENCH_ONLY = ("mme_bench", "matplotlib", "yaml", "tqdm")


def _python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)


def test_the_gateway_does_not_import_the_bench_or_its_dependencies() -> None:
    proc = _python("import json, sys; import gateway.app, gateway.cli, gateway.api.http; "
                   f"print(json.dumps([m for m in sys.modules if m.split('.')[0] in {BENCH_ONLY!r}]))")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == []


def test_only_the_bench_command_names_mme_bench() -> None:
    naming = sorted(str(p.relative_to(REPO_ROOT)) for p in (REPO_ROOT / "gateway").rglob("*.py")
                    if "mme_bench" in p.read_text())
    assert naming == ["gateway/cli.py"]


def test_bench_without_the_extra_says_what_to_install() -> None:
    proc = _python("import sys; sys.modules['matplotlib'] = None; from gateway.cli import main; "
                   "sys.exit(main(['bench', 'benchmarks/bench-demo.yaml']))")
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "matplotlib" in lines[0] and "mme-gateway[bench]" in lines[0], proc.stderr
