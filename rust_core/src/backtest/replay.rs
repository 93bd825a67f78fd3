//! The decimal replay of one (series, policy) job, the reference the integer replay
//! (`tick_replay`) is checked against: every mark of every bar's path, and every trigger a
//! move between two marks crosses, goes through `PositionState::on_mark`; the fill model,
//! fees and the fills and trades it books. `BacktestOptions::exhaustive` selects it, and a
//! job the integers cannot hold falls back to it.
//!
//! May not touch: the prepared bars (read-only, shared by all jobs) or another job's
//! state; exits are decided only by `PositionState`, never here.

use std::convert::Infallible;

use crate::exit::policy::ExitPolicy;
use crate::exit::position::{Confirmed, PositionState};
use crate::fixed::Decimal;
use crate::rules::SymbolRules;

use super::exit_api::{new_position, reason_of, triggers_of};
use super::path::{bar_path, Point};
use super::prepare::Prepared;
use super::thresholds::atr_at;
use super::walk::{entry_fill, entry_quantity, entry_rate, walk, Record, Replay};
use super::{to_f64, BacktestOptions, Direction, Entry, Fill, JobOutput, Trade, OVER_LEVERAGE};

pub(super) fn fee(rate: Decimal, price: Decimal, quantity: Decimal) -> Decimal {
    (rate * price * quantity)
        .round_dp_with_strategy(8, rust_decimal::RoundingStrategy::MidpointAwayFromZero)
}

pub(super) struct Open {
    pub(super) trade: u32,
    pub(super) position: PositionState,
    pub(super) direction: Direction,
    pub(super) entry_time_ms: i64,
    pub(super) entry_price: Decimal,
    pub(super) quantity: Decimal,
    pub(super) remaining: Decimal,
    pub(super) initial_stop: Decimal,
    pub(super) risk_price: Decimal,
    /// `to_f64` of the entry price, the side's sign and R, for the `r` column of each fill.
    pub(super) r_floats: (f64, f64, f64),
    pub(super) pnl: Decimal,
    pub(super) fees: Decimal,
    pub(super) confidence: Option<f64>,
    pub(super) bars_held: u32,
    pub(super) sequence: u32,
}

pub(super) struct Job<'a> {
    pub(super) p: &'a Prepared<'a>,
    pub(super) policy: &'a ExitPolicy,
    pub(super) rules: &'a SymbolRules,
    pub(super) options: &'a BacktestOptions,
    /// ATR before each bar, NaN while not ready (see [`atr_at`]).
    pub(super) atr: &'a [f64],
    pub(super) record: Record,
    pub(super) open: Vec<Open>,
    pub(super) next_trade: u32,
    pub(super) path: Vec<Point>,
    pub(super) crossing_prices: Vec<Decimal>,
}

impl<'a> Job<'a> {
    pub(super) fn new(
        p: &'a Prepared<'a>,
        policy: &'a ExitPolicy,
        options: &'a BacktestOptions,
        atr: &'a [f64],
        record: Record,
    ) -> Self {
        Self {
            p,
            policy,
            rules: p.rules,
            options,
            atr,
            record,
            open: Vec::new(),
            next_trade: 0,
            path: Vec::with_capacity(8),
            crossing_prices: Vec::new(),
        }
    }

    pub(super) fn run(mut self) -> JobOutput {
        let p = self.p;
        let options = self.options;
        match walk(&mut self, p, options) {
            Ok(()) => self.record.finish(),
            Err(never) => match never {},
        }
    }

    /// Books a fill of `quantity` at `price` for `open`; returns true when it closed it.
    #[allow(clippy::too_many_arguments)] // one fill's facts, kept apart from `self` borrows
    pub(super) fn book(
        options: &BacktestOptions,
        out: &mut JobOutput,
        open: &mut Open,
        reason: u8,
        time_ms: i64,
        price: Decimal,
        quantity: Decimal,
        trigger: Option<Decimal>,
        sequence: u32,
    ) -> bool {
        let quantity = quantity.min(open.remaining);
        let exit_fee = fee(options.taker_fee, price, quantity);
        let gross = (price - open.entry_price) * quantity * open.direction.sign();
        let pnl = gross - exit_fee;
        let r = if open.risk_price.is_zero() {
            0.0
        } else {
            // A float column for analysis: the exact move is price - entry in the fills.
            let (entry_f, sign_f, risk_f) = open.r_floats;
            (to_f64(price) - entry_f) * sign_f / risk_f
        };
        open.remaining -= quantity;
        open.pnl += pnl;
        open.fees += exit_fee;
        out.fills.push(Fill {
            trade: open.trade,
            sequence,
            reason,
            time_ms,
            direction: open.direction,
            price,
            quantity,
            fee: exit_fee,
            pnl,
            r,
            trigger,
        });
        if open.remaining <= Decimal::ZERO {
            out.trades.push(Trade {
                trade: open.trade,
                direction: open.direction,
                entry_time_ms: open.entry_time_ms,
                exit_time_ms: time_ms,
                entry_price: open.entry_price,
                quantity: open.quantity,
                initial_stop: open.initial_stop,
                risk_price: open.risk_price,
                pnl: open.pnl,
                fees: open.fees,
                confidence: open.confidence,
                exit_reason: reason,
                bars_held: open.bars_held,
            });
            return true;
        }
        false
    }

    /// Feeds the mark `price` to position `k`; confirms every action at once. Returns true
    /// when the position closed.
    pub(super) fn feed(
        &mut self,
        k: usize,
        time_ms: i64,
        price: Decimal,
        atr: Option<f64>,
    ) -> bool {
        // An action's confirmation can move the stop (breakeven, ratchet) so that the same
        // mark triggers again; the loop is bounded by the ladder length plus the stop.
        for _ in 0..64 {
            let open = &mut self.open[k];
            let Some(action) = open
                .position
                .on_mark(price, atr, time_ms, self.rules, self.policy)
            else {
                return false;
            };
            let sequence = action.sequence as u32;
            open.sequence = sequence;
            let quantity = action.quantity;
            let closed = matches!(
                open.position
                    .confirm(action.sequence, Some(quantity), self.rules, self.policy),
                Ok(Confirmed::Closed)
            );
            if Self::book(
                self.options,
                &mut self.record.out,
                open,
                reason_of(action.reason),
                time_ms,
                price,
                quantity,
                Some(action.trigger_price),
                sequence,
            ) || closed
            {
                return true;
            }
        }
        false
    }

    /// Feeds every trigger a continuous move from `from` to `to` crosses, in order, each
    /// at the time of `from`. Returns true when the position closed.
    pub(super) fn feed_crossings(
        &mut self,
        k: usize,
        from: Point,
        to: Point,
        atr: Option<f64>,
    ) -> bool {
        let grid = self.p.grid;
        let mut prices = std::mem::take(&mut self.crossing_prices);
        prices.clear();
        let (lo, hi) = (
            grid.price(from.tick.min(to.tick)),
            grid.price(from.tick.max(to.tick)),
        );
        prices.extend(triggers_of(&self.open[k].position).filter(|&x| x > lo && x < hi));
        if from.tick <= to.tick {
            prices.sort_unstable();
        } else {
            prices.sort_unstable_by(|x, y| y.cmp(x));
        }
        let mut closed = false;
        for &price in &prices {
            if self.feed(k, from.time_ms, price, atr) {
                closed = true;
                break;
            }
        }
        self.crossing_prices = prices;
        closed
    }

    /// Position `k` is still open after bar `i`.
    pub(super) fn end_bar(&mut self, k: usize, i: usize) {
        let open = &mut self.open[k];
        open.bars_held += 1;
        if self.options.detail {
            self.record.out.stops.push((
                open.trade,
                self.p.input.bars.open_time[i],
                to_f64(open.position.stop_price),
            ));
        }
    }
}

impl Replay for Job<'_> {
    type Error = Infallible;

    fn record(&mut self) -> &mut Record {
        &mut self.record
    }

    fn has_open(&self) -> bool {
        !self.open.is_empty()
    }

    fn holds(&self, direction: Direction) -> bool {
        self.open.iter().any(|o| o.direction == direction)
    }

    fn enter(&mut self, entry: &Entry, i: usize) -> Result<(), Infallible> {
        let p = self.p;
        let price = p.grid.price(p.bars.get(i)[0]);
        let quantity = match entry_quantity(self.rules, self.options, entry, price) {
            Ok(quantity) => quantity,
            Err(reason) => {
                self.record.skip(entry.time_ms, reason);
                return Ok(());
            }
        };
        let leverage = entry.leverage.unwrap_or(self.options.leverage);
        let time_ms = p.input.bars.open_time[i];
        let trade = self.next_trade;
        let position = match new_position(
            self.rules,
            self.policy,
            trade,
            entry.direction,
            quantity,
            price,
            leverage,
            entry.confidence,
            time_ms,
            atr_at(self.atr, i),
        ) {
            // The daemon refuses an entry whose allowed stop is below the policy minimum.
            Ok(position) if !position.over_leveraged => position,
            _ => {
                self.record.skip(entry.time_ms, OVER_LEVERAGE);
                return Ok(());
            }
        };
        self.next_trade += 1;
        let entry_fee = fee(entry_rate(self.options), price, quantity);
        let initial_stop = position.stop_price;
        let risk_price = (price - initial_stop).abs();
        let r_floats = (
            to_f64(price),
            to_f64(entry.direction.sign()),
            to_f64(risk_price),
        );
        let out = &mut self.record.out;
        if self.options.detail {
            for (k, &level) in position.ladder_prices.iter().enumerate() {
                out.levels.push((trade, k as u32 + 1, to_f64(level)));
            }
        }
        out.fills.push(entry_fill(
            trade,
            time_ms,
            entry.direction,
            price,
            quantity,
            entry_fee,
            -entry_fee,
        ));
        self.open.push(Open {
            trade,
            position,
            direction: entry.direction,
            entry_time_ms: time_ms,
            entry_price: price,
            quantity,
            remaining: quantity,
            initial_stop,
            risk_price,
            r_floats,
            pnl: -entry_fee,
            fees: entry_fee,
            confidence: entry.confidence,
            bars_held: 0,
            sequence: 0,
        });
        Ok(())
    }

    fn bar(&mut self, i: usize) -> Result<(), Infallible> {
        let grid = self.p.grid;
        let atr = atr_at(self.atr, i);
        let mut k = 0;
        while k < self.open.len() {
            self.record.out.evaluations += 1;
            let direction = self.open[k].direction;
            let mut path = std::mem::take(&mut self.path);
            bar_path(self.p, i, direction, self.options.intrabar, &mut path);
            let mut closed = false;
            let mut previous: Option<Point> = None;
            for &point in &path {
                if let (false, Some(before)) = (point.jump, previous) {
                    if self.feed_crossings(k, before, point, atr) {
                        closed = true;
                        break;
                    }
                }
                if self.feed(k, point.time_ms, grid.price(point.tick), atr) {
                    closed = true;
                    break;
                }
                previous = Some(point);
            }
            self.path = path;
            if closed {
                self.open.swap_remove(k);
                continue;
            }
            self.end_bar(k, i);
            k += 1;
        }
        Ok(())
    }

    fn close_all(&mut self, i: usize, reason: u8) -> Result<(), Infallible> {
        let time_ms = self.p.input.bars.open_time[i] + self.p.input.interval_ms - 1;
        let price = self.p.grid.price(self.p.bars.get(i)[3]);
        for mut open in std::mem::take(&mut self.open) {
            let quantity = open.remaining;
            let sequence = open.sequence + 1;
            Self::book(
                self.options,
                &mut self.record.out,
                &mut open,
                reason,
                time_ms,
                price,
                quantity,
                None,
                sequence,
            );
        }
        Ok(())
    }
}
