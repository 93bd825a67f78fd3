//! Adversarial property suite for the exit engine (issue 16): arbitrary message bytes,
//! extreme numbers, reordered and duplicated event times, random confirm / reject /
//! resize / reuse sequences and corrupted snapshots.
//!
//! Asserted after every step: no panic; every refusal is a typed `CoreError` and leaves
//! the engine's snapshot byte-for-byte unchanged; a position's stop never loosens; the
//! ladder never closes more than the original size; every action closes at most the
//! live quantity, on the `MARKET_LOT_SIZE` step; a confirmed close drops the position.
//!
//! Case counts: `PYQUANT_FUZZ_CASES` (default 48 per property with a fixed seed, the
//! bounded CI run; `make fuzz` raises it and draws fresh cases).

#![allow(clippy::unwrap_used)] // test code: a panic is a failure

use std::collections::HashMap;
use std::path::PathBuf;
use std::str::FromStr;

use proptest::prelude::*;
use pyquant_core::exit::{
    ExitAction, ExitEngine, ExitPolicy, LadderLevel, OpenParams, PolicyConfig, PositionSide,
};
use pyquant_core::fixed::Decimal;
use pyquant_core::rules::ExchangeRules;
use pyquant_core::CoreError;

fn cases() -> u32 {
    std::env::var("PYQUANT_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(48)
}

/// The bounded run replays the same cases every time (CI must not flake); with
/// `PYQUANT_FUZZ_CASES` set (`make fuzz`) every run explores afresh.
fn seed() -> proptest::test_runner::RngSeed {
    if std::env::var_os("PYQUANT_FUZZ_CASES").is_some() {
        proptest::test_runner::RngSeed::Random
    } else {
        proptest::test_runner::RngSeed::Fixed(0x5EED)
    }
}

fn rules() -> ExchangeRules {
    static RULES: std::sync::OnceLock<ExchangeRules> = std::sync::OnceLock::new();
    RULES
        .get_or_init(|| {
            let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../tests/data/binance/exchangeInfo_fapi_full_2025-11-26.json");
            let all = ExchangeRules::from_json(&std::fs::read(path).unwrap()).unwrap();
            ExchangeRules::from_symbols(
                ["BTCUSDT", "ETHUSDT", "DOGEUSDT"]
                    .iter()
                    .map(|s| all.symbol(s).unwrap().clone()),
            )
            .unwrap()
        })
        .clone()
}

fn policy(max_hold: bool, trail_pct: bool) -> ExitPolicy {
    ExitPolicy::new(PolicyConfig {
        stop_atr: Some(2.0),
        min_stop_pct: 0.003,
        max_stop_pct: 0.03,
        max_margin_loss: Some(0.10),
        ladder: LadderLevel::ladder(&[(1.0, 0.3), (2.0, 0.3), (3.0, 0.4)]),
        breakeven_after_level: Some(1),
        ratchet_to_previous_level: true,
        taker_fee: 0.0005,
        trail_atr: (!trail_pct).then_some(2.0),
        trail_pct: trail_pct.then_some(0.01),
        trail_activate_r: Some(1.5),
        max_hold_ms: max_hold.then_some(600_000),
        ..PolicyConfig::default()
    })
    .unwrap()
}

const SYMBOLS: [(&str, &str); 3] = [
    ("BTCUSDT", "30000.0"),
    ("ETHUSDT", "2000.00"),
    ("DOGEUSDT", "0.160000"),
];
const T0: i64 = 1_764_000_000_000;

/// Numbers as text: sane prices near the symbol's entry, and the extremes.
fn price_text(base: &'static str) -> impl Strategy<Value = String> {
    let base = Decimal::from_str(base).unwrap();
    prop_oneof![
        6 => (-400i64..400).prop_map(move |bp| (base + base * Decimal::new(bp, 4)).normalize().to_string()),
        1 => prop::sample::select(vec![
            "0", "-1", "0.0000000000000000000000000001", "1000000000000000000000000000000",
            "79228162514264337593543950335", "50000000000000000000000000000",
            "99999999999999999999", "0.00000001", "1e30", "NaN", "inf", "-inf", "", "1.2.3",
        ]).prop_map(str::to_owned),
    ]
}

fn quantity_text() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => (1u32..40).prop_map(|n| Decimal::new(i64::from(n), 3).to_string()),
        1 => prop::sample::select(vec![
            "0", "-0.001", "0.0105", "0.0015", "1000000000000", "79228162514264337593543950335",
        ]).prop_map(str::to_owned),
    ]
}

fn event_time() -> impl Strategy<Value = i64> {
    prop_oneof![
        8 => (0i64..3_600_000).prop_map(|d| T0 + d),
        1 => prop::sample::select(vec![
            T0, T0 - 1, T0 * 1000, -1, 0, i64::MAX, i64::MIN, 4_102_444_800_001,
        ]),
    ]
}

#[derive(Debug, Clone)]
enum Op {
    Open {
        id: u8,
        symbol: usize,
        short: bool,
        quantity: String,
        entry: String,
        leverage: u32,
        adopt_mark: Option<String>,
    },
    Mark {
        symbol: usize,
        price: String,
        time: i64,
        clock: Option<i64>,
    },
    Raw(Vec<u8>),
    Confirm {
        pick: usize,
        filled: Option<String>,
        stale: bool,
    },
    Reject {
        pick: usize,
    },
    Resize {
        id: u8,
        quantity: String,
    },
    Liquidation {
        id: u8,
        price: String,
    },
    Close {
        id: u8,
    },
    Restore,
}

fn op() -> impl Strategy<Value = Op> {
    // DOGEUSDT's step is 1: most quantities drawn are off its step (refusals).
    let symbol = prop_oneof![4 => 0usize..2, 1 => Just(2usize)];
    prop_oneof![
        2 => (0u8..4, symbol.clone(), any::<bool>(), quantity_text(), 0usize..3, prop_oneof![4 => 1u32..=20, 1 => 1u32..=125], proptest::option::of(0usize..3))
            .prop_flat_map(|(id, s, short, quantity, _, leverage, adopt)| {
                let entry = price_text(SYMBOLS[s].1);
                let mark = proptest::option::of(price_text(SYMBOLS[s].1));
                (Just(id), Just(s), Just(short), Just(quantity), entry, Just(leverage), mark, Just(adopt))
            })
            .prop_map(|(id, symbol, short, quantity, entry, leverage, mark, adopt)| Op::Open {
                id, symbol, short, quantity, entry, leverage,
                adopt_mark: adopt.and(mark),
            }),
        8 => (symbol.clone(), event_time(), proptest::option::of(event_time()))
            .prop_flat_map(|(s, time, clock)| (Just(s), price_text(SYMBOLS[s].1), Just(time), Just(clock)))
            .prop_map(|(symbol, price, time, clock)| Op::Mark { symbol, price, time, clock }),
        1 => prop::collection::vec(any::<u8>(), 0..200).prop_map(Op::Raw),
        3 => (0usize..8, proptest::option::of(quantity_text()), any::<bool>())
            .prop_map(|(pick, filled, stale)| Op::Confirm { pick, filled, stale }),
        1 => (0usize..8).prop_map(|pick| Op::Reject { pick }),
        1 => (0u8..4, quantity_text()).prop_map(|(id, quantity)| Op::Resize { id, quantity }),
        1 => (0u8..4, symbol.clone()).prop_flat_map(|(id, s)| (Just(id), price_text(SYMBOLS[s].1)))
            .prop_map(|(id, price)| Op::Liquidation { id, price }),
        1 => (0u8..4).prop_map(|id| Op::Close { id }),
        1 => Just(Op::Restore),
    ]
}

fn decimal(text: &str) -> Option<Decimal> {
    pyquant_core::fixed::parse_decimal("value", text).ok()
}

fn mark_message(symbol: &str, price: &str, time: i64) -> Vec<u8> {
    format!(r#"{{"e":"markPriceUpdate","E":{time},"s":"{symbol}","p":"{price}","i":"1","T":0}}"#)
        .into_bytes()
}

/// An `!markPrice@arr` message of the three symbols in Binance's exact layout (every key
/// of the real stream), the shape the AVX2 window reader and its layout reader of the
/// keys after the price take.
fn binance_array(price: &str, time: i64) -> Vec<u8> {
    let items: Vec<String> = SYMBOLS
        .iter()
        .map(|(symbol, _)| {
            format!(
                r#"{{"e":"markPriceUpdate","E":{time},"s":"{symbol}","p":"{price}","i":"{price}","P":"{price}","r":"0.00010000","T":1764028800000}}"#
            )
        })
        .collect();
    format!("[{}]", items.join(",")).into_bytes()
}

/// The invariants every action must hold against the position that emitted it.
fn check_action(engine: &ExitEngine, action: &ExitAction) -> Result<(), TestCaseError> {
    let rules = engine.rules().symbol(&action.symbol).unwrap();
    let position = engine.position(&action.position_id).unwrap();
    prop_assert!(action.quantity > Decimal::ZERO, "{action:?}");
    prop_assert!(
        action.quantity <= position.quantity,
        "{action:?} over-closes {position:?}"
    );
    prop_assert_eq!(
        rules.quantize_qty(action.quantity, true),
        action.quantity,
        "off-step quantity in {:?}",
        action
    );
    prop_assert!(
        position.ladder_closed <= position.original_quantity,
        "ladder over-closed {position:?}"
    );
    Ok(())
}

fn tighter_or_equal(side: PositionSide, new: Decimal, old: Decimal) -> bool {
    match side {
        PositionSide::Long => new >= old,
        PositionSide::Short => new <= old,
    }
}

struct Run {
    engine: ExitEngine,
    pending: Vec<ExitAction>,
    stale: Vec<ExitAction>,
    /// (id, generation) -> the stop last seen.
    stops: HashMap<(String, u64), Decimal>,
}

impl Run {
    /// Runs `step`; an `Err` must be a typed error that changed nothing.
    fn guarded<T>(
        &mut self,
        step: impl FnOnce(&mut ExitEngine) -> Result<T, CoreError>,
    ) -> Result<Option<T>, TestCaseError> {
        let before = self.engine.snapshot();
        match step(&mut self.engine) {
            Ok(value) => Ok(Some(value)),
            Err(err) => {
                prop_assert!(!err.to_string().is_empty());
                prop_assert!(
                    self.engine.snapshot() == before,
                    "refusal {err} changed the state"
                );
                Ok(None)
            }
        }
    }

    fn actions(&mut self, actions: Vec<ExitAction>) -> Result<(), TestCaseError> {
        for action in actions {
            check_action(&self.engine, &action)?;
            self.pending.retain(|a| a.position_id != action.position_id);
            self.pending.push(action);
        }
        Ok(())
    }

    fn check_stops(&mut self) -> Result<(), TestCaseError> {
        for p in self.engine.positions() {
            let key = (p.position_id.clone(), p.generation);
            if let Some(old) = self.stops.get(&key) {
                prop_assert!(
                    tighter_or_equal(p.side, p.stop_price, *old),
                    "stop of {} loosened from {old} to {}",
                    p.position_id,
                    p.stop_price
                );
            }
            prop_assert!(p.ladder_closed <= p.original_quantity);
            prop_assert!(p.quantity > Decimal::ZERO && p.quantity <= p.original_quantity);
            self.stops.insert(key, p.stop_price);
        }
        Ok(())
    }

    #[allow(clippy::too_many_lines)] // one arm per operation
    fn apply(&mut self, op: Op) -> Result<(), TestCaseError> {
        match op {
            Op::Open {
                id,
                symbol,
                short,
                quantity,
                entry,
                leverage,
                adopt_mark,
            } => {
                let (Some(quantity), Some(entry)) = (decimal(&quantity), decimal(&entry)) else {
                    return Ok(());
                };
                let params = OpenParams {
                    position_id: format!("p{id}"),
                    symbol: SYMBOLS[symbol].0.into(),
                    side: if short {
                        PositionSide::Short
                    } else {
                        PositionSide::Long
                    },
                    quantity,
                    entry_price: entry,
                    leverage,
                    confidence: None,
                    opened_at_ms: None,
                    liquidation_price: None,
                };
                match adopt_mark {
                    None => {
                        self.guarded(|e| e.open_position(params))?;
                    }
                    Some(mark) => {
                        let mark = decimal(&mark);
                        if let Some(actions) =
                            self.guarded(|e| e.adopt_position(params, None, None, mark))?
                        {
                            self.actions(actions)?;
                        }
                    }
                }
            }
            Op::Mark {
                symbol,
                price,
                time,
                clock,
            } => {
                let message = mark_message(SYMBOLS[symbol].0, &price, time);
                if let Some(actions) = self.guarded(|e| e.on_mark_message_at(&message, clock))? {
                    self.actions(actions)?;
                }
            }
            Op::Raw(bytes) => {
                if let Some(actions) = self.guarded(|e| e.on_mark_message(&bytes))? {
                    self.actions(actions)?;
                }
            }
            Op::Confirm {
                pick,
                filled,
                stale,
            } => {
                let source = if stale { &self.stale } else { &self.pending };
                let Some(action) = source.get(pick % source.len().max(1)).cloned() else {
                    return Ok(());
                };
                let filled = filled.as_deref().and_then(decimal);
                let was_stale = stale;
                let result = self.guarded(|e| {
                    e.confirm_instance(
                        &action.position_id,
                        Some(action.generation),
                        action.sequence,
                        filled,
                    )
                })?;
                if was_stale {
                    prop_assert!(result.is_none(), "a stale action was confirmed: {action:?}");
                }
                if let Some(closed) = result {
                    prop_assert_eq!(closed, self.engine.position(&action.position_id).is_none());
                    self.pending.retain(|a| a != &action);
                    self.stale.push(action);
                }
            }
            Op::Reject { pick } => {
                let Some(action) = self.pending.get(pick % self.pending.len().max(1)).cloned()
                else {
                    return Ok(());
                };
                if self
                    .guarded(|e| {
                        e.reject_instance(
                            &action.position_id,
                            Some(action.generation),
                            action.sequence,
                        )
                    })?
                    .is_some()
                {
                    self.pending.retain(|a| a != &action);
                    self.stale.push(action);
                }
            }
            Op::Resize { id, quantity } => {
                if let Some(quantity) = decimal(&quantity) {
                    self.guarded(|e| e.resize_position(&format!("p{id}"), quantity))?;
                }
            }
            Op::Liquidation { id, price } => {
                if let Some(price) = decimal(&price) {
                    self.guarded(|e| e.set_liquidation_price(&format!("p{id}"), price))?;
                }
            }
            Op::Close { id } => {
                if self
                    .guarded(|e| e.close_position(&format!("p{id}")))?
                    .is_some()
                {
                    self.pending.retain(|a| a.position_id != format!("p{id}"));
                }
            }
            Op::Restore => {
                let bytes = self.engine.snapshot();
                let restored = ExitEngine::restore(&bytes, rules()).unwrap();
                prop_assert_eq!(restored.snapshot(), bytes);
                self.engine = restored;
            }
        }
        // Pending actions the engine no longer holds (closed, resized away) go stale.
        let engine = &self.engine;
        let (live, gone): (Vec<_>, Vec<_>) = std::mem::take(&mut self.pending)
            .into_iter()
            .partition(|a| {
                engine
                    .position(&a.position_id)
                    .and_then(|p| p.pending.as_ref())
                    == Some(a)
            });
        self.pending = live;
        self.stale.extend(gone);
        self.check_stops()
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), rng_seed: seed(), ..ProptestConfig::default() })]

    /// Random operation sequences: the invariants of the module header after every step.
    #[test]
    fn engine_survives_random_operations(
        ops in prop::collection::vec(op(), 10..80),
        max_hold in any::<bool>(),
        trail_pct in any::<bool>(),
    ) {
        let mut engine = ExitEngine::new(rules(), policy(max_hold, trail_pct)).unwrap();
        engine.warm_up("BTCUSDT", &[30030.0; 20], &[29970.0; 20], &[30000.0; 20], None).unwrap();
        let mut run = Run { engine, pending: Vec::new(), stale: Vec::new(), stops: HashMap::new() };
        // Two live positions from the start, so marks have something to act on.
        for (id, symbol, short, quantity, entry) in [(0, 0, false, "0.010", "30000.0"), (1, 1, true, "0.500", "2000.00")] {
            run.apply(Op::Open {
                id, symbol, short, quantity: quantity.into(), entry: entry.into(), leverage: 5,
                adopt_mark: None,
            })?;
        }
        prop_assert_eq!(run.engine.positions().len(), 2);
        for op in ops {
            run.apply(op)?;
        }
    }

    /// Arbitrary bytes, and mutations of a real message: an error changes nothing.
    #[test]
    fn arbitrary_messages_never_panic(
        bytes in prop::collection::vec(any::<u8>(), 0..400),
        flips in prop::collection::vec((0usize..120, any::<u8>()), 0..6),
        array_flips in prop::collection::vec((0usize..600, any::<u8>()), 0..6),
    ) {
        let mut engine = ExitEngine::new(rules(), policy(false, false)).unwrap();
        engine.open_position(OpenParams {
            position_id: "p".into(), symbol: "BTCUSDT".into(), side: PositionSide::Long,
            quantity: Decimal::new(10, 3), entry_price: Decimal::new(300_000, 1), leverage: 10,
            confidence: None, opened_at_ms: None, liquidation_price: None,
        }).unwrap();
        let mut real = mark_message("BTCUSDT", "29000.0", T0);
        for (at, byte) in flips {
            let len = real.len();
            real[at % len] = byte;
        }
        let mut array = binance_array("29000.00000000", T0);
        for (at, byte) in array_flips {
            let len = array.len();
            array[at % len] = byte;
        }
        for message in [bytes, real, array] {
            let before = engine.snapshot();
            match engine.on_mark_message(&message) {
                Ok(actions) => for a in &actions { check_action(&engine, a)?; },
                Err(_) => prop_assert!(engine.snapshot() == before),
            }
        }
    }

    /// Corrupted snapshots: refused with an error, or restored into an engine that then
    /// runs marks without panicking.
    #[test]
    fn corrupted_snapshots_never_panic(
        edits in prop::collection::vec((0usize..4000, prop::sample::select(vec![
            "0", "-1", "9", "\"1e5\"", "\"-1\"", "[]", "null", "18446744073709551615",
            "\"79228162514264337593543950335\"", "\"0.0105\"", "true", "\"\"", "1e400",
        ])), 1..4),
        marks in prop::collection::vec((0usize..3, -300i64..300), 1..8),
    ) {
        let mut engine = ExitEngine::new(rules(), policy(true, false)).unwrap();
        engine.warm_up("BTCUSDT", &[30030.0; 20], &[29970.0; 20], &[30000.0; 20], None).unwrap();
        for (id, side) in [("l", PositionSide::Long), ("s", PositionSide::Short)] {
            engine.open_position(OpenParams {
                position_id: id.into(), symbol: "BTCUSDT".into(), side,
                quantity: Decimal::new(10, 3), entry_price: Decimal::new(300_000, 1), leverage: 10,
                confidence: None, opened_at_ms: Some(T0), liquidation_price: None,
            }).unwrap();
        }
        engine.on_mark_message(&mark_message("BTCUSDT", "30125.0", T0 + 1)).unwrap();
        let mut text = String::from_utf8(engine.snapshot()).unwrap();
        for (at, replacement) in edits {
            // Replace the JSON value that follows the `at`-th colon.
            let colons: Vec<usize> = text.match_indices(':').map(|(i, _)| i).collect();
            let start = colons[at % colons.len()] + 1;
            let rest = &text[start..];
            let end = start + rest.find([',', '}', ']']).unwrap_or(rest.len());
            text.replace_range(start..end, replacement);
        }
        if let Ok(mut restored) = ExitEngine::restore(text.as_bytes(), rules()) {
            for (k, (s, bp)) in marks.into_iter().enumerate() {
                let base = Decimal::from_str(SYMBOLS[s].1).unwrap();
                let price = (base + base * Decimal::new(bp, 4)).normalize().to_string();
                let message = mark_message(SYMBOLS[s].0, &price, T0 + 10 + k as i64);
                let actions = restored.on_mark_message(&message).unwrap();
                for a in &actions {
                    check_action(&restored, a)?;
                    restored.confirm_instance(&a.position_id, Some(a.generation), a.sequence, None).unwrap();
                }
            }
        }
    }
}
