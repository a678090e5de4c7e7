"""benchmarks/video.py without the stack: the clip generator (a small configuration) and the metric deltas."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from openai_frontend.video import VideoLimits, decode_frames

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    name = "_benchmarks_video"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, BENCHMARKS / "video.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up while the file executes
        spec.loader.exec_module(module)
    return sys.modules[name]


def test_the_clip_is_an_h264_mp4_of_its_size_and_length_and_is_cached(bench, tmp_path):
    spec = bench.ClipSpec(seconds=2.5, width=96, height=64, fps=10, bitrate=200_000, preset="ultrafast")
    path, took = bench.make_clip(spec, tmp_path)
    assert took is not None and path.parent == tmp_path and list(tmp_path.iterdir()) == [path]
    decoded = decode_frames(path.read_bytes(), VideoLimits())
    info = decoded.info
    assert (info.container, info.codec, info.width, info.height) == ("mp4", "h264", 96, 64)
    assert info.frame_count == 25 and info.average_fps == 10 and info.duration_s == pytest.approx(2.5)
    assert decoded.indices == [0, 10, 20] and decoded.frames[0].size == (96, 64)
    assert len({frame.tobytes() for frame in decoded.frames}) == 3  # it moves
    assert bench.make_clip(spec, tmp_path) == (path, None)  # cached: same file, not written again
    other = bench.ClipSpec(seconds=2.5, width=96, height=64, fps=10, bitrate=200_000, preset="ultrafast", seed=1)
    assert other.file_name() != spec.file_name()  # every parameter is in the key
    with pytest.raises(ValueError, match="even"):
        next(bench.clip_frames(bench.ClipSpec(width=95)))


METRICS_BEFORE = """# HELP minicpmv_frontend_video_decode_seconds Decoding one video part
# TYPE minicpmv_frontend_video_decode_seconds histogram
minicpmv_frontend_video_decode_seconds_bucket{le="5.0"} 1.0
minicpmv_frontend_video_decode_seconds_count 1.0
minicpmv_frontend_video_decode_seconds_sum 3.25
minicpmv_frontend_video_frames_total 1771.0
minicpmv_frontend_video_parts_total{result="ok"} 1.0
minicpmv_frontend_video_parts_total{result="video_too_long"} 2.0
"""


def test_metric_deltas(bench):
    before = bench.parse_metrics(METRICS_BEFORE)
    assert before['minicpmv_frontend_video_decode_seconds_bucket{le="5.0"}'] == 1.0
    after = bench.parse_metrics(METRICS_BEFORE.replace("count 1.0", "count 2.0").replace("3.25", "6.75")
                                .replace("1771.0", "3542.0").replace('"ok"} 1.0', '"ok"} 2.0'))  # fmt: skip
    assert bench.video_delta(before, after) == {"decode_s": 3.5, "frames_decoded": 1771}
    with pytest.raises(RuntimeError, match="one decoded video part"):
        bench.video_delta(before, before)  # nothing decoded in between (e.g. a refused video)
    triton = bench.parse_metrics('minicpmv_prefix_cache_hits_total{model="a"} 704\n'
                                 'minicpmv_prefix_cache_hits_total{model="b"} 5 1700000000\n')  # fmt: skip
    assert bench.sample_sum(triton, "minicpmv_prefix_cache_hits_total", model="a") == 704
    assert bench.sample_sum(triton, "minicpmv_prefix_cache_hits_total") == 709
