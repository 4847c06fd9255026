//! Matrix products as `linalg` contractions. Batch axes are collapsed into one (each operand's
//! batch is either the result's or all ones, i.e. broadcast); the loops run in the order
//! batch, `i`, `k`, `j`, so the innermost loop walks `b` and `c` with unit stride and LLVM
//! vectorizes it (`linalg.matmul`'s own order, `i, j, k`, puts a strided reduction innermost).
//! Rows of `a` and `c` (or whole batches) are split across threads by the JIT.

use super::build::Iter;
use super::lower::{module, ArgLayout, Lowered};
use super::scalar::Scalars;
use super::spec::KernelSpec;
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

/// `a · b` with the IR's transpose flags.
pub fn matmul<'c>(
    ctx: &'c Context,
    spec: &KernelSpec,
    out: &[usize],
    ta: bool,
    tb: bool,
) -> Result<Lowered<'c>, MlirError> {
    let (sa, sb) = (&spec.inputs[0], &spec.inputs[1]);
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
    if batch == 1 {
        // [m, k] · [k, n]: rows of a and c split unless a is read transposed.
        let args = vec![
            ArgLayout {
                shape: mat(ta, m, k).to_vec(),
                split: !ta,
            },
            ArgLayout::whole(mat(tb, k, n).to_vec()),
            ArgLayout {
                shape: vec![m, n],
                split: !ta,
            },
        ];
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
            args,
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
    // [batch, m, k] · [batch, k, n], batches split.
    let shape3 = |full: bool, mat: [usize; 2]| vec![if full { batch } else { 1 }, mat[0], mat[1]];
    let args = vec![
        ArgLayout {
            shape: shape3(a_full, mat(ta, m, k)),
            split: a_full,
        },
        ArgLayout {
            shape: shape3(b_full, mat(tb, k, n)),
            split: b_full,
        },
        ArgLayout::rows(vec![batch, m, n]),
    ];
    // Loops (batch, i, k, j).
    let bat = |full: bool| if full { Some(0) } else { None };
    let am = if ta {
        [bat(a_full), Some(2), Some(1)]
    } else {
        [bat(a_full), Some(1), Some(2)]
    };
    let bm = if tb {
        [bat(b_full), Some(3), Some(2)]
    } else {
        [bat(b_full), Some(2), Some(3)]
    };
    module(
        ctx,
        args,
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
