"""Videos and per-image detail against the real stack (tritonserver + frontend), through the official openai
client: a video's frames reach the model in order, without <image_id> tags, 2 slices each; the same video asked
twice is read from the prefix cache; /v1/responses and a batch line take videos too; bad videos get their 400
and the server keeps serving; a low-detail thumbnail beside a page takes one chunk."""

from __future__ import annotations

import io

import openai
import pytest
from PIL import Image

from tests.frontend.helpers import data_url, image_part, metric, page
from tests.frontend.test_batches import finished, results, upload, wait_for
from tests.frontend.test_video import encode

pytestmark = pytest.mark.slow
MODEL = "minicpm_v_2_6"
QUESTION = {"type": "text", "text": "What happens in the video?"}
GREEDY = {"max_tokens": 3, "temperature": 0, "logprobs": True, "extra_body": {"ignore_eos": True}}
# A frame of 64x48 is read whole (no slices): <image>, 64 <unk>, </image>, and the newline after it.
TOKENS_PER_SMALL_FRAME = 67


@pytest.fixture(scope="module")
def mp4() -> bytes:
    return encode("mp4", "libx264", 50, 10)  # 5 s at 10 fps: one frame a second, 5 frames


@pytest.fixture(scope="module")
def other_mp4() -> bytes:
    return encode("webm", "libvpx-vp9", 40, 10, size=(64, 48))  # 4 s in another container: 4 frames


def video(data: bytes, mime: str = "video/mp4", **extra) -> dict:
    return {"type": "video_url", "video_url": {"url": data_url(data, mime), **extra}}


def ask(client, parts, **kwargs):
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": [*parts, QUESTION]}],
                                          **(GREEDY | kwargs))  # fmt: skip


def logprobs(answer) -> list[float]:
    return [round(t.logprob, 4) for t in answer.choices[0].logprobs.content]


def test_a_video_reaches_the_model_as_its_frames_and_is_cached(client, server, other_mp4, mp4):
    text = ask(client, [])
    hits = metric(server.metrics_url, "minicpmv_prefix_cache_hits_total", model=MODEL)
    first = ask(client, [video(mp4)])
    assert first.usage.prompt_tokens == text.usage.prompt_tokens + 5 * TOKENS_PER_SMALL_FRAME
    again = ask(client, [video(mp4)])
    assert logprobs(again) == logprobs(first)
    # The second time, the prompt's blocks (frames included) come from the prefix cache.
    cached = metric(server.metrics_url, "minicpmv_prefix_cache_hits_total", model=MODEL) - hits
    assert cached >= first.usage.prompt_tokens - 16
    other = ask(client, [video(other_mp4, "video/webm")])
    assert other.usage.prompt_tokens == text.usage.prompt_tokens + 4 * TOKENS_PER_SMALL_FRAME
    assert logprobs(other) != logprobs(first)  # the frames' content reaches the model
    fewer = ask(client, [video(mp4, max_frames=2)])
    assert fewer.usage.prompt_tokens == text.usage.prompt_tokens + 2 * TOKENS_PER_SMALL_FRAME


def test_frames_are_the_models_images_without_image_ids(client, mp4):
    """The same frames as image parts get <image_id> tags (3 tokens each) and the default slicing; as a video,
    none: their prompt is 3 tokens a frame shorter."""
    from openai_frontend.video import VideoLimits, decode_frames

    frames = decode_frames(mp4, VideoLimits()).frames
    as_images = []
    for frame in frames:
        buffer = io.BytesIO()
        frame.save(buffer, "PNG")
        as_images.append(image_part(buffer.getvalue()))
    images = ask(client, as_images)
    as_video = ask(client, [video(mp4)])
    assert images.usage.prompt_tokens - as_video.usage.prompt_tokens == 3 * len(frames)


def test_the_responses_api_and_a_batch_line_take_videos(client, make_frontend, tmp_path, mp4):
    chat = ask(client, [video(mp4)])
    response = client.responses.create(model=MODEL, max_output_tokens=3, temperature=0, extra_body={"ignore_eos": True},
                                       input=[{"role": "user", "content": [
                                           {"type": "input_video", "video_url": data_url(mp4, "video/mp4")},
                                           {"type": "input_text", "text": QUESTION["text"]}]}])  # fmt: skip
    assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"  # 3 tokens
    assert response.usage.input_tokens == chat.usage.prompt_tokens
    batch_client = make_frontend(batch_data_dir=tmp_path).client()
    line = {"custom_id": "video-1", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": MODEL, "max_tokens": 3, "temperature": 0, "ignore_eos": True,
                     "messages": [{"role": "user", "content": [video(mp4), QUESTION]}]}}  # fmt: skip
    batch = batch_client.batches.create(input_file_id=upload(batch_client, [line]).id,
                                        endpoint="/v1/chat/completions", completion_window="24h")  # fmt: skip
    batch = wait_for(batch_client, batch.id, finished)
    assert batch.status == "completed" and batch.request_counts.completed == 1, batch
    [result] = results(batch_client, batch.output_file_id)
    assert result["response"]["body"]["usage"]["prompt_tokens"] == chat.usage.prompt_tokens


def test_bad_videos_get_their_400_and_the_server_keeps_serving(client, mp4):
    import wave

    audio = io.BytesIO()
    with wave.open(audio, "wb") as wav:
        wav.setnchannels(1), wav.setsampwidth(2), wav.setframerate(8000), wav.writeframes(b"\0" * 1600)
    png = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(png, "PNG")
    huge_gif = bytearray(encode_gif())
    huge_gif[6:10] = (10_000).to_bytes(2, "little") * 2  # the canvas the header claims: 10,000 x 10,000
    cases = [(mp4[: len(mp4) // 2], "video/mp4", "invalid_video"),  # truncated
             (audio.getvalue(), "video/mp4", "no_video_stream"),  # audio only, whatever the label says
             (png.getvalue(), "video/mp4", "invalid_video"),  # an image that claims to be a video
             (bytes(huge_gif), "image/gif", "invalid_video"),  # a data URL of an image type for a video part
             (bytes(huge_gif), "video/gif", "video_frame_too_large")]  # fmt: skip
    for data, mime, code in cases:
        with pytest.raises(openai.BadRequestError) as caught:
            ask(client, [video(data, mime)])
        error = caught.value.body
        assert error["code"] == code and error["param"] == "messages[0].content[0].video_url.url", error
        assert "Traceback" not in error["message"]
    assert ask(client, [video(mp4)]).choices[0].message.content  # still serving
    with pytest.raises(openai.BadRequestError, match="input_audio.*not supported.*video_url"):
        ask(client, [{"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}])


def encode_gif() -> bytes:
    frames = [Image.new("RGB", (64, 48), (40 * k, 0, 0)) for k in range(3)]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=[100] * 3, loop=0)
    return buffer.getvalue()


def test_a_low_detail_thumbnail_beside_a_page_takes_one_chunk(client):
    thumbnail, document = page(900, 640, "Thumbnail"), page(1200, 1600, "Page")
    alone = ask(client, [image_part(document)])
    thumb_low = ask(client, [image_part(thumbnail, detail="low"), image_part(document)])
    thumb_auto = ask(client, [image_part(thumbnail), image_part(document)])
    thumb_one = ask(client, [image_part(thumbnail, max_slice_nums=1), image_part(document)])
    # 1 chunk for the thumbnail: <image_id>0</image_id>, <image>, 64 <unk>, </image> and a newline: 70 tokens
    assert thumb_low.usage.prompt_tokens == alone.usage.prompt_tokens + 70
    assert thumb_auto.usage.prompt_tokens > thumb_low.usage.prompt_tokens + 64  # sliced when auto
    assert logprobs(thumb_one) == logprobs(thumb_low)
