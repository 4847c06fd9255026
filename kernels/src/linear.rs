//! Linear layers with their epilogue, alone or in groups: `y = act((x · Wᵀ) ⊙ s + b + r)` for
//! f32, packed bf16 or fp8 e4m3 weights `W[n, k]` (or f32 `W[k, n]` read as `x · W`), an
//! optional scale per output column `s[n]` (fp8's per-channel scales), an optional bias `b[n]`,
//! an optional addend `r` (a residual `[m, n]` or a bias `[n]` broadcast over the rows) and an
//! optional [`Activation`] (GELU). Then, optionally and in this order:
//! - a **gate** (SwiGLU): `y = silu(g) · y` where `g = (x · Gᵀ) ⊙ s_g` is a second weight's
//!   product over the same columns (a gated MLP's gate and up projections in one output);
//! - **rotary embedding** in rotate-half form on each head of `d` columns (`n` a multiple of
//!   `d`), with the cos/sin rows `[m, d]` of each output row's position ([`crate::rope`]);
//! - **rounding to bf16** (to nearest even, stored widened), for a bf16 graph's attention
//!   operands and KV cache.
//!
//! [`linear`] takes several layers that read the same `x` (a transformer's Q/K/V or gate/up
//! projections). With one row of x (decode), all their output rows are computed in ONE
//! parallel region of the [`crate::pool`] team (its caller and spinning helpers; each member
//! streams a contiguous share of the blocks), blocks of [`BLOCK`] rows of any layer, each block
//! finishing its epilogue while its values are hot: one region per group instead of one per
//! weight plus one per elementwise epilogue, which is what small decode GEMVs pay most for
//! (with RoPE, blocks are whole heads: a multiple of both [`BLOCK`] and `d`).
//! x is converted once per group (rounded to bf16 for bf16 and fp8 weights). With more rows
//! (prefill, batched decode) the group's bf16 weights (and bf16 gates) run as one
//! [`gemm_bf16::matmul_bf16_many_with`] (x rounded once, every product's tiles in one parallel
//! region) that finishes each task's block of a layer's output with its epilogue while the
//! block is in cache (gated layers, and RoPE heads that do not divide a task's columns, are
//! finished after it), the other layers each their own GEMM (already parallel and large) and
//! then their epilogue. The results are those of [`crate::gemv`] / [`crate::gemm_bf16`] /
//! [`crate::gemm`] followed by the epilogue in f32; only the order of f32 additions can differ.
//! The GELUs are the fused elementwise kernels' ([`crate::fused`]), bit for bit.

use crate::elementwise::silu_mul_with;
use crate::gemm::{matmul_f32, Gemm};
use crate::gemm_bf16::{self, PackedBf16, NR};
use crate::gemv::{f32_rows, gemv_f8e4m3_batch_with, PreparedX};
use crate::rope::rotate_half_in_place;
use crate::scratch::recycle;
use crate::simd::{gelu, gelu_tanh, round_bf16, vector_level, Isa};
use crate::KernelError;
use rayon::prelude::*;
use smallvec::SmallVec;
use std::cell::Cell;

/// Output rows per task of a decode group (one packed bf16 panel).
pub const BLOCK: usize = NR;

/// Groups with fewer weights than this run on the calling thread only.
const PARALLEL_MIN_WEIGHTS: usize = 1 << 15;

/// A layer's weights.
#[derive(Debug, Clone, Copy)]
pub enum Weight<'a> {
    /// f32 `W[n, k]`, row-major (`x · Wᵀ`).
    F32(&'a [f32]),
    /// f32 `W[k, n]`, row-major (`x · W`).
    F32Kn(&'a [f32]),
    /// bf16 `W[n, k]` packed once ([`PackedBf16`]); x rounded to bf16.
    Bf16(&'a PackedBf16),
    /// fp8 e4m3 `W[n, k]` bytes, row-major; x rounded to bf16.
    F8E4M3(&'a [u8]),
}

impl Weight<'_> {
    /// Output columns for inner dimension `k`, if the weight's size is a multiple of `k`.
    fn n(&self, k: usize) -> Option<usize> {
        let len = match self {
            Weight::Bf16(w) => return (w.k() == k).then(|| w.n()),
            Weight::F32(w) | Weight::F32Kn(w) => w.len(),
            Weight::F8E4M3(w) => w.len(),
        };
        (k > 0 && len % k == 0).then(|| len / k)
    }
}

/// An activation of a layer's result, after its addends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `x/2 · (1 + erf(x/√2))` (the IR's `gelu`).
    Gelu,
    /// `x/2 · (1 + tanh(√(2/π) · (x + 0.044715 x³)))` (the IR's `gelu_tanh`).
    GeluTanh,
}

/// One layer of a group: its weight, epilogue and output `[m, n]`.
#[derive(Debug)]
pub struct Layer<'a> {
    /// The weight.
    pub weight: Weight<'a>,
    /// Multiplies output column j by `scale[j]` (length n).
    pub scale: Option<&'a [f32]>,
    /// A bias `[n]` added to every row after the scale.
    pub bias: Option<&'a [f32]>,
    /// Added after the bias: `[m, n]` (a residual) or `[n]` (a bias, every row).
    pub add: Option<&'a [f32]>,
    /// Applied after the addends.
    pub activation: Option<Activation>,
    /// SwiGLU: the result becomes `silu(gate) · result`.
    pub gate: Option<Gate<'a>>,
    /// Rotary embedding of each head, after the gate.
    pub rope: Option<Rope<'a>>,
    /// Each result rounded to bf16 (to nearest even), last.
    pub round_bf16: bool,
    /// The result, `m × n` row-major (overwritten).
    pub out: &'a mut [f32],
}

impl<'a> Layer<'a> {
    /// `out = x · Wᵀ`, no epilogue.
    pub fn new(weight: Weight<'a>, out: &'a mut [f32]) -> Self {
        Layer {
            weight,
            scale: None,
            bias: None,
            add: None,
            activation: None,
            gate: None,
            rope: None,
            round_bf16: false,
            out,
        }
    }
}

/// The gate of a SwiGLU layer: `g = (x · Gᵀ) ⊙ scale`, `n` columns as the layer's.
#[derive(Debug, Clone, Copy)]
pub struct Gate<'a> {
    /// The gate's weight (any kind; the group's decode region takes it when it takes the
    /// layer's).
    pub weight: Weight<'a>,
    /// Multiplies the gate's column j by `scale[j]`.
    pub scale: Option<&'a [f32]>,
}

/// Rotary embedding in rotate-half form over heads of `d` columns: `cos` and `sin` are `[m, d]`
/// row-major, row r holding the angles of output row r's position (`d` even, `n` a multiple
/// of `d`).
#[derive(Debug, Clone, Copy)]
pub struct Rope<'a> {
    /// `cos` of the angles.
    pub cos: &'a [f32],
    /// `sin` of the angles.
    pub sin: &'a [f32],
}

/// `layer.out = (x · Wᵀ) ⊙ scale + add` for every layer, `x` being `m × k` row-major, at the
/// best [`Isa`].
pub fn linear(m: usize, k: usize, x: &[f32], layers: &mut [Layer<'_>]) -> Result<(), KernelError> {
    linear_with(Isa::best(), m, k, x, layers)
}

/// As [`linear`] at instruction-set level `isa`.
pub fn linear_with(
    isa: Isa,
    m: usize,
    k: usize,
    x: &[f32],
    layers: &mut [Layer<'_>],
) -> Result<(), KernelError> {
    let mut shapes: PerLayer<Shape> = SmallVec::new();
    for l in layers.iter() {
        shapes.push(check(m, k, x, l)?);
    }
    if m == 0 || shapes.iter().all(|s| s.n == 0) {
        return Ok(());
    }
    // Layers that one decode region cannot take run on their own first (their own GEMM is
    // parallel), then the region takes the rest.
    let regional = |w: Weight<'_>| match w {
        Weight::F32(_) | Weight::F8E4M3(_) => true,
        Weight::Bf16(_) => gemm_bf16::has_tile(isa),
        Weight::F32Kn(_) => false,
    };
    let in_region = |l: &Layer<'_>| {
        m == 1 && k > 0 && regional(l.weight) && l.gate.is_none_or(|g| regional(g.weight))
    };
    // With several rows, the bf16 products (and bf16 gates) of the group run first in one
    // GEMM region over x rounded once; each layer then finishes its epilogue.
    let bf16 = |w: Weight<'_>| matches!(w, Weight::Bf16(_));
    let shared = |l: &Layer<'_>| {
        !in_region(l) && k > 0 && bf16(l.weight) && l.gate.is_none_or(|g| bf16(g.weight))
    };
    let level = vector_level(isa);
    let epilogues: PerLayer<Epilogue<'_>> = layers
        .iter()
        .zip(&shapes)
        .map(|(l, s)| Epilogue::of(l, s))
        .collect();
    // Layers of the shared GEMM whose tasks finish their blocks (not gated; RoPE heads
    // dividing a task's columns); the others are finished after it.
    let tiled: PerLayer<bool> = layers
        .iter()
        .zip(&epilogues)
        .map(|(l, e)| {
            shared(l)
                && l.gate.is_none()
                && e.rope
                    .is_none_or(|(_, d)| gemm_bf16::TASK_COLS.is_multiple_of(d))
        })
        .collect();
    let mut gates: PerLayer<Option<Vec<f32>>> = layers
        .iter()
        .zip(&shapes)
        .map(|(l, s)| (shared(l) && l.gate.is_some()).then(|| vec![0.0; m * s.n]))
        .collect();
    let mut products = Vec::new();
    // Per product: the layer whose epilogue its tasks apply.
    let mut owners = Vec::new();
    for (j, (l, g)) in layers.iter_mut().zip(gates.iter_mut()).enumerate() {
        if !shared(l) {
            continue;
        }
        if let (
            Some(Gate {
                weight: Weight::Bf16(gw),
                ..
            }),
            Some(g),
        ) = (l.gate, g.as_mut())
        {
            products.push((gw, g.as_mut_slice()));
            owners.push(None);
        }
        if let Weight::Bf16(w) = l.weight {
            products.push((w, &mut *l.out));
            owners.push(tiled[j].then_some(j));
        }
    }
    let finish_block = |p: usize, r: usize, c0: usize, y: &mut [f32]| {
        if let Some(j) = owners[p] {
            epilogues[j].row(level, r, c0, y);
        }
    };
    let in_tasks = owners.iter().any(Option::is_some);
    gemm_bf16::matmul_bf16_many_with(
        isa,
        m,
        x,
        &mut products,
        in_tasks.then_some(&finish_block as &gemm_bf16::RowEpilogue<'_>),
    )?;
    drop(products);
    for (j, ((l, s), g)) in layers.iter_mut().zip(&shapes).zip(gates).enumerate() {
        let gate = l.gate.map(|gl| gl.scale).zip(g);
        if shared(l) {
            if !tiled[j] {
                finish(isa, &epilogues[j], l.out, gate)?;
            }
        } else if !in_region(l) {
            alone(isa, m, s, k, x, l, &epilogues[j])?;
        }
    }
    let mut tasks: Vec<Task<'_>> = recycle(SPARE_TASKS.try_with(Cell::take).unwrap_or_default());
    let mut weights = 0;
    for ((l, s), e) in layers.iter_mut().zip(&shapes).zip(&epilogues) {
        if !in_region(l) {
            continue;
        }
        weights += s.n * k * if l.gate.is_some() { 2 } else { 1 };
        let (weight, gate) = (l.weight, l.gate);
        let rows = match s.head {
            Some(d) => lcm(BLOCK, d),
            None => BLOCK,
        };
        for (b, y) in l.out.chunks_mut(rows).enumerate() {
            tasks.push(Task {
                weight,
                row0: b * rows,
                e: *e,
                gate: gate.map(|g| (g.weight, g.scale)),
                y,
            });
        }
    }
    if tasks.is_empty() {
        give_back(tasks);
        return Ok(());
    }
    let weight_kinds = || {
        tasks
            .iter()
            .flat_map(|t| [Some(t.weight), t.gate.map(|g| g.0)])
    };
    let bf16_x = weight_kinds()
        .any(|w| matches!(w, Some(Weight::Bf16(_))))
        .then(|| gemm_bf16::pack_a(1, k, x));
    let f8_x = weight_kinds()
        .any(|w| matches!(w, Some(Weight::F8E4M3(_))))
        .then(|| PreparedX::new(isa, x, 1, k));
    // Output rows `r0 .. r0 + y.len()` of `x · Wᵀ`.
    let product = |w: Weight<'_>, r0: usize, y: &mut [f32]| {
        let rows = y.len();
        match w {
            Weight::F32(w) => f32_rows(level, &w[r0 * k..(r0 + rows) * k], k, x, y),
            Weight::F8E4M3(w) => {
                if let Some(p) = &f8_x {
                    p.rows(&w[r0 * k..(r0 + rows) * k], y)
                }
            }
            Weight::Bf16(w) => {
                if let Some(ap) = &bf16_x {
                    for (p, y) in y.chunks_mut(BLOCK).enumerate() {
                        gemm_bf16::panel_row(isa, ap, w, r0 / BLOCK + p, y)
                    }
                }
            }
            Weight::F32Kn(_) => {}
        }
    };
    let run = |t: &mut Task<'_>| {
        product(t.weight, t.row0, t.y);
        t.e.head(level, 0, t.row0, t.y);
        if let Some((gw, gs)) = t.gate {
            // Gated layers' blocks are BLOCK rows (no RoPE; checked).
            let (mut g, mut u) = ([0.0f32; BLOCK], [0.0f32; BLOCK]);
            let (g, u) = (&mut g[..t.y.len()], &mut u[..t.y.len()]);
            product(gw, t.row0, g);
            if let Some(s) = gs {
                scale_columns(g, &s[t.row0..]);
            }
            u.copy_from_slice(t.y);
            // Lengths are equal by construction.
            let _ = silu_mul_with(isa, g, u, t.y);
        }
        t.e.tail(0, t.row0, t.y);
    };
    if crate::threads() <= 1 || weights < PARALLEL_MIN_WEIGHTS {
        tasks.iter_mut().for_each(run);
    } else {
        crate::pool::for_each(&mut tasks, |_, t| run(t));
    }
    give_back(tasks);
    Ok(())
}

thread_local! {
    /// This thread's decode task list, kept empty between calls: a large head's list (the
    /// 125M Llama's has more than 100 tasks) is allocated once.
    static SPARE_TASKS: Cell<Vec<Task<'static>>> = const { Cell::new(Vec::new()) };
}

/// Keeps `tasks`' allocation for the thread's next call.
fn give_back(tasks: Vec<Task<'_>>) {
    let _ = SPARE_TASKS.try_with(|spare| spare.set(recycle(tasks)));
}

/// Per layer of a group: inline for up to four layers (no allocation per call).
type PerLayer<T> = SmallVec<[T; 4]>;

/// Output rows `row0 .. row0 + y.len()` of one layer in a decode region, with its epilogue.
struct Task<'a> {
    weight: Weight<'a>,
    row0: usize,
    e: Epilogue<'a>,
    /// The gate's weight and scale.
    gate: Option<(Weight<'a>, Option<&'a [f32]>)>,
    y: &'a mut [f32],
}

/// A layer's output columns and head size (with RoPE).
struct Shape {
    n: usize,
    head: Option<usize>,
}

/// The output columns of `l`, checking every length against `m`, `k` and `x`.
fn check(m: usize, k: usize, x: &[f32], l: &Layer<'_>) -> Result<Shape, KernelError> {
    let err = |what: String| Err(KernelError::Layout(format!("linear {m}x?x{k}: {what}")));
    if m.checked_mul(k) != Some(x.len()) {
        return err(format!("x has {} elements", x.len()));
    }
    let n = match (l.weight.n(k), k) {
        (Some(n), _) => n,
        (None, 0) => l.out.len() / m.max(1),
        (None, _) => return err("the weight's size is not a multiple of k".into()),
    };
    if m.checked_mul(n) != Some(l.out.len()) {
        return err(format!("out has {} elements for n = {n}", l.out.len()));
    }
    if l.scale.is_some_and(|s| s.len() != n) {
        return err(format!("scale is not [{n}]"));
    }
    if l.bias.is_some_and(|b| b.len() != n) {
        return err(format!("the bias is not [{n}]"));
    }
    if l.add.is_some_and(|a| a.len() != n && a.len() != m * n) {
        return err(format!("the addend is neither [{n}] nor [{m}, {n}]"));
    }
    if let Some(g) = l.gate {
        if k > 0 && g.weight.n(k) != Some(n) {
            return err(format!("the gate's weight does not have {n} columns"));
        }
        if g.scale.is_some_and(|s| s.len() != n) {
            return err(format!("the gate's scale is not [{n}]"));
        }
    }
    let head = match l.rope {
        None => None,
        Some(_) if l.gate.is_some() => return err("a gated layer with RoPE".into()),
        Some(r) => {
            let d = r.cos.len().checked_div(m).unwrap_or(0);
            let fits =
                d > 0 && d % 2 == 0 && n % d == 0 && r.cos.len() == m * d && r.sin.len() == m * d;
            if !fits {
                return err(format!(
                    "RoPE rows of {} and {} elements for {n} columns",
                    r.cos.len(),
                    r.sin.len()
                ));
            }
            Some(d)
        }
    };
    Ok(Shape { n, head })
}

/// Least common multiple.
fn lcm(a: usize, b: usize) -> usize {
    let gcd = |mut a: usize, mut b: usize| {
        while b != 0 {
            (a, b) = (b, a % b);
        }
        a
    };
    a / gcd(a, b) * b
}

/// Rows of x up to which an f32 `x · Wᵀ` runs as one GEMV per row.
const GEMV_MAX_ROWS: usize = 4;

/// One layer by its own (parallel) kernels, then its epilogue `e`.
fn alone(
    isa: Isa,
    m: usize,
    s: &Shape,
    k: usize,
    x: &[f32],
    l: &mut Layer<'_>,
    e: &Epilogue<'_>,
) -> Result<(), KernelError> {
    let n = s.n;
    product(isa, m, n, k, x, l.weight, l.out)?;
    let gate = match l.gate {
        Some(g) => {
            let mut gate = vec![0.0; m * n];
            product(isa, m, n, k, x, g.weight, &mut gate)?;
            Some((g.scale, gate))
        }
        None => None,
    };
    finish(isa, e, l.out, gate)
}

/// Epilogue `e` of a layer whose product `x · Wᵀ` is in `out`; with a gate, its scale and
/// product.
fn finish(
    isa: Isa,
    e: &Epilogue<'_>,
    out: &mut [f32],
    gate: Option<(Option<&[f32]>, Vec<f32>)>,
) -> Result<(), KernelError> {
    let (n, level) = (e.n, vector_level(isa));
    let Some((gate_scale, mut gate)) = gate else {
        if !e.is_empty() {
            rows(out, n, |r, y| e.row(level, r, 0, y));
        }
        return Ok(());
    };
    rows(out, n, |r, y| e.head(level, r, 0, y));
    if let Some(s) = gate_scale {
        rows(&mut gate, n, |_, y| scale_columns(y, s));
    }
    let up = out.to_vec();
    silu_mul_with(isa, &gate, &up, out)?;
    rows(out, n, |r, y| e.tail(r, 0, y));
    Ok(())
}

/// `f(r, row r)` for every row of `n` columns of `out`, over the threads when `out` is large.
fn rows(out: &mut [f32], n: usize, f: impl Fn(usize, &mut [f32]) + Sync) {
    if n == 0 {
        return;
    }
    if out.len() >= PARALLEL_MIN_WEIGHTS && out.len() > n && crate::threads() > 1 {
        out.par_chunks_mut(n).enumerate().for_each(|(r, y)| f(r, y));
    } else {
        out.chunks_mut(n).enumerate().for_each(|(r, y)| f(r, y));
    }
}

/// `out = x · Wᵀ` (`[m, n]`) by the weight's own (parallel) kernel.
fn product(
    isa: Isa,
    m: usize,
    n: usize,
    k: usize,
    x: &[f32],
    weight: Weight<'_>,
    out: &mut [f32],
) -> Result<(), KernelError> {
    if k == 0 {
        out.fill(0.0);
        return Ok(());
    }
    match weight {
        // A few rows: one GEMV per row beats a GEMM call (a 2-token f32 prefill of the 125M
        // Llama took 40 ms this way against 194 ms through the GEMM).
        Weight::F32(w) if m <= GEMV_MAX_ROWS => {
            for (x, y) in x.chunks_exact(k).zip(out.chunks_exact_mut(n)) {
                crate::gemv::gemv_f32(n, k, w, x, y)?;
            }
        }
        Weight::F32(w) => matmul_f32(&Gemm::dense(m, n, k, false, true), x, w, out)?,
        Weight::F32Kn(w) => matmul_f32(&Gemm::dense(m, n, k, false, false), x, w, out)?,
        Weight::Bf16(w) => gemm_bf16::matmul_bf16_with(isa, m, x, w, out)?,
        Weight::F8E4M3(w) => gemv_f8e4m3_batch_with(isa, m, n, k, w, 1.0, x, out)?,
    }
    Ok(())
}

/// `y[j] ·= scale[j]` (`scale` at least as long as `y`).
#[inline(always)]
fn scale_columns(y: &mut [f32], scale: &[f32]) {
    for (v, s) in y.iter_mut().zip(scale) {
        *v *= s;
    }
}

/// A layer's epilogue, applied to parts of its output rows: [`Epilogue::head`] (scale, bias,
/// addend, activation) comes before a gate, [`Epilogue::tail`] (RoPE, rounding) after it.
#[derive(Debug, Clone, Copy)]
struct Epilogue<'a> {
    /// Output columns.
    n: usize,
    scale: Option<&'a [f32]>,
    bias: Option<&'a [f32]>,
    /// `[n]` or `[m, n]`.
    add: Option<&'a [f32]>,
    activation: Option<Activation>,
    /// The tables and the head size.
    rope: Option<(Rope<'a>, usize)>,
    round_bf16: bool,
}

impl<'a> Epilogue<'a> {
    fn of(l: &Layer<'a>, s: &Shape) -> Self {
        Epilogue {
            n: s.n,
            scale: l.scale,
            bias: l.bias,
            add: l.add,
            activation: l.activation,
            rope: l.rope.zip(s.head),
            round_bf16: l.round_bf16,
        }
    }

    fn is_empty(&self) -> bool {
        self.scale.is_none()
            && self.bias.is_none()
            && self.add.is_none()
            && self.activation.is_none()
            && self.rope.is_none()
            && !self.round_bf16
    }

    /// The whole epilogue of columns `c0 .. c0 + y.len()` of row `r` (without a gate).
    fn row(&self, level: Isa, r: usize, c0: usize, y: &mut [f32]) {
        self.head(level, r, c0, y);
        self.tail(r, c0, y);
    }

    /// Scale, bias, addend and activation of columns `c0 .. c0 + y.len()` of row `r`, with
    /// the vector instructions of `level` (a [`vector_level`]).
    fn head(&self, level: Isa, r: usize, c0: usize, y: &mut [f32]) {
        match level {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `vector_level` returned an available level, so AVX-512 F/BW/VL, AVX2
            // and FMA are present.
            Isa::Avx512 | Isa::Avx512Bf16 => unsafe { x86::head_avx512(self, r, c0, y) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above, AVX2 and FMA are present.
            Isa::Avx2 => unsafe { x86::head_avx2(self, r, c0, y) },
            _ => self.head_body::<false>(r, c0, y),
        }
    }

    #[inline(always)]
    fn head_body<const FMA: bool>(&self, r: usize, c0: usize, y: &mut [f32]) {
        let (n, len) = (self.n, y.len());
        if let Some(s) = self.scale {
            scale_columns(y, &s[c0..]);
        }
        for a in [self.bias, self.add].into_iter().flatten() {
            let a = if a.len() == n {
                &a[c0..]
            } else {
                &a[r * n + c0..]
            };
            for (v, a) in y.iter_mut().zip(&a[..len]) {
                *v += a;
            }
        }
        match self.activation {
            Some(Activation::Gelu) => y.iter_mut().for_each(|v| *v = gelu::<FMA>(*v)),
            Some(Activation::GeluTanh) => y.iter_mut().for_each(|v| *v = gelu_tanh::<FMA>(*v)),
            None => {}
        }
    }

    /// RoPE on the heads of columns `c0 .. c0 + y.len()` of row `r` (both multiples of the
    /// head size), then the rounding to bf16.
    fn tail(&self, r: usize, c0: usize, y: &mut [f32]) {
        if let Some((rope, d)) = self.rope {
            debug_assert!(c0.is_multiple_of(d) && y.len().is_multiple_of(d));
            let (cos, sin) = (&rope.cos[r * d..][..d], &rope.sin[r * d..][..d]);
            for head in y.chunks_exact_mut(d) {
                rotate_half_in_place(head, cos, sin);
            }
        }
        if self.round_bf16 {
            for v in y.iter_mut() {
                *v = round_bf16(*v);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::Epilogue;

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
    pub(super) fn head_avx512(e: &Epilogue<'_>, r: usize, c0: usize, y: &mut [f32]) {
        e.head_body::<true>(r, c0, y)
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) fn head_avx2(e: &Epilogue<'_>, r: usize, c0: usize, y: &mut [f32]) {
        e.head_body::<true>(r, c0, y)
    }
}
