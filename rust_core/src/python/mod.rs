//! The `pyquant._core` extension module: the only code that names pyo3.

use pyo3::prelude::*;

mod arrays;
mod arrow_io;
mod backtest;
mod engine;
mod errors;
mod intents;
mod rules;

#[pymodule]
#[pyo3(name = "_core")]
fn core_module(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    errors::register(m)?;
    rules::register(m)?;
    arrays::register(m)?;
    engine::register(m)?;
    backtest::register(m)?;
    intents::register(m)?;
    Ok(())
}
