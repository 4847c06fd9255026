//! Attention (`Op::Attention`) as an `scf` loop nest with online softmax: for each batch,
//! query head and query, one pass over the visible keys keeps the running maximum `m`, the
//! running sum `l` of `e^(s - m)` and the rescaled accumulator `acc[dv]` (flash attention's
//! recurrence with key tiles of one row), then writes `acc / l`. Grouped-query heads read key
//! and value head `h / (hq / hkv)`; causal and sliding-window visibility bound the key loop
//! (query `i` sits at `sk - sq + i`); an additive mask of any shape broadcastable to the
//! scores is read at index 0 on its broadcast axes. As the reference executor: a query with no
//! visible key gives zeros, visible keys all `-inf` give NaN. The (batch, query head) rows are
//! an `scf.parallel` loop (split across threads by the JIT, mapped to GPU threads by the GPU
//! pipeline, where each row has its own accumulator); keys, values and the mask are read whole at the absolute
//! row ([`super::lower::Lowered::first_row`]).

use super::build::Builder;
use super::loops::{for_loop, parallel_rows, Ix};
use super::lower::{fixed, module_with, Lowered, Target};
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
            let (q, k, v) = (vals[0], vals[1], vals[2]);
            let m_arg = mask.as_ref().map(|f| (vals[3], f.clone()));
            let (out, first) = (vals[vals.len() - 2], vals[vals.len() - 1]);
            let top = Ix { b: bd, block };
            let rows = bd.dim(block, q, 0)?;
            let sq_n = bd.dim(block, q, 1)?;
            let sk_n = bd.dim(block, k, 1)?;
            // Query i sits at key position sk - sq + i.
            let offset = top.op("arith.subi", sk_n, sq_n)?;
            // The accumulator: one for the function on the CPU (a static stack slot; one per
            // row would be a dynamic alloca in the loop), each row's own on the GPU (a thread's).
            let shared = match target {
                Target::Cpu => Some(alloca(bd, block, dv)?),
                Target::Gpu => None,
            };
            parallel_rows(bd, block, rows, |blk, r| {
                {
                    let acc = match shared {
                        Some(a) => a,
                        None => alloca(bd, blk, dv)?,
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
                        let s = ix.scalars();
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
                        let (z, dv_n) = (ix.c(0)?, ix.c(dv as i64)?);
                        for_loop(bd, blk, (z, dv_n), &[], |blk, c, _| {
                            let ix = Ix { b: bd, block: blk };
                            ix.store(ix.scalars().c(0.0)?, acc, &[c])?;
                            Ok(vec![])
                        })?;
                        let inits = [s.c(f64::NEG_INFINITY)?, s.c(0.0)?];
                        let ml = for_loop(bd, blk, (lo, hi), &inits, |blk, j, ml| {
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
                            let mut score = s.bin("arith.mulf", dot, s.c(scale)?)?;
                            if let Some((m, follows)) = &m_arg {
                                let zero = ix.c(0)?;
                                let at: Vec<V<'c, '_>> = [bi, h, i, j]
                                    .iter()
                                    .zip(follows)
                                    .map(|(iv, f)| if *f { *iv } else { zero })
                                    .collect();
                                score = s.bin("arith.addf", score, ix.load(*m, &at)?)?;
                            }
                            let m_new = s.bin("arith.maximumf", ml[0], score)?;
                            // While every score so far is -inf, rescale against 0 (not
                            // -inf - -inf = NaN): l and acc stay 0 until a finite score.
                            let ninf = s.c(f64::NEG_INFINITY)?;
                            let stuck = s.cmp(CmpfPredicate::Oeq, m_new, ninf)?;
                            let base = s.select(stuck, s.c(0.0)?, m_new)?;
                            let alpha = s.exp(s.bin("arith.subf", ml[0], base)?)?;
                            // A hidden key (-inf) weighs exactly 0 (the polynomial exp may
                            // leave a subnormal there, which 1/l would blow up when every key
                            // is hidden).
                            let hidden = s.cmp(CmpfPredicate::Oeq, score, ninf)?;
                            let pj = s.exp(s.bin("arith.subf", score, base)?)?;
                            let pj = s.select(hidden, s.c(0.0)?, pj)?;
                            let l_new =
                                s.bin("arith.addf", s.bin("arith.mulf", ml[1], alpha)?, pj)?;
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
                        // No visible key: zeros; otherwise acc / l (NaN when all were -inf).
                        let empty: V<'c, '_> = blk
                            .append_operation(arith::cmpi(
                                bd.ctx,
                                CmpiPredicate::Sle,
                                hi,
                                lo,
                                bd.loc,
                            ))
                            .result(0)?
                            .into();
                        let inv = s.select(empty, s.c(0.0)?, s.recip(ml[1])?)?;
                        let (z, dv_n) = (ix.c(0)?, ix.c(dv as i64)?);
                        for_loop(bd, blk, (z, dv_n), &[], |blk, c, _| {
                            let ix = Ix { b: bd, block: blk };
                            let s = ix.scalars();
                            let y = s.bin("arith.mulf", ix.load(acc, &[c])?, inv)?;
                            ix.store(y, out, &[r, i, c])?;
                            Ok(vec![])
                        })?;
                        Ok(vec![])
                    })?;
                }
                Ok(())
            })?;
            Ok(())
        }),
    )
}
