//! Lookups in path-sorted lists that are read in the same order as they are sorted.
//!
//! A copy lists each directory in name order, and the lists it looks its files up in (the
//! context's index, an earlier result's file index) are sorted by path: the next file is
//! nearly always the entry after the last one found. So does a layer write over a donor's tar
//! index (`layer::Donor`). A binary search for each of 500k files
//! costs ~19 probes, each a cache miss once the list outgrows the CPU's caches, so the lookup
//! first tries the entry after the last one this thread found.

use std::cell::Cell;
use std::thread::LocalKey;

/// The position of `target` in a list of `len` items sorted by `key_of` (strictly, so at most
/// one matches); `next` is this thread's guess (the position after its last find), updated.
pub fn find<'a, K: Ord + ?Sized + 'a>(
    len: usize,
    key_of: impl Fn(usize) -> &'a K,
    target: &K,
    next: &'static LocalKey<Cell<usize>>,
) -> Option<usize> {
    let at = find_from(len, key_of, target, next.get())?;
    next.set(at + 1);
    Some(at)
}

/// The position of `target` in a list of `len` items sorted by `key_of` (strictly), looked for
/// first at `guess`, then by binary search.
pub fn find_from<'a, K: Ord + ?Sized + 'a>(
    len: usize,
    key_of: impl Fn(usize) -> &'a K,
    target: &K,
    guess: usize,
) -> Option<usize> {
    if guess < len && key_of(guess) == target {
        return Some(guess);
    }
    let (mut lo, mut hi) = (0usize, len);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        match key_of(mid).cmp(target) {
            std::cmp::Ordering::Less => lo = mid + 1,
            std::cmp::Ordering::Greater => hi = mid,
            std::cmp::Ordering::Equal => return Some(mid),
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    thread_local! {
        static NEXT: Cell<usize> = const { Cell::new(0) };
    }

    #[test]
    fn finds_in_order_out_of_order_and_not_at_all() {
        let list = ["a", "a/b", "a/c", "b", "c/d"];
        let find = |t: &str| find(list.len(), |i| list[i], t, &NEXT);
        // In order: each from the guess.
        for (i, t) in list.iter().enumerate() {
            assert_eq!(find(t), Some(i));
            assert_eq!(NEXT.get(), i + 1);
        }
        // A guess past the end, out of order, and missing paths (before, between, after).
        assert_eq!(find("a/b"), Some(1));
        assert_eq!(find("a"), Some(0));
        for missing in ["", "a/a", "a/bb", "bb", "z"] {
            assert_eq!(find(missing), None, "{missing}");
        }
        let none: [&str; 0] = [];
        assert_eq!(super::find(0, |i| none[i], "a", &NEXT), None);
    }
}
