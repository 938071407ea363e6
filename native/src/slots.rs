//! The slot table: which shard owns each of the 16384 slots, and each shard's identity.

use crate::hashing::{key_slot, SLOTS};
use crate::resp::Decimal;
use std::fmt;

/// Why a slot table could not be built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableError(pub String);

impl fmt::Display for TableError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for TableError {}

/// Marks a slot no range has claimed yet while a table is validated.
const UNOWNED: u16 = u16::MAX;

fn fail<T>(msg: String) -> Result<T, TableError> {
    Err(TableError(msg))
}

/// Slot ownership and shard identities under one topology epoch.
#[derive(Debug, Clone)]
pub struct SlotTable {
    epoch: u64,
    epoch_text: Vec<u8>,
    uuids: Vec<String>,
    ranges: Vec<(u16, u16)>,
    owner: Vec<u16>,
}

impl SlotTable {
    /// Builds a table where shard `i` has `uuids[i]` and owns the inclusive range `ranges[i]`.
    ///
    /// The ranges must cover every slot exactly once, the epoch must be at least 1 and every
    /// uuid must be non-empty printable ASCII (it is sent as a bulk string and hashed into tags).
    pub fn new(epoch: i64, uuids: Vec<String>, ranges: &[(i64, i64)]) -> Result<Self, TableError> {
        if epoch < 1 {
            return fail(format!("epoch must be >= 1, got {epoch}"));
        }
        if uuids.is_empty() {
            return fail("a slot table needs at least one shard".to_owned());
        }
        if uuids.len() != ranges.len() {
            return fail(format!(
                "{} uuids but {} slot ranges",
                uuids.len(),
                ranges.len()
            ));
        }
        for (i, uuid) in uuids.iter().enumerate() {
            if uuid.is_empty() || !uuid.bytes().all(|b| b.is_ascii_graphic()) {
                return fail(format!(
                    "uuid of shard {i} must be non-empty printable ASCII, got {uuid:?}"
                ));
            }
        }
        let mut owner = vec![UNOWNED; usize::from(SLOTS)];
        let mut checked = Vec::with_capacity(ranges.len());
        for (i, &(start, end)) in ranges.iter().enumerate() {
            let max = i64::from(SLOTS - 1);
            if !(0..=max).contains(&start) || !(0..=max).contains(&end) {
                return fail(format!(
                    "slot range of shard {i} ({start}, {end}) is outside 0..{max}"
                ));
            }
            if start > end {
                return fail(format!(
                    "slot range of shard {i} ({start}, {end}) starts after it ends"
                ));
            }
            for (slot, o) in owner
                .iter_mut()
                .enumerate()
                .take(end as usize + 1)
                .skip(start as usize)
            {
                if *o != UNOWNED {
                    return fail(format!(
                        "slot {slot} is in the ranges of both shard {o} and shard {i}"
                    ));
                }
                *o = i as u16;
            }
            checked.push((start as u16, end as u16));
        }
        if let Some(slot) = owner.iter().position(|&o| o == UNOWNED) {
            return fail(format!("slot {slot} is not in any shard's range"));
        }
        Ok(Self {
            epoch: epoch as u64,
            epoch_text: Decimal::new(epoch as u64).as_bytes().to_vec(),
            uuids,
            ranges: checked,
            owner,
        })
    }

    /// A table splitting the slots evenly over `uuids.len()` shards (see [`even_ranges`]).
    pub fn even(epoch: i64, uuids: Vec<String>) -> Result<Self, TableError> {
        if uuids.is_empty() {
            return fail("a slot table needs at least one shard".to_owned());
        }
        let ranges = even_ranges(uuids.len())?;
        let ranges: Vec<(i64, i64)> = ranges
            .into_iter()
            .map(|(s, e)| (i64::from(s), i64::from(e)))
            .collect();
        Self::new(epoch, uuids, &ranges)
    }

    /// The topology epoch.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The epoch in decimal, as sent on the wire and hashed into tags.
    pub fn epoch_text(&self) -> &[u8] {
        &self.epoch_text
    }

    /// Number of shards.
    pub fn num_shards(&self) -> usize {
        self.uuids.len()
    }

    /// The uuid of `shard`, if it exists.
    pub fn uuid(&self, shard: usize) -> Option<&str> {
        self.uuids.get(shard).map(String::as_str)
    }

    /// The inclusive slot range of `shard`, if it exists.
    pub fn range(&self, shard: usize) -> Option<(u16, u16)> {
        self.ranges.get(shard).copied()
    }

    /// The shard owning `slot`, if the slot is in `0..16384`.
    #[inline]
    pub fn shard_of_slot(&self, slot: usize) -> Option<usize> {
        self.owner.get(slot).map(|&s| usize::from(s))
    }

    /// The shard owning `key`'s slot.
    #[inline]
    pub fn shard_for_key(&self, key: &[u8]) -> usize {
        usize::from(self.owner[usize::from(key_slot(key))])
    }
}

/// Even split of the slots over `n` shards: shard `i` owns `[i*16384/n, (i+1)*16384/n - 1]`.
pub fn even_ranges(n: usize) -> Result<Vec<(u16, u16)>, TableError> {
    let slots = usize::from(SLOTS);
    if n == 0 || n > slots {
        return fail(format!("number of shards must be in 1..={slots}, got {n}"));
    }
    Ok((0..n)
        .map(|i| ((i * slots / n) as u16, ((i + 1) * slots / n - 1) as u16))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn uuids(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("uuid-{i}")).collect()
    }

    #[test]
    fn even_two() {
        assert_eq!(even_ranges(2).unwrap(), vec![(0, 8191), (8192, 16383)]);
        assert_eq!(even_ranges(1).unwrap(), vec![(0, 16383)]);
        assert!(even_ranges(0).is_err());
        assert!(even_ranges(16385).is_err());
        assert_eq!(even_ranges(16384).unwrap()[5], (5, 5));
    }

    #[test]
    fn lookups() {
        let t = SlotTable::even(3, uuids(2)).unwrap();
        assert_eq!(t.epoch(), 3);
        assert_eq!(t.epoch_text(), b"3");
        assert_eq!(t.shard_of_slot(8191), Some(0));
        assert_eq!(t.shard_of_slot(8192), Some(1));
        assert_eq!(t.shard_of_slot(16384), None);
        assert_eq!(t.shard_for_key(b"foo"), 1); // slot 12182
        assert_eq!(t.uuid(1), Some("uuid-1"));
        assert_eq!(t.uuid(2), None);
        assert_eq!(t.range(1), Some((8192, 16383)));
    }

    #[test]
    fn rejects_bad_tables() {
        type Case = (i64, Vec<String>, Vec<(i64, i64)>, &'static str);
        let cases: Vec<Case> = vec![
            (0, uuids(1), vec![(0, 16383)], "epoch"),
            (1, vec![], vec![], "at least one"),
            (1, uuids(2), vec![(0, 16383)], "2 uuids but 1"),
            (1, vec![String::new()], vec![(0, 16383)], "uuid of shard 0"),
            (1, vec!["a b".into()], vec![(0, 16383)], "uuid of shard 0"),
            (1, uuids(1), vec![(0, 16384)], "outside"),
            (1, uuids(1), vec![(-1, 16383)], "outside"),
            (
                1,
                uuids(2),
                vec![(0, 100), (100, 16383)],
                "slot 100 is in the ranges of both",
            ),
            (
                1,
                uuids(2),
                vec![(0, 100), (102, 16383)],
                "slot 101 is not in any",
            ),
            (
                1,
                uuids(2),
                vec![(0, 100), (16383, 101)],
                "starts after it ends",
            ),
        ];
        for (epoch, u, r, want) in cases {
            let err = SlotTable::new(epoch, u, &r).unwrap_err();
            assert!(err.0.contains(want), "{err} does not mention {want}");
        }
    }

    proptest! {
        #[test]
        fn even_covers_everything(n in 1usize..=64) {
            let ranges = even_ranges(n).unwrap();
            prop_assert_eq!(ranges[0].0, 0);
            prop_assert_eq!(ranges[n - 1].1, SLOTS - 1);
            for w in ranges.windows(2) {
                prop_assert_eq!(w[0].1 + 1, w[1].0);
            }
            prop_assert!(SlotTable::even(1, uuids(n)).is_ok());
        }
    }
}
