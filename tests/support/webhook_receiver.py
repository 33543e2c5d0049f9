"""A webhook receiver on 127.0.0.1 in the test process: records every POST, answers what the test scripts.

``answers``: status codes for the next requests, in order (then 200); ``hold_from``: the request number
(0-based) from which requests are held unanswered, then dropped unanswered and unrecorded once ``release``
is set (a receiver that never answers, for a dispatcher killed mid-call).
It can be stopped and started again on the same port (a receiver that is down for a while).
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass(frozen=True)
class Received:
    headers: dict[str, str]
    body: bytes
    answered: int


class WebhookReceiver:
    def __init__(self, port: int = 0) -> None:
        self.port = port
        self.answers: deque[int] = deque()
        self.received: list[Received] = []
        self.hold_from: int | None = None
        self.release = threading.Event()
        self._seen = 0
        self.hung = threading.Event()  # set once a request is being held
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def start(self) -> WebhookReceiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                with receiver._lock:
                    number, receiver._seen = receiver._seen, receiver._seen + 1
                if receiver.hold_from is not None and number >= receiver.hold_from and not receiver.release.is_set():
                    receiver.hung.set()
                    receiver.release.wait(60)
                    self.close_connection = True
                    return
                with receiver._lock:
                    status = receiver.answers.popleft() if receiver.answers else 200
                    headers = {k.lower(): v for k, v in self.headers.items()}
                    receiver.received.append(Received(headers, body, status))
                self.send_response(status)
                self.send_header("content-length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.release.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def delivered(self) -> list[Received]:
        with self._lock:
            return [r for r in self.received if 200 <= r.answered < 300]

    def all(self) -> list[Received]:
        with self._lock:
            return list(self.received)
