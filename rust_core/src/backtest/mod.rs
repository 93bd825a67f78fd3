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
//! # Integers, and the decimal reference
//! The default replay (`tick_replay`) keeps positions in grid ticks and lot units and
//! money in integer mantissas (`ticks`, `money`); most bars (a range that crosses no stop,
//! no pending level, no trailing activation, no due time stop) are one integer step there
//! instead of four state-machine calls. `BacktestOptions::exhaustive` runs the decimal
//! replay (`replay`) instead: every mark through `PositionState::on_mark`, the daemon's own
//! state machine. The tests require both to give the same fills, trades, stops, levels and
//! skips; a job the integers cannot hold (a price more than 2^40 ticks from the grid's
//! base, an amount beyond 96 bits) reruns the decimal way.
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
//!
//! # Layout
//! One file per job; each says in its header what it may not touch.
//! - this file: the inputs, options and result types, [`run`] and [`replay_marks`];
//! - `prepare`: bars onto the tick grid, segments, fine bars, band, ATR before each bar;
//! - `spare`: the large buffers of `prepare`, kept from one run for the next;
//! - `path`: the mark path a bar stands for;
//! - `thresholds`: ticks of a decimal threshold, the trailing distance in ticks, ATR per bar;
//! - `walk`: what both replays share: segments, entries, sizing, skip records;
//! - `ticks`: a position's exit rules over ticks and lot units;
//! - `scan`: the vectorized scans of the quiet sweep over bar prices;
//! - `money`: fees and `PnL` as integer mantissas;
//! - `columns`: fills and trades as result columns (floats or exact mantissas);
//! - `tick_replay`: one job the integer way (the default);
//! - `replay`: one job the decimal way, every mark through the state machine (the
//!   reference, `exhaustive`);
//! - `exit_api`: the one place naming the position API of `crate::exit`.

use std::borrow::Cow;

use rayon::prelude::*;

use crate::error::CoreError;
use crate::exit::policy::ExitPolicy;
use crate::fixed::Decimal;
use crate::rules::ExchangeRules;

pub use self::columns::{
    widened, Amounts, ColumnForm, ExactRows, FillColumns, FillRecord, ResultColumns, TradeColumns,
    TradeRecord, EXACT_SCALE,
};
use self::exit_api::{atr_key, new_position};
use self::prepare::prepare;
use self::replay::Job;
use self::spare::Spare;
use self::tick_replay::TickJob;
use self::walk::Record;

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

/// Direction of a position (`Long` by default: the blank a reused position slot starts
/// from, always overwritten by its entry).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Direction {
    #[default]
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

    /// Equal lengths, open times strictly increasing.
    fn check(&self, symbol: &str, what: &str) -> Result<(), CoreError> {
        self.check_lengths(symbol, what)?;
        // The row is sought only when something is wrong.
        if steps::steps(&self.open_time, i64::MAX, true).0 {
            Err(self.unordered(symbol, what))
        } else {
            Ok(())
        }
    }

    /// [`Bars::check`], and in the same pass over the open times the segments: half-open
    /// row ranges without a step longer than `max_step` between two bars; and whether every
    /// step is at least `min_step` long.
    fn check_segments(
        &self,
        symbol: &str,
        what: &str,
        min_step: i64,
        max_step: i64,
    ) -> Result<(Vec<(usize, usize)>, bool), CoreError> {
        self.check_lengths(symbol, what)?;
        let (unordered, gaps, short) = steps::spacing(&self.open_time, min_step, max_step, true);
        if unordered {
            return Err(self.unordered(symbol, what));
        }
        let mut segments = Vec::new();
        let mut start = 0;
        if gaps {
            for (i, w) in self.open_time.windows(2).enumerate() {
                if i128::from(w[1]) - i128::from(w[0]) > i128::from(max_step) {
                    segments.push((start, i + 1));
                    start = i + 1;
                }
            }
        }
        if !self.open_time.is_empty() {
            segments.push((start, self.open_time.len()));
        }
        Ok((segments, !short))
    }

    fn check_lengths(&self, symbol: &str, what: &str) -> Result<(), CoreError> {
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
        Ok(())
    }

    /// The error naming the first open time that does not follow its predecessor.
    #[cold]
    fn unordered(&self, symbol: &str, what: &str) -> CoreError {
        let times = &self.open_time;
        let i = times.windows(2).position(|w| w[1] <= w[0]).unwrap_or(0);
        CoreError::invalid_for(
            symbol,
            format!("{what}.open_time"),
            times.get(i + 1).map_or(0, |t| *t).to_string(),
            format!(
                "must be strictly increasing (row {} follows {})",
                i + 1,
                times.get(i).map_or(0, |t| *t)
            ),
        )
    }
}

/// One entry request: at `time_ms`, open `direction`; a small value [`Entries::get`] builds
/// on demand from the columns.
#[derive(Debug, Clone, Copy)]
pub struct Entry {
    pub time_ms: i64,
    pub direction: Direction,
    pub confidence: Option<f64>,
    /// USDT notional; `None` uses [`BacktestOptions::notional`].
    pub notional: Option<Decimal>,
    /// `None` uses [`BacktestOptions::leverage`].
    pub leverage: Option<u32>,
}

/// One symbol's entry requests as columns, sorted by time: owned, or borrowed from the
/// caller's arrays like [`Bars`] (no per-entry struct for a million entries), checked in
/// one pass by [`Entries::check`] before the run reads them.
#[derive(Debug, Clone, Default)]
pub struct Entries<'a> {
    pub time_ms: Cow<'a, [i64]>,
    /// 1 (LONG) or -1 (SHORT).
    pub side: Cow<'a, [i8]>,
    /// NaN or infinite: no confidence.
    pub confidence: Cow<'a, [f64]>,
    /// 0 or below: [`BacktestOptions::leverage`].
    pub leverage: Cow<'a, [i64]>,
    /// The entries that give their own notional: (row, USDT notional), rows strictly
    /// increasing; the others use [`BacktestOptions::notional`]. Empty in the usual case.
    pub notional: Vec<(usize, Decimal)>,
}

impl Entries<'_> {
    /// Owned columns holding `entries` (tests and benchmarks build them this way).
    pub fn of(entries: &[Entry]) -> Entries<'static> {
        let mut columns = Entries::default();
        for &entry in entries {
            columns.push(entry);
        }
        columns
    }

    /// Appends `entry` (the columns become owned).
    pub fn push(&mut self, entry: Entry) {
        if let Some(notional) = entry.notional {
            self.notional.push((self.len(), notional));
        }
        self.time_ms.to_mut().push(entry.time_ms);
        self.side.to_mut().push(match entry.direction {
            Direction::Long => 1,
            Direction::Short => -1,
        });
        self.confidence
            .to_mut()
            .push(entry.confidence.unwrap_or(f64::NAN));
        self.leverage
            .to_mut()
            .push(entry.leverage.map_or(0, i64::from));
    }

    /// How many entries.
    #[inline]
    pub fn len(&self) -> usize {
        self.time_ms.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.time_ms.is_empty()
    }

    /// The entry time of row `k`.
    #[inline]
    pub fn time_ms(&self, k: usize) -> i64 {
        self.time_ms[k]
    }

    /// Row `k` as an [`Entry`] (after [`Entries::check`]: a side other than 1 reads SHORT).
    #[inline]
    pub fn get(&self, k: usize) -> Entry {
        let confidence = self.confidence[k];
        let leverage = self.leverage[k];
        Entry {
            time_ms: self.time_ms[k],
            direction: if self.side[k] == 1 {
                Direction::Long
            } else {
                Direction::Short
            },
            confidence: confidence.is_finite().then_some(confidence),
            notional: self.notional_of(k),
            // Beyond u32 saturates, so the leverage check refuses it instead of a wrap
            // accepting it.
            leverage: (leverage > 0).then(|| u32::try_from(leverage).unwrap_or(u32::MAX)),
        }
    }

    fn notional_of(&self, k: usize) -> Option<Decimal> {
        if self.notional.is_empty() {
            return None;
        }
        self.notional
            .binary_search_by_key(&k, |&(row, _)| row)
            .ok()
            .map(|i| self.notional[i].1)
    }

    /// Equal lengths, sides 1 or -1, times sorted ascending, notional rows strictly
    /// increasing inside the columns: one pass over each column.
    fn check(&self, symbol: &str) -> Result<(), CoreError> {
        let n = self.time_ms.len();
        for (name, len) in [
            ("entry_side", self.side.len()),
            ("entry_confidence", self.confidence.len()),
            ("entry_leverage", self.leverage.len()),
        ] {
            if len != n {
                return Err(CoreError::invalid_for(
                    symbol,
                    name,
                    len.to_string(),
                    format!("must have as many values as entry_time ({n})"),
                ));
            }
        }
        // A fold without an early exit: the compiler vectorizes it; the row is sought
        // only when something is wrong.
        let bad_side = self
            .side
            .iter()
            .fold(0u8, |bad, &s| bad | u8::from(s != 1 && s != -1));
        if bad_side != 0 {
            let other = self.side.iter().find(|&&s| s != 1 && s != -1);
            return Err(CoreError::invalid_for(
                symbol,
                "entry_side",
                other.map_or(0, |&s| s).to_string(),
                "must be 1 (LONG) or -1 (SHORT)",
            ));
        }
        if steps::steps(&self.time_ms, i64::MAX, false).0 {
            if let Some(k) = self.time_ms.windows(2).position(|w| w[1] < w[0]) {
                return Err(CoreError::invalid_for(
                    symbol,
                    "entry_time",
                    self.time_ms[k + 1].to_string(),
                    "must be sorted ascending",
                ));
            }
        }
        let mut previous: Option<usize> = None;
        for &(row, _) in &self.notional {
            if row >= n || previous.is_some_and(|p| row <= p) {
                return Err(CoreError::invalid_for(
                    symbol,
                    "entry_notional row",
                    row.to_string(),
                    format!("must be an entry row (below {n}) after the previous one"),
                ));
            }
            previous = Some(row);
        }
        Ok(())
    }
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
    pub entries: Entries<'a>,
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
    /// Replay the decimal way, every mark of the path through the exit state machine
    /// (see "Integers, and the decimal reference"); slower, the reference the tests hold
    /// the default integer replay to.
    pub exhaustive: bool,
    /// The fills and trades as result columns of this form ([`JobOutput::columns`]) instead
    /// of rows; without detail the integer replay writes them as it books.
    pub columns: Option<ColumnForm>,
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
///
/// [`JobOutput::default`] starts with the row buffers an earlier run gave back through
/// [`recycle`] (empty, their capacity kept), so a job's rows go into memory that is already
/// mapped instead of vectors that grow page fault by page fault (see `spare`).
#[derive(Debug, Clone)]
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
    /// Of `evaluations`, those settled as one integer step (a bar that triggers nothing).
    pub quiet_bars: u64,
    /// The job ran the decimal way: asked for (`exhaustive`), or the integers could not
    /// hold it.
    pub decimal: bool,
    /// The fills and trades as columns, when `BacktestOptions::columns` asked for them
    /// (`fills` and `trades` are then empty).
    pub columns: Option<ResultColumns>,
}

static SPARE_FILLS: Spare<Fill> = Spare::new();
static SPARE_TRADES: Spare<Trade> = Spare::new();
static SPARE_STOPS: Spare<(u32, i64, f64)> = Spare::new();

impl Default for JobOutput {
    fn default() -> Self {
        Self {
            series: 0,
            policy: 0,
            fills: SPARE_FILLS.take_largest(),
            trades: SPARE_TRADES.take_largest(),
            stops: SPARE_STOPS.take_largest(),
            levels: Vec::new(),
            skipped: Vec::new(),
            evaluations: 0,
            quiet_bars: 0,
            decimal: false,
            columns: None,
        }
    }
}

static SPARE_BYTES: Spare<u8> = Spare::new();

/// An empty byte buffer with room for `n` bytes, from the pool of [`give_bytes`].
pub fn take_bytes(n: usize) -> Vec<u8> {
    SPARE_BYTES.take(n)
}

/// Keeps a byte buffer no longer read (the exact columns' mantissas once Python dropped
/// them) for a later [`take_bytes`].
pub fn give_bytes(buffer: Vec<u8>) {
    SPARE_BYTES.give(buffer);
}

#[cfg_attr(not(feature = "python"), allow(dead_code))] // the binding's result columns
/// The element types of the result columns, each with its pool of spare vectors: the
/// columns of a run are a dozen megabytes per million bars, which glibc hands back to the
/// system between runs once they are freed, and faults in afresh at the next (a third more
/// time on a hundred series).
pub(crate) trait ColumnElement:
    Copy + Send + Sync + std::panic::RefUnwindSafe + 'static
{
    #[doc(hidden)]
    fn spare() -> &'static Spare<Self>;
}

macro_rules! column_elements {
    ($($element:ty => $pool:ident),*) => {
        $(
            #[cfg_attr(not(feature = "python"), allow(dead_code))]
            static $pool: Spare<$element> = Spare::new();
            impl ColumnElement for $element {
                fn spare() -> &'static Spare<Self> {
                    &$pool
                }
            }
        )*
    };
}

column_elements!(i8 => SPARE_I8, u32 => SPARE_U32, i64 => SPARE_I64, f64 => SPARE_F64);

impl ColumnElement for u8 {
    fn spare() -> &'static Spare<Self> {
        &SPARE_BYTES
    }
}

/// An empty result column with room for `n` values, from its pool.
#[cfg_attr(not(feature = "python"), allow(dead_code))]
pub(crate) fn take_column<T: ColumnElement>(n: usize) -> Vec<T> {
    T::spare().take(n)
}

/// Gives a result column no longer read back to its pool.
#[cfg_attr(not(feature = "python"), allow(dead_code))]
pub(crate) fn give_column<T: ColumnElement>(column: Vec<T>) {
    T::spare().give(column);
}

/// A result column that keeps its vector and gives it back to the pool when dropped (when
/// the last reader, numpy or Arrow, lets go).
#[cfg_attr(not(feature = "python"), allow(dead_code))]
pub(crate) struct PooledColumn<T: ColumnElement>(pub(crate) Vec<T>);

impl<T: ColumnElement> Drop for PooledColumn<T> {
    fn drop(&mut self) {
        give_column(std::mem::take(&mut self.0));
    }
}

/// Gives the row buffers of finished jobs (read, no longer needed) back for the next
/// run's jobs.
pub fn recycle(jobs: Vec<JobOutput>) {
    for job in jobs {
        SPARE_FILLS.give(job.fills);
        SPARE_TRADES.give(job.trades);
        SPARE_STOPS.give(job.stops);
        if let Some(columns) = job.columns {
            columns.give_back();
        }
    }
}

mod columns;
mod exit_api;
mod money;
mod path;
mod prepare;
mod replay;
mod scan;
mod spare;
mod steps;
#[cfg(test)]
mod tests;
mod thresholds;
mod tick_replay;
mod ticks;
mod walk;

/// The nearest `f64` of a decimal, for the float columns of the results (see
/// [`crate::fixed::decimal_to_f64_fast`]).
#[allow(clippy::inline_always)] // see `decimal_to_f64_fast`
#[inline(always)]
pub fn to_f64(value: Decimal) -> f64 {
    crate::fixed::decimal_to_f64_fast(value)
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
    // One series, or one job, runs on the calling thread: handed to the pool it ran on a
    // worker while the caller waited, and in the all-cores benchmark on two cores the dense
    // 1M-bar run took 40-60 ms against 34 ms on one thread (34-35 ms now either way).
    let prepared = if series.len() == 1 {
        vec![prepare(&series[0], rules, &periods, options)?]
    } else {
        series
            .par_iter()
            .map(|s| prepare(s, rules, &periods, options))
            .collect::<Result<Vec<_>, _>>()?
    };
    let jobs: Vec<(usize, usize)> = (0..policies.len())
        .flat_map(|j| (0..prepared.len()).map(move |i| (j, i)))
        .collect();
    let run_one = |&(j, i): &(usize, usize)| {
        let p = &prepared[i];
        let policy = &policies[j];
        let atr = &p.atr[&atr_key(policy)];
        let ticks = (!options.exhaustive)
            .then(|| TickJob::new(p, policy, options, atr, Record::new(i, j)))
            .and_then(|job| job.and_then(TickJob::run).ok());
        let mut out = ticks.unwrap_or_else(|| {
            let mut record = Record::new(i, j);
            record.out.decimal = true;
            Job::new(p, policy, options, atr, record).run()
        });
        if let (Some(form), None) = (options.columns, &out.columns) {
            out.columns = Some(ResultColumns::from_rows(&out.fills, &out.trades, form));
            if !options.detail {
                out.fills.clear();
                out.trades.clear();
            }
        }
        out
    };
    Ok(if jobs.len() == 1 {
        jobs.iter().map(run_one).collect()
    } else {
        jobs.par_iter().map(run_one).collect()
    })
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
