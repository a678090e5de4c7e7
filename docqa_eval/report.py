"""Scores and reports: predictions + question set -> a JSON-ready dict and a Markdown page."""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from docqa_eval.dataset import QAItem
from docqa_eval.metrics import ANLS_THRESHOLD, anls, exact_match
from docqa_eval.runner import Prediction


def build_report(
    items: Sequence[QAItem],
    predictions: Sequence[Prediction],
    *,
    model: str,
    base_url: str | None = None,
    data: str | None = None,
    date: str | None = None,
) -> dict[str, Any]:
    """Score every prediction and summarise.

    An item whose prediction has an `error` scores 0 ANLS and no exact match, so errors lower the means; the
    summary also counts them. Latency statistics cover the items that got an answer. `date` defaults to now
    (UTC, ISO 8601).
    """
    if len(items) != len(predictions):
        raise ValueError(f"{len(items)} items but {len(predictions)} predictions")
    rows = []
    for item, prediction in zip(items, predictions, strict=True):
        answered = prediction.error is None and prediction.text is not None
        rows.append(
            {
                "id": item.id,
                "source": item.source,
                "question": item.question,
                "prediction": prediction.text,
                "answers": list(item.answers),
                "anls": anls(prediction.text, item.answers) if answered else 0.0,
                "exact": exact_match(prediction.text, item.answers) if answered else False,
                "latency_s": _round(prediction.latency_s),
                "error": prediction.error,
            }
        )
    latencies = [row["latency_s"] for row in rows if row["error"] is None and row["latency_s"] is not None]
    count = len(rows)
    summary = {
        "model": model,
        "base_url": base_url,
        "data": data,
        "date": date or datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "count": count,
        "errors": sum(row["error"] is not None for row in rows),
        "mean_anls": _round(statistics.fmean(row["anls"] for row in rows)) if rows else 0.0,
        "exact_match": _round(sum(row["exact"] for row in rows) / count) if rows else 0.0,
        "anls_threshold": ANLS_THRESHOLD,
        "latency_s": {
            "mean": _round(statistics.fmean(latencies)) if latencies else None,
            "median": _round(statistics.median(latencies)) if latencies else None,
            "max": _round(max(latencies)) if latencies else None,
        },
    }
    return {"summary": summary, "items": rows}


def render_markdown(report: dict[str, Any], *, worst: int = 10) -> str:
    """A summary table and the `worst` lowest-scoring items (errors first; perfect answers left out)."""
    summary, rows = report["summary"], report["items"]
    latency = summary["latency_s"]
    exact_count = sum(row["exact"] for row in rows)
    lines = [
        f"# Document QA evaluation: {_cell(summary['model'])}",
        "",
        f"{summary['date']} · data `{summary['data']}` · server `{summary['base_url']}`",
        "",
        "| Metric | Value |",
        "| --- | --- |",
        f"| Questions | {summary['count']} |",
        f"| Mean ANLS (threshold {summary['anls_threshold']}) | {summary['mean_anls']:.3f} |",
        f"| Exact match | {summary['exact_match']:.1%} ({exact_count}/{summary['count']}) |",
        f"| Errors | {summary['errors']} |",
        f"| Latency mean / median / max | {_seconds(latency['mean'])} / {_seconds(latency['median'])} / "
        f"{_seconds(latency['max'])} |",
        "",
    ]
    imperfect = sorted(
        (row for row in rows if row["error"] is not None or row["anls"] < 1.0),
        key=lambda row: (row["error"] is None, row["anls"], row["exact"]),
    )[:worst]
    lines.append(f"## Worst items ({len(imperfect)} shown)")
    lines.append("")
    if not imperfect:
        lines.append("Every answer matched an accepted answer exactly.")
    else:
        lines.append("| ID | Page | Question | Prediction | Accepted answers | ANLS |")
        lines.append("| --- | --- | --- | --- | --- | --- |")
        for row in imperfect:
            prediction = f"**error:** {row['error']}" if row["error"] is not None else row["prediction"]
            answers = " / ".join(row["answers"])
            lines.append(
                f"| {_cell(row['id'])} | {_cell(row['source'])} | {_cell(row['question'])} | {_cell(prediction)} "
                f"| {_cell(answers)} | {row['anls']:.2f} |"
            )
    return "\n".join(lines) + "\n"


def write_report(report: dict[str, Any], out_dir: str | Path) -> tuple[Path, Path]:
    """Write `report.json` and `report.md` into `out_dir` (created if missing); returns both paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, markdown_path = out_dir / "report.json", out_dir / "report.md"
    json_path.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    markdown_path.write_text(render_markdown(report), encoding="utf-8")
    return json_path, markdown_path


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def _seconds(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f} s"


def _cell(text: object, limit: int = 120) -> str:
    """Text safe inside a Markdown table cell: one line, pipes escaped, long text cut."""
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 1] + "…"
