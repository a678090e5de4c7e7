"""Ask an OpenAI-compatible server each question of a question set, with its page(s) as images.

Every page goes out as a PNG (or the file's own PNG/JPEG bytes) in an `image_url` data URL; a PDF page is
rendered here first with `openai_frontend.pdf`, so any server that takes images can be evaluated. A failing
item (unreadable page, HTTP error, timeout) becomes a `Prediction` with `error` set; it never stops the run.
"""

from __future__ import annotations

import base64
import io
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Any

from PIL import Image
from tqdm import tqdm

from docqa_eval.dataset import QAItem
from openai_frontend.pdf import render_pdf

DEFAULT_INSTRUCTION = "Answer with a short phrase."
_MIME_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}


@dataclass(frozen=True)
class Prediction:
    """The model's answer to one item (`text`), or why there is none (`error`); latency of the API call."""

    text: str | None
    latency_s: float | None = None
    error: str | None = None


def image_urls(item: QAItem, *, dpi: int = 144) -> list[str]:
    """The item's page(s) as data URLs: image files as they are (PNG/JPEG), a PDF page rendered at `dpi`."""
    if item.pdf is not None:
        (page,) = render_pdf(item.pdf.read_bytes(), dpi=dpi, first_page=item.page, last_page=item.page)
        return [_data_url(_png(page), "image/png")]
    urls = []
    for path in item.images:
        mime = _MIME_TYPES.get(path.suffix.lower())
        if mime is None:  # another format PIL reads: send it as PNG
            with Image.open(path) as image:
                urls.append(_data_url(_png(image), "image/png"))
        else:
            urls.append(_data_url(path.read_bytes(), mime))
    return urls


def build_messages(item: QAItem, *, instruction: str = DEFAULT_INSTRUCTION, dpi: int = 144) -> list[dict[str, Any]]:
    """One user message: the page image(s) first, then the question followed by `instruction` (if any)."""
    content: list[dict[str, Any]] = [
        {"type": "image_url", "image_url": {"url": url}} for url in image_urls(item, dpi=dpi)
    ]
    text = f"{item.question} {instruction}" if instruction else item.question
    content.append({"type": "text", "text": text})
    return [{"role": "user", "content": content}]


def ask(
    client: Any,
    model: str,
    item: QAItem,
    *,
    max_tokens: int = 64,
    instruction: str = DEFAULT_INSTRUCTION,
    dpi: int = 144,
) -> Prediction:
    """Ask one question through an `openai.OpenAI` client (greedy decoding); never raises.

    `latency_s` covers the API call only, not the local page rendering.
    """
    try:
        messages = build_messages(item, instruction=instruction, dpi=dpi)
    except Exception as exc:
        return Prediction(None, None, f"cannot prepare the page: {type(exc).__name__}: {exc}")
    start = time.perf_counter()
    try:
        response = client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=max_tokens)
        text = response.choices[0].message.content or ""
    except Exception as exc:
        return Prediction(None, time.perf_counter() - start, f"{type(exc).__name__}: {exc}")
    return Prediction(text.strip(), time.perf_counter() - start)


def run(
    items: Sequence[QAItem],
    ask_one: Callable[[QAItem], Prediction],
    *,
    concurrency: int = 4,
    progress: bool = True,
) -> list[Prediction]:
    """Call `ask_one` for every item on `concurrency` threads; predictions come back in item order."""
    if concurrency < 1:
        raise ValueError(f"concurrency must be at least 1, got {concurrency}")
    predictions: list[Prediction | None] = [None] * len(items)
    with (
        ThreadPoolExecutor(max_workers=concurrency) as pool,
        tqdm(total=len(items), unit="question", disable=not progress) as bar,
    ):
        futures = {pool.submit(ask_one, item): index for index, item in enumerate(items)}
        for future in as_completed(futures):
            try:
                predictions[futures[future]] = future.result()
            except Exception as exc:  # ask() never raises, but a caller's ask_one might
                predictions[futures[future]] = Prediction(None, None, f"{type(exc).__name__}: {exc}")
            bar.update()
    return [prediction for prediction in predictions if prediction is not None]


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def _data_url(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"
