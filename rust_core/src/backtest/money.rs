//! Fees and realized `PnL` of the backtest's fills as integer mantissas: a price is a grid
//! mantissa (`Grid::scale` decimals), a quantity lot units (`QtyUnits::scale` decimals),
//! money a mantissa with `scale` decimals, enough for every product below and for
//! the fee's 8.
//!
//! The decimal replay computes the same values with `rust_decimal`, which is exact while a
//! product keeps within 96 bits and 28 decimals; every step here checks the same bounds and
//! answers [`Unrepresentable`] beyond them (the job then reruns the decimal way), so the
//! two never differ by a rounding.
//!
//! May not touch: positions, fills or trades; it only computes amounts.

use crate::fixed::{Decimal, POW10_I128};

use super::ticks::{div_rem, mul, Unrepresentable};

/// The largest mantissa a `Decimal` holds exactly (96 bits).
const DECIMAL_LIMIT: u128 = 1 << 96;

/// The most decimals a `Decimal` holds.
const MAX_SCALE: u32 = 28;

fn exact(value: i128, scale: u32) -> Result<i128, Unrepresentable> {
    if value.unsigned_abs() < DECIMAL_LIMIT && scale <= MAX_SCALE {
        Ok(value)
    } else {
        Err(Unrepresentable)
    }
}

/// A fee rate as a mantissa and its decimals.
#[derive(Debug, Clone, Copy)]
pub(super) struct Rate {
    mantissa: i128,
    scale: u32,
    /// The rate's fee in 64-bit steps under one job's scales ([`Money::rate`]).
    fast: Option<FastFee>,
}

/// The constants of `rate * price * quantity` rounded to the fee's decimals and widened
/// to the job's, for operands that fit 64 bits: the rate's mantissa, the divisor down to
/// 8 decimals (1 for none) and the factor up to the job's scale.
#[derive(Debug, Clone, Copy)]
struct FastFee {
    rate: i64,
    divisor: i64,
    widen: i64,
}

impl Rate {
    pub(super) fn new(rate: Decimal) -> Self {
        Self {
            mantissa: rate.mantissa(),
            scale: rate.scale(),
            fast: None,
        }
    }
}

/// `10^k` in 64 bits, when it fits.
fn pow10_64(k: u32) -> Option<i64> {
    i64::try_from(*POW10_I128.get(k as usize)?).ok()
}

/// The scales of one job's amounts.
#[derive(Debug, Clone, Copy)]
pub(super) struct Money {
    price_scale: u32,
    qty_scale: u32,
    /// Decimals of every amount: those of a price times a quantity, at least the fee's 8.
    pub(super) scale: u32,
    /// `10^(scale - price_scale - qty_scale)` in 64 bits, when it fits: a gross `PnL`'s
    /// widening (see [`Money::gross`]).
    gross_widen: Option<i64>,
}

/// Decimals of a fee: commission in USDT is kept to 8.
const FEE_DECIMALS: u32 = 8;

impl Money {
    pub(super) fn new(price_scale: u32, qty_scale: u32) -> Result<Self, Unrepresentable> {
        let scale = (price_scale + qty_scale).max(FEE_DECIMALS);
        if scale > MAX_SCALE {
            return Err(Unrepresentable);
        }
        Ok(Self {
            price_scale,
            qty_scale,
            scale,
            gross_widen: pow10_64(scale - price_scale - qty_scale),
        })
    }

    /// `rate` with its fee's constants under these scales (see [`Money::fee`]).
    pub(super) fn rate(self, rate: Decimal) -> Rate {
        let mut planned = Rate::new(rate);
        let raw_scale = planned.scale + self.price_scale + self.qty_scale;
        let (divisor, widen) = if raw_scale > FEE_DECIMALS {
            (
                pow10_64(raw_scale - FEE_DECIMALS),
                pow10_64(self.scale - FEE_DECIMALS),
            )
        } else {
            (Some(1), pow10_64(self.scale - raw_scale))
        };
        if let (Ok(rate), Some(divisor), Some(widen), true) = (
            i64::try_from(planned.mantissa),
            divisor,
            widen,
            raw_scale <= MAX_SCALE,
        ) {
            planned.fast = Some(FastFee {
                rate,
                divisor,
                widen,
            });
        }
        planned
    }

    fn widen(self, value: i128, from: u32) -> Result<i128, Unrepresentable> {
        let factor = POW10_I128[(self.scale - from) as usize];
        mul(value, factor)
            .ok_or(Unrepresentable)
            .and_then(|v| exact(v, self.scale))
    }

    /// `rate * price * quantity` rounded half away from zero to 8 decimals, at `scale`.
    #[allow(clippy::inline_always)]
    #[inline(always)]
    pub(super) fn fee(
        self,
        rate: Rate,
        price: i128,
        quantity: i128,
    ) -> Result<i128, Unrepresentable> {
        // A planned rate ([`Money::rate`]) and 64-bit operands: the steps below with the
        // job's constants, each one instruction.
        if let (Some(fast), Ok(price), Ok(quantity)) =
            (rate.fast, i64::try_from(price), i64::try_from(quantity))
        {
            if let Some(raw) = fast
                .rate
                .checked_mul(price)
                .and_then(|p| p.checked_mul(quantity))
            {
                let rounded = if fast.divisor > 1 {
                    let (quotient, remainder) = (raw / fast.divisor, raw % fast.divisor);
                    let away = 2 * remainder.abs() >= fast.divisor;
                    quotient + if away { raw.signum() } else { 0 }
                } else {
                    raw
                };
                if let Some(fee) = rounded.checked_mul(fast.widen) {
                    return Ok(i128::from(fee));
                }
            }
        }
        let rate_price = rate.mantissa.checked_mul(price).ok_or(Unrepresentable)?;
        let rate_price = exact(rate_price, rate.scale + self.price_scale)?;
        let raw_scale = rate.scale + self.price_scale + self.qty_scale;
        let raw = exact(
            rate_price.checked_mul(quantity).ok_or(Unrepresentable)?,
            raw_scale,
        )?;
        let (fee, scale) = if raw_scale > FEE_DECIMALS {
            let divisor = POW10_I128[(raw_scale - FEE_DECIMALS) as usize];
            let (quotient, remainder) = div_rem(raw, divisor);
            let away = 2 * remainder.abs() >= divisor;
            (quotient + if away { raw.signum() } else { 0 }, FEE_DECIMALS)
        } else {
            (raw, raw_scale)
        };
        self.widen(fee, scale)
    }

    /// `(price - entry) * quantity * side`, at `scale`.
    #[inline]
    pub(super) fn gross(
        self,
        entry: i128,
        price: i128,
        quantity: i128,
        side: i64,
    ) -> Result<i128, Unrepresentable> {
        // 64-bit operands: a product below 2^63 is exact (under 2^96) and so is its
        // widening, when that fits too.
        if let (Some(widen), Ok(change), Ok(units)) = (
            self.gross_widen,
            i64::try_from(price - entry),
            i64::try_from(quantity),
        ) {
            if let Some(gross) = change
                .checked_mul(units)
                .and_then(|p| p.checked_mul(side))
                .and_then(|p| p.checked_mul(widen))
            {
                return Ok(i128::from(gross));
            }
        }
        let product = mul(price - entry, quantity).ok_or(Unrepresentable)?;
        let product = exact(product, self.price_scale + self.qty_scale)?;
        self.widen(
            product * i128::from(side),
            self.price_scale + self.qty_scale,
        )
    }

    /// `a + b`, kept exact.
    #[inline]
    pub(super) fn add(self, a: i128, b: i128) -> Result<i128, Unrepresentable> {
        exact(a.checked_add(b).ok_or(Unrepresentable)?, self.scale)
    }

    /// The decimal of an amount written with `decimals` (at most `scale`; the amount is a
    /// multiple of `10^(scale - decimals)`): the decimals `rust_decimal` gives the same
    /// value in the decimal replay, so both report identical decimals.
    // Always inlined: out of line, its `Result<Decimal>` went through memory, and reading
    // it back stalled on the store (a tenth of the integer replay's booking time).
    #[allow(clippy::inline_always)]
    #[inline(always)]
    pub(super) fn decimal_with(
        self,
        value: i128,
        decimals: u32,
    ) -> Result<Decimal, Unrepresentable> {
        let mantissa = if decimals == self.scale {
            value // the usual case: no division (a 64-bit one still costs dozens of cycles)
        } else {
            let factor = POW10_I128[(self.scale - decimals) as usize];
            let (mantissa, remainder) = div_rem(value, factor);
            debug_assert_eq!(remainder, 0);
            mantissa
        };
        Decimal::try_from_i128_with_scale(mantissa, decimals).map_err(|_| Unrepresentable)
    }

    /// Decimals of a fee at `rate`: those of `rate * price * quantity`, at most 8.
    pub(super) fn fee_decimals(self, rate: Rate) -> u32 {
        (rate.scale + self.price_scale + self.qty_scale).min(FEE_DECIMALS)
    }

    /// Decimals of a price difference times a quantity.
    pub(super) fn gross_decimals(self) -> u32 {
        self.price_scale + self.qty_scale
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exit::test_support::d;

    /// The decimal replay's fee: `(rate * price * quantity)` rounded half away from zero to
    /// 8 decimals.
    fn decimal_fee(rate: &str, price: &str, quantity: &str) -> Decimal {
        (d(rate) * d(price) * d(quantity))
            .round_dp_with_strategy(8, rust_decimal::RoundingStrategy::MidpointAwayFromZero)
    }

    proptest::proptest! {
        /// Fees and gross PnL in mantissas equal the decimal computation, over prices with
        /// 0 to 8 decimals, quantities with 0 to 8 and rates with 2 to 6.
        #[test]
        fn amounts_match_the_decimal_computation(
            price in 1u64..10_000_000_000,
            entry in 1u64..10_000_000_000,
            quantity in 1u64..10_000_000_000,
            rate in 0u64..1_000,
            price_scale in 0u32..9,
            qty_scale in 0u32..9,
            rate_scale in 2u32..7,
            long in proptest::bool::ANY,
        ) {
            let money = Money::new(price_scale, qty_scale).unwrap();
            let dec = |m: u64, s: u32| Decimal::from_i128_with_scale(i128::from(m), s);
            let (p, e, q, r) = (
                dec(price, price_scale),
                dec(entry, price_scale),
                dec(quantity, qty_scale),
                dec(rate, rate_scale),
            );
            let fee = money
                .fee(Rate::new(r), i128::from(price), i128::from(quantity))
                .unwrap();
            // The planned rate's 64-bit steps give the same fee.
            proptest::prop_assert_eq!(
                money.fee(money.rate(r), i128::from(price), i128::from(quantity)),
                Ok(fee)
            );
            let expected = decimal_fee(&r.to_string(), &p.to_string(), &q.to_string());
            proptest::prop_assert_eq!(money.decimal_with(fee, money.scale).unwrap(), expected);
            let side = if long { 1 } else { -1 };
            let gross = money
                .gross(i128::from(entry), i128::from(price), i128::from(quantity), side)
                .unwrap();
            proptest::prop_assert_eq!(
                money.decimal_with(gross, money.scale).unwrap(),
                (p - e) * q * Decimal::from(side)
            );
        }
    }

    #[test]
    fn a_fee_tie_at_the_eighth_decimal_rounds_away_from_zero() {
        let money = Money::new(1, 4).unwrap();
        // 0.0005 * 30000.1 * 0.0001 = 0.001500005, a tie at 8 decimals: away from zero.
        let fee = money.fee(Rate::new(d("0.0005")), 300_001, 1).unwrap();
        assert_eq!(
            money.decimal_with(fee, money.scale).unwrap(),
            d("0.00150001")
        );
        // Below the tie it rounds down: 0.0005 * 30000.0 * 0.0001 = 0.0015 exactly.
        let fee = money.fee(Rate::new(d("0.0005")), 300_000, 1).unwrap();
        assert_eq!(money.decimal_with(fee, money.scale).unwrap(), d("0.0015"));
        // 0.000000025 * 0.2 * 1 = 0.000000005, a tie at 8 decimals: away from zero.
        let money = Money::new(1, 0).unwrap();
        assert_eq!(
            money
                .decimal_with(money.fee(Rate::new(d("0.000000025")), 2, 1).unwrap(), 8)
                .unwrap(),
            d("0.00000001")
        );
    }
}
