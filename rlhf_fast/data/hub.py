"""Datasets from the Hugging Face hub (`datasets.load_dataset`), failing fast when the hub cannot be reached.

Offline, `load_dataset` retries each request for ~25 s (huggingface_hub's backoff, a log line per retry)
before it fails. So the hub's host is probed first with one short TCP connection; when it does not answer,
the load runs in the libraries' offline mode: a dataset in the local HF cache still loads, any other fails
at once with one line. HF_HUB_OFFLINE=1 skips the probe; with a proxy configured the probe is skipped too
(the proxy, not a direct connection, decides what is reachable).
"""

from __future__ import annotations

import contextlib
import os
import socket
from urllib.parse import urlsplit

from .jsonl import MissingDataError

PROBE_TIMEOUT_S = 3.0
_PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "HTTP_PROXY", "http_proxy")


def hub_endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def hub_reachable(timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether a connection to the hub's host opens within `timeout` seconds (True when a proxy decides)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    if any(os.environ.get(v) for v in _PROXY_VARS):
        return True
    url = urlsplit(hub_endpoint())
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
    except OSError:
        return False
    return True


@contextlib.contextmanager
def offline_mode():
    """The hub libraries' offline mode for the calls inside (they read these flags at call time)."""
    import datasets
    from huggingface_hub import constants

    saved = datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE = saved


def load_hub_dataset(path: str, /, **kwargs):
    """`datasets.load_dataset(path, **kwargs)` (kwargs: name = the config, data_dir, split); a failure is one
    MissingDataError naming `path`."""
    import datasets

    online = hub_reachable()
    try:
        with contextlib.nullcontext() if online else offline_mode():
            return datasets.load_dataset(path, **kwargs)
    except Exception as e:  # offline, unknown name, unknown split, ...: say what was tried
        why = f"{type(e).__name__}: {e}"
        if not online:
            why = f"offline: {urlsplit(hub_endpoint()).hostname} cannot be reached and the dataset is not in the " \
                  f"local HF cache; {why}"
        raise MissingDataError(f"not a local file or directory, and could not be loaded from the dataset hub "
                               f"({why})", path) from e
