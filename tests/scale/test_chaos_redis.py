"""The short version of the seeded Redis soak (``make chaos-redis`` runs the long one)."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("redis.asyncio")

from chaos_redis import KINDS, MAX_POSITIONS, plan, soak
from redis_server_proc import REDIS_SERVER


async def test_two_daemons_through_every_kind_of_trouble_keep_the_invariants(tmp_path: Path):
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed (Debian: apt-get install -y redis-server)")
    steps = plan(seed=18, steps=len(KINDS))
    assert sorted(steps) == sorted(KINDS)
    findings = await soak(tmp_path, seed=18, steps=len(KINDS), daemons=2)
    print(
        f"steps {findings.steps} max open legs {findings.max_open_legs} "
        f"stale stops {findings.stale_stops}"
    )
    assert findings.violations == []
    assert findings.max_open_legs <= MAX_POSITIONS
    assert findings.steps == steps
