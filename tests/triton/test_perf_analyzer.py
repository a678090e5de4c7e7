"""perf_analyzer (installed by scripts/perf_analyzer.sh where missing) measures the served model."""

from __future__ import annotations

import csv
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("inputs", ["text.json", "page.json"])
def test_perf_analyzer_sweeps_concurrency_over_grpc_streaming(server, tmp_path, inputs):
    out = tmp_path / "sweep.csv"
    run = subprocess.run(
        [str(ROOT / "scripts" / "perf_analyzer.sh"), "--model", "minicpm_v_2_6_int4", "--url", server.grpc_url,
         "--input-data", str(ROOT / "perf" / "inputs" / inputs), "--concurrency", "1:2:1",
         "--measurement-interval", "1500", "--out", str(out)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rows = list(csv.DictReader(out.open()))
    assert sorted(row["Concurrency"] for row in rows) == ["1", "2"]
    assert all(float(row["Inferences/Second"]) > 0 for row in rows)
