//! Cache keys: validated blake3 digests in lowercase hex.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::CacheError;

/// The address of one cache entry: 64 lowercase hex characters (a blake3 digest).
///
/// Keys are validated on construction (and on deserialization), so a `Key` can be used as a
/// path component without further checks.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Key(String);

impl Key {
    /// Number of characters in a key.
    pub const LEN: usize = 64;

    /// Parses and validates a key; rejects anything but exactly 64 lowercase hex characters.
    pub fn parse(s: &str) -> Result<Key, CacheError> {
        let bad = |reason: String| CacheError::BadKey {
            input: shorten(s),
            reason,
        };
        if s.len() != Self::LEN {
            return Err(bad(format!(
                "it has {} characters, expected {}",
                s.chars().count(),
                Self::LEN
            )));
        }
        if let Some((i, c)) = s
            .char_indices()
            .find(|(_, c)| !matches!(c, '0'..='9' | 'a'..='f'))
        {
            let why = if c.is_ascii_hexdigit() {
                "uppercase hex is not accepted"
            } else {
                "not a hex digit"
            };
            return Err(bad(format!("character {c:?} at offset {i}: {why}")));
        }
        Ok(Key(s.to_owned()))
    }

    /// The key of a blake3 digest (its lowercase hex form).
    pub fn from_hash(hash: &blake3::Hash) -> Key {
        Key(hash.to_hex().to_string())
    }

    /// The key as its 64-character string.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The first two characters, used as the shard directory under `entries/`.
    pub fn shard(&self) -> &str {
        &self.0[..2]
    }
}

/// Keeps error messages readable when the rejected input is huge.
fn shorten(s: &str) -> String {
    const MAX: usize = 80;
    if s.chars().count() <= MAX {
        s.to_owned()
    } else {
        let head: String = s.chars().take(MAX).collect();
        format!("{head}...")
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Key({})", self.0)
    }
}

impl FromStr for Key {
    type Err = CacheError;
    fn from_str(s: &str) -> Result<Key, CacheError> {
        Key::parse(s)
    }
}

impl TryFrom<String> for Key {
    type Error = CacheError;
    fn try_from(s: String) -> Result<Key, CacheError> {
        Key::parse(&s)
    }
}

impl From<Key> for String {
    fn from(k: Key) -> String {
        k.0
    }
}

impl From<blake3::Hash> for Key {
    fn from(h: blake3::Hash) -> Key {
        Key::from_hash(&h)
    }
}

impl AsRef<str> for Key {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn accepts_lowercase_hex_of_64() {
        let k = Key::parse(GOOD).unwrap();
        assert_eq!(k.as_str(), GOOD);
        assert_eq!(k.to_string(), GOOD);
        assert_eq!(k.shard(), "01");
        assert_eq!(GOOD.parse::<Key>().unwrap(), k);
    }

    #[test]
    fn rejects_bad_strings() {
        let upper = GOOD.to_uppercase();
        let with_g = format!("{}g", &GOOD[..63]);
        let multibyte = format!("{}é", &GOOD[..62]);
        let traversal = format!("../{}", &GOOD[..61]);
        for bad in [
            "",
            &GOOD[..63],
            &format!("{GOOD}0"),
            &upper,
            &with_g,
            &multibyte,
            &traversal,
        ] {
            let err = Key::parse(bad).expect_err(bad);
            assert!(matches!(err, CacheError::BadKey { .. }), "{bad}: {err}");
        }
    }

    #[test]
    fn error_names_the_input_and_the_problem() {
        let msg = Key::parse("abc").unwrap_err().to_string();
        assert!(msg.contains("`abc`"), "{msg}");
        assert!(msg.contains("3 characters"), "{msg}");
        let long = "x".repeat(10_000);
        let msg = Key::parse(&long).unwrap_err().to_string();
        assert!(
            msg.len() < 400,
            "message should shorten huge input: {} bytes",
            msg.len()
        );
    }

    #[test]
    fn from_hash_matches_blake3_hex() {
        let h = blake3::hash(b"probex");
        let k = Key::from_hash(&h);
        assert_eq!(k.as_str(), h.to_hex().as_str());
        assert_eq!(Key::parse(k.as_str()).unwrap(), k);
    }

    #[test]
    fn serde_round_trip_validates() {
        let k = Key::parse(GOOD).unwrap();
        let json = serde_json::to_string(&k).unwrap();
        assert_eq!(json, format!("\"{GOOD}\""));
        assert_eq!(serde_json::from_str::<Key>(&json).unwrap(), k);
        assert!(serde_json::from_str::<Key>("\"../../etc\"").is_err());
    }

    #[test]
    fn orders_like_strings() {
        let a = Key::parse(&"0".repeat(64)).unwrap();
        let b = Key::parse(&"f".repeat(64)).unwrap();
        assert!(a < b);
    }
}
