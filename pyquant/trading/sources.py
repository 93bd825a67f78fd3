"""Intent sources: the Python API, a JSONL file (followed), stdin, and a local HTTP endpoint.

Every source turns its payloads into ``Intent`` objects with ``parse_intent`` and hands them
to an ``IntentSink`` (the ``TradingDesk``). A payload that is not valid JSON or not a valid
intent is recorded as a rejection with its reason (``sink.reject_malformed``) and the source
goes on: no single bad line or request ever stops it. An error raised while deciding one
intent is logged and the source goes on too.

Usage::

    api = ApiSource(desk)                       # Python API
    tasks.create_task(api.run())
    decision = await api.submit({"id": "a1", "symbol": "BTCUSDT", "side": "BUY"})

    tasks.create_task(follow_jsonl(desk, Path("intents.jsonl"), store=store))
    tasks.create_task(read_stdin(desk))

    http = HttpSource(desk, token=secret, port=8089)   # 127.0.0.1 only, Bearer token
    await http.start(); ...; await http.stop()
    # curl -H "Authorization: Bearer $T" http://127.0.0.1:8089/intents
    #      -d '{"id":"a1","symbol":"BTCUSDT","side":"BUY"}'
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from aiohttp import web

from pyquant.errors import ConfigError
from pyquant.trading.intents import Intent, IntentError, parse_intent

logger = logging.getLogger(__name__)

MAX_LINE_BYTES = 64 * 1024
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "::1", "localhost"})


class DecisionLike(Protocol):
    """The guard's decision as sources report it."""

    @property
    def accepted(self) -> bool: ...  # noqa: D102
    @property
    def reason(self) -> str: ...  # noqa: D102
    @property
    def detail(self) -> str: ...  # noqa: D102
    @property
    def position_id(self) -> str | None: ...  # noqa: D102


class IntentSink(Protocol):
    """Where sources deliver intents (``TradingDesk`` satisfies it)."""

    async def submit(self, intent: Intent, *, payload: object = None) -> DecisionLike:
        """Decide one intent (and open its position when accepted)."""
        ...

    def reject_malformed(self, source: str, payload: object, error: IntentError | str) -> None:
        """Record a payload that is not a valid intent."""
        ...


@dataclass(frozen=True, slots=True)
class SourceResult:
    """What became of one payload."""

    intent_id: str | None
    accepted: bool
    reason: str
    detail: str = ""
    position_id: str | None = None

    def as_json(self) -> dict[str, object]:
        """Return the result as a JSON-ready mapping."""
        return {
            "id": self.intent_id,
            "accepted": self.accepted,
            "reason": self.reason,
            "detail": self.detail,
            "position_id": self.position_id,
        }


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


async def deliver(
    sink: IntentSink,
    payload: object,
    *,
    source: str,
    clock: Callable[[], int] = _now_ms,
) -> SourceResult:
    """Parse one decoded payload and hand it to the sink; never raises for bad input."""
    raw_id = payload.get("id") if isinstance(payload, Mapping) else None
    intent_id = None if raw_id is None else str(raw_id)[:64]
    try:
        if not isinstance(payload, Mapping):
            raise IntentError("<payload>", payload, "must be a JSON object")
        intent = parse_intent(payload, source=source, now_ms=clock())
    except IntentError as exc:
        sink.reject_malformed(source, payload, exc)
        return SourceResult(intent_id, False, "invalid", str(exc))
    try:
        decision = await sink.submit(intent, payload=payload)
    except Exception as exc:  # one failing intent must not stop the source
        logger.exception(
            "Intent processing failed intent_id=%s source=%s", intent.intent_id, source
        )
        return SourceResult(intent.intent_id, False, "error", f"{type(exc).__name__}: {exc}")
    return SourceResult(
        intent.intent_id, decision.accepted, decision.reason, decision.detail, decision.position_id
    )


async def deliver_line(
    sink: IntentSink,
    line: bytes | str,
    *,
    source: str,
    clock: Callable[[], int] = _now_ms,
) -> SourceResult | None:
    """Decode one JSONL line and deliver it; blank lines and ``#`` comments return None."""
    text = line.decode("utf-8", "replace") if isinstance(line, bytes) else line
    text = text.strip()
    if not text or text.startswith("#"):
        return None
    if len(text) > MAX_LINE_BYTES:
        detail = f"line of {len(text)} characters exceeds {MAX_LINE_BYTES}"
        sink.reject_malformed(source, text[:256], detail)
        return SourceResult(None, False, "invalid", detail)
    try:
        payload = json.loads(text)
    except json.JSONDecodeError as exc:
        detail = f"malformed JSON: {exc.msg} at column {exc.colno}"
        sink.reject_malformed(source, text, detail)
        return SourceResult(None, False, "invalid", detail)
    return await deliver(sink, payload, source=source, clock=clock)


# ---- Python API -----------------------------------------------------------------------------


class ApiSource:
    """An asyncio queue in front of the sink: ``await submit(intent)`` from any coroutine."""

    def __init__(
        self, sink: IntentSink, *, maxsize: int = 1000, clock: Callable[[], int] = _now_ms
    ) -> None:
        self._sink = sink
        self._clock = clock
        self._queue: asyncio.Queue[tuple[object, asyncio.Future[SourceResult]]] = asyncio.Queue(
            maxsize
        )

    async def submit(self, intent: Intent | Mapping[str, Any]) -> SourceResult:
        """Queue an intent (an ``Intent`` or a payload mapping) and wait for its decision."""
        future: asyncio.Future[SourceResult] = asyncio.get_running_loop().create_future()
        await self._queue.put((intent, future))
        return await future

    def submit_nowait(self, intent: Intent | Mapping[str, Any]) -> asyncio.Future[SourceResult]:
        """Queue an intent without waiting; the future resolves with the decision.

        Raises:
            asyncio.QueueFull: the queue is full (back-pressure).
        """
        future: asyncio.Future[SourceResult] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((intent, future))
        return future

    async def run(self) -> None:
        """Decide queued intents one at a time, forever."""
        while True:
            item, future = await self._queue.get()
            try:
                if isinstance(item, Intent):
                    try:
                        decision = await self._sink.submit(item, payload=None)
                        result = SourceResult(
                            item.intent_id,
                            decision.accepted,
                            decision.reason,
                            decision.detail,
                            decision.position_id,
                        )
                    except Exception as exc:
                        logger.exception("Intent processing failed intent_id=%s", item.intent_id)
                        result = SourceResult(item.intent_id, False, "error", str(exc))
                else:
                    result = await deliver(self._sink, item, source="api", clock=self._clock)
                if not future.done():
                    future.set_result(result)
            finally:
                self._queue.task_done()


# ---- JSONL file and stdin -------------------------------------------------------------------


async def follow_jsonl(
    sink: IntentSink,
    path: Path,
    *,
    follow: bool = True,
    poll_s: float = 0.25,
    store: Any = None,  # noqa: ANN401 - pyquant.store.Store; keeps the read offset across restarts
    clock: Callable[[], int] = _now_ms,
    on_result: Callable[[SourceResult], None] | None = None,
) -> int:
    """Read intents from a JSONL file, then (``follow``) wait for appended lines like ``tail -F``.

    A truncated or replaced file (size below the offset, or another inode) is read again from
    its start. With ``store`` the offset survives a restart, so old lines are not decided
    twice (they would be refused as duplicates anyway). A partial last line is kept until
    its newline arrives.

    Returns:
        The number of lines delivered (when ``follow`` is False).
    """
    key = f"jsonl_offset:{path}"
    inode, offset = -1, 0
    if store is not None:
        saved = store.get_meta(key)
        if saved:
            inode_text, _, offset_text = saved.partition(":")
            inode, offset = int(inode_text), int(offset_text)
    delivered = 0
    pending = b""
    while True:
        found = await asyncio.to_thread(_stat, path)
        if found is None:
            if not follow:
                return delivered
            await asyncio.sleep(poll_s)
            continue
        file_inode, size = found
        if file_inode != inode or size < offset:
            if inode != -1:
                logger.info("Intent file replaced or truncated path=%s", path)
            inode, offset, pending = file_inode, 0, b""
        if size > offset:
            chunk = await asyncio.to_thread(_read_range, path, offset, size)
            offset += len(chunk)
            data = pending + chunk
            *lines, pending = data.split(b"\n")
            for line in lines:
                result = await deliver_line(sink, line, source="jsonl", clock=clock)
                if result is not None:
                    delivered += 1
                    if on_result is not None:
                        on_result(result)
            if store is not None:
                store.set_meta(key, f"{inode}:{offset - len(pending)}")
            continue
        if not follow:
            if pending.strip():
                result = await deliver_line(sink, pending, source="jsonl", clock=clock)
                if result is not None:
                    delivered += 1
            return delivered
        await asyncio.sleep(poll_s)


def _stat(path: Path) -> tuple[int, int] | None:
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return stat.st_ino, stat.st_size


def _read_range(path: Path, start: int, end: int) -> bytes:
    with path.open("rb") as handle:
        handle.seek(start)
        return handle.read(end - start)


async def read_lines(
    sink: IntentSink,
    reader: asyncio.StreamReader,
    *,
    source: str = "stdin",
    clock: Callable[[], int] = _now_ms,
    on_result: Callable[[SourceResult], None] | None = None,
) -> int:
    """Deliver every line of a stream until EOF; return how many were delivered."""
    delivered = 0
    while True:
        try:
            line = await reader.readuntil(b"\n")
        except asyncio.IncompleteReadError as exc:
            line = exc.partial
            if not line:
                return delivered
        except asyncio.LimitOverrunError as exc:
            # Drop the oversized line, report it, keep reading.
            await reader.readexactly(exc.consumed)
            sink.reject_malformed(source, None, f"line longer than {MAX_LINE_BYTES} bytes")
            continue
        result = await deliver_line(sink, line, source=source, clock=clock)
        if result is not None:
            delivered += 1
            if on_result is not None:
                on_result(result)
        if not line.endswith(b"\n"):
            return delivered


async def read_stdin(sink: IntentSink, *, clock: Callable[[], int] = _now_ms) -> int:
    """Deliver intents from standard input, one JSON object per line, until EOF."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=MAX_LINE_BYTES)
    await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(sys.stdin.fileno(), "rb", 0)
    )
    return await read_lines(sink, reader, source="stdin", clock=clock)


# ---- HTTP -----------------------------------------------------------------------------------


class HttpSource:
    """``POST /intents`` on a loopback address, authorized by a bearer token.

    The body is one intent object or a JSON array of them; the answer lists one result per
    intent (``id, accepted, reason, detail, position_id``). ``401`` without the right token
    (compared in constant time), ``400`` for a body that is not JSON, ``413`` past
    ``MAX_LINE_BYTES``. ``GET /health`` answers ``{"ok": true}`` without a token.
    """

    def __init__(
        self,
        sink: IntentSink,
        *,
        token: str,
        host: str = "127.0.0.1",
        port: int = 0,
        clock: Callable[[], int] = _now_ms,
    ) -> None:
        if host not in LOOPBACK_HOSTS:
            raise ConfigError(
                f"intents.http.host was {host!r}: the intent endpoint binds to loopback only"
            )
        if len(token) < 16:
            raise ConfigError(
                "intents.http.token is shorter than 16 characters: use a long random token"
            )
        self._sink = sink
        self._token = token.encode()
        self._host = host
        self._port = port
        self._clock = clock
        self._runner: web.AppRunner | None = None
        self.port: int | None = None

    def _authorized(self, request: web.Request) -> bool:
        header = request.headers.get("Authorization", "")
        scheme, _, presented = header.partition(" ")
        # compare_digest on equal-length inputs is constant time; a wrong scheme still compares.
        ok = hmac.compare_digest(presented.strip().encode(), self._token)
        return ok and scheme.lower() == "bearer"

    async def _post(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return web.json_response({"error": "unauthorized"}, status=401)
        body = await request.read()
        if len(body) > MAX_LINE_BYTES:
            self._sink.reject_malformed(
                "http", None, f"body of {len(body)} bytes exceeds {MAX_LINE_BYTES}"
            )
            return web.json_response({"error": "body too large"}, status=413)
        try:
            payload = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            detail = f"malformed JSON: {exc}"
            self._sink.reject_malformed("http", body.decode("utf-8", "replace")[:512], detail)
            return web.json_response({"error": "invalid", "detail": detail}, status=400)
        items = payload if isinstance(payload, list) else [payload]
        results = [
            await deliver(self._sink, item, source="http", clock=self._clock) for item in items
        ]
        status = 200 if all(r.reason != "invalid" for r in results) else 400
        body_out: object = (
            [r.as_json() for r in results] if isinstance(payload, list) else results[0].as_json()
        )
        return web.json_response(body_out, status=status)

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    async def start(self) -> int:
        """Bind and serve; return the bound port."""
        app = web.Application(client_max_size=MAX_LINE_BYTES * 2)
        app.router.add_post("/intents", self._post)
        app.router.add_get("/health", self._health)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self._port)
        await site.start()
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        self.port = int(sockets[0].getsockname()[1]) if sockets else self._port
        logger.info("Intent endpoint listening host=%s port=%s", self._host, self.port)
        return self.port

    async def stop(self) -> None:
        """Stop serving."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
