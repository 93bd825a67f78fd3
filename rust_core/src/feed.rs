//! Mark-price websocket payloads -> a batch of updates, in one pass over the bytes.
//!
//! Accepted shapes (contract §7.2, samples in `tests/data/binance/ws_markPrice*.json`):
//! - one `markPriceUpdate` object (`<symbol>@markPrice[@1s]`),
//! - an array of them (`!markPrice@arr[@1s]`),
//! - the combined-stream wrapper `{"stream": ..., "data": <object or array>}`.
//!
//! Only `e`, `E`, `s` and `p` are read; other keys (`i`, `P`, `r`, `T`, `st`, future
//! ones) are skipped without being materialized. Symbols are borrowed from the input.
//! The mark price is kept both as an exact [`Decimal`] (for wire strings and
//! comparisons with quantized levels) and as the correctly rounded `f64` of the same
//! text (for bars and ATR). A malformed message is an `Err` and yields no updates at
//! all, so a caller that applies the batch only on `Ok` never applies half a message.

use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

use crate::error::CoreError;
use crate::fixed::{parse_decimal, Decimal};

/// One mark-price update.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MarkUpdate<'a> {
    /// Symbol, upper case as Binance sends it, borrowed from the message.
    pub symbol: &'a str,
    /// Mark price, exact.
    pub mark_price: Decimal,
    /// Mark price as the nearest `f64` to the same decimal text.
    pub mark_price_f64: f64,
    /// Event time `E`, milliseconds since the epoch.
    pub event_time_ms: i64,
}

/// The updates of one websocket message, in message order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MarkBatch<'a> {
    pub updates: Vec<MarkUpdate<'a>>,
}

impl<'a> MarkBatch<'a> {
    /// Number of updates.
    pub fn len(&self) -> usize {
        self.updates.len()
    }

    /// Whether the message carried no update.
    pub fn is_empty(&self) -> bool {
        self.updates.is_empty()
    }

    /// Iterates over the updates.
    pub fn iter(&self) -> std::slice::Iter<'_, MarkUpdate<'a>> {
        self.updates.iter()
    }
}

impl<'b, 'a> IntoIterator for &'b MarkBatch<'a> {
    type Item = &'b MarkUpdate<'a>;
    type IntoIter = std::slice::Iter<'b, MarkUpdate<'a>>;

    fn into_iter(self) -> Self::IntoIter {
        self.updates.iter()
    }
}

impl<'a> IntoIterator for MarkBatch<'a> {
    type Item = MarkUpdate<'a>;
    type IntoIter = std::vec::IntoIter<MarkUpdate<'a>>;

    fn into_iter(self) -> Self::IntoIter {
        self.updates.into_iter()
    }
}

/// Parses one mark-price websocket message.
///
/// # Errors
/// `CoreError::Message` naming what is wrong (not JSON, a missing or mistyped `E`, `s`
/// or `p`, an event type other than `markPriceUpdate`, a price that is not a plain
/// positive decimal, a wrapper without `data`).
pub fn parse_mark_message(data: &[u8]) -> Result<MarkBatch<'_>, CoreError> {
    let mut raw = Vec::new();
    parse_raw(data, &mut raw)?;
    let mut updates = Vec::with_capacity(raw.len());
    for (index, r) in raw.iter().enumerate() {
        updates.push(convert(r, index)?);
    }
    Ok(MarkBatch { updates })
}

/// Parses into a reusable buffer (cleared first); on error the buffer is left empty.
///
/// # Errors
/// As [`parse_mark_message`].
pub fn parse_mark_message_into<'a>(
    data: &'a [u8],
    out: &mut Vec<MarkUpdate<'a>>,
) -> Result<(), CoreError> {
    out.clear();
    let mut raw = Vec::new();
    parse_raw(data, &mut raw)?;
    out.reserve(raw.len());
    for (index, r) in raw.iter().enumerate() {
        match convert(r, index) {
            Ok(u) => out.push(u),
            Err(e) => {
                out.clear();
                return Err(e);
            }
        }
    }
    Ok(())
}

fn parse_raw<'a>(data: &'a [u8], raw: &mut Vec<RawUpdate<'a>>) -> Result<(), CoreError> {
    let mut de = serde_json::Deserializer::from_slice(data);
    MessageSeed { out: raw, depth: 0 }
        .deserialize(&mut de)
        .and_then(|()| de.end())
        .map_err(|e| CoreError::message(e.to_string()))
}

fn convert<'a>(raw: &RawUpdate<'a>, index: usize) -> Result<MarkUpdate<'a>, CoreError> {
    let bad = |rule: &str| {
        CoreError::message(format!(
            "update {index} ({}): mark price p {:?} {rule}",
            raw.symbol, raw.price
        ))
    };
    let mark_price = parse_decimal("p", raw.price).map_err(|_| bad("is not a plain decimal"))?;
    if mark_price <= Decimal::ZERO {
        return Err(bad("must be positive"));
    }
    // The grammar check above guarantees `parse` succeeds; it rounds correctly.
    let mark_price_f64 = raw
        .price
        .parse::<f64>()
        .map_err(|_| bad("is not a number"))?;
    Ok(MarkUpdate {
        symbol: raw.symbol,
        mark_price,
        mark_price_f64,
        event_time_ms: raw.event_time_ms,
    })
}

#[derive(Debug, Clone, Copy)]
struct RawUpdate<'a> {
    symbol: &'a str,
    price: &'a str,
    event_time_ms: i64,
}

/// Visits a message (object, array or wrapper) and appends raw updates to `out`.
struct MessageSeed<'b, 'a> {
    out: &'b mut Vec<RawUpdate<'a>>,
    /// 0 at the top; 1 inside a wrapper's `data` (wrappers do not nest).
    depth: u8,
}

impl<'de> DeserializeSeed<'de> for MessageSeed<'_, 'de> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for MessageSeed<'_, 'de> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(
            "a markPriceUpdate object, an array of them, or a {\"stream\", \"data\"} wrapper",
        )
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        if let Some(hint) = seq.size_hint() {
            self.out.reserve(hint);
        }
        while let Some(update) = seq.next_element_seed(UpdateSeed)? {
            self.out.push(update);
        }
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let mut fields = UpdateFields::default();
        let mut saw_data = false;
        let mut saw_stream = false;
        while let Some(key) = map.next_key::<&'de str>()? {
            match key {
                "data" if self.depth == 0 => {
                    if saw_data {
                        return Err(de::Error::duplicate_field("data"));
                    }
                    saw_data = true;
                    map.next_value_seed(MessageSeed {
                        out: &mut *self.out,
                        depth: 1,
                    })?;
                }
                "stream" if self.depth == 0 => {
                    saw_stream = true;
                    map.next_value::<IgnoredAny>()?;
                }
                _ => fields.accept(key, &mut map)?,
            }
        }
        if saw_data {
            if fields.any() {
                return Err(de::Error::custom(
                    "a combined-stream wrapper must not carry update fields beside data",
                ));
            }
            return Ok(());
        }
        if saw_stream {
            return Err(de::Error::missing_field("data"));
        }
        self.out.push(fields.finish()?);
        Ok(())
    }
}

struct UpdateSeed;

impl<'de> DeserializeSeed<'de> for UpdateSeed {
    type Value = RawUpdate<'de>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for UpdateSeed {
    type Value = RawUpdate<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a markPriceUpdate object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut fields = UpdateFields::default();
        while let Some(key) = map.next_key::<&'de str>()? {
            fields.accept(key, &mut map)?;
        }
        fields.finish()
    }
}

#[derive(Default)]
struct UpdateFields<'a> {
    event_type: Option<&'a str>,
    event_time_ms: Option<i64>,
    symbol: Option<&'a str>,
    price: Option<&'a str>,
}

impl<'a> UpdateFields<'a> {
    fn accept<A: MapAccess<'a>>(&mut self, key: &'a str, map: &mut A) -> Result<(), A::Error> {
        fn set<T, E: de::Error>(
            slot: &mut Option<T>,
            value: T,
            name: &'static str,
        ) -> Result<(), E> {
            if slot.replace(value).is_some() {
                return Err(E::duplicate_field(name));
            }
            Ok(())
        }
        match key {
            "e" => set(&mut self.event_type, map.next_value::<&'a str>()?, "e"),
            "E" => set(&mut self.event_time_ms, map.next_value::<i64>()?, "E"),
            "s" => set(&mut self.symbol, map.next_value::<&'a str>()?, "s"),
            "p" => set(&mut self.price, map.next_value::<&'a str>()?, "p"),
            _ => map.next_value::<IgnoredAny>().map(|_| ()),
        }
    }

    fn any(&self) -> bool {
        self.event_type.is_some()
            || self.event_time_ms.is_some()
            || self.symbol.is_some()
            || self.price.is_some()
    }

    fn finish<E: de::Error>(self) -> Result<RawUpdate<'a>, E> {
        if let Some(kind) = self.event_type {
            if kind != "markPriceUpdate" {
                return Err(E::custom(format_args!(
                    "event type e {kind:?} is not markPriceUpdate"
                )));
            }
        }
        let symbol = self.symbol.ok_or_else(|| E::missing_field("s"))?;
        if symbol.is_empty() {
            return Err(E::custom("symbol s is empty"));
        }
        Ok(RawUpdate {
            symbol,
            price: self.price.ok_or_else(|| E::missing_field("p"))?,
            event_time_ms: self.event_time_ms.ok_or_else(|| E::missing_field("E"))?,
        })
    }
}

#[cfg(test)]
#[allow(clippy::float_cmp)] // exact equality is what these tests check
mod tests {
    use super::*;

    const SINGLE: &str = r#"{"e":"markPriceUpdate","E":1562305380000,"s":"BTCUSDT","p":"11794.15000000","i":"11784.62659091","P":"11784.25641265","r":"0.00038167","T":1562306400000,"st":1}"#;

    #[test]
    fn parses_a_single_update() {
        let batch = parse_mark_message(SINGLE.as_bytes()).unwrap();
        assert_eq!(batch.len(), 1);
        let u = batch.updates[0];
        assert_eq!(u.symbol, "BTCUSDT");
        assert_eq!(u.mark_price.to_string(), "11794.15000000");
        assert_eq!(u.mark_price_f64, 11794.15);
        assert_eq!(u.event_time_ms, 1_562_305_380_000);
    }

    #[test]
    fn parses_arrays_and_wrappers() {
        let arr = format!("[{SINGLE},{}]", SINGLE.replace("BTCUSDT", "ETHUSDT"));
        let batch = parse_mark_message(arr.as_bytes()).unwrap();
        assert_eq!(
            batch.iter().map(|u| u.symbol).collect::<Vec<_>>(),
            ["BTCUSDT", "ETHUSDT"]
        );
        let wrapped = format!(r#"{{"stream":"!markPrice@arr@1s","data":{arr}}}"#);
        assert_eq!(parse_mark_message(wrapped.as_bytes()).unwrap(), batch);
        let wrapped = format!(r#"{{"data":{SINGLE},"stream":"btcusdt@markPrice"}}"#);
        assert_eq!(parse_mark_message(wrapped.as_bytes()).unwrap().len(), 1);
        assert!(parse_mark_message(b"[]").unwrap().is_empty());
    }

    #[test]
    fn rejects_malformed_messages() {
        let cases: &[(&str, &str)] = &[
            ("", "EOF"),
            ("{", "EOF"),
            ("null", "invalid type"),
            (r#"{"E":1,"s":"BTCUSDT"}"#, "missing field `p`"),
            (r#"{"E":1,"p":"1.0"}"#, "missing field `s`"),
            (r#"{"s":"X","p":"1.0"}"#, "missing field `E`"),
            (r#"{"E":"1","s":"X","p":"1.0"}"#, "invalid type"),
            (r#"{"E":1,"s":"X","p":1.0}"#, "invalid type"),
            (
                r#"{"e":"kline","E":1,"s":"X","p":"1.0"}"#,
                "is not markPriceUpdate",
            ),
            (r#"{"stream":"x"}"#, "missing field `data`"),
            (
                r#"{"stream":"x","data":{"stream":"y","data":[]}}"#,
                "missing field",
            ),
            (
                r#"{"E":1,"s":"X","p":"1.0","p":"2.0"}"#,
                "duplicate field `p`",
            ),
            (r#"[{"E":1,"s":"X","p":"1.0"}] x"#, "trailing characters"),
            (r#"[{"E":1,"s":"X","p":"1.0"},3]"#, "invalid type"),
        ];
        for (input, expected) in cases {
            let err = parse_mark_message(input.as_bytes()).unwrap_err();
            assert!(matches!(err, CoreError::Message { .. }), "{input}: {err}");
            assert!(err.to_string().contains(expected), "{input}: {err}");
        }
    }

    #[test]
    fn rejects_bad_prices_naming_the_update() {
        for (p, rule) in [
            ("1e5", "not a plain decimal"),
            ("NaN", "not a plain decimal"),
            ("0", "must be positive"),
            ("-1", "must be positive"),
        ] {
            let msg = format!(r#"[{{"E":1,"s":"A","p":"1"}},{{"E":1,"s":"BTCUSDT","p":"{p}"}}]"#);
            let err = parse_mark_message(msg.as_bytes()).unwrap_err();
            assert!(err.to_string().contains("update 1 (BTCUSDT)"), "{err}");
            assert!(err.to_string().contains(rule), "{err}");
        }
        let mut buf = Vec::new();
        let msg = br#"[{"E":1,"s":"A","p":"1"},{"E":1,"s":"B","p":"x"}]"#;
        assert!(parse_mark_message_into(msg, &mut buf).is_err());
        assert!(buf.is_empty());
    }
}
