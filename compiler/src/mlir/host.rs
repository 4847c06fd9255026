//! The host side of a kernel lowered for the GPU ([`super::gpu`]), read as a small program: after
//! kernel outlining (index computations sunk into the kernels, affine maps lowered to `arith`),
//! `func.func @kernel` only computes grid and block sizes from its memrefs' sizes and launches
//! the outlined kernels (`gpu.launch_func`). [`HostProgram::read`] turns that function into
//! integer instructions and launches; [`HostProgram::eval`] runs it for the memrefs' concrete
//! shapes, so the CUDA backend can launch the kernels without an MLIR host runtime. Any other
//! op in the host function is [`MlirError::Unsupported`] (the caller falls back).

use super::MlirError;
use melior::ir::attribute::{DenseI32ArrayAttribute, IntegerAttribute};
use melior::ir::operation::{OperationLike, OperationRef};
use melior::ir::r#type::IntegerType;
use melior::ir::{BlockLike, RegionLike, TypeLike, Value, ValueLike};
use std::collections::HashMap;

/// An integer binary op of `arith`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BinOp {
    /// `addi`
    Add,
    /// `subi`
    Sub,
    /// `muli`
    Mul,
    /// `divsi`
    DivS,
    /// `divui`
    DivU,
    /// `remsi`
    RemS,
    /// `remui`
    RemU,
    /// `ceildivsi`
    CeilDivS,
    /// `floordivsi`
    FloorDivS,
    /// `minsi`
    MinS,
    /// `maxsi`
    MaxS,
    /// `minui`
    MinU,
    /// `maxui`
    MaxU,
}

impl BinOp {
    fn from_name(name: &str) -> Option<BinOp> {
        Some(match name {
            "arith.addi" => BinOp::Add,
            "arith.subi" => BinOp::Sub,
            "arith.muli" => BinOp::Mul,
            "arith.divsi" => BinOp::DivS,
            "arith.divui" => BinOp::DivU,
            "arith.remsi" => BinOp::RemS,
            "arith.remui" => BinOp::RemU,
            "arith.ceildivsi" => BinOp::CeilDivS,
            "arith.floordivsi" => BinOp::FloorDivS,
            "arith.minsi" => BinOp::MinS,
            "arith.maxsi" => BinOp::MaxS,
            "arith.minui" => BinOp::MinU,
            "arith.maxui" => BinOp::MaxU,
            _ => return None,
        })
    }

    fn apply(self, a: i64, b: i64) -> Option<i64> {
        let (ua, ub) = (a as u64, b as u64);
        match self {
            BinOp::Add => a.checked_add(b),
            BinOp::Sub => a.checked_sub(b),
            BinOp::Mul => a.checked_mul(b),
            BinOp::DivS => a.checked_div(b),
            BinOp::DivU => ua.checked_div(ub).map(|v| v as i64),
            BinOp::RemS => a.checked_rem(b),
            BinOp::RemU => ua.checked_rem(ub).map(|v| v as i64),
            BinOp::CeilDivS | BinOp::FloorDivS => {
                let (q, r) = (a.checked_div(b)?, a.checked_rem(b)?);
                let same_sign = (a < 0) == (b < 0);
                Some(match (r != 0, same_sign, self == BinOp::CeilDivS) {
                    (true, true, true) => q + 1,
                    (true, false, false) => q - 1,
                    _ => q,
                })
            }
            BinOp::MinS => Some(a.min(b)),
            BinOp::MaxS => Some(a.max(b)),
            BinOp::MinU => Some(ua.min(ub) as i64),
            BinOp::MaxU => Some(ua.max(ub) as i64),
        }
    }
}

/// One instruction; its result is the next value (`i64`; comparisons give 0 or 1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Instr {
    /// An integer constant.
    Const(i64),
    /// A size of a memref argument.
    Dim {
        /// The function argument.
        arg: usize,
        /// The axis.
        axis: usize,
    },
    /// A non-memref (`index`) function argument: the first row of a split kernel, 0 here.
    FirstRow,
    /// A binary op on two earlier values.
    Bin(BinOp, usize, usize),
    /// `arith.cmpi` with its predicate (0 eq, 1 ne, 2 slt, 3 sle, 4 sgt, 5 sge, 6 ult, 7 ule,
    /// 8 ugt, 9 uge).
    Cmp(i64, usize, usize),
    /// `arith.select`: condition, then, else.
    Select(usize, usize, usize),
    /// `arith.index_cast` and friends: the value unchanged.
    Copy(usize),
}

/// An argument of an outlined kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KernelOperand {
    /// Memref argument `n` of the host function.
    Memref(usize),
    /// A 64-bit integer value of the program.
    Int(usize),
}

/// One `gpu.launch_func`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostLaunch {
    /// The `gpu.module` (and `gpu.binary`) holding the kernel.
    pub module: String,
    /// The kernel's name.
    pub entry: String,
    /// The program values of the grid sizes.
    pub grid: [usize; 3],
    /// The program values of the block sizes.
    pub block: [usize; 3],
    /// The kernel's operands.
    pub args: Vec<KernelOperand>,
}

/// A host function as instructions and launches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostProgram {
    instrs: Vec<Instr>,
    /// The launches, in order.
    pub launches: Vec<HostLaunch>,
}

fn unsupported(what: String) -> MlirError {
    MlirError::Unsupported(format!("GPU host code: {what}"))
}

/// The integer constant attribute `name` of `op`.
fn int_attr(op: &OperationRef, name: &str) -> Result<i64, MlirError> {
    let a = op.attribute(name)?;
    IntegerAttribute::try_from(a)
        .map(|i| i.value())
        .map_err(|_| {
            unsupported(format!(
                "{} with a non-integer {name}",
                op.name().as_string_ref().as_str().unwrap_or("?")
            ))
        })
}

impl HostProgram {
    /// Reads `func` (the host `func.func` after the GPU pipeline).
    pub fn read(func: OperationRef) -> Result<HostProgram, MlirError> {
        let block = func
            .region(0)?
            .first_block()
            .ok_or_else(|| unsupported("an empty host function".into()))?;
        let mut p = HostProgram {
            instrs: Vec::new(),
            launches: Vec::new(),
        };
        // Program values and memref arguments, by MLIR value.
        let mut vals: HashMap<usize, usize> = HashMap::new();
        let key = |v: Value| v.to_raw().ptr as usize;
        let mut memrefs: HashMap<usize, usize> = HashMap::new();
        for i in 0..block.argument_count() {
            let a = block.argument(i)?;
            if a.r#type().is_mem_ref() {
                memrefs.insert(a.to_raw().ptr as usize, i);
            } else if a.r#type().is_index() {
                vals.insert(a.to_raw().ptr as usize, p.instrs.len());
                p.instrs.push(Instr::FirstRow);
            } else {
                return Err(unsupported(format!("argument {i} of type {}", a.r#type())));
            }
        }
        let mut op = block.first_operation();
        while let Some(o) = op {
            let name = o.name().as_string_ref().as_str().unwrap_or("").to_string();
            let operand = |i: usize| -> Result<usize, MlirError> {
                vals.get(&key(o.operand(i)?))
                    .copied()
                    .ok_or_else(|| unsupported(format!("operand {i} of {name}")))
            };
            let instr = match name.as_str() {
                "func.return" => break,
                "gpu.launch_func" => {
                    p.launches.push(launch(&o, &vals, &memrefs)?);
                    None
                }
                "arith.constant" => Some(Instr::Const(int_attr(&o, "value")?)),
                "memref.dim" => {
                    let m = o.operand(0)?;
                    let arg = *memrefs
                        .get(&key(m))
                        .ok_or_else(|| unsupported("memref.dim of a non-argument".into()))?;
                    let axis = match &p.instrs[operand(1)?] {
                        Instr::Const(a) => usize::try_from(*a)
                            .map_err(|_| unsupported(format!("memref.dim axis {a}")))?,
                        _ => return Err(unsupported("memref.dim at a computed axis".into())),
                    };
                    Some(Instr::Dim { arg, axis })
                }
                "arith.cmpi" => Some(Instr::Cmp(
                    int_attr(&o, "predicate")?,
                    operand(0)?,
                    operand(1)?,
                )),
                "arith.select" => Some(Instr::Select(operand(0)?, operand(1)?, operand(2)?)),
                "arith.index_cast" | "arith.index_castui" => Some(Instr::Copy(operand(0)?)),
                n => match BinOp::from_name(n) {
                    Some(b) => Some(Instr::Bin(b, operand(0)?, operand(1)?)),
                    None => return Err(unsupported(format!("op {n}"))),
                },
            };
            if let Some(i) = instr {
                let r: Value = o.result(0)?.into();
                if !(r.r#type().is_index() || r.r#type().is_integer()) {
                    return Err(unsupported(format!("{name} of type {}", r.r#type())));
                }
                vals.insert(key(r), p.instrs.len());
                p.instrs.push(i);
            }
            op = o.next_in_block();
        }
        Ok(p)
    }

    /// Every value of the program for memref arguments of these `shapes`.
    pub fn eval(&self, shapes: &[Vec<usize>]) -> Result<Vec<i64>, MlirError> {
        let bad = |what: String| MlirError::Arguments(format!("GPU host code: {what}"));
        let mut v: Vec<i64> = Vec::with_capacity(self.instrs.len());
        for i in &self.instrs {
            let x = match *i {
                Instr::Const(c) => c,
                Instr::FirstRow => 0,
                Instr::Dim { arg, axis } => {
                    let d = shapes
                        .get(arg)
                        .and_then(|s| s.get(axis))
                        .ok_or_else(|| bad(format!("no size {axis} of argument {arg}")))?;
                    i64::try_from(*d).map_err(|_| bad(format!("size {d}")))?
                }
                Instr::Bin(op, a, b) => op.apply(v[a], v[b]).ok_or_else(|| {
                    bad(format!(
                        "{op:?}({}, {}) overflows or divides by 0",
                        v[a], v[b]
                    ))
                })?,
                Instr::Cmp(pred, a, b) => {
                    let (x, y) = (v[a], v[b]);
                    let (ux, uy) = (x as u64, y as u64);
                    i64::from(match pred {
                        0 => x == y,
                        1 => x != y,
                        2 => x < y,
                        3 => x <= y,
                        4 => x > y,
                        5 => x >= y,
                        6 => ux < uy,
                        7 => ux <= uy,
                        8 => ux > uy,
                        9 => ux >= uy,
                        _ => return Err(bad(format!("cmpi predicate {pred}"))),
                    })
                }
                Instr::Select(c, t, e) => {
                    if v[c] != 0 {
                        v[t]
                    } else {
                        v[e]
                    }
                }
                Instr::Copy(a) => v[a],
            };
            v.push(x);
        }
        Ok(v)
    }
}

/// A `gpu.launch_func` with grid and block sizes and kernel operands only (no async tokens,
/// clusters or dynamic shared memory).
fn launch(
    o: &OperationRef,
    vals: &HashMap<usize, usize>,
    memrefs: &HashMap<usize, usize>,
) -> Result<HostLaunch, MlirError> {
    let seg = DenseI32ArrayAttribute::try_from(o.attribute("operandSegmentSizes")?)
        .map_err(|_| unsupported("gpu.launch_func without operand segments".into()))?;
    let segs: Vec<i32> = (0..seg.len())
        .map(|i| seg.element(i))
        .collect::<Result<_, _>>()?;
    // asyncDependencies, grid x y z, block x y z, cluster x y z, dynamicSharedMemorySize,
    // kernelOperands, asyncObject.
    if segs.len() != 13
        || segs[..7] != [0, 1, 1, 1, 1, 1, 1]
        || segs[7..11] != [0; 4]
        || segs[12] != 0
    {
        return Err(unsupported(format!(
            "gpu.launch_func with operand segments {segs:?}"
        )));
    }
    let key = |i: usize| -> Result<usize, MlirError> { Ok(o.operand(i)?.to_raw().ptr as usize) };
    let value = |i: usize| -> Result<usize, MlirError> {
        vals.get(&key(i)?)
            .copied()
            .ok_or_else(|| unsupported(format!("launch size {i} not computed on the host")))
    };
    let mut args = Vec::new();
    for i in 6..o.operand_count() {
        let v = o.operand(i)?;
        if let Some(&m) = memrefs.get(&key(i)?) {
            args.push(KernelOperand::Memref(m));
        } else if v.r#type().is_index()
            || IntegerType::try_from(v.r#type()).is_ok_and(|t| t.width() == 64)
        {
            args.push(KernelOperand::Int(value(i)?));
        } else {
            return Err(unsupported(format!(
                "a kernel operand of type {}",
                v.r#type()
            )));
        }
    }
    // `@module::@kernel`.
    let sym = o.attribute("kernel")?.to_string();
    let names: Vec<&str> = sym
        .split("::")
        .map(|s| s.trim().trim_start_matches('@'))
        .collect();
    let [module, entry] = names[..] else {
        return Err(unsupported(format!("kernel symbol {sym}")));
    };
    Ok(HostLaunch {
        module: module.to_string(),
        entry: entry.to_string(),
        grid: [value(0)?, value(1)?, value(2)?],
        block: [value(3)?, value(4)?, value(5)?],
        args,
    })
}

#[cfg(test)]
mod tests {
    use super::BinOp;

    #[test]
    fn divisions_round_as_arith_says() {
        // arith's documentation: ceildivsi rounds toward +inf, floordivsi toward -inf.
        for (a, b) in [(7, 2), (-7, 2), (7, -2), (-7, -2), (6, 3), (-6, 3), (0, 5)] {
            let (fa, fb) = (a as f64, b as f64);
            assert_eq!(
                BinOp::CeilDivS.apply(a, b),
                Some((fa / fb).ceil() as i64),
                "{a}/{b}"
            );
            assert_eq!(
                BinOp::FloorDivS.apply(a, b),
                Some((fa / fb).floor() as i64),
                "{a}/{b}"
            );
            assert_eq!(
                BinOp::DivS.apply(a, b),
                Some((fa / fb).trunc() as i64),
                "{a}/{b}"
            );
        }
        assert_eq!(BinOp::DivS.apply(1, 0), None);
    }
}
