//! Spare buffers: the large buffers of a run (bar ticks and ATR values of `prepare`, the
//! fill, trade and stop rows of each job), kept when a run ends and handed to the next one.
//!
//! A fresh buffer costs a page fault per 4 KiB page the first time it is written, and on a
//! virtual machine a fault costs more than the conversion that fills the page: the 32 MB
//! of ticks of a million bars took half of `prepare`'s time in faults. A buffer written by
//! the previous run has its pages already, so a run after the first one writes into memory
//! that is already there. At most [`MAX_KEPT_BYTES`] per element type stay allocated
//! between runs (the most recently returned buffers); buffers below [`MIN_KEPT_BYTES`]
//! come from the allocator's own free lists cheaply and are not kept.
//!
//! May not touch: what the buffers hold; a taken buffer is empty, whatever it held before.

use std::sync::{Mutex, PoisonError};

/// Buffers smaller than this are not worth keeping. Above the allocator's own free lists
/// (glibc maps blocks of 128 KiB and more afresh): the ticks of a 10,000-bar series are
/// 160 KiB, and faulting them in again at each run cost a quarter of a 100-series run.
const MIN_KEPT_BYTES: usize = 1 << 16;

/// The most memory one pool keeps between runs.
const MAX_KEPT_BYTES: usize = 64 << 20;

/// A pool of empty vectors of `T` with their capacity (and pages) kept.
pub(crate) struct Spare<T> {
    kept: Mutex<Vec<Vec<T>>>,
}

impl<T> Spare<T> {
    pub(crate) const fn new() -> Self {
        Self {
            kept: Mutex::new(Vec::new()),
        }
    }

    /// An empty vector with room for `n` values: the smallest kept one that is large
    /// enough, else a new one.
    pub(crate) fn take(&self, n: usize) -> Vec<T> {
        if n * size_of::<T>() >= MIN_KEPT_BYTES {
            // A poisoned lock only means another run panicked while holding it; the
            // vectors inside are still just empty buffers.
            let mut kept = self.kept.lock().unwrap_or_else(PoisonError::into_inner);
            let best = kept
                .iter()
                .enumerate()
                .filter(|(_, v)| v.capacity() >= n)
                .min_by_key(|(_, v)| v.capacity())
                .map(|(i, _)| i);
            if let Some(i) = best {
                return kept.swap_remove(i);
            }
        }
        Vec::with_capacity(n)
    }

    /// The largest kept vector (empty), else a new one without capacity: for rows whose
    /// number is not known beforehand.
    pub(crate) fn take_largest(&self) -> Vec<T> {
        let mut kept = self.kept.lock().unwrap_or_else(PoisonError::into_inner);
        let largest = kept
            .iter()
            .enumerate()
            .max_by_key(|(_, v)| v.capacity())
            .map(|(i, _)| i);
        largest.map_or_else(Vec::new, |i| kept.swap_remove(i))
    }

    /// Keeps `buffer` (emptied) for a later [`Spare::take`], dropping the oldest kept
    /// buffers beyond [`MAX_KEPT_BYTES`].
    pub(crate) fn give(&self, mut buffer: Vec<T>) {
        let bytes = |v: &Vec<T>| v.capacity() * size_of::<T>();
        if bytes(&buffer) < MIN_KEPT_BYTES || bytes(&buffer) > MAX_KEPT_BYTES {
            return;
        }
        buffer.clear();
        let mut kept = self.kept.lock().unwrap_or_else(PoisonError::into_inner);
        kept.push(buffer);
        let mut total: usize = kept.iter().map(bytes).sum();
        while total > MAX_KEPT_BYTES {
            total -= bytes(&kept.remove(0));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_given_buffer_comes_back_empty_with_its_capacity() {
        let spare = Spare::<u64>::new();
        let mut buffer = spare.take(1 << 18);
        buffer.extend(0..1 << 18);
        let at = buffer.as_ptr();
        spare.give(buffer);
        let again = spare.take(1000 << 8);
        assert!(again.is_empty());
        assert_eq!(again.as_ptr(), at);
        assert!(again.capacity() >= 1 << 18);
        // Nothing kept any more: a new one.
        let fresh = spare.take(1 << 18);
        assert_ne!(fresh.as_ptr(), at);
    }

    #[test]
    fn the_smallest_large_enough_buffer_is_taken_and_small_ones_are_not_kept() {
        let spare = Spare::<u8>::new();
        let (big, medium) = (Vec::with_capacity(8 << 20), Vec::with_capacity(2 << 20));
        let (big_at, medium_at) = (big.as_ptr(), medium.as_ptr());
        spare.give(big);
        spare.give(medium);
        spare.give(Vec::with_capacity(1000));
        let first = spare.take(2 << 20);
        let second = spare.take(2 << 20);
        assert_eq!((first.as_ptr(), second.as_ptr()), (medium_at, big_at));
        assert_eq!(spare.kept.lock().unwrap().len(), 0);
    }

    #[test]
    fn the_largest_is_taken_for_rows_of_unknown_number() {
        let spare = Spare::<u8>::new();
        assert_eq!(spare.take_largest().capacity(), 0);
        let (big, medium) = (Vec::with_capacity(8 << 20), Vec::with_capacity(2 << 20));
        let (big_at, medium_at) = (big.as_ptr(), medium.as_ptr());
        spare.give(medium);
        spare.give(big);
        let first = spare.take_largest();
        let second = spare.take_largest();
        assert_eq!((first.as_ptr(), second.as_ptr()), (big_at, medium_at));
    }

    #[test]
    fn at_most_the_cap_is_kept_newest_first() {
        let spare = Spare::<u8>::new();
        // Five buffers of 3/8 of the cap: the newest two stay.
        for _ in 0..5 {
            spare.give(Vec::with_capacity(MAX_KEPT_BYTES / 8 * 3));
        }
        let kept = spare.kept.lock().unwrap();
        assert_eq!(kept.len(), 2);
        assert!(kept.iter().map(Vec::capacity).sum::<usize>() <= MAX_KEPT_BYTES);
    }
}
