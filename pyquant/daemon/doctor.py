"""``pyquant doctor``: check an account and its venue before pyquant is trusted with money.

Each check ends ``OK``, ``WARN`` or ``FAIL`` with what was found and, for anything not OK,
what to do. The checks, in order (contract sections in brackets):

* **connectivity**: ``GET /fapi/v1/ping`` answers [1.1].
* **clock skew**: offset of the venue's ``serverTime`` from this machine's clock, measured
  at the request's midpoint. pyquant's client corrects for it, but a clock that drifts by
  more than ``recvWindow`` between resyncs gets signed requests refused (-1021) [1.6].
* **API key**: a signed call is accepted (``accountConfig``); ``GET
  /sapi/v1/account/apiRestrictions`` where the venue serves it (mainnet: the wallet host;
  the futures testnet does not): futures enabled (FAIL otherwise), withdrawals enabled or no
  IP restriction (WARN).
* **position mode / Multi-Assets mode**: from ``GET /fapi/v1/accountConfig`` [2.5]. The mode
  is reported; with ``--expect-position-mode`` a different one FAILs. Multi-Assets on FAILs:
  it changes margin and PnL currency, and the daemon refuses to start with it.
* **symbols**: each configured symbol is ``TRADING`` (``exchangeInfo``), its leverage from
  ``symbolConfig`` and the configured ``entries.leverage`` are within the first
  ``leverageBracket``, its margin type matches ``entries.margin_type`` (WARN otherwise: the
  daemon sets it before the first entry, which fails while a position is open) [2.2, 2.5].
* **websocket routes**: the market route delivers a mark-price message; the user route
  connects with a fresh listenKey and delivers an event (the doctor sets a symbol's leverage
  to its current value, which emits ``ACCOUNT_CONFIG_UPDATE``). When a route is refused and
  the legacy host works, that is a WARN naming the URL to configure; Binance's testnet
  routing is unconfirmed (contract 10) and this is how it shows [1.1, 7.1, 8.1].
* **listenKey**: create, keepalive, close [8.1].
* **test orders** (only with ``--place-test-orders``): on the first symbol, far from the
  market and without opening a position: a ``closePosition`` ``STOP_MARKET`` algo order (the
  backstop); a second close-all in the same direction, which Binance refuses with -4130 [2.5];
  the tightening of the replacement scheme, a sized stop (``quantity`` + ``reduceOnly`` in
  one-way, ``positionSide`` + ``quantity`` in hedge) placed before the close-all is
  cancelled; each looked up by ``clientAlgoId`` (``GET /fapi/v1/algoOrder`` finds cancelled
  ones too) and cancelled. Whatever the doctor placed is cancelled on the way out.

The result is a table (rich) or, with ``--json``, one JSON object; exit status 0 when no
check FAILed, 1 otherwise, 2 for a bad command line or configuration.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict, dataclass, field
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal
from typing import Any, Literal

import orjson
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus, WebSocketException

from pyquant.config import Config, load_config
from pyquant.errors import ConfigError, ExchangeError, OrderRejected
from pyquant.exchange.client import BinanceClient
from pyquant.exchange.streams import mark_price_url

__all__ = ["Check", "DoctorOptions", "Report", "run_command", "run_doctor"]

Status = Literal["OK", "WARN", "FAIL"]

# Where GET /sapi/v1/account/apiRestrictions is served: Binance's wallet host, not fapi.
# The futures testnet has no wallet API, so its key permissions cannot be read there.
WALLET_URLS: dict[str, str] = {"mainnet": "https://api.binance.com"}
CLOCK_OK_MS = 1000
WS_WAIT_S = 10.0


@dataclass(frozen=True, slots=True)
class Check:
    """One line of the report."""

    name: str
    status: Status
    detail: str
    fix: str = ""


@dataclass(slots=True)
class Report:
    """Every check, in the order run."""

    venue: str
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when no check failed."""
        return all(c.status != "FAIL" for c in self.checks)

    def add(self, name: str, status: Status, detail: str, fix: str = "") -> Check:
        """Record a check and return it."""
        check = Check(name, status, detail, fix)
        self.checks.append(check)
        return check

    def to_json(self) -> dict[str, Any]:
        """The report as plain data (``--json``)."""
        return {"venue": self.venue, "ok": self.ok, "checks": [asdict(c) for c in self.checks]}


@dataclass(frozen=True, slots=True)
class DoctorOptions:
    """What to check beyond the defaults.

    Attributes:
        place_test_orders: place and cancel far-from-market algo orders.
        expect_position_mode: FAIL when the account is in another mode (None: report only).
        wallet_url: base URL serving ``/sapi/v1/account/apiRestrictions``; None: the
            exchange's (mainnet: the wallet host; testnet: none; custom/sim: the REST URL).
        ws_wait_s: how long a websocket may take to deliver its first message.
    """

    place_test_orders: bool = False
    expect_position_mode: Literal["one-way", "hedge"] | None = None
    wallet_url: str | None = None
    ws_wait_s: float = WS_WAIT_S


@dataclass(frozen=True, slots=True)
class Endpoints:
    """The URLs and keys the checks use."""

    rest_url: str
    market_ws_url: str
    user_ws_url: str
    legacy_ws_url: str
    wallet_url: str
    api_key: str
    api_secret: str
    label: str


@dataclass(slots=True)
class _SymbolRules:
    status: str
    tick: Decimal
    step: Decimal
    min_qty: Decimal
    min_notional: Decimal


class _Doctor:
    def __init__(
        self, config: Config, ends: Endpoints, options: DoctorOptions, report: Report
    ) -> None:
        self.config = config
        self.ends = ends
        self.options = options
        self.report = report
        self.client = BinanceClient(
            ends.rest_url,
            ends.api_key,
            ends.api_secret,
            recv_window_ms=config.venue.recv_window_ms,
            timeout_s=config.venue.timeout_s,
        )
        self.symbols = list(config.market.symbols)
        self.rules: dict[str, _SymbolRules] = {}
        self.hedge: bool | None = None
        self.leverage: dict[str, int] = {}

    # ------------------------------------------------------------------ helpers

    async def _get(self, path: str, params: dict[str, str] | None = None) -> Any:  # noqa: ANN401
        return await self.client.request("GET", path, params or {}, signed=True)

    # ------------------------------------------------------------------ checks

    async def run(self) -> None:
        async with self.client:
            if not await self.connectivity():
                return
            await self.clock()
            if not await self.signed_access():
                return
            await self.permissions()
            await self.account_modes()
            await self.symbol_checks()
            await self.market_stream()
            await self.user_stream()
            await self.listen_key()
            if self.options.place_test_orders:
                await self.test_orders()

    async def connectivity(self) -> bool:
        started = time.monotonic()
        try:
            await self.client.request("GET", "/fapi/v1/ping")
        except ExchangeError as exc:
            self.report.add(
                "connectivity",
                "FAIL",
                f"GET {self.ends.rest_url}/fapi/v1/ping failed: {exc}",
                "check venue.rest_url, the network and the venue's status page",
            )
            return False
        ms = (time.monotonic() - started) * 1000
        self.report.add("connectivity", "OK", f"{self.ends.rest_url} answered ping in {ms:.0f} ms")
        return True

    async def clock(self) -> None:
        sent = time.time()
        body = await self.client.request("GET", "/fapi/v1/time")
        received = time.time()
        offset = int(body["serverTime"]) - int((sent + received) * 500)
        window = self.config.venue.recv_window_ms
        text = f"venue clock is {offset:+d} ms from this machine's (round trip "
        text += f"{(received - sent) * 1000:.0f} ms, recvWindow {window} ms)"
        fix = "synchronise this machine's clock (NTP: timedatectl set-ntp true / chronyd)"
        if abs(offset) < CLOCK_OK_MS:
            self.report.add("clock skew", "OK", text)
        elif abs(offset) < window:
            self.report.add(
                "clock skew",
                "WARN",
                text + "; pyquant measures and corrects the offset, but a drifting clock "
                "gets requests refused (-1021) between resyncs",
                fix,
            )
        else:
            self.report.add(
                "clock skew",
                "FAIL",
                text + "; beyond recvWindow, any request stamped with this clock is refused "
                "(-1021) until the offset is measured again",
                fix,
            )

    async def signed_access(self) -> bool:
        try:
            self.account_config = await self._get("/fapi/v1/accountConfig")
        except ExchangeError as exc:
            if exc.code in (-2014, -2015, -1022):
                self.report.add(
                    "API key",
                    "FAIL",
                    f"signed GET /fapi/v1/accountConfig refused: {exc}",
                    "check the key and secret, the key's IP list and that it has futures "
                    "permission (API Management)",
                )
                return False
            self.report.add(
                "API key",
                "FAIL",
                f"GET /fapi/v1/accountConfig failed: {exc}",
                "the venue does not serve accountConfig; pyquant needs it to read the "
                "position and Multi-Assets modes",
            )
            return False
        if not self.account_config.get("canTrade", True):
            self.report.add(
                "API key",
                "FAIL",
                "accountConfig says canTrade=false",
                "enable futures trading for this account and key",
            )
            return True
        self.report.add("API key", "OK", "signed requests accepted; canTrade=true")
        return True

    async def permissions(self) -> None:
        url = self.ends.wallet_url
        name = "key permissions"
        if not url:
            self.report.add(
                name,
                "WARN",
                "this venue serves no /sapi/v1/account/apiRestrictions (the futures testnet "
                "has no wallet API): permissions not checked",
                "check in API Management that the key has futures on, withdrawals off and an "
                "IP restriction",
            )
            return
        wallet = BinanceClient(
            url,
            self.ends.api_key,
            self.ends.api_secret,
            recv_window_ms=self.config.venue.recv_window_ms,
            timeout_s=self.config.venue.timeout_s,
        )
        try:
            async with wallet:
                body = await wallet.request(
                    "GET", "/sapi/v1/account/apiRestrictions", {}, signed=True
                )
        except ExchangeError as exc:
            served = exc.http_status != 404
            self.report.add(
                name,
                "WARN",
                f"GET {url}/sapi/v1/account/apiRestrictions "
                + ("failed: " + str(exc) if served else "is not served by this venue")
                + ": permissions not checked",
                "check in API Management that the key has futures on, withdrawals off and an "
                "IP restriction",
            )
            return
        if not body.get("enableFutures", False):
            self.report.add(
                name,
                "FAIL",
                "the key has futures disabled (enableFutures=false)",
                "enable 'Futures' for this key in API Management (a key created before the "
                "futures account was opened cannot: create a new key)",
            )
            return
        warnings = []
        if body.get("enableWithdrawals", False):
            warnings.append("withdrawals are enabled (enableWithdrawals=true)")
        if not body.get("ipRestrict", False):
            warnings.append("the key has no IP restriction (ipRestrict=false)")
        if warnings:
            self.report.add(
                name,
                "WARN",
                "futures enabled, but " + " and ".join(warnings),
                "in API Management: turn 'Enable Withdrawals' off and restrict the key to "
                "this machine's IP addresses; pyquant needs only reading and futures trading",
            )
        else:
            self.report.add(name, "OK", "futures enabled, withdrawals disabled, IP-restricted")

    async def account_modes(self) -> None:
        config = self.account_config
        self.hedge = bool(config.get("dualSidePosition", False))
        mode = "hedge" if self.hedge else "one-way"
        expected = self.options.expect_position_mode
        if expected is not None and expected != mode:
            self.report.add(
                "position mode",
                "FAIL",
                f"the account is in {mode} mode; {expected} was expected",
                f"switch to {expected} mode (Preferences > Position Mode, or POST "
                "/fapi/v1/positionSide/dual; only with no open position or order), or run "
                f"the doctor with --expect-position-mode {mode}",
            )
        else:
            self.report.add(
                "position mode", "OK", f"{mode} mode (dualSidePosition={str(self.hedge).lower()})"
            )
        multi = config.get("multiAssetsMargin", False)
        if (
            multi is True or str(multi).lower() == "true"
        ) and self.config.router.allow_multi_assets:
            self.report.add(
                "Multi-Assets mode",
                "WARN",
                "Multi-Assets mode is on and [router] allow_multi_assets = true lets the daemon "
                "run: margin and PnL are counted across assets, which pyquant's margin and loss "
                "caps do not model",
                "switch to Single-Asset mode unless you mean it",
            )
        elif multi is True or str(multi).lower() == "true":
            self.report.add(
                "Multi-Assets mode",
                "FAIL",
                "Multi-Assets mode is on: margin and PnL are counted across assets, which "
                "pyquant's margin and loss caps do not model",
                "switch to Single-Asset mode (Preferences > Asset Mode, or POST "
                "/fapi/v1/multiAssetsMargin multiAssetsMargin=false); the daemon refuses to "
                "start otherwise, unless [router] allow_multi_assets = true",
            )
        else:
            self.report.add("Multi-Assets mode", "OK", "single-asset mode")

    async def symbol_checks(self) -> None:
        if not self.symbols:
            self.report.add(
                "symbols",
                "WARN",
                "no [market] symbols configured: the daemon follows every symbol, none checked",
                "list the symbols you trade in [market] symbols",
            )
            return
        info = orjson.loads(await self.client.exchange_info())
        by_name = {s["symbol"]: s for s in info.get("symbols", [])}
        configs = {r["symbol"]: r for r in await self._get("/fapi/v1/symbolConfig")}
        brackets_raw = await self._get("/fapi/v1/leverageBracket")
        brackets = {
            b["symbol"]: b for b in (brackets_raw if isinstance(brackets_raw, list) else [])
        }
        want_leverage = self.config.entries.leverage
        want_margin = self.config.entries.margin_type
        for symbol in self.symbols:
            name = f"symbol {symbol}"
            raw = by_name.get(symbol)
            if raw is None:
                self.report.add(
                    name, "FAIL", "not listed by exchangeInfo", "remove it from [market] symbols"
                )
                continue
            self.rules[symbol] = _rules_of(raw)
            if raw.get("status") != "TRADING":
                self.report.add(
                    name,
                    "FAIL",
                    f"status {raw.get('status')!r}, not TRADING",
                    "remove it from [market] symbols until it trades again",
                )
                continue
            problems: list[tuple[Status, str, str]] = []
            cfg = configs.get(symbol)
            tiers = brackets.get(symbol, {}).get("brackets", [])
            max_lev = max((int(t["initialLeverage"]) for t in tiers), default=0)
            if cfg is None:
                problems.append(("FAIL", "symbolConfig has no row for it", "contact the venue"))
            else:
                lev = int(cfg["leverage"])
                self.leverage[symbol] = lev
                if max_lev and lev > max_lev:
                    problems.append(
                        (
                            "FAIL",
                            f"leverage {lev} above the bracket maximum {max_lev}",
                            f"set leverage <= {max_lev} (POST /fapi/v1/leverage)",
                        )
                    )
                if cfg.get("marginType") != want_margin:
                    problems.append(
                        (
                            "WARN",
                            f"margin type {cfg.get('marginType')} (config: {want_margin})",
                            f"the daemon sets {want_margin} before its first entry, which "
                            "fails while a position is open: change it now if one is",
                        )
                    )
            if max_lev and want_leverage > max_lev:
                problems.append(
                    (
                        "FAIL",
                        f"entries.leverage {want_leverage} above the bracket maximum {max_lev}",
                        f"set entries.leverage <= {max_lev}",
                    )
                )
            if not max_lev:
                problems.append(("WARN", "leverageBracket has no row for it", ""))
            summary = (
                f"TRADING, leverage {self.leverage.get(symbol, '?')} (max {max_lev or '?'}), "
                f"margin {cfg.get('marginType') if cfg else '?'}"
            )
            if not problems:
                self.report.add(name, "OK", summary)
                continue
            status: Status = "FAIL" if any(p[0] == "FAIL" for p in problems) else "WARN"
            self.report.add(
                name,
                status,
                summary + "; " + "; ".join(p[1] for p in problems),
                "; ".join(p[2] for p in problems if p[2]),
            )

    async def _first_message(
        self, url: str, trigger: Callable[[], Awaitable[None]] | None = None
    ) -> tuple[str, str]:
        """Connect and wait for one message: ("ok"|"refused"|"silent"|"error", detail)."""
        try:
            async with connect(url, open_timeout=self.options.ws_wait_s) as ws:
                if trigger is not None:
                    await trigger()
                try:
                    data = await asyncio.wait_for(ws.recv(), self.options.ws_wait_s)
                except TimeoutError:
                    return "silent", f"connected, no message within {self.options.ws_wait_s:g} s"
                text = data if isinstance(data, str) else data.decode("utf-8", "replace")
                return "ok", text[:120]
        except InvalidStatus as exc:
            return "refused", f"handshake refused with HTTP {exc.response.status_code}"
        except (OSError, TimeoutError, WebSocketException) as exc:
            return "error", f"{type(exc).__name__}: {exc}"

    async def _route_check(
        self,
        name: str,
        route_url: str,
        legacy_url: str,
        setting: str,
        trigger: Callable[[], Awaitable[None]] | None = None,
        silence_note: str = "",
    ) -> None:
        outcome, detail = await self._first_message(route_url, trigger)
        if outcome == "ok":
            self.report.add(name, "OK", f"{_redact_key(route_url)} delivered: {detail}")
            return
        if outcome == "silent" and silence_note:
            self.report.add(name, "WARN", f"{_redact_key(route_url)}: {detail}", silence_note)
            return
        tried = f"{_redact_key(route_url)}: {detail}"
        if legacy_url:
            legacy_outcome, legacy_detail = await self._first_message(legacy_url, trigger)
            if legacy_outcome == "ok":
                self.report.add(
                    name,
                    "WARN",
                    f"{tried}; the legacy host {_redact_key(legacy_url)} delivered",
                    f"pyquant falls back to the legacy host by itself; to skip the refused "
                    f"route set venue.{setting} to the legacy base",
                )
                return
            tried += f"; legacy {_redact_key(legacy_url)}: {legacy_detail}"
        self.report.add(
            name,
            "FAIL",
            tried,
            f"set venue.{setting} (and venue.legacy_ws_url) to a websocket base this venue "
            "serves; check firewalls for outbound websockets",
        )

    async def market_stream(self) -> None:
        symbols = self.symbols[:1]
        base = self.ends.market_ws_url
        legacy = self.ends.legacy_ws_url
        await self._route_check(
            "market websocket",
            mark_price_url(base, symbols),
            mark_price_url(legacy, symbols) if legacy else "",
            "ws_url",
        )

    async def user_stream(self) -> None:
        try:
            key = await self.client.create_listen_key()
        except ExchangeError as exc:
            self.report.add(
                "user websocket",
                "FAIL",
                f"no listenKey: {exc}",
                "the key needs futures permission (USER_STREAM)",
            )
            return

        async def emit_event() -> None:
            # Setting a symbol's leverage to its current value changes nothing and emits
            # ACCOUNT_CONFIG_UPDATE, an event the user stream must deliver.
            symbol = next(iter(self.leverage), None)
            if symbol is not None:
                await self.client.set_leverage(symbol, self.leverage[symbol])

        base = self.ends.user_ws_url.rstrip("/")
        legacy = self.ends.legacy_ws_url.rstrip("/")
        await self._route_check(
            "user websocket",
            f"{base}/ws/{key}",
            f"{legacy}/ws/{key}" if legacy else "",
            "user_ws_url",
            emit_event if self.leverage else None,
            silence_note="the route accepted the listenKey but no event arrived: either no "
            "symbol was configured to provoke one, or this venue emits no "
            "ACCOUNT_CONFIG_UPDATE for an unchanged leverage (unconfirmed on Binance); watch "
            "for order events on the first trade",
        )

    async def listen_key(self) -> None:
        steps = (
            ("create", self.client.create_listen_key),
            ("keepalive", self.client.keepalive_listen_key),
            ("close", self.client.close_listen_key),
        )
        for step, call in steps:
            try:
                await call()
            except ExchangeError as exc:
                self.report.add(
                    "listenKey",
                    "FAIL",
                    f"{step} failed: {exc}",
                    "the key needs futures permission; retry later if the venue is overloaded",
                )
                return
        self.report.add("listenKey", "OK", "create, keepalive and close answered")

    async def test_orders(self) -> None:
        name = "test orders"
        symbol = next((s for s in self.symbols if s in self.rules), None)
        if symbol is None or self.hedge is None:
            self.report.add(
                name, "FAIL", "no tradable configured symbol to test on", "configure [market]"
            )
            return
        rules = self.rules[symbol]
        premium = await self.client.premium_index(symbol)
        row = premium[0] if isinstance(premium, list) else premium
        mark = Decimal(str(row["markPrice"]))
        stamp = str(int(time.time() * 1000))
        placed: list[str] = []
        leg = {"positionSide": "LONG"} if self.hedge else {}
        base = {
            "symbol": symbol,
            "side": "SELL",
            "type": "STOP_MARKET",
            "workingType": "MARK_PRICE",
            **leg,
        }
        close_all_id = f"pqdoc-{stamp}-a"
        close_all_price = _quantize(mark / 2, rules.tick, ROUND_FLOOR)
        steps: list[str] = []
        try:
            try:
                await self.client.new_algo_order(
                    {
                        **base,
                        "closePosition": "true",
                        "triggerPrice": _wire(close_all_price),
                        "clientAlgoId": close_all_id,
                    }
                )
            except OrderRejected as exc:
                if exc.code != -4130:
                    raise
                self.report.add(
                    name,
                    "WARN",
                    f"a close-all SELL stop already rests on {symbol} (-4130): not tested",
                    "a running daemon's backstop is probably there: run the test orders on "
                    "another symbol (first in [market] symbols) or with the daemon stopped",
                )
                return
            placed.append(close_all_id)
            steps.append(f"close-all STOP_MARKET placed at {_wire(close_all_price)}")
            verdict: Status = "OK"
            notes: list[str] = []
            second_id = f"pqdoc-{stamp}-b"
            try:
                await self.client.new_algo_order(
                    {
                        **base,
                        "closePosition": "true",
                        "triggerPrice": _wire(_quantize(mark * Decimal("0.55"), rules.tick)),
                        "clientAlgoId": second_id,
                    }
                )
                placed.append(second_id)
                verdict = "WARN"
                notes.append(
                    "the venue accepted a second close-all stop in one direction (Binance "
                    "refuses it with -4130): this venue does not behave like Binance here"
                )
            except OrderRejected as exc:
                if exc.code != -4130:
                    raise
                steps.append("a second close-all was refused with -4130, as on Binance")
            sized_id = f"pqdoc-{stamp}-c"
            sized_price = _quantize(mark * Decimal("0.6"), rules.tick, ROUND_FLOOR)
            quantity = _min_quantity(rules, sized_price)
            sized = {**base, "quantity": _wire(quantity), "triggerPrice": _wire(sized_price)}
            if not self.hedge:
                sized["reduceOnly"] = "true"
            try:
                await self.client.new_algo_order({**sized, "clientAlgoId": sized_id})
                placed.append(sized_id)
                steps.append(
                    f"tightened: sized stop of {_wire(quantity)} placed at {_wire(sized_price)}"
                )
            except OrderRejected as exc:
                if exc.code != -2022:
                    raise
                self.report.add(
                    name,
                    "WARN",
                    "; ".join(steps) + f"; the sized stop was refused without a position: {exc}",
                    "the venue accepts a sized stop only beside a position: the tightening "
                    "step (sized stop before the close-all is cancelled) could not be proven "
                    "here and is exercised only with a position open",
                )
                return
            for cid in (close_all_id, sized_id):
                found = await self.client.get_algo_order(symbol, cid)
                if found is None or found.get("algoStatus") != "NEW":
                    raise _TestOrderError(f"lookup of {cid} by clientAlgoId found {found!r}")
            await self.client.cancel_algo_order(symbol, close_all_id)
            placed.remove(close_all_id)
            steps.append("close-all cancelled after the sized stop rested")
            await self.client.cancel_algo_order(symbol, sized_id)
            placed.remove(sized_id)
            for cid in (close_all_id, sized_id):
                gone = await self.client.get_algo_order(symbol, cid)
                if gone is None or gone.get("algoStatus") != "CANCELED":
                    raise _TestOrderError(
                        f"after the cancel, GET /fapi/v1/algoOrder?clientAlgoId={cid} found "
                        f"{gone!r} (expected algoStatus CANCELED)"
                    )
            steps.append("both found by clientAlgoId before and after their cancel")
            self.report.add(
                name,
                verdict,
                "; ".join(steps + notes),
                "" if verdict == "OK" else "treat this venue's stop handling with care",
            )
        except (ExchangeError, _TestOrderError) as exc:
            self.report.add(
                name,
                "FAIL",
                "; ".join([*steps, f"failed: {exc}"]),
                "the backstop cannot be placed or replaced on this account: fix the cause "
                "before running the daemon with router.backstop on",
            )
        finally:
            for cid in placed:
                with contextlib.suppress(ExchangeError):
                    await self.client.cancel_algo_order(symbol, cid)


class _TestOrderError(Exception):
    """A test order was not where the doctor expected it."""


def _rules_of(raw: dict[str, Any]) -> _SymbolRules:
    filters = {f["filterType"]: f for f in raw.get("filters", [])}
    return _SymbolRules(
        status=str(raw.get("status", "")),
        tick=Decimal(filters.get("PRICE_FILTER", {}).get("tickSize", "0.01")),
        step=Decimal(filters.get("LOT_SIZE", {}).get("stepSize", "0.001")),
        min_qty=Decimal(filters.get("LOT_SIZE", {}).get("minQty", "0.001")),
        min_notional=Decimal(filters.get("MIN_NOTIONAL", {}).get("notional", "5")),
    )


def _quantize(value: Decimal, step: Decimal, rounding: str = ROUND_FLOOR) -> Decimal:
    return (value / step).to_integral_value(rounding=rounding) * step.normalize()


def _wire(value: Decimal) -> str:
    """Decimal text as Binance wants it: plain digits, never an exponent."""
    text = format(value, "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


def _min_quantity(rules: _SymbolRules, price: Decimal) -> Decimal:
    """The smallest lot that clears MIN_NOTIONAL at ``price`` (with one step to spare)."""
    by_notional = _quantize(rules.min_notional / price, rules.step, ROUND_CEILING) + rules.step
    return max(rules.min_qty, by_notional)


def _redact_key(url: str) -> str:
    """A user-stream URL without its listenKey (a bearer credential for the stream)."""
    head, sep, tail = url.rpartition("/ws/")
    if sep and tail and "@" not in tail and not tail.startswith("!"):
        return f"{head}/ws/<listenKey>"
    return url


def endpoints_for(config: Config, options: DoctorOptions) -> Endpoints:
    """The URLs and keys of a non-simulator configuration.

    Raises:
        ConfigError: no API key or secret.
    """
    key, secret = config.credentials.api_key, config.credentials.api_secret
    if key is None or secret is None:
        raise ConfigError(f"exchange {config.exchange!r} needs an API key and secret")
    wallet = options.wallet_url
    if wallet is None:
        wallet = WALLET_URLS.get(
            config.exchange, config.rest_url if config.exchange == "custom" else ""
        )
    return Endpoints(
        rest_url=config.rest_url,
        market_ws_url=config.ws_url,
        user_ws_url=config.user_ws_url,
        legacy_ws_url=config.legacy_ws_url,
        wallet_url=wallet,
        api_key=key.reveal(),
        api_secret=secret.reveal(),
        label=f"{config.exchange} {config.rest_url}",
    )


@contextlib.asynccontextmanager
async def _venue(config: Config, options: DoctorOptions) -> AsyncIterator[Endpoints]:
    if config.exchange != "sim":
        yield endpoints_for(config, options)
        return
    from pyquant import sim as sim_module

    async with sim_module.serve(
        data=list(config.sim.data) or None,
        speed=config.sim.speed,
        position_mode=config.sim.position_mode,
        balance=config.sim.balance_usdt,
        seed=config.sim.seed,
    ) as venue:
        ws = venue.ws_url.rstrip("/")
        yield Endpoints(
            rest_url=venue.rest_url,
            market_ws_url=f"{ws}/market",
            user_ws_url=f"{ws}/private",
            legacy_ws_url=ws,
            wallet_url=options.wallet_url if options.wallet_url is not None else venue.rest_url,
            api_key=venue.api_key,
            api_secret=venue.api_secret,
            label=f"built-in simulator {venue.rest_url}",
        )


async def run_doctor(config: Config, options: DoctorOptions | None = None) -> Report:
    """Run every check against the configured venue and return the report.

    Never raises for a venue problem: each one is a FAIL line.

    Raises:
        ConfigError: the configuration names no usable credentials.
    """
    options = options or DoctorOptions()
    async with _venue(config, options) as ends:
        report = Report(venue=ends.label)
        doctor = _Doctor(config, ends, options, report)
        try:
            await doctor.run()
        except ExchangeError as exc:
            report.add(
                "venue",
                "FAIL",
                f"the checks stopped on an unexpected answer: {exc}",
                "retry; if it persists, the venue is not Binance-compatible here",
            )
        return report


def render(report: Report) -> None:
    """Print the report as a table on stdout."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"pyquant doctor: {report.venue}", show_lines=True)
    table.add_column("check", no_wrap=True)
    table.add_column("result", no_wrap=True)
    table.add_column("found")
    table.add_column("what to do")
    colour = {"OK": "green", "WARN": "yellow", "FAIL": "bold red"}
    for c in report.checks:
        table.add_row(c.name, f"[{colour[c.status]}]{c.status}[/]", c.detail, c.fix)
    console = Console(width=max(120, Console().width))
    console.print(table)
    failed = sum(c.status == "FAIL" for c in report.checks)
    warned = sum(c.status == "WARN" for c in report.checks)
    console.print(
        f"{len(report.checks)} checks: {failed} failed, {warned} warnings"
        + ("" if failed else " - nothing blocks trading")
    )


def _parser(command: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=f"pyquant {command}",
        description="Check an account and its venue before pyquant trades on it.",
    )
    p.add_argument("--config", required=True, help="the daemon's TOML configuration")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument(
        "--place-test-orders",
        action="store_true",
        help="place and cancel far-from-market stop orders (no position is opened)",
    )
    p.add_argument(
        "--expect-position-mode",
        choices=("one-way", "hedge"),
        help="fail when the account is in the other position mode",
    )
    p.add_argument(
        "--wallet-url",
        help="base URL serving /sapi/v1/account/apiRestrictions "
        "(default: mainnet's wallet host; none on testnet; the REST URL for custom venues)",
    )
    p.add_argument(
        "--i-understand-mainnet",
        action="store_true",
        help="allow --place-test-orders on mainnet without venue.confirm_mainnet",
    )
    return p


def run_command(command: str, argv: list[str]) -> int:
    """Entry point of ``pyquant doctor``; returns 0 (no FAIL), 1 (a FAIL) or 2 (usage)."""
    args = _parser(command).parse_args(argv)
    try:
        # Read-only checks need no mainnet confirmation; placing orders does.
        config = load_config(
            args.config,
            confirm_mainnet=not args.place_test_orders or args.i_understand_mainnet,
        )
        options = DoctorOptions(
            place_test_orders=args.place_test_orders,
            expect_position_mode=args.expect_position_mode,
            wallet_url=args.wallet_url,
        )
        report = asyncio.run(run_doctor(config, options))
    except ConfigError as exc:
        print(f"pyquant {command}: {exc}", file=sys.stderr)
        return 2
    if args.json:
        sys.stdout.write(json.dumps(report.to_json(), indent=2) + "\n")
    else:
        render(report)
    return 0 if report.ok else 1
