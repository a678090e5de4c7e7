#!/usr/bin/env python3
"""Quick start: read documents with MiniCPM-V 2.6 through the OpenAI-compatible API, using the `openai` SDK.

Four steps, on the synthetic pages in examples/test_images/:
  1. one page, one question (an invoice's total)
  2. two pages compared, answer as a JSON object (response_format={"type": "json_object"})
  3. a PDF sent as a `file` content part
  4. streaming: the answer printed as it is generated

Start the server first (./scripts/serve.sh), then:  python examples/quickstart.py [--base-url URL] [--model NAME]
Exit status 0 when every call succeeded, 1 otherwise.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
from pathlib import Path

import openai

PAGES = Path(__file__).resolve().parent / "test_images"


def image_part(path: Path) -> dict:
    """An image content part carrying the file inline as a base64 data URL."""
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{data}"}}


def pdf_part(path: Path) -> dict:
    """A file content part carrying a PDF inline; the server renders its pages."""
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return {"type": "file", "file": {"file_data": f"data:application/pdf;base64,{data}", "filename": path.name}}


def one_page(client: openai.OpenAI, model: str, max_tokens: int) -> None:
    response = client.chat.completions.create(
        model=model,
        messages=[
            {
                "role": "user",
                "content": [
                    image_part(PAGES / "invoice_1.png"),
                    {"type": "text", "text": "What is the total amount due on this invoice?"},
                ],
            }
        ],
        temperature=0,
        max_tokens=max_tokens,
    )
    print(response.choices[0].message.content)
    print(f"[{response.usage.prompt_tokens} prompt tokens, {response.usage.completion_tokens} completion tokens]")


def compare_pages(client: openai.OpenAI, model: str, max_tokens: int) -> None:
    response = client.chat.completions.create(
        model=model,
        messages=[
            {
                "role": "user",
                "content": [
                    image_part(PAGES / "invoice_1.png"),
                    image_part(PAGES / "invoice_2.png"),
                    {
                        "type": "text",
                        "text": "Compare the two invoices. Reply with a JSON object with the keys "
                        '"first_total", "second_total" and "higher" (the invoice number with the higher total).',
                    },
                ],
            }
        ],
        response_format={"type": "json_object"},
        temperature=0,
        max_tokens=max_tokens,
    )
    text = response.choices[0].message.content or ""
    try:
        print(json.dumps(json.loads(text), indent=2))
    except json.JSONDecodeError:
        # JSON mode constrains the tokens, but a reply cut off by max_tokens (finish_reason "length") is
        # incomplete JSON; so is anything from a server without JSON mode.
        print(f"(not valid JSON, finish_reason={response.choices[0].finish_reason}; raw output follows)")
        print(text)


def pdf_file(client: openai.OpenAI, model: str, max_tokens: int) -> None:
    response = client.chat.completions.create(
        model=model,
        messages=[
            {
                "role": "user",
                "content": [
                    pdf_part(PAGES / "report.pdf"),
                    {"type": "text", "text": "Which region sold the most units in March?"},
                ],
            }
        ],
        temperature=0,
        max_tokens=max_tokens,
    )
    print(response.choices[0].message.content)


def streaming(client: openai.OpenAI, model: str, max_tokens: int) -> None:
    stream = client.chat.completions.create(
        model=model,
        messages=[
            {
                "role": "user",
                "content": [image_part(PAGES / "memo.png"), {"type": "text", "text": "Summarise this memo."}],
            }
        ],
        temperature=0,
        max_tokens=max_tokens,
        stream=True,
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            print(chunk.choices[0].delta.content, end="", flush=True)
    print()


STEPS = [
    ("1. One page: the invoice total", one_page),
    ("2. Two pages compared, JSON output", compare_pages),
    ("3. A PDF as a file content part", pdf_file),
    ("4. Streaming", streaming),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", default="http://localhost:9000/v1", help="API base URL (default: %(default)s)")
    parser.add_argument("--model", help="model name (default: the first model the server lists)")
    parser.add_argument("--api-key", default="EMPTY", help="API key (default: %(default)s)")
    parser.add_argument("--max-tokens", type=int, default=64, help="max_tokens per answer (default: %(default)s)")
    args = parser.parse_args()

    client = openai.OpenAI(base_url=args.base_url, api_key=args.api_key)
    try:
        model = args.model or client.models.list().data[0].id
    except (openai.OpenAIError, IndexError) as exc:
        print(f"cannot list the models at {args.base_url}: {exc}", file=sys.stderr)
        return 1
    print(f"model: {model}")

    failed = []
    for title, step in STEPS:
        print(f"\n== {title}")
        try:
            step(client, model, args.max_tokens)
        except openai.OpenAIError as exc:
            print(f"FAILED: {type(exc).__name__}: {exc}")
            failed.append(title)
    if failed:
        print(f"\n{len(failed)} of {len(STEPS)} steps failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
