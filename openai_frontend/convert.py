"""A validated ChatCompletionRequest -> the backend's GenerateRequest: messages checked (roles, one system
message first, images only from the user), images decoded / fetched / downscaled, OpenAI's sampling fields
mapped onto the engine's names. Raises APIError(400) with the offending ``param``."""

from __future__ import annotations

import asyncio
import io
import time
import uuid
from dataclasses import dataclass
from typing import Any

import httpx

from openai_frontend import images, pdf, tools, video
from openai_frontend.backend import GenerateRequest
from openai_frontend.errors import invalid
from openai_frontend.schemas import (
    ChatCompletionContentPartFile,
    ChatCompletionContentPartImage,
    ChatCompletionContentPartText,
    ChatCompletionContentPartVideo,
    ChatCompletionRequest,
    ImageURL,
    VideoURL,
)
from openai_frontend.settings import Settings

ROLES = ("system", "developer", "user", "assistant")
VIDEO_SLICES = 2  # slices per video frame unless the part says otherwise (MiniCPM-V's card: 2; 1 for large videos)
SYSTEM_ROLES = ("system", "developer")  # OpenAI's newer name for the system message
_UNSUPPORTED = ("functions", "function_call", "logit_bias")  # legacy functions: use tools / tool_choice


async def to_generate_request(request: ChatCompletionRequest, settings: Settings,
                              http: httpx.AsyncClient | None = None, metrics=None) -> GenerateRequest:  # fmt: skip
    for name in _UNSUPPORTED:
        if getattr(request, name) not in (None, [], {}):
            raise invalid(f"'{name}' is not supported by this server", name, code="unsupported_parameter")
    if request.stream_options is not None and not request.stream:
        raise invalid("stream_options is only allowed when stream is true", "stream_options")
    if request.top_logprobs and not request.logprobs:
        raise invalid("top_logprobs requires logprobs to be true", "top_logprobs")
    if request.modalities is not None and request.modalities != ["text"]:
        raise invalid("this model answers in text only: modalities must be [\"text\"]", "modalities",
                      code="unsupported_parameter")  # fmt: skip
    if request.audio is not None:
        raise invalid("audio output is not supported by this model; leave 'audio' out", "audio",
                      code="unsupported_parameter")  # fmt: skip
    if request.moderation is not None:
        raise invalid("moderation is not available on this server; leave 'moderation' out", "moderation",
                      code="unsupported_parameter")  # fmt: skip

    plan = tool_plan(request)
    messages, sources = _messages(request, settings)
    videos = sum(src.kind == "video" for src in sources)
    if videos > settings.max_videos_per_request:
        raise invalid(f"{videos} videos; at most {settings.max_videos_per_request} per request", "messages",
                      code="too_many_videos")  # fmt: skip
    # A PDF part stands for several images (its pages), a video for its frames; their placeholders are expanded
    # once those are known.
    rendered = await asyncio.gather(*(_source(src, settings, http, metrics) for src in sources))
    pictures = sum(len(group) for src, group in zip(sources, rendered, strict=True) if src.kind != "video")
    if pictures > settings.max_images_per_request:
        raise invalid(f"{pictures} images (PDF pages included); at most {settings.max_images_per_request} per "
                      "request", "messages", code="too_many_images")  # fmt: skip
    encoded = [image for group in rendered for image in group]
    messages = _expand_placeholders(messages, [len(group) for group in rendered])

    sampling = _sampling(request)
    if plan is not None:  # the answer is a tool-call envelope: see tools.py
        messages = tools.add_system_prompt(messages, plan)
        sampling["response_format"] = plan.response_format()
        sampling.pop("stop", None)  # a stop sequence would cut the envelope's JSON
    return GenerateRequest(
        request_id=f"chatcmpl-{uuid.uuid4().hex}",
        messages=messages,
        images=list(encoded),
        sampling=sampling,
        stream=request.stream,
        logprobs=request.logprobs,
        tools=plan,
    )


def tool_plan(request: ChatCompletionRequest) -> tools.ToolPlan | None:
    """The request's tools and tool_choice as a decoding plan (None: plain text). Raises 400 on bad tools."""
    functions = tools.parse_functions(request.tools)
    response_format = request.response_format.model_dump(by_alias=True, exclude_none=True) \
        if request.response_format is not None else None  # fmt: skip
    plan = tools.plan_tools(functions, request.tool_choice, request.parallel_tool_calls, response_format)
    if plan is not None and request.logprobs:
        raise invalid("logprobs are not supported together with tools (the answer is decoded as a tool-call "
                      "envelope); set tool_choice to 'none' or leave logprobs out", "logprobs")  # fmt: skip
    return plan


@dataclass
class _Source:
    """Where one part's pixels come from: an image URL, a PDF (several pages) or a video (its frames)."""

    url: str
    param: str
    kind: str = "image"  # "image", "pdf" or "video"
    pdf_pages: str | None = None
    video: VideoURL | None = None


def image_settings(image_url: ImageURL, settings: Settings) -> dict[str, Any]:
    """An image part's own reading, for the engine's image placeholder: its ``max_slice_nums`` if given, else
    1 for ``detail: low`` (the whole image only), the server's ``high_detail_max_slice_nums`` for ``high``, and
    nothing for ``auto`` (the request's ``max_slice_nums`` or the model's default)."""
    if image_url.max_slice_nums is not None:
        return {"max_slice_nums": image_url.max_slice_nums}
    if image_url.detail == "low":
        return {"max_slice_nums": 1}
    if image_url.detail == "high":
        return {"max_slice_nums": settings.high_detail_max_slice_nums}
    return {}


def _messages(request: ChatCompletionRequest, settings: Settings) -> tuple[list[dict[str, Any]], list[_Source]]:
    """Messages for the backend (image, PDF and video parts as placeholders) and their sources, in order."""
    out: list[dict[str, Any]] = []
    sources: list[_Source] = []
    for i, message in enumerate(request.messages):
        where = f"messages[{i}]"
        role = message.role
        if role == "tool":
            _tool_result(out, request, i)
            continue
        if role not in ROLES:
            raise invalid(f"{where}: role '{role}' is not supported (use system, user, assistant or tool)",
                          f"{where}.role")  # fmt: skip
        if role in SYSTEM_ROLES:
            if i != 0:
                raise invalid(f"{where}: only one system message is allowed, and it must come first", where)
            role = "system"
        content = message.content
        if content is None:
            if role != "assistant":
                raise invalid(f"{where}: content is required", f"{where}.content")
            content = ""
        if message.tool_calls and role == "assistant":
            text = content if isinstance(content, str) else "\n".join(p.text for p in content if p.type == "text")
            out.append({"role": role, "content": tools.render_tool_calls(text, message.tool_calls,
                                                                        f"{where}.tool_calls")})  # fmt: skip
            continue
        if isinstance(content, str):
            out.append({"role": role, "content": content})
            continue
        parts: list[dict[str, Any]] = []
        for j, part in enumerate(content):
            param = f"{where}.content[{j}]"
            if isinstance(part, ChatCompletionContentPartText):
                parts.append({"type": "text", "text": part.text})
                continue
            if role != "user":
                raise invalid(f"{param}: images, files and videos are only allowed in user messages", param)
            if isinstance(part, ChatCompletionContentPartImage):
                sources.append(_Source(part.image_url.url, f"{param}.image_url.url"))
                parts.append({"type": "image", **image_settings(part.image_url, settings)})
            elif isinstance(part, ChatCompletionContentPartFile):
                if not part.file.file_data:
                    raise invalid(f"{param}: send the file inline as file.file_data (a data: URL); file ids are "
                                  "not supported", f"{param}.file", code="unsupported_content")  # fmt: skip
                sources.append(_Source(part.file.file_data, f"{param}.file.file_data", "pdf", part.file.pages))
                parts.append({"type": "pdf"})
            elif isinstance(part, ChatCompletionContentPartVideo):
                video = part.video_url
                if video.max_frames is not None and video.max_frames > settings.max_video_frames:
                    raise invalid(f"{param}.video_url.max_frames: at most {settings.max_video_frames} frames on "
                                  "this server", f"{param}.video_url.max_frames")  # fmt: skip
                sources.append(_Source(video.url, f"{param}.video_url.url", "video", video=video))
                parts.append({"type": "video", "max_slice_nums": video.max_slice_nums or VIDEO_SLICES})
        out.append({"role": role, "content": parts})
    for m in out:
        m.pop("_tool_results", None)
    if not any(m["role"] in ("user", "system") for m in out):  # a system message alone is answered, as OpenAI does
        raise invalid("messages must include at least one user message (or a system message)", "messages")
    return out, sources


def _tool_result(out: list[dict[str, Any]], request: ChatCompletionRequest, i: int) -> None:
    """A ``tool`` message -> the user message of tool results (consecutive ones share one message)."""
    where = f"messages[{i}]"
    message = request.messages[i]
    if not message.tool_call_id:
        raise invalid(f"{where}: a tool message needs tool_call_id", f"{where}.tool_call_id")
    content = message.content
    if content is None or isinstance(content, str):
        text = content or ""
    elif all(isinstance(part, ChatCompletionContentPartText) for part in content):
        text = "\n".join(part.text for part in content)
    else:
        raise invalid(f"{where}.content: a tool message takes text only", f"{where}.content")
    name = next((call.get("function", {}).get("name") for m in request.messages[:i] if m.role == "assistant"
                 for call in m.tool_calls or () if isinstance(call, dict) and call.get("id") == message.tool_call_id),
                None)  # fmt: skip
    results = out[-1].pop("_tool_results", None) if out and out[-1]["role"] == "user" else None
    if results is None:
        results = []
        out.append({"role": "user", "content": ""})
    results.append((message.tool_call_id, name, text))
    out[-1]["content"] = tools.render_tool_results(results)
    out[-1]["_tool_results"] = results


def _expand_placeholders(messages: list[dict[str, Any]], counts: list[int]) -> list[dict[str, Any]]:
    """Each ``{"type": "pdf"}`` placeholder becomes one image placeholder per rendered page, each
    ``{"type": "video"}`` one per sampled frame, in order, without ``<image_id>`` tags (as MiniCPM-V's card
    passes a video's frames: ``use_image_id=False``) and with the video's slicing."""
    counts_iter = iter(counts)
    for message in messages:
        if isinstance(message["content"], list):
            expanded = []
            for part in message["content"]:
                kind = part["type"]
                count = next(counts_iter) if kind in ("image", "pdf", "video") else 0
                if kind == "pdf":
                    expanded += [{"type": "image"}] * count
                elif kind == "video":
                    frame = {"type": "image", "use_image_id": False, "max_slice_nums": part["max_slice_nums"]}
                    expanded += [dict(frame) for _ in range(count)]
                else:
                    expanded.append(part)
            message["content"] = expanded
    return messages


async def _source(source: _Source, settings: Settings, http: httpx.AsyncClient | None, metrics=None) -> list[bytes]:
    if source.kind == "pdf":
        return await _pdf_pages(source, settings)
    if source.kind == "video":
        return await _video_frames(source, settings, http, metrics)
    return [await _image(source.url, source.param, settings, http)]


async def _pdf_pages(source: _Source, settings: Settings) -> list[bytes]:
    """A PDF data URL -> its pages (the requested range) rendered and encoded as PNG, in order."""
    param = source.param
    if not source.url.startswith("data:"):
        raise invalid("file_data must be a data: URL (data:application/pdf;base64,...)", param)
    data_url = images.parse_data_url(source.url, max_bytes=settings.max_pdf_bytes, param=param)
    if data_url.mime not in ("application/pdf", "application/octet-stream"):
        raise invalid(f"only PDF files are supported, got {data_url.mime}", param, code="unsupported_file")
    try:
        first, last = pdf.parse_page_range(source.pdf_pages)
        pages = await asyncio.to_thread(pdf.render_pdf, data_url.data, dpi=settings.pdf_dpi, first_page=first,
                                        last_page=last, max_pages=settings.pdf_max_pages,
                                        max_bytes=settings.max_pdf_bytes)  # fmt: skip
    except pdf.PDFError as e:
        raise invalid(str(e), param, code="invalid_pdf") from None
    return await asyncio.to_thread(lambda: [images.prepare_image(_png(page), settings, param) for page in pages])


def _png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG", compress_level=1)  # fast; the bytes only travel to Triton
    return buffer.getvalue()


def video_limits(settings: Settings) -> video.VideoLimits:
    """The settings' limits on one video; frames are scaled to the image pixel budget as they are decoded."""
    return video.VideoLimits(max_bytes=settings.max_video_bytes, max_seconds=settings.max_video_seconds,
                             max_frames=settings.max_video_frames, max_frame_pixels=settings.max_video_frame_pixels,
                             decode_timeout_s=settings.video_decode_timeout,
                             max_output_pixels=settings.image_pixel_budget)  # fmt: skip


async def _video_frames(source: _Source, settings: Settings, http: httpx.AsyncClient | None, metrics) -> list[bytes]:
    """A video part -> its sampled frames, encoded for Triton. The container is checked first (bytes, duration,
    frame size, frame count and fps) and the frames' vision tokens bounded (each frame takes up to
    ``max_slice_nums + 1`` chunks of 64 positions) before any frame is decoded; decoding runs in a small pool
    with a deadline (video.py)."""
    param, part = source.param, source.video
    limits = video_limits(settings)
    data = await _fetch(source.url, param, settings, http, settings.max_video_bytes, "video")
    max_frames = min(part.max_frames or limits.max_frames, limits.max_frames)
    start = time.perf_counter()
    try:
        info = await video.probe_async(data, limits)
        count = len(video.sample_indices(info.frame_count, info.average_fps, part.fps, max_frames))
        tokens = count * ((part.max_slice_nums or VIDEO_SLICES) + 1) * 64
        if tokens > settings.max_video_tokens:
            raise video.VideoError(f"{count} frames of up to {(part.max_slice_nums or VIDEO_SLICES) + 1} chunks "
                                   f"take up to {tokens} vision positions; at most {settings.max_video_tokens} per "
                                   "video: ask for fewer frames (max_frames, fps) or slices (max_slice_nums)",
                                   "video_too_long")  # fmt: skip
        decoded = await video.decode_video_async(data, limits, fps=part.fps, max_frames=max_frames)
    except video.VideoError as e:
        if metrics is not None:
            metrics.video_parts.labels(e.code).inc()
        raise invalid(str(e), param, code=e.code) from None
    if metrics is not None:
        metrics.video_parts.labels("ok").inc()
        metrics.video_frames.inc(decoded.frames_decoded)
        metrics.video_decode_seconds.observe(time.perf_counter() - start)
    return await asyncio.to_thread(lambda: [_png(frame) for frame in decoded.frames])


async def _fetch(source: str, param: str, settings: Settings, http: httpx.AsyncClient | None, max_bytes: int,
                 what: str) -> bytes:  # fmt: skip
    """A data URL's bytes, or an http(s) URL's where the server allows remote media (images.fetch_image's
    allow-list, up to ``max_bytes``)."""
    scheme = source.split(":", 1)[0].lower() if ":" in source[:16] else ""
    if scheme == "data":
        too_large = "file_too_large" if what == "image" else f"{what}_too_large"  # images: as before
        data_url = images.parse_data_url(source, max_bytes=max_bytes, param=param, too_large=too_large)
        if not data_url.mime.startswith(f"{what}/") and data_url.mime != "application/octet-stream":
            raise invalid(f"expected a{'n' if what[0] in 'aeiou' else ''} {what} data URL, got {data_url.mime}",
                          param, code=f"invalid_{what}")  # fmt: skip
        return data_url.data
    if scheme in ("http", "https"):
        if http is None:
            raise invalid(f"{what} URLs are disabled on this server", param, code="remote_images_disabled")
        return await images.fetch_image(source, settings, http, param, max_bytes=max_bytes, what=what)
    raise invalid(f"{what} URLs must be data: URLs (or http(s) where the server allows them)", param,
                  code=f"invalid_{what}_url")  # fmt: skip


async def _image(source: str, param: str, settings: Settings, http: httpx.AsyncClient | None) -> bytes:
    data = await _fetch(source, param, settings, http, settings.max_image_bytes, "image")
    return await asyncio.to_thread(images.prepare_image, data, settings, param)


def _sampling(request: ChatCompletionRequest) -> dict[str, Any]:
    """OpenAI fields -> the engine's SamplingParams names. Fields left out keep the model's defaults."""
    sampling: dict[str, Any] = {}
    max_tokens = request.max_completion_tokens or request.max_tokens
    stop = [request.stop] if isinstance(request.stop, str) else request.stop
    if stop is not None and len(stop) > 4:
        raise invalid("stop takes at most 4 sequences", "stop")
    if stop is not None and any(not s for s in stop):
        raise invalid("stop sequences must not be empty", "stop")
    fields = {
        "max_tokens": max_tokens,
        "temperature": request.temperature,
        "top_p": request.top_p,
        "presence_penalty": request.presence_penalty,
        "frequency_penalty": request.frequency_penalty,
        "seed": request.seed,
        "stop": stop,
        "n": request.n if request.n != 1 else None,
        "logprobs": True if request.logprobs else None,
        "top_logprobs": request.top_logprobs or None,
        "response_format": request.response_format.model_dump(by_alias=True, exclude_none=True)
        if request.response_format is not None else None,
        # extensions
        "top_k": request.top_k,
        "repetition_penalty": request.repetition_penalty,
        "min_tokens": request.min_tokens,
        "ignore_eos": request.ignore_eos,
        "max_slice_nums": request.max_slice_nums,
    }  # fmt: skip
    sampling.update({k: v for k, v in fields.items() if v is not None})
    return sampling
