"""Running the console: uvicorn on the configured address, or on a socket a test bound."""

from __future__ import annotations

import logging
import socket
import threading
import time
from dataclasses import dataclass

from common.errors import ConfigError
from server.console.config import ConsoleConfig

log = logging.getLogger(__name__)


def bind(config: ConsoleConfig) -> socket.socket:
    family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((config.host, config.port))
    except OSError as err:
        sock.close()
        raise ConfigError(f"cannot listen on {config.listen}: {err.strerror}") from err
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def _uvicorn_server(config: ConsoleConfig, app):
    import uvicorn

    ssl = {}
    if config.tls.enabled:
        ssl = {"ssl_certfile": config.tls.cert, "ssl_keyfile": config.tls.key}
    return uvicorn.Server(
        uvicorn.Config(
            app,
            log_level="warning",
            access_log=False,
            server_header=False,
            proxy_headers=False,
            lifespan="off",
            ws="none",
            **ssl,
        )
    )


def serve(config: ConsoleConfig) -> int:
    """Run until SIGTERM/Ctrl-C (uvicorn's signal handling)."""
    from server.console.app import create_app

    app = create_app(config)
    sock = bind(config)
    host, port = sock.getsockname()[:2]
    scheme = "https" if config.tls.enabled else "http"
    shown = f"[{host}]" if ":" in host else host
    print(
        f"console listening on {scheme}://{shown}:{port} (broker {config.broker}); Ctrl-C to stop",
        flush=True,
    )
    _uvicorn_server(config, app).run(sockets=[sock])
    return 0


@dataclass
class RunningConsole:
    url: str
    app: object
    server: object
    thread: threading.Thread

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        if self.thread.is_alive():
            raise RuntimeError(f"the console at {self.url} did not stop within {timeout} s")


def start_in_thread(config: ConsoleConfig, ready_timeout: float = 10.0) -> RunningConsole:
    """The console in this process on a background thread (tests, benchmarks)."""
    from server.console.app import create_app

    app = create_app(config)
    sock = bind(config)
    host, port = sock.getsockname()[:2]
    server = _uvicorn_server(config, app)
    server.install_signal_handlers = lambda: None  # uvicorn < 0.29 calls it; newer skip it
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name="console", daemon=True
    )
    thread.start()
    deadline = time.monotonic() + ready_timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError(f"the console did not start within {ready_timeout} s")
        time.sleep(0.02)
    scheme = "https" if config.tls.enabled else "http"
    return RunningConsole(f"{scheme}://{host}:{port}", app, server, thread)
