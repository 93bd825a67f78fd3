//! Bindings: `ExitPolicy`, `ExitEngine`, `ExitAction`, `PositionView`, `EntryPlan`.
//!
//! One call per websocket message crosses the boundary: `on_mark_message` takes
//! the message bytes, releases the GIL while Rust parses them (the engine is not
//! borrowed then), applies the parsed updates with the GIL held, and returns one
//! list of actions. Prices and quantities come in as `str`, `decimal.Decimal`,
//! `int` or `float` and go out as exact wire strings.
//!
//! Threads: no method releases the GIL while it holds the engine, so a second
//! thread calling `positions()` (or anything else) during `on_mark_message` waits
//! for the GIL instead of failing with "Already mutably borrowed". Every error is
//! a `pyquant.errors` class; no input reaches a Rust panic.

use std::fmt::Write as _;

use pyo3::exceptions::{PyAttributeError, PyTypeError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList, PyString, PyTuple};

use super::errors::run_detached;
use super::rules::{self as rules_bindings, PyExchangeRules};
use crate::error::CoreError;
use crate::exit::{
    EntryPlan, ExitAction, ExitEngine, ExitPolicy, LadderLevel, LadderUnit, OpenParams,
    PolicyConfig, PositionSide, PositionState,
};
use crate::feed::parse_mark_message;
use crate::fixed::Decimal;
use crate::rules::ExchangeRules;

fn decimal_arg(field: &str, value: &Bound<'_, PyAny>) -> PyResult<Decimal> {
    rules_bindings::decimal_arg(value, field, None)
}

fn opt_decimal_arg(field: &str, value: Option<&Bound<'_, PyAny>>) -> PyResult<Option<Decimal>> {
    rules_bindings::optional_decimal_arg(value, field, None)
}

/// Reads a float array (numpy array or any sequence of numbers).
fn float_array(field: &str, value: &Bound<'_, PyAny>) -> PyResult<Vec<f64>> {
    if let Ok(array) = value.extract::<numpy::PyReadonlyArray1<'_, f64>>() {
        return Ok(array.as_array().iter().copied().collect());
    }
    if let Ok(values) = value.call_method0("to_numpy") {
        if let Ok(array) = values.extract::<numpy::PyReadonlyArray1<'_, f64>>() {
            return Ok(array.as_array().iter().copied().collect());
        }
    }
    value.extract::<Vec<f64>>().map_err(|_| {
        PyTypeError::new_err(format!(
            "{field} must be a 1-D float array or a sequence of numbers"
        ))
    })
}

fn policy_type_err(field: &str, value: &Bound<'_, PyAny>, rule: &str) -> PyErr {
    CoreError::Policy {
        field: field.to_owned(),
        value: value
            .repr()
            .map_or_else(|_| "?".to_owned(), |r| r.to_string()),
        rule: rule.to_owned(),
    }
    .into()
}

fn f64_field(field: &str, value: &Bound<'_, PyAny>) -> PyResult<f64> {
    if value.is_instance_of::<pyo3::types::PyBool>() {
        return Err(policy_type_err(field, value, "must be a number"));
    }
    value
        .extract::<f64>()
        .map_err(|_| policy_type_err(field, value, "must be a number"))
}

fn opt_f64_field(field: &str, value: &Bound<'_, PyAny>) -> PyResult<Option<f64>> {
    if value.is_none() {
        Ok(None)
    } else {
        f64_field(field, value).map(Some)
    }
}

fn int_field<T: for<'a, 'py> FromPyObject<'a, 'py>>(
    field: &str,
    value: &Bound<'_, PyAny>,
) -> PyResult<T> {
    if value.is_instance_of::<pyo3::types::PyBool>()
        || !value.is_instance_of::<pyo3::types::PyInt>()
    {
        return Err(policy_type_err(field, value, "must be an integer"));
    }
    value
        .extract::<T>()
        .map_err(|_| policy_type_err(field, value, "must be an integer in range"))
}

fn opt_int_field<T: for<'a, 'py> FromPyObject<'a, 'py>>(
    field: &str,
    value: &Bound<'_, PyAny>,
) -> PyResult<Option<T>> {
    if value.is_none() {
        Ok(None)
    } else {
        int_field(field, value).map(Some)
    }
}

fn ladder_field(value: &Bound<'_, PyAny>) -> PyResult<Vec<LadderLevel>> {
    if value.is_none() {
        return Ok(Vec::new());
    }
    let mut levels = Vec::new();
    for (i, item) in value
        .try_iter()
        .map_err(|_| policy_type_err("ladder", value, "must be a list of levels"))?
        .enumerate()
    {
        let item = item?;
        let (at, fraction) = if let Ok(dict) = item.cast::<PyDict>() {
            let at = dict.get_item("at")?.ok_or_else(|| {
                policy_type_err(
                    &format!("ladder[{i}]"),
                    &item,
                    "needs keys \"at\" and \"fraction\"",
                )
            })?;
            let fraction = dict.get_item("fraction")?.ok_or_else(|| {
                policy_type_err(
                    &format!("ladder[{i}]"),
                    &item,
                    "needs keys \"at\" and \"fraction\"",
                )
            })?;
            for key in dict.keys() {
                let key = key.to_string();
                if key != "at" && key != "fraction" {
                    return Err(policy_type_err(
                        &format!("ladder[{i}].{key}"),
                        &item,
                        "is not a level field (at, fraction)",
                    ));
                }
            }
            (at, fraction)
        } else if let Ok(pair) = item.extract::<(Bound<'_, PyAny>, Bound<'_, PyAny>)>() {
            pair
        } else {
            return Err(policy_type_err(
                &format!("ladder[{i}]"),
                &item,
                "must be (at, fraction) or {\"at\": .., \"fraction\": ..}",
            ));
        };
        levels.push(LadderLevel {
            at: f64_field(&format!("ladder[{i}].at"), &at)?,
            fraction: f64_field(&format!("ladder[{i}].fraction"), &fraction)?,
        });
    }
    Ok(levels)
}

/// Builds a policy config from keyword arguments / a TOML table. Unknown keys
/// are refused by name; `trail_activate_R` and `time_stop_unless_R` are
/// accepted as spellings of the lower-case fields.
fn config_from_dict(fields: &Bound<'_, PyDict>) -> PyResult<PolicyConfig> {
    let mut c = PolicyConfig::default();
    for (key, value) in fields.iter() {
        let key: String = key
            .extract()
            .map_err(|_| policy_type_err("field", &key, "names must be strings"))?;
        let v = &value;
        match key.as_str() {
            "stop_atr" => c.stop_atr = opt_f64_field(&key, v)?,
            "fallback_stop_pct" => c.fallback_stop_pct = f64_field(&key, v)?,
            "min_stop_pct" => c.min_stop_pct = f64_field(&key, v)?,
            "max_stop_pct" => c.max_stop_pct = f64_field(&key, v)?,
            "max_margin_loss" => c.max_margin_loss = opt_f64_field(&key, v)?,
            "liq_buffer_pct" => c.liq_buffer_pct = f64_field(&key, v)?,
            "min_allowed_stop_pct" => c.min_allowed_stop_pct = opt_f64_field(&key, v)?,
            "ladder" => c.ladder = ladder_field(v)?,
            "ladder_unit" => {
                let text: String = v
                    .extract()
                    .map_err(|_| policy_type_err(&key, v, "must be \"R\" or \"pct\""))?;
                c.ladder_unit = LadderUnit::parse(&text)?;
            }
            "confidence_scale" => c.confidence_scale = f64_field(&key, v)?,
            "m_min" => c.m_min = f64_field(&key, v)?,
            "m_max" => c.m_max = f64_field(&key, v)?,
            "breakeven_after_level" => c.breakeven_after_level = opt_int_field(&key, v)?,
            "breakeven_extra_pct" => c.breakeven_extra_pct = f64_field(&key, v)?,
            "taker_fee" => c.taker_fee = f64_field(&key, v)?,
            "ratchet_to_previous_level" => {
                c.ratchet_to_previous_level = v
                    .cast::<pyo3::types::PyBool>()
                    .map_err(|_| policy_type_err(&key, v, "must be true or false"))?
                    .is_true();
            }
            "trail_atr" => c.trail_atr = opt_f64_field(&key, v)?,
            "trail_pct" => c.trail_pct = opt_f64_field(&key, v)?,
            "trail_activate_r" | "trail_activate_R" => c.trail_activate_r = opt_f64_field(&key, v)?,
            "trail_activate_pct" => c.trail_activate_pct = opt_f64_field(&key, v)?,
            "trail_after_level" => c.trail_after_level = opt_int_field(&key, v)?,
            "max_hold_ms" => c.max_hold_ms = opt_int_field(&key, v)?,
            "time_stop_unless_r" | "time_stop_unless_R" => {
                c.time_stop_unless_r = opt_f64_field(&key, v)?;
            }
            "atr_period" => c.atr_period = int_field(&key, v)?,
            "atr_interval" => {
                c.atr_interval = v
                    .extract()
                    .map_err(|_| policy_type_err(&key, v, "must be a string such as \"1m\""))?;
            }
            _ => return Err(policy_type_err(&key, v, "is not an ExitPolicy field")),
        }
    }
    Ok(c)
}

fn json_to_py<'py>(py: Python<'py>, value: &serde_json::Value) -> PyResult<Bound<'py, PyAny>> {
    use serde_json::Value;
    Ok(match value {
        Value::Null => py.None().into_bound(py),
        Value::Bool(b) => pyo3::types::PyBool::new(py, *b).to_owned().into_any(),
        Value::Number(n) => match (n.as_i64(), n.as_f64()) {
            (Some(i), _) => i.into_pyobject(py)?.into_any(),
            (None, Some(f)) => f.into_pyobject(py)?.into_any(),
            _ => py.None().into_bound(py),
        },
        Value::String(s) => PyString::new(py, s).into_any(),
        Value::Array(items) => {
            let list = PyList::empty(py);
            for item in items {
                list.append(json_to_py(py, item)?)?;
            }
            list.into_any()
        }
        Value::Object(map) => {
            let dict = PyDict::new(py);
            for (k, v) in map {
                dict.set_item(k, json_to_py(py, v)?)?;
            }
            dict.into_any()
        }
    })
}

fn config_json(policy: &ExitPolicy) -> serde_json::Map<String, serde_json::Value> {
    match serde_json::to_value(policy.config()) {
        Ok(serde_json::Value::Object(map)) => map,
        _ => serde_json::Map::new(),
    }
}

fn toml_value(value: &serde_json::Value) -> String {
    use serde_json::Value;
    match value {
        Value::Array(items) => {
            let parts: Vec<String> = items.iter().map(toml_value).collect();
            format!("[{}]", parts.join(", "))
        }
        Value::Object(map) => {
            let parts: Vec<String> = map
                .iter()
                .map(|(k, v)| format!("{k} = {}", toml_value(v)))
                .collect();
            format!("{{ {} }}", parts.join(", "))
        }
        // JSON scalars (numbers with a point for floats, quoted strings, bools)
        // are valid TOML scalars as written.
        other => other.to_string(),
    }
}

/// Validated exit parameters with explicit units.
#[pyclass(name = "ExitPolicy", module = "pyquant._core", frozen, eq)]
#[derive(Clone, PartialEq)]
pub struct PyExitPolicy {
    pub(crate) inner: ExitPolicy,
}

#[pymethods]
impl PyExitPolicy {
    #[new]
    #[pyo3(signature = (**fields))]
    fn py_new(fields: Option<&Bound<'_, PyDict>>) -> PyResult<Self> {
        let config = match fields {
            Some(fields) => config_from_dict(fields)?,
            None => PolicyConfig::default(),
        };
        Ok(Self {
            inner: ExitPolicy::new(config)?,
        })
    }

    /// Builds a policy from a TOML table of fields.
    #[staticmethod]
    #[pyo3(name = "from_toml")]
    fn py_from_toml(py: Python<'_>, text: &str) -> PyResult<Self> {
        let parsed = py
            .import("tomllib")?
            .call_method1("loads", (text,))
            .map_err(|e| {
                PyErr::from(CoreError::Policy {
                    field: "toml".to_owned(),
                    value: e.value(py).to_string(),
                    rule: "must be valid TOML".to_owned(),
                })
            })?;
        let fields = parsed.cast_into::<PyDict>()?;
        Ok(Self {
            inner: ExitPolicy::new(config_from_dict(&fields)?)?,
        })
    }

    /// Returns a named preset: "standard" or "challenge".
    #[staticmethod]
    #[pyo3(name = "preset")]
    fn py_preset(name: &str) -> PyResult<Self> {
        Ok(Self {
            inner: ExitPolicy::preset(name)?,
        })
    }

    #[pyo3(name = "to_dict")]
    fn py_to_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        json_to_py(py, &serde_json::Value::Object(config_json(&self.inner)))
    }

    #[pyo3(name = "to_toml")]
    fn py_to_toml(&self) -> String {
        let mut out = String::new();
        for (key, value) in config_json(&self.inner) {
            if !value.is_null() {
                let _ = writeln!(out, "{key} = {}", toml_value(&value));
            }
        }
        out
    }

    #[getter]
    fn interval_ms(&self) -> i64 {
        self.inner.interval_ms()
    }

    fn __getattr__<'py>(&self, py: Python<'py>, name: &str) -> PyResult<Bound<'py, PyAny>> {
        match config_json(&self.inner).get(name) {
            Some(value) => json_to_py(py, value),
            None => Err(PyAttributeError::new_err(format!(
                "ExitPolicy has no field {name:?}"
            ))),
        }
    }

    fn __repr__(&self) -> String {
        let parts: Vec<String> = config_json(&self.inner)
            .iter()
            .filter(|(_, v)| !v.is_null())
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        format!("ExitPolicy({})", parts.join(", "))
    }

    fn __reduce__<'py>(
        &self,
        py: Python<'py>,
    ) -> PyResult<(Bound<'py, PyAny>, Bound<'py, PyTuple>)> {
        let from_toml = py.get_type::<Self>().getattr("from_toml")?;
        Ok((from_toml, PyTuple::new(py, [self.py_to_toml()])?))
    }
}

/// One exit order to send: close `quantity` of `(symbol, position_side)` with a
/// MARKET order on `side`.
#[pyclass(name = "ExitAction", module = "pyquant._core", frozen, eq, hash)]
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct PyExitAction {
    #[pyo3(get)]
    position_id: String,
    #[pyo3(get)]
    symbol: String,
    #[pyo3(get)]
    position_side: &'static str,
    #[pyo3(get)]
    side: &'static str,
    #[pyo3(get)]
    quantity: String,
    #[pyo3(get)]
    reason: String,
    #[pyo3(get)]
    trigger_price: String,
    #[pyo3(get)]
    mark_price: String,
    #[pyo3(get)]
    sequence: u64,
    #[pyo3(get)]
    is_full_close: bool,
    #[pyo3(get)]
    event_time_ms: i64,
    #[pyo3(get)]
    generation: u64,
}

fn price_text(rules: &ExchangeRules, symbol: &str, price: Decimal) -> String {
    match rules.get(symbol) {
        Some(r) if r.quantize_price(price, crate::fixed::Rounding::Down) == price => {
            r.format_price(price)
        }
        _ => price.normalize().to_string(),
    }
}

fn qty_text(rules: &ExchangeRules, symbol: &str, quantity: Decimal) -> String {
    match rules.get(symbol) {
        Some(r) if r.quantize_qty(quantity, true) == quantity => r.format_qty(quantity, true),
        // A live quantity off the MARKET grid (never seen from Binance) goes out as is.
        _ => quantity.normalize().to_string(),
    }
}

impl PyExitAction {
    fn from_action(rules: &ExchangeRules, action: &ExitAction) -> Self {
        Self {
            position_id: action.position_id.clone(),
            symbol: action.symbol.clone(),
            position_side: action.position_side.as_str(),
            side: action.side.as_str(),
            quantity: qty_text(rules, &action.symbol, action.quantity),
            reason: action.reason.name(),
            trigger_price: price_text(rules, &action.symbol, action.trigger_price),
            mark_price: price_text(rules, &action.symbol, action.mark_price),
            sequence: action.sequence,
            is_full_close: action.is_full_close,
            event_time_ms: action.event_time_ms,
            generation: action.generation,
        }
    }
}

#[pymethods]
impl PyExitAction {
    #[pyo3(name = "to_dict")]
    fn py_to_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        d.set_item("position_id", &self.position_id)?;
        d.set_item("symbol", &self.symbol)?;
        d.set_item("position_side", self.position_side)?;
        d.set_item("side", self.side)?;
        d.set_item("quantity", &self.quantity)?;
        d.set_item("reason", &self.reason)?;
        d.set_item("trigger_price", &self.trigger_price)?;
        d.set_item("mark_price", &self.mark_price)?;
        d.set_item("sequence", self.sequence)?;
        d.set_item("is_full_close", self.is_full_close)?;
        d.set_item("event_time_ms", self.event_time_ms)?;
        d.set_item("generation", self.generation)?;
        Ok(d)
    }

    fn __repr__(&self) -> String {
        format!(
            "ExitAction({} {} {} {} {} reason={} trigger={} mark={} id={} seq={}{})",
            self.symbol,
            self.position_side,
            self.side,
            self.quantity,
            if self.is_full_close {
                "full"
            } else {
                "partial"
            },
            self.reason,
            self.trigger_price,
            self.mark_price,
            self.position_id,
            self.sequence,
            format_args!(" E={}", self.event_time_ms),
        )
    }
}

/// A read-only view of one position's exit state.
#[pyclass(name = "PositionView", module = "pyquant._core", frozen)]
pub struct PyPositionView {
    #[pyo3(get)]
    position_id: String,
    #[pyo3(get)]
    symbol: String,
    #[pyo3(get)]
    position_side: &'static str,
    #[pyo3(get)]
    quantity: String,
    #[pyo3(get)]
    original_quantity: String,
    #[pyo3(get)]
    entry_price: String,
    #[pyo3(get)]
    leverage: u32,
    #[pyo3(get)]
    confidence: Option<f64>,
    #[pyo3(get)]
    stop_price: String,
    #[pyo3(get)]
    stop_reason: String,
    #[pyo3(get)]
    r_distance: String,
    #[pyo3(get)]
    best_price: String,
    #[pyo3(get)]
    next_take_profit: Option<String>,
    #[pyo3(get)]
    take_profit_prices: Vec<String>,
    #[pyo3(get)]
    ladder_levels_done: u32,
    #[pyo3(get)]
    trailing_active: bool,
    #[pyo3(get)]
    over_leveraged: bool,
    #[pyo3(get)]
    pending_action: bool,
    #[pyo3(get)]
    pending_sequence: Option<u64>,
    #[pyo3(get)]
    sequence: u64,
    #[pyo3(get)]
    opened_at_ms: Option<i64>,
    #[pyo3(get)]
    liquidation_price: Option<String>,
    #[pyo3(get)]
    last_mark_price: Option<String>,
    #[pyo3(get)]
    atr: Option<f64>,
}

impl PyPositionView {
    fn from_state(rules: &ExchangeRules, p: &PositionState, atr: Option<f64>) -> Self {
        let price = |v: Decimal| price_text(rules, &p.symbol, v);
        Self {
            position_id: p.position_id.clone(),
            symbol: p.symbol.clone(),
            position_side: p.side.as_str(),
            quantity: qty_text(rules, &p.symbol, p.quantity),
            original_quantity: qty_text(rules, &p.symbol, p.original_quantity),
            entry_price: price(p.entry_price),
            leverage: p.leverage,
            confidence: p.confidence,
            stop_price: price(p.stop_price),
            stop_reason: p.stop_reason.name(),
            r_distance: p.r_distance.normalize().to_string(),
            best_price: price(p.best_price),
            next_take_profit: p.next_take_profit().map(price),
            take_profit_prices: p.ladder_prices.iter().map(|v| price(*v)).collect(),
            ladder_levels_done: p.levels_done,
            trailing_active: p.trailing_active,
            over_leveraged: p.over_leveraged,
            pending_action: p.pending.is_some(),
            pending_sequence: p.pending.as_ref().map(|a| a.sequence),
            sequence: p.sequence,
            opened_at_ms: p.opened_at_ms,
            liquidation_price: p.liquidation_price.map(price),
            last_mark_price: p.last_mark_price.map(price),
            atr,
        }
    }
}

#[pymethods]
impl PyPositionView {
    fn __repr__(&self) -> String {
        format!(
            "PositionView({} {} {} qty={} entry={} stop={} ({}) levels_done={} pending={})",
            self.position_id,
            self.symbol,
            self.position_side,
            self.quantity,
            self.entry_price,
            self.stop_price,
            self.stop_reason,
            self.ladder_levels_done,
            self.pending_action,
        )
    }
}

/// The initial stop an entry would get, for sizing by risk.
#[pyclass(name = "EntryPlan", module = "pyquant._core", frozen)]
pub struct PyEntryPlan {
    #[pyo3(get)]
    symbol: String,
    #[pyo3(get)]
    position_side: &'static str,
    #[pyo3(get)]
    entry_price: String,
    #[pyo3(get)]
    stop_price: String,
    #[pyo3(get)]
    stop_distance: String,
    #[pyo3(get)]
    over_leveraged: bool,
    #[pyo3(get)]
    atr: Option<f64>,
    #[pyo3(get)]
    take_profit_prices: Vec<String>,
}

impl PyEntryPlan {
    fn from_plan(rules: &ExchangeRules, plan: &EntryPlan) -> Self {
        let price = |v: Decimal| price_text(rules, &plan.symbol, v);
        Self {
            symbol: plan.symbol.clone(),
            position_side: plan.side.as_str(),
            entry_price: price(plan.entry_price),
            stop_price: price(plan.stop_price),
            stop_distance: plan.stop_distance.normalize().to_string(),
            over_leveraged: plan.over_leveraged,
            atr: plan.atr,
            take_profit_prices: plan.take_profit_prices.iter().map(|v| price(*v)).collect(),
        }
    }
}

#[pymethods]
impl PyEntryPlan {
    fn __repr__(&self) -> String {
        format!(
            "EntryPlan({} {} entry={} stop={} distance={} over_leveraged={})",
            self.symbol,
            self.position_side,
            self.entry_price,
            self.stop_price,
            self.stop_distance,
            if self.over_leveraged { "True" } else { "False" },
        )
    }
}

/// The exit engine: every open position's exit, driven by mark-price messages.
#[pyclass(name = "ExitEngine", module = "pyquant._core")]
pub struct PyExitEngine {
    inner: ExitEngine,
}

impl PyExitEngine {
    fn actions(&self, actions: &[ExitAction]) -> Vec<PyExitAction> {
        actions
            .iter()
            .map(|a| PyExitAction::from_action(self.inner.rules(), a))
            .collect()
    }
}

#[allow(clippy::too_many_arguments)] // mirrors the Python signature
fn open_params(
    position_id: String,
    symbol: String,
    position_side: &str,
    quantity: &Bound<'_, PyAny>,
    entry_price: &Bound<'_, PyAny>,
    leverage: u32,
    confidence: Option<f64>,
    opened_at_ms: Option<i64>,
    liquidation_price: Option<&Bound<'_, PyAny>>,
) -> PyResult<OpenParams> {
    Ok(OpenParams {
        side: PositionSide::parse(position_side)?,
        quantity: decimal_arg("quantity", quantity)?,
        entry_price: decimal_arg("entry_price", entry_price)?,
        leverage,
        confidence,
        opened_at_ms,
        liquidation_price: opt_decimal_arg("liquidation_price", liquidation_price)?,
        position_id,
        symbol,
    })
}

#[pymethods]
impl PyExitEngine {
    #[new]
    fn py_new(
        rules: &Bound<'_, PyExchangeRules>,
        policy: &Bound<'_, PyExitPolicy>,
    ) -> PyResult<Self> {
        Ok(Self {
            inner: ExitEngine::new(rules.get().rules().clone(), policy.get().inner.clone())?,
        })
    }

    #[getter]
    fn policy(&self) -> PyExitPolicy {
        PyExitPolicy {
            inner: self.inner.policy().clone(),
        }
    }

    #[getter]
    fn last_event_ms(&self) -> Option<i64> {
        self.inner.last_event_ms()
    }

    /// Updates refused for an implausible event time since creation or restore.
    #[getter]
    fn implausible_event_times(&self) -> u64 {
        self.inner.implausible_event_times()
    }

    /// Updates refused for a mark outside the symbol's plausible band.
    #[getter]
    fn implausible_marks(&self) -> u64 {
        self.inner.implausible_marks()
    }

    #[getter]
    fn clock_ms(&self) -> Option<i64> {
        self.inner.clock_ms()
    }

    #[pyo3(name = "set_clock")]
    fn py_set_clock(&mut self, now_ms: i64) -> PyResult<()> {
        Ok(self.inner.set_clock(now_ms)?)
    }

    #[pyo3(name = "warm_up", signature = (symbol, high, low, close, last_open_time_ms=None))]
    fn py_warm_up(
        &mut self,
        symbol: &str,
        high: &Bound<'_, PyAny>,
        low: &Bound<'_, PyAny>,
        close: &Bound<'_, PyAny>,
        last_open_time_ms: Option<i64>,
    ) -> PyResult<()> {
        let (high, low, close) = (
            float_array("high", high)?,
            float_array("low", low)?,
            float_array("close", close)?,
        );
        // With the GIL held: the engine is borrowed (see the module header).
        Ok(self
            .inner
            .warm_up(symbol, &high, &low, &close, last_open_time_ms)?)
    }

    #[pyo3(name = "atr")]
    fn py_atr(&self, symbol: &str) -> Option<f64> {
        self.inner.atr(symbol)
    }

    #[pyo3(name = "open_position", signature = (
        position_id, symbol, position_side, quantity, entry_price,
        leverage=1, confidence=None, opened_at_ms=None, liquidation_price=None
    ))]
    #[allow(clippy::too_many_arguments)] // the Python signature
    fn py_open_position(
        &mut self,
        position_id: String,
        symbol: String,
        position_side: &str,
        quantity: &Bound<'_, PyAny>,
        entry_price: &Bound<'_, PyAny>,
        leverage: u32,
        confidence: Option<f64>,
        opened_at_ms: Option<i64>,
        liquidation_price: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        let params = open_params(
            position_id,
            symbol,
            position_side,
            quantity,
            entry_price,
            leverage,
            confidence,
            opened_at_ms,
            liquidation_price,
        )?;
        Ok(self.inner.open_position(params)?)
    }

    #[pyo3(name = "adopt_position", signature = (
        position_id, symbol, position_side, quantity, entry_price,
        leverage=1, confidence=None, opened_at_ms=None, liquidation_price=None,
        original_quantity=None, best_price=None, mark_price=None
    ))]
    #[allow(clippy::too_many_arguments)] // the Python signature
    fn py_adopt_position(
        &mut self,
        position_id: String,
        symbol: String,
        position_side: &str,
        quantity: &Bound<'_, PyAny>,
        entry_price: &Bound<'_, PyAny>,
        leverage: u32,
        confidence: Option<f64>,
        opened_at_ms: Option<i64>,
        liquidation_price: Option<&Bound<'_, PyAny>>,
        original_quantity: Option<&Bound<'_, PyAny>>,
        best_price: Option<&Bound<'_, PyAny>>,
        mark_price: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Vec<PyExitAction>> {
        let params = open_params(
            position_id,
            symbol,
            position_side,
            quantity,
            entry_price,
            leverage,
            confidence,
            opened_at_ms,
            liquidation_price,
        )?;
        let original = opt_decimal_arg("original_quantity", original_quantity)?;
        let best = opt_decimal_arg("best_price", best_price)?;
        let mark = opt_decimal_arg("mark_price", mark_price)?;
        let actions = self.inner.adopt_position(params, original, best, mark)?;
        Ok(self.actions(&actions))
    }

    #[pyo3(name = "on_mark_message", signature = (data, now_ms=None))]
    fn py_on_mark_message(
        slf: &Bound<'_, Self>,
        data: &Bound<'_, PyAny>,
        now_ms: Option<i64>,
    ) -> PyResult<Vec<PyExitAction>> {
        let py = slf.py();
        // bytes as they come off the socket, or the str a text frame decodes to
        // (its UTF-8 buffer is borrowed, not copied).
        let bytes: &[u8] = if let Ok(b) = data.cast::<PyBytes>() {
            b.as_bytes()
        } else if let Ok(s) = data.cast::<PyString>() {
            s.to_str()?.as_bytes()
        } else {
            let found = data.get_type().name()?.to_string();
            return Err(PyTypeError::new_err(format!(
                "data must be the websocket message as bytes or str, found {found}"
            )));
        };
        if let Some(now) = now_ms {
            crate::exit::bounds::check_event_time("now_ms", now)?;
        }
        // Parsed without the GIL and without the engine; applied with both.
        let batch = run_detached(py, || parse_mark_message(bytes))?;
        let mut this = slf.try_borrow_mut()?;
        if let Some(now) = now_ms {
            this.inner.set_clock(now)?;
        }
        let actions = this.inner.apply_batch(&batch);
        Ok(this.actions(&actions))
    }

    #[pyo3(name = "confirm", signature = (action, filled_quantity=None))]
    fn py_confirm(
        &mut self,
        action: &Bound<'_, PyExitAction>,
        filled_quantity: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<bool> {
        let filled = opt_decimal_arg("filled_quantity", filled_quantity)?;
        let action = action.get();
        Ok(self.inner.confirm_instance(
            &action.position_id,
            Some(action.generation),
            action.sequence,
            filled,
        )?)
    }

    #[pyo3(name = "reject")]
    fn py_reject(&mut self, action: &Bound<'_, PyExitAction>) -> PyResult<()> {
        let action = action.get();
        Ok(self.inner.reject_instance(
            &action.position_id,
            Some(action.generation),
            action.sequence,
        )?)
    }

    #[pyo3(name = "confirm_sequence", signature = (position_id, sequence, filled_quantity=None, generation=None))]
    fn py_confirm_sequence(
        &mut self,
        position_id: &str,
        sequence: u64,
        filled_quantity: Option<&Bound<'_, PyAny>>,
        generation: Option<u64>,
    ) -> PyResult<bool> {
        let filled = opt_decimal_arg("filled_quantity", filled_quantity)?;
        Ok(self
            .inner
            .confirm_instance(position_id, generation, sequence, filled)?)
    }

    #[pyo3(name = "reject_sequence", signature = (position_id, sequence, generation=None))]
    fn py_reject_sequence(
        &mut self,
        position_id: &str,
        sequence: u64,
        generation: Option<u64>,
    ) -> PyResult<()> {
        Ok(self
            .inner
            .reject_instance(position_id, generation, sequence)?)
    }

    #[pyo3(name = "pending_actions")]
    fn py_pending_actions(&self) -> Vec<PyExitAction> {
        let pending: Vec<ExitAction> = self
            .inner
            .positions()
            .iter()
            .filter_map(|p| p.pending.clone())
            .collect();
        self.actions(&pending)
    }

    #[pyo3(name = "resize_position")]
    fn py_resize_position(
        &mut self,
        position_id: &str,
        quantity: &Bound<'_, PyAny>,
    ) -> PyResult<bool> {
        let quantity = decimal_arg("quantity", quantity)?;
        Ok(self.inner.resize_position(position_id, quantity)?)
    }

    #[pyo3(name = "close_position")]
    fn py_close_position(&mut self, position_id: &str) -> PyResult<()> {
        self.inner.close_position(position_id)?;
        Ok(())
    }

    #[pyo3(name = "set_liquidation_price")]
    fn py_set_liquidation_price(
        &mut self,
        position_id: &str,
        price: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        let price = decimal_arg("liquidation_price", price)?;
        Ok(self.inner.set_liquidation_price(position_id, price)?)
    }

    #[pyo3(name = "update_rules")]
    fn py_update_rules(&mut self, rules: &Bound<'_, PyExchangeRules>) -> PyResult<()> {
        Ok(self.inner.update_rules(rules.get().rules().clone())?)
    }

    #[pyo3(name = "positions")]
    fn py_positions(&self) -> Vec<PyPositionView> {
        self.inner
            .positions()
            .into_iter()
            .map(|p| PyPositionView::from_state(self.inner.rules(), p, self.inner.atr(&p.symbol)))
            .collect()
    }

    #[pyo3(name = "position")]
    fn py_position(&self, position_id: &str) -> Option<PyPositionView> {
        self.inner
            .position(position_id)
            .map(|p| PyPositionView::from_state(self.inner.rules(), p, self.inner.atr(&p.symbol)))
    }

    #[pyo3(name = "plan_entry", signature = (symbol, position_side, entry_price, leverage=1, confidence=None, liquidation_price=None))]
    fn py_plan_entry(
        &self,
        symbol: &str,
        position_side: &str,
        entry_price: &Bound<'_, PyAny>,
        leverage: u32,
        confidence: Option<f64>,
        liquidation_price: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<PyEntryPlan> {
        let side = PositionSide::parse(position_side)?;
        let entry = decimal_arg("entry_price", entry_price)?;
        let liquidation = opt_decimal_arg("liquidation_price", liquidation_price)?;
        let plan = self
            .inner
            .plan_entry(symbol, side, entry, leverage, confidence, liquidation)?;
        Ok(PyEntryPlan::from_plan(self.inner.rules(), &plan))
    }

    #[pyo3(name = "snapshot")]
    fn py_snapshot<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        // With the GIL held: the engine is borrowed (see the module header).
        PyBytes::new(py, &self.inner.snapshot())
    }

    #[staticmethod]
    #[pyo3(name = "restore")]
    fn py_restore(
        py: Python<'_>,
        data: &[u8],
        rules: &Bound<'_, PyExchangeRules>,
    ) -> PyResult<Self> {
        let rules = rules.get().rules().clone();
        let inner = run_detached(py, || ExitEngine::restore(data, rules))?;
        Ok(Self { inner })
    }

    fn __repr__(&self) -> String {
        format!(
            "ExitEngine(positions={}, last_event_ms={})",
            self.inner.positions().len(),
            self.inner
                .last_event_ms()
                .map_or_else(|| "None".to_owned(), |t| t.to_string())
        )
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyExitPolicy>()?;
    m.add_class::<PyExitEngine>()?;
    m.add_class::<PyExitAction>()?;
    m.add_class::<PyPositionView>()?;
    m.add_class::<PyEntryPlan>()?;
    Ok(())
}
