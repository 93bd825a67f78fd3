//! Versioned engine state <-> bytes, so a restarted daemon continues with the
//! same stops, best prices, ladder progress, pending actions, bars and ATR.
//!
//! Format: one JSON object `{"format": "pyquant.exit_engine", "version": N,
//! "policy": {...}, "last_event_ms": ..., "symbols": [[symbol, state], ...]}`.
//! Symbols are sorted, so equal states give equal bytes. Decimals are strings
//! (exact); floats (ATR, bars) are written in their shortest round-trip form
//! and read back bit-exact (`serde_json`'s `float_roundtrip`), which is what
//! makes a restored engine emit exactly the actions the uninterrupted one
//! would. The exchange rules are not part of the snapshot: `restore` takes the
//! current ones and checks every open position's symbol against them.
//!
//! Version history: 1 — first format.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::error::CoreError;
use crate::exit::{ExitEngine, ExitPolicy, SymbolMap, SymbolState};
use crate::rules::ExchangeRules;

/// Identifies the payload.
pub const FORMAT: &str = "pyquant.exit_engine";
/// The version this build writes and reads.
pub const VERSION: u32 = 1;

#[derive(Serialize)]
struct SnapshotOut<'a> {
    format: &'a str,
    version: u32,
    policy: &'a ExitPolicy,
    last_event_ms: Option<i64>,
    symbols: Vec<(&'a String, &'a SymbolState)>,
}

#[derive(Deserialize)]
struct Header {
    format: Option<String>,
    version: Option<u32>,
}

#[derive(Deserialize)]
struct SnapshotIn {
    policy: ExitPolicy,
    last_event_ms: Option<i64>,
    symbols: Vec<(String, SymbolState)>,
}

fn snapshot_err(detail: impl Into<String>) -> CoreError {
    CoreError::Snapshot {
        detail: detail.into(),
    }
}

/// Serializes the whole engine state (policy included, rules excluded).
pub fn snapshot(engine: &ExitEngine) -> Vec<u8> {
    let mut symbols: Vec<(&String, &SymbolState)> =
        engine.symbols.iter().map(|(k, v)| (k, &**v)).collect();
    symbols.sort_by(|a, b| a.0.cmp(b.0));
    let out = SnapshotOut {
        format: FORMAT,
        version: VERSION,
        policy: &engine.policy,
        last_event_ms: engine.last_event_ms,
        symbols,
    };
    // Serializing plain data with string keys into a Vec cannot fail.
    serde_json::to_vec(&out).unwrap_or_default()
}

/// Rebuilds an engine from [`snapshot`] bytes and the current exchange rules.
///
/// # Errors
/// `CoreError::Snapshot` when the bytes are not a snapshot, come from another
/// version, are corrupt, hold a policy that no longer validates, or name a
/// position whose symbol is not in `rules`.
pub fn restore(data: &[u8], rules: ExchangeRules) -> Result<ExitEngine, CoreError> {
    let header: Header = serde_json::from_slice(data).map_err(|e| {
        snapshot_err(format!(
            "not a pyquant exit-engine snapshot (expected a JSON object: {e})"
        ))
    })?;
    if header.format.as_deref() != Some(FORMAT) {
        return Err(snapshot_err(format!(
            "format {:?} is not {FORMAT:?}: not a pyquant exit-engine snapshot",
            header.format.unwrap_or_default()
        )));
    }
    match header.version {
        Some(VERSION) => {}
        Some(other) => {
            return Err(snapshot_err(format!(
                "version {other} is not supported: this build reads version {VERSION}"
            )))
        }
        None => return Err(snapshot_err("the version field is missing")),
    }
    let body: SnapshotIn = serde_json::from_slice(data)
        .map_err(|e| snapshot_err(format!("version {VERSION} body is invalid: {e}")))?;
    let mut symbols = SymbolMap::default();
    let mut index = HashMap::new();
    for (symbol, state) in body.symbols {
        let has_positions = state.long.is_some() || state.short.is_some();
        if rules.get(&symbol).is_none() {
            if has_positions {
                return Err(snapshot_err(format!(
                    "symbol {symbol} has an open position but is not in the exchange rules"
                )));
            }
            continue;
        }
        for position in state.long.iter().chain(state.short.iter()) {
            if position.symbol != symbol {
                return Err(snapshot_err(format!(
                    "position {} is filed under {symbol} but is for {}",
                    position.position_id, position.symbol
                )));
            }
            if index
                .insert(
                    position.position_id.clone(),
                    (symbol.clone(), position.side),
                )
                .is_some()
            {
                return Err(snapshot_err(format!(
                    "position id {} appears twice",
                    position.position_id
                )));
            }
        }
        let mut state = state;
        state.rules = rules.get(&symbol).cloned();
        symbols.insert(symbol, Box::new(state));
    }
    let templates = ExitEngine::templates(&body.policy)?;
    Ok(ExitEngine {
        rules,
        policy: body.policy,
        symbols,
        index,
        last_event_ms: body.last_event_ms,
        templates,
        bar_events: Vec::new(),
    })
}

impl ExitEngine {
    /// Returns the versioned snapshot bytes (see [`crate::snapshot`]).
    pub fn snapshot(&self) -> Vec<u8> {
        snapshot(self)
    }

    /// Rebuilds an engine from snapshot bytes.
    ///
    /// # Errors
    /// See [`restore`].
    pub fn restore(data: &[u8], rules: ExchangeRules) -> Result<Self, CoreError> {
        restore(data, rules)
    }
}
