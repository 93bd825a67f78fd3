//! The Binance-layout update read 32 bytes at a time (AVX2, detected at run time).
//!
//! [`read_update`] reads one `markPriceUpdate` written exactly as Binance writes it
//! (`{"e":"markPriceUpdate","E":…,"s":"…","p":"…",` then other keys) like
//! `Scanner::canonical_fields`, but the bytes are classified by vector compares into bit
//! masks (a field's length is the distance to the next set bit: no loop per byte and no
//! mispredicted loop exit) and digits are folded eight at a time. The price comes
//! out as the integer mantissa and scale, with no text in between.
//!
//! The keys after the price are read by their known layout when they are exactly
//! Binance's four (`,"i":"…","P":"…","r":"…","T":…}`: [`binance_tail`], three value ends
//! and four fixed texts, no loop), else key by key ([`read_tail`]); the layout reader
//! took the parse of a 600-update message from about 30 to 22 µs. [`read_run`] reads
//! consecutive updates in one loop with the reader inlined.
//!
//! It accepts a subset of what `canonical_fields` accepts (a field longer than its window,
//! a window that would run past the message, a leading zero... returns `None` with nothing
//! consumed, and the caller takes the same bytes through the canonical then the general
//! reader), and reads every accepted update to the same fields (property
//! `window_path_agrees_with_the_general_reader` in feed.rs; the layout reader takes only
//! tails the key-by-key reader takes, to the same end: test
//! `the_binance_tail_is_read_by_its_layout_like_key_by_key` and property
//! `the_layout_reader_takes_only_what_read_tail_takes`).

use super::MarkUpdate;
use std::arch::x86_64::{
    _mm256_cmpeq_epi8, _mm256_cmpgt_epi8, _mm256_movemask_epi8, _mm256_or_si256, _mm256_set1_epi8,
    _mm256_set_epi64x,
};

/// One update as read: symbol, event time, price mantissa, digits and scale, and the
/// index just past its closing brace.
pub(super) struct WindowUpdate<'a> {
    pub symbol: &'a str,
    pub event_time_ms: i64,
    /// The price's bytes as written (for `price_from_parts`).
    pub price: &'a [u8],
    pub mantissa: u64,
    pub digits: u32,
    pub scale: u32,
    pub end: usize,
}

const HEAD: &[u8; 27] = b"{\"e\":\"markPriceUpdate\",\"E\":";

/// The little-endian word of the eight bytes at `b[at..]`, or `None` past the end.
#[allow(clippy::inline_always)] // a load: a call would cost more than it
#[inline(always)]
fn word(b: &[u8], at: usize) -> Option<u64> {
    let bytes: [u8; 8] = b.get(at..at.checked_add(8)?)?.try_into().ok()?;
    Some(u64::from_le_bytes(bytes))
}

/// Bit masks of a block of bytes (bit `k` for byte `k`): string stops (a quote, a
/// backslash, a control character or a non-ASCII byte: the `STRING_STOP` bytes of
/// feed.rs) and non-digits.
#[derive(Clone, Copy)]
struct Masks<T> {
    stops: T,
    non_digits: T,
}

/// The 32 bytes at `block[at..]` as a vector (`return None` past the end).
macro_rules! vector {
    ($block:expr, $at:expr) => {{
        let at: usize = $at;
        _mm256_set_epi64x(
            word($block, at + 24)? as i64,
            word($block, at + 16)? as i64,
            word($block, at + 8)? as i64,
            word($block, at)? as i64,
        )
    }};
}

/// The masks of the 32 bytes at `b[at..]` (`return None` past the end of the message),
/// from a few vector compares. A macro so that it is always inlined into the AVX2
/// function that uses it (and needs no `unsafe` of its own).
macro_rules! masks32 {
    ($b:expr, $at:expr) => {{
        let at: usize = $at;
        let v = vector!($b, at);
        // Signed compares: bytes from 0x80 are negative, so below 0x20 and below '0'.
        let stop = _mm256_or_si256(
            _mm256_or_si256(
                _mm256_cmpeq_epi8(v, _mm256_set1_epi8(b'"' as i8)),
                _mm256_cmpeq_epi8(v, _mm256_set1_epi8(b'\\' as i8)),
            ),
            _mm256_cmpgt_epi8(_mm256_set1_epi8(0x1f), v),
        );
        let non_digit = _mm256_or_si256(
            _mm256_cmpgt_epi8(_mm256_set1_epi8(b'/' as i8), v),
            _mm256_cmpgt_epi8(v, _mm256_set1_epi8(b'9' as i8)),
        );
        Masks {
            stops: _mm256_movemask_epi8(stop) as u32,
            non_digits: _mm256_movemask_epi8(non_digit) as u32,
        }
    }};
}

/// Eight ASCII digits (first digit in the lowest byte, less `'0'` each) as a number:
/// pairs, then quads, then the eight, with two multiplications per step.
#[allow(clippy::inline_always)] // on the path from one update to the next
#[inline(always)]
fn fold_eight(digits: u64) -> u64 {
    const LOW_BYTES: u64 = 0x0000_00ff_0000_00ff;
    let pairs = digits.wrapping_mul(10).wrapping_add(digits >> 8);
    ((pairs & LOW_BYTES)
        .wrapping_mul(100 + (1_000_000 << 32))
        .wrapping_add(((pairs >> 16) & LOW_BYTES).wrapping_mul(1 + (10_000 << 32))))
        >> 32
}

/// The number written by the first `count` bytes of a window (`low`, `high`), all ASCII
/// digits, `1 <= count <= 16`.
#[allow(clippy::inline_always)] // on the path from one update to the next
#[inline(always)]
fn digits_value(low: u64, high: u64, count: usize) -> u64 {
    debug_assert!((1..=16).contains(&count));
    if count <= 8 {
        // The same as below within one word (most prices' parts, one multiplication less).
        let digits = low.wrapping_sub(0x3030_3030_3030_3030);
        return fold_eight(digits << (8 * (8 - count)));
    }
    let text = u128::from(low) | (u128::from(high) << 64);
    // No byte of the first `count` borrows: a digit is at least '0'. A borrow from the
    // bytes after them only reaches bytes that the shift drops.
    let digits = text.wrapping_sub(0x3030_3030_3030_3030_3030_3030_3030_3030);
    // Moved to the top: the lower bytes become leading zeros.
    let aligned = digits << (8 * (16 - count));
    fold_eight(aligned as u64) * 100_000_000 + fold_eight((aligned >> 64) as u64)
}

/// Distance from bit `from` to the next set bit of `mask` (the mask's width when none).
#[allow(clippy::inline_always)] // on the path from one update to the next
#[inline(always)]
fn run64(mask: u64, from: usize) -> usize {
    mask.checked_shr(from as u32)
        .map_or(64, u64::trailing_zeros) as usize
}

/// [`run64`] for 128-bit masks.
#[allow(clippy::inline_always)] // on the path from one update to the next
#[inline(always)]
fn run128(mask: u128, from: usize) -> usize {
    mask.checked_shr(from as u32)
        .map_or(128, u128::trailing_zeros) as usize
}

/// The number written by the `count` digits at `b[at..]` (`1 <= count <= 15`).
#[allow(clippy::inline_always)] // three per update, on the path from one to the next
#[inline(always)]
fn number_at(b: &[u8], at: usize, count: usize) -> Option<u64> {
    Some(digits_value(word(b, at)?, word(b, at + 8)?, count))
}

/// Reads the update at `b[at] == '{'` (see the module docs); `None` when it is not in
/// the layout this reader takes.
///
/// The lengths of the fields come from the masks of 160 bytes from the event time,
/// computed from loads that do not wait for one another: the chain of dependent steps
/// from one update to the next is a few shifts and bit counts, where a scan per field
/// made it a load, compare and count per field.
///
/// # Safety
/// The processor must have AVX2 (`is_x86_feature_detected!("avx2")`).
#[allow(unsafe_code)] // a `target_feature` function must be `unsafe` on Rust 1.85
#[inline]
#[target_feature(enable = "avx2")]
pub(super) unsafe fn read_update(b: &[u8], at: usize) -> Option<WindowUpdate<'_>> {
    if b.get(at..at + HEAD.len())? != HEAD {
        return None;
    }
    let a = at + HEAD.len();
    // Five 32-byte blocks from the event time, none waiting for another: the first two
    // hold the head (event time, symbol, price), the last four the rest of the update
    // (it starts 32 bytes or more after the event time when the time has 13 digits).
    let blocks = [
        masks32!(b, a),
        masks32!(b, a + 32),
        masks32!(b, a + 64),
        masks32!(b, a + 96),
        masks32!(b, a + 128),
    ];
    let wide = |k: usize| {
        (
            u64::from(blocks[k].stops) | (u64::from(blocks[k + 1].stops) << 32),
            u64::from(blocks[k].non_digits) | (u64::from(blocks[k + 1].non_digits) << 32),
        )
    };
    let (head_stops, head_digits) = wide(0);
    let head = Masks {
        stops: head_stops,
        non_digits: head_digits,
    };
    // Event time: 1 to 15 digits without a leading zero, then `,"s":"`.
    let time_digits = run64(head.non_digits, 0);
    if time_digits == 0 || time_digits > 15 || (time_digits > 1 && *b.get(a)? == b'0') {
        return None;
    }
    let event_time_ms = number_at(b, a, time_digits)? as i64;
    if b.get(a + time_digits..a + time_digits + 6)? != b",\"s\":\"" {
        return None;
    }
    // Symbol: printable ASCII up to its quote, inside the block.
    let symbol_start = time_digits + 6;
    let length = run64(head.stops, symbol_start);
    let symbol_end = symbol_start + length;
    if length == 0 || symbol_end >= 64 || *b.get(a + symbol_end)? != b'"' {
        return None;
    }
    // SAFETY: the stop mask ends the symbol at the first byte outside 0x20..0x80 other
    // than the quote and backslash, so every byte of it is ASCII: valid UTF-8.
    let symbol = std::str::from_utf8_unchecked(b.get(a + symbol_start..a + symbol_end)?);
    if b.get(a + symbol_end..a + symbol_end + 7)? != b"\",\"p\":\"" {
        return None;
    }
    // Price: 1 to 15 digits, a point, 1 to 15 digits, at most 19 digits in all.
    let price_start = symbol_end + 7;
    let whole = run64(head.non_digits, price_start);
    let point = price_start + whole;
    if whole == 0 || whole > 15 || point >= 63 || *b.get(a + point)? != b'.' {
        return None;
    }
    let scale = run64(head.non_digits, point + 1);
    let price_end = point + 1 + scale;
    if scale == 0 || scale > 15 || whole + scale > 19 || *b.get(a + price_end)? != b'"' {
        return None;
    }
    // At most 19 digits: below 10^19, inside a u64.
    let mantissa = number_at(b, a + price_start, whole)? * super::POW10_U64[scale]
        + number_at(b, a + point + 1, scale)?;
    let price = b.get(a + price_start..a + price_end)?;
    // Other one-letter keys, each with a plain string or a positive integer.
    let t = a + price_end + 1;
    // The tail's masks from the 128 bytes at `a + 32`, shifted to start at `t`.
    let skip = (price_end + 1).checked_sub(32)?;
    let limit = 128 - skip.min(128);
    let ((low_stops, low_digits), (high_stops, high_digits)) = (wide(1), wide(3));
    let window_stops = u128::from(low_stops) | (u128::from(high_stops) << 64);
    let window_digits = u128::from(low_digits) | (u128::from(high_digits) << 64);
    let end = if let Some(end) = binance_tail(b, t, window_stops, window_digits, skip, limit) {
        end
    } else {
        // Stops from `t` not passed yet: in this layout each is a quote, and each string
        // key takes the next four (key open and close, value open and close), so the end
        // of a value is found by clearing bits, without shifting by its start.
        let from_t = |mask: u128| mask.checked_shr(skip as u32).unwrap_or(0);
        read_tail(b, t, from_t(window_stops), from_t(window_digits), limit)?
    };
    Some(WindowUpdate {
        symbol,
        event_time_ms,
        price,
        mantissa,
        digits: (whole + scale) as u32,
        scale: scale as u32,
        end,
    })
}

/// Reads the updates from `b[start] == '{'` on while [`read_update`] takes them, their
/// prices are of the fast conversion (`price_from_parts`: a zero price is left to the
/// canonical reader, which reports it) and a bare comma separates them, appending them
/// to `out`; returns the index just past the last one read (`None`: none read). The
/// caller's reader goes on from there, so the updates read are exactly those of
/// `read_update` called update by update; in one loop the reader is inlined, with no
/// return through memory and no separator scan between updates.
///
/// # Safety
/// The processor must have AVX2 (`is_x86_feature_detected!("avx2")`).
#[allow(unsafe_code)] // a `target_feature` function must be `unsafe` on Rust 1.85
#[target_feature(enable = "avx2")]
pub(super) unsafe fn read_run<'a>(
    b: &'a [u8],
    start: usize,
    out: &mut Vec<MarkUpdate<'a>>,
) -> Option<usize> {
    let mut at = start;
    let mut last_end = None;
    while let Some(update) = read_update(b, at) {
        let Some((mark_price, mark_units)) =
            super::price_from_parts(update.price, update.mantissa, update.digits, update.scale)
        else {
            break;
        };
        out.push(MarkUpdate {
            symbol: update.symbol,
            mark_price,
            mark_units,
            event_time_ms: update.event_time_ms,
        });
        last_end = Some(update.end);
        if b.get(update.end..update.end + 2) != Some(b",{") {
            break;
        }
        at = update.end + 1;
    }
    last_end
}

/// Whether the `len` bytes at `b[at..]` are `text` (`len <= 8`, `text` zero-padded):
/// one load and one compare.
#[allow(clippy::inline_always)] // four per update, on the path from one to the next
#[inline(always)]
fn bytes_are(b: &[u8], at: usize, text: u64, len: u32) -> Option<bool> {
    let mask = u64::MAX >> (64 - 8 * len);
    Some(word(b, at)? & mask == text)
}

/// `text` (at most eight bytes) as the little-endian word [`bytes_are`] compares with.
const fn text_word(text: &[u8]) -> u64 {
    let mut word = 0u64;
    let mut i = 0;
    while i < text.len() {
        word |= (text[i] as u64) << (8 * i);
        i += 1;
    }
    word
}

/// The keys after the price when they are exactly Binance's four,
/// `,"i":"…","P":"…","r":"…","T":…}`, read by their known layout: the end of each string
/// value is the next stop (a stop inside a value would have to be the quote before the
/// next key's text, which is checked byte for byte), the settlement time 1 to 15 digits
/// without a leading zero. Returns the index just past the brace, or `None` for any
/// other tail (which [`read_tail`] then reads key by key). `stops` and `non_digits` are
/// the masks of the window whose bit `skip` is the byte `t` (valid below `skip + limit`):
/// not shifted to `t`, the shift goes into each look-up. Every tail taken here is one
/// `read_tail` takes, to the same end.
#[allow(clippy::inline_always)] // once per update, on the path from one to the next
#[inline(always)]
fn binance_tail(
    b: &[u8],
    t: usize,
    stops: u128,
    non_digits: u128,
    skip: usize,
    limit: usize,
) -> Option<usize> {
    const INDEX: u64 = text_word(b",\"i\":\"");
    const FUNDING_BASE: u64 = text_word(b"\",\"P\":\"");
    const RATE: u64 = text_word(b"\",\"r\":\"");
    const SETTLE: u64 = text_word(b"\",\"T\":");
    // The next stop at or after `from`.
    let next = |from: usize| {
        from + stops
            .checked_shr((skip + from) as u32)
            .map_or(128, u128::trailing_zeros) as usize
    };
    if !bytes_are(b, t, INDEX, 6)? {
        return None;
    }
    let index_end = next(6);
    if !bytes_are(b, t + index_end, FUNDING_BASE, 7)? {
        return None;
    }
    let base_end = next(index_end + 7);
    if !bytes_are(b, t + base_end, RATE, 7)? {
        return None;
    }
    let rate_end = next(base_end + 7);
    if !bytes_are(b, t + rate_end, SETTLE, 6)? {
        return None;
    }
    let digits_at = rate_end + 6;
    let count = non_digits
        .checked_shr((skip + digits_at) as u32)
        .map_or(128, u128::trailing_zeros) as usize;
    let brace = digits_at + count;
    if count == 0 || count > 15 || brace >= limit {
        return None;
    }
    if (count > 1 && *b.get(t + digits_at)? == b'0') || *b.get(t + brace)? != b'}' {
        return None;
    }
    #[cfg(test)]
    LAYOUT_TAILS.with(|c| c.set(c.get() + 1));
    Some(t + brace + 1)
}

#[cfg(test)]
thread_local! {
    /// Tails [`binance_tail`] has read (tests check that Binance's updates take it).
    pub(super) static LAYOUT_TAILS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// The keys after the price, from `b[t]` to the update's closing brace: `stops` and
/// `non_digits` are the masks of the bytes from `t` (valid below `limit`). Returns the
/// index just past the brace.
#[allow(clippy::inline_always)] // once per update, on the path from one to the next
#[inline(always)]
fn read_tail(b: &[u8], t: usize, mut stops: u128, non_digits: u128, limit: usize) -> Option<usize> {
    let mut next_stop = || {
        let at = stops.trailing_zeros() as usize;
        stops &= stops.wrapping_sub(1);
        at
    };
    let mut r = 0;
    loop {
        match *b.get(t + r)? {
            b'}' => break,
            b',' => {}
            _ => return None,
        }
        // A key of printable ASCII up to its quote (the real stream has `"st":1`); the
        // four keys read above again would be a duplicate: the general reader says so.
        if next_stop() != r + 1 || *b.get(t + r + 1)? != b'"' {
            return None;
        }
        let key_end = next_stop();
        if key_end + 2 >= limit || *b.get(t + key_end)? != b'"' || *b.get(t + key_end + 1)? != b':'
        {
            return None;
        }
        let key = b.get(t + r + 2..t + key_end)?;
        if key.is_empty() || matches!(key, b"e" | b"E" | b"s" | b"p") {
            return None;
        }
        let value = key_end + 2;
        let first = *b.get(t + value)?;
        if first == b'"' {
            if next_stop() != value {
                return None;
            }
            let end = next_stop();
            if end >= limit || *b.get(t + end)? != b'"' {
                return None;
            }
            r = end + 1;
        } else {
            // 1 to 15 digits without a leading zero, before `,` or `}`.
            let count = run128(non_digits, value);
            if count == 0 || count > 15 || (count > 1 && first == b'0') {
                return None;
            }
            r = value + count;
            if r >= limit || !matches!(*b.get(t + r)?, b',' | b'}') {
                return None;
            }
        }
    }
    Some(t + r + 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The tail masks `read_update` hands over, computed byte by byte from the bytes
    /// at `b[0..]` (valid below `limit`).
    fn tail_masks(b: &[u8], limit: usize) -> (u128, u128) {
        let (mut stops, mut non_digits) = (0u128, 0u128);
        for (i, &c) in b.iter().enumerate().take(limit) {
            if super::super::STRING_STOP[usize::from(c)] {
                stops |= 1 << i;
            }
            if !c.is_ascii_digit() {
                non_digits |= 1 << i;
            }
        }
        (stops, non_digits)
    }

    /// (`binance_tail`, `read_tail`) of `tail`, followed by a next update's bytes.
    fn both_readers(tail: &[u8], limit: usize) -> (Option<usize>, Option<usize>) {
        let mut b = tail.to_vec();
        b.extend_from_slice(br#",{"e":"markPriceUpdate","E":1,"s":"X","p":"1"}"#);
        let limit = limit.min(b.len()).min(128);
        let (stops, non_digits) = tail_masks(&b, limit);
        (
            binance_tail(&b, 0, stops, non_digits, 0, limit),
            read_tail(&b, 0, stops, non_digits, limit),
        )
    }

    /// Binance's tail, as every update of the real stream ends.
    const TAIL: &str =
        r#","i":"11784.62659091","P":"11784.25641265","r":"-0.00038167","T":1562306400000}"#;

    #[test]
    fn the_binance_tail_is_read_by_its_layout_like_key_by_key() {
        let taken = [
            TAIL,
            r#","i":"","P":"","r":"","T":0}"#,
            r#","i":"a b:{}[],","P":"x","r":"y","T":123456789012345}"#,
        ];
        for tail in taken {
            let (fast, slow) = both_readers(tail.as_bytes(), 128);
            assert_eq!(fast, Some(tail.len()), "{tail}");
            assert_eq!(fast, slow, "{tail}");
        }
        // Left to `read_tail` (which may take them, or leave them to the general reader).
        let refused = [
            r#","i":"1","P":"2","r":"3","T":01}"#,
            r#","i":"1","P":"2","r":"3","T":1234567890123456}"#,
            r#","i":"1","P":"2","r":"3","T":-1}"#,
            r#","i":"1","P":"2","r":"3","T":"1"}"#,
            r#","i":"1","P":"2","r":"3","T":1.5}"#,
            r#","i":"1","P":"2","r":"3","T":}"#,
            r#","i":"1","P":"2","r":"3","T":1,"st":1}"#,
            r#","i":"1","P":"2","r":"3","T":1 }"#,
            r#","i":"1","P":"2","r":"3","T":1"#,
            r#","P":"2","i":"1","r":"3","T":1}"#,
            r#","i":"1","P":"2","T":1}"#,
            r#","i":"1\","P":"2","r":"3","T":1}"#,
            r#","i":"a\",\"P\":\"","P":"2","r":"3","T":1}"#,
            r#","i":"é","P":"2","r":"3","T":1}"#,
            ",\"i\":\"\t\",\"P\":\"2\",\"r\":\"3\",\"T\":1}",
            r#", "i":"1","P":"2","r":"3","T":1}"#,
            r#","i" :"1","P":"2","r":"3","T":1}"#,
            "}",
        ];
        for tail in refused {
            assert_eq!(both_readers(tail.as_bytes(), 128).0, None, "{tail}");
        }
        // A tail that runs past the masks' valid bytes is refused, however it ends.
        for limit in [0, 10, TAIL.len() - 1] {
            assert_eq!(both_readers(TAIL.as_bytes(), limit).0, None, "{limit}");
        }
        assert_eq!(
            both_readers(TAIL.as_bytes(), TAIL.len()).0,
            Some(TAIL.len())
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(3000))]

        /// Whatever tail the layout reader takes, the key-by-key reader takes to the same
        /// end (mutations of Binance's tail: every byte class the masks tell apart).
        #[test]
        fn the_layout_reader_takes_only_what_read_tail_takes(
            edits in proptest::collection::vec((any::<usize>(), 0u8..3, any::<u8>()), 0..4),
            limit in 0usize..128,
        ) {
            const ALPHABET: &[u8] = b"\"\\,:{}[] 0123456789.-eEiPrTsp\x01\x7f\xc3\xa9";
            let mut tail = TAIL.as_bytes().to_vec();
            for (at, kind, byte) in edits {
                let at = at % (tail.len() + 1);
                let b = ALPHABET[usize::from(byte) % ALPHABET.len()];
                match kind {
                    0 if at < tail.len() => { tail.remove(at); }
                    1 => tail.insert(at, b),
                    _ if at < tail.len() => tail[at] = b,
                    _ => {}
                }
            }
            let (fast, slow) = both_readers(&tail, limit.max(tail.len() / 2));
            if fast.is_some() {
                prop_assert_eq!(fast, slow);
            }
        }
    }

    #[test]
    fn digits_fold_to_their_value_at_every_length() {
        let text = b"9876543210123456";
        for count in 1..=16 {
            let low = u64::from_le_bytes(text[..8].try_into().unwrap());
            let high = u64::from_le_bytes(text[8..].try_into().unwrap());
            let expected: u64 = std::str::from_utf8(&text[..count])
                .unwrap()
                .parse()
                .unwrap();
            assert_eq!(digits_value(low, high, count), expected, "{count}");
        }
        let zeros = *b"0000000000000001";
        let low = u64::from_le_bytes(zeros[..8].try_into().unwrap());
        let high = u64::from_le_bytes(zeros[8..].try_into().unwrap());
        assert_eq!(digits_value(low, high, 16), 1);
        assert_eq!(digits_value(low, high, 15), 0);
    }
}
