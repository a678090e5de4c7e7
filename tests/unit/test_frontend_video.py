"""video_url parts in the frontend's conversion (openai_frontend/convert.py): a video becomes its sampled frames,
as images without <image_id> tags and with 2 slices each (the part's own fps, max_frames and max_slice_nums
taken), every limit checked before frames are decoded, each failure a 400 with its code and param."""

from __future__ import annotations

import asyncio
import base64

import pytest
from PIL import Image

from openai_frontend.convert import to_generate_request
from openai_frontend.errors import APIError
from openai_frontend.metrics import Metrics
from openai_frontend.schemas import ChatCompletionRequest
from openai_frontend.settings import Settings
from tests.frontend.test_video import colour, encode


def data_url(data: bytes, mime: str = "video/mp4") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def convert(parts: list[dict], metrics=None, **settings):
    body = {"model": "m", "messages": [{"role": "user", "content": [*parts, {"type": "text", "text": "What?"}]}]}
    request = ChatCompletionRequest.model_validate(body)
    return asyncio.run(to_generate_request(request, Settings(**settings), metrics=metrics))


def video_part(data: bytes, mime: str = "video/mp4", **extra) -> dict:
    return {"type": "video_url", "video_url": {"url": data_url(data, mime), **extra}}


@pytest.fixture(scope="module")
def mp4() -> bytes:
    return encode("mp4", "libx264", 50, 10)  # 5 s at 10 fps: frames 0, 10, 20, 30, 40


def test_a_video_becomes_its_sampled_frames_in_order(mp4):
    metrics = Metrics()
    g = convert([video_part(mp4)], metrics)
    frame = {"type": "image", "use_image_id": False, "max_slice_nums": 2}
    assert g.messages[0]["content"] == [frame] * 5 + [{"type": "text", "text": "What?"}]
    assert len(g.images) == 5
    import io

    for k, encoded in zip((0, 10, 20, 30, 40), g.images, strict=True):
        pixels = Image.open(io.BytesIO(encoded)).convert("RGB").getpixel((32, 24))
        assert max(abs(a - b) for a, b in zip(pixels, colour(k), strict=True)) <= 16, (k, pixels)
    assert metrics.video_parts.labels("ok")._value.get() == 1
    assert metrics.video_frames._value.get() >= 41  # decoded up to the last sampled frame


def test_the_parts_own_fps_frames_and_slices(mp4):
    g = convert([video_part(mp4, fps=2, max_frames=4, max_slice_nums=1)])
    assert len(g.images) == 4  # 2 fps: 10 candidates, 4 picked
    assert all(p == {"type": "image", "use_image_id": False, "max_slice_nums": 1}
               for p in g.messages[0]["content"][:4])  # fmt: skip


def test_a_video_beside_images_and_pages_keeps_their_settings(mp4):
    import io

    png = io.BytesIO()
    Image.new("RGB", (64, 48), "white").save(png, "PNG")
    image = {"type": "image_url", "image_url": {"url": data_url(png.getvalue(), "image/png"), "detail": "low"}}
    g = convert([image, video_part(mp4, max_frames=2)])
    assert g.messages[0]["content"][:3] == [{"type": "image", "max_slice_nums": 1},
                                            {"type": "image", "use_image_id": False, "max_slice_nums": 2},
                                            {"type": "image", "use_image_id": False, "max_slice_nums": 2}]  # fmt: skip
    assert len(g.images) == 3


def _refused(parts, code: str, **settings) -> APIError:
    with pytest.raises(APIError) as caught:
        convert(parts, **settings)
    assert caught.value.status == 400 and caught.value.code == code, (caught.value.code, str(caught.value))
    return caught.value


def test_limits_and_bad_videos_are_400s_with_their_code(mp4):
    param = "messages[0].content[0].video_url.url"
    assert _refused([video_part(mp4[: len(mp4) // 2])], "invalid_video").param == param  # truncated
    assert _refused([video_part(b"\x00" * 4000)], "invalid_video").param == param
    _refused([video_part(mp4)], "video_too_large", max_video_bytes=1000)
    _refused([video_part(mp4)], "video_too_long", max_video_seconds=2)
    _refused([video_part(mp4)], "video_frame_too_large", max_video_frame_pixels=1000)
    # 5 frames x (2 slices + 1) x 64 = 960 positions: over a 900 budget, before anything is decoded
    error = _refused([video_part(mp4)], "video_too_long", max_video_tokens=900)
    assert "960" in str(error) and "max_frames" in str(error)
    _refused([video_part(mp4), video_part(mp4)], "too_many_videos")
    _refused([video_part(mp4, "image/png")], "invalid_video")  # a data URL that says it is something else
    with pytest.raises(APIError, match="at most 64 frames") as caught:
        convert([video_part(mp4, max_frames=65)])
    assert caught.value.param == "messages[0].content[0].video_url.max_frames"


def test_remote_videos_follow_the_image_allow_list(mp4):
    part = {"type": "video_url", "video_url": {"url": "https://example.com/clip.mp4"}}
    _refused([part], "remote_images_disabled")
