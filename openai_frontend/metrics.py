"""Prometheus metrics of the frontend (served on GET /metrics), in their own registry."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

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
        self.batch_files_expired = Counter("minicpmv_frontend_batch_files_expired", "Files deleted by the expiry "
                                           "sweeper", registry=r)  # fmt: skip
        self.batch_storage_bytes = Gauge("minicpmv_frontend_batch_storage_bytes", "Bytes counted against the batch "
                                         "storage budget (files and results of unfinished batches), at the last "
                                         "sweep", registry=r)  # fmt: skip
        self.batch_storage_refusals = Counter("minicpmv_frontend_batch_storage_refusals", "Uploads refused and "
                                              "batches stopped for lack of storage, by reason", ["reason"],
                                              registry=r)  # fmt: skip
