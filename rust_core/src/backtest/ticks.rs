//! One position's exit rules over integers, for the backtest's default path: prices as
//! grid ticks, quantities as integer units of the lot grid's scale. The rules are those of
//! `crate::exit::position` (exit-rules.md), in the same order per update, restated over
//! ticks so that a bar costs integer compares instead of decimal arithmetic.
//!
//! The decimal state machine stays the reference: `BacktestOptions::exhaustive` replays
//! every job through it, and the tests (Rust properties over random walks and policies,
//! and every real symbol's klines in tests/backtest) require both to give the same fills,
//! trades, stops, levels and skips, to the last digit.
//!
//! Where the integers need a decimal to decide (a trailing distance within a hair of a
//! tick, a percent distance, a notional against `MIN_NOTIONAL` beyond `i128`), that one
//! value is computed the decimal way and read back as ticks. What cannot be held in
//! ticks at all (a level more than 2^40 ticks from the grid's base) makes the whole job
//! rerun on the decimal path ([`Unrepresentable`]), so no result depends on a shortcut.
//!
//! May not touch: fills, trades or result tables (the driver in `tick_replay` books
//! them), the prepared bars, or the decimal `PositionState` beyond reading the opening
//! plan from it.

use crate::exit::action::{ExitReason, PositionSide};
use crate::exit::bounds::{self, plausible_price, usable_atr};
use crate::exit::policy::{decimal_of, ExitPolicy, LadderUnit};
use crate::exit::position::PositionState;
use crate::fixed::{
    decimal_to_f64_fast, mantissa_at, small_mantissa_to_f64, Decimal, Rounding, POW10_I128,
};
use crate::rules::SymbolRules;

use super::prepare::{BarTicks, Grid};
use super::scan;
use super::thresholds::{trail_ticks, FAR_TICKS};

/// Something of a job that integers cannot hold exactly; the job reruns on the decimal
/// path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Unrepresentable;

/// Quantities as integer units of `10^-scale`, the finest scale of the lot grid.
#[derive(Debug, Clone, Copy)]
pub(super) struct QtyUnits {
    pub(super) scale: u32,
    pub(super) min_qty: i128,
    /// The `MARKET_LOT_SIZE` step in units (read once: every entry and ladder needs it).
    pub(super) step: i128,
}

impl QtyUnits {
    pub(super) fn new(rules: &SymbolRules) -> Result<Self, Unrepresentable> {
        let (step, min_qty) = (rules.qty_step(true), rules.min_qty(true));
        let scale = step.scale().max(min_qty.scale());
        Ok(Self {
            scale,
            min_qty: mantissa_at(min_qty, scale).ok_or(Unrepresentable)?,
            step: mantissa_at(step, scale).ok_or(Unrepresentable)?,
        })
    }

    pub(super) fn units(self, quantity: Decimal) -> Result<i128, Unrepresentable> {
        mantissa_at(quantity, self.scale)
            .or_else(|| mantissa_at(quantity.normalize(), self.scale))
            .ok_or(Unrepresentable)
    }

    #[inline]
    pub(super) fn decimal(self, units: i128) -> Result<Decimal, Unrepresentable> {
        Decimal::try_from_i128_with_scale(units, self.scale).map_err(|_| Unrepresentable)
    }
}

/// A job's constants for [`TickPosition`]: the grids, the rules and the policy's switches.
pub(super) struct TickRules<'a> {
    pub(super) grid: Grid,
    pub(super) rules: &'a SymbolRules,
    pub(super) policy: &'a ExitPolicy,
    /// Ticks of the plausible band; a tick outside it is checked the decimal way.
    pub(super) band: Option<(i64, i64)>,
    pub(super) qty: QtyUnits,
    pub(super) trail_configured: bool,
    pub(super) trail_after_level: Option<u32>,
    pub(super) breakeven_after_level: Option<u32>,
    pub(super) ratchet: bool,
    pub(super) max_hold_ms: Option<i64>,
    pub(super) open: OpenRules,
    /// `MIN_NOTIONAL` as a mantissa with a price's and a quantity's decimals, when it fits.
    min_notional: Option<i128>,
    /// The lowest tick whose price is above zero (see [`TickRules::positive`]).
    first_positive: i64,
}

impl<'a> TickRules<'a> {
    pub(super) fn new(
        grid: Grid,
        rules: &'a SymbolRules,
        policy: &'a ExitPolicy,
        band: Option<(i64, i64)>,
    ) -> Result<Self, Unrepresentable> {
        let config = policy.config();
        let qty = QtyUnits::new(rules)?;
        Ok(Self {
            grid,
            rules,
            policy,
            band,
            qty,
            trail_configured: config.trail_atr.is_some() || config.trail_pct.is_some(),
            trail_after_level: config.trail_after_level,
            breakeven_after_level: config.breakeven_after_level,
            ratchet: config.ratchet_to_previous_level,
            max_hold_ms: config.max_hold_ms,
            open: OpenRules::new(rules, policy, grid, qty),
            min_notional: mantissa_at(rules.min_notional(), grid.scale + qty.scale),
            first_positive: first_positive(grid),
        })
    }

    /// Whether the mark at tick `k` is one `on_mark` takes in (positive, in the band).
    #[inline]
    pub(super) fn plausible(&self, k: i64) -> bool {
        match self.band {
            Some((lo, hi)) if k >= lo && k <= hi => true,
            _ => plausible_price(self.grid.price(k), self.rules),
        }
    }

    /// Whether the price of tick `k` is above zero.
    #[inline]
    pub(super) fn positive(&self, k: i64) -> bool {
        k >= self.first_positive
    }

    /// `quantize_price` toward the side's profit, as ticks (a stop is rounded so).
    fn stop_ticks(&self, side: i64, price: Decimal) -> Result<i64, Unrepresentable> {
        let rounding = if side > 0 {
            Rounding::Up
        } else {
            Rounding::Down
        };
        self.grid
            .ticks(self.rules.quantize_price(price, rounding))
            .ok_or(Unrepresentable)
    }

    /// The constants of [`TickRules::entry_units`] for entries of `notional` (read once for
    /// the run's default size); `None` when a product leaves `i128`.
    pub(super) fn sizing(&self, notional: Decimal) -> Option<Sizing> {
        let (grid, qty) = (self.grid, self.qty);
        Some(Sizing {
            numerator: mul(
                notional.mantissa(),
                *POW10_I128.get((grid.scale + qty.scale) as usize)?,
            )?,
            price_factor: mul(POW10_I128[notional.scale() as usize], qty.step)?,
        })
    }

    /// The lot units an entry of a notional (its [`TickRules::sizing`]) buys at the open
    /// tick `k` (`quantize_qty(notional / price)` of the decimal path), or the skip reason;
    /// `None` when the integers cannot settle it (the lot grid is not the step grid, the
    /// quotient lies within a hair of a step, or a product leaves `i128`).
    pub(super) fn entry_units(&self, sizing: Option<Sizing>, k: i64) -> Option<Result<i128, u8>> {
        const MARGIN: i128 = 100_000_000_000_000_000_000;
        if !self.open.aligned_lots {
            return None;
        }
        let Sizing {
            numerator,
            price_factor,
        } = sizing?;
        let qty = self.qty;
        let price = self.grid.mantissa(k);
        let step = qty.step;
        // notional / price in units, over the step: N * 10^(gs + qs) / (P * 10^ns * step).
        // (A price of at least 1 and a positive product: `P * (10^ns * step)` fits exactly
        // when `(P * 10^ns) * step` does.)
        let denominator = mul(price, price_factor)?;
        if numerator <= 0 || denominator <= 0 {
            return None;
        }
        let (steps, remainder) = div_rem(numerator, denominator);
        // The decimal quotient carries 28 digits: it floors alike unless the exact one
        // lies within 1e-20 (relative) below the next step. As `denominator - remainder` is
        // at least 1, that needs `denominator * (steps + 1)` of at least 1e20: below it (the
        // usual size) no 128-bit multiply is needed to tell.
        let near_step = || -> Option<bool> {
            let next = mul(denominator, steps + 1)?;
            if denominator < 1_000_000_000_000_000_000 && next < MARGIN {
                return Some(false);
            }
            Some(mul(denominator - remainder, MARGIN)? <= next)
        };
        if remainder != 0 && near_step()? {
            return None;
        }
        let units = steps * step;
        if units <= 0 || units < qty.min_qty {
            return Some(Err(super::BELOW_MIN_QTY));
        }
        Some(match self.below_min_notional(units, k) {
            Ok(false) => Ok(units),
            Ok(true) => Err(super::BELOW_MIN_NOTIONAL),
            Err(_) => return None,
        })
    }

    /// `remainder` units at the price of tick `k` are below `MIN_NOTIONAL`.
    #[allow(clippy::inline_always)]
    #[inline(always)]
    fn below_min_notional(&self, remainder: i128, k: i64) -> Result<bool, Unrepresentable> {
        let price = self.grid.mantissa(k);
        if let (Some(notional), Some(minimum)) = (mul(remainder, price), self.min_notional) {
            return Ok(notional < minimum);
        }
        // Beyond 128 bits: the decimal product, as the state machine computes it.
        Ok(self.qty.decimal(remainder)? * self.grid.price(k) < self.rules.min_notional())
    }
}

/// The lowest tick `k` with `base + k * step > 0` (the grid's step is positive): one past
/// `floor(-base / step)`, clamped to the `i64` range.
fn first_positive(grid: Grid) -> i64 {
    let k = (-grid.base).div_euclid(grid.step) + 1;
    i64::try_from(k).unwrap_or(if k > 0 { i64::MAX } else { i64::MIN })
}

/// An entry notional as [`TickRules::entry_units`] divides it: `N * 10^(gs + qs)` over the
/// price times `10^ns * step` (`gs`, `qs`, `ns`: the decimals of the grid, the lot units and
/// the notional).
#[derive(Debug, Clone, Copy)]
pub(super) struct Sizing {
    numerator: i128,
    price_factor: i128,
}

/// `(a / b, a % b)` for positive `b`, by a 32- or 64-bit division when both fit (several
/// times cheaper than the 128-bit one; the same quotient and remainder).
#[allow(clippy::inline_always)] // a few instructions; out of line it was a call per fee
#[inline(always)]
pub(super) fn div_rem(a: i128, b: i128) -> (i128, i128) {
    if b == 1 {
        return (a, 0);
    }
    // Non-negative operands below 2^32 (most sizes and price offsets): the 32-bit
    // division, again several times cheaper than the 64-bit one; the same truncation.
    if let (Ok(a), Ok(b)) = (u32::try_from(a), u32::try_from(b)) {
        return (i128::from(a / b), i128::from(a % b));
    }
    match (i64::try_from(a), i64::try_from(b)) {
        (Ok(a), Ok(b)) => (i128::from(a / b), i128::from(a % b)),
        _ => (a / b, a % b),
    }
}

/// `a * b`, or `None` when it leaves `i128`: where both fit 64 bits (nearly always) one
/// widening multiply, which cannot overflow, instead of the checked 128-bit multiply (a
/// dozen instructions and a branch per call in the booking of every fill).
#[allow(clippy::inline_always)] // a few instructions, on every fill's path
#[inline(always)]
pub(super) fn mul(a: i128, b: i128) -> Option<i128> {
    match (i64::try_from(a), i64::try_from(b)) {
        (Ok(a), Ok(b)) => Some(i128::from(a) * i128::from(b)),
        _ => a.checked_mul(b),
    }
}

/// A count of ticks, clamped to [`FAR_TICKS`] (beyond every bar price).
fn ticks_of(quotient: i128) -> Option<i64> {
    i64::try_from(quotient.min(i128::from(FAR_TICKS))).ok()
}

/// `whole * ticks` clamped to [`FAR_TICKS`] for a whole factor's [`Factor::whole_operands`],
/// when `mantissa * ticks` stays within 64 bits (the quotient's fast path needs it).
#[allow(clippy::inline_always)]
#[inline(always)]
fn whole_times(mantissa: i64, whole: i64, ticks: i64) -> Option<i64> {
    mantissa.checked_mul(ticks)?;
    Some((whole * ticks).min(FAR_TICKS))
}

/// A decimal factor as `mantissa / 10^scale`.
#[derive(Debug, Clone, Copy)]
pub(super) struct Factor {
    mantissa: i128,
    scale: u32,
    /// The mantissa and `10^scale` when both fit 64 bits: the fast path's operands, read
    /// once per job instead of checked at every quotient.
    small: Option<(i64, i64)>,
    /// The factor's value when it is a whole number (levels at 1R, 2R, 3R): the fast path
    /// then multiplies instead of dividing.
    whole: Option<i64>,
}

impl Factor {
    fn of(value: Decimal) -> Self {
        Self::new(value.mantissa(), value.scale())
    }

    fn new(mantissa: i128, scale: u32) -> Self {
        let small = match (
            i64::try_from(mantissa),
            POW10_I128.get(scale as usize).map(|&p| i64::try_from(p)),
        ) {
            (Ok(mantissa), Some(Ok(power))) => Some((mantissa, power)),
            _ => None,
        };
        Self {
            mantissa,
            scale,
            small,
            whole: small.and_then(|(m, p)| (m % p == 0).then_some(m / p)),
        }
    }

    /// `self * ticks`, clamped to [`FAR_TICKS`], for a whole factor where the 64-bit path of
    /// [`Factor::quotient`] takes it (a ticks' unit, the grid's step, below 2^32 and at most
    /// 28 decimals in all):
    /// then `floor_times(ticks, 1, ..)` and `ceil_times(ticks, 1, ..)` give this value.
    /// `None` sends the caller to them.
    #[allow(clippy::inline_always)]
    #[inline(always)]
    fn whole_ticks(self, ticks: i64, small_step: bool, grid_scale: u32) -> Option<i64> {
        let (mantissa, whole) = self.whole_operands(small_step, grid_scale)?;
        whole_times(mantissa, whole, ticks)
    }

    /// The 64-bit mantissa and whole value of [`Factor::whole_ticks`], when it applies.
    #[allow(clippy::inline_always)]
    #[inline(always)]
    fn whole_operands(self, small_step: bool, grid_scale: u32) -> Option<(i64, i64)> {
        match (self.small, self.whole) {
            (Some((mantissa, _)), Some(whole)) if small_step && self.scale + grid_scale <= 28 => {
                Some((mantissa, whole))
            }
            _ => None,
        }
    }

    /// `(q, r, d)` with `self * numerator = q * d + r` and `d = denominator * 10^scale`, for
    /// positive operands, when every product the decimal path forms on the way (`self *
    /// numerator * unit`, with `unit_scale` decimals) stays exact (96 bits, 28 decimals).
    #[allow(clippy::inline_always)]
    #[inline(always)]
    fn quotient(
        self,
        numerator: i128,
        denominator: i128,
        unit: i128,
        unit_scale: u32,
    ) -> Option<(i128, i128, i128)> {
        if self.scale + unit_scale > 28 {
            return None;
        }
        // The usual operands (a factor of a few digits, a price mantissa or a count of
        // ticks): 64-bit products, each one instruction instead of a checked 128-bit
        // multiply. A product below 2^63 times a unit below 2^32 stays below 2^96, so
        // the range check passes as it does below; the same quotient and remainder.
        if let (Some((mantissa, power)), Ok(numerator), Ok(denominator), true) = (
            self.small,
            i64::try_from(numerator),
            i64::try_from(denominator),
            unit.unsigned_abs() < 1 << 32,
        ) {
            if let (Some(product), Some(scaled)) = (
                mantissa.checked_mul(numerator),
                denominator.checked_mul(power),
            ) {
                // A whole factor over 1: `mantissa * numerator` is a multiple of `power`.
                if let (1, Some(whole)) = (denominator, self.whole) {
                    return Some((i128::from(whole) * i128::from(numerator), 0, scaled.into()));
                }
                let (quotient, remainder) = div_rem(product.into(), scaled.into());
                return Some((quotient, remainder, scaled.into()));
            }
        }
        let product = self.mantissa.checked_mul(numerator)?;
        if product.checked_mul(unit)?.unsigned_abs() >= 1 << 96 {
            return None;
        }
        let denominator = denominator.checked_mul(POW10_I128[self.scale as usize])?;
        let (quotient, remainder) = div_rem(product, denominator);
        Some((quotient, remainder, denominator))
    }

    /// `ceil(self * numerator / denominator)` (see [`Factor::quotient`]), when it fits the
    /// tick range.
    #[allow(clippy::inline_always)]
    #[inline(always)]
    fn ceil_times(
        self,
        numerator: i128,
        denominator: i128,
        unit: i128,
        unit_scale: u32,
    ) -> Option<i64> {
        let (quotient, remainder, _) = self.quotient(numerator, denominator, unit, unit_scale)?;
        ticks_of(quotient + i128::from(remainder > 0))
    }

    /// `floor(self * numerator / denominator)` (see [`Factor::quotient`]). With `rounded`,
    /// the decimal path divides too (to 28 digits), so a quotient within 1e-20 (relative)
    /// of an integer without being one is left to it.
    #[allow(clippy::inline_always)]
    #[inline(always)]
    fn floor_times(
        self,
        numerator: i128,
        denominator: i128,
        unit: i128,
        unit_scale: u32,
        rounded: bool,
    ) -> Option<i64> {
        const MARGIN: i128 = 100_000_000_000_000_000_000;
        let (quotient, remainder, denominator) =
            self.quotient(numerator, denominator, unit, unit_scale)?;
        if rounded && remainder != 0 {
            let bound = denominator.checked_mul(quotient + 1)?;
            let near = remainder.min(denominator - remainder).checked_mul(MARGIN)?;
            if near <= bound {
                return None;
            }
        }
        ticks_of(quotient)
    }
}

/// The policy's opening rules, read once per job: floats of its decimals for the
/// estimates, and the decimals as mantissas where the integers decide exactly.
#[allow(clippy::struct_excessive_bools)] // independent facts of the policy and the symbol
pub(super) struct OpenRules {
    stop_atr: Option<f64>,
    fallback_stop_pct: (f64, Factor),
    min_stop_pct: (f64, Factor),
    max_stop_pct: (f64, Factor),
    max_margin_loss: Option<(f64, Factor)>,
    min_allowed_stop_pct: f64,
    ladder_at: Vec<(f64, Factor)>,
    ladder_by_r: bool,
    /// Cumulative fractions of the original size, `None` for exactly 1 (the remainder).
    cum_fractions: Vec<Option<Factor>>,
    activate_r: Option<Factor>,
    activate_pct: Option<Factor>,
    time_stop_unless_r: Option<Factor>,
    breakeven_pct: Factor,
    /// Trailing is active from the start (configured, with no activation condition).
    immediate_trailing: bool,
    /// Every ladder level at a whole multiple of R where [`Factor::whole_ticks`] applies:
    /// each factor's 64-bit mantissa and whole value (the fast path of `open_ladder`).
    whole_levels: Option<Vec<(i64, i64)>>,
    /// For each of `cum_fractions`, its mantissa and `10^scale * step` when its target is one
    /// 64-bit division of the usual size (see `TickPosition::open_ladder`).
    fraction_divisors: Vec<Option<(i64, i64)>>,
    /// The grid's step is below 2^32: with few enough decimals (see [`Factor::whole_ticks`])
    /// a whole factor of R is then one multiplication.
    small_step: bool,
    /// The lot grid from `minQty` is the plain step grid, so flooring is one division.
    aligned_lots: bool,
    /// The symbol has a tick (a symbol not trading yet may have none: its "one tick
    /// beyond the entry" is then zero, which the decimal path handles).
    has_tick: bool,
}

impl OpenRules {
    fn new(rules: &SymbolRules, policy: &ExitPolicy, grid: Grid, qty: QtyUnits) -> Self {
        let (config, derived) = (policy.config(), policy.derived());
        let float = decimal_to_f64_fast;
        let both = |d: Decimal| (float(d), Factor::of(d));
        let fraction_divisor = |f: Decimal| {
            let (mantissa, scale) = (i64::try_from(f.mantissa()).ok()?, f.scale());
            let power = i64::try_from(*POW10_I128.get(scale as usize)?).ok()?;
            let step = i64::try_from(qty.step).ok()?;
            (scale + qty.scale <= 28).then_some((mantissa, power.checked_mul(step)?))
        };
        let ladder_at: Vec<(f64, Factor)> = config
            .ladder
            .iter()
            .zip(&derived.ladder_at)
            .map(|(l, &at)| (l.at, Factor::of(at)))
            .collect();
        let small_step = grid.step.unsigned_abs() < 1 << 32;
        Self {
            whole_levels: (config.ladder_unit == LadderUnit::R)
                .then(|| {
                    ladder_at
                        .iter()
                        .map(|(_, f)| f.whole_operands(small_step, grid.scale))
                        .collect()
                })
                .flatten(),
            small_step,
            fraction_divisors: derived
                .cum_fractions
                .iter()
                .map(|&f| fraction_divisor(f))
                .collect(),
            stop_atr: derived.stop_atr.map(float),
            fallback_stop_pct: both(derived.fallback_stop_pct),
            min_stop_pct: both(derived.min_stop_pct),
            max_stop_pct: both(derived.max_stop_pct),
            max_margin_loss: derived.max_margin_loss.map(both),
            min_allowed_stop_pct: float(derived.min_allowed_stop_pct),
            ladder_at,
            ladder_by_r: config.ladder_unit == LadderUnit::R,
            cum_fractions: derived
                .cum_fractions
                .iter()
                .map(|&f| (f != Decimal::ONE).then(|| Factor::of(f)))
                .collect(),
            activate_r: derived.trail_activate_r.map(Factor::of),
            activate_pct: derived.trail_activate_pct.map(Factor::of),
            time_stop_unless_r: derived.time_stop_unless_r.map(Factor::of),
            breakeven_pct: Factor::of(derived.breakeven_pct),
            immediate_trailing: (config.trail_atr.is_some() || config.trail_pct.is_some())
                && config.trail_activate_r.is_none()
                && config.trail_activate_pct.is_none()
                && config.trail_after_level.is_none(),
            // `qty_step` is positive (the precision's unit when the filter's step is 0).
            aligned_lots: (rules.min_qty(true) % rules.qty_step(true)).is_zero(),
            has_tick: rules.tick_size() > Decimal::ZERO,
        }
    }
}

/// How an integer opening ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Opening {
    Opened,
    /// The allowed stop is below the policy minimum: the entry is skipped.
    OverLeveraged,
    /// The floats left something open (or an input is outside the bounds, which the
    /// decimal path reports): open the decimal way instead.
    Unsettled,
}

/// `floor(x)` of a non-negative float quotient of ticks when it lies more than 1e-6 from
/// an integer and below 2^26 ticks (where the float is within 1e-7 tick of the exact
/// quotient: see `thresholds::trail_ticks`); `None` otherwise.
fn settled_floor(x: f64) -> Option<i64> {
    const MAX_TICKS: f64 = (1u64 << 26) as f64;
    if !(0.0..MAX_TICKS).contains(&x) {
        return None;
    }
    let whole = x as i64;
    let fraction = x - whole as f64;
    (1e-6..=1.0 - 1e-6).contains(&fraction).then_some(whole)
}

/// The ATR known before the bar being replayed, with the trailing distance in whole ticks
/// it gives (`thresholds::trail_ticks`), worked out when first needed: most bars have no
/// trailing stop to move.
pub(super) struct BarAtr<'a> {
    pub(super) atr: Option<f64>,
    /// The ATR's bits, as `on_mark` keys its trailing candidate on them (0 for none).
    pub(super) basis: u64,
    trail: std::cell::OnceCell<Option<i64>>,
    grid: Grid,
    policy: &'a ExitPolicy,
}

impl<'a> BarAtr<'a> {
    pub(super) fn new(atr: Option<f64>, grid: Grid, policy: &'a ExitPolicy) -> Self {
        Self {
            atr,
            basis: atr.map_or(0, f64::to_bits),
            trail: std::cell::OnceCell::new(),
            grid,
            policy,
        }
    }

    fn trail(&self) -> Option<i64> {
        *self
            .trail
            .get_or_init(|| trail_ticks(self.grid, self.policy, self.atr))
    }
}

/// An exit the position asks for: close `quantity` units for `reason`, triggered at
/// tick `trigger`.
#[derive(Debug, Clone, Copy)]
pub(super) struct TickAction {
    pub(super) reason: ExitReason,
    pub(super) trigger: i64,
    pub(super) quantity: i128,
    pub(super) sequence: u64,
}

/// A position's exit state in ticks and units (see the module header). A LONG has
/// `side` +1, a SHORT -1: `side * (a - b) > 0` reads "a is beyond b toward profit".
#[derive(Debug, Clone, Default)]
pub(super) struct TickPosition {
    pub(super) side: i64,
    pub(super) entry: i64,
    /// Live quantity, in units.
    pub(super) quantity: i128,
    pub(super) stop: i64,
    pub(super) stop_reason: Option<ExitReason>,
    pub(super) best: i64,
    pub(super) levels: Vec<i64>,
    /// Cumulative units closed once each level is done.
    pub(super) targets: Vec<i128>,
    /// Units closed by take-profit fills.
    pub(super) closed: i128,
    pub(super) levels_done: u32,
    /// The first best tick at which trailing activates by price.
    pub(super) activate_at: Option<i64>,
    pub(super) trailing_active: bool,
    /// ATR bits of the last trailing candidate (the same ATR and no new best: the same
    /// candidate, skipped as `on_mark` skips it).
    pub(super) trail_basis: Option<u64>,
    /// The first best tick from which the time stop no longer fires.
    pub(super) time_off_at: Option<i64>,
    /// Open time plus `max_hold_ms`.
    pub(super) expires_at: Option<i64>,
    /// The breakeven stop, when the policy has one.
    pub(super) breakeven: Option<i64>,
    pub(super) sequence: u64,
}

impl TickPosition {
    /// The integer form of a freshly opened decimal position (`opened_at_ms` set, no
    /// liquidation price, nothing done yet), refilling `self`'s buffers.
    pub(super) fn load(
        &mut self,
        state: &PositionState,
        opened_at_ms: i64,
        r: &TickRules<'_>,
    ) -> Result<(), Unrepresentable> {
        let grid = r.grid;
        let side = match state.side {
            PositionSide::Long => 1,
            PositionSide::Short => -1,
        };
        let ticks = |price: Decimal| grid.ticks(price).ok_or(Unrepresentable);
        let reaching =
            |price: Decimal| grid.first_tick_reaching(side, price).ok_or(Unrepresentable);
        self.side = side;
        self.entry = ticks(state.entry_price)?;
        self.quantity = r.qty.units(state.quantity)?;
        self.stop = ticks(state.stop_price)?;
        self.stop_reason = None;
        self.best = ticks(state.best_price)?;
        self.levels.clear();
        for &price in &state.ladder_prices {
            self.levels.push(ticks(price)?);
        }
        self.targets.clear();
        for &target in &state.ladder_targets {
            self.targets.push(r.qty.units(target)?);
        }
        self.closed = 0;
        self.levels_done = 0;
        self.activate_at = state.trail_activate_price.map(reaching).transpose()?;
        self.trailing_active = state.trailing_active;
        self.trail_basis = None;
        self.time_off_at = state.time_stop_below_price.map(reaching).transpose()?;
        self.expires_at = r.max_hold_ms.map(|h| opened_at_ms.saturating_add(h));
        self.breakeven = match r.breakeven_after_level {
            Some(_) => {
                let pct = r.policy.derived().breakeven_pct;
                let entry = state.entry_price;
                let target = if side > 0 {
                    entry + pct * entry
                } else {
                    entry - pct * entry
                };
                Some(r.stop_ticks(side, target)?)
            }
            None => None,
        };
        self.sequence = 0;
        Ok(())
    }

    /// Opens a position the integer way (`PositionState::open` without a liquidation
    /// price): the initial stop, R, the ladder and its targets, the trailing activation,
    /// the time stop's threshold and the breakeven stop, refilling `self`'s buffers.
    /// Floats estimate each distance in ticks; one within a hair of a tick, or any input
    /// the decimal path would refuse, answers [`Opening::Unsettled`] (`self` is then to be
    /// loaded from the decimal state instead).
    #[allow(clippy::too_many_arguments)] // one entry's facts
    pub(super) fn open(
        &mut self,
        side: i64,
        entry: i64,
        units: i128,
        leverage: u32,
        confidence: Option<f64>,
        atr: Option<f64>,
        opened_at_ms: i64,
        r: &TickRules<'_>,
    ) -> Opening {
        const MAX_UNITS_OF_1E12: i128 = 1_000_000_000_000;
        let o = &r.open;
        let grid = r.grid;
        if !o.has_tick
            || !bounds::leverage_ok(leverage)
            || !bounds::confidence_ok(confidence)
            || !bounds::event_time_ok(opened_at_ms)
            || !r.band.is_some_and(|(lo, hi)| entry >= lo && entry <= hi)
            || units > MAX_UNITS_OF_1E12 * POW10_I128[r.qty.scale as usize]
        {
            return Opening::Unsettled;
        }
        let price = grid.mantissa(entry);
        // `to_f64` of the entry's decimal, without building it where one division gives it.
        let price_f = small_mantissa_to_f64(price, grid.scale)
            .unwrap_or_else(|| decimal_to_f64_fast(grid.price(entry)));
        // The initial stop: ATR (or fallback) distance clamped to [min, max] % and the
        // margin cap; a LONG's `ceil(entry - d)` is `entry - floor(d / tick)` ticks.
        let stop_ticks = match Self::stop_ticks(price, price_f, leverage, atr, r) {
            Ok(ticks) => ticks,
            Err(ending) => return ending,
        };
        // A distance under one tick rounds onto the entry: the stop is one tick away.
        let r_ticks = stop_ticks.max(1);
        self.side = side;
        self.entry = entry;
        self.quantity = units;
        self.stop = entry - side * r_ticks;
        self.stop_reason = None;
        self.best = entry;
        if !self.open_ladder(r_ticks, price_f, units, confidence, r)
            || !self.open_thresholds(price, r_ticks, opened_at_ms, r)
        {
            return Opening::Unsettled;
        }
        self.closed = 0;
        self.levels_done = 0;
        self.sequence = 0;
        Opening::Opened
    }

    /// The initial stop's distance in whole ticks (`floor(distance / tick)`): the ATR
    /// (or fallback) distance clamped to the policy's percentages of the entry and capped by
    /// the margin loss; `Some(None)` when over-leveraged, `None` when unsettled. Floats pick
    /// the binding candidate (each within a few ulps of its decimal; a near tie is left to
    /// the decimals); a percentage of the entry is then floored exactly, an ATR distance
    /// by floats away from a tick.
    fn stop_ticks(
        price: i128,
        price_f: f64,
        leverage: u32,
        atr: Option<f64>,
        r: &TickRules<'_>,
    ) -> Result<i64, Opening> {
        #[derive(Clone, Copy)]
        enum Source {
            Atr,
            Pct(Factor),
            Cap(Factor),
        }
        let (o, grid) = (&r.open, r.grid);
        let near = |a: f64, b: f64| (a - b).abs() <= 1e-9 * a.abs().max(b.abs());
        let pct = |(f, factor): (f64, Factor)| (Source::Pct(factor), f * price_f);
        let (mut source, mut distance) = match (o.stop_atr, usable_atr(atr)) {
            // An ATR too small for a 28-decimal number takes the fallback there.
            (Some(_), Some(a)) if a < 1e-20 => return Err(Opening::Unsettled),
            (Some(k), Some(a)) => (Source::Atr, k * a),
            _ => pct(o.fallback_stop_pct),
        };
        for (bound, floor) in [(o.min_stop_pct, true), (o.max_stop_pct, false)] {
            let (bound_source, value) = pct(bound);
            if near(value, distance) {
                return Err(Opening::Unsettled);
            }
            if (floor && distance < value) || (!floor && distance > value) {
                (source, distance) = (bound_source, value);
            }
        }
        if let Some((m, factor)) = o.max_margin_loss {
            let cap = m * price_f / f64::from(leverage);
            let minimum = o.min_allowed_stop_pct * price_f;
            if near(cap, minimum) || near(cap, distance) {
                return Err(Opening::Unsettled);
            }
            if cap < minimum {
                return Err(Opening::OverLeveraged);
            }
            if cap < distance {
                (source, distance) = (Source::Cap(factor), cap);
            }
        }
        let (step, scale) = (grid.step, grid.scale);
        match source {
            Source::Atr => settled_floor(distance * grid.per_step_f),
            Source::Pct(f) => f.floor_times(price, step, 1, scale, false),
            Source::Cap(f) => f.floor_times(price, step * i128::from(leverage), 1, scale, true),
        }
        .ok_or(Opening::Unsettled)
    }

    /// The ladder levels and targets of an opening (see [`TickPosition::open`]); false
    /// when the floats leave a level unsettled.
    fn open_ladder(
        &mut self,
        r_ticks: i64,
        price_f: f64,
        units: i128,
        confidence: Option<f64>,
        r: &TickRules<'_>,
    ) -> bool {
        let (o, grid, side, entry) = (&r.open, r.grid, self.side, self.entry);
        // The ladder: `entry ± at * m * (R or entry)`, rounded toward the entry, at least
        // one tick beyond it.
        let m = r.policy.ladder_multiplier(confidence);
        #[allow(clippy::float_cmp)] // exactly 1 is the decimal path's own test
        let whole = o.whole_levels.as_deref().filter(|_| m == 1.0);
        match whole.and_then(|whole| self.whole_levels(whole, r_ticks, r)) {
            Some(true) => return self.open_targets(units, r),
            Some(false) => return false,
            None => {}
        }
        let unit_f = if o.ladder_by_r {
            r_ticks as f64 * grid.step_f
        } else {
            price_f
        };
        let price = grid.mantissa(entry);
        self.levels.clear();
        for &(at, exact) in &o.ladder_at {
            // Without a stretch the decimal path multiplies the policy's own decimal `at`:
            // integers settle it exactly (levels at whole multiples of R are common).
            #[allow(clippy::float_cmp)] // exactly 1 is the decimal path's own test
            let ticks = if m == 1.0 {
                if o.ladder_by_r {
                    exact
                        .whole_ticks(r_ticks, o.small_step, grid.scale)
                        .or_else(|| {
                            exact.floor_times(i128::from(r_ticks), 1, grid.step, grid.scale, false)
                        })
                } else {
                    exact.floor_times(price, grid.step, 1, grid.scale, false)
                }
            } else {
                settled_floor(at * m * unit_f * grid.per_step_f)
            };
            let Some(ticks) = ticks else {
                return false;
            };
            let level = entry + side * ticks.max(1);
            if !r.positive(level) {
                return false;
            }
            self.levels.push(level);
        }
        self.open_targets(units, r)
    }

    /// The levels at whole multiples of R ([`OpenRules::whole_levels`]) `r_ticks` from the
    /// entry, at least one tick beyond it: `Some(false)` when one is not a positive price,
    /// `None` when a product leaves the 64-bit path (the general one then decides).
    #[allow(clippy::inline_always)]
    #[inline(always)]
    fn whole_levels(
        &mut self,
        whole: &[(i64, i64)],
        r_ticks: i64,
        r: &TickRules<'_>,
    ) -> Option<bool> {
        self.levels.clear();
        for &(mantissa, times) in whole {
            let level = self.entry + self.side * whole_times(mantissa, times, r_ticks)?.max(1);
            if !r.positive(level) {
                return Some(false);
            }
            self.levels.push(level);
        }
        Some(true)
    }

    /// The ladder's targets: cumulative fractions of `units` floored to the lot step; false
    /// when a product leaves the exact range.
    #[allow(clippy::inline_always)]
    #[inline(always)]
    fn open_targets(&mut self, units: i128, r: &TickRules<'_>) -> bool {
        let o = &r.open;
        let step = r.qty.step;
        let units_64 = i64::try_from(units).ok();
        self.targets.clear();
        for (fraction, &divisor) in o.cum_fractions.iter().zip(&o.fraction_divisors) {
            let target = match fraction {
                None => units,
                Some(f) => {
                    // The usual size: one 64-bit product and division, the same floor.
                    if let (Some((mantissa, divisor)), Some(units)) = (divisor, units_64) {
                        if let Some(product) = mantissa.checked_mul(units) {
                            self.targets.push(i128::from(product / divisor) * step);
                            continue;
                        }
                    }
                    let product = f.mantissa * units;
                    if product.unsigned_abs() >= 1 << 96 || f.scale + r.qty.scale > 28 {
                        return false;
                    }
                    div_rem(product, POW10_I128[f.scale as usize] * step).0 * step
                }
            };
            self.targets.push(target);
        }
        true
    }

    /// The trailing activation, the time stop's threshold and the breakeven stop of an
    /// opening (see [`TickPosition::open`]); false when a product leaves the exact range.
    #[allow(clippy::inline_always)]
    #[inline(always)]
    fn open_thresholds(
        &mut self,
        price: i128,
        r_ticks: i64,
        opened_at_ms: i64,
        r: &TickRules<'_>,
    ) -> bool {
        let (o, grid, side, entry) = (&r.open, r.grid, self.side, self.entry);
        // Thresholds at `entry ± k * R` or `entry ± pct * entry`: the first tick reaching
        // them is `entry ± ceil(k * R_ticks)` or `entry ± ceil(pct * price / tick)`.
        let (step_m, scale) = (grid.step, grid.scale);
        let by_r = |k: Factor| {
            k.whole_ticks(r_ticks, o.small_step, scale)
                .or_else(|| k.ceil_times(i128::from(r_ticks), 1, step_m, scale))
        };
        let by_pct = |pct: Factor| pct.ceil_times(price, step_m, 1, scale);
        let beyond = |ticks: i64| entry.saturating_add(side * ticks);
        // Straight tests rather than an iterator over the optional thresholds: this runs
        // at every entry.
        let mut activate: Option<i64> = None;
        if let Some(k) = o.activate_r {
            let Some(ticks) = by_r(k) else {
                return false;
            };
            activate = Some(ticks);
        }
        if let Some(pct) = o.activate_pct {
            let Some(ticks) = by_pct(pct) else {
                return false;
            };
            // The nearer threshold wins: either condition activates.
            activate = Some(activate.map_or(ticks, |t| t.min(ticks)));
        }
        self.activate_at = activate.map(beyond);
        self.trailing_active = o.immediate_trailing;
        self.trail_basis = None;
        self.time_off_at = None;
        if let Some(k) = o.time_stop_unless_r {
            let Some(ticks) = by_r(k) else {
                return false;
            };
            self.time_off_at = Some(beyond(ticks));
        }
        self.expires_at = r.max_hold_ms.map(|h| opened_at_ms.saturating_add(h));
        self.breakeven = match r.breakeven_after_level {
            Some(_) => match by_pct(o.breakeven_pct) {
                Some(ticks) => Some(beyond(ticks)),
                None => return false,
            },
            None => None,
        };
        true
    }

    /// The reason a stop hit carries: the rule that moved the stop last.
    pub(super) fn stop_reason(&self) -> ExitReason {
        self.stop_reason.unwrap_or(ExitReason::StopLoss)
    }

    fn tighten(&mut self, candidate: i64, reason: ExitReason) {
        if self.side * (candidate - self.stop) > 0 {
            self.stop = candidate;
            self.stop_reason = Some(reason);
        }
    }

    fn emit(&mut self, quantity: i128, reason: ExitReason, trigger: i64) -> TickAction {
        self.sequence = self.sequence.saturating_add(1);
        TickAction {
            reason,
            trigger,
            quantity,
            sequence: self.sequence,
        }
    }

    /// Whether a best at tick `best` passed the time stop's profit threshold.
    #[inline]
    fn time_stop_off(&self, best: i64) -> bool {
        self.time_off_at
            .is_some_and(|t| self.side * (best - t) >= 0)
    }

    /// Whether a best at tick `best` activates trailing by price.
    #[inline]
    fn activates(&self, best: i64) -> bool {
        self.activate_at
            .is_some_and(|a| self.side * (best - a) >= 0)
    }

    /// The trailing candidate at the best tick `best` the decimal way (a percent or
    /// fallback distance, or an ATR distance the floats left open); `None` when it is
    /// not a positive price.
    fn exact_candidate(
        &self,
        best: i64,
        atr: Option<f64>,
        r: &TickRules<'_>,
    ) -> Result<Option<i64>, Unrepresentable> {
        let derived = r.policy.derived();
        let best_price = r.grid.price(best);
        let distance = match (
            derived.trail_pct,
            r.policy.config().trail_atr,
            usable_atr(atr),
        ) {
            (Some(pct), _, _) => pct * best_price,
            (None, Some(k), Some(a)) => decimal_of("trail_atr", k * a)
                .unwrap_or_else(|_| derived.fallback_stop_pct * best_price),
            _ => derived.fallback_stop_pct * best_price,
        };
        let target = if self.side > 0 {
            best_price - distance
        } else {
            best_price + distance
        };
        let rounding = if self.side > 0 {
            Rounding::Up
        } else {
            Rounding::Down
        };
        let candidate = r.rules.quantize_price(target, rounding);
        if candidate <= Decimal::ZERO {
            return Ok(None);
        }
        r.grid.ticks(candidate).map(Some).ok_or(Unrepresentable)
    }

    /// The trailing candidate at `best`: `trail` ticks behind it when the floats settled
    /// the ATR distance ([`super::thresholds::trail_ticks`]), else the decimal way.
    #[inline]
    fn candidate(
        &self,
        best: i64,
        bar: &BarAtr<'_>,
        r: &TickRules<'_>,
    ) -> Result<Option<i64>, Unrepresentable> {
        match bar.trail() {
            Some(q) => {
                let candidate = best - self.side * q;
                Ok(r.positive(candidate).then_some(candidate))
            }
            None => self.exact_candidate(best, bar.atr, r),
        }
    }

    /// One mark at tick `mark` (`on_mark` of the decimal state machine): best mark,
    /// trailing activation and candidate, stop, ladder, time stop. Nothing is pending in
    /// the backtest (every action is confirmed at once) and no position is over-leveraged
    /// (such an entry is skipped).
    #[inline]
    pub(super) fn on_mark(
        &mut self,
        mark: i64,
        time_ms: i64,
        bar: &BarAtr<'_>,
        r: &TickRules<'_>,
    ) -> Result<Option<TickAction>, Unrepresentable> {
        if !r.plausible(mark) || self.quantity <= 0 {
            return Ok(None);
        }
        let s = self.side;
        let improved = s * (mark - self.best) > 0;
        if improved {
            self.best = mark;
        }
        if !self.trailing_active && r.trail_configured {
            // Activation by price depends on the best alone: a best that reached it
            // earlier would have activated trailing then.
            let by_level = r.trail_after_level.is_some_and(|n| self.levels_done >= n);
            self.trailing_active = by_level || self.activates(self.best);
        }
        if self.trailing_active && (improved || self.trail_basis != Some(bar.basis)) {
            self.trail_basis = Some(bar.basis);
            if let Some(candidate) = self.candidate(self.best, bar, r)? {
                self.tighten(candidate, ExitReason::TrailingStop);
            }
        }
        if s * (self.stop - mark) >= 0 {
            return Ok(Some(self.emit(
                self.quantity,
                self.stop_reason(),
                self.stop,
            )));
        }
        let done = self.levels_done as usize;
        let count = self.levels.len().min(self.targets.len());
        if done < count {
            let crossed = done
                + self.levels[done..count]
                    .iter()
                    .take_while(|&&level| s * (mark - level) >= 0)
                    .count();
            if crossed > done {
                let trigger = self.levels[crossed - 1];
                let wanted = self.targets[crossed - 1] - self.closed;
                if let Some(quantity) = self.ladder_quantity(wanted, mark, r)? {
                    return Ok(Some(self.emit(
                        quantity,
                        ExitReason::TakeProfit(crossed as u32),
                        trigger,
                    )));
                }
                // Done with no order: the position keeps its size; breakeven and ratchet apply.
                self.levels_done = crossed as u32;
                self.ratchet(r);
            }
        }
        if self.expires_at.is_some_and(|at| time_ms >= at) && !self.time_stop_off(self.best) {
            return Ok(Some(self.emit(self.quantity, ExitReason::TimeStop, mark)));
        }
        Ok(None)
    }

    /// The quantity a take-profit closes (`ladder_quantity` of the state machine): `None`
    /// when `wanted` is not positive, else `wanted`, or the whole live quantity when
    /// `wanted` or the remainder it leaves cannot trade on its own.
    fn ladder_quantity(
        &self,
        wanted: i128,
        mark: i64,
        r: &TickRules<'_>,
    ) -> Result<Option<i128>, Unrepresentable> {
        let live = self.quantity;
        if wanted <= 0 {
            return Ok(None);
        }
        if wanted >= live || wanted < r.qty.min_qty {
            return Ok(Some(live));
        }
        let remainder = live - wanted;
        if remainder < r.qty.min_qty || r.below_min_notional(remainder, mark)? {
            return Ok(Some(live));
        }
        Ok(Some(wanted))
    }

    /// Confirms `action` in full; returns true when the position is closed.
    pub(super) fn confirm(&mut self, action: &TickAction, r: &TickRules<'_>) -> bool {
        let filled = action.quantity.min(self.quantity);
        self.quantity -= filled;
        if let ExitReason::TakeProfit(level) = action.reason {
            self.closed += filled;
            let by_target = self
                .targets
                .iter()
                .take_while(|&&t| t <= self.closed)
                .count() as u32;
            self.levels_done = self.levels_done.max(level.max(by_target));
        }
        if self.quantity <= 0 {
            self.quantity = 0;
            return true;
        }
        self.ratchet(r);
        false
    }

    /// Breakeven and ratchet after a level is done.
    fn ratchet(&mut self, r: &TickRules<'_>) {
        if let (Some(n), Some(breakeven)) = (r.breakeven_after_level, self.breakeven) {
            if self.levels_done >= n {
                self.tighten(breakeven, ExitReason::BreakevenStop);
            }
        }
        if r.ratchet && self.levels_done >= 2 {
            if let Some(&previous) = self.levels.get(self.levels_done as usize - 2) {
                self.tighten(previous, ExitReason::RatchetStop);
            }
        }
    }

    /// Settles a whole bar with range `low..=high` up to `last_ms` in one step when it
    /// provably triggers nothing on any mark of its path; returns whether it did (else
    /// nothing changed).
    ///
    /// Such a bar stays in the plausible band, reaches neither the stop it leaves (the
    /// candidate at its favourable extreme: candidates only grow with the best, and the
    /// ATR is the same for the whole bar) nor the next level, activates no trailing, and
    /// ends before the time stop is due unless the best had passed its threshold; every
    /// mark of its path and every move between them lies in its range, so no mark would
    /// trigger anything either.
    pub(super) fn quiet_bar(
        &mut self,
        low: i64,
        high: i64,
        last_ms: i64,
        bar: &BarAtr<'_>,
        r: &TickRules<'_>,
    ) -> Result<bool, Unrepresentable> {
        match r.band {
            Some((lo, hi)) if low >= lo && high <= hi => {}
            _ => return Ok(false),
        }
        let s = self.side;
        let (adverse, favourable) = if s > 0 { (low, high) } else { (high, low) };
        let improved = s * (favourable - self.best) > 0;
        let best = if improved { favourable } else { self.best };
        let mut stop = self.stop;
        let mut basis = None;
        if self.trailing_active {
            if improved || self.trail_basis != Some(bar.basis) {
                basis = Some(bar.basis);
                if let Some(candidate) = self.candidate(best, bar, r)? {
                    if s * (candidate - stop) > 0 {
                        stop = candidate;
                    }
                }
            }
        } else if r.trail_configured
            && (r.trail_after_level.is_some_and(|n| self.levels_done >= n) || self.activates(best))
        {
            return Ok(false);
        }
        if s * (adverse - stop) <= 0 {
            return Ok(false);
        }
        let done = self.levels_done as usize;
        if done < self.targets.len() {
            if let Some(&next) = self.levels.get(done) {
                if s * (next - favourable) <= 0 {
                    return Ok(false);
                }
            }
        }
        if self.expires_at.is_some_and(|at| last_ms >= at) && !self.time_stop_off(self.best) {
            return Ok(false);
        }
        self.best = best;
        if basis.is_some() {
            self.trail_basis = basis;
        }
        if stop != self.stop {
            self.stop = stop;
            self.stop_reason = Some(ExitReason::TrailingStop);
        }
        Ok(true)
    }

    /// [`TickPosition::quiet_bar`] over consecutive whole bars while trailing is not active
    /// (then no bar's ATR matters): settles them up to the first that is not quiet and
    /// returns how many it settled. The bars are those of `bars` from `start` on, one per
    /// open time in `times`, each lasting `interval_ms`. The same per-bar conditions, in one tight loop: the range stays in
    /// the band, short of the stop, the next level and the trailing activation, before
    /// the time stop is due (unless the best passed its threshold before the bar); the
    /// best moves to each bar's favourable extreme.
    pub(super) fn quiet_sweep(
        &mut self,
        bars: &BarTicks,
        start: usize,
        times: &[i64],
        interval_ms: i64,
        r: &TickRules<'_>,
    ) -> usize {
        let Some((band_lo, band_hi)) = r.band else {
            return 0;
        };
        if self.trailing_active
            || (r.trail_configured && r.trail_after_level.is_some_and(|n| self.levels_done >= n))
        {
            return 0;
        }
        let s = self.side;
        let done = self.levels_done as usize;
        // The nearest favourable threshold: the next level, the trailing activation.
        let mut limit = if done < self.targets.len() {
            self.levels.get(done).copied()
        } else {
            None
        };
        if r.trail_configured {
            if let Some(a) = self.activate_at {
                limit = Some(limit.map_or(a, |l| if s * (a - l) < 0 { a } else { l }));
            }
        }
        let (stop, mut best) = (self.stop, self.best);
        // Before any time stop can be due (the best only moves on, so a time stop off now
        // stays off), a bar is quiet exactly when its four prices lie strictly between
        // the adverse bound (the stop, the band) and the favourable one (the next
        // threshold, the band): one vectorized scan, then the scalar loop from there.
        let before_expiry = match self.expires_at {
            Some(at) if !self.time_stop_off(best) => {
                times.partition_point(|&t| t.saturating_add(interval_ms) <= at)
            }
            _ => times.len(),
        };
        let (below, above) = if s > 0 {
            (
                stop.max(band_lo - 1),
                limit.map_or(band_hi + 1, |l| l.min(band_hi + 1)),
            )
        } else {
            (
                limit.map_or(band_lo - 1, |l| l.max(band_lo - 1)),
                stop.min(band_hi + 1),
            )
        };
        let (mut settled, extreme) =
            scan::inside_run(bars.narrow(start, start + before_expiry), below, above, s);
        if let Some(extreme) = extreme {
            if s * (extreme - best) > 0 {
                best = extreme;
            }
        }
        for (j, &t) in times.iter().enumerate().skip(settled) {
            let [open, high, low, close] = bars.get(start + j);
            let lo = open.min(high).min(low).min(close);
            let hi = open.max(high).max(low).max(close);
            let (adverse, favourable) = if s > 0 { (lo, hi) } else { (hi, lo) };
            if lo < band_lo
                || hi > band_hi
                || s * (adverse - stop) <= 0
                || limit.is_some_and(|l| s * (l - favourable) <= 0)
                // The bar's last millisecond, `t + interval_ms - 1`, at or after the expiry.
                || (self.expires_at.is_some_and(|at| t + interval_ms > at)
                    && !self.time_stop_off(best))
            {
                break;
            }
            if s * (favourable - best) > 0 {
                best = favourable;
            }
            settled += 1;
        }
        self.best = best;
        settled
    }

    /// The triggers (the stop, the levels not done) strictly between ticks `a` and `b`,
    /// in the order a continuous move from `a` to `b` reaches them.
    pub(super) fn crossings(&self, a: i64, b: i64, out: &mut Vec<i64>) {
        out.clear();
        let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
        if hi - lo < 2 {
            return;
        }
        let inside = |x: i64| x > lo && x < hi;
        if inside(self.stop) {
            out.push(self.stop);
        }
        let done = (self.levels_done as usize).min(self.levels.len());
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

#[cfg(test)]
mod tests {
    use super::{div_rem, mul, Factor};

    /// `Factor::quotient` the 128-bit way only (the code before its 64-bit fast path).
    fn wide_quotient(
        factor: Factor,
        numerator: i128,
        denominator: i128,
        unit: i128,
        unit_scale: u32,
    ) -> Option<(i128, i128, i128)> {
        let product = factor.mantissa.checked_mul(numerator)?;
        if product.checked_mul(unit)?.unsigned_abs() >= 1 << 96 || factor.scale + unit_scale > 28 {
            return None;
        }
        let denominator =
            denominator.checked_mul(crate::fixed::POW10_I128[factor.scale as usize])?;
        Some((product / denominator, product % denominator, denominator))
    }

    proptest::proptest! {
        /// Every width of `div_rem` gives the 128-bit quotient and remainder (truncating),
        /// for dividends of either sign and around each width's bounds.
        #[test]
        fn div_rem_is_the_wide_division(
            a in proptest::prop_oneof![
                -10_000i128..10_000,
                0i128..(1 << 33),
                -(1i128 << 64)..(1i128 << 64),
                proptest::num::i128::ANY,
            ],
            b in proptest::prop_oneof![1i128..100, 1i128..(1 << 33), 1i128..(1 << 65)],
        ) {
            proptest::prop_assert_eq!(div_rem(a, b), (a / b, a % b));
        }

        /// `positive` reads a tick's sign as the price's mantissa gives it.
        #[test]
        fn first_positive_tick_is_where_prices_turn_positive(
            base in -1_000_000i128..1_000_000,
            step in 1i128..1_000,
            k in -3_000_000i64..3_000_000,
        ) {
            let grid = crate::backtest::prepare::Grid {
                base,
                step,
                scale: 2,
                base_f: 0.0,
                step_f: 0.0,
                per_step_f: 0.0,
                float_limit: 0.0,
            };
            proptest::prop_assert_eq!(
                k >= super::first_positive(grid),
                base + i128::from(k) * step > 0
            );
        }

        /// `mul` is the checked 128-bit multiply, at and beyond the 64-bit bounds.
        #[test]
        fn mul_is_the_checked_multiply(
            a in proptest::prop_oneof![
                -10_000i128..10_000,
                i128::from(i64::MIN) - 2..i128::from(i64::MIN) + 2,
                i128::from(i64::MAX) - 2..i128::from(i64::MAX) + 2,
                proptest::num::i128::ANY,
            ],
            b in proptest::prop_oneof![
                -10_000i128..10_000,
                i128::from(i64::MIN) - 2..i128::from(i64::MIN) + 2,
                i128::from(i64::MAX) - 2..i128::from(i64::MAX) + 2,
                -(1i128 << 70)..(1i128 << 70),
            ],
        ) {
            proptest::prop_assert_eq!(mul(a, b), a.checked_mul(b));
        }

        /// A whole factor over a denominator of 1 (multiplied, not divided) answers as the
        /// 128-bit way does.
        #[test]
        fn whole_factor_quotient_is_the_wide_one(
            whole in proptest::prop_oneof![0i128..1_000, 0i128..(1 << 40)],
            scale in 0u32..20,
            numerator in proptest::prop_oneof![1i128..(1 << 31), 1i128..(1 << 63)],
            unit in proptest::prop_oneof![1i128..100, 1i128..(1 << 33)],
            unit_scale in 0u32..20,
        ) {
            let Some(mantissa) = whole.checked_mul(crate::fixed::POW10_I128[scale as usize]) else {
                return Ok(());
            };
            let factor = Factor::new(mantissa, scale);
            proptest::prop_assert_eq!(
                factor.quotient(numerator, 1, unit, unit_scale),
                wide_quotient(factor, numerator, 1, unit, unit_scale)
            );
        }

        /// The 64-bit fast path of `Factor::quotient` answers as the 128-bit way does,
        /// around the 32-, 63- and 64-bit bounds of every operand.
        #[test]
        fn factor_quotient_is_the_wide_one(
            mantissa in proptest::prop_oneof![1i128..1_000, 1i128..(1 << 40), 1i128..(1 << 70)],
            scale in 0u32..29,
            numerator in proptest::prop_oneof![1i128..(1 << 31), 1i128..(1 << 63), 1i128..(1 << 90)],
            denominator in proptest::prop_oneof![1i128..1_000, 1i128..(1 << 62), 1i128..(1 << 66)],
            unit in proptest::prop_oneof![1i128..100, 1i128..(1 << 33), 1i128..(1 << 60)],
            unit_scale in 0u32..20,
        ) {
            let factor = Factor::new(mantissa, scale);
            proptest::prop_assert_eq!(
                factor.quotient(numerator, denominator, unit, unit_scale),
                wide_quotient(factor, numerator, denominator, unit, unit_scale)
            );
        }
    }
}
