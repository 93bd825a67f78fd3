"""kill -9 of a real trading process while its exit's outcome is unknown, then restart.

A child process runs the trading core (desk, real ExitEngine, SQLite journal) against the
simulator served by this test. Its take-profit exit executes on the venue but the reply is
lost (the connection drops) and the order stays invisible to queries for a moment, so the
child sits in its lookup pause with the order journalled as UNKNOWN: then it is killed with
SIGKILL. The restarted core resolves the order by lookup, confirms the fill into the restored
engine when the engine emits the same action again, and sends nothing twice.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import textwrap
from decimal import Decimal
from pathlib import Path

import pytest

import pyquant
from pyquant.exchange.client import BinanceClient
from pyquant.trading.desk import DeskConfig, TradingDesk
from pyquant.trading.guard import GuardConfig
from pyquant.trading.journal import Store
from pyquant.trading.recovery import reconcile
from pyquant.trading.router import RouterConfig
from pyquant.trading.sizing import SizingConfig

sim = pytest.importorskip("pyquant.sim")

ROOT = Path(__file__).resolve().parents[2]

CHILD = textwrap.dedent(
    """
    import asyncio, json, sys
    from decimal import Decimal
    import pyquant
    from pyquant.exchange.client import BinanceClient
    from pyquant.trading.recovery import reconcile
    from pyquant.trading.journal import Store
    from pyquant.trading.desk import DeskConfig, TradingDesk
    from pyquant.trading.guard import GuardConfig
    from pyquant.trading.intents import parse_intent
    from pyquant.trading.router import RouterConfig
    from pyquant.trading.sizing import SizingConfig

    async def main(rest, key, secret, path):
        async with BinanceClient(rest, key, secret) as client:
            rules = pyquant.ExchangeRules.from_exchange_info(await client.exchange_info())
            engine = pyquant.ExitEngine(rules, pyquant.ExitPolicy.preset("standard"))
            config = DeskConfig(
                guard=GuardConfig(max_age_ms=10**12),
                sizing=SizingConfig(method="notional", notional_usd=Decimal("3000")),
                router=RouterConfig(lookup_delays_s=(60.0,)),
            )
            desk = TradingDesk(client, Store.open(path), rules, engine, config)
            await reconcile(desk)
            intent = parse_intent({"id": "k1", "symbol": "BTCUSDT", "side": "BUY",
                                   "leverage": 10}, source="t", now_ms=client.now_ms())
            decision = await desk.submit(intent)
            print("OPEN", decision.position_id, flush=True)
            line = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
            message = line.strip().encode()
            desk.on_actions(engine.on_mark_message(message))
            await desk.drain()
            print("DONE", flush=True)

    asyncio.run(main(*sys.argv[1:5]))
    """
)


def mark(price: str, at_ms: int) -> str:
    return json.dumps(
        {
            "e": "markPriceUpdate",
            "E": at_ms,
            "s": "BTCUSDT",
            "p": price,
            "i": price,
            "P": price,
            "r": "0",
            "T": at_ms,
        }
    )


async def test_kill9_with_exit_outcome_unknown_then_restart(tmp_path: Path) -> None:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    state = tmp_path / "state.sqlite"
    async with sim.serve(speed=0, position_mode="hedge", symbols=["BTCUSDT"]) as venue:
        await venue.set_mark("BTCUSDT", "30000.0")
        child = await asyncio.create_subprocess_exec(
            sys.executable,
            str(script),
            venue.rest_url,
            venue.api_key,
            venue.api_secret,
            str(state),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            cwd=str(ROOT),
        )
        assert child.stdin is not None
        assert child.stdout is not None
        try:
            line = await asyncio.wait_for(child.stdout.readline(), 60)
            assert line.startswith(b"OPEN "), line
            pid = line.split()[1].decode()
            orders_before = len(venue.order_log.orders)
            # the exit executes, its reply is lost, and lookups miss for 2 s
            venue.set_faults(
                order_error_rate=1.0,
                order_error="drop",
                execute_share=1.0,
                visibility_delay_ms=2000,
            )
            await venue.set_mark("BTCUSDT", "30460.0")
            message = mark("30460.0", venue.clock.now_ms())
            child.stdin.write(message.encode() + b"\n")
            await child.stdin.drain()
            for _ in range(600):
                if len(venue.order_log.orders) > orders_before:
                    break
                await asyncio.sleep(0.01)
            assert len(venue.order_log.orders) == orders_before + 1
            await asyncio.sleep(0.3)  # the child is in its 60 s lookup pause now
            assert child.returncode is None
            os.kill(child.pid, signal.SIGKILL)
            await child.wait()
        finally:
            if child.returncode is None:
                child.kill()
                await child.wait()
        venue.set_faults()
        exit_order = venue.order_log.orders[-1]
        assert exit_order["side"] == "SELL"

        async with BinanceClient(venue.rest_url, venue.api_key, venue.api_secret) as client:
            rules = pyquant.ExchangeRules.from_exchange_info(await client.exchange_info())
            policy = pyquant.ExitPolicy.preset("standard")
            config = DeskConfig(
                guard=GuardConfig(max_age_ms=10**12),
                sizing=SizingConfig(method="notional", notional_usd=Decimal("3000")),
                router=RouterConfig(lookup_delays_s=(1.0, 2.0)),
            )
            desk = TradingDesk(
                client, Store.open(state), rules, pyquant.ExitEngine(rules, policy), config
            )
            report = await reconcile(
                desk, restore=lambda data: pyquant.ExitEngine.restore(data, rules)
            )
            ((cid, resolved),) = report.orders_resolved.items()
            assert resolved == "FILLED"
            assert exit_order["clientOrderId"] == cid
            assert report.positions_adopted == []
            sent = len(venue.order_log.orders)
            # the restored engine emits the same take profit again: confirmed, not resent
            actions = desk.engine.on_mark_message(message.encode())
            assert [(a.reason, a.sequence) for a in actions] == [("take_profit_1", 1)]
            desk.on_actions(actions)
            await desk.drain()
            assert len(venue.order_log.orders) == sent
            view = desk.engine.position(pid)
            assert view.quantity == "0.070"
            assert Decimal(view.stop_price) > Decimal("30000")  # breakeven after TP1
            rows = await client.position_risk()
            live = {r["positionSide"]: Decimal(str(r["positionAmt"])) for r in rows}
            assert live.get("LONG") == Decimal("0.070")
            desk.store.close()
