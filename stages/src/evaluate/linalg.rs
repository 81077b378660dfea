//! The little dense linear algebra the metrics need: a symmetric eigendecomposition and the
//! pseudo-inverse built on it (what `scipy.linalg.pinvh` computes), on row-major `f64` slices.
//!
//! Products go through `matrixmultiply` (a dependency, so optimised even in the dev profile);
//! the eigensolver is the classic Householder tridiagonalisation followed by the implicit QL
//! algorithm (EISPACK `tred2`/`tql2`): O(d^3), robust, and no dependency for one routine.

use super::EvalError;

/// `C = op(A) op(B)` for row-major `f64` matrices, `C` being `m x n` and the inner dimension
/// `k`. With `a_t`, `a` holds the `k x m` matrix whose transpose is used (likewise `b_t`, `n x k`).
/// Panics on inconsistent lengths (an internal invariant: callers pass their own buffers).
pub(crate) fn matmul(
    a: &[f64],
    a_t: bool,
    b: &[f64],
    b_t: bool,
    m: usize,
    k: usize,
    n: usize,
) -> Vec<f64> {
    assert!(
        a.len() == m * k && b.len() == k * n,
        "matmul: buffer sizes do not match m, k, n"
    );
    probex_weights::gemm::product(a, a_t, b, b_t, [m, k, n])
}

/// Lower Cholesky factor `L` (row-major, `A = L L'`) of a symmetric positive definite matrix;
/// `None` when a pivot is not positive (the matrix is not numerically positive definite).
pub fn cholesky(a: &[f64], d: usize) -> Option<Vec<f64>> {
    if a.len() != d * d {
        return None;
    }
    let mut l = vec![0.0; d * d];
    for i in 0..d {
        for j in 0..=i {
            let mut s = a[i * d + j];
            for k in 0..j {
                s -= l[i * d + k] * l[j * d + k];
            }
            if i == j {
                if s <= 0.0 || !s.is_finite() {
                    return None;
                }
                l[i * d + i] = s.sqrt();
            } else {
                l[i * d + j] = s / l[j * d + j];
            }
        }
    }
    Some(l)
}

/// Inverse of a symmetric positive definite matrix through its Cholesky factor:
/// `A^-1 = L^-T L^-1`. `None` when the factorisation fails.
pub fn spd_inverse(a: &[f64], d: usize) -> Option<Vec<f64>> {
    let l = cholesky(a, d)?;
    // L^-1 by forward substitution, column by column (it is lower triangular too).
    let mut li = vec![0.0; d * d];
    for c in 0..d {
        li[c * d + c] = 1.0 / l[c * d + c];
        for r in (c + 1)..d {
            let mut s = 0.0;
            for k in c..r {
                s += l[r * d + k] * li[k * d + c];
            }
            li[r * d + c] = -s / l[r * d + r];
        }
    }
    Some(matmul(&li, true, &li, false, d, d, d))
}

/// Eigenvalues (ascending) and eigenvectors of a symmetric matrix.
#[derive(Clone, Debug, PartialEq)]
pub struct SymmetricEigen {
    /// Matrix order.
    pub d: usize,
    /// Eigenvalues, ascending.
    pub values: Vec<f64>,
    /// Eigenvectors as columns of a row-major `d x d` matrix: column `j` belongs to `values[j]`.
    pub vectors: Vec<f64>,
}

/// Eigendecomposition of the symmetric `d x d` row-major matrix `a` (only its lower triangle is
/// read). Errors on a shape mismatch, NaN, or (never seen in practice) non-convergence.
pub fn symmetric_eigen(a: &[f64], d: usize) -> Result<SymmetricEigen, EvalError> {
    if a.len() != d * d {
        return Err(EvalError::Shape {
            what: "symmetric matrix: number of entries (d*d)".into(),
            expected: d * d,
            got: a.len(),
        });
    }
    if a.iter().any(|v| v.is_nan()) {
        return Err(EvalError::NaN("symmetric matrix".into()));
    }
    if d == 0 {
        return Ok(SymmetricEigen {
            d,
            values: Vec::new(),
            vectors: Vec::new(),
        });
    }
    // v[i][j] row-major; symmetrise from the lower triangle so callers may pass rounding noise.
    let mut v = vec![0.0; d * d];
    for i in 0..d {
        for j in 0..=i {
            v[i * d + j] = a[i * d + j];
            v[j * d + i] = a[i * d + j];
        }
    }
    let mut dd = vec![0.0; d];
    let mut e = vec![0.0; d];
    tred2(d, &mut v, &mut dd, &mut e);
    tql2(d, &mut v, &mut dd, &mut e)?;
    Ok(SymmetricEigen {
        d,
        values: dd,
        vectors: v,
    })
}

/// Pseudo-inverse of a symmetric matrix, as `scipy.linalg.pinvh` with its default cut-off:
/// eigenvalues with `|lambda| <= d * f64::EPSILON * max|lambda|` are treated as zero. This is what
/// scikit-learn's covariance estimators use for their precision matrix.
pub fn pinvh(a: &[f64], d: usize) -> Result<Vec<f64>, EvalError> {
    let eig = symmetric_eigen(a, d)?;
    let max_abs = eig.values.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    let cutoff = d as f64 * f64::EPSILON * max_abs;
    // P = V diag(1/lambda) V' over the kept eigenpairs: scale V's columns, then one product.
    let mut scaled = eig.vectors.clone();
    for r in 0..d {
        for (j, &lambda) in eig.values.iter().enumerate() {
            scaled[r * d + j] *= if lambda.abs() > cutoff {
                1.0 / lambda
            } else {
                0.0
            };
        }
    }
    Ok(matmul(&scaled, false, &eig.vectors, true, d, d, d))
}

/// Householder reduction of the symmetric matrix in `v` to tridiagonal form; on return `v` holds
/// the accumulated orthogonal transform, `d` the diagonal and `e` the sub-diagonal (`e[0] = 0`).
fn tred2(n: usize, v: &mut [f64], d: &mut [f64], e: &mut [f64]) {
    let at = |i: usize, j: usize| i * n + j;
    for j in 0..n {
        d[j] = v[at(n - 1, j)];
    }
    for i in (1..n).rev() {
        let mut scale = 0.0;
        let mut h = 0.0;
        for dk in d.iter().take(i) {
            scale += dk.abs();
        }
        if scale == 0.0 {
            e[i] = d[i - 1];
            for j in 0..i {
                d[j] = v[at(i - 1, j)];
                v[at(i, j)] = 0.0;
                v[at(j, i)] = 0.0;
            }
        } else {
            for dk in d.iter_mut().take(i) {
                *dk /= scale;
                h += *dk * *dk;
            }
            let mut f = d[i - 1];
            let mut g = h.sqrt();
            if f > 0.0 {
                g = -g;
            }
            e[i] = scale * g;
            h -= f * g;
            d[i - 1] = f - g;
            for ej in e.iter_mut().take(i) {
                *ej = 0.0;
            }
            for j in 0..i {
                f = d[j];
                v[at(j, i)] = f;
                g = e[j] + v[at(j, j)] * f;
                for k in (j + 1)..i {
                    g += v[at(k, j)] * d[k];
                    e[k] += v[at(k, j)] * f;
                }
                e[j] = g;
            }
            f = 0.0;
            for j in 0..i {
                e[j] /= h;
                f += e[j] * d[j];
            }
            let hh = f / (h + h);
            for j in 0..i {
                e[j] -= hh * d[j];
            }
            for j in 0..i {
                f = d[j];
                g = e[j];
                for k in j..i {
                    v[at(k, j)] -= f * e[k] + g * d[k];
                }
                d[j] = v[at(i - 1, j)];
                v[at(i, j)] = 0.0;
            }
        }
        d[i] = h;
    }
    for i in 0..n - 1 {
        v[at(n - 1, i)] = v[at(i, i)];
        v[at(i, i)] = 1.0;
        let h = d[i + 1];
        if h != 0.0 {
            for k in 0..=i {
                d[k] = v[at(k, i + 1)] / h;
            }
            for j in 0..=i {
                let mut g = 0.0;
                for k in 0..=i {
                    g += v[at(k, i + 1)] * v[at(k, j)];
                }
                for k in 0..=i {
                    v[at(k, j)] -= g * d[k];
                }
            }
        }
        for k in 0..=i {
            v[at(k, i + 1)] = 0.0;
        }
    }
    for j in 0..n {
        d[j] = v[at(n - 1, j)];
        v[at(n - 1, j)] = 0.0;
    }
    v[at(n - 1, n - 1)] = 1.0;
    e[0] = 0.0;
}

/// Implicit QL iterations on the tridiagonal matrix (`d`, `e`) from [`tred2`], accumulating the
/// eigenvectors into `v`; sorts the eigenpairs ascending.
fn tql2(n: usize, v: &mut [f64], d: &mut [f64], e: &mut [f64]) -> Result<(), EvalError> {
    let at = |i: usize, j: usize| i * n + j;
    for i in 1..n {
        e[i - 1] = e[i];
    }
    e[n - 1] = 0.0;
    let mut f = 0.0;
    let mut tst1: f64 = 0.0;
    let eps = f64::EPSILON;
    // Convergence is typically 1-2 iterations per eigenvalue; the cap only turns a pathological
    // input into an error instead of an endless loop.
    let max_iter = 64 * n.max(1);
    for l in 0..n {
        tst1 = tst1.max(d[l].abs() + e[l].abs());
        let mut m = l;
        while m < n - 1 && e[m].abs() > eps * tst1 {
            m += 1;
        }
        if m > l {
            let mut iter = 0;
            loop {
                iter += 1;
                if iter > max_iter {
                    return Err(EvalError::Numeric(format!(
                        "symmetric eigendecomposition did not converge (eigenvalue {l} of {n})"
                    )));
                }
                let mut g = d[l];
                let mut p = (d[l + 1] - g) / (2.0 * e[l]);
                let mut r = p.hypot(1.0);
                if p < 0.0 {
                    r = -r;
                }
                d[l] = e[l] / (p + r);
                d[l + 1] = e[l] * (p + r);
                let dl1 = d[l + 1];
                let mut h = g - d[l];
                for di in d.iter_mut().skip(l + 2) {
                    *di -= h;
                }
                f += h;
                p = d[m];
                let mut c = 1.0;
                let mut c2 = c;
                let mut c3 = c;
                let el1 = e[l + 1];
                let mut s = 0.0;
                let mut s2 = 0.0;
                for i in (l..m).rev() {
                    c3 = c2;
                    c2 = c;
                    s2 = s;
                    g = c * e[i];
                    h = c * p;
                    r = p.hypot(e[i]);
                    e[i + 1] = s * r;
                    s = e[i] / r;
                    c = p / r;
                    p = c * d[i] - s * g;
                    d[i + 1] = h + s * (c * g + s * d[i]);
                    for k in 0..n {
                        h = v[at(k, i + 1)];
                        v[at(k, i + 1)] = s * v[at(k, i)] + c * h;
                        v[at(k, i)] = c * v[at(k, i)] - s * h;
                    }
                }
                p = -s * s2 * c3 * el1 * e[l] / dl1;
                e[l] = s * p;
                d[l] = c * p;
                if e[l].abs() <= eps * tst1 {
                    break;
                }
            }
        }
        d[l] += f;
        e[l] = 0.0;
    }
    // Selection sort keeps eigenvectors paired with their values.
    for i in 0..n.saturating_sub(1) {
        let mut k = i;
        let mut p = d[i];
        for (j, &dj) in d.iter().enumerate().skip(i + 1) {
            if dj < p {
                k = j;
                p = dj;
            }
        }
        if k != i {
            d[k] = d[i];
            d[i] = p;
            for r in 0..n {
                v.swap(at(r, i), at(r, k));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deterministic pseudo-random symmetric matrix (xorshift), so the test needs no RNG crate.
    fn sym(d: usize, seed: u64) -> Vec<f64> {
        let mut s = seed;
        let mut next = || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 11) as f64 / (1u64 << 53) as f64 - 0.5
        };
        let mut a = vec![0.0; d * d];
        for i in 0..d {
            for j in 0..=i {
                let x = next();
                a[i * d + j] = x;
                a[j * d + i] = x;
            }
        }
        a
    }

    #[test]
    fn eigen_reconstructs_and_is_orthonormal() {
        for (d, seed) in [(1, 1), (2, 7), (5, 3), (17, 11), (40, 5)] {
            let a = sym(d, seed);
            let eig = symmetric_eigen(&a, d).unwrap();
            assert!(eig.values.windows(2).all(|w| w[0] <= w[1]));
            for i in 0..d {
                for j in 0..d {
                    let mut rec = 0.0;
                    let mut dot = 0.0;
                    for k in 0..d {
                        rec += eig.vectors[i * d + k] * eig.values[k] * eig.vectors[j * d + k];
                        dot += eig.vectors[k * d + i] * eig.vectors[k * d + j];
                    }
                    assert!((rec - a[i * d + j]).abs() < 1e-12, "d={d} A[{i},{j}]");
                    let id = if i == j { 1.0 } else { 0.0 };
                    assert!((dot - id).abs() < 1e-12, "d={d} V'V[{i},{j}]");
                }
            }
        }
    }

    #[test]
    fn eigen_of_diagonal_and_repeated_values() {
        let a = [3.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 3.0];
        let eig = symmetric_eigen(&a, 3).unwrap();
        assert_eq!(eig.values, vec![1.0, 3.0, 3.0]);
    }

    #[test]
    fn pinvh_inverts_full_rank_and_drops_null_space() {
        let d = 6;
        let a = sym(d, 99);
        // A A^T + I is symmetric positive definite, so its pseudo-inverse is its inverse.
        let mut spd = vec![0.0; d * d];
        for i in 0..d {
            for j in 0..d {
                spd[i * d + j] = (0..d).map(|k| a[i * d + k] * a[j * d + k]).sum::<f64>()
                    + if i == j { 1.0 } else { 0.0 };
            }
        }
        let inv = pinvh(&spd, d).unwrap();
        for i in 0..d {
            for j in 0..d {
                let p: f64 = (0..d).map(|k| spd[i * d + k] * inv[k * d + j]).sum();
                let id = if i == j { 1.0 } else { 0.0 };
                assert!((p - id).abs() < 1e-10);
            }
        }
        // Rank one: u u^T has pseudo-inverse u u^T / |u|^4.
        let u = [1.0, 2.0, -2.0];
        let r1: Vec<f64> = (0..9).map(|k| u[k / 3] * u[k % 3]).collect();
        let pi = pinvh(&r1, 3).unwrap();
        for k in 0..9 {
            assert!((pi[k] - r1[k] / 81.0).abs() < 1e-12);
        }
        assert!(pinvh(&[0.0; 4], 2).unwrap().iter().all(|&x| x == 0.0));
    }

    #[test]
    fn matmul_transposes_and_spd_inverse() {
        // A is 2x3, B is 3x2.
        let a = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        let b = [1.0, 0.0, 0.0, 1.0, 1.0, 1.0];
        let ab = matmul(&a, false, &b, false, 2, 3, 2);
        assert_eq!(ab, vec![4.0, 5.0, 10.0, 11.0]);
        // A'A through the transpose flag equals the explicit product.
        let at: Vec<f64> = (0..6).map(|i| a[(i % 2) * 3 + i / 2]).collect();
        assert_eq!(
            matmul(&a, true, &a, false, 3, 2, 3),
            matmul(&at, false, &a, false, 3, 2, 3)
        );
        assert_eq!(
            matmul(&a, false, &a, true, 2, 3, 2),
            vec![14.0, 32.0, 32.0, 77.0]
        );
        let spd = [4.0, 2.0, 2.0, 3.0];
        let inv = spd_inverse(&spd, 2).unwrap();
        let want = [3.0 / 8.0, -2.0 / 8.0, -2.0 / 8.0, 4.0 / 8.0];
        for (g, w) in inv.iter().zip(want) {
            assert!((g - w).abs() < 1e-15);
        }
        assert!(spd_inverse(&[1.0, 2.0, 2.0, 1.0], 2).is_none());
    }

    #[test]
    fn rejects_bad_input() {
        assert!(matches!(
            symmetric_eigen(&[1.0, 2.0, 3.0], 2),
            Err(EvalError::Shape { .. })
        ));
        assert!(matches!(
            symmetric_eigen(&[f64::NAN], 1),
            Err(EvalError::NaN(_))
        ));
    }
}
