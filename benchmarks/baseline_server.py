#!/usr/bin/env python3
"""The one-request-at-a-time baseline: a minimal OpenAI-compatible chat server around a plain greedy loop.

It loads a checkpoint exactly as the engine does (``minicpmv.loading.load_model`` + tokenizer + image
processor) and answers ``POST /v1/chat/completions`` strictly one request at a time: every request (image
decoding, chat template, processor, prefill, decoding) runs on one worker thread, in arrival order; the
others wait in its queue. Decoding is ``MiniCPMV.generate_greedy``'s loop (transformers' DynamicCache, no
batching across requests), written as a generator so that tokens stream out as they are made. Streaming
answers are ``chat.completion.chunk`` SSE events as OpenAI sends them, so a client measures time to first
token the same way against this server and against the real frontend.

Supported request fields: ``messages`` (text and ``image_url`` data-URL parts), ``max_tokens`` /
``max_completion_tokens``, ``stream``, ``stream_options.include_usage``, and the extensions ``min_tokens`` and
``ignore_eos`` (fixed-length outputs). Decoding is greedy only: a ``temperature`` other than 0 is refused.
benchmarks/serving.py starts it; by hand:

    .venv/bin/python benchmarks/baseline_server.py --checkpoint /tmp/tiny --port 9100
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import contextlib
import io
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from PIL import Image

from minicpmv.chat import ChatFormatError, format_chat
from minicpmv.engine.detokenizer import IncrementalDetokenizer
from minicpmv.image_processing import ImageProcessor
from minicpmv.loading import load_model
from minicpmv.modeling.minicpmv import MiniCPMV, output_cache
from minicpmv.processing import MiniCPMVProcessor
from minicpmv.tokenizer import load_tokenizer

logger = logging.getLogger("baseline_server")
STOP_TOKENS = ("<|im_end|>", "<|endoftext|>")
# The frontend downscales larger images to this many pixels before they reach the model; so does the baseline.
IMAGE_PIXEL_BUDGET = 1344 * 1344
DEFAULT_MAX_TOKENS = 2048


class BadRequest(ValueError):
    """The request can't be served (answered with 400 and this message)."""


@dataclass
class Job:
    """One request's fields; images are still data URLs (decoded on the worker, in turn)."""

    messages: list[dict[str, Any]]
    image_urls: list[str]
    max_tokens: int
    min_tokens: int
    ignore_eos: bool


def greedy_stream(
    model: MiniCPMV, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int, **image_inputs
) -> Iterator[int]:
    """``MiniCPMV.generate_greedy`` for one sample, yielding each token as it is chosen.

    The same forward calls as ``generate_greedy`` (prefill with ``logits_to_keep=1``, then one token per step
    on a DynamicCache), except that no forward runs after the last token. Never stops by itself: the caller
    stops iterating (stop token) or takes ``max_new_tokens``.
    """
    from transformers import DynamicCache

    device = model.device
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    with torch.inference_mode():
        out = model(input_ids, attention_mask=attention_mask, cache=DynamicCache(), use_cache=True,
                    logits_to_keep=1, **image_inputs)  # fmt: skip
        positions = attention_mask.long().sum(-1, keepdim=True) - 1
        for step in range(max_new_tokens):
            next_ids = out.logits[:, -1].argmax(-1)
            yield int(next_ids[0])
            if step + 1 == max_new_tokens:
                return
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(1, 1)], dim=1)
            positions = positions + 1
            out = model(next_ids[:, None], attention_mask=attention_mask, position_ids=positions,
                        cache=output_cache(out), use_cache=True)  # fmt: skip


class Generator:
    """The model and its processors; :meth:`run` serves one job, start to end, on the single worker thread."""

    def __init__(self, checkpoint: Path, device: str, dtype: str, max_image_pixels: int = IMAGE_PIXEL_BUDGET):
        self.model = load_model(checkpoint, device=device, dtype=dtype)
        self.tokenizer = load_tokenizer(checkpoint)
        self.processor = MiniCPMVProcessor(ImageProcessor.from_pretrained(checkpoint), self.tokenizer)
        self.stop_ids = {self.tokenizer.convert_tokens_to_ids(t) for t in STOP_TOKENS}
        self.max_image_pixels = max_image_pixels

    def run(self, job: Job, emit: Callable[[tuple], None], cancelled: threading.Event) -> None:
        """Emits ("prompt", prompt_tokens), then ("text", text, completion_tokens) per token and ("end",
        finish_reason); or ("error", message, http_status) instead."""
        try:
            self._run(job, emit, cancelled)
        except Exception as e:  # noqa: BLE001 - the client gets an error, the server goes on
            logger.exception("request failed")
            emit(("error", f"internal error: {type(e).__name__}: {e}", 500))

    def _run(self, job: Job, emit: Callable[[tuple], None], cancelled: threading.Event) -> None:
        try:
            images = [decode_image(url, self.max_image_pixels) for url in job.image_urls]
            prompt = format_chat(job.messages, self.tokenizer, images).prompt
            batch = self.processor([prompt], [images])
        except (BadRequest, ChatFormatError, ValueError) as e:
            emit(("error", str(e), 400))
            return
        image_inputs = {}
        if images:
            image_inputs = {"pixel_values": batch.pixel_values, "tgt_sizes": batch.tgt_sizes,
                            "image_bounds": batch.image_bounds}  # fmt: skip
        prompt_ids = batch.input_ids[0].tolist()
        emit(("prompt", len(prompt_ids)))
        detokenizer = IncrementalDetokenizer(self.tokenizer, prompt_ids)
        reason, count = "length", 0
        for token in greedy_stream(self.model, batch.input_ids, batch.attention_mask, job.max_tokens, **image_inputs):
            if cancelled.is_set():
                reason = "cancelled"
                break
            if token in self.stop_ids and not job.ignore_eos and count >= job.min_tokens:
                reason = "stop"
                break
            count += 1
            emit(("text", detokenizer.add(token), count))
        emit(("text", detokenizer.flush(), count))
        emit(("end", reason))


def parse_job(body: Any) -> Job:
    """An OpenAI chat request body -> Job (no image decoding yet). Raises BadRequest."""
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    if body.get("temperature") not in (None, 0, 0.0):
        raise BadRequest("this baseline decodes greedily only: send temperature 0")
    if body.get("repetition_penalty") not in (None, 1, 1.0):
        raise BadRequest("this baseline has no repetition penalty: send repetition_penalty 1 or leave it out")
    if body.get("n", 1) != 1:
        raise BadRequest("n must be 1")
    raw_messages = body.get("messages")
    if not isinstance(raw_messages, list) or not raw_messages:
        raise BadRequest("messages must be a non-empty list")
    messages, image_urls = [], []
    for message in raw_messages:
        if not isinstance(message, dict):
            raise BadRequest("every message must be an object")
        content = message.get("content")
        if not isinstance(content, list):
            messages.append({"role": message.get("role"), "content": content or ""})
            continue
        parts = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                parts.append({"type": "text", "text": part.get("text", "")})
            elif kind == "image_url":
                image_urls.append(str((part.get("image_url") or {}).get("url", "")))
                parts.append({"type": "image"})
            else:
                raise BadRequest(f"content part type {kind!r} is not supported")
        messages.append({"role": message.get("role"), "content": parts})
    max_tokens = next((body[k] for k in ("max_completion_tokens", "max_tokens") if body.get(k) is not None), None)
    max_tokens = DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens
    min_tokens = body.get("min_tokens") or 0
    if not isinstance(max_tokens, int) or max_tokens < 1 or not isinstance(min_tokens, int) or min_tokens < 0:
        raise BadRequest("max_tokens must be a positive integer, min_tokens a non-negative one")
    return Job(messages, image_urls, max_tokens, min_tokens, bool(body.get("ignore_eos")))


def decode_image(url: str, max_pixels: int) -> Image.Image:
    """A base64 data URL -> RGB image, downscaled (aspect kept) to at most ``max_pixels`` like the frontend."""
    header, sep, payload = url.partition(",")
    if not header.startswith("data:") or not header.endswith(";base64") or not sep:
        raise BadRequest("images must be base64 data URLs")
    try:
        image = Image.open(io.BytesIO(base64.b64decode(payload, validate=True)))
        image.load()
    except (binascii.Error, OSError) as e:
        raise BadRequest(f"undecodable image: {e}") from e
    image = image.convert("RGB")
    pixels = image.width * image.height
    if pixels > max_pixels:
        scale = (max_pixels / pixels) ** 0.5
        size = (max(1, int(image.width * scale)), max(1, int(image.height * scale)))
        image = image.resize(size, Image.Resampling.BICUBIC)
    return image


def create_app(generator: Generator, model_name: str) -> FastAPI:
    worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="baseline-worker")  # the one-at-a-time queue

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        worker.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="one-request-at-a-time baseline", lifespan=lifespan)

    def error(status: int, message: str) -> JSONResponse:
        kind = "invalid_request_error" if status < 500 else "server_error"
        return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": None}},
                            status_code=status)  # fmt: skip

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        card = {"id": model_name, "object": "model", "created": 0, "owned_by": "baseline"}
        return {"object": "list", "data": [card]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        try:
            body = await request.json()
            job = parse_job(body)
        except (BadRequest, ValueError) as e:
            return error(400, str(e))
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[tuple] = asyncio.Queue()
        cancelled = threading.Event()
        worker.submit(generator.run, job, lambda event: loop.call_soon_threadsafe(events.put_nowait, event), cancelled)
        completion_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        try:
            first = await events.get()  # waits for our turn: errors before decoding are HTTP errors
        except asyncio.CancelledError:
            cancelled.set()
            raise
        if first[0] == "error":
            return error(first[2], first[1])
        prompt_tokens = first[1]

        def usage(completion_tokens: int) -> dict[str, int]:
            return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                    "total_tokens": prompt_tokens + completion_tokens}  # fmt: skip

        def chunk(delta: dict[str, Any] | None, finish: str | None = None, tokens: int | None = None) -> str:
            choices = [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
            data = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model_name,
                    "choices": choices}  # fmt: skip
            if include_usage:
                data["usage"] = None if tokens is None else usage(tokens)
            return f"data: {json.dumps(data, separators=(',', ':'))}\n\n"

        async def stream():
            completion_tokens = 0
            try:
                yield chunk({"role": "assistant", "content": ""})
                while True:
                    event = await events.get()
                    if event[0] == "text":
                        completion_tokens = event[2]
                        if event[1]:
                            yield chunk({"content": event[1]})
                    elif event[0] == "error":
                        yield f"data: {json.dumps({'error': {'message': event[1], 'type': 'server_error'}})}\n\n"
                        break
                    else:
                        yield chunk({}, finish=event[1])
                        break
                if include_usage:
                    yield chunk(None, tokens=completion_tokens)
                yield "data: [DONE]\n\n"
            finally:
                cancelled.set()  # done, or the client went away: stop decoding for it

        if body.get("stream"):
            return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        try:
            texts, completion_tokens = [], 0
            while True:
                event = await events.get()
                if event[0] == "text":
                    texts.append(event[1])
                    completion_tokens = event[2]
                elif event[0] == "error":
                    return error(event[2], event[1])
                else:
                    break
        finally:
            cancelled.set()
        message = {"role": "assistant", "content": "".join(texts)}
        return {"id": completion_id, "object": "chat.completion", "created": created, "model": model_name,
                "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": event[1]}],
                "usage": usage(completion_tokens)}  # fmt: skip

    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True, help="checkpoint directory")
    parser.add_argument(
        "--model-name", default="minicpm_v_2_6", help="the name /v1/models reports (default: %(default)s)"
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9100)
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: %(default)s)")
    parser.add_argument("--dtype", default="auto", help="model dtype (default: auto = the checkpoint's own, bf16)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--log-level", default="warning")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    generator = Generator(args.checkpoint, args.device, args.dtype)

    import uvicorn

    uvicorn.run(create_app(generator, args.model_name), host=args.host, port=args.port, log_level=args.log_level,
                timeout_graceful_shutdown=5)  # fmt: skip


if __name__ == "__main__":
    main()
