"""A burst of events-stream documents as one short, plain-text message.

Lines are grouped by symbol in arrival order. Exits carry their reason and quantity, and the
realized PnL of the fills that came with them (summed, exact decimals); a ladder of five
fills is one message with one line per exit and the total. Nothing secret is in a document,
so nothing secret can reach a message.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from decimal import Decimal, InvalidOperation
from typing import Any

from pyquant.notify.documents import classify


def _dec(value: object) -> Decimal | None:
    try:
        return Decimal(str(value))
    except (InvalidOperation, ValueError):
        return None


def _signed(value: Decimal) -> str:
    text = format(value.normalize() if value != 0 else Decimal(0), "f")
    return text if value < 0 else f"+{text}"


def _line(document: Mapping[str, Any], event: str) -> str | None:
    p: Mapping[str, Any] = document.get("payload") or {}
    kind = document.get("type")
    if event == "entry_filled":
        price = f" @ {p['entry_price']}" if p.get("entry_price") else ""
        verb = "opened" if p.get("action") == "opened" else "adopted"
        return f"{verb} {p.get('position_side')} {p.get('quantity')}{price}"
    if event == "exit_filled" and kind == "exit":
        return f"exit {p.get('reason')} {p.get('position_side')} {p.get('quantity')}"
    if event == "intent_rejected":
        if kind == "decision":
            detail = p.get("detail") or p.get("reason")
            return f"intent {p.get('intent_id')} {p.get('side')} rejected: {detail}"
        return f"intent rejected ({p.get('stream') or 'input'}): {p.get('reason')}"
    if event == "order_refused":
        return (
            f"{p.get('kind', 'order')} order {p.get('side')} {p.get('quantity')} refused by the "
            f"exchange: {p.get('error_code')} {p.get('error_msg') or ''}".rstrip()
        )
    if event == "no_exchange_stop":
        if kind == "order":
            return (
                f"{p.get('position_side')} leg has no exchange stop: backstop refused "
                f"{p.get('error_code')} {p.get('error_msg') or ''}".rstrip()
            )
        return f"{p.get('position_side', '')} leg has no exchange stop: {p.get('reason', '')}"
    if event == "flatten":
        if kind == "order":
            return f"kill switch: closing {p.get('position_side')} {p.get('quantity')}"
        return f"kill switch: {p.get('position_side')} leg closed"
    if event == "daemon":
        extra = f" ({p['dropped']} events dropped)" if p.get("dropped") else ""
        return f"daemon {document.get('daemon_id')} {p.get('action')}{extra}"
    if event == "feed_down":
        if p.get("action") == "feed_restored":
            return f"market feed restored after {p.get('down_s')} s"
        return f"market feed down for {p.get('down_s')} s"
    if event == "daily_summary":
        return (
            f"{p.get('day')}: {p.get('entries', 0)} entries, {p.get('exits', 0)} exits, "
            f"{p.get('rejections', 0)} rejections, realized PnL {p.get('realized_pnl', '0')} USDT"
        )
    return None


def render(documents: Sequence[Mapping[str, Any]], *, dropped: int = 0) -> str:
    """Return the message of one burst (documents in arrival order).

    Args:
        documents: the burst.
        dropped: messages this target lost since its last one (queue full or undeliverable).
    """
    groups: dict[str, list[str]] = {}
    pnl: dict[str, Decimal] = {}
    for document in documents:
        event = classify(document)
        if event is None:
            continue
        key = str(document.get("symbol") or "")
        if document.get("type") == "fill":
            value = _dec((document.get("payload") or {}).get("realized_pnl"))
            if value is not None:
                pnl[key] = pnl.get(key, Decimal(0)) + value
            groups.setdefault(key, [])
            continue
        line = _line(document, event)
        lines = groups.setdefault(key, [])
        # a flatten order's NEW and FILLED say the same: once is enough
        if line is not None and not (event == "flatten" and line in lines):
            lines.append(line)
    out: list[str] = []
    for key, lines in groups.items():
        head = key or "pyquant"
        if key in pnl:
            lines = [*lines, f"realized PnL {_signed(pnl[key])} USDT"]
        if not lines:
            continue
        if len(lines) == 1:
            out.append(f"{head}: {lines[0]}")
        else:
            out.append(f"{head}:")
            out.extend(f"  {line}" for line in lines)
    if dropped:
        out.append(f"({dropped} earlier notification(s) dropped: queue full or undeliverable)")
    return "\n".join(out)
