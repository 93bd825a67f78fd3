//! The checks of a time column (bar open times, entry times) in one pass: whether some
//! time fails to follow its predecessor, and whether some step is longer than a bound.
//!
//! Why by hand: these checks read every bar and every entry of a run, and written as a
//! loop that records each gap as it goes (a branch per bar) they cost about a millisecond
//! a million bars. Here the two answers are folded without a branch, compiled a second
//! time with AVX2 (64-bit compares) and picked at run time; the caller searches for the
//! rows only when an answer says there is something to find.
//!
//! May not touch: anything but the times it is given.

/// `(back, long)`: some time is below its predecessor (or equal to it, with `strict`),
/// and some time lies more than `max_step` after its predecessor.
pub(super) fn steps(times: &[i64], max_step: i64, strict: bool) -> (bool, bool) {
    let (back, long, _) = spacing(times, 0, max_step, strict);
    (back, long)
}

/// `(back, long, short)`: as [`steps`], and some time lies less than `min_step` after its
/// predecessor (a step forward; none is shorter than a `min_step` of 1 or less).
pub(super) fn spacing(
    times: &[i64],
    min_step: i64,
    max_step: i64,
    strict: bool,
) -> (bool, bool, bool) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: `steps_avx2` only requires AVX2, detected just above.
        #[allow(unsafe_code)] // the one way to call a `target_feature` function after detection
        unsafe {
            return steps_avx2(times, min_step, max_step, strict);
        }
    }
    steps_either(times, min_step, max_step, strict)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn steps_avx2(times: &[i64], min_step: i64, max_step: i64, strict: bool) -> (bool, bool, bool) {
    steps_either(times, min_step, max_step, strict)
}

// Must be inlined into `steps_avx2` to be compiled with AVX2 there.
#[allow(clippy::inline_always)]
#[inline(always)]
fn steps_either(times: &[i64], min_step: i64, max_step: i64, strict: bool) -> (bool, bool, bool) {
    if times.len() < 2 {
        return (false, false, false);
    }
    let (earlier, later) = (&times[..times.len() - 1], &times[1..]);
    // A step that goes forward is below 2^64: its difference, read unsigned, is exact. A
    // negative bound is beaten by every forward step.
    let every = max_step < 0;
    #[allow(clippy::cast_sign_loss)] // not negative
    let (bound, least) = (max_step.max(0) as u64, min_step.max(0) as u64);
    let (back, long, short) = earlier
        .iter()
        .zip(later)
        // `&` and `|`, not `&&` and `||`: no branch, so the fold vectorizes.
        .fold(
            (0u8, 0u8, 0u8),
            #[allow(clippy::needless_bitwise_bool)]
            |(back, long, short), (&a, &b)| {
                let forward = b > a;
                let behind = if strict { !forward } else { b < a };
                #[allow(clippy::cast_sign_loss)]
                let step = b.wrapping_sub(a) as u64;
                (
                    back | u8::from(behind),
                    long | u8::from(forward & (every | (step > bound))),
                    short | u8::from(forward & (step < least)),
                )
            },
        );
    (back != 0, long != 0, short != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(times: &[i64], min_step: i64, max_step: i64, strict: bool) -> (bool, bool, bool) {
        let pairs = || {
            times
                .windows(2)
                .map(|w| (i128::from(w[0]), i128::from(w[1])))
        };
        (
            pairs().any(|(a, b)| if strict { b <= a } else { b < a }),
            pairs().any(|(a, b)| b > a && b - a > i128::from(max_step)),
            pairs().any(|(a, b)| b > a && b - a < i128::from(min_step)),
        )
    }

    proptest::proptest! {
        /// Both code paths answer as the plain check over 128-bit differences, with steps
        /// forward, back, equal, at the bound and across the whole `i64` range.
        #[test]
        fn steps_match_the_plain_check(
            times in proptest::collection::vec(
                proptest::prop_oneof![-5i64..40, proptest::num::i64::ANY],
                0..70,
            ),
            sorted in proptest::bool::ANY,
            max_step in proptest::prop_oneof![-2i64..10, proptest::num::i64::ANY],
            min_step in proptest::prop_oneof![-2i64..10, proptest::num::i64::ANY],
            strict in proptest::bool::ANY,
        ) {
            let mut times = times;
            if sorted {
                times.sort_unstable();
            }
            let expected = naive(&times, min_step, max_step, strict);
            proptest::prop_assert_eq!(spacing(&times, min_step, max_step, strict), expected);
            proptest::prop_assert_eq!(steps_either(&times, min_step, max_step, strict), expected);
            proptest::prop_assert_eq!(steps(&times, max_step, strict), (expected.0, expected.1));
        }
    }
}
