//! Scanning row bytes for NaN/Inf at memory speed, and coalescing the spans read ahead.

use super::*;

/// Writes a mapped row piece (already at the stored precision) in cache-sized chunks,
/// counting non-finite values of each chunk just before it is copied. Returns the count.
pub(super) fn write_scanned(
    file: &LayerFile,
    slot: usize,
    part: usize,
    precision: Precision,
    bytes: &[u8],
) -> std::io::Result<usize> {
    const CHUNK: usize = 256 << 10;
    if bytes.len() != file.part_bytes(part) {
        return Err(std::io::Error::other(format!(
            "row piece of {} bytes, expected {}",
            bytes.len(),
            file.part_bytes(part)
        )));
    }
    let mut bad = 0;
    let mut at = 0;
    for chunk in bytes.chunks(CHUNK) {
        bad += count_non_finite_bytes(chunk, precision);
        file.write_row_part(slot, part, at, chunk)?;
        at += chunk.len();
    }
    Ok(bad)
}

/// Counts non-finite little-endian values straight from bytes (exponent all ones).
///
/// Extraction scans every byte it refers to, so this runs at memory speed: counts are kept in
/// lanes as wide as the values (u16 for halves, u32 for floats) over blocks short enough not
/// to overflow them, which lets the compiler vectorise the loop (a usize count per value made
/// it widen every lane to 64 bits and scan 2 values per step).
pub(super) fn count_non_finite_bytes(bytes: &[u8], precision: Precision) -> usize {
    match precision {
        Precision::F32 => {
            const BLOCK: usize = 1 << 16;
            bytes
                .chunks(4 * BLOCK)
                .map(|block| {
                    let mut n: u32 = 0;
                    for c in block.chunks_exact(4) {
                        let bits = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                        n += u32::from(bits & 0x7f80_0000 == 0x7f80_0000);
                    }
                    n as usize
                })
                .sum()
        }
        Precision::F16 | Precision::Bf16 => {
            let exponent: u16 = if precision == Precision::F16 {
                0x7c00
            } else {
                0x7f80
            };
            // u16 lanes: at most 2^16 - 1 values per block.
            const BLOCK: usize = (1 << 16) - 1;
            bytes
                .chunks(2 * BLOCK)
                .map(|block| {
                    let mut n: u16 = 0;
                    for c in block.chunks_exact(2) {
                        n += u16::from(u16::from_le_bytes([c[0], c[1]]) & exponent == exponent);
                    }
                    usize::from(n)
                })
                .sum()
        }
    }
}

/// Counts non-finite values in little-endian bytes of a float dtype (0 for other dtypes).
pub(super) fn non_finite_in(dtype: Dtype, bytes: &[u8]) -> usize {
    match dtype {
        Dtype::F32 => count_non_finite_bytes(bytes, Precision::F32),
        Dtype::F16 => count_non_finite_bytes(bytes, Precision::F16),
        Dtype::BF16 => count_non_finite_bytes(bytes, Precision::Bf16),
        Dtype::F64 => bytes
            .chunks_exact(8)
            .filter(|c| {
                let bits = u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
                bits & 0x7ff0_0000_0000_0000 == 0x7ff0_0000_0000_0000
            })
            .count(),
        _ => 0,
    }
}

/// Spans closer than this are read ahead as one range (the pages between cost less than a call).
pub(super) const PREFETCH_GAP: usize = 1 << 20;

/// Sorts `spans` and merges those that overlap or lie within `gap` bytes of each other.
pub(super) fn coalesce(spans: &mut [Range<usize>], gap: usize) -> Vec<Range<usize>> {
    spans.sort_by_key(|r| r.start);
    let mut merged: Vec<Range<usize>> = Vec::new();
    for r in spans.iter().filter(|r| !r.is_empty()) {
        match merged.last_mut() {
            Some(last) if r.start <= last.end.saturating_add(gap) => last.end = last.end.max(r.end),
            _ => merged.push(r.clone()),
        }
    }
    merged
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The blockwise count equals a plain count across block edges, for every float width.
    #[test]
    fn non_finite_counts_are_exact_across_blocks() {
        let n = 3 * (1 << 16) + 7;
        let bad_at =
            |i: usize| i.is_multiple_of(997) || i == (1 << 16) - 1 || i == 1 << 16 || i == n - 1;
        let f32s: Vec<u8> = (0..n)
            .flat_map(|i| {
                let v = match (bad_at(i), i % 3) {
                    (true, 0) => f32::NAN,
                    (true, 1) => f32::INFINITY,
                    (true, _) => f32::NEG_INFINITY,
                    (false, _) => i as f32 * 1e-3 - 10.0,
                };
                v.to_le_bytes()
            })
            .collect();
        let want = (0..n).filter(|&i| bad_at(i)).count();
        assert!(want > 100);
        assert_eq!(count_non_finite_bytes(&f32s, Precision::F32), want);
        let halves = |f: fn(f32) -> [u8; 2]| -> Vec<u8> {
            f32s.chunks_exact(4)
                .flat_map(|c| f(f32::from_le_bytes([c[0], c[1], c[2], c[3]])))
                .collect()
        };
        let f16s = halves(|v| half::f16::from_f32(v).to_le_bytes());
        let bf16s = halves(|v| half::bf16::from_f32(v).to_le_bytes());
        assert_eq!(count_non_finite_bytes(&f16s, Precision::F16), want);
        assert_eq!(count_non_finite_bytes(&bf16s, Precision::Bf16), want);
    }

    #[test]
    fn prefetch_spans_merge_when_close_and_stay_apart_when_far() {
        let mut spans = vec![100..200, 0..50, 60..70, 5000..6000, 180..300, 7..7];
        assert_eq!(
            coalesce(&mut spans, 5),
            vec![0..50, 60..70, 100..300, 5000..6000]
        );
        assert_eq!(coalesce(&mut spans, 10), vec![0..70, 100..300, 5000..6000]);
        assert_eq!(coalesce(&mut spans, 10_000), vec![0..6000]);
        assert!(coalesce(&mut [], 10).is_empty());
    }
}
