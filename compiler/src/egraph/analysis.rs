//! The e-class analysis: every e-class has one [`TensorType`] (inferred with
//! [`kiln_ir::infer()`]; merging two classes of different types is a bug and is recorded in
//! [`TypeAnalysis::bugs`]) and, for small float constants, its value. Constant folding happens
//! here: a unary, binary, cast, reshape or expand of constants gets the folded value, and
//! [`Analysis::modify`] adds the `const` node to the class so that extraction can pick it.

use super::{ENode, EG};
use egg::{Analysis, DidMerge, Id};
use kiln_ir::scalar::Scalar;
use kiln_ir::{infer, DType, Literal, Op, TensorType};
use std::collections::HashMap;

/// Constants with at most this many elements are tracked and folded.
pub const MAX_FOLD: usize = 64;

/// What is known about an e-class.
#[derive(Debug, Clone, PartialEq)]
pub struct Data {
    /// The type of every value in the class.
    pub ty: TensorType,
    /// The value, for small constants.
    pub constant: Option<Literal>,
}

/// The analysis state: the declared types of inputs and parameters (they are not inferred),
/// the graph's outputs, and the inconsistencies found (each one a bug in a rule).
#[derive(Debug, Default)]
pub struct TypeAnalysis {
    declared: HashMap<Op, TensorType>,
    /// The e-classes of the lowered graph's outputs (as lowered: compare canonical ids).
    pub outputs: Vec<Id>,
    /// Type or constant disagreements and ill-typed rewrites, in the order found.
    pub bugs: Vec<String>,
}

impl TypeAnalysis {
    /// Declares the type of an `input` or `param` op before it is added.
    pub fn declare(&mut self, source: Op, ty: TensorType) {
        self.declared.insert(source, ty);
    }
}

impl Analysis<ENode> for TypeAnalysis {
    type Data = Data;

    fn make(egraph: &mut EG, enode: &ENode, _id: Id) -> Data {
        let ty = match &enode.op {
            Op::Input { .. } | Op::Param { .. } => egraph.analysis.declared[&enode.op].clone(),
            op => {
                let tys: Vec<&TensorType> =
                    enode.children.iter().map(|&c| &egraph[c].data.ty).collect();
                infer(op, &tys).unwrap_or_else(|e| {
                    panic!("an ill-typed node reached the e-graph: {}: {e}", op.name())
                })
            }
        };
        let consts: Option<Vec<&Literal>> = enode
            .children
            .iter()
            .map(|&c| egraph[c].data.constant.as_ref())
            .collect();
        let constant = consts.and_then(|cs| fold(&enode.op, &cs, &ty));
        Data { ty, constant }
    }

    fn merge(&mut self, a: &mut Data, b: Data) -> DidMerge {
        if a.ty != b.ty {
            self.bugs
                .push(format!("merged e-classes of types {} and {}", a.ty, b.ty));
        }
        match (&a.constant, b.constant) {
            (None, Some(c)) => {
                a.constant = Some(c);
                DidMerge(true, false)
            }
            (Some(x), Some(y)) => {
                if *x != y {
                    self.bugs
                        .push(format!("merged e-classes of constants {x:?} and {y:?}"));
                }
                DidMerge(false, false)
            }
            (Some(_), None) => DidMerge(false, true),
            (None, None) => DidMerge(false, false),
        }
    }

    fn modify(egraph: &mut EG, id: Id) {
        if let Some(value) = egraph[id].data.constant.clone() {
            let c = egraph.add(ENode {
                op: Op::Const { value },
                children: vec![],
            });
            egraph.union(id, c);
        }
    }
}

/// The fixed shape of `ty`, if every dim is fixed.
fn fixed_shape(ty: &TensorType) -> Option<Vec<usize>> {
    ty.shape
        .iter()
        .map(|d| d.as_fixed().and_then(|n| usize::try_from(n).ok()))
        .collect()
}

/// Float elements as the IR computes them: in f64, rounded to f32 first, then to `dtype`.
fn float_literal(
    dtype: DType,
    shape: Vec<usize>,
    vals: impl Iterator<Item = f64>,
) -> Option<Literal> {
    let vals: Vec<Scalar> = vals.map(|v| Scalar::Float(f64::from(v as f32))).collect();
    Literal::from_scalars(dtype, shape, &vals).ok()
}

/// Element `i` of the row-major `out` shape read from `shape`, broadcast (numpy rules).
fn broadcast_index(i: usize, out: &[usize], shape: &[usize]) -> usize {
    let (mut rest, mut idx, mut stride) = (i, 0, 1);
    for (k, &n) in out.iter().enumerate().rev() {
        let coord = rest % n.max(1);
        rest /= n.max(1);
        if let Some(j) = (k + shape.len()).checked_sub(out.len()) {
            if shape[j] != 1 {
                idx += coord * stride;
            }
            stride *= shape[j];
        }
    }
    idx
}

/// The value of `op` on constant operands, when it is a float computation with a fixed result
/// of at most [`MAX_FOLD`] elements (`const` itself included).
fn fold(op: &Op, args: &[&Literal], ty: &TensorType) -> Option<Literal> {
    let shape = fixed_shape(ty)?;
    if shape.iter().product::<usize>() > MAX_FOLD || !ty.dtype.is_float() {
        return None;
    }
    let n: usize = shape.iter().product();
    let floats = |l: &Literal| -> Option<Vec<f64>> {
        l.dtype()
            .is_float()
            .then(|| l.values().into_iter().map(Scalar::as_f64).collect())
    };
    match (op, args) {
        (Op::Const { value }, []) => Some(value.clone()),
        (Op::Unary(u), [a]) => {
            let a = floats(a)?;
            float_literal(ty.dtype, shape, a.into_iter().map(|x| u.eval(x)))
        }
        (Op::Binary(b), [x, y]) => {
            let (xs, ys) = (floats(x)?, floats(y)?);
            let vals = (0..n).map(|i| {
                let xi = xs[broadcast_index(i, &shape, x.shape())];
                let yi = ys[broadcast_index(i, &shape, y.shape())];
                b.eval(xi, yi)
            });
            float_literal(ty.dtype, shape.clone(), vals)
        }
        (
            Op::Cast {
                to: DType::F32 | DType::F16 | DType::BF16,
            },
            [a],
        ) => float_literal(ty.dtype, shape, floats(a)?.into_iter()),
        (Op::Reshape { .. }, [a]) => Literal::from_bytes(ty.dtype, shape, a.bytes().to_vec()).ok(),
        (Op::Expand { .. }, [a]) => {
            let xs = floats(a)?;
            let vals = (0..n).map(|i| xs[broadcast_index(i, &shape, a.shape())]);
            float_literal(ty.dtype, shape.clone(), vals)
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_ir::BinaryOp;

    fn lit(shape: Vec<usize>, v: &[f64]) -> Literal {
        float_literal(DType::F32, shape, v.iter().copied()).unwrap()
    }

    #[test]
    fn folds_broadcast_binary_and_expand() {
        let a = lit(vec![2, 1], &[1.0, 2.0]);
        let b = lit(vec![3], &[10.0, 20.0, 30.0]);
        let ty = TensorType::new(DType::F32, [2, 3]);
        let c = fold(&Op::Binary(BinaryOp::Add), &[&a, &b], &ty).unwrap();
        let v: Vec<f64> = c.values().into_iter().map(Scalar::as_f64).collect();
        assert_eq!(v, [11.0, 21.0, 31.0, 12.0, 22.0, 32.0]);
        let e = fold(
            &Op::Expand {
                shape: ty.shape.clone(),
            },
            &[&a],
            &ty,
        )
        .unwrap();
        let v: Vec<f64> = e.values().into_iter().map(Scalar::as_f64).collect();
        assert_eq!(v, [1.0, 1.0, 1.0, 2.0, 2.0, 2.0]);
    }

    #[test]
    fn rounds_to_the_result_dtype_and_skips_large_or_integer_values() {
        let third = fold(
            &Op::Binary(BinaryOp::Div),
            &[&lit(vec![], &[1.0]), &lit(vec![], &[3.0])],
            &TensorType::new(DType::F32, Vec::<usize>::new()),
        )
        .unwrap();
        assert_eq!(third.values()[0].as_f64(), f64::from(1.0f32 / 3.0));
        let big = TensorType::new(DType::F32, [MAX_FOLD + 1]);
        let z = lit(vec![], &[0.0]);
        assert!(fold(
            &Op::Expand {
                shape: big.shape.clone()
            },
            &[&z],
            &big
        )
        .is_none());
        let i = Literal::scalar_int(DType::I64, 3);
        let ity = TensorType::new(DType::I64, Vec::<usize>::new());
        assert!(fold(&Op::Unary(kiln_ir::UnaryOp::Neg), &[&i], &ity).is_none());
    }
}
