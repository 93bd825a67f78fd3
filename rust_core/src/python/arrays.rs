//! Bindings: array functions (`atr`) over numpy arrays and polars Series.
//!
//! Inputs cross without copying when they already are contiguous 1-D float64 numpy
//! arrays (read through rust-numpy as a slice) or float64 polars Series without nulls
//! (`Series.to_numpy()` is zero-copy for those). Anything else array-like is converted
//! once with `numpy.ascontiguousarray(x, dtype=float64)`. The result is a new numpy
//! array handed over without a copy, wrapped in a `pl.Series` when the input was one.

use numpy::{IntoPyArray, PyReadonlyArray1, PyUntypedArrayMethods};
use pyo3::prelude::*;

use crate::atr::{atr_batch, MAX_PERIOD};
use crate::error::CoreError;

use super::errors::run_detached;

/// Whether `value` is a polars object (checked by module name, so polars stays optional).
fn is_polars(value: &Bound<'_, PyAny>) -> PyResult<bool> {
    let module = value.get_type().getattr("__module__")?;
    Ok(module
        .extract::<&str>()
        .is_ok_and(|m| m == "polars" || m.starts_with("polars.")))
}

/// A read-only contiguous float64 view of `value` (numpy array, polars Series, sequence).
fn float_array<'py>(
    value: &Bound<'py, PyAny>,
    field: &str,
) -> PyResult<PyReadonlyArray1<'py, f64>> {
    let py = value.py();
    let source = if is_polars(value)? {
        value.call_method0("to_numpy")?
    } else {
        value.clone()
    };
    if let Ok(array) = source.extract::<PyReadonlyArray1<'py, f64>>() {
        if array.is_contiguous() {
            return Ok(array);
        }
    }
    let numpy = py.import("numpy")?;
    let converted = numpy
        .getattr("ascontiguousarray")?
        .call1((&source, "float64"))
        .map_err(|e| {
            PyErr::from(CoreError::invalid(
                field,
                short_repr(&source),
                format!("must be a 1-D float64 array or polars Series ({e})"),
            ))
        })?;
    let ndim: usize = converted.getattr("ndim")?.extract()?;
    if ndim != 1 {
        let shape = converted
            .getattr("shape")?
            .str()?
            .to_string()
            .replace(' ', "");
        return Err(CoreError::invalid(
            format!("shape of {field}"),
            shape,
            "must be one-dimensional",
        )
        .into());
    }
    converted.extract::<PyReadonlyArray1<'py, f64>>()
}

fn short_repr(value: &Bound<'_, PyAny>) -> String {
    let text = value
        .repr()
        .map_or_else(|_| "?".to_owned(), |r| r.to_string());
    if text.chars().count() > 60 {
        let cut: String = text.chars().take(57).collect();
        format!("{cut}...")
    } else {
        text
    }
}

/// Wilder's ATR, identical to `talib.ATR` (NaN for the first `period` values).
#[pyfunction]
#[pyo3(name = "atr", signature = (high, low, close, period = 14))]
fn py_atr<'py>(
    py: Python<'py>,
    high: &Bound<'py, PyAny>,
    low: &Bound<'py, PyAny>,
    close: &Bound<'py, PyAny>,
    period: i64,
) -> PyResult<Bound<'py, PyAny>> {
    let period = usize::try_from(period)
        .ok()
        .filter(|p| (1..=MAX_PERIOD).contains(p))
        .ok_or_else(|| {
            CoreError::invalid(
                "period",
                period.to_string(),
                format!("must be between 1 and {MAX_PERIOD} bars"),
            )
        })?;
    let as_polars = is_polars(high)?;
    let (h, l, c) = (
        float_array(high, "high")?,
        float_array(low, "low")?,
        float_array(close, "close")?,
    );
    // Contiguity was checked in `float_array`, so these cannot fail.
    let (hs, ls, cs) = (h.as_slice()?, l.as_slice()?, c.as_slice()?);
    let out = run_detached(py, || atr_batch(hs, ls, cs, period))?;
    let array = out.into_pyarray(py).into_any();
    if as_polars {
        let polars = py.import("polars")?;
        return polars.getattr("Series")?.call1(("atr", array));
    }
    Ok(array)
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(py_atr, m)?)?;
    Ok(())
}
