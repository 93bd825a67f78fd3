//! The mark path of one bar (see "Mark path of a bar" in the module header): open, the
//! two extremes in the order of the intrabar rule, close, as grid ticks with times.
//!
//! May not touch: positions, triggers or fills; it only lists the points a bar stands for.

use super::prepare::Prepared;
use super::{Direction, Intrabar};

/// A point of a bar's mark path.
#[derive(Debug, Clone, Copy)]
pub(super) struct Point {
    pub(super) time_ms: i64,
    /// Grid tick of the price.
    pub(super) tick: i64,
    /// Reached by a jump (an open) rather than a continuous move from the previous point.
    pub(super) jump: bool,
}

pub(super) fn push_bar_path(
    out: &mut Vec<Point>,
    t0: i64,
    span: i64,
    ohlc: [i64; 4],
    adverse_low_first: bool,
) {
    let [open, high, low, close] = ohlc;
    let (first, second) = if adverse_low_first {
        (low, high)
    } else {
        (high, low)
    };
    out.extend([
        Point {
            time_ms: t0,
            tick: open,
            jump: true,
        },
        Point {
            time_ms: t0 + span / 3,
            tick: first,
            jump: false,
        },
        Point {
            time_ms: t0 + 2 * span / 3,
            tick: second,
            jump: false,
        },
        Point {
            time_ms: t0 + span - 1,
            tick: close,
            jump: false,
        },
    ]);
}

pub(super) fn bar_path(
    p: &Prepared<'_>,
    i: usize,
    direction: Direction,
    intrabar: Intrabar,
    out: &mut Vec<Point>,
) {
    out.clear();
    // A LONG's adverse extreme is the low.
    let low_first = (direction == Direction::Long) == (intrabar == Intrabar::StopFirst);
    match (
        p.fine.get(i).copied().flatten(),
        &p.input.fine,
        &p.fine_bars,
    ) {
        (Some((a, b)), Some((fine_interval, fine_bars)), Some(fine_ticks)) => {
            for j in a..b {
                push_bar_path(
                    out,
                    fine_bars.open_time[j],
                    *fine_interval,
                    fine_ticks.get(j),
                    low_first,
                );
            }
        }
        _ => push_bar_path(
            out,
            p.input.bars.open_time[i],
            p.input.interval_ms,
            p.bars.get(i),
            low_first,
        ),
    }
}
