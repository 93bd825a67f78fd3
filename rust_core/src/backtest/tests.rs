//! Tests of the backtest: fills, trades, stops, and the integer replay against the decimal
//! one (every mark through the exit state machine).

use super::prepare::Grid;
use super::*;
use crate::exit::policy::{LadderLevel, PolicyConfig};
use crate::exit::test_support::{btc, d, example_config, exchange_rules};
use crate::fixed::{decimal_from_f64, Rounding};

const MINUTE: i64 = 60_000;

/// `default` cases, unless `PROPTEST_CASES` asks for another number (a longer run by hand).
fn cases(default: u32) -> proptest::prelude::ProptestConfig {
    let mut config = proptest::prelude::ProptestConfig::default();
    if std::env::var_os("PROPTEST_CASES").is_none() {
        config.cases = default;
    }
    config
}
const T0: i64 = 1_700_000_040_000;

/// The worked example of exit-rules.md, with ATR over bars of `atr_interval`.
fn example_policy(atr_interval: &str) -> ExitPolicy {
    ExitPolicy::new(PolicyConfig {
        atr_interval: atr_interval.to_owned(),
        ..example_config()
    })
    .unwrap()
}

fn options() -> BacktestOptions {
    BacktestOptions {
        maker_fee: d("0.0002"),
        taker_fee: d("0.0005"),
        entry_maker: false,
        notional: d("300"),
        leverage: 10,
        intrabar: Intrabar::StopFirst,
        max_gap_bars: 0,
        one_position_per_symbol: false,
        detail: true,
        exhaustive: false,
        columns: None,
    }
}

/// 20 bars of true range 60 around 30000 (ATR 60.0 exactly), then `tail`.
fn bars(interval: i64, tail: &[(f64, f64, f64, f64)]) -> Bars<'static> {
    let mut b = Bars::default();
    let warm = std::iter::repeat_n((30000.0, 30030.0, 29970.0, 30000.0), 20);
    for (i, (o, h, l, c)) in warm.chain(tail.iter().copied()).enumerate() {
        b.open_time.to_mut().push(T0 + i as i64 * interval);
        b.open.to_mut().push(o);
        b.high.to_mut().push(h);
        b.low.to_mut().push(l);
        b.close.to_mut().push(c);
    }
    b
}

fn long_at(time_ms: i64) -> Entry {
    Entry {
        time_ms,
        direction: Direction::Long,
        confidence: None,
        notional: None,
        leverage: None,
    }
}

fn series(interval: i64, tail: &[(f64, f64, f64, f64)]) -> SeriesInput<'static> {
    SeriesInput {
        symbol: "BTCUSDT".into(),
        interval_ms: interval,
        bars: bars(interval, tail),
        fine: None,
        entries: Entries::of(&[long_at(T0 + 20 * interval)]),
    }
}

fn fills(job: &JobOutput) -> Vec<(&'static str, String, String)> {
    let btc = btc();
    job.fills
        .iter()
        .map(|f| {
            (
                REASONS[f.reason as usize],
                btc.format_qty(f.quantity, true),
                btc.format_price(f.price),
            )
        })
        .collect()
}

fn one(input: SeriesInput<'_>, policy: &ExitPolicy, options: &BacktestOptions) -> JobOutput {
    let mut out = run(
        &[input],
        std::slice::from_ref(policy),
        &exchange_rules(),
        options,
    )
    .unwrap();
    assert_eq!(out.len(), 1);
    out.remove(0)
}

/// The worked example's policy over 1m `tail` bars after the warm-up, whose fills must be
/// `expected` (reason, quantity, price).
fn worked_example(
    tail: &[(f64, f64, f64, f64)],
    expected: &[(&'static str, &str, &str)],
) -> JobOutput {
    let job = one(series(MINUTE, tail), &example_policy("1m"), &options());
    let expected: Vec<_> = expected.iter().map(|&(r, q, p)| row(r, q, p)).collect();
    assert_eq!(fills(&job), expected);
    job
}

fn row(reason: &'static str, qty: &str, price: &str) -> (&'static str, String, String) {
    (reason, qty.to_owned(), price.to_owned())
}

#[test]
fn worked_example_jump_to_take_profit_3() {
    // Bar 20 crosses level 1 (30120.0) on its way up; bar 21 opens at 30370.0, beyond
    // levels 2 and 3 at once: ONE take_profit_3 for the rest, filled at that open.
    let job = worked_example(
        &[
            (30000.0, 30130.0, 29990.0, 30130.0),
            (30370.0, 30380.0, 30360.0, 30370.0),
        ],
        &[
            ("entry", "0.010", "30000.0"),
            ("take_profit_1", "0.003", "30120.0"),
            ("take_profit_3", "0.007", "30370.0"),
        ],
    );
    let trade = &job.trades[0];
    assert_eq!(trade.initial_stop, d("29880.0"));
    assert_eq!(trade.risk_price, d("120.0"));
    assert_eq!(
        job.levels.iter().map(|l| l.2).collect::<Vec<_>>(),
        vec![30120.0, 30240.0, 30360.0]
    );
    // fees: 0.15 + 0.04518 + 0.106295; PnL: 0.36 + 2.59 - fees
    assert_eq!(trade.fees, d("0.301475"));
    assert_eq!(trade.pnl, d("2.648525"));
    assert_eq!(REASONS[trade.exit_reason as usize], "take_profit_3");
}

#[test]
fn worked_example_ratchet_stop() {
    // TP1 in bar 20 (stop -> breakeven 30030.0), TP2 at 30240.0 in bar 21 (stop -> level 1,
    // 30120.0), then bar 22 falls to 29990.0: ratchet_stop for 0.004 at the trigger 30120.0.
    let job = worked_example(
        &[
            (30000.0, 30130.0, 29990.0, 30130.0),
            (30130.0, 30250.0, 30130.0, 30250.0),
            (30250.0, 30250.0, 29990.0, 29990.0),
        ],
        &[
            ("entry", "0.010", "30000.0"),
            ("take_profit_1", "0.003", "30120.0"),
            ("take_profit_2", "0.003", "30240.0"),
            ("ratchet_stop", "0.004", "30120.0"),
        ],
    );
    let stops: Vec<f64> = job.stops.iter().map(|s| s.2).collect();
    assert_eq!(stops, vec![30030.0, 30120.0]);
}

#[test]
fn intrabar_rule_decides_a_bar_that_spans_stop_and_target() {
    let tail = [(30000.0, 30200.0, 29800.0, 30000.0)];
    let policy = example_policy("1m");
    let job = one(series(MINUTE, &tail), &policy, &options());
    assert_eq!(fills(&job)[1..], [row("stop_loss", "0.010", "29880.0")]);
    let target_first = BacktestOptions {
        intrabar: Intrabar::TargetFirst,
        ..options()
    };
    let job = one(series(MINUTE, &tail), &policy, &target_first);
    assert_eq!(
        fills(&job)[1..],
        [
            row("take_profit_1", "0.003", "30120.0"),
            row("breakeven_stop", "0.007", "30030.0")
        ]
    );
}

#[test]
fn finer_bars_resolve_the_intrabar_order() {
    // 2m bars; the fine 1m bars say the high came first, so even stop_first sees TP1.
    let tail = [(30000.0, 30200.0, 29800.0, 30000.0)];
    let mut input = series(2 * MINUTE, &tail);
    let t = T0 + 40 * MINUTE;
    input.fine = Some((
        MINUTE,
        Bars {
            open_time: vec![t, t + MINUTE].into(),
            open: vec![30000.0, 30150.0].into(),
            high: vec![30200.0, 30150.0].into(),
            low: vec![30000.0, 29800.0].into(),
            close: vec![30150.0, 30000.0].into(),
        },
    ));
    let job = one(input, &example_policy("2m"), &options());
    assert_eq!(
        fills(&job)[1..],
        [
            row("take_profit_1", "0.003", "30120.0"),
            row("breakeven_stop", "0.007", "30030.0")
        ]
    );
}

#[test]
fn a_gap_closes_at_the_last_close_and_restarts_atr() {
    let mut input = series(MINUTE, &[(30000.0, 30010.0, 29990.0, 30005.0)]);
    // 10 more bars after a 1 h gap; an entry inside the gap has no bar to enter on.
    let last = *input.bars.open_time.last().unwrap();
    for i in 0..10 {
        input
            .bars
            .open_time
            .to_mut()
            .push(last + 3_600_000 + i * MINUTE);
        input.bars.open.to_mut().push(30000.0);
        input.bars.high.to_mut().push(30010.0);
        input.bars.low.to_mut().push(29990.0);
        input.bars.close.to_mut().push(30000.0);
    }
    input.entries.push(long_at(last + 1_800_000));
    let job = one(input, &example_policy("1m"), &options());
    assert_eq!(
        fills(&job),
        vec![
            row("entry", "0.010", "30000.0"),
            row("data_gap", "0.010", "30005.0")
        ]
    );
    assert_eq!(job.skipped, vec![(last + 1_800_000, NO_BAR, 1)]);
}

#[test]
fn entries_too_small_or_while_open_are_skipped() {
    let mut input = series(
        MINUTE,
        &[
            (30000.0, 30010.0, 29990.0, 30000.0),
            (30000.0, 30010.0, 29990.0, 30000.0),
        ],
    );
    input.entries.push(long_at(T0 + 21 * MINUTE));
    input.entries.push(Entry {
        notional: Some(d("20")),
        direction: Direction::Short,
        ..long_at(T0 + 21 * MINUTE)
    });
    let job = one(input, &example_policy("1m"), &options());
    assert_eq!(
        job.skipped,
        vec![(T0 + 21 * MINUTE, BELOW_MIN_QTY, 1), (0, POSITION_OPEN, 1)]
    );
    assert_eq!(fills(&job).last().unwrap().0, "end_of_data");
}

#[test]
fn grid_runs_every_policy_over_every_series() {
    let inputs = [
        series(MINUTE, &[(30000.0, 30200.0, 29800.0, 30000.0)]),
        series(MINUTE, &[(30000.0, 30130.0, 29990.0, 30130.0)]),
    ];
    let mut second = inputs[1].clone();
    second.symbol = "ETHUSDT".into();
    let inputs = vec![inputs[0].clone(), second];
    let policies = vec![
        example_policy("1m"),
        example_policy("1m"),
        example_policy("1m"),
    ];
    let out = run(&inputs, &policies, &exchange_rules(), &options()).unwrap();
    let keys: Vec<(u32, u32)> = out.iter().map(|j| (j.policy, j.series)).collect();
    assert_eq!(keys, vec![(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]);
    assert!(out.iter().all(|j| j.evaluations == 1));
}

#[test]
fn atr_interval_finer_than_the_data_is_refused() {
    let err = run(
        &[series(2 * MINUTE, &[])],
        &[example_policy("1m")],
        &exchange_rules(),
        &options(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("atr_interval"), "{err}");
}

/// Policies that reach every branch the mark skipping reasons about: trailing from the
/// start, by R, by level, by percent; breakeven and ratchet; a time stop with and
/// without its profit threshold.
fn skipping_policies() -> Vec<ExitPolicy> {
    let ladder = LadderLevel::ladder(&[(1.0, 0.3), (2.0, 0.3), (3.5, 0.2)]);
    let base = PolicyConfig {
        stop_atr: Some(2.0),
        min_stop_pct: 0.002,
        max_stop_pct: 0.03,
        ladder,
        breakeven_after_level: Some(1),
        ratchet_to_previous_level: true,
        atr_period: 5,
        atr_interval: "2m".to_owned(),
        ..PolicyConfig::default()
    };
    [
        PolicyConfig {
            trail_atr: Some(1.0),
            ..base.clone()
        },
        PolicyConfig {
            trail_atr: Some(1.5),
            trail_activate_r: Some(1.0),
            max_hold_ms: Some(45 * MINUTE),
            time_stop_unless_r: Some(0.5),
            ..base.clone()
        },
        PolicyConfig {
            trail_atr: Some(0.7),
            trail_after_level: Some(2),
            max_hold_ms: Some(30 * MINUTE),
            ..base.clone()
        },
        PolicyConfig {
            trail_pct: Some(0.004),
            trail_activate_pct: Some(0.003),
            ..base.clone()
        },
        PolicyConfig {
            breakeven_after_level: None,
            ratchet_to_previous_level: false,
            ..base
        },
    ]
    .into_iter()
    .map(|c| ExitPolicy::new(c).unwrap())
    .collect()
}

/// (trade, sequence, reason, time, price, quantity, trigger) of every fill.
type FillView = (u32, u32, u8, i64, Decimal, Decimal, Option<Decimal>);

fn fill_view(job: &JobOutput) -> Vec<FillView> {
    job.fills
        .iter()
        .map(|f| {
            (
                f.trade, f.sequence, f.reason, f.time_ms, f.price, f.quantity, f.trigger,
            )
        })
        .collect()
}

proptest::proptest! {
    /// The float tick of a kline price is the tick of its exact decimal rounded to the
    /// nearest grid point, or undecided (near a midpoint): SOLUSDT's grid (base 0.4200,
    /// tick 0.0100) fed 2 to 4 decimal prices, below and above the base.
    #[test]
    fn float_ticks_match_exact_rounding(mantissa in 0u64..100_000_000, decimals in 2u32..5) {
        let rules = exchange_rules();
        let sol = rules.symbol("SOLUSDT").unwrap();
        let grid = Grid::new(sol).unwrap();
        let v = mantissa as f64 / 10f64.powi(decimals as i32);
        let exact = grid.nearest_exact(sol, "", "open", v).unwrap();
        if let Some(fast) = grid.nearest_fast(v) {
            proptest::prop_assert_eq!(fast, exact);
        }
        let rounded = sol.quantize_price(decimal_from_f64("v", v).unwrap(), Rounding::Nearest);
        proptest::prop_assert_eq!(grid.price(exact), rounded);
    }

    /// Prices halfway between ticks (and their float neighbours, which are not) take
    /// the midpoint path or none, and it agrees with exact rounding: SOLUSDT (base
    /// 0.4200, below and above it) and BTCUSDT's tick 0.10 grid.
    /// The same over grids from 0.1 down to 1e-7 and prices of up to 9 decimals.
    #[test]
    fn float_ticks_match_exact_rounding_on_every_grid(
        mantissa in 0u64..10_000_000_000,
        decimals in 0u32..10,
        symbol in proptest::sample::select(
            vec!["BTCUSDT", "ETHUSDT", "XRPUSDT", "DOGEUSDT", "1000SHIBUSDT", "1000PEPEUSDT"],
        ),
    ) {
        let rules = exchange_rules();
        let sym = rules.symbol(symbol).unwrap();
        let grid = Grid::new(sym).unwrap();
        let v = mantissa as f64 / 10f64.powi(decimals as i32);
        // Beyond 2^40 ticks the exact path refuses; the float path is out by 2^30.
        let exact = grid.nearest_exact(sym, "", "open", v).ok();
        if let Some(fast) = grid.nearest_fast(v) {
            proptest::prop_assert_eq!(Some(fast), exact, "{} on {}", v, symbol);
        }
    }

    #[test]
    fn midpoint_ticks_match_exact_rounding(
        ticks in 0i64..20_000_000,
        symbol in proptest::sample::select(vec!["SOLUSDT", "BTCUSDT", "XRPUSDT"]),
        nudge in -1i64..2,
    ) {
        let rules = exchange_rules();
        let sym = rules.symbol(symbol).unwrap();
        let grid = Grid::new(sym).unwrap();
        let mid = grid.price(0) - Decimal::from(100) * sym.tick_size()
            + (Decimal::from(ticks) + Decimal::new(5, 1)) * sym.tick_size();
        let v = f64::from_bits(
            (to_f64(mid).to_bits() as i64 + nudge) as u64,
        );
        let exact = grid.nearest_exact(sym, "", "open", v).unwrap();
        let fast = grid.nearest_fast(v).or_else(|| grid.nearest_midpoint(v));
        if nudge == 0 && mid.abs() < Decimal::from(1_000_000) {
            proptest::prop_assert!(fast.is_some(), "{} unsettled", mid);
        }
        if let Some(fast) = fast {
            proptest::prop_assert_eq!(fast, exact, "{}", v);
        }
    }
}

proptest::proptest! {
    #![proptest_config(cases(48))]

    /// The integer replay gives the very fills of the decimal one (every mark through the
    /// state machine): random walks (ETHUSDT ticks), entries on both sides, both intrabar
    /// rules, with and without finer bars.
    #[test]
    fn integer_replay_gives_the_decimal_fills(
        seed in 1u64..u64::MAX,
        target_first in proptest::bool::ANY,
        with_fine in proptest::bool::ANY,
    ) {
        let mut state = seed;
        let mut next = move |n: u64| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state % n
        };
        let (coarse, n) = (2 * MINUTE, 400);
        let mut fine = Bars::default();
        let mut bars = Bars::default();
        let mut price = 200_000i64; // 2000.00 in ETHUSDT ticks of 0.01
        for i in 0..n {
            let t = T0 + i * coarse;
            let mut ticks = Vec::new();
            for half in 0..2 {
                let open = price;
                let close = open + next(121) as i64 - 60;
                let high = open.max(close) + next(40) as i64;
                let low = open.min(close) - next(40) as i64;
                for (column, value) in [
                    (&mut fine.open, open),
                    (&mut fine.high, high),
                    (&mut fine.low, low),
                    (&mut fine.close, close),
                ] {
                    column.to_mut().push(value as f64 / 100.0);
                }
                fine.open_time.to_mut().push(t + half * MINUTE);
                ticks.push((open, high, low, close));
                price = close;
            }
            bars.open_time.to_mut().push(t);
            bars.open.to_mut().push(ticks[0].0 as f64 / 100.0);
            bars.high.to_mut().push(ticks[0].1.max(ticks[1].1) as f64 / 100.0);
            bars.low.to_mut().push(ticks[0].2.min(ticks[1].2) as f64 / 100.0);
            bars.close.to_mut().push(ticks[1].3 as f64 / 100.0);
        }
        let mut entries = Vec::new();
        for i in 0..n {
            if next(6) == 0 {
                entries.push(Entry {
                    time_ms: T0 + i * coarse,
                    direction: if next(2) == 0 { Direction::Long } else { Direction::Short },
                    confidence: Some(next(101) as f64 / 100.0),
                    notional: None,
                    leverage: None,
                });
            }
        }
        let input = SeriesInput {
            symbol: "ETHUSDT".into(),
            interval_ms: coarse,
            bars,
            fine: with_fine.then_some((MINUTE, fine)),
            entries: Entries::of(&entries),
        };
        let skipping = BacktestOptions {
            intrabar: if target_first { Intrabar::TargetFirst } else { Intrabar::StopFirst },
            notional: d("5000"),
            ..options()
        };
        let exhaustive = BacktestOptions {
            exhaustive: true,
            ..skipping.clone()
        };
        let policies = skipping_policies();
        let rules = exchange_rules();
        let fast = run(std::slice::from_ref(&input), &policies, &rules, &skipping).unwrap();
        let slow = run(std::slice::from_ref(&input), &policies, &rules, &exhaustive).unwrap();
        let mut reasons = std::collections::BTreeSet::new();
        for (a, b) in fast.iter().zip(&slow) {
            proptest::prop_assert!(!a.decimal && b.decimal);
            proptest::prop_assert_eq!(fill_view(a), fill_view(b));
            proptest::prop_assert_eq!(&a.stops, &b.stops);
            proptest::prop_assert_eq!(a.evaluations, b.evaluations);
            reasons.extend(a.fills.iter().map(|f| f.reason));
        }
        proptest::prop_assert!(reasons.len() >= 4, "too few exit kinds: {reasons:?}");
    }
}

/// xorshift for the random cases below (proptest picks the seed, so a failure
/// shrinks to a seed that reproduces it).
struct Xorshift(u64);

impl Xorshift {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }

    /// A float in `[lo, hi)`, on a 1/1000 grid half the time (round parameters) and
    /// arbitrary otherwise (parameters whose products land anywhere between ticks).
    fn float(&mut self, lo: f64, hi: f64) -> f64 {
        let u = self.below(1_000_000) as f64 / 1_000_000.0;
        let x = lo + (hi - lo) * u;
        if self.below(2) == 0 {
            (x * 1000.0).round() / 1000.0
        } else {
            x
        }
    }

    fn maybe<T>(&mut self, value: T) -> Option<T> {
        (self.below(2) == 0).then_some(value)
    }
}

/// A random valid policy: every trailing kind (from the start, by R, by percent, by
/// level, by percent distance), breakeven, ratchet, time stops, ATR over 2m or 4m.
fn random_policy(rng: &mut Xorshift) -> ExitPolicy {
    let levels = 1 + rng.below(3) as usize;
    // A third of the ladders at whole multiples of R (the usual 1R, 2R, 3R), which the
    // integers settle by a multiplication; the others anywhere between.
    let whole = rng.below(3) == 0;
    let mut at = 0.0;
    let mut ladder = Vec::new();
    for i in 0..levels {
        at += if whole {
            1.0 + rng.below(2) as f64
        } else {
            rng.float(0.4, 1.6)
        };
        let fraction = if i + 1 == levels && rng.below(2) == 0 {
            1.0 - 0.3 * i as f64
        } else {
            0.3
        };
        ladder.push(LadderLevel { at, fraction });
    }
    let mut config = PolicyConfig {
        stop_atr: Some(rng.float(0.5, 3.0)),
        min_stop_pct: rng.float(0.0005, 0.003),
        max_stop_pct: rng.float(0.01, 0.05),
        ladder,
        breakeven_after_level: {
            let level = 1 + rng.below(levels as u64) as u32;
            rng.maybe(level)
        },
        ratchet_to_previous_level: rng.below(2) == 0,
        atr_period: 2 + rng.below(12) as u32,
        atr_interval: if rng.below(2) == 0 { "2m" } else { "4m" }.to_owned(),
        confidence_scale: rng.float(0.0, 1.0),
        ..PolicyConfig::default()
    };
    match rng.below(6) {
        0 => {}
        1 => config.trail_atr = Some(rng.float(0.3, 3.0)),
        2 => {
            config.trail_atr = Some(rng.float(0.3, 3.0));
            config.trail_activate_r = Some(if rng.below(2) == 0 {
                1.0 + rng.below(3) as f64
            } else {
                rng.float(0.2, 3.0)
            });
        }
        3 => {
            config.trail_atr = Some(rng.float(0.3, 3.0));
            config.trail_after_level = Some(1 + rng.below(levels as u64) as u32);
        }
        4 => {
            config.trail_atr = Some(rng.float(0.3, 3.0));
            config.trail_activate_pct = Some(rng.float(0.0005, 0.01));
        }
        _ => {
            config.trail_pct = Some(rng.float(0.001, 0.01));
            let pct = rng.float(0.0005, 0.01);
            config.trail_activate_pct = rng.maybe(pct);
        }
    }
    if rng.below(3) == 0 {
        config.max_hold_ms = Some((5 + rng.below(120) as i64) * MINUTE);
        let r = if rng.below(2) == 0 {
            1.0
        } else {
            rng.float(0.1, 1.5)
        };
        config.time_stop_unless_r = rng.maybe(r);
    }
    ExitPolicy::new(config).unwrap()
}

/// The first part where two job views differ (the whole views are long).
fn first_difference(left: &str, right: &str) -> String {
    let items = |view: &str| view.split("), (").map(str::to_owned).collect::<Vec<_>>();
    let (left, right) = (items(left), items(right));
    match left.iter().zip(&right).position(|(l, r)| l != r) {
        Some(k) => format!("item {k}:\n  {}\n  {}", left[k], right[k]),
        None => format!("lengths {} and {}", left.len(), right.len()),
    }
}

/// The values a job's result columns lay out, for an exact comparison: the records, and
/// the amounts as floats (`Debug` prints each float's shortest exact form) or as the
/// 12-decimal mantissas of the exact columns (each job writes its own decimals).
fn columns_view(columns: &ResultColumns) -> String {
    fn amounts<const N: usize>(amounts: &Amounts<N>) -> String {
        match amounts {
            Amounts::Floats(rows) => format!("{rows:?}"),
            Amounts::Exact(exact) => format!("{:?}", exact.as_ref().map(ExactRows::widened)),
        }
    }
    format!(
        "{:?} {} {:?} {}",
        columns.fills.records,
        amounts(&columns.fills.amounts),
        columns.trades.records,
        amounts(&columns.trades.amounts)
    )
}

/// Everything a job reports, for an exact comparison.
fn job_view(job: &JobOutput) -> String {
    let fills: Vec<_> = job
        .fills
        .iter()
        .map(|f| {
            (
                f.trade,
                f.sequence,
                f.reason,
                f.time_ms,
                f.direction == Direction::Long,
                f.price.serialize(),
                f.quantity.serialize(),
                f.fee.serialize(),
                f.pnl.serialize(),
                f.r.to_bits(),
                f.trigger.map(|t| t.serialize()),
            )
        })
        .collect();
    let trades: Vec<_> = job
        .trades
        .iter()
        .map(|t| {
            (
                t.trade,
                t.entry_time_ms,
                t.exit_time_ms,
                t.pnl.serialize(),
                t.fees.serialize(),
                t.initial_stop.serialize(),
                t.exit_reason,
                t.bars_held,
            )
        })
        .collect();
    let stops: Vec<_> = job
        .stops
        .iter()
        .map(|&(t, m, s)| (t, m, s.to_bits()))
        .collect();
    let levels: Vec<_> = job
        .levels
        .iter()
        .map(|&(t, n, l)| (t, n, l.to_bits()))
        .collect();
    format!(
        "{fills:?}\n{trades:?}\n{stops:?}\n{levels:?}\n{:?}\n{}",
        job.skipped, job.evaluations
    )
}

/// (symbol, price divisor, start) of the grids the random walks run on: ticks of 0.01
/// (ETHUSDT), a grid based at 0.42 (SOLUSDT), prices in 0.1 (BTCUSDT, tick 0.10) and
/// in 1e-5 (DOGEUSDT).
const WALK_GRIDS: [(&str, f64, i64); 4] = [
    ("ETHUSDT", 100.0, 200_000),
    ("SOLUSDT", 100.0, 15_000),
    ("BTCUSDT", 10.0, 300_000),
    ("DOGEUSDT", 100_000.0, 15_000),
];

proptest::proptest! {
    #![proptest_config(cases(64))]

    /// The integer replay, where a bar that provably triggers nothing is one step, gives
    /// what the decimal replay (every mark through the state machine) gives: the same
    /// fills (every field, exact decimals and their scale), trades, stop after every bar,
    /// levels, skips and evaluation counts, over random walks with calm and wild stretches and gaps,
    /// random policies, both sides, sparse and dense entries, both intrabar rules, with
    /// and without finer bars, on four grids.
    #[test]
    fn integer_replay_matches_the_decimal_replay(
        seed in 1u64..u64::MAX,
        target_first in proptest::bool::ANY,
        with_fine in proptest::bool::ANY,
        grid in 0usize..WALK_GRIDS.len(),
        dense in proptest::bool::ANY,
    ) {
        let mut rng = Xorshift(seed);
        let (symbol, divisor, start) = WALK_GRIDS[grid];
        let (coarse, n) = (2 * MINUTE, 300);
        let mut fine = Bars::default();
        let mut bars = Bars::default();
        let mut price = start;
        let mut t = T0;
        for _ in 0..n {
            if rng.below(60) == 0 {
                t += coarse * (1 + rng.below(3) as i64); // a gap, sometimes a segment end
            }
            // Volatility regimes: calm, normal, wild (gaps through stops and levels).
            let scale = [start / 2000, start / 500, start / 100][rng.below(3) as usize].max(2);
            let drift = rng.below(3) as i64 - 1;
            let mut ticks = Vec::new();
            for half in 0..2 {
                let open = if rng.below(20) == 0 {
                    price + rng.below(2 * scale as u64) as i64 - scale
                } else {
                    price
                }
                .max(10);
                let close = (open + drift * scale / 4 + rng.below(scale as u64 + 1) as i64
                    - scale / 2)
                    .max(10);
                let high = open.max(close) + rng.below(scale as u64 / 2 + 1) as i64;
                let low = (open.min(close) - rng.below(scale as u64 / 2 + 1) as i64).max(5);
                for (column, value) in [
                    (&mut fine.open, open),
                    (&mut fine.high, high),
                    (&mut fine.low, low),
                    (&mut fine.close, close),
                ] {
                    column.to_mut().push(value as f64 / divisor);
                }
                fine.open_time.to_mut().push(t + half * MINUTE);
                ticks.push((open, high, low, close));
                price = close;
            }
            bars.open_time.to_mut().push(t);
            bars.open.to_mut().push(ticks[0].0 as f64 / divisor);
            bars.high.to_mut().push(ticks[0].1.max(ticks[1].1) as f64 / divisor);
            bars.low.to_mut().push(ticks[0].2.min(ticks[1].2) as f64 / divisor);
            bars.close.to_mut().push(ticks[1].3 as f64 / divisor);
            t += coarse;
        }
        let mut entries = Vec::new();
        for &time_ms in bars.open_time.iter() {
            if dense || rng.below(8) == 0 {
                let confidence = rng.below(101) as f64 / 100.0;
                entries.push(Entry {
                    time_ms,
                    direction: if rng.below(2) == 0 { Direction::Long } else { Direction::Short },
                    confidence: rng.maybe(confidence),
                    notional: None,
                    leverage: None,
                });
            }
        }
        let input = SeriesInput {
            symbol: symbol.into(),
            interval_ms: coarse,
            bars,
            fine: with_fine.then_some((MINUTE, fine)),
            entries: Entries::of(&entries),
        };
        let skipping = BacktestOptions {
            intrabar: if target_first { Intrabar::TargetFirst } else { Intrabar::StopFirst },
            notional: d("5000"),
            max_gap_bars: 1,
            one_position_per_symbol: dense && rng.below(2) == 0,
            // Without detail the integer replay sweeps runs of quiet bars at once.
            detail: rng.below(2) == 0,
            ..options()
        };
        let exhaustive = BacktestOptions {
            exhaustive: true,
            ..skipping.clone()
        };
        let policies: Vec<ExitPolicy> = (0..6).map(|_| random_policy(&mut rng)).collect();
        let rules = exchange_rules();
        let fast = run(std::slice::from_ref(&input), &policies, &rules, &skipping).unwrap();
        let slow = run(std::slice::from_ref(&input), &policies, &rules, &exhaustive).unwrap();
        for (a, b) in fast.iter().zip(&slow) {
            proptest::prop_assert!(!a.decimal && b.decimal);
            proptest::prop_assert_eq!(job_view(a), job_view(b));
            proptest::prop_assert_eq!(b.quiet_bars, 0);
        }
        let quiet: u64 = fast.iter().map(|j| j.quiet_bars).sum();
        let evaluations: u64 = fast.iter().map(|j| j.evaluations).sum();
        proptest::prop_assert!(evaluations > 0);
        if !with_fine {
            proptest::prop_assert!(quiet > 0, "no quiet bar in {evaluations} evaluations");
        }
    }
}

#[test]
fn replay_marks_gives_the_worked_example_decisions() {
    let rules = exchange_rules();
    let marks = [(1, d("30125.0")), (2, d("30130.0")), (3, d("30370.0"))];
    let got = replay_marks(
        &rules,
        &example_policy("1m"),
        "BTCUSDT",
        Direction::Long,
        d("0.010"),
        d("30000.0"),
        &marks,
        Some(60.0),
        10,
        None,
        0,
    )
    .unwrap();
    let view: Vec<(String, String)> = got
        .iter()
        .map(|x| (x.reason.clone(), btc().format_qty(x.quantity, true)))
        .collect();
    assert_eq!(
        view,
        vec![
            ("take_profit_1".into(), "0.003".into()),
            ("take_profit_3".into(), "0.007".into())
        ]
    );
}

proptest::proptest! {
    #![proptest_config(cases(64))]

    /// Opening a position in integers gives the very state the decimal open
    /// (`PositionState::open`, read as ticks) gives, and the same over-leverage verdict, or
    /// says it is unsettled; and an entry's size in lot units is the decimal
    /// `quantize_qty(notional / price)` with the same skips. Every real symbol's filters,
    /// random policies, prices, ATRs, leverages, confidences and notionals; the integers
    /// must settle nearly every case.
    #[test]
    fn integer_open_matches_the_decimal_open(seed in 1u64..u64::MAX) {
        use super::ticks::{Opening, TickPosition, TickRules};
        let mut rng = Xorshift(seed);
        let rules = exchange_rules();
        let (mut settled, mut cases) = (0, 0);
        for symbol_rules in rules.iter() {
            let Ok(grid) = Grid::new(symbol_rules) else { continue };
            let Some(band) = grid.plausible_ticks(symbol_rules) else { continue };
            let mut policy = random_policy(&mut rng);
            if rng.below(3) == 0 {
                // Levels at whole multiples of R, and the margin cap's and the stop
                // clamp's round percentages: the exact integer branches.
                let mut config = policy.config().clone();
                for (k, level) in config.ladder.iter_mut().enumerate() {
                    level.at = (k + 1) as f64;
                }
                config.max_margin_loss = Some(0.1);
                config.min_stop_pct = 0.003;
                config.max_stop_pct = 0.03;
                policy = ExitPolicy::new(config).unwrap();
            }
            let Ok(tick_rules) = TickRules::new(grid, symbol_rules, &policy, Some(band)) else {
                continue;
            };
            // A price between 20 ticks and the band's top third, on the grid.
            let span = (band.1 - band.0).clamp(40, 1 << 30) as u64;
            let mut entry = band.0 + 20 + rng.below(span / 3) as i64;
            if rng.below(3) == 0 {
                entry -= entry % 1000; // round prices: percentages land on whole ticks
                entry = entry.max(band.0 + 20);
            }
            let price = grid.price(entry);
            if price <= Decimal::ZERO {
                continue;
            }
            let notional = Decimal::from(1 + rng.below(50_000));
            let options = BacktestOptions { notional, ..options() };
            let long = rng.below(2) == 0;
            let confidence = rng.below(101) as f64 / 100.0;
            let entry_request = Entry {
                time_ms: T0,
                direction: if long { Direction::Long } else { Direction::Short },
                confidence: rng.maybe(confidence),
                notional: None,
                leverage: None,
            };
            let decimal_size = super::walk::entry_quantity(symbol_rules, &options, &entry_request, price);
            let units = match (tick_rules.entry_units(tick_rules.sizing(notional), entry), &decimal_size) {
                (None, _) => continue,
                (Some(Err(a)), Err(b)) => {
                    proptest::prop_assert_eq!(a, *b, "{}", symbol_rules.symbol);
                    continue;
                }
                (Some(Ok(units)), Ok(quantity)) => {
                    proptest::prop_assert_eq!(
                        tick_rules.qty.decimal(units).unwrap(), *quantity, "{}", symbol_rules.symbol
                    );
                    units
                }
                (integer, decimal) => {
                    proptest::prop_assert!(false, "{}: {:?} vs {:?}", symbol_rules.symbol, integer, decimal);
                    unreachable!()
                }
            };
            let quantity = tick_rules.qty.decimal(units).unwrap();
            let atr = crate::fixed::decimal_to_f64(price) * rng.float(0.00005, 0.05);
            let atr = rng.maybe(atr);
            let leverage = 1 + rng.below(125) as u32;
            let mut integer = TickPosition::default();
            let opening = integer.open(
                if long { 1 } else { -1 },
                entry,
                units,
                leverage,
                entry_request.confidence,
                atr,
                T0,
                &tick_rules,
            );
            let decimal = super::exit_api::new_position(
                symbol_rules,
                &policy,
                0,
                entry_request.direction,
                quantity,
                price,
                leverage,
                entry_request.confidence,
                T0,
                atr,
            );
            cases += 1;
            match (opening, decimal) {
                (Opening::Unsettled, _) => {}
                (Opening::OverLeveraged, Ok(state)) => {
                    settled += 1;
                    proptest::prop_assert!(state.over_leveraged, "{}", symbol_rules.symbol);
                }
                (Opening::OverLeveraged, Err(_)) => settled += 1,
                (Opening::Opened, Ok(state)) => {
                    settled += 1;
                    proptest::prop_assert!(!state.over_leveraged, "{}", symbol_rules.symbol);
                    let mut loaded = TickPosition::default();
                    loaded.load(&state, T0, &tick_rules).unwrap();
                    proptest::prop_assert_eq!(
                        format!("{integer:?}"), format!("{loaded:?}"), "{} {:?}", symbol_rules.symbol, atr
                    );
                }
                (Opening::Opened, Err(e)) => {
                    proptest::prop_assert!(false, "{}: integer opened, decimal refused: {e}", symbol_rules.symbol);
                }
            }
        }
        proptest::prop_assert!(cases > 300, "{cases} cases");
        proptest::prop_assert!(settled * 100 >= cases * 95, "{settled} of {cases} settled");
    }
}

/// A job the integers cannot hold (a take-profit level beyond 2^40 ticks of a 1e-8 tick)
/// reruns the decimal way, and reports the decimal results.
#[test]
fn a_level_beyond_the_tick_range_falls_back_to_the_decimal_replay() {
    let doc = serde_json::json!({"symbols": [{
        "symbol": "FINEUSDT", "pair": "FINEUSDT", "contractType": "PERPETUAL",
        "status": "TRADING", "baseAsset": "FINE", "quoteAsset": "USDT", "marginAsset": "USDT",
        "pricePrecision": 8, "quantityPrecision": 3,
        "filters": [
            {"filterType": "PRICE_FILTER", "minPrice": "0.00000001", "maxPrice": "100000",
             "tickSize": "0.00000001"},
            {"filterType": "LOT_SIZE", "minQty": "0.001", "maxQty": "1000", "stepSize": "0.001"},
            {"filterType": "MARKET_LOT_SIZE", "minQty": "0.001", "maxQty": "1000",
             "stepSize": "0.001"},
            {"filterType": "MIN_NOTIONAL", "notional": "5"}
        ]
    }]});
    let rules = ExchangeRules::from_value(&doc).unwrap();
    // 1000.0 is 1e11 ticks; a level at 1000 R with R = 3 % of the entry is 3.1e12 ticks.
    let policy = ExitPolicy::new(PolicyConfig {
        fallback_stop_pct: 0.03,
        min_stop_pct: 0.03,
        max_stop_pct: 0.03,
        ladder: LadderLevel::ladder(&[(1.0, 0.5), (1000.0, 0.5)]),
        ..PolicyConfig::default()
    })
    .unwrap();
    let mut input = series(
        MINUTE,
        &[
            (1000.0, 1040.0, 990.0, 1035.0),
            (1035.0, 1036.0, 960.0, 961.0),
        ],
    );
    input.symbol = "FINEUSDT".into();
    input.bars.open.to_mut()[..20].fill(1000.0);
    input.bars.high.to_mut()[..20].fill(1001.0);
    input.bars.low.to_mut()[..20].fill(999.0);
    input.bars.close.to_mut()[..20].fill(1000.0);
    let options = BacktestOptions {
        notional: d("5000"),
        ..options()
    };
    let fast = run(
        std::slice::from_ref(&input),
        std::slice::from_ref(&policy),
        &rules,
        &options,
    )
    .unwrap();
    let exhaustive = BacktestOptions {
        exhaustive: true,
        ..options.clone()
    };
    let slow = run(std::slice::from_ref(&input), &[policy], &rules, &exhaustive).unwrap();
    assert!(fast[0].decimal, "the integer replay should have given up");
    assert!(fast[0].fills.len() >= 3, "{:?}", fast[0].fills);
    assert_eq!(job_view(&fast[0]), job_view(&slow[0]));
}

proptest::proptest! {
    #![proptest_config(cases(16))]

    /// The integer replay matches the decimal one on random real symbols' filters (every
    /// grid base, tick, lot step, `minQty` and `MIN_NOTIONAL` of the snapshot over enough
    /// cases): dense entries on both sides through a wild walk, random policies.
    #[test]
    fn integer_replay_matches_on_real_symbols(seed in 1u64..u64::MAX) {
        let mut rng = Xorshift(seed);
        let rules = exchange_rules();
        let all: Vec<&crate::rules::SymbolRules> = rules.iter().collect();
        for _ in 0..8 {
            let symbol_rules = all[rng.below(all.len() as u64) as usize];
            let Ok(grid) = Grid::new(symbol_rules) else { continue };
            let Some(band) = grid.plausible_ticks(symbol_rules) else { continue };
            let start = band.0.max(0) + 20_000;
            if start + 40_000 > band.1 {
                continue;
            }
            let price_of = |k: i64| grid.base_f + k as f64 * grid.step_f;
            let mut bars = Bars::default();
            let mut k = start;
            let mut entries = Vec::new();
            for i in 0..240 {
                let scale = [10u64, 60, 300][rng.below(3) as usize];
                let open = k;
                let close = (open + rng.below(2 * scale + 1) as i64 - scale as i64).max(start / 2);
                let high = open.max(close) + rng.below(scale / 2 + 1) as i64;
                let low = (open.min(close) - rng.below(scale / 2 + 1) as i64).max(start / 2);
                let t = T0 + i * MINUTE;
                bars.open_time.to_mut().push(t);
                bars.open.to_mut().push(price_of(open));
                bars.high.to_mut().push(price_of(high));
                bars.low.to_mut().push(price_of(low));
                bars.close.to_mut().push(price_of(close));
                k = close;
                if rng.below(3) != 0 {
                    let confidence = rng.below(101) as f64 / 100.0;
                    entries.push(Entry {
                        time_ms: t,
                        direction: if rng.below(2) == 0 { Direction::Long } else { Direction::Short },
                        confidence: rng.maybe(confidence),
                        notional: None,
                        leverage: None,
                    });
                }
            }
            let price = grid.price(start);
            let notional = (symbol_rules.min_qty(true) * price * Decimal::from(40))
                .max(symbol_rules.min_notional() * Decimal::from(8))
                .max(Decimal::from(100))
                .round_dp(2);
            let input = SeriesInput {
                symbol: symbol_rules.symbol.clone(),
                interval_ms: MINUTE,
                bars,
                fine: None,
                entries: Entries::of(&entries),
            };
            let fast_options = BacktestOptions {
                notional,
                one_position_per_symbol: rng.below(2) == 0,
                detail: rng.below(2) == 0,
                intrabar: if rng.below(2) == 0 { Intrabar::TargetFirst } else { Intrabar::StopFirst },
                ..options()
            };
            let slow_options = BacktestOptions { exhaustive: true, ..fast_options.clone() };
            let policies: Vec<ExitPolicy> = (0..3).map(|_| random_policy(&mut rng)).collect();
            let fast = run(std::slice::from_ref(&input), &policies, &rules, &fast_options).unwrap();
            let slow = run(std::slice::from_ref(&input), &policies, &rules, &slow_options).unwrap();
            for (a, b) in fast.iter().zip(&slow) {
                proptest::prop_assert!(!a.decimal, "{}", symbol_rules.symbol);
                let (x, y) = (job_view(a), job_view(b));
                proptest::prop_assert!(x == y, "{}: {}", symbol_rules.symbol, first_difference(&x, &y));
            }
            // The columns the integer replay writes as it books are those of the decimal
            // replay's rows, bit for bit (Debug prints each float's shortest exact form).
            for form in [ColumnForm::Floats, ColumnForm::Exact] {
                let direct_options = BacktestOptions {
                    columns: Some(form),
                    detail: false,
                    ..fast_options.clone()
                };
                let direct = run(std::slice::from_ref(&input), &policies, &rules, &direct_options).unwrap();
                for (a, b) in direct.iter().zip(&slow) {
                    proptest::prop_assert!(!a.decimal && a.fills.is_empty() && a.trades.is_empty());
                    let expected = ResultColumns::from_rows(&b.fills, &b.trades, form);
                    let direct = a.columns.as_ref().map(columns_view);
                    proptest::prop_assert_eq!(
                        direct,
                        Some(columns_view(&expected)),
                        "{} {:?}", symbol_rules.symbol, form
                    );
                }
            }
        }
    }
}
