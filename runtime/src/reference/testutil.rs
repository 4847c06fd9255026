//! Helpers for the executor's unit tests: tensor literals, running one op on fixed-shape
//! inputs, and comparing float results.

use super::{run, ExecError, NoParams};
use crate::Tensor;
use kiln_ir::{Graph, Op, TensorType};
use std::borrow::Borrow;
use std::collections::HashMap;

/// An f32 tensor.
pub fn f32t(shape: &[usize], data: &[f32]) -> Tensor {
    Tensor::from_f32(shape.to_vec(), data.to_vec()).unwrap()
}

/// An i64 tensor.
pub fn i64t(shape: &[usize], data: &[i64]) -> Tensor {
    Tensor::from_i64(shape.to_vec(), data.to_vec()).unwrap()
}

/// A bool tensor.
pub fn boolt(shape: &[usize], data: &[bool]) -> Tensor {
    Tensor::from_bool(shape.to_vec(), data.to_vec()).unwrap()
}

/// The fixed type of a concrete tensor.
pub fn ty_of(t: &Tensor) -> TensorType {
    super::concrete_type(t)
}

/// No operands, for source ops.
pub const NO_ARGS: &[Tensor] = &[];

/// Applies `op` to `args` (graph inputs `x0`, `x1`, ... of their exact fixed shapes) and runs it.
pub fn try_op<T: Borrow<Tensor>>(op: Op, args: &[T]) -> Result<Tensor, ExecError> {
    let mut g = Graph::new();
    let mut ids = Vec::new();
    let mut inputs = HashMap::new();
    for (i, t) in args.iter().map(Borrow::borrow).enumerate() {
        let name = format!("x{i}");
        ids.push(g.input(&name, ty_of(t)));
        inputs.insert(name, t.clone());
    }
    let y = g.add(op, &ids).unwrap();
    g.add_output("y", y);
    run(&g, &inputs, &NoParams).map(|mut out| out.remove("y").unwrap())
}

/// As [`try_op`], panicking on error.
pub fn eval_op<T: Borrow<Tensor>>(op: Op, args: &[T]) -> Tensor {
    let name = op.name();
    try_op(op, args).unwrap_or_else(|e| panic!("{name} failed: {e}"))
}

/// Asserts `got` has `shape` and elements within `tol` of `want` (NaN matches NaN, infinities
/// match exactly).
#[track_caller]
pub fn assert_close(got: &Tensor, shape: &[usize], want: &[f64], tol: f64) {
    assert_eq!(got.shape(), shape, "shape");
    let g = got.to_f64_vec();
    assert_eq!(g.len(), want.len(), "element count");
    for (i, (&a, &b)) in g.iter().zip(want).enumerate() {
        let ok = (a.is_nan() && b.is_nan()) || a == b || (a - b).abs() <= tol;
        assert!(ok, "element {i}: got {a}, want {b} (tol {tol}); all: {g:?}");
    }
}
