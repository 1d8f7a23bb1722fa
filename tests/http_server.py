"""A loopback HTTP server for the data tests: serves a folder on 127.0.0.1 (port picked by the OS).

Besides plain files it can cut a response short (``/truncated/<name>`` announces the full
length but sends half the bytes), and it records every path requested so that a test can
prove that nothing was downloaded.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import threading
from pathlib import Path


class _Handler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # keep test output quiet
        pass

    def do_GET(self):
        self.server.requested.append(self.path)
        if self.path.startswith("/truncated/"):
            data = (Path(self.directory) / self.path[len("/truncated/"):]).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
            self.close_connection = True
            return
        super().do_GET()


class LoopbackServer:
    def __init__(self, folder: Path):
        self.folder = Path(folder)
        handler = functools.partial(_Handler, directory=str(self.folder))
        self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._httpd.requested = []
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def requested(self) -> list[str]:
        return self._httpd.requested

    def url(self, name: str) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/{name}"

    def start(self) -> LoopbackServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()


@contextlib.contextmanager
def serve(folder: Path):
    """Serves ``folder`` while the block runs; yields the LoopbackServer."""
    server = LoopbackServer(folder).start()
    try:
        yield server
    finally:
        server.stop()
