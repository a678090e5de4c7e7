"""PDF input through the openai SDK: a PDF's pages reach the model as images, all of them, in order."""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image, ImageDraw

from openai_frontend.pdf import render_pdf
from tests.frontend.helpers import image_part
from tests.unit.test_pdf import _raw_pdf as handmade_pdf

pytestmark = pytest.mark.slow
DPI = 72  # small pages: no downscaling on the way, so rendering here gives the frontend's exact pixels


def three_pages() -> bytes:
    pages = []
    for number, shade in ((1, "white"), (2, "lightyellow"), (3, "lightblue")):
        page = Image.new("RGB", (420, 594), shade)
        draw = ImageDraw.Draw(page)
        draw.text((30, 30), f"Page {number}", fill="black")
        for row in range(8):
            draw.text((30, 80 + 40 * row), f"Line {row} of page {number}: amount {17 * number + row}.00", fill="black")
        pages.append(page)
    buffer = io.BytesIO()
    pages[0].save(buffer, "PDF", save_all=True, append_images=pages[1:], resolution=72)
    return buffer.getvalue()


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def ask(client, parts):
    return client.chat.completions.create(
        model="minicpm_v_2_6", max_tokens=4, temperature=0, logprobs=True, extra_body={"ignore_eos": True},
        messages=[{"role": "user", "content": [*parts, {"type": "text", "text": "What is on page 2?"}]}])  # fmt: skip


def test_a_three_page_pdf_reaches_the_model_as_three_images_in_order(make_frontend):
    client = make_frontend(pdf_dpi=DPI).client()
    data = three_pages()
    pdf_part = {"type": "file", "file": {"filename": "report.pdf",
                                         "file_data": "data:application/pdf;base64," + base64.b64encode(data).decode()}}  # fmt: skip
    from_pdf = ask(client, [pdf_part])
    pages = [png(p) for p in render_pdf(data, dpi=DPI)]
    assert len(pages) == 3
    in_order = ask(client, [image_part(p) for p in pages])
    reversed_order = ask(client, [image_part(p) for p in reversed(pages)])
    two_pages = ask(client, [image_part(p) for p in pages[:2]])

    def logprobs(r):
        return [round(t.logprob, 4) for t in r.choices[0].logprobs.content]

    # The same prompt, token for token: three images, in the PDF's order.
    assert from_pdf.usage.prompt_tokens == in_order.usage.prompt_tokens > two_pages.usage.prompt_tokens
    assert from_pdf.choices[0].message.content == in_order.choices[0].message.content
    assert logprobs(from_pdf) == logprobs(in_order)
    assert logprobs(from_pdf) != logprobs(reversed_order)  # the check can tell the order apart

    only_page_2 = ask(client, [{**pdf_part, "file": {**pdf_part["file"], "pages": "2"}}])
    assert logprobs(only_page_2) == logprobs(ask(client, [image_part(pages[1])]))


def test_broken_and_encrypted_pdfs_are_400(client):
    import openai

    broken = "data:application/pdf;base64," + base64.b64encode(b"%PDF-1.4\n garbage").decode()
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="minicpm_v_2_6", max_tokens=2, messages=[
            {"role": "user", "content": [{"type": "file", "file": {"file_data": broken}}]}])  # fmt: skip
    assert e.value.body["code"] == "invalid_pdf" and e.value.body["param"] == "messages[0].content[0].file.file_data"
    locked = "data:application/pdf;base64," + base64.b64encode(handmade_pdf(user_password="secret")).decode()
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="minicpm_v_2_6", max_tokens=2, messages=[
            {"role": "user", "content": [{"type": "file", "file": {"file_data": locked}}]}])  # fmt: skip
    assert "password" in e.value.body["message"]
