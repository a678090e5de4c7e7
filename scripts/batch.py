#!/usr/bin/env python3
"""Run one prompt over a folder of documents: PDFs (one request per page, or per document) and images, against a
running server (./scripts/serve.sh). Writes one JSON result per page or document into the output folder, next to
summary.json, with a progress bar, several requests at a time, and clear per-file errors.

    .venv/bin/python scripts/batch.py examples/test_images results/ --prompt "Extract the totals."
    .venv/bin/python scripts/batch.py scans/ out/ --prompt-file prompt.txt --schema invoice.schema.json -c 8

Resume: run the same command again after Ctrl-C (or a crash, or errors): pages whose result file exists (for
the same prompt, schema and model) are skipped; the rest run. A result file appears only once complete.

Why chat completions and not the Batch API: every page's result lands in the output folder the moment it is
ready, so progress is visible and resuming needs no server-side state; nothing has to be uploaded first (the
Batch API would need every page base64-encoded into one JSONL file, within the server's upload limit); and it
works with any OpenAI-compatible server. The Batch API (/v1/batches) suits jobs submitted from code and left
to run unattended, even across server restarts. Both go through the same server limits and checks.

Only the standard library is needed; pypdfium2 (installed with the frontend) counts PDF pages for --per page.
Exit status: 0 all done, 1 some items failed (see summary.json), 2 bad arguments, 130 interrupted."""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import queue
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

IMAGE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp",
               ".gif": "image/gif", ".bmp": "image/bmp", ".tif": "image/tiff", ".tiff": "image/tiff"}  # fmt: skip
RETRY_STATUS = (429, 500, 502, 503, 504)


@dataclass
class Item:
    source: Path
    rel: str  # path relative to the input folder, with "/"
    page: int | None  # 1-based PDF page; None: the whole file
    out: Path
    error: str | None = None  # known before sending (e.g. a PDF that cannot be opened)

    @property
    def label(self) -> str:
        return self.rel + (f" page {self.page}" if self.page else "")


def pdf_pages(path: Path) -> int:
    import pypdfium2  # installed with the frontend (requirements-frontend.txt)

    document = pypdfium2.PdfDocument(str(path))
    try:
        return len(document)
    finally:
        document.close()


def find_items(src: Path, out: Path, per: str) -> list[Item]:
    items = []
    for path in sorted(p for p in src.rglob("*") if p.is_file()):
        if out in path.parents:
            continue
        suffix = path.suffix.lower()
        rel = path.relative_to(src).as_posix()
        if suffix in IMAGE_TYPES:
            items.append(Item(path, rel, None, out / f"{rel}.json"))
        elif suffix == ".pdf" and per == "document":
            items.append(Item(path, rel, None, out / f"{rel}.json"))
        elif suffix == ".pdf":
            try:
                count = pdf_pages(path)
            except Exception as e:  # noqa: BLE001 - reported as this file's error
                items.append(Item(path, rel, None, out / f"{rel}.json", error=f"cannot read the PDF: {e}"))
                continue
            items += [Item(path, rel, n, out / f"{rel}.page-{n}.json") for n in range(1, count + 1)]
    return items


def data_url(path: Path, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode()}"


class Client:
    def __init__(self, args: argparse.Namespace, schema: dict | None):
        self.url = args.base_url.rstrip("/") + "/chat/completions"
        self.args = args
        self.headers = {"Content-Type": "application/json"}
        if args.api_key:
            self.headers["Authorization"] = f"Bearer {args.api_key}"
        self.body = {"model": args.model, "max_tokens": args.max_tokens, "temperature": args.temperature,
                     **json.loads(args.extra_body or "{}")}  # fmt: skip
        if schema is not None:
            json_schema = {"name": "result", "schema": schema, "strict": True}
            self.body["response_format"] = {"type": "json_schema", "json_schema": json_schema}
        self.key = hashlib.sha256(json.dumps([args.prompt, self.body], sort_keys=True).encode()).hexdigest()[:16]

    def request(self, item: Item) -> dict:
        suffix = item.source.suffix.lower()
        if suffix == ".pdf":
            part = {"type": "file", "file": {"file_data": data_url(item.source, "application/pdf"),
                                             "filename": item.source.name}}  # fmt: skip
            if item.page:
                part["file"]["pages"] = str(item.page)
        else:
            part = {"type": "image_url", "image_url": {"url": data_url(item.source, IMAGE_TYPES[suffix])}}
        content = [part, {"type": "text", "text": self.args.prompt}]
        return {**self.body, "messages": [{"role": "user", "content": content}]}

    def send(self, body: dict) -> dict:
        """The completion; raises RuntimeError with the server's message. Retries busy / unavailable servers."""
        data = json.dumps(body).encode()
        for attempt in range(self.args.retries + 1):
            request = urllib.request.Request(self.url, data=data, headers=self.headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.args.timeout) as response:
                    return json.loads(response.read())
            except urllib.error.HTTPError as e:
                try:
                    error = json.loads(e.read())["error"]
                    message = f"HTTP {e.code} {error.get('code') or error.get('type')}: {error.get('message')}"
                except (ValueError, KeyError, TypeError):
                    message = f"HTTP {e.code} {e.reason}"
                if e.code not in RETRY_STATUS or attempt == self.args.retries:
                    raise RuntimeError(message) from None
            except (urllib.error.URLError, OSError) as e:
                if attempt == self.args.retries:
                    raise RuntimeError(f"cannot reach {self.url}: {getattr(e, 'reason', e)}") from None
            time.sleep(min(2**attempt, 30))
        raise AssertionError("unreachable")


def result_of(item: Item, client: Client, completion: dict, want_json: bool) -> dict:
    choice = completion["choices"][0]
    answer = choice["message"]["content"]
    result = {"source": item.rel, "page": item.page, "model": completion.get("model"), "prompt": client.args.prompt,
              "answer": answer, "finish_reason": choice.get("finish_reason"), "usage": completion.get("usage"),
              "id": completion.get("id"), "request_key": client.key}  # fmt: skip
    if want_json:
        try:
            result["json"] = json.loads(answer)
        except ValueError as e:
            result["json"], result["json_error"] = None, f"the answer is not valid JSON ({e})"
    return result


def write_json(path: Path, value: dict) -> None:
    """Whole or not at all: a temporary file, then a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    temp.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n")
    os.replace(temp, path)


def already_done(item: Item, key: str) -> bool:
    try:
        return json.loads(item.out.read_text()).get("request_key") == key
    except (OSError, ValueError, AttributeError):
        return False


class Progress:
    def __init__(self, total: int, enabled: bool):
        self.total, self.done, self.failed = total, 0, 0
        self.started = time.monotonic()
        self.tty = enabled and sys.stderr.isatty()
        self.enabled = enabled

    def update(self, label: str, error: str | None) -> None:
        self.done += 1
        self.failed += error is not None
        if error:
            print(("\n" if self.tty else "") + f"error: {label}: {error}", file=sys.stderr, flush=True)
        if not self.enabled:
            return
        rate = self.done / max(time.monotonic() - self.started, 1e-6)
        if self.tty:
            filled = int(30 * self.done / max(self.total, 1))
            print(f"\r[{'#' * filled}{'.' * (30 - filled)}] {self.done}/{self.total} ({self.failed} failed) "
                  f"{rate:.2f}/s", end="", file=sys.stderr, flush=True)  # fmt: skip
        elif error is None:
            print(f"[{self.done}/{self.total}] {label} done", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.tty:
            print(file=sys.stderr)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="scripts/batch.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("input", type=Path, help="folder of PDFs and images (searched recursively)")
    parser.add_argument("output", type=Path, help="folder for the results (created; reused to resume)")
    prompt = parser.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="the instruction for every page")
    prompt.add_argument("--prompt-file", type=Path, help="read the instruction from this file")
    parser.add_argument("--schema", type=Path, help="a JSON Schema file: answers are JSON following it")
    parser.add_argument("--per", choices=("page", "document"), default="page",
                        help="a PDF is one request per page (default) or one for the whole document")  # fmt: skip
    parser.add_argument("--base-url", default=os.environ.get("OPENAI_BASE_URL", "http://localhost:9000/v1"))
    parser.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"))
    parser.add_argument("--model", default="minicpm_v_2_6_int4")
    parser.add_argument("-c", "--concurrency", type=int, default=4, help="requests at a time (default 4)")
    parser.add_argument("--max-tokens", type=int, default=512)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--extra-body", help="JSON merged into every request, e.g. '{\"max_slice_nums\": 4}'")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    parser.add_argument("--retries", type=int, default=3, help="retries when the server is busy or away")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.prompt_file is not None:
        args.prompt = args.prompt_file.read_text().strip()
    if not args.input.is_dir():
        parser.error(f"{args.input} is not a folder")
    if args.concurrency < 1:
        parser.error("--concurrency must be at least 1")
    try:
        json.loads(args.extra_body or "{}")
    except ValueError:
        parser.error("--extra-body must be a JSON object")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        schema = json.loads(args.schema.read_text()) if args.schema else None
    except (OSError, ValueError) as e:
        print(f"error: cannot read the schema {args.schema}: {e}", file=sys.stderr)
        return 2
    client = Client(args, schema)
    out = args.output.resolve()
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.rglob(".*.tmp-*"):  # left by an earlier run that was killed mid-write
        stale.unlink(missing_ok=True)
    items = find_items(args.input.resolve(), out, args.per)
    todo = [item for item in items if not already_done(item, client.key)]
    skipped = len(items) - len(todo)
    print(f"{len(items)} items ({skipped} already done) from {args.input} -> {args.output}", file=sys.stderr)

    work: queue.Queue[Item] = queue.Queue()
    finished: queue.Queue[tuple[Item, str | None]] = queue.Queue()
    stop = threading.Event()
    for item in todo:
        work.put(item)

    def worker() -> None:
        while not stop.is_set():
            try:
                item = work.get_nowait()
            except queue.Empty:
                return
            error = item.error
            if error is None:
                try:
                    completion = client.send(client.request(item))
                    if not stop.is_set():
                        write_json(item.out, result_of(item, client, completion, schema is not None))
                except Exception as e:  # noqa: BLE001 - one item's failure, reported with its name
                    error = str(e)
            finished.put((item, error))

    for _ in range(min(args.concurrency, len(todo))):
        threading.Thread(target=worker, daemon=True).start()  # daemon: Ctrl-C does not wait for them
    progress = Progress(len(todo), not args.no_progress)
    errors: list[dict] = []
    interrupted = False
    try:
        while progress.done < len(todo):
            try:
                item, error = finished.get(timeout=0.2)
            except queue.Empty:
                continue
            progress.update(item.label, error)
            if error is not None:
                errors.append({"source": item.rel, "page": item.page, "error": error})
    except KeyboardInterrupt:
        stop.set()
        interrupted = True
    progress.close()
    done = [i for i in items if already_done(i, client.key)]
    summary = {"input": str(args.input), "output": str(args.output), "prompt": args.prompt, "model": args.model,
               "schema": str(args.schema) if args.schema else None, "per": args.per, "items": len(items),
               "completed": len(done), "skipped_already_done": skipped, "failed": len(errors),
               "interrupted": interrupted, "errors": errors,
               "results": [i.out.relative_to(out).as_posix() for i in done]}  # fmt: skip
    write_json(out / "summary.json", summary)
    state = "interrupted" if interrupted else "finished"
    print(f"{state}: {len(done)}/{len(items)} done, {len(errors)} failed; summary in {out / 'summary.json'}"
          + ("; run the same command again to resume" if interrupted or errors else ""), file=sys.stderr)  # fmt: skip
    return 130 if interrupted else (1 if errors else 0)


if __name__ == "__main__":
    sys.exit(main())
