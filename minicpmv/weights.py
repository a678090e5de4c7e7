"""Finding a checkpoint: a local directory as is, or a Hugging Face Hub id through huggingface_hub.

Downloads show a progress bar, resume where they stopped, and honour ``HF_HOME``,
``HF_HUB_CACHE`` and ``HF_HUB_OFFLINE`` (huggingface_hub reads them). Python files in the
repository are never downloaded: we do not execute checkpoint code.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

logger = logging.getLogger(__name__)

# Everything a MiniCPM-V 2.6 repository holds that we use; *.py (remote code) is left out on purpose.
CHECKPOINT_PATTERNS = (
    "*.safetensors",
    "*.json",
    "*.jinja",
    "merges.txt",
    "vocab.json",
)

KNOWN_REPOS = {
    "full": "openbmb/MiniCPM-V-2_6",
    "int4": "openbmb/MiniCPM-V-2_6-int4",
}


class WeightsUnavailableError(RuntimeError):
    """The checkpoint can't be had: not a local directory, and the Hub could not provide it."""


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")


def resolve_checkpoint(
    name_or_path: str | os.PathLike,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
    token: str | None = None,
) -> Path:
    """Return a local directory holding the checkpoint ``name_or_path``.

    A directory that exists is returned unchanged. Anything of the form ``owner/name`` that is
    not a directory is a Hub repository id, fetched (or found in the cache) with
    ``huggingface_hub.snapshot_download``. Raises WeightsUnavailableError with the reason and
    what to do when neither works.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise WeightsUnavailableError(f"{path} is a directory but holds no config.json: not a checkpoint")
        return path
    name = str(name_or_path)
    if not _HUB_ID.match(name):
        raise WeightsUnavailableError(
            f"checkpoint directory {name} does not exist (and it is not a Hub id of the form owner/name)"
        )
    return _download(name, revision, cache_dir, local_dir, local_files_only, token)


def _download(repo_id, revision, cache_dir, local_dir, local_files_only, token) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    hint = (
        "Pass a local checkpoint directory instead, download it on a machine with access "
        "(scripts/download_weights.py), or use the tiny demo checkpoint."
    )
    logger.info("resolving %s through the Hugging Face Hub (cache: %s)", repo_id, cache_dir or "default")
    try:
        folder = snapshot_download(
            repo_id,
            revision=revision,
            cache_dir=cache_dir,
            local_dir=local_dir,
            local_files_only=local_files_only,
            allow_patterns=list(CHECKPOINT_PATTERNS),
            token=token,
        )
    except GatedRepoError as e:
        raise WeightsUnavailableError(f"{repo_id} is gated: accept its terms and set HF_TOKEN. ({e})") from e
    except RepositoryNotFoundError as e:
        raise WeightsUnavailableError(
            f"{repo_id}: no such repository on the Hub (or no access). {hint}"
        ) from e
    except RevisionNotFoundError as e:
        raise WeightsUnavailableError(f"{repo_id}: revision {revision!r} not found. {hint}") from e
    except LocalEntryNotFoundError as e:
        from huggingface_hub import constants

        if local_files_only:
            why = "only local files were allowed (local_files_only)"
        elif constants.HF_HUB_OFFLINE:
            why = "offline mode is on (HF_HUB_OFFLINE)"
        else:
            why = "the Hub could not be reached"
        raise WeightsUnavailableError(f"{repo_id} is not in the local cache and {why}. {hint}") from e
    except (HfHubHTTPError, OSError) as e:
        raise WeightsUnavailableError(f"could not download {repo_id}: {e}. {hint}") from e
    path = Path(folder)
    if not (path / "config.json").is_file():
        raise WeightsUnavailableError(f"{repo_id} downloaded to {path} but holds no config.json")
    return path
