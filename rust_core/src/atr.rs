//! Wilder's Average True Range, defined exactly as TA-Lib's `TA_ATR`.
//!
//! - True range of bar `t >= 1`: the greatest of `high - low`, `|close[t-1] - high|` and
//!   `|close[t-1] - low|` (bar 0 has no previous close, so no true range).
//! - The first ATR, at index `period`, is the simple mean of the true ranges of bars
//!   `1..=period`, summed left to right from `0.0` and divided by `period`.
//! - Afterwards Wilder's smoothing `atr = (atr * (period - 1) + tr) / period`, evaluated
//!   as one fused multiply-add `fma(atr, (period - 1) / period, tr * (1 / period))`: the
//!   same quantity with one rounding fewer, and no division on the serial dependency
//!   chain, which is what bounds the speed of an ATR (TA-Lib 0.8 itself does not use the
//!   division form: neither form is bit-identical to it; both agree to ~1e-15 relative).
//! - Indices below `period` are NaN. Like the `talib` Python wrapper, leading bars where
//!   any of high/low/close is NaN are skipped first and shift the prefix; a NaN after the
//!   first complete bar propagates, as in TA-Lib.
//! - `period == 1` gives the true range itself (TA-Lib returns `TRANGE`).
//!
//! [`WilderAtr`] (incremental, one closed bar at a time) and [`atr_batch`] perform the
//! same floating-point operations in the same order, so they agree bit for bit. A fused
//! multiply-add is exactly specified (IEEE 754 `fusedMultiplyAdd`), so the hardware FMA
//! the batch uses when the CPU has it and the software one give the same bits.

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
    /// Checks a restored ATR against a fresh one of the expected period: same period,
    /// seeding count within it, every number finite and not negative.
    ///
    /// # Errors
    /// `CoreError::InvalidField` naming the field.
    pub fn check_compatible(&self, template: &Self) -> Result<(), CoreError> {
        if self.period != template.period {
            return Err(CoreError::invalid(
                "period",
                self.period.to_string(),
                format!("must be the policy's atr_period {}", template.period),
            ));
        }
        if self.seeded > self.period {
            return Err(CoreError::invalid(
                "seeded",
                self.seeded.to_string(),
                format!("must be at most the period {}", self.period),
            ));
        }
        let fine = |v: f64| v.is_finite() && v >= 0.0;
        for (field, value) in [
            ("prev_close", self.prev_close),
            ("seed_sum", Some(self.seed_sum)),
            ("value", self.value),
        ] {
            if let Some(v) = value.filter(|v| !fine(*v)) {
                return Err(CoreError::invalid(
                    field,
                    v.to_string(),
                    "must be a finite number >= 0",
                ));
            }
        }
        Ok(())
    }

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
            smooth(atr, tr, Weights::new(self.period))
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

/// Wilder's weights for a period: the share kept and the share of the new true range.
#[derive(Clone, Copy)]
struct Weights {
    keep: f64,
    add: f64,
}

impl Weights {
    fn new(period: usize) -> Self {
        Self {
            keep: (period - 1) as f64 / period as f64,
            add: 1.0 / period as f64,
        }
    }
}

// Inlined into the FMA-enabled loop, where `mul_add` becomes one instruction.
#[allow(clippy::inline_always)]
#[inline(always)]
fn smooth(atr: f64, tr: f64, w: Weights) -> f64 {
    atr.mul_add(w.keep, tr * w.add)
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
    let mut out = Vec::with_capacity(high.len());
    atr_extend(high, low, close, period, &mut out)?;
    Ok(out)
}

/// [`atr_batch`] appended to `out` (one value per bar), for a caller that fills one buffer
/// piece by piece: the backtest's ATR before each bar, segment after segment.
///
/// # Errors
/// As [`atr_batch`]; `out` is unchanged then.
pub fn atr_extend(
    high: &[f64],
    low: &[f64],
    close: &[f64],
    period: usize,
    out: &mut Vec<f64>,
) -> Result<(), CoreError> {
    check_period(period)?;
    let n = high.len();
    for (name, len) in [("low", low.len()), ("close", close.len())] {
        if len != n {
            return Err(CoreError::invalid(
                format!("length of {name}"),
                len.to_string(),
                format!("must equal the length of high ({n})"),
            ));
        }
    }
    let end = out.len() + n;
    let begin = (0..n).find(|&i| !(high[i].is_nan() || low[i].is_nan() || close[i].is_nan()));
    let Some(begin) = begin.filter(|&b| n - b > period) else {
        out.resize(end, f64::NAN);
        return Ok(());
    };
    // Built by appending, so each slot is written once and no zeroing pass runs first
    // (an 8 MB zeroed buffer costs as much as a tenth of the whole computation).
    out.reserve(n);
    out.resize(out.len() + begin + period, f64::NAN);
    let (high, low, close) = (&high[begin..], &low[begin..], &close[begin..]);
    let mut sum = 0.0;
    for t in 1..=period {
        sum += true_range(high[t], low[t], close[t - 1]);
    }
    let atr = sum / period as f64;
    out.push(atr);
    smooth_rest(
        &high[period + 1..],
        &low[period + 1..],
        &close[period..],
        out,
        atr,
        Weights::new(period),
    );
    debug_assert_eq!(out.len(), end);
    Ok(())
}

/// Appends the smoothed values after the seed: `close` starts one bar earlier than the
/// others.
fn smooth_rest(high: &[f64], low: &[f64], close: &[f64], out: &mut Vec<f64>, atr: f64, w: Weights) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: `smooth_rest_fma` only requires the FMA extension, detected just above.
        #[allow(unsafe_code)] // the one way to call a `target_feature` function after detection
        unsafe {
            smooth_rest_fma(high, low, close, out, atr, w);
        }
        return;
    }
    smooth_loop(high, low, close, out, atr, w);
}

/// The same loop compiled with FMA enabled, so `mul_add` is one instruction instead of a
/// call to the C library's `fma` (same result either way).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "fma")]
fn smooth_rest_fma(
    high: &[f64],
    low: &[f64],
    close: &[f64],
    out: &mut Vec<f64>,
    atr: f64,
    w: Weights,
) {
    smooth_loop(high, low, close, out, atr, w);
}

// Must be inlined into `smooth_rest_fma` to be compiled with FMA enabled.
#[allow(clippy::inline_always)]
#[inline(always)]
fn smooth_loop(
    high: &[f64],
    low: &[f64],
    close: &[f64],
    out: &mut Vec<f64>,
    mut atr: f64,
    w: Weights,
) {
    // A zipped slice iterator has an exact length: `extend` reserves once and the loop
    // runs without bounds or capacity checks.
    out.extend(
        high.iter()
            .zip(low)
            .zip(close)
            .map(|((&h, &l), &prev_close)| {
                atr = smooth(atr, true_range(h, l, prev_close), w);
                atr
            }),
    );
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
        let (keep, add) = (2.0 / 3.0, 1.0 / 3.0);
        let a4 = f64::mul_add(out[3], keep, 2.0 * add);
        assert_eq!(out[4], a4);
        assert_eq!(out[5], f64::mul_add(a4, keep, 2.0 * add));
        // The same quantity as Wilder's division form, to the last bits.
        assert!((out[5] - ((out[4] * 2.0 + 2.0) / 3.0)).abs() < 1e-15);
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
