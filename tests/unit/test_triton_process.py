"""The embedded Triton's start-up guard: its Python backend predates numpy 2."""

from __future__ import annotations

import pytest

from gateway.triton.process import stub_numpy_problem


@pytest.mark.parametrize(("version", "ok"), [("1.26.4", True), ("1.24.0", True), ("2.0.0", False), ("2.3.1", False)])
def test_numpy_guard(version: str, ok: bool) -> None:
    problem = stub_numpy_problem(version)
    assert (problem is None) == ok
    if not ok:
        assert "numpy<2" in problem and version in problem


def test_numpy_guard_without_numpy() -> None:
    assert "not installed" in (stub_numpy_problem(None) or "")
