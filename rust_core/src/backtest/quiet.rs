//! Quiet marks and quiet bars (see "Quiet bars" in the module header): a position's
//! triggers as grid ticks ([`Triggers`]) and the conditions under which a mark or a whole
//! bar changes nothing but the best mark and the trailing stop, settled in ticks.
//!
//! May not touch: fills, trades or the result tables; it changes a position only through
//! `PositionState::apply_quiet_mark`, and decides nothing the state machine would decide
//! differently (the tests compare it with feeding every mark).

use crate::exit::action::PositionSide;
use crate::exit::policy::ExitPolicy;
use crate::exit::position::PositionState;
use crate::fixed::{decimal_to_f64, Decimal};
use crate::rules::SymbolRules;

use super::prepare::Grid;

/// What a mark must reach to matter to a position, as grid ticks, and the mark updates
/// that ticks settle without the state machine.
///
/// `on_mark` emits nothing and changes nothing but the best mark and, through the
/// trailing candidate, the stop (it also records `last_mark_price`, which the backtest
/// never reads) for a mark that
/// - lies in the symbol's plausible band (else `on_mark` ignores it: fed as it is);
/// - needs none of the first update's work: the open time is set (the backtest opens
///   with it) and the entry is short of the trailing activation price (the first update
///   checks activation against the best mark even without a new one);
/// - with the stop after this mark's trailing update, is strictly on the profit side of
///   the stop and strictly short of the next take-profit level;
/// - activates no trailing stop (inactive: not by level, and the new best, if any,
///   short of the activation price);
/// - comes before the time stop is due, or after the best mark passed the time stop's
///   profit threshold (then it never fires);
/// - with the trailing stop active: the candidate is known in ticks (ATR trailing, ATR
///   usable, `floor(distance / tick)` settled by floats, see [`trail_ticks`]), or the
///   candidate cannot change (no new best and the same ATR as the last candidate).
///
/// Such a mark is applied here (`PositionState::apply_quiet_mark`); everything else is
/// fed. A whole bar whose extremes satisfy the same conditions at once is one such step:
/// its best is its favourable extreme, its stop the candidate there (a candidate only
/// grows with the best, and the ATR is the same for every mark of a bar), and every mark
/// of its path and every move between them stays inside its range, so nothing triggers
/// on the way. `BacktestOptions::exhaustive` feeds every mark, and the tests check both
/// give the same fills and stops.
pub(super) struct Triggers {
    /// The stop `stop` was read from (its bytes, to notice any change cheaply).
    pub(super) stop_key: [u8; 16],
    pub(super) stop: i64,
    pub(super) best: i64,
    pub(super) levels: Vec<i64>,
    /// Open time plus the policy's `max_hold_ms`.
    pub(super) expires_at: Option<i64>,
    /// The best mark passed `time_stop_below_price`: the time stop can no longer fire.
    pub(super) time_stop_off: bool,
    /// ATR basis (bits, 0 for none) of the last trailing candidate taken into account at
    /// the current best (by `on_mark` or here).
    pub(super) fed_basis: Option<u64>,
    /// The first update's work is done (a mark was taken in) or provably empty.
    pub(super) ready: bool,
    /// `+1` for a LONG, `-1` for a SHORT: `side * (a - b) > 0` is "a beyond b toward profit".
    pub(super) side: i64,
    /// Ticks of the plausible band, inclusive (prices in it are positive).
    pub(super) band: (i64, i64),
    /// The first best tick at which trailing activates by price.
    pub(super) activate_at: Option<i64>,
}

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

/// A mark update (or a whole bar) that ticks settled: the best and stop after it, and
/// the ATR basis whose candidate it took into account.
pub(super) struct QuietStep {
    pub(super) best: i64,
    pub(super) stop: i64,
    /// The decimals of `best` and `stop` where they moved.
    pub(super) best_price: Option<Decimal>,
    pub(super) stop_price: Option<Decimal>,
    pub(super) basis: Option<u64>,
}

impl QuietStep {
    /// The step to `best` and `stop` (ticks); the decimal of `best` is built only when it
    /// improved, that of `stop` is given when it moved. `None` when `best` is off the
    /// decimal range (the mark is then fed).
    fn new(
        grid: Grid,
        improved: bool,
        best: i64,
        stop: i64,
        stop_price: Option<Decimal>,
        basis: Option<u64>,
    ) -> Option<Self> {
        let best_price = if improved {
            Some(grid.try_price(best)?)
        } else {
            None
        };
        Some(Self {
            best,
            stop,
            best_price,
            stop_price,
            basis,
        })
    }
}

impl Triggers {
    pub(super) fn new(
        position: &PositionState,
        grid: Grid,
        band: Option<(i64, i64)>,
        expires_at: Option<i64>,
    ) -> Option<Self> {
        let side = match position.side {
            PositionSide::Long => 1,
            PositionSide::Short => -1,
        };
        let activate_at = match position.trail_activate_price {
            Some(p) => Some(grid.first_tick_reaching(side, p)?),
            None => None,
        };
        let best = grid.ticks(position.best_price)?;
        let ready = position.opened_at_ms.is_some()
            && (position.trailing_active || activate_at.is_none_or(|a| side * (best - a) < 0));
        Some(Self {
            stop_key: position.stop_price.serialize(),
            stop: grid.ticks(position.stop_price)?,
            best,
            levels: position
                .ladder_prices
                .iter()
                .map(|&l| grid.ticks(l))
                .collect::<Option<Vec<_>>>()?,
            expires_at,
            time_stop_off: time_stop_passed(position),
            fed_basis: None,
            ready,
            side,
            band: band?,
            activate_at,
        })
    }

    /// Re-reads the stop after `on_mark` or a confirmation; false when it left the grid.
    pub(super) fn refresh_stop(&mut self, position: &PositionState, grid: Grid) -> bool {
        let key = position.stop_price.serialize();
        if key != self.stop_key {
            let Some(stop) = grid.ticks(position.stop_price) else {
                return false;
            };
            self.stop = stop;
            self.stop_key = key;
        }
        true
    }

    /// Records a mark `on_mark` took in (past its guards): its ATR and, when it beat the
    /// best mark, the new best.
    pub(super) fn took(&mut self, position: &PositionState, tick: i64, basis: u64, grid: Grid) {
        self.fed_basis = Some(basis);
        self.ready = true;
        if self.side * (tick - self.best) > 0 {
            self.best = tick;
            self.time_stop_off = time_stop_passed(position);
        }
        debug_assert_eq!(grid.ticks(position.best_price), Some(self.best));
    }

    /// Whether marks from `adverse` to `favourable` (ticks; equal for one mark) up to
    /// `last_ms`, with ATR `basis` and candidate offset `trail` ([`trail_ticks`]), provably
    /// trigger nothing; then the best and stop they leave. See [`Triggers`].
    #[allow(clippy::too_many_arguments)] // one mark's facts beside the position's
    pub(super) fn quiet(
        &self,
        position: &PositionState,
        rule: TrailRule,
        adverse: i64,
        favourable: i64,
        last_ms: i64,
        basis: u64,
        trail: Option<i64>,
        grid: Grid,
    ) -> Option<QuietStep> {
        if !self.ready {
            return None;
        }
        let s = self.side;
        let (lo, hi) = self.band;
        if adverse.min(favourable) < lo
            || adverse.max(favourable) > hi
            || position.over_leveraged
            || position.pending.is_some()
            || position.levels_passed_at_adoption > position.levels_done
        {
            return None;
        }
        let improved = s * (favourable - self.best) > 0;
        let best = if improved { favourable } else { self.best };
        let mut stop = self.stop;
        let mut stop_price = None;
        let mut considered = None;
        if position.trailing_active {
            if let Some(q) = trail {
                let candidate = best - s * q;
                if s * (candidate - stop) > 0 {
                    let price = grid.try_price(candidate)?;
                    if price > Decimal::ZERO {
                        stop = candidate;
                        stop_price = Some(price);
                    }
                }
                considered = Some(basis);
            } else if improved || self.fed_basis != Some(basis) {
                return None;
            }
        } else if rule.configured
            && (rule.activates_by_level(position.levels_done)
                || (improved && self.activate_at.is_some_and(|a| s * (best - a) >= 0)))
        {
            return None;
        }
        if s * (adverse - stop) <= 0 {
            return None;
        }
        if let Some(&next) = self.levels.get(position.levels_done as usize) {
            if s * (next - favourable) <= 0 {
                return None;
            }
        }
        if self.expires_at.is_some_and(|at| last_ms >= at) && !self.time_stop_off {
            return None;
        }
        QuietStep::new(grid, improved, best, stop, stop_price, considered)
    }

    /// The best-mark and trailing-stop part of `on_mark` at `tick` (ATR `basis`, candidate
    /// offset `trail`), when trailing is active and its candidate known in ticks: applied
    /// just before feeding a mark that may trigger something, so that `on_mark` finds it
    /// done (no new best, the candidate for this ATR recorded) and skips its decimals.
    pub(super) fn trailing_update(
        &self,
        position: &PositionState,
        tick: i64,
        basis: u64,
        trail: Option<i64>,
        grid: Grid,
    ) -> Option<QuietStep> {
        let q = trail?;
        if !self.ready
            || tick < self.band.0
            || tick > self.band.1
            || !position.trailing_active
            || position.over_leveraged
            || position.pending.is_some()
        {
            return None;
        }
        let s = self.side;
        let improved = s * (tick - self.best) > 0;
        let best = if improved { tick } else { self.best };
        let candidate = best - s * q;
        let mut stop = self.stop;
        let mut stop_price = None;
        if s * (candidate - stop) > 0 {
            let price = grid.try_price(candidate)?;
            if price > Decimal::ZERO {
                stop = candidate;
                stop_price = Some(price);
            }
        }
        QuietStep::new(grid, improved, best, stop, stop_price, Some(basis))
    }

    /// Applies a [`QuietStep`] to the position and to these triggers.
    pub(super) fn apply(&mut self, position: &mut PositionState, step: &QuietStep) {
        position.apply_quiet_mark(step.best_price, step.stop_price, step.basis);
        if step.best_price.is_some() {
            self.best = step.best;
            if !self.time_stop_off && position.time_stop_below_price.is_some() {
                self.time_stop_off = time_stop_passed(position);
            }
        }
        if step.stop_price.is_some() {
            self.stop = step.stop;
            self.stop_key = position.stop_price.serialize();
        }
        if step.basis.is_some() {
            self.fed_basis = step.basis;
        }
    }

    /// The triggers (the stop, the levels not done) strictly between `a` and `b`, in the
    /// order a continuous move from `a` to `b` reaches them.
    pub(super) fn crossings(&self, position: &PositionState, a: i64, b: i64, out: &mut Vec<i64>) {
        out.clear();
        let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
        if hi - lo < 2 {
            return;
        }
        let inside = |x: i64| x > lo && x < hi;
        if inside(self.stop) {
            out.push(self.stop);
        }
        let done = (position.levels_done as usize).min(self.levels.len());
        out.extend(self.levels[done..].iter().copied().filter(|&l| inside(l)));
        if out.len() > 1 {
            if a <= b {
                out.sort_unstable();
            } else {
                out.sort_unstable_by(|x, y| y.cmp(x));
            }
        }
    }
}

/// The policy's trailing activation by level, read once per job.
#[derive(Clone, Copy)]
pub(super) struct TrailRule {
    pub(super) configured: bool,
    pub(super) after_level: Option<u32>,
}

impl TrailRule {
    pub(super) fn of(policy: &ExitPolicy) -> Self {
        let config = policy.config();
        Self {
            configured: config.trail_atr.is_some() || config.trail_pct.is_some(),
            after_level: config.trail_after_level,
        }
    }

    /// Whether an inactive trailing stop activates on the next mark `on_mark` takes in.
    pub(super) fn activates_by_level(self, levels_done: u32) -> bool {
        self.configured && self.after_level.is_some_and(|n| levels_done >= n)
    }
}

/// The best mark reached the time stop's profit threshold, so the time stop never fires.
pub(super) fn time_stop_passed(position: &PositionState) -> bool {
    position
        .time_stop_below_price
        .is_some_and(|p| match position.side {
            PositionSide::Long => position.best_price >= p,
            PositionSide::Short => position.best_price <= p,
        })
}

/// The ATR before bar `i`, `None` while not ready.
pub(super) fn atr_at(atr: &[f64], i: usize) -> Option<f64> {
    Some(atr[i]).filter(|a| !a.is_nan())
}

/// The ATR as `on_mark` keys its trailing candidate on it.
pub(super) fn atr_basis(atr: Option<f64>) -> u64 {
    atr.map_or(0, f64::to_bits)
}
