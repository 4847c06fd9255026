//! Attention on the CPU, one query at a time over tiles of [`KT`] keys (flash attention's
//! recurrence with the tile as its unit): the query row and the accumulator `acc[dv]` live in
//! vector registers (`vector<Lxf32>`, `L` the widest of 16, 8, 4, 2, 1 dividing both head
//! sizes) carried through the tile loop; per tile, the [`KT`] scores are vector dot products
//! reduced into one `vector<KTxf32>`, the tile's maximum rescales the running maximum, sum
//! and accumulator once, the [`KT`] weights are one vector `exp`, and `p · V` is [`KT`] vector
//! FMAs per accumulator vector. Keys past the visible range in the last tile read the last
//! visible key and score `-inf` (weight 0), so every tile has the same code. Called per query
//! by [`super::attention`], whose visibility rules, mask and edge cases it keeps.

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

/// One query's output `out[r, i, ..]` (see the module documentation).
pub fn query<'c>(
    ix: &Ix<'_, 'c, '_>,
    ops: &Operands<'c, '_>,
    qy: &Query<'c, '_>,
) -> Result<(), MlirError> {
    let (bd, blk) = (ix.b, ix.block);
    let lanes = head_lanes(ops.d, ops.dv);
    let (hv, tv) = (vector(ix, lanes)?, vector(ix, KT)?);
    let qv: Vec<V<'c, '_>> = (0..ops.d / lanes)
        .map(|u| load(ix, hv, ops.q, &at(ix, (qy.r, qy.i), u, lanes)?))
        .collect::<Result<_, _>>()?;
    let visible = ix.op("arith.subi", qy.hi, qy.lo)?;
    let visible = ix.op("arith.maxsi", visible, ix.c(0)?)?;
    let tiles = ix.op("arith.addi", visible, ix.c(KT as i64 - 1)?)?;
    let tiles = ix.op("arith.divui", tiles, ix.c(KT as i64)?)?;
    let last = ix.op("arith.subi", qy.hi, ix.c(1)?)?;
    let s = ix.scalars();
    let zero = splat(ix, hv, s.c(0.0)?)?;
    let mut inits = vec![s.c(f64::NEG_INFINITY)?, s.c(0.0)?];
    inits.extend(std::iter::repeat_n(zero, ops.dv / lanes));
    let z = ix.c(0)?;
    let done = for_loop(bd, blk, (z, tiles), &inits, |blk, tt, carried| {
        let ix = Ix { b: bd, block: blk };
        let s = ix.scalars();
        let (m, l, acc) = (carried[0], carried[1], &carried[2..]);
        let j0 = ix.op("arith.muli", tt, ix.c(KT as i64)?)?;
        let j0 = ix.op("arith.addi", qy.lo, j0)?;
        let ninf = s.c(f64::NEG_INFINITY)?;
        let mut keys = Vec::with_capacity(KT);
        let mut scores = Vec::with_capacity(KT);
        for t in 0..KT {
            let jt = ix.op("arith.addi", j0, ix.c(t as i64)?)?;
            let j = ix.op("arith.minsi", jt, last)?;
            let mut dot = None;
            for (u, x) in qv.iter().enumerate() {
                let y = load(&ix, hv, ops.k, &at(&ix, (qy.kr, j), u, lanes)?)?;
                dot = Some(match dot {
                    None => s.bin("arith.mulf", *x, y)?,
                    Some(acc) => s.fma(*x, y, acc)?,
                });
            }
            let dot = match dot {
                Some(v) => reduce(&ix, "add", v)?,
                None => s.c(0.0)?,
            };
            let score = s.bin("arith.mulf", dot, s.c(ops.scale)?)?;
            let score = ops.masked(&ix, qy, j, score)?;
            let valid: V<'c, '_> = blk
                .append_operation(arith::cmpi(bd.ctx, CmpiPredicate::Slt, jt, qy.hi, bd.loc))
                .result(0)?
                .into();
            scores.push(s.select(valid, score, ninf)?);
            keys.push(j);
        }
        let sv = bd.op(blk, "vector.from_elements", &scores, Some(tv), &[])?;
        // maxnum: a NaN score makes l, hence the output, NaN either way.
        let top = reduce(&ix, "maxnumf", sv)?;
        let (m_new, base) = Operands::new_max(&s, m, top)?;
        let alpha = s.exp(s.bin("arith.subf", m, base)?)?;
        let sk = Scalars::vector(bd, blk, KT);
        let p = Operands::weight(&sk, sv, splat(&ix, tv, base)?)?;
        let l_new = s.fma(l, alpha, reduce(&ix, "add", p)?)?;
        let alpha_v = splat(&ix, hv, alpha)?;
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
            let pt = splat(&ix, hv, pt)?;
            for (u, a) in acc.iter_mut().enumerate() {
                let y = load(&ix, hv, ops.v, &at(&ix, (qy.kr, j), u, lanes)?)?;
                *a = s.fma(pt, y, *a)?;
            }
        }
        let mut next = vec![m_new, l_new];
        next.extend(acc);
        Ok(next)
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
