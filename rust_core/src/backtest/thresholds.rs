//! Thresholds as grid ticks: the first tick at or beyond a decimal price (a trailing
//! activation, a time stop's profit threshold), the plausible band, the trailing
//! distance in whole ticks when floats settle it, and the ATR known before a bar.
//!
//! May not touch: positions, fills or trades; these are pure functions of the grid,
//! the rules, the policy and the ATR.

use crate::exit::policy::ExitPolicy;
use crate::fixed::{decimal_to_f64, Decimal};
use crate::rules::SymbolRules;

use super::prepare::Grid;

/// Beyond every tick a bar price can have (they are within 2^40 of the grid's base).
pub(super) const FAR_TICKS: i64 = 1 << 41;

impl Grid {
    /// The decimal of tick `k`, `None` beyond the decimal range.
    pub(super) fn try_price(self, k: i64) -> Option<Decimal> {
        let mantissa = self
            .base
            .checked_add(i128::from(k).checked_mul(self.step)?)?;
        Decimal::try_from_i128_with_scale(mantissa, self.scale).ok()
    }

    /// The first tick whose price is at or beyond `price` toward `side`'s profit (the
    /// least `k` with `price(k) >= price` for `+1`, the greatest with `price(k) <= price`
    /// for `-1`), decided by exact decimal comparisons around a float estimate; `±FAR_TICKS`
    /// when that lies beyond every bar price. `None` when undecidable.
    pub(super) fn first_tick_reaching(self, side: i64, price: Decimal) -> Option<i64> {
        let estimate = (decimal_to_f64(price) - self.base_f) * self.per_step_f;
        if estimate.is_nan() {
            return None;
        }
        if estimate.abs() > FAR_TICKS as f64 {
            return Some(if estimate > 0.0 {
                FAR_TICKS
            } else {
                -FAR_TICKS
            });
        }
        let reaches = |k: i64| {
            self.try_price(k).map(|p| match side {
                1 => p >= price,
                _ => p <= price,
            })
        };
        let mut k = estimate as i64;
        for _ in 0..64 {
            if !reaches(k)? {
                k += side;
            } else if reaches(k - side)? {
                k -= side;
            } else {
                return Some(k);
            }
        }
        None
    }

    /// The plausible band (`bounds::plausible_price`) as inclusive ticks of positive
    /// prices; a tick outside it may still be plausible and is then fed to `on_mark`.
    pub(super) fn plausible_ticks(self, rules: &SymbolRules) -> Option<(i64, i64)> {
        let (low, high) = crate::exit::bounds::price_band(rules);
        // `low` may be zero (exclusive): then the first positive tick, one or two further.
        let first = self.first_tick_reaching(1, low)?;
        let lo =
            (first..first + 4).find(|&k| self.try_price(k).is_some_and(|p| p > Decimal::ZERO))?;
        Some((lo, self.first_tick_reaching(-1, high)?))
    }
}

/// `floor(d / tick)` for the trailing distance `d = decimal_of(trail_atr * atr)` that
/// `on_mark` uses, when floats settle it: then the candidate `round_stop(best ∓ d)` is
/// `best ∓ floor(d / tick)` ticks for a best on the grid (a LONG rounds `best - d` up:
/// `ceil(b - d/t) = b - floor(d/t)`; a SHORT rounds `best + d` down). `d` is the shortest
/// decimal of the float `x = trail_atr * atr` (within half an ulp of it) and
/// `x * (1 / tick)` is within a few ulps of `d / tick`: below 2^26 ticks that is within
/// 1e-7 tick, so a quotient more than 1e-6 from an integer floors exactly. `None`
/// (the state machine decides) for percent or fallback distances, and near an integer.
pub(super) fn trail_ticks(grid: Grid, policy: &ExitPolicy, atr: Option<f64>) -> Option<i64> {
    pub(super) const MAX_TICKS: f64 = (1u64 << 26) as f64;
    if policy.derived().trail_pct.is_some() {
        return None;
    }
    let k = policy.config().trail_atr?;
    let a = crate::exit::bounds::usable_atr(atr)?;
    let x = k * a;
    if !(x.is_finite() && x > 0.0 && x < 1e15) {
        return None;
    }
    let q = x * grid.per_step_f;
    if q >= MAX_TICKS {
        return None;
    }
    let whole = q as i64;
    let fraction = q - whole as f64;
    (1e-6..=1.0 - 1e-6).contains(&fraction).then_some(whole)
}

/// The ATR before bar `i`, `None` while not ready.
pub(super) fn atr_at(atr: &[f64], i: usize) -> Option<f64> {
    Some(atr[i]).filter(|a| !a.is_nan())
}
