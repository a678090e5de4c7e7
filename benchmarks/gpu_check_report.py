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
        for key in ("engine_config", "cuda_graphs", "cuda_graphs_vs_eager", "targets"):
            if isinstance(results.get(key), dict):
                shown = {k: v for k, v in results[key].items() if k not in ("traceback",)}
                lines.append(f"\n{key}: " + ", ".join(f"{k} {v}" for k, v in shown.items()))
        lines += _kernel_vs_gather(results)
        lines += _int4_kernel_vs_bitsandbytes(results)
        rows = [(k, v) for k, v in results.items()
                if k.startswith("decode_c") and isinstance(v, dict) and v.get("passed")]  # fmt: skip
        if rows:
            lines += ["", "| concurrent | sampling | attention | CUDA graphs | output tok/s (decode) | end to end | "
                      "step ms | bound tok/s | % of bound |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
            graphs = "yes" if results.get("cuda_graphs") else "no"
            for key, r in rows:
                used = "no" if key.endswith("_without_cuda_graphs") else graphs
                used = ("yes" if r["cuda_graphs"] else "no") if "cuda_graphs" in r else used  # (newer rows say)
                lines.append(f"| {r['concurrency']} | {r.get('sampling', 'greedy')} | "
                             f"{_fmt(r.get('attention_path'))} | {used} | {_fmt(r.get('decode_tok_s'))} | "
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


def _int4_kernel_vs_bitsandbytes(results: dict[str, Any]) -> list[str]:
    """Lines on the fused NF4 kernel against bitsandbytes' int4 path (full_nf4), per level (issue 28); bf16's
    figures are full_bf16's decode table."""
    table = results.get("decode_int4_kernel_vs_bitsandbytes")
    if not isinstance(table, dict) or not table:
        return []
    lines = ["", f"int4: the NF4 kernel vs bitsandbytes, decode output tok/s (served on: "
             f"{results.get('int4_selection')}):", "",
             "| concurrent | kernel tok/s | kernel % of bound | bitsandbytes tok/s | bitsandbytes % of bound | "
             "kernel / bitsandbytes |", "|---|---|---|---|---|---|"]  # fmt: skip
    for level, r in table.items():
        lines.append(f"| {level.removeprefix('c')} | {_fmt(r.get('kernel_tok_s'))} | "
                     f"{_fmt(r.get('kernel_percent_of_bound'))} | {_fmt(r.get('bitsandbytes_tok_s'))} | "
                     f"{_fmt(r.get('bitsandbytes_percent_of_bound'))} | "
                     f"{_fmt(r.get('kernel_over_bitsandbytes'))} |")  # fmt: skip
    return lines


def _kernel_vs_gather(results: dict[str, Any]) -> list[str]:
    """Lines on the paged kernel against the gather path (full_bf16): decode per level, one layer's attention
    step, both paths' graphs; what was not measured is left out."""
    lines = []
    table = results.get("decode_kernel_vs_gather")
    if isinstance(table, dict) and table:
        paths = {r.get("kernel_path") for r in table.values()} - {"paged kernel"}
        note = f" (the engine decoded on {', '.join(map(str, paths))}, not the paged kernel)" if paths else ""
        lines += ["", f"Paged kernel vs gather, decode output tok/s{note}:", "",
                  "| concurrent | kernel tok/s | kernel % of bound | gather tok/s | gather % of bound | "
                  "kernel / gather |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
        for level, r in table.items():
            lines.append(f"| {level.removeprefix('c')} | {_fmt(r.get('kernel_tok_s'))} | "
                         f"{_fmt(r.get('kernel_percent_of_bound'))} | {_fmt(r.get('gather_tok_s'))} | "
                         f"{_fmt(r.get('gather_percent_of_bound'))} | "
                         f"{_fmt(r.get('kernel_over_gather'))} |")  # fmt: skip
    step = results.get("attention_step_c64_ctx2048")
    if isinstance(step, dict) and step.get("passed"):
        extra = f", reference gather {step['reference_gather_ms']} ms" if "reference_gather_ms" in step else ""
        lines.append(f"\nattention step (one layer, {step['sequences']} x {step['context_tokens']} tokens): kernel "
                     f"{step['kernel_ms']} ms ({_fmt(step.get('kernel_percent_of_hbm'))}% of HBM bandwidth for "
                     f"{step['kernel_kv_bytes'] / 2**20:.0f} MiB of K/V), {step['gather_backend']} gather "
                     f"{step['gather_ms']} ms{extra}; gather / kernel {step['gather_over_kernel']}")  # fmt: skip
    gather = results.get("gather_path")
    kernel = results.get("cuda_graphs")
    if isinstance(gather, dict) and gather.get("passed"):
        lines.append(f"\ngather path: attention {gather.get('attention')} ({gather.get('attention_selection')})")
        for name, graphs in (("kernel", kernel), ("gather", gather.get("cuda_graphs"))):
            if isinstance(graphs, dict):
                lines.append(f"\n{name} graphs: {graphs.get('captured')} captured in {graphs.get('capture_s')} s, "
                             f"pool {_fmt(graphs.get('pool_mib'))} MiB, contexts "
                             f"{graphs.get('context_buckets_tokens')} tokens")  # fmt: skip
    return lines
