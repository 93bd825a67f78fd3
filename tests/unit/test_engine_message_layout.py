"""The layout of a mark-price message never changes what the engine does (hypothesis).

``ExitEngine.on_mark_message`` reads a message written as Binance writes it (compact,
keys ``e E s p`` first, then the others) on its fast paths, and any other spelling of the
same JSON (whitespace, another key order) with the general reader. Two engines with the
same positions get the same updates, one in Binance's layout and one re-spelled; they must
emit the same actions and end in the same snapshot, and a bad price must fail both with
the same error text. The messages are long enough for the fast window path (it needs
192 bytes after an update's event time) and carry the extra ``"st"`` key of the real
stream now and then.
"""

from __future__ import annotations

import json
import os
import random
from decimal import Decimal
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pyquant
from pyquant import ExitAction, ExitEngine, ExitPolicy

START = {
    "BTCUSDT": Decimal("30000.0"),
    "ETHUSDT": Decimal("2000.00"),
    "DOGEUSDT": Decimal("0.160000"),
    "SOLUSDT": Decimal("150.0000"),
    "XRPUSDT": Decimal("2.1000"),
}
T0 = 1_764_000_000_000
EXAMPLES = int(os.environ.get("PYQUANT_FUZZ_EXAMPLES", "40"))
POLICY: dict[str, Any] = {
    "stop_atr": 2.0,
    "min_stop_pct": 0.003,
    "max_stop_pct": 0.05,
    "ladder": [(1.0, 0.3), (2.0, 0.3), (3.0, 0.4)],
    "breakeven_after_level": 1,
    "ratchet_to_previous_level": True,
    "trail_atr": 2.0,
    "trail_activate_r": 1.5,
}
BAD_PRICES = ["0", "-1.5", "1e5", "NaN", "1.2.3", ""]


def binance_text(update: dict[str, Any]) -> str:
    """One update exactly as Binance writes it (the engine's fast paths)."""
    extra = ',"st":1' if update["st"] else ""
    return (
        f'{{"e":"markPriceUpdate","E":{update["E"]},"s":"{update["s"]}","p":"{update["p"]}",'
        f'"i":"{update["p"]}","P":"{update["p"]}","r":"-0.00038167","T":{update["E"] + 1}'
        f"{extra}}}"
    )


def respelled(update: dict[str, Any], rng: random.Random) -> dict[str, Any]:
    """The same update as a dict in a shuffled key order (the general reader's path)."""
    fields: dict[str, Any] = {
        "e": "markPriceUpdate",
        "E": update["E"],
        "s": update["s"],
        "p": update["p"],
        "i": update["p"],
        "P": update["p"],
        "r": "-0.00038167",
        "T": update["E"] + 1,
    }
    if update["st"]:
        fields["st"] = 1
    keys = list(fields)
    rng.shuffle(keys)
    return {k: fields[k] for k in keys}


def build(exchange_rules: pyquant.ExchangeRules) -> ExitEngine:
    engine = ExitEngine(exchange_rules, ExitPolicy(**POLICY))
    for symbol, price in START.items():
        p = float(price)
        engine.warm_up(symbol, [p * 1.002] * 20, [p * 0.998] * 20, [p] * 20)
    engine.open_position("btc-l", "BTCUSDT", "LONG", "0.010", "30000.0", leverage=5)
    engine.open_position("btc-s", "BTCUSDT", "SHORT", "0.010", "30000.0", leverage=5)
    engine.open_position("eth-l", "ETHUSDT", "LONG", "0.100", "2000.00", leverage=5)
    engine.open_position("doge-s", "DOGEUSDT", "SHORT", "2000", "0.160000", leverage=5)
    engine.open_position("sol-l", "SOLUSDT", "LONG", "1", "150.0000", leverage=5)
    return engine


def outcome(engine: ExitEngine, data: bytes) -> tuple[str, list[tuple[Any, ...]]]:
    """("ok", actions) or ("error", the error text); pending actions are confirmed."""
    try:
        actions = engine.on_mark_message(data)
    except pyquant.PyquantError as exc:
        return ("error", [(type(exc).__name__, str(exc))])
    for action in engine.pending_actions():
        engine.confirm(action)
    return ("ok", [as_tuple(a) for a in actions])


def as_tuple(action: ExitAction) -> tuple[Any, ...]:
    return (
        action.position_id,
        action.reason,
        action.side,
        action.quantity,
        action.trigger_price,
        action.mark_price,
        action.sequence,
        action.event_time_ms,
    )


message_plans = st.lists(
    st.tuples(
        st.lists(
            st.tuples(
                st.sampled_from(sorted(START)),
                st.integers(-300, 300),  # move in basis points
                st.integers(0, 8),  # decimals written
                st.booleans(),  # extra "st" key
            ),
            min_size=1,
            max_size=12,
        ),
        st.integers(0, 5_000),  # event time step
        st.sampled_from([*[None] * 12, *BAD_PRICES]),  # now and then a bad price
        st.booleans(),  # combined-stream wrapper
    ),
    min_size=1,
    max_size=25,
)


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(plans=message_plans, seed=st.integers(0, 2**32 - 1))
def test_the_layout_of_a_message_changes_nothing(
    exchange_rules: pyquant.ExchangeRules,
    plans: list[tuple[list[tuple[str, int, int, bool]], int, str | None, bool]],
    seed: int,
) -> None:
    rng = random.Random(seed)
    binance, general = build(exchange_rules), build(exchange_rules)
    prices = dict(START)
    time_ms = T0
    for updates, step, bad_price, wrapped in plans:
        time_ms += step
        items = []
        for symbol, move_bp, decimals, extra in updates:
            moved = prices[symbol] * (1 + Decimal(move_bp) / 10_000)
            prices[symbol] = max(moved, Decimal("0.0001"))
            text = f"{prices[symbol]:.{decimals}f}"
            if Decimal(text) <= 0:
                text = "0.0001"
            items.append({"E": time_ms, "s": symbol, "p": text, "st": extra})
        if bad_price is not None:
            items[rng.randrange(len(items))]["p"] = bad_price
        compact = "[" + ",".join(binance_text(u) for u in items) + "]"
        spelled: Any = [respelled(u, rng) for u in items]
        if wrapped:
            compact = f'{{"stream":"!markPrice@arr@1s","data":{compact}}}'
            spelled = {"data": spelled, "stream": "!markPrice@arr@1s"}
        pretty = json.dumps(spelled, indent=rng.choice([None, 1, 2]), separators=None)
        ours = outcome(binance, compact.encode())
        theirs = outcome(general, pretty.encode())
        assert ours == theirs, (compact, pretty)
    assert binance.snapshot() == general.snapshot()


def test_the_real_stream_s_extra_key_changes_nothing(
    exchange_rules: pyquant.ExchangeRules,
) -> None:
    """The captured sample's ``"st":1`` (contract §7.2) changes nothing, rules fired."""
    with_key, without = build(exchange_rules), build(exchange_rules)
    reasons = []
    for i, price in enumerate(["30100.0", "29000.0", "28500.0", "32000.0", "33500.5"]):
        time_ms = T0 + 1_000 * (i + 1)
        items = [
            {"E": time_ms, "s": s, "p": price if s == "BTCUSDT" else str(p), "st": True}
            for s, p in START.items()
        ]
        a = "[" + ",".join(binance_text(u) for u in items) + "]"
        b = "[" + ",".join(binance_text({**u, "st": False}) for u in items) + "]"
        ours = outcome(with_key, a.encode())
        assert ours == outcome(without, b.encode())
        reasons += [action[1] for action in ours[1]]
    assert with_key.snapshot() == without.snapshot()
    # 29000 is below the BTCUSDT long's stop and past the short's whole ladder.
    assert "stop_loss" in reasons, reasons
