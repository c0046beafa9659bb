"""Hugging Face hub access that fails in seconds, not minutes.

With no network and HF_HUB_OFFLINE unset, huggingface_hub retries each request for minutes before the
error reaches the user. Before prism asks the hub for anything it checks, with one short TCP connect,
whether the hub endpoint answers; if not, it stops with one line that says whether the repository is
in the local cache (then HF_HUB_OFFLINE=1 uses it) or not.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from stages.common.contract.errors import PrismError

CONNECT_TIMEOUT_S = 3.0


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def reachable(url: str | None = None, timeout: float | None = None) -> bool:
    parsed = urlparse(url or endpoint())
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname or "", port), timeout=timeout or CONNECT_TIMEOUT_S):
            return True
    except OSError:
        return False


def cached(repo: str, repo_type: str = "model") -> bool:
    """Whether a snapshot of the repository is in the local hub cache."""
    try:
        from huggingface_hub import snapshot_download

        snapshot_download(repo, repo_type=repo_type, local_files_only=True)
        return True
    except Exception:  # LocalEntryNotFoundError and friends: not cached
        return False


def require_hub(repo: str, repo_type: str = "model", what: str = "--ckpt") -> None:
    """Return if the hub can be asked for `repo` now (offline mode reads the cache); else one clear error."""
    if offline() or reachable():
        return
    where = endpoint()
    if cached(repo, repo_type):
        raise PrismError(f"{what} {repo}: cannot reach {where} (no network?) and HF_HUB_OFFLINE is not set",
                         hint=f"{repo} is in the local cache: set HF_HUB_OFFLINE=1 to use it")
    raise PrismError(f"{what} {repo}: cannot reach {where} (no network?) and {repo} is not in the local cache",
                     hint="connect to the network, or download it where there is one (huggingface-cli download) "
                          "and set HF_HUB_OFFLINE=1")


def snapshot(repo: str, repo_type: str = "dataset", what: str = "--data") -> Path:
    """The local folder of a hub repository: the cached snapshot offline, downloaded first when online."""
    from huggingface_hub import snapshot_download

    require_hub(repo, repo_type, what)
    try:
        return Path(snapshot_download(repo, repo_type=repo_type, local_files_only=offline()))
    except Exception as e:  # hub errors carry multi-line bodies; the first line says what happened
        first = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
        if offline():
            raise PrismError(f"{what} {repo}: not in the local hub cache and HF_HUB_OFFLINE is set",
                             hint="download it where there is a network, or unset HF_HUB_OFFLINE") from None
        raise PrismError(f"{what} {repo}: cannot fetch this {repo_type} from the hub ({first})") from None
