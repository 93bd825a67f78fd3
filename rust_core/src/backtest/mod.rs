//! Historical bars through the same per-position exit state machine as the daemon
//! ([`crate::exit::position`]), in parallel over symbols and exit policies.
//!
//! Nothing here decides an exit: each bar becomes a short mark-price path and every mark
//! goes through `Position::on_mark`, exactly as a live mark does; this module only decides
//! which marks a bar stands for, when entries happen and how an action fills.
//!
//! # Mark path of a bar
//! open, then the two extremes, then close. The order of the extremes is the intrabar
//! rule: `StopFirst` (default, conservative) visits the adverse extreme first (the low
//! for a LONG, the high for a SHORT), `TargetFirst` the favourable one. When finer bars
//! cover the whole bar, their own paths (open, extremes by the same rule, close per fine
//! bar) replace the guess. Between two points of one bar the price is taken to move
//! continuously, so every trigger it crosses (the stop, each pending take-profit level)
//! is visited as a mark of its own, in the order the move reaches them; that is what the
//! daemon would see from a 1 s mark stream. An open is a jump from the previous close: no
//! mark is invented in between.
//!
//! # Quiet bars
//! Most bars change nothing but a position's best mark and its trailing stop. Such a bar
//! (its range crosses no stop, no pending level, no trailing activation, no due time stop)
//! is settled in grid ticks as one step, without the four state-machine calls its path
//! would take; any other bar, or one with finer bars, walks its path, where each mark that
//! provably triggers nothing is settled the same way and the others go through `on_mark`.
//! `Triggers` states the conditions; `BacktestOptions::exhaustive` feeds every mark, and
//! the tests check that both give the same fills, trades and stops.
//!
//! # Fill model
//! - An action fills at the mark that triggered it, with its whole quantity, at once
//!   (confirmed before the next mark): at the trigger price when the path crossed it, at
//!   the open when the bar opened beyond it (gap through a stop: worse; through a target:
//!   better), at the mark for a time stop.
//! - Entries are MARKET at the open of the first bar at or after the entry time, provided
//!   that bar starts less than one interval after it (otherwise the entry fell into a gap
//!   or outside the data and is skipped). Size: notional / open, floored to the
//!   `MARKET_LOT_SIZE` step; below `minQty` or `MIN_NOTIONAL` the entry is skipped.
//! - Fees: `rate * price * quantity` rounded half-up to 8 decimals (USDT commission
//!   precision); entries pay taker (maker on request), exits taker.
//! - ATR is Wilder's over closed bars of the current segment (the bar being replayed is
//!   not in it); a gap longer than `max_gap_bars` ends the segment: open positions close
//!   at the last close (`data_gap`), ATR restarts. Positions open at the end close at the
//!   last close (`end_of_data`).
//!
//! # Parallelism
//! One job per (series, policy), run with rayon's work stealing: jobs differ a lot in
//! length (43k to 151k bars, and policies that trade more), which a static split over
//! `std::thread`s would balance badly. Jobs share the prepared bars read-only; nothing is
//! locked. The binding runs [`run`] with the GIL released.

use std::borrow::Cow;
use std::collections::HashMap;

use rayon::prelude::*;

use crate::atr::WilderAtr;
use crate::error::CoreError;
use crate::exit::action::{ExitReason, PositionSide};
use crate::exit::policy::ExitPolicy;
use crate::exit::position::{Confirmed, OpenParams, PositionState};
use crate::fixed::{
    decimal_from_f64, decimal_to_f64, mantissa_at, short_decimal_from_f64, Decimal, Rounding,
};
use crate::rules::{ExchangeRules, SymbolRules};

/// Which extreme of a bar the path visits first when nothing finer says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Intrabar {
    /// The adverse extreme first (low for a LONG, high for a SHORT): the conservative guess.
    StopFirst,
    /// The favourable extreme first.
    TargetFirst,
}

impl Intrabar {
    /// Parses `stop_first` or `target_first`.
    pub fn parse(text: &str) -> Result<Self, CoreError> {
        match text {
            "stop_first" => Ok(Self::StopFirst),
            "target_first" => Ok(Self::TargetFirst),
            _ => Err(CoreError::invalid(
                "intrabar",
                text,
                "must be stop_first or target_first",
            )),
        }
    }
}

/// Direction of a position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Long,
    Short,
}

impl Direction {
    fn sign(self) -> Decimal {
        match self {
            Self::Long => Decimal::ONE,
            Self::Short => Decimal::NEGATIVE_ONE,
        }
    }
}

/// OHLC bars, oldest first, `open_time` in ms: owned, or borrowed from the caller's
/// arrays (the Python binding reads numpy arrays in place instead of copying them).
#[derive(Debug, Clone, Default)]
pub struct Bars<'a> {
    pub open_time: Cow<'a, [i64]>,
    pub open: Cow<'a, [f64]>,
    pub high: Cow<'a, [f64]>,
    pub low: Cow<'a, [f64]>,
    pub close: Cow<'a, [f64]>,
}

impl Bars<'_> {
    fn len(&self) -> usize {
        self.open_time.len()
    }

    fn check(&self, symbol: &str, what: &str) -> Result<(), CoreError> {
        let n = self.open_time.len();
        for (name, len) in [
            ("open", self.open.len()),
            ("high", self.high.len()),
            ("low", self.low.len()),
            ("close", self.close.len()),
        ] {
            if len != n {
                return Err(CoreError::invalid_for(
                    symbol,
                    format!("{what}.{name}"),
                    len.to_string(),
                    format!("must have as many values as {what}.open_time ({n})"),
                ));
            }
        }
        if let Some(i) = self.open_time.windows(2).position(|w| w[1] <= w[0]) {
            return Err(CoreError::invalid_for(
                symbol,
                format!("{what}.open_time"),
                self.open_time[i + 1].to_string(),
                format!(
                    "must be strictly increasing (row {} follows {})",
                    i + 1,
                    self.open_time[i]
                ),
            ));
        }
        Ok(())
    }
}

/// One entry request: at `time_ms`, open `direction`.
#[derive(Debug, Clone)]
pub struct Entry {
    pub time_ms: i64,
    pub direction: Direction,
    pub confidence: Option<f64>,
    /// USDT notional; `None` uses [`BacktestOptions::notional`].
    pub notional: Option<Decimal>,
    /// `None` uses [`BacktestOptions::leverage`].
    pub leverage: Option<u32>,
}

/// One symbol's history and entries.
#[derive(Debug, Clone)]
pub struct SeriesInput<'a> {
    pub symbol: String,
    pub interval_ms: i64,
    pub bars: Bars<'a>,
    /// Finer bars (`interval_ms` dividing the series') that resolve the intrabar order.
    pub fine: Option<(i64, Bars<'a>)>,
    /// Sorted by time.
    pub entries: Vec<Entry>,
}

/// Sizing, fees and replay rules shared by every job of a run.
#[derive(Debug, Clone)]
#[allow(clippy::struct_excessive_bools)] // independent switches, each named at the call site
pub struct BacktestOptions {
    pub maker_fee: Decimal,
    pub taker_fee: Decimal,
    /// Entries pay the maker fee instead of the taker fee.
    pub entry_maker: bool,
    pub notional: Decimal,
    pub leverage: u32,
    pub intrabar: Intrabar,
    pub max_gap_bars: u32,
    /// At most one open position per symbol (else one per symbol and direction).
    pub one_position_per_symbol: bool,
    /// Keep the chart data (stop after every bar, level prices) and exact strings.
    pub detail: bool,
    /// Feed every mark of the path, even those that provably change nothing (see `Quiet`);
    /// slower, for checking that skipping them changes no decision.
    pub exhaustive: bool,
}

/// Every reason a fill or a skipped entry can carry, by code.
pub const REASONS: &[&str] = &[
    "entry",
    "stop_loss",
    "breakeven_stop",
    "ratchet_stop",
    "trailing_stop",
    "time_stop",
    "over_leverage",
    "data_gap",
    "end_of_data",
    "position_open",
    "no_bar",
    "below_min_qty",
    "below_min_notional",
    "take_profit_1",
    "take_profit_2",
    "take_profit_3",
    "take_profit_4",
    "take_profit_5",
    "take_profit_6",
    "take_profit_7",
    "take_profit_8",
    "take_profit_9",
    "take_profit_10",
    "take_profit_11",
    "take_profit_12",
    "take_profit_13",
    "take_profit_14",
    "take_profit_15",
    "take_profit_16",
];

const ENTRY: u8 = 0;
const OVER_LEVERAGE: u8 = 6;
const DATA_GAP: u8 = 7;
const END_OF_DATA: u8 = 8;
const POSITION_OPEN: u8 = 9;
const NO_BAR: u8 = 10;
const BELOW_MIN_QTY: u8 = 11;
const BELOW_MIN_NOTIONAL: u8 = 12;
const TAKE_PROFIT_1: u8 = 13;

/// One fill: the entry or an exit.
#[derive(Debug, Clone)]
pub struct Fill {
    pub trade: u32,
    /// 0 for the entry, then the action's per-position sequence.
    pub sequence: u32,
    pub reason: u8,
    pub time_ms: i64,
    pub direction: Direction,
    pub price: Decimal,
    pub quantity: Decimal,
    pub fee: Decimal,
    /// Realized `PnL` of this fill net of its fee (an entry: minus its fee).
    pub pnl: Decimal,
    /// Price move of this fill from the entry, in units of the initial R (0 for the entry).
    pub r: f64,
    pub trigger: Option<Decimal>,
    pub mark: Decimal,
}

/// One position from entry to its last exit.
#[derive(Debug, Clone)]
pub struct Trade {
    pub trade: u32,
    pub direction: Direction,
    pub entry_time_ms: i64,
    pub exit_time_ms: i64,
    pub entry_price: Decimal,
    pub quantity: Decimal,
    pub initial_stop: Decimal,
    /// Initial stop distance in price (R).
    pub risk_price: Decimal,
    pub pnl: Decimal,
    pub fees: Decimal,
    pub confidence: Option<f64>,
    pub exit_reason: u8,
    pub bars_held: u32,
}

/// Everything one (series, policy) job produced.
#[derive(Debug, Clone, Default)]
pub struct JobOutput {
    pub series: u32,
    pub policy: u32,
    pub fills: Vec<Fill>,
    pub trades: Vec<Trade>,
    /// (trade, bar open time, stop after the bar) while a position was open (detail only).
    pub stops: Vec<(u32, i64, f64)>,
    /// (trade, level number from 1, price) (detail only).
    pub levels: Vec<(u32, u32, f64)>,
    /// (entry time or 0 for counted-only reasons, reason code, count).
    pub skipped: Vec<(i64, u8, u32)>,
    /// Bar x position evaluations.
    pub evaluations: u64,
    /// Of `evaluations`, those settled as one quiet step without the state machine.
    pub quiet_bars: u64,
}

/// A series with its prices on the tick grid and its segments, shared by every policy.
struct Prepared<'a> {
    input: &'a SeriesInput<'a>,
    rules: &'a SymbolRules,
    grid: Grid,
    /// Open, high, low and close of every bar, as grid ticks.
    bars: Vec<[i64; 4]>,
    /// Half-open bar index ranges without a gap longer than `max_gap_bars`.
    segments: Vec<(usize, usize)>,
    /// For each bar, the range of fine bars that cover it completely, if any (empty
    /// without fine data).
    fine: Vec<Option<(usize, usize)>>,
    /// The fine bars as grid ticks (empty without fine data).
    fine_bars: Vec<[i64; 4]>,
    /// The plausible price band as ticks (see [`Grid::plausible_ticks`]); `None`: every
    /// mark is fed.
    band: Option<(i64, i64)>,
    /// ATR before each bar (closed bars of its segment only; NaN: not ready yet), per
    /// (period, ATR interval). Prices are finite (they are on the grid), so NaN is free.
    atr: HashMap<(usize, i64), Vec<f64>>,
}

/// A symbol's price grid, `minPrice + k * tickSize` (`k * 10^-pricePrecision` when the
/// tick is disabled): the grid `SymbolRules::quantize_price` rounds onto. Every price of
/// a run is an integer `k` on it, so the replay compares integers; a price becomes a
/// decimal (`base + k * step` mantissas at the grid's scale, exact) only where it is fed
/// to the exit state machine or booked.
#[derive(Clone, Copy, Debug)]
struct Grid {
    base: i128,
    step: i128,
    scale: u32,
    base_f: f64,
    step_f: f64,
    /// `1 / step_f`, rounded: a multiplication per price instead of a division.
    per_step_f: f64,
    /// `MAX_FLOAT_TICKS` steps: prices farther from zero take the exact path.
    float_limit: f64,
}

/// Above this many ticks from zero a float tick index is no longer certain to within
/// 1e-6 tick; such prices take the exact decimal path.
const MAX_FLOAT_TICKS: f64 = (1u64 << 30) as f64;

impl Grid {
    fn new(rules: &SymbolRules) -> Result<Self, CoreError> {
        let step = rules.price_step();
        let base = if rules.tick_size() > Decimal::ZERO {
            rules.price_filter.min_price
        } else {
            Decimal::ZERO
        };
        let scale = base.scale().max(step.scale());
        match (mantissa_at(base, scale), mantissa_at(step, scale)) {
            (Some(b), Some(s)) if s > 0 && s < 1 << 60 && b.unsigned_abs() < 1 << 90 => Ok(Self {
                base: b,
                step: s,
                scale,
                base_f: decimal_to_f64(base),
                step_f: decimal_to_f64(step),
                per_step_f: 1.0 / decimal_to_f64(step),
                float_limit: MAX_FLOAT_TICKS * decimal_to_f64(step),
            }),
            _ => Err(CoreError::invalid_for(
                &rules.symbol,
                "tickSize",
                step.to_string(),
                "must be a positive price step the backtest can index (at most 18 digits)",
            )),
        }
    }

    /// The decimal of tick `k`, written with the grid's decimals.
    fn price(self, k: i64) -> Decimal {
        // |k| < 2^40 for bar prices and any tick read from a decimal fits by construction.
        Decimal::from_i128_with_scale(self.base + i128::from(k) * self.step, self.scale)
    }

    /// The tick of a decimal on the grid; `None` off the grid or out of range.
    fn ticks(self, price: Decimal) -> Option<i64> {
        let mantissa = match mantissa_at(price, self.scale) {
            Some(m) => m,
            None => mantissa_at(price.normalize(), self.scale)?,
        };
        let offset = mantissa - self.base;
        if offset % self.step != 0 {
            return None;
        }
        i64::try_from(offset / self.step)
            .ok()
            .filter(|k| k.unsigned_abs() < 1 << 40)
    }

    /// The tick of `quantize_price(decimal_from_f64(v), Nearest)`, the long way.
    fn nearest_exact(
        self,
        rules: &SymbolRules,
        prefix: &str,
        name: &str,
        v: f64,
    ) -> Result<i64, CoreError> {
        let field = || format!("{prefix}{name}");
        // Kline prices have a few decimals: the short conversion settles them without text.
        let exact = match short_decimal_from_f64(v, 12) {
            Some(exact) => exact,
            None => decimal_from_f64(&field(), v).map_err(|e| e.with_symbol(&rules.symbol))?,
        };
        let rounded = rules.quantize_price(exact, Rounding::Nearest);
        self.ticks(rounded).ok_or_else(|| {
            CoreError::invalid_for(
                &rules.symbol,
                field(),
                v.to_string(),
                "must be a price within 2^40 ticks of the symbol's minPrice",
            )
        })
    }

    /// Every bar as ticks (open, high, low, close).
    fn bars(
        self,
        rules: &SymbolRules,
        prefix: &str,
        bars: &Bars<'_>,
    ) -> Result<Vec<[i64; 4]>, CoreError> {
        let mut out = Vec::with_capacity(bars.len());
        let rows = bars
            .open
            .iter()
            .zip(bars.high.iter())
            .zip(bars.low.iter())
            .zip(bars.close.iter());
        for (((&open, &high), &low), &close) in rows {
            let prices = [open, high, low, close];
            // All four settled by floats (the usual case) without a branch per price.
            let fast = prices.map(|v| self.nearest_float(v));
            out.push(if fast.iter().all(|&(_, settled)| settled) {
                fast.map(|(k, _)| k)
            } else {
                self.bar_the_long_way(rules, prefix, prices)?
            });
        }
        Ok(out)
    }

    /// One bar's ticks, each by floats, at a midpoint, or exactly.
    #[cold]
    #[inline(never)]
    fn bar_the_long_way(
        self,
        rules: &SymbolRules,
        prefix: &str,
        prices: [f64; 4],
    ) -> Result<[i64; 4], CoreError> {
        let mut bar = [0; 4];
        for ((slot, name), v) in bar
            .iter_mut()
            .zip(["open", "high", "low", "close"])
            .zip(prices)
        {
            *slot = match self.nearest_fast(v).or_else(|| self.nearest_midpoint(v)) {
                Some(k) => k,
                None => self.nearest_exact(rules, prefix, name, v)?,
            };
        }
        Ok(bar)
    }

    /// [`Grid::nearest_fast`] as the tick and whether it is settled.
    #[inline]
    fn nearest_float(self, v: f64) -> (i64, bool) {
        // Also false for NaN, which the exact path then refuses.
        let near = v.abs() + self.base_f.abs() < self.float_limit;
        let x = (v - self.base_f) * self.per_step_f;
        // Truncation and a compare instead of `floor`/`round`, which are library calls on
        // the baseline x86-64 target; exact below 2^30 (and saturating, hence harmless,
        // for the far or NaN values `near` rules out).
        let whole = x as i64;
        let fraction = x - whole as f64;
        let distance_to_half = (fraction.abs() - 0.5).abs();
        (
            whole + i64::from(fraction > 0.5) - i64::from(fraction < -0.5),
            near && distance_to_half > 1e-6,
        )
    }

    /// The tick of `quantize_price(decimal_from_f64(v), Nearest)` from floats alone, when
    /// floats settle it. Kline prices are exchange prices stored as f64: the float
    /// `(v - base) * (1 / step)` is within 6e-7 tick of the exact quotient below 2^30 ticks
    /// (`v`, `base`, `step` each within half an ulp of their decimals, and the reciprocal,
    /// the difference and the product within half an ulp each: at most 5 * 2^-53 of
    /// 2^30 ticks), so away from a midpoint its nearest integer is the exact rounding. Near
    /// a midpoint (1e-6 tick), or far out, `None`: the decimal path decides.
    #[inline]
    fn nearest_fast(self, v: f64) -> Option<i64> {
        let (k, settled) = self.nearest_float(v);
        settled.then_some(k)
    }
}

impl Grid {
    /// The tick of `quantize_price(decimal_from_f64(v), Nearest)` for a price whose decimal
    /// is exactly halfway between two ticks (prices quoted with one more decimal than the
    /// tick, as SOLUSDT's often are), without text; `None` for anything else.
    ///
    /// A midpoint `base + (k + 1/2) step` of at most 15 digits that reads back as `v` is
    /// `v`'s shortest decimal: two decimals of at most 15 digits lie further apart than a
    /// double's rounding interval, so no other one reads back as `v`. The tie goes away
    /// from the base, as the grid rounding's does.
    fn nearest_midpoint(self, v: f64) -> Option<i64> {
        const POW10: [f64; 23] = [
            1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11, 1e12, 1e13, 1e14, 1e15,
            1e16, 1e17, 1e18, 1e19, 1e20, 1e21, 1e22,
        ];
        // Also false for NaN.
        let near = v.abs() + self.base_f.abs() < self.float_limit;
        if !near {
            return None;
        }
        // Within 1e-6 tick of `k + 1/2` (else `nearest_fast` settled it): `t` is near `k`.
        let t = (v - self.base_f) / self.step_f - 0.5;
        let k = (t + if t >= 0.0 { 0.5 } else { -0.5 }) as i64;
        // The midpoint's mantissa with one more decimal than the grid.
        let mantissa = (2 * self.base + (2 * i128::from(k) + 1) * self.step) * 5;
        let power = *POW10.get(self.scale as usize + 1)?;
        if mantissa.unsigned_abs() >= 1_000_000_000_000_000 {
            return None;
        }
        // Both operands are exact doubles: one correctly rounded division.
        #[allow(clippy::float_cmp)] // reading back exactly the same double is the test
        let reads_back = mantissa as f64 / power == v;
        reads_back.then_some(if k >= 0 { k + 1 } else { k })
    }
}

fn prepare<'a>(
    input: &'a SeriesInput<'a>,
    rules: &'a ExchangeRules,
    periods: &[(usize, i64)],
    options: &BacktestOptions,
) -> Result<Prepared<'a>, CoreError> {
    let symbol_rules = rules.symbol(&input.symbol)?;
    input.bars.check(&input.symbol, "bars")?;
    if input.interval_ms <= 0 {
        return Err(CoreError::invalid_for(
            &input.symbol,
            "interval_ms",
            input.interval_ms.to_string(),
            "must be positive",
        ));
    }
    let grid = Grid::new(symbol_rules)?;
    let bars = &input.bars;
    let max_step = input.interval_ms * (i64::from(options.max_gap_bars) + 1);
    let mut segments = Vec::new();
    let mut start = 0;
    for i in 1..bars.len() {
        if bars.open_time[i] - bars.open_time[i - 1] > max_step {
            segments.push((start, i));
            start = i;
        }
    }
    if bars.len() > 0 {
        segments.push((start, bars.len()));
    }
    let mut fine = Vec::new();
    let mut fine_ticks = Vec::new();
    if let Some((fine_interval, fine_bars)) = &input.fine {
        fine_bars.check(&input.symbol, "fine")?;
        if *fine_interval <= 0
            || input.interval_ms % fine_interval != 0
            || *fine_interval >= input.interval_ms
        {
            return Err(CoreError::invalid_for(
                &input.symbol,
                "fine_interval_ms",
                fine_interval.to_string(),
                format!("must divide the bar interval {} ms", input.interval_ms),
            ));
        }
        let per_bar = (input.interval_ms / fine_interval) as usize;
        fine = vec![None; bars.len()];
        let mut j = 0;
        for (i, slot) in fine.iter_mut().enumerate() {
            let (t0, t1) = (bars.open_time[i], bars.open_time[i] + input.interval_ms);
            while j < fine_bars.len() && fine_bars.open_time[j] < t0 {
                j += 1;
            }
            let first = j;
            while j < fine_bars.len() && fine_bars.open_time[j] < t1 {
                j += 1;
            }
            // Only a complete set of fine bars says where the extremes were; a partial one
            // could miss the very extreme that matters, so the rule decides instead.
            if j - first == per_bar {
                *slot = Some((first, j));
            }
        }
        fine_ticks = grid.bars(symbol_rules, "fine.", fine_bars)?;
    }
    let mut atr = HashMap::new();
    for &(period, atr_interval) in periods {
        atr.insert(
            (period, atr_interval),
            atr_before_each_bar(input, &segments, period, atr_interval)?,
        );
    }
    let bars = grid.bars(symbol_rules, "", bars)?;
    Ok(Prepared {
        input,
        rules: symbol_rules,
        bars,
        grid,
        segments,
        fine,
        fine_bars: fine_ticks,
        band: grid.plausible_ticks(symbol_rules),
        atr,
    })
}

/// ATR known at the open of each bar: Wilder's over the closed bars of the policy's ATR
/// interval inside the bar's segment, as the daemon's aggregator would have them. With a
/// coarser ATR interval, data bars are merged into its buckets (high max, low min, last
/// close) and a bucket counts once the first bar of the next one starts.
#[allow(clippy::needless_range_loop)] // `i` addresses several parallel bar arrays
fn atr_before_each_bar(
    input: &SeriesInput<'_>,
    segments: &[(usize, usize)],
    period: usize,
    atr_interval: i64,
) -> Result<Vec<f64>, CoreError> {
    let bars = &input.bars;
    if atr_interval < input.interval_ms || atr_interval % input.interval_ms != 0 {
        return Err(CoreError::Policy {
            field: "atr_interval".to_owned(),
            value: format!("{atr_interval}ms"),
            rule: format!(
                "must be a multiple of the backtest data interval ({} ms for {}); give data at \
                 the ATR interval or finer",
                input.interval_ms, input.symbol
            ),
        });
    }
    let mut values = vec![f64::NAN; bars.len()];
    for &(start, end) in segments {
        let mut state = WilderAtr::new(period)?;
        // (bucket key, its end time, high, low, close) of the bucket being filled.
        let mut bucket: Option<(i64, i64, f64, f64, f64)> = None;
        for i in start..end {
            let t = bars.open_time[i];
            // Times increase, so the key moves forward; a division only after a jump.
            let key = match bucket {
                Some((k, bucket_end, ..)) if t < bucket_end => k,
                Some((k, bucket_end, ..)) if t < bucket_end + atr_interval => k + 1,
                _ => t.div_euclid(atr_interval),
            };
            match bucket {
                Some((k, _, high, low, close)) if k != key => {
                    state.update(high, low, close);
                    bucket = None;
                }
                _ => {}
            }
            values[i] = state.value().unwrap_or(f64::NAN);
            bucket = Some(match bucket {
                Some((k, bucket_end, high, low, _)) => (
                    k,
                    bucket_end,
                    high.max(bars.high[i]),
                    low.min(bars.low[i]),
                    bars.close[i],
                ),
                None => (
                    key,
                    (key + 1) * atr_interval,
                    bars.high[i],
                    bars.low[i],
                    bars.close[i],
                ),
            });
        }
    }
    Ok(values)
}

/// A point of a bar's mark path.
#[derive(Debug, Clone, Copy)]
struct Point {
    time_ms: i64,
    /// Grid tick of the price.
    tick: i64,
    /// Reached by a jump (an open) rather than a continuous move from the previous point.
    jump: bool,
}

fn push_bar_path(
    out: &mut Vec<Point>,
    t0: i64,
    span: i64,
    ohlc: [i64; 4],
    adverse_low_first: bool,
) {
    let [open, high, low, close] = ohlc;
    let (first, second) = if adverse_low_first {
        (low, high)
    } else {
        (high, low)
    };
    out.extend([
        Point {
            time_ms: t0,
            tick: open,
            jump: true,
        },
        Point {
            time_ms: t0 + span / 3,
            tick: first,
            jump: false,
        },
        Point {
            time_ms: t0 + 2 * span / 3,
            tick: second,
            jump: false,
        },
        Point {
            time_ms: t0 + span - 1,
            tick: close,
            jump: false,
        },
    ]);
}

fn bar_path(
    p: &Prepared<'_>,
    i: usize,
    direction: Direction,
    intrabar: Intrabar,
    out: &mut Vec<Point>,
) {
    out.clear();
    // A LONG's adverse extreme is the low.
    let low_first = (direction == Direction::Long) == (intrabar == Intrabar::StopFirst);
    match (p.fine.get(i).copied().flatten(), &p.input.fine) {
        (Some((a, b)), Some((fine_interval, fine_bars))) => {
            for j in a..b {
                push_bar_path(
                    out,
                    fine_bars.open_time[j],
                    *fine_interval,
                    p.fine_bars[j],
                    low_first,
                );
            }
        }
        _ => push_bar_path(
            out,
            p.input.bars.open_time[i],
            p.input.interval_ms,
            p.bars[i],
            low_first,
        ),
    }
}

/// The nearest `f64` of a decimal, for the float columns of the results (see
/// [`crate::fixed::decimal_to_f64_fast`]).
pub fn to_f64(value: Decimal) -> f64 {
    crate::fixed::decimal_to_f64_fast(value)
}

fn fee(rate: Decimal, price: Decimal, quantity: Decimal) -> Decimal {
    (rate * price * quantity)
        .round_dp_with_strategy(8, rust_decimal::RoundingStrategy::MidpointAwayFromZero)
}

struct Open {
    trade: u32,
    position: PositionState,
    direction: Direction,
    entry_time_ms: i64,
    entry_price: Decimal,
    quantity: Decimal,
    remaining: Decimal,
    initial_stop: Decimal,
    risk_price: Decimal,
    /// `to_f64` of the entry price, the side's sign and R, for the `r` column of each fill.
    r_floats: (f64, f64, f64),
    pnl: Decimal,
    fees: Decimal,
    confidence: Option<f64>,
    bars_held: u32,
    sequence: u32,
    /// The state's triggers as grid ticks, for skipping marks that change nothing; `None`
    /// (every mark fed) with `exhaustive` or a trigger off the grid.
    triggers: Option<Triggers>,
}

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
struct Triggers {
    /// The stop `stop` was read from (its bytes, to notice any change cheaply).
    stop_key: [u8; 16],
    stop: i64,
    best: i64,
    levels: Vec<i64>,
    /// Open time plus the policy's `max_hold_ms`.
    expires_at: Option<i64>,
    /// The best mark passed `time_stop_below_price`: the time stop can no longer fire.
    time_stop_off: bool,
    /// ATR basis (bits, 0 for none) of the last trailing candidate taken into account at
    /// the current best (by `on_mark` or here).
    fed_basis: Option<u64>,
    /// The first update's work is done (a mark was taken in) or provably empty.
    ready: bool,
    /// `+1` for a LONG, `-1` for a SHORT: `side * (a - b) > 0` is "a beyond b toward profit".
    side: i64,
    /// Ticks of the plausible band, inclusive (prices in it are positive).
    band: (i64, i64),
    /// The first best tick at which trailing activates by price.
    activate_at: Option<i64>,
}

/// Beyond every tick a bar price can have (they are within 2^40 of the grid's base).
const FAR_TICKS: i64 = 1 << 41;

impl Grid {
    /// The decimal of tick `k`, `None` beyond the decimal range.
    fn try_price(self, k: i64) -> Option<Decimal> {
        let mantissa = self
            .base
            .checked_add(i128::from(k).checked_mul(self.step)?)?;
        Decimal::try_from_i128_with_scale(mantissa, self.scale).ok()
    }

    /// The first tick whose price is at or beyond `price` toward `side`'s profit (the
    /// least `k` with `price(k) >= price` for `+1`, the greatest with `price(k) <= price`
    /// for `-1`), decided by exact decimal comparisons around a float estimate; `±FAR_TICKS`
    /// when that lies beyond every bar price. `None` when undecidable.
    fn first_tick_reaching(self, side: i64, price: Decimal) -> Option<i64> {
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
    fn plausible_ticks(self, rules: &SymbolRules) -> Option<(i64, i64)> {
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
fn trail_ticks(grid: Grid, policy: &ExitPolicy, atr: Option<f64>) -> Option<i64> {
    const MAX_TICKS: f64 = (1u64 << 26) as f64;
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
struct QuietStep {
    best: i64,
    stop: i64,
    /// The decimals of `best` and `stop` where they moved.
    best_price: Option<Decimal>,
    stop_price: Option<Decimal>,
    basis: Option<u64>,
}

impl Triggers {
    fn new(
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
    fn refresh_stop(&mut self, position: &PositionState, grid: Grid) -> bool {
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
    fn took(&mut self, position: &PositionState, tick: i64, basis: u64, grid: Grid) {
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
    fn quiet(
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
        let best_price = if improved {
            Some(grid.try_price(best)?)
        } else {
            None
        };
        Some(QuietStep {
            best,
            stop,
            best_price,
            stop_price,
            basis: considered,
        })
    }

    /// The best-mark and trailing-stop part of `on_mark` at `tick` (ATR `basis`, candidate
    /// offset `trail`), when trailing is active and its candidate known in ticks: applied
    /// just before feeding a mark that may trigger something, so that `on_mark` finds it
    /// done (no new best, the candidate for this ATR recorded) and skips its decimals.
    fn trailing_update(
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
        let best_price = if improved {
            Some(grid.try_price(best)?)
        } else {
            None
        };
        Some(QuietStep {
            best,
            stop,
            best_price,
            stop_price,
            basis: Some(basis),
        })
    }

    /// Applies a [`QuietStep`] to the position and to these triggers.
    fn apply(&mut self, position: &mut PositionState, step: &QuietStep) {
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
    fn crossings(&self, position: &PositionState, a: i64, b: i64, out: &mut Vec<i64>) {
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
struct TrailRule {
    configured: bool,
    after_level: Option<u32>,
}

impl TrailRule {
    fn of(policy: &ExitPolicy) -> Self {
        let config = policy.config();
        Self {
            configured: config.trail_atr.is_some() || config.trail_pct.is_some(),
            after_level: config.trail_after_level,
        }
    }

    /// Whether an inactive trailing stop activates on the next mark `on_mark` takes in.
    fn activates_by_level(self, levels_done: u32) -> bool {
        self.configured && self.after_level.is_some_and(|n| levels_done >= n)
    }
}

/// The best mark reached the time stop's profit threshold, so the time stop never fires.
fn time_stop_passed(position: &PositionState) -> bool {
    position
        .time_stop_below_price
        .is_some_and(|p| match position.side {
            PositionSide::Long => position.best_price >= p,
            PositionSide::Short => position.best_price <= p,
        })
}

/// The ATR before bar `i`, `None` while not ready.
fn atr_at(atr: &[f64], i: usize) -> Option<f64> {
    Some(atr[i]).filter(|a| !a.is_nan())
}

/// The ATR as `on_mark` keys its trailing candidate on it.
fn atr_basis(atr: Option<f64>) -> u64 {
    atr.map_or(0, f64::to_bits)
}

struct Job<'a> {
    p: &'a Prepared<'a>,
    policy: &'a ExitPolicy,
    rules: &'a SymbolRules,
    options: &'a BacktestOptions,
    /// ATR before each bar, NaN while not ready (see [`atr_at`]).
    atr: &'a [f64],
    trail: TrailRule,
    /// [`trail_ticks`] of the bar being replayed.
    bar_trail: Option<i64>,
    out: JobOutput,
    open: Vec<Open>,
    next_trade: u32,
    path: Vec<Point>,
    crossing_ticks: Vec<i64>,
    crossing_prices: Vec<Decimal>,
    position_open_skips: u32,
}

impl Job<'_> {
    fn skip(&mut self, time_ms: i64, reason: u8) {
        if reason == POSITION_OPEN {
            // Counted, not listed: a signal rule repeats itself on every bar of a position.
            self.position_open_skips += 1;
        } else {
            self.out.skipped.push((time_ms, reason, 1));
        }
    }

    fn try_enter(&mut self, entry: &Entry, i: usize) {
        let p = self.p;
        let blocked = self
            .open
            .iter()
            .any(|o| self.options.one_position_per_symbol || o.direction == entry.direction);
        if blocked {
            self.skip(entry.time_ms, POSITION_OPEN);
            return;
        }
        let price = p.grid.price(p.bars[i][0]);
        let notional = entry.notional.unwrap_or(self.options.notional);
        let quantity = self.rules.quantize_qty(notional / price, true);
        if quantity <= Decimal::ZERO || quantity < self.rules.min_qty(true) {
            self.skip(entry.time_ms, BELOW_MIN_QTY);
            return;
        }
        if quantity * price < self.rules.min_notional() {
            self.skip(entry.time_ms, BELOW_MIN_NOTIONAL);
            return;
        }
        let leverage = entry.leverage.unwrap_or(self.options.leverage);
        let time_ms = p.input.bars.open_time[i];
        let trade = self.next_trade;
        let position = match new_position(
            self.rules,
            self.policy,
            trade,
            entry.direction,
            quantity,
            price,
            leverage,
            entry.confidence,
            time_ms,
            atr_at(self.atr, i),
        ) {
            // The daemon refuses an entry whose allowed stop is below the policy minimum.
            Ok(position) if !position.over_leveraged => position,
            _ => {
                self.skip(entry.time_ms, OVER_LEVERAGE);
                return;
            }
        };
        self.next_trade += 1;
        let rate = if self.options.entry_maker {
            self.options.maker_fee
        } else {
            self.options.taker_fee
        };
        let entry_fee = fee(rate, price, quantity);
        let initial_stop = position.stop_price;
        let risk_price = (price - initial_stop).abs();
        let r_floats = (
            to_f64(price),
            to_f64(entry.direction.sign()),
            to_f64(risk_price),
        );
        let triggers = self.triggers_for(&position, time_ms);
        if self.options.detail {
            for (k, &level) in position.ladder_prices.iter().enumerate() {
                self.out.levels.push((trade, k as u32 + 1, to_f64(level)));
            }
        }
        self.out.fills.push(Fill {
            trade,
            sequence: 0,
            reason: ENTRY,
            time_ms,
            direction: entry.direction,
            price,
            quantity,
            fee: entry_fee,
            pnl: -entry_fee,
            r: 0.0,
            trigger: None,
            mark: price,
        });
        self.open.push(Open {
            trade,
            position,
            direction: entry.direction,
            entry_time_ms: time_ms,
            entry_price: price,
            quantity,
            remaining: quantity,
            initial_stop,
            risk_price,
            r_floats,
            pnl: -entry_fee,
            fees: entry_fee,
            confidence: entry.confidence,
            bars_held: 0,
            sequence: 0,
            triggers,
        });
    }

    /// The triggers of a position opened at `time_ms`; `None` (every mark fed) with
    /// `exhaustive` or a trigger off the grid.
    fn triggers_for(&self, position: &PositionState, time_ms: i64) -> Option<Triggers> {
        if self.options.exhaustive {
            return None;
        }
        let expires = self
            .policy
            .config()
            .max_hold_ms
            .map(|h| time_ms.saturating_add(h));
        Triggers::new(position, self.p.grid, self.p.band, expires)
    }

    /// Books a fill of `quantity` at `price` for `open`; returns true when it closed it.
    #[allow(clippy::too_many_arguments)] // one fill's facts, kept apart from `self` borrows
    fn book(
        options: &BacktestOptions,
        out: &mut JobOutput,
        open: &mut Open,
        reason: u8,
        time_ms: i64,
        price: Decimal,
        quantity: Decimal,
        trigger: Option<Decimal>,
        sequence: u32,
    ) -> bool {
        let quantity = quantity.min(open.remaining);
        let exit_fee = fee(options.taker_fee, price, quantity);
        let gross = (price - open.entry_price) * quantity * open.direction.sign();
        let pnl = gross - exit_fee;
        let r = if open.risk_price.is_zero() {
            0.0
        } else {
            // A float column for analysis: the exact move is price - entry in the fills.
            let (entry_f, sign_f, risk_f) = open.r_floats;
            (to_f64(price) - entry_f) * sign_f / risk_f
        };
        open.remaining -= quantity;
        open.pnl += pnl;
        open.fees += exit_fee;
        out.fills.push(Fill {
            trade: open.trade,
            sequence,
            reason,
            time_ms,
            direction: open.direction,
            price,
            quantity,
            fee: exit_fee,
            pnl,
            r,
            trigger,
            mark: price,
        });
        if open.remaining <= Decimal::ZERO {
            out.trades.push(Trade {
                trade: open.trade,
                direction: open.direction,
                entry_time_ms: open.entry_time_ms,
                exit_time_ms: time_ms,
                entry_price: open.entry_price,
                quantity: open.quantity,
                initial_stop: open.initial_stop,
                risk_price: open.risk_price,
                pnl: open.pnl,
                fees: open.fees,
                confidence: open.confidence,
                exit_reason: reason,
                bars_held: open.bars_held,
            });
            return true;
        }
        false
    }

    /// Feeds the mark `price` (at grid tick `tick`, when on the grid) to position `k`;
    /// confirms every action at once. Returns true when the position closed.
    fn feed(
        &mut self,
        k: usize,
        time_ms: i64,
        price: Decimal,
        tick: Option<i64>,
        atr: Option<f64>,
    ) -> bool {
        let grid = self.p.grid;
        let basis = atr_basis(atr);
        if let Some(tick) = tick {
            let trail = self.bar_trail;
            let Open {
                triggers, position, ..
            } = &mut self.open[k];
            if let Some(triggers) = triggers.as_mut() {
                if let Some(step) = triggers.trailing_update(position, tick, basis, trail, grid) {
                    triggers.apply(position, &step);
                }
            }
        }
        // An action's confirmation can move the stop (breakeven, ratchet) so that the same
        // mark triggers again; the loop is bounded by the ladder length plus the stop.
        for _ in 0..64 {
            let open = &mut self.open[k];
            let action = open
                .position
                .on_mark(price, atr, time_ms, self.rules, self.policy);
            if let Some(triggers) = &mut open.triggers {
                // In the backtest nothing is pending here and the position is open, so
                // `on_mark` took the mark in when it is plausible (surely so inside the
                // band) and ignored it when not positive; anything else (a positive mark
                // outside the band, or off the grid) ends the shortcuts for this position.
                let still_valid = match tick {
                    Some(tick) if tick >= triggers.band.0 && tick <= triggers.band.1 => {
                        triggers.took(&open.position, tick, basis, grid);
                        true
                    }
                    _ => price <= Decimal::ZERO,
                };
                if !still_valid || !triggers.refresh_stop(&open.position, grid) {
                    open.triggers = None;
                }
            }
            let Some(action) = action else {
                return false;
            };
            let sequence = action.sequence as u32;
            open.sequence = sequence;
            let quantity = action.quantity;
            let closed = matches!(
                open.position
                    .confirm(action.sequence, Some(quantity), self.rules, self.policy),
                Ok(Confirmed::Closed)
            );
            if let Some(triggers) = &mut open.triggers {
                if !triggers.refresh_stop(&open.position, grid) {
                    open.triggers = None;
                }
            }
            if Self::book(
                self.options,
                &mut self.out,
                open,
                reason_of(action.reason),
                time_ms,
                price,
                quantity,
                Some(action.trigger_price),
                sequence,
            ) || closed
            {
                return true;
            }
        }
        false
    }

    /// Feeds every trigger a continuous move from `from` to `to` crosses, in order, each
    /// at the time of `from`. Returns true when the position closed.
    fn feed_crossings(&mut self, k: usize, from: Point, to: Point, atr: Option<f64>) -> bool {
        let grid = self.p.grid;
        let open = &self.open[k];
        let mut closed = false;
        if let Some(triggers) = &open.triggers {
            let mut ticks = std::mem::take(&mut self.crossing_ticks);
            triggers.crossings(&open.position, from.tick, to.tick, &mut ticks);
            for &tick in &ticks {
                if self.feed(k, from.time_ms, grid.price(tick), Some(tick), atr) {
                    closed = true;
                    break;
                }
            }
            self.crossing_ticks = ticks;
        } else {
            // Some trigger is off the grid: compare decimals, feed each trigger's own price.
            let mut prices = std::mem::take(&mut self.crossing_prices);
            prices.clear();
            let (lo, hi) = (
                grid.price(from.tick.min(to.tick)),
                grid.price(from.tick.max(to.tick)),
            );
            prices.extend(triggers_of(&open.position).filter(|&x| x > lo && x < hi));
            if from.tick <= to.tick {
                prices.sort_unstable();
            } else {
                prices.sort_unstable_by(|x, y| y.cmp(x));
            }
            for &price in &prices {
                if self.feed(k, from.time_ms, price, None, atr) {
                    closed = true;
                    break;
                }
            }
            self.crossing_prices = prices;
        }
        closed
    }

    fn run_bar(&mut self, i: usize) {
        let grid = self.p.grid;
        let atr = atr_at(self.atr, i);
        let basis = atr_basis(atr);
        let trail = trail_ticks(grid, self.policy, atr);
        self.bar_trail = trail;
        // Without finer bars the path is the bar's own four prices, all within its range.
        let whole_bar = match self.p.fine.get(i) {
            Some(Some(_)) => None,
            _ => Some(self.p.bars[i]),
        };
        let last_ms = self.p.input.bars.open_time[i] + self.p.input.interval_ms - 1;
        let mut k = 0;
        while k < self.open.len() {
            self.out.evaluations += 1;
            if let Some(ohlc) = whole_bar {
                if self.quiet_bar(k, ohlc, last_ms, basis, trail) {
                    self.out.quiet_bars += 1;
                    self.end_bar(k, i);
                    k += 1;
                    continue;
                }
            }
            let direction = self.open[k].direction;
            let mut path = std::mem::take(&mut self.path);
            bar_path(self.p, i, direction, self.options.intrabar, &mut path);
            let mut closed = false;
            let mut previous: Option<Point> = None;
            for &point in &path {
                if let (false, Some(before)) = (point.jump, previous) {
                    if self.feed_crossings(k, before, point, atr) {
                        closed = true;
                        break;
                    }
                }
                let Open {
                    triggers, position, ..
                } = &mut self.open[k];
                let step = triggers.as_ref().and_then(|t| {
                    t.quiet(
                        position,
                        self.trail,
                        point.tick,
                        point.tick,
                        point.time_ms,
                        basis,
                        trail,
                        grid,
                    )
                });
                if let (Some(step), Some(triggers)) = (step, triggers.as_mut()) {
                    triggers.apply(position, &step);
                } else if self.feed(
                    k,
                    point.time_ms,
                    grid.price(point.tick),
                    Some(point.tick),
                    atr,
                ) {
                    closed = true;
                    break;
                }
                previous = Some(point);
            }
            self.path = path;
            if closed {
                self.open.swap_remove(k);
                continue;
            }
            self.end_bar(k, i);
            k += 1;
        }
    }

    /// The whole bar `ohlc` as one quiet step for position `k`, when it is one (see
    /// [`Triggers`]); false (nothing changed) otherwise.
    fn quiet_bar(
        &mut self,
        k: usize,
        ohlc: [i64; 4],
        last_ms: i64,
        basis: u64,
        trail: Option<i64>,
    ) -> bool {
        let Open {
            triggers, position, ..
        } = &mut self.open[k];
        let Some(triggers) = triggers.as_mut() else {
            return false;
        };
        let [open, high, low, close] = ohlc;
        let (lo, hi) = (
            open.min(high).min(low).min(close),
            open.max(high).max(low).max(close),
        );
        let (adverse, favourable) = if triggers.side > 0 {
            (lo, hi)
        } else {
            (hi, lo)
        };
        match triggers.quiet(
            position,
            self.trail,
            adverse,
            favourable,
            last_ms,
            basis,
            trail,
            self.p.grid,
        ) {
            Some(step) => {
                triggers.apply(position, &step);
                true
            }
            None => false,
        }
    }

    /// Position `k` is still open after bar `i`.
    fn end_bar(&mut self, k: usize, i: usize) {
        let open = &mut self.open[k];
        open.bars_held += 1;
        if self.options.detail {
            self.out.stops.push((
                open.trade,
                self.p.input.bars.open_time[i],
                to_f64(open.position.stop_price),
            ));
        }
    }

    fn close_all(&mut self, i: usize, reason: u8) {
        let time_ms = self.p.input.bars.open_time[i] + self.p.input.interval_ms - 1;
        let price = self.p.grid.price(self.p.bars[i][3]);
        for mut open in std::mem::take(&mut self.open) {
            let quantity = open.remaining;
            let sequence = open.sequence + 1;
            Self::book(
                self.options,
                &mut self.out,
                &mut open,
                reason,
                time_ms,
                price,
                quantity,
                None,
                sequence,
            );
        }
    }

    #[allow(clippy::needless_range_loop)] // `i` addresses several parallel bar arrays
    fn run(mut self) -> JobOutput {
        let p = self.p;
        let times = &p.input.bars.open_time;
        let interval = p.input.interval_ms;
        let entries = &p.input.entries;
        let mut e = 0;
        for (s, &(start, end)) in p.segments.iter().enumerate() {
            for i in start..end {
                let t = times[i];
                while e < entries.len() && entries[e].time_ms <= t {
                    let entry = &entries[e];
                    e += 1;
                    if t - entry.time_ms >= interval {
                        self.skip(entry.time_ms, NO_BAR);
                    } else {
                        self.try_enter(entry, i);
                    }
                }
                if !self.open.is_empty() {
                    self.run_bar(i);
                }
            }
            let last = s + 1 == p.segments.len();
            self.close_all(end - 1, if last { END_OF_DATA } else { DATA_GAP });
        }
        for entry in &entries[e..] {
            self.out.skipped.push((entry.time_ms, NO_BAR, 1));
        }
        if self.position_open_skips > 0 {
            self.out
                .skipped
                .push((0, POSITION_OPEN, self.position_open_skips));
        }
        self.out
    }
}

/// Runs every (series, policy) pair; results are ordered policy-major then series.
///
/// # Errors
/// An unknown symbol, mismatched array lengths, unsorted times, a price that cannot be a
/// decimal, or an invalid ATR period.
pub fn run(
    series: &[SeriesInput<'_>],
    policies: &[ExitPolicy],
    rules: &ExchangeRules,
    options: &BacktestOptions,
) -> Result<Vec<JobOutput>, CoreError> {
    let mut periods: Vec<(usize, i64)> = policies.iter().map(atr_key).collect();
    periods.sort_unstable();
    periods.dedup();
    let prepared = series
        .par_iter()
        .map(|s| prepare(s, rules, &periods, options))
        .collect::<Result<Vec<_>, _>>()?;
    let jobs: Vec<(usize, usize)> = (0..policies.len())
        .flat_map(|j| (0..prepared.len()).map(move |i| (j, i)))
        .collect();
    let outputs = jobs
        .par_iter()
        .map(|&(j, i)| {
            let p = &prepared[i];
            let policy = &policies[j];
            let job = Job {
                p,
                policy,
                rules: p.rules,
                options,
                atr: &p.atr[&atr_key(policy)],
                out: JobOutput {
                    series: i as u32,
                    policy: j as u32,
                    ..JobOutput::default()
                },
                trail: TrailRule::of(policy),
                bar_trail: None,
                open: Vec::new(),
                next_trade: 0,
                path: Vec::with_capacity(8),
                crossing_ticks: Vec::with_capacity(8),
                crossing_prices: Vec::new(),
                position_open_skips: 0,
            };
            job.run()
        })
        .collect();
    Ok(outputs)
}

/// One exit decision taken along a mark path (see [`replay_marks`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub time_ms: i64,
    pub reason: String,
    pub quantity: Decimal,
    pub trigger: Option<Decimal>,
    pub mark: Decimal,
    pub sequence: u32,
}

/// Feeds one position a mark path through the backtest's driver (each action confirmed at
/// once in full) and returns its decisions: the backtest half of the daemon consistency check.
///
/// # Errors
/// An unknown symbol, or a position the policy refuses to open (over-leveraged).
#[allow(clippy::too_many_arguments)]
pub fn replay_marks(
    rules: &ExchangeRules,
    policy: &ExitPolicy,
    symbol: &str,
    direction: Direction,
    quantity: Decimal,
    entry_price: Decimal,
    marks: &[(i64, Decimal)],
    atr: Option<f64>,
    leverage: u32,
    confidence: Option<f64>,
    opened_at_ms: i64,
) -> Result<Vec<Decision>, CoreError> {
    let symbol_rules = rules.symbol(symbol)?;
    let mut position = new_position(
        symbol_rules,
        policy,
        0,
        direction,
        quantity,
        entry_price,
        leverage,
        confidence,
        opened_at_ms,
        atr,
    )?;
    let mut remaining = quantity;
    let mut decisions = Vec::new();
    'marks: for &(time_ms, mark) in marks {
        for _ in 0..64 {
            let Some(action) = position.on_mark(mark, atr, time_ms, symbol_rules, policy) else {
                continue 'marks;
            };
            let qty = action.quantity;
            position.confirm(action.sequence, Some(qty), symbol_rules, policy)?;
            remaining -= qty;
            decisions.push(Decision {
                time_ms,
                reason: action.reason.name(),
                quantity: qty,
                trigger: Some(action.trigger_price),
                mark,
                sequence: action.sequence as u32,
            });
            if remaining <= Decimal::ZERO {
                break 'marks;
            }
        }
    }
    Ok(decisions)
}

// ---------------------------------------------------------------------------------------
// The only place that names the position API of `crate::exit`.

/// (ATR period, ATR bar interval in ms) of a policy: ATR is computed once per distinct pair.
fn atr_key(policy: &ExitPolicy) -> (usize, i64) {
    (policy.config().atr_period as usize, policy.interval_ms())
}

#[allow(clippy::too_many_arguments)]
fn new_position(
    rules: &SymbolRules,
    policy: &ExitPolicy,
    trade: u32,
    direction: Direction,
    quantity: Decimal,
    entry_price: Decimal,
    leverage: u32,
    confidence: Option<f64>,
    opened_at_ms: i64,
    atr: Option<f64>,
) -> Result<PositionState, CoreError> {
    let side = match direction {
        Direction::Long => PositionSide::Long,
        Direction::Short => PositionSide::Short,
    };
    let params = OpenParams {
        position_id: format!("bt-{trade}"),
        symbol: rules.symbol.clone(),
        side,
        quantity,
        entry_price,
        leverage,
        confidence,
        opened_at_ms: Some(opened_at_ms),
        liquidation_price: None,
    };
    PositionState::open(params, atr, rules, policy)
}

/// The prices at which the next mark could trigger something: the stop and the pending levels.
fn triggers_of(position: &PositionState) -> impl Iterator<Item = Decimal> + '_ {
    let done = (position.levels_done as usize).min(position.ladder_prices.len());
    std::iter::once(position.stop_price).chain(position.ladder_prices[done..].iter().copied())
}

fn reason_of(reason: ExitReason) -> u8 {
    match reason {
        ExitReason::StopLoss => 1,
        ExitReason::BreakevenStop => 2,
        ExitReason::RatchetStop => 3,
        ExitReason::TrailingStop => 4,
        ExitReason::TimeStop => 5,
        ExitReason::OverLeverage => OVER_LEVERAGE,
        ExitReason::TakeProfit(n) => {
            let code = u32::from(TAKE_PROFIT_1) + n.saturating_sub(1);
            code.min(REASONS.len() as u32 - 1) as u8
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exit::policy::{LadderLevel, PolicyConfig};
    use crate::exit::test_support::{btc, d, exchange_rules};

    const MINUTE: i64 = 60_000;
    const T0: i64 = 1_700_000_040_000;

    /// The worked example of exit-rules.md.
    fn example_policy(atr_interval: &str) -> ExitPolicy {
        ExitPolicy::new(PolicyConfig {
            stop_atr: Some(2.0),
            min_stop_pct: 0.003,
            max_stop_pct: 0.03,
            max_margin_loss: Some(0.10),
            ladder: vec![
                LadderLevel {
                    at: 1.0,
                    fraction: 0.3,
                },
                LadderLevel {
                    at: 2.0,
                    fraction: 0.3,
                },
                LadderLevel {
                    at: 3.0,
                    fraction: 0.4,
                },
            ],
            breakeven_after_level: Some(1),
            ratchet_to_previous_level: true,
            taker_fee: 0.0005,
            trail_atr: Some(2.0),
            trail_activate_r: Some(3.0),
            atr_interval: atr_interval.to_owned(),
            ..PolicyConfig::default()
        })
        .unwrap()
    }

    fn options() -> BacktestOptions {
        BacktestOptions {
            maker_fee: d("0.0002"),
            taker_fee: d("0.0005"),
            entry_maker: false,
            notional: d("300"),
            leverage: 10,
            intrabar: Intrabar::StopFirst,
            max_gap_bars: 0,
            one_position_per_symbol: false,
            detail: true,
            exhaustive: false,
        }
    }

    /// 20 bars of true range 60 around 30000 (ATR 60.0 exactly), then `tail`.
    fn bars(interval: i64, tail: &[(f64, f64, f64, f64)]) -> Bars<'static> {
        let mut b = Bars::default();
        let warm = std::iter::repeat_n((30000.0, 30030.0, 29970.0, 30000.0), 20);
        for (i, (o, h, l, c)) in warm.chain(tail.iter().copied()).enumerate() {
            b.open_time.to_mut().push(T0 + i as i64 * interval);
            b.open.to_mut().push(o);
            b.high.to_mut().push(h);
            b.low.to_mut().push(l);
            b.close.to_mut().push(c);
        }
        b
    }

    fn long_at(time_ms: i64) -> Entry {
        Entry {
            time_ms,
            direction: Direction::Long,
            confidence: None,
            notional: None,
            leverage: None,
        }
    }

    fn series(interval: i64, tail: &[(f64, f64, f64, f64)]) -> SeriesInput<'static> {
        SeriesInput {
            symbol: "BTCUSDT".into(),
            interval_ms: interval,
            bars: bars(interval, tail),
            fine: None,
            entries: vec![long_at(T0 + 20 * interval)],
        }
    }

    fn fills(job: &JobOutput) -> Vec<(&'static str, String, String)> {
        let btc = btc();
        job.fills
            .iter()
            .map(|f| {
                (
                    REASONS[f.reason as usize],
                    btc.format_qty(f.quantity, true),
                    btc.format_price(f.price),
                )
            })
            .collect()
    }

    fn one(input: SeriesInput<'_>, policy: &ExitPolicy, options: &BacktestOptions) -> JobOutput {
        let mut out = run(
            &[input],
            std::slice::from_ref(policy),
            &exchange_rules(),
            options,
        )
        .unwrap();
        assert_eq!(out.len(), 1);
        out.remove(0)
    }

    fn row(reason: &'static str, qty: &str, price: &str) -> (&'static str, String, String) {
        (reason, qty.to_owned(), price.to_owned())
    }

    #[test]
    fn worked_example_jump_to_take_profit_3() {
        // Bar 20 crosses level 1 (30120.0) on its way up; bar 21 opens at 30370.0, beyond
        // levels 2 and 3 at once: ONE take_profit_3 for the rest, filled at that open.
        let input = series(
            MINUTE,
            &[
                (30000.0, 30130.0, 29990.0, 30130.0),
                (30370.0, 30380.0, 30360.0, 30370.0),
            ],
        );
        let job = one(input, &example_policy("1m"), &options());
        assert_eq!(
            fills(&job),
            vec![
                row("entry", "0.010", "30000.0"),
                row("take_profit_1", "0.003", "30120.0"),
                row("take_profit_3", "0.007", "30370.0")
            ]
        );
        let trade = &job.trades[0];
        assert_eq!(trade.initial_stop, d("29880.0"));
        assert_eq!(trade.risk_price, d("120.0"));
        assert_eq!(
            job.levels.iter().map(|l| l.2).collect::<Vec<_>>(),
            vec![30120.0, 30240.0, 30360.0]
        );
        // fees: 0.15 + 0.04518 + 0.106295; PnL: 0.36 + 2.59 - fees
        assert_eq!(trade.fees, d("0.301475"));
        assert_eq!(trade.pnl, d("2.648525"));
        assert_eq!(REASONS[trade.exit_reason as usize], "take_profit_3");
    }

    #[test]
    fn worked_example_ratchet_stop() {
        // TP1 in bar 20 (stop -> breakeven 30030.0), TP2 at 30240.0 in bar 21 (stop -> level 1,
        // 30120.0), then bar 22 falls to 29990.0: ratchet_stop for 0.004 at the trigger 30120.0.
        let input = series(
            MINUTE,
            &[
                (30000.0, 30130.0, 29990.0, 30130.0),
                (30130.0, 30250.0, 30130.0, 30250.0),
                (30250.0, 30250.0, 29990.0, 29990.0),
            ],
        );
        let job = one(input, &example_policy("1m"), &options());
        assert_eq!(
            fills(&job),
            vec![
                row("entry", "0.010", "30000.0"),
                row("take_profit_1", "0.003", "30120.0"),
                row("take_profit_2", "0.003", "30240.0"),
                row("ratchet_stop", "0.004", "30120.0"),
            ]
        );
        let stops: Vec<f64> = job.stops.iter().map(|s| s.2).collect();
        assert_eq!(stops, vec![30030.0, 30120.0]);
    }

    #[test]
    fn intrabar_rule_decides_a_bar_that_spans_stop_and_target() {
        let tail = [(30000.0, 30200.0, 29800.0, 30000.0)];
        let policy = example_policy("1m");
        let job = one(series(MINUTE, &tail), &policy, &options());
        assert_eq!(fills(&job)[1..], [row("stop_loss", "0.010", "29880.0")]);
        let target_first = BacktestOptions {
            intrabar: Intrabar::TargetFirst,
            ..options()
        };
        let job = one(series(MINUTE, &tail), &policy, &target_first);
        assert_eq!(
            fills(&job)[1..],
            [
                row("take_profit_1", "0.003", "30120.0"),
                row("breakeven_stop", "0.007", "30030.0")
            ]
        );
    }

    #[test]
    fn finer_bars_resolve_the_intrabar_order() {
        // 2m bars; the fine 1m bars say the high came first, so even stop_first sees TP1.
        let tail = [(30000.0, 30200.0, 29800.0, 30000.0)];
        let mut input = series(2 * MINUTE, &tail);
        let t = T0 + 40 * MINUTE;
        input.fine = Some((
            MINUTE,
            Bars {
                open_time: vec![t, t + MINUTE].into(),
                open: vec![30000.0, 30150.0].into(),
                high: vec![30200.0, 30150.0].into(),
                low: vec![30000.0, 29800.0].into(),
                close: vec![30150.0, 30000.0].into(),
            },
        ));
        let job = one(input, &example_policy("2m"), &options());
        assert_eq!(
            fills(&job)[1..],
            [
                row("take_profit_1", "0.003", "30120.0"),
                row("breakeven_stop", "0.007", "30030.0")
            ]
        );
    }

    #[test]
    fn a_gap_closes_at_the_last_close_and_restarts_atr() {
        let mut input = series(MINUTE, &[(30000.0, 30010.0, 29990.0, 30005.0)]);
        // 10 more bars after a 1 h gap; an entry inside the gap has no bar to enter on.
        let last = *input.bars.open_time.last().unwrap();
        for i in 0..10 {
            input
                .bars
                .open_time
                .to_mut()
                .push(last + 3_600_000 + i * MINUTE);
            input.bars.open.to_mut().push(30000.0);
            input.bars.high.to_mut().push(30010.0);
            input.bars.low.to_mut().push(29990.0);
            input.bars.close.to_mut().push(30000.0);
        }
        input.entries.push(long_at(last + 1_800_000));
        let job = one(input, &example_policy("1m"), &options());
        assert_eq!(
            fills(&job),
            vec![
                row("entry", "0.010", "30000.0"),
                row("data_gap", "0.010", "30005.0")
            ]
        );
        assert_eq!(job.skipped, vec![(last + 1_800_000, NO_BAR, 1)]);
    }

    #[test]
    fn entries_too_small_or_while_open_are_skipped() {
        let mut input = series(
            MINUTE,
            &[
                (30000.0, 30010.0, 29990.0, 30000.0),
                (30000.0, 30010.0, 29990.0, 30000.0),
            ],
        );
        input.entries.push(long_at(T0 + 21 * MINUTE));
        input.entries.push(Entry {
            notional: Some(d("20")),
            direction: Direction::Short,
            ..long_at(T0 + 21 * MINUTE)
        });
        let job = one(input, &example_policy("1m"), &options());
        assert_eq!(
            job.skipped,
            vec![(T0 + 21 * MINUTE, BELOW_MIN_QTY, 1), (0, POSITION_OPEN, 1)]
        );
        assert_eq!(fills(&job).last().unwrap().0, "end_of_data");
    }

    #[test]
    fn grid_runs_every_policy_over_every_series() {
        let inputs = [
            series(MINUTE, &[(30000.0, 30200.0, 29800.0, 30000.0)]),
            series(MINUTE, &[(30000.0, 30130.0, 29990.0, 30130.0)]),
        ];
        let mut second = inputs[1].clone();
        second.symbol = "ETHUSDT".into();
        let inputs = vec![inputs[0].clone(), second];
        let policies = vec![
            example_policy("1m"),
            example_policy("1m"),
            example_policy("1m"),
        ];
        let out = run(&inputs, &policies, &exchange_rules(), &options()).unwrap();
        let keys: Vec<(u32, u32)> = out.iter().map(|j| (j.policy, j.series)).collect();
        assert_eq!(keys, vec![(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]);
        assert!(out.iter().all(|j| j.evaluations == 1));
    }

    #[test]
    fn atr_interval_finer_than_the_data_is_refused() {
        let err = run(
            &[series(2 * MINUTE, &[])],
            &[example_policy("1m")],
            &exchange_rules(),
            &options(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("atr_interval"), "{err}");
    }

    /// Policies that reach every branch the mark skipping reasons about: trailing from the
    /// start, by R, by level, by percent; breakeven and ratchet; a time stop with and
    /// without its profit threshold.
    fn skipping_policies() -> Vec<ExitPolicy> {
        let ladder = vec![
            LadderLevel {
                at: 1.0,
                fraction: 0.3,
            },
            LadderLevel {
                at: 2.0,
                fraction: 0.3,
            },
            LadderLevel {
                at: 3.5,
                fraction: 0.2,
            },
        ];
        let base = PolicyConfig {
            stop_atr: Some(2.0),
            min_stop_pct: 0.002,
            max_stop_pct: 0.03,
            ladder,
            breakeven_after_level: Some(1),
            ratchet_to_previous_level: true,
            atr_period: 5,
            atr_interval: "2m".to_owned(),
            ..PolicyConfig::default()
        };
        [
            PolicyConfig {
                trail_atr: Some(1.0),
                ..base.clone()
            },
            PolicyConfig {
                trail_atr: Some(1.5),
                trail_activate_r: Some(1.0),
                max_hold_ms: Some(45 * MINUTE),
                time_stop_unless_r: Some(0.5),
                ..base.clone()
            },
            PolicyConfig {
                trail_atr: Some(0.7),
                trail_after_level: Some(2),
                max_hold_ms: Some(30 * MINUTE),
                ..base.clone()
            },
            PolicyConfig {
                trail_pct: Some(0.004),
                trail_activate_pct: Some(0.003),
                ..base.clone()
            },
            PolicyConfig {
                breakeven_after_level: None,
                ratchet_to_previous_level: false,
                ..base
            },
        ]
        .into_iter()
        .map(|c| ExitPolicy::new(c).unwrap())
        .collect()
    }

    /// (trade, sequence, reason, time, price, quantity, trigger) of every fill.
    type FillView = (u32, u32, u8, i64, Decimal, Decimal, Option<Decimal>);

    fn fill_view(job: &JobOutput) -> Vec<FillView> {
        job.fills
            .iter()
            .map(|f| {
                (
                    f.trade, f.sequence, f.reason, f.time_ms, f.price, f.quantity, f.trigger,
                )
            })
            .collect()
    }

    proptest::proptest! {
        /// The float tick of a kline price is the tick of its exact decimal rounded to the
        /// nearest grid point, or undecided (near a midpoint): SOLUSDT's grid (base 0.4200,
        /// tick 0.0100) fed 2 to 4 decimal prices, below and above the base.
        #[test]
        fn float_ticks_match_exact_rounding(mantissa in 0u64..100_000_000, decimals in 2u32..5) {
            let rules = exchange_rules();
            let sol = rules.symbol("SOLUSDT").unwrap();
            let grid = Grid::new(sol).unwrap();
            let v = mantissa as f64 / 10f64.powi(decimals as i32);
            let exact = grid.nearest_exact(sol, "", "open", v).unwrap();
            if let Some(fast) = grid.nearest_fast(v) {
                proptest::prop_assert_eq!(fast, exact);
            }
            let rounded = sol.quantize_price(decimal_from_f64("v", v).unwrap(), Rounding::Nearest);
            proptest::prop_assert_eq!(grid.price(exact), rounded);
        }

        /// Prices halfway between ticks (and their float neighbours, which are not) take
        /// the midpoint path or none, and it agrees with exact rounding: SOLUSDT (base
        /// 0.4200, below and above it) and BTCUSDT's tick 0.10 grid.
        /// The same over grids from 0.1 down to 1e-7 and prices of up to 9 decimals.
        #[test]
        fn float_ticks_match_exact_rounding_on_every_grid(
            mantissa in 0u64..10_000_000_000,
            decimals in 0u32..10,
            symbol in proptest::sample::select(
                vec!["BTCUSDT", "ETHUSDT", "XRPUSDT", "DOGEUSDT", "1000SHIBUSDT", "1000PEPEUSDT"],
            ),
        ) {
            let rules = exchange_rules();
            let sym = rules.symbol(symbol).unwrap();
            let grid = Grid::new(sym).unwrap();
            let v = mantissa as f64 / 10f64.powi(decimals as i32);
            // Beyond 2^40 ticks the exact path refuses; the float path is out by 2^30.
            let exact = grid.nearest_exact(sym, "", "open", v).ok();
            if let Some(fast) = grid.nearest_fast(v) {
                proptest::prop_assert_eq!(Some(fast), exact, "{} on {}", v, symbol);
            }
        }

        #[test]
        fn midpoint_ticks_match_exact_rounding(
            ticks in 0i64..20_000_000,
            symbol in proptest::sample::select(vec!["SOLUSDT", "BTCUSDT", "XRPUSDT"]),
            nudge in -1i64..2,
        ) {
            let rules = exchange_rules();
            let sym = rules.symbol(symbol).unwrap();
            let grid = Grid::new(sym).unwrap();
            let mid = grid.price(0) - Decimal::from(100) * sym.tick_size()
                + (Decimal::from(ticks) + Decimal::new(5, 1)) * sym.tick_size();
            let v = f64::from_bits(
                (to_f64(mid).to_bits() as i64 + nudge) as u64,
            );
            let exact = grid.nearest_exact(sym, "", "open", v).unwrap();
            let fast = grid.nearest_fast(v).or_else(|| grid.nearest_midpoint(v));
            if nudge == 0 && mid.abs() < Decimal::from(1_000_000) {
                proptest::prop_assert!(fast.is_some(), "{} unsettled", mid);
            }
            if let Some(fast) = fast {
                proptest::prop_assert_eq!(fast, exact, "{}", v);
            }
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(48))]

        /// Skipping the marks that provably change nothing gives the very fills of feeding
        /// every mark: random walks (ETHUSDT ticks), entries on both sides, both intrabar
        /// rules, with and without finer bars.
        #[test]
        fn skipping_quiet_marks_changes_no_fill(
            seed in 1u64..u64::MAX,
            target_first in proptest::bool::ANY,
            with_fine in proptest::bool::ANY,
        ) {
            let mut state = seed;
            let mut next = move |n: u64| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state % n
            };
            let (coarse, n) = (2 * MINUTE, 400);
            let mut fine = Bars::default();
            let mut bars = Bars::default();
            let mut price = 200_000i64; // 2000.00 in ETHUSDT ticks of 0.01
            for i in 0..n {
                let t = T0 + i * coarse;
                let mut ticks = Vec::new();
                for half in 0..2 {
                    let open = price;
                    let close = open + next(121) as i64 - 60;
                    let high = open.max(close) + next(40) as i64;
                    let low = open.min(close) - next(40) as i64;
                    for (column, value) in [
                        (&mut fine.open, open),
                        (&mut fine.high, high),
                        (&mut fine.low, low),
                        (&mut fine.close, close),
                    ] {
                        column.to_mut().push(value as f64 / 100.0);
                    }
                    fine.open_time.to_mut().push(t + half * MINUTE);
                    ticks.push((open, high, low, close));
                    price = close;
                }
                bars.open_time.to_mut().push(t);
                bars.open.to_mut().push(ticks[0].0 as f64 / 100.0);
                bars.high.to_mut().push(ticks[0].1.max(ticks[1].1) as f64 / 100.0);
                bars.low.to_mut().push(ticks[0].2.min(ticks[1].2) as f64 / 100.0);
                bars.close.to_mut().push(ticks[1].3 as f64 / 100.0);
            }
            let mut entries = Vec::new();
            for i in 0..n {
                if next(6) == 0 {
                    entries.push(Entry {
                        time_ms: T0 + i * coarse,
                        direction: if next(2) == 0 { Direction::Long } else { Direction::Short },
                        confidence: Some(next(101) as f64 / 100.0),
                        notional: None,
                        leverage: None,
                    });
                }
            }
            let input = SeriesInput {
                symbol: "ETHUSDT".into(),
                interval_ms: coarse,
                bars,
                fine: with_fine.then_some((MINUTE, fine)),
                entries,
            };
            let skipping = BacktestOptions {
                intrabar: if target_first { Intrabar::TargetFirst } else { Intrabar::StopFirst },
                notional: d("5000"),
                ..options()
            };
            let exhaustive = BacktestOptions {
                exhaustive: true,
                ..skipping.clone()
            };
            let policies = skipping_policies();
            let rules = exchange_rules();
            let fast = run(std::slice::from_ref(&input), &policies, &rules, &skipping).unwrap();
            let slow = run(std::slice::from_ref(&input), &policies, &rules, &exhaustive).unwrap();
            let mut reasons = std::collections::BTreeSet::new();
            for (a, b) in fast.iter().zip(&slow) {
                proptest::prop_assert_eq!(fill_view(a), fill_view(b));
                proptest::prop_assert_eq!(&a.stops, &b.stops);
                proptest::prop_assert_eq!(a.evaluations, b.evaluations);
                reasons.extend(a.fills.iter().map(|f| f.reason));
            }
            proptest::prop_assert!(reasons.len() >= 4, "too few exit kinds: {reasons:?}");
        }
    }

    /// xorshift for the random cases below (proptest picks the seed, so a failure
    /// shrinks to a seed that reproduces it).
    struct Xorshift(u64);

    impl Xorshift {
        fn below(&mut self, n: u64) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0 % n
        }

        /// A float in `[lo, hi)`, on a 1/1000 grid half the time (round parameters) and
        /// arbitrary otherwise (parameters whose products land anywhere between ticks).
        fn float(&mut self, lo: f64, hi: f64) -> f64 {
            let u = self.below(1_000_000) as f64 / 1_000_000.0;
            let x = lo + (hi - lo) * u;
            if self.below(2) == 0 {
                (x * 1000.0).round() / 1000.0
            } else {
                x
            }
        }

        fn maybe<T>(&mut self, value: T) -> Option<T> {
            (self.below(2) == 0).then_some(value)
        }
    }

    /// A random valid policy: every trailing kind (from the start, by R, by percent, by
    /// level, by percent distance), breakeven, ratchet, time stops, ATR over 2m or 4m.
    fn random_policy(rng: &mut Xorshift) -> ExitPolicy {
        let levels = 1 + rng.below(3) as usize;
        let mut at = 0.0;
        let mut ladder = Vec::new();
        for i in 0..levels {
            at += rng.float(0.4, 1.6);
            let fraction = if i + 1 == levels && rng.below(2) == 0 {
                1.0 - 0.3 * i as f64
            } else {
                0.3
            };
            ladder.push(LadderLevel { at, fraction });
        }
        let mut config = PolicyConfig {
            stop_atr: Some(rng.float(0.5, 3.0)),
            min_stop_pct: rng.float(0.0005, 0.003),
            max_stop_pct: rng.float(0.01, 0.05),
            ladder,
            breakeven_after_level: {
                let level = 1 + rng.below(levels as u64) as u32;
                rng.maybe(level)
            },
            ratchet_to_previous_level: rng.below(2) == 0,
            atr_period: 2 + rng.below(12) as u32,
            atr_interval: if rng.below(2) == 0 { "2m" } else { "4m" }.to_owned(),
            confidence_scale: rng.float(0.0, 1.0),
            ..PolicyConfig::default()
        };
        match rng.below(6) {
            0 => {}
            1 => config.trail_atr = Some(rng.float(0.3, 3.0)),
            2 => {
                config.trail_atr = Some(rng.float(0.3, 3.0));
                config.trail_activate_r = Some(rng.float(0.2, 3.0));
            }
            3 => {
                config.trail_atr = Some(rng.float(0.3, 3.0));
                config.trail_after_level = Some(1 + rng.below(levels as u64) as u32);
            }
            4 => {
                config.trail_atr = Some(rng.float(0.3, 3.0));
                config.trail_activate_pct = Some(rng.float(0.0005, 0.01));
            }
            _ => {
                config.trail_pct = Some(rng.float(0.001, 0.01));
                let pct = rng.float(0.0005, 0.01);
                config.trail_activate_pct = rng.maybe(pct);
            }
        }
        if rng.below(3) == 0 {
            config.max_hold_ms = Some((5 + rng.below(120) as i64) * MINUTE);
            let r = rng.float(0.1, 1.5);
            config.time_stop_unless_r = rng.maybe(r);
        }
        ExitPolicy::new(config).unwrap()
    }

    /// Everything a job reports, for an exact comparison.
    fn job_view(job: &JobOutput) -> String {
        let fills: Vec<_> = job
            .fills
            .iter()
            .map(|f| {
                (
                    f.trade,
                    f.sequence,
                    f.reason,
                    f.time_ms,
                    f.direction == Direction::Long,
                    f.price.serialize(),
                    f.quantity.serialize(),
                    f.fee.serialize(),
                    f.pnl.serialize(),
                    f.r.to_bits(),
                    f.trigger.map(|t| t.serialize()),
                    f.mark.serialize(),
                )
            })
            .collect();
        let trades: Vec<_> = job
            .trades
            .iter()
            .map(|t| {
                (
                    t.trade,
                    t.entry_time_ms,
                    t.exit_time_ms,
                    t.pnl.serialize(),
                    t.fees.serialize(),
                    t.initial_stop.serialize(),
                    t.exit_reason,
                    t.bars_held,
                )
            })
            .collect();
        let stops: Vec<_> = job
            .stops
            .iter()
            .map(|&(t, m, s)| (t, m, s.to_bits()))
            .collect();
        let levels: Vec<_> = job
            .levels
            .iter()
            .map(|&(t, n, l)| (t, n, l.to_bits()))
            .collect();
        format!(
            "{fills:?}\n{trades:?}\n{stops:?}\n{levels:?}\n{:?}\n{}",
            job.skipped, job.evaluations
        )
    }

    /// (symbol, price divisor, start) of the grids the random walks run on: ticks of 0.01
    /// (ETHUSDT), a grid based at 0.42 (SOLUSDT), prices in 0.1 (BTCUSDT, tick 0.10) and
    /// in 1e-5 (DOGEUSDT).
    const WALK_GRIDS: [(&str, f64, i64); 4] = [
        ("ETHUSDT", 100.0, 200_000),
        ("SOLUSDT", 100.0, 15_000),
        ("BTCUSDT", 10.0, 300_000),
        ("DOGEUSDT", 100_000.0, 15_000),
    ];

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

        /// A bar that provably triggers nothing is one step, not four state-machine calls,
        /// and changes nothing: the same fills (every field, exact decimals and their
        /// scale), trades, stop after every bar, levels, skips and evaluation counts as
        /// feeding every mark, over random walks with calm and wild stretches and gaps,
        /// random policies, both sides, sparse and dense entries, both intrabar rules, with
        /// and without finer bars, on four grids.
        #[test]
        fn quiet_bars_change_nothing(
            seed in 1u64..u64::MAX,
            target_first in proptest::bool::ANY,
            with_fine in proptest::bool::ANY,
            grid in 0usize..WALK_GRIDS.len(),
            dense in proptest::bool::ANY,
        ) {
            let mut rng = Xorshift(seed);
            let (symbol, divisor, start) = WALK_GRIDS[grid];
            let (coarse, n) = (2 * MINUTE, 300);
            let mut fine = Bars::default();
            let mut bars = Bars::default();
            let mut price = start;
            let mut t = T0;
            for _ in 0..n {
                if rng.below(60) == 0 {
                    t += coarse * (1 + rng.below(3) as i64); // a gap, sometimes a segment end
                }
                // Volatility regimes: calm, normal, wild (gaps through stops and levels).
                let scale = [start / 2000, start / 500, start / 100][rng.below(3) as usize].max(2);
                let drift = rng.below(3) as i64 - 1;
                let mut ticks = Vec::new();
                for half in 0..2 {
                    let open = if rng.below(20) == 0 {
                        price + rng.below(2 * scale as u64) as i64 - scale
                    } else {
                        price
                    }
                    .max(10);
                    let close = (open + drift * scale / 4 + rng.below(scale as u64 + 1) as i64
                        - scale / 2)
                        .max(10);
                    let high = open.max(close) + rng.below(scale as u64 / 2 + 1) as i64;
                    let low = (open.min(close) - rng.below(scale as u64 / 2 + 1) as i64).max(5);
                    for (column, value) in [
                        (&mut fine.open, open),
                        (&mut fine.high, high),
                        (&mut fine.low, low),
                        (&mut fine.close, close),
                    ] {
                        column.to_mut().push(value as f64 / divisor);
                    }
                    fine.open_time.to_mut().push(t + half * MINUTE);
                    ticks.push((open, high, low, close));
                    price = close;
                }
                bars.open_time.to_mut().push(t);
                bars.open.to_mut().push(ticks[0].0 as f64 / divisor);
                bars.high.to_mut().push(ticks[0].1.max(ticks[1].1) as f64 / divisor);
                bars.low.to_mut().push(ticks[0].2.min(ticks[1].2) as f64 / divisor);
                bars.close.to_mut().push(ticks[1].3 as f64 / divisor);
                t += coarse;
            }
            let mut entries = Vec::new();
            for &time_ms in bars.open_time.iter() {
                if dense || rng.below(8) == 0 {
                    let confidence = rng.below(101) as f64 / 100.0;
                    entries.push(Entry {
                        time_ms,
                        direction: if rng.below(2) == 0 { Direction::Long } else { Direction::Short },
                        confidence: rng.maybe(confidence),
                        notional: None,
                        leverage: None,
                    });
                }
            }
            let input = SeriesInput {
                symbol: symbol.into(),
                interval_ms: coarse,
                bars,
                fine: with_fine.then_some((MINUTE, fine)),
                entries,
            };
            let skipping = BacktestOptions {
                intrabar: if target_first { Intrabar::TargetFirst } else { Intrabar::StopFirst },
                notional: d("5000"),
                max_gap_bars: 1,
                one_position_per_symbol: dense && rng.below(2) == 0,
                ..options()
            };
            let exhaustive = BacktestOptions {
                exhaustive: true,
                ..skipping.clone()
            };
            let policies: Vec<ExitPolicy> = (0..6).map(|_| random_policy(&mut rng)).collect();
            let rules = exchange_rules();
            let fast = run(std::slice::from_ref(&input), &policies, &rules, &skipping).unwrap();
            let slow = run(std::slice::from_ref(&input), &policies, &rules, &exhaustive).unwrap();
            for (a, b) in fast.iter().zip(&slow) {
                proptest::prop_assert_eq!(job_view(a), job_view(b));
                proptest::prop_assert_eq!(b.quiet_bars, 0);
            }
            let quiet: u64 = fast.iter().map(|j| j.quiet_bars).sum();
            let evaluations: u64 = fast.iter().map(|j| j.evaluations).sum();
            proptest::prop_assert!(evaluations > 0);
            if !with_fine {
                proptest::prop_assert!(quiet > 0, "no quiet bar in {evaluations} evaluations");
            }
        }
    }

    #[test]
    fn replay_marks_gives_the_worked_example_decisions() {
        let rules = exchange_rules();
        let marks = [(1, d("30125.0")), (2, d("30130.0")), (3, d("30370.0"))];
        let got = replay_marks(
            &rules,
            &example_policy("1m"),
            "BTCUSDT",
            Direction::Long,
            d("0.010"),
            d("30000.0"),
            &marks,
            Some(60.0),
            10,
            None,
            0,
        )
        .unwrap();
        let view: Vec<(String, String)> = got
            .iter()
            .map(|x| (x.reason.clone(), btc().format_qty(x.quantity, true)))
            .collect();
        assert_eq!(
            view,
            vec![
                ("take_profit_1".into(), "0.003".into()),
                ("take_profit_3".into(), "0.007".into())
            ]
        );
    }
}
