//! Kernels for the few nodes of a step whose operands are integers (the backend's other
//! kernels read f32): a cast of integers to f32 (a decode step's `position_ids` to rotary
//! angles) and a comparison of integers (the attention mask's `attention_mask != 0`). They
//! write into the planned f32 buffers, a bool as 0.0 or 1.0 (as the fused elementwise kernel
//! reads bools), so these nodes allocate nothing, and compute exactly what the reference ops
//! do.

use super::layout::{Dims, Layout};
use kiln_ir::CmpOp;

/// `out[i] = x[i]` as f32, rounded once as the reference cast rounds it (through f64, exact
/// for every i64 that f64 holds); `false` when the lengths differ.
pub fn cast_to_f32(x: &[i64], out: &mut [f32]) -> bool {
    if x.len() != out.len() {
        return false;
    }
    for (o, &v) in out.iter_mut().zip(x) {
        *o = v as f64 as f32;
    }
    true
}

/// `a op b` with numpy broadcasting to `shape` (row-major `out`), 1.0 where it holds and 0.0
/// elsewhere; `a` and `b` are dense with their shapes. `false` when the operands do not
/// broadcast to `shape` or their lengths do not match their shapes.
pub fn compare(
    op: CmpOp,
    (a, sa): (&[i64], &[usize]),
    (b, sb): (&[i64], &[usize]),
    shape: &[usize],
    out: &mut [f32],
) -> bool {
    let fits = |x: &[i64], s: &[usize]| {
        Dims::try_from_slice(s).filter(|_| x.len() == s.iter().product::<usize>())?;
        Layout::dense(s).broadcast_to(shape)
    };
    let (Some(ta), Some(tb)) = (fits(a, sa), fits(b, sb)) else {
        return false;
    };
    if out.len() != shape.iter().product::<usize>() {
        return false;
    }
    // Row-major over `shape`: the index `at` and each operand's offset, carried axis by axis.
    let mut at = [0usize; super::layout::MAX_RANK];
    let (mut ia, mut ib) = (0usize, 0usize);
    for o in out.iter_mut() {
        *o = if op.eval(a[ia], b[ib]) { 1.0 } else { 0.0 };
        for axis in (0..shape.len()).rev() {
            at[axis] += 1;
            ia += ta[axis];
            ib += tb[axis];
            if at[axis] < shape[axis] {
                break;
            }
            ia -= ta[axis] * shape[axis];
            ib -= tb[axis] * shape[axis];
            at[axis] = 0;
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reference::{self, Ctx};
    use crate::Tensor;
    use kiln_ir::{Bindings, DType, Op, ValueId};

    /// Every comparison, on random shapes broadcast both ways (odd sizes, scalars, rank 0),
    /// agrees with the reference op.
    #[test]
    fn compare_agrees_with_the_reference() {
        let env = Bindings::new();
        let ctx = Ctx {
            node: ValueId(0),
            op: "compare",
            env: &env,
        };
        let cases: [(&[usize], &[usize], &[usize]); 6] = [
            (&[2, 7], &[], &[2, 7]),
            (&[1, 33], &[1, 1], &[1, 33]),
            (&[3, 1, 5], &[4, 1], &[3, 4, 5]),
            (&[], &[], &[]),
            (&[1], &[7], &[7]),
            (&[2, 1, 1, 9], &[9], &[2, 1, 1, 9]),
        ];
        let mut seed = 12345u64;
        let mut next = || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 60) as i64 - 8
        };
        for (sa, sb, shape) in cases {
            let a: Vec<i64> = (0..sa.iter().product::<usize>()).map(|_| next()).collect();
            let b: Vec<i64> = (0..sb.iter().product::<usize>()).map(|_| next()).collect();
            let (ta, tb) = (
                Tensor::from_i64(sa.to_vec(), a.clone()).unwrap(),
                Tensor::from_i64(sb.to_vec(), b.clone()).unwrap(),
            );
            for op in CmpOp::ALL {
                let want = reference::eval_op(&ctx, &Op::Compare(op), &[&ta, &tb]).unwrap();
                let mut out = vec![0.5; shape.iter().product()];
                assert!(compare(op, (&a, sa), (&b, sb), shape, &mut out));
                let want: Vec<f32> = want.cast(DType::F32).as_f32().unwrap().to_vec();
                assert_eq!(out, want, "{op:?} {sa:?} {sb:?}");
            }
        }
        let mut out = [0.0; 6];
        assert!(!compare(
            CmpOp::Eq,
            (&[1, 2], &[2]),
            (&[1, 2, 3], &[3]),
            &[6],
            &mut out
        ));
    }

    /// The cast rounds as the reference does, past 2^24 included.
    #[test]
    fn cast_agrees_with_the_reference() {
        let x = vec![
            0,
            1,
            -7,
            4097,
            (1 << 24) + 1,
            i64::MAX,
            i64::MIN,
            123_456_789_012,
        ];
        let t = Tensor::from_i64(vec![x.len()], x.clone()).unwrap();
        let mut out = vec![0.0; x.len()];
        assert!(cast_to_f32(&x, &mut out));
        assert_eq!(out, t.cast(DType::F32).as_f32().unwrap());
        assert!(!cast_to_f32(&x, &mut [0.0; 3]));
    }
}
