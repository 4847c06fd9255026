//! Explicit loops for the kernels that are not one structured op: `scf.for` with carried
//! values (reductions kept in registers), `scf.parallel` over independent rows (sequential on
//! the CPU, where the JIT splits rows across threads; mapped to GPU threads by the GPU
//! pipeline), and index arithmetic and memory access inside them ([`Ix`]).

use super::build::Builder;
use super::scalar::Scalars;
use super::MlirError;
use melior::ir::attribute::DenseI32ArrayAttribute;
use melior::ir::operation::OperationBuilder;
use melior::ir::r#type::Type;
use melior::ir::{Block, BlockLike, Region, RegionLike, Value, ValueLike};

type V<'c, 'a> = Value<'c, 'a>;

/// `scf.for %iv = lo to hi iter_args(inits)` appended to `block`: `body` gets the loop's block,
/// the induction variable and the carried values and returns the values to carry on; the
/// loop's results are returned.
pub fn for_loop<'c, 'a>(
    b: &Builder<'c>,
    block: &'a Block<'c>,
    (lo, hi): (V<'c, '_>, V<'c, '_>),
    inits: &[V<'c, '_>],
    body: impl for<'i> FnOnce(
        &'i Block<'c>,
        V<'c, 'i>,
        &[V<'c, 'i>],
    ) -> Result<Vec<V<'c, 'i>>, MlirError>,
) -> Result<Vec<V<'c, 'a>>, MlirError> {
    let index = Type::index(b.ctx);
    let one = b.int_const(block, index, 1)?;
    let types: Vec<Type<'c>> = inits.iter().map(|v| v.r#type()).collect();
    let mut args = vec![(index, b.loc)];
    args.extend(types.iter().map(|t| (*t, b.loc)));
    let inner = Block::new(&args);
    {
        let iv: V<'c, '_> = inner.argument(0)?.into();
        let carried: Vec<V<'c, '_>> = (1..args.len())
            .map(|i| inner.argument(i).map(Into::into))
            .collect::<Result<_, _>>()?;
        let next = body(&inner, iv, &carried)?;
        inner.append_operation(
            OperationBuilder::new("scf.yield", b.loc)
                .add_operands(&next)
                .build()?,
        );
    }
    let region = Region::new();
    region.append_block(inner);
    let op = OperationBuilder::new("scf.for", b.loc)
        .add_operands(&[lo, hi, one])
        .add_operands(inits)
        .add_results(&types)
        .add_regions([region])
        .build()?;
    let op = block.append_operation(op);
    (0..types.len())
        .map(|i| op.result(i).map(Into::into).map_err(MlirError::from))
        .collect()
}

/// Index arithmetic and memory access in one block.
pub struct Ix<'b, 'c, 'a> {
    /// The builder.
    pub b: &'b Builder<'c>,
    /// The block receiving the ops.
    pub block: &'a Block<'c>,
}

impl<'c, 'a> Ix<'_, 'c, 'a> {
    /// An `index` constant.
    pub fn c(&self, v: i64) -> Result<V<'c, 'a>, MlirError> {
        self.b.int_const(self.block, Type::index(self.b.ctx), v)
    }

    /// A binary op on two values of one type (`arith.addi`, ...).
    pub fn op(&self, name: &str, x: V<'c, '_>, y: V<'c, '_>) -> Result<V<'c, 'a>, MlirError> {
        self.b.op(self.block, name, &[x, y], None, &[])
    }

    /// `memref.load` of an f32.
    pub fn load(&self, mem: V<'c, '_>, at: &[V<'c, '_>]) -> Result<V<'c, 'a>, MlirError> {
        let mut operands = vec![mem];
        operands.extend_from_slice(at);
        self.b.op(
            self.block,
            "memref.load",
            &operands,
            Some(self.b.f32()),
            &[],
        )
    }

    /// `memref.store`.
    pub fn store(&self, x: V<'c, '_>, mem: V<'c, '_>, at: &[V<'c, '_>]) -> Result<(), MlirError> {
        let mut operands = vec![x, mem];
        operands.extend_from_slice(at);
        self.block.append_operation(
            OperationBuilder::new("memref.store", self.b.loc)
                .add_operands(&operands)
                .build()?,
        );
        Ok(())
    }

    /// Scalar f32 code in the same block.
    pub fn scalars(&self) -> Scalars<'_, 'c, 'a> {
        Scalars::new(self.b, self.block)
    }
}

/// `scf.parallel (%r) = (0) to (rows)` appended to `block`: `body` gets the loop's block and
/// the row.
pub fn parallel_rows<'c>(
    b: &Builder<'c>,
    block: &Block<'c>,
    rows: V<'c, '_>,
    body: impl for<'i> FnOnce(&'i Block<'c>, V<'c, 'i>) -> Result<(), MlirError>,
) -> Result<(), MlirError> {
    let index = Type::index(b.ctx);
    let zero = b.int_const(block, index, 0)?;
    let one = b.int_const(block, index, 1)?;
    let inner = Block::new(&[(index, b.loc)]);
    {
        let r: V<'c, '_> = inner.argument(0)?.into();
        body(&inner, r)?;
        inner.append_operation(OperationBuilder::new("scf.reduce", b.loc).build()?);
    }
    let region = Region::new();
    region.append_block(inner);
    let op = OperationBuilder::new("scf.parallel", b.loc)
        .add_operands(&[zero, rows, one])
        .add_attributes(&[(
            b.id("operandSegmentSizes"),
            DenseI32ArrayAttribute::new(b.ctx, &[1, 1, 1, 0]).into(),
        )])
        .add_regions([region])
        .build()?;
    block.append_operation(op);
    Ok(())
}
