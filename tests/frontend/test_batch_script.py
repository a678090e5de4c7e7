"""scripts/batch.py, the folder command, as a user runs it: a subprocess against the frontend in front of a real
tritonserver, on examples/test_images (five page images and a three-page PDF), interrupted with SIGINT (Ctrl-C)
and resumed."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
IMAGES = ROOT / "examples" / "test_images"
EXPECTED = sorted(["form.png.json", "invoice_1.png.json", "invoice_2.png.json", "memo.png.json", "report.png.json",
                   "report.pdf.page-1.json", "report.pdf.page-2.json", "report.pdf.page-3.json"])  # fmt: skip


def command(frontend, src: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, str(ROOT / "scripts" / "batch.py"), str(src), str(out), "--base-url",
            frontend.base_url + "/v1", "--model", "minicpm_v_2_6", "--prompt", "What is the total?", *extra]  # fmt: skip


def result_files(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if p.name != "summary.json" and not p.name.startswith("."))


def test_one_result_per_page_and_clear_errors(frontend, tmp_path):
    src = tmp_path / "docs"
    shutil.copytree(IMAGES, src)
    (src / "broken.pdf").write_bytes(b"%PDF-1.4 this is not really a PDF")
    (src / "photo.jpg").write_bytes(b"not a JPEG at all")
    out = tmp_path / "out"
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps({"type": "object", "properties": {"total": {"type": "string"}},
                                  "required": ["total"]}))  # fmt: skip
    run = subprocess.run(command(frontend, src, out, "--max-tokens", "24", "--schema", str(schema), "-c", "3"),
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode == 1, run.stderr  # two files failed
    assert result_files(out) == EXPECTED
    summary = json.loads((out / "summary.json").read_text())
    assert summary["completed"] == 8 and summary["failed"] == 2 and not summary["interrupted"]
    assert sorted(summary["results"]) == EXPECTED
    errors = {e["source"]: e["error"] for e in summary["errors"]}
    assert set(errors) == {"broken.pdf", "photo.jpg"}
    assert "cannot read the PDF" in errors["broken.pdf"]
    assert "HTTP 400 invalid_image" in errors["photo.jpg"]
    assert "error: photo.jpg: HTTP 400" in run.stderr
    page = json.loads((out / "report.pdf.page-2.json").read_text())
    assert page["source"] == "report.pdf" and page["page"] == 2 and page["usage"]["prompt_tokens"] > 64
    assert "json" in page  # parsed (or the reason it could not be) because a schema was given
    image = json.loads((out / "memo.png.json").read_text())
    assert image["page"] is None and isinstance(image["answer"], str)


def test_sigint_then_resume_runs_only_what_is_missing(frontend, tmp_path):
    out = tmp_path / "out"
    slow = ["-c", "1", "--max-tokens", "48", "--extra-body", '{"ignore_eos": true}']
    process = subprocess.Popen(command(frontend, IMAGES, out, *slow), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    deadline = time.monotonic() + 120
    while not (out.exists() and result_files(out)):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)  # Ctrl-C
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert "interrupted" in stderr and "run the same command again" in stderr
    first = result_files(out)
    assert 1 <= len(first) < len(EXPECTED)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["interrupted"] and summary["completed"] == len(first)
    stamps = {name: (out / name).stat().st_mtime_ns for name in first}

    again = subprocess.run(command(frontend, IMAGES, out, *slow[2:]), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert result_files(out) == EXPECTED
    assert {name: (out / name).stat().st_mtime_ns for name in first} == stamps  # not sent again
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped_already_done"] == len(first) and summary["completed"] == len(EXPECTED)
