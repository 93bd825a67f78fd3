//! pyquant core: exact exchange rules, Wilder ATR, mark-price ingestion and the
//! per-position exit state machine. Only `python/` knows about Python; the rest
//! builds and tests without an interpreter.

pub mod atr;
pub mod backtest;
pub mod bars;
pub mod error;
pub mod exit;
pub mod feed;
pub mod fixed;
pub mod intents;
pub mod rules;
pub mod snapshot;

pub use error::CoreError;
pub use fixed::{Decimal, Rounding};

#[cfg(feature = "python")]
mod python;
