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
import stat
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from aiohttp import web

from pyquant.errors import ConfigError, PyquantError
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


def _id_of(payload: object) -> str | None:
    # The id a rejection is filed under, if the payload carries a readable one.
    raw_id = payload.get("id") if isinstance(payload, Mapping) else None
    if isinstance(raw_id, str):
        return raw_id[:64]
    if isinstance(raw_id, int) and not isinstance(raw_id, bool) and raw_id.bit_length() < 200:
        return str(raw_id)
    return None


def _reject(sink: IntentSink, source: str, payload: object, error: IntentError | str) -> None:
    # Recording a rejection must not end the source either (a full disk is logged).
    try:
        sink.reject_malformed(source, payload, error)
    except Exception:
        logger.exception("Rejection not recorded source=%s error=%s", source, error)


async def deliver(
    sink: IntentSink,
    payload: object,
    *,
    source: str,
    clock: Callable[[], int] = _now_ms,
) -> SourceResult:
    """Parse one decoded payload and hand it to the sink; never raises for bad input."""
    intent_id = _id_of(payload)
    try:
        if not isinstance(payload, Mapping):
            raise IntentError("<payload>", type(payload).__name__, "must be a JSON object")
        intent = parse_intent(payload, source=source, now_ms=clock())
    except IntentError as exc:
        _reject(sink, source, payload, exc)
        return SourceResult(intent_id, False, "invalid", str(exc))
    except Exception as exc:  # any other failure to read one payload is its rejection too
        detail = f"unreadable intent: {type(exc).__name__}"
        _reject(sink, source, payload, detail)
        return SourceResult(intent_id, False, "invalid", detail)
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


def decode_json(data: bytes | str) -> object:
    """Decode one JSON document, or raise ``IntentError`` saying why it is not one.

    Besides malformed JSON this covers what ``json.loads`` raises outside ``JSONDecodeError``:
    nesting too deep for the parser (``RecursionError``) and integers longer than Python's
    4300-digit limit (``ValueError``).
    """
    try:
        return json.loads(data)
    except json.JSONDecodeError as exc:
        raise IntentError(
            "<payload>", None, f"malformed JSON: {exc.msg} at column {exc.colno}"
        ) from None
    except RecursionError:
        raise IntentError("<payload>", None, "malformed JSON: nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise IntentError("<payload>", None, f"malformed JSON: {exc}"[:200]) from None


def _too_long(length: int) -> str:
    return f"line of {length} bytes exceeds {MAX_LINE_BYTES}: rejected whole"


async def deliver_line(
    sink: IntentSink,
    line: bytes | str,
    *,
    source: str,
    clock: Callable[[], int] = _now_ms,
) -> SourceResult | None:
    """Decode one JSONL line and deliver it; blank lines and ``#`` comments return None."""
    data = line.encode("utf-8", "replace") if isinstance(line, str) else line
    if len(data) > MAX_LINE_BYTES:
        detail = _too_long(len(data))
        _reject(sink, source, data[:256].decode("utf-8", "replace"), detail)
        return SourceResult(None, False, "invalid", detail)
    text = data.decode("utf-8", "replace").strip()
    if not text or text.startswith("#"):
        return None
    try:
        payload = decode_json(text)
    except IntentError as exc:
        _reject(sink, source, text, exc.rule)
        return SourceResult(None, False, "invalid", exc.rule)
    return await deliver(sink, payload, source=source, clock=clock)


@dataclass(frozen=True, slots=True)
class Line:
    """One line cut from a byte stream.

    Attributes:
        data: the line without its newline; None when it was longer than the limit (the
            whole line is dropped, never a tail of it).
        length: the line's length in bytes.
        end: the stream offset just past its newline.
    """

    data: bytes | None
    length: int
    end: int


class LineSplitter:
    """Cuts a byte stream into lines of at most ``max_bytes``.

    An over-long line is dropped whole: its bytes are skipped up to its newline and it is
    reported once (``Line.data`` None), so no tail of it is ever read as a line of its own.
    Memory stays within ``max_bytes`` plus one chunk however long the line.
    """

    def __init__(self, max_bytes: int = MAX_LINE_BYTES, *, start: int = 0) -> None:
        self.max_bytes = max_bytes
        self._buffer = bytearray()
        self._skipped = 0  # bytes of an over-long line dropped so far (0: not in one)
        self._start = start  # stream offset of the buffer's first byte

    @property
    def offset(self) -> int:
        """Return the stream offset just past the last complete line."""
        return self._start

    def feed(self, data: bytes) -> list[Line]:
        """Add bytes; return the complete lines they finish, in order."""
        lines: list[Line] = []
        self._buffer += data
        while True:
            newline = self._buffer.find(b"\n")
            if newline < 0:
                if len(self._buffer) > self.max_bytes:
                    self._skipped += len(self._buffer)
                    self._start += len(self._buffer)
                    self._buffer.clear()
                return lines
            consumed = newline + 1
            end = self._start + consumed
            length = self._skipped + newline
            if self._skipped or newline > self.max_bytes:
                lines.append(Line(None, length, end))
            else:
                lines.append(Line(bytes(self._buffer[:newline]), length, end))
            self._skipped = 0
            del self._buffer[:consumed]
            self._start = end

    def finish(self) -> Line | None:
        """Return the last line when the stream ends without a newline (None if empty)."""
        if not self._buffer and not self._skipped:
            return None
        length = self._skipped + len(self._buffer)
        data = None if self._skipped else bytes(self._buffer)
        end = self._start + len(self._buffer)
        self._buffer.clear()
        self._skipped = 0
        self._start = end
        return Line(data, length, end)


async def deliver_cut_line(
    sink: IntentSink,
    line: Line,
    *,
    source: str,
    clock: Callable[[], int] = _now_ms,
) -> SourceResult | None:
    """Deliver one line from a ``LineSplitter`` (an over-long one is a rejection)."""
    if line.data is None:
        detail = _too_long(line.length)
        _reject(sink, source, None, detail)
        return SourceResult(None, False, "invalid", detail)
    return await deliver_line(sink, line.data, source=source, clock=clock)


class SourceStopped(PyquantError):
    """An intent source failed again and again: the daemon stops rather than run deaf."""


async def supervise(
    name: str,
    start: Callable[[], Awaitable[object]],
    *,
    max_failures: int = 5,
    window_s: float = 60.0,
    backoff_s: float = 0.5,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    monotonic: Callable[[], float] = time.monotonic,
) -> None:
    """Run an intent source; restart it when it fails, and fail loudly when it keeps failing.

    A source that returns (stdin at EOF, a file read without follow) ends normally. One that
    raises is logged with its traceback and started again after ``backoff_s`` (doubling per
    failure); ``max_failures`` failures within ``window_s`` raise ``SourceStopped``, which
    ends the daemon with that error instead of leaving it running without its intake.

    Raises:
        SourceStopped: the source failed ``max_failures`` times within ``window_s``.
    """
    failures: list[float] = []
    while True:
        try:
            await start()
        except Exception as exc:
            now = monotonic()
            failures = [t for t in failures if now - t < window_s] + [now]
            if len(failures) >= max_failures:
                logger.critical(
                    "Intent source failed %d times in %.0f s, stopping the daemon "
                    "source=%s error=%s",
                    len(failures),
                    window_s,
                    name,
                    exc,
                )
                raise SourceStopped(
                    f"intent source {name} failed {len(failures)} times within "
                    f"{window_s:.0f} s; last error: {type(exc).__name__}: {exc}"
                ) from exc
            delay = backoff_s * 2 ** (len(failures) - 1)
            logger.error(
                "Intent source failed, restarting source=%s error=%s: %s retry_in_s=%.1f",
                name,
                type(exc).__name__,
                exc,
                delay,
                exc_info=exc,
            )
            await sleep(delay)
            continue
        logger.info("Intent source ended source=%s", name)
        return


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


def check_intents_file(path: Path) -> None:
    """Refuse an intents file that another local user could write (and so trade with).

    The file must not be writable by others, nor lie in a directory that others may write
    without the sticky bit (they could replace it). A file that does not exist yet is fine:
    it is checked again when it appears.

    Raises:
        ConfigError: names the file, its mode and what to run.
    """
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        mode = None
    except OSError as exc:
        raise ConfigError(f"sources.jsonl {path}: cannot be read ({exc})") from None
    if mode is not None and mode & stat.S_IWOTH:
        raise ConfigError(
            f"sources.jsonl {path} is writable by every local user (mode "
            f"{stat.S_IMODE(mode):o}), so any of them could trade: run 'chmod o-w {path}'"
        )
    parent = path.parent
    try:
        parent_mode = parent.stat().st_mode
    except OSError:
        return
    if parent_mode & stat.S_IWOTH and not parent_mode & stat.S_ISVTX:
        raise ConfigError(
            f"sources.jsonl {path} lies in {parent}, which every local user may write "
            f"(mode {stat.S_IMODE(parent_mode):o}, no sticky bit): they could replace the "
            "file; move it or run 'chmod o-w' on the directory"
        )


JSONL_READ_CHUNK = 1 << 20


async def follow_jsonl(
    sink: IntentSink,
    path: Path,
    *,
    follow: bool = True,
    poll_s: float = 0.25,
    store: Any = None,  # noqa: ANN401 - pyquant.trading.journal.Store; keeps the read offset across restarts
    clock: Callable[[], int] = _now_ms,
    on_result: Callable[[SourceResult], None] | None = None,
) -> int:
    """Read intents from a JSONL file, then (``follow``) wait for appended lines like ``tail -F``.

    A truncated or replaced file (size below the offset, or another inode) is read again from
    its start. With ``store`` the offset is saved after every decided line, so a restart
    (even after ``kill -9``) goes on at the first line not yet decided: at most the line in
    hand is read again, and the guard tells a decided one from one whose entry was never
    sent. A partial last line is kept until its newline arrives; a line longer than
    ``MAX_LINE_BYTES`` is rejected whole. While the file is writable by other users it is
    not read (an error is logged; reading resumes once it is fixed).

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
    splitter = LineSplitter(start=offset)
    insecure: str | None = None

    async def hand_over(line: Line) -> None:
        nonlocal delivered
        result = await deliver_cut_line(sink, line, source="jsonl", clock=clock)
        if store is not None:
            store.set_meta(key, f"{inode}:{line.end}")
        if result is not None:
            delivered += 1
            if on_result is not None:
                on_result(result)

    while True:
        found = await asyncio.to_thread(_stat, path)
        if found is None:
            if not follow:
                return delivered
            await asyncio.sleep(poll_s)
            continue
        try:
            await asyncio.to_thread(check_intents_file, path)
        except ConfigError as exc:
            if not follow:
                raise
            if insecure != str(exc):
                logger.error("Intent file not read error=%s", exc)
                insecure = str(exc)
            await asyncio.sleep(poll_s)
            continue
        if insecure is not None:
            logger.info("Intent file readable again path=%s", path)
            insecure = None
        file_inode, size = found
        if file_inode != inode or size < offset:
            if inode != -1:
                logger.info("Intent file replaced or truncated path=%s", path)
            inode, offset = file_inode, 0
            splitter = LineSplitter(start=0)
        if size > offset:
            chunk = await asyncio.to_thread(
                _read_range, path, offset, min(size, offset + JSONL_READ_CHUNK)
            )
            if not chunk:
                await asyncio.sleep(poll_s)
                continue
            offset += len(chunk)
            for line in splitter.feed(chunk):
                await hand_over(line)
            continue
        if not follow:
            last = splitter.finish()
            if last is not None:
                await hand_over(last)
            return delivered
        await asyncio.sleep(poll_s)


def _stat(path: Path) -> tuple[int, int] | None:
    try:
        found = path.stat()
    except FileNotFoundError:
        return None
    return found.st_ino, found.st_size


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
    """Deliver every line of a stream until EOF; return how many were delivered.

    A line longer than ``MAX_LINE_BYTES`` is rejected whole (once), never in pieces.
    """
    delivered = 0
    splitter = LineSplitter()

    async def hand_over(line: Line) -> None:
        nonlocal delivered
        result = await deliver_cut_line(sink, line, source=source, clock=clock)
        if result is not None:
            delivered += 1
            if on_result is not None:
                on_result(result)

    while True:
        chunk = await reader.read(JSONL_READ_CHUNK)
        if not chunk:
            last = splitter.finish()
            if last is not None:
                await hand_over(last)
            return delivered
        for line in splitter.feed(chunk):
            await hand_over(line)


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
            payload = decode_json(body)
        except IntentError as exc:
            detail = exc.rule
            _reject(self._sink, "http", body.decode("utf-8", "replace")[:512], detail)
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
