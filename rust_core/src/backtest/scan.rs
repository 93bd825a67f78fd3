//! Scans over the bars' tick prices for the quiet sweep: how many bars from the first keep
//! all four prices strictly inside an open interval, and the extreme price of a run of
//! bars.
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

/// How many bars from the first have all four prices in `(below, above)`.
pub(super) fn inside_run(bars: &[[i64; 4]], below: i64, above: i64) -> usize {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: `inside_run_avx2` only requires AVX2, detected just above.
        #[allow(unsafe_code)] // the one way to call a `target_feature` function after detection
        unsafe {
            return inside_run_avx2(bars, below, above);
        }
    }
    inside_run_loop(bars, below, above)
}

/// The highest (`side` > 0) or lowest (`side` < 0) price of `bars`, `None` for no bars.
pub(super) fn extreme(bars: &[[i64; 4]], side: i64) -> Option<i64> {
    if bars.is_empty() {
        return None;
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: `extreme_avx2` only requires AVX2, detected just above.
        #[allow(unsafe_code)] // the one way to call a `target_feature` function after detection
        unsafe {
            return Some(extreme_avx2(bars, side));
        }
    }
    Some(extreme_loop(bars, side))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn inside_run_avx2(bars: &[[i64; 4]], below: i64, above: i64) -> usize {
    inside_run_loop(bars, below, above)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn extreme_avx2(bars: &[[i64; 4]], side: i64) -> i64 {
    extreme_loop(bars, side)
}

// Must be inlined into the `target_feature` functions to be compiled with AVX2 there.
#[allow(clippy::inline_always)]
#[inline(always)]
fn inside_run_loop(bars: &[[i64; 4]], below: i64, above: i64) -> usize {
    // `below < x < above` as one compare: `x - (below + 1)`, read unsigned, is below the
    // interval's width exactly for the prices inside it (those under it wrap to huge).
    let (Some(base), Some(width)) = (below.checked_add(1), above.checked_sub(below)) else {
        return 0;
    };
    let Some(width) = width.checked_sub(1).filter(|&w| w > 0) else {
        return 0;
    };
    #[allow(clippy::cast_sign_loss)] // the unsigned reading is the point (see above)
    let outside = |x: i64| u64::from(x.wrapping_sub(base) as u64 >= width as u64);
    let mut done = 0;
    for chunk in bars.chunks_exact(CHUNK) {
        let any = chunk.iter().flatten().fold(0, |any, &x| any | outside(x));
        if any != 0 {
            break;
        }
        done += CHUNK;
    }
    done + bars[done..]
        .iter()
        .take_while(|bar| bar.iter().all(|&x| outside(x) == 0))
        .count()
}

#[allow(clippy::inline_always)]
#[inline(always)]
fn extreme_loop(bars: &[[i64; 4]], side: i64) -> i64 {
    let prices = bars.iter().flatten().copied();
    if side > 0 {
        prices.fold(i64::MIN, i64::max)
    } else {
        prices.fold(i64::MAX, i64::min)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive_run(bars: &[[i64; 4]], below: i64, above: i64) -> usize {
        bars.iter()
            .take_while(|bar| bar.iter().all(|&x| x > below && x < above))
            .count()
    }

    proptest::proptest! {
        /// The chunked scans give what the plain loops give, on both code paths, at every
        /// length (chunk boundaries) and with prices on and next to the bounds.
        #[test]
        fn scans_match_the_plain_loops(
            prices in proptest::collection::vec(-40i64..40, 0..160),
            below in -45i64..45,
            width in -3i64..60,
            side in proptest::bool::ANY,
        ) {
            let bars: Vec<[i64; 4]> = prices.chunks_exact(4).map(|c| [c[0], c[1], c[2], c[3]]).collect();
            let above = below + width;
            let expected = naive_run(&bars, below, above);
            proptest::prop_assert_eq!(inside_run(&bars, below, above), expected);
            proptest::prop_assert_eq!(inside_run_loop(&bars, below, above), expected);
            let side = if side { 1 } else { -1 };
            let naive = if side > 0 {
                prices.iter().take(bars.len() * 4).max().copied()
            } else {
                prices.iter().take(bars.len() * 4).min().copied()
            };
            proptest::prop_assert_eq!(extreme(&bars, side), naive);
        }
    }

    #[test]
    fn bounds_at_the_ends_of_the_integers_settle_nothing_wrongly() {
        let bars = [[5, 6, 4, 5]; 20];
        assert_eq!(inside_run(&bars, i64::MIN, i64::MAX), 0, "no interval base");
        assert_eq!(inside_run(&bars, 3, 7), 20);
        assert_eq!(
            inside_run(&bars, 4, 7),
            0,
            "a price on the lower bound is outside"
        );
        assert_eq!(
            inside_run(&bars, 3, 6),
            0,
            "a price on the upper bound is outside"
        );
        assert_eq!(inside_run(&bars, 5, 5), 0);
        let mut late = bars;
        late[13][2] = 3;
        assert_eq!(inside_run(&late, 3, 7), 13);
    }
}
