"""Prometheus metrics of the frontend (served on GET /metrics), in their own registry, and the model server
protocol's metrics (``ProtocolCollector``)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily

from openai_frontend.backend import EngineStats

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320, 640)
_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("minicpmv_frontend_requests", "Chat and Responses API requests by model and status",
                                ["model", "status"], registry=r)  # fmt: skip
        self.latency = Histogram("minicpmv_frontend_request_duration_seconds", "Request latency, to the last token",
                                 ["model"], buckets=_LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.ttft = Histogram("minicpmv_frontend_time_to_first_token_seconds", "Time to the first output token",
                              ["model"], buckets=_TTFT_BUCKETS, registry=r)  # fmt: skip
        self.prompt_tokens = Counter("minicpmv_frontend_prompt_tokens", "Prompt tokens (images included)",
                                     ["model"], registry=r)  # fmt: skip
        self.completion_tokens = Counter("minicpmv_frontend_completion_tokens", "Generated tokens", ["model"],
                                         registry=r)  # fmt: skip
        self.in_flight = Gauge("minicpmv_frontend_requests_in_flight", "Requests being served", ["model"],
                               registry=r)  # fmt: skip
        # Video parts (openai_frontend/video.py).
        self.video_parts = Counter("minicpmv_frontend_video_parts", "Video parts received, by result", ["result"],
                                   registry=r)  # fmt: skip
        self.video_frames = Counter("minicpmv_frontend_video_frames", "Video frames decoded (every frame read, "
                                    "sampled or not)", registry=r)  # fmt: skip
        self.video_decode_seconds = Histogram("minicpmv_frontend_video_decode_seconds", "Decoding one video part",
                                              buckets=_LATENCY_BUCKETS, registry=r)  # fmt: skip
        # Batch API (openai_frontend/batch/runner.py); its lines also count in the request metrics above.
        self.batch_lines = Counter("minicpmv_frontend_batch_lines", "Batch lines finished, by result", ["result"],
                                   registry=r)  # fmt: skip
        self.batch_lines_in_flight = Gauge("minicpmv_frontend_batch_lines_in_flight", "Batch lines being run",
                                           registry=r)  # fmt: skip
        self.batches = Counter("minicpmv_frontend_batches", "Batches finished, by final status", ["status"],
                               registry=r)  # fmt: skip
        # Several Triton servers (balancer.py): why each request went where it went.
        self.balancer_choices = Counter("minicpmv_frontend_balancer_choices", "Triton servers chosen by the balancer, "
                                        "by reason", ["reason"], registry=r)  # fmt: skip
        self.batch_files_expired = Counter("minicpmv_frontend_batch_files_expired", "Files deleted by the expiry "
                                           "sweeper", registry=r)  # fmt: skip
        self.batch_storage_bytes = Gauge("minicpmv_frontend_batch_storage_bytes", "Bytes counted against the batch "
                                         "storage budget (files and results of unfinished batches), at the last "
                                         "sweep", registry=r)  # fmt: skip
        self.batch_storage_refusals = Counter("minicpmv_frontend_batch_storage_refusals", "Uploads refused and "
                                              "batches stopped for lack of storage, by reason", ["reason"],
                                              registry=r)  # fmt: skip


# The model server protocol (kubernetes-sigs/gateway-api-inference-extension v1.6.0,
# docs/proposals/003-model-server-protocol/README.md): what an inference gateway's endpoint picker scrapes from each
# model server to choose where a request goes. Named as vLLM names them, with our prefix; the endpoint picker is
# told these names (deploy/kubernetes/inference-gateway/). One series each for the whole server (every model).
PROTOCOL_METRICS = {
    "queued": "minicpmv:num_requests_waiting",  # TotalQueuedRequests: gauge, requests waiting for admission
    "running": "minicpmv:num_requests_running",  # TotalRunningRequests: gauge, requests being generated
    "kv_usage": "minicpmv:kv_cache_usage_perc",  # KVCacheUtilization: gauge, fraction of KV blocks in use (0..1)
    "cache_info": "minicpmv:cache_config_info",  # BlockSize / NumGPUBlocks: labels block_size, num_gpu_blocks
    "lora_info": "minicpmv:lora_requests_info",  # LoRA: labels max_lora, running_/waiting_lora_adapters
}


class ProtocolCollector:
    """Renders the engines' figures at scrape time (``current()``: the load monitor's, openai_frontend/load.py);
    nothing is reported while they are unknown or stale (a server that doesn't answer has no load to tell)."""

    def __init__(self, current: Callable[[], EngineStats | None]):
        self.current = current

    def collect(self) -> Iterator[GaugeMetricFamily]:
        stats = self.current()
        if stats is None:
            return
        m = PROTOCOL_METRICS
        yield GaugeMetricFamily(m["queued"], "Requests waiting for admission by the engines", value=stats.waiting)
        yield GaugeMetricFamily(m["running"], "Requests the engines are generating", value=stats.running)
        yield GaugeMetricFamily(m["kv_usage"], "Fraction of KV-cache blocks in use (0 to 1; the fullest engine's)",
                                value=stats.kv_usage)  # fmt: skip
        info = GaugeMetricFamily(m["cache_info"], "KV cache: tokens per block and blocks (every engine's)",
                                 labels=["block_size", "num_gpu_blocks"])  # fmt: skip
        info.add_metric([str(stats.block_size), str(stats.kv_blocks)], 1.0)
        yield info
        if stats.max_lora:
            lora = GaugeMetricFamily(m["lora_info"], "LoRA adapters of running and waiting requests; the value is "
                                     "when they were read", labels=["max_lora", "running_lora_adapters",
                                                                    "waiting_lora_adapters"])  # fmt: skip
            lora.add_metric([str(stats.max_lora), ",".join(stats.running_adapters), ",".join(stats.waiting_adapters)],
                            time.time())  # fmt: skip
            yield lora
