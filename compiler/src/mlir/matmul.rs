//! Matrix products as `linalg` contractions. Batch axes are collapsed into one (each operand's
//! batch is either the result's or all ones, i.e. broadcast); the loops run in the order
//! batch, `i`, `k`, `j`, so the innermost loop walks `b` and `c` with unit stride and LLVM
//! vectorizes it (`linalg.matmul`'s own order, `i, j, k`, puts a strided reduction innermost).
//! Rows of `a` and `c` (or whole batches) are split across threads by the JIT.

use super::build::Iter;
use super::lower::{module, Lowered};
use super::scalar::Scalars;
use super::spec::{KernelKey, Layout};
use super::MlirError;
use melior::Context;

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
) -> Result<Lowered<'c>, MlirError> {
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
                    let s = Scalars { b, block: blk };
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
                let s = Scalars { b, block: blk };
                Ok(vec![s.bin(
                    "arith.addf",
                    a[2],
                    s.bin("arith.mulf", a[0], a[1])?,
                )?])
            })
        }),
    )
}
