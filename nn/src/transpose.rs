//! Row-major host matrices transposed: how a weight moves between PyTorch's `[out, in]` and the
//! layout a product reads in place.

/// `data` `[rows, cols]` row-major, as `[cols, rows]` row-major.
pub fn transpose(data: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0; data.len()];
    transpose_into(data, rows, cols, &mut out);
    out
}

/// [`transpose`] into `out` (of `rows * cols` values), for a caller that fills one buffer with
/// many matrices.
pub fn transpose_into(data: &[f32], rows: usize, cols: usize, out: &mut [f32]) {
    debug_assert_eq!(data.len(), rows * cols);
    debug_assert_eq!(out.len(), rows * cols);
    for (r, row) in data.chunks_exact(cols).enumerate() {
        for (c, &v) in row.iter().enumerate() {
            out[c * rows + r] = v;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_become_columns() {
        let a = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]; // [[1, 2, 3], [4, 5, 6]]
        assert_eq!(transpose(&a, 2, 3), vec![1.0, 4.0, 2.0, 5.0, 3.0, 6.0]);
        assert_eq!(transpose(&transpose(&a, 2, 3), 3, 2), a.to_vec());
    }
}
