"""Every benchmark runs in ``--quick`` mode and prints its table of figures.

The figures themselves are not checked: the machine running the tests may be
busy, so no timing is asserted. The test only keeps the benchmarks from rotting
as the code they measure changes.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bench.stack import TABLE_HEADER

REPOSITORY = Path(__file__).resolve().parents[2]
BENCHMARKS = ("ingest_rate", "dispatch_rate", "release_fleet")

pytestmark = [pytest.mark.stack, pytest.mark.timeout(900)]


RUN_TIMEOUT_S = 780
STOP_TIMEOUT_S = 60


@pytest.mark.parametrize("name", BENCHMARKS)
def test_benchmark_quick_prints_table(name: str) -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", f"bench.{name}", "--quick"],
        cwd=REPOSITORY,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        # SIGTERM lets the benchmark stop the servers of its private stack.
        process.terminate()
        stdout, stderr = process.communicate(timeout=STOP_TIMEOUT_S)
        pytest.fail(f"bench.{name} --quick ran longer than {RUN_TIMEOUT_S} s")
    output = stdout + stderr
    assert process.returncode == 0, output
    assert f"### {name}:" in stdout, output
    assert TABLE_HEADER in stdout, output
    assert "| ratio |" in stdout, output
