//! One kernel as MLIR: a module holding `func.func @kernel(%in0, ..., %out)` on contiguous f32
//! memrefs, built from `linalg` structured ops, and verified before anyone runs it.
//!
//! Dispatch by op: elementwise ops and fused bodies ([`elementwise`]) and reductions
//! ([`reduce`]) here, row-wise normalizations in [`super::norm`], products in
//! [`super::matmul`]. Each lowering says how its arguments are laid out ([`ArgLayout`]): dim 0
//! of the arguments marked `split` is dynamic (`?`), so the JIT can run the kernel on
//! independent row blocks in parallel; the other arguments are passed whole.

use super::build::{context, Builder, Iter};
use super::scalar::Scalars;
use super::spec::KernelSpec;
use super::{attention, matmul, norm, MlirError};
use kiln_ir::{Expr, Op, ReduceOp};
use melior::ir::attribute::{StringAttribute, TypeAttribute};
use melior::ir::operation::{OperationBuilder, OperationLike};
use melior::ir::r#type::FunctionType;
use melior::ir::{Block, BlockLike, Module, Region, RegionLike, Value};
use melior::Context;
use std::cell::RefCell;
use std::rc::Rc;

/// The name of the generated function.
pub const ENTRY: &str = "kernel";

/// How one argument of the kernel function is passed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArgLayout {
    /// The memref's shape (dim 0 is the full size even when it is dynamic).
    pub shape: Vec<usize>,
    /// Dim 0 is dynamic and the caller may pass any contiguous block of rows of it.
    pub split: bool,
}

impl ArgLayout {
    /// An argument passed whole.
    pub fn whole(shape: Vec<usize>) -> Self {
        ArgLayout {
            shape,
            split: false,
        }
    }

    /// An argument whose rows (dim 0) may be passed in blocks.
    pub fn rows(shape: Vec<usize>) -> Self {
        ArgLayout { shape, split: true }
    }
}

/// A kernel's module and its arguments' layouts (the inputs, then the output).
pub struct Lowered<'c> {
    /// The verified module.
    pub module: Module<'c>,
    /// One per memref argument.
    pub args: Vec<ArgLayout>,
    /// After the memrefs, an `index` argument: the first row of the split arguments within
    /// the whole (for kernels that index whole arguments by the absolute row).
    pub first_row: bool,
}

/// The body of `@kernel`: gets the builder, the entry block and the function arguments.
pub type Body<'f, 'c> =
    dyn for<'a> FnOnce(&Builder<'c>, &'a Block<'c>, &[Value<'c, 'a>]) -> Result<(), MlirError> + 'f;

/// Wraps `body` in `func.func @kernel` over memrefs of `args` in a new module, and verifies it.
pub fn module<'c>(
    ctx: &'c Context,
    args: Vec<ArgLayout>,
    body: Box<Body<'_, 'c>>,
) -> Result<Lowered<'c>, MlirError> {
    module_with(ctx, args, false, body)
}

/// [`module`]; with `first_row`, the function also takes the first row of the split arguments
/// as a last `index` argument (see [`Lowered::first_row`]), which `body` gets last.
pub fn module_with<'c>(
    ctx: &'c Context,
    args: Vec<ArgLayout>,
    first_row: bool,
    body: Box<Body<'_, 'c>>,
) -> Result<Lowered<'c>, MlirError> {
    let b = Builder::new(ctx);
    let mut types: Vec<_> = args.iter().map(|a| b.memref(&a.shape, a.split)).collect();
    if first_row {
        types.push(melior::ir::Type::index(ctx));
    }
    let block = Block::new(&types.iter().map(|t| (*t, b.loc)).collect::<Vec<_>>());
    {
        let vals: Vec<Value<'c, '_>> = (0..types.len())
            .map(|i| block.argument(i).map(Into::into))
            .collect::<Result<_, _>>()?;
        body(&b, &block, &vals)?;
        block.append_operation(OperationBuilder::new("func.return", b.loc).build()?);
    }
    let region = Region::new();
    region.append_block(block);
    let func = melior::dialect::func::func(
        ctx,
        StringAttribute::new(ctx, ENTRY),
        TypeAttribute::new(FunctionType::new(ctx, &types, &[]).into()),
        region,
        &[],
        b.loc,
    );
    let module = Module::new(b.loc);
    module.body().append_operation(func);
    verify(ctx, &module)?;
    Ok(Lowered {
        module,
        args,
        first_row,
    })
}

/// Verifies a module, with MLIR's diagnostics in the error.
pub fn verify(ctx: &Context, module: &Module) -> Result<(), MlirError> {
    let messages = Rc::new(RefCell::new(Vec::new()));
    let sink = messages.clone();
    let id = ctx.attach_diagnostic_handler(move |d| {
        sink.borrow_mut().push(d.to_string());
        true
    });
    let ok = module.as_operation().verify();
    ctx.detach_diagnostic_handler(id);
    if ok {
        Ok(())
    } else {
        Err(MlirError::Mlir(format!(
            "the generated module does not verify: {}",
            messages.borrow().join("; ")
        )))
    }
}

/// Lowers a kernel to a verified module in `ctx`.
pub fn lower<'c>(ctx: &'c Context, spec: &KernelSpec) -> Result<Lowered<'c>, MlirError> {
    let out = spec.output_shape()?;
    let n = spec.inputs.len();
    match &spec.op {
        Op::FusedElementwise { body } => elementwise(ctx, spec, &out, body.clone()),
        op @ (Op::Unary(_) | Op::Binary(_)) => {
            let body = Expr::from_op(op, (0..n).map(Expr::Arg).collect()).ok_or_else(|| {
                MlirError::Unsupported(format!("{} with {n} operands", op.name()))
            })?;
            elementwise(ctx, spec, &out, body)
        }
        Op::Reduce { op, axes, keepdim } => reduce(ctx, &spec.inputs[0], &out, *op, axes, *keepdim),
        Op::Softmax { axis } => norm::softmax(ctx, &spec.inputs[0], *axis, false),
        Op::LogSoftmax { axis } => norm::softmax(ctx, &spec.inputs[0], *axis, true),
        Op::RmsNorm { eps } => norm::rmsnorm(ctx, &spec.inputs[0], eps.0),
        Op::LayerNorm { eps } => norm::layernorm(ctx, &spec.inputs[0], eps.0),
        Op::MatMul {
            transpose_a,
            transpose_b,
        } => matmul::matmul(ctx, spec, &out, *transpose_a, *transpose_b),
        Op::Attention {
            scale,
            causal,
            window,
        } => attention::attention(ctx, spec, (scale.0, *causal, *window)),
        op => Err(MlirError::Unsupported(format!(
            "no MLIR lowering for {}",
            op.name()
        ))),
    }
}

/// The kernel's MLIR before the lowering pipeline, as text (`kiln inspect --emit mlir`).
pub fn emit(spec: &KernelSpec) -> Result<String, MlirError> {
    let ctx = context();
    let lowered = lower(&ctx, spec)?;
    Ok(lowered.module.as_operation().to_string())
}

/// An elementwise body over broadcast operands: one all-parallel `linalg.generic`. Operands of
/// the result's shape are flattened to one dimension; others keep the result's rank with
/// broadcast axes read at index 0.
fn elementwise<'c>(
    ctx: &'c Context,
    spec: &KernelSpec,
    out: &[usize],
    body: Expr,
) -> Result<Lowered<'c>, MlirError> {
    let flat = spec.inputs.iter().all(|s| s == out);
    let out: Vec<usize> = if flat {
        vec![out.iter().product()]
    } else {
        out.to_vec()
    };
    let rank = out.len();
    let mut args = Vec::new();
    let mut maps = Vec::new();
    for s in &spec.inputs {
        let s = if flat { out.clone() } else { s.clone() };
        let lead = rank - s.len();
        let results: Vec<Option<usize>> = (0..s.len())
            .map(|k| (s[k] == out[k + lead] || out[k + lead] == 1).then_some(k + lead))
            .collect();
        let split = rank > 0 && lead == 0 && s[0] == out[0];
        maps.push(results);
        args.push(ArgLayout { shape: s, split });
    }
    args.push(ArgLayout {
        shape: out.clone(),
        split: rank > 0,
    });
    maps.push((0..rank).map(Some).collect());
    module(
        ctx,
        args,
        Box::new(move |b, block, vals| {
            let maps: Vec<_> = maps.iter().map(|m| b.map(rank, m)).collect();
            let (ins, outs) = vals.split_at(vals.len() - 1);
            b.generic(
                block,
                ins,
                outs,
                &maps,
                &vec![Iter::Parallel; rank],
                |blk, a| {
                    let s = Scalars { b, block: blk };
                    Ok(vec![s.expr(&body, &a[..a.len() - 1])?])
                },
            )
        }),
    )
}

/// A reduction over `axes`: the output filled with the identity, then one `linalg.generic` with
/// reduction loops (`mean` divides by the count afterwards).
fn reduce<'c>(
    ctx: &'c Context,
    input: &[usize],
    out: &[usize],
    op: ReduceOp,
    axes: &[usize],
    keepdim: bool,
) -> Result<Lowered<'c>, MlirError> {
    let count: usize = axes.iter().map(|&a| input[a]).product();
    if count == 0 && matches!(op, ReduceOp::Max | ReduceOp::Min) {
        return Err(MlirError::Unsupported(format!(
            "{} over an empty axis is a run-time error",
            op.name()
        )));
    }
    let rank = input.len();
    let out_map: Vec<Option<usize>> = (0..rank)
        .filter_map(|d| match (axes.contains(&d), keepdim) {
            (false, _) => Some(Some(d)),
            (true, true) => Some(None),
            (true, false) => None,
        })
        .collect();
    let iters: Vec<Iter> = (0..rank)
        .map(|d| {
            if axes.contains(&d) {
                Iter::Reduction
            } else {
                Iter::Parallel
            }
        })
        .collect();
    let out_rank = out.len();
    module(
        ctx,
        vec![
            ArgLayout::whole(input.to_vec()),
            ArgLayout::whole(out.to_vec()),
        ],
        Box::new(move |b, block, v| {
            let init = match op {
                ReduceOp::Sum | ReduceOp::Mean => 0.0,
                ReduceOp::Max => f64::NEG_INFINITY,
                ReduceOp::Min => f64::INFINITY,
            };
            b.fill(block, init, v[1])?;
            let maps = [
                b.map(rank, &(0..rank).map(Some).collect::<Vec<_>>()),
                b.map(rank, &out_map),
            ];
            b.generic(block, &v[..1], &v[1..], &maps, &iters, |blk, a| {
                let s = Scalars { b, block: blk };
                Ok(vec![match op {
                    ReduceOp::Sum | ReduceOp::Mean => s.reassoc("arith.addf", a[1], a[0])?,
                    ReduceOp::Max => s.bin("arith.maximumf", a[1], a[0])?,
                    ReduceOp::Min => s.bin("arith.minimumf", a[1], a[0])?,
                }])
            })?;
            if op == ReduceOp::Mean {
                let id = b.map(out_rank, &(0..out_rank).map(Some).collect::<Vec<_>>());
                b.generic(
                    block,
                    &[],
                    &v[1..],
                    &[id],
                    &vec![Iter::Parallel; out_rank],
                    |blk, a| {
                        let s = Scalars { b, block: blk };
                        Ok(vec![s.bin("arith.divf", a[0], s.c(count as f64)?)?])
                    },
                )?;
            }
            Ok(())
        }),
    )
}
