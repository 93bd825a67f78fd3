//! Plausibility bounds of the engine's inputs: what a price, a quantity or an event
//! time may be before the state machine acts on it.
//!
//! Why: every price and quantity is a `Decimal` (at most about 7.9e28), and the exit
//! rules multiply and add them (`remainder × mark`, `entry + at × m × R`, a stop one
//! tick beyond the best price). Keeping each input inside these bounds keeps every such
//! step far inside the decimal range, so no arithmetic in `position.rs` can overflow;
//! an input outside them is refused with state untouched, never acted on.
//!
//! The bounds (exit-rules.md is silent on input bounds; this is their definition):
//! - a price (entry, mark, best, stop, level, liquidation) lies in
//!   `[minPrice / 10, maxPrice × 10]` of the symbol's `PRICE_FILTER` (a filter value of 0
//!   leaves that side open) and never above [`MAX_PRICE`] = 1e15. The factor 10 leaves
//!   room for a mark the filter would not let an order carry (a crash through
//!   `minPrice` must still stop a LONG out) while refusing the absurd (a mark in
//!   microdollars or a price typed with three extra zeros);
//! - a quantity is positive, at most [`MAX_QUANTITY`] = 1e12 and on the
//!   `MARKET_LOT_SIZE` step (exits are MARKET orders: an off-step quantity would be
//!   refused by Binance with -1111/-4023 on every retry);
//! - an event time is in `[0, MAX_EVENT_MS]` (year 2100; a time in microseconds is
//!   about 1.7e15 and lands far beyond), and, per update, not more than
//!   [`FUTURE_TOLERANCE_MS`] ahead of the engine's wall clock when the caller gave one,
//!   else not more than [`MAX_SILENT_JUMP_MS`] ahead of the last accepted event time.

use crate::error::CoreError;
use crate::fixed::Decimal;
use crate::rules::SymbolRules;

/// The largest price the engine accepts (1e15), whatever the filters say.
pub const MAX_PRICE: Decimal = Decimal::from_parts(2_764_472_320, 232_830, 0, false, 0);

/// The largest quantity the engine accepts (1e12).
pub const MAX_QUANTITY: Decimal = Decimal::from_parts(3_567_587_328, 232, 0, false, 0);

/// The largest price derived from an entry (a stop, a ladder level, an activation
/// threshold): at most 1e5 R beyond an entry of at most 1e15, so below 1e21.
pub fn max_derived_price() -> Decimal {
    MAX_PRICE * Decimal::from(1_000_000)
}

/// How far a plausible price may lie outside the symbol's `PRICE_FILTER` bounds.
const FILTER_FACTOR: Decimal = Decimal::from_parts(10, 0, 0, false, 0);

/// 2100-01-01T00:00:00Z in milliseconds: no event time is later.
pub const MAX_EVENT_MS: i64 = 4_102_444_800_000;

/// How far an update's event time may run ahead of the caller's wall clock (10 min).
pub const FUTURE_TOLERANCE_MS: i64 = 600_000;

/// Without a wall clock: how far an update may run ahead of the last accepted event
/// time (30 days; a daemon down longer passes its clock, see `on_mark_message`).
pub const MAX_SILENT_JUMP_MS: i64 = 30 * 86_400_000;

/// Largest sequence number a restored position may carry (2^53: exact in a float, a
/// JSON number and an `SQLite` integer; a position never emits that many actions).
pub const MAX_SEQUENCE: u64 = 1 << 53;

/// The plausible price band `(low, high)` of a symbol; `low` may be zero (exclusive).
pub fn price_band(rules: &SymbolRules) -> (Decimal, Decimal) {
    let filter = &rules.price_filter;
    let low = if filter.min_price > Decimal::ZERO {
        filter.min_price / FILTER_FACTOR
    } else {
        Decimal::ZERO
    };
    let high = if filter.max_price > Decimal::ZERO && filter.max_price < MAX_PRICE / FILTER_FACTOR {
        filter.max_price * FILTER_FACTOR
    } else {
        MAX_PRICE
    };
    (low, high)
}

/// Whether a mark (or any price) lies in the symbol's plausible band and is positive.
pub fn plausible_price(price: Decimal, rules: &SymbolRules) -> bool {
    // Per update on the hot path: inside the filter itself needs no arithmetic.
    let filter = &rules.price_filter;
    if price > Decimal::ZERO
        && price >= filter.min_price
        && price <= filter.max_price
        && filter.max_price <= MAX_PRICE
    {
        return true;
    }
    let (low, high) = price_band(rules);
    price > Decimal::ZERO && price >= low && price <= high
}

/// Refuses a price outside the plausible band, naming `field`.
///
/// # Errors
/// `CoreError::InvalidField` naming `field`, the value and the band.
pub fn check_price(field: &str, price: Decimal, rules: &SymbolRules) -> Result<(), CoreError> {
    if plausible_price(price, rules) {
        return Ok(());
    }
    let (low, high) = price_band(rules);
    Err(CoreError::invalid_for(
        &rules.symbol,
        field,
        price.to_string(),
        format!(
            "must be a price in [{}, {}] (PRICE_FILTER bounds widened tenfold, at most 1e15)",
            low.normalize(),
            high.normalize()
        ),
    ))
}

/// Refuses a quantity that is not positive, is above [`MAX_QUANTITY`] or is off the
/// `MARKET_LOT_SIZE` step (zero is allowed when `allow_zero`).
///
/// # Errors
/// `CoreError::InvalidField` naming `field` and the rule broken.
pub fn check_quantity(
    field: &str,
    quantity: Decimal,
    allow_zero: bool,
    rules: &SymbolRules,
) -> Result<(), CoreError> {
    let bad = |rule: String| {
        Err(CoreError::invalid_for(
            &rules.symbol,
            field,
            quantity.to_string(),
            rule,
        ))
    };
    let negative = quantity < Decimal::ZERO;
    if negative || (quantity.is_zero() && !allow_zero) {
        return bad(if allow_zero {
            "must be >= 0"
        } else {
            "must be > 0"
        }
        .to_owned());
    }
    if quantity > MAX_QUANTITY {
        return bad("must be at most 1e12".to_owned());
    }
    if !rules.is_on_qty_step(quantity, true) {
        return bad(format!(
            "is not on the MARKET_LOT_SIZE step {} (an exit order must be)",
            rules.qty_step(true).normalize()
        ));
    }
    Ok(())
}

/// An event time in `[0, MAX_EVENT_MS]` (the test of [`check_event_time`], for a hot path
/// that only needs the answer).
#[inline]
pub fn event_time_ok(time_ms: i64) -> bool {
    (0..=MAX_EVENT_MS).contains(&time_ms)
}

/// Refuses an event time outside `[0, MAX_EVENT_MS]`, naming `field`.
///
/// # Errors
/// `CoreError::InvalidField` naming `field`.
pub fn check_event_time(field: &str, time_ms: i64) -> Result<(), CoreError> {
    if event_time_ok(time_ms) {
        Ok(())
    } else {
        Err(CoreError::invalid(
            field,
            time_ms.to_string(),
            "must be an event time in milliseconds since the epoch, in [0, 4102444800000] (before 2100)",
        ))
    }
}

/// No confidence, or a number in [0, 1] (the test of [`check_confidence`]).
#[inline]
pub fn confidence_ok(confidence: Option<f64>) -> bool {
    confidence.is_none_or(|c| (0.0..=1.0).contains(&c))
}

/// Refuses a confidence that is not a number in [0, 1], naming `confidence`.
///
/// # Errors
/// `CoreError::InvalidField`.
pub fn check_confidence(confidence: Option<f64>) -> Result<(), CoreError> {
    match confidence {
        Some(c) if !confidence_ok(confidence) => Err(CoreError::invalid(
            "confidence",
            c.to_string(),
            "must be in [0, 1]",
        )),
        _ => Ok(()),
    }
}

/// A leverage in [1, 125] (the test of [`check_leverage`]).
#[inline]
pub fn leverage_ok(leverage: u32) -> bool {
    (1..=125).contains(&leverage)
}

/// Refuses a leverage outside [1, 125].
///
/// # Errors
/// `CoreError::InvalidField` naming `leverage`.
pub fn check_leverage(leverage: u32) -> Result<(), CoreError> {
    if leverage_ok(leverage) {
        Ok(())
    } else {
        Err(CoreError::invalid(
            "leverage",
            leverage.to_string(),
            "must be in [1, 125]",
        ))
    }
}

/// The ATR as the engine uses it: finite, positive and at most [`MAX_PRICE`] (a
/// larger one, from absurd warm-up bars, counts as not ready).
pub fn usable_atr(atr: Option<f64>) -> Option<f64> {
    atr.filter(|a| a.is_finite() && *a > 0.0 && *a <= 1e15)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exit::test_support::{btc, d};

    #[test]
    fn constants_are_what_they_say() {
        assert_eq!(MAX_PRICE, d("1000000000000000"));
        assert_eq!(MAX_QUANTITY, d("1000000000000"));
    }

    #[test]
    fn price_band_widens_the_filter_tenfold() {
        let rules = btc();
        let (low, high) = price_band(&rules);
        assert_eq!(low, rules.price_filter.min_price / d("10"));
        assert_eq!(high, rules.price_filter.max_price * d("10"));
        assert!(plausible_price(d("30000"), &rules));
        assert!(!plausible_price(d("50000000000000000000000000000"), &rules));
        assert!(!plausible_price(d("0"), &rules));
        let err = check_price("mark_price", d("100000000000000000000"), &rules).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("mark_price 100000000000000000000 for BTCUSDT must be a price in ["),
            "{err}"
        );
    }

    #[test]
    fn quantities_must_be_on_the_market_step() {
        let rules = btc();
        assert!(check_quantity("quantity", d("0.010"), false, &rules).is_ok());
        let err = check_quantity("quantity", d("0.0105"), false, &rules).unwrap_err();
        assert!(
            err.to_string()
                .contains("not on the MARKET_LOT_SIZE step 0.001"),
            "{err}"
        );
        assert!(check_quantity("quantity", d("0"), false, &rules).is_err());
        assert!(check_quantity("quantity", d("0"), true, &rules).is_ok());
        assert!(check_quantity("quantity", d("-1"), true, &rules).is_err());
        assert!(check_quantity("quantity", d("1e13"), false, &rules).is_err());
    }
}
