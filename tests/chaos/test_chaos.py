"""A short seeded chaos soak in the suite (the long one is ``make chaos``), in both modes."""

from __future__ import annotations

from pathlib import Path

import pytest
from soak import soak


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["one-way", "hedge"])
async def test_short_chaos_soak_holds_every_invariant(tmp_path: Path, mode: str) -> None:
    report = await soak(tmp_path / mode, mode=mode, seed=3, steps=14, order_faults=False)
    assert report.kills >= 2, report.line()
    assert report.flattens == 1
    assert report.bad_lines >= 1, report.line()
    assert report.violations == [], "\n".join([report.line(), *report.violations])
