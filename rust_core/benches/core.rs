//! Criterion benches of the per-message and per-array work, each beside a baseline:
//! - `mark_message_600`: `parse_mark_message` on a real-shaped `!markPrice@arr` message of
//!   600 real exchangeInfo symbols, beside `serde_json` into a `Value` (a generic parse) and
//!   into `IgnoredAny` (validation only, the floor for any serde-based reader);
//! - `engine_message_600`: `ExitEngine::on_mark_message` on `!markPrice@arr` messages of
//!   600 real USDT symbols (Binance's layout, 8-decimal prices moving by at most 2 bp a
//!   second) with 1,000 open positions (400 symbols with both legs, 200 with a LONG): parse,
//!   bars, ATR and every position, the Rust side of `tests/benchmarks/test_bench_engine.py`
//!   (split in `parse_600_updates`, the parse of the same messages, and
//!   `apply_batch_1000_positions`, the same calls without the parse);
//! - `atr_1m_bars`: `atr_batch` on 1,000,000 bars of a seeded random walk (the TA-Lib
//!   comparison is the pytest benchmark `tests/benchmarks/test_bench_atr.py`);
//! - `quantize`: one price and one quantity to wire strings for BTCUSDT;
//! - `backtest_dense`: `backtest::run` on 200,000 BTCUSDT 1m bars of a seeded random walk
//!   with a LONG entry at every bar (one position open almost always), the bench policy of
//!   `tests/benchmarks` with the trailing stop on from the open (it moves every bar) and by
//!   R, beside the same run feeding every mark (`exhaustive`, the state machine per mark).
//!
//! Run with `cargo bench -p pyquant_core`.

#![allow(clippy::unwrap_used)] // bench setup: a panic is a broken fixture

use std::hint::black_box;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use pyquant_core::atr::atr_batch;
use pyquant_core::backtest::{
    self, BacktestOptions, Bars, Direction, Entries, Entry, Intrabar, SeriesInput,
};
use pyquant_core::exit::policy::{ExitPolicy, LadderLevel, PolicyConfig};
use pyquant_core::exit::{ExitEngine, OpenParams, PositionSide};
use pyquant_core::feed::parse_mark_message;
use pyquant_core::fixed::{parse_decimal, Decimal, Rounding};
use pyquant_core::rules::ExchangeRules;

fn exchange_info() -> Vec<u8> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/data/binance/exchangeInfo_fapi_full_2025-11-26.json");
    std::fs::read(path).unwrap()
}

/// Deterministic xorshift so every run measures the same bytes.
struct Walk(u64);

impl Walk {
    fn next_unit(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % 1_000_000) as f64 / 1_000_000.0
    }
}

fn mark_message(rules: &ExchangeRules) -> Vec<u8> {
    let mut walk = Walk(0x2545_f491_4f6c_dd1d);
    let items: Vec<String> = rules
        .symbols()
        .take(600)
        .enumerate()
        .map(|(i, symbol)| {
            let p = 0.001 + walk.next_unit() * 50_000.0;
            format!(
                r#"{{"e":"markPriceUpdate","E":{},"s":"{symbol}","p":"{p:.8}","i":"{:.8}","P":"{:.8}","r":"0.00010000","T":1764144000000}}"#,
                1_764_115_200_000_i64 + i as i64,
                p * 1.0001,
                p * 0.9999
            )
        })
        .collect();
    format!("[{}]", items.join(",")).into_bytes()
}

fn bench_mark_message(c: &mut Criterion) {
    let rules = ExchangeRules::from_json(&exchange_info()).unwrap();
    let data = mark_message(&rules);
    assert_eq!(parse_mark_message(&data).unwrap().len(), 600);
    let mut group = c.benchmark_group("mark_message_600");
    group.throughput(Throughput::Bytes(data.len() as u64));
    group.bench_function("parse_mark_message", |b| {
        b.iter(|| parse_mark_message(black_box(&data)).unwrap().len());
    });
    group.bench_function("serde_json_value", |b| {
        b.iter(|| serde_json::from_slice::<serde_json::Value>(black_box(&data)).unwrap());
    });
    group.bench_function("serde_json_ignored_any", |b| {
        b.iter(|| serde_json::from_slice::<serde::de::IgnoredAny>(black_box(&data)).unwrap());
    });
    group.finish();
}

/// The engine of `engine_message_600` and its messages: 600 tradable USDT symbols, 1,000
/// positions, `count` messages one second apart.
fn engine_and_messages(rules: &ExchangeRules, count: usize) -> (ExitEngine, Vec<Vec<u8>>) {
    let symbols: Vec<_> = rules
        .iter()
        .filter(|r| {
            r.quote_asset == "USDT"
                && r.tick_size() > Decimal::ZERO
                && r.qty_step(true) > Decimal::ZERO
        })
        .take(600)
        .cloned()
        .collect();
    assert_eq!(symbols.len(), 600);
    let policy = bench_policy(Some(1.5));
    let mut engine = ExitEngine::new(rules.clone(), policy).unwrap();
    let t0 = 1_764_000_000_000_i64;
    let mut ticks: Vec<i64> = Vec::with_capacity(600);
    for (i, r) in symbols.iter().enumerate() {
        let low = r.price_filter.min_price.max(r.tick_size());
        let tick_count = (low * Decimal::from(40) / r.tick_size()).trunc();
        let price = tick_count * r.tick_size();
        ticks.push(i64::try_from(tick_count.mantissa()).unwrap());
        let p: f64 = price.to_string().parse().unwrap();
        engine
            .warm_up(
                &r.symbol,
                &[p * 1.002; 20],
                &[p * 0.998; 20],
                &[p; 20],
                None,
            )
            .unwrap();
        let quantity = r
            .quantize_qty(
                r.min_notional().max(Decimal::from(5)) * Decimal::from(20) / price,
                true,
            )
            .max(r.min_qty(true));
        let sides: &[PositionSide] = if i < 400 {
            &[PositionSide::Long, PositionSide::Short]
        } else {
            &[PositionSide::Long]
        };
        for &side in sides {
            engine
                .open_position(OpenParams {
                    position_id: format!("{}-{}", r.symbol, side.as_str()),
                    symbol: r.symbol.clone(),
                    side,
                    quantity,
                    entry_price: price,
                    leverage: 5,
                    confidence: None,
                    opened_at_ms: Some(t0),
                    liquidation_price: None,
                })
                .unwrap();
        }
    }
    let mut walk = Walk(0x6a09_e667_f3bc_c908);
    let messages = (0..count)
        .map(|k| {
            let time = t0 + 1_000 * (k as i64 + 1);
            let items: Vec<String> = symbols
                .iter()
                .zip(ticks.iter_mut())
                .map(|(r, tick_count)| {
                    // -2 to +2 bp, rounded to the tick (as the pytest benchmark moves).
                    let move_bp = (walk.next_unit() * 5.0) as i64 - 2;
                    *tick_count = (*tick_count + (*tick_count * move_bp + 5_000).div_euclid(10_000)).max(1);
                    let price = Decimal::from(*tick_count) * r.tick_size();
                    let text = format!("{price:.8}");
                    format!(
                        r#"{{"e":"markPriceUpdate","E":{time},"s":"{}","p":"{text}","i":"{text}","P":"{text}","r":"0.00010000","T":{}}}"#,
                        r.symbol,
                        t0 + 28_800_000
                    )
                })
                .collect();
            format!("[{}]", items.join(",")).into_bytes()
        })
        .collect();
    (engine, messages)
}

fn bench_engine_message(c: &mut Criterion) {
    let rules = ExchangeRules::from_json(&exchange_info()).unwrap();
    let count = 300;
    let (template, messages) = engine_and_messages(&rules, count);
    // The walk moves prices without firing a rule: every position stays open.
    let mut check = template.clone();
    for message in &messages {
        assert!(check.on_mark_message(message).unwrap().is_empty());
    }
    let mut group = c.benchmark_group("engine_message_600");
    // `iters` calls of `call` on message `i % count`, a fresh engine every `count`
    // messages (event times only move forward); `call` times what it measures itself.
    let rounds = |iters: u64, call: &mut dyn FnMut(&mut ExitEngine, &[u8]) -> Duration| {
        let mut total = Duration::ZERO;
        let mut engine = template.clone();
        for i in 0..iters as usize {
            if i % count == 0 && i > 0 {
                engine = template.clone();
            }
            total += call(&mut engine, &messages[i % count]);
        }
        total
    };
    group.bench_function("on_mark_message_1000_positions", |b| {
        b.iter_custom(|iters| {
            rounds(iters, &mut |engine, message| {
                let start = Instant::now();
                black_box(engine.on_mark_message(black_box(message)).unwrap());
                start.elapsed()
            })
        });
    });
    // The same calls split: the parse alone (the same messages, so that parse and apply
    // add up to the whole call), then the apply alone, on messages parsed outside the
    // timing.
    group.bench_function("parse_600_updates", |b| {
        b.iter_custom(|iters| {
            rounds(iters, &mut |_, message| {
                let start = Instant::now();
                black_box(parse_mark_message(black_box(message)).unwrap());
                start.elapsed()
            })
        });
    });
    group.bench_function("apply_batch_1000_positions", |b| {
        b.iter_custom(|iters| {
            rounds(iters, &mut |engine, message| {
                let batch = parse_mark_message(message).unwrap();
                let start = Instant::now();
                black_box(engine.apply_batch(black_box(&batch)));
                start.elapsed()
            })
        });
    });
    group.finish();
}

fn bench_atr(c: &mut Criterion) {
    let n = 1_000_000;
    let mut walk = Walk(0x9e37_79b9_7f4a_7c15);
    let mut close = Vec::with_capacity(n);
    let mut high = Vec::with_capacity(n);
    let mut low = Vec::with_capacity(n);
    let mut price = 30_000.0;
    for _ in 0..n {
        price *= 1.0 + (walk.next_unit() - 0.5) * 0.002;
        high.push(price * (1.0 + walk.next_unit() * 0.001));
        low.push(price * (1.0 - walk.next_unit() * 0.001));
        close.push(price);
    }
    let mut group = c.benchmark_group("atr_1m_bars");
    group.sample_size(20);
    group.throughput(Throughput::Elements(n as u64));
    group.bench_function("atr_batch", |b| {
        b.iter(|| atr_batch(black_box(&high), black_box(&low), black_box(&close), 14).unwrap());
    });
    group.finish();
}

fn bench_quantize(c: &mut Criterion) {
    let rules = ExchangeRules::from_json(&exchange_info()).unwrap();
    let btc = rules.symbol("BTCUSDT").unwrap().clone();
    let price = parse_decimal("price", "30120.07").unwrap();
    let qty = parse_decimal("qty", "0.0039").unwrap();
    let mut group = c.benchmark_group("quantize");
    group.bench_function("price_and_qty_to_wire", |b| {
        b.iter(|| {
            let p = btc.format_price(btc.quantize_price(black_box(price), Rounding::Down));
            let q = btc.format_qty(btc.quantize_qty(black_box(qty), true), true);
            (p, q)
        });
    });
    group.finish();
}

/// The dense workload: a LONG entry at every bar of a 1m random walk around 30000.
fn dense_series(n: usize) -> SeriesInput<'static> {
    let mut walk = Walk(0x853c_49e6_748f_ea9b);
    let mut bars = Bars::default();
    let mut entries = Entries::default();
    let mut close = 30_000.0_f64;
    let t0 = 1_700_000_040_000_i64;
    for i in 0..n {
        let open = close;
        close = (open * (1.0 + (walk.next_unit() - 0.5) * 0.003) * 10.0).round() / 10.0;
        let high = (open.max(close) * (1.0 + walk.next_unit() * 0.0008) * 10.0).round() / 10.0;
        let low = (open.min(close) * (1.0 - walk.next_unit() * 0.0008) * 10.0).round() / 10.0;
        let t = t0 + i as i64 * 60_000;
        bars.open_time.to_mut().push(t);
        bars.open.to_mut().push(open);
        bars.high.to_mut().push(high);
        bars.low.to_mut().push(low);
        bars.close.to_mut().push(close);
        entries.push(Entry {
            time_ms: t,
            direction: Direction::Long,
            confidence: None,
            notional: None,
            leverage: None,
        });
    }
    SeriesInput {
        symbol: "BTCUSDT".into(),
        interval_ms: 60_000,
        bars,
        fine: None,
        entries,
    }
}

fn bench_policy(trail_activate_r: Option<f64>) -> ExitPolicy {
    ExitPolicy::new(PolicyConfig {
        stop_atr: Some(2.0),
        min_stop_pct: 0.003,
        max_stop_pct: 0.03,
        max_margin_loss: Some(0.10),
        ladder: LadderLevel::ladder(&[(1.0, 0.3), (2.0, 0.3), (3.0, 0.4)]),
        breakeven_after_level: Some(1),
        ratchet_to_previous_level: true,
        trail_atr: Some(2.0),
        trail_activate_r,
        max_hold_ms: Some(4 * 3_600_000),
        confidence_scale: 1.0,
        m_min: 0.5,
        m_max: 1.5,
        ..PolicyConfig::default()
    })
    .unwrap()
}

fn bench_backtest_dense(c: &mut Criterion) {
    let rules = ExchangeRules::from_json(&exchange_info()).unwrap();
    let n = 200_000;
    let series = [dense_series(n)];
    let options = BacktestOptions {
        maker_fee: parse_decimal("maker_fee", "0.0002").unwrap(),
        taker_fee: parse_decimal("taker_fee", "0.0005").unwrap(),
        entry_maker: false,
        notional: parse_decimal("notional", "1000").unwrap(),
        leverage: 10,
        intrabar: Intrabar::StopFirst,
        max_gap_bars: 0,
        one_position_per_symbol: true,
        detail: false,
        exhaustive: false,
        columns: None,
    };
    let every_mark = BacktestOptions {
        exhaustive: true,
        ..options.clone()
    };
    let mut group = c.benchmark_group("backtest_dense");
    group.sample_size(10);
    group.throughput(Throughput::Elements(n as u64));
    for (name, activate) in [("trail_from_open", None), ("trail_by_r", Some(3.0))] {
        let policies = [bench_policy(activate)];
        let out = backtest::run(&series, &policies, &rules, &options).unwrap();
        assert!(out[0].fills.len() > 1000);
        group.bench_function(name, |b| {
            b.iter(|| backtest::run(black_box(&series), &policies, &rules, &options).unwrap());
        });
        group.bench_function(format!("{name}_exhaustive"), |b| {
            b.iter(|| backtest::run(black_box(&series), &policies, &rules, &every_mark).unwrap());
        });
    }
    group.finish();
}

criterion_group!(
    benches,
    bench_mark_message,
    bench_engine_message,
    bench_atr,
    bench_quantize,
    bench_backtest_dense
);
criterion_main!(benches);
