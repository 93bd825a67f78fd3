//! The integer replay of one (series, policy) job, the default path: positions in grid
//! ticks and lot units ([`TickPosition`]), fees and `PnL` as mantissas ([`Money`]), a bar
//! that provably triggers nothing settled as one step, every other bar walked mark by
//! mark exactly as the decimal replay walks it. Decimals are built only for what a fill
//! or trade reports.
//!
//! May not touch: the prepared bars (read-only, shared by all jobs) or another job's
//! state; exits are decided only by `TickPosition`, never here. Anything the integers
//! cannot hold ends the job with [`Unrepresentable`], and the caller reruns it the decimal
//! way (`replay`).

use crate::exit::policy::ExitPolicy;

use super::columns::{Amount, FillFacts, ResultColumns, TradeFacts};
use super::exit_api::{new_position, reason_of};
use super::money::{Money, Rate};
use super::path::{bar_path, Point};
use super::prepare::Prepared;
use super::thresholds::atr_at;
use super::ticks::{BarAtr, Opening, Sizing, TickPosition, TickRules, Unrepresentable};
use super::walk::{entry_fill, entry_quantity, entry_rate, Record, Replay};
use super::{to_f64, BacktestOptions, Direction, Entry, Fill, Trade, ENTRY, OVER_LEVERAGE};

/// An open position and its trade's facts. Boxed, and the boxes of closed positions are
/// reused: a position is a few hundred bytes, and moving it at each entry and close (out
/// of the spares, into the open list, back) cost more than the entry's arithmetic.
#[derive(Default)]
struct TickOpen {
    trade: u32,
    position: TickPosition,
    direction: Direction,
    entry_time_ms: i64,
    /// The entry price's grid mantissa.
    entry_price: i128,
    /// Entry quantity and what is left of it, in lot units.
    quantity: i128,
    remaining: i128,
    initial_stop: i64,
    /// `to_f64` of the entry price, the side's sign and R, for the `r` column of each fill.
    r_floats: (f64, f64, f64),
    /// Net `PnL` and fees so far, as money mantissas.
    pnl: i128,
    fees: i128,
    confidence: Option<f64>,
    bars_held: u32,
    sequence: u32,
}

impl TickOpen {
    /// The trade's facts when it closes at `exit_time_ms` for `exit_reason`.
    fn trade_facts(&self, exit_time_ms: i64, exit_reason: u8) -> TradeFacts {
        TradeFacts {
            trade: self.trade,
            direction: self.direction,
            entry_time_ms: self.entry_time_ms,
            exit_time_ms,
            confidence: self.confidence,
            exit_reason,
            bars_held: self.bars_held,
        }
    }
}

#[derive(Clone, Copy)]
struct AmountDecimals {
    entry_fee: u32,
    exit_fee: u32,
    exit_pnl: u32,
    trade_pnl: u32,
    trade_fees: u32,
}

impl AmountDecimals {
    fn new(money: Money, entry: Rate, exit: Rate) -> Self {
        let (entry_fee, exit_fee) = (money.fee_decimals(entry), money.fee_decimals(exit));
        let exit_pnl = money.gross_decimals().max(exit_fee);
        Self {
            entry_fee,
            exit_fee,
            exit_pnl,
            trade_pnl: exit_pnl.max(entry_fee),
            trade_fees: entry_fee.max(exit_fee),
        }
    }
}

pub(super) struct TickJob<'a> {
    p: &'a Prepared<'a>,
    policy: &'a ExitPolicy,
    options: &'a BacktestOptions,
    /// ATR before each bar, NaN while not ready (see [`atr_at`]).
    atr: &'a [f64],
    rules: TickRules<'a>,
    money: Money,
    entry_rate: Rate,
    exit_rate: Rate,
    /// The decimals the decimal replay writes each amount with: entry and exit fees,
    /// an exit's `PnL`, a trade's `PnL` and fees (see `Money::decimal_with`).
    decimals: AmountDecimals,
    record: Record,
    /// Open positions.
    #[allow(clippy::vec_box)] // boxed to be moved cheaply (see `TickOpen`)
    open: Vec<Box<TickOpen>>,
    /// Closed positions whose boxes and buffers the next entry reuses.
    #[allow(clippy::vec_box)]
    spare: Vec<Box<TickOpen>>,
    next_trade: u32,
    /// The sizing of an entry without a notional of its own (the run's default).
    default_sizing: Option<Sizing>,
    path: Vec<Point>,
    crossings: Vec<i64>,
}

impl<'a> TickJob<'a> {
    pub(super) fn new(
        p: &'a Prepared<'a>,
        policy: &'a ExitPolicy,
        options: &'a BacktestOptions,
        atr: &'a [f64],
        record: Record,
    ) -> Result<Self, Unrepresentable> {
        let mut record = record;
        let rules = TickRules::new(p.grid, p.rules, policy, p.band)?;
        let default_sizing = rules.sizing(options.notional);
        let money = Money::new(p.grid.scale, rules.qty.scale)?;
        // Without detail the columns asked for are written as fills book, not from rows,
        // each amount with its own decimals.
        record.out.columns = options
            .columns
            .filter(|_| !options.detail)
            .map(|form| ResultColumns::new(form, p.grid.scale, rules.qty.scale, money.scale));
        let (entry, exit) = (
            money.rate(entry_rate(options)),
            money.rate(options.taker_fee),
        );
        Ok(Self {
            p,
            policy,
            options,
            atr,
            money,
            rules,
            entry_rate: entry,
            exit_rate: exit,
            decimals: AmountDecimals::new(money, entry, exit),
            record,
            open: Vec::new(),
            spare: Vec::new(),
            next_trade: 0,
            default_sizing,
            path: Vec::with_capacity(8),
            crossings: Vec::with_capacity(8),
        })
    }

    pub(super) fn run(mut self) -> Result<super::JobOutput, Unrepresentable> {
        let p = self.p;
        let options = self.options;
        super::walk::walk(&mut self, p, options)?;
        Ok(self.record.finish())
    }

    /// Books an exit fill of `quantity` units at tick `price` for position `k`; returns
    /// true when it closed the position.
    #[allow(clippy::too_many_arguments)] // one fill's facts
    fn book(
        &mut self,
        k: usize,
        reason: u8,
        time_ms: i64,
        price: i64,
        quantity: i128,
        trigger: Option<i64>,
        sequence: u32,
    ) -> Result<bool, Unrepresentable> {
        let grid = self.p.grid;
        let money = self.money;
        let price_mantissa = grid.mantissa(price);
        let open = &mut self.open[k];
        let quantity = quantity.min(open.remaining);
        let fee = money.fee(self.exit_rate, price_mantissa, quantity)?;
        let gross = money.gross(
            open.entry_price,
            price_mantissa,
            quantity,
            open.position.side,
        )?;
        let pnl = money.add(gross, -fee)?;
        let (entry_f, sign_f, risk_f) = open.r_floats;
        let price_amount = Amount::new(price_mantissa, grid.scale);
        let price_f = price_amount.float()?;
        // A float column for analysis: the exact move is price - entry in the fills.
        let r = if open.initial_stop == open.position.entry {
            0.0
        } else {
            (price_f - entry_f) * sign_f / risk_f
        };
        open.remaining -= quantity;
        open.pnl = money.add(open.pnl, pnl)?;
        open.fees = money.add(open.fees, fee)?;
        let out = &mut self.record.out;
        if let Some(columns) = &mut out.columns {
            let facts = FillFacts {
                trade: open.trade,
                sequence,
                reason,
                time_ms,
                direction: open.direction,
                r,
            };
            let (scale, qty_scale) = (money.scale, self.rules.qty.scale);
            columns.fills.push(
                &facts,
                &[
                    price_amount.with_float(price_f),
                    Amount::new(quantity, qty_scale),
                    Amount::written(fee, scale, self.decimals.exit_fee),
                    Amount::written(pnl, scale, self.decimals.exit_pnl),
                ],
            )?;
            if open.remaining > 0 {
                return Ok(false);
            }
            let (entry, stop) = (open.position.entry, open.initial_stop);
            columns.trades.push(
                &open.trade_facts(time_ms, reason),
                &[
                    Amount::new(open.entry_price, grid.scale).with_float(entry_f),
                    Amount::new(open.quantity, qty_scale),
                    Amount::new(grid.mantissa(stop), grid.scale),
                    Amount::new(grid.distance_mantissa(entry, stop), grid.scale).with_float(risk_f),
                    Amount::written(open.pnl, scale, self.decimals.trade_pnl),
                    Amount::written(open.fees, scale, self.decimals.trade_fees),
                ],
            )?;
            return Ok(true);
        }
        out.fills.push(Fill {
            trade: open.trade,
            sequence,
            reason,
            time_ms,
            direction: open.direction,
            price: grid.price(price),
            quantity: self.rules.qty.decimal(quantity)?,
            fee: money.decimal_with(fee, self.decimals.exit_fee)?,
            pnl: money.decimal_with(pnl, self.decimals.exit_pnl)?,
            r,
            trigger: trigger.map(|t| grid.price(t)),
        });
        if open.remaining > 0 {
            return Ok(false);
        }
        let entry_price = grid.price(open.position.entry);
        let initial_stop = grid.price(open.initial_stop);
        out.trades.push(Trade {
            trade: open.trade,
            direction: open.direction,
            entry_time_ms: open.entry_time_ms,
            exit_time_ms: time_ms,
            entry_price,
            quantity: self.rules.qty.decimal(open.quantity)?,
            initial_stop,
            risk_price: grid.distance(open.position.entry, open.initial_stop),
            pnl: money.decimal_with(open.pnl, self.decimals.trade_pnl)?,
            fees: money.decimal_with(open.fees, self.decimals.trade_fees)?,
            confidence: open.confidence,
            exit_reason: reason,
            bars_held: open.bars_held,
        });
        Ok(true)
    }

    /// Feeds the mark at tick `tick` to position `k`; confirms every action at once.
    /// Returns true when the position closed.
    fn feed(
        &mut self,
        k: usize,
        time_ms: i64,
        tick: i64,
        bar: &BarAtr<'_>,
    ) -> Result<bool, Unrepresentable> {
        // An action's confirmation can move the stop (breakeven, ratchet) so that the same
        // mark triggers again; the loop is bounded by the ladder length plus the stop.
        for _ in 0..64 {
            let open = &mut self.open[k];
            let Some(action) = open.position.on_mark(tick, time_ms, bar, &self.rules)? else {
                return Ok(false);
            };
            let sequence = action.sequence as u32;
            open.sequence = sequence;
            let closed = open.position.confirm(&action, &self.rules);
            if self.book(
                k,
                reason_of(action.reason),
                time_ms,
                tick,
                action.quantity,
                Some(action.trigger),
                sequence,
            )? || closed
            {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Walks bar `i`'s mark path for position `k`: every trigger a move between two marks
    /// crosses (at the earlier mark's time), then each mark. Returns true when the
    /// position closed.
    fn walk_path(&mut self, k: usize, i: usize, bar: &BarAtr<'_>) -> Result<bool, Unrepresentable> {
        let mut path = std::mem::take(&mut self.path);
        bar_path(
            self.p,
            i,
            self.open[k].direction,
            self.options.intrabar,
            &mut path,
        );
        let mut crossings = std::mem::take(&mut self.crossings);
        let mut closed = false;
        let mut previous: Option<Point> = None;
        'path: for &point in &path {
            if let (false, Some(before)) = (point.jump, previous) {
                self.open[k]
                    .position
                    .crossings(before.tick, point.tick, &mut crossings);
                for &tick in &crossings {
                    if self.feed(k, before.time_ms, tick, bar)? {
                        closed = true;
                        break 'path;
                    }
                }
            }
            if self.feed(k, point.time_ms, point.tick, bar)? {
                closed = true;
                break;
            }
            previous = Some(point);
        }
        self.path = path;
        self.crossings = crossings;
        Ok(closed)
    }

    /// The lot units `entry` buys at the open tick `k`, or `None` with the skip recorded.
    fn entry_units(&mut self, entry: &Entry, k: i64) -> Result<Option<i128>, Unrepresentable> {
        let sizing = match entry.notional {
            None => self.default_sizing,
            Some(own) => self.rules.sizing(own),
        };
        let size = match self.rules.entry_units(sizing, k) {
            Some(size) => size,
            None => match entry_quantity(self.p.rules, self.options, entry, self.p.grid.price(k)) {
                Ok(quantity) => Ok(self.rules.qty.units(quantity)?),
                Err(reason) => Err(reason),
            },
        };
        Ok(match size {
            Ok(units) => Some(units),
            Err(reason) => {
                self.record.skip(entry.time_ms, reason);
                None
            }
        })
    }

    /// The position `entry` opens with `units` at the open of bar `i`: the integer open,
    /// or the decimal one where the integers leave it unsettled; `None` when the entry is
    /// refused (over-leveraged, or an input the decimal open refuses).
    fn open_position(
        &mut self,
        entry: &Entry,
        i: usize,
        units: i128,
    ) -> Result<Option<Box<TickOpen>>, Unrepresentable> {
        let p = self.p;
        let open_tick = p.bars.get(i)[0];
        let time_ms = p.input.bars.open_time[i];
        let leverage = entry.leverage.unwrap_or(self.options.leverage);
        let atr = atr_at(self.atr, i);
        let side = match entry.direction {
            Direction::Long => 1,
            Direction::Short => -1,
        };
        let mut slot = self.spare.pop().unwrap_or_default();
        let opened = match slot.position.open(
            side,
            open_tick,
            units,
            leverage,
            entry.confidence,
            atr,
            time_ms,
            &self.rules,
        ) {
            Opening::Opened => true,
            Opening::OverLeveraged => false,
            Opening::Unsettled => match new_position(
                p.rules,
                self.policy,
                self.next_trade,
                entry.direction,
                self.rules.qty.decimal(units)?,
                p.grid.price(open_tick),
                leverage,
                entry.confidence,
                time_ms,
                atr,
            ) {
                Ok(state) if !state.over_leveraged => {
                    slot.position.load(&state, time_ms, &self.rules)?;
                    true
                }
                _ => false,
            },
        };
        if opened {
            Ok(Some(slot))
        } else {
            self.spare.push(slot);
            Ok(None)
        }
    }

    /// Position `k` is still open after bar `i`.
    fn end_bar(&mut self, k: usize, i: usize) {
        let open = &mut self.open[k];
        open.bars_held += 1;
        if self.options.detail {
            self.record.out.stops.push((
                open.trade,
                self.p.input.bars.open_time[i],
                to_f64(self.p.grid.price(open.position.stop)),
            ));
        }
    }

    fn close(&mut self, k: usize) {
        let open = self.open.swap_remove(k);
        self.spare.push(open);
    }
}

impl Replay for TickJob<'_> {
    type Error = Unrepresentable;

    fn record(&mut self) -> &mut Record {
        &mut self.record
    }

    fn has_open(&self) -> bool {
        !self.open.is_empty()
    }

    fn holds(&self, direction: Direction) -> bool {
        self.open.iter().any(|o| o.direction == direction)
    }

    fn enter(&mut self, entry: &Entry, i: usize) -> Result<(), Unrepresentable> {
        let p = self.p;
        let open_tick = p.bars.get(i)[0];
        let Some(units) = self.entry_units(entry, open_tick)? else {
            return Ok(());
        };
        let time_ms = p.input.bars.open_time[i];
        let trade = self.next_trade;
        let Some(mut slot) = self.open_position(entry, i, units)? else {
            // The daemon refuses an entry whose allowed stop is below the policy minimum.
            self.record.skip(entry.time_ms, OVER_LEVERAGE);
            return Ok(());
        };
        self.next_trade += 1;
        let entry_price = p.grid.mantissa(open_tick);
        let fee = self.money.fee(self.entry_rate, entry_price, units)?;
        let risk = p.grid.distance_mantissa(open_tick, slot.position.stop);
        let r_floats = (
            Amount::new(entry_price, p.grid.scale).float()?,
            match entry.direction {
                Direction::Long => 1.0,
                Direction::Short => -1.0,
            },
            Amount::new(risk, p.grid.scale).float()?,
        );
        let out = &mut self.record.out;
        if self.options.detail {
            for (k, &level) in slot.position.levels.iter().enumerate() {
                out.levels
                    .push((trade, k as u32 + 1, to_f64(p.grid.price(level))));
            }
        }
        let pnl = self.money.add(0, -fee)?;
        if let Some(columns) = &mut out.columns {
            let facts = FillFacts {
                trade,
                sequence: 0,
                reason: ENTRY,
                time_ms,
                direction: entry.direction,
                r: 0.0,
            };
            let (scale, decimals) = (self.money.scale, self.decimals.entry_fee);
            columns.fills.push(
                &facts,
                &[
                    Amount::new(entry_price, p.grid.scale).with_float(r_floats.0),
                    Amount::new(units, self.rules.qty.scale),
                    Amount::written(fee, scale, decimals),
                    Amount::written(pnl, scale, decimals),
                ],
            )?;
        } else {
            out.fills.push(entry_fill(
                trade,
                time_ms,
                entry.direction,
                p.grid.price(open_tick),
                self.rules.qty.decimal(units)?,
                self.money.decimal_with(fee, self.decimals.entry_fee)?,
                self.money.decimal_with(pnl, self.decimals.entry_fee)?,
            ));
        }
        // Every field named (no `..`): a field added later cannot be left from the
        // position this box held before.
        let TickOpen {
            trade: slot_trade,
            position,
            direction,
            entry_time_ms,
            entry_price: slot_entry_price,
            quantity,
            remaining,
            initial_stop,
            r_floats: slot_r_floats,
            pnl: slot_pnl,
            fees,
            confidence,
            bars_held,
            sequence,
        } = &mut *slot;
        *slot_trade = trade;
        *initial_stop = position.stop;
        *direction = entry.direction;
        *entry_time_ms = time_ms;
        *slot_entry_price = entry_price;
        *quantity = units;
        *remaining = units;
        *slot_r_floats = r_floats;
        *slot_pnl = pnl;
        *fees = fee;
        *confidence = entry.confidence;
        *bars_held = 0;
        *sequence = 0;
        self.open.push(slot);
        Ok(())
    }

    fn bar(&mut self, i: usize) -> Result<(), Unrepresentable> {
        let bar = BarAtr::new(atr_at(self.atr, i), self.p.grid, self.policy);
        // Without finer bars the path is the bar's own four prices, all within its range.
        let whole_bar = match self.p.fine.get(i) {
            Some(Some(_)) => None,
            _ => Some(self.p.bars.get(i)),
        };
        let last_ms = self.p.input.bars.open_time[i] + self.p.input.interval_ms - 1;
        let mut k = 0;
        while k < self.open.len() {
            self.record.out.evaluations += 1;
            if let Some([open, high, low, close]) = whole_bar {
                let (lo, hi) = (
                    open.min(high).min(low).min(close),
                    open.max(high).max(low).max(close),
                );
                if self.open[k]
                    .position
                    .quiet_bar(lo, hi, last_ms, &bar, &self.rules)?
                {
                    self.record.out.quiet_bars += 1;
                    self.end_bar(k, i);
                    k += 1;
                    continue;
                }
            }
            if self.walk_path(k, i, &bar)? {
                self.close(k);
                continue;
            }
            self.end_bar(k, i);
            k += 1;
        }
        Ok(())
    }

    /// With one position open, no trailing stop active (nothing then depends on the ATR),
    /// whole bars and no per-bar detail: the bars from `i` up to the first that is not
    /// quiet, in one sweep over their extremes ([`TickPosition::quiet_sweep`]). Entries
    /// are refused while the position is open (`one_position_per_symbol`, or an entry on
    /// the same side); the sweep stops before the bar of the first entry that would open
    /// the other side.
    fn quiet_run(&mut self, i: usize, end: usize, next_entry: usize) -> usize {
        let p = self.p;
        if self.open.len() != 1 || self.options.detail || !p.fine.is_empty() {
            return 0;
        }
        let times = &p.input.bars.open_time;
        let mut end = end;
        if !self.options.one_position_per_symbol {
            let side: i8 = match self.open[0].direction {
                Direction::Long => 1,
                Direction::Short => -1,
            };
            let entries = &p.input.entries;
            let last = times[end - 1];
            let mut e = next_entry;
            while e < entries.len() && entries.time_ms(e) <= last {
                if entries.side[e] != side {
                    // Its bar: the first at or after it; the sweep ends before that one.
                    let time_ms = entries.time_ms(e);
                    end = i + times[i..end].partition_point(|&t| t < time_ms);
                    break;
                }
                e += 1;
            }
            if end <= i {
                return 0;
            }
        }
        let settled = self.open[0].position.quiet_sweep(
            &p.bars,
            i,
            &times[i..end],
            p.input.interval_ms,
            &self.rules,
        );
        if settled > 0 {
            let out = &mut self.record.out;
            out.evaluations += settled as u64;
            out.quiet_bars += settled as u64;
            self.open[0].bars_held += settled as u32;
        }
        settled
    }

    fn close_all(&mut self, i: usize, reason: u8) -> Result<(), Unrepresentable> {
        let time_ms = self.p.input.bars.open_time[i] + self.p.input.interval_ms - 1;
        let close = self.p.bars.get(i)[3];
        for k in 0..self.open.len() {
            let (remaining, sequence) = (self.open[k].remaining, self.open[k].sequence + 1);
            self.book(k, reason, time_ms, close, remaining, None, sequence)?;
        }
        self.spare.append(&mut self.open);
        Ok(())
    }
}
