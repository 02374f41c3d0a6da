"""Run the HTTP API with uvicorn in a background thread (for `blockllm serve --http` and tests)."""

from __future__ import annotations

import threading
import time
from typing import Any

import uvicorn


def parse_bind(bind: str) -> tuple[str, int]:
    """'HOST:PORT' (or ':PORT', or 'PORT') -> (host, port); the host defaults to 127.0.0.1."""
    host, sep, port = bind.rpartition(":")
    if not sep:
        host, port = "", bind
    host = host.strip("[]") or "127.0.0.1"
    try:
        value = int(port)
    except ValueError:
        raise ValueError(f"--http wants HOST:PORT, not {bind!r}") from None
    if not 0 <= value < 65536:
        raise ValueError(f"port {value} is out of range")
    return host, value


class HTTPServer:
    """A uvicorn server on its own thread; `port=0` picks a free port (see `.port` after start)."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 8000, log_level: str = "warning") -> None:
        self.config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="off", access_log=False)
        self.server = uvicorn.Server(self.config)
        self.host = host
        self.port = port
        self._thread = threading.Thread(target=self.server.run, name="blockllm-http", daemon=True)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self, timeout: float = 30.0) -> HTTPServer:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive():
                raise RuntimeError(f"the HTTP server could not start on {self.host}:{self.config.port}")
            if time.monotonic() > deadline:
                raise TimeoutError("the HTTP server did not start in time")
            time.sleep(0.02)
        for server in getattr(self.server, "servers", []) or []:
            for sock in server.sockets:
                self.port = sock.getsockname()[1]
                break
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        self._thread.join(timeout)

    def __enter__(self) -> HTTPServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
