//! What both replays (the integer one in `tick_replay`, the decimal reference in `replay`)
//! share: the walk over segments and bars with each bar's entries before its marks, the
//! sizing of an entry, the skip records, and the trade and fill records' common parts.
//!
//! May not touch: any position's state; a replay decides its exits itself.

use crate::fixed::Decimal;
use crate::rules::SymbolRules;

use super::prepare::Prepared;
use super::{
    BacktestOptions, Direction, Entries, Entry, Fill, JobOutput, BELOW_MIN_NOTIONAL, BELOW_MIN_QTY,
    DATA_GAP, END_OF_DATA, ENTRY, NO_BAR, POSITION_OPEN,
};

/// A job's output and its counted skips.
pub(super) struct Record {
    pub(super) out: JobOutput,
    position_open_skips: u32,
}

impl Record {
    pub(super) fn new(series: usize, policy: usize) -> Self {
        Self {
            out: JobOutput {
                series: series as u32,
                policy: policy as u32,
                ..JobOutput::default()
            },
            position_open_skips: 0,
        }
    }

    pub(super) fn skip(&mut self, time_ms: i64, reason: u8) {
        if reason == POSITION_OPEN {
            // Counted, not listed: a signal rule repeats itself on every bar of a position.
            self.position_open_skips += 1;
        } else {
            self.out.skipped.push((time_ms, reason, 1));
        }
    }

    /// Counts `count` entries refused as `position_open` (see [`Record::skip`]).
    pub(super) fn skip_open(&mut self, count: usize) {
        let count = u32::try_from(count).unwrap_or(u32::MAX);
        self.position_open_skips = self.position_open_skips.saturating_add(count);
    }

    pub(super) fn finish(mut self) -> JobOutput {
        if self.position_open_skips > 0 {
            self.out
                .skipped
                .push((0, POSITION_OPEN, self.position_open_skips));
        }
        self.out
    }
}

/// The entry fill of `trade` (sequence 0, no trigger, no move from the entry).
pub(super) fn entry_fill(
    trade: u32,
    time_ms: i64,
    direction: Direction,
    price: Decimal,
    quantity: Decimal,
    fee: Decimal,
    pnl: Decimal,
) -> Fill {
    Fill {
        trade,
        sequence: 0,
        reason: ENTRY,
        time_ms,
        direction,
        price,
        quantity,
        fee,
        pnl,
        r: 0.0,
        trigger: None,
    }
}

/// The entry's fee rate.
pub(super) fn entry_rate(options: &BacktestOptions) -> Decimal {
    if options.entry_maker {
        options.maker_fee
    } else {
        options.taker_fee
    }
}

/// The quantity of an entry at `price`: its notional over the price, floored to the
/// `MARKET_LOT_SIZE` step; the skip reason when that is below `minQty` or `MIN_NOTIONAL`.
pub(super) fn entry_quantity(
    rules: &SymbolRules,
    options: &BacktestOptions,
    entry: &Entry,
    price: Decimal,
) -> Result<Decimal, u8> {
    let notional = entry.notional.unwrap_or(options.notional);
    let quantity = rules.quantize_qty(notional / price, true);
    if quantity <= Decimal::ZERO || quantity < rules.min_qty(true) {
        return Err(BELOW_MIN_QTY);
    }
    if quantity * price < rules.min_notional() {
        return Err(BELOW_MIN_NOTIONAL);
    }
    Ok(quantity)
}

/// How many of the sorted `times` are at most `last`: a galloping search from the front
/// (the entries due are about as many as the bars settled, a dozen or so: a binary search
/// over all the entries left would miss the cache at every step, and a linear count pays
/// a compare per entry and a mispredicted exit).
fn count_due(times: &[i64], last: i64) -> usize {
    let mut end = 1;
    while end < times.len() && times[end - 1] <= last {
        end *= 2;
    }
    let end = end.min(times.len());
    let start = end / 2;
    start + times[start..end].partition_point(|&t| t <= last)
}

/// Records the entries due at the bars opening at `times` (from entry `e` on) as refused:
/// `no_bar` for one that fell into a gap, else `position_open`; returns the next entry.
/// `gapless`: the series has no gap (no need to look for one among `times`).
fn refuse_entries(
    record: &mut Record,
    entries: &Entries<'_>,
    mut e: usize,
    times: &[i64],
    interval: i64,
    gapless: bool,
) -> usize {
    let Some(&last) = times.last() else {
        return e;
    };
    let due = count_due(&entries.time_ms[e..], last);
    // No two bars more than an interval apart, and the first less than an interval after
    // the earliest entry due: every entry due has a bar and meets the open position (the
    // common case, a signal on every bar), so they are counted without a bar search.
    if due > 0
        && times[0] - entries.time_ms(e) < interval
        && (gapless || times.windows(2).all(|w| w[1] - w[0] <= interval))
    {
        record.skip_open(due);
        return e + due;
    }
    let mut bar = 0;
    while e < entries.len() && entries.time_ms(e) <= last {
        let time_ms = entries.time_ms(e);
        e += 1;
        while times[bar] < time_ms {
            bar += 1;
        }
        let reason = if times[bar] - time_ms >= interval {
            NO_BAR
        } else {
            POSITION_OPEN
        };
        record.skip(time_ms, reason);
    }
    e
}

/// One replay of a (series, policy) job, driven by [`walk`].
pub(super) trait Replay {
    type Error;
    fn record(&mut self) -> &mut Record;
    /// Opens a position for `entry` at the open of bar `i` (no open position refuses
    /// it: see [`walk`]), or records why not.
    fn enter(&mut self, entry: &Entry, i: usize) -> Result<(), Self::Error>;
    fn has_open(&self) -> bool;
    /// A position is open on `direction`'s side.
    fn holds(&self, direction: Direction) -> bool;
    /// Bar `i` for every open position.
    fn bar(&mut self, i: usize) -> Result<(), Self::Error>;
    /// Closes every open position at the close of bar `i` for `reason`.
    fn close_all(&mut self, i: usize, reason: u8) -> Result<(), Self::Error>;
    /// Settles bars `i..end` in one sweep for as long as each is a quiet bar for the open
    /// position and every entry due (from entry `next_entry` on) would be refused
    /// (`position_open`); returns how many it settled, 0 when it takes no sweep (the
    /// decimal replay never does).
    fn quiet_run(&mut self, _i: usize, _end: usize, _next_entry: usize) -> usize {
        0
    }
}

/// Walks the segments of `p` in order: at each bar the entries due (those that fall in a
/// gap or outside the data are skipped as `no_bar`; one meeting an open position on its
/// side, or any open position with `one_position_per_symbol`, as `position_open`), then
/// the bar for the open positions;
/// at each segment's end the positions still open close (`data_gap`, `end_of_data`).
#[allow(clippy::needless_range_loop)] // `i` addresses several parallel bar arrays
pub(super) fn walk<R: Replay>(
    job: &mut R,
    p: &Prepared<'_>,
    options: &BacktestOptions,
) -> Result<(), R::Error> {
    let times = &p.input.bars.open_time;
    let interval = p.input.interval_ms;
    let entries = &p.input.entries;
    let mut e = 0;
    for (segment, &(start, end)) in p.segments.iter().enumerate() {
        let mut i = start;
        while i < end {
            let t = times[i];
            while e < entries.len() && entries.time_ms(e) <= t {
                let entry = &entries.get(e);
                e += 1;
                if t - entry.time_ms >= interval {
                    job.record().skip(entry.time_ms, NO_BAR);
                } else if job.has_open()
                    && (options.one_position_per_symbol || job.holds(entry.direction))
                {
                    job.record().skip(entry.time_ms, POSITION_OPEN);
                } else {
                    job.enter(entry, i)?;
                }
            }
            if job.has_open() {
                job.bar(i)?;
            }
            i += 1;
            if i < end && job.has_open() {
                let settled = job.quiet_run(i, end, e);
                if settled > 0 {
                    let times = &times[i..i + settled];
                    e = refuse_entries(job.record(), entries, e, times, interval, p.gapless);
                    i += settled;
                }
            }
        }
        let last = segment + 1 == p.segments.len();
        job.close_all(end - 1, if last { END_OF_DATA } else { DATA_GAP })?;
    }
    for &time_ms in &entries.time_ms[e..] {
        job.record().out.skipped.push((time_ms, NO_BAR, 1));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    proptest::proptest! {
        /// The galloping count is the linear one, for every cut of a sorted list.
        #[test]
        fn count_due_is_the_linear_count(
            mut times in proptest::collection::vec(-50i64..50, 0..80),
            last in -60i64..60,
        ) {
            times.sort_unstable();
            let linear = times.iter().take_while(|&&t| t <= last).count();
            proptest::prop_assert_eq!(super::count_due(&times, last), linear);
        }
    }
}
