//! The core on the real fixtures in `tests/data/binance`: every exchangeInfo symbol, and
//! the documented mark-price payloads.

#![allow(clippy::unwrap_used, clippy::float_cmp)] // test code: a panic is a failure; exact floats are the point

use std::path::PathBuf;

use pyquant_core::feed::parse_mark_message;
use pyquant_core::fixed::{parse_decimal, Decimal, Rounding};
use pyquant_core::rules::{ExchangeRules, OrderCheck, OrderType, Side};

fn fixture(name: &str) -> Vec<u8> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/data/binance")
        .join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn rules() -> ExchangeRules {
    ExchangeRules::from_json(&fixture("exchangeInfo_fapi_full_2025-11-26.json")).unwrap()
}

fn decimals(text: &str) -> u32 {
    text.split_once('.').map_or(0, |(_, f)| f.len() as u32)
}

#[test]
fn every_symbol_parses() {
    let rules = rules();
    assert_eq!(rules.len(), 647);
    let btc = rules.symbol("BTCUSDT").unwrap();
    assert_eq!(btc.tick_size(), parse_decimal("t", "0.10").unwrap());
    assert_eq!(btc.min_notional(), Decimal::from(100));
    assert_eq!(rules.iter().filter(|r| r.is_trading()).count(), 555);
}

#[test]
fn price_bounds_are_grid_points_on_every_symbol() {
    for r in rules().iter() {
        let f = &r.price_filter;
        if f.tick_size.is_zero() {
            continue;
        }
        for bound in [f.min_price, f.max_price] {
            for mode in [Rounding::Down, Rounding::Up, Rounding::Nearest] {
                let q = r.quantize_price(bound, mode);
                assert_eq!(q, bound, "{} {bound} {mode:?}", r.symbol);
                let text = r.format_price(q);
                assert!(decimals(&text) <= r.price_precision, "{} {text}", r.symbol);
                assert!(!text.contains('e'), "{text}");
            }
        }
    }
}

#[test]
fn quantized_values_are_on_grid_within_precision_on_every_symbol() {
    let fractions = ["0.123456789", "0.5", "0.987654321", "0.000314159"];
    for r in rules().iter() {
        let f = &r.price_filter;
        let span = if f.max_price.is_zero() {
            Decimal::from(1000)
        } else {
            f.max_price - f.min_price
        };
        for frac in fractions {
            let raw = f.min_price + span * parse_decimal("f", frac).unwrap();
            for mode in [Rounding::Down, Rounding::Up, Rounding::Nearest] {
                let q = r.quantize_price(raw, mode);
                let step = r.price_step();
                assert!(((q - f.min_price) % step).is_zero() || f.tick_size.is_zero());
                match mode {
                    Rounding::Down => assert!(q <= raw && raw - q < step),
                    Rounding::Up => assert!(q >= raw && q - raw < step),
                    Rounding::Nearest => assert!((q - raw).abs() * Decimal::TWO <= step),
                }
                assert!(
                    decimals(&r.format_price(q)) <= r.price_precision,
                    "{}",
                    r.symbol
                );
            }
            for market in [true, false] {
                let lot = if market {
                    &r.market_lot_size
                } else {
                    &r.lot_size
                };
                let raw_qty =
                    lot.min_qty + (lot.max_qty - lot.min_qty) * parse_decimal("f", frac).unwrap();
                let q = r.quantize_qty(raw_qty, market);
                assert!(
                    q <= raw_qty && raw_qty - q < lot.step_size,
                    "{} {raw_qty} {q}",
                    r.symbol
                );
                assert!(((q - lot.min_qty) % lot.step_size).is_zero());
                let text = r.format_qty(q, market);
                assert!(
                    decimals(&text) <= r.quantity_precision,
                    "{} {text}",
                    r.symbol
                );
                let order = OrderCheck {
                    side: Side::Sell,
                    order_type: if market {
                        OrderType::Market
                    } else {
                        OrderType::Limit
                    },
                    quantity: parse_decimal("q", &text).unwrap(),
                    price: (!market && !f.tick_size.is_zero()).then(|| {
                        parse_decimal(
                            "p",
                            &r.format_price(
                                r.quantize_price(f.min_price + span / Decimal::TWO, Rounding::Down),
                            ),
                        )
                        .unwrap()
                    }),
                    stop_price: None,
                    mark_price: None,
                    best_price: None,
                    reduce_only: true,
                };
                if market || !f.tick_size.is_zero() {
                    assert_eq!(r.check_order(&order), None, "{} {order:?}", r.symbol);
                }
            }
        }
    }
}

#[test]
fn documented_mark_price_payloads_parse() {
    let single = fixture("ws_markPrice_docs.json");
    let batch = parse_mark_message(&single).unwrap();
    assert_eq!(batch.len(), 1);
    assert_eq!(batch.updates[0].symbol, "BTCUSDT");
    assert_eq!(batch.updates[0].mark_price.to_string(), "11794.15000000");
    assert_eq!(batch.updates[0].event_time_ms, 1_562_305_380_000);

    let array = fixture("ws_markPrice_arr_docs.json");
    let batch = parse_mark_message(&array).unwrap();
    assert_eq!(batch.len(), 1);
    assert_eq!(batch.updates[0].mark_f64(), 11_185.877_866_14);
    assert_eq!(batch.updates[0].mark_units, 1_118_587_786_614);

    let wrapped = fixture("ws_combined_wrapper_docs.json");
    let batch = parse_mark_message(&wrapped).unwrap();
    assert_eq!(batch.updates[0].symbol, "BTCUSDT");

    // Other documented stream payloads are not mark prices: refused, not misread.
    for other in ["ws_kline_open_docs.json", "ws_aggTrade_docs.json"] {
        assert!(parse_mark_message(&fixture(other)).is_err(), "{other}");
    }
}
