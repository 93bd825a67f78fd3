"""A local HTTP receiver on 127.0.0.1 that records every request a notifier makes.

Behaviour per request, in order, from ``script`` (then ``default``): ``ok`` (200), ``slow``
(held until ``release()``), ``429`` (Telegram/Discord style body with retry_after 1 s and a
``Retry-After`` header), ``500``, ``400``.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web


@dataclass
class Received:
    path: str
    body: Any
    answered: str


@dataclass
class Receiver:
    script: list[str] = field(default_factory=list)
    default: str = "ok"
    requests: list[Received] = field(default_factory=list)
    pending: int = 0
    port: int = 0
    _release: asyncio.Event = field(default_factory=asyncio.Event)
    _runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def release(self) -> None:
        self._release.set()

    async def _handle(self, request: web.Request) -> web.Response:
        raw = await request.read()
        body = json.loads(raw) if raw else None
        mode = self.script.pop(0) if self.script else self.default
        self.requests.append(Received(request.path, body, mode))
        if mode == "slow":
            self.pending += 1
            try:
                await self._release.wait()
            finally:
                self.pending -= 1
            return web.json_response({"ok": True})
        if mode == "429":
            payload = {"ok": False, "error_code": 429, "parameters": {"retry_after": 1}}
            payload["retry_after"] = 1.0
            return web.json_response(payload, status=429, headers={"Retry-After": "1"})
        if mode in ("500", "400"):
            return web.json_response({"ok": False}, status=int(mode))
        return web.json_response({"ok": True})

    async def __aenter__(self) -> Receiver:
        app = web.Application()
        app.router.add_post("/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._release.set()
        assert self._runner is not None
        await self._runner.cleanup()

    def paths(self) -> list[str]:
        return [r.path for r in self.requests]

    def answered(self) -> Iterable[str]:
        return [r.answered for r in self.requests]


def closed_port_url() -> str:
    """A URL on 127.0.0.1 where nothing listens (a receiver that is down)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}/hook"
