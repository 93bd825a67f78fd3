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
//! Every field is validated on restore (event times, marks, bars and ATR against
//! the policy, each position with [`crate::exit::PositionState::validate`]): an
//! impossible snapshot is refused with an error naming the field, never restored
//! to fail later.
//!
//! Version history: 1 — first format; `next_generation` and the positions' and
//! actions' `generation` were added later with defaults, so older version-1
//! snapshots still restore.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::atr::WilderAtr;
use crate::bars::BarAggregator;
use crate::error::CoreError;
use crate::exit::{bounds, ExitEngine, ExitPolicy, PositionSide, SymbolState, SymbolTable};
use crate::rules::{ExchangeRules, SymbolRules};

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
    next_generation: u64,
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
    /// Absent from snapshots written before generations existed: then one past the
    /// highest generation restored.
    #[serde(default)]
    next_generation: u64,
    symbols: Vec<(String, SymbolState)>,
}

fn snapshot_err(detail: impl Into<String>) -> CoreError {
    CoreError::Snapshot {
        detail: detail.into(),
    }
}

/// Serializes the whole engine state (policy included, rules excluded).
pub fn snapshot(engine: &ExitEngine) -> Vec<u8> {
    let mut symbols: Vec<(&String, &SymbolState)> = engine.symbols.iter().collect();
    symbols.sort_by(|a, b| a.0.cmp(b.0));
    let out = SnapshotOut {
        format: FORMAT,
        version: VERSION,
        policy: &engine.policy,
        last_event_ms: engine.last_event_ms,
        next_generation: engine.next_generation,
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
    if let Some(last) = body.last_event_ms {
        bounds::check_event_time("last_event_ms", last)?;
    }
    let templates = ExitEngine::templates(&body.policy)?;
    let mut symbols = SymbolTable::default();
    let mut index = HashMap::new();
    let mut highest_generation = 0;
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
        let symbol_rules = rules.symbol(&symbol)?;
        validate_symbol_state(&symbol, &state, &templates, symbol_rules)?;
        for position in state
            .long
            .as_deref()
            .into_iter()
            .chain(state.short.as_deref())
        {
            position.validate(symbol_rules, &body.policy)?;
            highest_generation = highest_generation.max(position.generation);
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
        state.set_rules(rules.get(&symbol).cloned());
        symbols.insert(symbol, state);
    }
    if body.next_generation != 0 && body.next_generation <= highest_generation {
        return Err(CoreError::invalid(
            "next_generation",
            body.next_generation.to_string(),
            format!("must be above every position's generation (highest {highest_generation})"),
        ));
    }
    Ok(ExitEngine {
        rules,
        policy: body.policy,
        symbols,
        index,
        last_event_ms: body.last_event_ms,
        templates,
        bar_events: Vec::new(),
        next_generation: body
            .next_generation
            .max(highest_generation.saturating_add(1)),
        clock_ms: None,
        implausible_event_times: 0,
        implausible_marks: 0,
    })
}

/// Checks a symbol's market state against the policy's bar interval and ATR period,
/// the event-time bounds and the symbol's plausible price band.
fn validate_symbol_state(
    symbol: &str,
    state: &SymbolState,
    templates: &(BarAggregator, WilderAtr),
    rules: &SymbolRules,
) -> Result<(), CoreError> {
    let field = |name: &str| format!("symbols[{symbol}].{name}");
    if let Some(last) = state.last_event_ms {
        bounds::check_event_time(&field("last_event_ms"), last)?;
    }
    if let Some(mark) = state.last_mark {
        bounds::check_price(&field("last_mark"), mark, rules)?;
    }
    state
        .bars
        .check_compatible(&templates.0)
        .map_err(|e| rename(e, &field("bars")))?;
    state
        .atr
        .check_compatible(&templates.1)
        .map_err(|e| rename(e, &field("atr")))?;
    for (slot, side) in [
        (&state.long, PositionSide::Long),
        (&state.short, PositionSide::Short),
    ] {
        if let Some(position) = slot {
            if position.side != side {
                return Err(CoreError::invalid_for(
                    symbol,
                    format!("position[{}].side", position.position_id),
                    position.side.as_str(),
                    format!("must be {side}: the position is filed in the {side} slot"),
                ));
            }
        }
    }
    if let Some(bucket) = state.partial_bucket {
        bounds::check_event_time(&field("partial_bucket"), bucket)?;
    }
    Ok(())
}

fn rename(err: CoreError, field: &str) -> CoreError {
    match err {
        CoreError::InvalidField {
            symbol,
            field: inner,
            value,
            rule,
        } => CoreError::InvalidField {
            symbol,
            field: format!("{field}.{inner}"),
            value,
            rule,
        },
        other => other,
    }
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
