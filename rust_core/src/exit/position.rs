//! One position's exit state machine: initial stop and R, take-profit ladder,
//! breakeven and ratchet, trailing stop, time stop, over-leverage, and the
//! pending action. The exact semantics are `docs/exit-rules.md`; this module is
//! free of message parsing and of the engine so the backtest drives the very
//! same code over historical bars.
//!
//! Use:
//! - [`plan_stop`] — the initial stop, R and the over-leverage verdict for a
//!   prospective entry (pure).
//! - [`PositionState::open`] / [`PositionState::adopt`] — start tracking.
//! - [`PositionState::on_mark`]`(mark, atr, now_ms, rules, policy)` — one mark
//!   update; returns at most one [`ExitAction`], which stays pending.
//! - [`PositionState::confirm`]`(sequence, filled)` / [`PositionState::reject`]`(sequence)`.
//! - [`PositionState::resize`], [`PositionState::set_liquidation_price`].
//!
//! Quiet marks (the engine): after a full evaluation that emitted nothing, the position's
//! thresholds are derived as integers (10^-8 price units, [`MarkWatch`], kept by the engine
//! beside its symbol state, see "Hot copy" in exit/mod.rs); a mark strictly between the
//! stop and the next level that activates no trailing, moves no trailing candidate (no new
//! best while it is active, same ATR) and finds no time stop due changes only the best and
//! last marks, and is applied without decimal arithmetic. The property
//! `quiet_marks_match_the_full_path` (exit/mod.rs) checks it against the full evaluation.
//!
//! Per update, in this order (a SHORT mirrors every inequality and rounding):
//! best mark; trailing activation and candidate; over-leverage close; stop
//! (`mark <= stop`); ladder (every level crossed → ONE action named after the
//! highest); time stop. Nothing is evaluated while an action is pending.
//!
//! Invariants:
//! - the stop only tightens, whichever rule moved it; `stop_reason` names the
//!   rule that moved it last;
//! - ladder targets are cumulative fractions of the ORIGINAL size floored to the
//!   `MARKET_LOT_SIZE` step; the level whose cumulative fraction is 1 closes the
//!   exact remainder;
//! - a level whose quantity floors to zero (its cumulative target is already
//!   covered: a small position, or confirmed fills) is done with no order: the
//!   position keeps its size and the level's breakeven and ratchet still apply
//!   (exit-rules.md; a 0.003 BTC long is not sold whole at its first level);
//! - a partial above zero but below `minQty`, or that would leave a remainder
//!   below `minQty` or `MIN_NOTIONAL` at the mark, becomes a full close;
//! - no action closes more than the live quantity, and every quantity is on the
//!   `MARKET_LOT_SIZE` step: the live and original quantities and every confirmed
//!   fill are refused off the step, and ladder targets are floored onto it;
//! - at most one action is pending; the ratchet runs when a take-profit fill
//!   is confirmed; a rejection clears the pending action and nothing else (what
//!   the update observed, best mark and a tightened trailing stop, stays:
//!   undoing it would loosen a stop) and the sequence number is never reused;
//! - every input is inside the bounds of [`super::bounds`] (prices in the
//!   symbol's plausible band, quantities at most 1e12, event times before 2100),
//!   so no decimal arithmetic here can overflow; a mark outside the band is
//!   ignored with the state untouched. [`PositionState::validate`] checks a
//!   restored state against the same bounds, the policy and the rules.
//!
//! Choices where the rules are silent:
//! - `opened_at_ms` unset (the engine had seen no message yet) is set by the
//!   first mark update the position sees; only event time is used.
//! - With `trail_atr` while ATR is not ready, the trail distance is
//!   `fallback_stop_pct × best` (the same fallback as the initial stop).
//! - A liquidation price learnt after opening only tightens the stop; R and the
//!   ladder stay as computed at open.
//! - A partial take-profit fill marks done only the levels whose target is
//!   reached; the remaining part of a level fires again on the next update.

use serde::{Deserialize, Serialize};

use super::action::{ExitAction, ExitReason, PositionSide};
use super::bounds::{self, usable_atr};
use super::policy::{decimal_of, ExitPolicy, LadderUnit};
use crate::error::CoreError;
use crate::fixed::{decimal_to_f64_fast, Decimal, Rounding};
use crate::rules::SymbolRules;

/// The initial stop for an entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StopPlan {
    /// Stop price on the tick grid.
    pub stop_price: Decimal,
    /// R: |entry − stop|.
    pub stop_distance: Decimal,
    /// The allowed stop distance is below the policy minimum.
    pub over_leveraged: bool,
}

/// What a new position is made of.
#[derive(Clone, Debug, PartialEq)]
pub struct OpenParams {
    /// Caller-chosen id (the router's clientOrderIds derive from it).
    pub position_id: String,
    /// Symbol, e.g. `BTCUSDT`.
    pub symbol: String,
    /// LONG or SHORT.
    pub side: PositionSide,
    /// Live quantity (> 0).
    pub quantity: Decimal,
    /// Average entry price (> 0).
    pub entry_price: Decimal,
    /// Leverage, 1..=125.
    pub leverage: u32,
    /// Signal confidence in [0, 1]; stretches the ladder.
    pub confidence: Option<f64>,
    /// Open time in event-time ms; `None`: set by the first mark update.
    pub opened_at_ms: Option<i64>,
    /// Liquidation price, when known.
    pub liquidation_price: Option<Decimal>,
}

/// Result of confirming an action.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Confirmed {
    /// Something is still open.
    Open,
    /// The position is fully closed; drop it.
    Closed,
}

/// One position's exit state. All fields are public for views and backtests;
/// change them only through the methods.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PositionState {
    /// Caller-chosen id.
    pub position_id: String,
    /// Symbol.
    pub symbol: String,
    /// LONG or SHORT.
    pub side: PositionSide,
    /// Live quantity.
    pub quantity: Decimal,
    /// Size the ladder fractions apply to.
    pub original_quantity: Decimal,
    /// Average entry price.
    pub entry_price: Decimal,
    /// Leverage.
    pub leverage: u32,
    /// Confidence in [0, 1].
    pub confidence: Option<f64>,
    /// Open time (event-time ms).
    pub opened_at_ms: Option<i64>,
    /// Liquidation price, when known.
    pub liquidation_price: Option<Decimal>,
    /// Current stop price.
    pub stop_price: Decimal,
    /// The rule that moved the stop last.
    pub stop_reason: ExitReason,
    /// R, the initial stop distance.
    pub r_distance: Decimal,
    /// Best mark since open (highest for LONG, lowest for SHORT).
    pub best_price: Decimal,
    /// Take-profit level prices.
    pub ladder_prices: Vec<Decimal>,
    /// Cumulative quantity closed once each level is done.
    pub ladder_targets: Vec<Decimal>,
    /// Quantity closed by confirmed take-profit fills.
    pub ladder_closed: Decimal,
    /// Number of ladder levels done (a prefix).
    pub levels_done: u32,
    /// Levels that count as crossed whatever the mark (passed before adoption).
    pub levels_passed_at_adoption: u32,
    /// Best price at which trailing activates (by R or pct), if any.
    pub trail_activate_price: Option<Decimal>,
    /// Trailing stop is active.
    pub trailing_active: bool,
    /// Allowed stop distance below the policy minimum: close at once.
    pub over_leveraged: bool,
    /// Best price below which (LONG) the time stop may fire, if conditional.
    pub time_stop_below_price: Option<Decimal>,
    /// The action awaiting confirm/reject.
    pub pending: Option<ExitAction>,
    /// Last sequence number used (0: none yet).
    pub sequence: u64,
    /// Last mark seen.
    pub last_mark_price: Option<Decimal>,
    /// Which instance of `position_id` this is: the engine numbers every position it
    /// opens or adopts, and an action of an earlier instance with the same id is refused.
    #[serde(default)]
    pub generation: u64,
    /// Trail distance cache: (ATR bits, distance); rebuilt on demand.
    #[serde(skip)]
    trail_cache: Option<(u64, Decimal)>,
    /// ATR bits of the last trailing candidate: with the same ATR and no new
    /// best the candidate is the same, so it is skipped. Rebuilt on demand.
    #[serde(skip)]
    trail_basis: Option<u64>,
    /// The price activation has been checked against the current best; only a
    /// new best can change it afterwards. Rebuilt on demand.
    #[serde(skip)]
    activation_checked: bool,
}

/// `price` in the quiet-mark watch's integer units: those the mark reader gives a mark
/// (10^-8, [`crate::feed::units_of`]), so a threshold and a mark compare as integers;
/// `None` (more than eight decimals, not positive, beyond `i64`) sends the caller to the
/// decimal path.
pub(crate) fn price_units(price: Decimal) -> Option<i64> {
    Some(crate::feed::units_of(price)).filter(|&units| units != 0)
}

/// The thresholds of one position after a full evaluation that emitted nothing, as integer
/// price units signed by side (`x = +units` for a LONG, `-units` for a SHORT, so a larger
/// `x` is always more profit). A mark `x` with `stop < x < next_level` that sets no new
/// best (or a new best that cannot activate trailing and where trailing is not active),
/// with the ATR of the last trailing candidate unchanged and no time stop due, changes
/// only the last and best marks: [`PositionState::quiet_mark`] applies it without any
/// decimal arithmetic. Everything else takes [`PositionState::evaluate`].
///
/// Derived from the position by [`PositionState::evaluate_watched`] and owned by the
/// caller (the engine keeps the watches of a symbol's legs side by side); 56 bytes, less
/// than a cache line, also as an `Option` (checked at compile time below).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct MarkWatch {
    /// Signed stop: `x <= stop` fires it.
    stop: i64,
    /// Signed price of the next ladder level (`i64::MAX`: none left).
    next_level: i64,
    /// Signed best mark.
    best: i64,
    /// Not trailing: the signed best at which trailing activates by price (`i64::MAX`: it
    /// cannot). Trailing: the ATR bits of the last trailing candidate.
    trail: i64,
    /// Event time from which the time stop is due (`i64::MAX`: never).
    time_stop_at: i64,
    /// The time stop fires only while the signed best is below this (`i64::MAX`: always).
    time_below: i64,
    /// Trailing is active: a new best or another ATR moves its candidate.
    trailing_active: bool,
    /// The position's side (the sign of `x`).
    side: PositionSide,
}

const _: () = assert!(std::mem::size_of::<Option<MarkWatch>>() <= 56);

impl MarkWatch {
    /// Whether a mark of `units` (10^-8, unsigned) at `now_ms` with this ATR is quiet:
    /// `Some(improved)` (the watch's best already moved when `improved`; the position's
    /// best and last mark are the caller's to set), or `None` when the full evaluation is
    /// needed, with nothing changed. Reads only this watch.
    #[inline]
    pub(crate) fn quiet(&mut self, units: i64, atr: Option<f64>, now_ms: i64) -> Option<bool> {
        let x = match self.side {
            PositionSide::Long => units,
            PositionSide::Short => -units,
        };
        if x <= self.stop || x >= self.next_level {
            return None;
        }
        let improved = x > self.best;
        if self.trailing_active {
            if improved || atr.map_or(0, f64::to_bits) as i64 != self.trail {
                return None;
            }
        } else if improved && x >= self.trail {
            return None;
        }
        let best = if improved { x } else { self.best };
        if now_ms >= self.time_stop_at && best < self.time_below {
            return None;
        }
        if improved {
            self.best = x;
        }
        Some(improved)
    }
}

#[allow(clippy::needless_pass_by_value)] // call sites pass numbers and strings alike
fn invalid(field: &str, value: impl ToString, rule: &str) -> CoreError {
    CoreError::invalid(field, value.to_string(), rule)
}

// Side-aware helpers. "Up" means toward profit for the side.
fn profit_ge(side: PositionSide, a: Decimal, b: Decimal) -> bool {
    match side {
        PositionSide::Long => a >= b,
        PositionSide::Short => a <= b,
    }
}

fn not_positive(value: Decimal) -> bool {
    value.is_zero() || value.is_sign_negative()
}

fn strictly_tighter(side: PositionSide, new: Decimal, old: Decimal) -> bool {
    match side {
        PositionSide::Long => new > old,
        PositionSide::Short => new < old,
    }
}

fn toward_profit(side: PositionSide, base: Decimal, distance: Decimal) -> Decimal {
    match side {
        PositionSide::Long => base + distance,
        PositionSide::Short => base - distance,
    }
}

fn toward_loss(side: PositionSide, base: Decimal, distance: Decimal) -> Decimal {
    match side {
        PositionSide::Long => base - distance,
        PositionSide::Short => base + distance,
    }
}

/// Rounds a stop toward the position's profit side (tightening).
fn round_stop(side: PositionSide, price: Decimal, rules: &SymbolRules) -> Decimal {
    let rounding = match side {
        PositionSide::Long => Rounding::Up,
        PositionSide::Short => Rounding::Down,
    };
    rules.quantize_price(price, rounding)
}

/// Rounds a take-profit level toward the entry (not harder to reach).
fn round_level(side: PositionSide, price: Decimal, rules: &SymbolRules) -> Decimal {
    let rounding = match side {
        PositionSide::Long => Rounding::Down,
        PositionSide::Short => Rounding::Up,
    };
    rules.quantize_price(price, rounding)
}

fn atr_decimal(atr: Option<f64>) -> Option<Decimal> {
    usable_atr(atr).and_then(|a| decimal_of("atr", a).ok())
}

/// Computes the initial stop, R and the over-leverage verdict (exit-rules.md,
/// "Initial stop").
///
/// # Errors
/// `CoreError::InvalidField` when the entry price or leverage is out of range.
pub fn plan_stop(
    side: PositionSide,
    entry: Decimal,
    leverage: u32,
    atr: Option<f64>,
    liquidation_price: Option<Decimal>,
    rules: &SymbolRules,
    policy: &ExitPolicy,
) -> Result<StopPlan, CoreError> {
    bounds::check_price("entry_price", entry, rules)?;
    bounds::check_leverage(leverage)?;
    if let Some(liq) = liquidation_price {
        check_liquidation(liq, side, entry, rules)?;
    }
    let derived = policy.derived();
    let base = match derived.stop_atr.zip(atr_decimal(atr)) {
        Some((k, atr)) => k * atr,
        None => derived.fallback_stop_pct * entry,
    };
    let floor = derived.min_stop_pct * entry;
    let mut distance = base.clamp(floor, derived.max_stop_pct * entry);
    let cap = derived
        .max_margin_loss
        .map(|m| m * entry / Decimal::from(leverage));
    if let Some(cap) = cap {
        distance = distance.min(cap);
    }
    let mut stop = round_stop(side, toward_loss(side, entry, distance), rules);
    if !strictly_tighter(side, entry, stop) {
        // A distance under one tick rounded onto the entry: give it one tick.
        stop = toward_loss(side, round_level(side, entry, rules), rules.tick_size());
    }
    // The allowed distance: the margin cap, narrowed by the liquidation buffer.
    let mut allowed = cap;
    if let Some(liq) = liquidation_price {
        let limit = toward_profit(side, liq, derived.liq_buffer_pct * entry);
        let limit_rounded = round_stop(side, limit, rules);
        if strictly_tighter(side, limit_rounded, stop) {
            stop = limit_rounded;
        }
        let room = (entry - limit) * side.sign();
        allowed = Some(allowed.map_or(room, |a| a.min(room)));
    }
    let stop_distance = (entry - stop) * side.sign();
    let minimum = derived.min_allowed_stop_pct * entry;
    let over_leveraged = allowed.is_some_and(|a| a < minimum) || stop_distance <= Decimal::ZERO;
    Ok(StopPlan {
        stop_price: stop,
        stop_distance,
        over_leveraged,
    })
}

/// Returns the take-profit level prices for an entry with R `r_distance`.
///
/// # Errors
/// `CoreError::Policy` when a stretched level does not fit a decimal.
pub fn ladder_prices(
    side: PositionSide,
    entry: Decimal,
    r_distance: Decimal,
    confidence: Option<f64>,
    rules: &SymbolRules,
    policy: &ExitPolicy,
) -> Result<Vec<Decimal>, CoreError> {
    bounds::check_confidence(confidence)?;
    ladder_prices_by(side, entry, r_distance, confidence, rules, policy, true)
}

/// A liquidation price is 0 (none) or a positive price up to the band's top (it may lie
/// far below `minPrice`: a LONG at 1x liquidates near zero), and never at or beyond
/// `best` on the position's profit side (such an account is liquidated by a move this
/// side gains from: its stop has nothing to keep clear of, the daemon skips it too).
fn check_liquidation(
    price: Decimal,
    side: PositionSide,
    best: Decimal,
    rules: &SymbolRules,
) -> Result<(), CoreError> {
    let (_, high) = bounds::price_band(rules);
    if price < Decimal::ZERO || price > high {
        return Err(CoreError::invalid_for(
            &rules.symbol,
            "liquidation_price",
            price.to_string(),
            format!("must be 0 (none) or a price in (0, {}]", high.normalize()),
        ));
    }
    if !price.is_zero() && profit_ge(side, price, best) {
        return Err(CoreError::invalid_for(
            &rules.symbol,
            "liquidation_price",
            price.to_string(),
            format!("must lie on the loss side of the {side} position's best price {best}"),
        ));
    }
    Ok(())
}

/// [`ladder_prices`], with the float shortcut or (`floats` false) only the decimal path.
fn ladder_prices_by(
    side: PositionSide,
    entry: Decimal,
    r_distance: Decimal,
    confidence: Option<f64>,
    rules: &SymbolRules,
    policy: &ExitPolicy,
    floats: bool,
) -> Result<Vec<Decimal>, CoreError> {
    let config = policy.config();
    let m = policy.ladder_multiplier(confidence);
    let r = r_distance.max(rules.tick_size());
    let tick = rules.tick_size();
    let mut prices = Vec::with_capacity(config.ladder.len());
    let (r_f, entry_f) = (decimal_to_f64_fast(r), decimal_to_f64_fast(entry));
    for (i, level) in config.ladder.iter().enumerate() {
        // Floats settle the rounded level unless it lies within a hair of a tick.
        let distance_f = level.at
            * m
            * match config.ladder_unit {
                LadderUnit::R => r_f,
                LadderUnit::Pct => entry_f,
            };
        if let Some(price) = level_from_floats(side, entry, distance_f, rules).filter(|_| floats) {
            if strictly_tighter(side, price, entry) && price > Decimal::ZERO {
                prices.push(price);
                continue;
            }
        }
        // Without a stretch the product is `at` itself, converted once by the policy.
        #[allow(clippy::float_cmp)] // exactly 1 is the only factor that changes nothing
        let at = if m == 1.0 {
            policy.derived().ladder_at[i]
        } else {
            let stretched = level.at * m;
            // The field's name is written only for the error (this runs at every open).
            decimal_of("", stretched)
                .or_else(|_| decimal_of(&format!("ladder[{i}].at"), stretched))?
        };
        let distance = match config.ladder_unit {
            LadderUnit::R => at * r,
            LadderUnit::Pct => at * entry,
        };
        let mut price = round_level(side, toward_profit(side, entry, distance), rules);
        if !strictly_tighter(side, price, entry) {
            // Never a level at (or behind) the entry: one tick beyond it.
            price = toward_profit(side, round_stop(side, entry, rules), tick);
        }
        if price <= Decimal::ZERO {
            price = tick;
        }
        prices.push(price);
    }
    Ok(prices)
}

/// `round_level(side, toward_profit(side, entry, distance), rules)` from floats, where
/// `distance_f` is the float of the exact distance (`at * r`, `at` the shortest decimal
/// of the float `level.at * m`): `None` unless floats settle it.
///
/// Below 2^26 ticks every float here (the entry, the distance's factors and product,
/// the grid's base and step, each sum and the quotient) is within a few ulps of its exact
/// value: in all within 1e-7 tick of the exact level. So a level more than 1e-6 tick away
/// from a grid point floors (LONG) or ceils (SHORT) onto the same tick as the decimals do;
/// nearer one, the decimal path decides.
fn level_from_floats(
    side: PositionSide,
    entry: Decimal,
    distance_f: f64,
    rules: &SymbolRules,
) -> Option<Decimal> {
    const MAX_TICKS: f64 = (1u64 << 26) as f64;
    let step = rules.price_step();
    if step <= Decimal::ZERO {
        return None;
    }
    // `quantize_price`'s grid: from minPrice with a tick, from zero without one.
    let base = if rules.tick_size() > Decimal::ZERO {
        rules.price_filter.min_price
    } else {
        Decimal::ZERO
    };
    let (entry_f, base_f, step_f) = (
        decimal_to_f64_fast(entry),
        decimal_to_f64_fast(base),
        decimal_to_f64_fast(step),
    );
    let reach = (entry_f.abs() + distance_f.abs() + base_f.abs()) / step_f;
    // Also false for NaN.
    let near = reach < MAX_TICKS;
    if !near {
        return None;
    }
    let target = match side {
        PositionSide::Long => entry_f + distance_f,
        PositionSide::Short => entry_f - distance_f,
    };
    let x = (target - base_f) / step_f;
    // Truncation toward zero, then down to the floor for negatives (exact below 2^26).
    let whole = x as i64;
    let floor = whole - i64::from(x < whole as f64);
    let fraction = x - floor as f64;
    if !(1e-6..=1.0 - 1e-6).contains(&fraction) {
        return None;
    }
    // A level rounds toward the entry: down for a LONG, up for a SHORT.
    let k = floor + i64::from(side == PositionSide::Short);
    let scale = base.scale().max(step.scale());
    let mantissa = crate::fixed::mantissa_at(base, scale)?
        .checked_add(i128::from(k).checked_mul(crate::fixed::mantissa_at(step, scale)?)?)?;
    Decimal::try_from_i128_with_scale(mantissa, scale).ok()
}

impl PositionState {
    /// Starts tracking a freshly opened position.
    ///
    /// # Errors
    /// `CoreError::InvalidField` for a non-positive quantity or entry, a leverage
    /// outside [1, 125], a confidence outside [0, 1] or a symbol mismatch.
    #[allow(clippy::too_many_lines)] // one validation or derived field per line
    pub fn open(
        params: OpenParams,
        atr: Option<f64>,
        rules: &SymbolRules,
        policy: &ExitPolicy,
    ) -> Result<Self, CoreError> {
        if params.position_id.is_empty() {
            return Err(invalid("position_id", "", "must not be empty"));
        }
        bounds::check_quantity("quantity", params.quantity, false, rules)?;
        bounds::check_confidence(params.confidence)?;
        if let Some(opened) = params.opened_at_ms {
            bounds::check_event_time("opened_at_ms", opened)?;
        }
        // Binance reports 0 when no liquidation price applies.
        let liquidation = params.liquidation_price.filter(|l| !l.is_zero());
        let side = params.side;
        let entry = params.entry_price;
        let plan = plan_stop(
            side,
            entry,
            params.leverage,
            atr,
            liquidation,
            rules,
            policy,
        )?;
        let ladder = ladder_prices(
            side,
            entry,
            plan.stop_distance,
            params.confidence,
            rules,
            policy,
        )?;
        let targets = Self::targets(params.quantity, rules, policy);
        let config = policy.config();
        let r = plan.stop_distance.max(rules.tick_size());
        let mut activate: Option<Decimal> = None;
        let mut consider = |price: Decimal| {
            activate = Some(match activate {
                None => price,
                // The nearer threshold wins: either condition activates.
                Some(old) => {
                    if profit_ge(side, old, price) {
                        price
                    } else {
                        old
                    }
                }
            });
        };
        if let Some(k) = policy.derived().trail_activate_r {
            consider(toward_profit(side, entry, k * r));
        }
        if let Some(pct) = policy.derived().trail_activate_pct {
            consider(toward_profit(side, entry, pct * entry));
        }
        let trailing = config.trail_atr.is_some() || config.trail_pct.is_some();
        let immediate = trailing
            && config.trail_activate_r.is_none()
            && config.trail_activate_pct.is_none()
            && config.trail_after_level.is_none();
        let time_stop_below_price = policy
            .derived()
            .time_stop_unless_r
            .map(|k| toward_profit(side, entry, k * r));
        Ok(Self {
            position_id: params.position_id,
            symbol: params.symbol,
            side,
            quantity: params.quantity,
            original_quantity: params.quantity,
            entry_price: entry,
            leverage: params.leverage,
            confidence: params.confidence,
            opened_at_ms: params.opened_at_ms,
            liquidation_price: liquidation,
            stop_price: plan.stop_price,
            stop_reason: ExitReason::StopLoss,
            r_distance: plan.stop_distance,
            best_price: entry,
            ladder_prices: ladder,
            ladder_targets: targets,
            ladder_closed: Decimal::ZERO,
            levels_done: 0,
            levels_passed_at_adoption: 0,
            trail_activate_price: activate,
            trailing_active: immediate,
            over_leveraged: plan.over_leveraged,
            time_stop_below_price,
            pending: None,
            sequence: 0,
            last_mark_price: None,
            generation: 0,
            trail_cache: None,
            trail_basis: None,
            activation_checked: false,
        })
    }

    /// Starts tracking a position found on the exchange mid-life.
    ///
    /// `original_quantity` (≥ quantity) says how large it was before the ladder
    /// closed part of it: the difference counts as closed by the ladder and the
    /// levels it covers are done (their ratchet applies). `best_price` is the
    /// best mark seen before adoption: levels it passed fire on the first update,
    /// whatever the mark is then. An over-leveraged position is closed on the
    /// first update (reason `over_leverage`).
    ///
    /// # Errors
    /// As [`PositionState::open`], and `original_quantity` below `quantity`.
    pub fn adopt(
        params: OpenParams,
        original_quantity: Option<Decimal>,
        best_price: Option<Decimal>,
        atr: Option<f64>,
        rules: &SymbolRules,
        policy: &ExitPolicy,
    ) -> Result<Self, CoreError> {
        let live = params.quantity;
        let mut state = Self::open(params, atr, rules, policy)?;
        if let Some(original) = original_quantity {
            bounds::check_quantity("original_quantity", original, false, rules)?;
            if original < live {
                return Err(invalid(
                    "original_quantity",
                    original,
                    &format!("must be >= quantity {live}"),
                ));
            }
            state.original_quantity = original;
            state.ladder_targets = Self::targets(original, rules, policy);
            state.ladder_closed = original - live;
            state.levels_done = state
                .ladder_targets
                .iter()
                .take_while(|t| **t <= state.ladder_closed)
                .count() as u32;
            state.apply_ladder_ratchet(rules, policy);
        }
        if let Some(best) = best_price {
            bounds::check_price("best_price", best, rules)?;
            if profit_ge(state.side, best, state.best_price) {
                state.best_price = best;
            }
            state.levels_passed_at_adoption = state
                .ladder_prices
                .iter()
                .take_while(|p| profit_ge(state.side, state.best_price, **p))
                .count() as u32;
        }
        Ok(state)
    }

    fn targets(original: Decimal, rules: &SymbolRules, policy: &ExitPolicy) -> Vec<Decimal> {
        policy
            .derived()
            .cum_fractions
            .iter()
            .map(|f| {
                if *f == Decimal::ONE {
                    original
                } else {
                    rules.quantize_qty(*f * original, true)
                }
            })
            .collect()
    }

    /// Moves the stop to `candidate` when that tightens it; returns whether it moved.
    fn tighten(&mut self, candidate: Decimal, reason: ExitReason) -> bool {
        if strictly_tighter(self.side, candidate, self.stop_price) {
            self.stop_price = candidate;
            self.stop_reason = reason;
            true
        } else {
            false
        }
    }

    fn apply_ladder_ratchet(&mut self, rules: &SymbolRules, policy: &ExitPolicy) {
        let config = policy.config();
        if let Some(n) = config.breakeven_after_level {
            if self.levels_done >= n {
                let target = toward_profit(
                    self.side,
                    self.entry_price,
                    policy.derived().breakeven_pct * self.entry_price,
                );
                let rounded = round_stop(self.side, target, rules);
                self.tighten(rounded, ExitReason::BreakevenStop);
            }
        }
        if config.ratchet_to_previous_level && self.levels_done >= 2 {
            if let Some(&previous) = self.ladder_prices.get(self.levels_done as usize - 2) {
                self.tighten(previous, ExitReason::RatchetStop);
            }
        }
    }

    fn trail_distance(&mut self, atr: Option<f64>, policy: &ExitPolicy) -> Decimal {
        let config = policy.config();
        if let Some(pct) = policy.derived().trail_pct {
            return pct * self.best_price;
        }
        match (config.trail_atr, usable_atr(atr)) {
            (Some(k), Some(a)) => {
                let bits = a.to_bits();
                if let Some((cached_bits, distance)) = self.trail_cache {
                    if cached_bits == bits {
                        return distance;
                    }
                }
                let distance = decimal_of("trail_atr", k * a)
                    .unwrap_or_else(|_| policy.derived().fallback_stop_pct * self.best_price);
                self.trail_cache = Some((bits, distance));
                distance
            }
            _ => policy.derived().fallback_stop_pct * self.best_price,
        }
    }

    /// Whether the ATR trailing candidate provably does not tighten the stop, decided in
    /// floats without building the decimal distance (one shortest-digits conversion per
    /// ATR value, the cost of a trailing update otherwise).
    ///
    /// For a LONG the candidate `ceil(best − d)` is above the stop exactly when
    /// `d < best − floor(stop)` (grid roundings; the SHORT mirror likewise), so a float
    /// `k × ATR` above that gap by a relative margin far wider than the conversion errors
    /// (half an ulp each) settles it. Only the ATR branch is decided here; the percent and
    /// fallback distances are cheap already.
    fn trail_cannot_tighten(
        &self,
        atr: Option<f64>,
        rules: &SymbolRules,
        policy: &ExitPolicy,
    ) -> bool {
        #[cfg(test)]
        if tests::NO_TRAIL_SHORTCUT.with(std::cell::Cell::get) {
            return false;
        }
        if policy.derived().trail_pct.is_some() {
            return false;
        }
        let (Some(k), Some(a)) = (policy.config().trail_atr, usable_atr(atr)) else {
            return false;
        };
        let x = k * a;
        // Far inside the range `decimal_of` converts, so the distance is `x`'s decimal.
        if !(x.is_finite() && x < 1e15) {
            return false;
        }
        let gap =
            (self.best_price - round_level(self.side, self.stop_price, rules)) * self.side.sign();
        if not_positive(gap) {
            // d >= 0 >= gap: the candidate is at or behind the stop.
            return true;
        }
        x > crate::fixed::decimal_to_f64_fast(gap) * (1.0 + 1e-9)
    }

    fn emit(
        &mut self,
        quantity: Decimal,
        reason: ExitReason,
        trigger: Decimal,
        mark: Decimal,
        now_ms: i64,
    ) -> ExitAction {
        self.sequence = self.sequence.saturating_add(1);
        let action = ExitAction {
            position_id: self.position_id.clone(),
            symbol: self.symbol.clone(),
            position_side: self.side,
            side: self.side.closing_side(),
            quantity,
            reason,
            trigger_price: trigger,
            mark_price: mark,
            sequence: self.sequence,
            is_full_close: quantity >= self.quantity,
            event_time_ms: now_ms,
            generation: self.generation,
        };
        self.pending = Some(action.clone());
        action
    }

    /// Applies one mark price at event time `now_ms` with the symbol's current
    /// ATR; returns the exit it triggers, which is then pending. A mark outside the
    /// symbol's plausible band (see [`super::bounds`]) is ignored: nothing changes.
    pub fn on_mark(
        &mut self,
        mark: Decimal,
        atr: Option<f64>,
        now_ms: i64,
        rules: &SymbolRules,
        policy: &ExitPolicy,
    ) -> Option<ExitAction> {
        self.evaluate(mark, atr, Some(now_ms), rules, policy)
    }

    /// [`PositionState::on_mark`], with the event time unknown (`None`: a position
    /// adopted before any message and without `opened_at_ms`): every rule but the time
    /// stop is evaluated, and the open time stays unset. An action then carries event
    /// time 0.
    pub fn evaluate(
        &mut self,
        mark: Decimal,
        atr: Option<f64>,
        now: Option<i64>,
        rules: &SymbolRules,
        policy: &ExitPolicy,
    ) -> Option<ExitAction> {
        if !bounds::plausible_price(mark, rules) {
            return None;
        }
        self.evaluate_in_band(mark, atr, now, rules, policy)
    }

    /// [`PositionState::evaluate`] for a mark the caller has already found inside the
    /// plausible band (the engine checks each update once, for every position of it).
    pub(crate) fn evaluate_in_band(
        &mut self,
        mark: Decimal,
        atr: Option<f64>,
        now: Option<i64>,
        rules: &SymbolRules,
        policy: &ExitPolicy,
    ) -> Option<ExitAction> {
        self.evaluate_rules(mark, atr, now, rules, policy)
    }

    /// [`PositionState::evaluate_in_band`] that also rebuilds `watch`, the position's
    /// [`MarkWatch`] for [`PositionState::quiet_mark`] (the engine; the backtest has its own
    /// quiet steps and does not pay for it): `None` when an action was emitted or no watch
    /// applies.
    pub(crate) fn evaluate_watched(
        &mut self,
        mark: Decimal,
        atr: Option<f64>,
        now: Option<i64>,
        rules: &SymbolRules,
        policy: &ExitPolicy,
        watch: &mut Option<MarkWatch>,
    ) -> Option<ExitAction> {
        let action = self.evaluate_rules(mark, atr, now, rules, policy);
        *watch = if action.is_none() {
            self.build_watch(policy)
        } else {
            None
        };
        action
    }

    /// The thresholds of [`MarkWatch`] for the state as it is now, or `None` when a mark
    /// may need the full evaluation whatever its price (pending action, over-leverage,
    /// open time unset, levels passed at adoption, trailing not yet settled or due by
    /// level, a price beyond eight decimals).
    pub(crate) fn build_watch(&self, policy: &ExitPolicy) -> Option<MarkWatch> {
        if self.pending.is_some()
            || not_positive(self.quantity)
            || self.over_leveraged
            || self.levels_passed_at_adoption > self.levels_done
        {
            return None;
        }
        let opened = self.opened_at_ms?;
        let config = policy.config();
        let trailing_configured = config.trail_atr.is_some() || config.trail_pct.is_some();
        if trailing_configured && !self.trailing_active && !self.activation_checked {
            return None;
        }
        // Trailing by level is due at the next evaluation whatever the mark (a level whose
        // quantity floors to zero is done inside an evaluation, after the trailing step).
        if trailing_configured
            && !self.trailing_active
            && config
                .trail_after_level
                .is_some_and(|n| self.levels_done >= n)
        {
            return None;
        }
        let signed = |price: Decimal| {
            price_units(price).map(|u| match self.side {
                PositionSide::Long => u,
                PositionSide::Short => -u,
            })
        };
        let done = self.levels_done as usize;
        let levels = self.ladder_prices.len().min(self.ladder_targets.len());
        let next_level = if done < levels {
            signed(self.ladder_prices[done])?
        } else {
            i64::MAX
        };
        let trail = if self.trailing_active {
            // The bits of the ATR, as an integer of the same width.
            self.trail_basis? as i64
        } else {
            match self.trail_activate_price {
                Some(price) if trailing_configured => signed(price)?,
                _ => i64::MAX,
            }
        };
        let time_stop_at = config
            .max_hold_ms
            .map_or(i64::MAX, |hold| opened.saturating_add(hold));
        let time_below = match self.time_stop_below_price {
            Some(price) => signed(price)?,
            None => i64::MAX,
        };
        Some(MarkWatch {
            stop: signed(self.stop_price)?,
            next_level,
            best: signed(self.best_price)?,
            trail,
            time_stop_at,
            time_below,
            trailing_active: self.trailing_active,
            side: self.side,
        })
    }

    /// Applies a mark that provably triggers nothing (see [`MarkWatch::quiet`]) and returns
    /// `true`, or returns `false` with nothing changed when the full evaluation is needed.
    /// `watch` is this position's watch (from [`PositionState::evaluate_watched`], kept in
    /// step: its best moves with the position's); `units` is `mark` in [`price_units`].
    /// The result is exactly what [`PositionState::evaluate`] would leave (property
    /// `quiet_marks_match_the_full_path`).
    #[inline]
    pub(crate) fn quiet_mark(
        &mut self,
        watch: &mut MarkWatch,
        units: i64,
        mark: Decimal,
        atr: Option<f64>,
        now_ms: i64,
    ) -> bool {
        #[cfg(test)]
        if tests::NO_QUIET_MARKS.with(std::cell::Cell::get) {
            return false;
        }
        let Some(improved) = watch.quiet(units, atr, now_ms) else {
            return false;
        };
        if improved {
            self.best_price = mark;
        }
        self.last_mark_price = Some(mark);
        #[cfg(test)]
        tests::QUIET_HITS.with(|c| c.set(c.get() + 1));
        true
    }

    /// The rules of one update in order (see the module header).
    fn evaluate_rules(
        &mut self,
        mark: Decimal,
        atr: Option<f64>,
        now: Option<i64>,
        rules: &SymbolRules,
        policy: &ExitPolicy,
    ) -> Option<ExitAction> {
        self.last_mark_price = Some(mark);
        if self.opened_at_ms.is_none() {
            self.opened_at_ms = now;
        }
        let now_ms = now.unwrap_or(0);
        if self.pending.is_some() || not_positive(self.quantity) {
            return None;
        }
        let side = self.side;
        // 1. best mark
        let improved = strictly_tighter(side, mark, self.best_price);
        if improved {
            self.best_price = mark;
        }
        // 2. trailing
        let config = policy.config();
        if !self.trailing_active && (config.trail_atr.is_some() || config.trail_pct.is_some()) {
            // Activation by price depends on the best mark alone, so it is
            // rechecked only when the best moved (or never was checked).
            let by_price = (improved || !self.activation_checked)
                && self
                    .trail_activate_price
                    .is_some_and(|p| profit_ge(side, self.best_price, p));
            self.activation_checked = true;
            let by_level = config
                .trail_after_level
                .is_some_and(|n| self.levels_done >= n);
            self.trailing_active = by_price || by_level;
        }
        if self.trailing_active {
            let basis = atr.map_or(0, f64::to_bits);
            if improved || self.trail_basis != Some(basis) {
                self.trail_basis = Some(basis);
                if !self.trail_cannot_tighten(atr, rules, policy) {
                    let distance = self.trail_distance(atr, policy);
                    let candidate =
                        round_stop(side, toward_loss(side, self.best_price, distance), rules);
                    if candidate > Decimal::ZERO {
                        self.tighten(candidate, ExitReason::TrailingStop);
                    }
                }
            }
        }
        if self.over_leveraged {
            return Some(self.emit(self.quantity, ExitReason::OverLeverage, mark, mark, now_ms));
        }
        // 3. stop
        if profit_ge(side, self.stop_price, mark) {
            return Some(self.emit(
                self.quantity,
                self.stop_reason,
                self.stop_price,
                mark,
                now_ms,
            ));
        }
        // 4. ladder
        let done = self.levels_done as usize;
        if done < self.ladder_prices.len() {
            let crossed = self.ladder_prices[done..]
                .iter()
                .take_while(|p| profit_ge(side, mark, **p))
                .count()
                + done;
            let crossed = crossed
                .max(self.levels_passed_at_adoption as usize)
                .min(self.ladder_prices.len().min(self.ladder_targets.len()));
            if crossed > done {
                let level = crossed; // 1-based index of the highest level crossed
                let trigger = self.ladder_prices[level - 1];
                let wanted = self.ladder_targets[level - 1] - self.ladder_closed;
                if let Some(quantity) = self.ladder_quantity(wanted, mark, rules) {
                    return Some(self.emit(
                        quantity,
                        ExitReason::TakeProfit(level as u32),
                        trigger,
                        mark,
                        now_ms,
                    ));
                }
                // Done with no order (its quantity floors to zero): the position keeps
                // its size; the level's breakeven and ratchet apply.
                self.levels_done = level as u32;
                self.apply_ladder_ratchet(rules, policy);
            }
        }
        // 5. time stop
        let opened_at = self.opened_at_ms.filter(|_| now.is_some());
        if let (Some(max_hold), Some(opened)) = (config.max_hold_ms, opened_at) {
            let expired = now_ms.saturating_sub(opened) >= max_hold;
            let below = self
                .time_stop_below_price
                .is_none_or(|p| !profit_ge(side, self.best_price, p));
            if expired && below {
                return Some(self.emit(self.quantity, ExitReason::TimeStop, mark, mark, now_ms));
            }
        }
        None
    }

    /// Returns the quantity a take-profit closes: `None` when `wanted` floors to zero
    /// (the level is done with no order, exit-rules.md), else `wanted`, or the whole live
    /// quantity when `wanted` or the remainder it leaves cannot trade on its own.
    fn ladder_quantity(
        &self,
        wanted: Decimal,
        mark: Decimal,
        rules: &SymbolRules,
    ) -> Option<Decimal> {
        let live = self.quantity;
        if wanted <= Decimal::ZERO {
            return None;
        }
        let min_qty = rules.min_qty(true);
        if wanted >= live || wanted < min_qty {
            return Some(live);
        }
        let remainder = live - wanted;
        // Both factors are bounded (1e12 × 1e15), far inside the decimal range.
        if remainder < min_qty || remainder * mark < rules.min_notional() {
            return Some(live);
        }
        Some(wanted)
    }

    fn pending_with(&self, sequence: u64) -> Result<&ExitAction, CoreError> {
        match &self.pending {
            Some(action) if action.sequence == sequence => Ok(action),
            Some(action) => Err(invalid(
                "sequence",
                sequence,
                &format!(
                    "position {} has action {} pending, not {sequence}",
                    self.position_id, action.sequence
                ),
            )),
            None => Err(invalid(
                "sequence",
                sequence,
                &format!("position {} has no pending action", self.position_id),
            )),
        }
    }

    /// Confirms the pending action `sequence` with `filled` (default: all of it).
    /// A take-profit fill advances the ladder and runs the ratchet.
    ///
    /// # Errors
    /// `CoreError::InvalidField` when `sequence` is not the pending action or
    /// `filled` is negative or above the action's quantity. Nothing changes then.
    pub fn confirm(
        &mut self,
        sequence: u64,
        filled: Option<Decimal>,
        rules: &SymbolRules,
        policy: &ExitPolicy,
    ) -> Result<Confirmed, CoreError> {
        let action = self.pending_with(sequence)?;
        let filled = filled.unwrap_or(action.quantity);
        if filled < Decimal::ZERO || filled > action.quantity {
            return Err(invalid(
                "filled_quantity",
                filled,
                &format!("must be in [0, {}]", action.quantity),
            ));
        }
        if !rules.is_on_qty_step(filled, true) {
            return Err(invalid(
                "filled_quantity",
                filled,
                &format!(
                    "is not on the MARKET_LOT_SIZE step {} (Binance fills on the step)",
                    rules.qty_step(true).normalize()
                ),
            ));
        }
        let reason = action.reason;
        let complete = filled == action.quantity;
        self.pending = None;
        let filled = filled.min(self.quantity);
        self.quantity -= filled;
        if let ExitReason::TakeProfit(level) = reason {
            self.ladder_closed += filled;
            let by_target = self
                .ladder_targets
                .iter()
                .take_while(|t| **t <= self.ladder_closed)
                .count() as u32;
            let reached = if complete {
                level.max(by_target)
            } else {
                by_target
            };
            self.levels_done = self.levels_done.max(reached);
        }
        if self.quantity <= Decimal::ZERO {
            self.quantity = Decimal::ZERO;
            return Ok(Confirmed::Closed);
        }
        self.apply_ladder_ratchet(rules, policy);
        Ok(Confirmed::Open)
    }

    /// Rejects the pending action `sequence`: the pending action is cleared and nothing
    /// else (the best mark and a trailing stop the update tightened stay: undoing them
    /// would loosen the stop); the same rule may fire again on the next update, with a
    /// new sequence.
    ///
    /// # Errors
    /// `CoreError::InvalidField` when `sequence` is not the pending action.
    pub fn reject(&mut self, sequence: u64) -> Result<(), CoreError> {
        self.pending_with(sequence)?;
        self.pending = None;
        Ok(())
    }

    /// Sets the live quantity after a partial entry fill (growth: the original
    /// size grows by the same amount and the ladder targets follow) or an
    /// external reduce (the original size stays). Returns `Closed` at zero.
    ///
    /// # Errors
    /// `CoreError::InvalidField` for a negative or off-step quantity, or one above 1e12.
    pub fn resize(
        &mut self,
        quantity: Decimal,
        rules: &SymbolRules,
        policy: &ExitPolicy,
    ) -> Result<Confirmed, CoreError> {
        bounds::check_quantity("quantity", quantity, true, rules)?;
        if quantity > self.quantity {
            let original = self.original_quantity + (quantity - self.quantity);
            if original > bounds::MAX_QUANTITY {
                return Err(invalid(
                    "quantity",
                    quantity,
                    &format!("would grow original_quantity to {original}, above 1e12"),
                ));
            }
            self.original_quantity = original;
            self.ladder_targets = Self::targets(self.original_quantity, rules, policy);
        }
        self.quantity = quantity;
        if quantity.is_zero() {
            return Ok(Confirmed::Closed);
        }
        Ok(Confirmed::Open)
    }

    /// Records the liquidation price; the stop tightens to stay
    /// `liq_buffer_pct` inside it (reason `stop_loss`). R is unchanged.
    ///
    /// # Errors
    /// `CoreError::InvalidField` for a negative price.
    pub fn set_liquidation_price(
        &mut self,
        price: Decimal,
        rules: &SymbolRules,
        policy: &ExitPolicy,
    ) -> Result<(), CoreError> {
        check_liquidation(price, self.side, self.best_price, rules)?;
        if price.is_zero() {
            self.liquidation_price = None;
            return Ok(());
        }
        self.liquidation_price = Some(price);
        let limit = toward_profit(
            self.side,
            price,
            policy.derived().liq_buffer_pct * self.entry_price,
        );
        let rounded = round_stop(self.side, limit, rules);
        self.tighten(rounded, ExitReason::StopLoss);
        Ok(())
    }

    /// Returns the price of the next ladder level not yet done.
    pub fn next_take_profit(&self) -> Option<Decimal> {
        self.ladder_prices.get(self.levels_done as usize).copied()
    }

    /// Checks a state that did not come from [`PositionState::open`] (a restored
    /// snapshot) against the bounds, the policy and the rules: the invariants every
    /// method relies on. The error names the field (`position[<id>].<field>`).
    ///
    /// # Errors
    /// `CoreError::InvalidField` for the first field that breaks one.
    #[allow(clippy::too_many_lines)] // one check per field, in field order
    pub fn validate(&self, rules: &SymbolRules, policy: &ExitPolicy) -> Result<(), CoreError> {
        let id = &self.position_id;
        let name = |field: &str| format!("position[{id}].{field}");
        let bad = |field: &str, value: String, rule: &str| {
            Err(CoreError::invalid_for(
                &self.symbol,
                name(field),
                value,
                rule,
            ))
        };
        let renamed = |field: &str, err: CoreError| match err {
            CoreError::InvalidField {
                symbol,
                value,
                rule,
                ..
            } => CoreError::InvalidField {
                symbol,
                field: name(field),
                value,
                rule,
            },
            other => other,
        };
        let price = |field: &str, value: Decimal| {
            bounds::check_price(field, value, rules).map_err(|e| renamed(field, e))
        };
        // Stops, levels and thresholds derive from the entry (up to 1e5 R beyond it).
        let derived = |field: &str, value: Decimal| {
            if value > Decimal::ZERO && value <= bounds::max_derived_price() {
                Ok(())
            } else {
                bad(
                    field,
                    value.to_string(),
                    "must be a positive price of at most 1e21",
                )
            }
        };
        let on_tick = |field: &str, value: Decimal| {
            derived(field, value)?;
            if rules.try_quantize_price(value, Rounding::Down).ok() == Some(value) {
                Ok(())
            } else {
                bad(field, value.to_string(), "is not on the symbol's tick grid")
            }
        };
        let quantity = |field: &str, value: Decimal, allow_zero: bool| {
            bounds::check_quantity(field, value, allow_zero, rules).map_err(|e| renamed(field, e))
        };
        if id.is_empty() {
            return bad("position_id", String::new(), "must not be empty");
        }
        quantity("quantity", self.quantity, false)?;
        quantity("original_quantity", self.original_quantity, false)?;
        if self.original_quantity < self.quantity {
            return bad(
                "original_quantity",
                self.original_quantity.to_string(),
                &format!("must be >= quantity {}", self.quantity),
            );
        }
        price("entry_price", self.entry_price)?;
        bounds::check_leverage(self.leverage).map_err(|e| renamed("leverage", e))?;
        bounds::check_confidence(self.confidence).map_err(|e| renamed("confidence", e))?;
        if let Some(opened) = self.opened_at_ms {
            bounds::check_event_time("opened_at_ms", opened)
                .map_err(|e| renamed("opened_at_ms", e))?;
        }
        if let Some(liq) = self.liquidation_price {
            check_liquidation(liq, self.side, self.best_price, rules)
                .map_err(|e| renamed("liquidation_price", e))?;
        }
        on_tick("stop_price", self.stop_price)?;
        price("best_price", self.best_price)?;
        if !self.r_distance.is_sign_positive() || self.r_distance > self.entry_price {
            return bad(
                "r_distance",
                self.r_distance.to_string(),
                &format!("must be in [0, entry_price {}]", self.entry_price),
            );
        }
        let levels = policy.config().ladder.len();
        if self.ladder_prices.len() != levels {
            return bad(
                "ladder_prices",
                format!("{} prices", self.ladder_prices.len()),
                &format!("must have one price per policy ladder level ({levels})"),
            );
        }
        if self.ladder_targets.len() != levels {
            return bad(
                "ladder_targets",
                format!("{} targets", self.ladder_targets.len()),
                &format!("must have one target per policy ladder level ({levels})"),
            );
        }
        for (i, level) in self.ladder_prices.iter().enumerate() {
            on_tick(&format!("ladder_prices[{i}]"), *level)?;
            let previous = if i == 0 {
                self.entry_price
            } else {
                self.ladder_prices[i - 1]
            };
            if !strictly_tighter(self.side, *level, previous) {
                return bad(
                    &format!("ladder_prices[{i}]"),
                    level.to_string(),
                    "must lie beyond the entry and the level before it, toward profit",
                );
            }
        }
        // The stop never lies beyond every price that can move it toward profit: the
        // best mark, a ladder level, the breakeven price, the liquidation buffer.
        // (A liquidation price is refused on the profit side of the best mark, so its
        // buffer moves the stop at most `liq_buffer_pct × entry` beyond the best.)
        let buffer = policy.derived().liq_buffer_pct * self.entry_price;
        let mut reach = round_stop(
            self.side,
            toward_profit(self.side, self.best_price, buffer),
            rules,
        );
        for candidate in self.ladder_prices.iter().copied().chain([round_stop(
            self.side,
            toward_profit(
                self.side,
                self.entry_price,
                policy.derived().breakeven_pct * self.entry_price,
            ),
            rules,
        )]) {
            if profit_ge(self.side, candidate, reach) {
                reach = candidate;
            }
        }
        if strictly_tighter(self.side, self.stop_price, reach) {
            return bad(
                "stop_price",
                self.stop_price.to_string(),
                &format!(
                    "lies beyond {reach}, the furthest a {} stop can move toward profit",
                    self.side
                ),
            );
        }
        let mut previous = Decimal::ZERO;
        for (i, target) in self.ladder_targets.iter().enumerate() {
            let field = format!("ladder_targets[{i}]");
            quantity(&field, *target, true)?;
            if *target < previous || *target > self.original_quantity {
                return bad(
                    &field,
                    target.to_string(),
                    &format!(
                        "must be at least the target before it ({previous}) and at most original_quantity {}",
                        self.original_quantity
                    ),
                );
            }
            previous = *target;
        }
        quantity("ladder_closed", self.ladder_closed, true)?;
        if self.ladder_closed > self.original_quantity {
            return bad(
                "ladder_closed",
                self.ladder_closed.to_string(),
                &format!(
                    "must be at most original_quantity {}",
                    self.original_quantity
                ),
            );
        }
        for (field, value) in [
            ("levels_done", self.levels_done),
            ("levels_passed_at_adoption", self.levels_passed_at_adoption),
        ] {
            if value as usize > levels {
                return bad(
                    field,
                    value.to_string(),
                    &format!("must be at most the number of ladder levels ({levels})"),
                );
            }
        }
        for (field, value) in [
            ("trail_activate_price", self.trail_activate_price),
            ("time_stop_below_price", self.time_stop_below_price),
        ] {
            if let Some(value) = value {
                derived(field, value)?;
            }
        }
        if let Some(mark) = self.last_mark_price {
            price("last_mark_price", mark)?;
        }
        if self.sequence > bounds::MAX_SEQUENCE {
            return bad(
                "sequence",
                self.sequence.to_string(),
                "must be at most 2^53",
            );
        }
        if let Some(action) = &self.pending {
            let field = "pending";
            if action.position_id != *id
                || action.symbol != self.symbol
                || action.position_side != self.side
                || action.side != self.side.closing_side()
                || action.generation != self.generation
            {
                return bad(
                    field,
                    format!(
                        "{} {} {}",
                        action.position_id, action.symbol, action.position_side
                    ),
                    "must be an action of this very position",
                );
            }
            if action.sequence != self.sequence || action.sequence == 0 {
                return bad(
                    "pending.sequence",
                    action.sequence.to_string(),
                    &format!("must be the position's last sequence {}", self.sequence),
                );
            }
            quantity("pending.quantity", action.quantity, false)?;
            // (The live quantity may have shrunk since: an external reduce.)
            if action.quantity > self.original_quantity {
                return bad(
                    "pending.quantity",
                    action.quantity.to_string(),
                    &format!(
                        "must be at most the original quantity {}",
                        self.original_quantity
                    ),
                );
            }
            derived("pending.trigger_price", action.trigger_price)?;
            price("pending.mark_price", action.mark_price)?;
            bounds::check_event_time("pending.event_time_ms", action.event_time_ms)
                .map_err(|e| renamed("pending.event_time_ms", e))?;
        }
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::exit::policy::{LadderLevel, PolicyConfig};
    use crate::exit::test_support::{btc, d, example_policy, exchange_rules};

    thread_local! {
        pub(crate) static QUIET_HITS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
        /// Set by tests to run every mark through the full evaluation.
        pub(crate) static NO_QUIET_MARKS: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
        /// Turns off the float shortcut of the trailing update, to compare with it on.
        pub(super) static NO_TRAIL_SHORTCUT: std::cell::Cell<bool> =
            const { std::cell::Cell::new(false) };
    }

    /// Runs `marks` (tick offsets from the entry, ATR) through a fresh position, every
    /// action confirmed in full; returns every action and the stop after every mark.
    fn trail_run(
        symbol: &str,
        side: PositionSide,
        marks: &[(i64, f64)],
        shortcut: bool,
    ) -> Vec<(Option<ExitAction>, Decimal, ExitReason)> {
        NO_TRAIL_SHORTCUT.with(|c| c.set(!shortcut));
        let rules = exchange_rules().symbol(symbol).unwrap().clone();
        let policy = ExitPolicy::new(PolicyConfig {
            stop_atr: Some(2.0),
            trail_atr: Some(1.5),
            trail_activate_r: Some(0.5),
            ladder: LadderLevel::ladder(&[(6.0, 0.5)]),
            ..PolicyConfig::default()
        })
        .unwrap();
        let tick = rules.tick_size();
        let tick_f = crate::fixed::decimal_to_f64(tick);
        let mut p = PositionState::open(
            OpenParams {
                symbol: symbol.into(),
                entry_price: rules.quantize_price(d("2000.37"), Rounding::Nearest),
                ..params(side, "1.000", "1")
            },
            Some(marks[0].1 * tick_f),
            &rules,
            &policy,
        )
        .unwrap();
        let mut out = Vec::new();
        for (t, &(offset, atr)) in marks.iter().enumerate() {
            let mark = p.entry_price + tick * Decimal::from(offset);
            let action = p.on_mark(mark, Some(atr * tick_f), t as i64, &rules, &policy);
            out.push((action.clone(), p.stop_price, p.stop_reason));
            if let Some(a) = action {
                if p.confirm(a.sequence, None, &rules, &policy).unwrap() == Confirmed::Closed {
                    break;
                }
            }
        }
        NO_TRAIL_SHORTCUT.with(|c| c.set(false));
        out
    }

    #[test]
    fn trailing_shortcut_keeps_a_trailing_exit() {
        for side in [PositionSide::Long, PositionSide::Short] {
            let sign = if side == PositionSide::Long { 1 } else { -1 };
            // Up 300 ticks with a wobbling ATR, then back down.
            let marks: Vec<(i64, f64)> = (0..300)
                .map(|i| (sign * i, 10.0 + f64::from(i32::try_from(i % 7).unwrap())))
                .chain((0..300).map(|i| (sign * (300 - i), 12.0)))
                .collect();
            let with = trail_run("BTCUSDT", side, &marks, true);
            assert_eq!(with, trail_run("BTCUSDT", side, &marks, false));
            let last = with.iter().find_map(|(a, _, _)| a.clone()).unwrap();
            assert_eq!(last.reason, ExitReason::TrailingStop);
        }
    }

    proptest::proptest! {
        /// The float shortcut of the trailing update never changes a stop or a decision:
        /// random walks with a moving ATR, both sides, a coarse and a fine tick.
        #[test]
        fn trailing_shortcut_changes_nothing(
            steps in proptest::collection::vec((-40i64..=40, 0.5f64..80.0), 2..120),
            short in proptest::bool::ANY,
            fine in proptest::bool::ANY,
        ) {
            let side = if short { PositionSide::Short } else { PositionSide::Long };
            let symbol = if fine { "ETHUSDT" } else { "BTCUSDT" };
            let mut offset = 0;
            let marks: Vec<(i64, f64)> = steps
                .iter()
                .map(|&(step, atr)| {
                    offset += step;
                    (offset, atr)
                })
                .collect();
            proptest::prop_assert_eq!(
                trail_run(symbol, side, &marks, true),
                trail_run(symbol, side, &marks, false)
            );
        }
    }

    /// `plan_stop` for BTCUSDT entered at 30000 under the worked example's policy.
    fn btc_plan(
        side: PositionSide,
        leverage: u32,
        atr: Option<f64>,
        liquidation: Option<&str>,
    ) -> StopPlan {
        plan_stop(
            side,
            d("30000"),
            leverage,
            atr,
            liquidation.map(d),
            &btc(),
            &example_policy(),
        )
        .unwrap()
    }

    fn params(side: PositionSide, quantity: &str, entry: &str) -> OpenParams {
        OpenParams {
            position_id: "p1".into(),
            symbol: "BTCUSDT".into(),
            side,
            quantity: d(quantity),
            entry_price: d(entry),
            leverage: 10,
            confidence: None,
            opened_at_ms: Some(0),
            liquidation_price: None,
        }
    }

    fn open(side: PositionSide, policy: &ExitPolicy) -> PositionState {
        PositionState::open(params(side, "0.010", "30000.0"), Some(60.0), &btc(), policy).unwrap()
    }

    fn mark(p: &mut PositionState, price: &str, policy: &ExitPolicy) -> Option<ExitAction> {
        p.on_mark(d(price), Some(60.0), 1_000, &btc(), policy)
    }

    #[test]
    fn worked_example_initial_stop_and_ladder() {
        let policy = example_policy();
        let p = open(PositionSide::Long, &policy);
        assert_eq!(p.stop_price, d("29880.0"));
        assert_eq!(p.r_distance, d("120.0"));
        assert_eq!(
            p.ladder_prices,
            vec![d("30120.0"), d("30240.0"), d("30360.0")]
        );
        assert_eq!(p.ladder_targets, vec![d("0.003"), d("0.006"), d("0.010")]);
        assert!(!p.over_leveraged);
    }

    #[test]
    fn worked_example_jump_to_tp3() {
        let policy = example_policy();
        let rules = btc();
        let mut p = open(PositionSide::Long, &policy);
        let a = mark(&mut p, "30125.0", &policy).unwrap();
        assert_eq!(
            (a.reason, a.quantity, a.side.as_str(), a.sequence),
            (ExitReason::TakeProfit(1), d("0.003"), "SELL", 1)
        );
        assert_eq!(a.trigger_price, d("30120.0"));
        assert!(!a.is_full_close);
        assert_eq!(
            mark(&mut p, "30200.0", &policy),
            None,
            "pending: nothing else"
        );
        assert_eq!(
            p.confirm(1, None, &rules, &policy).unwrap(),
            Confirmed::Open
        );
        assert_eq!(p.stop_price, d("30030.0"));
        assert_eq!(p.stop_reason, ExitReason::BreakevenStop);
        assert_eq!(mark(&mut p, "30130.0", &policy), None);
        let a = mark(&mut p, "30370.0", &policy).unwrap();
        assert_eq!(
            (a.reason, a.quantity, a.sequence),
            (ExitReason::TakeProfit(3), d("0.007"), 2)
        );
        assert!(a.is_full_close);
        assert_eq!(p.stop_price, d("30250.0"), "trailing active from 3R");
        assert_eq!(
            p.confirm(2, None, &rules, &policy).unwrap(),
            Confirmed::Closed
        );
    }

    #[test]
    fn worked_example_ratchet_stop() {
        let policy = example_policy();
        let rules = btc();
        let mut p = open(PositionSide::Long, &policy);
        mark(&mut p, "30125.0", &policy).unwrap();
        p.confirm(1, None, &rules, &policy).unwrap();
        let a = mark(&mut p, "30250.0", &policy).unwrap();
        assert_eq!(
            (a.reason, a.quantity),
            (ExitReason::TakeProfit(2), d("0.003"))
        );
        p.confirm(2, None, &rules, &policy).unwrap();
        assert_eq!(
            (p.stop_price, p.stop_reason),
            (d("30120.0"), ExitReason::RatchetStop)
        );
        let a = mark(&mut p, "29990.0", &policy).unwrap();
        assert_eq!(
            (a.reason, a.quantity, a.trigger_price),
            (ExitReason::RatchetStop, d("0.004"), d("30120.0"))
        );
        assert!(a.is_full_close);
    }

    #[test]
    fn short_mirrors_the_example() {
        let policy = example_policy();
        let rules = btc();
        let mut p = open(PositionSide::Short, &policy);
        assert_eq!(p.stop_price, d("30120.0"));
        assert_eq!(
            p.ladder_prices,
            vec![d("29880.0"), d("29760.0"), d("29640.0")]
        );
        let a = mark(&mut p, "29875.0", &policy).unwrap();
        assert_eq!(
            (a.reason, a.quantity, a.side.as_str()),
            (ExitReason::TakeProfit(1), d("0.003"), "BUY")
        );
        p.confirm(1, None, &rules, &policy).unwrap();
        assert_eq!(p.stop_price, d("29970.0"));
        let a = mark(&mut p, "29750.0", &policy).unwrap();
        assert_eq!(
            (a.reason, a.quantity),
            (ExitReason::TakeProfit(2), d("0.003"))
        );
        p.confirm(2, None, &rules, &policy).unwrap();
        assert_eq!(
            (p.stop_price, p.stop_reason),
            (d("29880.0"), ExitReason::RatchetStop)
        );
        let a = mark(&mut p, "30010.0", &policy).unwrap();
        assert_eq!(
            (a.reason, a.quantity, a.trigger_price),
            (ExitReason::RatchetStop, d("0.004"), d("29880.0"))
        );
    }

    #[test]
    fn initial_stop_loss_long_and_short() {
        let policy = example_policy();
        let mut p = open(PositionSide::Long, &policy);
        assert_eq!(mark(&mut p, "29880.1", &policy), None);
        let a = mark(&mut p, "29880.0", &policy).unwrap();
        assert_eq!((a.reason, a.quantity), (ExitReason::StopLoss, d("0.010")));
        let mut s = open(PositionSide::Short, &policy);
        let a = mark(&mut s, "30125.0", &policy).unwrap();
        assert_eq!(
            (a.reason, a.side.as_str(), a.trigger_price),
            (ExitReason::StopLoss, "BUY", d("30120.0"))
        );
    }

    #[test]
    fn stop_distance_floor_cap_and_margin_cap() {
        // ATR 10 → d = 20 < floor 90.
        let plan = btc_plan(PositionSide::Long, 10, Some(10.0), None);
        assert_eq!(plan.stop_price, d("29910.0"));
        // ATR 1000 → d = 2000, capped by max_stop_pct 900 and the margin cap 300.
        let plan = btc_plan(PositionSide::Long, 10, Some(1000.0), None);
        assert_eq!(plan.stop_price, d("29700.0"));
        // Without ATR: fallback 1 % = 300, under the cap 300 at 10x.
        let plan = btc_plan(PositionSide::Short, 20, None, None);
        assert_eq!(
            plan.stop_price,
            d("30150.0"),
            "margin cap 0.10 / 20 = 0.5 %"
        );
        // Stop rounds UP (tightening) for a LONG, DOWN for a SHORT.
        let plan = btc_plan(PositionSide::Long, 10, Some(60.03), None);
        assert_eq!(plan.stop_price, d("29880.0"));
        let plan = btc_plan(PositionSide::Short, 10, Some(60.03), None);
        assert_eq!(plan.stop_price, d("30120.0"));
    }

    #[test]
    fn over_leverage_and_liquidation() {
        let policy = example_policy();
        let rules = btc();
        // 0.10 / 50 = 0.2 % < min 0.3 %.
        let plan = btc_plan(PositionSide::Long, 50, Some(60.0), None);
        assert!(plan.over_leveraged);
        let mut p = PositionState::open(
            OpenParams {
                leverage: 50,
                ..params(PositionSide::Long, "0.010", "30000.0")
            },
            Some(60.0),
            &rules,
            &policy,
        )
        .unwrap();
        let a = mark(&mut p, "30001.0", &policy).unwrap();
        assert_eq!(
            (a.reason, a.quantity, a.is_full_close),
            (ExitReason::OverLeverage, d("0.010"), true)
        );
        // Liquidation 29800 + 1 % buffer (300) = 30100 is above entry − min: over-leveraged.
        let plan = btc_plan(PositionSide::Long, 10, Some(60.0), Some("29800"));
        assert!(plan.over_leveraged);
        // Liquidation 27000 + 300 = 27300: the stop 29880 is already inside.
        let plan = btc_plan(PositionSide::Long, 10, Some(60.0), Some("27000"));
        assert_eq!(plan.stop_price, d("29880.0"));
        assert!(!plan.over_leveraged);
        // Liquidation 29500 + 300 = 29800 is tighter than nothing, looser than 29880: keep 29880.
        let mut p = open(PositionSide::Long, &policy);
        p.set_liquidation_price(d("29600"), &rules, &policy)
            .unwrap();
        assert_eq!(p.stop_price, d("29900.0"));
        assert_eq!(p.stop_reason, ExitReason::StopLoss);
        p.set_liquidation_price(d("29000"), &rules, &policy)
            .unwrap();
        assert_eq!(p.stop_price, d("29900.0"), "never loosens");
    }

    #[test]
    fn reject_rearms_with_a_new_sequence() {
        let policy = example_policy();
        let rules = btc();
        let mut p = open(PositionSide::Long, &policy);
        let a = mark(&mut p, "30125.0", &policy).unwrap();
        assert!(p.confirm(7, None, &rules, &policy).is_err());
        p.reject(a.sequence).unwrap();
        assert!(p.reject(a.sequence).is_err(), "nothing pending any more");
        let b = mark(&mut p, "30126.0", &policy).unwrap();
        assert_eq!(
            (b.reason, b.quantity, b.sequence),
            (ExitReason::TakeProfit(1), d("0.003"), 2)
        );
    }

    #[test]
    fn partial_fill_leaves_the_rest_of_the_level() {
        let policy = example_policy();
        let rules = btc();
        let mut p = open(PositionSide::Long, &policy);
        mark(&mut p, "30125.0", &policy).unwrap();
        assert_eq!(
            p.confirm(1, Some(d("0.001")), &rules, &policy).unwrap(),
            Confirmed::Open
        );
        assert_eq!((p.quantity, p.levels_done), (d("0.009"), 0));
        assert_eq!(
            p.stop_reason,
            ExitReason::StopLoss,
            "no ratchet before the level is done"
        );
        let a = mark(&mut p, "30125.0", &policy).unwrap();
        assert_eq!(
            (a.reason, a.quantity),
            (ExitReason::TakeProfit(1), d("0.002"))
        );
        p.confirm(a.sequence, None, &rules, &policy).unwrap();
        assert_eq!(
            (p.quantity, p.levels_done, p.stop_reason),
            (d("0.007"), 1, ExitReason::BreakevenStop)
        );
        assert!(p.confirm(a.sequence, None, &rules, &policy).is_err());
    }

    #[test]
    fn dust_remainder_becomes_a_full_close() {
        let policy = example_policy();
        let rules = btc();
        // 0.005 at 30000: TP1 = floor(0.0015) = 0.001, remainder 0.004 × 30120 = 120 ≥ 100.
        let mut p = PositionState::open(
            params(PositionSide::Long, "0.005", "30000.0"),
            Some(60.0),
            &rules,
            &policy,
        )
        .unwrap();
        let a = mark(&mut p, "30120.0", &policy).unwrap();
        assert_eq!((a.quantity, a.is_full_close), (d("0.001"), false));
        // 0.004: TP1 0.001 leaves 0.003 × 30120 = 90.4 < MIN_NOTIONAL 100 → full close.
        let mut p = PositionState::open(
            params(PositionSide::Long, "0.004", "30000.0"),
            Some(60.0),
            &rules,
            &policy,
        )
        .unwrap();
        let a = mark(&mut p, "30120.0", &policy).unwrap();
        assert_eq!(
            (a.quantity, a.is_full_close, a.reason),
            (d("0.004"), true, ExitReason::TakeProfit(1))
        );
    }

    #[test]
    fn a_level_flooring_to_zero_is_done_with_no_order() {
        // exit-rules.md: 0.003 BTC, fractions 0.3/0.3/0.4 → targets 0 / 0.001 / 0.003.
        let policy = example_policy();
        let rules = btc();
        let mut p = PositionState::open(
            params(PositionSide::Long, "0.003", "30000.0"),
            Some(60.0),
            &rules,
            &policy,
        )
        .unwrap();
        assert_eq!(p.ladder_targets, vec![d("0"), d("0.001"), d("0.003")]);
        assert_eq!(mark(&mut p, "30125.0", &policy), None, "no order at TP1");
        assert_eq!(p.quantity, d("0.003"), "the position keeps its size");
        assert_eq!((p.levels_done, p.sequence), (1, 0));
        assert_eq!(
            (p.stop_price, p.stop_reason),
            (d("30030.0"), ExitReason::BreakevenStop),
            "the level's breakeven still applies"
        );
        // TP2: 0.001 would leave 0.002 × 30250 = 60.5 < MIN_NOTIONAL 100 → full close.
        let a = mark(&mut p, "30250.0", &policy).unwrap();
        assert_eq!(
            (a.reason, a.quantity, a.is_full_close, a.sequence),
            (ExitReason::TakeProfit(2), d("0.003"), true, 1)
        );
        // The same 0.003 long stopped before TP1: the breakeven never applied.
        let mut q = PositionState::open(
            params(PositionSide::Long, "0.003", "30000.0"),
            Some(60.0),
            &rules,
            &policy,
        )
        .unwrap();
        let a = mark(&mut q, "29880.0", &policy).unwrap();
        assert_eq!((a.reason, a.quantity), (ExitReason::StopLoss, d("0.003")));
    }

    #[test]
    fn trailing_by_pct_from_activation_pct() {
        let policy = ExitPolicy::preset("standard").unwrap();
        let rules = btc();
        let mut p = PositionState::open(
            params(PositionSide::Long, "10.000", "100.0"),
            None,
            &rules,
            &policy,
        )
        .unwrap();
        // 10 % of margin at 10x = 1 % of price.
        assert_eq!(p.stop_price, d("99.0"));
        assert_eq!(p.ladder_prices, vec![d("101.5"), d("102.5"), d("104.0")]);
        assert_eq!(p.ladder_targets, vec![d("3.000"), d("6.000"), d("8.000")]);
        let a = p.on_mark(d("101.5"), None, 1, &rules, &policy).unwrap();
        assert_eq!(a.reason, ExitReason::TakeProfit(1));
        p.confirm(1, None, &rules, &policy).unwrap();
        assert_eq!(p.stop_price, d("100.1"), "breakeven + 2 × 0.0005");
        let a = p.on_mark(d("104.0"), None, 2, &rules, &policy).unwrap();
        assert_eq!(
            (a.reason, a.quantity),
            (ExitReason::TakeProfit(3), d("5.000"))
        );
        p.confirm(a.sequence, None, &rules, &policy).unwrap();
        assert!(p.trailing_active);
        assert_eq!(p.stop_price, d("102.5"), "104 − 1.5 % = 102.44, rounded up");
        assert_eq!(p.on_mark(d("110.0"), None, 3, &rules, &policy), None);
        assert_eq!(p.stop_price, d("108.4"), "110 − 1.65 = 108.35 → 108.4");
        assert_eq!(p.on_mark(d("109.0"), None, 4, &rules, &policy), None);
        assert_eq!(p.stop_price, d("108.4"), "never loosens");
        let a = p.on_mark(d("108.4"), None, 5, &rules, &policy).unwrap();
        assert_eq!(
            (a.reason, a.quantity, a.trigger_price),
            (ExitReason::TrailingStop, d("2.000"), d("108.4"))
        );
    }

    #[test]
    fn time_stop_unless_profit() {
        let policy = ExitPolicy::preset("challenge").unwrap();
        let rules = btc();
        let mut p = open(PositionSide::Long, &policy);
        assert_eq!(
            p.on_mark(d("30010.0"), Some(60.0), 7_199_999, &rules, &policy),
            None
        );
        let a = p
            .on_mark(d("30010.0"), Some(60.0), 7_200_000, &rules, &policy)
            .unwrap();
        assert_eq!(
            (a.reason, a.quantity, a.event_time_ms),
            (ExitReason::TimeStop, d("0.010"), 7_200_000)
        );
        // Once +1R was reached, the time stop is off.
        let mut p = open(PositionSide::Short, &policy);
        let tp = p
            .on_mark(d("29880.0"), Some(60.0), 1, &rules, &policy)
            .unwrap();
        p.reject(tp.sequence).unwrap();
        assert_eq!(
            p.on_mark(d("29990.0"), Some(60.0), 8_000_000, &rules, &policy),
            None
        );
    }

    #[test]
    fn trailing_after_level_with_atr() {
        let policy = ExitPolicy::preset("challenge").unwrap();
        let rules = btc();
        let mut p = open(PositionSide::Short, &policy);
        let a = p
            .on_mark(d("29870.0"), Some(60.0), 1, &rules, &policy)
            .unwrap();
        assert_eq!(
            (a.reason, a.quantity),
            (ExitReason::TakeProfit(1), d("0.003"))
        );
        p.confirm(1, None, &rules, &policy).unwrap();
        assert_eq!(
            (p.stop_price, p.stop_reason),
            (d("29970.0"), ExitReason::BreakevenStop)
        );
        assert_eq!(
            p.on_mark(d("29800.0"), Some(60.0), 2, &rules, &policy),
            None
        );
        assert_eq!(
            (p.stop_price, p.stop_reason),
            (d("29920.0"), ExitReason::TrailingStop)
        );
        let a = p
            .on_mark(d("29920.0"), Some(60.0), 3, &rules, &policy)
            .unwrap();
        assert_eq!(
            (a.reason, a.quantity, a.side.as_str()),
            (ExitReason::TrailingStop, d("0.007"), "BUY")
        );
    }

    #[test]
    fn adoption_fires_passed_levels_and_infers_progress() {
        let policy = example_policy();
        let rules = btc();
        let adopted = PositionState::adopt(
            params(PositionSide::Long, "0.007", "30000.0"),
            Some(d("0.010")),
            Some(d("30250.0")),
            Some(60.0),
            &rules,
            &policy,
        )
        .unwrap();
        assert_eq!(adopted.levels_done, 1);
        assert_eq!(adopted.stop_reason, ExitReason::BreakevenStop);
        let mut p = adopted.clone();
        // The mark fell back under level 2 but the best passed it: it fires at once.
        let a = p
            .on_mark(d("30100.0"), Some(60.0), 5, &rules, &policy)
            .unwrap();
        assert_eq!(
            (a.reason, a.quantity),
            (ExitReason::TakeProfit(2), d("0.003"))
        );
        assert!(PositionState::adopt(
            params(PositionSide::Long, "0.007", "30000.0"),
            Some(d("0.005")),
            None,
            None,
            &rules,
            &policy
        )
        .is_err());
    }

    #[test]
    fn resize_grows_original_and_reduce_keeps_it() {
        let policy = example_policy();
        let rules = btc();
        let mut p = PositionState::open(
            params(PositionSide::Long, "0.004", "30000.0"),
            Some(60.0),
            &rules,
            &policy,
        )
        .unwrap();
        p.resize(d("0.010"), &rules, &policy).unwrap();
        assert_eq!(
            (p.original_quantity, p.ladder_targets.clone()),
            (d("0.010"), vec![d("0.003"), d("0.006"), d("0.010")])
        );
        p.resize(d("0.008"), &rules, &policy).unwrap();
        assert_eq!(p.original_quantity, d("0.010"));
        let a = mark(&mut p, "30400.0", &policy).unwrap();
        assert_eq!(
            (a.quantity, a.is_full_close),
            (d("0.008"), true),
            "never more than is open"
        );
        assert_eq!(
            p.resize(d("0"), &rules, &policy).unwrap(),
            Confirmed::Closed
        );
    }

    proptest::proptest! {
        /// The float shortcut of the ladder gives the decimal path's levels exactly: both
        /// sides, R and percent ladders, stretched by any confidence, on grids from 0.1
        /// (BTCUSDT) to 1e-7 (1000PEPEUSDT), including levels that land on a tick.
        #[test]
        fn float_ladder_levels_match_the_decimal_path(
            symbol in proptest::sample::select(vec!["BTCUSDT", "SOLUSDT", "XRPUSDT", "1000PEPEUSDT"]),
            entry_ticks in 1i64..2_000_000,
            r_ticks in 0i64..5_000,
            confidence in proptest::option::of(0.0f64..=1.0),
            short in proptest::bool::ANY,
            pct in proptest::bool::ANY,
            at in proptest::sample::select(vec![0.5, 1.0, 1.5, 2.0, 3.0, 0.3, 0.007]),
        ) {
            let rules = exchange_rules().symbol(symbol).unwrap().clone();
            let policy = ExitPolicy::new(PolicyConfig {
                ladder: vec![
                    LadderLevel { at, fraction: 0.5 },
                    LadderLevel { at: at * 2.0, fraction: 0.5 },
                ],
                ladder_unit: if pct { LadderUnit::Pct } else { LadderUnit::R },
                confidence_scale: 1.0,
                m_min: 0.5,
                m_max: 1.5,
                ..PolicyConfig::default()
            });
            let Ok(policy) = policy else {
                return Ok(()); // a percent ladder past its bounds: nothing to compare
            };
            let tick = rules.tick_size();
            let entry = rules.price_filter.min_price + Decimal::from(entry_ticks) * tick;
            let r = Decimal::from(r_ticks) * tick;
            let side = if short { PositionSide::Short } else { PositionSide::Long };
            let fast = ladder_prices_by(side, entry, r, confidence, &rules, &policy, true);
            let exact = ladder_prices_by(side, entry, r, confidence, &rules, &policy, false);
            proptest::prop_assert_eq!(
                fast.map(|v| v.iter().map(Decimal::serialize).collect::<Vec<_>>()).ok(),
                exact.map(|v| v.iter().map(Decimal::serialize).collect::<Vec<_>>()).ok()
            );
        }
    }

    #[test]
    fn confidence_stretches_the_ladder() {
        let policy = ExitPolicy::new(PolicyConfig {
            ladder: LadderLevel::ladder(&[(1.0, 0.5)]),
            stop_atr: Some(2.0),
            confidence_scale: 1.0,
            m_min: 0.5,
            m_max: 1.5,
            ..PolicyConfig::default()
        })
        .unwrap();
        let rules = btc();
        let p = PositionState::open(
            OpenParams {
                confidence: Some(1.0),
                ..params(PositionSide::Long, "0.010", "30000.0")
            },
            Some(60.0),
            &rules,
            &policy,
        )
        .unwrap();
        assert_eq!(p.ladder_prices, vec![d("30180.0")], "m = 1.5");
    }

    #[test]
    fn short_over_leverage_and_liquidation_buffer() {
        let policy = example_policy();
        let rules = btc();
        let plan = btc_plan(PositionSide::Short, 50, Some(60.0), None);
        assert!(plan.over_leveraged);
        // Liquidation 30400 − 1 % buffer (300) = 30100 is tighter than the ATR stop 30120.
        let plan = btc_plan(PositionSide::Short, 10, Some(60.0), Some("30400"));
        assert_eq!(
            (plan.stop_price, plan.stop_distance, plan.over_leveraged),
            (d("30100.0"), d("100.0"), false)
        );
        let mut p = open(PositionSide::Short, &policy);
        p.set_liquidation_price(d("30350"), &rules, &policy)
            .unwrap();
        assert_eq!(
            (p.stop_price, p.stop_reason),
            (d("30050.0"), ExitReason::StopLoss)
        );
        let mut p = PositionState::open(
            OpenParams {
                leverage: 50,
                ..params(PositionSide::Short, "0.010", "30000.0")
            },
            Some(60.0),
            &rules,
            &policy,
        )
        .unwrap();
        let a = mark(&mut p, "29990.0", &policy).unwrap();
        assert_eq!(
            (a.reason, a.side.as_str(), a.quantity),
            (ExitReason::OverLeverage, "BUY", d("0.010"))
        );
    }
}
