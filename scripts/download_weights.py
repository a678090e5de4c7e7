#!/usr/bin/env python3
"""Download MiniCPM-V 2.6 checkpoints from the Hugging Face Hub and check that they are what we serve.

  --model int4 (default)  openbmb/MiniCPM-V-2_6-int4   bitsandbytes nf4, about 6 GB
  --model full            openbmb/MiniCPM-V-2_6        bf16, about 16 GB
  --model both

Files go into the Hugging Face cache (HF_HOME / HF_HUB_CACHE; what the Triton models look in) or, with
--local-dir DIR, into DIR/<repository name>/. Only safetensors, JSON and tokenizer files are fetched, never
the repository's Python code. Downloads show progress bars and resume where they stopped: run the command
again after an interruption. Afterwards each checkpoint is checked (config.json is MiniCPM-V 2.6, every
weight shard is complete and holds the tensors of the model, the tokenizer loads with its special tokens at
their ids). On success the checkpoint directories are printed on stdout, one per line (full before int4).

--check-only PATH runs only the check, on a local directory.

Environment: HF_ENDPOINT (a mirror), HF_TOKEN, HF_HOME / HF_HUB_CACHE, HF_HUB_OFFLINE (cache only),
HF_HUB_ETAG_TIMEOUT / HF_HUB_DOWNLOAD_TIMEOUT (seconds; set to 10 / 30 here unless given).
Exit status: 0 ok, 1 failure, 2 usage error.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

from minicpmv.config import ConfigError, MiniCPMVConfig
from minicpmv.weights import KNOWN_REPOS, WeightsUnavailableError, resolve_checkpoint

logger = logging.getLogger("download_weights")

# huggingface_hub's own defaults are 10 s per request, but its repository lookup has no timeout at all: a Hub
# that accepts connections and never answers would hang it forever. We ask first, with this timeout.
DEFAULT_HUB_TIMEOUT_S = 10.0
HUB_TIMEOUTS = {"HF_HUB_ETAG_TIMEOUT": "10", "HF_HUB_DOWNLOAD_TIMEOUT": "30"}
CHECKPOINT_ENV = {"full": "MINICPMV_CHECKPOINT_MINICPM_V_2_6", "int4": "MINICPMV_CHECKPOINT_MINICPM_V_2_6_INT4"}


SHARD_INDEX = "model.safetensors.index.json"
QUANT_STATE_SUFFIX = ".quant_state.bitsandbytes__nf4"  # one per 4-bit linear in the -int4 repository
MAX_HEADER_BYTES = 100 * 1024 * 1024


class CheckpointCheckError(RuntimeError):
    """The directory does not hold a complete MiniCPM-V 2.6 checkpoint; the message says what is wrong."""


@dataclass(frozen=True)
class CheckpointSummary:
    path: Path
    kind: str  # "full" or "int4"
    num_tensors: int
    num_bytes: int  # of the weight shards on disk


# --- checking -----------------------------------------------------------------------------------------


def check_checkpoint(directory: str | os.PathLike, expected_kind: str | None = None) -> CheckpointSummary:
    """Check that ``directory`` holds a complete MiniCPM-V 2.6 checkpoint (``expected_kind``: full / int4).

    Reads config.json (model_type ``minicpmv``, version 2.6, 64 resampler queries, a vision config), the
    headers of all safetensors shards (every shard listed in the index is present and exactly as long as its
    header says, the index and the shards agree, the tensors of every layer are there with the configured
    shapes, 4-bit quantization state exactly when the config declares it) and loads the tokenizer. Raises
    CheckpointCheckError naming the first problem found.
    """
    path = Path(directory).expanduser()
    if not path.is_dir():
        raise CheckpointCheckError(f"{path} is not a directory")
    try:
        config = MiniCPMVConfig.from_pretrained(path)
    except ConfigError as e:
        raise CheckpointCheckError(f"{path}: not a MiniCPM-V 2.6 checkpoint: {e}") from e
    if config.query_num != 64:
        raise CheckpointCheckError(f"{path}: query_num is {config.query_num}; MiniCPM-V 2.6 uses 64")
    kind = "int4" if config.quantization is not None else "full"
    if expected_kind is not None and kind != expected_kind:
        declared = "declares" if kind == "int4" else "does not declare"
        raise CheckpointCheckError(
            f"{path} is a {kind} checkpoint (its config.json {declared} a 4-bit quantization_config), "
            f"expected {expected_kind} ({KNOWN_REPOS[expected_kind]})"
        )
    tensors, num_bytes = _read_weight_headers(path)
    _check_tensors(path, config, tensors, kind)
    _check_tokenizer(path)
    return CheckpointSummary(path=path, kind=kind, num_tensors=len(tensors), num_bytes=num_bytes)


def read_safetensors_header(file: Path) -> dict[str, dict]:
    """The tensor entries (``dtype``, ``shape``, ``data_offsets``) of a safetensors file, from its header only.

    Raises CheckpointCheckError when the file is truncated or not safetensors.
    """
    size = file.stat().st_size
    with open(file, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise CheckpointCheckError(f"{file} is too short to be a safetensors file (incomplete download?)")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > min(size - 8, MAX_HEADER_BYTES):
            raise CheckpointCheckError(f"{file} is truncated or not a safetensors file (incomplete download?)")
        try:
            header = json.loads(handle.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointCheckError(f"{file} has a corrupt safetensors header: {e}") from e
    if not isinstance(header, dict):
        raise CheckpointCheckError(f"{file} has a corrupt safetensors header")
    header.pop("__metadata__", None)
    try:
        data_end = max((int(entry["data_offsets"][1]) for entry in header.values()), default=0)
    except (TypeError, KeyError, IndexError, ValueError) as e:
        raise CheckpointCheckError(f"{file} has a corrupt safetensors header: {e!r}") from e
    if 8 + header_len + data_end != size:
        raise CheckpointCheckError(
            f"{file} has {size} bytes but its header describes {8 + header_len + data_end}: "
            "the download is incomplete or the file is damaged (run the download again; it resumes)"
        )
    return header


def _read_weight_headers(path: Path) -> tuple[dict[str, dict], int]:
    index_file = path / SHARD_INDEX
    weight_map: dict[str, str] | None = None
    if index_file.is_file():
        try:
            weight_map = json.loads(index_file.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointCheckError(f"{index_file} is not a safetensors index: {e!r}") from e
        shards = [path / name for name in sorted(set(weight_map.values()))]
        missing = [shard.name for shard in shards if not shard.is_file()]
        if missing:
            raise CheckpointCheckError(
                f"{path}: weight shards listed in {SHARD_INDEX} are missing: {', '.join(missing)} "
                "(incomplete download? run it again; it resumes)"
            )
    else:
        shards = sorted(path.glob("*.safetensors"))
        if not shards:
            raise CheckpointCheckError(
                f"{path}: no *.safetensors weight files (PyTorch .bin checkpoints are not supported)"
            )
    tensors: dict[str, dict] = {}
    for shard in shards:
        for name, entry in read_safetensors_header(shard).items():
            tensors[name] = {**entry, "file": shard.name}
    if weight_map is not None:
        wrong = [name for name, file in weight_map.items() if tensors.get(name, {}).get("file") != file]
        if wrong:
            raise CheckpointCheckError(
                f"{path}: {len(wrong)} tensors listed in {SHARD_INDEX} are not in the shard it names, e.g. {wrong[0]}"
            )
    return tensors, sum(shard.stat().st_size for shard in shards)


def _check_tensors(path: Path, config: MiniCPMVConfig, tensors: dict[str, dict], kind: str) -> None:
    expected_shapes = {
        "llm.model.embed_tokens.weight": [config.vocab_size, config.hidden_size],
        "resampler.query": [config.query_num, config.hidden_size],
        "vpm.embeddings.patch_embedding.weight": [
            config.vision.hidden_size, config.vision.num_channels, config.vision.patch_size, config.vision.patch_size
        ],
    }  # fmt: skip
    required = [
        *expected_shapes,
        "llm.lm_head.weight",
        "llm.model.norm.weight",
        "vpm.post_layernorm.weight",
        "resampler.proj",
        *(f"llm.model.layers.{i}.self_attn.q_proj.weight" for i in range(config.num_hidden_layers)),
        *(f"llm.model.layers.{i}.mlp.down_proj.weight" for i in range(config.num_hidden_layers)),
        *(f"vpm.encoder.layers.{i}.self_attn.q_proj.weight" for i in range(config.num_vision_layers_used)),
    ]
    missing = [name for name in required if name not in tensors]
    if missing:
        raise CheckpointCheckError(
            f"{path}: {len(missing)} tensors of MiniCPM-V 2.6 are missing from the weights, e.g. {missing[0]} "
            "(wrong model, or an incomplete download)"
        )
    for name, shape in expected_shapes.items():
        if list(tensors[name]["shape"]) != shape:
            raise CheckpointCheckError(
                f"{path}: {name} has shape {tensors[name]['shape']}, config.json implies {shape}"
            )
    quantized = sum(name.endswith(QUANT_STATE_SUFFIX) for name in tensors)
    if kind == "int4" and not quantized:
        raise CheckpointCheckError(
            f"{path}: config.json declares 4-bit quantization but the weights hold no bitsandbytes nf4 state"
        )
    if kind == "full" and quantized:
        raise CheckpointCheckError(
            f"{path}: the weights are 4-bit quantized but config.json has no quantization_config"
        )


def _check_tokenizer(path: Path) -> None:
    has_files = (path / "tokenizer.json").is_file() or all(
        (path / name).is_file() for name in ("vocab.json", "merges.txt")
    )
    if not has_files or not (path / "tokenizer_config.json").is_file():
        raise CheckpointCheckError(
            f"{path}: tokenizer files are missing (need tokenizer_config.json and tokenizer.json, "
            "or vocab.json + merges.txt)"
        )
    from minicpmv.tokenizer import load_tokenizer  # imports transformers: only once the cheap checks pass

    try:
        load_tokenizer(path)
    except (OSError, ValueError) as e:
        raise CheckpointCheckError(f"{path}: the tokenizer is not MiniCPM-V 2.6's: {e}") from e


# --- downloading --------------------------------------------------------------------------------------


class DownloadError(RuntimeError):
    """The checkpoint could not be fetched; the message says why and what to do."""


def what_to_do(kind: str) -> str:
    """The advice that follows every download failure of the ``kind`` (full / int4) checkpoint."""
    name = KNOWN_REPOS[kind].split("/")[-1]
    return f"""\
What to do:
  - use a checkpoint you already have (a directory with config.json and the *.safetensors files):
      ./scripts/serve.sh --model {kind} --checkpoint-{kind} /path/to/{name}
    or set {CHECKPOINT_ENV[kind]}=/path/to/{name};
  - download through a mirror: HF_ENDPOINT=https://<mirror> ./scripts/download_weights.py --model {kind}
    (or download on a machine with access and copy its Hugging Face cache, or use --local-dir there);
  - or try the whole stack with tiny random weights, nothing to download: ./scripts/serve.sh --demo"""


def hub_unreachable_reason(repo_id: str, revision: str | None, timeout: float) -> str | None:
    """Ask the Hub about ``repo_id`` with a bounded timeout. None if it answered (whatever the answer), else why not."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    try:
        HfApi().repo_info(repo_id, revision=revision, timeout=timeout)
    except HfHubHTTPError:
        return None  # it answered; snapshot_download turns "gated", "no such repository" etc. into its errors
    except Exception as e:  # connection refused, DNS, timeouts, proxies: any transport failure
        return f"{type(e).__name__}: {e}"
    return None


def download(
    repo_id: str,
    kind: str,
    *,
    local_dir: Path | None = None,
    revision: str | None = None,
    timeout: float = DEFAULT_HUB_TIMEOUT_S,
) -> Path:
    """Fetch ``repo_id``, a ``kind`` (full / int4) checkpoint, into the cache or ``local_dir``; return its directory.

    When the Hub can't be reached within ``timeout`` seconds, a copy already in the cache (or ``local_dir``)
    is used; without one, DownloadError is raised at once, without huggingface_hub's retries.
    """
    from huggingface_hub import constants

    logger.info("fetching %s into %s", repo_id, local_dir or f"the Hugging Face cache ({constants.HF_HUB_CACHE})")
    if constants.HF_HUB_OFFLINE:
        return _resolve(repo_id, kind, revision=revision, local_dir=local_dir)
    why = hub_unreachable_reason(repo_id, revision, timeout)
    if why is None:
        return _resolve(repo_id, kind, revision=revision, local_dir=local_dir)
    logger.warning("the Hugging Face Hub (%s) could not be reached: %s", constants.ENDPOINT, why)
    try:
        path = _resolve(repo_id, kind, revision=revision, local_dir=local_dir, local_files_only=True)
    except DownloadError:
        where = local_dir or constants.HF_HUB_CACHE
        raise DownloadError(
            f"could not download {repo_id}: the Hugging Face Hub at {constants.ENDPOINT} could not be reached "
            f"({why}) and {repo_id} is not in {where}.\n{what_to_do(kind)}"
        ) from None
    logger.warning("using the copy of %s found locally: %s", repo_id, path)
    return path


def _resolve(
    repo_id: str, kind: str, *, revision: str | None, local_dir: Path | None, local_files_only: bool = False
) -> Path:
    try:
        return resolve_checkpoint(repo_id, revision=revision, local_dir=local_dir, local_files_only=local_files_only)
    except WeightsUnavailableError as e:
        raise DownloadError(f"{e}\n{what_to_do(kind)}") from e


# --- command line -------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="download_weights.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=["full", "int4", "both"], help="which checkpoint(s); default: int4")
    parser.add_argument("--local-dir", type=Path, metavar="DIR", help="download into DIR/<repository name>/")
    parser.add_argument("--repo-id", metavar="OWNER/NAME", help="another Hub repository for --model full or int4")
    parser.add_argument("--revision", help="branch, tag or commit (default: main)")
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_HUB_TIMEOUT_S,
        metavar="SECONDS",
        help="how long to wait for the Hub to answer before giving up (default: %(default)s)",
    )
    parser.add_argument("--check-only", type=Path, metavar="PATH", help="only check the checkpoint directory PATH")
    parser.add_argument("--quiet", action="store_true", help="no progress bars and no info messages")
    args = parser.parse_args(argv)
    if args.check_only is not None:
        if args.model == "both":
            parser.error("--check-only checks one directory: use --model full or --model int4 (or no --model)")
        if args.local_dir or args.repo_id or args.revision:
            parser.error("--check-only takes no --local-dir, --repo-id or --revision")
    elif args.repo_id and args.model in (None, "both"):
        parser.error("--repo-id needs --model full or --model int4 (the kind of checkpoint it holds)")
    if args.timeout <= 0:
        parser.error("--timeout must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="download_weights: %(message)s")
    logging.getLogger("minicpmv").setLevel(logging.WARNING)  # our messages say what it would
    if args.check_only is not None:
        return _report([(args.check_only, args.model)])

    for name, value in HUB_TIMEOUTS.items():  # read once, when huggingface_hub is imported (not yet)
        os.environ.setdefault(name, value)
    if args.quiet:
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    kinds = ["full", "int4"] if args.model == "both" else [args.model or "int4"]
    fetched: list[tuple[Path, str | None]] = []
    for kind in kinds:
        repo_id = args.repo_id or KNOWN_REPOS[kind]
        local_dir = args.local_dir / repo_id.split("/")[-1] if args.local_dir else None
        try:
            path = download(repo_id, kind, local_dir=local_dir, revision=args.revision, timeout=args.timeout)
        except DownloadError as e:
            logger.error("%s", e)
            return 1
        fetched.append((path, kind))
    return _report(fetched)


def _report(checkpoints: list[tuple[Path, str | None]]) -> int:
    summaries = []
    for path, kind in checkpoints:
        try:
            summaries.append(check_checkpoint(path, kind))
        except CheckpointCheckError as e:
            logger.error("check failed: %s", e)
            return 1
    for summary in summaries:
        logger.info(
            "ok: %s is a MiniCPM-V 2.6 %s checkpoint (%d tensors, %.2f GB of weights)",
            summary.path, summary.kind, summary.num_tensors, summary.num_bytes / 1e9,
        )  # fmt: skip
        print(summary.path.resolve(), flush=True)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # Ctrl-C during a download: it resumes next time, no traceback needed
        sys.exit(130)
