//! Bindings: the backtest, one coarse call with whole numpy arrays per symbol.
//!
//! Python hands over every series at once (bar and entry arrays are read in place,
//! borrowed read-only for the call; only the entries that give their own notional are
//! parsed), the run happens with the GIL released, and the results come back as
//! columns (numpy arrays, with lists of exact decimal strings when `detail` is set) or,
//! when asked (`exact`), as Arrow tables in their final columns that polars reads in one
//! call. Before the run, `backtest_entry_keys` reads the entries' side and symbol strings
//! from their Arrow views in one pass.

use std::borrow::Cow;

use arrow_array::cast::AsArray;
use arrow_array::types::{Float64Type, Int64Type, Int8Type, UInt32Type};
use arrow_array::{Array, ArrayRef};
use arrow_buffer::Buffer;
use numpy::{PyArray1, PyReadonlyArray1};
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

use crate::backtest::{
    self, widened, Amounts, BacktestOptions, Bars, ColumnElement, ColumnForm, Direction, Entries,
    ExactRows, FillRecord, Intrabar, JobOutput, PooledColumn, ResultColumns, SeriesInput,
    TradeRecord, EXACT_SCALE, REASONS,
};
use crate::error::CoreError;
use crate::exit::policy::ExitPolicy;
use crate::fixed::{parse_decimal, Decimal};
use crate::rules::{ExchangeRules, SymbolRules};

use super::arrow_io::{pooled_values, read_chunks, table_error, ArrowTable, TableBuilder};
use super::engine::PyExitPolicy;
use super::rules::PyExchangeRules;

fn readonly<'py, T: numpy::Element>(
    dict: &Bound<'py, PyDict>,
    symbol: &str,
    key: &str,
) -> PyResult<PyReadonlyArray1<'py, T>> {
    let item = dict
        .get_item(key)?
        .ok_or_else(|| PyValueError::new_err(format!("series {symbol}: missing array {key:?}")))?;
    item.extract().map_err(|_| {
        PyValueError::new_err(format!(
            "series {symbol}: {key:?} must be a one-dimensional numpy array of {}",
            std::any::type_name::<T>()
        ))
    })
}

/// The array's values in place when it is contiguous (the usual case: no copy, no fresh
/// pages to fault in); a strided view is gathered element-wise.
fn column<'a, T: numpy::Element + Copy>(array: &'a PyReadonlyArray1<'_, T>) -> Cow<'a, [T]> {
    match array.as_slice() {
        Ok(slice) => Cow::Borrowed(slice),
        Err(_) => Cow::Owned(array.as_array().iter().copied().collect()),
    }
}

/// One series' bar columns, borrowed read-only (rust-numpy's borrow flag keeps Rust
/// writers out) for as long as the run reads them.
struct BarArrays<'py> {
    open_time: PyReadonlyArray1<'py, i64>,
    open: PyReadonlyArray1<'py, f64>,
    high: PyReadonlyArray1<'py, f64>,
    low: PyReadonlyArray1<'py, f64>,
    close: PyReadonlyArray1<'py, f64>,
}

impl<'py> BarArrays<'py> {
    fn read(dict: &Bound<'py, PyDict>, symbol: &str, prefix: &str) -> PyResult<Self> {
        Ok(Self {
            open_time: readonly(dict, symbol, &format!("{prefix}open_time"))?,
            open: readonly(dict, symbol, &format!("{prefix}open"))?,
            high: readonly(dict, symbol, &format!("{prefix}high"))?,
            low: readonly(dict, symbol, &format!("{prefix}low"))?,
            close: readonly(dict, symbol, &format!("{prefix}close"))?,
        })
    }

    fn bars(&self) -> Bars<'_> {
        Bars {
            open_time: column(&self.open_time),
            open: column(&self.open),
            high: column(&self.high),
            low: column(&self.low),
            close: column(&self.close),
        }
    }
}

/// One series' entry columns, borrowed read-only like the bars.
struct EntryArrays<'py> {
    time_ms: PyReadonlyArray1<'py, i64>,
    side: PyReadonlyArray1<'py, i8>,
    confidence: PyReadonlyArray1<'py, f64>,
    leverage: PyReadonlyArray1<'py, i64>,
}

/// Everything of one series read from its dict, the arrays still numpy arrays
/// ([`SeriesArrays::input`] lends them to the run) and the few given notionals parsed.
struct SeriesArrays<'py> {
    symbol: String,
    interval_ms: i64,
    bars: BarArrays<'py>,
    fine: Option<(i64, BarArrays<'py>)>,
    entries: EntryArrays<'py>,
    notional: Vec<(usize, Decimal)>,
}

impl SeriesArrays<'_> {
    /// The run's input, borrowing the arrays and taking the parsed notionals.
    fn input(&mut self) -> SeriesInput<'_> {
        SeriesInput {
            symbol: self.symbol.clone(),
            interval_ms: self.interval_ms,
            bars: self.bars.bars(),
            fine: self.fine.as_ref().map(|(i, b)| (*i, b.bars())),
            entries: Entries {
                time_ms: column(&self.entries.time_ms),
                side: column(&self.entries.side),
                confidence: column(&self.entries.confidence),
                leverage: column(&self.entries.leverage),
                notional: std::mem::take(&mut self.notional),
            },
        }
    }
}

/// The largest notional a backtest entry may ask for (1e15 quote units): with prices and
/// quantities inside the engine's bounds every product stays far inside the decimal range.
const MAX_NOTIONAL: Decimal = crate::exit::bounds::MAX_PRICE;

/// Parses a positive decimal of at most `max`, naming `field`.
fn parse_bounded(field: &str, text: &str, max: Decimal) -> Result<Decimal, CoreError> {
    let value = parse_decimal(field, text)?;
    if value <= Decimal::ZERO || value > max {
        return Err(CoreError::invalid(
            field,
            text,
            format!("must be > 0 and at most {}", max.normalize()),
        ));
    }
    Ok(value)
}

/// Parses a fee rate in [0, 0.1], naming `field` (Binance's fees are fractions of a percent).
fn parse_fee(field: &str, text: &str) -> Result<Decimal, CoreError> {
    let value = parse_decimal(field, text)?;
    if value < Decimal::ZERO || value > Decimal::new(1, 1) {
        return Err(CoreError::invalid(
            field,
            text,
            "must be a rate in [0, 0.1]",
        ));
    }
    Ok(value)
}

/// The entries that give their own notional: `entry_notional` is absent or None when none
/// does (the usual case: nothing to read), else a pair (entry rows as an int64 array,
/// their notionals as decimal strings), parsed exactly.
fn entry_notionals(dict: &Bound<'_, PyDict>, symbol: &str) -> PyResult<Vec<(usize, Decimal)>> {
    let Some(value) = dict.get_item("entry_notional")? else {
        return Ok(Vec::new());
    };
    if value.is_none() {
        return Ok(Vec::new());
    }
    let shape = || {
        PyValueError::new_err(format!(
            "series {symbol}: \"entry_notional\" must be None or a pair (int64 numpy array \
             of entry rows, list of decimal strings)"
        ))
    };
    let (rows, texts): (PyReadonlyArray1<'_, i64>, Vec<String>) =
        value.extract().map_err(|_| shape())?;
    let rows = column(&rows);
    if rows.len() != texts.len() {
        return Err(CoreError::invalid_for(
            symbol,
            "entry_notional",
            texts.len().to_string(),
            format!("must have as many notionals as entry rows ({})", rows.len()),
        )
        .into());
    }
    rows.iter()
        .zip(&texts)
        .map(|(&row, text)| {
            let value = parse_bounded("entry_notional", text, MAX_NOTIONAL)
                .map_err(|e| e.with_symbol(symbol))?;
            let row = usize::try_from(row).map_err(|_| {
                CoreError::invalid_for(
                    symbol,
                    "entry_notional row",
                    row.to_string(),
                    "must be an entry row (0 or more)",
                )
            })?;
            Ok((row, value))
        })
        .collect()
}

fn series_arrays<'py>(dict: &Bound<'py, PyDict>) -> PyResult<SeriesArrays<'py>> {
    let symbol: String = dict
        .get_item("symbol")?
        .ok_or_else(|| PyValueError::new_err("series: missing \"symbol\""))?
        .extract()?;
    let interval_ms: i64 = dict
        .get_item("interval_ms")?
        .ok_or_else(|| PyValueError::new_err(format!("series {symbol}: missing \"interval_ms\"")))?
        .extract()?;
    let fine = match dict.get_item("fine_interval_ms")? {
        Some(value) if !value.is_none() => Some((
            value.extract::<i64>()?,
            BarArrays::read(dict, &symbol, "fine_")?,
        )),
        _ => None,
    };
    // The columns are checked (lengths, sides, order) in one pass by the run, GIL released.
    let entries = EntryArrays {
        time_ms: readonly(dict, &symbol, "entry_time")?,
        side: readonly(dict, &symbol, "entry_side")?,
        confidence: readonly(dict, &symbol, "entry_confidence")?,
        leverage: readonly(dict, &symbol, "entry_leverage")?,
    };
    let notional = entry_notionals(dict, &symbol)?;
    let bars = BarArrays::read(dict, &symbol, "")?;
    Ok(SeriesArrays {
        symbol,
        interval_ms,
        bars,
        fine,
        entries,
        notional,
    })
}

/// The text columns of a result (symbol, reason, kind) as Arrow `string_view` arrays, which
/// Python wraps as polars columns without a Python object or a lookup per row: each row is
/// the 16-byte view of its name, made once per name; the names longer than 12 bytes point
/// into one data buffer shared by every column of the result.
struct TextViews {
    data: Buffer,
    symbols: Vec<[u8; 16]>,
    reasons: Vec<[u8; 16]>,
    kinds: [[u8; 16]; 2],
}

impl TextViews {
    fn new(symbols: &[&str]) -> Self {
        let mut data = Vec::new();
        let mut view = |name: &str| -> [u8; 16] {
            let bytes = name.as_bytes();
            let mut out = [0u8; 16];
            out[..4].copy_from_slice(&(bytes.len() as u32).to_le_bytes());
            if bytes.len() <= INLINE {
                out[4..4 + bytes.len()].copy_from_slice(bytes);
            } else {
                // prefix, buffer 0, offset
                out[4..8].copy_from_slice(&bytes[..4]);
                out[12..16].copy_from_slice(&(data.len() as u32).to_le_bytes());
                data.extend_from_slice(bytes);
            }
            out
        };
        let symbols = symbols.iter().map(|s| view(s)).collect();
        let reasons = REASONS.iter().map(|r| view(r)).collect();
        let kinds = [view("entry"), view("exit")];
        Self {
            data: Buffer::from_vec(data),
            symbols,
            reasons,
            kinds,
        }
    }

    /// An empty column with room for `rows` views.
    fn column(rows: usize) -> Vec<u8> {
        backtest::take_bytes(rows * 16)
    }

    /// Adds a column of views made by this value (its names' views, copied row by row).
    fn add_to(&self, table: &mut TableBuilder, name: &str, views: Vec<u8>) {
        #[allow(unsafe_code)]
        // SAFETY: every view was copied from `symbols`, `reasons` or `kinds`, which `new`
        // made by Arrow's layout from UTF-8 names: the length, then the name zero-padded up
        // to 12 bytes, or its first 4 bytes, buffer 0 and its offset in `data`.
        unsafe {
            table.text(name, views, &self.data);
        }
    }
}

/// A result table with its last columns: each row's series and policy.
fn finish_keyed(
    mut table: TableBuilder,
    series: Vec<u32>,
    policy: Vec<u32>,
) -> PyResult<ArrowTable> {
    table.primitive::<UInt32Type>("series", pooled_values(series));
    table.primitive::<UInt32Type>("policy", pooled_values(policy));
    table.finish().map_err(table_error)
}

/// The skipped entries as a table: series, policy, entry time, count, symbol and reason (a
/// few rows: one per entry not taken, and one per reason only counted).
fn skipped_table(jobs: &[JobOutput], text: &TextViews) -> PyResult<ArrowTable> {
    let rows: usize = jobs.iter().map(|j| j.skipped.len()).sum();
    let (mut ser, mut pol, mut time, mut count) = (
        backtest::take_column(rows),
        backtest::take_column(rows),
        backtest::take_column(rows),
        backtest::take_column(rows),
    );
    let (mut symbol, mut reason) = (TextViews::column(rows), TextViews::column(rows));
    for job in jobs {
        for &(time_ms, code, n) in &job.skipped {
            ser.push(job.series);
            pol.push(job.policy);
            time.push(time_ms);
            count.push(n);
            symbol.extend_from_slice(&text.symbols[job.series as usize]);
            reason.extend_from_slice(&text.reasons[usize::from(code)]);
        }
    }
    let mut table = TableBuilder::new();
    table.primitive::<UInt32Type>("series", pooled_values(ser));
    table.primitive::<UInt32Type>("policy", pooled_values(pol));
    table.primitive::<Int64Type>("time_ms", pooled_values(time));
    table.primitive::<UInt32Type>("count", pooled_values(count));
    text.add_to(&mut table, "symbol", symbol);
    text.add_to(&mut table, "reason", reason);
    table.finish().map_err(table_error)
}

/// Appends `count` copies of one view to a text column.
fn repeat_view(column: &mut Vec<u8>, view: [u8; 16], count: usize) {
    extend_16(column, count, std::iter::repeat_n(view, count));
}

/// Appends the view of each code to a text column.
fn look_up_views(column: &mut Vec<u8>, codes: &[u8], view: impl Fn(u8) -> [u8; 16]) {
    extend_16(column, codes.len(), codes.iter().map(|&code| view(code)));
}

/// Read-only bytes that Python reads through the buffer protocol without a copy (numpy
/// wraps the entries' side codes). When the last reader lets go the memory goes back to
/// the backtest's pool, so the next run writes into pages it already has instead of
/// faulting in fresh ones.
#[pyclass(frozen, module = "pyquant._core")]
pub struct PooledBytes {
    bytes: PooledColumn<u8>,
}

// The buffer protocol is `unsafe` by its signature (a raw view from the interpreter); the
// bodies only fill that view through `PyBuffer_FillInfo`.
#[allow(unsafe_code)]
#[pymethods]
impl PooledBytes {
    fn __len__(&self) -> usize {
        self.bytes.0.len()
    }

    /// # Safety
    /// Called by Python with a valid `view`; the buffer is read-only, and the bytes stay put
    /// while `view` holds its reference to `slf` (the vector is never resized after
    /// construction, and `frozen` forbids any mutation).
    #[allow(clippy::needless_pass_by_value)] // the receiver pyo3 gives this slot
    unsafe fn __getbuffer__(
        slf: Bound<'_, Self>,
        view: *mut pyo3::ffi::Py_buffer,
        flags: std::os::raw::c_int,
    ) -> PyResult<()> {
        let bytes = &slf.get().bytes.0;
        let length = isize::try_from(bytes.len())
            .map_err(|_| pyo3::exceptions::PyBufferError::new_err("buffer too large"))?;
        // SAFETY: `view` is valid (see above); `PyBuffer_FillInfo` takes a reference to
        // `slf` for the view's lifetime and refuses a writable request on a read-only buffer.
        let status = unsafe {
            pyo3::ffi::PyBuffer_FillInfo(
                view,
                slf.as_ptr(),
                bytes.as_ptr().cast_mut().cast(),
                length,
                1,
                flags,
            )
        };
        if status == -1 {
            return Err(PyErr::fetch(slf.py()));
        }
        Ok(())
    }
}

fn exact(value: Decimal) -> String {
    value.normalize().to_string()
}

/// Owns a result column read by a numpy array (its base object) and gives its vector back
/// to the pool when numpy lets go.
#[pyclass(frozen, module = "pyquant._core")]
struct ColumnOwner {
    _column: Box<dyn std::any::Any + Send + Sync>,
}

/// A result column as a numpy array over its vector, without a copy (the vector goes back
/// to its pool when the array dies).
fn pooled_array<T: numpy::Element + ColumnElement>(
    py: Python<'_>,
    values: Vec<T>,
) -> PyResult<Bound<'_, PyArray1<T>>> {
    let (start, len) = (values.as_ptr(), values.len());
    let owner = Bound::new(
        py,
        ColumnOwner {
            _column: Box::new(PooledColumn(values)),
        },
    )?;
    #[allow(unsafe_code)]
    // SAFETY: `start` points to `len` initialized values (or is a dangling aligned pointer
    // for none) of the vector `owner` keeps unchanged for as long as the array, whose base
    // it becomes, is alive.
    let array = unsafe {
        let view = numpy::ndarray::ArrayView1::from_shape_ptr(len, start);
        PyArray1::borrow_from_array(&view, owner.into_any())
    };
    Ok(array)
}

/// Column builder for one output table.
struct Columns<'py> {
    py: Python<'py>,
    dict: Bound<'py, PyDict>,
}

impl<'py> Columns<'py> {
    fn new(py: Python<'py>) -> Self {
        Self {
            py,
            dict: PyDict::new(py),
        }
    }

    /// A table's builder with its first columns: each row's series and policy.
    fn keyed(py: Python<'py>, series: Vec<u32>, policy: Vec<u32>) -> PyResult<Self> {
        let columns = Self::new(py);
        columns.num("series", series)?;
        columns.num("policy", policy)?;
        Ok(columns)
    }

    fn num<T: numpy::Element + ColumnElement>(&self, name: &str, values: Vec<T>) -> PyResult<()> {
        self.dict.set_item(name, pooled_array(self.py, values)?)
    }

    fn text(&self, name: &str, values: Vec<Option<String>>) -> PyResult<()> {
        self.dict.set_item(name, PyList::new(self.py, values)?)
    }
}

/// The table of one kind of (a, b, c) rows of every job: `series`, `policy`, then `names`,
/// each column built in one pass.
fn three_columns<'py, A, B, C>(
    py: Python<'py>,
    jobs: &[JobOutput],
    rows_of: impl Fn(&JobOutput) -> &Vec<(A, B, C)>,
    names: [&str; 3],
) -> PyResult<Bound<'py, PyDict>>
where
    A: numpy::Element + ColumnElement,
    B: numpy::Element + ColumnElement,
    C: numpy::Element + ColumnElement,
{
    let rows: usize = jobs.iter().map(|j| rows_of(j).len()).sum();
    let (mut ser, mut pol) = (backtest::take_column(rows), backtest::take_column(rows));
    let (mut a, mut b, mut c) = (
        backtest::take_column(rows),
        backtest::take_column(rows),
        backtest::take_column(rows),
    );
    for job in jobs {
        for &(x, y, z) in rows_of(job) {
            ser.push(job.series);
            pol.push(job.policy);
            a.push(x);
            b.push(y);
            c.push(z);
        }
    }
    let cols = Columns::new(py);
    cols.num("series", ser)?;
    cols.num("policy", pol)?;
    cols.num(names[0], a)?;
    cols.num(names[1], b)?;
    cols.num(names[2], c)?;
    Ok(cols.dict)
}

/// One result column of every job's rows, job after job: `value` of each row.
fn column_of<T: ColumnElement, R>(parts: &[&[R]], value: impl Fn(&R) -> T) -> Vec<T> {
    let rows = parts.iter().map(|part| part.len()).sum();
    let mut column = backtest::take_column(rows);
    for part in parts {
        column.extend(part.iter().map(&value));
    }
    column
}

/// Appends the 16 bytes of each of `values` (at most `count`) to `column`, written in place:
/// `resize` would zero them first, and `extend_from_slice` checks the room at each value.
fn extend_16(column: &mut Vec<u8>, count: usize, values: impl Iterator<Item = [u8; 16]>) {
    column.reserve(count * 16);
    let start = column.spare_capacity_mut().as_mut_ptr().cast::<[u8; 16]>();
    let mut written = 0;
    for value in values.take(count) {
        #[allow(unsafe_code)]
        // SAFETY: `written < count`, and `reserve` made room for `count` more 16-byte
        // values past the length: the write stays inside the allocation (unaligned, as a
        // byte vector's memory may be).
        unsafe {
            start.add(written).write_unaligned(value);
        }
        written += 1;
    }
    #[allow(unsafe_code)]
    // SAFETY: the loop above initialized the `written * 16` bytes past the length, within
    // the capacity `reserve` made.
    unsafe {
        column.set_len(column.len() + written * 16);
    }
}

/// Exact column `k` of every job's amounts: 16-byte little-endian mantissas with 12
/// decimals; `None` when a value has more.
fn mantissas_of<const N: usize>(parts: &[&ExactRows<N>], k: usize) -> Option<Vec<u8>> {
    let rows: usize = parts.iter().map(|part| part.rows.len()).sum();
    let mut bytes = backtest::take_bytes(rows * 16);
    let mut complete = true;
    for part in parts {
        let scale = part.scales[k];
        let values = part.rows.iter().map(|row| {
            let mantissa = widened(row[k], scale);
            complete &= mantissa.is_some();
            mantissa.unwrap_or_default().to_le_bytes()
        });
        extend_16(&mut bytes, part.rows.len(), values);
    }
    if complete {
        Some(bytes)
    } else {
        backtest::give_bytes(bytes);
        None
    }
}

/// The amount columns of every job; exact ones are `None` when a job's are.
enum GatheredAmounts<const N: usize> {
    Floats([Vec<f64>; N]),
    Exact(Option<[Vec<u8>; N]>),
}

fn gather_amounts<'a, const N: usize>(
    parts: impl Iterator<Item = &'a Amounts<N>>,
) -> PyResult<GatheredAmounts<N>> {
    let parts: Vec<&Amounts<N>> = parts.collect();
    let floats: Vec<&[[f64; N]]> = parts
        .iter()
        .filter_map(|part| match part {
            Amounts::Floats(rows) => Some(rows.as_slice()),
            Amounts::Exact(_) => None,
        })
        .collect();
    if floats.len() == parts.len() {
        return Ok(GatheredAmounts::Floats(std::array::from_fn(|k| {
            column_of(&floats, |row| row[k])
        })));
    }
    if !floats.is_empty() {
        return Err(PyRuntimeError::new_err(
            "backtest: jobs returned amounts of two forms",
        ));
    }
    let mut exact: Vec<&ExactRows<N>> = Vec::with_capacity(parts.len());
    for part in parts {
        match part {
            Amounts::Exact(Some(rows)) => exact.push(rows),
            _ => return Ok(GatheredAmounts::Exact(None)),
        }
    }
    let columns: [Option<Vec<u8>>; N] = std::array::from_fn(|k| mantissas_of(&exact, k));
    if columns.iter().any(Option::is_none) {
        for bytes in columns.into_iter().flatten() {
            backtest::give_bytes(bytes);
        }
        return Ok(GatheredAmounts::Exact(None));
    }
    Ok(GatheredAmounts::Exact(Some(
        columns.map(Option::unwrap_or_default),
    )))
}

/// Six exact text columns of every job's rows (detail), `texts` giving a row's six.
fn text_columns<R>(
    jobs: &[JobOutput],
    symbol_rules: &[&SymbolRules],
    rows_of: impl Fn(&JobOutput) -> &[R],
    texts: impl Fn(&SymbolRules, &R) -> [Option<String>; 6],
) -> [Vec<Option<String>>; 6] {
    let mut columns: [Vec<Option<String>>; 6] = Default::default();
    for job in jobs {
        let sr = symbol_rules[job.series as usize];
        for row in rows_of(job) {
            for (column, text) in columns.iter_mut().zip(texts(sr, row)) {
                column.push(text);
            }
        }
    }
    columns
}

/// The exact text columns of the fills (detail): price, quantity, fee, `PnL`, trigger and
/// mark price (a fill is at the mark that triggered it: see the fill model).
fn fill_texts(jobs: &[JobOutput], symbol_rules: &[&SymbolRules]) -> [Vec<Option<String>>; 6] {
    text_columns(
        jobs,
        symbol_rules,
        |job| &job.fills,
        |sr, f| {
            [
                Some(sr.format_price(f.price)),
                Some(sr.format_qty(f.quantity, true)),
                Some(exact(f.fee)),
                Some(exact(f.pnl)),
                f.trigger.map(|t| sr.format_price(t)),
                Some(sr.format_price(f.price)),
            ]
        },
    )
}

/// The exact text columns of the trades (detail): entry price, quantity, initial stop,
/// risk price, `PnL` and fees.
fn trade_texts(jobs: &[JobOutput], symbol_rules: &[&SymbolRules]) -> [Vec<Option<String>>; 6] {
    text_columns(
        jobs,
        symbol_rules,
        |job| &job.trades,
        |sr, t| {
            [
                Some(sr.format_price(t.entry_price)),
                Some(sr.format_qty(t.quantity, true)),
                Some(sr.format_price(t.initial_stop)),
                Some(exact(t.risk_price)),
                Some(exact(t.pnl)),
                Some(exact(t.fees)),
            ]
        },
    )
}

#[allow(clippy::too_many_lines)]
fn outputs<'py>(
    py: Python<'py>,
    jobs: &[JobOutput],
    series: &[SeriesInput<'_>],
    rules: &ExchangeRules,
    detail: bool,
    as_tables: bool,
) -> PyResult<Bound<'py, PyDict>> {
    let result = PyDict::new(py);
    result.set_item("reason_names", PyList::new(py, REASONS)?)?;
    result.set_item(
        "evaluations",
        jobs.iter().map(|j| j.evaluations).sum::<u64>(),
    )?;
    // Of those, the bar x position steps settled without the state machine (a count for
    // profiling and for the tests that prove the shortcut changes nothing).
    result.set_item("quiet_bars", jobs.iter().map(|j| j.quiet_bars).sum::<u64>())?;
    // Jobs replayed the decimal way (`exhaustive`, or beyond what the integers hold).
    result.set_item("decimal_jobs", jobs.iter().filter(|j| j.decimal).count())?;
    let symbol_rules: Vec<_> = series
        .iter()
        .map(|s| rules.symbol(&s.symbol))
        .collect::<Result<_, _>>()?;
    let names: Vec<&str> = series.iter().map(|s| s.symbol.as_str()).collect();
    let text = TextViews::new(&names);
    // The reason code of an entry fill: its kind is `entry`, every other fill's `exit`.
    let entry = REASONS
        .iter()
        .position(|&reason| reason == "entry")
        .and_then(|code| u8::try_from(code).ok());

    // Every job holds its fills and trades in the values of their columns (the binding
    // asks for them); with detail its rows too, for the exact text columns.
    let mut columns: Vec<&ResultColumns> = Vec::with_capacity(jobs.len());
    let mut keys: Vec<(u32, u32, usize, usize)> = Vec::with_capacity(jobs.len());
    for job in jobs {
        let Some(job_columns) = job.columns.as_ref() else {
            return Err(PyRuntimeError::new_err(
                "backtest: a job returned without result columns",
            ));
        };
        keys.push((
            job.series,
            job.policy,
            job_columns.fills.len(),
            job_columns.trades.len(),
        ));
        columns.push(job_columns);
    }
    let key_columns = |rows_of: fn(&(u32, u32, usize, usize)) -> usize| {
        let rows: usize = keys.iter().map(rows_of).sum();
        let (mut ser, mut pol) = (backtest::take_column(rows), backtest::take_column(rows));
        for key in &keys {
            ser.extend(std::iter::repeat_n(key.0, rows_of(key)));
            pol.extend(std::iter::repeat_n(key.1, rows_of(key)));
        }
        (ser, pol)
    };
    let symbol_views = |rows_of: fn(&(u32, u32, usize, usize)) -> usize| {
        let rows: usize = keys.iter().map(rows_of).sum();
        let mut views = TextViews::column(rows);
        for key in &keys {
            repeat_view(&mut views, text.symbols[key.0 as usize], rows_of(key));
        }
        views
    };

    // fills
    let (ser, pol) = key_columns(|k| k.2);
    let records: Vec<&[FillRecord]> = columns.iter().map(|c| c.fills.records.as_slice()).collect();
    let trade = column_of(&records, |r| r.trade);
    let seq = column_of(&records, |r| r.sequence);
    let reason = column_of(&records, |r| r.reason);
    let time = column_of(&records, |r| r.time_ms);
    let side = column_of(&records, |r| r.side);
    let r_move = column_of(&records, |r| r.r);
    let fill_amounts = gather_amounts(columns.iter().map(|c| &c.fills.amounts))?;
    // With the mantissas the fills and trades come as Arrow tables in their final columns
    // (None when a value had no mantissa: the caller asks for the decimal text).
    let mut fills_table = None;
    if as_tables {
        if let GatheredAmounts::Exact(Some([price, quantity, fee, pnl])) = fill_amounts {
            // The reason and kind views from the reason codes: two tight loops of stores.
            let (mut reason_text, mut kind) = (
                TextViews::column(reason.len()),
                TextViews::column(reason.len()),
            );
            look_up_views(&mut reason_text, &reason, |code| {
                text.reasons[usize::from(code)]
            });
            look_up_views(&mut kind, &reason, |code| {
                text.kinds[usize::from(Some(code) != entry)]
            });
            let time = pooled_values(time);
            let mut table = TableBuilder::new();
            text.add_to(&mut table, "symbol", symbol_views(|k| k.2));
            table.primitive::<UInt32Type>("trade", pooled_values(trade));
            table.primitive::<UInt32Type>("sequence", pooled_values(seq));
            text.add_to(&mut table, "kind", kind);
            text.add_to(&mut table, "reason", reason_text);
            table.utc_ms("time", time.clone());
            table.primitive::<Int8Type>("side", pooled_values(side));
            for (name, mantissas) in [
                ("price", price),
                ("quantity", quantity),
                ("fee", fee),
                ("pnl", pnl),
            ] {
                table
                    .decimal(name, mantissas, EXACT_SCALE)
                    .map_err(table_error)?;
            }
            table.primitive::<Float64Type>("r", pooled_values(r_move));
            table.primitive::<Int64Type>("time_ms", time);
            fills_table = Some(finish_keyed(table, ser, pol)?);
            backtest::give_column(reason); // read for the views only
        }
    } else if let GatheredAmounts::Floats([price, qty, fee, pnl]) = fill_amounts {
        let fills = Columns::keyed(py, ser, pol)?;
        fills.num("trade", trade)?;
        fills.num("sequence", seq)?;
        fills.num("reason_code", reason)?;
        fills.num("time_ms", time)?;
        fills.num("side", side)?;
        fills.num("price", price)?;
        fills.num("quantity", qty)?;
        fills.num("fee", fee)?;
        fills.num("pnl", pnl)?;
        fills.num("r", r_move)?;
        if detail {
            let names = [
                "price_exact",
                "quantity_exact",
                "fee_exact",
                "pnl_exact",
                "trigger_price_exact",
                "mark_price_exact",
            ];
            for (name, values) in names.into_iter().zip(fill_texts(jobs, &symbol_rules)) {
                fills.text(name, values)?;
            }
        }
        result.set_item("fills", fills.dict)?;
    }

    // trades
    let (ser, pol) = key_columns(|k| k.3);
    let records: Vec<&[TradeRecord]> = columns
        .iter()
        .map(|c| c.trades.records.as_slice())
        .collect();
    let trade = column_of(&records, |r| r.trade);
    let side = column_of(&records, |r| r.side);
    let entry_time = column_of(&records, |r| r.entry_time_ms);
    let exit_time = column_of(&records, |r| r.exit_time_ms);
    let risk_usd = column_of(&records, |r| r.risk_usd);
    let r_multiple = column_of(&records, |r| r.r_multiple);
    let confidence = column_of(&records, |r| r.confidence);
    let reason = column_of(&records, |r| r.reason);
    let bars_held = column_of(&records, |r| r.bars_held);
    let trade_amounts = gather_amounts(columns.iter().map(|c| &c.trades.amounts))?;
    let mut trades_table = None;
    if as_tables {
        if let GatheredAmounts::Exact(Some(
            [entry_price, quantity, initial_stop, risk_price, pnl, fees],
        )) = trade_amounts
        {
            let mut reason_text = TextViews::column(reason.len());
            look_up_views(&mut reason_text, &reason, |code| {
                text.reasons[usize::from(code)]
            });
            let (entry_time, exit_time) = (pooled_values(entry_time), pooled_values(exit_time));
            let mut table = TableBuilder::new();
            text.add_to(&mut table, "symbol", symbol_views(|k| k.3));
            table.primitive::<UInt32Type>("trade", pooled_values(trade));
            table.primitive::<Int8Type>("side", pooled_values(side));
            table.utc_ms("entry_time", entry_time.clone());
            table.utc_ms("exit_time", exit_time.clone());
            for (name, mantissas) in [
                ("entry_price", entry_price),
                ("quantity", quantity),
                ("initial_stop", initial_stop),
                ("risk_price", risk_price),
            ] {
                table
                    .decimal(name, mantissas, EXACT_SCALE)
                    .map_err(table_error)?;
            }
            table.primitive::<Float64Type>("risk_usd", pooled_values(risk_usd));
            table
                .decimal("pnl", pnl, EXACT_SCALE)
                .map_err(table_error)?;
            table
                .decimal("fees", fees, EXACT_SCALE)
                .map_err(table_error)?;
            table.primitive::<Float64Type>("r_multiple", pooled_values(r_multiple));
            text.add_to(&mut table, "reason", reason_text);
            table.primitive::<UInt32Type>("bars_held", pooled_values(bars_held));
            table.primitive::<Float64Type>("confidence", pooled_values(confidence));
            table.primitive::<Int64Type>("entry_time_ms", entry_time);
            table.primitive::<Int64Type>("exit_time_ms", exit_time);
            trades_table = Some(finish_keyed(table, ser, pol)?);
            backtest::give_column(reason); // read for the views only
        }
    } else if let GatheredAmounts::Floats([entry_price, qty, initial_stop, risk_price, pnl, fees]) =
        trade_amounts
    {
        let cols = Columns::keyed(py, ser, pol)?;
        cols.num("trade", trade)?;
        cols.num("side", side)?;
        cols.num("entry_time_ms", entry_time)?;
        cols.num("exit_time_ms", exit_time)?;
        cols.num("entry_price", entry_price)?;
        cols.num("quantity", qty)?;
        cols.num("initial_stop", initial_stop)?;
        cols.num("risk_price", risk_price)?;
        cols.num("pnl", pnl)?;
        cols.num("fees", fees)?;
        cols.num("risk_usd", risk_usd)?;
        cols.num("r_multiple", r_multiple)?;
        cols.num("confidence", confidence)?;
        cols.num("reason_code", reason)?;
        cols.num("bars_held", bars_held)?;
        if detail {
            let names = [
                "entry_price_exact",
                "quantity_exact",
                "initial_stop_exact",
                "risk_price_exact",
                "pnl_exact",
                "fees_exact",
            ];
            for (name, values) in names.into_iter().zip(trade_texts(jobs, &symbol_rules)) {
                cols.text(name, values)?;
            }
        }
        result.set_item("trades", cols.dict)?;
    }
    if as_tables {
        let tables = match (fills_table, trades_table) {
            (Some(fills), Some(trades)) => {
                let tables = PyDict::new(py);
                tables.set_item("fills", Bound::new(py, fills)?)?;
                tables.set_item("trades", Bound::new(py, trades)?)?;
                tables.set_item("skipped", Bound::new(py, skipped_table(jobs, &text)?)?)?;
                Some(tables)
            }
            _ => None,
        };
        result.set_item("tables", tables)?;
    }

    // stops, levels, skipped: (series, policy) then the row's own three fields
    result.set_item(
        "stops",
        three_columns(py, jobs, |j| &j.stops, ["trade", "time_ms", "stop"])?,
    )?;
    result.set_item(
        "levels",
        three_columns(py, jobs, |j| &j.levels, ["trade", "level", "price"])?,
    )?;
    result.set_item(
        "skipped",
        three_columns(
            py,
            jobs,
            |j| &j.skipped,
            ["time_ms", "reason_code", "count"],
        )?,
    )?;
    Ok(result)
}

/// Runs the backtest of every series under every policy; see `pyquant.backtest`.
#[pyfunction]
#[pyo3(
    name = "backtest_run",
    signature = (series, policies, rules, *, maker_fee, taker_fee, entry_liquidity, notional,
                 leverage, intrabar, max_gap_bars, one_position_per_symbol, detail,
                 exhaustive=false, exact=false)
)]
#[allow(
    clippy::too_many_arguments,
    clippy::needless_pass_by_value,
    clippy::fn_params_excessive_bools // keyword switches of the Python call
)]
fn py_backtest_run<'py>(
    py: Python<'py>,
    series: Vec<Bound<'py, PyDict>>,
    policies: Vec<PyRef<'py, PyExitPolicy>>,
    rules: PyRef<'py, PyExchangeRules>,
    maker_fee: &str,
    taker_fee: &str,
    entry_liquidity: &str,
    notional: &str,
    leverage: u32,
    intrabar: &str,
    max_gap_bars: u32,
    one_position_per_symbol: bool,
    detail: bool,
    exhaustive: bool,
    exact: bool,
) -> PyResult<Bound<'py, PyDict>> {
    let entry_maker = match entry_liquidity {
        "taker" => false,
        "maker" => true,
        other => {
            return Err(
                CoreError::invalid("entry_liquidity", other, "must be taker or maker").into(),
            )
        }
    };
    let options = BacktestOptions {
        maker_fee: parse_fee("maker_fee", maker_fee)?,
        taker_fee: parse_fee("taker_fee", taker_fee)?,
        entry_maker,
        notional: parse_bounded("notional", notional, MAX_NOTIONAL)?,
        leverage,
        intrabar: Intrabar::parse(intrabar)?,
        max_gap_bars,
        one_position_per_symbol,
        detail,
        exhaustive,
        columns: Some(if exact {
            ColumnForm::Exact
        } else {
            ColumnForm::Floats
        }),
    };
    let mut arrays: Vec<SeriesArrays<'_>> =
        series.iter().map(series_arrays).collect::<PyResult<_>>()?;
    let inputs: Vec<SeriesInput<'_>> = arrays.iter_mut().map(SeriesArrays::input).collect();
    let policies: Vec<ExitPolicy> = policies.iter().map(|p| p.inner.clone()).collect();
    let shared = rules.shared();
    drop(rules);
    let jobs = py.detach(|| backtest::run(&inputs, &policies, &shared, &options))?;
    let result = outputs(py, &jobs, &inputs, &shared, detail, exact);
    backtest::recycle(jobs);
    result
}

/// One chunk of an Arrow `string_view` column, read in place, GIL released: the rows'
/// 16-byte views, the data buffers of the strings longer than 12 bytes and the validity
/// bits (None: no null).
struct StringViews<'a> {
    views: &'a [u8],
    data: Vec<&'a [u8]>,
    /// The validity bytes and the bit of the first row in them.
    validity: Option<(&'a [u8], usize)>,
}

/// The longest string a view holds inline (Arrow's `string_view` layout).
const INLINE: usize = 12;

/// The 16 bytes of a view as one number: equal views are equal strings (the same inline
/// bytes, or the same bytes of the same buffer); unequal views may still be equal strings.
#[inline]
fn view_word(bytes: &[u8]) -> u128 {
    let mut word = [0u8; 16];
    word.copy_from_slice(bytes);
    u128::from_le_bytes(word)
}

impl<'a> StringViews<'a> {
    /// The views of `column`, which must be a `string_view` array.
    fn of(field: &str, column: &'a ArrayRef) -> Result<Self, CoreError> {
        let array = column.as_string_view_opt().ok_or_else(|| {
            CoreError::invalid(
                field,
                column.data_type().to_string(),
                "must be a string column (Arrow string_view)",
            )
        })?;
        Ok(Self {
            views: array.views().inner().as_slice(),
            data: array.data_buffers().iter().map(Buffer::as_slice).collect(),
            validity: array
                .nulls()
                .map(|nulls| (nulls.validity(), nulls.offset())),
        })
    }

    #[inline]
    fn is_null(&self, row: usize) -> bool {
        self.validity.is_some_and(|(bits, first)| {
            let at = first + row;
            bits[at / 8] >> (at % 8) & 1 == 0
        })
    }

    /// The row's bytes (a null row reads as its view's, empty in pyarrow's layout).
    fn bytes(&self, row: usize) -> Result<&'a [u8], CoreError> {
        let view = &self.views[row * 16..row * 16 + 16];
        let word = |k: usize| u32::from_le_bytes([view[k], view[k + 1], view[k + 2], view[k + 3]]);
        let length = word(0) as usize;
        if length <= INLINE {
            return Ok(&view[4..4 + length]);
        }
        let (buffer, start) = (word(8) as usize, word(12) as usize);
        self.data
            .get(buffer)
            .and_then(|data| data.get(start..start + length))
            .ok_or_else(|| {
                CoreError::invalid(
                    "string view",
                    format!("buffer {buffer} bytes {start}..{}", start + length),
                    "points outside the data buffers",
                )
            })
    }
}

/// The view of an inline string (`text` of at most 12 bytes), zero-padded.
fn inline_view(text: &[u8]) -> u128 {
    let mut bytes = [0u8; 16];
    bytes[..4].copy_from_slice(&(text.len() as u32).to_le_bytes());
    bytes[4..4 + text.len()].copy_from_slice(text);
    u128::from_le_bytes(bytes)
}

/// One chunk of the entries: its side and symbol strings and its times.
struct EntryChunk<'a> {
    side: StringViews<'a>,
    symbol: StringViews<'a>,
    time_ms: &'a [i64],
}

/// What `entry_keys` found: each entry's side as 1 (BUY), -1 (SELL) or 0 (neither, or null);
/// the first row of a symbol with bars whose side is 0; the runs of one symbol as (series
/// index, or -1 for a symbol without bars or a null one; first row; end row); and whether
/// every run is in time order.
struct EntryKeys {
    /// The codes' bytes (an `i8` each), from the backtest's buffer pool.
    side: Vec<u8>,
    bad_side: Option<usize>,
    runs: Vec<(i64, usize, usize)>,
    runs_in_time_order: bool,
}

/// The sides of one chunk, appended to `codes`: a branchless compare of each view with BUY's
/// and SELL's, the bytes read only when some row matches neither (a bad value, or a view
/// with other padding).
fn side_codes(side: &StringViews<'_>, rows: usize, codes: &mut Vec<u8>) -> Result<(), CoreError> {
    // BUY and SELL are at most 4 bytes: a view's first 8 bytes (length, then the first 4
    // bytes of the string) hold all of them, so those alone decide.
    let low = |text: &[u8]| inline_view(text) as u64;
    let (buy, sell) = (low(b"BUY"), low(b"SELL"));
    let first = codes.len();
    codes.extend(side.views.chunks_exact(16).take(rows).map(|view| {
        let word = u64::from_le_bytes([
            view[0], view[1], view[2], view[3], view[4], view[5], view[6], view[7],
        ]);
        (i8::from(word == buy) - i8::from(word == sell)) as u8
    }));
    let chunk = &mut codes[first..];
    if chunk.contains(&0) {
        for (row, code) in chunk.iter_mut().enumerate() {
            if *code == 0 {
                *code = match side.bytes(row)? {
                    b"BUY" => 1,
                    b"SELL" => -1i8 as u8,
                    _ => 0,
                };
            }
        }
    }
    if side.validity.is_some() {
        for (row, code) in chunk.iter_mut().enumerate() {
            if side.is_null(row) {
                *code = 0;
            }
        }
    }
    Ok(())
}

/// Rows compared at once by [`view_runs`].
const RUN_BLOCK: usize = 16;

/// The runs of equal views of one chunk's symbols as (first row, end row), split further
/// where a row turns null or not (a null's view may look like an empty string's).
fn view_runs(symbol: &StringViews<'_>, rows: usize) -> Vec<(usize, usize)> {
    let views = &symbol.views[..rows * 16];
    let mut runs = Vec::new();
    let mut start = 0;
    while start < rows {
        let view = view_word(&views[start * 16..start * 16 + 16]);
        let null = symbol.is_null(start);
        let mut end = start + 1;
        // Whole blocks of equal views first, compared without a branch per row (a run
        // is usually a symbol's every intent); the row where the run ends is found in
        // the block that holds it.
        while end + RUN_BLOCK <= rows
            && views[end * 16..(end + RUN_BLOCK) * 16]
                .chunks_exact(16)
                .fold(true, |same, other| same & (view_word(other) == view))
        {
            end += RUN_BLOCK;
        }
        while end < rows && view_word(&views[end * 16..end * 16 + 16]) == view {
            end += 1;
        }
        if symbol.validity.is_some() {
            end = (start + 1..end)
                .find(|&row| symbol.is_null(row) != null)
                .unwrap_or(end);
        }
        runs.push((start, end));
        start = end;
    }
    runs
}

/// One pass over the entries' side and symbol columns, chunk by chunk: the runs of equal
/// symbol views found first (the bytes compared only where two runs meet), a symbol looked
/// up once per run, and the time order checked inside each run.
// `|` on booleans on purpose: a lazy `||` is an early exit, which stops the vectorizing.
#[allow(clippy::needless_bitwise_bool)]
fn entry_keys(chunks: &[EntryChunk<'_>], symbols: &[String]) -> Result<EntryKeys, CoreError> {
    let rows: usize = chunks.iter().map(|c| c.time_ms.len()).sum();
    // From the pool: a fresh megabyte per million entries cost more in page faults than
    // the pass that fills it.
    let mut codes = backtest::take_bytes(rows);
    let index: std::collections::HashMap<&[u8], i64> = symbols
        .iter()
        .zip(0..)
        .map(|(name, i)| (name.as_bytes(), i))
        .collect();
    // The runs of one symbol over all chunks: (series, first row, end row), and the symbol
    // (None: null) and time of the last row seen.
    let mut runs: Vec<(i64, usize, usize)> = Vec::new();
    let mut last: Option<(Option<&[u8]>, i64)> = None;
    let mut in_order = true;
    let mut base = 0;
    for chunk in chunks {
        let count = chunk.time_ms.len();
        side_codes(&chunk.side, count, &mut codes)?;
        for (start, end) in view_runs(&chunk.symbol, count) {
            let name = if chunk.symbol.is_null(start) {
                None
            } else {
                Some(chunk.symbol.bytes(start)?)
            };
            let times = &chunk.time_ms[start..end];
            // A fold without an early exit: the compiler vectorizes it.
            in_order &= !times
                .windows(2)
                .fold(false, |unordered, pair| unordered | (pair[1] < pair[0]));
            match (last, runs.last_mut()) {
                (Some((previous, time)), Some(run)) if previous == name => {
                    in_order &= time <= times[0];
                    run.2 = base + end;
                }
                _ => {
                    let series = name.and_then(|n| index.get(n).copied()).unwrap_or(-1);
                    runs.push((series, base + start, base + end));
                }
            }
            last = Some((name, times[times.len() - 1]));
        }
        base += count;
    }
    // Entries of a symbol without bars are left out, whatever their side.
    let bad_side =
        runs.iter()
            .filter(|&&(series, _, _)| series >= 0)
            .find_map(|&(_, start, stop)| {
                let run = &codes[start..stop];
                // `contains` on bytes is a vectorized search; the row is sought only when
                // some code is 0.
                run.contains(&0)
                    .then(|| run.iter().position(|&code| code == 0))
                    .flatten()
                    .map(|k| start + k)
            });
    Ok(EntryKeys {
        side: codes,
        bad_side,
        runs,
        runs_in_time_order: in_order,
    })
}

/// The rows where a chunk of `columns` starts, and the end: each column's chunk bounds, all
/// together (the pieces every column can be cut into without a copy).
fn common_bounds(columns: &[&[ArrayRef]]) -> Vec<usize> {
    let mut bounds: Vec<usize> = columns
        .iter()
        .flat_map(|chunks| {
            chunks.iter().scan(0, |start, chunk| {
                *start += chunk.len();
                Some(*start)
            })
        })
        .collect();
    bounds.push(0);
    bounds.sort_unstable();
    bounds.dedup();
    bounds
}

/// Rows `start..end` of a column cut into `chunks` (inside one chunk: a view, no copy).
fn rows_of(chunks: &[ArrayRef], start: usize, end: usize) -> ArrayRef {
    let mut first = 0;
    for chunk in chunks {
        if start < first + chunk.len() {
            return chunk.slice(start - first, end - start);
        }
        first += chunk.len();
    }
    chunks[0].slice(0, 0)
}

/// The entries' key columns as pieces of the same rows, each piece of each column inside
/// one of its chunks: (side, symbol, time) per piece.
fn entry_pieces(
    side: &[ArrayRef],
    symbol: &[ArrayRef],
    time_ms: &[ArrayRef],
) -> Result<Vec<[ArrayRef; 3]>, CoreError> {
    let rows = |chunks: &[ArrayRef]| chunks.iter().map(Array::len).sum::<usize>();
    if rows(side) != rows(time_ms) || rows(symbol) != rows(time_ms) {
        return Err(CoreError::invalid(
            "entries",
            format!(
                "{}, {} and {} rows",
                rows(side),
                rows(symbol),
                rows(time_ms)
            ),
            "side, symbol and time_ms must have as many rows",
        ));
    }
    let columns = [side, symbol, time_ms];
    let bounds = common_bounds(&columns);
    Ok(bounds
        .windows(2)
        .map(|piece| columns.map(|chunks| rows_of(chunks, piece[0], piece[1])))
        .collect())
}

/// The key columns of each piece, read in place.
fn entry_chunks(pieces: &[[ArrayRef; 3]]) -> Result<Vec<EntryChunk<'_>>, CoreError> {
    pieces
        .iter()
        .map(|[side, symbol, time]| {
            let time_ms = time.as_primitive_opt::<Int64Type>().ok_or_else(|| {
                CoreError::invalid("time_ms", time.data_type().to_string(), "must be int64")
            })?;
            Ok(EntryChunk {
                side: StringViews::of("side", side)?,
                symbol: StringViews::of("symbol", symbol)?,
                time_ms: time_ms.values(),
            })
        })
        .collect()
}

/// Reads the entries' side, symbol and time columns (polars series, read in place chunk by
/// chunk) in one pass; see `pyquant.backtest.running`.
#[pyfunction]
#[pyo3(name = "backtest_entry_keys")]
#[allow(clippy::needless_pass_by_value, clippy::type_complexity)]
fn py_backtest_entry_keys<'py>(
    py: Python<'py>,
    side: &Bound<'py, PyAny>,
    symbol: &Bound<'py, PyAny>,
    time_ms: &Bound<'py, PyAny>,
    symbols: Vec<String>,
) -> PyResult<(
    Bound<'py, PooledBytes>,
    Option<usize>,
    Vec<(i64, usize, usize)>,
    bool,
)> {
    let pieces = entry_pieces(
        &read_chunks(side)?,
        &read_chunks(symbol)?,
        &read_chunks(time_ms)?,
    )?;
    let chunks = entry_chunks(&pieces)?;
    let keys = py.detach(|| entry_keys(&chunks, &symbols))?;
    Ok((
        Bound::new(
            py,
            PooledBytes {
                bytes: PooledColumn(keys.side),
            },
        )?,
        keys.bad_side,
        keys.runs,
        keys.runs_in_time_order,
    ))
}

/// Replays one position over a mark path with the backtest's driver; see
/// `pyquant.backtest.exit_decisions_for_path`.
#[pyfunction]
#[pyo3(
    name = "backtest_replay_marks",
    signature = (rules, policy, symbol, side, quantity, entry_price, times, marks, atr=None,
                 leverage=1, confidence=None, opened_at_ms=0)
)]
#[allow(clippy::too_many_arguments, clippy::needless_pass_by_value)]
fn py_backtest_replay_marks<'py>(
    py: Python<'py>,
    rules: PyRef<'py, PyExchangeRules>,
    policy: PyRef<'py, PyExitPolicy>,
    symbol: &str,
    side: &str,
    quantity: &str,
    entry_price: &str,
    times: Vec<i64>,
    marks: Vec<String>,
    atr: Option<f64>,
    leverage: u32,
    confidence: Option<f64>,
    opened_at_ms: i64,
) -> PyResult<Bound<'py, PyList>> {
    let direction = match side {
        "LONG" => Direction::Long,
        "SHORT" => Direction::Short,
        other => return Err(CoreError::invalid("side", other, "must be LONG or SHORT").into()),
    };
    if times.len() != marks.len() {
        return Err(PyValueError::new_err(format!(
            "times has {} values but marks has {}",
            times.len(),
            marks.len()
        )));
    }
    let path: Vec<(i64, Decimal)> = times
        .iter()
        .zip(&marks)
        .map(|(&t, m)| parse_decimal("mark", m).map(|d| (t, d)))
        .collect::<Result<_, _>>()?;
    let decisions = backtest::replay_marks(
        rules.rules(),
        &policy.inner,
        symbol,
        direction,
        parse_decimal("quantity", quantity)?,
        parse_decimal("entry_price", entry_price)?,
        &path,
        atr,
        leverage,
        confidence,
        opened_at_ms,
    )?;
    let sr = rules.rules().symbol(symbol)?;
    let closing_side = match direction {
        Direction::Long => "SELL",
        Direction::Short => "BUY",
    };
    let list = PyList::empty(py);
    for d in decisions {
        let item = PyDict::new(py);
        item.set_item("time_ms", d.time_ms.to_string())?;
        item.set_item("reason", d.reason)?;
        item.set_item("side", closing_side)?;
        item.set_item("quantity", sr.format_qty(d.quantity, true))?;
        item.set_item("trigger_price", d.trigger.map(|t| sr.format_price(t)))?;
        item.set_item("mark_price", sr.format_price(d.mark))?;
        item.set_item("sequence", d.sequence.to_string())?;
        list.append(item)?;
    }
    Ok(list)
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PooledBytes>()?;
    m.add_class::<ArrowTable>()?;
    m.add_function(wrap_pyfunction!(py_backtest_run, m)?)?;
    m.add_function(wrap_pyfunction!(py_backtest_entry_keys, m)?)?;
    m.add_function(wrap_pyfunction!(py_backtest_replay_marks, m)?)?;
    Ok(())
}
