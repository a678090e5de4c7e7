#!/usr/bin/env python3
"""Evaluate a served model on a document question set (ANLS and exact match, as in DocVQA).

Each question is sent with its page(s) as PNG images to an OpenAI-compatible /v1/chat/completions endpoint
(PDF pages are rendered locally), with greedy decoding. Writes report.json (every item, with its prediction,
scores, latency and error if any) and report.md (summary and worst items) into --out.

Failed items are recorded in the report, not fatal. Exit status: 0 when the run finished and at least one
question got an answer, 1 when every question failed (server down, wrong model name), 2 for bad arguments or
an unusable question set.

Example:
  scripts/evaluate.py --base-url http://localhost:9000/v1 --data examples/test_images/qa.jsonl --out eval_out
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

try:
    import docqa_eval  # noqa: F401
except ImportError:  # run from a checkout without the project installed
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from docqa_eval.dataset import DatasetError, load_jsonl  # noqa: E402
from docqa_eval.report import build_report, write_report  # noqa: E402
from docqa_eval.runner import DEFAULT_INSTRUCTION, ask, run  # noqa: E402

DEFAULT_DATA = Path(__file__).resolve().parent.parent / "examples" / "test_images" / "qa.jsonl"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--base-url", default="http://localhost:9000/v1", help="OpenAI-compatible API base URL")
    parser.add_argument("--model", help="model name (default: the first model the server lists)")
    parser.add_argument("--api-key", default="EMPTY", help="API key sent as a bearer token (default: EMPTY)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="question set, JSONL (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=Path("eval_out"), help="report directory (default: %(default)s)")
    parser.add_argument("--concurrency", type=int, default=4, help="requests in flight (default: %(default)s)")
    parser.add_argument("--max-tokens", type=int, default=64, help="max_tokens per answer (default: %(default)s)")
    parser.add_argument("--limit", type=int, help="only the first N questions")
    parser.add_argument(
        "--instruction",
        default=DEFAULT_INSTRUCTION,
        help="appended to every question; '' for none (default: %(default)r)",
    )
    parser.add_argument("--dpi", type=int, default=144, help="resolution for PDF pages (default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per request (default: %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    for name in ("concurrency", "max_tokens", "limit", "dpi"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        items = load_jsonl(args.data)
    except DatasetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    items = items[: args.limit] if args.limit else items

    import openai  # imported here so that --help works without the SDK

    client = openai.OpenAI(base_url=args.base_url, api_key=args.api_key, timeout=args.timeout)
    model = args.model
    if model is None:
        try:
            model = next(iter(client.models.list())).id
        except Exception as exc:
            print(f"error: cannot list the models at {args.base_url}: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 1

    def ask_one(item):
        return ask(client, model, item, max_tokens=args.max_tokens, instruction=args.instruction, dpi=args.dpi)

    predictions = run(items, ask_one, concurrency=args.concurrency, progress=not args.no_progress)
    report = build_report(items, predictions, model=model, base_url=args.base_url, data=str(args.data))
    json_path, markdown_path = write_report(report, args.out)
    summary = report["summary"]
    print(
        f"{summary['count']} questions, mean ANLS {summary['mean_anls']:.3f}, exact match "
        f"{summary['exact_match']:.1%}, {summary['errors']} error(s)\nreports: {json_path}  {markdown_path}"
    )
    return 1 if summary["errors"] == summary["count"] else 0


if __name__ == "__main__":
    sys.exit(main())
