//! How much memory a training may hold a layer in before it reads the layer from disk batch
//! by batch instead ([`probex_weights::dataset::LayerDataset::open`]).
//!
//! `PROBEX_MEMORY` sets it (`8G`, `512M`, `2GiB`, or bytes); by default it is half of the
//! memory the system reports available when the training starts (a quarter of it on each of
//! two nodes running at once is still safe: each reads only what it trains on), or 4 GiB
//! where the system does not say.

/// The environment variable that overrides the automatic budget.
pub const ENV: &str = "PROBEX_MEMORY";

/// Why a memory size cannot be read.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MemoryError {
    /// The number part is not a number.
    #[error("expected a size such as 8G, 512M or 1073741824")]
    NotASize,
    /// A unit other than K, M, G or T.
    #[error("unknown unit `{0}`: use K, M, G or T")]
    UnknownUnit(String),
    /// The size does not fit 64 bits.
    #[error("out of range")]
    OutOfRange,
    /// [`ENV`] holds a size that cannot be read.
    #[error("{ENV}={value}: {source}")]
    Env {
        /// The variable's value.
        value: String,
        /// What is wrong with it.
        #[source]
        source: Box<MemoryError>,
    },
}

/// The budget in bytes: `PROBEX_MEMORY` when set, else automatic (see the module docs).
pub fn budget() -> Result<u64, MemoryError> {
    match std::env::var(ENV) {
        Ok(v) if !v.trim().is_empty() => parse(&v).map_err(|m| MemoryError::Env {
            value: v.clone(),
            source: Box::new(m),
        }),
        _ => Ok(available().map_or(4 << 30, |a| a / 2)),
    }
}

/// Parses `8G`, `512M`, `2GiB`, `100k` or a number of bytes (units are powers of 1024).
pub fn parse(text: &str) -> Result<u64, MemoryError> {
    let t = text.trim();
    let digits = t
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(digits);
    let number: f64 = number.parse().map_err(|_| MemoryError::NotASize)?;
    let shift = match unit
        .trim()
        .to_ascii_lowercase()
        .trim_end_matches("ib")
        .trim_end_matches('b')
    {
        "" => 0,
        "k" => 10,
        "m" => 20,
        "g" => 30,
        "t" => 40,
        other => return Err(MemoryError::UnknownUnit(other.to_owned())),
    };
    let bytes = number * (1u64 << shift) as f64;
    if !bytes.is_finite() || bytes < 0.0 || bytes >= u64::MAX as f64 {
        return Err(MemoryError::OutOfRange);
    }
    Ok(bytes as u64)
}

/// `MemAvailable` of `/proc/meminfo`, in bytes.
fn available() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kb.checked_mul(1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_units() {
        assert_eq!(parse("1073741824"), Ok(1 << 30));
        assert_eq!(parse("8G"), Ok(8 << 30));
        assert_eq!(parse("8GiB"), Ok(8 << 30));
        assert_eq!(parse("512m"), Ok(512 << 20));
        assert_eq!(parse("1.5K"), Ok(1536));
        assert!(parse("lots").is_err());
        let e = parse("8Q").unwrap_err();
        assert_eq!(e, MemoryError::UnknownUnit("q".into()));
        assert!(e.to_string().contains("unknown unit"), "{e}");
        assert!(parse("").is_err());
    }
}
