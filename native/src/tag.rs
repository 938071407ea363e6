//! Write tags: the 16-hex-digit proof that a write was prepared for one shard identity and key.

use sha1::{Digest, Sha1};

/// Length in bytes of a write tag (16 lowercase hex digits).
pub const TAG_LEN: usize = 16;

const HEX: &[u8; 16] = b"0123456789abcdef";

/// A SHA1 state already fed with `uuid ":" epoch ":"`, so one shard's tags only hash their keys.
#[derive(Clone)]
pub struct Tagger {
    prefix: Sha1,
}

impl Tagger {
    /// Prepares the tag prefix for the shard identity `(uuid, epoch)`.
    pub fn new(uuid: &[u8], epoch: u64) -> Self {
        let mut prefix = Sha1::new();
        prefix.update(uuid);
        prefix.update(b":");
        prefix.update(crate::resp::Decimal::new(epoch).as_bytes());
        prefix.update(b":");
        Self { prefix }
    }

    /// The tag of `key`: the first 16 lowercase hex digits of
    /// `SHA1(uuid ":" epoch ":" key)`.
    #[inline]
    pub fn tag(&self, key: &[u8]) -> [u8; TAG_LEN] {
        let mut hasher = self.prefix.clone();
        hasher.update(key);
        let digest = hasher.finalize();
        let mut out = [0u8; TAG_LEN];
        for (pair, byte) in out.chunks_exact_mut(2).zip(digest.iter()) {
            pair[0] = HEX[usize::from(byte >> 4)];
            pair[1] = HEX[usize::from(byte & 0x0f)];
        }
        out
    }
}

/// The write tag of `key` for the shard identity `(uuid, epoch)`; see [`Tagger::tag`].
pub fn write_tag(uuid: &[u8], epoch: u64, key: &[u8]) -> [u8; TAG_LEN] {
    Tagger::new(uuid, epoch).tag(key)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::fmt::Write as _;

    fn sha1_hex(data: &[u8]) -> String {
        Sha1::digest(data).iter().fold(String::new(), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
    }

    #[test]
    fn known_tag() {
        // sha1("0123456789abcdef0123456789abcdef:1:{1:presence-room-1}:pres")
        let uuid = b"0123456789abcdef0123456789abcdef";
        let key = b"{1:presence-room-1}:pres";
        let full = sha1_hex(b"0123456789abcdef0123456789abcdef:1:{1:presence-room-1}:pres");
        assert_eq!(&write_tag(uuid, 1, key)[..], &full.as_bytes()[..16]);
        // sha1("") is a well-known constant; check the hex encoding against it.
        assert_eq!(sha1_hex(b""), "da39a3ee5e6b4b0d3255bfef95601890afd80709");
        let tag = write_tag(b"u", 42, b"k");
        let expected = sha1_hex(b"u:42:k");
        assert_eq!(std::str::from_utf8(&tag).unwrap(), &expected[..16]);
    }

    proptest! {
        #[test]
        fn tag_matches_definition(
            uuid in "[0-9a-f]{0,40}",
            epoch in any::<u64>(),
            key in proptest::collection::vec(any::<u8>(), 0..300),
        ) {
            let mut msg = format!("{uuid}:{epoch}:").into_bytes();
            msg.extend_from_slice(&key);
            let expected = sha1_hex(&msg);
            let tag = write_tag(uuid.as_bytes(), epoch, &key);
            prop_assert_eq!(std::str::from_utf8(&tag).unwrap(), &expected[..16]);
        }
    }
}
