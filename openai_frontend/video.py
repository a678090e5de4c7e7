"""Videos -> the frames MiniCPM-V 2.6 takes, with limits a server can enforce on untrusted uploads.

The model card feeds a video to the model as images: it decodes the file with decord, samples about one frame
per second (`step = round(average_fps / fps)`, frame indices `0, step, 2*step, ...`), keeps at most 64 of them
(picked uniformly when there are more) and passes those frames, in order. `sample_indices` is that rule, and
`decode_frames` produces the same frames with PyAV (FFmpeg), which is maintained and ships FFmpeg in its wheels.

Safety, in the order things happen (no step before the last decodes a frame, but for the bounded probe in 2):

1. The bytes: at most `VideoLimits.max_bytes`, and a container we recognise from its first bytes (ISO BMFF:
   MP4 / MOV, Matroska / WebM, AVI, GIF). The demuxer is then forced to that one (`av.open(format=...)`), so
   FFmpeg never probes its other ~350 formats: playlists (HLS, concat, ...) that open other files or URLs are
   never parsed. What the client said the file was (a data URL's MIME type, a file name) plays no part.
2. The header: a video stream (cover art in an audio file does not count: `no_video_stream`), its frame size
   (`max_frame_pixels`), its duration (`max_seconds`). FFmpeg's stream probing (`avformat_find_stream_info`)
   would decode frames to learn what a header leaves out; it runs with no decoder allowed, so a 10,000 x
   10,000 frame is refused from the header, not allocated. Where the frame size is only in the bitstream
   (MPEG-4 Part 2 in MOV), a second probe may decode, with FFmpeg's `max_pixels` set to the limit.
3. The packets of the video stream, read (demuxed) without decoding: the exact frame count, the real
   duration (their timestamps, which cannot lie about the length the way a header can), the frame rate.
4. One decoding pass, which converts to RGB only the sampled frames and stops after the last of them.

Every step checks one deadline (`decode_timeout_s`) between packets and frames, and FFmpeg's own probing is
given the time left through PyAV's interrupt callback. Every failure a client can cause is a `VideoError`
whose message can be shown to that client as it is and whose `code` says which limit or problem it was.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import io
import logging
import math
import threading
import time
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass

import av
import av.error
from av.video.reformatter import VideoReformatter
from PIL import Image

__all__ = [
    "FRAME_KEY",
    "MAX_NUM_FRAMES",
    "DecodedVideo",
    "VideoError",
    "VideoInfo",
    "VideoLimits",
    "decode_frames",
    "decode_video_async",
    "probe",
    "sample_indices",
]

logger = logging.getLogger(__name__)

#: The model card's MAX_NUM_FRAMES: a video becomes at most this many images.
MAX_NUM_FRAMES = 64
#: Where each returned frame carries its content key (`PIL.Image.Image.info`).
FRAME_KEY = "minicpmv_frame_sha256"

#: FFmpeg threads per decode. The frontend decodes at most 2 videos at once (`_EXECUTOR`), so videos use at
#: most 4 cores' worth of decoder threads, and a single small-frame decode gains little from more anyway.
DECODER_THREADS = 2
#: `decode_video_async` waits this much longer than the cooperative deadline inside the decode, which normally
#: fires first (with a more precise message); the outer timeout only matters if FFmpeg is stuck in one call.
_ASYNC_MARGIN_S = 2.0
_EXECUTOR = ThreadPoolExecutor(max_workers=2, thread_name_prefix="video")

# The clock every deadline reads (tests replace it).
_clock = time.monotonic

# ISO BMFF (MP4, MOV, 3GP): the first box's type. `ftyp` in anything recent; old QuickTime files may start with
# the movie box, the media data, or padding.
_BMFF_FIRST_BOXES = {b"ftyp", b"moov", b"mdat", b"free", b"skip", b"wide", b"pnot", b"uuid"}


class VideoError(ValueError):
    """A video that cannot be used as asked; `message` can be shown to the client that sent it, `code` is one
    of the class's constants."""

    TOO_LARGE = "video_too_large"  # more bytes than max_bytes
    TOO_LONG = "video_too_long"  # longer than max_seconds
    FRAME_TOO_LARGE = "video_frame_too_large"  # width * height over max_frame_pixels
    INVALID = "invalid_video"  # not a video we read, corrupt, truncated, no frames, no frame rate
    NO_VIDEO_STREAM = "no_video_stream"  # a container with no video in it (audio only)
    DECODE_TIMEOUT = "video_decode_timeout"  # decode_timeout_s ran out

    def __init__(self, message: str, code: str):
        super().__init__(message)
        self.message = message
        self.code = code

    def __reduce__(self):  # picklable (crosses process pools) despite the two-argument constructor
        return (type(self), (self.message, self.code))


@dataclass(frozen=True)
class VideoLimits:
    """What one video may cost; the frontend builds this from its Settings."""

    max_bytes: int = 50 * 2**20
    max_seconds: float = 600.0
    max_frames: int = MAX_NUM_FRAMES  # the cap on sampled frames, i.e. on images sent to the model
    max_frame_pixels: int = 3840 * 2160  # width * height of the video stream (4K UHD fits)
    decode_timeout_s: float = 60.0  # probing, counting and decoding together
    # Sampled frames with more pixels are scaled down (aspect kept) as they are converted, so 64 frames of 4K
    # (1.6 GB of RGB) are never held at once; None: decoded size. The frontend passes its image pixel budget.
    max_output_pixels: int | None = None

    def __post_init__(self):
        for name in ("max_bytes", "max_seconds", "max_frames", "max_frame_pixels", "decode_timeout_s"):
            value = getattr(self, name)
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not (number and math.isfinite(value) and value > 0):
                raise ValueError(f"VideoLimits.{name} must be a positive number, got {value!r}")
            if name in ("max_bytes", "max_frames", "max_frame_pixels") and not isinstance(value, int):
                raise ValueError(f"VideoLimits.{name} must be an integer, got {value!r}")


@dataclass(frozen=True)
class VideoInfo:
    container: str  # "mp4", "mov", "webm", "matroska", "avi" or "gif" (from the bytes, not the client's label)
    codec: str  # FFmpeg's decoder name: "h264", "vp9", "mpeg4", "gif", ...
    width: int
    height: int
    average_fps: float  # the rate sampling uses (see `_average_fps`)
    frame_count: int  # frames in the stream, counted from its packets
    duration_s: float  # from the packets' timestamps (the header's when they have none)


@dataclass
class DecodedVideo:
    frames: list[Image.Image]  # RGB, at their decoded size, in presentation order
    indices: list[int]  # the source frame index of each (0-based, presentation order)
    keys: list[str]  # sha256 of each frame's size and RGB bytes (also in frame.info[FRAME_KEY])
    info: VideoInfo
    decode_seconds: float  # everything: checks, counting, decoding, RGB conversion
    frames_decoded: int  # frames the decoder produced (up to the last sampled one)


def sample_indices(num_frames: int, average_fps: float, fps: float | None = None,
                   max_frames: int = MAX_NUM_FRAMES) -> list[int]:  # fmt: skip
    """The model card's sampling: every `round(average_fps / fps)`-th frame from frame 0 (`fps` defaults to 1,
    the step is at least 1), then, if that is more than `max_frames`, `max_frames` of those picked uniformly
    (`gap = len / max_frames`, the `int(i * gap + gap / 2)`-th for i in 0..max_frames-1). Python's `round`
    (half to even), as the card's."""
    if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1:
        raise ValueError(f"num_frames must be a positive integer, got {num_frames!r}")
    if not (math.isfinite(average_fps) and average_fps > 0):
        raise ValueError(f"average_fps must be a positive number, got {average_fps!r}")
    if fps is not None and not (math.isfinite(fps) and fps > 0):
        raise ValueError(f"fps must be a positive number, got {fps!r}")
    if isinstance(max_frames, bool) or not isinstance(max_frames, int) or max_frames < 1:
        raise ValueError(f"max_frames must be a positive integer, got {max_frames!r}")
    ratio = average_fps / (1.0 if fps is None else fps)
    step = max(1, round(ratio)) if ratio < num_frames else num_frames  # round(inf) would raise
    candidates = list(range(0, num_frames, step))
    if len(candidates) > max_frames:
        gap = len(candidates) / max_frames
        candidates = [candidates[int(i * gap + gap / 2)] for i in range(max_frames)]
    return candidates


def probe(data: bytes, limits: VideoLimits) -> VideoInfo:
    """What the video is (format, codec, size, rate, exact frame count, duration), after every check that needs
    no decoding: bytes, container, video stream, frame size, duration, truncation. Raises `VideoError`."""
    return _guarded(_probe_checked, data, limits, _Deadline(limits.decode_timeout_s))


def decode_frames(data: bytes, limits: VideoLimits, fps: float | None = None,
                  max_frames: int | None = None) -> DecodedVideo:  # fmt: skip
    """The frames the model card would give the model: `probe`, then `sample_indices(frame_count, average_fps,
    fps, max_frames)` and one decoding pass that converts those frames (only) to RGB PIL images.

    `max_frames` defaults to `limits.max_frames` and is capped by it. Raises `VideoError` for anything wrong with
    the video (or the time it takes), `ValueError` for a non-positive `fps` or `max_frames` (the caller's
    request validation should have caught those)."""
    return _decode(data, limits, fps, max_frames, None)


async def probe_async(data: bytes, limits: VideoLimits, executor: Executor | None = None) -> VideoInfo:
    """`probe` in the decoding pool, never waiting more than `limits.decode_timeout_s` plus a margin."""
    loop = asyncio.get_running_loop()
    future = loop.run_in_executor(executor or _EXECUTOR, probe, data, limits)
    try:
        return await asyncio.wait_for(future, limits.decode_timeout_s + _ASYNC_MARGIN_S)
    except asyncio.TimeoutError:
        raise VideoError(f"reading the video took longer than {limits.decode_timeout_s:g} s",
                         VideoError.DECODE_TIMEOUT) from None  # fmt: skip


async def decode_video_async(
    data: bytes,
    limits: VideoLimits,
    fps: float | None = None,
    max_frames: int | None = None,
    executor: Executor | None = None,
) -> DecodedVideo:
    """`decode_frames` in a thread of `executor` (by default a module-wide pool of 2 threads, so at most two
    videos decode at once and the rest wait their turn), never waiting more than `limits.decode_timeout_s` plus
    a margin. When the wait ends early (timeout, or the caller is cancelled), the decode is told to stop at its
    next check, including one still waiting in the pool's queue, so no thread keeps working for nobody."""
    if fps is not None or max_frames is not None:
        _check_request(fps, max_frames)  # fail now, not in a thread
    cancel = threading.Event()
    loop = asyncio.get_running_loop()
    job = functools.partial(_decode, data, limits, fps, max_frames, cancel)
    future = loop.run_in_executor(executor or _EXECUTOR, job)
    try:
        return await asyncio.wait_for(future, limits.decode_timeout_s + _ASYNC_MARGIN_S)
    except asyncio.TimeoutError:
        raise VideoError(f"decoding the video took longer than {limits.decode_timeout_s:g} s",
                         VideoError.DECODE_TIMEOUT) from None  # fmt: skip
    finally:
        cancel.set()


# ----------------------------------------------------------------------------------------------- internals


class _Deadline:
    def __init__(self, seconds: float, cancel: threading.Event | None = None):
        self.seconds = seconds
        self.end = _clock() + seconds
        self.cancel = cancel

    def remaining(self) -> float:
        return self.end - _clock()

    def expired(self) -> bool:
        return (self.cancel is not None and self.cancel.is_set()) or _clock() > self.end

    def check(self) -> None:
        if self.expired():
            raise VideoError(f"decoding the video took longer than {self.seconds:g} s", VideoError.DECODE_TIMEOUT)


def _check_request(fps: float | None, max_frames: int | None) -> None:
    if fps is not None and not (isinstance(fps, (int, float)) and math.isfinite(fps) and fps > 0):
        raise ValueError(f"fps must be a positive number, got {fps!r}")
    if max_frames is not None and (isinstance(max_frames, bool) or not isinstance(max_frames, int) or max_frames < 1):
        raise ValueError(f"max_frames must be a positive integer, got {max_frames!r}")


def _guarded(function, data, limits, deadline, *args):
    """Runs one of the steps below so that nothing but `VideoError` (or a MemoryError) leaves this module."""
    try:
        return function(data, limits, deadline, *args)
    except VideoError:
        raise
    except av.error.ExitError as exc:  # FFmpeg's probing, interrupted by the deadline
        if deadline.expired():
            raise VideoError(f"decoding the video took longer than {deadline.seconds:g} s",
                             VideoError.DECODE_TIMEOUT) from exc  # fmt: skip
        raise VideoError("the video could not be read", VideoError.INVALID) from exc
    except av.error.FFmpegError as exc:  # ENOMEM included: FFmpeg says that of sizes a damaged file declares
        # strerror is FFmpeg's generic text for the error code ("Invalid data found when processing input"):
        # nothing from the file or the server.
        reason = f": {exc.strerror}" if getattr(exc, "strerror", None) else ""
        raise VideoError(f"the video could not be decoded (it is damaged, truncated or not a video){reason}",
                         VideoError.INVALID) from exc  # fmt: skip
    except MemoryError:  # Python's own: the server's problem, not the file's
        raise
    except Exception as exc:  # PyAV raising something else on a hostile file: refuse it, keep the details here
        logger.warning("video decoding failed unexpectedly", exc_info=True)
        raise VideoError("the video could not be decoded", VideoError.INVALID) from exc


def _decode(data: bytes, limits: VideoLimits, fps: float | None, max_frames: int | None,
            cancel: threading.Event | None) -> DecodedVideo:  # fmt: skip
    _check_request(fps, max_frames)
    started = time.perf_counter()
    deadline = _Deadline(limits.decode_timeout_s, cancel)
    deadline.check()  # a job that waited in the pool past its caller's patience stops here
    info = _guarded(_probe_checked, data, limits, deadline)
    cap = limits.max_frames if max_frames is None else min(max_frames, limits.max_frames)
    indices = sample_indices(info.frame_count, info.average_fps, fps, cap)
    frames, decoded = _guarded(_decode_selected, data, limits, deadline, info, indices)
    keys = [frame.info[FRAME_KEY] for frame in frames]
    return DecodedVideo(frames=frames, indices=indices, keys=keys, info=info,
                        decode_seconds=time.perf_counter() - started, frames_decoded=decoded)  # fmt: skip


def _sniff(data: bytes) -> tuple[str, str]:
    """(FFmpeg demuxer to force, container name for VideoInfo), from the first bytes; or a VideoError."""
    if not data:
        raise VideoError("the video is empty", VideoError.INVALID)
    head = data[:64]
    if head[4:8] in _BMFF_FIRST_BOXES:
        return "mov", "mov" if head[4:12] == b"ftypqt  " else "mp4"
    if head.startswith(b"\x1a\x45\xdf\xa3"):  # EBML; the DocType says which
        return "matroska", "webm" if b"webm" in head else "matroska"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "gif", "gif"
    if head.startswith(b"RIFF") and head[8:12] == b"AVI ":
        return "avi", "avi"
    audio = _audio_container(head)
    if audio:
        raise VideoError(f"the file is {audio} audio: it has no video stream", VideoError.NO_VIDEO_STREAM)
    raise VideoError("the file is not a video in a supported container (MP4, MOV, WebM, Matroska, AVI or GIF)",
                     VideoError.INVALID)  # fmt: skip


def _audio_container(head: bytes) -> str | None:
    if head.startswith(b"RIFF") and head[8:12] == b"WAVE":
        return "WAV"
    if head.startswith(b"fLaC"):
        return "FLAC"
    if head.startswith(b"ID3"):
        return "MP3"
    return None


def _open(data: bytes, demuxer: str, deadline: _Deadline, probe_pixels: int | None = None):
    """The container, opened and probed (`avformat_find_stream_info`). That probing may decode frames to learn
    what the container does not say. With `probe_pixels` None it may not (`codec_whitelist` allows no decoder),
    so the frame size is the container's (or the bitstream parser's): opening a 10,000 x 10,000 video allocates
    no frame. With `probe_pixels` it may, but only frames up to that many pixels (FFmpeg's `max_pixels`). The
    decoding below uses its own decoder, which neither option touches. The timeout is PyAV's interrupt callback
    for opening and probing; reading packets afterwards is checked by our own deadline."""
    deadline.check()
    options = {"codec_whitelist": "none"} if probe_pixels is None else {"max_pixels": str(probe_pixels)}
    # metadata_errors: tags that are not UTF-8 (a damaged or hostile file's) must not stop PyAV from opening it
    return av.open(io.BytesIO(data), format=demuxer, options=options, metadata_errors="replace",
                   timeout=(max(deadline.remaining(), 0.001), None))  # fmt: skip


def _video_stream(container):
    """The first video stream that is not cover art (an attached picture is one frame of an audio file)."""
    attached = av.stream.Disposition.attached_pic
    streams = [s for s in container.streams.video if not (s.disposition & attached)]
    if not streams:
        raise VideoError("the file has no video stream", VideoError.NO_VIDEO_STREAM)
    stream = streams[0]
    if stream.codec_context is None:
        raise VideoError("the video's codec is not supported", VideoError.INVALID)
    return stream


def _probed_size(data: bytes, demuxer: str, limits: VideoLimits, deadline: _Deadline) -> tuple[int, int]:
    with _open(data, demuxer, deadline, probe_pixels=limits.max_frame_pixels) as container:
        context = _video_stream(container).codec_context
        return context.width, context.height


def _seconds(value, time_base) -> float | None:
    if value is None or time_base is None or value <= 0:
        return None
    return float(value * time_base)


def _probe_checked(data: bytes, limits: VideoLimits, deadline: _Deadline) -> VideoInfo:
    if len(data) > limits.max_bytes:
        raise VideoError(f"the video is {len(data)} bytes; the limit is {limits.max_bytes}", VideoError.TOO_LARGE)
    demuxer, container_name = _sniff(data)
    with _open(data, demuxer, deadline) as container:
        stream = _video_stream(container)
        codec = stream.codec_context.name
        width, height = stream.codec_context.width, stream.codec_context.height
        if width * height > limits.max_frame_pixels:
            raise _frame_too_large(width, height, limits)

        single_stream = len(container.streams) == 1
        stream_rate, guessed_rate = stream.average_rate, stream.guessed_rate
        header_frames = max(stream.frames or 0, 0)
        header_seconds = _seconds(stream.duration, stream.time_base)
        if header_seconds is None and container.duration and container.duration > 0:
            header_seconds = container.duration / av.time_base
        if header_seconds is not None and header_seconds > limits.max_seconds:
            raise _too_long(header_seconds, limits)

        # The frame count. decord (the model card's reader) takes the stream's frame count from the header
        # (mp4's sample table, AVI's index) and estimates it from duration x rate when there is none (WebM,
        # Matroska, some GIFs). We count the stream's packets instead, for every container: reading packets
        # does not decode them (8 ms for a minute of 720p H.264 at 4 Mbit/s), it gives the same number as the
        # header where the header has one (a video stream's packet is one frame in the containers we accept;
        # packets the container marks as discarded, i.e. cut by an edit list, are not frames and are not
        # counted: the decoder drops their frames too), and it is exact where decord's estimate is not. It also
        # measures the real duration (from the packets' timestamps) and shows truncation (below).
        packets = counted = 0
        first = last = None
        time_base = stream.time_base
        for packet in container.demux(stream):
            deadline.check()
            if packet.size == 0:  # PyAV's empty packet at the end of the stream (it flushes decoders)
                continue
            packets += 1
            if packet.is_discard:
                continue
            counted += 1
            stamp = packet.pts if packet.pts is not None else packet.dts
            if stamp is not None and time_base is not None:
                first = stamp if first is None else min(first, stamp)
                end = stamp + (packet.duration or 0)
                last = end if last is None else max(last, end)
                if float((last - first) * time_base) > limits.max_seconds:  # stop reading an endless file early
                    raise _too_long(float((last - first) * time_base), limits)

    if counted == 0:
        raise VideoError("the video has no frames", VideoError.INVALID)
    if width <= 0 or height <= 0:  # not in the container (MPEG-4 Part 2 in MOV): decode a frame, within the limit
        width, height = _probed_size(data, demuxer, limits, deadline)
        if width * height > limits.max_frame_pixels:
            raise _frame_too_large(width, height, limits)
    if width <= 0 or height <= 0:  # FFmpeg refused to decode a larger frame (or could not decode one at all)
        raise VideoError(f"the video's frame size could not be read within the limit of {limits.max_frame_pixels} "
                         "pixels per frame (its frames are larger, or the file is damaged)",
                         VideoError.FRAME_TOO_LARGE)  # fmt: skip
    if header_frames and packets < header_frames:
        raise VideoError(f"the video is truncated: its header lists {header_frames} frames, the file holds "
                         f"{packets}", VideoError.INVALID)  # fmt: skip
    measured = float((last - first) * time_base) if first is not None and last > first else None
    if measured is not None and header_seconds is not None and not header_frames and single_stream:
        # No frame count in the header (WebM, Matroska): a file whose packets end well before the duration its
        # header declares was cut short. Only for files holding this one stream (the container's duration is
        # the longest stream's), and with a margin for headers that round or count the last frame's length.
        if measured + max(1.0, 0.1 * header_seconds) < header_seconds:
            raise VideoError(f"the video is truncated: its header says {header_seconds:.1f} s, its frames end after "
                             f"{measured:.1f} s", VideoError.INVALID)  # fmt: skip
    duration = measured if measured is not None else header_seconds
    fps = _average_fps(stream_rate=stream_rate, guessed_rate=guessed_rate, codec=codec,
                       frames=counted, seconds=measured)  # fmt: skip
    if fps is None:
        raise VideoError("the video's frame rate is unknown (no frame timing in the file)", VideoError.INVALID)
    if duration is None:
        duration = counted / fps
    return VideoInfo(container=container_name, codec=codec, width=width, height=height, average_fps=fps,
                     frame_count=counted, duration_s=duration)  # fmt: skip


def _average_fps(*, stream_rate, guessed_rate, codec: str, frames: int, seconds: float | None) -> float | None:
    """The rate `sample_indices` steps by, as decord reports it: the stream's average frame rate (FFmpeg's
    `avg_frame_rate`, frames / duration as the container states them), else FFmpeg's guess.

    GIF is the exception: each GIF frame has its own delay (10 ms steps, often mixed: a long pause on one frame),
    and FFmpeg's average there is an estimate (8.33 for 20 frames shown in 2.5 s), so for GIF the rate is the
    frame count over the real length (the sum of the delays; a static GIF's one delay is FFmpeg's 0.1 s default
    when the file says 0). Sampling stays by index, as the model card's does for any video, so a
    GIF's sampled frames are evenly spaced in frames, not in time."""
    if codec == "gif" and seconds:
        return frames / seconds
    for rate in (stream_rate, guessed_rate):
        if rate and rate > 0 and math.isfinite(float(rate)):
            return float(rate)
    if seconds:
        return frames / seconds
    return None


def _decode_selected(data: bytes, limits: VideoLimits, deadline: _Deadline, info: VideoInfo,
                     indices: list[int]) -> tuple[list[Image.Image], int]:  # fmt: skip
    wanted = set(indices)
    last = indices[-1]
    frames: list[Image.Image] = []
    reformatter = VideoReformatter()  # this decode's own (see _to_image), freed with it
    index = 0
    demuxer, _ = _sniff(data)
    with _open(data, demuxer, deadline) as container:
        stream = _video_stream(container)
        context = stream.codec_context
        context.thread_type = "AUTO"  # frame and slice threads, at most DECODER_THREADS of them
        context.thread_count = DECODER_THREADS
        context.options = {"max_pixels": str(limits.max_frame_pixels)}  # a mid-stream size change included
        for packet in container.demux(stream):  # ends with an empty packet, which drains the decoder
            deadline.check()
            for frame in packet.decode():
                if index in wanted:
                    if frame.width * frame.height > limits.max_frame_pixels:
                        raise _frame_too_large(frame.width, frame.height, limits)
                    frames.append(_keyed(_to_image(frame, limits.max_output_pixels, reformatter)))
                    deadline.check()
                index += 1
                if index > last:
                    return frames, index
    raise VideoError(f"the video is truncated or damaged: it has {info.frame_count} frames, only {index} could be "
                     "decoded", VideoError.INVALID)  # fmt: skip


def _to_image(frame, max_pixels: int | None, reformatter: VideoReformatter) -> Image.Image:
    """An RGB PIL image of ``frame``, scaled by FFmpeg (area averaging) to at most ``max_pixels``.

    Through the decode's own ``reformatter`` with one thread, not ``frame.to_image()``: that keeps a swscale
    context with slice threads in a thread-local of the decoding thread, and a process that forks later with a
    ``preexec_fn`` (subprocess) then hangs in the child, where Python frees the other threads' locals and
    swscale waits on a condition variable its threads, absent from the child, never signal (seen: the test
    run's serve.sh children hung in ``pthread_cond_destroy``)."""
    width, height = frame.width, frame.height
    size, interpolation = (width, height), None
    if max_pixels is not None and width * height > max_pixels:
        scale = (max_pixels / (width * height)) ** 0.5
        size, interpolation = (max(1, int(width * scale)), max(1, int(height * scale))), "AREA"
    rgb = reformatter.reformat(frame, width=size[0], height=size[1], format="rgb24", interpolation=interpolation,
                               threads=1)  # fmt: skip
    plane = rgb.planes[0]
    return Image.frombuffer("RGB", size, bytes(plane), "raw", "RGB", plane.line_size, 1)


def _keyed(image: Image.Image) -> Image.Image:
    if image.mode != "RGB":
        image = image.convert("RGB")
    digest = hashlib.sha256(f"{image.width}x{image.height}:".encode())
    digest.update(image.tobytes())
    image.info[FRAME_KEY] = digest.hexdigest()
    return image


def _frame_too_large(width: int, height: int, limits: VideoLimits) -> VideoError:
    return VideoError(f"the video's frames are {width}x{height} = {width * height} pixels; the limit is "
                      f"{limits.max_frame_pixels}", VideoError.FRAME_TOO_LARGE)  # fmt: skip


def _too_long(seconds: float, limits: VideoLimits) -> VideoError:
    return VideoError(f"the video is {seconds:.1f} s long; the limit is {limits.max_seconds:g} s",
                      VideoError.TOO_LONG)  # fmt: skip
