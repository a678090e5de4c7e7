"""The GPU check's markdown report (benchmarks/gpu_check.py writes gpu_check.md with it)."""

from __future__ import annotations

import json
from typing import Any


def _fmt(value: Any) -> str:
    return "-" if value is None else str(value)


def render_markdown(summary: dict[str, Any]) -> str:
    """The summary as a short markdown report: hardware, stages, checks, figures."""
    hw, versions, stages = summary.get("hardware", {}), summary.get("versions", {}), summary["stages"]
    where = hw.get("gpu") or f"CPU ({hw.get('cpu', '?')}, {hw.get('cpu_count', '?')} cores)"
    lines = [f"# GPU check, {summary['date']}", "",
             f"Device: {where}" + (f", {hw['gpu_memory_gib']} GiB, driver {hw.get('driver')}, CUDA "
                                   f"{hw.get('torch_cuda')}" if hw.get("gpu") else "") + ".",
             "Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items() if v) + ".",
             f"Command: `{summary['command']}`; mode {summary['mode']}; {summary['runtime_s']} s in all.", "",
             "| stage | status | seconds | failed steps |", "|---|---|---|---|"]  # fmt: skip
    preflight = summary.get("preflight")
    if preflight:
        checks = preflight.get("checks", {})
        timed = ", ".join(f"{name} {_fmt(check.get('seconds'))} s" for name, check in checks.items())
        errors = [f"{name}: {check['error']}" for name, check in checks.items() if not check.get("passed")]
        errors += [preflight["error"]] if preflight.get("error") else []
        verdict = "passed" if preflight.get("passed") else "FAILED"
        text = f"Pre-flight: {verdict} in {_fmt(preflight.get('seconds'))} s ({timed})"
        lines.insert(len(lines) - 3, text + "".join(f"; {e}" for e in errors) + ".")
    for name, stage in stages.items():
        failed = ", ".join(stage.get("failed", [])) or ("error: " + stage["error"] if stage.get("error") else "")
        failed = failed or stage.get("reason", "")
        lines.append(f"| {name} | {stage['status']} | {_fmt(stage.get('seconds'))} | {failed} |")
    attention = stages.get("env", {}).get("results", {}).get("attention")
    if attention:
        lines += ["", "Attention kernels: " + "; ".join(f"{k}: {v}" for k, v in attention.items()) + "."]
    checks = stages.get("correctness", {}).get("results", {})
    if checks:
        lines += ["", "| check | passed | seconds | figures |", "|---|---|---|---|"]
        for name, result in checks.items():
            figures = {k: v for k, v in result.items() if k not in ("passed", "seconds", "traceback", "path")}
            text = json.dumps(figures, default=str)
            lines.append(f"| {name} | {result.get('passed')} | {_fmt(result.get('seconds'))} | "
                         f"{text[:300] + ('...' if len(text) > 300 else '')} |")  # fmt: skip
    for name in ("full_bf16", "full_nf4", "cpu_bf16", "cpu_nf4"):
        results = stages.get(name, {}).get("results", {})
        if not results:
            continue
        head = {k: v for k, v in results.items() if not isinstance(v, dict)}
        lines += ["", f"## {name}", "", ", ".join(f"{k}: {v}" for k, v in head.items())]
        for key in ("engine_config", "cuda_graphs", "cuda_graphs_vs_eager"):
            if isinstance(results.get(key), dict):
                shown = {k: v for k, v in results[key].items() if k not in ("traceback",)}
                lines.append(f"\n{key}: " + ", ".join(f"{k} {v}" for k, v in shown.items()))
        rows = [(k, v) for k, v in results.items()
                if k.startswith("decode_c") and isinstance(v, dict) and v.get("passed")]  # fmt: skip
        if rows:
            lines += ["", "| concurrent | sampling | CUDA graphs | output tok/s (decode) | end to end | step ms | "
                      "bound tok/s | % of bound |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
            graphs = "yes" if results.get("cuda_graphs") else "no"
            for key, r in rows:
                used = "no" if key.endswith("_without_cuda_graphs") else graphs
                lines.append(f"| {r['concurrency']} | {r.get('sampling', 'greedy')} | {used} | "
                             f"{_fmt(r.get('decode_tok_s'))} | "
                             f"{_fmt(r.get('e2e_tok_s'))} | "
                             f"{_fmt(r.get('decode_step_ms'))} | {_fmt(r.get('bandwidth_bound_tok_s'))} | "
                             f"{_fmt(r.get('percent_of_bound'))} |")  # fmt: skip
        for key in ("page", "text", "image_448"):
            r = results.get(key)
            if isinstance(r, dict) and r.get("passed"):
                shown = {k: v for k, v in r.items() if k not in ("passed",)}
                lines.append(f"\n{key}: " + ", ".join(f"{k} {v}" for k, v in shown.items()))
    triton = stages.get("triton", {}).get("results", {})
    if triton:
        lines += ["", "## triton", ""] + [f"- {k}: {json.dumps(v, default=str)[:300]}" for k, v in triton.items()
                                           if k != "triton_log_tail"]  # fmt: skip
    return "\n".join(lines) + "\n"
