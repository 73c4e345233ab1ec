"""moto's S3 server on 127.0.0.1 (a real S3 API over HTTP) for tests."""
from __future__ import annotations

import socket
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MotoS3:
    """A moto server thread; ``stop()``/``start()`` keep its buckets (state lives in the process)."""

    def __init__(self):
        from moto.server import ThreadedMotoServer

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)

    def start(self):
        self._server.start()
        return self

    def stop(self):
        self._server.stop()

    def restart_later(self, down_s: float):
        """Stop now and start again after ``down_s`` seconds, in a thread."""
        import threading
        import time

        from moto.server import ThreadedMotoServer

        self.stop()

        def later():
            time.sleep(down_s)
            self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
            self._server.start()

        t = threading.Thread(target=later, daemon=True)
        t.start()
        return t

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
