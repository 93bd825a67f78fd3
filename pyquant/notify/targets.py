"""The three kinds of notification target: what is sent where, and how a 429 says when.

* ``telegram``: ``POST {base_url}/bot{token}/sendMessage`` with ``chat_id`` and ``text``;
  a 429 carries ``parameters.retry_after`` (seconds) in its JSON body.
* ``discord``: ``POST {webhook_url}`` with ``content`` (2000 characters at most); a 429 carries
  ``retry_after`` (seconds) in its body and a ``Retry-After`` header.
* ``webhook``: ``POST {url}`` with a JSON array of events-stream documents (one per event of
  the burst, schema ``pyquant/scale/events.schema.json``); a 429 may carry ``Retry-After``.

The bot token and the webhook URLs are secrets: they come from the environment or the
owner-only ``credentials.file`` (like the API keys), live in ``Secret`` and appear in no
log line, repr or error message: errors name the target and the HTTP status only.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from pyquant.config import NOTIFY_SECRET_ENV, NotifyTargetConfig, Secret, read_secrets_file
from pyquant.errors import ConfigError

TELEGRAM_API = "https://api.telegram.org"
_TELEGRAM_MAX = 4096
_DISCORD_MAX = 2000


@dataclass(frozen=True)
class Request:
    """One HTTP POST to a target (the URL may hold the secret: never log it)."""

    url: Secret
    body: bytes


@dataclass(frozen=True)
class Target:
    """A configured, ready target.

    Attributes:
        name: what reports and logs call it.
        kind: ``telegram``, ``discord`` or ``webhook``.
        events: the notifications it wants (empty: all).
        secret: the bot token (telegram) or the webhook URL.
        chat_id: the Telegram chat.
        base_url: the Telegram API base.
        timeout_s: longest wait for one delivery.
    """

    name: str
    kind: str
    events: frozenset[str]
    secret: Secret
    chat_id: str = ""
    base_url: str = TELEGRAM_API
    timeout_s: float = 10.0

    def wants(self, event: str) -> bool:
        """Whether this target is told of ``event``."""
        return not self.events or event in self.events

    def request(self, text: str, documents: Sequence[Mapping[str, Any]]) -> Request:
        """The POST that delivers one message (``text``) or burst (``documents``)."""
        if self.kind == "telegram":
            url = f"{self.base_url.rstrip('/')}/bot{self.secret.reveal()}/sendMessage"
            body = {
                "chat_id": self.chat_id,
                "text": _clip(text, _TELEGRAM_MAX),
                "disable_web_page_preview": True,
            }
            return Request(Secret(url), orjson.dumps(body))
        if self.kind == "discord":
            body_d = {"content": _clip(text, _DISCORD_MAX), "allowed_mentions": {"parse": []}}
            return Request(self.secret, orjson.dumps(body_d))
        return Request(self.secret, orjson.dumps(list(documents)))


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 2] + " …"


def retry_after_s(status: int, headers: Mapping[str, str], body: bytes) -> float | None:
    """Seconds a 429 asks us to wait (Telegram's and Discord's bodies, or ``Retry-After``)."""
    if status != 429:
        return None
    try:
        doc = orjson.loads(body) if body else None
    except orjson.JSONDecodeError:
        doc = None
    candidates: list[object] = []
    if isinstance(doc, dict):
        parameters = doc.get("parameters")
        if isinstance(parameters, dict):
            candidates.append(parameters.get("retry_after"))  # Telegram
        candidates.append(doc.get("retry_after"))  # Discord
    candidates.append(headers.get("Retry-After"))
    for value in candidates:
        try:
            seconds = float(str(value))
        except ValueError:
            continue
        if math.isfinite(seconds) and seconds >= 0:
            return seconds
    return None


def resolve_targets(
    configs: Sequence[NotifyTargetConfig],
    *,
    environ: Mapping[str, str] | None = None,
    secrets_file: str = "",
) -> list[Target]:
    """Build the targets, each with its secret from the environment or the secrets file.

    Raises:
        ConfigError: a target's secret is missing, or a URL secret is not http(s).
    """
    env = os.environ if environ is None else environ
    file_values: dict[str, str] | None = None
    targets: list[Target] = []
    problems: list[str] = []
    for i, config in enumerate(configs):
        variable = config.secret_env or NOTIFY_SECRET_ENV[config.kind]
        value = env.get(variable)
        if not value and secrets_file:
            if file_values is None:
                file_values = read_secrets_file(Path(secrets_file).expanduser())
            value = file_values.get(variable.lower())
        name = config.name or config.kind
        what = "bot token" if config.kind == "telegram" else "webhook URL"
        if not value:
            problems.append(
                f"notify.targets[{i}] ({name}): the {what} is missing: set ${variable} or "
                f"{variable.lower()} in credentials.file"
            )
            continue
        if config.kind != "telegram" and not value.startswith(("http://", "https://")):
            problems.append(
                f"notify.targets[{i}] ({name}): ${variable} must be an http(s) URL "
                "(value not shown: it is a secret)"
            )
            continue
        targets.append(
            Target(
                name=name,
                kind=config.kind,
                events=frozenset(config.events),
                secret=Secret(value),
                chat_id=config.chat_id,
                base_url=config.base_url or TELEGRAM_API,
                timeout_s=config.timeout_s,
            )
        )
    if problems:
        raise ConfigError("; ".join(problems))
    return targets
