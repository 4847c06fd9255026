//! The tracer: builds a [`Graph`] from code that reads like PyTorch.
//!
//! ```
//! use kiln_ir::trace::Tracer;
//! use kiln_ir::{DType, Dim};
//! let t = Tracer::new();
//! let x = t.input("x", DType::F32, [Dim::sym("batch"), Dim::fixed(4)]);
//! let w = t.param("w", DType::F32, [4, 3]);
//! let y = x.matmul(&w)?.softmax(-1)?;
//! let z = (&y + 1.0)?;
//! t.output("z", &z);
//! let graph = t.finish()?;
//! assert_eq!(graph.outputs()[0].name, "z");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Every method adds one node and infers its type; a shape or dtype error names the op and the
//! operand types (`matmul(f32[2, 3], f32[4, 5]): cannot multiply ...`).

use crate::{
    BinaryOp, CmpOp, DType, Dim, Graph, Literal, Op, OpError, ReduceOp, TensorType, UnaryOp,
    ValueId, VerifyError,
};
use std::cell::RefCell;
use std::rc::Rc;

/// Result of a traced operation.
pub type TraceResult = Result<Tensor, OpError>;

/// Records operations into a graph. Cheap to clone handles share the same graph.
#[derive(Debug, Clone, Default)]
pub struct Tracer {
    graph: Rc<RefCell<Graph>>,
}

/// A traced value: a handle to a node of the tracer's graph, with its type.
#[derive(Debug, Clone)]
pub struct Tensor {
    id: ValueId,
    ty: TensorType,
    graph: Rc<RefCell<Graph>>,
}

fn op_error(op: &str, operands: &[&Tensor], reason: impl Into<String>) -> OpError {
    OpError {
        op: op.to_string(),
        operands: operands.iter().map(|t| t.ty.to_string()).collect(),
        reason: reason.into(),
    }
}

impl Tracer {
    /// A tracer with an empty graph.
    pub fn new() -> Self {
        Self::default()
    }

    fn source(&self, op: Op, ty: TensorType) -> Tensor {
        let id = self.graph.borrow_mut().push(crate::Node {
            op,
            inputs: vec![],
            ty: ty.clone(),
        });
        Tensor {
            id,
            ty,
            graph: self.graph.clone(),
        }
    }

    /// A graph input.
    pub fn input<D: Into<Dim>>(
        &self,
        name: &str,
        dtype: DType,
        shape: impl IntoIterator<Item = D>,
    ) -> Tensor {
        self.source(
            Op::Input { name: name.into() },
            TensorType::new(dtype, shape),
        )
    }

    /// A named parameter (weight). Declaring a name again with the same type gives the same
    /// value (code that applies one head to two inputs reads one weight).
    pub fn param<D: Into<Dim>>(
        &self,
        name: &str,
        dtype: DType,
        shape: impl IntoIterator<Item = D>,
    ) -> Tensor {
        let ty = TensorType::new(dtype, shape);
        let existing = self
            .graph
            .borrow()
            .params()
            .find_map(|(n, id, t)| (n == name && *t == ty).then_some(id));
        match existing {
            Some(id) => Tensor {
                id,
                ty,
                graph: self.graph.clone(),
            },
            None => self.source(Op::Param { name: name.into() }, ty),
        }
    }

    /// A constant.
    pub fn constant(&self, value: Literal) -> Tensor {
        let ty = TensorType::new(value.dtype(), value.shape().iter().copied());
        self.source(Op::Const { value }, ty)
    }

    /// A rank-0 constant of `dtype`.
    pub fn scalar(&self, dtype: DType, v: f64) -> Tensor {
        self.constant(Literal::scalar(dtype, v))
    }

    /// Counts along `axis` of `shape` (`arange` broadcast).
    pub fn iota<D: Into<Dim>>(
        &self,
        dtype: DType,
        shape: impl IntoIterator<Item = D>,
        axis: usize,
    ) -> TraceResult {
        let op = Op::Iota {
            dtype,
            shape: shape.into_iter().map(Into::into).collect(),
            axis,
        };
        self.apply(op, &[])
    }

    /// Applies any op to operands of this tracer.
    pub fn apply(&self, op: Op, operands: &[&Tensor]) -> TraceResult {
        if operands.iter().any(|t| !Rc::ptr_eq(&t.graph, &self.graph)) {
            return Err(op_error(
                op.name(),
                operands,
                "operands come from another tracer",
            ));
        }
        let ids: Vec<ValueId> = operands.iter().map(|t| t.id).collect();
        let id = self.graph.borrow_mut().add(op, &ids)?;
        let ty = self.graph.borrow().ty(id).clone();
        Ok(Tensor {
            id,
            ty,
            graph: self.graph.clone(),
        })
    }

    /// Names `t` as a graph output.
    pub fn output(&self, name: &str, t: &Tensor) {
        self.graph.borrow_mut().add_output(name, t.id);
    }

    /// The graph so far, verified.
    pub fn finish(&self) -> Result<Graph, VerifyError> {
        let g = self.graph.borrow().clone();
        crate::verify(&g)?;
        Ok(g)
    }
}

macro_rules! unary_methods {
    ($($(#[$doc:meta])* $name:ident => $op:ident,)*) => {
        $( $(#[$doc])* pub fn $name(&self) -> TraceResult { self.unary(UnaryOp::$op) } )*
    };
}

macro_rules! binary_methods {
    ($($(#[$doc:meta])* $name:ident => $op:ident,)*) => {
        $( $(#[$doc])* pub fn $name(&self, rhs: &Tensor) -> TraceResult {
            self.binary(BinaryOp::$op, rhs)
        } )*
    };
}

macro_rules! compare_methods {
    ($($(#[$doc:meta])* $name:ident => $op:ident,)*) => {
        $( $(#[$doc])* pub fn $name(&self, rhs: &Tensor) -> TraceResult {
            self.apply(Op::Compare(CmpOp::$op), &[rhs])
        } )*
    };
}

impl Tensor {
    /// The value's id in the graph.
    pub fn id(&self) -> ValueId {
        self.id
    }

    /// The value's type.
    pub fn ty(&self) -> &TensorType {
        &self.ty
    }

    /// Element type.
    pub fn dtype(&self) -> DType {
        self.ty.dtype
    }

    /// Dimensions.
    pub fn shape(&self) -> &[Dim] {
        &self.ty.shape
    }

    /// Number of axes.
    pub fn rank(&self) -> usize {
        self.ty.rank()
    }

    /// The tracer this value belongs to.
    pub fn tracer(&self) -> Tracer {
        Tracer {
            graph: self.graph.clone(),
        }
    }

    /// Dimension `axis` (negative counts from the end).
    pub fn dim(&self, axis: isize) -> Result<Dim, OpError> {
        Ok(self.ty.shape[self.axis("dim", axis)?].clone())
    }

    fn axis(&self, op: &str, axis: isize) -> Result<usize, OpError> {
        let r = self.rank() as isize;
        let a = if axis < 0 { axis + r } else { axis };
        if !(0..r).contains(&a) {
            return Err(op_error(
                op,
                &[self],
                format!("axis {axis} out of range for rank {r}"),
            ));
        }
        Ok(a as usize)
    }

    fn apply(&self, op: Op, rest: &[&Tensor]) -> TraceResult {
        let mut operands = vec![self];
        operands.extend_from_slice(rest);
        self.tracer().apply(op, &operands)
    }

    fn unary(&self, op: UnaryOp) -> TraceResult {
        self.apply(Op::Unary(op), &[])
    }

    fn binary(&self, op: BinaryOp, rhs: &Tensor) -> TraceResult {
        self.apply(Op::Binary(op), &[rhs])
    }

    /// A rank-0 constant of this tensor's dtype.
    fn scalar_like(&self, v: f64) -> Tensor {
        self.tracer().scalar(self.dtype(), v)
    }

    unary_methods! {
        /// `-x`.
        neg => Neg,
        /// `e^x`.
        exp => Exp,
        /// Natural log.
        log => Log,
        /// Square root.
        sqrt => Sqrt,
        /// `1/sqrt(x)`.
        rsqrt => Rsqrt,
        /// tanh.
        tanh => Tanh,
        /// erf.
        erf => Erf,
        /// Logistic sigmoid.
        sigmoid => Sigmoid,
        /// `max(x, 0)`.
        relu => Relu,
        /// Exact (erf) GELU.
        gelu => Gelu,
        /// Tanh-approximated GELU.
        gelu_tanh => GeluTanh,
        /// SiLU.
        silu => Silu,
        /// Sine.
        sin => Sin,
        /// Cosine.
        cos => Cos,
        /// `1/x`.
        recip => Recip,
        /// `|x|`.
        abs => Abs,
        /// Logical not.
        not => Not,
    }

    binary_methods! {
        /// `a + b`, broadcasting.
        add => Add,
        /// `a - b`, broadcasting.
        sub => Sub,
        /// `a * b`, broadcasting.
        mul => Mul,
        /// `a / b`, broadcasting.
        div => Div,
        /// `a ^ b`, broadcasting.
        pow => Pow,
        /// Elementwise maximum (`torch.maximum`).
        maximum => Max,
        /// Elementwise minimum (`torch.minimum`).
        minimum => Min,
        /// Logical and.
        and => And,
        /// Logical or.
        or => Or,
    }

    compare_methods! {
        /// `a == b`.
        eq => Eq,
        /// `a != b`.
        ne => Ne,
        /// `a < b`.
        lt => Lt,
        /// `a <= b`.
        le => Le,
        /// `a > b`.
        gt => Gt,
        /// `a >= b`.
        ge => Ge,
    }

    /// `x ^ p` for a constant exponent.
    pub fn powf(&self, p: f64) -> TraceResult {
        self.pow(&self.scalar_like(p))
    }

    /// `where(self, a, b)`: `self` is the bool condition.
    pub fn where_(&self, a: &Tensor, b: &Tensor) -> TraceResult {
        self.apply(Op::Where, &[a, b])
    }

    /// Converts to `dtype`; the same value when it already has that dtype (as PyTorch's `.to`).
    pub fn cast(&self, dtype: DType) -> TraceResult {
        if dtype == self.dtype() {
            return Ok(self.clone());
        }
        self.apply(Op::Cast { to: dtype }, &[])
    }

    fn reduce(&self, op: ReduceOp, axes: &[isize], keepdim: bool) -> TraceResult {
        let mut norm = axes
            .iter()
            .map(|&a| self.axis(op.name(), a))
            .collect::<Result<Vec<_>, _>>()?;
        norm.sort_unstable();
        norm.dedup();
        self.apply(
            Op::Reduce {
                op,
                axes: norm,
                keepdim,
            },
            &[],
        )
    }

    /// Sum over `axes` (negative counts from the end).
    pub fn sum(&self, axes: &[isize], keepdim: bool) -> TraceResult {
        self.reduce(ReduceOp::Sum, axes, keepdim)
    }

    /// Mean over `axes`.
    pub fn mean(&self, axes: &[isize], keepdim: bool) -> TraceResult {
        self.reduce(ReduceOp::Mean, axes, keepdim)
    }

    /// Maximum over `axes`.
    pub fn max(&self, axes: &[isize], keepdim: bool) -> TraceResult {
        self.reduce(ReduceOp::Max, axes, keepdim)
    }

    /// Minimum over `axes`.
    pub fn min(&self, axes: &[isize], keepdim: bool) -> TraceResult {
        self.reduce(ReduceOp::Min, axes, keepdim)
    }

    /// Index of the maximum along `axis`.
    pub fn argmax(&self, axis: isize, keepdim: bool) -> TraceResult {
        let axis = self.axis("argmax", axis)?;
        self.apply(Op::ArgMax { axis, keepdim }, &[])
    }

    /// Indices of the `k` largest along `axis`, largest first.
    pub fn topk(&self, k: usize, axis: isize) -> TraceResult {
        let axis = self.axis("topk", axis)?;
        self.apply(Op::TopK { k, axis }, &[])
    }

    /// Softmax along `axis`.
    pub fn softmax(&self, axis: isize) -> TraceResult {
        let axis = self.axis("softmax", axis)?;
        self.apply(Op::Softmax { axis }, &[])
    }

    /// Log-softmax along `axis`.
    pub fn log_softmax(&self, axis: isize) -> TraceResult {
        let axis = self.axis("log_softmax", axis)?;
        self.apply(Op::LogSoftmax { axis }, &[])
    }

    /// `self @ rhs` (batched, broadcasting batch axes).
    pub fn matmul(&self, rhs: &Tensor) -> TraceResult {
        self.matmul_t(rhs, false, false)
    }

    /// `self @ rhs` reading either operand transposed in its last two axes.
    pub fn matmul_t(&self, rhs: &Tensor, transpose_a: bool, transpose_b: bool) -> TraceResult {
        self.apply(
            Op::MatMul {
                transpose_a,
                transpose_b,
            },
            &[rhs],
        )
    }

    /// New shape with the same elements. One dim may be `-1` (fixed), inferred from the rest.
    pub fn reshape(&self, shape: &[Dim]) -> TraceResult {
        let minus_one = Dim::fixed(-1);
        let holes = shape.iter().filter(|d| **d == minus_one).count();
        let mut shape = shape.to_vec();
        if holes > 1 {
            return Err(op_error(
                "reshape",
                &[self],
                "more than one -1 in the new shape",
            ));
        }
        if holes == 1 {
            let known = crate::shape::numel(
                &shape
                    .iter()
                    .filter(|d| **d != minus_one)
                    .cloned()
                    .collect::<Vec<_>>(),
            );
            let total = self.ty.numel();
            let inferred = match known.as_fixed() {
                Some(n) if n > 0 => total.div_exact(n),
                _ => total.div_dim(&known),
            }
            .ok_or_else(|| {
                op_error(
                    "reshape",
                    &[self],
                    format!("cannot infer -1: {total} elements are not a multiple of {known}"),
                )
            })?;
            for d in shape.iter_mut().filter(|d| **d == minus_one) {
                *d = inferred.clone();
            }
        }
        self.apply(Op::Reshape { shape }, &[])
    }

    /// Permutes axes: result axis `i` is axis `perm[i]`.
    pub fn permute(&self, perm: &[usize]) -> TraceResult {
        self.apply(
            Op::Permute {
                perm: perm.to_vec(),
            },
            &[],
        )
    }

    /// Swaps two axes.
    pub fn transpose(&self, a: isize, b: isize) -> TraceResult {
        let (a, b) = (self.axis("transpose", a)?, self.axis("transpose", b)?);
        let mut perm: Vec<usize> = (0..self.rank()).collect();
        perm.swap(a, b);
        self.permute(&perm)
    }

    /// Inserts a size-1 axis at `axis` (`0..=rank`; negative counts from the end as in PyTorch).
    pub fn unsqueeze(&self, axis: isize) -> TraceResult {
        let r = self.rank() as isize + 1;
        let a = if axis < 0 { axis + r } else { axis };
        if !(0..r).contains(&a) {
            return Err(op_error(
                "unsqueeze",
                &[self],
                format!("axis {axis} out of range"),
            ));
        }
        let mut shape = self.ty.shape.clone();
        shape.insert(a as usize, Dim::fixed(1));
        self.apply(Op::Reshape { shape }, &[])
    }

    /// Broadcasts to `shape`.
    pub fn expand(&self, shape: &[Dim]) -> TraceResult {
        self.apply(
            Op::Expand {
                shape: shape.to_vec(),
            },
            &[],
        )
    }

    /// Elements `start..end` along `axis`.
    pub fn slice(&self, axis: isize, start: impl Into<Dim>, end: impl Into<Dim>) -> TraceResult {
        let axis = self.axis("slice", axis)?;
        self.apply(
            Op::Slice {
                axis,
                start: start.into(),
                end: end.into(),
            },
            &[],
        )
    }

    /// Joins tensors along `axis` (`torch.cat`).
    pub fn cat(tensors: &[&Tensor], axis: isize) -> TraceResult {
        let Some(first) = tensors.first() else {
            return Err(op_error("concat", &[], "no operands"));
        };
        let axis = first.axis("concat", axis)?;
        first.tracer().apply(Op::Concat { axis }, tensors)
    }

    /// `index_select(axis, indices)`; `weight.index_select(0, ids)` is an embedding lookup.
    pub fn index_select(&self, axis: isize, indices: &Tensor) -> TraceResult {
        let axis = self.axis("gather", axis)?;
        self.apply(Op::Gather { axis }, &[indices])
    }

    /// `take_along_dim(indices, axis)`.
    pub fn gather_along(&self, axis: isize, indices: &Tensor) -> TraceResult {
        let axis = self.axis("gather_along", axis)?;
        self.apply(Op::GatherAlong { axis }, &[indices])
    }

    /// Keeps elements with `col - row >= diagonal` (`torch.triu`).
    pub fn triu(&self, diagonal: impl Into<Dim>) -> TraceResult {
        self.apply(
            Op::Triangle {
                upper: true,
                diagonal: diagonal.into(),
            },
            &[],
        )
    }

    /// Keeps elements with `col - row <= diagonal` (`torch.tril`).
    pub fn tril(&self, diagonal: impl Into<Dim>) -> TraceResult {
        self.apply(
            Op::Triangle {
                upper: false,
                diagonal: diagonal.into(),
            },
            &[],
        )
    }
}

macro_rules! operator {
    ($trait:ident, $method:ident, $op:ident) => {
        impl std::ops::$trait<&Tensor> for &Tensor {
            type Output = TraceResult;
            fn $method(self, rhs: &Tensor) -> TraceResult {
                self.binary(BinaryOp::$op, rhs)
            }
        }
        impl std::ops::$trait<f64> for &Tensor {
            type Output = TraceResult;
            fn $method(self, rhs: f64) -> TraceResult {
                self.binary(BinaryOp::$op, &self.scalar_like(rhs))
            }
        }
    };
}

operator!(Add, add, Add);
operator!(Sub, sub, Sub);
operator!(Mul, mul, Mul);
operator!(Div, div, Div);

impl std::ops::Neg for &Tensor {
    type Output = TraceResult;
    fn neg(self) -> TraceResult {
        self.unary(UnaryOp::Neg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shape_errors_name_op_and_shapes() {
        let t = Tracer::new();
        let a = t.input("a", DType::F32, [2, 3]);
        let b = t.input("b", DType::F32, [4, 5]);
        let e = a.matmul(&b).unwrap_err();
        assert_eq!(e.op, "matmul");
        let msg = e.to_string();
        assert!(
            msg.contains("f32[2, 3]") && msg.contains("f32[4, 5]"),
            "{msg}"
        );
        let e = (&a + &b).unwrap_err().to_string();
        assert!(e.starts_with("add(f32[2, 3], f32[4, 5])"), "{e}");
        assert!(a
            .softmax(2)
            .unwrap_err()
            .to_string()
            .contains("axis 2 out of range"));
        let other = Tracer::new().input("c", DType::F32, [2, 3]);
        assert!((&a + &other).unwrap_err().reason.contains("another tracer"));
    }

    #[test]
    fn reshape_infers_symbolic_minus_one() {
        let t = Tracer::new();
        let x = t.input(
            "x",
            DType::F32,
            [Dim::sym("batch"), Dim::sym("seq"), Dim::fixed(64)],
        );
        let y = x
            .reshape(&[
                Dim::sym("batch"),
                Dim::sym("seq"),
                Dim::fixed(4),
                Dim::fixed(-1),
            ])
            .unwrap();
        assert_eq!(y.ty().to_string(), "f32[batch, seq, 4, 16]");
        let z = x.reshape(&[Dim::fixed(-1), Dim::fixed(64)]).unwrap();
        assert_eq!(z.ty().to_string(), "f32[batch*seq, 64]");
        assert!(x.reshape(&[Dim::fixed(-1), Dim::fixed(-1)]).is_err());
        assert!(x.reshape(&[Dim::fixed(-1), Dim::fixed(7)]).is_err());
    }

    #[test]
    fn builds_a_verified_graph() {
        let t = Tracer::new();
        let x = t.input("x", DType::F32, [Dim::sym("seq"), Dim::fixed(4)]);
        let m = t
            .iota(DType::I64, [Dim::sym("seq"), Dim::sym("seq")], 1)
            .unwrap();
        let r = t
            .iota(DType::I64, [Dim::sym("seq"), Dim::sym("seq")], 0)
            .unwrap();
        let causal = m.le(&r).unwrap();
        let scores = x.matmul_t(&x, false, true).unwrap();
        let neg = t.scalar(DType::F32, f64::NEG_INFINITY);
        let masked = causal.where_(&scores, &neg).unwrap().softmax(-1).unwrap();
        let y = (&masked.matmul(&x).unwrap() * 0.5).unwrap();
        assert_eq!(y.ty().to_string(), "f32[seq, 4]");
        t.output("y", &y);
        let g = t.finish().unwrap();
        assert_eq!(g.nodes().len(), 11);
    }

    #[test]
    fn a_parameter_declared_twice_is_one_value() {
        let t = Tracer::new();
        let a = t.param("w", DType::F32, [4, 3]);
        let b = t.param("w", DType::F32, [4, 3]);
        assert_eq!(a.id, b.id);
        // Another type is another declaration (the verifier then reports the clash).
        let c = t.param("w", DType::F32, [4, 4]);
        assert_ne!(a.id, c.id);
        assert_eq!(t.graph.borrow().params().count(), 2);
    }
}
