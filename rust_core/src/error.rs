//! `CoreError`: what failed, for which symbol, field and value, and which rule it broke.
//!
//! Every variant carries what a user needs to fix the input; the message is a full
//! sentence such as "quantity 0.0005 for BTCUSDT is below `LOT_SIZE` `minQty` 0.001".
//! `python/errors.rs` maps each variant to one class of `pyquant.errors`.

use std::fmt;

/// An error from the core: bad input, an unknown symbol, a malformed stream message,
/// an invalid policy field or an unreadable snapshot.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CoreError {
    /// The symbol is not in the loaded exchange rules (Python: `UnknownSymbolError`, a `KeyError`).
    #[error("unknown symbol {symbol}: it is not in the loaded exchange rules")]
    UnknownSymbol { symbol: String },

    /// An input value (an `exchangeInfo` field, a price, a quantity, an array) breaks a rule.
    ///
    /// `rule` is a predicate phrase that completes the sentence, e.g. "is below `LOT_SIZE`
    /// `minQty` 0.001" or "must be a plain decimal number (digits with an optional point, no
    /// exponent)". Python: `ValueError` (`pyquant.ConfigError` is not used: this is data).
    #[error("{}", invalid_field_message(symbol.as_deref(), field, value, rule))]
    InvalidField {
        symbol: Option<String>,
        field: String,
        value: String,
        rule: String,
    },

    /// A stream payload is malformed; nothing was applied (Python: `MessageError`).
    #[error("malformed mark-price message: {detail}")]
    Message { detail: String },

    /// An exit-policy field is out of range (Python: `PolicyError`).
    #[error("{}", invalid_field_message(None, field, value, rule))]
    Policy {
        field: String,
        value: String,
        rule: String,
    },

    /// A snapshot cannot be restored (Python: `ValueError`).
    #[error("snapshot cannot be restored: {detail}")]
    Snapshot { detail: String },
}

impl CoreError {
    /// Builds an `InvalidField` error without a symbol.
    pub fn invalid(
        field: impl Into<String>,
        value: impl Into<String>,
        rule: impl Into<String>,
    ) -> Self {
        Self::InvalidField {
            symbol: None,
            field: field.into(),
            value: value.into(),
            rule: rule.into(),
        }
    }

    /// Builds an `InvalidField` error for one symbol.
    pub fn invalid_for(
        symbol: &str,
        field: impl Into<String>,
        value: impl Into<String>,
        rule: impl Into<String>,
    ) -> Self {
        Self::InvalidField {
            symbol: Some(symbol.to_owned()),
            field: field.into(),
            value: value.into(),
            rule: rule.into(),
        }
    }

    /// Attaches a symbol to an `InvalidField` error that has none; other variants pass through.
    #[must_use]
    pub fn with_symbol(self, symbol: &str) -> Self {
        match self {
            Self::InvalidField {
                symbol: None,
                field,
                value,
                rule,
            } => Self::InvalidField {
                symbol: Some(symbol.to_owned()),
                field,
                value,
                rule,
            },
            other => other,
        }
    }

    /// Builds a `Message` error.
    pub fn message(detail: impl Into<String>) -> Self {
        Self::Message {
            detail: detail.into(),
        }
    }
}

fn invalid_field_message(symbol: Option<&str>, field: &str, value: &str, rule: &str) -> String {
    let shown = DisplayValue(value);
    match symbol {
        Some(symbol) => format!("{field} {shown} for {symbol} {rule}"),
        None => format!("{field} {shown} {rule}"),
    }
}

/// Shows a value bare when it reads unambiguously, quoted when it is empty or has spaces.
struct DisplayValue<'a>(&'a str);

impl fmt::Display for DisplayValue<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() || self.0.chars().any(|c| c.is_whitespace() || c.is_control()) {
            write!(f, "{:?}", self.0)
        } else {
            f.write_str(self.0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_field_reads_as_a_sentence() {
        let err = CoreError::invalid_for(
            "BTCUSDT",
            "quantity",
            "0.0005",
            "is below LOT_SIZE minQty 0.001",
        );
        assert_eq!(
            err.to_string(),
            "quantity 0.0005 for BTCUSDT is below LOT_SIZE minQty 0.001"
        );
    }

    #[test]
    fn empty_value_is_quoted() {
        let err = CoreError::invalid("price", "", "must not be empty");
        assert_eq!(err.to_string(), "price \"\" must not be empty");
    }

    #[test]
    fn with_symbol_fills_only_missing_symbol() {
        let err = CoreError::invalid("price", "x", "must be a number").with_symbol("ETHUSDT");
        assert_eq!(err.to_string(), "price x for ETHUSDT must be a number");
        let err = CoreError::message("no data").with_symbol("ETHUSDT");
        assert_eq!(err.to_string(), "malformed mark-price message: no data");
    }
}
