//! Matrix products. Batch axes are collapsed into one (each operand's batch is either the
//! result's or all ones, i.e. broadcast).
//!
//! On the CPU ([`Target::Cpu`]) a product whose `b` is not transposed is register-tiled: for
//! each panel of [`NR`] columns of `b` (kept in cache while every row block uses it) and each
//! block of [`MR`] rows of `a`, [`MR`] `vector<NRxf32>` accumulators are carried through the
//! `k` loop (one vector load of `b`, [`MR`] broadcasts of `a` and [`MR`] vector FMAs per
//! step), then stored; the rows and columns past the last whole tile are scalar dot products.
//! A product whose `b` is transposed (`a · bᵀ`, the linear layers' `x · Wᵀ`; `a` not transposed)
//! reads rows of both operands along `k`: per block of [`MR`] rows of `a` and [`NB`] rows of
//! `b`, [`MR`]·[`NB`] `vector<KVxf32>` accumulators ([`KV`] lanes) are carried through `k` in
//! steps of [`KV`] (one vector load per row of either operand, a vector FMA per pair), reduced
//! horizontally at the end, and the last `k mod KV` terms added as scalars; the rows and columns
//! past the last whole block are blocks of one row or one column the same way.
//! Otherwise (`a` and `b` both transposed, or the GPU, whose pipeline maps parallel loops) the
//! product is a `linalg` contraction with loops in the order batch, `i`, `k`, `j`, so the innermost loop
//! walks `b` and `c` with unit stride and LLVM vectorizes it. Rows of `a` and `c` (or whole
//! batches) are split across threads by the JIT.

use super::build::{Builder, Iter};
use super::loops::{for_loop, Ix};
use super::lower::{module, Lowered, Target};
use super::scalar::Scalars;
use super::spec::{KernelKey, Layout};
use super::MlirError;
use melior::ir::operation::OperationBuilder;
use melior::ir::{Block, BlockLike, Type, Value};
use melior::Context;

/// Rows of `a` per register tile.
pub const MR: usize = 4;
/// Columns of `b` per register tile (two AVX-512 vectors, four AVX2 ones).
pub const NR: usize = 32;
/// Rows of `b` per block of a product with `b` transposed.
pub const NB: usize = 4;
/// Lanes of the `k` vectors of a product with `b` transposed (one AVX-512 vector).
pub const KV: usize = 16;

/// The product of the batch axes of `shape` (all but the last two), checked against the
/// result's: equal (`Some(true)`), all ones (`Some(false)`), or neither (`None`).
fn batch_of(shape: &[usize], out_batch: &[usize]) -> Option<(usize, bool)> {
    let own = &shape[..shape.len() - 2];
    let lead = out_batch.len() - own.len();
    let n: usize = own.iter().product();
    if own == &out_batch[lead..] && out_batch[..lead].iter().all(|&d| d == 1) {
        Some((n, true))
    } else if n == 1 {
        Some((1, false))
    } else {
        None
    }
}

/// The layout of `a · b`: without batch axes `a`, `b` and `c` as matrices; with them, each
/// operand as `[batch, rows, cols]`, its batch fixed at 1 when it is broadcast. Every other
/// size is dynamic; rows of `a` and `c` (or whole batches) are split.
pub fn layout(inputs: &[&[usize]], out: &[usize], ta: bool, tb: bool) -> Result<Layout, MlirError> {
    let (sa, sb) = (inputs[0], inputs[1]);
    let r = out.len();
    let (m, n) = (out[r - 2], out[r - 1]);
    let k = if ta {
        sa[sa.len() - 2]
    } else {
        sa[sa.len() - 1]
    };
    let out_batch = &out[..r - 2];
    let batch: usize = out_batch.iter().product();
    let unsupported = || {
        MlirError::Unsupported(format!(
            "matmul batch axes {sa:?} · {sb:?} broadcast other than whole operands"
        ))
    };
    let (_, a_full) = batch_of(sa, out_batch).ok_or_else(unsupported)?;
    let (_, b_full) = batch_of(sb, out_batch).ok_or_else(unsupported)?;
    let mat = |t: bool, rows: usize, cols: usize| if t { [cols, rows] } else { [rows, cols] };
    let mut l = Layout::new(Vec::new());
    if batch == 1 {
        // Rows of a and c split unless a is read transposed.
        l.arg(mat(ta, m, k).to_vec(), &[false; 2], !ta);
        l.arg(mat(tb, k, n).to_vec(), &[false; 2], false);
        l.arg(vec![m, n], &[false; 2], !ta);
        return Ok(l);
    }
    let shape3 = |full: bool, mat: [usize; 2]| vec![if full { batch } else { 1 }, mat[0], mat[1]];
    l.arg(
        shape3(a_full, mat(ta, m, k)),
        &[!a_full, false, false],
        a_full,
    );
    l.arg(
        shape3(b_full, mat(tb, k, n)),
        &[!b_full, false, false],
        b_full,
    );
    l.arg(vec![batch, m, n], &[false; 3], true);
    Ok(l)
}

/// `a · b` with the IR's transpose flags, laid out by [`layout`].
pub fn matmul<'c>(
    ctx: &'c Context,
    key: &KernelKey,
    ta: bool,
    tb: bool,
    target: Target,
) -> Result<Lowered<'c>, MlirError> {
    if target == Target::Cpu && !tb {
        return tiled(ctx, key, ta);
    }
    if target == Target::Cpu && !ta {
        return tiled_bt(ctx, key);
    }
    if key.args[2].dims.len() == 2 {
        // Loops (i, k, j).
        let am = if ta {
            [Some(1), Some(0)]
        } else {
            [Some(0), Some(1)]
        };
        let bm = if tb {
            [Some(2), Some(1)]
        } else {
            [Some(1), Some(2)]
        };
        return module(
            ctx,
            &key.args,
            Box::new(move |b, block, v| {
                b.fill(block, 0.0, v[2])?;
                let maps = [b.map(3, &am), b.map(3, &bm), b.map(3, &[Some(0), Some(2)])];
                let iters = [Iter::Parallel, Iter::Reduction, Iter::Parallel];
                b.generic(block, &v[..2], &v[2..], &maps, &iters, |blk, a| {
                    let s = Scalars::new(b, blk);
                    Ok(vec![s.bin(
                        "arith.addf",
                        a[2],
                        s.bin("arith.mulf", a[0], a[1])?,
                    )?])
                })
            }),
        );
    }
    // [batch, m, k] · [batch, k, n], loops (batch, i, k, j); a broadcast batch is fixed at 1.
    let bat = |arg: usize| key.args[arg].dims[0].is_none().then_some(0);
    let (a_b, b_b) = (bat(0), bat(1));
    let am = if ta {
        [a_b, Some(2), Some(1)]
    } else {
        [a_b, Some(1), Some(2)]
    };
    let bm = if tb {
        [b_b, Some(3), Some(2)]
    } else {
        [b_b, Some(2), Some(3)]
    };
    module(
        ctx,
        &key.args,
        Box::new(move |b, block, v| {
            b.fill(block, 0.0, v[2])?;
            let maps = [
                b.map(4, &am),
                b.map(4, &bm),
                b.map(4, &[Some(0), Some(1), Some(3)]),
            ];
            let iters = [
                Iter::Parallel,
                Iter::Parallel,
                Iter::Reduction,
                Iter::Parallel,
            ];
            b.generic(block, &v[..2], &v[2..], &maps, &iters, |blk, a| {
                let s = Scalars::new(b, blk);
                Ok(vec![s.bin(
                    "arith.addf",
                    a[2],
                    s.bin("arith.mulf", a[0], a[1])?,
                )?])
            })
        }),
    )
}

type V<'c, 'a> = Value<'c, 'a>;

/// The register-tiled product (see the module documentation) of `a` (transposed when `ta`)
/// and `b`, laid out by [`layout`].
fn tiled<'c>(ctx: &'c Context, key: &KernelKey, ta: bool) -> Result<Lowered<'c>, MlirError> {
    let batched = key.args[2].dims.len() == 3;
    // Whether a and b have a batch axis of their own (else it is fixed at 1, read at 0).
    let own = |arg: usize| batched && key.args[arg].dims[0].is_none();
    let (a_own, b_own) = (own(0), own(1));
    module(
        ctx,
        &key.args,
        Box::new(move |b, block, v| {
            let (x, y, c) = (v[0], v[1], v[2]);
            let top = Ix { b, block };
            let (m, n, k, batches) = sizes(&top, (x, c), batched, usize::from(!ta))?;
            let (mr, nr) = (top.c(MR as i64)?, top.c(NR as i64)?);
            let mt = top.op("arith.divui", m, mr)?;
            let nt = top.op("arith.divui", n, nr)?;
            let m_full = top.op("arith.muli", mt, mr)?;
            let n_full = top.op("arith.muli", nt, nr)?;
            let zero = top.c(0)?;
            for_loop(b, block, (zero, batches), &[], |blk, bi, _| {
                let ix = Ix { b, block: blk };
                let z = ix.c(0)?;
                let p = Product {
                    b,
                    x,
                    y,
                    c,
                    ta,
                    tb: false,
                    batch: batched.then_some((bi, a_own, b_own)),
                    k,
                };
                for_loop(b, blk, (z, nt), &[], |blk, jt, _| {
                    let ix = Ix { b, block: blk };
                    let j0 = ix.op("arith.muli", jt, ix.c(NR as i64)?)?;
                    let z = ix.c(0)?;
                    for_loop(b, blk, (z, mt), &[], |blk, it, _| {
                        let ix = Ix { b, block: blk };
                        let i0 = ix.op("arith.muli", it, ix.c(MR as i64)?)?;
                        p.tile(blk, i0, j0)?;
                        Ok(vec![])
                    })?;
                    Ok(vec![])
                })?;
                // The columns past the last whole panel, for the rows of whole tiles; then the
                // rows past the last whole tile, for every column.
                p.scalar(blk, (z, m_full), (n_full, n))?;
                p.scalar(blk, (m_full, m), (z, n))?;
                Ok(vec![])
            })?;
            Ok(())
        }),
    )
}

/// The product `a · bᵀ` by blocks of dot products (see the module documentation), laid out by
/// [`layout`].
fn tiled_bt<'c>(ctx: &'c Context, key: &KernelKey) -> Result<Lowered<'c>, MlirError> {
    let batched = key.args[2].dims.len() == 3;
    let own = |arg: usize| batched && key.args[arg].dims[0].is_none();
    let (a_own, b_own) = (own(0), own(1));
    module(
        ctx,
        &key.args,
        Box::new(move |b, block, v| {
            let (x, y, c) = (v[0], v[1], v[2]);
            let top = Ix { b, block };
            let (m, n, k, batches) = sizes(&top, (x, c), batched, 1)?;
            let full = |len: V<'c, '_>, step: usize| -> Result<_, MlirError> {
                let s = top.c(step as i64)?;
                let t = top.op("arith.divui", len, s)?;
                Ok((t, top.op("arith.muli", t, s)?))
            };
            let (mt, m_full) = full(m, MR)?;
            let (nt, n_full) = full(n, NB)?;
            let (kt, _) = full(k, KV)?;
            let zero = top.c(0)?;
            for_loop(b, block, (zero, batches), &[], |blk, bi, _| {
                let p = Product {
                    b,
                    x,
                    y,
                    c,
                    ta: false,
                    tb: true,
                    batch: batched.then_some((bi, a_own, b_own)),
                    k,
                };
                // Rows of whole blocks: blocks of NB rows of b, then single rows of b.
                let z = Ix { b, block: blk }.c(0)?;
                for_loop(b, blk, (z, mt), &[], |blk, it, _| {
                    let ix = Ix { b, block: blk };
                    let i0 = ix.op("arith.muli", it, ix.c(MR as i64)?)?;
                    let z = ix.c(0)?;
                    for_loop(b, blk, (z, nt), &[], |blk, jt, _| {
                        let ix = Ix { b, block: blk };
                        let j0 = ix.op("arith.muli", jt, ix.c(NB as i64)?)?;
                        p.dots(blk, (i0, MR), (j0, NB), kt)?;
                        Ok(vec![])
                    })?;
                    for_loop(b, blk, (n_full, n), &[], |blk, j, _| {
                        p.dots(blk, (i0, MR), (j, 1), kt)?;
                        Ok(vec![])
                    })?;
                    Ok(vec![])
                })?;
                // The rows past the last whole block, one at a time.
                for_loop(b, blk, (m_full, m), &[], |blk, i, _| {
                    let z = Ix { b, block: blk }.c(0)?;
                    for_loop(b, blk, (z, nt), &[], |blk, jt, _| {
                        let ix = Ix { b, block: blk };
                        let j0 = ix.op("arith.muli", jt, ix.c(NB as i64)?)?;
                        p.dots(blk, (i, 1), (j0, NB), kt)?;
                        Ok(vec![])
                    })?;
                    for_loop(b, blk, (n_full, n), &[], |blk, j, _| {
                        p.dots(blk, (i, 1), (j, 1), kt)?;
                        Ok(vec![])
                    })?;
                    Ok(vec![])
                })?;
                Ok(vec![])
            })?;
            Ok(())
        }),
    )
}

/// An operand of a product.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Side {
    /// `a`, indexed `[i, k]` (`[k, i]` when transposed).
    A,
    /// `b`, indexed `[k, j]`.
    B,
    /// The result, `[i, j]`.
    C,
}

/// The operands of a tiled product and how to index them.
struct Product<'b, 'c, 'v> {
    b: &'b Builder<'c>,
    x: V<'c, 'v>,
    y: V<'c, 'v>,
    c: V<'c, 'v>,
    ta: bool,
    tb: bool,
    /// The batch index, and whether `a` and `b` have their own batch axis.
    batch: Option<(V<'c, 'v>, bool, bool)>,
    k: V<'c, 'v>,
}

impl<'c, 'v> Product<'_, 'c, 'v> {
    /// The indices of element `(r, col)` of `side` (`a[i, k]`, `b[k, j]`, `c[i, j]`) in
    /// `block`.
    fn at<'a>(
        &self,
        block: &'a Block<'c>,
        side: Side,
        (r, col): (V<'c, 'a>, V<'c, 'a>),
    ) -> Result<Vec<V<'c, 'a>>, MlirError>
    where
        'v: 'a,
    {
        let ix = Ix { b: self.b, block };
        let mut at = Vec::with_capacity(3);
        if let Some((bi, a_own, b_own)) = self.batch {
            let own = match side {
                Side::A => a_own,
                Side::B => b_own,
                Side::C => true,
            };
            at.push(if own { bi } else { ix.c(0)? });
        }
        if (side == Side::A && self.ta) || (side == Side::B && self.tb) {
            at.extend([col, r]);
        } else {
            at.extend([r, col]);
        }
        Ok(at)
    }

    /// `c[i0..i0+MR, j0..j0+NR]`, accumulated in vector registers.
    fn tile<'a>(&self, block: &'a Block<'c>, i0: V<'c, 'a>, j0: V<'c, 'a>) -> Result<(), MlirError>
    where
        'v: 'a,
    {
        let b = self.b;
        let ix = Ix { b, block };
        let (vt, zero) = zeros(b, block, NR)?;
        let rows: Vec<V<'c, 'a>> = (0..MR)
            .map(|r| ix.op("arith.addi", i0, ix.c(r as i64)?))
            .collect::<Result<_, _>>()?;
        let z = ix.c(0)?;
        let acc = for_loop(b, block, (z, self.k), &[zero; MR], |blk, kk, acc| {
            let ix = Ix { b, block: blk };
            let at = self.at(blk, Side::B, (kk, j0))?;
            let mut operands = vec![self.y];
            operands.extend(at);
            let bv = b.op(blk, "vector.load", &operands, Some(vt), &[])?;
            let mut next = Vec::with_capacity(MR);
            for (r, &row) in rows.iter().enumerate() {
                let a = ix.load(self.x, &self.at(blk, Side::A, (row, kk))?)?;
                let av = b.op(blk, "vector.broadcast", &[a], Some(vt), &[])?;
                next.push(b.op(blk, "vector.fma", &[av, bv, acc[r]], Some(vt), &[])?);
            }
            Ok(next)
        })?;
        for (r, &row) in rows.iter().enumerate() {
            let mut operands = vec![acc[r], self.c];
            operands.extend(self.at(block, Side::C, (row, j0))?);
            block.append_operation(
                OperationBuilder::new("vector.store", b.loc)
                    .add_operands(&operands)
                    .build()?,
            );
        }
        Ok(())
    }

    /// `c[i0..i0+nr, j0..j0+nc]` of `a · bᵀ`: `nr`·`nc` dot products of rows of `a` and rows
    /// of `b` over `k`, in [`KV`]-lane vector accumulators for the first `kt`·[`KV`] terms
    /// (reduced horizontally), the rest as scalars.
    fn dots<'a>(
        &self,
        block: &'a Block<'c>,
        (i0, nr): (V<'c, 'a>, usize),
        (j0, nc): (V<'c, 'a>, usize),
        kt: V<'c, 'a>,
    ) -> Result<(), MlirError>
    where
        'v: 'a,
    {
        let b = self.b;
        let ix = Ix { b, block };
        let (vt, zero) = zeros(b, block, KV)?;
        let offsets = |n: usize, base: V<'c, 'a>| -> Result<Vec<V<'c, 'a>>, MlirError> {
            (0..n)
                .map(|t| ix.op("arith.addi", base, ix.c(t as i64)?))
                .collect()
        };
        let (rows, cols) = (offsets(nr, i0)?, offsets(nc, j0)?);
        let z = ix.c(0)?;
        let acc = for_loop(b, block, (z, kt), &vec![zero; nr * nc], |blk, t, acc| {
            let ix = Ix { b, block: blk };
            let kk = ix.op("arith.muli", t, ix.c(KV as i64)?)?;
            let load = |mem: V<'c, 'v>, side: Side, at: (V<'c, '_>, V<'c, '_>)| {
                let mut operands = vec![mem];
                operands.extend(self.at(blk, side, at)?);
                b.op(blk, "vector.load", &operands, Some(vt), &[])
            };
            let av: Vec<_> = rows
                .iter()
                .map(|&i| load(self.x, Side::A, (i, kk)))
                .collect::<Result<_, _>>()?;
            let bv: Vec<_> = cols
                .iter()
                .map(|&j| load(self.y, Side::B, (kk, j)))
                .collect::<Result<_, _>>()?;
            let mut next = Vec::with_capacity(nr * nc);
            for (r, a) in av.iter().enumerate() {
                for (q, bj) in bv.iter().enumerate() {
                    next.push(b.op(
                        blk,
                        "vector.fma",
                        &[*a, *bj, acc[r * nc + q]],
                        Some(vt),
                        &[],
                    )?);
                }
            }
            Ok(next)
        })?;
        let add = b.attr("#vector.kind<add>")?;
        let fm = b.attr("#arith.fastmath<reassoc>")?;
        let sums: Vec<V<'c, 'a>> = acc
            .iter()
            .map(|a| {
                b.op(
                    block,
                    "vector.reduction",
                    &[*a],
                    Some(b.f32()),
                    &[("kind", add), ("fastmath", fm)],
                )
            })
            .collect::<Result<_, _>>()?;
        let k_full = ix.op("arith.muli", kt, ix.c(KV as i64)?)?;
        let sums = for_loop(b, block, (k_full, self.k), &sums, |blk, kk, acc| {
            let ix = Ix { b, block: blk };
            let s = ix.scalars();
            let av: Vec<_> = rows
                .iter()
                .map(|&i| ix.load(self.x, &self.at(blk, Side::A, (i, kk))?))
                .collect::<Result<_, _>>()?;
            let mut next = Vec::with_capacity(nr * nc);
            for (r, a) in av.iter().enumerate() {
                for (q, &j) in cols.iter().enumerate() {
                    let bj = ix.load(self.y, &self.at(blk, Side::B, (kk, j))?)?;
                    next.push(s.fma(*a, bj, acc[r * nc + q])?);
                }
            }
            Ok(next)
        })?;
        for (r, &i) in rows.iter().enumerate() {
            for (q, &j) in cols.iter().enumerate() {
                ix.store(sums[r * nc + q], self.c, &self.at(block, Side::C, (i, j))?)?;
            }
        }
        Ok(())
    }

    /// `c[i, j]` for rows `i` in `rows` and columns `j` in `cols`, one dot product each.
    fn scalar<'a>(
        &self,
        block: &'a Block<'c>,
        rows: (V<'c, 'a>, V<'c, 'a>),
        cols: (V<'c, 'a>, V<'c, 'a>),
    ) -> Result<(), MlirError>
    where
        'v: 'a,
    {
        let b = self.b;
        for_loop(b, block, rows, &[], |blk, i, _| {
            for_loop(b, blk, cols, &[], |blk, j, _| {
                let ix = Ix { b, block: blk };
                let s = ix.scalars();
                let z = ix.c(0)?;
                let dot = for_loop(b, blk, (z, self.k), &[s.c(0.0)?], |blk, kk, acc| {
                    let ix = Ix { b, block: blk };
                    let s = ix.scalars();
                    let x = ix.load(self.x, &self.at(blk, Side::A, (i, kk))?)?;
                    let y = ix.load(self.y, &self.at(blk, Side::B, (kk, j))?)?;
                    Ok(vec![s.fma(x, y, acc[0])?])
                })?[0];
                ix.store(dot, self.c, &self.at(blk, Side::C, (i, j))?)?;
                Ok(vec![])
            })?;
            Ok(vec![])
        })?;
        Ok(())
    }
}

/// `vector<lanes x f32>` and a zero vector of it, defined in `block`.
fn zeros<'c, 'a>(
    b: &Builder<'c>,
    block: &'a Block<'c>,
    lanes: usize,
) -> Result<(Type<'c>, V<'c, 'a>), MlirError> {
    let vt = Type::parse(b.ctx, &format!("vector<{lanes}xf32>"))
        .ok_or_else(|| MlirError::Mlir("vector type".into()))?;
    let attr = b.attr(&format!("dense<0.000000e+00> : vector<{lanes}xf32>"))?;
    let zero = b.op(block, "arith.constant", &[], Some(vt), &[("value", attr)])?;
    Ok((vt, zero))
}

/// The sizes `(m, n, k, batches)` of a product into `c` (with a batch axis first when
/// `batched`, else one batch), `k` being axis `k_axis` of `x` past its batch axis.
type Sizes<'c, 'a> = (V<'c, 'a>, V<'c, 'a>, V<'c, 'a>, V<'c, 'a>);

/// See [`Sizes`].
fn sizes<'c, 'a>(
    top: &Ix<'_, 'c, 'a>,
    (x, c): (V<'c, '_>, V<'c, '_>),
    batched: bool,
    k_axis: usize,
) -> Result<Sizes<'c, 'a>, MlirError> {
    let (b, block, r) = (top.b, top.block, usize::from(batched));
    let m = b.dim(block, c, r)?;
    let n = b.dim(block, c, r + 1)?;
    let k = b.dim(block, x, r + k_axis)?;
    let batches = if batched {
        b.dim(block, c, 0)?
    } else {
        top.c(1)?
    };
    Ok((m, n, k, batches))
}
