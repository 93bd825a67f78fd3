"""Daemon configuration: TOML and environment into frozen, slotted dataclasses.

Sources, later ones winning:

1. the defaults below (the safe ones: the built-in simulator, everything on 127.0.0.1);
2. a TOML file (``pyquant run --config FILE``);
3. environment overrides ``PYQUANT__SECTION__KEY=value``
   (``PYQUANT__ENTRIES__MAX_OPEN_POSITIONS=5``, ``PYQUANT__EXCHANGE=testnet``); a value is
   read as a TOML literal when it parses as one (``5``, ``true``, ``["BTCUSDT"]``) and as
   a plain string otherwise.

Secrets (API key and secret, the HTTP intake token) are never read from the config file:
only from environment variables (names configurable) or from a secrets file readable by
its owner alone. They are held in ``Secret``, whose repr is redacted; ``Config.redacted()``
is what ``--show-config`` prints.

An example (every key is optional; ``pyquant run --show-config`` prints them all)::

    exchange = "testnet"              # "sim" (default) | "testnet" | "mainnet" | "custom"

    [venue]                           # explicit URLs for "custom" (or to override the default)
    # rest_url = "http://127.0.0.1:8080"
    # ws_url = "ws://127.0.0.1:8080/market"
    # user_ws_url = "ws://127.0.0.1:8080/private"
    # legacy_ws_url = "ws://127.0.0.1:8080"  # pre-split host, tried when a route is refused
    # Mainnet's routes (/market, /private) are documented; the testnet's are UNCONFIRMED:
    # the defaults try its /market and /private routes, then its legacy root
    # (wss://fstream.binancefuture.com/ws/...). `pyquant doctor` says which answer.

    [credentials]                     # keys come from these variables (or an owner-only file)
    api_key_env = "PYQUANT_API_KEY"
    api_secret_env = "PYQUANT_API_SECRET"
    # file = "~/.config/pyquant/keys.toml"   # chmod 600: api_key = "...", api_secret = "..."

    [market]
    symbols = ["BTCUSDT", "ETHUSDT"]  # empty: the all-market !markPrice@arr@1s stream

    [entries]
    max_open_positions = 5
    sizing = "risk"                   # or "notional" with notional_usdt
    risk_pct = "0.005"
    leverage = 5

    [sources]
    demo = false
    jsonl = "~/intents.jsonl"         # "-" reads stdin
    http_port = 8089                  # bearer token in $PYQUANT_HTTP_TOKEN

    [exit]
    preset = "standard"               # or "challenge", or "none"; other keys override fields
    trail_pct = 0.02

    [metrics]
    enabled = true
    port = 9108

Validation reports every problem at once, each as ``path: value found: rule``, then the
cross-field checks (mainnet needs an explicit confirmation, the HTTP intake needs a token,
a non-simulator venue needs keys). The exit policy is validated by the Rust
``pyquant.ExitPolicy``; its ``PolicyError`` is passed through, not duplicated here.
"""

from __future__ import annotations

import os
import stat
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields, is_dataclass, replace
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Literal

from pyquant.errors import ConfigError

ExchangeName = Literal["sim", "testnet", "mainnet", "custom"]
PositionModeName = Literal["one-way", "hedge"]

# Binance's published endpoints (contract 1.1); the market route carries markPrice.
# What is known about the websocket routes (contract 1.1, 2.5, 10):
# - mainnet: /market (markPrice, kline) and /private (user data) since 2026-03; the legacy
#   root (wss://fstream.binance.com/ws/...) was retired on 2026-04-23.
# - testnet: UNCONFIRMED. Binance's own connector uses the /market and /private routes on
#   the testnet host; nautilus_trader and node-binance-api still use the legacy root. The
#   defaults below try the routes and fall back to the legacy root when the host refuses the
#   handshake (venue.legacy_ws_url); `pyquant doctor` reports which ones answer.
ENDPOINTS: dict[str, tuple[str, str, str]] = {
    "mainnet": (
        "https://fapi.binance.com",
        "wss://fstream.binance.com/market",
        "wss://fstream.binance.com/private",
    ),
    "testnet": (
        "https://demo-fapi.binance.com",
        "wss://fstream.binancefuture.com/market",
        "wss://fstream.binancefuture.com/private",
    ),
}
# The pre-split single host (paths /ws/<stream> and /ws/<listenKey>): testnet's documented
# websocket URL, and mainnet's until 2026-04-23 (kept as a fallback only).
LEGACY_WS_ENDPOINTS: dict[str, str] = {
    "mainnet": "wss://fstream.binance.com",
    "testnet": "wss://fstream.binancefuture.com",
}


class Secret:
    """A secret string whose repr and str never show it."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        """Return the secret itself, for the one place that needs it."""
        return self._value

    def __repr__(self) -> str:
        return "Secret('********')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True, slots=True)
class VenueConfig:
    """Where the daemon trades.

    Attributes:
        rest_url: REST base URL; empty means the exchange's default.
        ws_url: market websocket base (``.../market``); empty means the default.
        user_ws_url: user-data websocket base (``.../private``); empty means the default.
        legacy_ws_url: the pre-split websocket host (``<base>/ws/...``), tried when the
            market or user route refuses the handshake; empty means the exchange's default,
            ``"none"`` disables the fallback.
        confirm_mainnet: must be true (or ``--i-understand-mainnet``) to trade mainnet.
        recv_window_ms: ``recvWindow`` of signed requests.
        timeout_s: total time allowed for one REST request.
    """

    rest_url: str = ""
    ws_url: str = ""
    user_ws_url: str = ""
    legacy_ws_url: str = ""
    confirm_mainnet: bool = False
    recv_window_ms: int = 5000
    timeout_s: float = 10.0


@dataclass(frozen=True, slots=True)
class SimConfig:
    """The built-in simulator, used when ``exchange = "sim"``.

    Attributes:
        speed: replay speed factor (market seconds per wall-clock second). The default 600
            replays ten market minutes a second, so the demo shows entries, ladder exits,
            trailing and breakeven stops within a minute or two.
        position_mode: the paper account's position mode.
        balance_usdt: the paper account's starting wallet.
        data: kline files to replay; empty means the bundled real data set.
        seed: seed of the intrabar mark-price path.
    """

    speed: float = 600.0
    position_mode: PositionModeName = "one-way"
    balance_usdt: Decimal = Decimal("10000")
    data: tuple[str, ...] = ()
    seed: int = 7


@dataclass(frozen=True, slots=True)
class CredentialsConfig:
    """Where the API keys come from (never from this file itself).

    Attributes:
        api_key_env: environment variable holding the API key.
        api_secret_env: environment variable holding the API secret.
        file: a TOML file with ``api_key`` and ``api_secret``, readable by its owner only.
        api_key: the resolved key (filled in at load time).
        api_secret: the resolved secret (filled in at load time).
    """

    api_key_env: str = "PYQUANT_API_KEY"
    api_secret_env: str = "PYQUANT_API_SECRET"  # noqa: S105 - a variable name
    file: str = ""
    api_key: Secret | None = None
    api_secret: Secret | None = None


@dataclass(frozen=True, slots=True)
class MarketConfig:
    """The mark-price stream.

    Attributes:
        symbols: per-symbol ``<s>@markPrice@1s`` streams; empty means ``!markPrice@arr@1s``.
        stale_after_s: no update for this long marks the feed stale (REST polling starts).
        poll_interval_s: premiumIndex polling interval while stale.
        warmup_bars: closed markPriceKlines per symbol at start and after a gap (98 keeps the
            request, which asks for one more, under limit 100: weight 1 instead of 2).
        warmup_interval: kline interval used when the exit policy names no atr_interval.
        rotate_after_s: reconnect proactively before Binance's 24 h limit.
        backoff_initial_s: first reconnect delay.
        backoff_max_s: reconnect delay cap.
    """

    symbols: tuple[str, ...] = ()
    stale_after_s: float = 10.0
    poll_interval_s: float = 2.0
    warmup_bars: int = 98
    warmup_interval: str = "1m"
    rotate_after_s: float = 23.5 * 3600
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 30.0


@dataclass(frozen=True, slots=True)
class UserStreamConfig:
    """The user-data stream.

    Attributes:
        keepalive_interval_s: listenKey keepalive period (Binance: within 60 minutes).
    """

    keepalive_interval_s: float = 1800.0


@dataclass(frozen=True, slots=True)
class EntriesConfig:
    """Position guard and sizing.

    Attributes:
        max_open_positions: refuse entries beyond this many open positions.
        max_exposure_usdt: refuse entries that would take total notional past this.
        cooldown_s: refuse an entry on a symbol (and side) this soon after an exit.
        max_intent_age_s: refuse intents older than this.
        sizing: ``risk`` (equity x risk_pct / stop distance) or ``notional`` (fixed).
        risk_pct: share of equity risked per position, as a fraction (0.01 = 1 %).
        notional_usdt: fixed notional for ``sizing = "notional"`` and intents without size.
        max_notional_usdt: cap on one entry's notional; 0 means no cap.
        margin_use_pct: at most this fraction of the available margin per entry.
        leverage: default leverage when the intent carries none.
        margin_type: ``CROSSED`` or ``ISOLATED``, set per symbol before the first entry.
    """

    max_open_positions: int = 10
    max_exposure_usdt: Decimal = Decimal("50000")
    cooldown_s: float = 60.0
    max_intent_age_s: float = 30.0
    sizing: Literal["risk", "notional"] = "risk"
    risk_pct: Decimal = Decimal("0.01")
    notional_usdt: Decimal = Decimal("500")
    max_notional_usdt: Decimal = Decimal("0")
    margin_use_pct: Decimal = Decimal("0.5")
    leverage: int = 5
    margin_type: Literal["CROSSED", "ISOLATED"] = "CROSSED"


@dataclass(frozen=True, slots=True)
class RouterConfig:
    """Order routing.

    Attributes:
        backstop: keep an exchange-side closePosition STOP_MARKET behind each position.
        backstop_distance_pct: how far beyond the engine's stop it sits, fraction of price.
        backstop_throttle_s: minimum time between two moves of one backstop.
        shadow: decide and log, send nothing.
        allow_multi_assets: start even when the account is in Multi-Assets mode (margin
            and PnL in several assets; the daemon refuses it otherwise).
    """

    backstop: bool = True
    backstop_distance_pct: Decimal = Decimal("0.005")
    backstop_throttle_s: float = 5.0
    shadow: bool = False
    allow_multi_assets: bool = False


@dataclass(frozen=True, slots=True)
class SourcesConfig:
    """Where intents come from.

    Attributes:
        demo: run the demo producer (24 h change beyond the threshold -> intent).
        demo_interval_s: how often the demo producer reads ticker/24hr.
        demo_threshold_pct: |priceChangePercent| above this gives an intent.
        jsonl: a JSONL file of intents to follow (``-`` reads stdin).
        http_port: local HTTP intake port on 127.0.0.1; 0 disables it.
        http_token_env: environment variable holding the intake's bearer token.
        http_token: the resolved token (filled in at load time).
        redis_url: read intents from a Redis stream and share the account with other
            daemons (``redis://host:port/db?stream=..&group=..&daemon=..``, see
            ``pyquant.scale.bus``); empty: no Redis. A password in it is never shown.
    """

    demo: bool = True
    demo_interval_s: float = 5.0
    demo_threshold_pct: Decimal = Decimal("1")
    jsonl: str = ""
    http_port: int = 0
    http_token_env: str = "PYQUANT_HTTP_TOKEN"  # noqa: S105 - a variable name
    http_token: Secret | None = None
    redis_url: str = ""


@dataclass(frozen=True, slots=True)
class LogConfig:
    """Logging.

    Attributes:
        format: ``text`` or ``json``.
        level: ``DEBUG``, ``INFO``, ``WARNING`` or ``ERROR``.
        file: also write logs to this file; empty means stderr only.
    """

    format: Literal["text", "json"] = "text"
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    file: str = ""


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    """Prometheus metrics, served on 127.0.0.1 only.

    Attributes:
        enabled: serve ``/metrics``.
        port: the port (0 picks a free one).
    """

    enabled: bool = False
    port: int = 9108


NotifyKind = Literal["telegram", "discord", "webhook"]
# What a target can be told; an empty selection means all of them.
NOTIFY_EVENTS: tuple[str, ...] = (
    "entry_filled",
    "exit_filled",
    "intent_rejected",
    "order_refused",
    "no_exchange_stop",
    "flatten",
    "daemon",
    "feed_down",
    "daily_summary",
)
NOTIFY_SECRET_ENV: dict[str, str] = {
    "telegram": "PYQUANT_TELEGRAM_TOKEN",
    "discord": "PYQUANT_DISCORD_WEBHOOK_URL",
    "webhook": "PYQUANT_WEBHOOK_URL",
}


@dataclass(frozen=True, slots=True)
class NotifyTargetConfig:
    """One notification target (``[[notify.targets]]``).

    Attributes:
        kind: ``telegram`` (a bot's ``sendMessage``), ``discord`` (a webhook) or ``webhook``
            (a generic JSON POST of the events-stream documents).
        name: what reports and logs call it (default: the kind).
        secret_env: the environment variable with the bot token (telegram) or the webhook
            URL (discord, webhook), which are secrets; default ``PYQUANT_TELEGRAM_TOKEN``,
            ``PYQUANT_DISCORD_WEBHOOK_URL`` or ``PYQUANT_WEBHOOK_URL``. The owner-only
            ``credentials.file`` may hold it instead, under the same name in lower case.
        chat_id: the Telegram chat to write to.
        base_url: the Telegram Bot API base (default ``https://api.telegram.org``).
        events: which events to send (names in ``NOTIFY_EVENTS``); empty: all.
        timeout_s: longest wait for one delivery.
    """

    kind: NotifyKind = "webhook"
    name: str = ""
    secret_env: str = ""
    chat_id: str = ""
    base_url: str = ""
    events: tuple[str, ...] = ()
    timeout_s: float = 10.0


@dataclass(frozen=True, slots=True)
class NotifyConfig:
    """Notifications to phones and services, delivered off the trading path.

    Attributes:
        targets: the targets, several at once (``[[notify.targets]]`` tables).
        queue_size: messages waiting per target; when full the oldest go, counted.
        coalesce_s: events within this window go out as one message (a ladder of fills).
        max_attempts: tries per message (429 waits its ``retry_after``; 5xx and network
            errors back off exponentially) before it is dropped and counted.
        feed_down_after_s: tell when the market feed has been down this long.
        daily_summary_hour_utc: hour (0-23, UTC) of the daily summary; -1: none.
    """

    targets: tuple[NotifyTargetConfig, ...] = ()
    queue_size: int = 200
    coalesce_s: float = 2.0
    max_attempts: int = 6
    feed_down_after_s: float = 30.0
    daily_summary_hour_utc: int = 0


@dataclass(frozen=True, slots=True)
class DaemonConfig:
    """The process as a whole.

    Attributes:
        state_dir: where the SQLite state lives; empty means a fresh temporary directory.
        snapshot_interval_s: how often the engine snapshot is written to the store.
        duration_s: stop after this many seconds; 0 runs until stopped.
        dashboard: show the terminal dashboard.
    """

    state_dir: str = ""
    snapshot_interval_s: float = 5.0
    duration_s: float = 0.0
    dashboard: bool = True


@dataclass(frozen=True, slots=True)
class Config:
    """The whole configuration.

    Attributes:
        exchange: ``sim``, ``testnet``, ``mainnet`` or ``custom`` (explicit URLs).
        venue: URLs and request settings.
        sim: the built-in simulator.
        credentials: API key sources.
        market: the mark-price stream.
        user_stream: the user-data stream.
        entries: guard and sizing.
        router: order routing.
        sources: intent sources.
        exit: the exit policy table, handed to ``pyquant.ExitPolicy``: ``preset`` names the
            base (``standard`` when absent, ``none`` for the bare field defaults) and every
            other key overrides one of its fields.
        log: logging.
        metrics: Prometheus.
        daemon: process settings.
        notify: notifications (Telegram, Discord, webhook).
    """

    exchange: ExchangeName = "sim"
    venue: VenueConfig = field(default_factory=VenueConfig)
    sim: SimConfig = field(default_factory=SimConfig)
    credentials: CredentialsConfig = field(default_factory=CredentialsConfig)
    market: MarketConfig = field(default_factory=MarketConfig)
    user_stream: UserStreamConfig = field(default_factory=UserStreamConfig)
    entries: EntriesConfig = field(default_factory=EntriesConfig)
    router: RouterConfig = field(default_factory=RouterConfig)
    sources: SourcesConfig = field(default_factory=SourcesConfig)
    exit: Mapping[str, Any] = field(default_factory=lambda: {"preset": "standard"})
    log: LogConfig = field(default_factory=LogConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    daemon: DaemonConfig = field(default_factory=DaemonConfig)
    notify: NotifyConfig = field(default_factory=NotifyConfig)

    @property
    def rest_url(self) -> str:
        """Return the REST base URL in effect (empty for the simulator until it starts)."""
        if self.venue.rest_url:
            return self.venue.rest_url
        return ENDPOINTS[self.exchange][0] if self.exchange in ENDPOINTS else ""

    @property
    def ws_url(self) -> str:
        """Return the market websocket base URL in effect."""
        if self.venue.ws_url:
            return self.venue.ws_url
        return ENDPOINTS[self.exchange][1] if self.exchange in ENDPOINTS else ""

    @property
    def user_ws_url(self) -> str:
        """Return the user-data websocket base URL in effect."""
        if self.venue.user_ws_url:
            return self.venue.user_ws_url
        if self.exchange in ENDPOINTS:
            return ENDPOINTS[self.exchange][2]
        return self.ws_url

    @property
    def legacy_ws_url(self) -> str:
        """Return the legacy websocket host tried when a route is refused (empty: none)."""
        if self.venue.legacy_ws_url == "none":
            return ""
        if self.venue.legacy_ws_url:
            return self.venue.legacy_ws_url
        return LEGACY_WS_ENDPOINTS.get(self.exchange, "")

    def redacted(self) -> dict[str, Any]:
        """Return the configuration as plain data with every secret masked."""
        plain: dict[str, Any] = _plain(self)
        if self.sources.redis_url:
            plain["sources"]["redis_url"] = redact_url(self.sources.redis_url)
        return plain

    def exit_policy(self) -> Any:  # noqa: ANN401 - pyquant.ExitPolicy lives in the extension
        """Build the ``pyquant.ExitPolicy`` this configuration describes.

        Returns:
            The validated policy.

        Raises:
            PolicyError: a field is out of range (validated by the Rust core).
            ConfigError: the preset is unknown or the core has no ExitPolicy.
        """
        import pyquant

        policy_type = getattr(pyquant, "ExitPolicy", None)
        if policy_type is None:
            raise ConfigError("exit: pyquant.ExitPolicy is not available in this build")
        table = dict(self.exit)
        preset = str(table.pop("preset", "standard"))
        if preset == "none":
            return policy_type(**table)
        try:
            base = policy_type.preset(preset)
        except ValueError as exc:
            raise ConfigError(f"exit.preset: {preset!r} found: {exc}") from None
        if not table:
            return base
        merged = _policy_fields(base)
        merged.update(table)
        return policy_type(**merged)


def _policy_fields(policy: Any) -> dict[str, Any]:  # noqa: ANN401 - extension object
    to_dict = getattr(policy, "to_dict", None)
    if callable(to_dict):
        result: dict[str, Any] = dict(to_dict())
        return result
    names = [n for n in dir(policy) if not n.startswith("_")]
    out: dict[str, Any] = {}
    for name in names:
        value = getattr(policy, name)
        if not callable(value):
            out[name] = value
    return out


def redact_url(url: str) -> str:
    """Return ``url`` with the password (if any) masked, for logs and ``--show-config``."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest.split("/", 1)[0]:
        return url
    credentials, _, host = rest.partition("@")
    user = credentials.split(":", 1)[0]
    return f"{scheme}://{user}:********@{host}"


def _plain(value: object) -> Any:  # noqa: ANN401 - plain data of any shape
    if isinstance(value, Secret):
        return "********"
    if is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, Decimal):
        return str(value)
    return value


# ------------------------------------------------------------------------------- loading

_SECRET_KEYS = frozenset({"api_key", "api_secret", "http_token", "secret", "token", "password"})


class _Problems:
    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, path: str, value: object, rule: str) -> None:
        self.items.append(f"{path}: {value!r} found: {rule}")


def _coerce(path: str, raw: object, hint: Any, problems: _Problems) -> Any:  # noqa: ANN401
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is Literal:
        if raw not in args:
            choices = " | ".join(repr(a) for a in args)
            problems.add(path, raw, f"must be one of {choices}")
            return MISSING
        return raw
    if origin in (types.UnionType, typing.Union):
        kinds = [a for a in args if a is not type(None)]
        if raw is None and len(kinds) < len(args):
            return None
        return _coerce(path, raw, kinds[0], problems)
    if origin is tuple:
        if isinstance(raw, str):
            raw = [part.strip() for part in raw.split(",") if part.strip()]
        if not isinstance(raw, list | tuple) or not all(isinstance(x, str) for x in raw):
            problems.add(path, raw, "must be a list of strings")
            return MISSING
        return tuple(raw)
    if hint is bool:
        if not isinstance(raw, bool):
            problems.add(path, raw, "must be true or false")
            return MISSING
        return raw
    if hint is int:
        if isinstance(raw, bool) or not isinstance(raw, int):
            problems.add(path, raw, "must be a whole number")
            return MISSING
        return raw
    if hint is float:
        if isinstance(raw, bool) or not isinstance(raw, int | float):
            problems.add(path, raw, "must be a number")
            return MISSING
        return float(raw)
    if hint is Decimal:
        if isinstance(raw, bool) or not isinstance(raw, int | float | str):
            problems.add(path, raw, 'must be a decimal number (a string such as "0.01")')
            return MISSING
        try:
            number = Decimal(str(raw))
        except InvalidOperation:
            problems.add(path, raw, "must be a decimal number")
            return MISSING
        if not number.is_finite():
            problems.add(path, raw, "must be finite")
            return MISSING
        return number
    if hint is str:
        if not isinstance(raw, str):
            problems.add(path, raw, "must be a string")
            return MISSING
        return raw
    if hint is Secret:
        problems.add(path, "********", "secrets are read from the environment or a secrets file")
        return MISSING
    return raw


def _build(cls: type[Any], table: Mapping[str, Any], prefix: str, problems: _Problems) -> Any:  # noqa: ANN401
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in fields(cls)}
    values: dict[str, Any] = {}
    for key, raw in table.items():
        path = f"{prefix}{key}"
        if key not in known:
            if key in _SECRET_KEYS:
                problems.add(
                    path, "********", "secrets are read from the environment or a secrets file"
                )
            else:
                problems.add(
                    path, raw, f"is not a known setting of [{prefix.rstrip('.') or 'top level'}]"
                )
            continue
        hint = hints[key]
        if is_dataclass(hint):
            if not isinstance(raw, Mapping):
                problems.add(path, raw, "must be a table")
                continue
            values[key] = _build(hint, raw, f"{path}.", problems)  # type: ignore[arg-type]
            continue
        if key == "targets" and cls is NotifyConfig:
            values[key] = _notify_targets(path, raw, problems)
            continue
        if key == "exit" and cls is Config:
            if not isinstance(raw, Mapping):
                problems.add(path, raw, "must be a table")
                continue
            values[key] = dict(raw)
            continue
        value = _coerce(path, raw, hint, problems)
        if value is not MISSING:
            values[key] = value
    return cls(**values)


def _notify_targets(path: str, raw: object, problems: _Problems) -> tuple[Any, ...]:
    if not isinstance(raw, list) or not all(isinstance(t, Mapping) for t in raw):
        problems.add(path, raw, "must be a list of tables ([[notify.targets]])")
        return ()
    return tuple(
        _build(NotifyTargetConfig, table, f"{path}[{i}].", problems) for i, table in enumerate(raw)
    )


def _check_notify(notify: NotifyConfig, problems: _Problems) -> None:
    names: set[str] = set()
    for i, target in enumerate(notify.targets):
        path = f"notify.targets[{i}]"
        name = target.name or target.kind
        if name in names:
            problems.add(f"{path}.name", name, "must be unique (name the targets of one kind)")
        names.add(name)
        for event in target.events:
            if event not in NOTIFY_EVENTS:
                problems.add(f"{path}.events", event, f"must be one of {', '.join(NOTIFY_EVENTS)}")
        if target.kind == "telegram" and not target.chat_id:
            problems.add(f"{path}.chat_id", target.chat_id, "a telegram target needs its chat_id")
        if target.base_url and not target.base_url.startswith(("http://", "https://")):
            problems.add(f"{path}.base_url", target.base_url, "must start with http:// or https://")
        _check_range(problems, f"{path}.timeout_s", target.timeout_s, 0.1, 120, "must be 0.1-120 s")
    _check_range(problems, "notify.queue_size", notify.queue_size, 1, 100_000, "must be 1-100000")
    _check_range(problems, "notify.coalesce_s", notify.coalesce_s, 0, 60, "must be 0-60 seconds")
    _check_range(problems, "notify.max_attempts", notify.max_attempts, 1, 100, "must be 1-100")
    _check_range(
        problems,
        "notify.feed_down_after_s",
        notify.feed_down_after_s,
        1,
        86400,
        "must be 1-86400 s",
    )
    if not -1 <= notify.daily_summary_hour_utc <= 23:
        problems.add(
            "notify.daily_summary_hour_utc",
            notify.daily_summary_hour_utc,
            "must be an hour 0-23 (UTC) or -1 for none",
        )


def _env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for name, text in environ.items():
        if not name.startswith("PYQUANT__"):
            continue
        parts = [p.lower() for p in name[len("PYQUANT__") :].split("__") if p]
        if not parts:
            continue
        try:
            value: Any = tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            value = text
        node = tree
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                break
        else:
            node[parts[-1]] = value
    return tree


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(dict(out[key]), value)
        else:
            out[key] = value
    return out


def read_secrets_file(path: Path) -> dict[str, str]:
    """Read a secrets TOML file, refusing one that others may read.

    Args:
        path: the file; it must be owned by us and have no group or world permissions.

    Returns:
        Its string values.

    Raises:
        ConfigError: the file is missing, too open, or malformed.
    """
    try:
        info = path.stat()
    except OSError as exc:
        raise ConfigError(
            f"credentials.file: {str(path)!r} found: cannot be read ({exc.strerror})"
        ) from None
    if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(
            f"credentials.file: {str(path)!r} found with mode {stat.S_IMODE(info.st_mode):04o}: "
            "must be readable by its owner only (chmod 600)"
        )
    if hasattr(os, "getuid") and info.st_uid != os.getuid():
        raise ConfigError(
            f"credentials.file: {str(path)!r} found: must be owned by the current user"
        )
    try:
        doc = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(
            f"credentials.file: {str(path)!r} found: is not valid TOML ({exc})"
        ) from None
    return {str(k): str(v) for k, v in doc.items() if isinstance(v, str)}


def load_config(
    path: str | Path | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    confirm_mainnet: bool = False,
    need_keys: bool = True,
) -> Config:
    """Load and validate the configuration.

    Args:
        path: a TOML file, or None for the defaults (the built-in simulator).
        environ: the environment (``os.environ`` by default).
        overrides: values from command-line flags, as a nested table; they win over all.
        confirm_mainnet: the operator confirmed mainnet on the command line.
        need_keys: False for commands that only read public market data (``pyquant data``).

    Returns:
        The validated configuration, with secrets resolved.

    Raises:
        ConfigError: one message listing every problem found.
    """
    env = os.environ if environ is None else environ
    table: dict[str, Any] = {}
    if path is not None:
        file = Path(path)
        try:
            table = tomllib.loads(file.read_text())
        except FileNotFoundError:
            raise ConfigError(f"--config: {str(file)!r} found: the file does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"--config: {str(file)!r} found: is not valid TOML ({exc})") from None
    problems = _Problems()
    for section in ("credentials", "sources"):
        for key in ("api_key", "api_secret", "http_token"):
            if isinstance(table.get(section), Mapping) and key in table[section]:
                problems.add(
                    f"{section}.{key}",
                    "********",
                    "secrets are read from the environment or a secrets file",
                )
                del table[section][key]
    env_tree = _env_overrides(env)
    secret_env: dict[str, str] = {}
    for section, key in (
        ("credentials", "api_key"),
        ("credentials", "api_secret"),
        ("sources", "http_token"),
    ):
        node = env_tree.get(section)
        if isinstance(node, dict) and key in node:
            secret_env[key] = str(node.pop(key))
    merged = _merge(_merge(table, env_tree), overrides or {})
    config: Config = _build(Config, merged, "", problems)
    config = _resolve_secrets(config, env, secret_env, problems)
    _cross_checks(config, problems, confirm_mainnet, need_keys=need_keys)
    if problems.items:
        lines = "\n  ".join(problems.items)
        raise ConfigError(f"invalid configuration ({len(problems.items)} problem(s)):\n  {lines}")
    return config


def _resolve_secrets(
    config: Config, env: Mapping[str, str], direct: Mapping[str, str], problems: _Problems
) -> Config:
    creds = config.credentials
    key = direct.get("api_key") or env.get(creds.api_key_env)
    secret = direct.get("api_secret") or env.get(creds.api_secret_env)
    if creds.file and (key is None or secret is None):
        try:
            found = read_secrets_file(Path(creds.file).expanduser())
        except ConfigError as exc:
            problems.items.append(str(exc))
            found = {}
        key = key or found.get("api_key")
        secret = secret or found.get("api_secret")
    token = direct.get("http_token") or env.get(config.sources.http_token_env)
    return replace(
        config,
        credentials=replace(
            creds,
            api_key=Secret(key) if key else None,
            api_secret=Secret(secret) if secret else None,
        ),
        sources=replace(config.sources, http_token=Secret(token) if token else None),
    )


# The HTTP intake's bearer token: shorter ones are refused (pyquant.trading.sources agrees).
MIN_HTTP_TOKEN_CHARS = 16


def _check_range(
    problems: _Problems, path: str, value: float | Decimal, low: float, high: float, rule: str
) -> None:
    if not low <= value <= high:
        problems.add(path, value, rule)


def _cross_checks(
    config: Config, problems: _Problems, confirm_mainnet: bool, *, need_keys: bool = True
) -> None:
    c = config
    if c.exchange == "mainnet" and not (c.venue.confirm_mainnet or confirm_mainnet):
        problems.add(
            "exchange",
            "mainnet",
            "real money: needs venue.confirm_mainnet = true or --i-understand-mainnet",
        )
    if c.exchange == "custom" and not (c.venue.rest_url and c.venue.ws_url):
        problems.add(
            "venue.rest_url", c.venue.rest_url, 'exchange = "custom" needs rest_url and ws_url'
        )
    for name in ("rest_url", "ws_url", "user_ws_url", "legacy_ws_url"):
        url = getattr(c.venue, name)
        schemes = ("http://", "https://") if name == "rest_url" else ("ws://", "wss://")
        disabled = name == "legacy_ws_url" and url == "none"
        if url and not disabled and not url.startswith(schemes):
            problems.add(f"venue.{name}", url, f"must start with {' or '.join(schemes)}")
    keys_missing = c.credentials.api_key is None or c.credentials.api_secret is None
    if need_keys and c.exchange != "sim" and keys_missing:
        problems.add(
            "credentials",
            f"${c.credentials.api_key_env} / ${c.credentials.api_secret_env}",
            f"exchange = {c.exchange!r} needs an API key and secret "
            "from the environment or credentials.file",
        )
    _check_range(
        problems,
        "venue.recv_window_ms",
        c.venue.recv_window_ms,
        1,
        60000,
        "must be from 1 to 60000",
    )
    _check_range(
        problems, "venue.timeout_s", c.venue.timeout_s, 0.1, 120, "must be from 0.1 to 120 seconds"
    )
    _check_range(problems, "sim.speed", c.sim.speed, 0.01, 100000, "must be from 0.01 to 100000")
    if c.sim.balance_usdt <= 0:
        problems.add("sim.balance_usdt", c.sim.balance_usdt, "must be positive")
    for i, sym in enumerate(c.market.symbols):
        if not sym.isalnum() or sym.upper() != sym:
            problems.add(
                f"market.symbols[{i}]", sym, "must be an upper-case symbol such as BTCUSDT"
            )
    _check_range(
        problems,
        "market.stale_after_s",
        c.market.stale_after_s,
        1,
        3600,
        "must be from 1 to 3600 seconds",
    )
    _check_range(
        problems,
        "market.poll_interval_s",
        c.market.poll_interval_s,
        0.2,
        600,
        "must be from 0.2 to 600 seconds",
    )
    _check_range(
        problems,
        "market.warmup_bars",
        c.market.warmup_bars,
        0,
        1500,
        "must be from 0 to 1500 (markPriceKlines limit)",
    )
    if c.market.warmup_interval not in ("1m", "3m", "5m", "15m", "30m", "1h", "2h", "4h"):
        problems.add(
            "market.warmup_interval",
            c.market.warmup_interval,
            "must be a kline interval from 1m to 4h",
        )
    _check_range(
        problems,
        "market.rotate_after_s",
        c.market.rotate_after_s,
        10,
        86000,
        "must be from 10 s to under 24 h",
    )
    if c.market.backoff_initial_s <= 0 or c.market.backoff_max_s < c.market.backoff_initial_s:
        problems.add(
            "market.backoff_max_s",
            c.market.backoff_max_s,
            "must be at least backoff_initial_s (> 0)",
        )
    _check_range(
        problems,
        "user_stream.keepalive_interval_s",
        c.user_stream.keepalive_interval_s,
        1,
        3300,
        "must be under the 60 minute listenKey life",
    )
    e = c.entries
    _check_range(
        problems,
        "entries.max_open_positions",
        e.max_open_positions,
        1,
        10000,
        "must be from 1 to 10000",
    )
    if e.max_exposure_usdt <= 0:
        problems.add("entries.max_exposure_usdt", e.max_exposure_usdt, "must be positive")
    _check_range(
        problems, "entries.cooldown_s", e.cooldown_s, 0, 86400 * 7, "must be from 0 to a week"
    )
    _check_range(
        problems,
        "entries.max_intent_age_s",
        e.max_intent_age_s,
        0.1,
        86400,
        "must be from 0.1 s to a day",
    )
    _check_range(
        problems,
        "entries.risk_pct",
        e.risk_pct,
        0.0001,
        0.2,
        "must be a fraction from 0.0001 to 0.2 (0.01 = 1 %)",
    )
    if e.notional_usdt <= 0:
        problems.add("entries.notional_usdt", e.notional_usdt, "must be positive")
    _check_range(problems, "entries.leverage", e.leverage, 1, 125, "must be from 1 to 125")
    if e.max_notional_usdt < 0:
        problems.add("entries.max_notional_usdt", e.max_notional_usdt, "must not be negative")
    _check_range(
        problems, "entries.margin_use_pct", e.margin_use_pct, 0.01, 1, "must be from 0.01 to 1"
    )
    _check_range(
        problems,
        "router.backstop_distance_pct",
        c.router.backstop_distance_pct,
        0,
        0.5,
        "must be a fraction from 0 to 0.5",
    )
    _check_range(
        problems,
        "router.backstop_throttle_s",
        c.router.backstop_throttle_s,
        0,
        3600,
        "must be from 0 to 3600 seconds",
    )
    _check_range(
        problems,
        "sources.demo_interval_s",
        c.sources.demo_interval_s,
        0.1,
        86400,
        "must be from 0.1 s to a day",
    )
    if c.sources.demo_threshold_pct < 0:
        problems.add(
            "sources.demo_threshold_pct", c.sources.demo_threshold_pct, "must not be negative"
        )
    _check_range(
        problems,
        "sources.http_port",
        c.sources.http_port,
        0,
        65535,
        "must be a port number (0 disables)",
    )
    if c.sources.http_port and c.sources.http_token is None:
        problems.add(
            "sources.http_port",
            c.sources.http_port,
            f"the HTTP intake needs a bearer token in ${c.sources.http_token_env}",
        )
    token = c.sources.http_token
    if c.sources.http_port and token is not None and len(token.reveal()) < MIN_HTTP_TOKEN_CHARS:
        # Checked here, before any connection, not when the intake starts after recovery.
        problems.add(
            "sources.http_token",
            f"${c.sources.http_token_env} of {len(token.reveal())} characters",
            f"must be at least {MIN_HTTP_TOKEN_CHARS} characters: use a long random token",
        )
    if c.sources.jsonl and c.sources.jsonl != "-":
        from pyquant.trading.sources import check_intents_file  # aiohttp only when used

        try:
            check_intents_file(Path(os.path.expanduser(c.sources.jsonl)))
        except ConfigError as exc:
            problems.items.append(str(exc))
    if c.sources.redis_url:
        try:
            from pyquant.scale.bus import RedisBusConfig  # needs redis-py only when used

            RedisBusConfig.from_url(c.sources.redis_url)
        except ImportError as exc:
            problems.add(
                "sources.redis_url",
                redact_url(c.sources.redis_url),
                f"needs redis-py ({exc}): pip install 'pyquant[redis]'",
            )
        except ConfigError as exc:
            problems.add("sources.redis_url", redact_url(c.sources.redis_url), str(exc))
    _check_range(problems, "metrics.port", c.metrics.port, 0, 65535, "must be a port number")
    _check_range(
        problems,
        "daemon.snapshot_interval_s",
        c.daemon.snapshot_interval_s,
        0.1,
        3600,
        "must be from 0.1 to 3600 seconds",
    )
    _check_notify(c.notify, problems)
    if c.daemon.duration_s < 0:
        problems.add(
            "daemon.duration_s", c.daemon.duration_s, "must not be negative (0 = until stopped)"
        )


__all__ = [
    "Config",
    "ConfigError",
    "CredentialsConfig",
    "DaemonConfig",
    "EntriesConfig",
    "LogConfig",
    "MarketConfig",
    "MetricsConfig",
    "NotifyConfig",
    "NotifyTargetConfig",
    "RouterConfig",
    "Secret",
    "SimConfig",
    "SourcesConfig",
    "UserStreamConfig",
    "VenueConfig",
    "load_config",
    "read_secrets_file",
]
