"""Redis clients from pyquant's URLs: one server, or a master found through Redis Sentinel.

URL forms (the query parameters of :mod:`pyquant.scale.bus` follow either)::

    redis://[:password@]host:port/db                     one server (rediss:// over TLS)
    redis+sentinel://[:password@]h1:p1,h2:p2,h3:p3/db?service=NAME
                                                         the master of ``NAME`` as the listed
                                                         sentinels know it (rediss+sentinel://
                                                         over TLS)

With Sentinel every new connection asks the sentinels for the current master (redis-py's
``Sentinel.master_for``); a connection to a master that was demoted answers ``READONLY``,
which redis-py turns into a connection error. pyquant's Redis tasks treat both like an outage:
they retry with backoff, reconnect to the promoted replica, re-read their pending entries and
go on. The password is the master's and replicas'; the sentinels are asked without one.

What fail-over does not give: Redis replication is asynchronous, so writes the old master
acknowledged but had not yet sent to its replica are lost. For the intent stream this means an
acknowledged entry may come back (decided once: the daemon answers a redelivered intent id with
its stored decision) and an entry added just before the crash may vanish unless its producer
waited for a replica (``WAIT 1 <ms>`` after ``XADD``). Leases written just before the crash may
revert; the lease TTL and the fence (``pyquant.scale.leases``) bound what that can cause.
"""

from __future__ import annotations

import contextlib
from typing import Final
from urllib.parse import parse_qsl, urlsplit

import redis.asyncio as aioredis
from redis.asyncio.sentinel import Sentinel

from pyquant.errors import ConfigError

SENTINEL_SCHEMES: Final = ("redis+sentinel", "rediss+sentinel")
PLAIN_SCHEMES: Final = ("redis", "rediss")


def sentinel_hosts(netloc: str, shown: str) -> list[tuple[str, int]]:
    """Return the ``host:port`` pairs of a sentinel URL's host list.

    Args:
        netloc: the URL's network location (``[:password@]h1:p1,h2:p2``).
        shown: the URL with its password redacted, for messages.

    Raises:
        ConfigError: no host, or a host without a valid port.
    """
    hostlist = netloc.rpartition("@")[2]
    hosts: list[tuple[str, int]] = []
    for item in hostlist.split(","):
        host, _, port = item.strip().rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(
                f"intents URL {shown!r}: sentinel {item!r} must be host:port, e.g. "
                "redis+sentinel://10.0.0.1:26379,10.0.0.2:26379,10.0.0.3:26379/0?service=main"
            )
        hosts.append((host.strip("[]"), int(port)))
    return hosts


def redis_client(url: str, *, socket_timeout_s: float, connect_timeout_s: float) -> aioredis.Redis:
    """Return a client for ``url`` (plain or sentinel; see the module docstring).

    Args:
        url: the connection URL (query: only ``service`` for sentinel URLs).
        socket_timeout_s: how long one command may take.
        connect_timeout_s: how long connecting may take (also each sentinel query).

    Raises:
        ConfigError: the URL's scheme, hosts or service are invalid.
    """
    parts = urlsplit(url)
    if parts.scheme in PLAIN_SCHEMES:
        return aioredis.from_url(
            url, socket_timeout=socket_timeout_s, socket_connect_timeout=connect_timeout_s
        )
    if parts.scheme not in SENTINEL_SCHEMES:
        raise ConfigError(
            f"Redis URL scheme {parts.scheme!r}: use redis://, rediss://, redis+sentinel:// or "
            "rediss+sentinel://"
        )
    hosts = sentinel_hosts(parts.netloc, url.replace(parts.password or "\0", "***"))
    service = dict(parse_qsl(parts.query)).get("service", "")
    if not service:
        raise ConfigError("a redis+sentinel:// URL needs ?service=<master name>")
    path = parts.path.strip("/")
    sentinel = Sentinel(
        hosts,
        sentinel_kwargs={
            "socket_timeout": connect_timeout_s,
            "socket_connect_timeout": connect_timeout_s,
        },
        ssl=parts.scheme == "rediss+sentinel",
    )
    client: aioredis.Redis = sentinel.master_for(
        service,
        socket_timeout=socket_timeout_s,
        socket_connect_timeout=connect_timeout_s,
        db=int(path) if path else 0,
        username=parts.username or None,
        password=parts.password,
    )
    return client


async def close_client(client: aioredis.Redis) -> None:
    """Close a client made by ``redis_client``, and its sentinel connections if any."""
    await client.aclose()
    manager = getattr(client.connection_pool, "sentinel_manager", None)
    for sentinel in getattr(manager, "sentinels", ()):
        with contextlib.suppress(Exception):
            await sentinel.aclose()


__all__ = ["PLAIN_SCHEMES", "SENTINEL_SCHEMES", "close_client", "redis_client", "sentinel_hosts"]
