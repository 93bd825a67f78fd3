//! The scan over the bars' tick prices for the quiet sweep: how many bars from the first
//! keep all four prices strictly inside an open interval, and the extreme price among
//! them, in one pass. The ticks are stored and compared in 32 bits (see
//! `prepare::BarTicks`).
//!
//! Why by hand: the sweep is the one loop of a dense backtest that runs over nearly every
//! bar, and written bar by bar (a branch per bar and per condition) it cost about 5 ns a
//! bar. Here the condition is one unsigned range compare per price, eight bars a chunk,
//! without a branch inside the chunk, so the compiler vectorizes it; the same code is
//! compiled a second time with AVX2 and chosen at run time where the processor has it.
//!
//! May not touch: anything but the prices it is given.

/// Bars per branch-free chunk.
const CHUNK: usize = 8;

/// How many bars from the first have all four prices in `(below, above)`, and the
/// highest (`side` > 0) or lowest (`side` < 0) price of those bars (`None` for none).
pub(super) fn inside_run(
    bars: &[[i32; 4]],
    below: i64,
    above: i64,
    side: i64,
) -> (usize, Option<i64>) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: `inside_run_avx2` only requires AVX2, detected just above.
        #[allow(unsafe_code)] // the one way to call a `target_feature` function after detection
        unsafe {
            return inside_run_avx2(bars, below, above, side);
        }
    }
    inside_run_either(bars, below, above, side)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn inside_run_avx2(bars: &[[i32; 4]], below: i64, above: i64, side: i64) -> (usize, Option<i64>) {
    inside_run_either(bars, below, above, side)
}

// Must be inlined into `inside_run_avx2` to be compiled with AVX2 there.
#[allow(clippy::inline_always)]
#[inline(always)]
fn inside_run_either(bars: &[[i32; 4]], below: i64, above: i64, side: i64) -> (usize, Option<i64>) {
    let (settled, extreme) = if side > 0 {
        inside_run_loop::<true>(bars, below, above)
    } else {
        inside_run_loop::<false>(bars, below, above)
    };
    (settled, (settled > 0).then_some(extreme))
}

/// [`inside_run`] for one side: the highest price with `HIGHEST`, else the lowest (the
/// extreme of no bar is the fold's start value).
#[allow(clippy::inline_always)]
#[inline(always)]
fn inside_run_loop<const HIGHEST: bool>(bars: &[[i32; 4]], below: i64, above: i64) -> (usize, i64) {
    let start = if HIGHEST { i32::MIN } else { i32::MAX };
    let pick = |a: i32, b: i32| if HIGHEST { a.max(b) } else { a.min(b) };
    // Every price is an `i32`: bounds beyond its range are clamped to just outside it,
    // which keeps every comparison and puts the interval inside the `i32` range.
    let below = below.max(i64::from(i32::MIN) - 1);
    let above = above.min(i64::from(i32::MAX) + 1);
    // `below < x < above` as one compare in 32 bits: `x - (below + 1)`, read unsigned, is
    // at most `above - below - 2` exactly for the prices inside (those under the interval
    // wrap beyond it: the interval lies inside the `i32` range).
    if above - below < 2 {
        return (0, i64::from(start));
    }
    let (Ok(base), Ok(last)) = (i32::try_from(below + 1), u32::try_from(above - below - 2)) else {
        return (0, i64::from(start));
    };
    #[allow(clippy::cast_sign_loss)] // the unsigned reading is the point (see above)
    let outside = |x: i32| u32::from(x.wrapping_sub(base) as u32 > last);
    // The extreme per price position (open, high, low, close) over the settled chunks:
    // lane by lane, one vector operation a bar, reduced once at the end.
    let mut lanes = [start; 4];
    let mut done = 0;
    for chunk in bars.chunks_exact(CHUNK) {
        let any = chunk.iter().flatten().fold(0, |any, &x| any | outside(x));
        if any != 0 {
            break;
        }
        for bar in chunk {
            for (lane, &x) in lanes.iter_mut().zip(bar) {
                *lane = pick(*lane, x);
            }
        }
        done += CHUNK;
    }
    for bar in &bars[done..] {
        if bar.iter().any(|&x| outside(x) != 0) {
            break;
        }
        for (lane, &x) in lanes.iter_mut().zip(bar) {
            *lane = pick(*lane, x);
        }
        done += 1;
    }
    (done, i64::from(lanes.into_iter().fold(start, pick)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive_run(bars: &[[i32; 4]], below: i64, above: i64) -> usize {
        bars.iter()
            .take_while(|bar| {
                bar.iter()
                    .all(|&x| i64::from(x) > below && i64::from(x) < above)
            })
            .count()
    }

    proptest::proptest! {
        /// The chunked scans give what the plain loops give, on both code paths, at every
        /// length (chunk boundaries) and with prices on and next to the bounds.
        #[test]
        fn scans_match_the_plain_loops(
            prices in proptest::collection::vec(proptest::prop_oneof![
                -40i32..40,
                proptest::num::i32::ANY,
            ], 0..160),
            below in proptest::prop_oneof![-45i64..45, -(1i64 << 33)..(1i64 << 33)],
            width in proptest::prop_oneof![-3i64..60, 0i64..(1i64 << 34)],
            side in proptest::bool::ANY,
        ) {
            let bars: Vec<[i32; 4]> = prices.chunks_exact(4).map(|c| [c[0], c[1], c[2], c[3]]).collect();
            let above = below + width;
            let expected = naive_run(&bars, below, above);
            let side = if side { 1 } else { -1 };
            let prices_settled = &prices[..expected * 4];
            let naive = if side > 0 {
                prices_settled.iter().max().map(|&x| i64::from(x))
            } else {
                prices_settled.iter().min().map(|&x| i64::from(x))
            };
            proptest::prop_assert_eq!(inside_run(&bars, below, above, side), (expected, naive));
            proptest::prop_assert_eq!(
                inside_run_either(&bars, below, above, side),
                (expected, naive)
            );
        }
    }

    #[test]
    fn prices_at_the_ends_of_32_bits_are_compared_exactly() {
        let (low, high) = (i32::MIN, i32::MAX);
        let bars = [[low, high, low, high]; 9];
        let (l, h) = (i64::from(low), i64::from(high));
        assert_eq!(inside_run(&bars, l - 1, h + 1, 1), (9, Some(h)));
        assert_eq!(inside_run(&bars, i64::MIN, i64::MAX, -1), (9, Some(l)));
        assert_eq!(
            inside_run(&bars, l, h + 1, 1).0,
            0,
            "the lowest price on the bound"
        );
        assert_eq!(
            inside_run(&bars, l - 1, h, 1).0,
            0,
            "the highest price on the bound"
        );
        assert_eq!(inside_run(&bars, h, i64::MAX, 1).0, 0);
        assert_eq!(inside_run(&bars, i64::MIN, l, 1).0, 0);
        let far = [[0, 1, -1, 0]; 3];
        assert_eq!(inside_run(&far, -(1 << 40), 1 << 40, 1), (3, Some(1)));
        assert_eq!(inside_run(&far, 1 << 40, 1 << 41, 1).0, 0);
        assert_eq!(inside_run(&far, -(1 << 41), -(1 << 40), 1).0, 0);
    }

    #[test]
    fn bounds_at_the_ends_of_the_integers_settle_nothing_wrongly() {
        let bars = [[5, 6, 4, 5]; 20];
        let run = |bars: &[[i32; 4]], below, above| inside_run(bars, below, above, 1).0;
        assert_eq!(
            run(&bars, i64::MIN, i64::MAX),
            20,
            "the widest interval holds all"
        );
        assert_eq!(run(&bars, 3, 7), 20);
        assert_eq!(run(&bars, 4, 7), 0, "a price on the lower bound is outside");
        assert_eq!(run(&bars, 3, 6), 0, "a price on the upper bound is outside");
        assert_eq!(run(&bars, 5, 5), 0);
        let mut late = bars;
        late[13][2] = 3;
        late[12][1] = 7;
        assert_eq!(inside_run(&late, 3, 8, 1), (13, Some(7)));
        assert_eq!(inside_run(&late, 3, 8, -1), (13, Some(4)));
    }
}
