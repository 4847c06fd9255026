//! The tasks shared by the GEMMs over weights packed once in panels, bf16
//! ([`crate::gemm_bf16`]) and f32 ([`crate::gemm_f32_packed`]): `C_i = A · W_iᵀ` for several
//! weights over the same A (a transformer's Q/K/V or gate/up projections) in ONE parallel
//! region. A is prepared once per call in each form the weights need (rounded to bf16 pairs,
//! copied as f32); C is computed in tasks of a block of rows × a group of panels spread over
//! the threads, and each task finishes its block of C with the caller's epilogue
//! ([`RowEpilogue`]: bias, activation, residual) while the block is still in cache.

use crate::gemm::{matmul_f32, Gemm};
use crate::gemm_bf16::{self, PackedBf16};
use crate::gemm_f32_packed::{self as f32p, PackedF32};
use crate::simd::Isa;
use crate::KernelError;
use half::bf16;
use rayon::prelude::*;
use std::ops::Range;

/// A packed weight `W[n×k]`.
#[derive(Debug, Clone, Copy)]
pub enum Packed<'w> {
    /// bf16 panels; A is rounded to bf16.
    Bf16(&'w PackedBf16),
    /// f32 panels.
    F32(&'w PackedF32),
}

/// How a kind of packed weight divides C into tiles and tasks.
struct Tiling {
    /// Rows per micro-kernel tile.
    mr: usize,
    /// Rows per task (a multiple of `mr`).
    mc: usize,
    /// Columns per panel.
    nr: usize,
    /// Panels per task.
    nc: usize,
}

impl Packed<'_> {
    /// Output columns (rows of W).
    pub fn n(&self) -> usize {
        match self {
            Packed::Bf16(w) => w.n(),
            Packed::F32(w) => w.n(),
        }
    }

    /// Inner dimension.
    pub fn k(&self) -> usize {
        match self {
            Packed::Bf16(w) => w.k(),
            Packed::F32(w) => w.k(),
        }
    }

    /// Columns of C per task: the parts of rows a [`RowEpilogue`] gets start at multiples of it.
    pub fn task_cols(&self) -> usize {
        let t = self.tiling();
        t.nc * t.nr
    }

    fn tiling(&self) -> Tiling {
        match self {
            Packed::Bf16(_) => Tiling {
                mr: gemm_bf16::MR,
                mc: gemm_bf16::MC,
                nr: gemm_bf16::NR,
                nc: gemm_bf16::NC,
            },
            Packed::F32(_) => Tiling {
                mr: f32p::MR,
                mc: f32p::MC,
                nr: f32p::NR,
                nc: f32p::NC,
            },
        }
    }
}

/// A function finishing computed parts of C: `f(i, r, c0, y)` with `y` columns `c0..c0 +
/// y.len()` of row `r` of `C_i`, called once for every element of every product, while the
/// task that computed them still has them in cache (an epilogue: bias, activation, residual).
pub type RowEpilogue<'e> = dyn Fn(usize, usize, usize, &mut [f32]) + Sync + 'e;

/// `C_i = A · W_iᵀ` for every `(W_i, C_i)` of `products` (each `C_i` row-major `m × n_i`,
/// overwritten) over the same `a` (`m × k`, rounded to bf16 for the bf16 weights), at level
/// `isa`: A is prepared once and the tiles of every product share one parallel region.
/// `epilogue`, if any, then finishes each task's block of C (parts of rows of at most
/// [`Packed::task_cols`] columns, each starting at a multiple of it) before the task ends.
/// Without AVX512-BF16, bf16 weights are widened to f32 and [`matmul_f32`] runs (same rounding
/// of A, different accumulation order).
pub fn matmul_packed_many_with(
    isa: Isa,
    m: usize,
    a: &[f32],
    products: &mut [(Packed<'_>, &mut [f32])],
    epilogue: Option<&RowEpilogue<'_>>,
) -> Result<(), KernelError> {
    let Some(k) = products.first().map(|(w, _)| w.k()) else {
        return Ok(());
    };
    for (w, c) in products.iter() {
        let n = w.n();
        if w.k() != k || a.len() != m * k || c.len() != m * n {
            return Err(KernelError::Layout(format!(
                "packed matmul {m}x{n}x{}: A has {} elements (want {}), C {} (want {})",
                w.k(),
                a.len(),
                m * w.k(),
                c.len(),
                m * n
            )));
        }
    }
    if m == 0 {
        return Ok(());
    }
    // Every row of product i, after the product (the paths that do not run in tasks).
    let finish = |i: usize, n: usize, c: &mut [f32]| {
        if let Some(f) = epilogue {
            for (r, y) in c.chunks_mut(n.max(1)).enumerate() {
                f(i, r, 0, y);
            }
        }
    };
    if k == 0 {
        for (i, (w, c)) in products.iter_mut().enumerate() {
            c.fill(0.0);
            finish(i, w.n(), c);
        }
        return Ok(());
    }
    let bf16_tiles = gemm_bf16::has_panel_row(isa);
    let mut rounded: Option<Vec<f32>> = None;
    // Tasks (product, tiles, panel group); C_i through a pointer each.
    let mut tasks = Vec::new();
    let mut outs = Vec::with_capacity(products.len());
    for (i, (w, c)) in products.iter_mut().enumerate() {
        if let (Packed::Bf16(wb), false) = (*w, bf16_tiles) {
            let ar = rounded
                .get_or_insert_with(|| a.iter().map(|&v| bf16::from_f32(v).to_f32()).collect());
            matmul_f32(
                &Gemm::dense(m, wb.n(), k, false, true),
                ar,
                &wb.unpack_f32(),
                c,
            )?;
            finish(i, wb.n(), c);
            outs.push((*w, SyncPtr(std::ptr::null_mut())));
            continue;
        }
        let t = w.tiling();
        let panels = w.n().div_ceil(t.nr);
        for rb in 0..m.div_ceil(t.mc) {
            for g in 0..panels.div_ceil(t.nc) {
                let tiles = rb * t.mc / t.mr..((rb + 1) * t.mc).min(m).div_ceil(t.mr);
                tasks.push((i, tiles, g * t.nc..((g + 1) * t.nc).min(panels)));
            }
        }
        outs.push((*w, SyncPtr(c.as_mut_ptr())));
    }
    let bf16_a = tasks
        .iter()
        .any(|(i, ..)| matches!(outs[*i].0, Packed::Bf16(_)));
    let f32_a = tasks
        .iter()
        .any(|(i, ..)| matches!(outs[*i].0, Packed::F32(_)));
    let run = |bf: Option<(&[u32], usize)>, fa: Option<(&[f32], usize)>| {
        tasks.into_par_iter().for_each(|(i, tiles, group)| {
            let (w, c) = &outs[i];
            run_task(isa, m, *w, c.0, &tiles, &group, bf, fa);
            if let Some(f) = epilogue {
                let t = w.tiling();
                let n = w.n();
                let cols = group.start * t.nr..(group.end * t.nr).min(n);
                for r in tiles.start * t.mr..(tiles.end * t.mr).min(m) {
                    // SAFETY: this task owns row r's columns `cols` of C_i (inside its m × n,
                    // row stride n), which no one else accesses now: the tasks' (tiles, group)
                    // rectangles are disjoint and every C stays mutably borrowed (through
                    // `products`) for the whole parallel loop.
                    let y = unsafe {
                        std::slice::from_raw_parts_mut(c.0.add(r * n + cols.start), cols.len())
                    };
                    f(i, r, cols.start, y);
                }
            }
        })
    };
    let with_f32 = |bf: Option<(&[u32], usize)>| {
        if f32_a {
            f32p::with_copied_a(m, k, a, |fa, lda| run(bf, Some((fa, lda))))
        } else {
            run(bf, None)
        }
    };
    if bf16_a {
        gemm_bf16::with_packed_a(m, k, a, |ap, lda| with_f32(Some((ap, lda))));
    } else {
        with_f32(None);
    }
    Ok(())
}

/// The products of one task: tiles `tiles` × panels `group` of `w`'s C at `c` (`m × n`), from
/// A prepared as `w` needs it (`bf`: bf16 pairs, `fa`: f32, each with its row stride).
#[allow(clippy::too_many_arguments)]
fn run_task(
    isa: Isa,
    m: usize,
    w: Packed<'_>,
    c: *mut f32,
    tiles: &Range<usize>,
    group: &Range<usize>,
    bf: Option<(&[u32], usize)>,
    fa: Option<(&[f32], usize)>,
) {
    match (w, bf, fa) {
        #[cfg(target_arch = "x86_64")]
        (Packed::Bf16(w), Some((ap, lda)), _) => {
            // SAFETY: bf16 tasks exist only where AVX512-BF16 is available
            // (`gemm_bf16::has_panel_row`); the task's tiles and panels lie inside C_i and are
            // its alone (see `matmul_packed_many_with`).
            unsafe { gemm_bf16::block(ap, lda, w, m, tiles.clone(), group.clone(), c) }
        }
        (Packed::F32(w), _, Some((ap, lda))) => {
            // SAFETY: as above, the task's rectangle of C_i is inside it and its alone.
            unsafe { f32p::block(isa, ap, lda, w, m, tiles.clone(), group.clone(), c) }
        }
        // Every task's A form was prepared (see `matmul_packed_many_with`).
        _ => {}
    }
}

/// A pointer shared by the tasks, each writing its own elements.
struct SyncPtr(*mut f32);
// SAFETY: the tasks write disjoint elements through it (see `matmul_packed_many_with`).
unsafe impl Sync for SyncPtr {}
