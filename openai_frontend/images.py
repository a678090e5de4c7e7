"""Image parts -> encoded image files for Triton: data URLs decoded and checked, remote URLs fetched only
when the operator allows it, large images downscaled to the pixel budget. Raises APIError(400)."""

from __future__ import annotations

import base64
import binascii
import io
import re
import warnings
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx
from PIL import Image, ImageOps

from openai_frontend.errors import invalid
from openai_frontend.settings import Settings

_ORIENTATION = 0x0112  # EXIF tag
_EXIF_FORMATS = ("JPEG", "WEBP", "TIFF")
SUPPORTED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
_DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[^;,]*)*)(?P<b64>;base64)?,",
                       re.IGNORECASE)  # fmt: skip


@dataclass
class DataURL:
    mime: str
    data: bytes


def parse_data_url(url: str, *, max_bytes: int, param: str, too_large: str = "file_too_large") -> DataURL:
    """``data:<mime>;base64,<payload>`` -> its bytes. Base64 only; at most ``max_bytes`` decoded bytes (else a
    400 with the code ``too_large``)."""
    match = _DATA_URL.match(url[:256])
    if match is None or not match.group("b64"):
        raise invalid("expected a base64 data URL (data:<type>;base64,...)", param)
    payload = url[match.end():]
    if len(payload) * 3 // 4 > max_bytes + 3:
        raise invalid(f"the file is larger than the limit of {max_bytes} bytes", param, code=too_large)
    try:
        data = base64.b64decode(re.sub(r"\s+", "", payload), validate=True)
    except (binascii.Error, ValueError):
        raise invalid("the data URL's payload is not valid base64", param) from None
    return DataURL(mime=(match.group("mime") or "text/plain").lower(), data=data)


def prepare_image(data: bytes, settings: Settings, param: str) -> bytes:
    """Check one encoded image; return the bytes to send (the original unless it had to change).

    Refused: not an image in a supported format, more than ``max_image_bytes``, more than
    ``max_image_pixels`` (checked from the header, before decoding). Downscaled (aspect kept, re-encoded
    as PNG, or JPEG for JPEG sources): more than ``image_pixel_budget`` pixels. EXIF rotations (JPEG, WebP,
    TIFF) are applied. Images sent as they are get a structure check only; Triton decodes their pixels.
    """
    if len(data) > settings.max_image_bytes:
        raise invalid(f"image of {len(data)} bytes; the limit is {settings.max_image_bytes}", param,
                      code="image_too_large")  # fmt: skip
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if image.format not in SUPPORTED_FORMATS:
                raise invalid(f"unsupported image format {image.format}; use one of {', '.join(SUPPORTED_FORMATS)}",
                              param, code="invalid_image")  # fmt: skip
            width, height = image.size
            if width * height > settings.max_image_pixels:
                raise invalid(f"image of {width}x{height} pixels; the limit is {settings.max_image_pixels} pixels",
                              param, code="image_too_large")  # fmt: skip
            over_budget = width * height > settings.image_pixel_budget
            # Photos carry their rotation in EXIF (JPEG, WebP, TIFF); PNG's verify() must come right after open.
            rotated = image.format in _EXIF_FORMATS and image.getexif().get(_ORIENTATION, 1) not in (0, 1)
            if not over_budget and not rotated:
                # Sent as is: check the file's structure without decoding its pixels (Triton decodes them).
                image.verify()
                return data
            source_format = image.format
            image.load()
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):
        raise invalid("the image is too large to decode", param, code="image_too_large") from None
    except (OSError, ValueError, SyntaxError):
        raise invalid("not a decodable image (supported: PNG, JPEG, WebP, GIF, BMP, TIFF)", param,
                      code="invalid_image") from None  # fmt: skip
    image = ImageOps.exif_transpose(image) if rotated else image
    if over_budget:
        width, height = image.size
        scale = (settings.image_pixel_budget / (width * height)) ** 0.5
        size = (max(1, int(width * scale)), max(1, int(height * scale)))
        if image.mode not in ("RGB", "RGBA", "L", "LA"):
            image = image.convert("RGBA" if "A" in image.getbands() or "transparency" in image.info else "RGB")
        image = image.resize(size, Image.Resampling.LANCZOS)
    out = io.BytesIO()
    if source_format == "JPEG":
        image.convert("RGB").save(out, "JPEG", quality=95)
    else:
        image.save(out, "PNG")
    return out.getvalue()


async def fetch_image(url: str, settings: Settings, client: httpx.AsyncClient, param: str,
                      max_bytes: int | None = None, what: str = "image") -> bytes:  # fmt: skip
    """An http(s) URL's bytes (an image's; a video's with ``what="video"`` and its own ``max_bytes``), if the
    operator allows remote media and the host is allow-listed."""
    if not settings.allow_remote_images:
        raise invalid("image URLs are disabled on this server; send the image as a data: URL "
                      "(data:image/png;base64,...)", param, code="remote_images_disabled")  # fmt: skip
    host = (urlsplit(url).hostname or "").lower()
    allowed = settings.remote_image_hosts
    if "*" not in allowed and not any(host == h.lower() or host.endswith("." + h.lower()) for h in allowed):
        raise invalid(f"image host {host!r} is not on this server's allow-list", param, code="host_not_allowed")
    limit = settings.max_image_bytes if max_bytes is None else max_bytes
    try:
        async with client.stream("GET", url, timeout=settings.remote_image_timeout) as response:
            if response.status_code != 200:
                raise invalid(f"fetching the {what} returned HTTP {response.status_code}", param,
                              code="image_fetch_failed")  # fmt: skip
            length = response.headers.get("content-length")
            if length is not None and length.isdigit() and int(length) > limit:
                raise invalid(f"the {what} is larger than the limit of {limit} bytes", param, code=f"{what}_too_large")
            body = bytearray()
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > limit:
                    raise invalid(f"the {what} is larger than the limit of {limit} bytes", param,
                                  code=f"{what}_too_large")  # fmt: skip
    except httpx.TimeoutException:
        raise invalid(f"fetching the {what} timed out after {settings.remote_image_timeout} s", param,
                      code="image_fetch_failed") from None  # fmt: skip
    except httpx.HTTPError as e:
        raise invalid(f"fetching the {what} failed: {type(e).__name__}", param, code="image_fetch_failed") from None
    return bytes(body)
