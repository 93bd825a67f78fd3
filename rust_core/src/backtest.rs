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

use std::collections::HashMap;

use rayon::prelude::*;

use crate::atr::WilderAtr;
use crate::error::CoreError;
use crate::exit::action::{ExitReason, PositionSide};
use crate::exit::policy::ExitPolicy;
use crate::exit::position::{Confirmed, OpenParams, PositionState};
use crate::fixed::{decimal_from_f64, decimal_to_f64, Decimal, Rounding};
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

/// OHLC bars, oldest first, `open_time` in ms.
#[derive(Debug, Clone, Default)]
pub struct Bars {
    pub open_time: Vec<i64>,
    pub open: Vec<f64>,
    pub high: Vec<f64>,
    pub low: Vec<f64>,
    pub close: Vec<f64>,
}

impl Bars {
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
pub struct SeriesInput {
    pub symbol: String,
    pub interval_ms: i64,
    pub bars: Bars,
    /// Finer bars (`interval_ms` dividing the series') that resolve the intrabar order.
    pub fine: Option<(i64, Bars)>,
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
}

/// A series with its prices on the tick grid and its segments, shared by every policy.
struct Prepared<'a> {
    input: &'a SeriesInput,
    rules: &'a SymbolRules,
    prices: Ohlc<'a>,
    /// Half-open bar index ranges without a gap longer than `max_gap_bars`.
    segments: Vec<(usize, usize)>,
    /// For each bar, the range of fine bars that cover it completely, if any.
    fine: Vec<Option<(usize, usize)>>,
    fine_prices: Option<Ohlc<'a>>,
    grid: Option<GridIndex>,
    /// ATR before each bar (closed bars of its segment only), per (period, ATR interval).
    atr: HashMap<(usize, i64), Vec<Option<f64>>>,
}

/// One price column on the tick grid. Kline prices are exchange prices stored as f64, so
/// the nearest grid point `minPrice + k * tickSize` recovers each exactly; the column keeps
/// `k` and builds the decimal when a bar is evaluated (one integer multiply), which is
/// cheaper than holding a decimal per bar. A column with any value off the grid keeps exact
/// decimals instead.
enum PriceColumn<'a> {
    Grid {
        base: i128,
        tick: i128,
        scale: u32,
        base_f: f64,
        tick_f: f64,
        values: &'a [f64],
    },
    Exact(Vec<Decimal>),
}

/// The grid index of `v` when it lies within 1e-6 tick of a grid point: far inside f64
/// precision for any Binance price, so it is the point exact decimal rounding would find.
/// Indices stay below 2^50, so `base + k * tick` stays far inside the 96-bit mantissa.
fn grid_point(v: f64, base_f: f64, tick_f: f64) -> Option<i64> {
    let x = (v - base_f) / tick_f;
    if !(x.is_finite() && x.abs() < (1i64 << 50) as f64) {
        return None;
    }
    let k = if x >= 0.0 {
        (x + 0.5) as i64
    } else {
        -((0.5 - x) as i64)
    };
    ((x - k as f64).abs() < 1e-6).then_some(k)
}

impl<'a> PriceColumn<'a> {
    fn new(rules: &SymbolRules, field: &str, values: &'a [f64]) -> Result<Self, CoreError> {
        let tick = rules.tick_size();
        let base = rules.price_filter.min_price;
        let scale = base.scale().max(tick.scale());
        let (mut base_r, mut tick_r) = (base, tick);
        base_r.rescale(scale);
        tick_r.rescale(scale);
        if tick > Decimal::ZERO
            && base_r.scale() == scale
            && tick_r.scale() == scale
            && tick_r.mantissa().unsigned_abs() < (1u128 << 40)
        {
            let (tick_f, base_f) = (decimal_to_f64(tick), decimal_to_f64(base));
            // Checked once here; the index itself is recomputed when a bar is evaluated,
            // which costs less than storing one per bar.
            if values
                .iter()
                .all(|&v| grid_point(v, base_f, tick_f).is_some())
            {
                return Ok(Self::Grid {
                    base: base_r.mantissa(),
                    tick: tick_r.mantissa(),
                    scale,
                    base_f,
                    tick_f,
                    values,
                });
            }
        }
        let mut exact = Vec::with_capacity(values.len());
        for &v in values {
            let d = decimal_from_f64(field, v).map_err(|e| e.with_symbol(&rules.symbol))?;
            exact.push(rules.quantize_price(d, Rounding::Nearest));
        }
        Ok(Self::Exact(exact))
    }

    fn get(&self, i: usize) -> Decimal {
        match self {
            Self::Grid {
                base, tick, scale, ..
            } => {
                let k = self.index(i).unwrap_or_default();
                Decimal::from_i128_with_scale(base + i128::from(k) * tick, *scale)
            }
            Self::Exact(values) => values[i],
        }
    }

    fn index(&self, i: usize) -> Option<i64> {
        match self {
            // On the grid: checked for every value when the column was built.
            Self::Grid {
                base_f,
                tick_f,
                values,
                ..
            } => grid_point(values[i], *base_f, *tick_f),
            Self::Exact(_) => None,
        }
    }
}

/// Open, high, low and close columns.
struct Ohlc<'a>([PriceColumn<'a>; 4]);

impl<'a> Ohlc<'a> {
    fn new(rules: &SymbolRules, prefix: &str, bars: &'a Bars) -> Result<Self, CoreError> {
        Ok(Self([
            PriceColumn::new(rules, &format!("{prefix}open"), &bars.open)?,
            PriceColumn::new(rules, &format!("{prefix}high"), &bars.high)?,
            PriceColumn::new(rules, &format!("{prefix}low"), &bars.low)?,
            PriceColumn::new(rules, &format!("{prefix}close"), &bars.close)?,
        ]))
    }

    fn open(&self, i: usize) -> Decimal {
        self.0[0].get(i)
    }

    fn close(&self, i: usize) -> Decimal {
        self.0[3].get(i)
    }

    fn bar(&self, i: usize) -> [Decimal; 4] {
        [
            self.0[0].get(i),
            self.0[1].get(i),
            self.0[2].get(i),
            self.0[3].get(i),
        ]
    }

    fn indices(&self, i: usize) -> Option<[i64; 4]> {
        Some([
            self.0[0].index(i)?,
            self.0[1].index(i)?,
            self.0[2].index(i)?,
            self.0[3].index(i)?,
        ])
    }
}

/// The tick grid as floats, to find the grid index of a decimal known to be on it.
#[derive(Clone, Copy)]
struct GridIndex {
    base: f64,
    tick: f64,
}

impl GridIndex {
    fn new(rules: &SymbolRules) -> Option<Self> {
        let tick = rules.tick_size();
        (tick > Decimal::ZERO).then(|| Self {
            base: decimal_to_f64(rules.price_filter.min_price),
            tick: decimal_to_f64(tick),
        })
    }

    fn of(self, price: Decimal) -> Option<i64> {
        let x = (to_f64(price) - self.base) / self.tick;
        let k = x.round();
        (x.is_finite() && (x - k).abs() < 1e-6 && k.abs() < (1i64 << 50) as f64).then_some(k as i64)
    }
}

fn prepare<'a>(
    input: &'a SeriesInput,
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
    let mut fine = vec![None; bars.len()];
    let mut fine_prices = None;
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
        fine_prices = Some(Ohlc::new(symbol_rules, "fine.", fine_bars)?);
    }
    let mut atr = HashMap::new();
    for &(period, atr_interval) in periods {
        atr.insert(
            (period, atr_interval),
            atr_before_each_bar(input, &segments, period, atr_interval)?,
        );
    }
    Ok(Prepared {
        input,
        rules: symbol_rules,
        prices: Ohlc::new(symbol_rules, "", bars)?,
        grid: GridIndex::new(symbol_rules),
        segments,
        fine,
        fine_prices,
        atr,
    })
}

/// ATR known at the open of each bar: Wilder's over the closed bars of the policy's ATR
/// interval inside the bar's segment, as the daemon's aggregator would have them. With a
/// coarser ATR interval, data bars are merged into its buckets (high max, low min, last
/// close) and a bucket counts once the first bar of the next one starts.
#[allow(clippy::needless_range_loop)] // `i` addresses several parallel bar arrays
fn atr_before_each_bar(
    input: &SeriesInput,
    segments: &[(usize, usize)],
    period: usize,
    atr_interval: i64,
) -> Result<Vec<Option<f64>>, CoreError> {
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
    let mut values = vec![None; bars.len()];
    for &(start, end) in segments {
        let mut state = WilderAtr::new(period)?;
        let mut bucket: Option<(i64, f64, f64, f64)> = None;
        for i in start..end {
            let key = bars.open_time[i].div_euclid(atr_interval);
            match bucket {
                Some((k, high, low, close)) if k != key => {
                    state.update(high, low, close);
                    bucket = None;
                }
                _ => {}
            }
            values[i] = state.value();
            bucket = Some(match bucket {
                Some((k, high, low, _)) => (
                    k,
                    high.max(bars.high[i]),
                    low.min(bars.low[i]),
                    bars.close[i],
                ),
                None => (key, bars.high[i], bars.low[i], bars.close[i]),
            });
        }
    }
    Ok(values)
}

/// A point of a bar's mark path.
#[derive(Debug, Clone, Copy)]
struct Point {
    time_ms: i64,
    price: Decimal,
    /// Reached by a jump (an open) rather than a continuous move from the previous point.
    jump: bool,
    /// Grid index of `price`, when the bars are on the grid.
    idx: Option<i64>,
}

fn push_bar_path(
    out: &mut Vec<Point>,
    t0: i64,
    span: i64,
    ohlc: [Decimal; 4],
    idx: Option<[i64; 4]>,
    adverse_low_first: bool,
) {
    let [open, high, low, close] = ohlc;
    let at = |k: usize| idx.map(|x| x[k]);
    let ((first, first_idx), (second, second_idx)) = if adverse_low_first {
        ((low, at(2)), (high, at(1)))
    } else {
        ((high, at(1)), (low, at(2)))
    };
    out.push(Point {
        time_ms: t0,
        price: open,
        jump: true,
        idx: at(0),
    });
    out.push(Point {
        time_ms: t0 + span / 3,
        price: first,
        jump: false,
        idx: first_idx,
    });
    out.push(Point {
        time_ms: t0 + 2 * span / 3,
        price: second,
        jump: false,
        idx: second_idx,
    });
    out.push(Point {
        time_ms: t0 + span - 1,
        price: close,
        jump: false,
        idx: at(3),
    });
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
    match (p.fine[i], &p.input.fine, &p.fine_prices) {
        (Some((a, b)), Some((fine_interval, fine_bars)), Some(prices)) => {
            for j in a..b {
                push_bar_path(
                    out,
                    fine_bars.open_time[j],
                    *fine_interval,
                    prices.bar(j),
                    prices.indices(j),
                    low_first,
                );
            }
        }
        _ => push_bar_path(
            out,
            p.input.bars.open_time[i],
            p.input.interval_ms,
            p.prices.bar(i),
            p.prices.indices(i),
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
    pnl: Decimal,
    fees: Decimal,
    confidence: Option<f64>,
    bars_held: u32,
    sequence: u32,
    /// Grid indices of the state's triggers, for skipping marks that change nothing.
    quiet: Option<Quiet>,
}

/// What a mark must reach to matter to a position, as grid indices: a mark strictly between
/// the stop and the next take-profit level, no better than the best mark so far, before the
/// time stop is due and after the bar's first mark (which carries the bar's new ATR to the
/// trailing stop) leaves `PositionState` exactly as it was, apart from `last_mark_price`:
/// `on_mark` would move nothing and emit nothing. Such marks are not fed; everything else is.
/// `BacktestOptions::exhaustive` feeds every mark, and the tests check both agree.
struct Quiet {
    stop_key: Decimal,
    stop: i64,
    best: i64,
    levels: Vec<i64>,
    expires_at: Option<i64>,
}

impl Quiet {
    fn new(position: &PositionState, grid: GridIndex, expires_at: Option<i64>) -> Option<Self> {
        Some(Self {
            stop_key: position.stop_price,
            stop: grid.of(position.stop_price)?,
            best: grid.of(position.best_price)?,
            levels: position
                .ladder_prices
                .iter()
                .map(|&l| grid.of(l))
                .collect::<Option<Vec<_>>>()?,
            expires_at,
        })
    }

    /// Re-reads the stop and the best mark after `on_mark` or a confirmation.
    fn refresh(&mut self, position: &PositionState, grid: GridIndex) -> bool {
        if position.stop_price.serialize() != self.stop_key.serialize() {
            let Some(stop) = grid.of(position.stop_price) else {
                return false;
            };
            self.stop = stop;
            self.stop_key = position.stop_price;
        }
        match grid.of(position.best_price) {
            Some(best) => {
                self.best = best;
                true
            }
            None => false,
        }
    }

    fn next_level(&self, position: &PositionState) -> Option<i64> {
        self.levels.get(position.levels_done as usize).copied()
    }

    /// Whether `on_mark(point)` provably changes nothing.
    fn is_quiet(
        &self,
        position: &PositionState,
        direction: Direction,
        idx: i64,
        time_ms: i64,
    ) -> bool {
        if self.expires_at.is_some_and(|at| time_ms >= at) {
            return false;
        }
        let next = self.next_level(position);
        match direction {
            Direction::Long => idx > self.stop && idx <= self.best && next.is_none_or(|n| idx < n),
            Direction::Short => idx < self.stop && idx >= self.best && next.is_none_or(|n| idx > n),
        }
    }

    /// Whether a continuous move between `a` and `b` may cross the stop or a level.
    fn may_cross(&self, position: &PositionState, direction: Direction, a: i64, b: i64) -> bool {
        let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
        let inside = |x: i64| x > lo && x < hi;
        let beyond = match (direction, self.next_level(position)) {
            (_, None) => true,
            (Direction::Long, Some(n)) => n >= hi,
            (Direction::Short, Some(n)) => n <= lo,
        };
        inside(self.stop) || !beyond
    }
}

struct Job<'a> {
    p: &'a Prepared<'a>,
    policy: &'a ExitPolicy,
    rules: &'a SymbolRules,
    options: &'a BacktestOptions,
    atr: &'a [Option<f64>],
    out: JobOutput,
    open: Vec<Open>,
    next_trade: u32,
    path: Vec<Point>,
    marks: Vec<Point>,
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
        let price = p.prices.open(i);
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
            self.atr[i],
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
        let quiet = match (self.p.grid, self.options.exhaustive) {
            (Some(grid), false) => {
                let expires = self
                    .policy
                    .config()
                    .max_hold_ms
                    .map(|h| time_ms.saturating_add(h));
                Quiet::new(&position, grid, expires)
            }
            _ => None,
        };
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
            risk_price: (price - initial_stop).abs(),
            pnl: -entry_fee,
            fees: entry_fee,
            confidence: entry.confidence,
            bars_held: 0,
            sequence: 0,
            quiet,
        });
    }

    /// Books a fill of `quantity` at `price` for `open`; returns true when it closed it.
    #[allow(clippy::too_many_arguments)] // one fill's facts, kept apart from `self` borrows
    fn book(
        options: &BacktestOptions,
        out: &mut JobOutput,
        open: &mut Open,
        reason: u8,
        point: Point,
        quantity: Decimal,
        trigger: Option<Decimal>,
        sequence: u32,
    ) -> bool {
        let quantity = quantity.min(open.remaining);
        let price = point.price;
        let exit_fee = fee(options.taker_fee, price, quantity);
        let gross = (price - open.entry_price) * quantity * open.direction.sign();
        let pnl = gross - exit_fee;
        let r = if open.risk_price.is_zero() {
            0.0
        } else {
            // A float column for analysis: the exact move is price - entry in the fills.
            (to_f64(price) - to_f64(open.entry_price)) * to_f64(open.direction.sign())
                / to_f64(open.risk_price)
        };
        open.remaining -= quantity;
        open.pnl += pnl;
        open.fees += exit_fee;
        out.fills.push(Fill {
            trade: open.trade,
            sequence,
            reason,
            time_ms: point.time_ms,
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
                exit_time_ms: point.time_ms,
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

    fn refresh(open: &mut Open, grid: Option<GridIndex>) {
        if let (Some(quiet), Some(grid)) = (&mut open.quiet, grid) {
            if !quiet.refresh(&open.position, grid) {
                open.quiet = None;
            }
        }
    }

    /// Feeds one mark; confirms every action at once. Returns true when the position closed.
    fn feed(&mut self, k: usize, point: Point, atr: Option<f64>) -> bool {
        // An action's confirmation can move the stop (breakeven, ratchet) so that the same
        // mark triggers again; the loop is bounded by the ladder length plus the stop.
        for _ in 0..64 {
            let open = &mut self.open[k];
            let action =
                open.position
                    .on_mark(point.price, atr, point.time_ms, self.rules, self.policy);
            Self::refresh(open, self.p.grid);
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
            Self::refresh(open, self.p.grid);
            let reason = reason_of(action.reason);
            let trigger = Some(action.trigger_price);
            if Self::book(
                self.options,
                &mut self.out,
                open,
                reason,
                point,
                quantity,
                trigger,
                sequence,
            ) || closed
            {
                return true;
            }
        }
        false
    }

    fn run_bar(&mut self, i: usize) {
        let atr = self.atr[i];
        let mut k = 0;
        while k < self.open.len() {
            self.out.evaluations += 1;
            let direction = self.open[k].direction;
            let mut path = std::mem::take(&mut self.path);
            bar_path(self.p, i, direction, self.options.intrabar, &mut path);
            let mut closed = false;
            let mut previous: Option<Point> = None;
            for &point in &path {
                let open = &self.open[k];
                let quiet = open.quiet.as_ref();
                let crossing_possible =
                    match (quiet, previous.and_then(|before| before.idx), point.idx) {
                        (Some(state), Some(from), Some(to)) => {
                            state.may_cross(&open.position, direction, from, to)
                        }
                        _ => true,
                    };
                if let (false, Some(prev), true) = (point.jump, previous, crossing_possible) {
                    // Continuous move: visit every trigger strictly between prev and point.
                    let mut marks = std::mem::take(&mut self.marks);
                    marks.clear();
                    let (lo, hi) = if prev.price <= point.price {
                        (prev.price, point.price)
                    } else {
                        (point.price, prev.price)
                    };
                    let position = &self.open[k].position;
                    let inside = |x: Decimal| x > lo && x < hi;
                    // Usually neither the stop nor the next level lies inside the move; the
                    // levels beyond the next one are farther away still.
                    let next = position
                        .ladder_prices
                        .get(position.levels_done as usize)
                        .copied();
                    let beyond = match direction {
                        Direction::Long => next.is_none_or(|n| n >= hi),
                        Direction::Short => next.is_none_or(|n| n <= lo),
                    };
                    let maybe = inside(position.stop_price) || !beyond;
                    for level in triggers_of(position).filter(|_| maybe) {
                        if level > lo && level < hi {
                            marks.push(Point {
                                time_ms: prev.time_ms,
                                price: level,
                                jump: false,
                                idx: None,
                            });
                        }
                    }
                    if marks.len() > 1 {
                        if prev.price <= point.price {
                            marks.sort_by_key(|m| m.price);
                        } else {
                            marks.sort_by_key(|m| std::cmp::Reverse(m.price));
                        }
                    }
                    for &mark in &marks {
                        if self.feed(k, mark, atr) {
                            closed = true;
                            break;
                        }
                    }
                    self.marks = marks;
                }
                if closed {
                    break;
                }
                let open = &self.open[k];
                let skip = !point.jump
                    && match (&open.quiet, point.idx) {
                        (Some(state), Some(idx)) => {
                            state.is_quiet(&open.position, direction, idx, point.time_ms)
                        }
                        _ => false,
                    };
                if !skip && self.feed(k, point, atr) {
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
            let open = &mut self.open[k];
            open.bars_held += 1;
            if self.options.detail {
                self.out.stops.push((
                    open.trade,
                    self.p.input.bars.open_time[i],
                    to_f64(open.position.stop_price),
                ));
            }
            k += 1;
        }
    }

    fn close_all(&mut self, i: usize, reason: u8) {
        let point = Point {
            time_ms: self.p.input.bars.open_time[i] + self.p.input.interval_ms - 1,
            price: self.p.prices.close(i),
            jump: false,
            idx: None,
        };
        for mut open in std::mem::take(&mut self.open) {
            let quantity = open.remaining;
            let sequence = open.sequence + 1;
            Self::book(
                self.options,
                &mut self.out,
                &mut open,
                reason,
                point,
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
                self.run_bar(i);
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
    series: &[SeriesInput],
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
                open: Vec::new(),
                next_trade: 0,
                path: Vec::with_capacity(8),
                marks: Vec::with_capacity(8),
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
    fn bars(interval: i64, tail: &[(f64, f64, f64, f64)]) -> Bars {
        let mut b = Bars::default();
        let warm = std::iter::repeat_n((30000.0, 30030.0, 29970.0, 30000.0), 20);
        for (i, (o, h, l, c)) in warm.chain(tail.iter().copied()).enumerate() {
            b.open_time.push(T0 + i as i64 * interval);
            b.open.push(o);
            b.high.push(h);
            b.low.push(l);
            b.close.push(c);
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

    fn series(interval: i64, tail: &[(f64, f64, f64, f64)]) -> SeriesInput {
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

    fn one(input: SeriesInput, policy: &ExitPolicy, options: &BacktestOptions) -> JobOutput {
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
                open_time: vec![t, t + MINUTE],
                open: vec![30000.0, 30150.0],
                high: vec![30200.0, 30150.0],
                low: vec![30000.0, 29800.0],
                close: vec![30150.0, 30000.0],
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
            input.bars.open_time.push(last + 3_600_000 + i * MINUTE);
            input.bars.open.push(30000.0);
            input.bars.high.push(30010.0);
            input.bars.low.push(29990.0);
            input.bars.close.push(30000.0);
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
