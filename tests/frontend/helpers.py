"""Images and small helpers shared by the frontend tests."""

from __future__ import annotations

import base64
import io
import re
import urllib.request

from PIL import Image, ImageDraw


def page(width: int = 900, height: int = 640, title: str = "Invoice", fmt: str = "PNG") -> bytes:
    """A document-like page: a title and table rows of text."""
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((30, 10), title, fill="black")
    for i in range(min(14, height // 45)):
        draw.text((30, 40 + 40 * i), f"Item {i}    qty {i + 2}    price {9.5 * i:.2f}", fill="black")
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def image_part(data: bytes, mime: str = "image/png", **extra) -> dict:
    return {"type": "image_url", "image_url": {"url": data_url(data, mime), **extra}}


def metric(url: str, name: str, **labels) -> float:
    """One sample of a Prometheus text endpoint (0 when absent)."""
    body = urllib.request.urlopen(url, timeout=10).read().decode()
    for line in body.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}")[0])) if "{" in line else {}
        if all(found.get(k) == v for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0
