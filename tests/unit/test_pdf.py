"""openai_frontend.pdf: page order, DPI, limits and the client-facing errors, on PDFs built here."""

from __future__ import annotations

import hashlib
import io
import threading

import pypdfium2 as pdfium
import pytest
from PIL import Image

from openai_frontend.pdf import DEFAULT_MAX_PIXELS_PER_PAGE, PDFError, parse_page_range, render_pdf

COLOURS = [(255, 0, 0), (0, 160, 0), (0, 0, 255), (255, 200, 0), (128, 0, 128)]

# The padding string of the PDF standard security handler (ISO 32000-1, 7.6.3.3, Algorithm 2).
_PAD = bytes.fromhex("28BF4E5E4E758A4164004E56FFFA01082E2E00B6D0683E802F0CA9FE6453697A")


def _pil_pdf(colours: list[tuple[int, int, int]], size: tuple[int, int] = (200, 300)) -> bytes:
    """A PDF with one page of `size` points per colour (PIL writes 1 pixel = 1 point at 72 DPI)."""
    pages = [Image.new("RGB", size, colour) for colour in colours]
    buffer = io.BytesIO()
    pages[0].save(buffer, "PDF", save_all=True, append_images=pages[1:], resolution=72)
    return buffer.getvalue()


def _rc4(key: bytes, data: bytes) -> bytes:
    state = list(range(256))
    j = 0
    for i in range(256):
        j = (j + state[i] + key[i % len(key)]) % 256
        state[i], state[j] = state[j], state[i]
    out = bytearray()
    i = j = 0
    for byte in data:
        i = (i + 1) % 256
        j = (j + state[i]) % 256
        state[i], state[j] = state[j], state[i]
        out.append(byte ^ state[(state[i] + state[j]) % 256])
    return bytes(out)


def _raw_pdf(
    media_box: tuple[float, float] = (100, 100),
    rotate: int = 0,
    user_password: str | None = None,
    owner_password: str = "owner",
) -> bytes:
    """A one-page PDF filled red, written by hand; with `user_password` set, RC4-40 encrypted (V1, R2).

    PIL and pypdfium2 cannot write encrypted PDFs, so the standard security handler is implemented here
    (Algorithms 2, 3 and 4 of ISO 32000-1, 7.6.3) for the one stream the file has.
    """
    width, height = media_box
    content = f"1 0 0 rg 0 0 {width} {height} re f".encode()
    file_id = hashlib.md5(b"minicpmv-serve test").digest()
    extra_trailer = b""
    encrypt_object = b""
    if user_password is not None:
        permissions = -4
        owner_key = hashlib.md5((owner_password.encode() + _PAD)[:32]).digest()[:5]
        owner_entry = _rc4(owner_key, (user_password.encode() + _PAD)[:32])
        key = hashlib.md5(
            (user_password.encode() + _PAD)[:32]
            + owner_entry
            + permissions.to_bytes(4, "little", signed=True)
            + file_id
        ).digest()[:5]
        user_entry = _rc4(key, _PAD)
        content = _rc4(hashlib.md5(key + (4).to_bytes(3, "little") + (0).to_bytes(2, "little")).digest()[:10], content)
        encrypt_object = (
            f"<< /Filter /Standard /V 1 /R 2 /O <{owner_entry.hex()}> /U <{user_entry.hex()}> /P {permissions} >>"
        ).encode()
        extra_trailer = b" /Encrypt 5 0 R"
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 {width} {height}] /Rotate {rotate} /Contents 4 0 R >>".encode(),
        b"<< /Length %d >>\nstream\n" % len(content) + content + b"\nendstream",
    ]
    if encrypt_object:
        objects.append(encrypt_object)
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R" % (len(objects) + 1) + extra_trailer
    out += b" /ID [<%s> <%s>] >>\nstartxref\n%d\n%%%%EOF\n" % (file_id.hex().encode(), file_id.hex().encode(), xref)
    return bytes(out)


def _close(pixel: tuple[int, ...], colour: tuple[int, int, int], tolerance: int = 8) -> bool:
    # PIL stores the pages as JPEG inside the PDF, so colours come back a few levels off.
    return all(abs(a - b) <= tolerance for a, b in zip(pixel, colour, strict=True))


def test_pages_come_back_in_order_as_rgb():
    images = render_pdf(_pil_pdf(COLOURS[:3]))
    assert len(images) == 3
    for image, colour in zip(images, COLOURS[:3], strict=True):
        assert image.mode == "RGB"
        assert _close(image.getpixel((image.width // 2, image.height // 2)), colour)


@pytest.mark.parametrize(("dpi", "size"), [(72, (200, 300)), (144, (400, 600)), (100, (278, 417))])
def test_dpi_sets_the_pixel_size(dpi, size):
    (image,) = render_pdf(_pil_pdf(COLOURS[:1]), dpi=dpi)
    assert image.size == size  # ceil(points * dpi / 72)


def test_page_range_selects_pages():
    data = _pil_pdf(COLOURS)
    images = render_pdf(data, dpi=36, first_page=2, last_page=4)
    assert len(images) == 3
    assert all(_close(image.getpixel((5, 5)), colour) for image, colour in zip(images, COLOURS[1:4], strict=True))
    assert len(render_pdf(data, dpi=36, first_page=4)) == 2
    (last,) = render_pdf(data, dpi=36, first_page=5, last_page=5)
    assert _close(last.getpixel((5, 5)), COLOURS[4])


@pytest.mark.parametrize(
    ("first", "last", "message"),
    [
        (4, None, "outside the document, which has 3 page"),
        (2, 5, "outside the document, which has 3 page"),
        (3, 2, "invalid page range"),
        (0, 2, "invalid page range"),
    ],
)
def test_page_range_errors(first, last, message):
    with pytest.raises(PDFError, match=message):
        render_pdf(_pil_pdf(COLOURS[:3]), first_page=first, last_page=last)


def test_page_limit_names_the_count_and_the_limit():
    data = _pil_pdf(COLOURS)
    with pytest.raises(PDFError, match=r"the PDF has 5 pages, more than the limit of 3 pages"):
        render_pdf(data, max_pages=3)
    with pytest.raises(PDFError, match=r"pages 1-4 are 4 pages, more than the limit of 3 pages"):
        render_pdf(data, max_pages=3, last_page=4)
    assert len(render_pdf(data, dpi=36, max_pages=3, first_page=2, last_page=4)) == 3


def test_byte_limit():
    data = _pil_pdf(COLOURS[:1])
    with pytest.raises(PDFError, match=f"the PDF is {len(data):,} bytes, more than the limit of 100 bytes"):
        render_pdf(data, max_bytes=100)


@pytest.mark.parametrize(
    "data",
    [b"", b"hello, this is not a PDF", b"%PDF-1.7\n%garbage without objects\n", _pil_pdf(COLOURS[:1])[:120]],
    ids=["empty", "text", "header-only", "truncated"],
)
def test_not_a_pdf(data):
    with pytest.raises(PDFError, match="empty|not a PDF|damaged"):
        render_pdf(data)


def test_hand_written_pdf_renders_red():
    (image,) = render_pdf(_raw_pdf((100, 50)), dpi=72)
    assert image.size == (100, 50)
    assert image.getpixel((50, 25)) == (255, 0, 0)


def test_page_rotation_is_applied():
    (image,) = render_pdf(_raw_pdf((100, 50), rotate=90), dpi=72)
    assert image.size == (50, 100)


def test_password_protected_pdf_is_refused():
    data = _raw_pdf(user_password="secret")
    # The fixture really is an encrypted PDF: PDFium opens it with the password, and only then.
    document = pdfium.PdfDocument(data, password="secret")
    assert document[0].render(scale=1).to_pil().convert("RGB").getpixel((50, 50)) == (255, 0, 0)
    document.close()
    with pytest.raises(PDFError, match="password-protected"):
        render_pdf(data)


def test_encrypted_pdf_without_user_password_renders():
    # Owner-password-only files (permission flags) open without a password, as in any viewer.
    (image,) = render_pdf(_raw_pdf(user_password=""), dpi=72)
    assert image.getpixel((50, 50)) == (255, 0, 0)


def test_oversized_page_is_scaled_down_to_the_pixel_limit():
    (image,) = render_pdf(_raw_pdf((300, 100)), dpi=144, max_pixels_per_page=10_000)
    assert image.width * image.height <= 10_000
    assert image.width * image.height > 9_000
    assert abs(image.width / image.height - 3) < 0.1
    # 200 x 200 inches, the largest page PDF allows: 28800 x 28800 pixels at 144 DPI without the limit.
    (image,) = render_pdf(_raw_pdf((14400, 14400)), dpi=144)
    assert image.width * image.height <= DEFAULT_MAX_PIXELS_PER_PAGE
    assert image.size == (2048, 2048)


def test_bad_configuration_is_a_value_error():
    with pytest.raises(ValueError, match="dpi must be positive"):
        render_pdf(_raw_pdf(), dpi=0)


def test_concurrent_rendering_is_safe():
    datas = [_pil_pdf([colour]) for colour in COLOURS]
    results: dict[int, Image.Image] = {}

    def work(i: int) -> None:
        for _ in range(5):
            (results[i],) = render_pdf(datas[i], dpi=36)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(datas))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(_close(results[i].getpixel((5, 5)), colour) for i, colour in enumerate(COLOURS))


@pytest.mark.parametrize(
    ("spec", "expected"),
    [(None, (1, None)), ("", (1, None)), ("3", (3, 3)), ("2-4", (2, 4)), (" 2 - 4 ", (2, 4)), ("2-", (2, None))],
)
def test_parse_page_range(spec, expected):
    assert parse_page_range(spec) == expected


@pytest.mark.parametrize("spec", ["0", "4-2", "a", "1-2-3", "-3", "1,2"])
def test_parse_page_range_rejects(spec):
    with pytest.raises(PDFError, match="invalid page range"):
        parse_page_range(spec)
