"""A small HTTP/1.1 proxy that puts network faults in front of a real server (moto's S3).

Each request is read whole (head and body) and matched against the rules, in order; the first
rule that matches and still has uses left decides what happens to it:

* ``refuse``: the connection is reset before anything is read or sent;
* ``503``: answered ``503 Slow Down`` without reaching the server;
* ``400``, ``501``: answered ``400 InvalidArgument`` or ``501 NotImplemented`` without reaching
  the server (an S3-compatible store that rejects, or lacks, a conditional header);
* ``stall``: held for ``stall_s`` without an answer, then the connection is reset;
* ``drop_reply``: forwarded, applied by the server, and its reply thrown away (the connection
  is reset instead): the client cannot tell whether its request took effect.

Everything else is forwarded as it is. ``log`` records every request (method, path, action).
"""

from __future__ import annotations

import re
import socket
import socketserver
import struct
import threading
import time
from dataclasses import dataclass, field

ACTIONS = ("refuse", "503", "400", "501", "stall", "drop_reply")


@dataclass
class Rule:
    action: str
    method: str | None = None
    path: str | None = None  # a regular expression searched in the request target
    times: int | None = 1  # None: every matching request
    stall_s: float = 0.0
    hits: int = 0

    def matches(self, method: str, target: str) -> bool:
        if self.times is not None and self.hits >= self.times:
            return False
        if self.method is not None and method != self.method:
            return False
        return self.path is None or re.search(self.path, target) is not None


@dataclass
class FaultProxy:
    upstream: tuple[str, int]
    rules: list[Rule] = field(default_factory=list)
    log: list[tuple[str, str, str]] = field(default_factory=list)

    def __post_init__(self):
        self._lock = threading.Lock()
        self._stop = threading.Event()
        proxy = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self):
                proxy._serve(self.request)

        self._server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    # ------------------------------------------------------------------ control
    @property
    def url(self) -> str:
        host, port = self._server.server_address
        return f"http://{host}:{port}"

    def start(self) -> FaultProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._server.shutdown()
        self._server.server_close()

    def add(self, action: str, method: str | None = None, path: str | None = None, **kw) -> Rule:
        if action not in ACTIONS:
            raise ValueError(f"unknown action {action!r}; one of {ACTIONS}")
        rule = Rule(action, method, path, **kw)
        with self._lock:
            self.rules.append(rule)
        return rule

    def clear(self) -> None:
        with self._lock:
            self.rules.clear()

    def requests(self, method: str | None = None, path: str | None = None) -> list[tuple]:
        """Logged requests matching ``method`` and the ``path`` expression."""
        with self._lock:
            return [
                entry
                for entry in self.log
                if (method is None or entry[0] == method)
                and (path is None or re.search(path, entry[1]))
            ]

    # ------------------------------------------------------------------ serving
    def _decide(self, method: str, target: str) -> Rule | None:
        with self._lock:
            for rule in self.rules:
                if rule.matches(method, target):
                    rule.hits += 1
                    self.log.append((method, target, rule.action))
                    return rule
            self.log.append((method, target, "forward"))
        return None

    def _serve(self, client: socket.socket) -> None:
        upstream: socket.socket | None = None
        reader = _Reader(client)
        try:
            while not self._stop.is_set():
                head = reader.until(b"\r\n\r\n")
                if not head:
                    return
                method, target, headers = _parse_head(head)
                rule = self._decide(method, target)
                if rule is not None and rule.action == "refuse":
                    return _reset(client)
                if headers.get("expect", "").lower() == "100-continue":
                    client.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
                    head = _without_header(head, b"expect")
                body = reader.body(headers)
                if rule is not None and rule.action in _ERRORS:
                    client.sendall(_ERRORS[rule.action])
                    continue
                if rule is not None and rule.action == "stall":
                    self._stop.wait(rule.stall_s)
                    return _reset(client)
                if upstream is None:
                    upstream = socket.create_connection(self.upstream)
                    upstream_reader = _Reader(upstream)
                upstream.sendall(head + body)
                response = upstream_reader.response(method)
                if rule is not None and rule.action == "drop_reply":
                    return _reset(client)
                client.sendall(response)
        except OSError:
            return
        finally:
            if upstream is not None:
                upstream.close()


def _error_reply(status: str, code: str, message: str) -> bytes:
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>{message}</Message></Error>"
    ).encode()
    return (
        f"HTTP/1.1 {status}\r\nContent-Type: application/xml\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body


_ERRORS = {
    "503": _error_reply("503 Slow Down", "SlowDown", "Please reduce your request rate."),
    "400": _error_reply("400 Bad Request", "InvalidArgument", "Unsupported header If-Match."),
    "501": _error_reply(
        "501 Not Implemented",
        "NotImplemented",
        "A header you provided implies functionality that is not implemented.",
    ),
}


def _reset(sock: socket.socket) -> None:
    """Close with a TCP reset, as a dying peer does (no orderly FIN)."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


def _parse_head(head: bytes) -> tuple[str, str, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    method, target, _ = lines[0].split(" ", 2)
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            name, value = line.split(":", 1)
            headers[name.strip().lower()] = value.strip()
    return method, target, headers


def _without_header(head: bytes, name: bytes) -> bytes:
    lines = head.split(b"\r\n")
    kept = [line for line in lines if not line.lower().startswith(name + b":")]
    return b"\r\n".join(kept)


class _Reader:
    """Buffered reads of HTTP/1.1 messages from a socket."""

    def __init__(self, sock: socket.socket):
        self.sock, self.buf = sock, b""

    def _fill(self) -> bool:
        chunk = self.sock.recv(65536)
        self.buf += chunk
        return bool(chunk)

    def until(self, marker: bytes) -> bytes:
        while marker not in self.buf:
            if not self._fill():
                return b""
        end = self.buf.index(marker) + len(marker)
        out, self.buf = self.buf[:end], self.buf[end:]
        return out

    def exactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            if not self._fill():
                raise ConnectionError("peer closed mid-message")
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def chunked(self) -> bytes:
        out = b""
        while True:
            line = self.until(b"\r\n")
            out += line
            size = int(line.split(b";")[0].strip(), 16)
            if size == 0:
                while True:  # trailers, then the empty line
                    trailer = self.until(b"\r\n")
                    out += trailer
                    if trailer == b"\r\n":
                        return out
            out += self.exactly(size + 2)

    def body(self, headers: dict[str, str]) -> bytes:
        if "chunked" in headers.get("transfer-encoding", "").lower():
            return self.chunked()
        return self.exactly(int(headers.get("content-length", "0")))

    def response(self, method: str) -> bytes:
        head = self.until(b"\r\n\r\n")
        if not head:
            raise ConnectionError("upstream closed")
        status = int(head.split(b" ", 2)[1])
        _, _, headers = _parse_head(b"GET / HTTP/1.1\r\n" + head.split(b"\r\n", 1)[1])
        if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
            return head
        if "chunked" in headers.get("transfer-encoding", "").lower():
            return head + self.chunked()
        if "content-length" in headers:
            return head + self.exactly(int(headers["content-length"]))
        while self._fill():  # no length: the body runs to the close
            pass
        out, self.buf = self.buf, b""
        return head + out


def wait_for(predicate, timeout_s: float, every_s: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(every_s)
    return predicate()
