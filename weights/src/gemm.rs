//! Row-major matrix products on host slices through `matrixmultiply` (a dependency, so
//! optimised even in the dev profile, where probex's own loops are not): LoRA products,
//! the metrics' linear algebra, the router's Gram matrices. One wrapper for `f32` and `f64`,
//! and the one `unsafe` call site.

/// The element types `matrixmultiply` multiplies.
pub trait Scalar: Copy + Default {
    /// `c = alpha * op(a) @ op(b) + beta * c`, in `matrixmultiply`'s strided form.
    ///
    /// # Safety
    /// Every index the strides reach must lie inside the buffers the pointers point into,
    /// and `c`'s elements must not alias.
    #[allow(clippy::too_many_arguments)]
    unsafe fn gemm(
        m: usize,
        k: usize,
        n: usize,
        a: *const Self,
        a_strides: (isize, isize),
        b: *const Self,
        b_strides: (isize, isize),
        beta: Self,
        c: *mut Self,
        rsc: isize,
    );
    /// One.
    const ONE: Self;
}

impl Scalar for f32 {
    const ONE: f32 = 1.0;
    unsafe fn gemm(
        m: usize,
        k: usize,
        n: usize,
        a: *const f32,
        (rsa, csa): (isize, isize),
        b: *const f32,
        (rsb, csb): (isize, isize),
        beta: f32,
        c: *mut f32,
        rsc: isize,
    ) {
        // SAFETY: forwarded from the caller's contract.
        unsafe { matrixmultiply::sgemm(m, k, n, 1.0, a, rsa, csa, b, rsb, csb, beta, c, rsc, 1) }
    }
}

impl Scalar for f64 {
    const ONE: f64 = 1.0;
    unsafe fn gemm(
        m: usize,
        k: usize,
        n: usize,
        a: *const f64,
        (rsa, csa): (isize, isize),
        b: *const f64,
        (rsb, csb): (isize, isize),
        beta: f64,
        c: *mut f64,
        rsc: isize,
    ) {
        // SAFETY: forwarded from the caller's contract.
        unsafe { matrixmultiply::dgemm(m, k, n, 1.0, a, rsa, csa, b, rsb, csb, beta, c, rsc, 1) }
    }
}

/// `c += op(a) @ op(b)` for row-major matrices, `op` transposing when its flag is set:
/// `op(a)` is `[m, k]` (with `a_t`, `a` holds the `[k, m]` matrix), `op(b)` `[k, n]`, `c`
/// `[m, n]`.
///
/// # Panics
/// When a slice is shorter than its matrix (a caller's bug, never data-dependent).
pub fn add_product<T: Scalar>(
    a: &[T],
    a_t: bool,
    b: &[T],
    b_t: bool,
    [m, k, n]: [usize; 3],
    c: &mut [T],
) {
    assert!(
        a.len() >= m * k && b.len() >= k * n && c.len() >= m * n,
        "add_product: operands do not hold [{m}, {k}] @ [{k}, {n}]"
    );
    if m == 0 || n == 0 || k == 0 {
        return;
    }
    let sa = if a_t {
        (1, m as isize)
    } else {
        (k as isize, 1)
    };
    let sb = if b_t {
        (1, k as isize)
    } else {
        (n as isize, 1)
    };
    // SAFETY: the assert above makes every index the strides reach ((m-1)*rsa + (k-1)*csa <
    // m*k, the same for B and C) lie inside `a`, `b` and `c`; `c` is borrowed mutably and
    // laid out with row stride n and unit column stride, so no two of its elements alias.
    unsafe {
        T::gemm(
            m,
            k,
            n,
            a.as_ptr(),
            sa,
            b.as_ptr(),
            sb,
            T::ONE,
            c.as_mut_ptr(),
            n as isize,
        );
    }
}

/// `op(a) @ op(b)` as a fresh `[m, n]` matrix (see [`add_product`]).
pub fn product<T: Scalar>(a: &[T], a_t: bool, b: &[T], b_t: bool, shape: [usize; 3]) -> Vec<T> {
    let mut c = vec![T::default(); shape[0] * shape[2]];
    add_product(a, a_t, b, b_t, shape, &mut c);
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both precisions, every transpose combination, against a direct triple loop.
    #[test]
    fn products_match_the_definition() {
        let (m, k, n) = (3, 4, 2);
        let a: Vec<f64> = (0..m * k).map(|i| i as f64 * 0.5 - 2.0).collect();
        let b: Vec<f64> = (0..k * n).map(|i| 1.0 - i as f64 * 0.25).collect();
        let at = |x: &[f64], r: usize, c: usize| -> Vec<f64> {
            (0..c * r).map(|i| x[(i % r) * c + i / r]).collect()
        };
        let want: Vec<f64> = (0..m * n)
            .map(|i| (0..k).map(|p| a[(i / n) * k + p] * b[p * n + i % n]).sum())
            .collect();
        let (a_t, b_t) = (at(&a, m, k), at(&b, k, n));
        for (x, xt, y, yt) in [
            (&a, false, &b, false),
            (&a_t, true, &b, false),
            (&a, false, &b_t, true),
            (&a_t, true, &b_t, true),
        ] {
            assert_eq!(product(x, xt, y, yt, [m, k, n]), want);
            let x32: Vec<f32> = x.iter().map(|&v| v as f32).collect();
            let y32: Vec<f32> = y.iter().map(|&v| v as f32).collect();
            let got = product(&x32, xt, &y32, yt, [m, k, n]);
            assert!(
                got.iter()
                    .zip(&want)
                    .all(|(g, w)| (f64::from(*g) - w).abs() < 1e-5)
            );
        }
        let mut acc = want.clone();
        add_product(&a, false, &b, false, [m, k, n], &mut acc);
        assert!(
            acc.iter()
                .zip(&want)
                .all(|(g, w)| (g - 2.0 * w).abs() < 1e-12)
        );
    }
}
