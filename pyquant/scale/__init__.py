"""Scale-out over Redis Streams: intents in through a consumer group, events out, symbol leases.

Optional: needs the ``redis`` extra (``pip install 'pyquant[redis]'``). See
:mod:`pyquant.scale.bus` for the URL and the lifecycle, :mod:`pyquant.scale.events` for the
event schema.
"""

from pyquant.scale.bus import RedisBus, RedisBusConfig
from pyquant.scale.events import EventPublisher
from pyquant.scale.leases import LeaseConfig, LeaseManager, Route
from pyquant.scale.redis_intents import (
    IntentStreamConfig,
    RedisIntentSource,
    Rejection,
    parse_intent_url,
)

__all__ = [
    "EventPublisher",
    "IntentStreamConfig",
    "LeaseConfig",
    "LeaseManager",
    "RedisBus",
    "RedisBusConfig",
    "RedisIntentSource",
    "Rejection",
    "Route",
    "parse_intent_url",
]
