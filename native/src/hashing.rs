//! Redis Cluster key hashing: CRC16/XMODEM and the hash-tag rule that picks the hashed bytes.

/// Number of hash slots in a Redis Cluster keyspace.
pub const SLOTS: u16 = 16384;

/// CRC16/XMODEM lookup tables (polynomial 0x1021) for slicing-by-4, built at compile time:
/// `TABLES[k][b]` is the CRC of byte `b` followed by `k` zero bytes.
const TABLES: [[u16; 256]; 4] = build_tables();

const fn build_tables() -> [[u16; 256]; 4] {
    let mut tables = [[0u16; 256]; 4];
    let mut i = 0;
    while i < 256 {
        let mut crc = (i as u16) << 8;
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
            bit += 1;
        }
        tables[0][i] = crc;
        i += 1;
    }
    let mut k = 1;
    while k < 4 {
        let mut i = 0;
        while i < 256 {
            let prev = tables[k - 1][i];
            tables[k][i] = (prev << 8) ^ tables[0][(prev >> 8) as usize];
            i += 1;
        }
        k += 1;
    }
    tables
}

/// CRC16/XMODEM (poly 0x1021, init 0, no reflection), the checksum Redis Cluster uses for slots.
///
/// Four bytes per step (slicing-by-4): keys are short, and the byte-at-a-time loop is one long
/// dependency chain.
#[inline]
pub fn crc16(data: &[u8]) -> u16 {
    let [t0, t1, t2, t3] = &TABLES;
    let mut chunks = data.chunks_exact(4);
    let mut crc = 0u16;
    for c in &mut chunks {
        let [hi, lo] = crc.to_be_bytes();
        crc = t3[usize::from(hi ^ c[0])]
            ^ t2[usize::from(lo ^ c[1])]
            ^ t1[usize::from(c[2])]
            ^ t0[usize::from(c[3])];
    }
    chunks.remainder().iter().fold(crc, |crc, &b| {
        (crc << 8) ^ t0[usize::from((crc >> 8) as u8 ^ b)]
    })
}

/// The bytes Redis hashes for `key`: the content between the first `{` and the first `}` after
/// it when that content is non-empty, otherwise the whole key.
#[inline]
pub fn hashed_part(key: &[u8]) -> &[u8] {
    if let Some(open) = key.iter().position(|&b| b == b'{') {
        let rest = &key[open + 1..];
        if let Some(close) = rest.iter().position(|&b| b == b'}') {
            if close > 0 {
                return &rest[..close];
            }
        }
    }
    key
}

/// The Redis Cluster slot of `key`; equals `CLUSTER KEYSLOT key`.
#[inline]
pub fn key_slot(key: &[u8]) -> u16 {
    crc16(hashed_part(key)) & (SLOTS - 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::path::PathBuf;

    fn crc16_bitwise(data: &[u8]) -> u16 {
        let mut crc = 0u16;
        for &b in data {
            crc ^= u16::from(b) << 8;
            for _ in 0..8 {
                crc = if crc & 0x8000 != 0 {
                    (crc << 1) ^ 0x1021
                } else {
                    crc << 1
                };
            }
        }
        crc
    }

    fn decode_hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
            .collect()
    }

    #[test]
    fn crc16_check_value() {
        // The catalogued check value of CRC-16/XMODEM.
        assert_eq!(crc16(b"123456789"), 0x31C3);
        assert_eq!(crc16(b""), 0);
    }

    #[test]
    fn known_slots() {
        // Values from the Redis Cluster specification and redis-cli.
        assert_eq!(key_slot(b"foo"), 12182);
        assert_eq!(key_slot(b"{user1000}.following"), key_slot(b"user1000"));
        assert_eq!(key_slot(b"foo{}{bar}"), key_slot(b"foo{}{bar}"));
        assert_eq!(hashed_part(b"foo{}{bar}"), b"foo{}{bar}");
        assert_eq!(hashed_part(b"foo{{bar}}zap"), b"{bar");
        assert_eq!(hashed_part(b"foo{bar}{zap}"), b"bar");
        assert_eq!(hashed_part(b"{"), b"{");
        assert_eq!(hashed_part(b"}{x"), b"}{x");
    }

    #[test]
    fn shared_vectors() {
        let path =
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/vectors/key_slot.tsv");
        let Ok(text) = std::fs::read_to_string(&path) else {
            println!(
                "note: {} not found, skipping shared key_slot vectors",
                path.display()
            );
            return;
        };
        let mut checked = 0;
        for line in text.lines() {
            if line.starts_with('#') || line.is_empty() {
                continue;
            }
            let (hex, slot) = line.split_once('\t').expect("two columns");
            let key = decode_hex(hex);
            let slot: u16 = slot.trim().parse().expect("slot");
            assert_eq!(key_slot(&key), slot, "key {hex}");
            checked += 1;
        }
        assert!(checked > 3000, "only {checked} vectors read");
    }

    proptest! {
        #[test]
        fn table_matches_bitwise(data in proptest::collection::vec(any::<u8>(), 0..200)) {
            prop_assert_eq!(crc16(&data), crc16_bitwise(&data));
        }

        #[test]
        fn tagged_keys_share_slot(tag in "[a-z0-9:-]{1,20}", a in "[^{]{0,10}", b in ".{0,10}") {
            let key = format!("{a}{{{tag}}}{b}");
            prop_assert_eq!(key_slot(key.as_bytes()), key_slot(tag.as_bytes()));
        }

        #[test]
        fn slot_in_range(data in proptest::collection::vec(prop_oneof![Just(b'{'), Just(b'}'), any::<u8>()], 0..40)) {
            prop_assert!(key_slot(&data) < SLOTS);
        }
    }
}
