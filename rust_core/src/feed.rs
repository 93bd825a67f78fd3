//! Mark-price websocket payloads -> a batch of updates, in one pass over the bytes.
//!
//! Accepted shapes (contract §7.2, samples in `tests/data/binance/ws_markPrice*.json`):
//! - one `markPriceUpdate` object (`<symbol>@markPrice[@1s]`),
//! - an array of them (`!markPrice@arr[@1s]`),
//! - the combined-stream wrapper `{"stream": ..., "data": <object or array>}`.
//!
//! Only `e`, `E`, `s` and `p` are read; other keys (`i`, `P`, `r`, `T`, `st`, future
//! ones) are skipped without being materialized. Symbols are borrowed from the input;
//! a symbol written with JSON escapes (Binance sends raw UTF-8, but re-encoders such as
//! Python's `json.dumps` escape non-ASCII names like the real `测试测试USDT`) cannot be
//! borrowed and lands, unescaped, in [`MarkBatch::escaped`] instead of failing the message;
//! [`MarkBatch::iter_all`] walks both lists.
//! The mark price is read straight from its digits into integer 10^-8 units
//! ([`MarkUpdate::mark_units`], what the engine's band and quiet-mark checks compare;
//! no float and no decimal arithmetic in between) and kept as the exact [`Decimal`] of
//! the same digits and written scale (for wire strings and the full evaluation; made
//! from the integer mantissa, no arithmetic). A mark with more than eight significant
//! decimals or beyond the `i64` range has no units (0) and takes the exact decimal path.
//! The correctly rounded `f64` of the text (bars and ATR) is derived on use,
//! [`MarkUpdate::mark_f64`]: one division of two exact doubles. A malformed message is an
//! `Err` and yields no updates at all, so a caller that applies the batch only on `Ok`
//! never applies half a message.
//!
//! Three readers, one result: an update written exactly as Binance writes it
//! (`{"e":"markPriceUpdate","E":…,"s":"…","p":"…",…}`, no whitespace, no escapes) is read
//! by the AVX2 window reader (`feed/window.rs`: bit masks of 32-byte blocks, price digits
//! straight into the integer mantissa, no text in between, Binance's `i P r T` keys by
//! their known layout, consecutive updates in one loop) when the processor has AVX2,
//! else by the canonical reader (`Scanner::canonical_fields`, a byte scan of the same
//! layout); anything either does not recognise falls back, from the same byte, to the
//! general reader, which alone reports errors. The properties
//! `window_path_agrees_with_the_general_reader` and
//! `canonical_path_agrees_with_the_general_reader` check that the fast readers change
//! speed, never results (updates or error text), on generated and mutated messages;
//! `captured_payloads_read_the_same_on_every_path` on the captured payloads.

use std::borrow::Cow;

#[cfg(target_arch = "x86_64")]
mod window;

use crate::error::CoreError;
use crate::fixed::{parse_decimal, Decimal};

/// One mark-price update.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MarkUpdate<'a> {
    /// Symbol, upper case as Binance sends it, borrowed from the message.
    pub symbol: &'a str,
    /// Mark price, exact, with the scale it was written with.
    pub mark_price: Decimal,
    /// Mark price in integer 10^-8 units ([`units_of`]); 0 when it has none.
    pub mark_units: i64,
    /// Event time `E`, milliseconds since the epoch.
    pub event_time_ms: i64,
}

impl MarkUpdate<'_> {
    /// The mark as the nearest `f64` to its decimal text (see [`mark_f64`]).
    #[inline]
    pub fn mark_f64(&self) -> f64 {
        mark_f64(self.mark_price, self.mark_units)
    }
}

/// Price units of the engine's integer checks: 10^-8, the precision of the mark stream.
pub const UNIT_SCALE: u32 = 8;

/// `price` as an integer count of 10^-8 when it has at most eight decimals (after
/// dropping trailing zeros), is positive and fits an `i64`; else 0 (the exact path).
pub fn units_of(price: Decimal) -> i64 {
    if price <= Decimal::ZERO {
        return 0;
    }
    let price = if price.scale() > UNIT_SCALE {
        price.normalize()
    } else {
        price
    };
    let scale = price.scale();
    if scale > UNIT_SCALE {
        return 0;
    }
    price
        .mantissa()
        .checked_mul(10i128.pow(UNIT_SCALE - scale))
        .and_then(|units| i64::try_from(units).ok())
        .unwrap_or(0)
}

/// The units of the positive mantissa `mantissa` at `scale` decimals, as [`units_of`]
/// gives them for that decimal, from integers only.
#[inline]
fn units_from_parts(mantissa: u64, scale: u32) -> i64 {
    let units = if scale <= UNIT_SCALE {
        mantissa.checked_mul(POW10_U64[(UNIT_SCALE - scale) as usize])
    } else {
        // More decimals than units: exact only when the extra ones are zeros.
        let drop = POW10_U64.get((scale - UNIT_SCALE) as usize).copied();
        drop.filter(|&d| mantissa % d == 0).map(|d| mantissa / d)
    };
    units.and_then(|u| i64::try_from(u).ok()).unwrap_or(0)
}

/// 10^8, exact in an `f64`.
const UNIT_F64: f64 = 1e8;

/// The nearest `f64` to `price` (whose units are `units`, see [`units_of`]): for units
/// below 2^53 one correctly rounded division of two exact doubles, which is the correctly
/// rounded value of the text since both divisions denote the same rational (Clinger's
/// fast path); else the correctly rounded parse of the decimal's exact text.
#[inline]
pub fn mark_f64(price: Decimal, units: i64) -> f64 {
    if units > 0 && units < (1i64 << 53) {
        units as f64 / UNIT_F64
    } else {
        crate::fixed::decimal_to_f64(price)
    }
}

/// An update whose symbol had JSON escapes, so it owns the unescaped symbol.
#[derive(Debug, Clone, PartialEq)]
pub struct OwnedMarkUpdate {
    pub symbol: String,
    pub mark_price: Decimal,
    pub mark_units: i64,
    pub event_time_ms: i64,
}

impl OwnedMarkUpdate {
    /// A borrowed view with the same fields as [`MarkUpdate`].
    pub fn as_update(&self) -> MarkUpdate<'_> {
        MarkUpdate {
            symbol: &self.symbol,
            mark_price: self.mark_price,
            mark_units: self.mark_units,
            event_time_ms: self.event_time_ms,
        }
    }
}

/// The updates of one websocket message, in message order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MarkBatch<'a> {
    /// Updates whose symbol is borrowed from the message (all of them, in practice).
    pub updates: Vec<MarkUpdate<'a>>,
    /// Updates whose symbol was written with JSON escapes (see the module docs).
    pub escaped: Vec<OwnedMarkUpdate>,
}

impl<'a> MarkBatch<'a> {
    /// Number of updates, borrowed and escaped.
    pub fn len(&self) -> usize {
        self.updates.len() + self.escaped.len()
    }

    /// Whether the message carried no update.
    pub fn is_empty(&self) -> bool {
        self.updates.is_empty() && self.escaped.is_empty()
    }

    /// Every update, borrowed ones first, then escaped ones. Per symbol the message
    /// order is kept (a symbol is either always escaped or never within one message).
    pub fn iter_all(&self) -> impl Iterator<Item = MarkUpdate<'_>> + '_ {
        self.updates
            .iter()
            .copied()
            .chain(self.escaped.iter().map(OwnedMarkUpdate::as_update))
    }

    /// Iterates over the borrowed updates (see [`MarkBatch::iter_all`] for all of them).
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
    let mut sink = Sink {
        // A markPriceUpdate takes at least ~100 bytes: one allocation for the usual message.
        batch: MarkBatch {
            updates: Vec::with_capacity(data.len() / 96 + 1),
            escaped: Vec::new(),
        },
        count: 0,
        bad_price: None,
    };
    let mut scan = Scanner {
        bytes: data,
        pos: 0,
    };
    scan.message(&mut sink)
        .map_err(|e| CoreError::message(e.describe(data)))?;
    // A bad price is reported only for a message that is valid JSON of the right shape.
    match sink.bad_price {
        Some(err) => Err(err),
        None => Ok(sink.batch),
    }
}

/// Where the reader puts each update, converted as soon as it is read (one pass, no
/// intermediate list); the first bad price is kept and reported after the whole message
/// has been checked, so a message with several faults names the same one as before.
struct Sink<'a> {
    batch: MarkBatch<'a>,
    /// Updates read so far (the index a bad price is reported with).
    count: usize,
    bad_price: Option<CoreError>,
}

impl<'a> Sink<'a> {
    #[inline]
    fn push(&mut self, raw: RawUpdate<'a>) {
        match convert_price(&raw, self.count) {
            Ok((mark_price, mark_units)) => match raw.symbol {
                Cow::Borrowed(symbol) => self.batch.updates.push(MarkUpdate {
                    symbol,
                    mark_price,
                    mark_units,
                    event_time_ms: raw.event_time_ms,
                }),
                Cow::Owned(symbol) => self.batch.escaped.push(OwnedMarkUpdate {
                    symbol,
                    mark_price,
                    mark_units,
                    event_time_ms: raw.event_time_ms,
                }),
            },
            Err(err) => {
                if self.bad_price.is_none() {
                    self.bad_price = Some(err);
                }
            }
        }
        self.count += 1;
    }
}

/// The fast path for the usual mark price (`"11794.15000000"`: at most 19 digits, one
/// optional point, no sign): one pass builds the integer mantissa and scale, giving the
/// integer units and the exact `Decimal` directly (see [`price_from_parts`]).
/// Returns `None` when the text needs the general route (which also reports errors).
#[inline]
fn fast_price(bytes: &[u8]) -> Option<(Decimal, i64)> {
    if bytes.is_empty() || bytes.len() > 20 {
        return None;
    }
    let mut mantissa: u64 = 0;
    let mut digits = 0u32;
    let mut scale: Option<u32> = None;
    for (i, &b) in bytes.iter().enumerate() {
        match b {
            b'0'..=b'9' => {
                // Nineteen digits always fit a u64; with twenty the mantissa may wrap, but
                // such a price is refused below and takes the general route.
                mantissa = mantissa.wrapping_mul(10).wrapping_add(u64::from(b - b'0'));
                digits += 1;
            }
            b'.' if scale.is_none() => scale = Some((bytes.len() - i - 1) as u32),
            _ => return None,
        }
    }
    price_from_parts(bytes, mantissa, digits, scale.unwrap_or(0))
}

/// 10^0 ..= 10^19.
const POW10_U64: [u64; 20] = {
    let mut table = [1u64; 20];
    let mut i = 1;
    while i < 20 {
        table[i] = table[i - 1] * 10;
        i += 1;
    }
    table
};

/// The price of [`fast_price`] from its parts (`mantissa` of `digits` digits, `scale`
/// decimals, written as `bytes`): the exact `Decimal` (the 64-bit mantissa as its low
/// and middle words, no arithmetic) and the integer units of [`units_from_parts`]; or
/// `None` for the general route. Shared by the three readers so all read a price alike.
#[inline]
fn price_from_parts(
    bytes: &[u8],
    mantissa: u64,
    digits: u32,
    scale: u32,
) -> Option<(Decimal, i64)> {
    if bytes.is_empty()
        || bytes.len() > 20
        || digits == 0
        || digits > 19
        || mantissa == 0
        || scale > Decimal::MAX_SCALE
    {
        return None;
    }
    let decimal = Decimal::from_parts(mantissa as u32, (mantissa >> 32) as u32, 0, false, scale);
    Some((decimal, units_from_parts(mantissa, scale)))
}

fn convert_price(raw: &RawUpdate<'_>, index: usize) -> Result<(Decimal, i64), CoreError> {
    if let Some(parsed) = fast_price(&raw.price) {
        return Ok(parsed);
    }
    let text = String::from_utf8_lossy(&raw.price);
    let bad = |rule: &str| {
        CoreError::message(format!(
            "update {index} ({}): mark price p {text:?} {rule}",
            raw.symbol
        ))
    };
    let mark_price = parse_decimal("p", &text).map_err(|_| bad("is not a plain decimal"))?;
    if mark_price <= Decimal::ZERO {
        return Err(bad("must be positive"));
    }
    Ok((mark_price, units_of(mark_price)))
}

#[derive(Debug, Clone)]
struct RawUpdate<'a> {
    symbol: Cow<'a, str>,
    /// The price string's bytes (validated UTF-8).
    price: Cow<'a, [u8]>,
    event_time_ms: i64,
}

/// A string's contents: raw bytes without escapes, or unescaped text.
enum RawStr<'a> {
    Plain(&'a [u8]),
    Escaped(String),
}

impl RawStr<'_> {
    fn bytes(&self) -> &[u8] {
        match self {
            Self::Plain(raw) => raw,
            Self::Escaped(text) => text.as_bytes(),
        }
    }
}

/// Bytes that end the fast scan of a string: quote, backslash, control characters, and
/// non-ASCII (handled by a UTF-8 check).
static STRING_STOP: [bool; 256] = {
    let mut table = [false; 256];
    let mut i = 0;
    while i < 256 {
        table[i] = i == b'"' as usize || i == b'\\' as usize || i < 0x20 || i >= 0x80;
        i += 1;
    }
    table
};

/// Index of the first byte at or after `from` that ends a fast string scan (see
/// [`STRING_STOP`]), or `bytes.len()`. Eight bytes at a time with the classic SWAR tests
/// (a borrow can only mark bytes above the first true hit, so the lowest mark is exact).
#[inline]
fn find_stop(bytes: &[u8], from: usize) -> usize {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    let mut i = from;
    while let Some(chunk) = bytes.get(i..i + 8) {
        let mut word_bytes = [0u8; 8];
        word_bytes.copy_from_slice(chunk);
        let word = u64::from_le_bytes(word_bytes);
        let quote = word ^ (ONES * u64::from(b'"'));
        let backslash = word ^ (ONES * u64::from(b'\\'));
        let has_quote = quote.wrapping_sub(ONES) & !quote;
        let has_backslash = backslash.wrapping_sub(ONES) & !backslash;
        let has_control = word.wrapping_sub(ONES * 0x20) & !word;
        let mask = (has_quote | has_backslash | has_control | word) & HIGHS;
        if mask != 0 {
            return i + (mask.trailing_zeros() / 8) as usize;
        }
        i += 8;
    }
    while i < bytes.len() && !STRING_STOP[usize::from(bytes[i])] {
        i += 1;
    }
    i
}

/// Nesting limit for skipped values (`serde_json` uses 128 too).
const MAX_DEPTH: usize = 128;

/// Why and where a message failed.
/// Boxed so the happy path's `Result`s stay small.
#[derive(Debug)]
struct ScanError(Box<ScanErrorInner>);

#[derive(Debug)]
struct ScanErrorInner {
    detail: String,
    pos: usize,
}

impl ScanError {
    fn describe(&self, data: &[u8]) -> String {
        let ScanErrorInner { detail, pos } = &*self.0;
        if *pos >= data.len() {
            format!("{detail} at end of input (EOF, {} bytes)", data.len())
        } else {
            format!("{detail} at byte {pos}")
        }
    }
}

/// A strict single-pass JSON reader specialised for mark-price messages.
///
/// Written by hand because generic deserializers spend most of their time on the keys
/// and values we skip (`i`, `P`, `r`, `T`): this reader validates them (JSON grammar,
/// escapes, UTF-8, nesting) without materializing anything, and borrows the three
/// strings it keeps. The property test in this module checks it never accepts what
/// `serde_json` rejects and extracts the same fields when it accepts.
struct Scanner<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Scanner<'a> {
    #[cold]
    fn fail<T>(&self, detail: impl Into<String>) -> Result<T, ScanError> {
        Err(ScanError(Box::new(ScanErrorInner {
            detail: detail.into(),
            pos: self.pos,
        })))
    }

    #[inline]
    fn ws(&mut self) {
        while let Some(&b) = self.bytes.get(self.pos) {
            if matches!(b, b' ' | b'\n' | b'\r' | b'\t') {
                self.pos += 1;
            } else {
                break;
            }
        }
    }

    #[inline]
    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.pos).copied()
    }

    #[inline]
    fn expect(&mut self, byte: u8) -> Result<(), ScanError> {
        if self.peek() == Some(byte) {
            self.pos += 1;
            Ok(())
        } else {
            self.fail(format!("expected '{}'", byte as char))
        }
    }

    fn message(&mut self, out: &mut Sink<'a>) -> Result<(), ScanError> {
        self.ws();
        match self.peek() {
            Some(b'[') => self.update_array(out)?,
            Some(b'{') => self.top_object(out)?,
            Some(_) => return self.fail("invalid type: expected a markPriceUpdate object, an array of them, or a {\"stream\", \"data\"} wrapper"),
            None => return self.fail("empty message"),
        }
        self.ws();
        if self.pos != self.bytes.len() {
            return self.fail("trailing characters");
        }
        Ok(())
    }

    fn update_array(&mut self, out: &mut Sink<'a>) -> Result<(), ScanError> {
        self.expect(b'[')?;
        self.ws();
        if self.peek() == Some(b']') {
            self.pos += 1;
            return Ok(());
        }
        loop {
            self.ws();
            if self.peek() != Some(b'{') {
                return self.fail("invalid type: expected a markPriceUpdate object in the array");
            }
            if !self.window_run(out) && !self.canonical_update(out) {
                self.expect(b'{')?;
                let mut fields = UpdateFields::default();
                self.object_body(|scan, key| fields.accept(scan, key))?;
                out.push(fields.finish(self)?);
            }
            self.ws();
            if self.comma_or_close(b']')? {
                return Ok(());
            }
        }
    }

    /// The updates from `{` on read by the AVX2 window reader (see `feed/window.rs`) while
    /// they are written as Binance writes them and separated by bare commas; `false` with
    /// nothing consumed when it takes none, else the position is just past the last one.
    #[inline]
    fn window_run(&mut self, out: &mut Sink<'a>) -> bool {
        #[cfg(test)]
        if tests::NO_WINDOW_PATH.with(std::cell::Cell::get) {
            return false;
        }
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            let before = out.batch.updates.len();
            // SAFETY: `read_run` only needs AVX2, detected just above.
            #[allow(unsafe_code)] // the one way to call a `target_feature` function
            let end = unsafe { window::read_run(self.bytes, self.pos, &mut out.batch.updates) };
            if let Some(end) = end {
                let read = out.batch.updates.len() - before;
                out.count += read;
                self.pos = end;
                #[cfg(test)]
                tests::WINDOW_HITS.with(|c| c.set(c.get() + read));
                return true;
            }
        }
        let _ = out;
        false
    }

    /// The update at `{` when it is written exactly as Binance writes it, or `None`
    /// (nothing consumed) so the general reader takes it from the same byte.
    ///
    /// Accepted: no whitespace; `"e":"markPriceUpdate"`, `"E"` (1 to 18 digits, no leading
    /// zero), `"s"` (printable ASCII without escapes, not empty) and `"p"` (digits with at
    /// most one point) first and in that order; then any number of one-letter keys other
    /// than those four, each with a string of printable ASCII without escapes or a plain
    /// number (`-?(0|[1-9]\d*)(\.\d+)?`, at most 300 characters). Every message this accepts is valid JSON that the general
    /// reader parses to the same update, so this path changes speed, never results
    /// (property `canonical_path_agrees_with_the_general_reader`); anything else —
    /// escapes, whitespace, another order, a duplicate of the four keys, exponents —
    /// falls back.
    #[inline]
    fn canonical_update(&mut self, out: &mut Sink<'a>) -> bool {
        match self.canonical_fields() {
            Some((raw, whole, fraction)) => {
                // The digits before and after the point are known: the price of
                // `fast_price` without a second pass over its text.
                let digits = whole + fraction;
                let parsed = if digits <= 19 {
                    let fold = |text: &[u8]| {
                        text.iter()
                            .fold(0u64, |value, c| value * 10 + u64::from(c - b'0'))
                    };
                    let high = fold(&raw.price[..whole]);
                    let low = fold(&raw.price[raw.price.len() - fraction..]);
                    let mantissa = high * POW10_U64[fraction] + low;
                    price_from_parts(&raw.price, mantissa, digits as u32, fraction as u32)
                } else {
                    None
                };
                match (parsed, raw.symbol) {
                    (Some((mark_price, mark_units)), Cow::Borrowed(symbol)) => {
                        out.batch.updates.push(MarkUpdate {
                            symbol,
                            mark_price,
                            mark_units,
                            event_time_ms: raw.event_time_ms,
                        });
                        out.count += 1;
                    }
                    (_, symbol) => out.push(RawUpdate { symbol, ..raw }),
                }
                true
            }
            None => false,
        }
    }

    /// The fields of [`Scanner::canonical_update`] and the digit counts of the price
    /// before and after its point.
    #[inline]
    fn canonical_fields(&mut self) -> Option<(RawUpdate<'a>, usize, usize)> {
        const HEAD: &[u8] = b"{\"e\":\"markPriceUpdate\",\"E\":";
        #[cfg(test)]
        if tests::NO_CANONICAL_PATH.with(std::cell::Cell::get) {
            return None;
        }
        let b = self.bytes;
        let mut i = self.pos;
        if b.get(i..i + HEAD.len())? != HEAD {
            return None;
        }
        i += HEAD.len();
        let time_start = i;
        let digits = digit_run(b, i);
        if digits == 0 || digits > 18 || (digits > 1 && b[time_start] == b'0') {
            return None;
        }
        // At most 18 digits: no overflow.
        let event_time_ms = b[time_start..time_start + digits]
            .iter()
            .fold(0i64, |value, c| value * 10 + i64::from(c - b'0'));
        i += digits;
        if b.get(i..i + 6)? != b",\"s\":\"" {
            return None;
        }
        i += 6;
        let symbol_start = i;
        i = find_stop(b, i);
        if i == symbol_start || b.get(i) != Some(&b'"') {
            return None;
        }
        let symbol = std::str::from_utf8(&b[symbol_start..i]).ok()?;
        i += 1;
        if b.get(i..i + 6)? != b",\"p\":\"" {
            return None;
        }
        i += 6;
        let price_start = i;
        let whole = digit_run(b, i);
        i += whole;
        let mut fraction = 0;
        if b.get(i) == Some(&b'.') {
            fraction = digit_run(b, i + 1);
            i += 1 + fraction;
        }
        if b.get(i) != Some(&b'"') {
            return None;
        }
        let price = &b[price_start..i];
        i += 1;
        loop {
            match *b.get(i)? {
                b'}' => break,
                b',' => {}
                _ => return None,
            }
            let key = *b.get(i + 2)?;
            if b.get(i + 1) != Some(&b'"')
                || b.get(i + 3) != Some(&b'"')
                || b.get(i + 4) != Some(&b':')
                || !key.is_ascii_alphabetic()
                || matches!(key, b'e' | b'E' | b's' | b'p')
            {
                return None;
            }
            i += 5;
            i = if *b.get(i)? == b'"' {
                // Printable ASCII without escapes up to the quote: a string the general
                // reader skips as it is.
                let end = find_stop(b, i + 1);
                if b.get(end) != Some(&b'"') {
                    return None;
                }
                end + 1
            } else {
                plain_number_end(b, i)?
            };
        }
        self.pos = i + 1;
        Some((
            RawUpdate {
                symbol: Cow::Borrowed(symbol),
                price: Cow::Borrowed(price),
                event_time_ms,
            },
            whole,
            fraction,
        ))
    }

    /// The top-level object: a single update, or a `{"stream", "data"}` wrapper.
    fn top_object(&mut self, out: &mut Sink<'a>) -> Result<(), ScanError> {
        self.expect(b'{')?;
        let start = self.pos;
        let mut fields = UpdateFields::default();
        let mut saw_data = false;
        let mut saw_stream = false;
        self.object_body(|scan, key| match key {
            b"data" => {
                if saw_data {
                    return scan.fail("duplicate field `data`");
                }
                saw_data = true;
                match scan.peek() {
                    Some(b'[') => scan.update_array(out),
                    Some(b'{') => {
                        scan.expect(b'{')?;
                        let mut inner = UpdateFields::default();
                        scan.object_body(|s, k| inner.accept(s, k))?;
                        out.push(inner.finish(scan)?);
                        Ok(())
                    }
                    _ => scan.fail(
                        "invalid type: data must be a markPriceUpdate object or an array of them",
                    ),
                }
            }
            b"stream" => {
                saw_stream = true;
                scan.skip_value(1)
            }
            _ => fields.accept(scan, key),
        })?;
        if saw_data {
            if fields.any() {
                self.pos = start;
                return self
                    .fail("a combined-stream wrapper must not carry update fields beside data");
            }
            return Ok(());
        }
        if saw_stream {
            self.pos = start;
            return self.fail("missing field `data`");
        }
        out.push(fields.finish(self)?);
        Ok(())
    }

    /// Reads `"key": value` pairs up to the closing brace (the `{` is consumed already);
    /// `on_field` must consume the value.
    fn object_body(
        &mut self,
        mut on_field: impl FnMut(&mut Self, &[u8]) -> Result<(), ScanError>,
    ) -> Result<(), ScanError> {
        self.ws();
        if self.peek() == Some(b'}') {
            self.pos += 1;
            return Ok(());
        }
        loop {
            self.ws();
            if self.peek() != Some(b'"') {
                return self.fail("expected a '\"' starting an object key");
            }
            // Fast path for the one-letter keys of markPriceUpdate (`"p":`).
            let bytes = self.bytes;
            let p = self.pos;
            if p + 3 < bytes.len()
                && bytes[p + 2] == b'"'
                && bytes[p + 3] == b':'
                && !STRING_STOP[usize::from(bytes[p + 1])]
            {
                self.pos = p + 4;
                self.ws();
                on_field(self, &bytes[p + 1..p + 2])?;
            } else {
                let key = self.raw_string()?;
                self.ws();
                self.expect(b':')?;
                self.ws();
                on_field(self, key.bytes())?;
            }
            self.ws();
            if self.comma_or_close(b'}')? {
                return Ok(());
            }
        }
    }

    /// After a member or element: a `,` (more follow, `false`) or the closing `close` of
    /// the object or array (`true`); consumed either way.
    #[inline]
    fn comma_or_close(&mut self, close: u8) -> Result<bool, ScanError> {
        match self.peek() {
            Some(b',') => {
                self.pos += 1;
                Ok(false)
            }
            Some(c) if c == close => {
                self.pos += 1;
                Ok(true)
            }
            _ => self.fail(format!("expected ',' or '{}'", close as char)),
        }
    }

    /// Reads a string at `"` and returns its raw bytes when it has no escapes (UTF-8
    /// validated when not pure ASCII), or its unescaped text. Control characters and bad
    /// escapes are errors.
    #[inline]
    fn raw_string(&mut self) -> Result<RawStr<'a>, ScanError> {
        self.expect(b'"')?;
        let start = self.pos;
        let bytes = self.bytes;
        let mut end = find_stop(bytes, start);
        // Non-ASCII bytes are fine inside strings; walk past them and validate once.
        let mut non_ascii = false;
        while end < bytes.len() && bytes[end] >= 0x80 {
            non_ascii = true;
            end = find_stop(bytes, end + 1);
        }
        self.pos = end;
        match bytes.get(end) {
            Some(b'"') => {
                let raw = &bytes[start..end];
                if non_ascii && std::str::from_utf8(raw).is_err() {
                    self.pos = start;
                    return self.fail("invalid UTF-8 in string");
                }
                self.pos += 1;
                Ok(RawStr::Plain(raw))
            }
            Some(b'\\') => self.escaped_string(start).map(RawStr::Escaped),
            Some(_) => self.fail("control character in string"),
            None => self.fail("unterminated string"),
        }
    }

    /// Reads a string at `"` as text, borrowed when it has no escapes.
    fn string(&mut self) -> Result<Cow<'a, str>, ScanError> {
        match self.raw_string()? {
            // Validated by `raw_string` (ASCII, or checked UTF-8).
            RawStr::Plain(raw) => std::str::from_utf8(raw)
                .map(Cow::Borrowed)
                .or_else(|_| self.fail("invalid UTF-8 in string")),
            RawStr::Escaped(text) => Ok(Cow::Owned(text)),
        }
    }

    /// Slow path: the string at `start` has escapes; returns it unescaped.
    fn escaped_string(&mut self, start: usize) -> Result<String, ScanError> {
        let mut buf: Vec<u8> = self.bytes[start..self.pos].to_vec();
        loop {
            let Some(b) = self.peek() else {
                return self.fail("unterminated string");
            };
            self.pos += 1;
            match b {
                b'"' => {
                    return String::from_utf8(buf)
                        .or_else(|_| self.fail("invalid UTF-8 in string"));
                }
                b'\\' => {
                    let Some(e) = self.peek() else {
                        return self.fail("unterminated escape");
                    };
                    self.pos += 1;
                    match e {
                        b'"' => buf.push(b'"'),
                        b'\\' => buf.push(b'\\'),
                        b'/' => buf.push(b'/'),
                        b'b' => buf.push(0x08),
                        b'f' => buf.push(0x0c),
                        b'n' => buf.push(b'\n'),
                        b'r' => buf.push(b'\r'),
                        b't' => buf.push(b'\t'),
                        b'u' => {
                            let c = self.unicode_escape()?;
                            let mut tmp = [0u8; 4];
                            buf.extend_from_slice(c.encode_utf8(&mut tmp).as_bytes());
                        }
                        _ => return self.fail("invalid escape"),
                    }
                }
                0..=0x1f => return self.fail("control character in string"),
                _ => buf.push(b),
            }
        }
    }

    fn hex4(&mut self) -> Result<u32, ScanError> {
        let Some(digits) = self.bytes.get(self.pos..self.pos + 4) else {
            return self.fail("unterminated \\u escape");
        };
        let mut value = 0u32;
        for &d in digits {
            let nibble = match d {
                b'0'..=b'9' => d - b'0',
                b'a'..=b'f' => d - b'a' + 10,
                b'A'..=b'F' => d - b'A' + 10,
                _ => return self.fail("invalid \\u escape"),
            };
            value = value * 16 + u32::from(nibble);
        }
        self.pos += 4;
        Ok(value)
    }

    fn unicode_escape(&mut self) -> Result<char, ScanError> {
        let first = self.hex4()?;
        let code = if (0xD800..0xDC00).contains(&first) {
            if self.bytes.get(self.pos..self.pos + 2) != Some(b"\\u") {
                return self.fail("lone leading surrogate in \\u escape");
            }
            self.pos += 2;
            let second = self.hex4()?;
            if !(0xDC00..0xE000).contains(&second) {
                return self.fail("invalid trailing surrogate in \\u escape");
            }
            0x10000 + ((first - 0xD800) << 10) + (second - 0xDC00)
        } else if (0xDC00..0xE000).contains(&first) {
            return self.fail("lone trailing surrogate in \\u escape");
        } else {
            first
        };
        char::from_u32(code).map_or_else(|| self.fail("invalid \\u escape"), Ok)
    }

    /// A JSON integer that fits `i64` (no fraction, no exponent).
    fn integer(&mut self) -> Result<i64, ScanError> {
        let start = self.pos;
        self.skip_number()?;
        let text = &self.bytes[start..self.pos];
        if text.iter().any(|b| matches!(b, b'.' | b'e' | b'E')) {
            self.pos = start;
            return self.fail("invalid type: event time must be an integer");
        }
        // ASCII digits with an optional sign: always UTF-8.
        std::str::from_utf8(text)
            .ok()
            .and_then(|t| t.parse::<i64>().ok())
            .map_or_else(
                || {
                    self.pos = start;
                    self.fail("event time does not fit a 64-bit integer")
                },
                Ok,
            )
    }

    /// JSON number grammar: `-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?`; like
    /// `serde_json`, a number beyond the `f64` range (`1e400`) is refused.
    fn skip_number(&mut self) -> Result<(), ScanError> {
        let start = self.pos;
        let exponent = self.skip_number_grammar()?;
        // Only an exponent or hundreds of digits can leave the f64 range.
        if exponent || self.pos - start > 300 {
            let text = std::str::from_utf8(&self.bytes[start..self.pos]).unwrap_or("");
            if !text.parse::<f64>().is_ok_and(f64::is_finite) {
                self.pos = start;
                return self.fail("number out of range");
            }
        }
        Ok(())
    }

    /// Returns whether the number had an exponent.
    fn skip_number_grammar(&mut self) -> Result<bool, ScanError> {
        if self.peek() == Some(b'-') {
            self.pos += 1;
        }
        match self.peek() {
            Some(b'0') => self.pos += 1,
            Some(b'1'..=b'9') => self.skip_digits(),
            _ => return self.fail("invalid number"),
        }
        if self.peek() == Some(b'.') {
            self.pos += 1;
            if !matches!(self.peek(), Some(b'0'..=b'9')) {
                return self.fail("invalid number");
            }
            self.skip_digits();
        }
        if matches!(self.peek(), Some(b'e' | b'E')) {
            self.pos += 1;
            if matches!(self.peek(), Some(b'+' | b'-')) {
                self.pos += 1;
            }
            if !matches!(self.peek(), Some(b'0'..=b'9')) {
                return self.fail("invalid number");
            }
            self.skip_digits();
            return Ok(true);
        }
        Ok(false)
    }

    #[inline]
    fn skip_digits(&mut self) {
        while matches!(self.peek(), Some(b'0'..=b'9')) {
            self.pos += 1;
        }
    }

    fn literal(&mut self, word: &[u8]) -> Result<(), ScanError> {
        if self.bytes.get(self.pos..self.pos + word.len()) == Some(word) {
            self.pos += word.len();
            Ok(())
        } else {
            self.fail("invalid literal")
        }
    }

    /// Validates and skips any JSON value.
    fn skip_value(&mut self, depth: usize) -> Result<(), ScanError> {
        if depth > MAX_DEPTH {
            return self.fail("recursion limit exceeded");
        }
        match self.peek() {
            Some(b'"') => self.raw_string().map(|_| ()),
            Some(b'{') => {
                self.pos += 1;
                self.object_body(|scan, _| scan.skip_value(depth + 1))
            }
            Some(b'[') => {
                self.pos += 1;
                self.ws();
                if self.peek() == Some(b']') {
                    self.pos += 1;
                    return Ok(());
                }
                loop {
                    self.ws();
                    self.skip_value(depth + 1)?;
                    self.ws();
                    if self.comma_or_close(b']')? {
                        return Ok(());
                    }
                }
            }
            Some(b't') => self.literal(b"true"),
            Some(b'f') => self.literal(b"false"),
            Some(b'n') => self.literal(b"null"),
            Some(b'-' | b'0'..=b'9') => self.skip_number(),
            Some(_) | None => self.fail("expected a JSON value"),
        }
    }
}

/// Number of ASCII digits at `b[from..]`, eight bytes a step: a byte is flagged when it is
/// below `0`, above `9` or not ASCII; a borrow or carry only ever starts at a flagged byte
/// and moves upward, so the lowest flag is exact (as in [`find_stop`]).
#[inline]
fn digit_run(b: &[u8], from: usize) -> usize {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    let mut i = from;
    while let Some(chunk) = b.get(i..i + 8) {
        let mut word_bytes = [0u8; 8];
        word_bytes.copy_from_slice(chunk);
        let word = u64::from_le_bytes(word_bytes);
        let below = word.wrapping_sub(ONES * u64::from(b'0'));
        let above = word.wrapping_add(ONES * (0x80 - u64::from(b'9') - 1));
        let mask = (below | above | word) & HIGHS;
        if mask != 0 {
            return i + (mask.trailing_zeros() / 8) as usize - from;
        }
        i += 8;
    }
    while b.get(i).is_some_and(u8::is_ascii_digit) {
        i += 1;
    }
    i - from
}

/// End of a plain JSON number `-?(0|[1-9][0-9]*)(\.[0-9]+)?` of at most 300 characters
/// starting at `start` (always inside the `f64` range), or `None` for anything else.
#[inline]
fn plain_number_end(b: &[u8], start: usize) -> Option<usize> {
    let mut i = start;
    if b.get(i) == Some(&b'-') {
        i += 1;
    }
    match *b.get(i)? {
        b'0' => i += 1,
        b'1'..=b'9' => i += digit_run(b, i),
        _ => return None,
    }
    if b.get(i) == Some(&b'.') {
        let fraction = digit_run(b, i + 1);
        if fraction == 0 {
            return None;
        }
        i += 1 + fraction;
    }
    if i - start > 300 || matches!(b.get(i), Some(b'0'..=b'9' | b'e' | b'E' | b'.')) {
        return None;
    }
    Some(i)
}

#[derive(Default)]
struct UpdateFields<'a> {
    event_type: Option<RawStr<'a>>,
    event_time_ms: Option<i64>,
    symbol: Option<Cow<'a, str>>,
    price: Option<RawStr<'a>>,
}

impl<'a> UpdateFields<'a> {
    fn accept(&mut self, scan: &mut Scanner<'a>, key: &[u8]) -> Result<(), ScanError> {
        fn check_string(scan: &Scanner<'_>, present: bool, name: &str) -> Result<(), ScanError> {
            if present {
                return scan.fail(format!("duplicate field `{name}`"));
            }
            if scan.peek() != Some(b'"') {
                return scan.fail(format!("invalid type: `{name}` must be a string"));
            }
            Ok(())
        }
        match key {
            b"e" => {
                check_string(scan, self.event_type.is_some(), "e")?;
                self.event_type = Some(scan.raw_string()?);
                Ok(())
            }
            b"s" => {
                check_string(scan, self.symbol.is_some(), "s")?;
                self.symbol = Some(scan.string()?);
                Ok(())
            }
            b"p" => {
                check_string(scan, self.price.is_some(), "p")?;
                self.price = Some(scan.raw_string()?);
                Ok(())
            }
            b"E" => {
                if self.event_time_ms.is_some() {
                    return scan.fail("duplicate field `E`");
                }
                if !matches!(scan.peek(), Some(b'-' | b'0'..=b'9')) {
                    return scan.fail("invalid type: `E` must be an integer");
                }
                self.event_time_ms = Some(scan.integer()?);
                Ok(())
            }
            _ => scan.skip_value(1),
        }
    }

    fn any(&self) -> bool {
        self.event_type.is_some()
            || self.event_time_ms.is_some()
            || self.symbol.is_some()
            || self.price.is_some()
    }

    fn finish(self, scan: &Scanner<'a>) -> Result<RawUpdate<'a>, ScanError> {
        if let Some(kind) = &self.event_type {
            if kind.bytes() != b"markPriceUpdate" {
                let shown = String::from_utf8_lossy(kind.bytes());
                return scan.fail(format!("event type e {shown:?} is not markPriceUpdate"));
            }
        }
        let Some(symbol) = self.symbol else {
            return scan.fail("missing field `s`");
        };
        if symbol.is_empty() {
            return scan.fail("symbol s is empty");
        }
        let Some(price) = self.price else {
            return scan.fail("missing field `p`");
        };
        let Some(event_time_ms) = self.event_time_ms else {
            return scan.fail("missing field `E`");
        };
        Ok(RawUpdate {
            symbol,
            price: match price {
                RawStr::Plain(raw) => Cow::Borrowed(raw),
                RawStr::Escaped(text) => Cow::Owned(text.into_bytes()),
            },
            event_time_ms,
        })
    }
}

#[cfg(test)]
#[allow(clippy::float_cmp)] // exact equality is what these tests check
mod tests {
    use super::*;

    thread_local! {
        /// Set by tests to compare the canonical fast path with the general reader.
        pub(super) static NO_CANONICAL_PATH: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
        /// Set by tests to compare the 16-byte-window path with the other readers.
        pub(super) static NO_WINDOW_PATH: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
        /// Updates the 16-byte-window path has read (tests check it is taken).
        pub(super) static WINDOW_HITS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    }

    #[test]
    fn a_twenty_digit_price_is_exact_not_wrapped() {
        // 99999999999999999999 overflows a u64 mantissa; it used to wrap (or panic).
        let msg = br#"{"e":"markPriceUpdate","E":1,"s":"BTCUSDT","p":"99999999999999999999"}"#;
        let batch = parse_mark_message(msg).unwrap();
        assert_eq!(
            batch.updates[0].mark_price.to_string(),
            "99999999999999999999"
        );
    }

    const SINGLE: &str = r#"{"e":"markPriceUpdate","E":1562305380000,"s":"BTCUSDT","p":"11794.15000000","i":"11784.62659091","P":"11784.25641265","r":"0.00038167","T":1562306400000,"st":1}"#;

    #[test]
    fn parses_a_single_update() {
        let batch = parse_mark_message(SINGLE.as_bytes()).unwrap();
        assert_eq!(batch.len(), 1);
        let u = batch.updates[0];
        assert_eq!(u.symbol, "BTCUSDT");
        assert_eq!(u.mark_price.to_string(), "11794.15000000");
        assert_eq!(u.mark_units, 1_179_415_000_000);
        assert_eq!(u.mark_f64(), 11794.15);
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
    fn fast_price_path_is_exact_and_correctly_rounded() {
        for text in [
            "11794.15000000",
            "0.00000001",
            "1",
            "1.",
            ".5",
            "0.1",
            "123456789.12345678",
            "9999999999999999999",
            "0.30000000000000004",
            "4503599627370497.5",
            "1.0000000000",
            "0.000000001",
            "0.0000000010",
            "92233720368.5477580",
            "92233720369",
            "90071992.54740992",
            "90071992.54740993",
        ] {
            let (dec, units) = fast_price(text.as_bytes()).unwrap_or_else(|| {
                let d = parse_decimal("p", text).unwrap();
                (d, units_of(d))
            });
            assert_eq!(dec, parse_decimal("p", text).unwrap(), "{text}");
            assert_eq!(
                dec.scale(),
                parse_decimal("p", text).unwrap().scale(),
                "{text}"
            );
            assert_eq!(units, units_of(dec), "{text}");
            assert_eq!(
                mark_f64(dec, units).to_bits(),
                text.parse::<f64>().unwrap().to_bits(),
                "{text}"
            );
        }
        assert_eq!(fast_price(b"1.0000000000").map(|p| p.1), Some(100_000_000));
        assert_eq!(fast_price(b"0.000000001").map(|p| p.1), Some(0));
        assert_eq!(fast_price(b"92233720369").map(|p| p.1), Some(0));
        assert_eq!(
            fast_price(b"92233720368.5477580").map(|p| p.1),
            Some(9_223_372_036_854_775_800)
        );
        for text in [
            "",
            ".",
            "1.2.3",
            "-1",
            "+1",
            "0",
            "0.000",
            "1e5",
            "12345678901234567890",
        ] {
            assert!(fast_price(text.as_bytes()).is_none(), "{text}");
        }
    }

    #[test]
    fn find_stop_matches_the_table_everywhere() {
        let alphabet: Vec<u8> = (0u8..=255).collect();
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        for _ in 0..20_000 {
            let len = (state % 40) as usize;
            let mut text = Vec::with_capacity(len);
            for _ in 0..len {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                // Mostly plain ASCII, sometimes a stop byte.
                let b = if state % 7 == 0 {
                    alphabet[(state >> 8) as usize % 256]
                } else {
                    b'a' + (state % 26) as u8
                };
                text.push(b);
            }
            let from = if len == 0 {
                0
            } else {
                (state as usize >> 3) % len
            };
            let expected = (from..len)
                .find(|&i| STRING_STOP[usize::from(text[i])])
                .unwrap_or(len);
            assert_eq!(find_stop(&text, from), expected, "{text:?} from {from}");
        }
    }

    #[test]
    fn digit_run_matches_a_byte_loop_everywhere() {
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        for _ in 0..20_000 {
            let len = (state % 40) as usize;
            let mut text = Vec::with_capacity(len);
            for _ in 0..len {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                // Mostly digits, sometimes any byte (the neighbours of '0' and '9' too).
                let b = if state % 5 == 0 {
                    (state >> 8) as u8
                } else {
                    b'0' + (state % 10) as u8
                };
                text.push(b);
            }
            let from = if len == 0 {
                0
            } else {
                (state as usize >> 3) % len
            };
            let expected = text[from..]
                .iter()
                .take_while(|c| c.is_ascii_digit())
                .count();
            assert_eq!(digit_run(&text, from), expected, "{text:?} from {from}");
        }
        for edge in [b'/', b':', 0x7f, 0x80, 0xb9, 0xba, 0xff] {
            let mut text = b"12345678901234".to_vec();
            text.insert(9, edge);
            assert_eq!(digit_run(&text, 0), 9, "{edge:#x}");
        }
    }

    #[test]
    fn the_canonical_reader_reads_prices_like_fast_price() {
        for text in [
            "11794.15000000",
            "0.00000001",
            "1",
            "1.",
            ".5",
            "0.1",
            "123456789.12345678",
            "9999999999999999999",
            "0.30000000000000004",
            "4503599627370497.5",
            "0",
            "0.000",
            "12345678901234567890",
            "1234567890123456.7",
            "00000000000000000001",
            "7.123",
            ".",
            "",
        ] {
            let msg = format!(
                r#"{{"e":"markPriceUpdate","E":1562305380000,"s":"BTCUSDT","p":"{text}","T":1}}"#
            );
            let mut scan = Scanner {
                bytes: msg.as_bytes(),
                pos: 0,
            };
            let mut sink = Sink {
                batch: MarkBatch::default(),
                count: 0,
                bad_price: None,
            };
            assert!(scan.canonical_update(&mut sink), "{text}");
            let general = convert_price(
                &RawUpdate {
                    symbol: Cow::Borrowed("BTCUSDT"),
                    price: Cow::Borrowed(text.as_bytes()),
                    event_time_ms: 1,
                },
                0,
            );
            match general {
                Ok((dec, units)) => {
                    let got = sink.batch.updates[0];
                    assert_eq!((got.mark_price, got.mark_units), (dec, units), "{text}");
                    assert_eq!(got.mark_price.scale(), dec.scale(), "{text}");
                }
                Err(err) => {
                    assert!(sink.batch.is_empty(), "{text}");
                    assert_eq!(
                        sink.bad_price.map(|e| e.to_string()),
                        Some(err.to_string()),
                        "{text}"
                    );
                }
            }
        }
    }

    #[test]
    fn escaped_symbols_are_unescaped_not_rejected() {
        let msg = r#"[{"E":1,"s":"BTCUSDT","p":"1.5"},{"E":2,"s":"\u6d4b\u8bd5USDT","p":"2.5"},{"e":"mark\u0050riceUpdate","E":3,"s":"ETHUSDT","p":"3"}]"#;
        let batch = parse_mark_message(msg.as_bytes()).unwrap();
        assert_eq!(batch.len(), 3);
        assert_eq!(batch.updates.len(), 2);
        assert_eq!(batch.escaped[0].symbol, "测试USDT");
        assert_eq!(batch.escaped[0].mark_price.to_string(), "2.5");
        let all: Vec<_> = batch
            .iter_all()
            .map(|u| (u.symbol, u.event_time_ms))
            .collect();
        assert_eq!(all, [("BTCUSDT", 1), ("ETHUSDT", 3), ("测试USDT", 2)]);
        let raw = r#"{"E":1,"s":"测试USDT","p":"1"}"#;
        assert_eq!(
            parse_mark_message(raw.as_bytes()).unwrap().updates[0].symbol,
            "测试USDT"
        );
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
    }
}

#[cfg(test)]
mod property_tests {
    use proptest::prelude::*;
    use serde_json::Value;

    use super::*;

    const SAMPLE: &str = r#"{"stream":"!markPrice@arr@1s","data":[{"e":"markPriceUpdate","E":1562305380000,"s":"BTCUSDT","p":"11794.15000000","i":"11784.62659091","P":"11784.25641265","r":"0.00038167","T":1562306400000,"st":1},{"e":"markPriceUpdate","E":1562305380001,"s":"测试USDT","p":"0.5","x":[1,{"y":null}],"z":true}]}"#;

    /// What a generic parser extracts: (symbol, price text, E) per update, or None when
    /// the message does not have the accepted shape.
    fn reference(data: &[u8]) -> Option<Vec<(String, String, i64)>> {
        let value: Value = serde_json::from_slice(data).ok()?;
        let payload = match &value {
            Value::Object(map) if map.contains_key("data") => map.get("data")?,
            other => other,
        };
        let objects: Vec<&Value> = match payload {
            Value::Array(items) => items.iter().collect(),
            Value::Object(_) => vec![payload],
            _ => return None,
        };
        objects
            .into_iter()
            .map(|o| {
                let o = o.as_object()?;
                Some((
                    o.get("s")?.as_str()?.to_owned(),
                    o.get("p")?.as_str()?.to_owned(),
                    o.get("E")?.as_i64()?,
                ))
            })
            .collect()
    }

    fn ours(data: &[u8]) -> Option<Vec<(String, String, i64)>> {
        let batch = parse_mark_message(data).ok()?;
        Some(
            batch
                .iter_all()
                .map(|u| {
                    (
                        u.symbol.to_owned(),
                        u.mark_price.to_string(),
                        u.event_time_ms,
                    )
                })
                .collect(),
        )
    }

    fn mutate(base: &[u8], edits: &[(usize, u8, u8)]) -> Vec<u8> {
        const ALPHABET: &[u8] = b"{}[]\",:\\ 0123456789.-eEpsu\x01\xff\xc3\xa9nulltrue";
        let mut out = base.to_vec();
        for &(pos, kind, byte) in edits {
            if out.is_empty() {
                break;
            }
            let at = pos % out.len();
            let b = ALPHABET[usize::from(byte) % ALPHABET.len()];
            match kind % 3 {
                0 => {
                    out.remove(at);
                }
                1 => out.insert(at, b),
                _ => out[at] = b,
            }
        }
        out
    }

    /// Two updates as Binance writes them (the canonical fast path's shape).
    const CANONICAL: &str = r#"[{"e":"markPriceUpdate","E":1562305380000,"s":"BTCUSDT","p":"11794.15000000","i":"11784.62659091","P":"11784.25641265","r":"-0.00038167","T":1562306400000},{"e":"markPriceUpdate","E":1562305380001,"s":"ETHUSDT","p":"3000.1","i":"3.0","P":"0","r":"0.0001","T":0}]"#;

    /// The parse with the canonical fast path switched off or on (the window path off).
    fn parse_with(data: &[u8], canonical: bool) -> Result<MarkBatch<'_>, String> {
        parse_paths(data, false, canonical)
    }

    /// The parse with the window path and the canonical path each on or off (both off:
    /// the general reader alone).
    fn parse_paths(data: &[u8], window: bool, canonical: bool) -> Result<MarkBatch<'_>, String> {
        super::tests::NO_WINDOW_PATH.with(|off| off.set(!window));
        super::tests::NO_CANONICAL_PATH.with(|off| off.set(!canonical));
        let result = parse_mark_message(data).map_err(|e| e.to_string());
        super::tests::NO_WINDOW_PATH.with(|off| off.set(false));
        super::tests::NO_CANONICAL_PATH.with(|off| off.set(false));
        result
    }

    /// The 10^-8 units a plain decimal text denotes, read from its digits as text: at
    /// most eight significant decimals and a positive count inside `i64`, else 0.
    fn text_units(text: &str) -> i64 {
        let (whole, fraction) = text.split_once('.').unwrap_or((text, ""));
        let fraction = fraction.trim_end_matches('0');
        if fraction.len() > 8 {
            return 0;
        }
        let digits = format!("{whole}{fraction:0<8}");
        let digits = digits.trim_start_matches('0');
        if digits.is_empty() || digits.len() > 19 {
            return 0;
        }
        digits.parse::<i64>().unwrap_or(0)
    }

    /// Window-path hits of one parse.
    fn window_hits(data: &[u8]) -> usize {
        super::tests::WINDOW_HITS.with(|c| c.set(0));
        let _ = parse_paths(data, true, false);
        super::tests::WINDOW_HITS.with(std::cell::Cell::get)
    }

    /// Xorshift for the generated messages (deterministic per seed).
    struct Xorshift(u64);

    impl Xorshift {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn digits(&mut self, count: usize, nonzero_first: bool) -> String {
            (0..count)
                .map(|i| {
                    let d = (self.next() % 10) as u8;
                    char::from(if i == 0 && nonzero_first {
                        b'1' + d % 9
                    } else {
                        b'0' + d
                    })
                })
                .collect()
        }

        /// `text`, or now and then a number the window path must refuse or read exactly
        /// like the general reader.
        fn odd(&mut self, text: String) -> String {
            const ODD: [&str; 10] = [
                "0",
                "00",
                "01",
                "-1",
                "1.5",
                "1e5",
                "0.0",
                "",
                "1,",
                "123456789012345678901",
            ];
            if self.next() % 5 == 0 {
                ODD[(self.next() % ODD.len() as u64) as usize].to_owned()
            } else {
                text
            }
        }
    }

    /// Extra keys as the real stream may add them (`"st":1`), and some that the general
    /// reader refuses (duplicates) or skips (`binance_array` with `odd`).
    const EXTRA: [&str; 8] = [
        "",
        "",
        "",
        r#","st":1"#,
        r#","xyz":"a b""#,
        r#","p":"1.0""#,
        r#","":0"#,
        r#","s":"X""#,
    ];

    /// An `!markPrice@arr` message as Binance writes it, one update per
    /// (symbol, whole digits, fraction digits, event time), prices built from `seed`;
    /// `odd`: some event and settlement times replaced by odd numbers (see `Xorshift::odd`).
    fn binance_array(updates: &[(String, usize, usize, i64)], seed: u64, odd: bool) -> String {
        let mut rng = Xorshift(seed | 1);
        let items: Vec<String> = updates
            .iter()
            .map(|(symbol, whole, fraction, time)| {
                let price = format!("{}.{}", rng.digits(*whole, *whole > 1), rng.digits(*fraction, false));
                let index = format!("{}.{}", rng.digits(*whole, *whole > 1), rng.digits(8, false));
                let (mut time_text, mut settle_text) = (time.to_string(), (time + 28_800_000).to_string());
                if odd {
                    time_text = rng.odd(time_text);
                    settle_text = rng.odd(settle_text);
                }
                let extra = if odd {
                    EXTRA[(rng.next() % EXTRA.len() as u64) as usize]
                } else {
                    ""
                };
                format!(
                    r#"{{"e":"markPriceUpdate","E":{time_text},"s":"{symbol}","p":"{price}","i":"{index}","P":"{price}","r":"-0.00038167","T":{settle_text}{extra}}}"#
                )
            })
            .collect();
        format!("[{}]", items.join(","))
    }

    #[test]
    fn the_canonical_sample_takes_the_fast_path() {
        let mut scan = Scanner {
            bytes: &CANONICAL.as_bytes()[1..],
            pos: 0,
        };
        let mut sink = Sink {
            batch: MarkBatch::default(),
            count: 0,
            bad_price: None,
        };
        assert!(scan.canonical_update(&mut sink));
        let update = &sink.batch.updates[0];
        assert_eq!(update.symbol, "BTCUSDT");
        assert_eq!(update.event_time_ms, 1_562_305_380_000);
        assert_eq!(update.mark_price.to_string(), "11794.15000000");
        assert_eq!(scan.bytes[scan.pos], b',');
        assert_eq!(
            parse_with(CANONICAL.as_bytes(), true),
            parse_with(CANONICAL.as_bytes(), false)
        );
    }

    /// `json` without the whitespace outside strings (key order kept).
    fn minify(json: &str) -> String {
        let mut out = String::with_capacity(json.len());
        let (mut in_string, mut escaped) = (false, false);
        for c in json.chars() {
            if in_string {
                out.push(c);
                if escaped {
                    escaped = false;
                } else if c == '\\' {
                    escaped = true;
                } else if c == '"' {
                    in_string = false;
                }
            } else if !c.is_ascii_whitespace() {
                in_string = c == '"';
                out.push(c);
            }
        }
        out
    }

    /// Every captured websocket payload of tests/data/binance (mark prices and all the
    /// other events, which must fail the same way), as captured, minified, repeated in a
    /// long array (so that the window path reads them) and in the combined-stream
    /// wrapper: the three readers give the same updates or the same error.
    #[test]
    fn captured_payloads_read_the_same_on_every_path() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/data/binance");
        let mut payloads = 0;
        let mut windowed = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            if !name.starts_with("ws_") {
                continue;
            }
            let captured = std::fs::read_to_string(&path).unwrap();
            let compact = minify(&captured);
            let items = compact.trim_start_matches('[').trim_end_matches(']');
            let repeated = format!("[{}]", vec![items; 50].join(","));
            let wrapped = format!(r#"{{"stream":"!markPrice@arr","data":{repeated}}}"#);
            for text in [&captured, &compact, &repeated, &wrapped] {
                let general = parse_paths(text.as_bytes(), false, false);
                assert_eq!(parse_paths(text.as_bytes(), true, false), general, "{name}");
                assert_eq!(parse_paths(text.as_bytes(), true, true), general, "{name}");
            }
            if name.starts_with("ws_markPrice") {
                assert_eq!(parse_mark_message(repeated.as_bytes()).unwrap().len(), 50);
                windowed += window_hits(repeated.as_bytes());
            }
            payloads += 1;
        }
        assert!(payloads >= 15, "{payloads} payloads");
        if std::arch::is_x86_feature_detected!("avx2") {
            assert!(windowed >= 90, "{windowed} window reads");
        }
    }

    #[test]
    fn binance_arrays_take_the_window_path() {
        let updates: Vec<(String, usize, usize, i64)> = (0..40)
            .map(|i| {
                (
                    format!("SYM{i}USDT"),
                    1 + i % 6,
                    8,
                    1_764_000_000_000 + i as i64,
                )
            })
            .collect();
        let array = binance_array(&updates, 7, false);
        super::window::LAYOUT_TAILS.with(|c| c.set(0));
        let hits = window_hits(array.as_bytes());
        if std::arch::is_x86_feature_detected!("avx2") {
            // Every update but the last few, whose windows would run past the message;
            // their keys after the price all by the layout reader.
            assert!(hits >= 38, "{hits} of 40");
            let layout = super::window::LAYOUT_TAILS.with(std::cell::Cell::get);
            assert_eq!(layout, hits);
        }
        let wrapped = format!(r#"{{"stream":"!markPrice@arr@1s","data":{array}}}"#);
        assert_eq!(
            parse_paths(wrapped.as_bytes(), true, true),
            parse_paths(wrapped.as_bytes(), false, false)
        );
        let batch = parse_mark_message(array.as_bytes()).unwrap();
        assert_eq!(batch.len(), 40);
        assert_eq!(batch.updates[3].symbol, "SYM3USDT");
        assert_eq!(batch.updates[3].event_time_ms, 1_764_000_000_003);
        assert_eq!(batch.updates[3].mark_price.scale(), 8);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(3000))]

        /// The canonical fast path gives exactly what the general reader gives: the same
        /// updates or the same error, on Binance's layout and on mutations of it.
        #[test]
        fn canonical_path_agrees_with_the_general_reader(
            edits in proptest::collection::vec((any::<usize>(), any::<u8>(), any::<u8>()), 0..4)
        ) {
            let data = mutate(CANONICAL.as_bytes(), &edits);
            prop_assert_eq!(parse_with(&data, true), parse_with(&data, false));
        }

        /// The window path gives exactly what the general reader gives (and what the
        /// canonical path gives): the same updates or the same error, on generated Binance
        /// arrays (any symbol, price and time lengths, zero prices included) and on
        /// mutations of them, bare or in the combined-stream wrapper.
        #[test]
        fn window_path_agrees_with_the_general_reader(
            updates in proptest::collection::vec(
                ("[A-Z0-9]{1,17}", 0usize..17, 0usize..17, 0i64..9_999_999_999_999_999i64),
                1..12,
            ),
            seed in any::<u64>(),
            odd in any::<bool>(),
            wrapped in any::<bool>(),
            edits in proptest::collection::vec((any::<usize>(), any::<u8>(), any::<u8>()), 0..3),
        ) {
            let array = binance_array(&updates, seed, odd);
            let text = if wrapped {
                format!(r#"{{"stream":"!markPrice@arr","data":{array}}}"#)
            } else {
                array
            };
            let data = mutate(text.as_bytes(), &edits);
            let general = parse_paths(&data, false, false);
            prop_assert_eq!(&parse_paths(&data, true, false), &general);
            prop_assert_eq!(&parse_paths(&data, true, true), &general);
        }

        /// Every reader (window, canonical, general) reads a price's integer units as the
        /// text denotes them (an independent reading of the digits: at most eight
        /// significant decimals and inside `i64`, else 0) and equal to the units of its
        /// exact decimal, with the decimal of the written scale and the float the correctly
        /// rounded value of the text; for every shape the reader accepts (leading and
        /// trailing zeros, no point, a bare point at either end, up to 32 digits).
        #[test]
        fn integer_reading_equals_the_decimal_reading(
            whole in "[0-9]{0,16}",
            fraction in proptest::option::of("[0-9]{0,16}"),
            window in any::<bool>(),
            canonical in any::<bool>(),
        ) {
            let text = match &fraction {
                Some(f) => format!("{whole}.{f}"),
                None => whole.clone(),
            };
            let message = format!(
                r#"[{{"e":"markPriceUpdate","E":1562305380000,"s":"BTCUSDT","p":"{text}","i":"1.5","P":"1.5","r":"-0.00010000","T":1562306400000}}]"#
            );
            let exact = parse_decimal("p", &text).ok().filter(|d| *d > Decimal::ZERO);
            match parse_paths(message.as_bytes(), window, canonical) {
                Ok(batch) => {
                    prop_assert!(exact.is_some(), "accepted {:?}", text);
                    let exact = exact.unwrap_or_default();
                    let update = batch.updates[0];
                    prop_assert_eq!(update.mark_price, exact);
                    prop_assert_eq!(update.mark_price.scale(), exact.scale());
                    prop_assert_eq!(update.mark_units, text_units(&text), "{}", text);
                    prop_assert_eq!(update.mark_units, units_of(exact), "{}", text);
                    prop_assert_eq!(
                        update.mark_f64().to_bits(),
                        text.parse::<f64>().map(f64::to_bits).ok().unwrap_or_default(),
                        "{}", text
                    );
                }
                Err(_) => prop_assert!(exact.is_none(), "refused {:?}", text),
            }
        }

        /// Never accepts a message serde_json rejects; when both accept, the same fields.
        #[test]
        fn prop_agrees_with_serde_json_on_mutations(
            edits in proptest::collection::vec((any::<usize>(), any::<u8>(), any::<u8>()), 1..4)
        ) {
            let data = mutate(SAMPLE.as_bytes(), &edits);
            if let Some(mut got) = ours(&data) {
                let expected = reference(&data);
                prop_assert!(expected.is_some(), "accepted what serde_json rejects: {:?}", String::from_utf8_lossy(&data));
                let mut expected = expected.unwrap_or_default();
                // A batch keeps the message order per symbol, not across symbols (updates
                // whose symbol had escapes come last): compare symbol by symbol.
                got.sort_by(|a, b| a.0.cmp(&b.0));
                expected.sort_by(|a, b| a.0.cmp(&b.0));
                // Prices compare as decimals (ours keep the written scale).
                prop_assert_eq!(got.len(), expected.len());
                for (g, e) in got.iter().zip(&expected) {
                    prop_assert_eq!(&g.0, &e.0);
                    let reference_price = parse_decimal("p", &e.1);
                    prop_assert!(reference_price.is_ok(), "accepted price {:?}", e.1);
                    prop_assert_eq!(g.1.parse::<Decimal>().ok(), reference_price.ok());
                    prop_assert_eq!(g.2, e.2);
                }
            }
        }

        /// Valid messages with arbitrary extra fields, whitespace and escaped symbols parse
        /// to what serde_json sees.
        #[test]
        fn prop_parses_generated_messages(
            updates in proptest::collection::vec(
                ("[A-Z0-9]{2,12}|测试[A-Z]{2}", 1u64..100_000_000u64, 0u32..9, 0i64..4_000_000_000_000i64, any::<bool>()),
                0..20,
            ),
            wrapped in any::<bool>(),
            pretty in any::<bool>(),
        ) {
            let items: Vec<Value> = updates
                .iter()
                .map(|(symbol, mantissa, scale, time, extra)| {
                    let price = Decimal::new(i64::try_from(*mantissa).unwrap_or(1), *scale);
                    let mut obj = serde_json::json!({
                        "e": "markPriceUpdate", "E": time, "s": symbol, "p": price.to_string(),
                        "i": "1.0", "P": "2.0", "r": "-0.0001", "T": time + 1,
                    });
                    if *extra {
                        obj["st"] = serde_json::json!([1, {"nested": [null, true, -1.5e-3]}, "\u{00e9}\"\\"]);
                    }
                    obj
                })
                .collect();
            let payload = if wrapped {
                serde_json::json!({"stream": "!markPrice@arr", "data": items})
            } else {
                Value::Array(items)
            };
            let text = if pretty {
                serde_json::to_string_pretty(&payload).unwrap_or_default()
            } else {
                serde_json::to_string(&payload).unwrap_or_default()
            };
            // serde_json writes non-ASCII raw; also try the escaped spelling.
            let escaped = text.replace("测试", "\\u6d4b\\u8bd5");
            for data in [text.as_bytes(), escaped.as_bytes()] {
                let got = ours(data);
                prop_assert!(got.is_some(), "rejected a valid message: {}", String::from_utf8_lossy(data));
                let mut got = got.unwrap_or_default();
                let mut expected = reference(data).unwrap_or_default();
                got.sort();
                expected.sort();
                prop_assert_eq!(got, expected);
            }
        }
    }
}
