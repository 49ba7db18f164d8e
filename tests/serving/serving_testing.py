"""What the HTTP server tests share: a tiny seeded model and a uvicorn server on a free loopback port.
(Test modules import it after their `pytest.importorskip("uvicorn")`.)"""

import socket
import threading
import time
from contextlib import contextmanager

import torch

from rlhf_fast.model import GPT


def tiny_model():
    torch.manual_seed(0)
    return GPT.from_preset("tiny", attn_backend="torch").eval()


@contextmanager
def running(app):
    """Base URL of `app` served by uvicorn in a background thread on a free loopback port."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs=dict(sockets=[sock]), daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.01)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
