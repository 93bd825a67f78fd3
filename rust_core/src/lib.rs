//! pyquant core: exact exchange rules, Wilder ATR, mark-price ingestion and the
//! per-position exit state machine. Only `python/` knows about Python; the rest
//! builds and tests without an interpreter.

#[cfg(feature = "python")]
mod python;
