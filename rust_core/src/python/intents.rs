//! `scan_plain_intents`: the plain lines of an intents JSONL file as a table Python reads.

use numpy::IntoPyArray;
use pyo3::prelude::*;
use pyo3::types::PyBytes;

use crate::intents::scan_plain_intents;

/// Cut the plain lines of an intents file into fields (GIL released).
///
/// Returns `(table, other_lines, lines)`: the tab-separated fields of every plain line
/// (its 0-based number first, `\x01` for a missing or null field), the 0-based numbers of
/// the other lines as an int64 array, and the number of lines.
#[pyfunction]
#[pyo3(name = "scan_plain_intents")]
fn py_scan_plain_intents<'py>(
    py: Python<'py>,
    data: &[u8],
) -> (Bound<'py, PyBytes>, Bound<'py, PyAny>, u64) {
    let found = py.detach(|| scan_plain_intents(data));
    (
        PyBytes::new(py, &found.table),
        found.other_lines.into_pyarray(py).into_any(),
        found.lines,
    )
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(py_scan_plain_intents, m)?)?;
    Ok(())
}
