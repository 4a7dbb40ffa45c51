"""Test helper (no tests here): an S3 endpoint that starts failing writes, a real HTTP proxy in front of the
tests' moto_server. moto has no switch to make an object store return errors, so this forwards every request
unchanged and, once told to, answers PUTs of keys matching a pattern with S3's own 500 InternalError."""

from __future__ import annotations

import http.client
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

INTERNAL_ERROR = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>InternalError</Code>'
                  b"<Message>We encountered an internal error. Please try again.</Message></Error>")


class FaultyS3:
    """`endpoint`: the proxy's URL. After `fail_puts(pattern, after=k)`, the first k PUTs whose path matches
    pass and every later one is answered 500; `heal()` lets everything through again."""

    def __init__(self, upstream: str):
        self.upstream = urlsplit(upstream).netloc
        self.pattern: re.Pattern | None = None
        self.allowed = 0
        self.refused = 0
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def fail_puts(self, pattern: str, after: int = 0) -> None:
        with self._lock:
            self.pattern, self.allowed = re.compile(pattern), after

    def heal(self) -> None:
        with self._lock:
            self.pattern = None

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _refuse(self, method: str, path: str) -> bool:
        with self._lock:
            if method != "PUT" or self.pattern is None or not self.pattern.search(path):
                return False
            if self.allowed > 0:
                self.allowed -= 1
                return False
            self.refused += 1
            return True

    def _handler(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0], 16)
                        chunks.append(self.rfile.read(size + 2)[:size])  # the chunk and its CRLF
                        if size == 0:
                            return b"".join(chunks)
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _forward(self) -> None:
                body = self._body()
                if proxy._refuse(self.command, self.path):
                    self.send_response(500)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(INTERNAL_ERROR)))
                    self.end_headers()
                    self.wfile.write(INTERNAL_ERROR)
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() != "transfer-encoding"}
                headers["Content-Length"] = str(len(body))
                conn = http.client.HTTPConnection(proxy.upstream, timeout=60)
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "content-length", "connection"):
                        self.send_header(k, v)
                # a HEAD's length is the object's, as upstream said; anything else's is the body relayed
                length = resp.getheader("Content-Length", "0") if self.command == "HEAD" else str(len(data))
                self.send_header("Content-Length", length)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

        return Handler
