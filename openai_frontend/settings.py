"""Frontend settings: environment variables ``MINICPMV_FRONTEND_<NAME>`` (or command-line flags), validated once."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from openai_frontend.tenants import parse_key

ENV_PREFIX = "MINICPMV_FRONTEND_"

# Names a client may use besides Triton's model names (OpenAI-style and Hugging Face Hub ids).
DEFAULT_ALIASES = {
    "MiniCPM-V-2_6": "minicpm_v_2_6",
    "openbmb/MiniCPM-V-2_6": "minicpm_v_2_6",
    "MiniCPM-V-2_6-int4": "minicpm_v_2_6_int4",
    "openbmb/MiniCPM-V-2_6-int4": "minicpm_v_2_6_int4",
}

CommaList = Annotated[list[str], NoDecode]


class Settings(BaseSettings):
    """Everything the frontend can be told. Lists take comma-separated values in the environment."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore")

    host: str = "0.0.0.0"
    port: int = Field(9000, ge=1, le=65535)
    log_level: str = "info"

    # Triton: gRPC (streaming) for generation, HTTP for health and the model list. Several servers: both as
    # comma-separated lists, paired in order (openai_frontend/balancer.py spreads requests over them).
    triton_grpc_url: str = "127.0.0.1:8001"
    triton_http_url: str = "127.0.0.1:8000"
    triton_probe_interval: float = Field(2.0, gt=0, description="seconds between probes of a Triton that is down")
    # An endpoint whose host is a DNS name (e.g. a headless Service) stands for every address it resolves to,
    # looked up again every triton_discovery_interval seconds (0: once at start). Affinity: requests with the same
    # document (first image and the prompt up to it) go to the same server, within a load bound (balancer.py).
    triton_discovery_interval: float = Field(10.0, ge=0, description="seconds between DNS lookups of Triton names")
    balancer_affinity: bool = True
    balancer_load_factor: float = Field(1.25, ge=1.0, description="a server takes a keyed request only below this "
                                        "times the mean requests in flight per server (bounded loads)")
    # Served models (Triton names). Empty: every model Triton reports READY.
    models: CommaList = Field(default_factory=list)

    # Authentication: when keys are set, /v1/* needs "Authorization: Bearer <key>". An entry is "key" or
    # "key:tenant": files and batches belong to the key's tenant (keys naming one tenant share them; a key without
    # one is its own tenant) and are invisible to others (openai_frontend/tenants.py). Admin keys see every
    # tenant's files and batches.
    api_keys: CommaList = Field(default_factory=list)
    admin_api_keys: CommaList = Field(default_factory=list)

    # LoRA adapters: POST /v1/load_lora_adapter and /v1/unload_lora_adapter (vLLM's) exist only when this is on
    # (vLLM's VLLM_ALLOW_RUNTIME_LORA_UPDATING); the models load from under their lora_dir only.
    enable_lora_runtime_updates: bool = False

    # Limits.
    request_timeout: float = Field(600.0, gt=0, description="seconds a request may take, to its last token")
    max_concurrent_requests: int | None = Field(None, ge=0, description="requests in flight; more get 429 (0: no "
                                                "limit; unset: what the servers accept, openai_frontend/load.py)")
    engine_stats_interval: float = Field(0.5, gt=0, description="seconds between polls of the engines' load")
    max_body_bytes: int = Field(64 * 2**20, ge=1024)
    max_images_per_request: int = Field(16, ge=0)
    max_image_bytes: int = Field(20 * 2**20, ge=1)
    max_image_pixels: int = Field(50_000_000, ge=1, description="larger images are refused (decompression bombs)")
    # Images with more pixels are downscaled (aspect kept) before they go to Triton. The model sees at most
    # about 9 slices of 448x448 by default, so 1344x1344 loses nothing it would use.
    image_pixel_budget: int = Field(1344 * 1344, ge=28 * 28)

    # PDF file parts: pages rendered to images (pypdfium2) at this resolution, at most this many per request.
    pdf_dpi: int = Field(144, ge=36, le=600)
    pdf_max_pages: int = Field(16, ge=1)
    max_pdf_bytes: int = Field(50 * 2**20, ge=1)

    # Image detail: "low" reads an image whole (1 slice), "high" in up to this many slices, "auto" as the model
    # is configured (9 by default); an image part's max_slice_nums overrides both.
    high_detail_max_slice_nums: int = Field(9, ge=1, le=36)

    # Video parts (video_url): decoded here (PyAV), sampled at ~1 frame per second as MiniCPM-V's card does, at
    # most max_video_frames frames, each read in up to 2 slices by default. Checked from the container before
    # any frame is decoded: bytes, duration, frame size, and the frames' vision tokens (at most
    # max_video_tokens); decoding stops after video_decode_timeout seconds.
    max_videos_per_request: int = Field(1, ge=0)
    max_video_bytes: int = Field(50 * 2**20, ge=1)
    max_video_seconds: float = Field(600.0, gt=0)
    max_video_frames: int = Field(64, ge=1, le=256)
    max_video_frame_pixels: int = Field(3840 * 2160, ge=1)
    max_video_tokens: int = Field(64 * 3 * 64, ge=64, description="vision positions of one video's frames")
    video_decode_timeout: float = Field(60.0, gt=0)

    # http(s) image URLs: off unless an operator enables them; hosts must be on the allow-list ("*": any).
    allow_remote_images: bool = False
    remote_image_hosts: CommaList = Field(default_factory=list)
    remote_image_timeout: float = Field(10.0, gt=0)

    # CORS for browser clients: off unless origins are listed ("*": any origin; credentials then stay off).
    cors_allow_origins: CommaList = Field(default_factory=list)
    cors_allow_credentials: bool = False

    # Batch API (/v1/files, /v1/batches; openai_frontend/batch/): state in SQLite, file bodies under the data
    # directory. The runner's concurrency stays below MAX_CONCURRENT_REQUESTS and drops to BATCH_CONCURRENCY_BUSY
    # while interactive requests are in flight, so interactive traffic keeps priority.
    batch_enabled: bool = True
    batch_data_dir: str = "~/.local/share/minicpmv-serve/batches"
    batch_db_path: str = Field("", description="SQLite database (default: <batch_data_dir>/batches.sqlite3)")
    batch_concurrency: int = Field(8, ge=1, description="batch lines in flight at most")
    batch_concurrency_busy: int = Field(2, ge=0, description="batch lines in flight while interactive requests run")
    batch_max_attempts: int = Field(3, ge=1, description="tries of a line that fails with 500 or 504")
    batch_max_file_bytes: int = Field(50 * 2**20, ge=1, description="largest upload (also capped by MAX_BODY_BYTES)")
    batch_max_lines: int = Field(50_000, ge=1, description="requests per batch file")
    batch_max_open_batches: int = Field(16, ge=1, description="batches not yet finished")
    batch_max_open_batches_per_tenant: int = Field(0, ge=0, description="one tenant's unfinished batches (0: only "
                                                   "the total)")  # fmt: skip
    # Storage: stored bytes are the files' (input and output) and the results of unfinished batches. An upload
    # past a budget is refused before it is written (429 storage_quota_exceeded); a batch whose results reach it
    # ends "failed", its results so far kept. Retention: a file expires EXPIRY seconds after its creation unless
    # its upload (expires_after) or its batch (output_expires_after) says otherwise, at most MAX_FILE_EXPIRY
    # (OpenAI's bounds: 1 hour to 30 days); expired files are deleted every SWEEP_INTERVAL seconds, except the
    # input of a batch that has not finished.
    batch_max_disk_bytes: int = Field(10 * 2**30, ge=1, description="all tenants' stored bytes together")
    batch_max_tenant_disk_bytes: int = Field(0, ge=0, description="one tenant's stored bytes (0: only the total)")
    batch_file_expiry: int = Field(30 * 86400, ge=0, description="seconds a file is kept by default (0: until "
                                   "deleted)")  # fmt: skip
    batch_max_file_expiry: int = Field(30 * 86400, ge=3600, le=30 * 86400, description="longest expires_after taken")
    batch_sweep_interval: float = Field(60.0, gt=0, description="seconds between deletions of expired files")

    @field_validator("models", "api_keys", "admin_api_keys", "remote_image_hosts", "cors_allow_origins",
                     mode="before")  # fmt: skip
    @classmethod
    def _split(cls, value):
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @field_validator("api_keys", "admin_api_keys")
    @classmethod
    def _key_entries(cls, value: list[str]) -> list[str]:
        for entry in value:
            parse_key(entry)  # "key" or "key:tenant"; raises naming what is wrong
        return value

    @model_validator(mode="after")
    def _paired_endpoints(self) -> Settings:
        grpc, http = _urls(self.triton_grpc_url), _urls(self.triton_http_url)
        if not grpc or len(grpc) != len(http):
            raise ValueError(f"triton_grpc_url and triton_http_url must list the same number of servers, in the "
                             f"same order (got {len(grpc)} and {len(http)})")  # fmt: skip
        return self

    def triton_endpoints(self) -> list[tuple[str, str]]:
        """(gRPC URL, HTTP URL) of each Triton server."""
        return list(zip(_urls(self.triton_grpc_url), _urls(self.triton_http_url), strict=True))

    @field_validator("log_level")
    @classmethod
    def _level(cls, value: str) -> str:
        value = value.lower()
        if value not in ("critical", "error", "warning", "info", "debug"):
            raise ValueError("log_level must be one of critical, error, warning, info, debug")
        return value


def _urls(value: str) -> list[str]:
    return [url.strip() for url in value.split(",") if url.strip()]
