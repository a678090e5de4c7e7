#!/usr/bin/env python3
"""Video benchmark: time to first token of one 60 s 720p video in a chat request, and the share of it spent
decoding the file (issue 24).

The clip: 60 s of 1280x720 at 30 fps, H.264 (libx264, preset veryfast, ~4 Mbit/s, yuv420p) in MP4, written with
PyAV from frames that compress like footage rather than like a test card: a textured scene the camera pans
across, a moving interference pattern, a disc moving on its own path, and fresh grain in every frame. Making one
takes 20-35 s on 2 cores, so clips are cached (``--cache-dir``, file name keyed by their parameters).

Each request streams ``/v1/chat/completions`` with the clip as a ``video_url`` data URL plus a question
(temperature 0, ``ignore_eos``, ``--max-tokens`` tokens). The frontend decodes the file again for every request
(probe, 1 frame/s sampling, 60 frames; it counts ``minicpmv_frontend_video_decode_seconds`` and
``..._video_frames_total`` on GET /metrics, read before and after each request); Triton's vision cache and the
engine's prefix cache make a repeat of the same request cheaper. So per clip (``--clips``, different seeds, for
more than one cold sample): the first request (cold) and ``--repeats`` identical ones (warm); medians of each. A
3 s clip is sent first, so that the stack's first-request costs do not count as the video's.

Figures: TTFT (request sent -> first content delta, client side), decode seconds (the frontend's metric, per
request), frames decoded (every frame up to the last sampled one), the rest (TTFT - decode: PNG encoding of the
frames, the 40 MB request and the frames' transfer to Triton, the vision encoding and the prefill) and decode's
share of TTFT. For reference, ``openai_frontend.video.decode_frames`` and the frontend's PNG encoding of the
frames are timed in this process on the same bytes, before the stack starts (the frontend probes the file twice:
once to bound the frames' tokens, once inside the decode).

By default it writes a tiny random checkpoint and starts tritonserver (CPU config, float32) and the frontend on
free ports, as benchmarks/serving.py does; ``--url`` measures a running frontend instead. Results:
``benchmarks/results/video_<label>.json`` and ``.md`` (label: ``--label``, default the device).

    .venv/bin/python benchmarks/video.py        # CPU, tiny checkpoint: ~3.5 min on 2 cores (+~1.5 min once: clips)
    .venv/bin/python benchmarks/video.py --url http://127.0.0.1:9000 --model minicpm_v_2_6_int4 --label gpu
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import dataclasses
import datetime as dt
import functools
import hashlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import av
import httpx
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DEFAULT_OUT = ROOT / "benchmarks" / "results"
DEFAULT_CACHE = ROOT / ".cache" / "benchmark-videos"
GENERATOR_VERSION = 1  # bump when the frames change: it is part of the cache key
QUESTION = "Describe what happens in this video."
DECODE_SUM = "minicpmv_frontend_video_decode_seconds_sum"
DECODE_COUNT = "minicpmv_frontend_video_decode_seconds_count"
FRAMES = "minicpmv_frontend_video_frames_total"
PARTS_OK = 'minicpmv_frontend_video_parts_total{result="ok"}'


# ---------------------------------------------------------------- the clip


@dataclass(frozen=True)
class ClipSpec:
    """What the clip is; every field is part of its cache key."""

    seconds: float = 60.0
    width: int = 1280
    height: int = 720
    fps: int = 30
    bitrate: int = 4_000_000  # bits/s, libx264's ABR mode
    preset: str = "veryfast"
    seed: int = 0

    @property
    def frames(self) -> int:
        return round(self.seconds * self.fps)

    def file_name(self) -> str:
        digest = hashlib.sha256(json.dumps([GENERATOR_VERSION, dataclasses.asdict(self)], sort_keys=True).encode())
        return (f"clip_{self.width}x{self.height}_{self.fps}fps_{self.seconds:g}s_{self.bitrate // 1000}k_"
                f"{self.preset}_seed{self.seed}_{digest.hexdigest()[:12]}.mp4")  # fmt: skip


def clip_frames(spec: ClipSpec) -> Iterator[np.ndarray]:
    """The clip's frames as yuv420p arrays of shape (height * 3 / 2, width): luma, then the two chroma planes.

    Built from pieces a video encoder sees in real footage: a detailed scene panned across (motion compensation
    finds it), an interference pattern drifting at another speed, a disc on a Lissajous path (an object moving
    against the background), and grain that is new in every frame (costs bits at any quality)."""
    width, height, fps = spec.width, spec.height, spec.fps
    if width % 2 or height % 2:
        raise ValueError(f"yuv420p needs an even width and height, got {width}x{height}")
    rng = np.random.default_rng(spec.seed)
    pan = max(8, width // 4)  # how far the camera pans (px), there and back
    scene = _texture(rng, height + pan, width + pan)  # luma of the scene, larger than a frame
    tint = rng.integers(96, 160, (2, (height + pan) // 96 + 2, (width + pan) // 96 + 2), dtype=np.uint8)  # colour
    tint_u = np.asarray(Image.fromarray(tint[0]).resize(((width + pan) // 2, (height + pan) // 2), Image.BICUBIC))
    tint_v = np.asarray(Image.fromarray(tint[1]).resize(((width + pan) // 2, (height + pan) // 2), Image.BICUBIC))
    xs, ys = np.arange(width, dtype=np.float32), np.arange(height, dtype=np.float32)
    radius = max(4, height // 9)
    yy, xx = np.mgrid[-radius:radius, -radius:radius]
    disc = (xx**2 + yy**2) < radius**2
    for k in range(spec.frames):
        t = k / fps
        phase = (t / 8.0) % 2.0  # pan over 8 s, back over the next 8
        offset = int(pan * (phase if phase <= 1 else 2 - phase))
        oy = offset // 2
        luma = scene[oy:oy + height, offset:offset + width].astype(np.int16)
        wave = np.multiply.outer(np.cos(2 * np.pi * (ys + 25 * t) / 97), np.sin(2 * np.pi * (xs - 60 * t) / 131))
        luma += (28 * wave).astype(np.int16)
        luma += rng.integers(-6, 7, (height, width), dtype=np.int16)  # grain
        cx = int((width - 2 * radius) * (0.5 + 0.45 * np.sin(2 * np.pi * t / 11)))
        cy = int((height - 2 * radius) * (0.5 + 0.45 * np.sin(2 * np.pi * t / 7 + 1)))
        window = luma[cy:cy + 2 * radius, cx:cx + 2 * radius]
        window[disc] = 235 - (window[disc] - 128) // 4
        u = tint_u[oy // 2:oy // 2 + height // 2, offset // 2:offset // 2 + width // 2].copy()
        v = tint_v[oy // 2:oy // 2 + height // 2, offset // 2:offset // 2 + width // 2].copy()
        u[cy // 2:cy // 2 + radius, cx // 2:cx // 2 + radius][disc[::2, ::2]] = 90
        v[cy // 2:cy // 2 + radius, cx // 2:cx // 2 + radius][disc[::2, ::2]] = 200
        frame = np.empty((height * 3 // 2, width), np.uint8)
        frame[:height] = np.clip(luma, 16, 235)
        frame[height:] = np.concatenate([u.reshape(-1), v.reshape(-1)]).reshape(height // 2, width)
        yield frame


def _texture(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A scene's luma: large soft shapes plus finer detail (random fields upscaled from two resolutions)."""
    coarse = rng.integers(40, 216, (height // 48 + 2, width // 48 + 2), dtype=np.uint8)
    fine = rng.integers(0, 64, (height // 6 + 2, width // 6 + 2), dtype=np.uint8)
    coarse = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), dtype=np.int16)
    fine = np.asarray(Image.fromarray(fine).resize((width, height), Image.BILINEAR), dtype=np.int16)
    return np.clip(coarse + fine - 32, 0, 255).astype(np.uint8)


def make_clip(spec: ClipSpec, cache_dir: Path, log=print) -> tuple[Path, float | None]:
    """The clip's file in ``cache_dir``, written first if it is not there. Returns the path and the seconds spent
    writing it (None: it was cached). Written to a temporary name and renamed, so a killed run leaves no clip."""
    path = cache_dir / spec.file_name()
    if path.is_file():
        return path, None
    cache_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    log(f"writing {path.name} ({spec.frames} frames, libx264 {spec.preset}) ...")
    partial = path.with_suffix(f".partial{os.getpid()}.mp4")
    try:
        with av.open(str(partial), "w", format="mp4") as container:
            stream = container.add_stream("libx264", rate=spec.fps)
            stream.width, stream.height, stream.pix_fmt = spec.width, spec.height, "yuv420p"
            stream.bit_rate = spec.bitrate
            stream.options = {"preset": spec.preset}
            for frame in clip_frames(spec):
                container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="yuv420p")))
            container.mux(stream.encode())
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path, time.perf_counter() - started


# ---------------------------------------------------------------- metrics


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text format -> {sample name with its labels as written: value}; comments skipped."""
    samples = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, _, value = line.rpartition("}") if "}" in line else line.partition(" ")
        name = name + "}" if "{" in name else name
        samples[name.strip()] = float(value.split()[0])
    return samples


def sample_sum(samples: dict[str, float], name: str, **labels: str) -> float:
    """The sum of ``name``'s samples that carry ``labels`` (0 when there are none)."""
    wanted = [f'{k}="{v}"' for k, v in labels.items()]
    return sum(value for key, value in samples.items()
               if key.partition("{")[0] == name and all(w in key for w in wanted))  # fmt: skip


def video_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """What one request added to the frontend's video metrics. Raises if it was not exactly one decoded part."""
    delta = {key: after.get(key, 0.0) - before.get(key, 0.0) for key in (DECODE_SUM, DECODE_COUNT, FRAMES, PARTS_OK)}
    if delta[DECODE_COUNT] != 1 or delta[PARTS_OK] != 1:
        raise RuntimeError(f"expected one decoded video part between the two scrapes, got {delta}")
    return {"decode_s": delta[DECODE_SUM], "frames_decoded": int(delta[FRAMES])}


def scrape(http: httpx.Client, url: str) -> dict[str, float]:
    response = http.get(url, timeout=30)
    response.raise_for_status()
    return parse_metrics(response.text)


# ---------------------------------------------------------------- requests


def chat_body(model: str, video: bytes, max_tokens: int) -> bytes:
    """One streaming request with the video and a question, serialized once (its JSON is ~4/3 of the file)."""
    part = {"type": "video_url", "video_url": {"url": "data:video/mp4;base64," + base64.b64encode(video).decode()}}
    return json.dumps({
        "model": model, "messages": [{"role": "user", "content": [part, {"type": "text", "text": QUESTION}]}],
        "stream": True, "stream_options": {"include_usage": True}, "max_tokens": max_tokens,
        "min_tokens": max_tokens, "ignore_eos": True, "temperature": 0,
    }).encode()  # fmt: skip


def stream_chat(http: httpx.Client, base_url: str, body: bytes) -> dict[str, Any]:
    """POST one streaming request, read it to the end. TTFT: sent -> first non-empty content delta."""
    start = time.perf_counter()
    first = None
    usage: dict[str, Any] = {}
    headers = {"Content-Type": "application/json"}
    with http.stream("POST", base_url + "/v1/chat/completions", content=body, headers=headers) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {response.read()[:500]!r}")
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(f"error event: {event['error']}")
            if first is None and event.get("choices") and event["choices"][0]["delta"].get("content"):
                first = time.perf_counter()
            usage = event.get("usage") or usage
    if first is None:
        raise RuntimeError("the stream had no content")
    return {"ttft_s": first - start, "total_s": time.perf_counter() - start,
            "prompt_tokens": usage.get("prompt_tokens"), "completion_tokens": usage.get("completion_tokens")}


def measure(http: httpx.Client, base_url: str, body: bytes, triton_metrics: str | None, kind: str) -> dict[str, Any]:
    """One request between two scrapes of the frontend's (and Triton's) metrics."""
    hits = functools.partial(sample_sum, name="minicpmv_prefix_cache_hits_total", model=json.loads(body)["model"])
    before = scrape(http, base_url + "/metrics")
    engine_before = scrape(http, triton_metrics) if triton_metrics else {}
    row = {"run": kind, **stream_chat(http, base_url, body)}
    time.sleep(0.3)  # the engine's counters reach Triton's metrics every 50 ms
    row |= video_delta(before, scrape(http, base_url + "/metrics"))
    if triton_metrics:
        row["prefix_cache_hit_tokens"] = int(hits(scrape(http, triton_metrics)) - hits(engine_before))
    row["rest_s"] = row["ttft_s"] - row["decode_s"]
    row["decode_share"] = row["decode_s"] / row["ttft_s"]
    return row


def reference(video: bytes, repeats: int) -> dict[str, Any]:
    """``decode_frames`` with the frontend's default limits, and the frontend's PNG encoding of the frames, timed
    here (median of ``repeats``)."""
    from openai_frontend.convert import _png, video_limits
    from openai_frontend.settings import Settings
    from openai_frontend.video import decode_frames

    limits = video_limits(Settings())
    decodes, pngs = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        decoded = decode_frames(video, limits)
        decodes.append(time.perf_counter() - start)
        start = time.perf_counter()
        encoded = [_png(frame) for frame in decoded.frames]
        pngs.append(time.perf_counter() - start)
    info = decoded.info
    return {"decode_frames_s": statistics.median(decodes), "decode_frames_s_all": decodes,
            "png_encode_s": statistics.median(pngs), "png_encode_s_all": pngs,
            "png_mb": round(sum(map(len, encoded)) / 1e6, 1), "frames_sampled": len(decoded.frames),
            "frames_decoded": decoded.frames_decoded, "frame_size": list(decoded.frames[0].size),
            "video": {"codec": info.codec, "width": info.width, "height": info.height, "fps": info.average_fps,
                      "frames": info.frame_count, "duration_s": round(info.duration_s, 3)}}  # fmt: skip


# ---------------------------------------------------------------- the stack


@contextlib.contextmanager
def demo_stack(args: argparse.Namespace, workdir: Path) -> Iterator[tuple[str, str]]:
    """tritonserver (CPU config, float32, a tiny random checkpoint unless ``--checkpoint``) and the frontend on
    free ports. Yields the frontend's base URL and Triton's metrics URL."""
    from minicpmv_triton.launcher import TritonServer
    from openai_frontend.launcher import FrontendProcess

    checkpoint = args.checkpoint
    if checkpoint is None:
        from minicpmv.devtools.tiny_checkpoint import write_tiny_checkpoint

        checkpoint = write_tiny_checkpoint(workdir / "tiny", seed=0, int4=args.model.endswith("int4"))
    env = {f"MINICPMV_CHECKPOINT_{args.model.upper()}": str(checkpoint)}
    extra = []
    if args.device == "cpu":
        env |= {"MINICPMV_DEVICE": "cpu", "MINICPMV_DTYPE": "float32", "OMP_NUM_THREADS": str(args.engine_threads)}
        extra = ["--model-config-name=cpu"]
    with TritonServer(ROOT / "model_repository", models=[args.model], extra_env=env, address="127.0.0.1",
                      extra_args=extra, exit_timeout=10, log_path=workdir / "tritonserver.log") as triton:  # fmt: skip
        triton.wait_ready(timeout=args.startup_timeout)
        frontend = FrontendProcess(triton.grpc_url, triton.http_url, models=args.model).start(ready=True, timeout=120)
        try:
            yield frontend.base_url, triton.metrics_url
        finally:
            frontend.stop()


# ---------------------------------------------------------------- reports


def summary(rows: list[dict[str, Any]], kind: str) -> dict[str, Any] | None:
    """Medians of the rows of one kind (cold or warm)."""
    picked = [r for r in rows if r["run"] == kind]
    if not picked:
        return None
    out: dict[str, Any] = {"n": len(picked)}
    for key in ("ttft_s", "decode_s", "rest_s", "decode_share", "frames_decoded", "prompt_tokens",
                "prefix_cache_hit_tokens"):  # fmt: skip
        values = [r[key] for r in picked if r.get(key) is not None]
        out[key] = statistics.median(values) if values else None
    return out


def table(report: dict[str, Any]) -> str:
    lines = ["| run | n | TTFT s | decode s | rest s | decode share | frames sampled / decoded | prompt tokens "
             "| prefix-cache hits |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    sampled = report["reference"]["frames_sampled"]
    for kind in ("cold", "warm"):
        s = report["summary"].get(kind)
        if s is None:
            continue
        hits = "-" if s["prefix_cache_hit_tokens"] is None else f"{s['prefix_cache_hit_tokens']:.0f}"
        name = f"{kind} (median)" if s["n"] > 1 else kind
        lines.append(f"| {name} | {s['n']} | {s['ttft_s']:.2f} | {s['decode_s']:.2f} | {s['rest_s']:.2f} "
                     f"| {100 * s['decode_share']:.0f}% | {sampled} / {s['frames_decoded']:.0f} "
                     f"| {s['prompt_tokens']:.0f} | {hits} |")
    r = report["reference"]
    lines += ["", f"In this process, same bytes: decode_frames {r['decode_frames_s']:.2f} s (median of "
              f"{len(r['decode_frames_s_all'])}), PNG encoding of the {r['frames_sampled']} frames "
              f"({r['frame_size'][0]}x{r['frame_size'][1]}, {r['png_mb']} MB) {r['png_encode_s']:.2f} s."]
    return "\n".join(lines)


def render_markdown(report: dict[str, Any]) -> str:
    c, hw = report["clip"], report["hardware"]
    return "\n".join([
        f"# Video benchmark ({report['label']}, {report['date']})", "",
        f"Command: `{report['command']}`. Runtime {report['runtime_s']} s. Hardware: {hw['cpu_model']}, "
        f"{hw['cpu_cores']} cores, Python {hw['python']}. Load average (1, 5, 15 min) at the start / end: "
        + " / ".join(", ".join(f"{x:.1f}" for x in load) for load in report["load_average_start_end"])
        + f" (other work on the machine slows every figure). Model: {report['settings']['model']} "
        f"({report['settings']['checkpoint']}).", "",
        f"Clip: {c['seconds']:g} s, {c['width']}x{c['height']} at {c['fps']} fps, H.264 (libx264 {c['preset']}, "
        f"{c['bitrate'] / 1e6:g} Mbit/s target), {report['clip_mb']} MB; {report['settings']['max_tokens']} output "
        "tokens per request, temperature 0. Cold: the clip's first request; warm: the same request again (Triton's "
        "vision cache and the prefix cache hit; the frontend decodes the file again). Rest = TTFT - decode.", "",
        table(report), "",
    ])  # fmt: skip


def hardware() -> dict[str, Any]:
    """The machine, as the Batch API benchmark reports it (the sibling script's own function)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from batch_api import hardware as batch_hardware

    return batch_hardware()


# ---------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--url", help="a running frontend (e.g. http://127.0.0.1:9000) instead of starting the demo stack")
    add("--triton-metrics-url", help="with --url: Triton's metrics endpoint, for the prefix-cache hits")
    add("--model", default="minicpm_v_2_6")
    add("--device", choices=("cpu", "gpu"), default="cpu", help="where a stack started here runs the model")
    add("--checkpoint", help="a checkpoint directory for a stack started here (default: a tiny random one)")
    add("--engine-threads", type=int, default=2, help="cpu: OMP_NUM_THREADS of tritonserver (default: 2)")
    add("--startup-timeout", type=float, default=900.0)
    add("--clips", type=int, default=3, help="clips (seeds 0..N-1): one cold request each (default: 3)")
    add("--repeats", type=int, default=3, help="warm requests per clip (default: 3)")
    add("--local-repeats", type=int, default=3, help="in-process decode_frames timings (default: 3)")
    add("--max-tokens", type=int, default=4)
    add("--seconds", type=float, default=ClipSpec.seconds)
    add("--size", default=f"{ClipSpec.width}x{ClipSpec.height}", help="WIDTHxHEIGHT (default: %(default)s)")
    add("--fps", type=int, default=ClipSpec.fps)
    add("--bitrate", type=int, default=ClipSpec.bitrate, help="bits/s (default: %(default)s)")
    add("--preset", default=ClipSpec.preset, help="libx264 preset (default: %(default)s)")
    add("--cache-dir", type=Path, default=DEFAULT_CACHE, help="where clips are kept (default: .cache/benchmark-videos)")
    add("--out", type=Path, default=DEFAULT_OUT)
    add("--label", help="names the result files video_<label> (default: the device)")
    args = parser.parse_args(argv)
    if min(args.clips, args.local_repeats, args.max_tokens) < 1 or args.repeats < 0:
        parser.error("--clips, --local-repeats and --max-tokens must be >= 1, --repeats >= 0")
    args.width, args.height = (int(v) for v in args.size.lower().split("x"))
    args.label = args.label or args.device
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started, load_start = time.perf_counter(), os.getloadavg()
    specs = [ClipSpec(args.seconds, args.width, args.height, args.fps, args.bitrate, args.preset, seed)
             for seed in range(args.clips)]  # fmt: skip
    clips = []
    for spec in specs:
        path, took = make_clip(spec, args.cache_dir, log=lambda m: print(m, flush=True))
        print(f"clip {path} ({path.stat().st_size / 1e6:.1f} MB)" + (f", written in {took:.1f} s" if took else
              ", cached"), flush=True)  # fmt: skip
        clips.append((spec, path.read_bytes(), took))
    # A short clip of the same size for the warm-up request (first-request costs of the stack, not of the video).
    warm_spec = dataclasses.replace(specs[0], seconds=3.0, seed=1000)
    warm_path, _ = make_clip(warm_spec, args.cache_dir)
    print("timing decode_frames in this process ...", flush=True)
    ref = reference(clips[0][1], args.local_repeats)
    print(f"  decode_frames {ref['decode_frames_s']:.2f} s, PNG encoding {ref['png_encode_s']:.2f} s, "
          f"{ref['frames_sampled']} frames sampled of {ref['frames_decoded']} decoded", flush=True)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="minicpmv-video-bench-") as tmp, contextlib.ExitStack() as stack:
        if args.url:
            base_url, triton_metrics = args.url.rstrip("/").removesuffix("/v1"), args.triton_metrics_url
        else:
            print("starting tritonserver and the frontend ...", flush=True)
            base_url, triton_metrics = stack.enter_context(demo_stack(args, Path(tmp)))
        print(f"stack ready after {time.perf_counter() - started:.1f} s; measuring", flush=True)
        with httpx.Client(timeout=httpx.Timeout(1800.0)) as http:
            measure(http, base_url, chat_body(args.model, warm_path.read_bytes(), args.max_tokens), None, "warm-up")
            for spec, data, _ in clips:
                body = chat_body(args.model, data, args.max_tokens)
                for i in range(1 + args.repeats):
                    time.sleep(1.0)  # idle stack between requests
                    row = measure(http, base_url, body, triton_metrics, "cold" if i == 0 else "warm")
                    rows.append({"seed": spec.seed, **row})
                    print(f"  seed {spec.seed} {row['run']:4s}: TTFT {row['ttft_s']:.2f} s, decode "
                          f"{row['decode_s']:.2f} s ({100 * row['decode_share']:.0f}%), rest {row['rest_s']:.2f} s, "
                          f"{row['frames_decoded']} frames decoded, {row['prompt_tokens']} prompt tokens, "
                          f"prefix-cache hits {row.get('prefix_cache_hit_tokens', '-')}", flush=True)
    runtime = time.perf_counter() - started
    report = {
        "benchmark": "video", "label": args.label,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["benchmarks/video.py", *(sys.argv[1:] if argv is None else argv)]),
        "hardware": hardware(),
        "load_average_start_end": [[round(x, 2) for x in load] for load in (load_start, os.getloadavg())],
        "settings": {"model": args.model, "device": args.device, "max_tokens": args.max_tokens,
                     "checkpoint": args.checkpoint or ("(the running server's)" if args.url else
                                                       "tiny random (write_tiny_checkpoint seed 0)"),
                     "engine_threads": args.engine_threads, "repeats": args.repeats, "clips": args.clips},
        "clip": dataclasses.asdict(specs[0]), "clip_mb": round(len(clips[0][1]) / 1e6, 1),
        "clip_written_s": [None if took is None else round(took, 1) for _, _, took in clips],
        "runtime_s": round(runtime, 1), "reference": ref,
        "summary": {kind: summary(rows, kind) for kind in ("cold", "warm")}, "rows": rows,
    }  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"video_{args.label}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    stem.with_suffix(".md").write_text(render_markdown(report))
    print("\n" + table(report))
    print(f"\ntotal runtime {runtime:.1f} s; wrote {stem}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
