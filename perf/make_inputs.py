#!/usr/bin/env python3
"""Write perf_analyzer ``--input-data`` files for the MiniCPM-V Triton models (perf/inputs/*.json).

- ``text.json``: a ChatML text-only request.
- ``page.json``: the same question about one synthetic ~1.8 MP document page (an invoice-like PNG with text
  lines and a table grid), drawn with PIL; deterministic.

Tensor interface (vLLM-backend style, max_batch_size > 0, so shapes exclude the batch dimension):
``text_input`` STRING [1], ``image`` STRING [-1] (encoded image bytes), ``stream`` BOOL [1],
``sampling_parameters`` STRING [1] (JSON). perf_analyzer's JSON takes BYTES content as
``{"b64": ...}`` of the serialized tensor: each element is a 4-byte little-endian length and its bytes.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import logging
import random
import struct
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

logger = logging.getLogger("make_inputs")

OUT_DIR = Path(__file__).resolve().parent / "inputs"
QUESTION = "What is the total amount?"
IMAGE_TAG = "(<image>./</image>)"
SAMPLING = {"max_tokens": 64, "temperature": 0, "ignore_eos": True}


def chatml_prompt(question: str, with_image: bool) -> str:
    """A single-turn ChatML prompt; the image placeholder goes first, on its own line."""
    content = f"{IMAGE_TAG}\n{question}" if with_image else question
    return f"<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n"


def render_page(width: int = 1344, height: int = 1344, seed: int = 0) -> Image.Image:
    """A white document page: a header, address lines, a line-item table with grid lines and a total."""
    rng = random.Random(seed)
    page = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(page)
    title = ImageFont.load_default(size=40)
    body = ImageFont.load_default(size=22)
    margin = 80
    draw.text((margin, margin), "INVOICE  No. 2024-0917", fill="black", font=title)
    y = margin + 80
    for line in ("Acme Document Services GmbH", "Hauptstrasse 12, 10115 Berlin", "Date: 17 Sep 2024"):
        draw.text((margin, y), line, fill="black", font=body)
        y += 34
    y += 40
    columns = [margin, margin + 560, margin + 720, margin + 950, width - margin]
    headers = ["Description", "Qty", "Unit price", "Amount"]
    row_h = 44
    items = [
        (f"Service item {i + 1}: scanning and indexing", rng.randint(1, 9), rng.randint(5, 120)) for i in range(14)
    ]
    rows = len(items) + 1
    for r in range(rows + 1):
        draw.line([(columns[0], y + r * row_h), (columns[-1], y + r * row_h)], fill="black", width=2)
    for x in columns:
        draw.line([(x, y), (x, y + rows * row_h)], fill="black", width=2)
    for c, header in enumerate(headers):
        draw.text((columns[c] + 10, y + 10), header, fill="black", font=body)
    total = 0
    for r, (name, qty, price) in enumerate(items, start=1):
        amount = qty * price
        total += amount
        cells = [name, str(qty), f"{price:.2f}", f"{amount:.2f}"]
        for c, cell in enumerate(cells):
            draw.text((columns[c] + 10, y + r * row_h + 10), cell, fill="black", font=body)
    y += rows * row_h + 40
    draw.text((columns[2] + 10, y), f"Total: EUR {total:.2f}", fill="black", font=title)
    y += 90
    for _ in range(6):
        words = " ".join(
            rng.choice(["payment", "due", "within", "days", "bank", "transfer", "thank", "you"]) for _ in range(12)
        )
        draw.text((margin, y), words.capitalize() + ".", fill="black", font=body)
        y += 32
    return page


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def bytes_tensor(elements: list[bytes]) -> dict[str, Any]:
    """perf_analyzer's form for BYTES content: base64 of the serialized elements, with an explicit shape."""
    serialized = b"".join(struct.pack("<I", len(element)) + element for element in elements)
    return {"content": {"b64": base64.b64encode(serialized).decode("ascii")}, "shape": [len(elements)]}


def request(question: str, images: list[bytes]) -> dict[str, Any]:
    """One perf_analyzer data entry (all optional inputs it does not name are left out of the request)."""
    entry: dict[str, Any] = {
        "text_input": [chatml_prompt(question, with_image=bool(images))],
        "stream": [True],
        "sampling_parameters": [json.dumps(SAMPLING)],
    }
    if images:
        entry["image"] = bytes_tensor(images)
    return entry


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", type=Path, default=OUT_DIR, help="default: %(default)s")
    parser.add_argument("--size", default="1344x1344", help="page size WIDTHxHEIGHT (default: %(default)s)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    width, height = (int(v) for v in args.size.lower().split("x"))
    args.out_dir.mkdir(parents=True, exist_ok=True)
    page = png_bytes(render_page(width, height))
    for name, images in (("text", []), ("page", [page])):
        path = args.out_dir / f"{name}.json"
        path.write_text(json.dumps({"data": [request(QUESTION, images)]}, indent=1) + "\n")
        logger.info("wrote %s (%d bytes)", path, path.stat().st_size)


if __name__ == "__main__":
    main()
