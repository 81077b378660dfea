//! Lower-case hex, the one spelling of digests across probex: keys, manifests, file names
//! derived from digests, and the sha256 checks of downloads all compare hex strings, so they
//! must be written the same way everywhere.

/// The bytes as lower-case hex, two digits per byte (`[0xab, 0x01]` -> `"ab01"`).
pub fn encode(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::encode;

    #[test]
    fn lower_case_two_digits_per_byte() {
        assert_eq!(encode(&[]), "");
        assert_eq!(
            encode(&[0x00, 0x01, 0x0f, 0x10, 0xab, 0xff]),
            "00010f10abff"
        );
        // The same spelling as blake3's own hex, which keys use.
        let h = blake3::hash(b"probex");
        assert_eq!(encode(h.as_bytes()), h.to_hex().as_str());
    }
}
