"""What the fake provider servers of the tests share (oracle_server.py for OpenAI, anthropic_server.py).

Engines are tested through the real SDKs and real sockets, so retries, timeouts, connection pools and JSON
shapes are exercised as in production; only the provider is replaced. What does not depend on the provider
lives here once, so both fakes record and fail in exactly the same way: the server's lifecycle on a daemon
thread, the record of every request and of the reply it got, the queue of injected faults with the transport
faults every provider has (a hang, 429 with a retry-after header, any status code), and the count of requests
in flight that concurrency-bound tests read. A subclass adds the provider's wire format: its routes, auth
check, error bodies and answers.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar, Self

STATUS_FAULT = re.compile(r"^[1-5][0-9]{2}$")
"""A fault naming an HTTP status ("500", "400", ...): answer with that status and the provider's error body."""


class FakeServer:
    """A provider's HTTP API on a free port of 127.0.0.1, served on a daemon thread; a context manager.

    Every request is recorded in `.requests` (method, path, lowercased headers, parsed body, then the status
    and JSON it got). `max_in_flight` is the highest number of model requests it was serving at once (those a
    handler serves inside `in_flight()`). Faults are consumed one per model request in arrival order, then
    "ok"; `add_faults` queues more while the server runs.
    """

    thread_name: ClassVar[str] = "fake-server"
    api_root: ClassVar[str] = ""
    """What follows http://127.0.0.1:<port> in `base_url`: the base URL the provider's SDK expects."""

    def __init__(
        self,
        handler: type[FakeHandler],
        *,
        faults: Iterable[str],
        hang_s: float,
        delay_s: float,
        retry_after: str,
        api_key: str | None,
        model: str,
    ) -> None:
        """`handler` serves the provider's routes; the rest are the knobs every fake has (see the subclasses)."""
        self.hang_s = hang_s
        self.delay_s = delay_s
        self.retry_after = retry_after
        self.api_key = api_key
        self.model = model
        self.requests: list[dict[str, Any]] = []
        self.max_in_flight = 0
        self._handler = handler
        self._faults: list[str] = list(faults)
        self._in_flight = 0
        self._served = 0
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------------------------

    def start(self) -> Self:
        """Bind a free port on 127.0.0.1 and serve on a daemon thread."""
        if self._httpd is not None:
            return self
        # a handler class per server, so handlers reach this server without a global
        handler = type(f"{type(self).__name__}Handler", (self._handler,), {"fake": self})
        httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        httpd.daemon_threads = True
        self._httpd = httpd
        self._thread = threading.Thread(
            target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, name=self.thread_name, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving; hanging handlers are released at once."""
        self._stopping.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._httpd = None
        self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._httpd is None:
            raise RuntimeError(f"the {self.thread_name} is not running")
        return int(self._httpd.server_address[1])

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}{self.api_root}"

    # -- test helpers ----------------------------------------------------------------------------------------

    def add_faults(self, *faults: str) -> None:
        with self._lock:
            self._faults.extend(faults)

    # -- request handling (called from handler threads) ------------------------------------------------------

    def _record(self, method: str, path: str, headers: Mapping[str, str], body: Any) -> dict[str, Any]:
        entry: dict[str, Any] = {"method": method, "path": path, "headers": dict(headers), "body": body}
        with self._lock:
            self.requests.append(entry)
        return entry

    def _reply(self, entry: dict[str, Any], status: int, payload: Any) -> None:
        with self._lock:
            entry["status"], entry["response"] = status, payload

    def _next_fault(self) -> str:
        with self._lock:
            return self._faults.pop(0) if self._faults else "ok"

    def _next_serial(self) -> int:
        """Number the answers served (1, 2, ...), for response and tool-call ids unique within a test."""
        with self._lock:
            self._served += 1
            return self._served

    @contextmanager
    def in_flight(self) -> Iterator[None]:
        """Count a model request as in flight while the block runs (for `max_in_flight`)."""
        with self._lock:
            self._in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self._in_flight)
        try:
            yield
        finally:
            with self._lock:
                self._in_flight -= 1


class FakeHandler(BaseHTTPRequestHandler):
    """HTTP/1.1 with keep-alive, as the SDKs' connection pools expect; records, parses and replies in JSON.

    Subclasses route in `_get` and `_post` and name the provider's error body (`error_body`), rate-limit message
    and retry-after header; `fake` is set to the running server by `FakeServer.start`.
    """

    protocol_version = "HTTP/1.1"
    timeout = 10  # idle keep-alive connections end instead of holding a thread forever
    fake: FakeServer
    response_headers: ClassVar[Mapping[str, str]] = {}
    """Headers every response carries (a provider's request id)."""
    rate_limit_message: ClassVar[str] = "Rate limit reached. Slow down."
    retry_after_header: ClassVar[str] = "Retry-After"
    _entry: dict[str, Any] | None = None

    def log_message(self, format: str, *args: Any) -> None:
        """Keep test output quiet."""

    def error_body(self, status: int, message: str) -> dict[str, Any]:
        """The provider's JSON error body for `status`."""
        return {"error": {"message": message}}

    def fault_message(self, status: int) -> str:
        """The error message of an injected status fault."""
        return f"injected {HTTPStatus(status).phrase}"

    # -- routing ---------------------------------------------------------------------------------------------

    def do_GET(self) -> None:
        self._entry = self.fake._record("GET", self.path, self._headers(), None)
        self._get(self._route())

    def do_POST(self) -> None:
        body = self._read_body()
        headers = self._headers()
        self._entry = self.fake._record("POST", self.path, headers, body)
        self._post(self._route(), body, headers)

    def _get(self, path: str) -> None:
        self._not_found()

    def _post(self, path: str, body: Any, headers: Mapping[str, str]) -> None:
        self._not_found()

    def _route(self) -> str:
        """The request path without query string or trailing slash."""
        return self.path.split("?", 1)[0].rstrip("/")

    def _headers(self) -> dict[str, str]:
        return {k.lower(): v for k, v in self.headers.items()}

    def _read_body(self) -> Any:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        return self._parse_body(raw)

    def _parse_body(self, raw: bytes) -> Any:
        """JSON, or the text itself where it is not JSON (a test of a malformed request sees what came)."""
        try:
            return json.loads(raw or b"null")
        except json.JSONDecodeError:
            return raw.decode("utf-8", "replace")

    # -- replies ---------------------------------------------------------------------------------------------

    def _send_json(self, status: int, payload: Any, headers: Mapping[str, str] | None = None) -> None:
        data = json.dumps(payload).encode("utf-8")
        if self._entry is not None:
            self.fake._reply(self._entry, status, payload)
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for name, value in {**self.response_headers, **(headers or {})}.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (a timeout test)
            self.close_connection = True

    def _send_error(self, status: int, message: str, headers: Mapping[str, str] | None = None) -> None:
        self._send_json(status, self.error_body(status, message), headers)

    def _not_found(self) -> None:
        self._send_error(404, f"no route {self.path}")

    def _take_fault(self) -> str:
        """Take the next fault for this model request, after the server's `delay_s`."""
        fault = self.fake._next_fault()
        if self.fake.delay_s:
            time.sleep(self.fake.delay_s)
        return fault

    def _serve_transport_fault(self, fault: str) -> bool:
        """Act out a fault every provider has; True when the request is done with (answered, or cut by stop()).

        "hang" waits `hang_s` and then lets the request be answered normally; "429" answers with the retry-after
        header; a status code answers with the provider's error body. Other faults shape the answer itself.
        """
        fake = self.fake
        if fault == "hang":
            return fake._stopping.wait(fake.hang_s)
        if fault == "429":
            self._send_error(429, self.rate_limit_message, {self.retry_after_header: fake.retry_after})
            return True
        if STATUS_FAULT.match(fault):
            status = int(fault)
            self._send_error(status, self.fault_message(status))
            return True
        return False
