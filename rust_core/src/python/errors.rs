//! The one place that decides which Python exception a `CoreError` becomes.
//!
//! The classes live in `pyquant/errors.py` and are imported with `import_exception!`, so
//! Python callers catch one hierarchy whichever side failed:
//! - `UnknownSymbol` -> `UnknownSymbolError` (a `KeyError`),
//! - `InvalidField`, `Snapshot` -> `InputError` (a `ValueError`),
//! - `Message` -> `MessageError` (a `ValueError`; engine state untouched),
//! - `Policy` -> `PolicyError` (a `ValueError`).

use pyo3::prelude::*;

use crate::error::CoreError;

pyo3::import_exception!(pyquant.errors, InputError);
pyo3::import_exception!(pyquant.errors, MessageError);
pyo3::import_exception!(pyquant.errors, PolicyError);
pyo3::import_exception!(pyquant.errors, UnknownSymbolError);

impl From<CoreError> for PyErr {
    fn from(err: CoreError) -> Self {
        let text = err.to_string();
        match err {
            CoreError::UnknownSymbol { .. } => UnknownSymbolError::new_err(text),
            CoreError::InvalidField { .. } | CoreError::Snapshot { .. } => {
                InputError::new_err(text)
            }
            CoreError::Message { .. } => MessageError::new_err(text),
            CoreError::Policy { .. } => PolicyError::new_err(text),
        }
    }
}

/// Runs `work` with the GIL released and maps its error: for calls whose cost grows with
/// the input (a websocket message, whole arrays, an exchangeInfo document). Convert
/// Python inputs to Rust values before, build Python results after.
pub fn run_detached<T, F>(py: Python<'_>, work: F) -> PyResult<T>
where
    F: FnOnce() -> Result<T, CoreError> + Send,
    T: Send,
{
    py.detach(work).map_err(PyErr::from)
}

#[allow(clippy::unnecessary_wraps)] // every binding module's register has this signature
pub fn register(_m: &Bound<'_, PyModule>) -> PyResult<()> {
    // The classes are defined in Python; nothing to add to the module here.
    Ok(())
}
