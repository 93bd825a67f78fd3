//! Per-symbol exchange rules from a USDⓈ-M futures `exchangeInfo` document: exact
//! quantization of prices and quantities, and order validation that answers with the
//! Binance code and message an order would get.
//!
//! Invariants:
//! - every filter value is parsed from its string with the strict decimal grammar of
//!   [`crate::fixed`]; nothing passes through `f64`;
//! - quantized prices lie on the `PRICE_FILTER` grid `minPrice + k * tickSize` (Binance's
//!   rule, contract §4.2); quantized quantities on `minQty + k * stepSize` (or
//!   `k * stepSize` below `minQty`); a filter value of 0 disables that part, as on Binance;
//! - quantization never clamps to bounds: an out-of-range result is reported by
//!   [`SymbolRules::check_order`] with the exchange's code, not hidden;
//! - unknown keys and unknown filter types are ignored (they appear over time).

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::CoreError;
use crate::fixed::{
    checked_round_to_grid, checked_round_to_step, format_decimals, is_on_grid, parse_decimal,
    round_to_grid, round_to_step, step_decimals, written_decimals, Decimal, Rounding,
};

/// `PRICE_FILTER`: `minPrice <= price <= maxPrice`, `(price - minPrice) % tickSize == 0`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PriceFilter {
    pub min_price: Decimal,
    pub max_price: Decimal,
    pub tick_size: Decimal,
}

/// `LOT_SIZE` or `MARKET_LOT_SIZE`: `minQty <= qty <= maxQty`, `(qty - minQty) % stepSize == 0`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LotSize {
    pub min_qty: Decimal,
    pub max_qty: Decimal,
    pub step_size: Decimal,
}

/// `PERCENT_PRICE`: a BUY limit price at most `mark * multiplierUp`, a SELL at least
/// `mark * multiplierDown`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PercentPrice {
    pub multiplier_up: Decimal,
    pub multiplier_down: Decimal,
    pub multiplier_decimal: u32,
}

/// The rules of one symbol.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SymbolRules {
    pub symbol: String,
    /// `TRADING`, `PENDING_TRADING`, `SETTLING`, ...: only `TRADING` accepts opening orders.
    pub status: String,
    pub contract_type: String,
    pub base_asset: String,
    pub quote_asset: String,
    pub margin_asset: String,
    /// Maximum decimals accepted in a `price` string (not the tick: contract §4.4).
    pub price_precision: u32,
    /// Maximum decimals accepted in a `quantity` string.
    pub quantity_precision: u32,
    pub price_filter: PriceFilter,
    pub lot_size: LotSize,
    /// `MARKET_LOT_SIZE`; a copy of `LOT_SIZE` when the document has none.
    pub market_lot_size: LotSize,
    /// `MIN_NOTIONAL.notional`; zero when the document has none (check disabled).
    pub min_notional: Decimal,
    pub percent_price: Option<PercentPrice>,
    pub trigger_protect: Option<Decimal>,
    pub market_take_bound: Option<Decimal>,
    pub liquidation_fee: Option<Decimal>,
    pub max_num_orders: Option<u32>,
    pub max_num_algo_orders: Option<u32>,
    /// Accepted `type` values; empty when the document does not list them.
    pub order_types: Vec<String>,
}

/// All symbols of one `exchangeInfo` document, by name (sorted, so snapshots are stable).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExchangeRules {
    symbols: BTreeMap<String, SymbolRules>,
}

impl ExchangeRules {
    /// Parses a futures `exchangeInfo` document (`GET /fapi/v1/exchangeInfo`).
    ///
    /// # Errors
    /// `CoreError::InvalidField` naming the symbol and field for a missing or malformed
    /// required value (symbol, status, precisions, `PRICE_FILTER`, `LOT_SIZE`), a duplicate
    /// symbol, or a document that is not JSON with a `symbols` array.
    pub fn from_json(data: &[u8]) -> Result<Self, CoreError> {
        let doc: Value = serde_json::from_slice(data).map_err(|e| {
            CoreError::invalid(
                "exchangeInfo",
                truncate(data),
                format!("must be JSON ({e})"),
            )
        })?;
        Self::from_value(&doc)
    }

    /// Parses an already decoded `exchangeInfo` document.
    ///
    /// # Errors
    /// As [`ExchangeRules::from_json`].
    pub fn from_value(doc: &Value) -> Result<Self, CoreError> {
        let symbols = doc
            .get("symbols")
            .and_then(Value::as_array)
            .ok_or_else(|| {
                CoreError::invalid(
                    "exchangeInfo.symbols",
                    doc.get("symbols")
                        .map_or_else(|| "missing".to_owned(), short_json),
                    "must be an array of symbol objects",
                )
            })?;
        let mut map = BTreeMap::new();
        for (index, entry) in symbols.iter().enumerate() {
            let rules = SymbolRules::from_value(entry, index)?;
            if map.contains_key(&rules.symbol) {
                return Err(CoreError::invalid_for(
                    &rules.symbol,
                    "symbol",
                    rules.symbol.clone(),
                    "appears twice in exchangeInfo.symbols",
                ));
            }
            map.insert(rules.symbol.clone(), rules);
        }
        Ok(Self { symbols: map })
    }

    /// Builds rules from already parsed symbols (tests, simulators).
    ///
    /// # Errors
    /// `CoreError::InvalidField` for a duplicate symbol.
    pub fn from_symbols(symbols: impl IntoIterator<Item = SymbolRules>) -> Result<Self, CoreError> {
        let mut map = BTreeMap::new();
        for rules in symbols {
            if map.contains_key(&rules.symbol) {
                return Err(CoreError::invalid_for(
                    &rules.symbol,
                    "symbol",
                    rules.symbol.clone(),
                    "appears twice",
                ));
            }
            map.insert(rules.symbol.clone(), rules);
        }
        Ok(Self { symbols: map })
    }

    /// Symbol names, sorted.
    pub fn symbols(&self) -> impl ExactSizeIterator<Item = &str> + '_ {
        self.symbols.keys().map(String::as_str)
    }

    /// Number of symbols.
    pub fn len(&self) -> usize {
        self.symbols.len()
    }

    /// Whether no symbol is loaded.
    pub fn is_empty(&self) -> bool {
        self.symbols.is_empty()
    }

    /// The rules of `symbol`, if loaded.
    pub fn get(&self, symbol: &str) -> Option<&SymbolRules> {
        self.symbols.get(symbol)
    }

    /// The rules of `symbol`.
    ///
    /// # Errors
    /// `CoreError::UnknownSymbol` when it is not loaded.
    pub fn symbol(&self, symbol: &str) -> Result<&SymbolRules, CoreError> {
        self.symbols
            .get(symbol)
            .ok_or_else(|| CoreError::UnknownSymbol {
                symbol: symbol.to_owned(),
            })
    }

    /// Iterates over all symbols' rules, sorted by name.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = &SymbolRules> + '_ {
        self.symbols.values()
    }
}

/// Order side.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Side {
    Buy,
    Sell,
}

impl Side {
    /// Parses `"BUY"` or `"SELL"` (case-insensitive).
    pub fn parse(text: &str) -> Result<Self, CoreError> {
        match text.to_ascii_uppercase().as_str() {
            "BUY" => Ok(Self::Buy),
            "SELL" => Ok(Self::Sell),
            _ => Err(CoreError::invalid(
                "side",
                text,
                "must be \"BUY\" or \"SELL\"",
            )),
        }
    }

    /// The wire spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Buy => "BUY",
            Self::Sell => "SELL",
        }
    }
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Order type (`type` on `POST /fapi/v1/order` and `/fapi/v1/algoOrder`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum OrderType {
    Limit,
    Market,
    Stop,
    StopMarket,
    TakeProfit,
    TakeProfitMarket,
    TrailingStopMarket,
}

impl OrderType {
    const ALL: [Self; 7] = [
        Self::Limit,
        Self::Market,
        Self::Stop,
        Self::StopMarket,
        Self::TakeProfit,
        Self::TakeProfitMarket,
        Self::TrailingStopMarket,
    ];

    /// Parses the wire spelling (case-insensitive), e.g. `"STOP_MARKET"`.
    pub fn parse(text: &str) -> Result<Self, CoreError> {
        let upper = text.to_ascii_uppercase();
        Self::ALL
            .into_iter()
            .find(|t| t.as_str() == upper)
            .ok_or_else(|| {
                CoreError::invalid(
                    "order_type",
                    text,
                    "must be one of LIMIT, MARKET, STOP, STOP_MARKET, TAKE_PROFIT, \
                     TAKE_PROFIT_MARKET, TRAILING_STOP_MARKET",
                )
            })
    }

    /// The wire spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Limit => "LIMIT",
            Self::Market => "MARKET",
            Self::Stop => "STOP",
            Self::StopMarket => "STOP_MARKET",
            Self::TakeProfit => "TAKE_PROFIT",
            Self::TakeProfitMarket => "TAKE_PROFIT_MARKET",
            Self::TrailingStopMarket => "TRAILING_STOP_MARKET",
        }
    }

    /// Whether the order executes as a market order, so `MARKET_LOT_SIZE` applies.
    /// Binance documents `MARKET_LOT_SIZE` for MARKET orders; applying it to the
    /// stop/take-profit/trailing market types too is our reading (they fill as MARKET).
    pub fn is_market(self) -> bool {
        matches!(
            self,
            Self::Market | Self::StopMarket | Self::TakeProfitMarket | Self::TrailingStopMarket
        )
    }

    /// Whether `price` is mandatory.
    pub fn needs_price(self) -> bool {
        matches!(self, Self::Limit | Self::Stop | Self::TakeProfit)
    }

    /// Whether `stopPrice` is mandatory.
    pub fn needs_stop_price(self) -> bool {
        matches!(
            self,
            Self::Stop | Self::StopMarket | Self::TakeProfit | Self::TakeProfitMarket
        )
    }
}

impl fmt::Display for OrderType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An order to validate against one symbol's rules. Values keep the scale they were
/// written with, because the precision check (-1111) counts written decimals.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrderCheck {
    pub side: Side,
    pub order_type: OrderType,
    pub quantity: Decimal,
    pub price: Option<Decimal>,
    pub stop_price: Option<Decimal>,
    /// Current mark price: the notional of market orders and the `PERCENT_PRICE` reference.
    pub mark_price: Option<Decimal>,
    /// Best opposite book price for a MARKET order (ask for BUY, bid for SELL), if known:
    /// enables the -4131 check.
    pub best_price: Option<Decimal>,
    pub reduce_only: bool,
}

impl OrderCheck {
    /// The price the notional (`MIN_NOTIONAL`) is measured at, if one is known: the limit
    /// price for LIMIT/STOP/`TAKE_PROFIT`, the mark price for MARKET and trailing stops, the
    /// stop price for `STOP_MARKET`/`TAKE_PROFIT_MARKET` (they execute near it).
    pub fn notional_price(&self) -> Option<Decimal> {
        match self.order_type {
            OrderType::Limit | OrderType::Stop | OrderType::TakeProfit => self.price,
            OrderType::Market | OrderType::TrailingStopMarket => self.mark_price,
            OrderType::StopMarket | OrderType::TakeProfitMarket => {
                self.stop_price.or(self.mark_price)
            }
        }
    }
}

/// A refusal as Binance would answer it: `{"code": -4164, "msg": "..."}`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct OrderReject {
    pub code: i32,
    pub msg: String,
}

impl OrderReject {
    fn new(code: i32, msg: impl Into<String>) -> Self {
        Self {
            code,
            msg: msg.into(),
        }
    }
}

impl fmt::Display for OrderReject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code, self.msg)
    }
}

/// Binance messages, from the docs error table (`/error-code`) and captured bodies
/// (`tests/data/binance/errors.json`, where the real wording differs from the docs).
mod msg {
    pub const PRECISION: &str = "Precision is over the maximum defined for this asset.";
    pub const INVALID_ORDER_TYPE: &str = "Invalid orderType.";
    pub const PRICE_LE_ZERO: &str = "Price less than 0.";
    pub const PRICE_BELOW_MIN: &str = "Price less than min price.";
    pub const PRICE_ABOVE_MAX: &str = "Price greater than max price.";
    pub const STOP_LE_ZERO: &str = "Stop price less than zero.";
    pub const STOP_ABOVE_MAX: &str = "Stop price greater than max price.";
    pub const NOT_ON_TICK: &str = "Price not increased by tick size.";
    pub const QTY_LE_ZERO: &str = "Quantity less than or equal to zero.";
    pub const QTY_BELOW_MIN: &str = "Quantity less than min quantity.";
    pub const QTY_ABOVE_MAX: &str = "Quantity greater than max quantity.";
    pub const NOT_ON_STEP: &str = "Quantity not increased by step size.";
    pub const MARKET_REJECT: &str =
        "The counterparty's best price does not meet the PERCENT_PRICE filter limit.";
    pub const SYMBOL_STATUS: &str = "Invalid symbol status for opening position.";
}

impl SymbolRules {
    fn from_value(entry: &Value, index: usize) -> Result<Self, CoreError> {
        let obj = entry.as_object().ok_or_else(|| {
            CoreError::invalid(
                format!("exchangeInfo.symbols[{index}]"),
                short_json(entry),
                "must be a symbol object",
            )
        })?;
        let symbol = match obj.get("symbol") {
            Some(Value::String(s)) if !s.is_empty() => s.clone(),
            other => {
                return Err(CoreError::invalid(
                    format!("exchangeInfo.symbols[{index}].symbol"),
                    other.map_or_else(|| "missing".to_owned(), short_json),
                    "must be a non-empty string",
                ))
            }
        };
        let sym = symbol.as_str();
        let filters = index_filters(obj, sym)?;

        let price = filters
            .get("PRICE_FILTER")
            .ok_or_else(|| missing(sym, "PRICE_FILTER"))?;
        let price_filter = PriceFilter {
            min_price: non_negative(sym, "PRICE_FILTER.minPrice", price)?,
            max_price: non_negative(sym, "PRICE_FILTER.maxPrice", price)?,
            tick_size: non_negative(sym, "PRICE_FILTER.tickSize", price)?,
        };
        check_range(
            sym,
            "PRICE_FILTER.maxPrice",
            price_filter.min_price,
            price_filter.max_price,
            "minPrice",
        )?;
        let lot_size = parse_lot(sym, "LOT_SIZE", filters.get("LOT_SIZE").copied())?
            .ok_or_else(|| missing(sym, "LOT_SIZE"))?;
        let market_lot_size = parse_lot(
            sym,
            "MARKET_LOT_SIZE",
            filters.get("MARKET_LOT_SIZE").copied(),
        )?
        .unwrap_or_else(|| lot_size.clone());
        let min_notional = match filters.get("MIN_NOTIONAL") {
            Some(f) => non_negative(sym, "MIN_NOTIONAL.notional", f)?,
            None => Decimal::ZERO,
        };
        let percent_price = match filters.get("PERCENT_PRICE") {
            Some(f) => Some(PercentPrice {
                multiplier_up: positive(sym, "PERCENT_PRICE.multiplierUp", f)?,
                multiplier_down: positive(sym, "PERCENT_PRICE.multiplierDown", f)?,
                multiplier_decimal: optional_u32(sym, "PERCENT_PRICE.multiplierDecimal", f)?
                    .unwrap_or(0),
            }),
            None => None,
        };
        let limit = |name: &str| -> Result<Option<u32>, CoreError> {
            match filters.get(name) {
                Some(f) => optional_u32(sym, &format!("{name}.limit"), f),
                None => Ok(None),
            }
        };

        Ok(Self {
            status: required_str(sym, "status", obj)?.to_owned(),
            contract_type: optional_str(obj, "contractType"),
            base_asset: optional_str(obj, "baseAsset"),
            quote_asset: optional_str(obj, "quoteAsset"),
            margin_asset: optional_str(obj, "marginAsset"),
            price_precision: optional_u32(sym, "pricePrecision", obj)?
                .ok_or_else(|| missing(sym, "pricePrecision"))?,
            quantity_precision: optional_u32(sym, "quantityPrecision", obj)?
                .ok_or_else(|| missing(sym, "quantityPrecision"))?,
            price_filter,
            lot_size,
            market_lot_size,
            min_notional,
            percent_price,
            trigger_protect: optional_decimal(sym, "triggerProtect", obj)?,
            market_take_bound: optional_decimal(sym, "marketTakeBound", obj)?,
            liquidation_fee: optional_decimal(sym, "liquidationFee", obj)?,
            max_num_orders: limit("MAX_NUM_ORDERS")?,
            max_num_algo_orders: limit("MAX_NUM_ALGO_ORDERS")?,
            order_types: obj
                .get("orderTypes")
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(Value::as_str)
                        .map(str::to_owned)
                        .collect()
                })
                .unwrap_or_default(),
            symbol,
        })
    }

    /// Whether the symbol accepts opening orders (`status == "TRADING"`).
    pub fn is_trading(&self) -> bool {
        self.status == "TRADING"
    }

    /// `PRICE_FILTER.tickSize` (zero when the exchange disables the tick check).
    pub fn tick_size(&self) -> Decimal {
        self.price_filter.tick_size
    }

    /// The grid step prices are rounded to: the tick, or `10^-pricePrecision` when the
    /// tick is disabled (0, as for symbols not yet trading).
    pub fn price_step(&self) -> Decimal {
        if self.price_filter.tick_size > Decimal::ZERO {
            self.price_filter.tick_size
        } else {
            Decimal::new(1, self.price_precision.min(28))
        }
    }

    /// Decimals a price prints with (the tick's, trailing zeros dropped).
    pub fn price_decimals(&self) -> u32 {
        step_decimals(self.price_step())
    }

    fn lot(&self, market: bool) -> &LotSize {
        if market {
            &self.market_lot_size
        } else {
            &self.lot_size
        }
    }

    /// The quantity grid step: `MARKET_LOT_SIZE.stepSize` for market orders, `LOT_SIZE`'s otherwise;
    /// `10^-quantityPrecision` when that step is disabled (0).
    pub fn qty_step(&self, market: bool) -> Decimal {
        let step = self.lot(market).step_size;
        if step > Decimal::ZERO {
            step
        } else {
            Decimal::new(1, self.quantity_precision.min(28))
        }
    }

    /// Decimals a quantity prints with.
    pub fn qty_decimals(&self, market: bool) -> u32 {
        step_decimals(self.qty_step(market))
    }

    /// `minQty` of the applicable lot filter.
    pub fn min_qty(&self, market: bool) -> Decimal {
        self.lot(market).min_qty
    }

    /// `maxQty` of the applicable lot filter (zero means no maximum).
    pub fn max_qty(&self, market: bool) -> Decimal {
        self.lot(market).max_qty
    }

    /// `MIN_NOTIONAL.notional` (zero when absent).
    pub fn min_notional(&self) -> Decimal {
        self.min_notional
    }

    /// Rounds a price onto the tick grid `minPrice + k * tickSize` in the given direction.
    /// Bounds are not applied (see [`SymbolRules::check_order`]). With the tick disabled,
    /// rounds to `pricePrecision` decimals.
    pub fn quantize_price(&self, price: Decimal, rounding: Rounding) -> Decimal {
        let filter = &self.price_filter;
        if filter.tick_size > Decimal::ZERO {
            round_to_grid(price, filter.min_price, filter.tick_size, rounding)
        } else {
            round_to_step(price, self.price_step(), rounding)
        }
    }

    /// [`SymbolRules::quantize_price`] for outside input: an error naming `price`
    /// instead of an unrounded value when no grid point exists in the rounding direction
    /// (a value within one tick of `Decimal`'s limit, about 7.9e28).
    ///
    /// # Errors
    /// `CoreError::InvalidField` for such a value.
    pub fn try_quantize_price(
        &self,
        price: Decimal,
        rounding: Rounding,
    ) -> Result<Decimal, CoreError> {
        let filter = &self.price_filter;
        let rounded = if filter.tick_size > Decimal::ZERO {
            checked_round_to_grid(price, filter.min_price, filter.tick_size, rounding)
        } else {
            checked_round_to_step(price, self.price_step(), rounding)
        };
        rounded.ok_or_else(|| {
            CoreError::invalid_for(
                &self.symbol,
                "price",
                price.to_string(),
                "has no tick-grid point within the exact decimal range (about 7.9e28)",
            )
        })
    }

    /// [`SymbolRules::quantize_qty`] for outside input: an error naming `quantity`
    /// when the value cannot be floored onto the grid within `Decimal`'s range.
    ///
    /// # Errors
    /// `CoreError::InvalidField` for such a value.
    pub fn try_quantize_qty(&self, qty: Decimal, market: bool) -> Result<Decimal, CoreError> {
        let lot = self.lot(market);
        let step = self.qty_step(market);
        let floored = if qty >= lot.min_qty && lot.step_size > Decimal::ZERO {
            checked_round_to_grid(qty, lot.min_qty, step, Rounding::Down)
        } else {
            checked_round_to_step(qty, step, Rounding::Down)
        };
        floored.map(|q| q.max(Decimal::ZERO)).ok_or_else(|| {
            CoreError::invalid_for(
                &self.symbol,
                "quantity",
                qty.to_string(),
                "has no step-grid point within the exact decimal range (about 7.9e28)",
            )
        })
    }

    /// Whether `qty` lies on the lot grid exactly (what `quantize_qty` leaves unchanged).
    pub fn is_on_qty_step(&self, qty: Decimal, market: bool) -> bool {
        self.try_quantize_qty(qty, market).is_ok_and(|q| q == qty)
    }

    /// Floors a quantity onto the lot grid (`MARKET_LOT_SIZE` when `market`, `LOT_SIZE`
    /// otherwise), so an exit never sells more than asked. The grid starts at `minQty`
    /// (`(qty - minQty) % stepSize == 0`); below `minQty` the result is a plain multiple of
    /// the step (possibly zero, never negative) and `check_order` reports it as -4004.
    /// `maxQty` is not applied.
    pub fn quantize_qty(&self, qty: Decimal, market: bool) -> Decimal {
        let lot = self.lot(market);
        let step = self.qty_step(market);
        let floored = if qty >= lot.min_qty && lot.step_size > Decimal::ZERO {
            round_to_grid(qty, lot.min_qty, step, Rounding::Down)
        } else {
            round_to_step(qty, step, Rounding::Down)
        };
        floored.max(Decimal::ZERO)
    }

    /// Formats a price with exactly the tick's decimals (`30120.0` for tick `0.10`).
    pub fn format_price(&self, price: Decimal) -> String {
        format_decimals(price, self.price_decimals())
    }

    /// Formats a quantity with exactly the step's decimals.
    pub fn format_qty(&self, qty: Decimal, market: bool) -> String {
        format_decimals(qty, self.qty_decimals(market))
    }

    /// The symbol's filters as display strings, keyed by `snake_case` name (for sizing code
    /// and dashboards). Optional values are omitted when absent.
    pub fn info(&self) -> Vec<(&'static str, String)> {
        let d = |v: Decimal| v.normalize().to_string();
        let mut out = vec![
            ("symbol", self.symbol.clone()),
            ("status", self.status.clone()),
            ("contract_type", self.contract_type.clone()),
            ("base_asset", self.base_asset.clone()),
            ("quote_asset", self.quote_asset.clone()),
            ("margin_asset", self.margin_asset.clone()),
            ("price_precision", self.price_precision.to_string()),
            ("quantity_precision", self.quantity_precision.to_string()),
            ("tick_size", d(self.price_filter.tick_size)),
            ("min_price", d(self.price_filter.min_price)),
            ("max_price", d(self.price_filter.max_price)),
            ("step_size", d(self.lot_size.step_size)),
            ("min_qty", d(self.lot_size.min_qty)),
            ("max_qty", d(self.lot_size.max_qty)),
            ("market_step_size", d(self.market_lot_size.step_size)),
            ("market_min_qty", d(self.market_lot_size.min_qty)),
            ("market_max_qty", d(self.market_lot_size.max_qty)),
            ("min_notional", d(self.min_notional)),
        ];
        if let Some(p) = &self.percent_price {
            out.push(("multiplier_up", d(p.multiplier_up)));
            out.push(("multiplier_down", d(p.multiplier_down)));
        }
        let optional = [
            ("trigger_protect", self.trigger_protect),
            ("market_take_bound", self.market_take_bound),
            ("liquidation_fee", self.liquidation_fee),
        ];
        for (name, value) in optional {
            if let Some(v) = value {
                out.push((name, d(v)));
            }
        }
        if let Some(v) = self.max_num_orders {
            out.push(("max_num_orders", v.to_string()));
        }
        if let Some(v) = self.max_num_algo_orders {
            out.push(("max_num_algo_orders", v.to_string()));
        }
        out
    }

    /// Validates an order the way Binance would and returns its refusal, or `None`.
    ///
    /// Checks run in the contract's order (§4.5), first failure wins: mandatory
    /// parameters (-1102), order type (-1116),
    /// precision (-1111), `PRICE_FILTER` on price then `stopPrice` (-4001/-4013/-4002/-4014,
    /// -4006/-4013/-4007/-4014), `LOT_SIZE` or `MARKET_LOT_SIZE` (-4003/-4004/-4005/-4023),
    /// `PERCENT_PRICE` (-4016/-4024 for a limit price, -4131 for a MARKET order when the
    /// best opposite price is given), `MIN_NOTIONAL` (-4164, reduce-only exempt; skipped
    /// when no reference price is known, see [`OrderCheck::notional_price`]), then the
    /// symbol status for opening orders (-4140). The exact order Binance applies is not
    /// documented; tests must not depend on which of two violations wins.
    ///
    /// A missing mandatory `price` or `stopPrice` gives -1102 first, as Binance does.
    pub fn check_order(&self, order: &OrderCheck) -> Option<OrderReject> {
        let missing = if order.order_type.needs_price() && order.price.is_none() {
            Some("price")
        } else if order.order_type.needs_stop_price() && order.stop_price.is_none() {
            Some("stopPrice")
        } else {
            None
        };
        if let Some(name) = missing {
            return Some(OrderReject::new(
                -1102,
                format!("Mandatory parameter '{name}' was not sent, was empty/null, or malformed."),
            ));
        }
        if !self.order_types.is_empty()
            && !self
                .order_types
                .iter()
                .any(|t| t == order.order_type.as_str())
        {
            return Some(OrderReject::new(-1116, msg::INVALID_ORDER_TYPE));
        }
        self.check_precision(order)
            .or_else(|| self.check_price_filter(order))
            .or_else(|| self.check_lot(order))
            .or_else(|| self.check_percent_price(order))
            .or_else(|| self.check_min_notional(order))
            .or_else(|| {
                (!order.reduce_only && !self.is_trading())
                    .then(|| OrderReject::new(-4140, msg::SYMBOL_STATUS))
            })
    }

    fn check_precision(&self, order: &OrderCheck) -> Option<OrderReject> {
        let price_too_fine = [order.price, order.stop_price]
            .into_iter()
            .flatten()
            .any(|p| written_decimals(p) > self.price_precision);
        let qty_too_fine = written_decimals(order.quantity) > self.quantity_precision;
        (price_too_fine || qty_too_fine).then(|| OrderReject::new(-1111, msg::PRECISION))
    }

    fn check_price_filter(&self, order: &OrderCheck) -> Option<OrderReject> {
        let f = &self.price_filter;
        if let Some(price) = order.price {
            if price <= Decimal::ZERO {
                return Some(OrderReject::new(-4001, msg::PRICE_LE_ZERO));
            }
            if f.min_price > Decimal::ZERO && price < f.min_price {
                return Some(OrderReject::new(-4013, msg::PRICE_BELOW_MIN));
            }
            if f.max_price > Decimal::ZERO && price > f.max_price {
                return Some(OrderReject::new(-4002, msg::PRICE_ABOVE_MAX));
            }
            if !is_on_grid(price, f.min_price, f.tick_size) {
                return Some(OrderReject::new(-4014, msg::NOT_ON_TICK));
            }
        }
        if let Some(stop) = order.stop_price {
            if stop <= Decimal::ZERO {
                return Some(OrderReject::new(-4006, msg::STOP_LE_ZERO));
            }
            if f.min_price > Decimal::ZERO && stop < f.min_price {
                return Some(OrderReject::new(-4013, msg::PRICE_BELOW_MIN));
            }
            if f.max_price > Decimal::ZERO && stop > f.max_price {
                return Some(OrderReject::new(-4007, msg::STOP_ABOVE_MAX));
            }
            if !is_on_grid(stop, f.min_price, f.tick_size) {
                return Some(OrderReject::new(-4014, msg::NOT_ON_TICK));
            }
        }
        None
    }

    fn check_lot(&self, order: &OrderCheck) -> Option<OrderReject> {
        let lot = self.lot(order.order_type.is_market());
        let qty = order.quantity;
        if qty <= Decimal::ZERO {
            return Some(OrderReject::new(-4003, msg::QTY_LE_ZERO));
        }
        if qty < lot.min_qty {
            return Some(OrderReject::new(-4004, msg::QTY_BELOW_MIN));
        }
        if lot.max_qty > Decimal::ZERO && qty > lot.max_qty {
            return Some(OrderReject::new(-4005, msg::QTY_ABOVE_MAX));
        }
        if !is_on_grid(qty, lot.min_qty, lot.step_size) {
            return Some(OrderReject::new(-4023, msg::NOT_ON_STEP));
        }
        None
    }

    fn check_percent_price(&self, order: &OrderCheck) -> Option<OrderReject> {
        let band = self.percent_price.as_ref()?;
        let mark = order.mark_price?;
        // Overflow only for absurd inputs (beyond 7.9e28): then no band can be computed.
        let cap = mark.checked_mul(band.multiplier_up)?;
        let floor = mark.checked_mul(band.multiplier_down)?;
        if order.order_type == OrderType::Market {
            let best = order.best_price?;
            let outside = match order.side {
                Side::Buy => best > cap,
                Side::Sell => best < floor,
            };
            return outside.then(|| OrderReject::new(-4131, msg::MARKET_REJECT));
        }
        let price = order.price?;
        // The message quotes the limit as the nearest price the order could use: the cap
        // floored, the floor raised, onto the tick grid (real body: "Limit price can't be
        // higher than 9953.53").
        match order.side {
            Side::Buy if price > cap => Some(OrderReject::new(
                -4016,
                format!(
                    "Limit price can't be higher than {}",
                    self.format_price(self.quantize_price(cap, Rounding::Down))
                ),
            )),
            Side::Sell if price < floor => Some(OrderReject::new(
                -4024,
                format!(
                    "Limit price can't be lower than {}",
                    self.format_price(self.quantize_price(floor, Rounding::Up))
                ),
            )),
            _ => None,
        }
    }

    fn check_min_notional(&self, order: &OrderCheck) -> Option<OrderReject> {
        if order.reduce_only || self.min_notional <= Decimal::ZERO {
            return None;
        }
        let reference = order.notional_price()?;
        // An overflowing notional is far above any minimum.
        let notional = reference.checked_mul(order.quantity)?;
        (notional < self.min_notional).then(|| {
            OrderReject::new(
                -4164,
                format!(
                    "Order's notional must be no smaller than {} (unless you choose reduce only).",
                    self.min_notional.normalize()
                ),
            )
        })
    }
}

fn index_filters<'a>(
    obj: &'a Map<String, Value>,
    sym: &str,
) -> Result<BTreeMap<&'a str, &'a Map<String, Value>>, CoreError> {
    let filters = obj
        .get("filters")
        .and_then(Value::as_array)
        .ok_or_else(|| {
            CoreError::invalid_for(
                sym,
                "filters",
                obj.get("filters")
                    .map_or_else(|| "missing".to_owned(), short_json),
                "must be an array of filter objects",
            )
        })?;
    let mut out = BTreeMap::new();
    for (i, f) in filters.iter().enumerate() {
        let fobj = f.as_object().ok_or_else(|| {
            CoreError::invalid_for(
                sym,
                format!("filters[{i}]"),
                short_json(f),
                "must be an object",
            )
        })?;
        let kind = fobj
            .get("filterType")
            .and_then(Value::as_str)
            .ok_or_else(|| {
                CoreError::invalid_for(
                    sym,
                    format!("filters[{i}].filterType"),
                    fobj.get("filterType")
                        .map_or_else(|| "missing".to_owned(), short_json),
                    "must be a string",
                )
            })?;
        out.insert(kind, fobj);
    }
    Ok(out)
}

fn parse_lot(
    sym: &str,
    name: &str,
    filter: Option<&Map<String, Value>>,
) -> Result<Option<LotSize>, CoreError> {
    let Some(f) = filter else { return Ok(None) };
    let lot = LotSize {
        min_qty: non_negative(sym, &format!("{name}.minQty"), f)?,
        max_qty: non_negative(sym, &format!("{name}.maxQty"), f)?,
        step_size: non_negative(sym, &format!("{name}.stepSize"), f)?,
    };
    check_range(
        sym,
        &format!("{name}.maxQty"),
        lot.min_qty,
        lot.max_qty,
        "minQty",
    )?;
    Ok(Some(lot))
}

/// A maximum below its minimum makes every value invalid: a malformed document. A zero
/// maximum means "no maximum" (Binance's convention), so it passes.
fn check_range(
    sym: &str,
    max_field: &str,
    min: Decimal,
    max: Decimal,
    min_name: &str,
) -> Result<(), CoreError> {
    if max > Decimal::ZERO && max < min {
        return Err(CoreError::invalid_for(
            sym,
            max_field,
            max.to_string(),
            format!("is below {min_name} {min}"),
        ));
    }
    Ok(())
}

fn missing(sym: &str, field: &str) -> CoreError {
    CoreError::invalid_for(sym, field, "missing", "is required in exchangeInfo")
}

/// The key after the last `.` of a dotted field path (`PRICE_FILTER.tickSize` -> `tickSize`).
fn key_of(path: &str) -> &str {
    path.rsplit('.').next().unwrap_or(path)
}

fn decimal_value(sym: &str, path: &str, value: &Value) -> Result<Decimal, CoreError> {
    match value {
        Value::String(s) => parse_decimal(path, s).map_err(|e| e.with_symbol(sym)),
        // Some documents carry numbers; their shortest text is what the sender wrote.
        Value::Number(n) => parse_decimal(path, &n.to_string()).map_err(|e| e.with_symbol(sym)),
        other => Err(CoreError::invalid_for(
            sym,
            path,
            short_json(other),
            "must be a decimal string",
        )),
    }
}

fn required_decimal(sym: &str, path: &str, obj: &Map<String, Value>) -> Result<Decimal, CoreError> {
    let value = obj.get(key_of(path)).ok_or_else(|| missing(sym, path))?;
    decimal_value(sym, path, value)
}

/// The largest filter value accepted (1e15; the real document's largest is 4e9): with
/// every price, step and quantity below it, the exit rules' arithmetic (a stop one tick
/// beyond an entry, `level × R`, `quantity × price`) stays far inside `Decimal`'s range.
const MAX_FILTER_VALUE: Decimal = Decimal::from_parts(2_764_472_320, 232_830, 0, false, 0);

fn non_negative(sym: &str, path: &str, obj: &Map<String, Value>) -> Result<Decimal, CoreError> {
    let v = required_decimal(sym, path, obj)?;
    if v < Decimal::ZERO {
        return Err(CoreError::invalid_for(
            sym,
            path,
            v.to_string(),
            "must not be negative",
        ));
    }
    if v > MAX_FILTER_VALUE {
        return Err(CoreError::invalid_for(
            sym,
            path,
            v.to_string(),
            "must be at most 1e15",
        ));
    }
    Ok(v)
}

fn positive(sym: &str, path: &str, obj: &Map<String, Value>) -> Result<Decimal, CoreError> {
    let v = required_decimal(sym, path, obj)?;
    if v <= Decimal::ZERO {
        return Err(CoreError::invalid_for(
            sym,
            path,
            v.to_string(),
            "must be positive",
        ));
    }
    Ok(v)
}

fn optional_decimal(
    sym: &str,
    path: &str,
    obj: &Map<String, Value>,
) -> Result<Option<Decimal>, CoreError> {
    match obj.get(key_of(path)) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => decimal_value(sym, path, v).map(Some),
    }
}

fn optional_u32(sym: &str, path: &str, obj: &Map<String, Value>) -> Result<Option<u32>, CoreError> {
    let bad = |v: &Value| {
        CoreError::invalid_for(sym, path, short_json(v), "must be a non-negative integer")
    };
    match obj.get(key_of(path)) {
        None | Some(Value::Null) => Ok(None),
        Some(v @ Value::Number(n)) => n
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .map(Some)
            .ok_or_else(|| bad(v)),
        Some(v @ Value::String(s)) => s.parse::<u32>().map(Some).map_err(|_| bad(v)),
        Some(v) => Err(bad(v)),
    }
}

fn required_str<'a>(
    sym: &str,
    field: &str,
    obj: &'a Map<String, Value>,
) -> Result<&'a str, CoreError> {
    match obj.get(field) {
        Some(Value::String(s)) => Ok(s),
        Some(v) => Err(CoreError::invalid_for(
            sym,
            field,
            short_json(v),
            "must be a string",
        )),
        None => Err(missing(sym, field)),
    }
}

fn optional_str(obj: &Map<String, Value>, field: &str) -> String {
    obj.get(field)
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned()
}

fn short_json(value: &Value) -> String {
    let text = value.to_string();
    if text.len() > 80 {
        let cut = text.char_indices().nth(77).map_or(text.len(), |(i, _)| i);
        format!("{}...", &text[..cut])
    } else {
        text
    }
}

fn truncate(data: &[u8]) -> String {
    let text = String::from_utf8_lossy(&data[..data.len().min(80)]).into_owned();
    if data.len() > 80 {
        format!("{text}...")
    } else {
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC: &str = r#"{"symbols":[
      {"symbol":"BTCUSDT","status":"TRADING","pricePrecision":2,"quantityPrecision":3,
       "triggerProtect":"0.0500","marketTakeBound":"0.30","contractType":"PERPETUAL",
       "orderTypes":["LIMIT","MARKET","STOP","STOP_MARKET","TAKE_PROFIT","TAKE_PROFIT_MARKET","TRAILING_STOP_MARKET"],
       "filters":[
        {"maxPrice":"809484","tickSize":"0.10","filterType":"PRICE_FILTER","minPrice":"261.10"},
        {"stepSize":"0.001","filterType":"LOT_SIZE","minQty":"0.001","maxQty":"1000"},
        {"minQty":"0.001","filterType":"MARKET_LOT_SIZE","stepSize":"0.001","maxQty":"120"},
        {"limit":200,"filterType":"MAX_NUM_ORDERS"},
        {"filterType":"MAX_NUM_ALGO_ORDERS","limit":10},
        {"filterType":"MIN_NOTIONAL","notional":"100"},
        {"multiplierDown":"0.9500","multiplierUp":"1.0500","multiplierDecimal":"4","filterType":"PERCENT_PRICE"},
        {"positionControlSide":"NONE","filterType":"POSITION_RISK_CONTROL"}]},
      {"symbol":"OPENUSDT","status":"PENDING_TRADING","pricePrecision":4,"quantityPrecision":0,
       "filters":[
        {"filterType":"PRICE_FILTER","minPrice":"0","maxPrice":"200","tickSize":"0"},
        {"stepSize":"1","filterType":"LOT_SIZE","minQty":"1","maxQty":"100000"}]}
    ]}"#;

    fn d(s: &str) -> Decimal {
        parse_decimal("v", s).unwrap()
    }

    fn rules() -> ExchangeRules {
        ExchangeRules::from_json(DOC.as_bytes()).unwrap()
    }

    fn order(side: Side, order_type: OrderType, qty: &str, price: Option<&str>) -> OrderCheck {
        OrderCheck {
            side,
            order_type,
            quantity: d(qty),
            price: price.map(d),
            stop_price: None,
            mark_price: None,
            best_price: None,
            reduce_only: false,
        }
    }

    #[test]
    fn parses_filters_and_extras() {
        let r = rules();
        assert_eq!(r.symbols().collect::<Vec<_>>(), ["BTCUSDT", "OPENUSDT"]);
        let btc = r.symbol("BTCUSDT").unwrap();
        assert_eq!(btc.tick_size(), d("0.10"));
        assert_eq!(btc.max_qty(true), d("120"));
        assert_eq!(btc.max_qty(false), d("1000"));
        assert_eq!(btc.min_notional(), d("100"));
        assert_eq!(btc.max_num_algo_orders, Some(10));
        assert_eq!(btc.trigger_protect, Some(d("0.0500")));
        assert_eq!(btc.percent_price.as_ref().unwrap().multiplier_decimal, 4);
        assert!(btc.is_trading());
        let open = r.symbol("OPENUSDT").unwrap();
        assert_eq!(open.market_lot_size, open.lot_size);
        assert_eq!(open.min_notional(), Decimal::ZERO);
        assert!(!open.is_trading());
    }

    #[test]
    fn absurd_filter_values_are_refused() {
        // A tickSize of 7.9e28 made every stop one tick beyond an entry overflow.
        let bad = DOC.replace(
            r#""tickSize":"0.10""#,
            r#""tickSize":"79228162514264337593543950335""#,
        );
        let err = ExchangeRules::from_json(bad.as_bytes()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "PRICE_FILTER.tickSize 79228162514264337593543950335 for BTCUSDT must be at most 1e15"
        );
        assert_eq!(MAX_FILTER_VALUE, d("1000000000000000"));
    }

    #[test]
    fn unknown_symbol_names_it() {
        let err = rules().symbol("NOPEUSDT").unwrap_err();
        assert_eq!(
            err.to_string(),
            "unknown symbol NOPEUSDT: it is not in the loaded exchange rules"
        );
    }

    #[test]
    fn malformed_documents_name_symbol_and_field() {
        let bad = DOC.replace(r#""tickSize":"0.10""#, r#""tickSize":"1e-1""#);
        let err = ExchangeRules::from_json(bad.as_bytes()).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("PRICE_FILTER.tickSize 1e-1 for BTCUSDT must be a plain decimal"),
            "{err}"
        );
        let bad = DOC.replace(
            r#""stepSize":"1","filterType":"LOT_SIZE""#,
            r#""filterType":"LOT_SIZE""#,
        );
        let err = ExchangeRules::from_json(bad.as_bytes()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "LOT_SIZE.stepSize missing for OPENUSDT is required in exchangeInfo"
        );
        let bad = DOC.replace(r#""pricePrecision":2"#, r#""pricePrecision":-2"#);
        let err = ExchangeRules::from_json(bad.as_bytes()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "pricePrecision -2 for BTCUSDT must be a non-negative integer"
        );
        let err = ExchangeRules::from_json(b"{\"symbols\": 3}").unwrap_err();
        assert_eq!(
            err.to_string(),
            "exchangeInfo.symbols 3 must be an array of symbol objects"
        );
        assert!(ExchangeRules::from_json(b"not json").is_err());
        let bad = DOC.replace(r#""maxQty":"120""#, r#""maxQty":"0.0001""#);
        let err = ExchangeRules::from_json(bad.as_bytes()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "MARKET_LOT_SIZE.maxQty 0.0001 for BTCUSDT is below minQty 0.001"
        );
        let bad = DOC.replace(r#""maxPrice":"809484""#, r#""maxPrice":"100""#);
        let err = ExchangeRules::from_json(bad.as_bytes()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "PRICE_FILTER.maxPrice 100 for BTCUSDT is below minPrice 261.10"
        );
        let dup = DOC.replace("OPENUSDT", "BTCUSDT");
        let err = ExchangeRules::from_json(dup.as_bytes()).unwrap_err();
        assert!(err.to_string().contains("appears twice"), "{err}");
    }

    #[test]
    fn quantizes_price_on_the_min_price_grid() {
        let r = rules();
        let btc = r.symbol("BTCUSDT").unwrap();
        let q = |p: &str, mode| btc.format_price(btc.quantize_price(d(p), mode));
        assert_eq!(q("30120.07", Rounding::Down), "30120.0");
        assert_eq!(q("30120.07", Rounding::Up), "30120.1");
        assert_eq!(q("30120.05", Rounding::Nearest), "30120.1");
        assert_eq!(q("30120", Rounding::Up), "30120.0");
        // Tick disabled: rounds to pricePrecision decimals.
        let open = r.symbol("OPENUSDT").unwrap();
        assert_eq!(
            open.format_price(open.quantize_price(d("1.234567"), Rounding::Down)),
            "1.2345"
        );
    }

    #[test]
    fn quantizes_qty_down_to_the_right_lot() {
        let r = rules();
        let btc = r.symbol("BTCUSDT").unwrap();
        assert_eq!(
            btc.format_qty(btc.quantize_qty(d("0.0039"), true), true),
            "0.003"
        );
        assert_eq!(
            btc.format_qty(btc.quantize_qty(d("0.0005"), false), false),
            "0.000"
        );
        assert_eq!(
            btc.format_qty(btc.quantize_qty(d("5"), true), true),
            "5.000"
        );
        let open = r.symbol("OPENUSDT").unwrap();
        assert_eq!(
            open.format_qty(open.quantize_qty(d("7.9"), true), true),
            "7"
        );
    }

    #[test]
    fn check_order_codes() {
        let r = rules();
        let btc = r.symbol("BTCUSDT").unwrap();
        let code = |o: &OrderCheck| btc.check_order(o).map(|r| r.code);
        let limit = |qty: &str, price: &str| order(Side::Buy, OrderType::Limit, qty, Some(price));

        assert_eq!(code(&limit("0.01", "30120.0")), None);
        assert_eq!(code(&limit("0.0100", "30120.0")), Some(-1111));
        assert_eq!(code(&limit("0.01", "30120.001")), Some(-1111));
        assert_eq!(code(&limit("0.01", "30120.07")), Some(-4014));
        assert_eq!(code(&limit("0.01", "261.0")), Some(-4013));
        assert_eq!(code(&limit("0.01", "900000")), Some(-4002));
        assert_eq!(code(&limit("0.01", "0")), Some(-4001));
        assert_eq!(code(&limit("0", "30120.0")), Some(-4003));
        assert_eq!(code(&limit("1001", "30120.0")), Some(-4005));
        let mut market = order(Side::Buy, OrderType::Market, "121", None);
        market.mark_price = Some(d("30000"));
        assert_eq!(code(&market), Some(-4005));
        market.quantity = d("0.001");
        let reject = btc.check_order(&market).unwrap();
        assert_eq!(reject.code, -4164);
        assert_eq!(
            reject.msg,
            "Order's notional must be no smaller than 100 (unless you choose reduce only)."
        );
        market.reduce_only = true;
        assert_eq!(code(&market), None);

        let mut stop = order(Side::Sell, OrderType::StopMarket, "0.01", None);
        stop.stop_price = Some(d("900000.0"));
        assert_eq!(code(&stop), Some(-4007));
        stop.stop_price = Some(d("-1"));
        assert_eq!(code(&stop), Some(-4006));
        stop.stop_price = None;
        let reject = btc.check_order(&stop).unwrap();
        assert_eq!(reject.code, -1102);
        assert_eq!(
            reject.msg,
            "Mandatory parameter 'stopPrice' was not sent, was empty/null, or malformed."
        );
        assert_eq!(
            code(&order(Side::Buy, OrderType::Limit, "1", None)),
            Some(-1102)
        );
    }

    #[test]
    fn step_and_min_qty_codes() {
        let doc = DOC.replace(
            r#"{"stepSize":"0.001","filterType":"LOT_SIZE","minQty":"0.001","maxQty":"1000"}"#,
            r#"{"stepSize":"0.002","filterType":"LOT_SIZE","minQty":"0.002","maxQty":"1000"}"#,
        );
        let r = ExchangeRules::from_json(doc.as_bytes()).unwrap();
        let btc = r.symbol("BTCUSDT").unwrap();
        let o = order(Side::Buy, OrderType::Limit, "0.005", Some("30000.0"));
        assert_eq!(btc.check_order(&o).unwrap().code, -4023);
        let o = order(Side::Buy, OrderType::Limit, "0.001", Some("30000.0"));
        assert_eq!(btc.check_order(&o).unwrap().code, -4004);
    }

    #[test]
    fn percent_price_band() {
        let r = rules();
        let btc = r.symbol("BTCUSDT").unwrap();
        let mut buy = order(Side::Buy, OrderType::Limit, "0.01", Some("31600.0"));
        buy.mark_price = Some(d("30000.03"));
        let reject = btc.check_order(&buy).unwrap();
        assert_eq!(reject.code, -4016);
        assert_eq!(reject.msg, "Limit price can't be higher than 31500.0");
        let mut sell = order(Side::Sell, OrderType::Limit, "0.01", Some("28400.0"));
        sell.mark_price = Some(d("30000.03"));
        let reject = btc.check_order(&sell).unwrap();
        assert_eq!(reject.code, -4024);
        assert_eq!(reject.msg, "Limit price can't be lower than 28500.1");
        let mut market = order(Side::Buy, OrderType::Market, "0.01", None);
        market.mark_price = Some(d("30000"));
        market.best_price = Some(d("31500.1"));
        assert_eq!(btc.check_order(&market).unwrap().code, -4131);
        market.best_price = Some(d("31500"));
        assert_eq!(btc.check_order(&market), None);
    }

    #[test]
    fn status_blocks_opening_but_not_reducing() {
        let r = rules();
        let open = r.symbol("OPENUSDT").unwrap();
        let mut o = order(Side::Buy, OrderType::Limit, "10", Some("1.5"));
        assert_eq!(open.check_order(&o).unwrap().code, -4140);
        o.reduce_only = true;
        assert_eq!(open.check_order(&o), None);
    }

    #[test]
    fn order_type_not_offered_is_rejected() {
        let doc = DOC.replace(r#""TRAILING_STOP_MARKET"]"#, r#""MARKET"]"#);
        let r = ExchangeRules::from_json(doc.as_bytes()).unwrap();
        let btc = r.symbol("BTCUSDT").unwrap();
        let mut o = order(Side::Sell, OrderType::TrailingStopMarket, "0.01", None);
        o.reduce_only = true;
        assert_eq!(btc.check_order(&o).unwrap().code, -1116);
    }

    #[test]
    fn rules_round_trip_through_serde() {
        let r = rules();
        let json = serde_json::to_string(&r).unwrap();
        let back: ExchangeRules = serde_json::from_str(&json).unwrap();
        assert_eq!(back, r);
    }

    #[test]
    fn parses_enums() {
        assert_eq!(
            OrderType::parse("stop_market").unwrap(),
            OrderType::StopMarket
        );
        assert!(OrderType::parse("ICEBERG").is_err());
        assert_eq!(Side::parse("sell").unwrap(), Side::Sell);
        assert_eq!(
            Side::parse("LONG").unwrap_err().to_string(),
            "side LONG must be \"BUY\" or \"SELL\""
        );
    }
}
