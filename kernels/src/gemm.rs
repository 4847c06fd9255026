//! f32 matrix products `C = alpha · op(A) · op(B) + beta · C` on row-major, strided storage.
//!
//! The work is done by the `gemm` crate (runtime-dispatched AVX2 / AVX-512 micro-kernels, rayon
//! parallel over [`crate::threads`] threads); it was chosen over a hand-written micro-kernel by
//! measurement (see BENCHMARKS.md, "Kernels"). Every operand is described by a [`MatLayout`]:
//! a row-major matrix with a row stride (`ld`, in elements), read transposed when `trans` is set,
//! which is exactly the IR's `matmul` with `transpose_a` / `transpose_b`.
//!
//! `beta == 0` means C is written without being read (NaN in C is not propagated), as in BLAS.
//!
//! The crate packs its weight operand on every call (our row-major C makes it compute Cᵀ, so a
//! linear layer's W is its left operand, packed whether W is stored `[n, k]` or `[k, n]`; for
//! W of at most 2·mc rows on the calling thread, before its parallel region). f32 weights are
//! nevertheless used in place and not packed once at load, as bf16 ones are: a GEMM on f32
//! panels packed once (an AVX2/FMA 6×16 micro-kernel, the crate's own AVX2 schedule) was built
//! and measured against the crate at the 125M Llama's prefill and decode shapes and was not
//! faster; the crate's packing was 3.8 % of f32 prefill's samples on that (AVX2-only) machine
//! (BENCHMARKS.md, "f32 weights packed once at load for the f32 GEMM").

use crate::KernelError;
use gemm::Parallelism;

/// How one operand is stored: row-major with row stride `ld` (elements), read transposed when
/// `trans` is set. For `op(A)` of shape m×k: untransposed A is stored m×k (`ld ≥ k`), transposed
/// A is stored k×m (`ld ≥ m`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MatLayout {
    /// Row stride of the stored matrix, in elements.
    pub ld: usize,
    /// Read the stored matrix transposed.
    pub trans: bool,
}

impl MatLayout {
    /// A dense (unpadded) layout for a logical `rows × cols` operand, transposed or not.
    pub fn dense(rows: usize, cols: usize, trans: bool) -> MatLayout {
        MatLayout {
            ld: if trans { rows } else { cols },
            trans,
        }
    }

    /// (row stride, column stride) of the *logical* matrix, in elements.
    fn strides(self) -> (isize, isize) {
        if self.trans {
            (1, self.ld as isize)
        } else {
            (self.ld as isize, 1)
        }
    }

    /// Elements a slice must hold for a logical `rows × cols` matrix in this layout.
    fn needed(self, rows: usize, cols: usize) -> usize {
        let (srows, scols) = if self.trans {
            (cols, rows)
        } else {
            (rows, cols)
        };
        if srows == 0 || scols == 0 {
            0
        } else {
            (srows - 1) * self.ld + scols
        }
    }

    fn check(
        self,
        what: &'static str,
        rows: usize,
        cols: usize,
        len: usize,
    ) -> Result<(), KernelError> {
        let scols = if self.trans { rows } else { cols };
        if rows > 0 && cols > 0 && self.ld < scols {
            return Err(KernelError::Layout(format!(
                "{what}: row stride {} is less than the stored row length {scols}",
                self.ld
            )));
        }
        let need = self.needed(rows, cols);
        if len < need {
            return Err(KernelError::Layout(format!(
                "{what}: {rows}x{cols} (trans={}, ld={}) needs {need} elements, got {len}",
                self.trans, self.ld
            )));
        }
        Ok(())
    }
}

/// The shape and scaling of one product `C[m×n] = alpha · op(A)[m×k] · op(B)[k×n] + beta · C`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Gemm {
    /// Rows of op(A) and C.
    pub m: usize,
    /// Columns of op(B) and C.
    pub n: usize,
    /// Columns of op(A), rows of op(B).
    pub k: usize,
    /// Layout of A.
    pub a: MatLayout,
    /// Layout of B.
    pub b: MatLayout,
    /// Row stride of C (`≥ n`); C is never transposed.
    pub ldc: usize,
    /// Scale of the product.
    pub alpha: f32,
    /// Scale of the old C; 0 means C is only written.
    pub beta: f32,
}

impl Gemm {
    /// `C = op(A) · op(B)` on dense operands (no padding, `alpha = 1`, `beta = 0`).
    pub fn dense(m: usize, n: usize, k: usize, trans_a: bool, trans_b: bool) -> Gemm {
        Gemm {
            m,
            n,
            k,
            a: MatLayout::dense(m, k, trans_a),
            b: MatLayout::dense(k, n, trans_b),
            ldc: n,
            alpha: 1.0,
            beta: 0.0,
        }
    }

    /// Floating-point operations of one product (2·m·n·k).
    pub fn flops(&self) -> f64 {
        2.0 * self.m as f64 * self.n as f64 * self.k as f64
    }

    fn check(&self, a: usize, b: usize, c: usize) -> Result<(), KernelError> {
        self.a.check("A", self.m, self.k, a)?;
        self.b.check("B", self.k, self.n, b)?;
        MatLayout {
            ld: self.ldc,
            trans: false,
        }
        .check("C", self.m, self.n, c)
    }
}

/// Products smaller than this many multiply-adds run on one thread.
const PARALLEL_MIN_MACS: usize = 48 * 48 * 48;

/// Runs `p` on `a`, `b`, `c` with up to `threads` threads (1 = the calling thread only).
pub(crate) fn run(p: &Gemm, a: &[f32], b: &[f32], c: &mut [f32], threads: usize) {
    if p.m == 0 || p.n == 0 {
        return;
    }
    if p.k == 0 || p.alpha == 0.0 {
        // Nothing to add: C = beta · C (C is not read when beta is 0).
        for row in c.chunks_mut(p.ldc.max(1)).take(p.m) {
            for v in &mut row[..p.n] {
                *v = if p.beta == 0.0 { 0.0 } else { p.beta * *v };
            }
        }
        return;
    }
    let macs = p.m.saturating_mul(p.n).saturating_mul(p.k);
    let par = if threads > 1 && macs >= PARALLEL_MIN_MACS {
        Parallelism::Rayon(threads)
    } else {
        Parallelism::None
    };
    let (a_rs, a_cs) = p.a.strides();
    let (b_rs, b_cs) = p.b.strides();
    // SAFETY: `Gemm::check` (called by every public entry before this) proved that every
    // element the strides address lies inside `a`, `b` and `c`: for each operand the largest
    // offset is (stored rows - 1)·ld + stored cols - 1 < len. `c` is borrowed mutably, so
    // nothing else aliases it while `gemm` writes; A and B are only read. Note the `gemm`
    // crate's convention: dst = alpha·dst + beta·lhs·rhs, so our beta is its alpha and our alpha
    // its beta, and `read_dst = false` when our beta is 0 (C is then not read).
    unsafe {
        gemm::gemm(
            p.m,
            p.n,
            p.k,
            c.as_mut_ptr(),
            1,
            p.ldc as isize,
            p.beta != 0.0,
            a.as_ptr(),
            a_cs,
            a_rs,
            b.as_ptr(),
            b_cs,
            b_rs,
            p.beta,
            p.alpha,
            false,
            false,
            false,
            par,
        );
    }
}

/// `C = alpha · op(A) · op(B) + beta · C`, parallel over [`crate::threads`] threads.
pub fn matmul_f32(p: &Gemm, a: &[f32], b: &[f32], c: &mut [f32]) -> Result<(), KernelError> {
    p.check(a.len(), b.len(), c.len())?;
    run(p, a, b, c, crate::threads());
    Ok(())
}

/// Batch strides (elements between consecutive matrices) of a batched product; a stride of 0
/// broadcasts that operand over the batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchStrides {
    /// Between A matrices.
    pub a: usize,
    /// Between B matrices.
    pub b: usize,
    /// Between C matrices (must be ≥ the extent of one C, so the outputs do not overlap).
    pub c: usize,
}

/// `batch` independent products `C_i = alpha · op(A_i) · op(B_i) + beta · C_i` with
/// `A_i = a[i·strides.a ..]` (likewise B, C). Small products are spread over the threads one
/// matrix each; large ones run one after another, each on all threads.
pub fn matmul_f32_batched(
    p: &Gemm,
    batch: usize,
    strides: BatchStrides,
    a: &[f32],
    b: &[f32],
    c: &mut [f32],
) -> Result<(), KernelError> {
    if batch == 0 {
        return Ok(());
    }
    let last = batch - 1;
    let c_extent = MatLayout {
        ld: p.ldc,
        trans: false,
    }
    .needed(p.m, p.n);
    if batch > 1 && strides.c < c_extent {
        return Err(KernelError::Layout(format!(
            "C batch stride {} is less than one C matrix ({c_extent} elements)",
            strides.c
        )));
    }
    let tail = |s: &[f32], stride: usize, what: &str| -> Result<usize, KernelError> {
        s.len().checked_sub(last * stride).ok_or_else(|| {
            KernelError::Layout(format!("{what}: batch of {batch} runs past the slice"))
        })
    };
    p.check(
        tail(a, strides.a, "A")?,
        tail(b, strides.b, "B")?,
        tail(c, strides.c, "C")?,
    )?;
    if c_extent == 0 {
        return Ok(());
    }
    let threads = crate::threads();
    let macs = p.m.saturating_mul(p.n).saturating_mul(p.k);
    if threads > 1 && batch > 1 && macs < 8 * PARALLEL_MIN_MACS {
        use rayon::prelude::*;
        // Each C_i is the first `c_extent` elements of its own `strides.c` chunk, so the chunks
        // are disjoint (checked above: strides.c ≥ c_extent).
        c.par_chunks_mut(strides.c.max(1))
            .take(batch)
            .enumerate()
            .for_each(|(i, ci)| run(p, &a[i * strides.a..], &b[i * strides.b..], ci, 1));
    } else {
        for i in 0..batch {
            let ci = &mut c[i * strides.c..];
            run(p, &a[i * strides.a..], &b[i * strides.b..], ci, threads);
        }
    }
    Ok(())
}
