//! Builder helpers over melior: the context with every dialect registered, f32/memref types,
//! affine maps as attributes, and the structured ops every lowering uses (`linalg.generic`,
//! `linalg.fill` and the named contractions), all through melior's operation builders.

use super::MlirError;
use melior::dialect::{arith, DialectRegistry};
use melior::ir::attribute::{
    ArrayAttribute, DenseI32ArrayAttribute, FloatAttribute, IntegerAttribute,
};
use melior::ir::operation::{OperationBuilder, OperationLike};
use melior::ir::r#type::{IntegerType, MemRefType};
use melior::ir::{
    AffineExpr, AffineMap, Attribute, Block, BlockLike, Identifier, Location, Region, RegionLike,
    Type, Value,
};
use melior::utility::{register_all_dialects, register_all_llvm_translations, register_all_passes};
use melior::Context;

/// A context with every upstream dialect, pass and LLVM translation registered.
pub fn context() -> Context {
    let registry = DialectRegistry::new();
    register_all_dialects(&registry);
    register_all_passes();
    let ctx = Context::new();
    ctx.append_dialect_registry(&registry);
    ctx.load_all_available_dialects();
    register_all_llvm_translations(&ctx);
    ctx
}

/// How a loop of a structured op iterates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Iter {
    /// Independent iterations.
    Parallel,
    /// Iterations combined into the output.
    Reduction,
}

/// Types, attributes and ops in one context at one (unknown) location.
pub struct Builder<'c> {
    /// The context everything is built in.
    pub ctx: &'c Context,
    /// The location every op gets.
    pub loc: Location<'c>,
}

impl<'c> Builder<'c> {
    /// A builder on `ctx`.
    pub fn new(ctx: &'c Context) -> Self {
        Builder {
            ctx,
            loc: Location::unknown(ctx),
        }
    }

    /// `f32`.
    pub fn f32(&self) -> Type<'c> {
        Type::float32(self.ctx)
    }

    /// `i1`.
    pub fn i1(&self) -> Type<'c> {
        IntegerType::new(self.ctx, 1).into()
    }

    /// `i32`.
    pub fn i32(&self) -> Type<'c> {
        IntegerType::new(self.ctx, 32).into()
    }

    /// A contiguous f32 memref of these sizes (`None`: dynamic, `?`).
    pub fn memref(&self, dims: &[Option<usize>]) -> Type<'c> {
        let dims: Vec<i64> = dims
            .iter()
            .map(|d| d.map_or(i64::MIN, |n| n as i64)) // i64::MIN is ShapedType::kDynamic
            .collect();
        MemRefType::new(self.f32(), &dims, None, None).into()
    }

    /// An f32 memref of these sizes read through run-time strides and offset, the last axis
    /// contiguous (`strided<[?, ..., 1], offset: ?>`).
    pub fn strided_memref(&self, dims: &[Option<usize>]) -> Result<Type<'c>, MlirError> {
        let mut strides = vec!["?"; dims.len()];
        if let Some(last) = strides.last_mut() {
            *last = "1";
        }
        let layout = self.attr(&format!("strided<[{}], offset: ?>", strides.join(", ")))?;
        let dims: Vec<i64> = dims
            .iter()
            .map(|d| d.map_or(i64::MIN, |n| n as i64))
            .collect();
        Ok(MemRefType::new(self.f32(), &dims, Some(layout), None).into())
    }

    /// `memref.dim %mem, axis` (an `index`).
    pub fn dim<'a>(
        &self,
        block: &'a Block<'c>,
        mem: Value<'c, '_>,
        axis: usize,
    ) -> Result<Value<'c, 'a>, MlirError> {
        let index = Type::index(self.ctx);
        let at = self.int_const(block, index, axis as i64)?;
        self.op(block, "memref.dim", &[mem, at], Some(index), &[])
    }

    /// An affine map over `dims` loop dimensions; `None` results are the constant 0 (a
    /// broadcast axis).
    pub fn map(&self, dims: usize, results: &[Option<usize>]) -> AffineMap<'c> {
        let exprs: Vec<AffineExpr<'c>> = results
            .iter()
            .map(|r| match r {
                Some(d) => AffineExpr::dim(self.ctx, *d),
                None => AffineExpr::constant(self.ctx, 0),
            })
            .collect();
        AffineMap::new(self.ctx, dims, 0, &exprs)
    }

    /// An affine map as an attribute (`affine_map<...>`).
    pub fn map_attr(&self, map: AffineMap<'c>) -> Attribute<'c> {
        // SAFETY: `mlirAffineMapAttrGet` wraps a valid affine map of this context in an
        // attribute owned by the same context; `from_raw` takes that non-null attribute.
        unsafe { Attribute::from_raw(mlir_sys::mlirAffineMapAttrGet(map.to_raw())) }
    }

    /// A parsed attribute (dialect enum attributes, which have no C builder).
    pub fn attr(&self, text: &str) -> Result<Attribute<'c>, MlirError> {
        Attribute::parse(self.ctx, text)
            .ok_or_else(|| MlirError::Mlir(format!("attribute {text} did not parse")))
    }

    /// An identifier.
    pub fn id(&self, name: &str) -> Identifier<'c> {
        Identifier::new(self.ctx, name)
    }

    /// Appends `name(operands)` with inferred result type (or `result` when given) and returns
    /// its first result.
    pub fn op<'a>(
        &self,
        block: &'a Block<'c>,
        name: &str,
        operands: &[Value<'c, '_>],
        result: Option<Type<'c>>,
        attrs: &[(&str, Attribute<'c>)],
    ) -> Result<Value<'c, 'a>, MlirError> {
        let attrs: Vec<(Identifier<'c>, Attribute<'c>)> =
            attrs.iter().map(|(n, a)| (self.id(n), *a)).collect();
        let b = OperationBuilder::new(name, self.loc)
            .add_operands(operands)
            .add_attributes(&attrs);
        let b = match result {
            Some(t) => b.add_results(&[t]),
            None => b.enable_result_type_inference(),
        };
        let op = block.append_operation(b.build()?);
        Ok(op.result(0)?.into())
    }

    /// An f32 constant.
    pub fn f32_const<'a>(&self, block: &'a Block<'c>, v: f64) -> Result<Value<'c, 'a>, MlirError> {
        let attr = FloatAttribute::new(self.ctx, self.f32(), v).into();
        Ok(block
            .append_operation(arith::constant(self.ctx, attr, self.loc))
            .result(0)?
            .into())
    }

    /// An integer constant of type `ty`.
    pub fn int_const<'a>(
        &self,
        block: &'a Block<'c>,
        ty: Type<'c>,
        v: i64,
    ) -> Result<Value<'c, 'a>, MlirError> {
        let attr = IntegerAttribute::new(ty, v).into();
        Ok(block
            .append_operation(arith::constant(self.ctx, attr, self.loc))
            .result(0)?
            .into())
    }

    /// The `linalg` structured-op attributes shared by generic and named ops.
    fn segments(&self, ins: usize, outs: usize) -> (Identifier<'c>, Attribute<'c>) {
        (
            self.id("operandSegmentSizes"),
            DenseI32ArrayAttribute::new(self.ctx, &[ins as i32, outs as i32]).into(),
        )
    }

    /// Appends a `linalg.generic` on memrefs: `maps` for the inputs then the outputs, loop
    /// kinds `iters`; `body` gets the block and its arguments (one f32 element per input, then
    /// per output) and returns the yielded values (one per output).
    pub fn generic(
        &self,
        block: &Block<'c>,
        ins: &[Value<'c, '_>],
        outs: &[Value<'c, '_>],
        maps: &[AffineMap<'c>],
        iters: &[Iter],
        body: impl for<'a> FnOnce(
            &'a Block<'c>,
            &[Value<'c, 'a>],
        ) -> Result<Vec<Value<'c, 'a>>, MlirError>,
    ) -> Result<(), MlirError> {
        let n = ins.len() + outs.len();
        let inner = Block::new(&vec![(self.f32(), self.loc); n]);
        {
            let args: Vec<Value<'c, '_>> = (0..n)
                .map(|i| inner.argument(i).map(Into::into))
                .collect::<Result<_, _>>()?;
            let yielded = body(&inner, &args)?;
            inner.append_operation(
                OperationBuilder::new("linalg.yield", self.loc)
                    .add_operands(&yielded)
                    .build()?,
            );
        }
        let region = Region::new();
        region.append_block(inner);
        let maps: Vec<Attribute<'c>> = maps.iter().map(|m| self.map_attr(*m)).collect();
        let iters: Vec<Attribute<'c>> = iters
            .iter()
            .map(|i| {
                self.attr(match i {
                    Iter::Parallel => "#linalg.iterator_type<parallel>",
                    Iter::Reduction => "#linalg.iterator_type<reduction>",
                })
            })
            .collect::<Result<_, _>>()?;
        let op = OperationBuilder::new("linalg.generic", self.loc)
            .add_operands(ins)
            .add_operands(outs)
            .add_attributes(&[
                (
                    self.id("indexing_maps"),
                    ArrayAttribute::new(self.ctx, &maps).into(),
                ),
                (
                    self.id("iterator_types"),
                    ArrayAttribute::new(self.ctx, &iters).into(),
                ),
                self.segments(ins.len(), outs.len()),
            ])
            .add_regions([region])
            .build()?;
        block.append_operation(op);
        Ok(())
    }

    /// Appends a named `linalg` op (`linalg.fill`, `linalg.matmul`, ...) on memrefs, its body
    /// filled in by MLIR's own region builder for that op.
    pub fn named(
        &self,
        block: &Block<'c>,
        name: &str,
        ins: &[Value<'c, '_>],
        outs: &[Value<'c, '_>],
    ) -> Result<(), MlirError> {
        let op = OperationBuilder::new(name, self.loc)
            .add_operands(ins)
            .add_operands(outs)
            .add_attributes(&[self.segments(ins.len(), outs.len())])
            .add_regions([Region::new()])
            .build()?;
        // SAFETY: `op` is a live operation of this context and one of linalg's builtin named
        // ops (the callers pass only such names) with its one empty region, which is what
        // `mlirLinalgFillBuiltinNamedOpRegion` requires.
        unsafe { mlir_sys::mlirLinalgFillBuiltinNamedOpRegion(op.to_raw()) };
        block.append_operation(op);
        Ok(())
    }

    /// `linalg.fill` of `out` with the f32 constant `v`.
    pub fn fill(&self, block: &Block<'c>, v: f64, out: Value<'c, '_>) -> Result<(), MlirError> {
        let c = self.f32_const(block, v)?;
        self.named(block, "linalg.fill", &[c], &[out])
    }
}
