"""benchmarks/soak.py: its options and its accounting (which request counts as what), without a long run."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "soak.py"


def _load():
    spec = importlib.util.spec_from_file_location("_benchmarks_soak", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


soak = _load()
Outcome = soak.Outcome


def test_defaults_are_the_issue_s_soak():
    args = soak.parse_args([])
    assert (args.minutes, args.concurrency, args.disconnect, args.bad) == (10.0, 16, 0.10, 0.05)
    assert not args.no_restart and args.restart_at == 0.5
    assert args.models == ["minicpm_v_2_6", "minicpm_v_2_6_int4"]


def test_a_running_stack_is_not_restarted():
    args = soak.parse_args(["--base-url", "http://127.0.0.1:9000", "--models", "minicpm_v_2_6_int4",
                            "--minutes", "3", "--concurrency", "8"])  # fmt: skip
    assert args.no_restart and args.models == ["minicpm_v_2_6_int4"]
    assert (args.minutes, args.concurrency) == (3.0, 8)


@pytest.mark.parametrize("bad_args", [["--bad", "0.6", "--disconnect", "0.5"], ["--bad", "-0.1"],
                                      ["--restart-at", "1"], ["--concurrency", "0"], ["--minutes", "0"]])  # fmt: skip
def test_impossible_options_are_usage_errors(bad_args, capsys):
    with pytest.raises(SystemExit) as exit_info:
        soak.parse_args(bad_args)
    assert exit_info.value.code == 2 and "error:" in capsys.readouterr().err


OUTAGE = [(100.0, 130.0)]


@pytest.mark.parametrize(
    ("outcome", "category"),
    [
        (Outcome("stream", 10, 11, True, 200), "completed"),
        (Outcome("nonstream", 10, 12, True, 200), "completed"),
        (Outcome("disconnect", 10, 11, True, 200), "disconnected"),
        (Outcome("bad", 10, 11, False, 400, expected_status=400), "expected_failure"),
        (Outcome("bad", 10, 11, False, 404, expected_status=404), "expected_failure"),
        # A bad input with the wrong status, or answered, is a bug.
        (Outcome("bad", 10, 11, False, 500, expected_status=400), "unexpected_failure"),
        (Outcome("bad", 10, 11, True, 200, expected_status=400), "unexpected_failure"),
        # Failures that overlap the outage are expected, at either edge; outside it they are not.
        (Outcome("stream", 90, 101, False, 200, error="error event"), "expected_failure"),
        (Outcome("nonstream", 129, 131, False, 503), "expected_failure"),
        (Outcome("disconnect", 105, 106, False, None, error="ConnectError"), "expected_failure"),
        (Outcome("bad", 110, 111, False, 503, expected_status=400), "expected_failure"),
        (Outcome("nonstream", 131, 132, False, 503), "unexpected_failure"),
        (Outcome("stream", 50, 60, False, 200, error="the stream ended without [DONE]"), "unexpected_failure"),
    ],
)
def test_each_request_is_classified(outcome, category):
    assert soak.classify(outcome, OUTAGE) == category


def test_percentiles_are_nearest_rank():
    values = [float(v) for v in range(100, 0, -1)]
    assert soak.percentile(values, 50) == 50.0 and soak.percentile(values, 99) == 99.0
    assert soak.percentile(values, 100) == 100.0 and soak.percentile([3.0], 99) == 3.0
    assert soak.percentile([], 50) is None


def test_the_tally_counts_every_request_once_and_times_only_completed_ones():
    outcomes = [
        Outcome("stream", 0, 1.0, True, 200, ttft=0.1),
        Outcome("nonstream", 0, 3.0, True, 200),
        Outcome("disconnect", 0, 0.5, True, 200, ttft=0.2),  # left on purpose: no latency
        Outcome("bad", 0, 0.01, False, 400, expected_status=400),
        Outcome("nonstream", 100, 105, False, 503),  # in the outage
        Outcome("stream", 200, 260, False, 200, error="error event: boom"),
    ]
    tally = soak.Tally.of(outcomes, OUTAGE)
    assert tally.counts == {"completed": 2, "disconnected": 1, "expected_failure": 2, "unexpected_failure": 1}
    assert tally.by_kind["nonstream"] == {"completed": 1, "disconnected": 0, "expected_failure": 1,
                                          "unexpected_failure": 0}  # fmt: skip
    summary = tally.summary()
    assert summary["requests"] == len(outcomes)
    assert summary["latency_ms"] == {"p50": 1000.0, "p99": 3000.0}
    assert summary["ttft_ms"] == {"p50": 100.0, "p99": 100.0}
    assert summary["unexpected_examples"] == [{"kind": "stream", "status": 200, "error": "error event: boom"}]


def test_the_report_states_growth_and_the_markdown_its_figures():
    args = soak.parse_args(["--minutes", "1", "--concurrency", "2"])
    raw = {"tally": soak.Tally.of([Outcome("stream", 0, 1.0, True, 200, ttft=0.1)], []), "outages": [(30.0, 45.0)],
           "load_s": 60.0, "end_metrics": {"nv_inference_pending_request_count": 0.0},
           "rss": [{"t_s": 0, "tag": "start", "frontend_bytes": 100 * 2**20, "triton_bytes": 2000 * 2**20},
                   {"t_s": 15, "tag": "during", "frontend_bytes": 108 * 2**20, "triton_bytes": None},
                   {"t_s": 60, "tag": "end", "frontend_bytes": 110 * 2**20, "triton_bytes": 1900 * 2**20}]}  # fmt: skip
    result = soak.report(args, raw)
    assert result["rss_growth_percent"] == {"frontend": 10.0, "triton": -5.0}
    assert result["rss_growth_after_warmup_percent"] == {"frontend": 1.9, "triton": None}  # no sample: no figure
    assert result["completed"] == 1 and result["unexpected_failure"] == 0 and result["outages_s"] == [[30.0, 45.0]]
    text = soak.markdown(result)
    assert "| 1 | 1 | 0 | 0 | 0 | 1000.0 | 1000.0 | 100.0 | 100.0 |" in text
    assert "| frontend | 100 | 110 | 10.0% | 1.9% |" in text
    assert "| Triton (tritonserver + stubs) | 2000 | 1900 | -5.0% | n/a |" in text
