"""Entry -> ladder partials -> breakeven -> trailing -> stop, in both position modes."""

from __future__ import annotations

import asyncio
from decimal import Decimal
from pathlib import Path

import pytest
from pq_harness import run_daemon, simulator, until

SYMBOL = "ETHUSDT"


def filled_exits(running: object) -> list[object]:
    store = running.daemon.desk.store  # type: ignore[attr-defined]
    return [o for o in store.orders(kind="exit") if o.status == "FILLED"]


class StopWatch:
    """Samples the simulator's own view of the leg's stops while the daemon trades.

    At every sample with the leg open (once its first stop is in): at least one stop rests,
    at most one of them is close-all (Binance refuses a second, -4130), at most two at once
    (new placed before old cancelled: algo orders cannot be modified), and the tightest
    trigger never loosens.
    """

    def __init__(self, venue: object, leg: str, mode: str) -> None:
        self.venue = venue
        self.leg = leg
        self.exchange_leg = leg if mode == "hedge" else "BOTH"
        self.tightest: Decimal | None = None
        self.samples = 0
        self.problems: list[str] = []
        self.forms: set[str] = set()

    def sample(self) -> None:
        exchange = self.venue.exchange  # type: ignore[attr-defined]
        amount = exchange.position(SYMBOL, self.exchange_leg).amount
        stops = exchange.open_algo_orders(SYMBOL)
        if amount == 0 or (self.tightest is None and not stops):
            return
        self.samples += 1
        long = self.leg == "LONG"
        if not stops:
            self.problems.append(f"no stop with {amount} open")
            return
        if len(stops) > 2 or sum(1 for s in stops if s.close_position) > 1:
            self.problems.append(f"{len(stops)} stops: {[s.trigger_price for s in stops]}")
        self.forms |= {"close_all" if s.close_position else "sized" for s in stops}
        best = max(s.trigger_price for s in stops) if long else min(s.trigger_price for s in stops)
        if self.tightest is not None and (best < self.tightest if long else best > self.tightest):
            self.problems.append(f"stop loosened {self.tightest} -> {best}")
        self.tightest = best

    async def run(self) -> None:
        # Between every two steps of the other tasks: no state the venue passes through is
        # missed (the simulator runs in this loop).
        while True:
            self.sample()
            await asyncio.sleep(0)


def view(running: object, position_id: str) -> object:
    return running.daemon.engine.position(position_id)  # type: ignore[attr-defined]


async def move(running: object, price: str) -> None:
    venue = running.venue  # type: ignore[attr-defined]
    await venue.step(1000)
    await venue.set_mark(SYMBOL, price)


@pytest.mark.parametrize(
    ("mode", "side"), [("one-way", "BUY"), ("hedge", "SELL"), ("hedge", "BUY"), ("one-way", "SELL")]
)
async def test_entry_ladder_breakeven_trailing_stop(tmp_path: Path, mode: str, side: str) -> None:
    long = side == "BUY"
    leg = "LONG" if long else "SHORT"

    def px(pct: str) -> str:
        # entry 2500.00; a LONG profits upward, a SHORT downward
        delta = Decimal("2500") * Decimal(pct)
        return str(Decimal("2500") + (delta if long else -delta))

    async with simulator(mode) as venue:
        await venue.set_mark(SYMBOL, "2500.00")
        async with run_daemon(venue, tmp_path, router={"backstop_throttle_s": 0.0}) as running:
            daemon = running.daemon
            watch = StopWatch(venue, leg, mode)
            watching = asyncio.ensure_future(watch.run())
            result = await daemon.submit(
                {"id": "life-1", "symbol": SYMBOL, "side": side, "size_usd": "500"}
            )
            assert result.accepted, result
            position_id = result.position_id
            store = daemon.desk.store
            await until(lambda: store.get_position(position_id).status == "open", what="entry fill")
            position = store.get_position(position_id)
            assert position.quantity == "0.2" or Decimal(position.quantity) == Decimal("0.200")
            assert Decimal(position.entry_price) == Decimal("2500.00")
            # initial stop 2 % away; the backstop sits 0.5 % beyond it, on MARK_PRICE
            assert Decimal(view(running, position_id).stop_price) == Decimal(px("-0.02"))
            await until(lambda: len(venue.exchange.open_algo_orders(SYMBOL)) == 1, what="backstop")
            backstop = venue.exchange.open_algo_orders(SYMBOL)[0]
            assert backstop.close_position
            assert backstop.working_type == "MARK_PRICE"

            await move(running, px("0.0101"))  # past level 1 (+1 %)
            await until(lambda: len(filled_exits(running)) == 1, what="take_profit_1")
            await until(
                lambda: view(running, position_id).stop_reason == "breakeven_stop", what="breakeven"
            )
            fee_buffer = Decimal("2500") * Decimal("0.001")
            expected_be = Decimal("2500") + (fee_buffer if long else -fee_buffer)
            assert Decimal(view(running, position_id).stop_price) == expected_be

            await move(running, px("0.0204"))  # past level 2 (+2 %): trailing starts
            await until(lambda: len(filled_exits(running)) == 2, what="take_profit_2")
            await move(running, px("0.04"))  # best 2600 (long) / 2400 (short)
            await until(lambda: view(running, position_id).trailing_active, what="trailing")
            best = Decimal(px("0.04"))
            trail = best * (Decimal("0.99") if long else Decimal("1.01"))
            await until(
                lambda: Decimal(view(running, position_id).stop_price) == trail, what="trail"
            )
            # the backstop follows the tightened stop (replaced, never loosened)
            await until(
                lambda: (
                    any(
                        (a.trigger_price < trail) if long else (a.trigger_price > trail)
                        for a in venue.exchange.open_algo_orders(SYMBOL)
                    )
                    and all(
                        (a.trigger_price > Decimal(px("-0.02")))
                        if long
                        else (a.trigger_price < Decimal(px("-0.02")))
                        for a in venue.exchange.open_algo_orders(SYMBOL)
                    )
                ),
                what="backstop moved",
            )

            watching.cancel()
            assert watch.problems == []
            assert watch.samples > 0
            # tightened at least once: the close-all stop was replaced by a sized one
            assert watch.forms == {"close_all", "sized"}
            await move(running, px("0.025"))  # back through the trailing stop
            await until(
                lambda: store.get_position(position_id).status == "closed", what="trailing stop"
            )
            await until(
                lambda: not venue.exchange.open_algo_orders(SYMBOL), what="backstop cancelled"
            )

            exits = filled_exits(running)
            assert [o.reason for o in exits] == ["take_profit_1", "take_profit_2", "trailing_stop"]
            assert [Decimal(o.params["quantity"]) for o in exits] == [
                Decimal("0.060"),
                Decimal("0.060"),
                Decimal("0.080"),
            ]
            close_side = "SELL" if long else "BUY"
            for order in exits:
                assert order.params["side"] == close_side
                assert order.params["type"] == "MARKET"
                if mode == "hedge":
                    assert order.params["positionSide"] == leg
                    assert "reduceOnly" not in order.params
                else:
                    assert order.params["positionSide"] == "BOTH"
                    assert order.params["reduceOnly"] == "true"
            # the venue agrees: flat, and every order of ours went out exactly once
            assert venue.exchange.position(SYMBOL, leg if mode == "hedge" else "BOTH").amount == 0
            sent = [e["clientOrderId"] for e in venue.order_log.orders]
            assert len(sent) == len(set(sent)) == 4
            summary = await running.stop()
    assert summary["entries"] == 1
    assert summary["exits"] == {"take_profit_1": 1, "take_profit_2": 1, "trailing_stop": 1}
    assert summary["open_positions"] == 0
    assert summary["position_mode"] == mode
    assert Decimal(str(summary["realized_pnl"])) > 0


async def test_metrics_and_dashboard_reflect_the_running_daemon(tmp_path: Path) -> None:
    import io
    import urllib.request

    from rich.console import Console

    from pyquant.daemon.dashboard import render

    async with simulator("hedge") as venue:
        await venue.set_mark(SYMBOL, "2500.00")
        async with run_daemon(venue, tmp_path, metrics_port=0) as running:
            daemon = running.daemon
            result = await daemon.submit(
                {"id": "m-1", "symbol": SYMBOL, "side": "BUY", "size_usd": "500"}
            )
            assert result.accepted
            await until(lambda: daemon.current_summary()["open_positions"] == 1, what="open")
            await venue.step(1000)
            await venue.set_mark(SYMBOL, "2510.00")
            await until(lambda: daemon.position_lines()[0].mark == "2510.00", what="mark seen")
            port = daemon.metrics.port
            await daemon._refresh_status()  # the 1 s timer would do the same
            body = await asyncio.to_thread(
                lambda: (
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5)
                    .read()
                    .decode()
                )
            )
            assert "pyquant_open_positions 1.0" in body
            assert "pyquant_entries_total 1.0" in body
            assert 'pyquant_feed_connected{stream="market"} 1.0' in body
            out = io.StringIO()
            Console(file=out, width=200, color_system=None).print(render(daemon.dashboard_data()))
            text = out.getvalue()
            for expected in (
                "ETHUSDT",
                "LONG",
                "2500.00",
                "2510.00",
                "+2.00",
                "2450.00",
                "2525.00",
                "mode hedge",
                "live",
            ):
                assert expected in text, expected
