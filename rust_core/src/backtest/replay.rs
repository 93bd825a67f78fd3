//! The replay of one (series, policy) job: entries, each bar's marks through the exit state
//! machine (or the quiet step), the fill model, fees, and the fills and trades it books.
//!
//! May not touch: the prepared bars (read-only, shared by all jobs) or another job's
//! state; exits are decided only by `PositionState`, never here.

use crate::exit::policy::ExitPolicy;
use crate::exit::position::{Confirmed, PositionState};
use crate::fixed::Decimal;
use crate::rules::SymbolRules;

use super::exit_api::{new_position, reason_of, triggers_of};
use super::path::{bar_path, Point};
use super::prepare::Prepared;
use super::quiet::{atr_at, atr_basis, trail_ticks, TrailRule, Triggers};
use super::{
    to_f64, BacktestOptions, Direction, Entry, Fill, JobOutput, Trade, BELOW_MIN_NOTIONAL,
    BELOW_MIN_QTY, DATA_GAP, END_OF_DATA, ENTRY, NO_BAR, OVER_LEVERAGE, POSITION_OPEN,
};

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
    /// The state's triggers as grid ticks, for skipping marks that change nothing; `None`
    /// (every mark fed) with `exhaustive` or a trigger off the grid.
    pub(super) triggers: Option<Triggers>,
}

pub(super) struct Job<'a> {
    pub(super) p: &'a Prepared<'a>,
    pub(super) policy: &'a ExitPolicy,
    pub(super) rules: &'a SymbolRules,
    pub(super) options: &'a BacktestOptions,
    /// ATR before each bar, NaN while not ready (see [`atr_at`]).
    pub(super) atr: &'a [f64],
    pub(super) trail: TrailRule,
    /// [`trail_ticks`] of the bar being replayed.
    pub(super) bar_trail: Option<i64>,
    pub(super) out: JobOutput,
    pub(super) open: Vec<Open>,
    pub(super) next_trade: u32,
    pub(super) path: Vec<Point>,
    pub(super) crossing_ticks: Vec<i64>,
    pub(super) crossing_prices: Vec<Decimal>,
    pub(super) position_open_skips: u32,
}

impl Job<'_> {
    pub(super) fn skip(&mut self, time_ms: i64, reason: u8) {
        if reason == POSITION_OPEN {
            // Counted, not listed: a signal rule repeats itself on every bar of a position.
            self.position_open_skips += 1;
        } else {
            self.out.skipped.push((time_ms, reason, 1));
        }
    }

    pub(super) fn try_enter(&mut self, entry: &Entry, i: usize) {
        let p = self.p;
        let blocked = self
            .open
            .iter()
            .any(|o| self.options.one_position_per_symbol || o.direction == entry.direction);
        if blocked {
            self.skip(entry.time_ms, POSITION_OPEN);
            return;
        }
        let price = p.grid.price(p.bars[i][0]);
        let notional = entry.notional.unwrap_or(self.options.notional);
        let quantity = self.rules.quantize_qty(notional / price, true);
        if quantity <= Decimal::ZERO || quantity < self.rules.min_qty(true) {
            self.skip(entry.time_ms, BELOW_MIN_QTY);
            return;
        }
        if quantity * price < self.rules.min_notional() {
            self.skip(entry.time_ms, BELOW_MIN_NOTIONAL);
            return;
        }
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
                self.skip(entry.time_ms, OVER_LEVERAGE);
                return;
            }
        };
        self.next_trade += 1;
        let rate = if self.options.entry_maker {
            self.options.maker_fee
        } else {
            self.options.taker_fee
        };
        let entry_fee = fee(rate, price, quantity);
        let initial_stop = position.stop_price;
        let risk_price = (price - initial_stop).abs();
        let r_floats = (
            to_f64(price),
            to_f64(entry.direction.sign()),
            to_f64(risk_price),
        );
        let triggers = self.triggers_for(&position, time_ms);
        if self.options.detail {
            for (k, &level) in position.ladder_prices.iter().enumerate() {
                self.out.levels.push((trade, k as u32 + 1, to_f64(level)));
            }
        }
        self.out.fills.push(Fill {
            trade,
            sequence: 0,
            reason: ENTRY,
            time_ms,
            direction: entry.direction,
            price,
            quantity,
            fee: entry_fee,
            pnl: -entry_fee,
            r: 0.0,
            trigger: None,
            mark: price,
        });
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
            triggers,
        });
    }

    /// The triggers of a position opened at `time_ms`; `None` (every mark fed) with
    /// `exhaustive` or a trigger off the grid.
    pub(super) fn triggers_for(&self, position: &PositionState, time_ms: i64) -> Option<Triggers> {
        if self.options.exhaustive {
            return None;
        }
        let expires = self
            .policy
            .config()
            .max_hold_ms
            .map(|h| time_ms.saturating_add(h));
        Triggers::new(position, self.p.grid, self.p.band, expires)
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
            mark: price,
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

    /// Feeds the mark `price` (at grid tick `tick`, when on the grid) to position `k`;
    /// confirms every action at once. Returns true when the position closed.
    pub(super) fn feed(
        &mut self,
        k: usize,
        time_ms: i64,
        price: Decimal,
        tick: Option<i64>,
        atr: Option<f64>,
    ) -> bool {
        let grid = self.p.grid;
        let basis = atr_basis(atr);
        if let Some(tick) = tick {
            let trail = self.bar_trail;
            let Open {
                triggers, position, ..
            } = &mut self.open[k];
            if let Some(triggers) = triggers.as_mut() {
                if let Some(step) = triggers.trailing_update(position, tick, basis, trail, grid) {
                    triggers.apply(position, &step);
                }
            }
        }
        // An action's confirmation can move the stop (breakeven, ratchet) so that the same
        // mark triggers again; the loop is bounded by the ladder length plus the stop.
        for _ in 0..64 {
            let open = &mut self.open[k];
            let action = open
                .position
                .on_mark(price, atr, time_ms, self.rules, self.policy);
            if let Some(triggers) = &mut open.triggers {
                // In the backtest nothing is pending here and the position is open, so
                // `on_mark` took the mark in when it is plausible (surely so inside the
                // band) and ignored it when not positive; anything else (a positive mark
                // outside the band, or off the grid) ends the shortcuts for this position.
                let still_valid = match tick {
                    Some(tick) if tick >= triggers.band.0 && tick <= triggers.band.1 => {
                        triggers.took(&open.position, tick, basis, grid);
                        true
                    }
                    _ => price <= Decimal::ZERO,
                };
                if !still_valid || !triggers.refresh_stop(&open.position, grid) {
                    open.triggers = None;
                }
            }
            let Some(action) = action else {
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
            if let Some(triggers) = &mut open.triggers {
                if !triggers.refresh_stop(&open.position, grid) {
                    open.triggers = None;
                }
            }
            if Self::book(
                self.options,
                &mut self.out,
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
        let open = &self.open[k];
        let mut closed = false;
        if let Some(triggers) = &open.triggers {
            let mut ticks = std::mem::take(&mut self.crossing_ticks);
            triggers.crossings(&open.position, from.tick, to.tick, &mut ticks);
            for &tick in &ticks {
                if self.feed(k, from.time_ms, grid.price(tick), Some(tick), atr) {
                    closed = true;
                    break;
                }
            }
            self.crossing_ticks = ticks;
        } else {
            // Some trigger is off the grid: compare decimals, feed each trigger's own price.
            let mut prices = std::mem::take(&mut self.crossing_prices);
            prices.clear();
            let (lo, hi) = (
                grid.price(from.tick.min(to.tick)),
                grid.price(from.tick.max(to.tick)),
            );
            prices.extend(triggers_of(&open.position).filter(|&x| x > lo && x < hi));
            if from.tick <= to.tick {
                prices.sort_unstable();
            } else {
                prices.sort_unstable_by(|x, y| y.cmp(x));
            }
            for &price in &prices {
                if self.feed(k, from.time_ms, price, None, atr) {
                    closed = true;
                    break;
                }
            }
            self.crossing_prices = prices;
        }
        closed
    }

    pub(super) fn run_bar(&mut self, i: usize) {
        let grid = self.p.grid;
        let atr = atr_at(self.atr, i);
        let basis = atr_basis(atr);
        let trail = trail_ticks(grid, self.policy, atr);
        self.bar_trail = trail;
        // Without finer bars the path is the bar's own four prices, all within its range.
        let whole_bar = match self.p.fine.get(i) {
            Some(Some(_)) => None,
            _ => Some(self.p.bars[i]),
        };
        let last_ms = self.p.input.bars.open_time[i] + self.p.input.interval_ms - 1;
        let mut k = 0;
        while k < self.open.len() {
            self.out.evaluations += 1;
            if let Some(ohlc) = whole_bar {
                if self.quiet_bar(k, ohlc, last_ms, basis, trail) {
                    self.out.quiet_bars += 1;
                    self.end_bar(k, i);
                    k += 1;
                    continue;
                }
            }
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
                let Open {
                    triggers, position, ..
                } = &mut self.open[k];
                let step = triggers.as_ref().and_then(|t| {
                    t.quiet(
                        position,
                        self.trail,
                        point.tick,
                        point.tick,
                        point.time_ms,
                        basis,
                        trail,
                        grid,
                    )
                });
                if let (Some(step), Some(triggers)) = (step, triggers.as_mut()) {
                    triggers.apply(position, &step);
                } else if self.feed(
                    k,
                    point.time_ms,
                    grid.price(point.tick),
                    Some(point.tick),
                    atr,
                ) {
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
    }

    /// The whole bar `ohlc` as one quiet step for position `k`, when it is one (see
    /// [`Triggers`]); false (nothing changed) otherwise.
    pub(super) fn quiet_bar(
        &mut self,
        k: usize,
        ohlc: [i64; 4],
        last_ms: i64,
        basis: u64,
        trail: Option<i64>,
    ) -> bool {
        let Open {
            triggers, position, ..
        } = &mut self.open[k];
        let Some(triggers) = triggers.as_mut() else {
            return false;
        };
        let [open, high, low, close] = ohlc;
        let (lo, hi) = (
            open.min(high).min(low).min(close),
            open.max(high).max(low).max(close),
        );
        let (adverse, favourable) = if triggers.side > 0 {
            (lo, hi)
        } else {
            (hi, lo)
        };
        match triggers.quiet(
            position,
            self.trail,
            adverse,
            favourable,
            last_ms,
            basis,
            trail,
            self.p.grid,
        ) {
            Some(step) => {
                triggers.apply(position, &step);
                true
            }
            None => false,
        }
    }

    /// Position `k` is still open after bar `i`.
    pub(super) fn end_bar(&mut self, k: usize, i: usize) {
        let open = &mut self.open[k];
        open.bars_held += 1;
        if self.options.detail {
            self.out.stops.push((
                open.trade,
                self.p.input.bars.open_time[i],
                to_f64(open.position.stop_price),
            ));
        }
    }

    pub(super) fn close_all(&mut self, i: usize, reason: u8) {
        let time_ms = self.p.input.bars.open_time[i] + self.p.input.interval_ms - 1;
        let price = self.p.grid.price(self.p.bars[i][3]);
        for mut open in std::mem::take(&mut self.open) {
            let quantity = open.remaining;
            let sequence = open.sequence + 1;
            Self::book(
                self.options,
                &mut self.out,
                &mut open,
                reason,
                time_ms,
                price,
                quantity,
                None,
                sequence,
            );
        }
    }

    #[allow(clippy::needless_range_loop)] // `i` addresses several parallel bar arrays
    pub(super) fn run(mut self) -> JobOutput {
        let p = self.p;
        let times = &p.input.bars.open_time;
        let interval = p.input.interval_ms;
        let entries = &p.input.entries;
        let mut e = 0;
        for (s, &(start, end)) in p.segments.iter().enumerate() {
            for i in start..end {
                let t = times[i];
                while e < entries.len() && entries.time_ms(e) <= t {
                    let entry = &entries.get(e);
                    e += 1;
                    if t - entry.time_ms >= interval {
                        self.skip(entry.time_ms, NO_BAR);
                    } else {
                        self.try_enter(entry, i);
                    }
                }
                if !self.open.is_empty() {
                    self.run_bar(i);
                }
            }
            let last = s + 1 == p.segments.len();
            self.close_all(end - 1, if last { END_OF_DATA } else { DATA_GAP });
        }
        for &time_ms in &entries.time_ms[e..] {
            self.out.skipped.push((time_ms, NO_BAR, 1));
        }
        if self.position_open_skips > 0 {
            self.out
                .skipped
                .push((0, POSITION_OPEN, self.position_open_skips));
        }
        self.out
    }
}
