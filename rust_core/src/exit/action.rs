//! `ExitAction` and its vocabulary: the position side, the closing order side
//! and the reason an exit fired.
//!
//! An action is what the engine asks the order router to do: close `quantity`
//! of the position `(symbol, position_side)` with a MARKET order on `side`.
//! `(position_id, sequence)` identifies it within one position instance, and
//! `generation` tells instances of a reused position id apart; the router derives
//! its deterministic clientOrderId from the pair (ids the daemon allocates are never
//! reused, so the pair stays unique there). Quantities and prices are exact
//! decimals on the symbol's grid; their wire strings come from the symbol rules.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::CoreError;
use crate::fixed::Decimal;

/// Binance `positionSide` of a position (hedge-mode naming; one-way positions
/// are LONG when the amount is positive, SHORT when negative).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum PositionSide {
    /// Profits when the price rises; closed by a SELL.
    #[serde(rename = "LONG")]
    Long,
    /// Profits when the price falls; closed by a BUY.
    #[serde(rename = "SHORT")]
    Short,
}

impl PositionSide {
    /// Returns `"LONG"` or `"SHORT"`.
    pub fn as_str(self) -> &'static str {
        match self {
            PositionSide::Long => "LONG",
            PositionSide::Short => "SHORT",
        }
    }

    /// Parses `"LONG"` / `"SHORT"` (case-insensitive).
    ///
    /// # Errors
    /// `CoreError::InvalidField` naming `position_side` for anything else
    /// (including `"BOTH"`: a one-way position is passed with its direction).
    pub fn parse(text: &str) -> Result<Self, CoreError> {
        if text.eq_ignore_ascii_case("LONG") {
            Ok(PositionSide::Long)
        } else if text.eq_ignore_ascii_case("SHORT") {
            Ok(PositionSide::Short)
        } else {
            Err(CoreError::invalid(
                "position_side",
                text,
                "must be \"LONG\" or \"SHORT\"",
            ))
        }
    }

    /// Returns the order side that reduces this position.
    pub fn closing_side(self) -> OrderSide {
        match self {
            PositionSide::Long => OrderSide::Sell,
            PositionSide::Short => OrderSide::Buy,
        }
    }

    /// Returns `+1` for LONG, `-1` for SHORT (profit = sign × (mark − entry)).
    pub fn sign(self) -> Decimal {
        match self {
            PositionSide::Long => Decimal::ONE,
            PositionSide::Short => Decimal::NEGATIVE_ONE,
        }
    }
}

impl fmt::Display for PositionSide {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Binance order `side`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum OrderSide {
    /// `BUY`
    #[serde(rename = "BUY")]
    Buy,
    /// `SELL`
    #[serde(rename = "SELL")]
    Sell,
}

impl OrderSide {
    /// Returns `"BUY"` or `"SELL"`.
    pub fn as_str(self) -> &'static str {
        match self {
            OrderSide::Buy => "BUY",
            OrderSide::Sell => "SELL",
        }
    }
}

impl fmt::Display for OrderSide {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which rule fired. For a stop-out it is the rule that last moved the stop.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExitReason {
    /// The initial stop (ATR / pct / margin cap / liquidation buffer).
    StopLoss,
    /// Take-profit ladder; `n` is the highest level (1-based) crossed.
    TakeProfit(u32),
    /// The stop after it was moved to breakeven plus fees.
    BreakevenStop,
    /// The stop after it was ratcheted to a previous ladder level.
    RatchetStop,
    /// The trailing stop.
    TrailingStop,
    /// The maximum holding time passed.
    TimeStop,
    /// The position's allowed stop distance is below the policy minimum.
    OverLeverage,
}

impl ExitReason {
    /// Returns the wire name: `stop_loss`, `take_profit_N`, `breakeven_stop`,
    /// `ratchet_stop`, `trailing_stop`, `time_stop` or `over_leverage`.
    pub fn name(self) -> String {
        match self {
            ExitReason::TakeProfit(n) => format!("take_profit_{n}"),
            other => other.static_name().to_owned(),
        }
    }

    fn static_name(self) -> &'static str {
        match self {
            ExitReason::StopLoss => "stop_loss",
            ExitReason::TakeProfit(_) => "take_profit",
            ExitReason::BreakevenStop => "breakeven_stop",
            ExitReason::RatchetStop => "ratchet_stop",
            ExitReason::TrailingStop => "trailing_stop",
            ExitReason::TimeStop => "time_stop",
            ExitReason::OverLeverage => "over_leverage",
        }
    }
}

impl fmt::Display for ExitReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExitReason::TakeProfit(n) => write!(f, "take_profit_{n}"),
            other => f.write_str(other.static_name()),
        }
    }
}

/// One exit order the engine asks for. Pending from emission until confirmed
/// or rejected.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitAction {
    /// Caller-chosen position id.
    pub position_id: String,
    /// Symbol, e.g. `BTCUSDT`.
    pub symbol: String,
    /// The position being reduced.
    pub position_side: PositionSide,
    /// The order side that reduces it.
    pub side: OrderSide,
    /// Exact quantity on the `MARKET_LOT_SIZE` grid (a full close may be the
    /// live quantity as the exchange reported it).
    pub quantity: Decimal,
    /// Why it fired.
    pub reason: ExitReason,
    /// The level that was crossed (stop price, take-profit price, or the mark
    /// itself for time stops and over-leverage).
    pub trigger_price: Decimal,
    /// The mark price that triggered it.
    pub mark_price: Decimal,
    /// Per-position sequence number, from 1.
    pub sequence: u64,
    /// True when it closes everything still open.
    pub is_full_close: bool,
    /// Event time (ms) of the mark update that triggered it.
    pub event_time_ms: i64,
    /// The generation of the position instance that emitted it (see
    /// `PositionState::generation`): a stale action of an earlier position with the
    /// same id is refused by `confirm` and `reject`.
    #[serde(default)]
    pub generation: u64,
}
