"""moto's S3 server on 127.0.0.1 (a real S3 API over HTTP) for tests.

The server runs in its own process: delta-rs holds the GIL while it waits on the network, so a server
thread inside the test process could never answer it. Clients reach it through a TCP forwarder
(tests/tcpproxy.py), which :meth:`MotoS3.restart_later` stops and starts to simulate an outage while the
server keeps its buckets.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

_PROXY = Path(__file__).with_name("tcpproxy.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_listening(port: int, timeout: float = 30.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f} s")


class MotoS3:
    """A moto server process behind a forwarder; ``url`` is the forwarder's."""

    def __init__(self):
        self.port = free_port()                 # what clients use (the forwarder)
        self._moto_port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._moto: subprocess.Popen | None = None
        self._proxy: subprocess.Popen | None = None
        self._log = tempfile.NamedTemporaryFile(prefix="moto-", suffix=".log", delete=False)

    def _start_proxy(self) -> None:
        self._proxy = subprocess.Popen([sys.executable, str(_PROXY), str(self.port), str(self._moto_port)])
        _wait_listening(self.port)

    def start(self):
        moto = Path(sys.executable).parent / "moto_server"
        self._moto = subprocess.Popen([str(moto), "-H", "127.0.0.1", "-p", str(self._moto_port)],
                                      stdout=subprocess.DEVNULL, stderr=self._log)
        _wait_listening(self._moto_port)
        self._start_proxy()
        return self

    def _stop_proxy(self) -> None:
        if self._proxy is not None:
            self._proxy.kill()
            self._proxy.wait()
            self._proxy = None

    def stop(self):
        self._stop_proxy()
        if self._moto is not None:
            self._moto.kill()
            self._moto.wait()
            self._moto = None

    def restart_later(self, down_s: float):
        """Cut the server off now (connections refused) and let it back after ``down_s`` s, in a thread."""
        self._stop_proxy()

        def later():
            time.sleep(down_s)
            self._start_proxy()

        t = threading.Thread(target=later, daemon=True)
        t.start()
        return t

    def log_mark(self) -> int:
        """A position in the server's request log (see :meth:`requests_since`)."""
        time.sleep(0.2)                          # let the server flush the lines of requests already answered
        return os.path.getsize(self._log.name)

    def requests_since(self, mark: int) -> list[str]:
        """Request lines the server logged after ``mark`` (werkzeug's '"GET /bucket?... HTTP/1.1" 200')."""
        time.sleep(0.2)
        with open(self._log.name, "rb") as f:
            f.seek(mark)
            return [line for line in f.read().decode(errors="replace").splitlines() if "HTTP/1." in line]

    @property
    def options(self) -> dict:
        return {"endpoint_url": self.url}

    def fs(self):
        import s3fs

        return s3fs.S3FileSystem(client_kwargs={"endpoint_url": self.url}, skip_instance_cache=True,
                                 use_listings_cache=False)

    def upload_tree(self, local: Path, dest: str) -> int:
        fs = self.fs()
        n = 0
        for f in sorted(local.rglob("*")):
            if f.is_file():
                fs.pipe_file(f"{dest.rstrip('/')}/{f.relative_to(local).as_posix()}", f.read_bytes())
                n += 1
        return n
