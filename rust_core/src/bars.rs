//! One symbol's OHLC bars built from mark-price updates, bucketed by event time.
//!
//! - An update at event time `E` belongs to the bar opening at
//!   `floor(E / interval) * interval` (the epoch grid klines use).
//! - A bar closes when an update of a later bucket arrives (or [`BarAggregator::advance_to`]
//!   passes its end); the closed bar is reported once, as [`BarEvent::Closed`].
//! - Whole bars without any update are reported as [`BarEvent::Gap`] with their count.
//!   No price is invented for them: a caller that needs a continuous series decides.
//! - An update older than the current bar (or at/before the last closed bar) is ignored
//!   and counted in [`BarAggregator::out_of_order`]. An update inside the current bar but
//!   older than its latest update still widens high/low (it is a real observation) but
//!   does not become the close.
//! - Non-finite prices are ignored and counted in [`BarAggregator::rejected`].

use serde::{Deserialize, Serialize};

use crate::error::CoreError;

/// One OHLC bar.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Bar {
    /// Bucket start, milliseconds since the epoch.
    pub open_time_ms: i64,
    pub open: f64,
    pub high: f64,
    pub low: f64,
    pub close: f64,
    /// Number of updates folded into the bar.
    pub updates: u32,
    /// Event time of the update that set `close`.
    pub last_event_ms: i64,
}

/// What an update (or a clock advance) produced.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum BarEvent {
    /// A bar is complete.
    Closed(Bar),
    /// `missing` whole bars, the first opening at `first_open_time_ms`, had no update.
    Gap {
        first_open_time_ms: i64,
        missing: u64,
    },
}

/// What happened to one update.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpdateOutcome {
    /// Folded into the current bar (possibly after closing earlier ones).
    Applied,
    /// Older than the current bar: ignored.
    OutOfOrder,
    /// Non-finite price: ignored.
    Rejected,
}

/// Builds one symbol's bars of one interval.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BarAggregator {
    interval_ms: i64,
    current: Option<Bar>,
    /// Open time of the last bar known complete (closed here, or the last warm-up bar).
    last_closed_open_ms: Option<i64>,
    out_of_order: u64,
    rejected: u64,
}

impl BarAggregator {
    /// Checks a restored aggregator against a fresh one of the expected interval: same
    /// interval, bar times on the grid and before 2100, prices finite with high >= low.
    ///
    /// # Errors
    /// `CoreError::InvalidField` naming the field.
    pub fn check_compatible(&self, template: &Self) -> Result<(), CoreError> {
        if self.interval_ms != template.interval_ms {
            return Err(CoreError::invalid(
                "interval_ms",
                self.interval_ms.to_string(),
                format!(
                    "must be the policy's bar interval {} ms",
                    template.interval_ms
                ),
            ));
        }
        let time = |field: &str, t: i64, on_grid: bool| {
            if (0..=crate::exit::bounds::MAX_EVENT_MS).contains(&t)
                && (!on_grid || t % self.interval_ms == 0)
            {
                Ok(())
            } else {
                Err(CoreError::invalid(
                    field,
                    t.to_string(),
                    "must be a bar time on the interval grid, in [0, 2100)",
                ))
            }
        };
        if let Some(last) = self.last_closed_open_ms {
            time("last_closed_open_ms", last, true)?;
        }
        if let Some(bar) = &self.current {
            time("current.open_time_ms", bar.open_time_ms, true)?;
            time("current.last_event_ms", bar.last_event_ms, false)?;
            let prices = [bar.open, bar.high, bar.low, bar.close];
            if prices.iter().any(|p| !p.is_finite()) || bar.high < bar.low {
                return Err(CoreError::invalid(
                    "current",
                    format!("{prices:?}"),
                    "must hold finite prices with high >= low",
                ));
            }
        }
        Ok(())
    }

    /// Creates an aggregator for bars of `interval_ms` milliseconds.
    ///
    /// # Errors
    /// `CoreError::InvalidField` unless `interval_ms > 0`.
    pub fn new(interval_ms: i64) -> Result<Self, CoreError> {
        if interval_ms <= 0 {
            return Err(CoreError::invalid(
                "interval_ms",
                interval_ms.to_string(),
                "must be a positive number of milliseconds",
            ));
        }
        Ok(Self {
            interval_ms,
            current: None,
            last_closed_open_ms: None,
            out_of_order: 0,
            rejected: 0,
        })
    }

    /// The bar length in milliseconds.
    pub fn interval_ms(&self) -> i64 {
        self.interval_ms
    }

    /// The bucket start of an event time.
    pub fn bucket_of(&self, event_time_ms: i64) -> i64 {
        event_time_ms.div_euclid(self.interval_ms) * self.interval_ms
    }

    /// Records that the bar opening at `open_time_ms` is already complete (the last
    /// warm-up bar), so the first live bar reports a gap if bars are missing in between
    /// and updates of that bar or earlier are ignored.
    pub fn mark_closed_through(&mut self, open_time_ms: i64) {
        let bucket = self.bucket_of(open_time_ms);
        if self.last_closed_open_ms.is_none_or(|last| bucket > last) {
            self.last_closed_open_ms = Some(bucket);
        }
        if self.current.is_some_and(|bar| bar.open_time_ms <= bucket) {
            self.current = None;
        }
    }

    /// Folds one update in, appending any closed bars and gaps to `events` (oldest first).
    pub fn update(
        &mut self,
        event_time_ms: i64,
        price: f64,
        events: &mut Vec<BarEvent>,
    ) -> UpdateOutcome {
        if !price.is_finite() {
            self.rejected += 1;
            return UpdateOutcome::Rejected;
        }
        // Inside the current bar (always on the grid): its bucket, without a division.
        let bucket = match self.current {
            Some(bar)
                if event_time_ms >= bar.open_time_ms
                    && event_time_ms - bar.open_time_ms < self.interval_ms =>
            {
                bar.open_time_ms
            }
            _ => self.bucket_of(event_time_ms),
        };
        if let Some(bar) = self.current.as_mut() {
            if bucket == bar.open_time_ms {
                bar.high = bar.high.max(price);
                bar.low = bar.low.min(price);
                bar.updates = bar.updates.saturating_add(1);
                if event_time_ms >= bar.last_event_ms {
                    bar.close = price;
                    bar.last_event_ms = event_time_ms;
                }
                return UpdateOutcome::Applied;
            }
            if bucket < bar.open_time_ms {
                self.out_of_order += 1;
                return UpdateOutcome::OutOfOrder;
            }
            let closed = *bar;
            self.close_current(closed, events);
        } else if self.last_closed_open_ms.is_some_and(|last| bucket <= last) {
            self.out_of_order += 1;
            return UpdateOutcome::OutOfOrder;
        }
        self.report_gap_before(bucket, events);
        self.current = Some(Bar {
            open_time_ms: bucket,
            open: price,
            high: price,
            low: price,
            close: price,
            updates: 1,
            last_event_ms: event_time_ms,
        });
        UpdateOutcome::Applied
    }

    /// Closes the current bar if `now_ms` is past its end, and reports whole bars
    /// without updates up to `now_ms` as a gap. Use it on a clock tick when the stream
    /// may be quiet; updates later than `now_ms` are still accepted.
    pub fn advance_to(&mut self, now_ms: i64, events: &mut Vec<BarEvent>) {
        let now_bucket = self.bucket_of(now_ms);
        if let Some(bar) = self.current {
            if now_bucket > bar.open_time_ms {
                self.close_current(bar, events);
            }
        }
        if self.current.is_none() {
            // Bars strictly before the bucket in progress that got nothing.
            if let Some(last) = self.last_closed_open_ms {
                let first = last + self.interval_ms;
                if now_bucket > first {
                    let missing = ((now_bucket - first) / self.interval_ms) as u64;
                    events.push(BarEvent::Gap {
                        first_open_time_ms: first,
                        missing,
                    });
                    self.last_closed_open_ms = Some(now_bucket - self.interval_ms);
                }
            }
        }
    }

    fn close_current(&mut self, bar: Bar, events: &mut Vec<BarEvent>) {
        events.push(BarEvent::Closed(bar));
        self.last_closed_open_ms = Some(bar.open_time_ms);
        self.current = None;
    }

    fn report_gap_before(&mut self, bucket: i64, events: &mut Vec<BarEvent>) {
        if let Some(last) = self.last_closed_open_ms {
            let first = last + self.interval_ms;
            if bucket > first {
                events.push(BarEvent::Gap {
                    first_open_time_ms: first,
                    missing: ((bucket - first) / self.interval_ms) as u64,
                });
            }
        }
    }

    /// The bar in progress, if any.
    pub fn current(&self) -> Option<&Bar> {
        self.current.as_ref()
    }

    /// Open time of the last bar accounted for (closed here, reported in a gap, or marked by warm-up).
    pub fn last_closed_open_ms(&self) -> Option<i64> {
        self.last_closed_open_ms
    }

    /// Updates ignored because they were older than the current bar.
    pub fn out_of_order(&self) -> u64 {
        self.out_of_order
    }

    /// Updates ignored because their price was not finite.
    pub fn rejected(&self) -> u64 {
        self.rejected
    }
}

#[cfg(test)]
#[allow(clippy::float_cmp)] // exact equality is what these tests check
mod tests {
    use super::*;

    const MIN: i64 = 60_000;

    fn closed(events: &[BarEvent]) -> Vec<Bar> {
        events
            .iter()
            .filter_map(|e| match e {
                BarEvent::Closed(b) => Some(*b),
                BarEvent::Gap { .. } => None,
            })
            .collect()
    }

    #[test]
    fn builds_ohlc_by_event_time() {
        let mut agg = BarAggregator::new(MIN).unwrap();
        let mut ev = Vec::new();
        agg.update(5_000, 10.0, &mut ev);
        agg.update(20_000, 12.0, &mut ev);
        agg.update(40_000, 9.0, &mut ev);
        agg.update(59_999, 11.0, &mut ev);
        assert!(ev.is_empty());
        agg.update(60_000, 11.5, &mut ev);
        let bars = closed(&ev);
        assert_eq!(bars.len(), 1);
        let b = bars[0];
        assert_eq!(
            (b.open_time_ms, b.open, b.high, b.low, b.close, b.updates),
            (0, 10.0, 12.0, 9.0, 11.0, 4)
        );
        assert_eq!(agg.current().unwrap().open, 11.5);
    }

    #[test]
    fn reports_gaps_without_inventing_prices() {
        let mut agg = BarAggregator::new(MIN).unwrap();
        let mut ev = Vec::new();
        agg.update(1_000, 10.0, &mut ev);
        agg.update(3 * MIN + 5, 13.0, &mut ev);
        assert_eq!(ev.len(), 2);
        assert!(matches!(ev[0], BarEvent::Closed(b) if b.open_time_ms == 0));
        assert_eq!(
            ev[1],
            BarEvent::Gap {
                first_open_time_ms: MIN,
                missing: 2
            }
        );
    }

    #[test]
    fn ignores_and_counts_out_of_order_updates() {
        let mut agg = BarAggregator::new(MIN).unwrap();
        let mut ev = Vec::new();
        agg.update(MIN + 10, 10.0, &mut ev);
        assert_eq!(
            agg.update(MIN - 1, 99.0, &mut ev),
            UpdateOutcome::OutOfOrder
        );
        // Late inside the bar: widens the range, not the close.
        agg.update(MIN + 30, 11.0, &mut ev);
        assert_eq!(agg.update(MIN + 20, 8.0, &mut ev), UpdateOutcome::Applied);
        let bar = *agg.current().unwrap();
        assert_eq!((bar.low, bar.close), (8.0, 11.0));
        assert_eq!(agg.out_of_order(), 1);
        assert_eq!(
            agg.update(MIN + 40, f64::NAN, &mut ev),
            UpdateOutcome::Rejected
        );
        assert_eq!(agg.rejected(), 1);
        // After closing, updates of the closed bar are out of order too.
        agg.update(2 * MIN, 12.0, &mut ev);
        assert_eq!(
            agg.update(MIN + 50, 1.0, &mut ev),
            UpdateOutcome::OutOfOrder
        );
    }

    #[test]
    fn warm_up_boundary_and_clock_advance() {
        let mut agg = BarAggregator::new(MIN).unwrap();
        let mut ev = Vec::new();
        agg.mark_closed_through(4 * MIN);
        assert_eq!(
            agg.update(4 * MIN + 1, 1.0, &mut ev),
            UpdateOutcome::OutOfOrder
        );
        agg.update(7 * MIN + 1, 1.0, &mut ev);
        assert_eq!(
            ev,
            vec![BarEvent::Gap {
                first_open_time_ms: 5 * MIN,
                missing: 2
            }]
        );
        ev.clear();
        agg.advance_to(7 * MIN + 59_999, &mut ev);
        assert!(ev.is_empty());
        agg.advance_to(10 * MIN + 1, &mut ev);
        assert_eq!(ev.len(), 2);
        assert!(matches!(ev[0], BarEvent::Closed(b) if b.open_time_ms == 7 * MIN));
        assert_eq!(
            ev[1],
            BarEvent::Gap {
                first_open_time_ms: 8 * MIN,
                missing: 2
            }
        );
        ev.clear();
        // The gap is not reported twice.
        agg.update(10 * MIN + 2, 2.0, &mut ev);
        assert!(ev.is_empty());
    }

    #[test]
    fn rejects_bad_interval_and_round_trips() {
        assert!(BarAggregator::new(0).is_err());
        let mut agg = BarAggregator::new(MIN).unwrap();
        agg.update(1, 1.0, &mut Vec::new());
        let json = serde_json::to_string(&agg).unwrap();
        assert_eq!(serde_json::from_str::<BarAggregator>(&json).unwrap(), agg);
    }
}
