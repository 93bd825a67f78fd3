//! The only place that names the position API of `crate::exit` for opening and reading a
//! position: opening parameters, the prices that may trigger, and the reason codes of the
//! result tables.
//!
//! May not touch: any exit rule (they stay in `crate::exit::position`).

use crate::error::CoreError;
use crate::exit::action::{ExitReason, PositionSide};
use crate::exit::policy::ExitPolicy;
use crate::exit::position::{OpenParams, PositionState};
use crate::fixed::Decimal;
use crate::rules::SymbolRules;

use super::{Direction, OVER_LEVERAGE, REASONS, TAKE_PROFIT_1};

/// (ATR period, ATR bar interval in ms) of a policy: ATR is computed once per distinct pair.
pub(super) fn atr_key(policy: &ExitPolicy) -> (usize, i64) {
    (policy.config().atr_period as usize, policy.interval_ms())
}

#[allow(clippy::too_many_arguments)]
pub(super) fn new_position(
    rules: &SymbolRules,
    policy: &ExitPolicy,
    trade: u32,
    direction: Direction,
    quantity: Decimal,
    entry_price: Decimal,
    leverage: u32,
    confidence: Option<f64>,
    opened_at_ms: i64,
    atr: Option<f64>,
) -> Result<PositionState, CoreError> {
    let side = match direction {
        Direction::Long => PositionSide::Long,
        Direction::Short => PositionSide::Short,
    };
    let params = OpenParams {
        position_id: format!("bt-{trade}"),
        symbol: rules.symbol.clone(),
        side,
        quantity,
        entry_price,
        leverage,
        confidence,
        opened_at_ms: Some(opened_at_ms),
        liquidation_price: None,
    };
    PositionState::open(params, atr, rules, policy)
}

/// The prices at which the next mark could trigger something: the stop and the pending levels.
pub(super) fn triggers_of(position: &PositionState) -> impl Iterator<Item = Decimal> + '_ {
    let done = (position.levels_done as usize).min(position.ladder_prices.len());
    std::iter::once(position.stop_price).chain(position.ladder_prices[done..].iter().copied())
}

pub(super) fn reason_of(reason: ExitReason) -> u8 {
    match reason {
        ExitReason::StopLoss => 1,
        ExitReason::BreakevenStop => 2,
        ExitReason::RatchetStop => 3,
        ExitReason::TrailingStop => 4,
        ExitReason::TimeStop => 5,
        ExitReason::OverLeverage => OVER_LEVERAGE,
        ExitReason::TakeProfit(n) => {
            let code = u32::from(TAKE_PROFIT_1) + n.saturating_sub(1);
            code.min(REASONS.len() as u32 - 1) as u8
        }
    }
}
