//! Attention on the CPU, one query at a time over tiles of [`KT`] keys (flash attention's
//! recurrence with the tile as its unit): the query row and the accumulator `acc[dv]` live in
//! vector registers (`vector<Lxf32>`, `L` the widest of 16, 8, 4, 2, 1 dividing both head
//! sizes) carried through the tile loop. Per tile: the [`KT`] dot products as vector FMAs over
//! the head, reduced into one `vector<KTxf32>` of scores (with 16-lane heads by a transposing
//! tree of shuffles, [`sums`]); the mask added as a vector; the tile's maximum rescales the
//! running maximum, sum and accumulator once; the [`KT`] weights are one vector `exp`; and
//! `p · V` is [`KT`] vector FMAs per accumulator vector. The whole tiles run without bounds
//! checks; the last, partial tile reads up to the last visible key and gives the lanes past it
//! `-inf` (weight 0). Called per query by [`super::attention`], whose visibility rules, mask
//! and edge cases it keeps.

use super::attention::{Operands, Query};
use super::loops::{for_loop, Ix};
use super::scalar::Scalars;
use super::MlirError;
use melior::dialect::arith::{self, CmpiPredicate};
use melior::ir::operation::OperationBuilder;
use melior::ir::{BlockLike, Type, Value};

type V<'c, 'a> = Value<'c, 'a>;

/// Keys per tile.
pub const KT: usize = 16;

/// The lanes of the head vectors: the widest of 16, 8, 4, 2, 1 dividing `d` and `dv`.
fn head_lanes(d: usize, dv: usize) -> usize {
    [16, 8, 4, 2, 1]
        .into_iter()
        .find(|l| d.is_multiple_of(*l) && dv.is_multiple_of(*l))
        .unwrap_or(1)
}

/// `vector<n x f32>`.
fn vector<'c>(ix: &Ix<'_, 'c, '_>, n: usize) -> Result<Type<'c>, MlirError> {
    Type::parse(ix.b.ctx, &format!("vector<{n}xf32>"))
        .ok_or_else(|| MlirError::Mlir("vector type".into()))
}

/// `vector.load` of `ty` from `mem` at `at`.
fn load<'c, 'a>(
    ix: &Ix<'_, 'c, 'a>,
    ty: Type<'c>,
    mem: V<'c, '_>,
    at: &[V<'c, '_>],
) -> Result<V<'c, 'a>, MlirError> {
    let mut operands = vec![mem];
    operands.extend_from_slice(at);
    ix.b.op(ix.block, "vector.load", &operands, Some(ty), &[])
}

/// `vector.reduction <kind>` of `x` to a scalar (reassociable).
fn reduce<'c, 'a>(ix: &Ix<'_, 'c, 'a>, kind: &str, x: V<'c, '_>) -> Result<V<'c, 'a>, MlirError> {
    let b = ix.b;
    let attrs = [
        ("kind", b.attr(&format!("#vector.kind<{kind}>"))?),
        ("fastmath", b.attr("#arith.fastmath<reassoc>")?),
    ];
    b.op(ix.block, "vector.reduction", &[x], Some(b.f32()), &attrs)
}

/// `x` splat to `ty`.
fn splat<'c, 'a>(ix: &Ix<'_, 'c, 'a>, ty: Type<'c>, x: V<'c, '_>) -> Result<V<'c, 'a>, MlirError> {
    ix.b.op(ix.block, "vector.broadcast", &[x], Some(ty), &[])
}

/// The indices of vector `u` (of `lanes`) of row `pos` of head row `row`.
fn at<'c, 'a>(
    ix: &Ix<'_, 'c, 'a>,
    (row, pos): (V<'c, 'a>, V<'c, 'a>),
    u: usize,
    lanes: usize,
) -> Result<[V<'c, 'a>; 3], MlirError> {
    Ok([row, pos, ix.c((u * lanes) as i64)?])
}

/// The horizontal sums of `vs` ([`KT`] vectors of [`KT`] lanes) as one vector, lane `t` the
/// sum of `vs[t]`: a transposing tree of shuffles and adds (each level halves the vectors and
/// the lanes per key; a vector with `k` keys of `w` partial sums each holds part `p` of its
/// key `j` in lane `p·k + j`).
fn sums<'c, 'a>(ix: &Ix<'_, 'c, 'a>, vs: Vec<V<'c, 'a>>) -> Result<V<'c, 'a>, MlirError> {
    let ty = vector(ix, KT)?;
    let s = ix.scalars();
    let (mut level, mut k) = (vs, 1);
    while level.len() > 1 {
        let half = KT / k / 2;
        // Lane of part `p` of key `j` of the pair (x's keys, then y's), in the concatenation.
        let lane = |p: usize, j: usize| if j < k { p * k + j } else { KT + p * k + j - k };
        let mask = |from: usize| {
            let lanes: Vec<String> = (0..half)
                .flat_map(|p| (0..2 * k).map(move |j| lane(p + from, j).to_string()))
                .collect();
            ix.b.attr(&format!("array<i64: {}>", lanes.join(", ")))
        };
        let (lo, hi) = (mask(0)?, mask(half)?);
        level = level
            .chunks(2)
            .map(|xy| {
                let a =
                    ix.b.op(ix.block, "vector.shuffle", xy, Some(ty), &[("mask", lo)])?;
                let b =
                    ix.b.op(ix.block, "vector.shuffle", xy, Some(ty), &[("mask", hi)])?;
                s.bin("arith.addf", a, b)
            })
            .collect::<Result<_, _>>()?;
        k *= 2;
    }
    Ok(level[0])
}

/// What every tile of one query uses.
struct Tiles<'o, 'c, 'a> {
    ops: &'o Operands<'c, 'o>,
    qy: &'o Query<'c, 'a>,
    /// Lanes of the head vectors.
    lanes: usize,
    /// The query's head vectors.
    qv: Vec<V<'c, 'a>>,
    /// The last visible key.
    last: V<'c, 'a>,
}

impl<'c> Tiles<'_, 'c, '_> {
    /// The online-softmax step over tile `tt` from the carried `[m, l, acc...]`; a `partial`
    /// tile reads keys up to the last visible one only and gives the keys past it `-inf`.
    fn step<'a>(
        &self,
        ix: &Ix<'_, 'c, 'a>,
        tt: V<'c, 'a>,
        carried: &[V<'c, 'a>],
        partial: bool,
    ) -> Result<Vec<V<'c, 'a>>, MlirError> {
        let (bd, blk) = (ix.b, ix.block);
        let (ops, qy, lanes) = (self.ops, self.qy, self.lanes);
        let (hv, tv) = (vector(ix, lanes)?, vector(ix, KT)?);
        let s = ix.scalars();
        let sk = Scalars::vector(bd, blk, KT);
        let (m, l, acc) = (carried[0], carried[1], &carried[2..]);
        let j0 = ix.op("arith.muli", tt, ix.c(KT as i64)?)?;
        let j0 = ix.op("arith.addi", qy.lo, j0)?;
        let mut keys = Vec::with_capacity(KT);
        let mut dots = Vec::with_capacity(KT);
        for t in 0..KT {
            let j = ix.op("arith.addi", j0, ix.c(t as i64)?)?;
            let j = if partial {
                ix.op("arith.minsi", j, self.last)?
            } else {
                j
            };
            let mut dot = None;
            for (u, x) in self.qv.iter().enumerate() {
                let y = load(ix, hv, ops.k, &at(ix, (qy.kr, j), u, lanes)?)?;
                dot = Some(match dot {
                    None => s.bin("arith.mulf", *x, y)?,
                    Some(acc) => s.fma(*x, y, acc)?,
                });
            }
            dots.push(dot.map_or_else(|| splat(ix, hv, s.c(0.0)?), Ok)?);
            keys.push(j);
        }
        let sv = if lanes == KT {
            sums(ix, dots)?
        } else {
            let each: Vec<_> = dots
                .iter()
                .map(|d| reduce(ix, "add", *d))
                .collect::<Result<_, _>>()?;
            bd.op(blk, "vector.from_elements", &each, Some(tv), &[])?
        };
        let mut sv = sk.bin("arith.mulf", sv, sk.c(ops.scale)?)?;
        if ops.mask.is_some() {
            let zero = s.c(0.0)?;
            let added: Vec<_> = keys
                .iter()
                .map(|&j| ops.masked(ix, qy, j, zero))
                .collect::<Result<_, _>>()?;
            let mv = bd.op(blk, "vector.from_elements", &added, Some(tv), &[])?;
            sv = sk.bin("arith.addf", sv, mv)?;
        }
        if partial {
            // Lane t is visible when j0 + t < hi.
            let i32t = bd.i32();
            let n = ix.op("arith.subi", qy.hi, j0)?;
            let n = bd.op(blk, "arith.index_cast", &[n], Some(i32t), &[])?;
            let iv = Type::parse(bd.ctx, &format!("vector<{KT}xi32>"))
                .ok_or_else(|| MlirError::Mlir("vector type".into()))?;
            let lanes: Vec<String> = (0..KT).map(|t| t.to_string()).collect();
            let iota = bd.attr(&format!("dense<[{}]> : vector<{KT}xi32>", lanes.join(", ")))?;
            let iota = bd.op(blk, "arith.constant", &[], Some(iv), &[("value", iota)])?;
            let n = bd.op(blk, "vector.broadcast", &[n], Some(iv), &[])?;
            let valid: V<'c, '_> = blk
                .append_operation(arith::cmpi(bd.ctx, CmpiPredicate::Slt, iota, n, bd.loc))
                .result(0)?
                .into();
            sv = sk.select(valid, sv, sk.c(f64::NEG_INFINITY)?)?;
        }
        // maxnum: a NaN score makes l, hence the output, NaN either way.
        let top = reduce(ix, "maxnumf", sv)?;
        let (m_new, base) = Operands::new_max(&s, m, top)?;
        let alpha = s.exp(s.bin("arith.subf", m, base)?)?;
        let p = Operands::weight(&sk, sv, splat(ix, tv, base)?)?;
        let l_new = s.fma(l, alpha, reduce(ix, "add", p)?)?;
        let alpha_v = splat(ix, hv, alpha)?;
        let mut acc: Vec<V<'c, '_>> = acc
            .iter()
            .map(|a| s.bin("arith.mulf", *a, alpha_v))
            .collect::<Result<_, _>>()?;
        for (t, &j) in keys.iter().enumerate() {
            let pt = bd.op(
                blk,
                "vector.extract",
                &[p],
                Some(bd.f32()),
                &[("static_position", bd.attr(&format!("array<i64: {t}>"))?)],
            )?;
            let pt = splat(ix, hv, pt)?;
            for (u, a) in acc.iter_mut().enumerate() {
                let y = load(ix, hv, ops.v, &at(ix, (qy.kr, j), u, lanes)?)?;
                *a = s.fma(pt, y, *a)?;
            }
        }
        let mut next = vec![m_new, l_new];
        next.extend(acc);
        Ok(next)
    }
}

/// One query's output `out[r, i, ..]` (see the module documentation).
pub fn query<'c>(
    ix: &Ix<'_, 'c, '_>,
    ops: &Operands<'c, '_>,
    qy: &Query<'c, '_>,
) -> Result<(), MlirError> {
    let (bd, blk) = (ix.b, ix.block);
    let lanes = head_lanes(ops.d, ops.dv);
    let hv = vector(ix, lanes)?;
    let qv: Vec<V<'c, '_>> = (0..ops.d / lanes)
        .map(|u| load(ix, hv, ops.q, &at(ix, (qy.r, qy.i), u, lanes)?))
        .collect::<Result<_, _>>()?;
    let visible = ix.op("arith.subi", qy.hi, qy.lo)?;
    let visible = ix.op("arith.maxsi", visible, ix.c(0)?)?;
    let kt = ix.c(KT as i64)?;
    let full = ix.op("arith.divui", visible, kt)?;
    let tiles = ix.op("arith.addi", visible, ix.c(KT as i64 - 1)?)?;
    let tiles = ix.op("arith.divui", tiles, kt)?;
    let last = ix.op("arith.subi", qy.hi, ix.c(1)?)?;
    let s = ix.scalars();
    let zero = splat(ix, hv, s.c(0.0)?)?;
    let mut inits = vec![s.c(f64::NEG_INFINITY)?, s.c(0.0)?];
    inits.extend(std::iter::repeat_n(zero, ops.dv / lanes));
    let t = Tiles {
        ops,
        qy,
        lanes,
        qv,
        last,
    };
    // Whole tiles, then the partial one (if any).
    let z = ix.c(0)?;
    let done = for_loop(bd, blk, (z, full), &inits, |blk, tt, carried| {
        t.step(&Ix { b: bd, block: blk }, tt, carried, false)
    })?;
    let done = for_loop(bd, blk, (full, tiles), &done, |blk, tt, carried| {
        t.step(&Ix { b: bd, block: blk }, tt, carried, true)
    })?;
    // acc / l (NaN when all were -inf), zeros without a visible key.
    let inv = splat(ix, hv, Operands::inverse(ix, qy, done[1])?)?;
    for (u, a) in done[2..].iter().enumerate() {
        let y = s.bin("arith.mulf", *a, inv)?;
        let mut operands = vec![y, ops.out];
        operands.extend(at(ix, (qy.r, qy.i), u, lanes)?);
        blk.append_operation(
            OperationBuilder::new("vector.store", bd.loc)
                .add_operands(&operands)
                .build()?,
        );
    }
    Ok(())
}
