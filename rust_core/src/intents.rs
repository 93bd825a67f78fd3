//! The plain lines of an intents JSONL file, found and cut into fields in one pass.
//!
//! A backtest's intents file is usually written by a program: one object a line, the known
//! fields only, numbers as JSON numbers, strings without escapes. Such a *plain* line is cut
//! here into its fields' text (a tab-separated table Python reads as columns); the value
//! checks stay in Python, where they sit beside `parse_intent` and are shared with it. Every
//! other line (blank, a comment, an escape, an unknown or repeated key, a number a double
//! cannot hold) is only numbered, and Python sends it through `parse_intent` on its own.
//!
//! The grammar is the one `pyquant.backtest.loading` states as regular expressions
//! (`_PLAIN_LINE`, `_KEY_TWICE`); a hand-written scanner because those expressions cost more
//! than half a second on a million lines, and no JSON parser says whether a key was given
//! twice or keeps a number's text. This module knows nothing of Python.

use rayon::prelude::*;

/// The fields cut out of plain lines, in the column order of [`PlainIntents::table`].
pub const PLAIN_FIELDS: [&str; 8] = [
    "id",
    "symbol",
    "side",
    "confidence",
    "time",
    "created_at_ms",
    "timestamp",
    "leverage",
];

/// Written for a field the line does not give or gives as `null`: a byte no plain string
/// holds, so an empty string stays an empty string.
pub const NULL_FIELD: u8 = 0x01;

/// What one pass over a file found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct PlainIntents {
    /// One row per plain line: its 0-based line number, then the text of each of
    /// [`PLAIN_FIELDS`] ([`NULL_FIELD`] when absent or null), tab-separated, `\n`-terminated.
    pub table: Vec<u8>,
    /// The 0-based numbers of the lines that are not plain, in file order.
    pub other_lines: Vec<u64>,
    /// Lines in the file: pieces between `\n`, the empty piece after a final `\n` not counted.
    pub lines: u64,
}

/// The value kinds a known key accepts in a plain line.
#[derive(Clone, Copy)]
struct Accepts {
    string: bool,
    number: bool,
    null: bool,
    /// Index into [`PLAIN_FIELDS`] of the column the value goes to, if any.
    column: Option<usize>,
}

const fn accepts(string: bool, number: bool, null: bool, column: Option<usize>) -> Accepts {
    Accepts {
        string,
        number,
        null,
        column,
    }
}

/// The known keys (`_KNOWN_KEYS` in Python) and what each accepts.
const KEYS: [(&[u8], Accepts); 14] = [
    (b"id", accepts(true, false, false, Some(0))),
    (b"symbol", accepts(true, false, false, Some(1))),
    (b"side", accepts(true, false, false, Some(2))),
    (b"source", accepts(true, false, false, None)),
    (b"intent_id", accepts(true, true, false, None)),
    (b"created_at_ms", accepts(false, true, false, Some(5))),
    (b"confidence", accepts(false, true, true, Some(3))),
    (b"time", accepts(false, true, true, Some(4))),
    (b"timestamp", accepts(false, true, true, Some(6))),
    (b"ts", accepts(false, true, true, None)),
    (b"leverage", accepts(false, true, true, Some(7))),
    (b"size_usd", accepts(false, false, true, None)),
    (b"position_size_usd", accepts(false, false, true, None)),
    (b"notional_usd", accepts(false, false, true, None)),
];

/// Below this many bytes a file is scanned on one thread: splitting would cost more.
const PARALLEL_BYTES: usize = 1 << 20;

/// Cuts every plain line of `data` into fields and numbers the others.
///
/// Large files are cut into newline-aligned pieces scanned in parallel; the pieces' tables
/// are joined in file order with their line numbers carried over, so the result is the one
/// a single pass gives.
pub fn scan_plain_intents(data: &[u8]) -> PlainIntents {
    if data.is_empty() {
        return PlainIntents::default();
    }
    let body = data.strip_suffix(b"\n").unwrap_or(data);
    let pieces = newline_aligned_pieces(body, rayon::current_num_threads() * 4);
    if pieces.len() <= 1 {
        return scan_lines(body, 0);
    }
    let counted: Vec<u64> = pieces
        .par_iter()
        .map(|piece| newline_count(piece) + 1)
        .collect();
    let mut first = Vec::with_capacity(pieces.len());
    let mut lines = 0;
    for count in &counted {
        first.push(lines);
        lines += count;
    }
    let parts: Vec<PlainIntents> = pieces
        .par_iter()
        .zip(first.par_iter())
        .map(|(piece, &first)| scan_lines(piece, first))
        .collect();
    let mut out = PlainIntents {
        table: Vec::with_capacity(parts.iter().map(|p| p.table.len()).sum()),
        other_lines: Vec::new(),
        lines,
    };
    for part in parts {
        out.table.extend_from_slice(&part.table);
        out.other_lines.extend_from_slice(&part.other_lines);
    }
    out
}

fn newline_count(piece: &[u8]) -> u64 {
    memchr::memchr_iter(b'\n', piece).count() as u64
}

/// `body` cut after newlines into about `count` pieces of whole lines (the newline that
/// separates two pieces belongs to neither).
fn newline_aligned_pieces(body: &[u8], count: usize) -> Vec<&[u8]> {
    if body.len() < PARALLEL_BYTES || count <= 1 {
        return vec![body];
    }
    let size = body.len() / count;
    let mut pieces = Vec::with_capacity(count + 1);
    let mut start = 0;
    while start < body.len() {
        let probe = (start + size).min(body.len());
        let Some(offset) = memchr::memchr(b'\n', &body[probe..]) else {
            pieces.push(&body[start..]);
            return pieces;
        };
        pieces.push(&body[start..probe + offset]);
        start = probe + offset + 1;
    }
    // `body` ended with the newline that closed the last piece: one empty line follows it.
    pieces.push(&body[body.len()..]);
    pieces
}

/// Scans the lines of `body` (split at `\n`), numbering them from `first`.
fn scan_lines(body: &[u8], first: u64) -> PlainIntents {
    let mut out = PlainIntents {
        table: Vec::with_capacity(body.len()),
        ..PlainIntents::default()
    };
    let mut fields: [Option<&[u8]>; PLAIN_FIELDS.len()] = [None; PLAIN_FIELDS.len()];
    for (index, raw) in body.split(|&b| b == b'\n').enumerate() {
        let number = first + index as u64;
        out.lines += 1;
        let line = raw.strip_suffix(b"\r").unwrap_or(raw);
        fields.fill(None);
        if plain_line(line, &mut fields) {
            write_row(&mut out.table, number, &fields);
        } else {
            out.other_lines.push(number);
        }
    }
    out
}

fn write_row(table: &mut Vec<u8>, number: u64, fields: &[Option<&[u8]>]) {
    write_decimal(table, number);
    for field in fields {
        table.push(b'\t');
        match field {
            Some(text) => table.extend_from_slice(text),
            None => table.push(NULL_FIELD),
        }
    }
    table.push(b'\n');
}

fn write_decimal(table: &mut Vec<u8>, mut value: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (value % 10) as u8;
        value /= 10;
        if value == 0 {
            break;
        }
    }
    table.extend_from_slice(&digits[at..]);
}

/// A cursor over one line.
struct Cursor<'a> {
    line: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn peek(&self) -> Option<u8> {
        self.line.get(self.at).copied()
    }

    fn eat(&mut self, byte: u8) -> bool {
        if self.peek() == Some(byte) {
            self.at += 1;
            true
        } else {
            false
        }
    }

    fn blanks(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t')) {
            self.at += 1;
        }
    }

    /// A plain string's content: printable ASCII without `"` or `\`.
    fn string(&mut self) -> Option<&'a [u8]> {
        if !self.eat(b'"') {
            return None;
        }
        let start = self.at;
        while let Some(byte) = self.peek() {
            match byte {
                b'"' => {
                    self.at += 1;
                    return Some(&self.line[start..self.at - 1]);
                }
                b' '..=b'~' if byte != b'\\' => self.at += 1,
                _ => return None,
            }
        }
        None
    }

    fn digits(&mut self, at_most: usize) -> usize {
        let start = self.at;
        while self.at - start < at_most && matches!(self.peek(), Some(b'0'..=b'9')) {
            self.at += 1;
        }
        self.at - start
    }

    /// A plain number's text: `(0|[1-9][0-9]{0,29})(\.[0-9]{1,30})?([eE][+-]?[0-9]{1,2})?`.
    fn number(&mut self) -> Option<&'a [u8]> {
        let start = self.at;
        match self.peek() {
            Some(b'0') => self.at += 1,
            Some(b'1'..=b'9') => {
                self.at += 1;
                self.digits(29);
            }
            _ => return None,
        }
        if self.eat(b'.') && self.digits(30) == 0 {
            return None;
        }
        if matches!(self.peek(), Some(b'e' | b'E')) {
            self.at += 1;
            if matches!(self.peek(), Some(b'+' | b'-')) {
                self.at += 1;
            }
            if self.digits(2) == 0 {
                return None;
            }
        }
        // The regular expression stops where its bounded repeats end; the next byte must
        // then fit the line's grammar (a blank, a comma or the brace), which the caller checks.
        Some(&self.line[start..self.at])
    }

    fn null(&mut self) -> bool {
        if self.line[self.at..].starts_with(b"null") {
            self.at += 4;
            true
        } else {
            false
        }
    }
}

/// Whether `line` is plain; if so its fields are in `fields`.
fn plain_line<'a>(line: &'a [u8], fields: &mut [Option<&'a [u8]>]) -> bool {
    let mut cursor = Cursor { line, at: 0 };
    let mut seen = [false; KEYS.len()];
    cursor.blanks();
    if !cursor.eat(b'{') {
        return false;
    }
    loop {
        cursor.blanks();
        let Some(key) = cursor.string() else {
            return false;
        };
        let Some(index) = KEYS.iter().position(|(name, _)| *name == key) else {
            return false;
        };
        if std::mem::replace(&mut seen[index], true) {
            return false; // json.loads keeps the last value, polars the first: parse_intent decides
        }
        let accepts = KEYS[index].1;
        cursor.blanks();
        if !cursor.eat(b':') {
            return false;
        }
        cursor.blanks();
        let value = match cursor.peek() {
            Some(b'"') if accepts.string => cursor.string().map(Some),
            Some(b'n') if accepts.null && cursor.null() => Some(None),
            Some(b'0'..=b'9') if accepts.number => cursor.number().map(Some),
            _ => None,
        };
        let Some(value) = value else {
            return false;
        };
        if let Some(column) = accepts.column {
            fields[column] = value;
        }
        cursor.blanks();
        if cursor.eat(b',') {
            continue;
        }
        if !cursor.eat(b'}') {
            return false;
        }
        cursor.blanks();
        return cursor.at == line.len();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(data: &str) -> (Vec<String>, Vec<u64>, u64) {
        let out = scan_plain_intents(data.as_bytes());
        let table = String::from_utf8(out.table).unwrap();
        (
            table.lines().map(str::to_owned).collect(),
            out.other_lines,
            out.lines,
        )
    }

    #[test]
    fn a_plain_line_is_cut_into_its_fields() {
        let (table, others, lines) = rows(
            "{\"id\": \"a-1\", \"time\": 1700000000000, \"symbol\": \"BTCUSDT\", \"side\": \"BUY\", \"confidence\": 0.7}\n",
        );
        assert_eq!(lines, 1);
        assert!(others.is_empty());
        assert_eq!(
            table,
            ["0\ta-1\tBTCUSDT\tBUY\t0.7\t1700000000000\t\u{1}\t\u{1}\t\u{1}"]
        );
    }

    #[test]
    fn null_and_empty_strings_stay_apart() {
        let (table, _, _) = rows(r#"{"id":"","confidence":null,"leverage":3.0,"ts":1e5}"#);
        assert_eq!(
            table,
            ["0\t\t\u{1}\t\u{1}\t\u{1}\t\u{1}\t\u{1}\t\u{1}\t3.0"]
        );
    }

    #[test]
    fn lines_that_are_not_plain_are_numbered_for_parse_intent() {
        let data = [
            r#"{"id":"a","time":1}"#,                      // 0 plain
            "",                                            // 1 blank
            "# a comment",                                 // 2
            r#"{"id":"a\"b","time":1}"#,                   // 3 escape
            r#"{"id":"a","id":"b"}"#,                      // 4 key twice
            r#"{"id":"a","extra":1}"#,                     // 5 unknown key
            r#"{"time":-1}"#,                              // 6 sign
            r#"{"time":01}"#,                              // 7 leading zero
            r#"{"time":1.}"#,                              // 8 no decimals
            r#"{"time":1e123}"#,                           // 9 exponent of 3 digits
            r#"{"size_usd":100}"#,                         // 10 a size takes the line path
            r#"{"symbol":null}"#,                          // 11 null where a string is needed
            r#"{"time":1} x"#,                             // 12 trailing text
            "{}",                                          // 13 no pair
            r#"{"id":"a","time":1,}"#,                     // 14 trailing comma
            "{\"id\":\"caf\u{e9}\",\"time\":1}",           // 15 not ASCII
            " \t{ \"time\" : 5 , \"ts\":null } \t\r",      // 16 plain, blanks and \r
            r#"{"time":1234567890123456789012345678901}"#, // 17 31 digits
        ]
        .join("\n");
        let (table, others, lines) = rows(&data);
        assert_eq!(lines, 18);
        assert_eq!(
            others,
            [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 17]
        );
        assert_eq!(table.len(), 2);
        assert!(table[0].starts_with("0\ta\t"));
        assert!(table[1].starts_with("16\t\u{1}\t\u{1}\t\u{1}\t\u{1}\t5\t"));
    }

    #[test]
    fn pieces_scanned_in_parallel_give_the_single_pass_result() {
        let lines = [
            r#"{"id":"a","time":1700000000000,"symbol":"BTCUSDT","side":"BUY"}"#,
            "",
            "# note",
            r#"{"id":"b","id":"c"}"#,
            " {\"time\": 5e3, \"confidence\": 0.25}\r",
        ];
        for ending in ["", "\n", "\n\n"] {
            let mut data: Vec<u8> = Vec::new();
            for i in 0..60_000 {
                data.extend_from_slice(lines[i % lines.len()].as_bytes());
                data.push(b'\n');
            }
            data.truncate(data.len() - 1);
            data.extend_from_slice(ending.as_bytes());
            assert!(data.len() > PARALLEL_BYTES);
            let whole = data.strip_suffix(b"\n").unwrap_or(&data);
            assert_eq!(
                scan_plain_intents(&data),
                scan_lines(whole, 0),
                "ending {ending:?}"
            );
        }
    }

    #[test]
    fn a_final_newline_ends_the_last_line_and_adds_none() {
        assert_eq!(rows("{\"time\":1}\n").2, 1);
        assert_eq!(rows("{\"time\":1}").2, 1);
        assert_eq!(rows("{\"time\":1}\n\n").2, 2);
        assert_eq!(rows("").2, 0);
        assert_eq!(rows("\n").2, 1);
    }
}
