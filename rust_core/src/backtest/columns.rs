//! The fills and trades of a job in the values of their result columns: floats, or the
//! exact values as `decimal128(38, 12)` mantissas, the two forms the binding hands to
//! Python. Each fill and trade is one plain record and one row of amounts (two writes,
//! where a vector per column took ten to fifteen); the binding lays them out as columns.
//!
//! The integer replay writes them as it books each fill and trade (when
//! `BacktestOptions::columns` asks for them and no detail is kept), from the mantissas it
//! already holds: no `Decimal` is built and no `Fill` row is written and read back. Every
//! other job (the decimal replay, or the rows kept for detail) is converted from its rows
//! by [`ResultColumns::from_rows`], with the conversions the rows' decimals give: both ways
//! give the same bits (see [`Amount`]).
//!
//! May not touch: positions or the replay's state; it only writes values it is given.

use crate::fixed::{
    decimal128_mantissa, small_mantissa_at, small_mantissa_to_f64, Decimal, POW10_I128,
};

use super::spare::Spare;
use super::ticks::Unrepresentable;
use super::{to_f64, Direction, Fill, Trade};

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
    /// Its float, when the caller already worked it out ([`Amount::with_float`]); NaN when
    /// not (no amount's float is NaN).
    known: f64,
}

impl Amount {
    /// An amount written with its own decimals (a price, a quantity).
    pub(super) fn new(mantissa: i128, scale: u32) -> Self {
        Self::written(mantissa, scale, scale)
    }

    /// An amount of money at the job's `scale`, written with `decimals`.
    pub(super) fn written(mantissa: i128, scale: u32, decimals: u32) -> Self {
        Self {
            mantissa,
            scale,
            decimals,
            known: f64::NAN,
        }
    }

    /// The amount whose [`Amount::float`] the caller worked out already (the entry price
    /// and risk of a trade, a fill's price for its `r`): a division less per value.
    pub(super) fn with_float(self, float: f64) -> Self {
        debug_assert_eq!(
            self.float_of_value().ok().map(f64::to_bits),
            Some(float.to_bits())
        );
        Self {
            known: float,
            ..self
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

    /// `to_f64` of the row's decimal (of a price: without building it).
    #[allow(clippy::inline_always)] // a few instructions per amount of every fill
    #[inline(always)]
    pub(super) fn float(&self) -> Result<f64, Unrepresentable> {
        if !self.known.is_nan() {
            return Ok(self.known);
        }
        self.float_of_value()
    }

    #[allow(clippy::inline_always)] // see `float`
    #[inline(always)]
    fn float_of_value(&self) -> Result<f64, Unrepresentable> {
        match small_mantissa_to_f64(self.mantissa, self.scale) {
            Some(value) => Ok(value),
            None => self.decimal().map(to_f64),
        }
    }

    /// `decimal128_mantissa(decimal, 12)` of the row's decimal; `Err` when the row could
    /// not hold it (the job then reruns the decimal way, as the row would have made it).
    fn exact(&self) -> Result<Option<i128>, Unrepresentable> {
        // The usual amount (the row's decimal holds it, being no longer).
        if let Some(mantissa) = small_mantissa_at(self.mantissa, self.scale, EXACT_SCALE) {
            return Ok(Some(mantissa));
        }
        self.decimal()
            .map(|decimal| decimal128_mantissa(decimal, EXACT_SCALE))
    }

    /// The value's mantissa with `scale` decimals in 64 bits (an exact row's, see
    /// [`ExactRows`]), `None` when it has none; `Err` as [`Amount::exact`].
    #[allow(clippy::inline_always)] // once per value of every exact row
    #[inline(always)]
    fn exact_at(&self, scale: u32) -> Result<Option<i64>, Unrepresentable> {
        // The integer replay's amounts come at their column's scale: a mantissa of 64
        // bits is then the row's (whose decimal holds it: under 2^96, at most 28 decimals).
        if self.scale == scale {
            if let Ok(mantissa) = i64::try_from(self.mantissa) {
                return Ok(Some(mantissa));
            }
        }
        self.exact_at_the_long_way(scale)
    }

    // Out of line: inlined, the rare way made the booking of every fill slower.
    #[cold]
    #[inline(never)]
    fn exact_at_the_long_way(&self, scale: u32) -> Result<Option<i64>, Unrepresentable> {
        Ok(self
            .exact()?
            .and_then(|mantissa| mantissa_with(mantissa, scale)))
    }
}

/// Reads every value as a row would ([`Amount::exact`]) once the exact rows are gone: one
/// the row could not hold still ends the job.
#[cold]
#[inline(never)]
fn check_exact(values: &[Amount]) -> Result<(), Unrepresentable> {
    for value in values {
        value.exact()?;
    }
    Ok(())
}

/// A 12-decimal mantissa with `scale` decimals in 64 bits, when it has that many.
fn mantissa_with(mantissa: i128, scale: u32) -> Option<i64> {
    let at = if scale >= EXACT_SCALE {
        mantissa.checked_mul(*POW10_I128.get((scale - EXACT_SCALE) as usize)?)?
    } else {
        let factor = POW10_I128[(EXACT_SCALE - scale) as usize];
        (mantissa % factor == 0).then_some(mantissa / factor)?
    };
    i64::try_from(at).ok()
}

/// A mantissa with `scale` decimals as one with 12 (`decimal128(38, 12)`'s), when it has
/// no more than 12 (the binding lays the exact columns out with it).
#[allow(clippy::inline_always)] // once per exact value laid out
#[inline(always)]
pub fn widened(mantissa: i64, scale: u32) -> Option<i128> {
    if scale <= EXACT_SCALE {
        return Some(i128::from(mantissa) * POW10_I128[(EXACT_SCALE - scale) as usize]);
    }
    let divisor = *POW10_I128.get((scale - EXACT_SCALE) as usize)?;
    let mantissa = i128::from(mantissa);
    (mantissa % divisor == 0).then_some(mantissa / divisor)
}

/// Exact amounts, row by row: each value's mantissa with its column's decimals, in 64 bits
/// (half the bytes of a 12-decimal `i128`, written at every fill); the binding widens each
/// to 12 decimals as it lays the columns out ([`widened`]).
#[derive(Debug, Clone)]
pub struct ExactRows<const N: usize> {
    pub rows: Vec<[i64; N]>,
    /// The decimals of each column's mantissas.
    pub scales: [u32; N],
}

impl<const N: usize> ExactRows<N> {
    /// Each row's values as 12-decimal mantissas; `None` when one has more decimals.
    pub fn widened(&self) -> Option<Vec<[i128; N]>> {
        self.rows
            .iter()
            .map(|row| {
                let mut out = [0i128; N];
                for (k, &value) in row.iter().enumerate() {
                    out[k] = widened(value, self.scales[k])?;
                }
                Some(out)
            })
            .collect()
    }
}

/// The amounts of each row: the nearest `f64` of each of `N` exact values, or their
/// mantissas ([`ExactRows`]; `None` once a value has none: the caller then asks for the
/// decimal text).
#[derive(Debug, Clone)]
pub enum Amounts<const N: usize> {
    Floats(Vec<[f64; N]>),
    Exact(Option<ExactRows<N>>),
}

/// Spare row vectors, kept from one run for the next (see `spare`).
trait SpareRows: Sized + 'static {
    fn spare() -> &'static Spare<Self>;
}

macro_rules! spare_rows {
    ($($row:ty => $pool:ident),*) => {
        $(
            static $pool: Spare<$row> = Spare::new();
            impl SpareRows for $row {
                fn spare() -> &'static Spare<Self> {
                    &$pool
                }
            }
        )*
    };
}

spare_rows!(
    FillRecord => SPARE_FILL_RECORDS,
    TradeRecord => SPARE_TRADE_RECORDS,
    [f64; 4] => SPARE_FILL_FLOATS,
    [f64; 6] => SPARE_TRADE_FLOATS,
    [i64; 4] => SPARE_FILL_EXACT,
    [i64; 6] => SPARE_TRADE_EXACT
);

fn take_rows<T: SpareRows>() -> Vec<T> {
    T::spare().take_largest()
}

fn give_rows<T: SpareRows>(rows: Vec<T>) {
    T::spare().give(rows);
}

// Bounded by the pools of the two lengths used (fills 4, trades 6); nothing outside this
// module builds amounts.
#[allow(private_bounds)]
impl<const N: usize> Amounts<N>
where
    [f64; N]: SpareRows,
    [i64; N]: SpareRows,
{
    /// Rows of `form`; exact mantissas with `scales` decimals per column.
    fn new(form: ColumnForm, scales: [u32; N]) -> Self {
        match form {
            ColumnForm::Floats => Self::Floats(take_rows()),
            ColumnForm::Exact => Self::Exact(Some(ExactRows {
                rows: take_rows(),
                scales,
            })),
        }
    }

    // Each value is written in place, into a row pushed as zeros: a row assembled on the
    // stack and copied in was read back with wide loads right after narrow stores, and
    // each such load stalled on the store forwarding.
    #[allow(clippy::inline_always)] // once per fill and trade
    #[inline(always)]
    fn push(&mut self, values: &[Amount; N]) -> Result<(), Unrepresentable> {
        match self {
            Self::Floats(rows) => {
                rows.push([0.0; N]);
                let row = rows.last_mut().ok_or(Unrepresentable)?;
                for (slot, value) in row.iter_mut().zip(values) {
                    *slot = value.float()?;
                }
            }
            Self::Exact(rows) => {
                // Every value is read: one the row could not hold ends the job, whatever
                // became of the rows.
                let mut complete = true;
                let Some(exact) = rows.as_mut() else {
                    return check_exact(values);
                };
                exact.rows.push([0; N]);
                let scales = exact.scales;
                let row = exact.rows.last_mut().ok_or(Unrepresentable)?;
                for (k, value) in values.iter().enumerate() {
                    match value.exact_at(scales[k])? {
                        Some(mantissa) => row[k] = mantissa,
                        None => complete = false,
                    }
                }
                if !complete {
                    if let Some(exact) = rows.take() {
                        give_rows(exact.rows);
                    }
                }
            }
        }
        Ok(())
    }

    /// The amounts of a row's decimals.
    fn push_decimals(&mut self, values: [Decimal; N]) {
        match self {
            Self::Floats(rows) => rows.push(values.map(to_f64)),
            Self::Exact(rows) => {
                let Some(exact) = rows.as_mut() else {
                    return;
                };
                let scales = exact.scales;
                let mut row = [0; N];
                for (k, value) in values.into_iter().enumerate() {
                    let mantissa = decimal128_mantissa(value, EXACT_SCALE)
                        .and_then(|mantissa| mantissa_with(mantissa, scales[k]));
                    let Some(mantissa) = mantissa else {
                        if let Some(exact) = rows.take() {
                            give_rows(exact.rows);
                        }
                        return;
                    };
                    row[k] = mantissa;
                }
                exact.rows.push(row);
            }
        }
    }

    fn give_back(self) {
        match self {
            Self::Floats(rows) => give_rows(rows),
            Self::Exact(Some(exact)) => give_rows(exact.rows),
            Self::Exact(None) => {}
        }
    }
}

/// A fill's values besides its amounts, as its result columns hold them.
#[derive(Debug, Clone, Copy)]
pub struct FillRecord {
    pub time_ms: i64,
    /// Price move from the entry in units of the initial R.
    pub r: f64,
    pub trade: u32,
    pub sequence: u32,
    pub reason: u8,
    /// 1 for LONG, -1 for SHORT.
    pub side: i8,
}

/// A trade's values besides its amounts, as its result columns hold them.
#[derive(Debug, Clone, Copy)]
pub struct TradeRecord {
    pub entry_time_ms: i64,
    pub exit_time_ms: i64,
    /// Risk price times quantity, in floats.
    pub risk_usd: f64,
    /// `PnL` over the risk in USDT, in floats (NaN for no risk).
    pub r_multiple: f64,
    /// The entry's confidence, NaN for none.
    pub confidence: f64,
    pub trade: u32,
    pub bars_held: u32,
    pub reason: u8,
    /// 1 for LONG, -1 for SHORT.
    pub side: i8,
}

/// The fills of a job, row by row, in the values of their result columns: one record
/// and one row of amounts each (two writes per fill, where a vector per column took ten);
/// the binding lays them out as columns.
#[derive(Debug, Clone)]
pub struct FillColumns {
    pub records: Vec<FillRecord>,
    /// Price, quantity, fee and `PnL`.
    pub amounts: Amounts<4>,
}

/// The trades of a job, row by row, in the values of their result columns (see
/// [`FillColumns`]).
#[derive(Debug, Clone)]
pub struct TradeColumns {
    pub records: Vec<TradeRecord>,
    /// Entry price, quantity, initial stop, risk price, `PnL` and fees.
    pub amounts: Amounts<6>,
}

/// A job's fills and trades in the values of their result columns.
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
    /// Empty columns of `form`; the exact amounts of a price, a quantity and money with
    /// `price`, `quantity` and `money` decimals.
    pub fn new(form: ColumnForm, price: u32, quantity: u32, money: u32) -> Self {
        Self {
            fills: FillColumns {
                records: take_rows(),
                amounts: Amounts::new(form, [price, quantity, money, money]),
            },
            trades: TradeColumns {
                records: take_rows(),
                amounts: Amounts::new(form, [price, quantity, price, price, money, money]),
            },
        }
    }

    /// The values of rows (a job replayed the decimal way, or with detail).
    pub fn from_rows(fills: &[Fill], trades: &[Trade], form: ColumnForm) -> Self {
        // The exact amounts with as many decimals as the rows' values have (at most 12):
        // each a price, a quantity or money.
        let decimals = |values: &mut dyn Iterator<Item = Decimal>| {
            values
                .map(|v| v.scale().min(EXACT_SCALE))
                .max()
                .unwrap_or(0)
        };
        let price = decimals(
            &mut fills.iter().map(|f| f.price).chain(
                trades
                    .iter()
                    .flat_map(|t| [t.entry_price, t.initial_stop, t.risk_price]),
            ),
        );
        let quantity = decimals(
            &mut fills
                .iter()
                .map(|f| f.quantity)
                .chain(trades.iter().map(|t| t.quantity)),
        );
        let money = decimals(
            &mut fills
                .iter()
                .flat_map(|f| [f.fee, f.pnl])
                .chain(trades.iter().flat_map(|t| [t.pnl, t.fees])),
        );
        let mut columns = Self::new(form, price, quantity, money);
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

    /// Gives every row vector back to its pool.
    pub fn give_back(self) {
        let Self { fills, trades } = self;
        give_rows(fills.records);
        fills.amounts.give_back();
        give_rows(trades.records);
        trades.amounts.give_back();
    }
}

impl FillColumns {
    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    #[allow(clippy::inline_always)] // once per fill
    #[inline(always)]
    fn push_facts(&mut self, facts: &FillFacts) {
        self.records.push(FillRecord {
            time_ms: facts.time_ms,
            r: facts.r,
            trade: facts.trade,
            sequence: facts.sequence,
            reason: facts.reason,
            side: side_of(facts.direction),
        });
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
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    #[allow(clippy::inline_always)] // once per trade
    #[inline(always)]
    fn push_facts(&mut self, facts: &TradeFacts, risk_usd: f64, r_multiple: f64) {
        self.records.push(TradeRecord {
            entry_time_ms: facts.entry_time_ms,
            exit_time_ms: facts.exit_time_ms,
            risk_usd,
            r_multiple,
            confidence: facts.confidence.unwrap_or(f64::NAN),
            trade: facts.trade,
            bars_held: facts.bars_held,
            reason: facts.exit_reason,
            side: side_of(facts.direction),
        });
    }

    /// A trade the integer replay closed: its facts and its entry price, quantity,
    /// initial stop, risk price, `PnL` and fees (`[entry, quantity, stop, risk, pnl, fees]`).
    #[allow(clippy::inline_always)] // once per trade
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
        // The `PnL`'s float is in the row just written, when the rows are floats.
        let pnl_f = match &self.amounts {
            Amounts::Floats(rows) => rows.last().map(|row| row[4]),
            Amounts::Exact(_) => None,
        };
        let pnl_f = match pnl_f {
            Some(value) => value,
            None => pnl.float()?,
        };
        self.push_facts(facts, risk_f, r_multiple(pnl_f, risk_f, no_risk));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exit::test_support::d;

    fn floats_of(amount: Amount) -> f64 {
        let mut amounts = Amounts::<4>::new(ColumnForm::Floats, [amount.scale; 4]);
        amounts.push(&[amount; 4]).unwrap();
        match amounts {
            Amounts::Floats(rows) => rows[0][0],
            Amounts::Exact(_) => unreachable!(),
        }
    }

    /// The 12-decimal mantissa the exact columns lay out for `amount` written with
    /// `scale` decimals per column (the integer replay writes each at its own scale).
    fn exact_of(amount: Amount, scale: u32) -> Option<i128> {
        let mut amounts = Amounts::<4>::new(ColumnForm::Exact, [scale; 4]);
        amounts.push(&[amount; 4]).unwrap();
        match amounts {
            Amounts::Exact(Some(exact)) => exact.widened().map(|rows| rows[0][0]),
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
            // Laid out, the row's 12-decimal mantissa; none only where the row has none, or
            // where the mantissa with the column's decimals leaves 64 bits (the decimal text
            // then decides).
            let expected = decimal128_mantissa(row, EXACT_SCALE);
            for column_scale in [scale, decimals, EXACT_SCALE] {
                let got = exact_of(amount, column_scale);
                let wide = expected.is_some_and(|m| super::mantissa_with(m, column_scale).is_none());
                proptest::prop_assert!(
                    got == expected || (got.is_none() && wide),
                    "{amount:?} at {column_scale}: {got:?}, not {expected:?}"
                );
            }
            // At its own scale the usual amount (64 bits) always has its mantissa.
            if expected.is_some() && i64::try_from(mantissa).is_ok() && scale <= EXACT_SCALE {
                proptest::prop_assert_eq!(exact_of(amount, scale), expected);
            }
        }
    }

    #[test]
    fn an_amount_beyond_the_exact_scale_has_no_mantissa_and_ends_the_exact_columns() {
        // 0.0000000000001: a 13th decimal.
        let amount = Amount::new(1, 13);
        assert_eq!(exact_of(amount, 13), None);
        // 0.00000000000010 written with 14 decimals is 1e-13 too: none.
        assert_eq!(exact_of(Amount::new(10, 14), 14), None);
        // 0.000000000001 with 14 decimals is 1e-12: its mantissa is 1.
        assert_eq!(exact_of(Amount::new(100, 14), 14), Some(1));
        // A price of 30000.1 written with 1 decimal: 3000010^11 at 12.
        assert_eq!(
            exact_of(Amount::new(300_001, 1), 1),
            Some(300_001 * 10i128.pow(11))
        );
        assert_eq!(
            floats_of(Amount::new(300_001, 1)).to_bits(),
            30_000.1f64.to_bits()
        );
        assert_eq!(d("30000.1"), Amount::new(300_001, 1).decimal().unwrap());
    }
}
