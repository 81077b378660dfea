//! ProbeX's encoder, `e = M flatten(relu((X_b @ U)^T @ V^T)) + b`, and its gradients, with
//! `gemm` on row-major host slices.
//!
//! Two products carry nearly all of a training step's work: `R = X @ U` and `dU = X^T @ G`,
//! each one GEMM with the batch folded into rows (`[B*d_H, d_W]`). Through the tensor API each
//! would also allocate and fill a fresh 50 MB output per step at the paper's shape (a cost the
//! size of the product itself), and the encoder's permutes would copy; here `R` and `G` live in
//! a [`Scratch`] reused from step to step, and every other operand is read in place through
//! strides.
//!
//! Every sum runs in an order fixed by the shapes and the thread count (`gemm` splits the
//! output, never the sum, between threads; `dV`'s per-thread partial sums are added in thread
//! order), so a training stays deterministic for a given seed and thread count.

use gemm::Parallelism;
use rayon::prelude::*;

/// Samples per chunk of `G` in the backward pass: enough that each `X_chunk^T @ G_chunk` is
/// an efficient GEMM, few enough that the chunk stays in cache (chunks of 8 to 64 timed the
/// same on the 2-core build machine; the whole batch at once was 10% slower).
const G_CHUNK: usize = 8;

/// Shapes of one call: `X` `[b, d_h, d_w]`, `U` `[d_w, r_u]`, `V` `[r_v, d_h]`, `M`
/// `[r_t, r_u * r_v]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dims {
    /// Samples in the batch.
    pub b: usize,
    /// Rows of each input matrix `X` (the layer's output dimension).
    pub d_h: usize,
    /// Columns of each input matrix `X` (the layer's input dimension).
    pub d_w: usize,
    /// Number of probes: columns of `U`.
    pub r_u: usize,
    /// Width of the shared projection: rows of `V`.
    pub r_v: usize,
    /// Width of the encoding: rows of `M`.
    pub r_t: usize,
}

/// Buffers kept between training steps (see the module docs).
#[derive(Debug, Default)]
pub struct Scratch {
    r: Vec<f32>,
    g: Vec<f32>,
}

impl Scratch {
    /// Takes the `R` buffer, sized for `len` values; [`backward`] hands it back.
    fn take_r(&mut self, len: usize) -> Vec<f32> {
        let mut r = std::mem::take(&mut self.r);
        r.resize(len, 0.0);
        r
    }
}

/// A strided view of a matrix: element `(i, j)` is `data[i * rs + j * cs]`.
#[derive(Clone, Copy)]
struct View<'a> {
    data: &'a [f32],
    rs: usize,
    cs: usize,
}

impl<'a> View<'a> {
    /// A row-major matrix with `cols` columns.
    fn rows(data: &'a [f32], cols: usize) -> Self {
        View {
            data,
            rs: cols,
            cs: 1,
        }
    }

    /// The transpose of a row-major matrix with `cols` columns.
    fn transposed(data: &'a [f32], cols: usize) -> Self {
        View {
            data,
            rs: 1,
            cs: cols,
        }
    }

    /// Whether a `rows x cols` matrix fits in `data`.
    fn holds(&self, rows: usize, cols: usize) -> bool {
        rows == 0 || cols == 0 || (rows - 1) * self.rs + (cols - 1) * self.cs < self.data.len()
    }
}

/// `dst` (row-major `[m, n]`, row stride `ldd`) `= a @ b`, or `+= a @ b` when `accumulate`;
/// `a` is `[m, k]`, `b` is `[k, n]`.
fn matmul(
    (m, n, k): (usize, usize, usize),
    dst: &mut [f32],
    ldd: usize,
    (a, b): (View, View),
    accumulate: bool,
    par: Parallelism,
) {
    // These bounds are what make the raw-pointer call below sound.
    assert!(
        n <= ldd && View::rows(dst, ldd).holds(m, n) && a.holds(m, k) && b.holds(k, n),
        "matmul operands do not fit their buffers"
    );
    // SAFETY: the assertion above keeps every element `gemm` reads or writes inside its
    // slice; `dst` is borrowed mutably, so it overlaps neither operand.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            ldd as isize,
            accumulate,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            par,
        )
    }
}

fn all_threads() -> Parallelism {
    Parallelism::Rayon(rayon::current_num_threads().max(1))
}

/// The encoder's weights, row-major: `U` `[d_w, r_u]`, `V` `[r_v, d_h]`, `M`
/// `[r_t, r_u * r_v]` and `M`'s bias `[r_t]`.
pub struct Weights<'a> {
    /// The probes `U` `[d_w, r_u]`.
    pub u: &'a [f32],
    /// The shared projection `V` `[r_v, d_h]`.
    pub v: &'a [f32],
    /// The per-probe encoder `M` `[r_t, r_u * r_v]`.
    pub m: &'a [f32],
    /// `M`'s bias `[r_t]`, when the encoder has one.
    pub bias: Option<&'a [f32]>,
}

/// What [`backward`] needs of a [`forward`] pass.
pub struct Forward {
    /// `H` `[b, r_u, r_v]`, after the ReLU.
    pub h: Vec<f32>,
    /// `R = X @ U` `[b * d_h, r_u]`, in the scratch's buffer.
    pub r: Vec<f32>,
}

/// `e = M flatten(relu((X_b @ U)^T @ V^T)) + bias` `[b, r_t]` for every sample of `x`
/// `[b, d_h, d_w]`, and what [`backward`] needs.
///
/// # Panics
/// When a slice is shorter than `d` says.
pub fn forward(x: &[f32], w: &Weights, d: Dims, scratch: &mut Scratch) -> (Vec<f32>, Forward) {
    let Dims {
        b,
        d_h,
        d_w,
        r_u,
        r_v,
        r_t,
    } = d;
    let mut r = scratch.take_r(b * d_h * r_u);
    matmul(
        (b * d_h, r_u, d_w),
        &mut r,
        r_u,
        (View::rows(x, d_w), View::rows(w.u, r_u)),
        false,
        all_threads(),
    );
    // H_b = R_b^T @ V^T, read through strides: the official [probe, v] layout, no copies.
    let per = r_u * r_v;
    let mut h = vec![0f32; b * per];
    h.par_chunks_mut(per)
        .zip(r.par_chunks(d_h * r_u))
        .for_each(|(h_b, r_b)| {
            matmul(
                (r_u, r_v, d_h),
                h_b,
                r_v,
                (View::transposed(r_b, r_u), View::transposed(w.v, d_h)),
                false,
                Parallelism::None,
            );
            // `<=` keeps a NaN a NaN, as the tensor API's ReLU does; a select, not a branch,
            // so that the loop vectorises.
            h_b.iter_mut()
                .for_each(|e| *e = if *e <= 0.0 { 0.0 } else { *e });
        });
    let mut e = vec![0f32; b * r_t];
    if let Some(bias) = w.bias {
        e.chunks_mut(r_t).for_each(|row| row.copy_from_slice(bias));
    }
    matmul(
        (b, r_t, per),
        &mut e,
        r_t,
        (View::rows(&h, per), View::transposed(w.m, per)),
        w.bias.is_some(),
        all_threads(),
    );
    (e, Forward { h, r })
}

/// The encoder's gradients.
pub struct Gradients {
    /// `[d_w, r_u]`.
    pub u: Vec<f32>,
    /// `[r_v, d_h]`.
    pub v: Vec<f32>,
    /// `[r_t, r_u * r_v]`.
    pub m: Vec<f32>,
    /// `[r_t]`.
    pub bias: Vec<f32>,
}

/// The gradients of every encoder weight from `de` `[b, r_t]`, the loss gradient of `e`,
/// given what [`forward`] saw and returned; `R`'s buffer goes back into `scratch`.
///
/// # Panics
/// When a slice is shorter than `d` says.
pub fn backward(
    x: &[f32],
    w: &Weights,
    fwd: Forward,
    de: &[f32],
    d: Dims,
    scratch: &mut Scratch,
) -> Gradients {
    let Dims {
        b,
        d_h,
        d_w,
        r_u,
        r_v,
        r_t,
    } = d;
    let per = r_u * r_v;
    let Forward { h, r } = fwd;
    let mut bias = vec![0f32; r_t];
    for row in de.chunks(r_t) {
        bias.iter_mut().zip(row).for_each(|(a, g)| *a += g);
    }
    let mut dm = vec![0f32; r_t * per];
    matmul(
        (r_t, per, b),
        &mut dm,
        per,
        (View::transposed(de, r_t), View::rows(&h, per)),
        false,
        all_threads(),
    );
    // dPre = (dE @ M) masked by the ReLU, whose output is positive exactly where its input was.
    let mut dpre = vec![0f32; b * per];
    matmul(
        (b, per, r_t),
        &mut dpre,
        per,
        (View::rows(de, r_t), View::rows(w.m, per)),
        false,
        all_threads(),
    );
    dpre.par_chunks_mut(per)
        .zip(h.par_chunks(per))
        .for_each(|(g, h)| {
            g.iter_mut()
                .zip(h)
                .for_each(|(g, &h)| *g = if h <= 0.0 { 0.0 } else { *g });
        });

    // dV = sum_b dPre_b^T @ R_b^T: each thread sums a fixed range of samples.
    let threads = rayon::current_num_threads().clamp(1, b.max(1));
    let span = b.div_ceil(threads);
    let partials: Vec<Vec<f32>> = (0..threads)
        .into_par_iter()
        .map(|t| {
            let mut acc = vec![0f32; r_v * d_h];
            for (k, s) in (t * span..((t + 1) * span).min(b)).enumerate() {
                matmul(
                    (r_v, d_h, r_u),
                    &mut acc,
                    d_h,
                    (
                        View::transposed(&dpre[s * per..(s + 1) * per], r_v),
                        View::transposed(&r[s * d_h * r_u..(s + 1) * d_h * r_u], r_u),
                    ),
                    k > 0,
                    Parallelism::None,
                );
            }
            acc
        })
        .collect();
    let mut dv = vec![0f32; r_v * d_h];
    for p in &partials {
        dv.iter_mut().zip(p).for_each(|(a, g)| *a += g);
    }

    // dU = X^T @ G with G_b = V^T @ dPre_b^T `[d_h, r_u]`, a chunk of samples at a time.
    let mut du = vec![0f32; d_w * r_u];
    let g = &mut scratch.g;
    g.resize(G_CHUNK.min(b) * d_h * r_u, 0.0);
    for start in (0..b).step_by(G_CHUNK) {
        let n = G_CHUNK.min(b - start);
        let g = &mut g[..n * d_h * r_u];
        g.par_chunks_mut(d_h * r_u)
            .enumerate()
            .for_each(|(i, g_b)| {
                let s = start + i;
                matmul(
                    (d_h, r_u, r_v),
                    g_b,
                    r_u,
                    (
                        View::transposed(w.v, d_h),
                        View::transposed(&dpre[s * per..(s + 1) * per], r_v),
                    ),
                    false,
                    Parallelism::None,
                );
            });
        matmul(
            (d_w, r_u, n * d_h),
            &mut du,
            r_u,
            (
                View::transposed(&x[start * d_h * d_w..(start + n) * d_h * d_w], d_w),
                View::rows(g, r_u),
            ),
            start > 0,
            all_threads(),
        );
    }
    scratch.r = r;
    Gradients {
        u: du,
        v: dv,
        m: dm,
        bias,
    }
}
