"""PDF pages -> PIL images, with limits a server can enforce on untrusted uploads.

Rendering uses pypdfium2 (PDFium). PDFium is not thread-safe, not even across different documents, so every
call into it (open, render, close) happens under one module-level lock; rendering requests are therefore
serialised process-wide. Every error a client can cause becomes a `PDFError` whose message can be shown to
that client as it is.
"""

from __future__ import annotations

import math
import re
import threading

import pypdfium2 as pdfium
import pypdfium2.raw as pdfium_c
from PIL import Image

__all__ = ["PDFError", "DEFAULT_MAX_PIXELS_PER_PAGE", "parse_page_range", "render_pdf"]

#: 2048 x 2048: an A4 or Letter page fits at 144 DPI (about 2.0 MP) with room to spare, while a page declared
#: as 200 x 200 inches (the largest PDF allows) cannot make us allocate gigabytes.
DEFAULT_MAX_PIXELS_PER_PAGE = 2048 * 2048

_POINTS_PER_INCH = 72
_PDFIUM_LOCK = threading.Lock()
_PAGE_RANGE = re.compile(r"^\s*(\d+)\s*(?:(-)\s*(\d*)\s*)?$")


class PDFError(ValueError):
    """A PDF that cannot be rendered as asked; the message is meant for the client that sent it."""


def parse_page_range(spec: str | None) -> tuple[int, int | None]:
    """Parse a 1-based, inclusive page range: "3" -> (3, 3), "2-4" -> (2, 4), "2-" -> (2, None).

    `None` or an empty string means the whole document: (1, None). The result feeds `render_pdf`'s
    `first_page` / `last_page`. Raises `PDFError` for anything else (including "0" and "4-2").
    """
    if spec is None or not spec.strip():
        return 1, None
    match = _PAGE_RANGE.match(spec)
    if match is None:
        raise PDFError(f"invalid page range {spec!r}: expected 'N', 'N-M' or 'N-' with 1-based page numbers")
    first = int(match.group(1))
    if match.group(2) is None:
        last: int | None = first
    else:
        last = int(match.group(3)) if match.group(3) else None
    if first < 1 or (last is not None and last < first):
        raise PDFError(f"invalid page range {spec!r}: pages are numbered from 1 and the range must not be empty")
    return first, last


def render_pdf(
    data: bytes,
    *,
    dpi: int = 144,
    first_page: int = 1,
    last_page: int | None = None,
    max_pages: int = 16,
    max_bytes: int = 50 * 2**20,
    max_pixels_per_page: int = DEFAULT_MAX_PIXELS_PER_PAGE,
) -> list[Image.Image]:
    """Render pages `first_page`..`last_page` (1-based, inclusive; `None` = the last page) as RGB images.

    Each page is rendered at `dpi` (a page of W x H points becomes ceil(W*dpi/72) x ceil(H*dpi/72) pixels),
    on a white background, with the page's own /Rotate applied. A page that would exceed `max_pixels_per_page`
    at that DPI is not refused: it is rendered at the largest scale that fits (aspect ratio kept), because a
    client rarely controls how big a page a PDF producer declares. The images own their pixels (no PDFium
    memory is shared), in page order.

    Raises `PDFError` when the data is more than `max_bytes`, is not a PDF or is damaged beyond repair, needs a
    password, when the range is empty or outside the document, when it holds more than `max_pages` pages, or
    when a page cannot be loaded or has no area. Raises `ValueError` for a non-positive `dpi` or limit (a
    configuration mistake, not the client's).
    """
    for name, value in (
        ("dpi", dpi),
        ("max_pages", max_pages),
        ("max_bytes", max_bytes),
        ("max_pixels_per_page", max_pixels_per_page),
    ):
        if value <= 0:
            raise ValueError(f"{name} must be positive, got {value}")
    if len(data) > max_bytes:
        raise PDFError(f"the PDF is {len(data):,} bytes, more than the limit of {max_bytes:,} bytes")
    if not data:
        raise PDFError("the PDF is empty")
    with _PDFIUM_LOCK:
        document = _open(data)
        try:
            first, last = _check_range(len(document), first_page, last_page, max_pages)
            return [
                _render_page(document, index, dpi / _POINTS_PER_INCH, max_pixels_per_page)
                for index in range(first - 1, last)
            ]
        finally:
            document.close()


def _open(data: bytes) -> pdfium.PdfDocument:
    try:
        return pdfium.PdfDocument(data)
    except pdfium.PdfiumError as exc:
        if exc.err_code == pdfium_c.FPDF_ERR_PASSWORD:
            raise PDFError("the PDF is password-protected; send it without encryption") from None
        if exc.err_code == pdfium_c.FPDF_ERR_SECURITY:
            raise PDFError("the PDF uses an unsupported encryption scheme; send it without encryption") from None
        raise PDFError("the data is not a PDF or the PDF is damaged and cannot be read") from None


def _check_range(num_pages: int, first: int, last: int | None, max_pages: int) -> tuple[int, int]:
    if num_pages < 1:
        raise PDFError("the PDF has no pages")
    last_given = last is not None
    shown = f"{first}-{last}" if last_given else f"{first}-"
    if first < 1 or (last is not None and last < first):
        raise PDFError(f"invalid page range {shown}: pages are numbered from 1 and the range must not be empty")
    if first > num_pages or (last is not None and last > num_pages):
        raise PDFError(f"page range {shown} is outside the document, which has {num_pages} page(s)")
    last = num_pages if last is None else last
    count = last - first + 1
    if count > max_pages:
        what = f"pages {first}-{last} are {count} pages" if last_given or first > 1 else f"the PDF has {count} pages"
        raise PDFError(f"{what}, more than the limit of {max_pages} pages per request; choose a smaller page range")
    return first, last


def _render_page(document: pdfium.PdfDocument, index: int, scale: float, max_pixels: int) -> Image.Image:
    try:
        page = document[index]
    except pdfium.PdfiumError:
        raise PDFError(f"page {index + 1} of the PDF cannot be read") from None
    try:
        width, height = page.get_size()  # points, with /Rotate applied
        if not (width > 0 and height > 0 and math.isfinite(width * height)):
            raise PDFError(f"page {index + 1} of the PDF has no area ({width:g} x {height:g} points)")
        scale = _fit_scale(width, height, scale, max_pixels)
        bitmap = page.render(scale=scale, rev_byteorder=True)
        try:
            # to_pil may share PDFium's buffer, which close() frees: copy the pixels out first.
            return bitmap.to_pil().convert("RGB").copy()
        finally:
            bitmap.close()
    finally:
        page.close()


def _fit_scale(width: float, height: float, scale: float, max_pixels: int) -> float:
    """The largest scale <= `scale` at which the rendered bitmap (sizes rounded up) has <= `max_pixels`."""

    def pixels(s: float) -> int:
        return math.ceil(width * s) * math.ceil(height * s)

    if pixels(scale) <= max_pixels:
        return scale
    scale = min(scale, math.sqrt(max_pixels / (width * height)))
    while pixels(scale) > max_pixels:  # rounding up can overshoot by a row or a column
        scale *= 0.999
    return scale
