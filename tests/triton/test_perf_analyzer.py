"""perf_analyzer (installed by scripts/perf_analyzer.sh where missing) measures the served model."""

from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path

import pytest
import tritonclient.grpc as grpcclient

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def short_inputs(name: str, directory: Path) -> Path:
    """The shipped input file with fewer output tokens, so that a short sweep measures enough requests."""
    data = json.loads((ROOT / "perf" / "inputs" / name).read_text())
    for entry in data["data"]:
        entry["sampling_parameters"] = [json.dumps({"max_tokens": 8, "temperature": 0, "ignore_eos": True})]
    path = directory / name
    path.write_text(json.dumps(data))
    return path


def request_counts(server, model: str) -> tuple[int, int]:
    """Triton's own count of the model's successful and failed requests."""
    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        stats = client.get_inference_statistics(model, as_json=True)["model_stats"][0]["inference_stats"]
    finally:
        client.close()
    return int(stats.get("success", {}).get("count", 0)), int(stats.get("fail", {}).get("count", 0))


@pytest.mark.parametrize("inputs", ["text.json", "page.json"])
def test_perf_analyzer_sweeps_concurrency_over_grpc_streaming(server, tmp_path, inputs):
    out = tmp_path / "sweep.csv"
    success0, fail0 = request_counts(server, "minicpm_v_2_6_int4")
    run = subprocess.run(
        [str(ROOT / "scripts" / "perf_analyzer.sh"), "--model", "minicpm_v_2_6_int4", "--url", server.grpc_url,
         "--input-data", str(short_inputs(inputs, tmp_path)), "--concurrency", "1:2:1", "--out", str(out),
         "--measurement-interval", "3000", "--", "--stability-percentage", "1000", "--max-trials", "3"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rows = list(csv.DictReader(out.open()))
    assert sorted(row["Concurrency"] for row in rows) == ["1", "2"]
    # The sweep really ran requests through the model, and every one of them succeeded.
    success, fail = request_counts(server, "minicpm_v_2_6_int4")
    assert success - success0 >= len(rows) and fail == fail0
    for row in rows:  # each level reports its latency distribution in order
        assert 0 < float(row["p50 latency"]) <= float(row["p90 latency"]) <= float(row["p99 latency"])
