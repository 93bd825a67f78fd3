//! Bindings: `ExchangeRules`, `OrderReject`, and the conversion of Python numbers to
//! exact decimals shared by every binding module.
//!
//! Prices and quantities are accepted as `str`, `decimal.Decimal`, `int` or `float`:
//! - `str` is parsed by the strict decimal grammar (no exponent, no NaN);
//! - `Decimal` is rendered with `format(value, "f")` (never its exponent form) and parsed;
//! - `int` is exact; `bool` is refused (it is an `int` by accident);
//! - `float` is taken by its shortest round-trip digits (`repr`), so `0.1` means `0.1`.
//!
//! Results come back as the exact string that goes on the wire.

use std::sync::Arc;

use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyBool, PyBytes, PyDict, PyFloat, PyInt, PyString, PyType};

use crate::error::CoreError;
use crate::fixed::{
    decimal_from_f64, parse_decimal, parse_decimal_for_rounding, Decimal, Rounding,
};
use crate::rules::{ExchangeRules, OrderCheck, OrderReject, OrderType, Side};

use super::errors::run_detached;

static DECIMAL_TYPE: PyOnceLock<Py<PyType>> = PyOnceLock::new();

/// Converts a Python `str | Decimal | int | float` to an exact `Decimal`.
///
/// Errors name `field` (and the symbol when given) and the value found.
pub fn decimal_arg(
    value: &Bound<'_, PyAny>,
    field: &str,
    symbol: Option<&str>,
) -> PyResult<Decimal> {
    decimal_arg_impl(value, field, symbol, None)
}

/// Like [`decimal_arg`] for a value about to be rounded in `rounding`'s direction: digits
/// beyond the 28th decimal (e.g. from `Decimal` arithmetic) are cut so the rounding result
/// is unchanged (see [`parse_decimal_for_rounding`]).
pub fn decimal_arg_for_rounding(
    value: &Bound<'_, PyAny>,
    field: &str,
    symbol: Option<&str>,
    rounding: Rounding,
) -> PyResult<Decimal> {
    decimal_arg_impl(value, field, symbol, Some(rounding))
}

fn decimal_arg_impl(
    value: &Bound<'_, PyAny>,
    field: &str,
    symbol: Option<&str>,
    rounding: Option<Rounding>,
) -> PyResult<Decimal> {
    let parse = |text: &str| match rounding {
        Some(r) => parse_decimal_for_rounding(field, text, r),
        None => parse_decimal(field, text),
    };
    let attach = |e: CoreError| match symbol {
        Some(s) => e.with_symbol(s),
        None => e,
    };
    if let Ok(text) = value.cast::<PyString>() {
        return Ok(parse(text.to_str()?).map_err(attach)?);
    }
    if value.is_instance_of::<PyBool>() {
        return Err(type_error(value, field));
    }
    if value.is_instance_of::<PyInt>() {
        let text = value.str()?;
        return Ok(parse_decimal(field, text.to_str()?).map_err(attach)?);
    }
    if let Ok(float) = value.cast::<PyFloat>() {
        return Ok(decimal_from_f64(field, float.value()).map_err(attach)?);
    }
    let py = value.py();
    let decimal_type = DECIMAL_TYPE.import(py, "decimal", "Decimal")?;
    if value.is_instance(decimal_type)? {
        let text = py
            .import("builtins")?
            .getattr("format")?
            .call1((value, "f"))?;
        let text = text.cast::<PyString>()?;
        return Ok(parse(text.to_str()?).map_err(attach)?);
    }
    Err(type_error(value, field))
}

/// Like [`decimal_arg`] for an optional argument (`None` stays `None`).
pub fn optional_decimal_arg(
    value: Option<&Bound<'_, PyAny>>,
    field: &str,
    symbol: Option<&str>,
) -> PyResult<Option<Decimal>> {
    match value {
        None => Ok(None),
        Some(v) if v.is_none() => Ok(None),
        Some(v) => decimal_arg(v, field, symbol).map(Some),
    }
}

fn type_error(value: &Bound<'_, PyAny>, field: &str) -> PyErr {
    let found = value
        .get_type()
        .name()
        .map_or_else(|_| "?".to_owned(), |n| n.to_string());
    PyTypeError::new_err(format!(
        "{field} must be a str, Decimal, int or float, found {found}"
    ))
}

/// Exchange rules of every symbol of one exchangeInfo document.
#[pyclass(name = "ExchangeRules", module = "pyquant._core", frozen)]
pub struct PyExchangeRules {
    inner: Arc<ExchangeRules>,
}

impl PyExchangeRules {
    /// The rules, for other binding modules (the exit engine takes a shared copy).
    pub fn rules(&self) -> &ExchangeRules {
        &self.inner
    }

    /// A shared handle to the rules.
    pub fn shared(&self) -> Arc<ExchangeRules> {
        Arc::clone(&self.inner)
    }

    /// Wraps rules built in Rust (e.g. restored from a snapshot).
    pub fn from_rules(rules: Arc<ExchangeRules>) -> Self {
        Self { inner: rules }
    }
}

#[pymethods]
impl PyExchangeRules {
    /// Parses a futures exchangeInfo document given as bytes, str or an already decoded dict.
    #[staticmethod]
    #[pyo3(name = "from_exchange_info")]
    fn py_from_exchange_info(py: Python<'_>, data: &Bound<'_, PyAny>) -> PyResult<Self> {
        let owned;
        let bytes: &[u8] = if let Ok(b) = data.cast::<PyBytes>() {
            b.as_bytes()
        } else if let Ok(s) = data.cast::<PyString>() {
            s.to_str()?.as_bytes()
        } else if data.is_instance_of::<PyDict>() {
            let dumped = py.import("orjson")?.getattr("dumps")?.call1((data,))?;
            owned = dumped.cast_into::<PyBytes>()?;
            owned.as_bytes()
        } else {
            let found = data.get_type().name()?.to_string();
            return Err(PyTypeError::new_err(format!(
                "exchange info must be bytes, str or dict, found {found}"
            )));
        };
        let rules = run_detached(py, || ExchangeRules::from_json(bytes))?;
        Ok(Self {
            inner: Arc::new(rules),
        })
    }

    /// Symbol names, sorted.
    fn symbols(&self) -> Vec<String> {
        self.inner.symbols().map(str::to_owned).collect()
    }

    fn __len__(&self) -> usize {
        self.inner.len()
    }

    fn __contains__(&self, symbol: &str) -> bool {
        self.inner.get(symbol).is_some()
    }

    fn __repr__(&self) -> String {
        format!("<ExchangeRules: {} symbols>", self.inner.len())
    }

    /// Rounds a price onto the symbol's tick grid and returns the wire string.
    #[pyo3(signature = (symbol, price, rounding = "down"))]
    fn quantize_price(
        &self,
        symbol: &str,
        price: &Bound<'_, PyAny>,
        rounding: &str,
    ) -> PyResult<String> {
        let rules = self.inner.symbol(symbol)?;
        let rounding = Rounding::parse(rounding)?;
        let price = decimal_arg_for_rounding(price, "price", Some(symbol), rounding)?;
        if price <= Decimal::ZERO {
            return Err(CoreError::invalid_for(
                symbol,
                "price",
                price.to_string(),
                "must be positive",
            )
            .into());
        }
        Ok(rules.format_price(rules.try_quantize_price(price, rounding)?))
    }

    /// Floors a quantity to the `MARKET_LOT_SIZE` (market) or `LOT_SIZE` step; returns the wire string.
    #[pyo3(signature = (symbol, qty, market = true))]
    fn quantize_qty(&self, symbol: &str, qty: &Bound<'_, PyAny>, market: bool) -> PyResult<String> {
        let rules = self.inner.symbol(symbol)?;
        let qty = decimal_arg_for_rounding(qty, "quantity", Some(symbol), Rounding::Down)?;
        if qty < Decimal::ZERO {
            return Err(CoreError::invalid_for(
                symbol,
                "quantity",
                qty.to_string(),
                "must not be negative",
            )
            .into());
        }
        Ok(rules.format_qty(rules.try_quantize_qty(qty, market)?, market))
    }

    /// Validates an order; returns Binance's rejection (code and message) or None.
    #[pyo3(signature = (
        symbol, *, side, order_type, quantity, price = None, stop_price = None,
        mark_price = None, reduce_only = false, best_price = None
    ))]
    #[allow(clippy::too_many_arguments)] // mirrors the order's keyword parameters
    fn check_order(
        &self,
        symbol: &str,
        side: &str,
        order_type: &str,
        quantity: &Bound<'_, PyAny>,
        price: Option<&Bound<'_, PyAny>>,
        stop_price: Option<&Bound<'_, PyAny>>,
        mark_price: Option<&Bound<'_, PyAny>>,
        reduce_only: bool,
        best_price: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Option<PyOrderReject>> {
        let rules = self.inner.symbol(symbol)?;
        let order = OrderCheck {
            side: Side::parse(side)?,
            order_type: OrderType::parse(order_type)?,
            quantity: decimal_arg(quantity, "quantity", Some(symbol))?,
            price: optional_decimal_arg(price, "price", Some(symbol))?,
            stop_price: optional_decimal_arg(stop_price, "stop_price", Some(symbol))?,
            mark_price: optional_decimal_arg(mark_price, "mark_price", Some(symbol))?,
            best_price: optional_decimal_arg(best_price, "best_price", Some(symbol))?,
            reduce_only,
        };
        if let Some(mark) = order.mark_price {
            if mark <= Decimal::ZERO {
                return Err(CoreError::invalid_for(
                    symbol,
                    "mark_price",
                    mark.to_string(),
                    "must be positive",
                )
                .into());
            }
        }
        // Without a reference price MIN_NOTIONAL cannot be checked; refuse rather than
        // answer "valid" for an order Binance may reject with -4164.
        let exempt = order.reduce_only || rules.min_notional() <= Decimal::ZERO;
        let measured_at_mark = matches!(
            order.order_type,
            OrderType::Market | OrderType::TrailingStopMarket
        );
        if !exempt && measured_at_mark && order.mark_price.is_none() {
            return Err(CoreError::invalid_for(
                symbol,
                "mark_price",
                "None",
                format!(
                    "is required to check MIN_NOTIONAL of a {} order that is not reduce-only",
                    order.order_type
                ),
            )
            .into());
        }
        Ok(rules.check_order(&order).map(PyOrderReject::from))
    }

    /// The symbol's filters and properties as strings (`tick_size`, `step_size`, `min_qty`,
    /// `min_notional`, `status`, ...).
    fn symbol_info(
        &self,
        symbol: &str,
    ) -> PyResult<std::collections::BTreeMap<&'static str, String>> {
        Ok(self.inner.symbol(symbol)?.info().into_iter().collect())
    }
}

/// A refusal as Binance would answer it.
#[pyclass(name = "OrderReject", module = "pyquant._core", frozen, eq, hash)]
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct PyOrderReject {
    inner: OrderReject,
}

impl From<OrderReject> for PyOrderReject {
    fn from(inner: OrderReject) -> Self {
        Self { inner }
    }
}

#[pymethods]
impl PyOrderReject {
    #[new]
    fn new(code: i32, msg: String) -> Self {
        Self {
            inner: OrderReject { code, msg },
        }
    }

    /// Binance's error code, e.g. -4164.
    #[getter]
    fn code(&self) -> i32 {
        self.inner.code
    }

    /// Binance's error message.
    #[getter]
    fn msg(&self) -> &str {
        &self.inner.msg
    }

    fn __repr__(&self) -> String {
        format!(
            "OrderReject(code={}, msg={:?})",
            self.inner.code, self.inner.msg
        )
    }

    fn __str__(&self) -> String {
        self.inner.to_string()
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyExchangeRules>()?;
    m.add_class::<PyOrderReject>()?;
    Ok(())
}
