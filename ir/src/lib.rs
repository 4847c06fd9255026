//! kiln's intermediate representation: a typed SSA graph of tensor ops.
//!
//! Stages, each printable and checkable:
//! - [`DType`], [`Dim`] (symbolic sizes), [`TensorType`]: what a value is;
//! - [`Op`]: what a node computes, with its exact semantics documented on the variant;
//! - [`Graph`]: nodes in definition order, inputs, parameters, outputs;
//! - [`infer()`] and [`verify()`]: shape/dtype rules and the well-formedness check;
//! - [`decompose`]: composite ops back to their primitive definitions;
//! - [`text`]: the printer and parser of the text format, which round-trip exactly;
//! - [`trace`]: the builder that model code uses to write graphs like PyTorch code.

pub mod decompose;
pub mod dim;
pub mod dtype;
pub mod expr;
pub mod f8;
pub mod float;
pub mod graph;
pub mod infer;
pub mod literal;
pub mod op;
pub mod scalar;
pub mod shape;
pub mod text;
pub mod trace;
pub mod verify;

pub use dim::{Bindings, Dim, DimError};
pub use dtype::DType;
pub use expr::{Expr, ExprError};
pub use float::F64;
pub use graph::{Graph, Node, OpError, Output, ValueId};
pub use infer::infer;
pub use literal::Literal;
pub use op::{BinaryOp, CmpOp, Op, ReduceOp, UnaryOp};
pub use scalar::Scalar;
pub use shape::{broadcast_shapes, Shape, TensorType};
pub use text::ParseError;
pub use verify::{verify, VerifyError};
