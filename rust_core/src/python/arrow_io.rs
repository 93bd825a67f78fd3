//! Arrow data between Python and the core, through the Arrow `PyCapsule` interface
//! (`__arrow_c_stream__`), without a copy either way.
//!
//! In: a polars column's chunks ([`read_chunks`]), read in place (the entries' key
//! columns, where handing each chunk's buffers over from Python cost more than reading
//! them). Out: the backtest's result tables ([`TableBuilder`], [`ArrowTable`]), whose
//! columns (numeric vectors, `decimal128` mantissas, `string_view` views) become Arrow
//! arrays as they are; `polars.DataFrame(table)` imports every column in one call, where
//! wrapping each column from Python cost more than a small table's rows.

use std::ptr::NonNull;
use std::sync::Arc;

use arrow_array::ffi::{from_ffi_and_data_type, FFI_ArrowArray, FFI_ArrowSchema};
use arrow_array::ffi_stream::FFI_ArrowArrayStream;
use arrow_array::types::ArrowPrimitiveType;
use arrow_array::{
    make_array, ArrayRef, Decimal128Array, PrimitiveArray, RecordBatch, RecordBatchIterator,
    StringViewArray, TimestampMillisecondArray,
};
use arrow_buffer::{ArrowNativeType, Buffer, ScalarBuffer};
use arrow_schema::{ArrowError, DataType, Field, Schema};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyCapsule;

use crate::backtest::{self, ColumnElement, PooledColumn};

/// A result column's vector as an Arrow buffer without a copy: the vector goes back to its
/// pool when Arrow drops its last reference, so the next run writes into pages it already
/// has instead of faulting in new ones.
fn pooled_buffer<T: ColumnElement>(values: Vec<T>) -> Buffer {
    let bytes = values.len() * std::mem::size_of::<T>();
    let owner = Arc::new(PooledColumn(values));
    let start = NonNull::new(owner.0.as_ptr().cast_mut()).unwrap_or(NonNull::dangling());
    #[allow(unsafe_code)]
    // SAFETY: `start` points to `bytes` initialized bytes (aligned for `T`: a `Vec`'s
    // memory, or a dangling aligned pointer for none) owned by `owner`, which the buffer
    // keeps alive and which nothing writes again.
    unsafe {
        Buffer::from_custom_allocation(start.cast(), bytes, owner)
    }
}

/// A result column's values as an Arrow buffer (see [`pooled_buffer`]).
pub(super) fn pooled_values<T: ColumnElement + ArrowNativeType>(values: Vec<T>) -> ScalarBuffer<T> {
    let len = values.len();
    ScalarBuffer::new(pooled_buffer(values), 0, len)
}

/// The bytes as an Arrow buffer of 16-byte values (`decimal128` mantissas or string views):
/// the pooled memory itself when it is 16-byte aligned (what the allocator gives), else a
/// copy into Arrow's own aligned memory.
fn buffer16(bytes: Vec<u8>) -> Buffer {
    if bytes.as_ptr().align_offset(16) != 0 {
        let copy = Buffer::from(bytes.as_slice());
        backtest::give_bytes(bytes);
        return copy;
    }
    pooled_buffer(bytes)
}

/// The columns of one table, in order, and then the table.
pub(super) struct TableBuilder {
    fields: Vec<Field>,
    columns: Vec<ArrayRef>,
}

impl TableBuilder {
    pub(super) fn new() -> Self {
        Self {
            fields: Vec::new(),
            columns: Vec::new(),
        }
    }

    fn push(&mut self, name: &str, column: ArrayRef) {
        self.fields
            .push(Field::new(name, column.data_type().clone(), false));
        self.columns.push(column);
    }

    /// A numeric column (see [`pooled_values`]).
    pub(super) fn primitive<T: ArrowPrimitiveType>(
        &mut self,
        name: &str,
        values: ScalarBuffer<T::Native>,
    ) {
        self.push(name, Arc::new(PrimitiveArray::<T>::new(values, None)));
    }

    /// Milliseconds since the epoch as a UTC timestamp column.
    pub(super) fn utc_ms(&mut self, name: &str, values: ScalarBuffer<i64>) {
        self.push(
            name,
            Arc::new(TimestampMillisecondArray::new(values, None).with_timezone("UTC")),
        );
    }

    /// A `Decimal(38, scale)` column from its 16-byte little-endian mantissas.
    pub(super) fn decimal(
        &mut self,
        name: &str,
        mantissas: Vec<u8>,
        scale: u32,
    ) -> Result<(), ArrowError> {
        let rows = mantissas.len() / 16;
        let scale = i8::try_from(scale)
            .map_err(|_| ArrowError::InvalidArgumentError(format!("scale {scale}")))?;
        let values = ScalarBuffer::<i128>::new(buffer16(mantissas), 0, rows);
        let column = Decimal128Array::new(values, None).with_precision_and_scale(38, scale)?;
        self.push(name, Arc::new(column));
        Ok(())
    }

    /// A text column from its `string_view` views, whose strings longer than 12 bytes lie
    /// in `data` (buffer 0).
    ///
    /// # Safety
    /// Each view must be a valid Arrow view of a UTF-8 string: its length, then the string
    /// zero-padded when at most 12 bytes, else its first 4 bytes, buffer 0 and its offset
    /// into `data`.
    #[allow(unsafe_code)]
    pub(super) unsafe fn text(&mut self, name: &str, views: Vec<u8>, data: &Buffer) {
        let rows = views.len() / 16;
        let views = ScalarBuffer::<u128>::new(buffer16(views), 0, rows);
        // SAFETY: the caller's contract; checking each view again would read the column
        // once more for nothing.
        let column = unsafe { StringViewArray::new_unchecked(views, vec![data.clone()], None) };
        self.push(name, Arc::new(column));
    }

    pub(super) fn finish(self) -> Result<ArrowTable, ArrowError> {
        let schema = Arc::new(Schema::new(self.fields));
        Ok(ArrowTable {
            batch: RecordBatch::try_new(schema, self.columns)?,
        })
    }
}

/// One result table as an Arrow record batch: `polars.DataFrame(table)` (or
/// `pyarrow.table(table)`) reads it through the Arrow `PyCapsule` interface without a copy.
#[pyclass(frozen, module = "pyquant._core")]
pub struct ArrowTable {
    batch: RecordBatch,
}

#[pymethods]
impl ArrowTable {
    fn __len__(&self) -> usize {
        self.batch.num_rows()
    }

    /// The table as an `ArrowArrayStream` capsule of one record batch. A requested schema
    /// is not applied (the protocol lets a producer keep its own); the consumer casts.
    #[pyo3(signature = (requested_schema=None))]
    #[allow(clippy::needless_pass_by_value)] // the signature the protocol calls
    fn __arrow_c_stream__<'py>(
        &self,
        py: Python<'py>,
        requested_schema: Option<Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyCapsule>> {
        let _ = requested_schema;
        let reader = RecordBatchIterator::new([Ok(self.batch.clone())], self.batch.schema());
        let stream = FFI_ArrowArrayStream::new(Box::new(reader));
        PyCapsule::new_with_value(py, stream, c"arrow_array_stream")
    }
}

/// An Arrow error as a Python `ValueError` (a table the core could not assemble or read).
#[allow(clippy::needless_pass_by_value)] // the shape `map_err` takes
pub(super) fn table_error(error: ArrowError) -> PyErr {
    PyValueError::new_err(format!("arrow table: {error}"))
}

/// The chunks of a column: `source` is a polars `Series` (any object with
/// `__arrow_c_stream__` giving one array per chunk), its buffers shared, not copied. (A
/// polars `DataFrame`'s stream would join every chunk into one first: a copy.)
pub(super) fn read_chunks(source: &Bound<'_, PyAny>) -> PyResult<Vec<ArrayRef>> {
    let capsule = source
        .call_method0("__arrow_c_stream__")?
        .cast_into::<PyCapsule>()?;
    let raw = capsule.pointer_checked(Some(c"arrow_array_stream"))?;
    #[allow(unsafe_code)]
    // SAFETY: a capsule of that name holds an `ArrowArrayStream` (the PyCapsule interface);
    // `from_raw` moves it out and leaves a released one, so the capsule's destructor finds
    // nothing to release, and the moved stream is released when dropped here.
    let mut stream = unsafe { FFI_ArrowArrayStream::from_raw(raw.as_ptr().cast()) };
    let failed = |stream: &mut FFI_ArrowArrayStream, what: &str| {
        let reason = stream.get_last_error.map_or(String::new(), |last_error| {
            #[allow(unsafe_code)]
            // SAFETY: the stream is live; the message (when any) lives until its next call.
            unsafe {
                let text = last_error(stream);
                if text.is_null() {
                    String::new()
                } else {
                    std::ffi::CStr::from_ptr(text)
                        .to_string_lossy()
                        .into_owned()
                }
            }
        });
        PyValueError::new_err(format!("arrow stream: cannot read its {what}: {reason}"))
    };
    let (Some(get_schema), Some(get_next)) = (stream.get_schema, stream.get_next) else {
        return Err(PyValueError::new_err("arrow stream: already released"));
    };
    let mut schema = FFI_ArrowSchema::empty();
    #[allow(unsafe_code)]
    // SAFETY: the stream is live and `schema` a released one it may fill.
    if unsafe { get_schema(&raw mut stream, &raw mut schema) } != 0 {
        return Err(failed(&mut stream, "schema"));
    }
    let data_type = DataType::try_from(&schema).map_err(table_error)?;
    let mut chunks = Vec::new();
    loop {
        let mut array = FFI_ArrowArray::empty();
        #[allow(unsafe_code)]
        // SAFETY: as above; a released `array` after success means the end of the stream.
        if unsafe { get_next(&raw mut stream, &raw mut array) } != 0 {
            return Err(failed(&mut stream, "next chunk"));
        }
        if array.is_released() {
            return Ok(chunks);
        }
        #[allow(unsafe_code)]
        // SAFETY: the array was made by this stream, whose schema gave `data_type`.
        let data =
            unsafe { from_ffi_and_data_type(array, data_type.clone()) }.map_err(table_error)?;
        chunks.push(make_array(data));
    }
}
