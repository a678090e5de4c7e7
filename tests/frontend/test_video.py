"""openai_frontend.video: the model card's frame sampling, and decoding real files (made here, in memory, with
PyAV) into those frames, with every limit and failure a client can cause mapped to a VideoError code."""

from __future__ import annotations

import asyncio
import hashlib
import io
import random
import struct
import threading
import time
import wave
from concurrent.futures import ThreadPoolExecutor

import av
import numpy as np
import pytest
from PIL import Image

from openai_frontend import video
from openai_frontend.video import (
    FRAME_KEY,
    DecodedVideo,
    VideoError,
    VideoLimits,
    decode_frames,
    decode_video_async,
    probe,
    sample_indices,
)

LIMITS = VideoLimits()
FAST = {"libvpx-vp9": {"deadline": "realtime", "cpu-used": "8"}, "libvpx": {"deadline": "realtime", "cpu-used": "8"}}


def colour(k: int) -> tuple[int, int, int]:
    return (k * 37 % 256, k * 91 % 256, k * 13 % 256)


def encode(fmt: str, codec: str, frames: int, fps: int, size=(64, 48), path=None, options=None) -> bytes:
    """Frame k is a solid colour(k). libx264 with its default preset: B-frames, so decoding reorders."""
    target = io.BytesIO() if path is None else str(path)
    width, height = size
    with av.open(target, "w", format=fmt, options=options or {}) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = FAST.get(codec, {})
        for k in range(frames):
            pixels = np.empty((height, width, 3), np.uint8)
            pixels[:] = colour(k)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        container.mux(stream.encode())
    return target.getvalue() if path is None else path.read_bytes()


def gif(durations_ms: list[int], size=(64, 48)) -> bytes:
    frames = [Image.new("RGB", size, colour(k)) for k in range(len(durations_ms))]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=durations_ms, loop=0)
    return buffer.getvalue()


def mean_colour(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.float64).reshape(-1, 3).mean(axis=0)


def assert_frames_are(result: DecodedVideo, indices: list[int], size=(64, 48), tolerance=12.0):
    assert result.indices == indices
    assert len(result.frames) == len(result.keys) == len(indices)
    for index, frame, key in zip(indices, result.frames, result.keys, strict=True):
        assert frame.mode == "RGB" and frame.size == size
        assert frame.info[FRAME_KEY] == key
        error = np.abs(mean_colour(frame) - colour(index)).max()
        assert error <= tolerance, f"frame {index}: mean {mean_colour(frame)} vs {colour(index)}"


def code_of(data: bytes, limits: VideoLimits = LIMITS, **kwargs) -> str:
    with pytest.raises(VideoError) as caught:
        decode_frames(data, limits, **kwargs)
    assert caught.value.message == str(caught.value) and caught.value.message
    return caught.value.code


@pytest.fixture(scope="module")
def mp4_5s() -> bytes:
    return encode("mp4", "libx264", 50, 10)


@pytest.fixture(scope="module")
def webm_5s() -> bytes:
    return encode("webm", "libvpx-vp9", 50, 10)


# ---------------------------------------------------------------------------------------- the sampling rule

# 70 candidates, 64 picked: gap = 70/64 = 1.09375, pick int(i*1.09375 + 0.546875), which skips the candidates
# where that floor jumps by two: 5 (i=5 gives 6.01), 17, 29, 40, 52, 64.
PICKED_OF_70 = [j for j in range(70) if j not in {5, 17, 29, 40, 52, 64}]
# 200 candidates, 64 picked: gap = 3.125, int(i*3.125 + 1.5625).
PICKED_OF_200 = [1, 4, 7, 10, 14, 17, 20, 23, 26, 29, 32, 35, 39, 42, 45, 48, 51, 54, 57, 60, 64, 67, 70, 73, 76, 79,
                 82, 85, 89, 92, 95, 98, 101, 104, 107, 110, 114, 117, 120, 123, 126, 129, 132, 135, 139, 142, 145,
                 148, 151, 154, 157, 160, 164, 167, 170, 173, 176, 179, 182, 185, 189, 192, 195, 198]  # fmt: skip


@pytest.mark.parametrize("rate", [24, 25, 30, 60])
def test_one_frame_per_second_then_64_picked_uniformly(rate):
    assert sample_indices(1 * rate, rate) == [0]
    assert sample_indices(10 * rate, rate) == [rate * k for k in range(10)]
    assert sample_indices(70 * rate, rate) == [rate * j for j in PICKED_OF_70]
    assert sample_indices(200 * rate, rate) == [rate * j for j in PICKED_OF_200]
    assert len(PICKED_OF_70) == len(PICKED_OF_200) == 64
    # one frame short of 64 s: still every second, no thinning
    assert sample_indices(64 * rate, rate) == [rate * k for k in range(64)]


def test_exact_lists():
    assert sample_indices(300, 30) == [0, 30, 60, 90, 120, 150, 180, 210, 240, 270]
    assert sample_indices(1750, 25)[:8] == [0, 25, 50, 75, 100, 150, 175, 200]  # candidate 5 (frame 125) skipped
    assert sample_indices(1750, 25)[-3:] == [1675, 1700, 1725]  # 67, 68, 69: candidate 64 (frame 1600) skipped
    # a part of a second left over still starts a candidate
    assert sample_indices(301, 30) == [0, 30, 60, 90, 120, 150, 180, 210, 240, 270, 300]


def test_requested_fps_and_max_frames():
    assert sample_indices(300, 30, fps=2) == list(range(0, 300, 15))
    # 20 candidates -> 8: gap 2.5, int(2.5i + 1.25) = 1, 3, 6, 8, 11, 13, 16, 18
    assert sample_indices(300, 30, fps=2, max_frames=8) == [15, 45, 90, 120, 165, 195, 240, 270]
    # 10 candidates -> 8: gap 1.25, int(1.25i + 0.625) = 0, 1, 3, 4, 5, 6, 8, 9
    assert sample_indices(250, 25, max_frames=8) == [0, 25, 75, 100, 125, 150, 200, 225]
    assert sample_indices(250, 25, max_frames=10) == list(range(0, 250, 25))


def test_step_rounding():
    assert sample_indices(300, 29.97) == list(range(0, 300, 30))
    assert sample_indices(240, 23.976) == list(range(0, 240, 24))
    assert sample_indices(10, 2.5) == [0, 2, 4, 6, 8]  # round(2.5) == 2, Python's (and the model card's) rounding
    assert sample_indices(5, 0.4) == [0, 1, 2, 3, 4]  # round(0.4) == 0: every frame, not range(..., 0)
    assert sample_indices(5, 10, fps=30) == [0, 1, 2, 3, 4]  # more per second than the video has
    assert sample_indices(5, 10, fps=1e-300) == [0]  # a step beyond the end (round(inf) would raise)


@pytest.mark.parametrize("args", [(0, 30), (-1, 30), (10, 0), (10, -1), (10, float("nan")), (10, float("inf")),
                                  (10, 30, 0), (10, 30, -2), (10, 30, None, 0), (1.5, 30)])  # fmt: skip
def test_sampling_rejects_nonsense(args):
    with pytest.raises(ValueError):
        sample_indices(*args)


def test_limits_reject_nonsense():
    assert LIMITS == VideoLimits(max_bytes=50 * 2**20, max_seconds=600, max_frames=64, max_frame_pixels=3840 * 2160,
                                 decode_timeout_s=60)  # fmt: skip
    for field in ("max_bytes", "max_seconds", "max_frames", "max_frame_pixels", "decode_timeout_s"):
        for bad in (0, -1, float("nan"), True):
            with pytest.raises(ValueError, match=field):
                VideoLimits(**{field: bad})
    with pytest.raises(ValueError, match="integer"):
        VideoLimits(max_frames=2.5)


# ----------------------------------------------------------------------------------------------- real files


@pytest.mark.parametrize(("fmt", "codec", "name"), [
    ("mp4", "libx264", "mp4"), ("webm", "libvpx-vp9", "webm"), ("mov", "libx264", "mov"), ("mov", "mpeg4", "mov"),
    ("avi", "mpeg4", "avi"), ("matroska", "libx264", "matroska"), ("webm", "libvpx", "webm"),
])  # fmt: skip
def test_five_seconds_at_10_fps_gives_one_frame_per_second(fmt, codec, name):
    result = decode_frames(encode(fmt, codec, 50, 10), LIMITS)
    assert_frames_are(result, [0, 10, 20, 30, 40])
    info = result.info
    assert (info.container, info.width, info.height, info.frame_count, info.average_fps) == (name, 64, 48, 50, 10.0)
    assert info.codec == {"libx264": "h264", "libvpx-vp9": "vp9", "libvpx": "vp8"}.get(codec, codec)
    assert info.duration_s == pytest.approx(5.0, abs=0.11)
    assert result.frames_decoded == 41  # stopped after the last sampled frame
    assert result.decode_seconds > 0


def test_a_gif_with_varying_delays_samples_by_frame_at_its_average_rate():
    # 10 frames of 50 ms then 10 of 200 ms: 20 frames in 2.5 s, 8 frames/s on average -> every 8th frame
    data = gif([50] * 10 + [200] * 10)
    result = decode_frames(data, LIMITS)
    assert (result.info.container, result.info.codec, result.info.frame_count) == ("gif", "gif", 20)
    assert result.info.average_fps == pytest.approx(8.0)
    assert result.info.duration_s == pytest.approx(2.5)
    assert_frames_are(result, [0, 8, 16], tolerance=1)  # GIF palettes hold these colours exactly


def test_a_single_frame_gif():
    result = decode_frames(gif([0]), LIMITS)
    assert result.info.frame_count == 1 and result.info.average_fps > 0
    assert_frames_are(result, [0], tolerance=1)


def test_more_than_64_seconds_picks_64_frames_uniformly():
    data = encode("mp4", "libx264", 140, 2, size=(32, 32))  # 70 s at 2 fps: 70 candidates, every other frame
    result = decode_frames(data, LIMITS)
    assert result.info.frame_count == 140 and result.info.duration_s == pytest.approx(70, abs=0.6)
    assert_frames_are(result, [2 * j for j in PICKED_OF_70], size=(32, 32))
    # and a request for fewer frames, at another rate
    fewer = decode_frames(data, LIMITS, fps=0.5, max_frames=8)  # every 4th frame: 35 candidates -> 8
    assert_frames_are(fewer, sample_indices(140, 2, fps=0.5, max_frames=8), size=(32, 32))
    assert fewer.indices == [4 * int(i * 35 / 8 + 35 / 16) for i in range(8)] == [8, 24, 40, 60, 76, 96, 112, 128]


def test_requested_fps_and_the_frame_cap(mp4_5s):
    assert_frames_are(decode_frames(mp4_5s, LIMITS, fps=2), list(range(0, 50, 5)))
    capped = VideoLimits(max_frames=4)  # 5 candidates -> 4: gap 1.25 -> 0, 1, 3, 4
    assert_frames_are(decode_frames(mp4_5s, capped), [0, 10, 30, 40])
    assert decode_frames(mp4_5s, capped, max_frames=100).indices == [0, 10, 30, 40]  # the limit caps the request
    assert decode_frames(mp4_5s, LIMITS, max_frames=2).indices == [10, 30]
    with pytest.raises(ValueError):
        decode_frames(mp4_5s, LIMITS, fps=0)
    with pytest.raises(ValueError):
        decode_frames(mp4_5s, LIMITS, max_frames=0)


def test_the_bytes_decide_the_container_not_the_label(webm_5s):
    # a data URL may say video/mp4 for WebM bytes: nothing here takes the label, the bytes are read as what they are
    info = probe(webm_5s, LIMITS)
    assert (info.container, info.codec, info.frame_count) == ("webm", "vp9", 50)


def test_probe_reads_without_decoding(mp4_5s):
    info = probe(mp4_5s, LIMITS)
    assert (info.container, info.codec, info.width, info.height, info.frame_count) == ("mp4", "h264", 64, 48, 50)
    assert info.average_fps == 10.0 and info.duration_s == pytest.approx(5.0)


def test_frame_keys_follow_content(mp4_5s):
    first, second = decode_frames(mp4_5s, LIMITS), decode_frames(mp4_5s, LIMITS)
    assert first.keys == second.keys  # same bytes, same keys
    assert len(set(first.keys)) == len(first.keys)  # different frames, different keys
    frame = first.frames[2]
    expected = hashlib.sha256(f"{frame.width}x{frame.height}:".encode() + frame.tobytes()).hexdigest()
    assert first.keys[2] == frame.info[FRAME_KEY] == expected
    # keys are of content, not of positions: a frame with the same pixels has the same key wherever it comes from
    assert first.keys[0] == decode_frames(encode("mov", "mpeg4", 50, 10), LIMITS).keys[0]  # frame 0 is black in both


# ----------------------------------------------------------------------------------------------- bad inputs


def test_limits_on_bytes_length_and_frame_size(mp4_5s, webm_5s):
    assert code_of(mp4_5s, VideoLimits(max_bytes=len(mp4_5s) - 1)) == "video_too_large"
    assert code_of(mp4_5s, VideoLimits(max_seconds=4)) == "video_too_long"
    assert code_of(webm_5s, VideoLimits(max_seconds=4)) == "video_too_long"
    assert code_of(mp4_5s, VideoLimits(max_frame_pixels=1000)) == "video_frame_too_large"
    assert code_of(webm_5s, VideoLimits(max_frame_pixels=64 * 48 - 1)) == "video_frame_too_large"
    # MPEG-4 Part 2 in MOV: the size is only in the bitstream, read by a probe that may not decode larger frames
    assert code_of(encode("mov", "mpeg4", 5, 10), VideoLimits(max_frame_pixels=1000)) == "video_frame_too_large"
    assert decode_frames(mp4_5s, VideoLimits(max_bytes=len(mp4_5s), max_seconds=5, max_frame_pixels=64 * 48)).frames


def test_a_huge_frame_is_refused_from_the_header():
    data = bytearray(gif([100] * 3))
    data[6:10] = struct.pack("<HH", 10_000, 10_000)  # the GIF's canvas: 10,000 x 10,000, 400 MB as BGRA
    started = time.perf_counter()
    with pytest.raises(VideoError, match="10000x10000") as caught:
        decode_frames(bytes(data), LIMITS)
    assert caught.value.code == "video_frame_too_large"
    assert time.perf_counter() - started < 1.0  # nothing that size was allocated, let alone filled


def test_audio_only_files_have_no_video_stream():
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:  # AAC in MP4 (an .m4a)
        stream = container.add_stream("aac", rate=16000)
        for i in range(8):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 16000, i * 1024
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    assert code_of(buffer.getvalue()) == "no_video_stream"
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as wav:
        wav.setnchannels(1), wav.setsampwidth(2), wav.setframerate(8000), wav.writeframes(b"\0" * 1600)
    assert code_of(buffer.getvalue()) == "no_video_stream"


def test_a_video_stream_without_frames_is_invalid():
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="matroska") as container:  # a video stream, and packets only of audio
        stream = container.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        audio = container.add_stream("aac", rate=16000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate, frame.pts = 16000, 0
        container.mux(audio.encode(frame))
        container.mux(audio.encode())
    with pytest.raises(VideoError, match="no frames") as caught:
        decode_frames(buffer.getvalue(), LIMITS)
    assert caught.value.code == "invalid_video"


def test_not_videos():
    png = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(png, "PNG")
    assert code_of(png.getvalue()) == "invalid_video"
    assert code_of(random.Random(0).randbytes(5000)) == "invalid_video"
    assert code_of(b"") == "invalid_video"
    assert code_of(b"\x00\x00\x00\x18ftypisom" + bytes(100)) == "invalid_video"  # an MP4's first box, then nothing


def test_truncated_files(mp4_5s, webm_5s, tmp_path):
    # moov at the end (the default): without it nothing can be read
    assert code_of(mp4_5s[: len(mp4_5s) // 2]) == "invalid_video"
    assert code_of(mp4_5s[: len(mp4_5s) * 9 // 10]) == "invalid_video"
    # moov first (faststart): the header lists 50 frames, the file holds fewer
    faststart = encode("mp4", "libx264", 50, 10, path=tmp_path / "faststart.mp4", options={"movflags": "faststart"})
    assert_frames_are(decode_frames(faststart, LIMITS), [0, 10, 20, 30, 40])
    with pytest.raises(VideoError, match="truncated") as caught:
        decode_frames(faststart[: len(faststart) * 3 // 4], LIMITS)
    assert caught.value.code == "invalid_video"
    # WebM has no frame count: the frames end long before the duration its header declares
    with pytest.raises(VideoError, match="truncated") as caught:
        decode_frames(webm_5s[: len(webm_5s) // 2], LIMITS)
    assert caught.value.code == "invalid_video"


def test_damaged_files_never_raise_anything_but_video_errors(mp4_5s, webm_5s):
    rng = random.Random(24)
    outcomes = set()
    for data in (mp4_5s, webm_5s, gif([100] * 10)):
        for _ in range(12):
            damaged = bytearray(data)
            for _ in range(rng.choice((1, 8, 64))):
                damaged[rng.randrange(16, len(damaged))] = rng.randrange(256)
            try:
                outcomes.add(type(decode_frames(bytes(damaged), LIMITS)).__name__)
            except VideoError as error:
                outcomes.add(error.code)
    assert outcomes <= {"DecodedVideo", "invalid_video", "video_frame_too_large", "video_too_long",
                        "no_video_stream"}  # fmt: skip


def test_the_deadline_stops_decoding(mp4_5s, monkeypatch):
    assert code_of(mp4_5s, VideoLimits(decode_timeout_s=1e-6)) == "video_decode_timeout"

    class Clock:  # one second passes each time the decode looks at the clock
        calls = 0

        def __call__(self):
            self.calls += 1
            return float(self.calls)

    clock = Clock()
    monkeypatch.setattr(video, "_clock", clock)
    with pytest.raises(VideoError, match="longer than 30 s") as caught:
        decode_frames(encode("mp4", "libx264", 140, 2, size=(32, 32)), VideoLimits(decode_timeout_s=30))
    assert caught.value.code == "video_decode_timeout"
    assert clock.calls < 40  # it stopped at the first check past the deadline, not at the end of 140 frames


# --------------------------------------------------------------------------------------------------- async


def test_decode_video_async_returns_the_frames(mp4_5s):
    result = asyncio.run(decode_video_async(mp4_5s, LIMITS, fps=2))
    assert result.indices == list(range(0, 50, 5))
    assert result.keys == decode_frames(mp4_5s, LIMITS, fps=2).keys


def test_decode_video_async_times_out_cleanly(mp4_5s, monkeypatch):
    # a decode stuck inside FFmpeg (it never reaches a deadline check): the caller still returns on time, and the
    # decode is told to stop
    stopped = threading.Event()

    def stuck(data, limits, fps, max_frames, cancel):
        cancel.wait(10)
        stopped.set()
        raise VideoError("cancelled", "video_decode_timeout")

    monkeypatch.setattr(video, "_decode", stuck)
    monkeypatch.setattr(video, "_ASYNC_MARGIN_S", 0.0)
    with ThreadPoolExecutor(max_workers=1) as executor:
        started = time.perf_counter()
        with pytest.raises(VideoError) as caught:
            asyncio.run(decode_video_async(mp4_5s, VideoLimits(decode_timeout_s=0.2), executor=executor))
        assert caught.value.code == "video_decode_timeout"
        assert time.perf_counter() - started < 2.0
        assert stopped.wait(2.0)


def test_decode_video_async_passes_the_inner_deadline_on(mp4_5s):
    with pytest.raises(VideoError) as caught:
        asyncio.run(decode_video_async(mp4_5s, VideoLimits(decode_timeout_s=1e-6)))
    assert caught.value.code == "video_decode_timeout"


FORK_AFTER_DECODE = """
import asyncio, subprocess, sys
sys.path.insert(0, {root!r})
from openai_frontend import video
from tests.frontend.test_video import encode
data = encode("mp4", "libx264", 20, 10, size=(640, 480))
decoded = asyncio.run(video.decode_video_async(data, video.VideoLimits(max_output_pixels=160 * 120)))
assert len(decoded.frames) == 2 and decoded.frames[0].size == (160, 120), decoded.frames[0].size
subprocess.run(["true"], preexec_fn=lambda: None, check=True)  # the pool's threads are alive meanwhile
print("forked")
"""


def test_a_process_that_decoded_videos_can_still_fork_with_a_preexec_fn():
    """Decoding leaves no FFmpeg state in the pool threads' thread-locals: a child forked with a preexec_fn
    (which frees the other threads' locals) used to hang there forever on swscale's slice-thread condition
    variable (frame.to_image's thread-local reformatter). Run in a process of its own, with a time limit."""
    import subprocess
    import sys
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[2])
    result = subprocess.run([sys.executable, "-c", FORK_AFTER_DECODE.format(root=root)], capture_output=True,
                            text=True, timeout=120)  # fmt: skip
    assert result.returncode == 0 and "forked" in result.stdout, result.stderr[-2000:]
