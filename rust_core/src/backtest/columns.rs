//! The fills and trades of a job as result columns: floats, or the exact values as
//! `decimal128(38, 12)` mantissas, the two forms the binding hands to Python.
//!
//! The integer replay writes them as it books each fill and trade (when
//! `BacktestOptions::columns` asks for them and no detail is kept), from the mantissas it
//! already holds: no `Decimal` is built, no row is written and read back, and a run of one
//! job hands its vectors over as they are. Every other job (the decimal replay, or the
//! rows kept for detail) is converted from its rows by [`ResultColumns::from_rows`], with
//! the conversions the rows' decimals give: both ways give the same bits (see
//! [`Amount`]).
//!
//! May not touch: positions or the replay's state; it only writes values it is given.

use crate::fixed::{decimal128_mantissa, small_mantissa_to_f64, Decimal, POW10_I128};

use super::ticks::Unrepresentable;
use super::{take_largest_column, to_f64, Direction, Fill, Trade};

/// The form of the amount columns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColumnForm {
    /// The nearest `f64` of each exact value.
    Floats,
    /// Each exact value as its mantissa at [`EXACT_SCALE`] decimals, 16 bytes
    /// little-endian: Arrow's `decimal128(38, 12)` layout.
    Exact,
}

/// Decimals of the exact columns (`pyquant.backtest.EXACT`, `Decimal(38, 12)`).
pub const EXACT_SCALE: u32 = 12;

/// An amount of the integer replay, `mantissa / 10^scale`, that a row would hold as the
/// decimal with `decimals` decimals (at most `scale`; the mantissa is then a multiple of
/// `10^(scale - decimals)`).
///
/// Its float and exact mantissa depend only on the value, so they are the ones the row's
/// decimal gives: a float by one correctly rounded division where that applies to this
/// representation (then it applies to the row's, whose mantissa and scale are no larger,
/// and both round the same value), else from the row's decimal itself; the mantissa at 12
/// decimals is the value times 10^12, or none.
#[derive(Debug, Clone, Copy)]
pub(super) struct Amount {
    pub(super) mantissa: i128,
    pub(super) scale: u32,
    pub(super) decimals: u32,
}

impl Amount {
    /// An amount written with its own decimals (a price, a quantity).
    pub(super) fn new(mantissa: i128, scale: u32) -> Self {
        Self {
            mantissa,
            scale,
            decimals: scale,
        }
    }

    /// An amount of money at the job's `scale`, written with `decimals`.
    pub(super) fn written(mantissa: i128, scale: u32, decimals: u32) -> Self {
        Self {
            mantissa,
            scale,
            decimals,
        }
    }

    /// The decimal a row holds (`Money::decimal_with`).
    fn decimal(&self) -> Result<Decimal, Unrepresentable> {
        debug_assert!(self.decimals <= self.scale);
        let mantissa = if self.decimals == self.scale {
            self.mantissa
        } else {
            let factor = POW10_I128
                .get(self.scale.saturating_sub(self.decimals) as usize)
                .ok_or(Unrepresentable)?;
            self.mantissa / factor
        };
        Decimal::try_from_i128_with_scale(mantissa, self.decimals).map_err(|_| Unrepresentable)
    }

    /// `to_f64` of the row's decimal.
    #[allow(clippy::inline_always)] // a few instructions per amount of every fill
    #[inline(always)]
    fn float(&self) -> Result<f64, Unrepresentable> {
        match small_mantissa_to_f64(self.mantissa, self.scale) {
            Some(value) => Ok(value),
            None => self.decimal().map(to_f64),
        }
    }

    /// `decimal128_mantissa(decimal, 12)` of the row's decimal; `Err` when the row could
    /// not hold it (the job then reruns the decimal way, as the row would have made it).
    #[allow(clippy::inline_always)]
    #[inline(always)]
    fn exact(&self) -> Result<Option<i128>, Unrepresentable> {
        const POW10_I64: [i64; 13] = {
            let mut table = [1i64; 13];
            let mut k = 1;
            while k < table.len() {
                table[k] = table[k - 1] * 10;
                k += 1;
            }
            table
        };
        // The usual amount: a 64-bit mantissa with at most 12 decimals (the row's decimal
        // holds it, and the product is below 10^38).
        if let (Ok(small), Some(&factor)) = (
            i64::try_from(self.mantissa),
            POW10_I64.get(EXACT_SCALE.wrapping_sub(self.scale) as usize),
        ) {
            return Ok(Some(i128::from(small) * i128::from(factor)));
        }
        self.decimal()
            .map(|decimal| decimal128_mantissa(decimal, EXACT_SCALE))
    }
}

/// The nearest `f64` of each of `N` exact columns, or their mantissas at 12 decimals
/// (`None` once a value has none: the caller then asks for the decimal text).
#[derive(Debug, Clone)]
pub enum Amounts<const N: usize> {
    Floats([Vec<f64>; N]),
    Exact(Option<[Vec<u8>; N]>),
}

impl<const N: usize> Amounts<N> {
    fn new(form: ColumnForm) -> Self {
        match form {
            ColumnForm::Floats => Self::Floats(std::array::from_fn(|_| take_largest_column())),
            ColumnForm::Exact => Self::Exact(Some(std::array::from_fn(|_| take_largest_column()))),
        }
    }

    #[allow(clippy::inline_always)]
    #[inline(always)]
    fn push(&mut self, values: &[Amount; N]) -> Result<(), Unrepresentable> {
        match self {
            Self::Floats(columns) => {
                for (column, value) in columns.iter_mut().zip(values) {
                    column.push(value.float()?);
                }
            }
            Self::Exact(columns) => {
                // Every value is read: one the row could not hold ends the job, whatever
                // became of the columns. Each mantissa goes straight into its column (a
                // 16-byte value stored and read back stalls the load on the store).
                let mut complete = true;
                for (k, value) in values.iter().enumerate() {
                    let mantissa = value.exact()?;
                    match (columns.as_mut(), mantissa) {
                        (Some(columns), Some(m)) => columns[k].extend_from_slice(&m.to_le_bytes()),
                        (Some(_), None) => complete = false,
                        (None, _) => {}
                    }
                }
                if !complete {
                    if let Some(columns) = columns.take() {
                        give_back_bytes(columns);
                    }
                }
            }
        }
        Ok(())
    }

    fn push_mantissas(&mut self, mantissas: [Option<i128>; N]) {
        let Self::Exact(Some(columns)) = self else {
            return;
        };
        if mantissas.iter().all(Option::is_some) {
            for (column, mantissa) in columns.iter_mut().zip(mantissas) {
                column.extend_from_slice(&mantissa.unwrap_or_default().to_le_bytes());
            }
        } else {
            give_back_bytes(columns.each_mut().map(std::mem::take));
            *self = Self::Exact(None);
        }
    }

    /// The amounts of a row's decimals.
    fn push_decimals(&mut self, values: [Decimal; N]) {
        match self {
            Self::Floats(columns) => {
                for (column, value) in columns.iter_mut().zip(values) {
                    column.push(to_f64(value));
                }
            }
            Self::Exact(_) => {
                self.push_mantissas(values.map(|value| decimal128_mantissa(value, EXACT_SCALE)));
            }
        }
    }

    fn give_back(self) {
        match self {
            Self::Floats(columns) => columns.into_iter().for_each(super::give_column),
            Self::Exact(Some(columns)) => give_back_bytes(columns),
            Self::Exact(None) => {}
        }
    }
}

fn give_back_bytes<const N: usize>(columns: [Vec<u8>; N]) {
    columns.into_iter().for_each(super::give_bytes);
}

/// The fill rows of a job as columns.
#[derive(Debug, Clone)]
pub struct FillColumns {
    pub trade: Vec<u32>,
    pub sequence: Vec<u32>,
    pub reason: Vec<u8>,
    pub time_ms: Vec<i64>,
    pub side: Vec<i8>,
    /// Price, quantity, fee and `PnL`.
    pub amounts: Amounts<4>,
    pub r: Vec<f64>,
}

/// The trade rows of a job as columns.
#[derive(Debug, Clone)]
pub struct TradeColumns {
    pub trade: Vec<u32>,
    pub side: Vec<i8>,
    pub entry_time_ms: Vec<i64>,
    pub exit_time_ms: Vec<i64>,
    /// Entry price, quantity, initial stop, risk price, `PnL` and fees.
    pub amounts: Amounts<6>,
    /// Risk price times quantity, in floats.
    pub risk_usd: Vec<f64>,
    /// `PnL` over the risk in USDT, in floats (NaN for no risk).
    pub r_multiple: Vec<f64>,
    /// The entry's confidence, NaN for none.
    pub confidence: Vec<f64>,
    pub reason: Vec<u8>,
    pub bars_held: Vec<u32>,
}

/// A job's fills and trades as columns.
#[derive(Debug, Clone)]
pub struct ResultColumns {
    pub fills: FillColumns,
    pub trades: TradeColumns,
}

/// One fill's facts besides its amounts.
pub(super) struct FillFacts {
    pub(super) trade: u32,
    pub(super) sequence: u32,
    pub(super) reason: u8,
    pub(super) time_ms: i64,
    pub(super) direction: Direction,
    pub(super) r: f64,
}

/// One trade's facts besides its amounts.
pub(super) struct TradeFacts {
    pub(super) trade: u32,
    pub(super) direction: Direction,
    pub(super) entry_time_ms: i64,
    pub(super) exit_time_ms: i64,
    pub(super) confidence: Option<f64>,
    pub(super) exit_reason: u8,
    pub(super) bars_held: u32,
}

fn side_of(direction: Direction) -> i8 {
    match direction {
        Direction::Long => 1,
        Direction::Short => -1,
    }
}

/// `r_multiple`: the `PnL` over the risk in USDT, NaN without risk.
fn r_multiple(pnl: f64, risk: f64, no_risk: bool) -> f64 {
    // A ratio for analysis, in floats: a 28-digit decimal division per trade cost more
    // than the rest of the row, for a value then rounded to a double anyway.
    if no_risk {
        f64::NAN
    } else {
        pnl / risk
    }
}

impl ResultColumns {
    pub fn new(form: ColumnForm) -> Self {
        Self {
            fills: FillColumns {
                trade: take_largest_column(),
                sequence: take_largest_column(),
                reason: take_largest_column(),
                time_ms: take_largest_column(),
                side: take_largest_column(),
                amounts: Amounts::new(form),
                r: take_largest_column(),
            },
            trades: TradeColumns {
                trade: take_largest_column(),
                side: take_largest_column(),
                entry_time_ms: take_largest_column(),
                exit_time_ms: take_largest_column(),
                amounts: Amounts::new(form),
                risk_usd: take_largest_column(),
                r_multiple: take_largest_column(),
                confidence: take_largest_column(),
                reason: take_largest_column(),
                bars_held: take_largest_column(),
            },
        }
    }

    /// The columns of rows (a job replayed the decimal way, or with detail).
    pub fn from_rows(fills: &[Fill], trades: &[Trade], form: ColumnForm) -> Self {
        let mut columns = Self::new(form);
        for f in fills {
            columns.fills.push_facts(&FillFacts {
                trade: f.trade,
                sequence: f.sequence,
                reason: f.reason,
                time_ms: f.time_ms,
                direction: f.direction,
                r: f.r,
            });
            columns
                .fills
                .amounts
                .push_decimals([f.price, f.quantity, f.fee, f.pnl]);
        }
        for t in trades {
            let risk = t.risk_price * t.quantity;
            let risk_f = to_f64(risk);
            columns.trades.push_facts(
                &TradeFacts {
                    trade: t.trade,
                    direction: t.direction,
                    entry_time_ms: t.entry_time_ms,
                    exit_time_ms: t.exit_time_ms,
                    confidence: t.confidence,
                    exit_reason: t.exit_reason,
                    bars_held: t.bars_held,
                },
                risk_f,
                r_multiple(to_f64(t.pnl), risk_f, risk.is_zero()),
            );
            columns.trades.amounts.push_decimals([
                t.entry_price,
                t.quantity,
                t.initial_stop,
                t.risk_price,
                t.pnl,
                t.fees,
            ]);
        }
        columns
    }

    /// Gives every column back to its pool.
    pub fn give_back(self) {
        let Self { fills, trades } = self;
        let FillColumns {
            trade,
            sequence,
            reason,
            time_ms,
            side,
            amounts,
            r,
        } = fills;
        super::give_column(trade);
        super::give_column(sequence);
        super::give_column(reason);
        super::give_column(time_ms);
        super::give_column(side);
        amounts.give_back();
        super::give_column(r);
        let TradeColumns {
            trade,
            side,
            entry_time_ms,
            exit_time_ms,
            amounts,
            risk_usd,
            r_multiple,
            confidence,
            reason,
            bars_held,
        } = trades;
        super::give_column(trade);
        super::give_column(side);
        super::give_column(entry_time_ms);
        super::give_column(exit_time_ms);
        amounts.give_back();
        super::give_column(risk_usd);
        super::give_column(r_multiple);
        super::give_column(confidence);
        super::give_column(reason);
        super::give_column(bars_held);
    }
}

impl FillColumns {
    pub fn len(&self) -> usize {
        self.trade.len()
    }

    pub fn is_empty(&self) -> bool {
        self.trade.is_empty()
    }

    #[allow(clippy::inline_always)]
    #[inline(always)]
    fn push_facts(&mut self, facts: &FillFacts) {
        self.trade.push(facts.trade);
        self.sequence.push(facts.sequence);
        self.reason.push(facts.reason);
        self.time_ms.push(facts.time_ms);
        self.side.push(side_of(facts.direction));
        self.r.push(facts.r);
    }

    /// A fill the integer replay booked: its facts and its price, quantity, fee and `PnL`.
    #[allow(clippy::inline_always)] // once per fill, on the booking's path
    #[inline(always)]
    pub(super) fn push(
        &mut self,
        facts: &FillFacts,
        amounts: &[Amount; 4],
    ) -> Result<(), Unrepresentable> {
        self.amounts.push(amounts)?;
        self.push_facts(facts);
        Ok(())
    }
}

impl TradeColumns {
    pub fn len(&self) -> usize {
        self.trade.len()
    }

    pub fn is_empty(&self) -> bool {
        self.trade.is_empty()
    }

    #[allow(clippy::inline_always)]
    #[inline(always)]
    fn push_facts(&mut self, facts: &TradeFacts, risk_usd: f64, r_multiple: f64) {
        self.trade.push(facts.trade);
        self.side.push(side_of(facts.direction));
        self.entry_time_ms.push(facts.entry_time_ms);
        self.exit_time_ms.push(facts.exit_time_ms);
        self.risk_usd.push(risk_usd);
        self.r_multiple.push(r_multiple);
        self.confidence.push(facts.confidence.unwrap_or(f64::NAN));
        self.reason.push(facts.exit_reason);
        self.bars_held.push(facts.bars_held);
    }

    /// A trade the integer replay closed: its facts and its entry price, quantity,
    /// initial stop, risk price, `PnL` and fees (`[entry, quantity, stop, risk, pnl, fees]`).
    #[allow(clippy::inline_always)]
    #[inline(always)]
    pub(super) fn push(
        &mut self,
        facts: &TradeFacts,
        amounts: &[Amount; 6],
    ) -> Result<(), Unrepresentable> {
        let [_, quantity, _, risk_price, pnl, _] = amounts;
        // The row's `risk_price * quantity`: exact while the product keeps within 96
        // bits and 28 decimals, as `rust_decimal` multiplies; else its own product.
        let product = risk_price
            .mantissa
            .checked_mul(quantity.mantissa)
            .filter(|p| p.unsigned_abs() < 1 << 96 && risk_price.scale + quantity.scale <= 28);
        let (risk_f, no_risk) = if let Some(p) = product {
            let risk = Amount::new(p, risk_price.scale + quantity.scale);
            (risk.float()?, p == 0)
        } else {
            let risk = risk_price.decimal()? * quantity.decimal()?;
            (to_f64(risk), risk.is_zero())
        };
        self.amounts.push(amounts)?;
        self.push_facts(facts, risk_f, r_multiple(pnl.float()?, risk_f, no_risk));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exit::test_support::d;

    fn floats_of(amount: Amount) -> f64 {
        let mut amounts = Amounts::<1>::new(ColumnForm::Floats);
        amounts.push(&[amount]).unwrap();
        match amounts {
            Amounts::Floats([column]) => column[0],
            Amounts::Exact(_) => unreachable!(),
        }
    }

    fn exact_of(amount: Amount) -> Option<i128> {
        let mut amounts = Amounts::<1>::new(ColumnForm::Exact);
        amounts.push(&[amount]).unwrap();
        match amounts {
            Amounts::Exact(Some([column])) => {
                Some(i128::from_le_bytes(column[..16].try_into().unwrap()))
            }
            Amounts::Exact(None) => None,
            Amounts::Floats(_) => unreachable!(),
        }
    }

    proptest::proptest! {
        /// An amount's float and exact mantissa are those of the decimal a row holds,
        /// over mantissas around 2^53, 2^63 and 2^96 and every scale a job can have.
        #[test]
        fn amounts_convert_as_the_rows_decimal(
            reduced in proptest::prop_oneof![
                -10_000_000i128..10_000_000,
                -(1i128 << 54)..(1i128 << 54),
                -(1i128 << 64)..(1i128 << 64),
                -(1i128 << 95)..(1i128 << 95),
            ],
            decimals in 0u32..29,
            extra in 0u32..12,
        ) {
            let scale = decimals + extra;
            proptest::prop_assume!(scale <= 28);
            let Some(mantissa) = reduced.checked_mul(POW10_I128[extra as usize]) else {
                return Ok(());
            };
            let amount = Amount::written(mantissa, scale, decimals);
            let row = Decimal::try_from_i128_with_scale(reduced, decimals).unwrap();
            proptest::prop_assert_eq!(floats_of(amount).to_bits(), to_f64(row).to_bits());
            proptest::prop_assert_eq!(exact_of(amount), decimal128_mantissa(row, EXACT_SCALE));
        }
    }

    #[test]
    fn an_amount_beyond_the_exact_scale_has_no_mantissa_and_ends_the_exact_columns() {
        // 0.0000000000001: a 13th decimal.
        let amount = Amount::new(1, 13);
        assert_eq!(exact_of(amount), None);
        // 0.00000000000010 written with 14 decimals is 1e-13 too: none.
        assert_eq!(exact_of(Amount::new(10, 14)), None);
        // 0.000000000001 with 14 decimals is 1e-12: its mantissa is 1.
        assert_eq!(exact_of(Amount::new(100, 14)), Some(1));
        assert_eq!(
            floats_of(Amount::new(300_001, 1)).to_bits(),
            30_000.1f64.to_bits()
        );
        assert_eq!(d("30000.1"), Amount::new(300_001, 1).decimal().unwrap());
    }
}
