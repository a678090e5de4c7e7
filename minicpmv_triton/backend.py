"""The Python-backend model: Triton lifecycle and tensor conversion around the engine.

``model_repository/*/1/model.py`` only re-exports :class:`TritonPythonModel`. The model is decoupled:
``execute`` parses each request, submits it to the engine and returns at once; the engine's thread sends
the responses (one per delta when streaming, one in all otherwise) and closes every response sender with
the final flag, also on errors and cancellation.

LoRA adapters: a request names one with ``lora_name`` in ``sampling_parameters``; a control request
(``lora_control``: list, load, unload; see tensors.py) is answered on a worker thread of its own (loading reads
files and must not hold up ``execute``) with one final response whose ``text_output`` is JSON. The ``stats``
control is answered at once, in ``execute``: the engine's queue, running sequences, KV-cache use, the limits
that bound them and the requests finished so far (the frontend's protocol metrics and admission read it).
"""

from __future__ import annotations

import json
import logging
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import triton_python_backend_utils as pb_utils

from minicpmv.engine.errors import (
    CANCELLED,
    ENGINE_SHUT_DOWN,
    INTERNAL_ERROR,
    UNAVAILABLE,
    AdapterNotFoundError,
    EngineStoppedError,
    InvalidRequestError,
    QueueFullError,
    wire_message,
)
from minicpmv.engine.request import FINISH_CANCELLED, Delta
from minicpmv_triton.parameters import ModelParameters, queue_mismatch
from minicpmv_triton.tensors import (
    ControlRequest,
    ParsedRequest,
    control_tensors,
    parse_control,
    parse_request,
    response_tensors,
)

logger = logging.getLogger(__name__)
INPUT_NAMES = (
    "text_input", "messages", "image", "stream", "sampling_parameters", "exclude_input_in_output",
    "return_finish_reason", "return_num_input_tokens", "return_num_output_tokens", "return_logprobs",
    "lora_control",
)  # fmt: skip
FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
# What a control "list" / "load" answer says of each adapter (AdapterInfo's fields, minicpmv/engine/lora.py).
ADAPTER_FIELDS = ("name", "path", "rank", "modules", "vision", "embeddings", "resident", "loads", "requests")


@dataclass
class _Active:
    """A request in flight: where its responses go and, for non-streaming, what was generated so far."""

    request_id: str
    sender: object
    parsed: ParsedRequest
    prompt_text: str = ""
    texts: dict[int, str] = field(default_factory=dict)
    logprobs: dict[int, list] = field(default_factory=dict)
    pending: int = 1
    closed: bool = False
    lock: threading.Lock = field(default_factory=threading.RLock)

    def send(self, response, final: bool) -> None:
        """Send unless already closed. Under the lock: once the final flag went out, Triton frees the
        response factory, and touching the sender again (even ``is_cancelled``) crashes the server."""
        with self.lock:
            if self.closed:
                return
            self.sender.send(response, flags=FINAL if final else 0)
            self.closed = final

    def is_cancelled(self) -> bool:
        with self.lock:
            return not self.closed and self.sender.is_cancelled()


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        from minicpmv.engine.engine import Engine

        model_config = json.loads(args["model_config"])
        self.params = ModelParameters.from_model_config(model_config, args)
        mismatch = queue_mismatch(model_config, self.params.engine.max_waiting)
        if mismatch:
            pb_utils.Logger.log_warn(f"{args['model_name']}: {mismatch}")
        pb_utils.Logger.log_info(f"{args['model_name']}: loading {self.params.describe()}")
        self.engine = Engine.from_pretrained(
            self.params.checkpoint_dir(),
            device=self.params.device,
            dtype=self.params.dtype,
            quantization=self.params.quantization,
            config=self.params.engine_config(),
        )
        self._active: dict[str, _Active] = {}
        self._lock = threading.Lock()
        self._finished = 0  # requests answered to the end (or failed) since start: the queue's drain rate
        self._metrics = _Metrics(args["model_name"], lora=self.engine.lora is not None)
        self._control_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="minicpmv-lora-control")
        self._stop = threading.Event()
        self._monitor = threading.Thread(target=self._watch, name="minicpmv-triton-monitor", daemon=True)
        self._monitor.start()
        pb_utils.Logger.log_info(f"{args['model_name']}: ready on {self.params.device}")

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            request_id = f"{request.request_id() or 'req'}-{uuid.uuid4().hex[:12]}"
            try:
                tensors = {}
                for name in INPUT_NAMES:
                    tensor = pb_utils.get_input_tensor_by_name(request, name)
                    if tensor is not None:
                        tensors[name] = tensor.as_numpy()
                control = parse_control(tensors)
                if control is not None and control.action == "stats":  # cheap, and must not wait behind a load
                    tensors = [pb_utils.Tensor(k, v) for k, v in control_tensors(self._stats()).items()]
                    sender.send(pb_utils.InferenceResponse(output_tensors=tensors), flags=FINAL)
                    continue
                if control is not None:
                    self._control_pool.submit(self._control, request_id, sender, control)
                    continue
                parsed = parse_request(request_id, tensors)
                active = _Active(request_id, sender, parsed, pending=parsed.generation.sampling.n)
                with self._lock:
                    self._active[request_id] = active
                state = self.engine.prepare(parsed.generation, callback=lambda d, a=active: self._on_delta(a, d))
                active.prompt_text = state.prompt
                self.engine.enqueue(state)
                self._metrics.count_request(parsed.generation.adapter)
            except AdapterNotFoundError as e:
                self._fail(request_id, sender, e.wire(), _not_found())
            except InvalidRequestError as e:
                self._fail(request_id, sender, e.wire(), pb_utils.TritonError.INVALID_ARG)
            except (QueueFullError, EngineStoppedError) as e:
                self._fail(request_id, sender, e.wire(), pb_utils.TritonError.UNAVAILABLE)
            except Exception as e:  # noqa: BLE001 - a request must always be answered
                logger.exception("request %s failed", request_id)
                message = wire_message(INTERNAL_ERROR, f"internal error: {type(e).__name__}")
                self._fail(request_id, sender, message, pb_utils.TritonError.INTERNAL)
        return None

    def _control(self, request_id: str, sender, control: ControlRequest) -> None:
        """Answer a ``lora_control`` request (on the control thread): one final response, or an error (an unusable
        adapter or runtime loading off: INVALID_ARG with the engine's message; an unknown one: NOT_FOUND)."""
        try:
            if control.action == "list":
                runtime = self.engine.lora is not None and bool(self.params.engine.lora_dir)
                payload = {"adapters": [_adapter(i) for i in self.engine.adapters()], "runtime_loading": runtime}
            elif control.action == "load":
                payload = _adapter(self.engine.load_adapter(control.lora_name, control.lora_path))
                pb_utils.Logger.log_info(f"LoRA adapter {control.lora_name!r} loaded from {payload['path']}")
            else:
                self.engine.unload_adapter(control.lora_name)
                payload = {"unloaded": control.lora_name}
                pb_utils.Logger.log_info(f"LoRA adapter {control.lora_name!r} unloaded")
        except AdapterNotFoundError as e:
            self._fail(request_id, sender, e.wire(), _not_found())
        except (InvalidRequestError, ValueError) as e:  # AdapterError (minicpmv/lora.py) is a ValueError
            self._fail(request_id, sender, wire_message("invalid_request", str(e)), pb_utils.TritonError.INVALID_ARG)
        except Exception as e:  # noqa: BLE001 - a request must always be answered
            logger.exception("control request %s failed", request_id)
            message = wire_message(INTERNAL_ERROR, f"internal error: {type(e).__name__}")
            self._fail(request_id, sender, message, pb_utils.TritonError.INTERNAL)
        else:
            tensors = [pb_utils.Tensor(k, v) for k, v in control_tensors(payload).items()]
            sender.send(pb_utils.InferenceResponse(output_tensors=tensors), flags=FINAL)

    def _stats(self) -> dict:
        """The ``stats`` control's answer (read from the engine's counters; no lock on its loop)."""
        engine, config = self.engine, self.engine.config
        stats = engine.stats()
        running_adapters, waiting_adapters = engine.adapters_in_use()
        with self._lock:
            finished = self._finished
        return {"waiting": stats["waiting"], "running": stats["running"], "kv_usage": stats["kv_usage"],
                "kv_blocks": stats["kv_blocks_total"], "block_size": config.block_size,
                "max_num_seqs": config.max_num_seqs, "max_waiting": config.max_waiting, "finished": finished,
                "max_lora": config.max_loras if engine.lora is not None else 0,
                "running_adapters": running_adapters, "waiting_adapters": waiting_adapters}  # fmt: skip

    def _fail(self, request_id: str, sender, message: str, code) -> None:
        """Answer with an error; ``message`` is the coded JSON of minicpmv/engine/errors.py (the frontend maps its
        code: Triton's gRPC stream carries no status)."""
        with self._lock:
            active = self._active.pop(request_id, None)
            self._finished += active is not None
        response = pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code))
        if active is not None:
            active.send(response, final=True)
        else:
            sender.send(response, flags=FINAL)

    def _on_delta(self, active: _Active, delta: Delta) -> None:
        """Runs on the engine's output thread (never between two model steps)."""
        self._metrics.tokens.increment(len(delta.token_ids))
        self._metrics.count_tokens(active.parsed.generation.adapter, len(delta.token_ids))
        if delta.error:  # the engine failed a step, or shut down with the request unfinished
            stopped = delta.error == ENGINE_SHUT_DOWN
            message = wire_message(UNAVAILABLE if stopped else INTERNAL_ERROR, delta.error)
            code = pb_utils.TritonError.UNAVAILABLE if stopped else pb_utils.TritonError.INTERNAL
            self._fail(active.request_id, active.sender, message, code)
            return
        if delta.finish_reason == FINISH_CANCELLED:
            with active.lock:
                active.pending -= 1
                done = active.pending == 0
            if done:
                with self._lock:
                    self._finished += self._active.pop(active.request_id, None) is not None
                error = pb_utils.TritonError(wire_message(CANCELLED, "request cancelled"),
                                             pb_utils.TritonError.CANCELLED)  # fmt: skip
                active.send(pb_utils.InferenceResponse(error=error), final=True)
            return
        parsed = active.parsed
        with active.lock:
            if parsed.stream:
                text = delta.text
                send = bool(text) or delta.finish_reason is not None or bool(parsed.return_logprobs and delta.logprobs)
            else:
                active.texts[delta.index] = active.texts.get(delta.index, "") + delta.text
                active.logprobs.setdefault(delta.index, []).extend(delta.logprobs or [])
                send = delta.finish_reason is not None
                if send:
                    text = active.texts.pop(delta.index)
                    if not parsed.exclude_input_in_output:
                        text = active.prompt_text + text
                    delta = Delta(**{**delta.__dict__, "logprobs": active.logprobs.pop(delta.index)})
            if delta.finish_reason is not None:
                active.pending -= 1
            last = active.pending == 0
        if not send:
            return
        response = pb_utils.InferenceResponse(
            output_tensors=[pb_utils.Tensor(k, v) for k, v in response_tensors(parsed, delta, text).items()]
        )
        active.send(response, final=last)
        if last:
            with self._lock:
                self._finished += self._active.pop(active.request_id, None) is not None

    def _watch(self) -> None:
        """Cancel requests whose client went away; publish the engine gauges."""
        while not self._stop.wait(0.05):
            with self._lock:
                active = list(self._active.values())
            for a in active:
                if a.is_cancelled():
                    self.engine.cancel(a.request_id)
            self._metrics.publish(self.engine)

    def finalize(self) -> None:
        self._stop.set()
        self._monitor.join(timeout=5)
        self._control_pool.shutdown(wait=True)  # each control request queued gets its answer
        self.engine.shutdown()  # ends every unfinished request (final flag sent by the callbacks)
        with self._lock:  # response senders must not outlive the model (the stub crashes at exit otherwise)
            self._active.clear()


class _Metrics:
    """Custom metrics on Triton's metrics port. The families must outlive their metrics: keep both.

    Counters mirror the engine's running totals (``Engine.stats``): each publish adds what grew since the last.
    The prefix-cache hit rate is ``minicpmv_prefix_cache_hits_total / minicpmv_prefix_cache_queries_total``
    (prompt tokens found / looked up), as vLLM reports it.
    """

    GAUGE, COUNTER = "gauge", "counter"
    FAMILIES = (
        ("minicpmv_generated_tokens_total", "Tokens generated", COUNTER, None),
        ("minicpmv_running_sequences", "Sequences in the running batch", GAUGE, "running"),
        ("minicpmv_waiting_requests", "Requests waiting for admission", GAUGE, "waiting"),
        ("minicpmv_decode_steps_total", "Steps run by the engine", COUNTER, "steps"),
        ("minicpmv_kv_cache_usage_ratio", "Fraction of the KV cache blocks in use", GAUGE, "kv_usage"),
        ("minicpmv_kv_cache_blocks", "KV cache blocks allocated at start-up", GAUGE, "kv_blocks_total"),
        ("minicpmv_prefix_cache_queries_total", "Prompt tokens looked up in the prefix cache", COUNTER,
         "prefix_cache_queries"),
        ("minicpmv_prefix_cache_hits_total", "Prompt tokens found in the prefix cache", COUNTER,
         "prefix_cache_hits"),
        ("minicpmv_preemptions_total", "Sequences preempted (recomputed later) for lack of KV blocks", COUNTER,
         "preemptions"),
    )  # fmt: skip

    # On a model with LoRA on: requests, tokens and slot loads labelled by adapter too; evictions (an adapter taken out
    # of its slot for another) and the adapters in a slot now, by model.
    LORA_FAMILIES = (
        ("minicpmv_lora_requests_total", "Requests accepted for a LoRA adapter", COUNTER),
        ("minicpmv_lora_generated_tokens_total", "Tokens generated with a LoRA adapter", COUNTER),
        ("minicpmv_lora_loads_total", "LoRA adapters put into a device slot", COUNTER),
        ("minicpmv_lora_evictions_total", "LoRA adapters taken out of their slot for another one", COUNTER),
        ("minicpmv_lora_resident_adapters", "LoRA adapters in a device slot", GAUGE),
    )

    def __init__(self, model_name: str, lora: bool = False):
        labels = {"model": model_name}
        kinds = {self.GAUGE: pb_utils.MetricFamily.GAUGE, self.COUNTER: pb_utils.MetricFamily.COUNTER}
        self.families = [pb_utils.MetricFamily(name=n, description=d, kind=kinds[k]) for n, d, k, _ in self.FAMILIES]
        self.metrics = [f.Metric(labels=labels) for f in self.families]
        self.tokens = self.metrics[0]
        self._seen: dict[str, float] = {}
        self.model_name = model_name
        self.lora = lora
        if lora:
            self.lora_families = {n: pb_utils.MetricFamily(name=n, description=d, kind=kinds[k])
                                  for n, d, k in self.LORA_FAMILIES}  # fmt: skip
            self.evictions = self.lora_families["minicpmv_lora_evictions_total"].Metric(labels=labels)
            self.resident = self.lora_families["minicpmv_lora_resident_adapters"].Metric(labels=labels)
        self._by_adapter: dict[tuple[str, str], object] = {}  # (family, adapter) -> its metric, made when first seen
        self._counts: dict[tuple[str, str], int] = {}  # requests / tokens by adapter, published by the monitor
        self._published: dict[tuple[str, str], int] = {}
        self._loads: dict[tuple[str, int], int] = {}  # slot loads seen per (adapter, registration)
        self._count_lock = threading.Lock()

    def count_request(self, adapter: str | None) -> None:
        if adapter is not None:
            with self._count_lock:
                key = ("minicpmv_lora_requests_total", adapter)
                self._counts[key] = self._counts.get(key, 0) + 1

    def count_tokens(self, adapter: str | None, tokens: int) -> None:
        if adapter is not None and tokens:
            with self._count_lock:
                key = ("minicpmv_lora_generated_tokens_total", adapter)
                self._counts[key] = self._counts.get(key, 0) + tokens

    def _adapter_metric(self, family: str, adapter: str):
        metric = self._by_adapter.get((family, adapter))
        if metric is None:
            metric = self.lora_families[family].Metric(labels={"model": self.model_name, "adapter": adapter})
            self._by_adapter[(family, adapter)] = metric
        return metric

    def _publish_lora(self, engine) -> None:
        """On the monitor thread: what the request and output threads counted, and the engine's slot loads."""
        with self._count_lock:
            counts = dict(self._counts)
        for key, value in counts.items():
            if value > self._published.get(key, 0):
                self._adapter_metric(*key).increment(value - self._published.get(key, 0))
                self._published[key] = value
        resident = 0
        for info in engine.adapters():
            key = (info.name, getattr(info, "uid", 0))  # a name loaded again counts from zero
            grown = info.loads - self._loads.get(key, 0)
            if grown > 0:
                self._adapter_metric("minicpmv_lora_loads_total", info.name).increment(grown)
                self._loads[key] = info.loads
            resident += bool(info.resident)
        self.resident.set(resident)
        evictions = engine.lora.evictions
        if evictions > self._seen.get("lora_evictions", 0):
            self.evictions.increment(evictions - self._seen.get("lora_evictions", 0))
            self._seen["lora_evictions"] = evictions

    def publish(self, engine) -> None:
        if self.lora:
            self._publish_lora(engine)
        stats = engine.stats()
        for (_, _, kind, key), metric in zip(self.FAMILIES, self.metrics, strict=True):
            if key is None:
                continue
            if kind == self.GAUGE:
                metric.set(stats[key])
            else:
                metric.increment(stats[key] - self._seen.get(key, 0))
                self._seen[key] = stats[key]


def _not_found():
    """Triton's NOT_FOUND (HTTP 404 at its own endpoints); INVALID_ARG on a Python backend without it. Looked up when
    used: the stub provides TritonError after this module is imported."""
    return getattr(pb_utils.TritonError, "NOT_FOUND", pb_utils.TritonError.INVALID_ARG)


def _adapter(info) -> dict:
    """An AdapterInfo as the control responses give it (JSON)."""
    return {name: getattr(info, name) for name in ADAPTER_FIELDS}
