//! One kernel as MLIR: a module holding `func.func @kernel(%in0, ..., %out)` on contiguous f32
//! memrefs, built from `linalg` structured ops, and verified before anyone runs it.
//!
//! Dispatch by op: elementwise ops and fused bodies ([`elementwise`]) and reductions
//! ([`reduce`]) here, row-wise normalizations in [`super::norm`], products in
//! [`super::matmul`], attention in [`super::attention`]. A lowering reads only its
//! [`KernelKey`]: the memref arguments' fixed sizes (the others are dynamic, read with
//! `memref.dim`) and the key's params, so one kernel serves every shape with that key. Dim 0
//! of the arguments marked `split` is dynamic, so the JIT can run the kernel on independent row
//! blocks in parallel; the other arguments are passed whole.

use super::build::{context, Builder, Iter};
use super::scalar::Scalars;
use super::spec::{ArgType, KernelKey, KernelSpec, Layout};
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

/// A kernel's verified module.
pub struct Lowered<'c> {
    /// The verified module.
    pub module: Module<'c>,
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
    args: &[ArgType],
    body: Box<Body<'_, 'c>>,
) -> Result<Lowered<'c>, MlirError> {
    module_with(ctx, args, false, body)
}

/// [`module`]; with `first_row`, the function also takes the first row of the split arguments
/// as a last `index` argument (see [`Lowered::first_row`]), which `body` gets last.
pub fn module_with<'c>(
    ctx: &'c Context,
    args: &[ArgType],
    first_row: bool,
    body: Box<Body<'_, 'c>>,
) -> Result<Lowered<'c>, MlirError> {
    let b = Builder::new(ctx);
    let mut types = args
        .iter()
        .map(|a| {
            if a.strided {
                b.strided_memref(&a.dims)
            } else {
                Ok(b.memref(&a.dims))
            }
        })
        .collect::<Result<Vec<_>, _>>()?;
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
    Ok(Lowered { module, first_row })
}

/// Verifies a module, with MLIR's diagnostics in the error.
pub fn verify(ctx: &Context, module: &Module) -> Result<(), MlirError> {
    let (ok, messages) = diagnosed(ctx, || module.as_operation().verify());
    if ok {
        Ok(())
    } else {
        Err(MlirError::Mlir(format!(
            "the generated module does not verify: {}",
            messages.join("; ")
        )))
    }
}

/// Runs `f` with `ctx`'s diagnostics collected (instead of printed to stderr).
pub fn diagnosed<T>(ctx: &Context, f: impl FnOnce() -> T) -> (T, Vec<String>) {
    let messages = Rc::new(RefCell::new(Vec::new()));
    let sink = messages.clone();
    let id = ctx.attach_diagnostic_handler(move |d| {
        sink.borrow_mut().push(d.to_string());
        true
    });
    let out = f();
    ctx.detach_diagnostic_handler(id);
    let messages = messages.borrow().clone();
    (out, messages)
}

/// The fixed size of axis `axis` of argument `arg` of `key` (a bug if the layout left it
/// dynamic).
pub fn fixed(key: &KernelKey, arg: usize, axis: usize) -> Result<usize, MlirError> {
    key.args[arg].dims[axis].ok_or_else(|| {
        MlirError::Mlir(format!(
            "{}: axis {axis} of argument {arg} is not fixed",
            key.op.name()
        ))
    })
}

/// What a kernel is lowered for: a lowering may pick its loop structure per target (the CPU's
/// register-tiled products and key-tiled attention; the GPU pipeline maps `linalg` and
/// parallel loops to threads).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// The host CPU (JIT).
    Cpu,
    /// NVIDIA GPUs (PTX).
    Gpu,
}

/// Lowers a kernel to a verified module in `ctx` for `target`.
pub fn lower<'c>(
    ctx: &'c Context,
    key: &KernelKey,
    target: Target,
) -> Result<Lowered<'c>, MlirError> {
    let n = key.args.len() - 1;
    match &key.op {
        Op::FusedElementwise { body } => elementwise(ctx, key, body.clone()),
        op @ (Op::Unary(_) | Op::Binary(_)) => {
            let body = Expr::from_op(op, (0..n).map(Expr::Arg).collect()).ok_or_else(|| {
                MlirError::Unsupported(format!("{} with {n} operands", op.name()))
            })?;
            elementwise(ctx, key, body)
        }
        Op::Reduce { op, axes, keepdim } => reduce(ctx, key, *op, axes, *keepdim),
        Op::Softmax { .. } => norm::softmax(ctx, key, false),
        Op::LogSoftmax { .. } => norm::softmax(ctx, key, true),
        Op::RmsNorm { eps } => norm::rmsnorm(ctx, key, eps.0),
        Op::LayerNorm { eps } => norm::layernorm(ctx, key, eps.0),
        Op::MatMul {
            transpose_a,
            transpose_b,
        } => matmul::matmul(ctx, key, *transpose_a, *transpose_b, target),
        Op::Attention {
            scale,
            causal,
            window,
            merge_heads: false,
        } => attention::attention(ctx, key, (scale.0, *causal, *window), target),
        op => Err(MlirError::Unsupported(format!(
            "no MLIR lowering for {}",
            op.name()
        ))),
    }
}

/// The kernel's MLIR before the lowering pipeline, as text (`kiln inspect --emit mlir`).
pub fn emit(spec: &KernelSpec) -> Result<String, MlirError> {
    let ctx = context();
    let lowered = lower(&ctx, &spec.key()?, Target::Cpu)?;
    Ok(lowered.module.as_operation().to_string())
}

/// The layout of an elementwise body over broadcast operands: operands of the result's shape
/// are flattened to one dimension; others keep the result's rank, a broadcast axis fixed at
/// size 1. Every other size is dynamic.
pub fn elementwise_layout(inputs: &[&[usize]], out: &[usize]) -> Layout {
    let mut l = Layout::new(Vec::new());
    if inputs.iter().all(|s| *s == out) {
        let n = out.iter().product();
        for _ in 0..=inputs.len() {
            l.arg(vec![n], &[false], true);
        }
        return l;
    }
    let rank = out.len();
    for s in inputs {
        let lead = rank - s.len();
        let broadcast: Vec<bool> = (0..s.len())
            .map(|k| s[k] == 1 && out[k + lead] != 1)
            .collect();
        let split = rank > 0 && lead == 0 && !broadcast[0];
        l.arg(s.to_vec(), &broadcast, split);
    }
    l.arg(out.to_vec(), &vec![false; rank], rank > 0);
    l
}

/// An elementwise body over broadcast operands (see [`elementwise_layout`]): one
/// all-parallel `linalg.generic`, broadcast axes read at index 0.
fn elementwise<'c>(
    ctx: &'c Context,
    key: &KernelKey,
    body: Expr,
) -> Result<Lowered<'c>, MlirError> {
    let (ins, out) = key.args.split_at(key.args.len() - 1);
    let rank = out[0].dims.len();
    let mut maps: Vec<Vec<Option<usize>>> = ins
        .iter()
        .map(|a| {
            let lead = rank - a.dims.len();
            (0..a.dims.len())
                .map(|k| a.dims[k].is_none().then_some(k + lead))
                .collect()
        })
        .collect();
    maps.push((0..rank).map(Some).collect());
    module(
        ctx,
        &key.args,
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
                    let s = Scalars::new(b, blk);
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
    key: &KernelKey,
    op: ReduceOp,
    axes: &[usize],
    keepdim: bool,
) -> Result<Lowered<'c>, MlirError> {
    let shape = |a: usize| -> Result<Vec<usize>, MlirError> {
        (0..key.args[a].dims.len())
            .map(|k| fixed(key, a, k))
            .collect()
    };
    let (input, out) = (shape(0)?, shape(1)?);
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
        &key.args,
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
                let s = Scalars::new(b, blk);
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
                        let s = Scalars::new(b, blk);
                        Ok(vec![s.bin("arith.divf", a[0], s.c(count as f64)?)?])
                    },
                )?;
            }
            Ok(())
        }),
    )
}
