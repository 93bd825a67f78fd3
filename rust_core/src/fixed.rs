//! Exact decimals for money: parsing wire strings, rounding to a step, formatting back.
//!
//! The money type is [`rust_decimal::Decimal`] (96-bit integer mantissa and a base-10
//! scale up to 28): every price, quantity and filter value of Binance fits exactly, and
//! `+ - * %` on it are exact within that range. Invariants kept here:
//! - strings are parsed by a strict decimal grammar, never through `f64`;
//! - rounding to a step uses the exact remainder, never a float division;
//! - formatting never prints an exponent and prints exactly the step's decimals.
//!
//! Floats enter only through [`decimal_from_f64`], which takes the shortest decimal string
//! that round-trips to the same `f64` (the same digits Python's `repr(float)` prints), so
//! `0.1` becomes `0.1`, not `0.1000000000000000055511151231257827`.

use std::str::FromStr;

pub use rust_decimal::Decimal;
use rust_decimal::RoundingStrategy;
use serde::{Deserialize, Serialize};

use crate::error::CoreError;

/// How a value that is not on its grid is moved onto it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Rounding {
    /// Toward negative infinity (floor): the grid point at or below the value.
    Down,
    /// Toward positive infinity (ceiling): the grid point at or above the value.
    Up,
    /// To the nearest grid point; an exact tie goes away from zero (up for positive
    /// prices), which is what people mean by "round half up" on prices.
    Nearest,
}

impl Rounding {
    /// Parses `"down"`, `"up"` or `"nearest"` (case-insensitive).
    pub fn parse(text: &str) -> Result<Self, CoreError> {
        match text.to_ascii_lowercase().as_str() {
            "down" => Ok(Self::Down),
            "up" => Ok(Self::Up),
            "nearest" => Ok(Self::Nearest),
            _ => Err(CoreError::invalid(
                "rounding",
                text,
                "must be one of \"down\", \"up\" or \"nearest\"",
            )),
        }
    }
}

/// The rule text every decimal parse error quotes.
pub const DECIMAL_RULE: &str =
    "must be a plain decimal number (digits with at most one point, an optional sign, no exponent)";

/// Parses a plain decimal string exactly: `[+-]?digits[.digits]` or `[+-]?.digits`.
///
/// Rejects exponents (`1e-5`), `NaN`, infinities, empty strings, spaces, and values that
/// do not fit 28 significant digits (rather than rounding them silently).
///
/// # Errors
/// `CoreError::InvalidField` naming `field`, the value and the grammar.
pub fn parse_decimal(field: &str, text: &str) -> Result<Decimal, CoreError> {
    if !is_plain_decimal(text.as_bytes()) {
        return Err(CoreError::invalid(field, text, DECIMAL_RULE));
    }
    let unsigned = text.strip_prefix('+').unwrap_or(text);
    Decimal::from_str_exact(unsigned).map_err(|_| {
        CoreError::invalid(
            field,
            text,
            "must fit in 28 significant digits and 28 decimals",
        )
    })
}

/// Parses a plain decimal that may carry more than 28 decimals, cutting the excess
/// digits in a direction that cannot change a later rounding to any step that is a
/// multiple of `10^-28`: toward zero for [`Rounding::Down`] and [`Rounding::Nearest`]
/// (grid points and midpoints are multiples of `10^-28`, so order against them is kept
/// and an exact tie still goes up), away from zero for [`Rounding::Up`]. Intended for
/// non-negative prices and quantities about to be quantized.
///
/// # Errors
/// As [`parse_decimal`]; more than 28 digits before the point is still an error.
pub fn parse_decimal_for_rounding(
    field: &str,
    text: &str,
    rounding: Rounding,
) -> Result<Decimal, CoreError> {
    match parse_decimal(field, text) {
        Ok(value) => Ok(value),
        Err(err) => {
            let Some((whole, frac)) = text.split_once('.') else {
                return Err(err);
            };
            if frac.len() <= 28 || !is_plain_decimal(text.as_bytes()) {
                return Err(err);
            }
            let (kept, cut) = frac.split_at(28);
            let truncated = parse_decimal(field, &format!("{whole}.{kept}"))?;
            let excess = cut.bytes().any(|b| b != b'0');
            if excess && rounding == Rounding::Up {
                let ulp = Decimal::new(1, 28);
                let away = if truncated.is_sign_negative() {
                    truncated.checked_sub(ulp)
                } else {
                    truncated.checked_add(ulp)
                };
                away.ok_or(err)
            } else {
                Ok(truncated)
            }
        }
    }
}

fn is_plain_decimal(bytes: &[u8]) -> bool {
    let body = match bytes.first() {
        Some(b'+' | b'-') => &bytes[1..],
        _ => bytes,
    };
    let mut digits = 0usize;
    let mut points = 0usize;
    for &b in body {
        match b {
            b'0'..=b'9' => digits += 1,
            b'.' => points += 1,
            _ => return false,
        }
    }
    digits > 0 && points <= 1
}

/// Converts a finite `f64` to the `Decimal` of its shortest round-trip decimal string.
///
/// Rust's `Display` for `f64` prints the shortest digits that read back as the same
/// float and never uses an exponent, so `0.1 + 0.2` gives `0.30000000000000004` (that
/// is the float's value) while `0.3` gives `0.3`. Round the result to a tick or step
/// afterwards; this function only avoids inventing binary noise digits.
///
/// # Errors
/// `CoreError::InvalidField` for NaN, infinities, and magnitudes outside `Decimal`'s
/// range (beyond 28 digits, e.g. `1e-30` or `1e30`).
pub fn decimal_from_f64(field: &str, value: f64) -> Result<Decimal, CoreError> {
    if !value.is_finite() {
        return Err(CoreError::invalid(
            field,
            value.to_string(),
            "must be a finite number",
        ));
    }
    // The same shortest round-trip digits as `value.to_string()` (both print the shortest
    // digits that read back as `value`, the nearest such when several are that short), from
    // a Schubfach formatter several times quicker than `Display`'s Grisu: this runs a few
    // times per opened position in the backtest. Read back on the stack, exponent and all.
    // The two differ only where two shortest decimals lie exactly as near (`Display`
    // takes the larger magnitude, the formatter the even digit): that case takes `Display`.
    let mut buf = zmij::Buffer::new();
    if let Some(decimal) = shortest_text_to_decimal(buf.format_finite(value).as_bytes()) {
        if !may_be_a_tie(value, decimal) {
            return Ok(decimal);
        }
    }
    let mut buf = StackText::<STACK_TEXT>::new();
    if std::fmt::Write::write_fmt(&mut buf, format_args!("{value}")).is_ok() {
        if let Some(decimal) = shortest_text_to_decimal(buf.as_bytes()) {
            return Ok(decimal);
        }
    }
    let text = value.to_string();
    Decimal::from_str_exact(&text).or_else(|_| {
        // Tiny magnitudes print more than 28 decimals: round them (they are far below any
        // tick) rather than refuse; huge ones cannot be represented at all.
        if value.abs() < 1.0 {
            Decimal::from_str(&text).map_err(|_| {
                CoreError::invalid(field, text.clone(), "is outside the exact decimal range")
            })
        } else {
            Err(CoreError::invalid(
                field,
                text.clone(),
                "is outside the exact decimal range (at most 28 digits)",
            ))
        }
    })
}

/// [`decimal_from_f64`] for values with at most `max_decimals` decimals and 15 digits,
/// as exchange prices are, without formatting: `None` for anything else.
///
/// With `m = round(v * 10^d)` below 2^53, `m / 10^d` (both exact doubles, one correctly
/// rounded division) reads back as `v` exactly when the decimal `m * 10^-d` does; the
/// first `d` that does is the fewest decimals, hence the shortest digits, and at so few
/// digits no other decimal of that length lies within half an ulp of `v`. So the result
/// is the very decimal the shortest round-trip text gives.
pub fn short_decimal_from_f64(value: f64, max_decimals: u32) -> Option<Decimal> {
    const POW10: [f64; 16] = [
        1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11, 1e12, 1e13, 1e14, 1e15,
    ];
    if !value.is_finite() {
        return None;
    }
    let magnitude = value.abs();
    for (d, &p) in POW10.iter().enumerate().take(max_decimals as usize + 1) {
        let scaled = magnitude * p;
        if scaled >= 1e15 {
            return None;
        }
        // Truncation and a compare rather than `round`, a library call on baseline x86-64.
        let whole = scaled as i64;
        let m = whole + i64::from(scaled - whole as f64 >= 0.5);
        #[allow(clippy::float_cmp)] // reading back exactly the same double is the test
        let reads_back = m as f64 / p == magnitude;
        if reads_back {
            let mut out = Decimal::new(m, d as u32);
            out.set_sign_negative(value.is_sign_negative());
            return Some(out);
        }
    }
    None
}

/// Whether finite `value` lies exactly halfway between `shortest` and a neighbour one unit
/// of its last digit away (`true` also when that cannot be decided cheaply).
///
/// With `value = odd * 2^two_exp`, a non-integer `value` has exactly `-two_exp` decimals
/// and the midpoint `(10 digits ± 5) * 10^(ten_exp - 1)` exactly `1 - ten_exp`, so they can
/// only be equal when those agree, and then exactly when `odd * 5^-two_exp = 10 digits ± 5`.
fn may_be_a_tie(value: f64, shortest: Decimal) -> bool {
    let bits = value.to_bits();
    let biased = ((bits >> 52) & 0x7ff) as i32;
    let fraction = bits & ((1 << 52) - 1);
    let (mut odd, mut two_exp) = if biased == 0 {
        (fraction, -1074)
    } else {
        (fraction | 1 << 52, biased - 1075)
    };
    if odd == 0 {
        return false;
    }
    let zeros = odd.trailing_zeros();
    odd >>= zeros;
    two_exp += zeros as i32;
    // shortest = digits * 10^ten_exp with digits free of trailing zeros
    let mut digits = shortest.mantissa().unsigned_abs();
    let mut ten_exp = -(shortest.scale() as i32);
    while digits != 0 && digits % 10 == 0 {
        digits /= 10;
        ten_exp += 1;
    }
    let Some(ten_digits) = digits.checked_mul(10) else {
        return true;
    };
    if two_exp < 0 {
        if -two_exp != 1 - ten_exp {
            return false;
        }
        let Some(scaled) = 5u128
            .checked_pow(two_exp.unsigned_abs())
            .and_then(|power| power.checked_mul(u128::from(odd)))
        else {
            return false; // more than 38 digits: no shortest significand is that long
        };
        scaled.abs_diff(ten_digits) == 5
    } else {
        if ten_exp < 1 {
            return false; // an integer is no midpoint with a 5 among its decimals
        }
        let Some(exact) = u128::from(odd)
            .checked_shl(two_exp.unsigned_abs())
            .filter(|exact| exact >> two_exp == u128::from(odd))
        else {
            return true;
        };
        let Some(unit) = 10u128.checked_pow((ten_exp - 1).unsigned_abs()) else {
            return true;
        };
        [ten_digits + 5, ten_digits.saturating_sub(5)]
            .iter()
            .any(|mid| mid.checked_mul(unit) == Some(exact))
    }
}

/// Reads the shortest text of a float, `-?d+(.d+)?(e[+-]?d+)?`, as the `Decimal` that
/// `Display`'s exponent-free text of the same digits gives: the significand's trailing
/// zeros dropped (`1.0` is `1`), then as many decimals as the digits need and no fewer
/// than none. `None` for anything beyond 28 decimals or 96 bits (the long way decides).
fn shortest_text_to_decimal(text: &[u8]) -> Option<Decimal> {
    let (negative, body) = match text.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, text),
    };
    let mut significand: u64 = 0;
    let mut digits = 0u32;
    let mut fraction_digits: i32 = 0;
    let mut seen_point = false;
    let mut rest = body;
    while let Some((&b, tail)) = rest.split_first() {
        match b {
            b'0'..=b'9' => {
                // A shortest f64 has at most 17 significant digits, far inside a u64.
                if digits >= 19 {
                    return None;
                }
                significand = significand * 10 + u64::from(b - b'0');
                if significand != 0 {
                    digits += 1;
                }
                if seen_point {
                    fraction_digits += 1;
                }
            }
            b'.' if !seen_point => seen_point = true,
            b'e' | b'E' => break,
            _ => return None,
        }
        rest = tail;
    }
    if rest.len() == body.len() || body.first() == Some(&b'.') {
        return None; // no digit before the point or exponent
    }
    let mut exponent: i32 = 0;
    if let Some((_, tail)) = rest.split_first() {
        let (sign, magnitude) = match tail.split_first() {
            Some((b'-', m)) => (-1, m),
            Some((b'+', m)) => (1, m),
            _ => (1, tail),
        };
        if magnitude.is_empty() || magnitude.len() > 4 {
            return None;
        }
        for &b in magnitude {
            if !b.is_ascii_digit() {
                return None;
            }
            exponent = exponent * 10 + i32::from(b - b'0');
        }
        exponent *= sign;
    }
    // value = significand * 10^(exponent - fraction_digits)
    let mut power = exponent - fraction_digits;
    if significand == 0 {
        power = 0;
    } else {
        while significand % 10 == 0 {
            significand /= 10;
            power += 1;
        }
    }
    let mut out = if power >= 0 {
        let scaled = u128::from(significand).checked_mul(10u128.checked_pow(power as u32)?)?;
        if scaled >= 1 << 96 {
            return None;
        }
        Decimal::from_i128_with_scale(scaled as i128, 0)
    } else {
        let scale = power.unsigned_abs();
        if scale > 28 {
            return None;
        }
        Decimal::try_from_i128_with_scale(i128::from(significand), scale).ok()?
    };
    out.set_sign_negative(negative);
    Some(out)
}

/// Room for every `f64` whose shortest text fits a `Decimal` (28 digits, a point, a sign).
const STACK_TEXT: usize = 40;

/// A fixed buffer for `write!`; writing past its end fails instead of allocating.
struct StackText<const N: usize> {
    bytes: [u8; N],
    len: usize,
}

impl<const N: usize> StackText<N> {
    fn new() -> Self {
        Self {
            bytes: [0; N],
            len: 0,
        }
    }

    fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

impl<const N: usize> std::fmt::Write for StackText<N> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        let end = self.len + s.len();
        if end > N {
            return Err(std::fmt::Error);
        }
        self.bytes[self.len..end].copy_from_slice(s.as_bytes());
        self.len = end;
        Ok(())
    }
}

/// Converts a `Decimal` to the nearest `f64` (for ATR and other float arithmetic only).
pub fn decimal_to_f64(value: Decimal) -> f64 {
    // Parsing the canonical string is correctly rounded; the digit loop in
    // `ToPrimitive` is not guaranteed to be for large scales.
    value.to_string().parse::<f64>().unwrap_or(f64::NAN)
}

/// The nearest `f64` of a decimal without text: a mantissa below 2^53 with at most 22
/// decimals converts with one correctly rounded division (both operands are exact
/// doubles); longer values go through `rust_decimal`'s conversion, within an ulp.
// Always inlined (the long way is out of line): the result tables convert a few values
// per fill, and as a call each conversion cost more than its division.
#[allow(clippy::inline_always)]
#[inline(always)]
pub fn decimal_to_f64_fast(value: Decimal) -> f64 {
    small_mantissa_to_f64(value.mantissa(), value.scale())
        .unwrap_or_else(|| decimal_to_f64_long(value))
}

/// `mantissa / 10^scale` correctly rounded, when one division gives it: a mantissa below
/// 2^53 with at most 22 decimals (both operands exact doubles). The value alone decides
/// the result, whichever of its representations is given (the fast path of
/// [`decimal_to_f64_fast`]).
#[allow(clippy::inline_always)] // see `decimal_to_f64_fast`
#[inline(always)]
pub fn small_mantissa_to_f64(mantissa: i128, scale: u32) -> Option<f64> {
    const POW10: [f64; 23] = [
        1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11, 1e12, 1e13, 1e14, 1e15, 1e16,
        1e17, 1e18, 1e19, 1e20, 1e21, 1e22,
    ];
    let power = POW10.get(scale as usize)?;
    (mantissa.unsigned_abs() < (1u128 << 53)).then(|| mantissa as i64 as f64 / power)
}

#[cold]
#[inline(never)]
fn decimal_to_f64_long(value: Decimal) -> f64 {
    rust_decimal::prelude::ToPrimitive::to_f64(&value).unwrap_or_else(|| decimal_to_f64(value))
}

/// Rounds `value` to a multiple of `step` in the given direction, exactly.
///
/// A `step` of zero or below means the grid is disabled (Binance's convention for a 0
/// filter value): the value is returned unchanged. The result is written with the
/// step's decimals (`30120.07` to step `0.10` gives `30120.10`), so later comparisons
/// between rounded prices need no rescaling.
pub fn round_to_step(value: Decimal, step: Decimal, rounding: Rounding) -> Decimal {
    // Only a value within one step of `Decimal::MAX` has no grid point beyond it; it is
    // returned unchanged rather than wrapped (callers that take outside input use
    // `checked_round_to_step` and refuse it).
    checked_round_to_step(value, step, rounding).unwrap_or(value)
}

/// [`round_to_step`], or `None` when the grid point lies outside `Decimal`'s range
/// (a value within one step of `±Decimal::MAX`).
pub fn checked_round_to_step(value: Decimal, step: Decimal, rounding: Rounding) -> Option<Decimal> {
    if step <= Decimal::ZERO {
        return Some(value);
    }
    if let Some(result) = round_on_grid_fast(value, Decimal::ZERO, step, rounding) {
        return Some(result);
    }
    round_to_step_slow(value, step, rounding)
}

fn round_to_step_slow(value: Decimal, step: Decimal, rounding: Rounding) -> Option<Decimal> {
    let remainder = value.checked_rem(step)?;
    if remainder.is_zero() {
        return Some(normalize_zero(value));
    }
    let floor = if remainder > Decimal::ZERO {
        value.checked_sub(remainder)?
    } else {
        value.checked_sub(remainder)?.checked_sub(step)?
    };
    let result = match rounding {
        Rounding::Down => floor,
        Rounding::Up => floor.checked_add(step)?,
        Rounding::Nearest => {
            let above = floor.checked_add(step)?;
            let to_floor = value.checked_sub(floor)?;
            let to_above = above.checked_sub(value)?;
            match to_floor.cmp(&to_above) {
                std::cmp::Ordering::Less => floor,
                std::cmp::Ordering::Greater => above,
                std::cmp::Ordering::Equal => {
                    if value >= Decimal::ZERO {
                        above
                    } else {
                        floor
                    }
                }
            }
        }
    };
    Some(normalize_zero(result))
}

/// `10^k` for `k` in 0..=28.
pub(crate) const POW10_I128: [i128; 29] = {
    let mut table = [1i128; 29];
    let mut k = 1;
    while k < 29 {
        table[k] = table[k - 1] * 10;
        k += 1;
    }
    table
};

/// The mantissa of `value` written with `scale` decimals (`scale >= value.scale()`), when
/// it stays below 2^120 (room for the sums and products below).
pub(crate) fn mantissa_at(value: Decimal, scale: u32) -> Option<i128> {
    let factor = *POW10_I128.get(scale.checked_sub(value.scale())? as usize)?;
    value
        .mantissa()
        .checked_mul(factor)
        .filter(|m| m.unsigned_abs() < 1 << 120)
}

/// `mantissa` (with `from` decimals) at `scale` decimals, in the usual case: a 64-bit
/// mantissa and at most 12 decimals more, one 64x64-bit product (below 2^103, so below
/// 10^38, and within what a `Decimal` holds); `None` leaves it to the checked path.
#[allow(clippy::inline_always)] // see `decimal128_mantissa`
#[inline(always)]
pub(crate) fn small_mantissa_at(mantissa: i128, from: u32, scale: u32) -> Option<i128> {
    const POW10_I64: [i64; 13] = {
        let mut table = [1i64; 13];
        let mut k = 1;
        while k < table.len() {
            table[k] = table[k - 1] * 10;
            k += 1;
        }
        table
    };
    let small = i64::try_from(mantissa).ok()?;
    let factor = POW10_I64.get(scale.wrapping_sub(from) as usize)?;
    Some(i128::from(small) * i128::from(*factor))
}

/// The mantissa of `value` at `scale` decimals, when the value has at most
/// that many decimals and the mantissa fewer than 38 digits: Arrow's `decimal128(38, scale)`.
// Always inlined (the long way is out of line): called for every exact value of the result
// tables, where the call cost as much as the conversion.
#[cfg_attr(not(feature = "python"), allow(dead_code))] // the binding's exact columns
#[allow(clippy::inline_always)]
#[inline(always)]
pub(crate) fn decimal128_mantissa(value: Decimal, scale: u32) -> Option<i128> {
    if let Some(mantissa) = small_mantissa_at(value.mantissa(), value.scale(), scale) {
        return Some(mantissa);
    }
    decimal128_mantissa_long(value, scale)
}

#[cfg_attr(not(feature = "python"), allow(dead_code))]
#[cold]
#[inline(never)]
fn decimal128_mantissa_long(value: Decimal, scale: u32) -> Option<i128> {
    const LIMIT: u128 = 10u128.pow(38);
    mantissa_at(value, scale)
        .or_else(|| mantissa_at(value.normalize(), scale))
        .filter(|m| m.unsigned_abs() < LIMIT)
}

/// [`round_to_grid`] in integer arithmetic: all three numbers brought to one scale, the
/// floor index and remainder by Euclidean division, the result `base + k * step` written
/// with the grid's decimals. `None` when a number is too long for `i128` (the caller then
/// takes the decimal path, which gives the same value).
fn round_on_grid_fast(
    value: Decimal,
    base: Decimal,
    step: Decimal,
    rounding: Rounding,
) -> Option<Decimal> {
    let grid_scale = base.scale().max(step.scale());
    let scale = value.scale().max(grid_scale);
    let offset = mantissa_at(value, scale)? - mantissa_at(base, scale)?;
    let step_wide = mantissa_at(step, scale)?;
    // The usual price or quantity fits 64 bits, where a division is several times
    // cheaper than the 128-bit one (same quotient and remainder).
    let (floor, remainder) = match (i64::try_from(offset), i64::try_from(step_wide)) {
        (Ok(offset), Ok(step)) if step > 0 => (
            i128::from(offset.div_euclid(step)),
            i128::from(offset.rem_euclid(step)),
        ),
        _ => (offset.div_euclid(step_wide), offset.rem_euclid(step_wide)),
    };
    let k = match rounding {
        Rounding::Down => floor,
        Rounding::Up => floor + i128::from(remainder != 0),
        Rounding::Nearest => match (2 * remainder).cmp(&step_wide) {
            std::cmp::Ordering::Less => floor,
            std::cmp::Ordering::Greater => floor + 1,
            // Tie: away from zero (of the offset from the base).
            std::cmp::Ordering::Equal => floor + i128::from(offset >= 0),
        },
    };
    let mantissa = mantissa_at(base, grid_scale)?
        .checked_add(k.checked_mul(mantissa_at(step, grid_scale)?)?)?;
    Decimal::try_from_i128_with_scale(mantissa, grid_scale).ok()
}

/// Rounds `value` onto the grid `base + k * step` (Binance's `PRICE_FILTER` grid starts at
/// `minPrice`: `(price - minPrice) % tickSize == 0`). The result is written with the
/// decimals of the base or the step, whichever has more.
pub fn round_to_grid(value: Decimal, base: Decimal, step: Decimal, rounding: Rounding) -> Decimal {
    // Unchanged only beyond the last representable grid point (see `round_to_step`).
    checked_round_to_grid(value, base, step, rounding).unwrap_or(value)
}

/// [`round_to_grid`], or `None` when the grid point lies outside `Decimal`'s range.
pub fn checked_round_to_grid(
    value: Decimal,
    base: Decimal,
    step: Decimal,
    rounding: Rounding,
) -> Option<Decimal> {
    if step <= Decimal::ZERO {
        return Some(value);
    }
    if let Some(result) = round_on_grid_fast(value, base, step, rounding) {
        return Some(result);
    }
    let offset = round_to_step_slow(value.checked_sub(base)?, step, rounding)?;
    Some(normalize_zero(base.checked_add(offset)?))
}

/// Returns whether `value` lies on the grid `base + k * step` (always true when the step
/// is disabled).
pub fn is_on_grid(value: Decimal, base: Decimal, step: Decimal) -> bool {
    step <= Decimal::ZERO
        || value
            .checked_sub(base)
            .and_then(|offset| offset.checked_rem(step))
            .is_some_and(|r| r.is_zero())
}

/// The number of decimals a step prints with: the scale of the step without trailing
/// zeros (tick `0.10` gives 1, step `0.001` gives 3, step `1` gives 0).
pub fn step_decimals(step: Decimal) -> u32 {
    step.normalize().scale()
}

/// The number of decimals a value was written with, trailing zeros included
/// (`"0.0010"` has 4): what Binance's precision check (-1111) counts.
pub fn written_decimals(value: Decimal) -> u32 {
    value.scale()
}

/// Formats `value` with exactly `decimals` decimals, no exponent, no `-0`.
///
/// A value with more decimals is rounded half away from zero; callers round to the
/// step first, so this only pads.
pub fn format_decimals(value: Decimal, decimals: u32) -> String {
    let mut v = value.round_dp_with_strategy(decimals, RoundingStrategy::MidpointAwayFromZero);
    v.rescale(decimals);
    if v.is_zero() {
        v.set_sign_positive(true);
    }
    v.to_string()
}

/// Formats `value` with exactly the decimals of `step` (see [`step_decimals`]):
/// tick `0.10` and 30120 give `"30120.0"`; step `0.001` and 0.003 give `"0.003"`; step
/// `1` and 5 give `"5"`. Never an exponent.
pub fn format_on_step(value: Decimal, step: Decimal) -> String {
    format_decimals(value, step_decimals(step))
}

fn normalize_zero(mut value: Decimal) -> Decimal {
    if value.is_zero() {
        value.set_sign_positive(true);
    }
    value
}

#[cfg(test)]
#[allow(clippy::float_cmp)] // exact equality is what these tests check
mod tests {
    use super::*;

    fn d(s: &str) -> Decimal {
        parse_decimal("value", s).unwrap()
    }

    #[test]
    fn decimal128_mantissas_are_the_value_at_the_scale_or_none() {
        let at_12 = |text: &str| decimal128_mantissa(d(text), 12);
        assert_eq!(at_12("30000.1"), Some(30_000_100_000_000_000));
        assert_eq!(at_12("-0.000000000001"), Some(-1));
        assert_eq!(at_12("7"), Some(7_000_000_000_000));
        // More decimals written, the same value: the normalized value has 12 at most.
        assert_eq!(at_12("1.50000000000000"), Some(1_500_000_000_000));
        // A 13th significant decimal: none.
        assert_eq!(at_12("0.0000000000001"), None);
        // Beyond 64 bits of mantissa: the checked path, still exact.
        assert_eq!(
            at_12("12345678901234567890.5"),
            Some(12_345_678_901_234_567_890_500_000_000_000)
        );
        // 38 digits or more at 12 decimals do not fit decimal128(38, 12).
        assert_eq!(at_12("79228162514264337593543950335"), None);
        assert_eq!(decimal128_mantissa(d("1.5"), 0), None);
        assert_eq!(
            decimal128_mantissa(d("1.5"), 20),
            Some(150_000_000_000_000_000_000)
        );
    }

    #[test]
    fn parses_plain_decimals_exactly() {
        assert_eq!(d("11794.15000000").to_string(), "11794.15000000");
        assert_eq!(d("+5").to_string(), "5");
        assert_eq!(d("-0.5").to_string(), "-0.5");
        assert_eq!(d(".5").to_string(), "0.5");
        assert_eq!(d("5.").to_string(), "5");
    }

    #[test]
    fn rejects_exponents_nan_and_empty() {
        for bad in [
            "", "1e-5", "NaN", "inf", " 1", "1 ", "1.2.3", "+", ".", "0x10", "1_000",
        ] {
            let err = parse_decimal("price", bad).unwrap_err();
            assert!(err.to_string().starts_with("price "), "{err}");
            assert!(err.to_string().contains("plain decimal"), "{err}");
        }
        let err = parse_decimal("price", "1e-5").unwrap_err();
        assert_eq!(err.to_string(), format!("price 1e-5 {DECIMAL_RULE}"));
    }

    #[test]
    fn rejects_too_many_digits_instead_of_rounding() {
        assert!(parse_decimal("qty", "0.12345678901234567890123456789").is_err());
    }

    #[test]
    fn excess_decimals_are_cut_in_the_rounding_direction() {
        let text = "0.04472135954999579392818347337";
        let down = parse_decimal_for_rounding("p", text, Rounding::Down).unwrap();
        let up = parse_decimal_for_rounding("p", text, Rounding::Up).unwrap();
        assert_eq!(down.to_string(), "0.0447213595499957939281834733");
        assert_eq!(up.to_string(), "0.0447213595499957939281834734");
        // A value a hair above a grid point still rounds up to the next point.
        let hair = format!("0.1{}1", "0".repeat(28));
        let v = parse_decimal_for_rounding("p", &hair, Rounding::Up).unwrap();
        assert_eq!(round_to_step(v, d("0.1"), Rounding::Up), d("0.2"));
        let v = parse_decimal_for_rounding("p", &hair, Rounding::Down).unwrap();
        assert_eq!(round_to_step(v, d("0.1"), Rounding::Down), d("0.1"));
        let v =
            parse_decimal_for_rounding("p", &format!("0.15{}1", "0".repeat(27)), Rounding::Nearest)
                .unwrap();
        assert_eq!(round_to_step(v, d("0.1"), Rounding::Nearest), d("0.2"));
        assert!(parse_decimal_for_rounding("p", &"9".repeat(30), Rounding::Down).is_err());
        assert!(parse_decimal_for_rounding("p", "1e-40", Rounding::Down).is_err());
    }

    #[test]
    fn floats_enter_by_shortest_repr() {
        assert_eq!(decimal_from_f64("p", 0.1).unwrap().to_string(), "0.1");
        assert_eq!(
            decimal_from_f64("p", 0.1 + 0.2).unwrap().to_string(),
            "0.30000000000000004"
        );
        assert_eq!(decimal_from_f64("p", 1e-5).unwrap().to_string(), "0.00001");
        assert_eq!(
            decimal_from_f64("p", 30120.07).unwrap().to_string(),
            "30120.07"
        );
        assert!(decimal_from_f64("p", f64::NAN).is_err());
        assert!(decimal_from_f64("p", f64::INFINITY).is_err());
        assert!(decimal_from_f64("p", 1e40).is_err());
        assert!(decimal_from_f64("p", 1e-40).unwrap().is_zero());
    }

    #[test]
    fn rounding_beyond_the_decimal_range_is_none_not_a_panic() {
        // Issue 16 item 2: 79228162514264337593543950335 up or nearest on a tick of 10.
        let ten = d("10");
        for rounding in [Rounding::Up, Rounding::Nearest] {
            assert_eq!(checked_round_to_step(Decimal::MAX, ten, rounding), None);
            assert_eq!(
                checked_round_to_grid(Decimal::MAX, d("0.5"), ten, rounding),
                None
            );
            assert_eq!(
                checked_round_to_step(Decimal::MIN, ten, Rounding::Down),
                None
            );
            // The infallible forms leave such a value as it is.
            assert_eq!(round_to_step(Decimal::MAX, ten, rounding), Decimal::MAX);
        }
        assert_eq!(
            checked_round_to_step(Decimal::MAX, ten, Rounding::Down),
            Some(d("79228162514264337593543950330"))
        );
        assert!(!is_on_grid(Decimal::MAX, Decimal::MIN, ten));
    }

    #[test]
    fn rounds_to_step_in_each_direction() {
        let tick = d("0.10");
        assert_eq!(
            round_to_step(d("30120.07"), tick, Rounding::Down),
            d("30120.0")
        );
        assert_eq!(
            round_to_step(d("30120.07"), tick, Rounding::Up),
            d("30120.1")
        );
        assert_eq!(
            round_to_step(d("30120.07"), tick, Rounding::Nearest),
            d("30120.1")
        );
        assert_eq!(
            round_to_step(d("30120.05"), tick, Rounding::Nearest),
            d("30120.1")
        );
        assert_eq!(
            round_to_step(d("30120.04"), tick, Rounding::Nearest),
            d("30120.0")
        );
        assert_eq!(
            round_to_step(d("-1.25"), d("0.1"), Rounding::Down),
            d("-1.3")
        );
        assert_eq!(round_to_step(d("-1.25"), d("0.1"), Rounding::Up), d("-1.2"));
        assert_eq!(
            round_to_step(d("-1.25"), d("0.1"), Rounding::Nearest),
            d("-1.3")
        );
        assert_eq!(round_to_step(d("7"), d("0"), Rounding::Down), d("7"));
        assert_eq!(
            round_to_step(d("0.00049"), d("0.001"), Rounding::Down),
            Decimal::ZERO
        );
    }

    #[test]
    fn grid_starts_at_base() {
        // Tick 0.5 from base 0.2: grid 0.2, 0.7, 1.2 ...
        assert_eq!(
            round_to_grid(d("1.0"), d("0.2"), d("0.5"), Rounding::Down),
            d("0.7")
        );
        assert_eq!(
            round_to_grid(d("1.0"), d("0.2"), d("0.5"), Rounding::Up),
            d("1.2")
        );
        assert!(is_on_grid(d("1.2"), d("0.2"), d("0.5")));
        assert!(!is_on_grid(d("1.0"), d("0.2"), d("0.5")));
    }

    #[test]
    fn formats_with_the_step_decimals() {
        assert_eq!(format_on_step(d("30120"), d("0.10")), "30120.0");
        assert_eq!(format_on_step(d("0.003"), d("0.001")), "0.003");
        assert_eq!(format_on_step(d("5.000"), d("1")), "5");
        assert_eq!(format_on_step(d("0.00001"), d("0.0000100")), "0.00001");
        assert_eq!(format_on_step(d("-0"), d("0.01")), "0.00");
        assert_eq!(
            format_on_step(d("1000000000"), d("0.001")),
            "1000000000.000"
        );
    }

    /// The decimal path both fast paths replace, as it was written before them.
    fn round_to_grid_reference(
        value: Decimal,
        base: Decimal,
        step: Decimal,
        rounding: Rounding,
    ) -> Decimal {
        normalize_zero(base + round_to_step_slow(value - base, step, rounding).unwrap())
    }

    proptest::proptest! {
        #[test]
        fn integer_rounding_matches_the_decimal_path(
            value in -10_000_000_000i64..10_000_000_000,
            value_scale in 0u32..12,
            base in 0i64..1_000_000,
            base_scale in 0u32..8,
            step in 1i64..5_000,
            step_scale in 0u32..8,
        ) {
            let value = Decimal::new(value, value_scale);
            let base = Decimal::new(base, base_scale);
            let step = Decimal::new(step, step_scale);
            for rounding in [Rounding::Down, Rounding::Up, Rounding::Nearest] {
                let fast = round_to_grid(value, base, step, rounding);
                proptest::prop_assert_eq!(fast, round_to_grid_reference(value, base, step, rounding));
                proptest::prop_assert_eq!(fast.scale(), base.scale().max(step.scale()));
                let fast = round_to_step(value, step, rounding);
                proptest::prop_assert_eq!(Some(fast), round_to_step_slow(value, step, rounding));
                proptest::prop_assert_eq!(fast.scale(), step.scale());
            }
        }

        #[test]
        fn stack_conversion_matches_the_string_path(bits in proptest::num::u64::ANY) {
            let value = f64::from_bits(bits);
            let reference = if value.is_finite() {
                Decimal::from_str_exact(&value.to_string()).ok()
            } else {
                None
            };
            if let Some(reference) = reference {
                let fast = decimal_from_f64("x", value).unwrap();
                proptest::prop_assert_eq!(fast.serialize(), reference.serialize());
            }
        }

        #[test]
        fn shortest_conversion_matches_for_products_and_wide_magnitudes(
            a in 1e-9f64..1e9,
            b in 1e-3f64..1e3,
            shift in -12i32..12,
        ) {
            // Full-precision floats as ATRs and stretched ladder levels are, across the
            // fixed and exponent forms of the formatter's text.
            for value in [a * b, a / b, (a * b) * 10f64.powi(shift), -(a * b)] {
                let text = value.to_string();
                if let Ok(reference) = Decimal::from_str_exact(&text) {
                    let fast = decimal_from_f64("x", value).unwrap();
                    proptest::prop_assert_eq!(fast.serialize(), reference.serialize(), "{}", text);
                }
            }
        }

        #[test]
        fn shortest_conversion_matches_where_ties_lie(m in (1u64 << 52)..(1 << 53), e in -12i32..6) {
            // 16- and 17-digit floats with few binary decimals: where two shortest
            // decimals can lie equally near.
            let value = m as f64 * 2f64.powi(e);
            let text = value.to_string();
            if let Ok(reference) = Decimal::from_str_exact(&text) {
                let fast = decimal_from_f64("x", value).unwrap();
                proptest::prop_assert_eq!(fast.serialize(), reference.serialize(), "{}", text);
            }
        }

        #[test]
        fn stack_conversion_matches_for_prices(mantissa in 0u64..1 << 53, scale in 0i32..20) {
            let value = mantissa as f64 / 10f64.powi(scale);
            let reference = Decimal::from_str_exact(&value.to_string()).unwrap();
            let fast = decimal_from_f64("x", value).unwrap();
            proptest::prop_assert_eq!(fast.serialize(), reference.serialize());
            let fast = decimal_from_f64("x", -value).unwrap();
            let reference = Decimal::from_str_exact(&(-value).to_string()).unwrap();
            proptest::prop_assert_eq!(fast.serialize(), reference.serialize());
        }
    }

    proptest::proptest! {
        #[test]
        fn short_conversion_matches_the_shortest_text(
            mantissa in 0i64..1_000_000_000_000_000,
            decimals in 0i32..16,
            max in 0u32..16,
        ) {
            for value in [mantissa as f64 / 10f64.powi(decimals), -(mantissa as f64) / 10f64.powi(decimals)] {
                if let Some(short) = short_decimal_from_f64(value, max) {
                    let text = Decimal::from_str_exact(&value.to_string()).unwrap();
                    proptest::prop_assert_eq!(short.serialize(), text.serialize(), "{}", value);
                    proptest::prop_assert!(short.scale() <= max);
                }
            }
        }
    }

    #[test]
    fn shortest_text_reads_every_form_of_the_formatter() {
        for (text, expected) in [
            ("1.0", "1"),
            ("0.0", "0"),
            ("1e+16", "10000000000000000"),
            ("1.5e+20", "150000000000000000000"),
            ("1.2345e-7", "0.00000012345"),
            ("0.001234", "0.001234"),
            ("12340000000.0", "12340000000"),
            ("5e-28", "0.0000000000000000000000000005"),
        ] {
            let got = shortest_text_to_decimal(text.as_bytes()).unwrap();
            let want = Decimal::from_str_exact(expected).unwrap();
            assert_eq!(got.serialize(), want.serialize(), "{text}");
        }
        for text in ["5e-29", "1e+29", "", ".5", "e5", "1.2.3", "1e", "x"] {
            assert_eq!(shortest_text_to_decimal(text.as_bytes()), None, "{text}");
        }
        let negative_zero = decimal_from_f64("x", -0.0).unwrap();
        assert!(negative_zero.is_zero() && negative_zero.is_sign_negative());
        // Halfway between two shortest decimals `Display`'s choice stands (not the even one).
        let tie = 1_404_485_852_954_408.0_f64 + 0.25;
        assert_eq!(
            decimal_from_f64("x", tie).unwrap().to_string(),
            tie.to_string()
        );
        // Beyond the fast reader the long way still rounds tiny values and refuses huge ones.
        assert_eq!(decimal_from_f64("x", 1e-30).unwrap(), Decimal::ZERO);
        assert!(decimal_from_f64("x", 1e30).is_err());
    }

    #[test]
    fn short_conversion_takes_prices_and_leaves_long_floats() {
        assert_eq!(
            short_decimal_from_f64(24.975, 8).unwrap().to_string(),
            "24.975"
        );
        assert_eq!(short_decimal_from_f64(0.1, 8).unwrap().to_string(), "0.1");
        assert_eq!(
            short_decimal_from_f64(30120.0, 8).unwrap().to_string(),
            "30120"
        );
        assert_eq!(
            short_decimal_from_f64(-0.0001, 8).unwrap().to_string(),
            "-0.0001"
        );
        assert_eq!(short_decimal_from_f64(24.975, 2), None);
        assert_eq!(short_decimal_from_f64(0.1 + 0.2, 15), None);
        assert_eq!(short_decimal_from_f64(f64::NAN, 8), None);
        assert_eq!(short_decimal_from_f64(1e300, 8), None);
    }

    #[test]
    fn rounding_writes_the_grid_decimals_and_falls_back_for_long_values() {
        let tick = d("0.10");
        assert_eq!(
            round_to_grid(d("30120.07000000000001"), d("261.10"), tick, Rounding::Up).to_string(),
            "30120.10"
        );
        assert_eq!(
            round_to_step(d("5"), d("0.001"), Rounding::Down).to_string(),
            "5.000"
        );
        // 28 significant digits at scale 28 overflow the integer path: the decimal path
        // gives the value.
        let long = d("0.1234567890123456789012345678");
        assert_eq!(round_to_step(long, d("0.0001"), Rounding::Up), d("0.1235"));
        let huge = d("79228162514264337593543950335");
        assert_eq!(round_to_step(huge, d("0.5"), Rounding::Down), huge);
        assert_eq!(decimal_from_f64("p", -0.0).unwrap(), Decimal::ZERO);
        assert_eq!(decimal_from_f64("p", 1e-40).unwrap(), Decimal::ZERO);
        assert_eq!(
            decimal_from_f64("p", 1e27).unwrap().to_string(),
            "1000000000000000000000000000"
        );
    }

    #[test]
    fn decimal_to_f64_is_correctly_rounded() {
        assert_eq!(decimal_to_f64(d("0.1")), 0.1);
        assert_eq!(decimal_to_f64(d("11794.15000000")), 11794.15);
    }
}
