//! An index of possibly overlapping intervals that finds those meeting a
//! query range in time proportional to what it finds (plus a constant 65
//! levels), whatever else it holds: a guest's vIOMMU mappings may alias
//! the same guest memory many times and be of any length, so a scan over
//! every mapping per unplugged range would cost ranges x mappings.
//!
//! Each interval `[start, last]` is kept at one node of the implicit binary
//! trie over 64-bit addresses: the smallest aligned block of 2^level bytes
//! that holds it. Every interval of a node of level >= 1 holds the node's
//! midpoint, so at a node only partly inside the query range the
//! intervals that meet it are a prefix of the node's intervals ordered by
//! start (query left of the midpoint) or a suffix of those ordered by last
//! (right of it); a node wholly inside meets all of its own.

use std::collections::BTreeSet;

/// Levels 0 (single addresses) to 64 (the whole address space).
const LEVELS: usize = 65;

/// Intervals `[start, last]` (inclusive) tagged with a `T` that tells
/// intervals with the same bounds apart.
///
/// Two flat sets rather than a set pair per node: most nodes hold one
/// interval, and the vIOMMU copies its model (this index with it) once
/// per request drain.
#[derive(Clone, Debug)]
pub(crate) struct IntervalIndex<T> {
    /// (level, block number at that level, start, tag).
    by_start: BTreeSet<(u8, u64, u64, T)>,
    /// (level, block number at that level, last, tag).
    by_last: BTreeSet<(u8, u64, u64, T)>,
    /// Intervals per level, so empty levels cost nothing.
    per_level: [usize; LEVELS],
}

impl<T> Default for IntervalIndex<T> {
    fn default() -> Self {
        IntervalIndex {
            by_start: BTreeSet::new(),
            by_last: BTreeSet::new(),
            per_level: [0; LEVELS],
        }
    }
}

/// `value >> shift`, 0 once every bit is shifted out.
fn block(value: u64, level: u8) -> u64 {
    value.checked_shr(u32::from(level)).unwrap_or(0)
}

/// The node that keeps `[start, last]`: the level is the number of
/// significant bits in which the bounds differ.
fn node_of(start: u64, last: u64) -> (u8, u64) {
    // At most 64, so the cast cannot truncate.
    let level = (u64::BITS - (start ^ last).leading_zeros()) as u8;
    (level, block(start, level))
}

impl<T: Ord + Copy + Tag> IntervalIndex<T> {
    #[cfg(test)]
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// Adds `[start, last]` (`start <= last`) tagged `tag`.
    pub(crate) fn insert(&mut self, start: u64, last: u64, tag: T) {
        debug_assert!(start <= last);
        let (level, number) = node_of(start, last);
        if self.by_start.insert((level, number, start, tag)) {
            self.by_last.insert((level, number, last, tag));
            self.per_level[usize::from(level)] += 1;
        }
    }

    /// Removes `[start, last]` tagged `tag`; false if it was not there.
    pub(crate) fn remove(&mut self, start: u64, last: u64, tag: T) -> bool {
        let (level, number) = node_of(start, last);
        if !self.by_start.remove(&(level, number, start, tag)) {
            return false;
        }
        self.by_last.remove(&(level, number, last, tag));
        self.per_level[usize::from(level)] -= 1;
        true
    }

    /// Tags of every interval that meets `[first, last]`, each once.
    pub(crate) fn meeting(&self, first: u64, last: u64) -> Vec<T> {
        let mut found = Vec::new();
        if first > last {
            return found;
        }
        for level in 0..LEVELS as u8 {
            if self.per_level[usize::from(level)] == 0 {
                continue;
            }
            let (first_block, last_block) = (block(first, level), block(last, level));
            self.meeting_in(level, first_block, first, last, &mut found);
            if last_block > first_block {
                // Blocks strictly between lie wholly inside the range.
                if last_block - first_block > 1 {
                    let from = (level, first_block + 1, 0, T::min_tag());
                    let to = (level, last_block, 0, T::min_tag());
                    found.extend(self.by_start.range(from..to).map(|k| k.3));
                }
                self.meeting_in(level, last_block, first, last, &mut found);
            }
        }
        found
    }

    /// The intervals of node (`level`, `number`) that meet `[first, last]`.
    fn meeting_in(&self, level: u8, number: u64, first: u64, last: u64, found: &mut Vec<T>) {
        let lo = number.checked_shl(u32::from(level)).unwrap_or(0);
        // The node's intervals all hold `mid - 1` and `mid` (level 0: its
        // one address, `lo`).
        let mid = match level {
            0 => lo,
            _ => lo | (1u64 << (level - 1)),
        };
        let below_mid = mid.saturating_sub(u64::from(level > 0));
        let node_start = |bound: u64| (level, number, bound, T::min_tag());
        let node_end = |bound: u64| (level, number, bound, T::max_tag());
        if first <= below_mid && mid <= last {
            let all = self.by_start.range(node_start(0)..=node_end(u64::MAX));
            found.extend(all.map(|k| k.3));
        } else if last < mid {
            // Left of the midpoint: those starting by `last`.
            let reach = self.by_start.range(node_start(0)..=node_end(last));
            found.extend(reach.map(|k| k.3));
        } else {
            // Right of it: those lasting up to `first` at least.
            let reach = self.by_last.range(node_start(first)..=node_end(u64::MAX));
            found.extend(reach.map(|k| k.3));
        }
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.per_level.iter().sum()
    }
}

/// The least and greatest tag, to bound range queries on `(bound, tag)`.
pub(crate) trait Tag {
    fn min_tag() -> Self;
    fn max_tag() -> Self;
}

impl Tag for u64 {
    fn min_tag() -> Self {
        u64::MIN
    }
    fn max_tag() -> Self {
        u64::MAX
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small deterministic generator (xorshift), so failures reproduce.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
    }

    fn brute(intervals: &[(u64, u64, u64)], first: u64, last: u64) -> Vec<u64> {
        let mut hit: Vec<u64> = intervals
            .iter()
            .filter(|(s, l, _)| *s <= last && *l >= first)
            .map(|(_, _, t)| *t)
            .collect();
        hit.sort_unstable();
        hit
    }

    #[test]
    fn finds_exactly_the_intervals_a_range_meets() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut index = IntervalIndex::new();
        let mut intervals = Vec::new();
        for tag in 0..2000u64 {
            // Short ones, long ones, and some at the ends of the space.
            let start = match tag % 7 {
                0 => u64::MAX - rng.next() % 4096,
                1 => rng.next() % 64,
                _ => rng.next() % (1 << 20),
            };
            let len = match tag % 5 {
                0 => rng.next() % (1 << 19),
                _ => rng.next() % 64,
            };
            let last = start.saturating_add(len);
            index.insert(start, last, tag);
            intervals.push((start, last, tag));
        }
        assert_eq!(index.len(), intervals.len());
        let mut queries = vec![(0, u64::MAX), (u64::MAX, u64::MAX), (0, 0)];
        for _ in 0..500 {
            let first = rng.next() % (1 << 20);
            queries.push((first, first + rng.next() % 4096));
        }
        for (first, last) in queries {
            let mut found = index.meeting(first, last);
            found.sort_unstable();
            assert_eq!(
                found,
                brute(&intervals, first, last),
                "{first:#x}..={last:#x}"
            );
        }
        // Removing half leaves exactly the other half findable.
        for &(start, last, tag) in intervals.iter().filter(|i| i.2 % 2 == 0) {
            assert!(index.remove(start, last, tag));
        }
        assert!(!index.remove(intervals[0].0, intervals[0].1, intervals[0].2));
        intervals.retain(|i| i.2 % 2 == 1);
        let mut found = index.meeting(0, u64::MAX);
        found.sort_unstable();
        assert_eq!(found, brute(&intervals, 0, u64::MAX));
    }
}
