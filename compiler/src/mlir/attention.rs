//! Attention (`Op::Attention`) as an `scf` loop nest with online softmax: for each batch,
//! query head and query, one pass over the visible keys keeps the running maximum `m`, the
//! running sum `l` of `e^(s - m)` and the rescaled accumulator `acc[dv]` (flash attention's
//! recurrence), then writes `acc / l`. Grouped-query heads read key and value head
//! `h / (hq / hkv)`; causal and sliding-window visibility bound the key loop (query `i` sits at
//! `sk - sq + i`); an additive mask of any shape broadcastable to the scores is read at index 0
//! on its broadcast axes. As the reference executor: a query with no visible key gives zeros,
//! visible keys all `-inf` give NaN. The (batch, query head) rows are an `scf.parallel` loop
//! (split across threads by the JIT, mapped to GPU threads by the GPU pipeline); keys, values
//! and the mask are read whole at the absolute row ([`super::lower::Lowered::first_row`]).
//!
//! Per query, the CPU walks the keys in tiles with the query and the accumulator in vector
//! registers ([`super::flash`]); the GPU walks them one at a time, each thread's accumulator
//! in its local memory ([`one_key_at_a_time`]).

use super::build::Builder;
use super::flash;
use super::loops::{for_loop, parallel_rows, Ix};
use super::lower::{fixed, module_with, Lowered, Target};
use super::scalar::Scalars;
use super::spec::{KernelKey, Layout};
use super::MlirError;
use melior::dialect::arith::{self, CmpfPredicate, CmpiPredicate};
use melior::ir::{Block, BlockLike, Value};
use melior::Context;

type V<'c, 'a> = Value<'c, 'a>;

/// The layout of attention over `q[b, hq, sq, d]`, `k[b, hkv, sk, d]`, `v[b, hkv, sk, dv]` and
/// the optional mask: `q` and the output as `[b·hq, sq, ·]` (rows split), `k` and `v` as
/// `[b·hkv, sk, ·]`, the mask at rank 4 with its broadcast axes fixed at 1; keys, values and
/// the mask are read through their strides (the KV cache is a view into its capacity). Head sizes `d`,
/// `dv` are fixed and the head counts are the key's params; batch and lengths are dynamic.
pub fn layout(inputs: &[&[usize]]) -> Result<Layout, MlirError> {
    let four = |s: &[usize]| -> Result<[usize; 4], MlirError> {
        <[usize; 4]>::try_from(s)
            .map_err(|_| MlirError::Unsupported(format!("attention operand of shape {s:?}")))
    };
    let [b, hq, sq, d] = four(inputs[0])?;
    let [_, hkv, sk, _] = four(inputs[1])?;
    let dv = four(inputs[2])?[3];
    if hkv == 0 || hq % hkv != 0 {
        return Err(MlirError::Unsupported(format!(
            "attention with {hq} query heads over {hkv} key heads"
        )));
    }
    let mut l = Layout::new(vec![hq, hkv]);
    let head = [false, false, true];
    l.arg(vec![b * hq, sq, d], &head, true);
    l.strided_arg(vec![b * hkv, sk, d], &head);
    l.strided_arg(vec![b * hkv, sk, dv], &head);
    let scores = [b, hq, sq, sk];
    match inputs.get(3) {
        None => {}
        Some(m) if m.len() <= 4 => {
            let mut m4 = vec![1; 4 - m.len()];
            m4.extend_from_slice(m);
            // Per axis: broadcast (read at 0) unless it follows the scores.
            let broadcast: Vec<bool> = m4.iter().zip(&scores).map(|(x, s)| x != s).collect();
            if m4.iter().zip(&broadcast).any(|(x, b)| *b && *x != 1) {
                return Err(MlirError::Unsupported(format!(
                    "attention mask {m:?} does not broadcast to the scores {scores:?}"
                )));
            }
            l.strided_arg(m4, &broadcast);
        }
        Some(m) => {
            return Err(MlirError::Unsupported(format!(
                "attention mask of rank {}",
                m.len()
            )))
        }
    }
    l.arg(vec![b * hq, sq, dv], &head, true);
    Ok(l)
}

/// A `memref<dv x f32>` on the stack, allocated in `block`.
fn alloca<'c, 'a>(
    bd: &Builder<'c>,
    block: &'a Block<'c>,
    dv: usize,
) -> Result<V<'c, 'a>, MlirError> {
    bd.op(
        block,
        "memref.alloca",
        &[],
        Some(bd.memref(&[Some(dv)])),
        &[("operandSegmentSizes", bd.attr("array<i32: 0, 0>")?)],
    )
}

/// The kernel's operands and what its key fixes.
pub struct Operands<'c, 'v> {
    /// Queries `[rows, sq, d]`.
    pub q: V<'c, 'v>,
    /// Keys `[b·hkv, sk, d]`.
    pub k: V<'c, 'v>,
    /// Values `[b·hkv, sk, dv]`.
    pub v: V<'c, 'v>,
    /// The output `[rows, sq, dv]`.
    pub out: V<'c, 'v>,
    /// The mask, and per axis whether it follows the scores (else it is read at 0).
    pub mask: Option<(V<'c, 'v>, Vec<bool>)>,
    /// The scores' scale.
    pub scale: f64,
    /// Head sizes of queries and keys, and of values.
    pub d: usize,
    /// The head size of values.
    pub dv: usize,
}

/// One query: its row (batch · head) within the split and absolute, its index and the keys it
/// sees.
#[derive(Clone, Copy)]
pub struct Query<'c, 'a> {
    /// The row within the split arguments.
    pub r: V<'c, 'a>,
    /// The batch of the row.
    pub bi: V<'c, 'a>,
    /// The query head of the row.
    pub h: V<'c, 'a>,
    /// The key/value row (batch · key head).
    pub kr: V<'c, 'a>,
    /// The query's index.
    pub i: V<'c, 'a>,
    /// The visible keys: `lo..hi` (empty when `hi <= lo`).
    pub lo: V<'c, 'a>,
    /// See `lo`.
    pub hi: V<'c, 'a>,
}

impl<'c> Operands<'c, '_> {
    /// `score` plus the mask at key `j` (`score` alone without a mask).
    pub fn masked<'a>(
        &self,
        ix: &Ix<'_, 'c, 'a>,
        qy: &Query<'c, '_>,
        j: V<'c, '_>,
        score: V<'c, 'a>,
    ) -> Result<V<'c, 'a>, MlirError> {
        let Some((m, follows)) = &self.mask else {
            return Ok(score);
        };
        let zero = ix.c(0)?;
        let at: Vec<V<'c, '_>> = [qy.bi, qy.h, qy.i, j]
            .iter()
            .zip(follows)
            .map(|(iv, f)| if *f { *iv } else { zero })
            .collect();
        ix.scalars().bin("arith.addf", score, ix.load(*m, &at)?)
    }

    /// The online softmax's new maximum `m_new` from the old `m` and this step's maximum
    /// `top`, and the exponent base: `m_new`, or 0 while every score so far is `-inf` (not
    /// `-inf - -inf` = NaN: `l` and `acc` stay 0 until a finite score).
    pub fn new_max<'a>(
        s: &Scalars<'_, 'c, 'a>,
        m: V<'c, '_>,
        top: V<'c, '_>,
    ) -> Result<(V<'c, 'a>, V<'c, 'a>), MlirError> {
        let m_new = s.bin("arith.maximumf", m, top)?;
        let stuck = s.cmp(CmpfPredicate::Oeq, m_new, s.c(f64::NEG_INFINITY)?)?;
        Ok((m_new, s.select(stuck, s.c(0.0)?, m_new)?))
    }

    /// `e^(score - base)`, exactly 0 for a hidden key (`-inf`: the polynomial exp may leave a
    /// subnormal there, which `1/l` would blow up when every key is hidden). Scalars or
    /// vectors, as `s`.
    pub fn weight<'a>(
        s: &Scalars<'_, 'c, 'a>,
        score: V<'c, '_>,
        base: V<'c, '_>,
    ) -> Result<V<'c, 'a>, MlirError> {
        let hidden = s.cmp(CmpfPredicate::Oeq, score, s.c(f64::NEG_INFINITY)?)?;
        let p = s.exp(s.bin("arith.subf", score, base)?)?;
        s.select(hidden, s.c(0.0)?, p)
    }

    /// `1 / l`, or 0 when the query sees no key (its output is zeros).
    pub fn inverse<'a>(
        ix: &Ix<'_, 'c, 'a>,
        qy: &Query<'c, '_>,
        l: V<'c, '_>,
    ) -> Result<V<'c, 'a>, MlirError> {
        let s = ix.scalars();
        let empty: V<'c, '_> = ix
            .block
            .append_operation(arith::cmpi(
                ix.b.ctx,
                CmpiPredicate::Sle,
                qy.hi,
                qy.lo,
                ix.b.loc,
            ))
            .result(0)?
            .into();
        s.select(empty, s.c(0.0)?, s.recip(l)?)
    }
}

/// Attention laid out by [`layout`].
pub fn attention<'c>(
    ctx: &'c Context,
    key: &KernelKey,
    (scale, causal, window): (f64, bool, usize),
    target: Target,
) -> Result<Lowered<'c>, MlirError> {
    let (hq, hkv) = (key.params[0], key.params[1]);
    let group = hq / hkv;
    let d = fixed(key, 0, 2)?;
    let dv = fixed(key, 2, 2)?;
    // Per mask axis whether it follows the scores (dynamic) or is broadcast (fixed at 1).
    let mask: Option<Vec<bool>> =
        (key.args.len() == 5).then(|| key.args[3].dims.iter().map(Option::is_none).collect());
    let window = i64::try_from(window)
        .map_err(|_| MlirError::Unsupported(format!("attention window {window}")))?;
    module_with(
        ctx,
        &key.args,
        true,
        Box::new(move |bd, block, vals| {
            let ops = Operands {
                q: vals[0],
                k: vals[1],
                v: vals[2],
                out: vals[vals.len() - 2],
                mask: mask.as_ref().map(|f| (vals[3], f.clone())),
                scale,
                d,
                dv,
            };
            let first = vals[vals.len() - 1];
            let top = Ix { b: bd, block };
            let rows = bd.dim(block, ops.q, 0)?;
            let sq_n = bd.dim(block, ops.q, 1)?;
            let sk_n = bd.dim(block, ops.k, 1)?;
            // Query i sits at key position sk - sq + i.
            let offset = top.op("arith.subi", sk_n, sq_n)?;
            parallel_rows(bd, block, rows, |blk, r| {
                let acc = match target {
                    Target::Cpu => None,
                    Target::Gpu => Some(alloca(bd, blk, dv)?),
                };
                let ix = Ix { b: bd, block: blk };
                let row = ix.op("arith.addi", first, r)?;
                let hq_n = ix.c(hq as i64)?;
                let bi = ix.op("arith.divui", row, hq_n)?;
                let h = ix.op("arith.remui", row, hq_n)?;
                let hk = ix.op("arith.divui", h, ix.c(group as i64)?)?;
                let kr = ix.op("arith.muli", bi, ix.c(hkv as i64)?)?;
                let kr = ix.op("arith.addi", kr, hk)?;
                let z = ix.c(0)?;
                for_loop(bd, blk, (z, sq_n), &[], |blk, i, _| {
                    let ix = Ix { b: bd, block: blk };
                    let pos = ix.op("arith.addi", i, offset)?;
                    let hi = if causal {
                        ix.op("arith.minsi", ix.op("arith.addi", pos, ix.c(1)?)?, sk_n)?
                    } else {
                        sk_n
                    };
                    let lo = if window > 0 {
                        let first = ix.op("arith.subi", pos, ix.c(window - 1)?)?;
                        ix.op("arith.maxsi", first, ix.c(0)?)?
                    } else {
                        ix.c(0)?
                    };
                    let qy = Query {
                        r,
                        bi,
                        h,
                        kr,
                        i,
                        lo,
                        hi,
                    };
                    match acc {
                        None => flash::query(&ix, &ops, &qy)?,
                        Some(acc) => one_key_at_a_time(&ix, &ops, &qy, acc)?,
                    }
                    Ok(vec![])
                })?;
                Ok(())
            })?;
            Ok(())
        }),
    )
}

/// One query's output, the keys walked one at a time with the accumulator in memory `acc`.
fn one_key_at_a_time<'c>(
    ix: &Ix<'_, 'c, '_>,
    ops: &Operands<'c, '_>,
    qy: &Query<'c, '_>,
    acc: V<'c, '_>,
) -> Result<(), MlirError> {
    let (bd, blk) = (ix.b, ix.block);
    let s = ix.scalars();
    let (q, k, v, out) = (ops.q, ops.k, ops.v, ops.out);
    let (r, i, kr) = (qy.r, qy.i, qy.kr);
    let (d, dv) = (ops.d, ops.dv);
    let (z, dv_n) = (ix.c(0)?, ix.c(dv as i64)?);
    for_loop(bd, blk, (z, dv_n), &[], |blk, c, _| {
        let ix = Ix { b: bd, block: blk };
        ix.store(ix.scalars().c(0.0)?, acc, &[c])?;
        Ok(vec![])
    })?;
    let inits = [s.c(f64::NEG_INFINITY)?, s.c(0.0)?];
    let ml = for_loop(bd, blk, (qy.lo, qy.hi), &inits, |blk, j, ml| {
        let ix = Ix { b: bd, block: blk };
        let s = ix.scalars();
        let (z, d_n) = (ix.c(0)?, ix.c(d as i64)?);
        let dot = for_loop(bd, blk, (z, d_n), &[s.c(0.0)?], |blk, p, acc| {
            let ix = Ix { b: bd, block: blk };
            let s = ix.scalars();
            let x = ix.load(q, &[r, i, p])?;
            let y = ix.load(k, &[kr, j, p])?;
            // Reassociable, so LLVM vectorizes the dot product.
            Ok(vec![s.reassoc(
                "arith.addf",
                acc[0],
                s.bin("arith.mulf", x, y)?,
            )?])
        })?[0];
        let score = s.bin("arith.mulf", dot, s.c(ops.scale)?)?;
        let score = ops.masked(&ix, qy, j, score)?;
        let (m_new, base) = Operands::new_max(&s, ml[0], score)?;
        let alpha = s.exp(s.bin("arith.subf", ml[0], base)?)?;
        let pj = Operands::weight(&s, score, base)?;
        let l_new = s.bin("arith.addf", s.bin("arith.mulf", ml[1], alpha)?, pj)?;
        let (z, dv_n) = (ix.c(0)?, ix.c(dv as i64)?);
        for_loop(bd, blk, (z, dv_n), &[], |blk, c, _| {
            let ix = Ix { b: bd, block: blk };
            let s = ix.scalars();
            let a = s.bin("arith.mulf", ix.load(acc, &[c])?, alpha)?;
            let x = s.bin("arith.mulf", pj, ix.load(v, &[kr, j, c])?)?;
            ix.store(s.bin("arith.addf", a, x)?, acc, &[c])?;
            Ok(vec![])
        })?;
        Ok(vec![m_new, l_new])
    })?;
    // acc / l (NaN when all were -inf), zeros without a visible key.
    let inv = Operands::inverse(ix, qy, ml[1])?;
    let (z, dv_n) = (ix.c(0)?, ix.c(dv as i64)?);
    for_loop(bd, blk, (z, dv_n), &[], |blk, c, _| {
        let ix = Ix { b: bd, block: blk };
        let s = ix.scalars();
        let y = s.bin("arith.mulf", ix.load(acc, &[c])?, inv)?;
        ix.store(y, out, &[r, i, c])?;
        Ok(vec![])
    })?;
    Ok(())
}
