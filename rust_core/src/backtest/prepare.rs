//! Preparation of a series, once for every policy: prices onto the symbol's tick grid as
//! integer ticks ([`Grid`]), segments split at data gaps, the fine bars that cover each
//! bar, the plausible price band, and the ATR before each bar per (period, interval).
//!
//! May not touch: positions, fills or any exit rule; the result is read-only for the
//! replay and shared by all policies.

use std::collections::HashMap;

use crate::atr::WilderAtr;
use crate::error::CoreError;
use crate::fixed::{
    decimal_from_f64, decimal_to_f64, mantissa_at, short_decimal_from_f64, Decimal, Rounding,
};
use crate::rules::{ExchangeRules, SymbolRules};

use super::spare::Spare;
use super::{BacktestOptions, Bars, SeriesInput};

/// Bar ticks and ATR values of finished runs, for the next run (see `spare`).
static SPARE_TICKS: Spare<[i32; 4]> = Spare::new();
static SPARE_FLOATS: Spare<f64> = Spare::new();

/// Each bar's four prices: open, high, low, close.
fn rows<'b>(bars: &'b Bars<'_>) -> impl Iterator<Item = [f64; 4]> + 'b {
    bars.open
        .iter()
        .zip(bars.high.iter())
        .zip(bars.low.iter())
        .zip(bars.close.iter())
        .map(|(((&open, &high), &low), &close)| [open, high, low, close])
}

/// A series with its prices on the tick grid and its segments, shared by every policy.
pub(super) struct Prepared<'a> {
    pub(super) input: &'a SeriesInput<'a>,
    pub(super) rules: &'a SymbolRules,
    pub(super) grid: Grid,
    /// Open, high, low and close of every bar, as grid ticks.
    pub(super) bars: BarTicks,
    /// Half-open bar index ranges without a gap longer than `max_gap_bars`.
    pub(super) segments: Vec<(usize, usize)>,
    /// No bar opens more than an interval after the previous one (no gap at all).
    pub(super) gapless: bool,
    /// For each bar, the range of fine bars that cover it completely, if any (empty
    /// without fine data).
    pub(super) fine: Vec<Option<(usize, usize)>>,
    /// The fine bars as grid ticks (`None` without fine data).
    pub(super) fine_bars: Option<BarTicks>,
    /// The plausible price band as ticks (see [`Grid::plausible_ticks`]); `None`: every
    /// mark is fed.
    pub(super) band: Option<(i64, i64)>,
    /// ATR before each bar (closed bars of its segment only; NaN: not ready yet), per
    /// (period, ATR interval). Prices are finite (they are on the grid), so NaN is free.
    pub(super) atr: HashMap<(usize, i64), Vec<f64>>,
}

impl Drop for Prepared<'_> {
    /// The large buffers go back to the spares, pages and all, for the next run.
    fn drop(&mut self) {
        for (_, values) in self.atr.drain() {
            SPARE_FLOATS.give(values);
        }
    }
}

/// Each bar's open, high, low and close as grid ticks, in 32 bits: every tick the floats
/// settle lies within 2^30 of the grid's base (see [`MAX_FLOAT_TICKS`]), and so does nearly
/// every other; a bar with a tick beyond 32 bits is kept aside with its 64-bit ticks.
///
/// Why 32 bits: a dense run is bound by memory in the tick conversion and the quiet
/// sweep, and half the bytes a bar is what they read and write.
pub(super) struct BarTicks {
    ticks: Vec<[i32; 4]>,
    /// The bars with a tick beyond 32 bits, by index, with their ticks (their row in
    /// `ticks` is not read).
    wide: Vec<(usize, [i64; 4])>,
}

impl Drop for BarTicks {
    /// The buffer goes back to the spares, pages and all, for the next run.
    fn drop(&mut self) {
        SPARE_TICKS.give(std::mem::take(&mut self.ticks));
    }
}

impl BarTicks {
    /// The ticks of `bars` on `grid`; an error names a price that is not within 2^40
    /// ticks of the grid's base.
    fn new(
        grid: Grid,
        rules: &SymbolRules,
        prefix: &str,
        bars: &Bars<'_>,
    ) -> Result<Self, CoreError> {
        let mut ticks = SPARE_TICKS.take(bars.len());
        let mut wide = Vec::new();
        if grid.ticks_by_floats(bars, &mut ticks) {
            for (i, prices) in rows(bars).enumerate() {
                if prices.iter().all(|&v| grid.nearest_float(v).1) {
                    continue;
                }
                let bar = grid.bar_the_long_way(rules, prefix, prices)?;
                match bar.map(i32::try_from) {
                    [Ok(open), Ok(high), Ok(low), Ok(close)] => {
                        ticks[i] = [open, high, low, close];
                    }
                    _ => wide.push((i, bar)),
                }
            }
        }
        Ok(Self { ticks, wide })
    }

    /// Bar `i`'s ticks.
    #[inline]
    pub(super) fn get(&self, i: usize) -> [i64; 4] {
        if !self.wide.is_empty() {
            if let Ok(k) = self.wide.binary_search_by_key(&i, |&(j, _)| j) {
                return self.wide[k].1;
            }
        }
        self.ticks[i].map(i64::from)
    }

    /// The 32-bit ticks of bars `start..` up to the first bar kept aside (see
    /// [`BarTicks::get`]) or `end`, for [`super::scan::inside_run`].
    #[inline]
    pub(super) fn narrow(&self, start: usize, end: usize) -> &[[i32; 4]] {
        let end = if self.wide.is_empty() {
            end
        } else {
            let k = self.wide.partition_point(|&(j, _)| j < start);
            self.wide.get(k).map_or(end, |&(j, _)| j.min(end))
        };
        &self.ticks[start..end]
    }
}

/// A symbol's price grid, `minPrice + k * tickSize` (`k * 10^-pricePrecision` when the
/// tick is disabled): the grid `SymbolRules::quantize_price` rounds onto. Every price of
/// a run is an integer `k` on it, so the replay compares integers; a price becomes a
/// decimal (`base + k * step` mantissas at the grid's scale, exact) only where it is fed
/// to the exit state machine or booked.
#[derive(Clone, Copy, Debug)]
pub(super) struct Grid {
    pub(super) base: i128,
    pub(super) step: i128,
    pub(super) scale: u32,
    pub(super) base_f: f64,
    pub(super) step_f: f64,
    /// `1 / step_f`, rounded: a multiplication per price instead of a division.
    pub(super) per_step_f: f64,
    /// `MAX_FLOAT_TICKS` steps: prices farther from zero take the exact path.
    pub(super) float_limit: f64,
}

/// 1.5 * 2^52: for |x| < 2^51, `x + ROUND` lies in [2^52, 2^53), where the doubles are the
/// integers, so the addition rounds `x` to an integer (nearest, ties to even) and holds it
/// in the low mantissa bits; subtracting `ROUND` back is exact. Plain arithmetic instead
/// of `floor`/`round` (library calls on the baseline x86-64 target) or a float-to-integer
/// conversion per price, and nothing the compiler cannot vectorize.
const ROUND: f64 = 6_755_399_441_055_744.0;

/// Above this many ticks from zero a float tick index is no longer certain to within
/// 1e-6 tick; such prices take the exact decimal path.
pub(super) const MAX_FLOAT_TICKS: f64 = (1u64 << 30) as f64;

impl Grid {
    pub(super) fn new(rules: &SymbolRules) -> Result<Self, CoreError> {
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
    #[inline]
    pub(super) fn price(self, k: i64) -> Decimal {
        // |k| < 2^40 for bar prices and any tick read from a decimal fits by construction.
        Decimal::from_i128_with_scale(self.mantissa(k), self.scale)
    }

    /// The mantissa of tick `k`'s price (with the grid's decimals).
    #[inline]
    pub(super) fn mantissa(self, k: i64) -> i128 {
        self.base + i128::from(k) * self.step
    }

    /// The mantissa of the price distance between ticks `a` and `b` (see [`Grid::distance`]).
    #[inline]
    pub(super) fn distance_mantissa(self, a: i64, b: i64) -> i128 {
        i128::from(a.abs_diff(b)) * self.step
    }

    /// The price distance between ticks `a` and `b`, written with the grid's decimals (the
    /// decimal `|price(a) - price(b)|` gives, without its subtraction).
    #[inline]
    pub(super) fn distance(self, a: i64, b: i64) -> Decimal {
        Decimal::from_i128_with_scale(self.distance_mantissa(a, b), self.scale)
    }

    /// The tick of a decimal on the grid; `None` off the grid or out of range.
    pub(super) fn ticks(self, price: Decimal) -> Option<i64> {
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
    pub(super) fn nearest_exact(
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

    /// Writes every bar's ticks into `out` by floats ([`Grid::nearest_float`]); true when
    /// some price is not settled (its bar's row is then to be redone the long way).
    fn ticks_by_floats(self, bars: &Bars<'_>, out: &mut Vec<[i32; 4]>) -> bool {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: `ticks_by_floats_avx2` only requires AVX2, detected just above.
            #[allow(unsafe_code)] // the one way to call a `target_feature` function
            unsafe {
                return self.ticks_by_floats_avx2(bars, out);
            }
        }
        self.ticks_by_floats_loop(bars, out)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    fn ticks_by_floats_avx2(self, bars: &Bars<'_>, out: &mut Vec<[i32; 4]>) -> bool {
        self.ticks_by_floats_loop(bars, out)
    }

    // Must be inlined into `ticks_by_floats_avx2` to be compiled with AVX2 there.
    #[allow(clippy::inline_always)]
    #[inline(always)]
    fn ticks_by_floats_loop(self, bars: &Bars<'_>, out: &mut Vec<[i32; 4]>) -> bool {
        // Written into the spare capacity by index: `Vec::extend` over an iterator is a
        // generic function of its own, not inlined here, so not compiled with AVX2.
        let rows = bars.len();
        out.clear();
        out.reserve(rows);
        let mut settled = true;
        let [open, high, low, close] =
            [&bars.open, &bars.high, &bars.low, &bars.close].map(|column| &column[..rows]);
        for (j, slot) in out.spare_capacity_mut()[..rows].iter_mut().enumerate() {
            let ticks = [open[j], high[j], low[j], close[j]].map(|v| self.nearest_float(v));
            // `&`, not `&&`: no branch, so the loop vectorizes.
            settled &= ticks[0].1 & ticks[1].1 & ticks[2].1 & ticks[3].1;
            // A settled tick lies within 2^30 of the base: 32 bits hold it. An unsettled
            // one is garbage here and its row is redone.
            slot.write(ticks.map(|(k, _)| k as i32));
        }
        // SAFETY: the loop above wrote each of the first `rows` slots (`reserve` made room).
        #[allow(unsafe_code)] // the one way to keep the rows written in place
        unsafe {
            out.set_len(rows);
        }
        !settled
    }

    /// One bar's ticks, each by floats, at a midpoint, or exactly.
    #[cold]
    #[inline(never)]
    pub(super) fn bar_the_long_way(
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
    pub(super) fn nearest_float(self, v: f64) -> (i64, bool) {
        // Also false for NaN, which the exact path then refuses.
        let near = v.abs() + self.base_f.abs() < self.float_limit;
        let x = (v - self.base_f) * self.per_step_f;
        let shifted = x + ROUND;
        // `x - nearest` is exact (two doubles within 1/2 of each other). A tie's rounding
        // direction does not matter: within 1e-6 of a half is never settled here. For the
        // far or NaN values `near` rules out, the tick is garbage, and never read.
        let nearest = shifted - ROUND;
        let distance_to_half = 0.5 - (x - nearest).abs();
        (
            (shifted.to_bits() as i64).wrapping_sub(ROUND.to_bits() as i64),
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
    pub(super) fn nearest_fast(self, v: f64) -> Option<i64> {
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
    pub(super) fn nearest_midpoint(self, v: f64) -> Option<i64> {
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

pub(super) fn prepare<'a>(
    input: &'a SeriesInput<'a>,
    rules: &'a ExchangeRules,
    periods: &[(usize, i64)],
    options: &BacktestOptions,
) -> Result<Prepared<'a>, CoreError> {
    let symbol_rules = rules.symbol(&input.symbol)?;
    if input.interval_ms <= 0 {
        return Err(CoreError::invalid_for(
            &input.symbol,
            "interval_ms",
            input.interval_ms.to_string(),
            "must be positive",
        ));
    }
    let max_step = input.interval_ms * (i64::from(options.max_gap_bars) + 1);
    let (segments, spaced) =
        input
            .bars
            .check_segments(&input.symbol, "bars", input.interval_ms, max_step)?;
    let gapless = if max_step == input.interval_ms {
        segments.len() <= 1
    } else {
        !super::steps::steps(&input.bars.open_time, input.interval_ms, true).1
    };
    input.entries.check(&input.symbol)?;
    let grid = Grid::new(symbol_rules)?;
    let bars = &input.bars;
    let mut fine = Vec::new();
    let mut fine_ticks = None;
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
        fine_ticks = Some(BarTicks::new(grid, symbol_rules, "fine.", fine_bars)?);
    }
    let mut atr = HashMap::new();
    for &(period, atr_interval) in periods {
        atr.insert(
            (period, atr_interval),
            atr_before_each_bar(input, &segments, spaced, period, atr_interval)?,
        );
    }
    let bars = BarTicks::new(grid, symbol_rules, "", bars)?;
    Ok(Prepared {
        input,
        rules: symbol_rules,
        bars,
        grid,
        segments,
        gapless,
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
pub(super) fn atr_before_each_bar(
    input: &SeriesInput<'_>,
    segments: &[(usize, usize)],
    spaced: bool,
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
    // Appended segment after segment (the segments cover every bar, in order): each slot
    // is written once, no NaN-filled buffer first.
    let mut values = SPARE_FLOATS.take(bars.len());
    for &(start, end) in segments {
        let times = &bars.open_time[start..end];
        // `spaced`: no step shorter than the data interval (read with the segments), which
        // answers for an ATR at the data interval without another pass over the times.
        if (spaced && atr_interval == input.interval_ms)
            || times.windows(2).all(|w| w[1] - w[0] >= atr_interval)
        {
            // Every bar is a bucket of its own (the usual case: ATR at the data interval),
            // so the ATR before bar `i` is the ATR after bars `start..i`: Wilder's over the
            // segment's bars but its last, shifted by one. `atr_extend` performs the same
            // operations as `WilderAtr` (bit for bit), in one loop without the bucket
            // bookkeeping and with the FMA instruction when the CPU has it.
            values.push(f64::NAN);
            let last = end - 1;
            crate::atr::atr_extend(
                &bars.high[start..last],
                &bars.low[start..last],
                &bars.close[start..last],
                period,
                &mut values,
            )?;
            continue;
        }
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
            values.push(state.value().unwrap_or(f64::NAN));
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
    debug_assert_eq!(values.len(), bars.len());
    Ok(values)
}

#[cfg(test)]
#[allow(clippy::float_cmp)] // bit-for-bit equality is what these tests check
mod tests {
    use super::*;
    use crate::backtest::Entries;

    /// A walk of `n` bars of `interval` with a few gaps, some longer than one bar.
    fn walk(n: usize, interval: i64) -> SeriesInput<'static> {
        let mut bars = Bars::default();
        let (mut t, mut price, mut seed) = (1_700_000_040_000_i64, 30_000.0_f64, 7_u64);
        for i in 0..n {
            seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            let unit = (seed >> 11) as f64 / (1u64 << 53) as f64;
            let open = price;
            price = (price * (1.0 + (unit - 0.5) * 0.004) * 10.0).round() / 10.0;
            bars.open_time.to_mut().push(t);
            bars.open.to_mut().push(open);
            bars.high.to_mut().push(open.max(price) + unit * 5.0);
            bars.low.to_mut().push(open.min(price) - (1.0 - unit) * 5.0);
            bars.close.to_mut().push(price);
            // Gaps of 2 and 40 bars now and then (segments at max_gap_bars = 3).
            t += interval
                * if i % 97 == 96 {
                    40
                } else if i % 31 == 30 {
                    2
                } else {
                    1
                };
        }
        SeriesInput {
            symbol: "BTCUSDT".into(),
            interval_ms: interval,
            bars,
            fine: None,
            entries: Entries::default(),
        }
    }

    /// The definition: per segment a fresh `WilderAtr`, each bar's value read before the
    /// bar is fed (every bar its own bucket).
    fn reference(input: &SeriesInput<'_>, segments: &[(usize, usize)], period: usize) -> Vec<f64> {
        let b = &input.bars;
        let mut out = Vec::new();
        for &(start, end) in segments {
            let mut atr = WilderAtr::new(period).unwrap();
            for i in start..end {
                out.push(atr.value().unwrap_or(f64::NAN));
                atr.update(b.high[i], b.low[i], b.close[i]);
            }
        }
        out
    }

    fn segments(input: &SeriesInput<'_>, max_gap_bars: i64) -> Vec<(usize, usize)> {
        let t = &input.bars.open_time;
        let mut cuts = vec![0];
        cuts.extend(
            (1..t.len()).filter(|&i| t[i] - t[i - 1] > input.interval_ms * (max_gap_bars + 1)),
        );
        cuts.push(t.len());
        cuts.windows(2).map(|w| (w[0], w[1])).collect()
    }

    /// The rounding `nearest_float` replaced: truncation, then a step when the fraction
    /// passes a half.
    fn by_truncation(grid: Grid, v: f64) -> (i64, bool) {
        let near = v.abs() + grid.base_f.abs() < grid.float_limit;
        let x = (v - grid.base_f) * grid.per_step_f;
        let whole = x as i64;
        let fraction = x - whole as f64;
        let distance_to_half = (fraction.abs() - 0.5).abs();
        (
            whole + i64::from(fraction > 0.5) - i64::from(fraction < -0.5),
            near && distance_to_half > 1e-6,
        )
    }

    #[test]
    fn float_ticks_equal_the_truncation_rounding() {
        let rules = crate::exit::test_support::exchange_rules();
        let mut seed = 11_u64;
        for symbol in ["BTCUSDT", "ETHUSDT", "SOLUSDT"] {
            let grid = Grid::new(rules.symbol(symbol).unwrap()).unwrap();
            let (mut settled, mut open) = (0, 0);
            for i in 0..200_000 {
                seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                let unit = (seed >> 11) as f64 / (1u64 << 53) as f64;
                // Prices on the grid, at midpoints, and anywhere, from 1e-3 to 1e6 ticks.
                let ticks = (unit * 1e6).round() + [0.0, 0.5, unit, -0.5][i % 4];
                let v = grid.base_f + ticks * grid.step_f;
                let (k, ok) = grid.nearest_float(v);
                let (old_tick, old_settled) = by_truncation(grid, v);
                assert_eq!(ok, old_settled, "{symbol} {v}");
                if ok {
                    assert_eq!(k, old_tick, "{symbol} {v}");
                    settled += 1;
                } else {
                    open += 1;
                }
            }
            assert!(settled > 90_000 && open > 90_000, "{settled} {open}");
            for v in [f64::NAN, f64::INFINITY, -f64::INFINITY, 1e300, -1e300] {
                assert!(!grid.nearest_float(v).1);
            }
        }
    }

    #[test]
    fn ticks_beyond_32_bits_are_kept_aside_and_end_a_scan() {
        let rules = crate::exit::test_support::exchange_rules();
        let symbol_rules = rules.symbol("BTCUSDT").unwrap();
        let grid = Grid::new(symbol_rules).unwrap();
        // 300 million USDT is 3e9 ticks of 0.1 from the base: beyond 32 bits.
        let far = 300_000_000.0;
        let mut input = walk(6, 60_000);
        input.bars.high.to_mut()[3] = far;
        let ticks = BarTicks::new(grid, symbol_rules, "", &input.bars).unwrap();
        let exact = |v: f64| grid.nearest_exact(symbol_rules, "", "high", v).unwrap();
        assert!(exact(far) > i64::from(i32::MAX));
        assert_eq!(ticks.wide.len(), 1);
        assert_eq!(ticks.get(3)[1], exact(far));
        for i in [0, 1, 2, 4, 5] {
            let bars = &input.bars;
            let prices = [bars.open[i], bars.high[i], bars.low[i], bars.close[i]];
            let expected = prices.map(exact);
            assert_eq!(ticks.get(i), expected, "bar {i}");
        }
        assert_eq!(ticks.narrow(0, 6).len(), 3, "the scan stops before bar 3");
        assert_eq!(ticks.narrow(4, 6).len(), 2);
        assert_eq!(ticks.narrow(1, 2).len(), 1);
    }

    #[test]
    fn atr_at_the_data_interval_is_wilders_bit_for_bit() {
        let input = walk(3_000, 60_000);
        let segments = segments(&input, 3);
        assert!(segments.len() > 20);
        for period in [1, 2, 14, 50] {
            let want = reference(&input, &segments, period);
            // With the spacing known from the segments' pass, and found segment by segment.
            for spaced in [true, false] {
                let fast = atr_before_each_bar(&input, &segments, spaced, period, 60_000).unwrap();
                assert_eq!(fast.len(), want.len());
                for (i, (a, b)) in fast.iter().zip(&want).enumerate() {
                    assert!(
                        a.to_bits() == b.to_bits(),
                        "period {period} bar {i}: {a} != {b}"
                    );
                }
                assert!(fast.iter().filter(|v| v.is_finite()).count() > 1_000);
            }
        }
    }

    #[test]
    fn bars_closer_than_the_atr_interval_share_a_bucket() {
        // 30 s bars under a 1m ATR: two bars per bucket, so the bucket path decides; its
        // values only change at bucket starts.
        let input = walk(400, 30_000);
        let segments = segments(&input, 3);
        // Every step is at least the data interval (30 s): that says nothing of a 1m ATR.
        let (_, spaced) = input
            .bars
            .check_segments("X", "bars", input.interval_ms, 30_000 * 4)
            .unwrap();
        assert!(spaced);
        let values = atr_before_each_bar(&input, &segments, spaced, 14, 60_000).unwrap();
        assert_eq!(values.len(), 400);
        let changes = values
            .windows(2)
            .filter(|w| w[0].to_bits() != w[1].to_bits())
            .count();
        assert!(changes > 20 && changes < 200, "{changes}");
    }
}
