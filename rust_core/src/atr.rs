//! Wilder's Average True Range, defined exactly as TA-Lib's `TA_ATR`.
//!
//! - True range of bar `t >= 1`: the greatest of `high - low`, `|close[t-1] - high|` and
//!   `|close[t-1] - low|` (bar 0 has no previous close, so no true range).
//! - The first ATR, at index `period`, is the simple mean of the true ranges of bars
//!   `1..=period`, summed left to right from `0.0` and divided by `period`.
//! - Afterwards `atr = (atr * (period - 1) + tr) / period`, in that operation order.
//! - Indices below `period` are NaN. Like the `talib` Python wrapper, leading bars where
//!   any of high/low/close is NaN are skipped first and shift the prefix; a NaN after the
//!   first complete bar propagates, as in TA-Lib.
//! - `period == 1` gives the true range itself (TA-Lib returns `TRANGE`).
//!
//! [`WilderAtr`] (incremental, one closed bar at a time) and [`atr_batch`] perform the
//! same floating-point operations in the same order, so they agree bit for bit.

use serde::{Deserialize, Serialize};

use crate::error::CoreError;

/// Largest period accepted: TA-Lib's own bound for `optInTimePeriod`.
pub const MAX_PERIOD: usize = 100_000;

/// Incremental Wilder ATR over closed bars, oldest first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WilderAtr {
    period: usize,
    prev_close: Option<f64>,
    /// True ranges seen while seeding (saturates at `period`).
    seeded: usize,
    /// Running left-to-right sum of the seeding true ranges.
    seed_sum: f64,
    value: Option<f64>,
}

impl WilderAtr {
    /// Creates an ATR over `period` bars.
    ///
    /// # Errors
    /// `CoreError::InvalidField` unless `1 <= period <= 100000` (TA-Lib's range).
    pub fn new(period: usize) -> Result<Self, CoreError> {
        check_period(period)?;
        Ok(Self {
            period,
            prev_close: None,
            seeded: 0,
            seed_sum: 0.0,
            value: None,
        })
    }

    /// The period in bars.
    pub fn period(&self) -> usize {
        self.period
    }

    /// Feeds one closed bar and returns the ATR once `period` true ranges have been seen
    /// (that is, from the `period + 1`-th bar on), `None` before.
    ///
    /// Bars with a NaN field before the first complete bar are skipped, as TA-Lib's
    /// wrapper skips a NaN prefix.
    pub fn update(&mut self, high: f64, low: f64, close: f64) -> Option<f64> {
        let Some(prev_close) = self.prev_close else {
            if !(high.is_nan() || low.is_nan() || close.is_nan()) {
                self.prev_close = Some(close);
            }
            return None;
        };
        let tr = true_range(high, low, prev_close);
        self.prev_close = Some(close);
        let next = if let Some(atr) = self.value {
            smooth(atr, tr, self.period)
        } else {
            self.seed_sum += tr;
            self.seeded += 1;
            if self.seeded < self.period {
                return None;
            }
            self.seed_sum / self.period as f64
        };
        self.value = Some(next);
        self.value
    }

    /// The current ATR, `None` until ready.
    pub fn value(&self) -> Option<f64> {
        self.value
    }

    /// Whether the ATR has a value.
    pub fn is_ready(&self) -> bool {
        self.value.is_some()
    }

    /// The close of the last bar fed, if any.
    pub fn last_close(&self) -> Option<f64> {
        self.prev_close
    }
}

/// TA-Lib's `TRANGE` for one bar, with its comparison order (so NaN behaves the same).
#[inline]
fn true_range(high: f64, low: f64, prev_close: f64) -> f64 {
    let mut greatest = high - low;
    let up = (prev_close - high).abs();
    if up > greatest {
        greatest = up;
    }
    let down = (prev_close - low).abs();
    if down > greatest {
        greatest = down;
    }
    greatest
}

#[inline]
fn smooth(atr: f64, tr: f64, period: usize) -> f64 {
    let mut next = atr * (period - 1) as f64;
    next += tr;
    next / period as f64
}

fn check_period(period: usize) -> Result<(), CoreError> {
    if (1..=MAX_PERIOD).contains(&period) {
        Ok(())
    } else {
        Err(CoreError::invalid(
            "period",
            period.to_string(),
            format!("must be between 1 and {MAX_PERIOD} bars"),
        ))
    }
}

/// Computes the ATR of whole arrays, identical to `talib.ATR(high, low, close, period)`.
///
/// # Errors
/// `CoreError::InvalidField` when the arrays differ in length or the period is outside
/// `1..=100000`. Series too short for one value give all NaN, as TA-Lib does.
pub fn atr_batch(
    high: &[f64],
    low: &[f64],
    close: &[f64],
    period: usize,
) -> Result<Vec<f64>, CoreError> {
    let mut out = vec![f64::NAN; high.len()];
    atr_into(high, low, close, period, &mut out)?;
    Ok(out)
}

/// Like [`atr_batch`], writing into `out` (same length as the inputs).
///
/// # Errors
/// As [`atr_batch`], plus `out` of the wrong length.
pub fn atr_into(
    high: &[f64],
    low: &[f64],
    close: &[f64],
    period: usize,
    out: &mut [f64],
) -> Result<(), CoreError> {
    check_period(period)?;
    let n = high.len();
    for (name, len) in [
        ("low", low.len()),
        ("close", close.len()),
        ("output", out.len()),
    ] {
        if len != n {
            return Err(CoreError::invalid(
                format!("length of {name}"),
                len.to_string(),
                format!("must equal the length of high ({n})"),
            ));
        }
    }
    out.fill(f64::NAN);
    let Some(begin) = (0..n).find(|&i| !(high[i].is_nan() || low[i].is_nan() || close[i].is_nan()))
    else {
        return Ok(());
    };
    if n - begin <= period {
        return Ok(());
    }
    let (high, low, close) = (&high[begin..], &low[begin..], &close[begin..]);
    let out = &mut out[begin..];

    let mut sum = 0.0;
    for t in 1..=period {
        sum += true_range(high[t], low[t], close[t - 1]);
    }
    let mut atr = sum / period as f64;
    out[period] = atr;
    // Zipped slices let the compiler drop bounds checks on the hot loop.
    let rest = out[period + 1..]
        .iter_mut()
        .zip(&high[period + 1..])
        .zip(&low[period + 1..])
        .zip(&close[period..]);
    for (((slot, &h), &l), &prev_close) in rest {
        atr = smooth(atr, true_range(h, l, prev_close), period);
        *slot = atr;
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::float_cmp)] // exact equality is what these tests check
mod tests {
    use super::*;

    // A short reference computed by hand with TA-Lib's formula (period 3).
    const HIGH: [f64; 6] = [10.0, 11.0, 12.0, 11.5, 13.0, 12.0];
    const LOW: [f64; 6] = [9.0, 9.5, 10.5, 10.0, 11.0, 10.5];
    const CLOSE: [f64; 6] = [9.5, 10.5, 11.0, 11.0, 12.5, 11.0];

    #[test]
    fn seeds_with_the_mean_then_smooths() {
        let out = atr_batch(&HIGH, &LOW, &CLOSE, 3).unwrap();
        assert!(out[..3].iter().all(|v| v.is_nan()));
        // TR[1..=3] = 1.5, 1.5, 1.5 -> seed 1.5; TR[4] = max(2, 2, 0) = 2; TR[5] = max(1.5, .5, 2) = 2
        assert_eq!(out[3], (0.0 + 1.5 + 1.5 + 1.5) / 3.0);
        let a4 = (out[3] * 2.0 + 2.0) / 3.0;
        assert_eq!(out[4], a4);
        assert_eq!(out[5], (a4 * 2.0 + 2.0) / 3.0);
    }

    #[test]
    fn incremental_matches_batch_bit_for_bit() {
        let n = 500;
        let mut high = Vec::with_capacity(n);
        let mut low = Vec::with_capacity(n);
        let mut close = Vec::with_capacity(n);
        let mut price = 100.0_f64;
        for i in 0..n {
            let wiggle = ((i * 7919) % 113) as f64 / 37.0 - 1.4;
            price += wiggle;
            high.push(price + 0.3 + (i % 5) as f64 * 0.07);
            low.push(price - 0.2 - (i % 3) as f64 * 0.05);
            close.push(price + 0.01 * (i % 7) as f64);
        }
        for period in [1, 2, 14, 50] {
            let batch = atr_batch(&high, &low, &close, period).unwrap();
            let mut inc = WilderAtr::new(period).unwrap();
            for i in 0..n {
                let v = inc.update(high[i], low[i], close[i]);
                match v {
                    None => assert!(batch[i].is_nan(), "period {period} index {i}"),
                    Some(v) => {
                        assert_eq!(v.to_bits(), batch[i].to_bits(), "period {period} index {i}");
                    }
                }
            }
        }
    }

    #[test]
    fn period_one_is_the_true_range() {
        let out = atr_batch(&HIGH, &LOW, &CLOSE, 1).unwrap();
        assert!(out[0].is_nan());
        assert_eq!(out[1], 1.5);
        assert_eq!(out[5], 2.0);
    }

    #[test]
    fn leading_nans_shift_the_prefix() {
        let mut high = vec![f64::NAN];
        high.extend(HIGH);
        let mut low = vec![1.0];
        low.extend(LOW);
        let mut close = vec![1.0];
        close.extend(CLOSE);
        let shifted = atr_batch(&high, &low, &close, 3).unwrap();
        let plain = atr_batch(&HIGH, &LOW, &CLOSE, 3).unwrap();
        assert!(shifted[..4].iter().all(|v| v.is_nan()));
        assert_eq!(&shifted[4..], &plain[3..]);
        let mut inc = WilderAtr::new(3).unwrap();
        let last = (0..high.len())
            .map(|i| inc.update(high[i], low[i], close[i]))
            .last();
        assert_eq!(last.flatten(), Some(plain[5]));
    }

    #[test]
    fn short_series_are_all_nan() {
        let out = atr_batch(&HIGH[..3], &LOW[..3], &CLOSE[..3], 3).unwrap();
        assert!(out.iter().all(|v| v.is_nan()));
        assert!(atr_batch(&[], &[], &[], 14).unwrap().is_empty());
    }

    #[test]
    fn rejects_bad_lengths_and_periods() {
        let err = atr_batch(&HIGH, &LOW[..5], &CLOSE, 3).unwrap_err();
        assert_eq!(
            err.to_string(),
            "length of low 5 must equal the length of high (6)"
        );
        let err = atr_batch(&HIGH, &LOW, &CLOSE, 0).unwrap_err();
        assert_eq!(
            err.to_string(),
            "period 0 must be between 1 and 100000 bars"
        );
        assert!(WilderAtr::new(100_001).is_err());
    }

    #[test]
    fn state_round_trips_through_serde() {
        let mut atr = WilderAtr::new(3).unwrap();
        for i in 0..4 {
            atr.update(HIGH[i], LOW[i], CLOSE[i]);
        }
        let json = serde_json::to_string(&atr).unwrap();
        let mut back: WilderAtr = serde_json::from_str(&json).unwrap();
        assert_eq!(back, atr);
        assert_eq!(
            back.update(HIGH[4], LOW[4], CLOSE[4]),
            atr.update(HIGH[4], LOW[4], CLOSE[4])
        );
    }
}
