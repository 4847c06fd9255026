//! Scalar code inside `linalg.generic` bodies: a fused elementwise [`Expr`] as `arith`/`math`
//! ops on f32 (and i1 for comparisons), following each primitive op's formula in
//! [`kiln_ir::UnaryOp::eval`] and friends.
//!
//! `exp` (and with it sigmoid, SiLU and softmax) is a Cephes-style polynomial built from `arith`
//! ops only, so LLVM can vectorize it (MLIR's `math.exp` becomes a scalar `expf` call) and the
//! GPU path needs no libdevice for it: range reduction
//! `x = n·ln2 + r` (`n` rounded by the 1.5·2^23 trick), a degree-6 polynomial for `e^r` in
//! fused multiply-adds (about 1 ulp), and `2^n` applied as two exponent-field factors so that
//! results in the subnormal range round once. Other
//! transcendental functions use `math` ops, which become libm calls.
//!
//! The same code works on `vector<Nxf32>` values ([`Scalars::vector`]: constants are splats,
//! comparisons give `vector<Nxi1>`), for the kernels that vectorize explicitly.

use super::build::Builder;
use super::MlirError;
use kiln_ir::{BinaryOp, CmpOp, DType, Expr, Scalar, UnaryOp};
use melior::dialect::arith::{self, CmpfPredicate};
use melior::ir::{Block, BlockLike, Type, Value};

/// Emits scalar ops (or the same ops on vectors of `lanes` elements) into one block.
pub struct Scalars<'b, 'c, 'a> {
    /// The builder.
    pub b: &'b Builder<'c>,
    /// The block receiving the ops.
    pub block: &'a Block<'c>,
    /// 1 for scalars, else the lanes of the vectors operated on.
    lanes: usize,
}

type V<'c, 'a> = Value<'c, 'a>;

impl<'b, 'c, 'a> Scalars<'b, 'c, 'a> {
    /// Scalar ops in `block`.
    pub fn new(b: &'b Builder<'c>, block: &'a Block<'c>) -> Self {
        Scalars { b, block, lanes: 1 }
    }

    /// The same ops on `vector<lanes x ...>` values in `block`.
    pub fn vector(b: &'b Builder<'c>, block: &'a Block<'c>, lanes: usize) -> Self {
        Scalars { b, block, lanes }
    }

    /// `elem` (`f32`, `i32`, `i1`), or a vector of it when vectorized.
    fn of(&self, elem: &str) -> Result<Type<'c>, MlirError> {
        let text = if self.lanes == 1 {
            elem.to_string()
        } else {
            format!("vector<{}x{elem}>", self.lanes)
        };
        Type::parse(self.b.ctx, &text).ok_or_else(|| MlirError::Mlir(format!("type {text}")))
    }

    /// The value type: f32 or its vector.
    pub fn ty(&self) -> Result<Type<'c>, MlirError> {
        self.of("f32")
    }

    /// A vector constant of element type `elem`, every lane `value`.
    fn splat(&self, elem: &str, value: &str) -> Result<V<'c, 'a>, MlirError> {
        let ty = self.of(elem)?;
        let value = self
            .b
            .attr(&format!("dense<{value}> : vector<{}x{elem}>", self.lanes))?;
        self.b.op(
            self.block,
            "arith.constant",
            &[],
            Some(ty),
            &[("value", value)],
        )
    }

    /// An f32 constant (a splat when vectorized).
    pub fn c(&self, v: f64) -> Result<V<'c, 'a>, MlirError> {
        if self.lanes == 1 {
            return self.b.f32_const(self.block, v);
        }
        // The f32's bits in hex: exact, and it spells infinities too.
        self.splat("f32", &format!("0x{:08X}", (v as f32).to_bits()))
    }

    /// An integer constant of type `elem` (a splat when vectorized).
    fn int(&self, elem: &str, v: i64) -> Result<V<'c, 'a>, MlirError> {
        if self.lanes == 1 {
            return self.b.int_const(self.block, self.of(elem)?, v);
        }
        if elem == "i1" {
            return self.splat(elem, if v != 0 { "true" } else { "false" });
        }
        self.splat(elem, &v.to_string())
    }

    /// A same-typed binary op such as `arith.addf`.
    pub fn bin(&self, name: &str, x: V<'c, '_>, y: V<'c, '_>) -> Result<V<'c, 'a>, MlirError> {
        self.b.op(self.block, name, &[x, y], None, &[])
    }

    /// A unary op such as `math.sqrt`.
    pub fn un(&self, name: &str, x: V<'c, '_>) -> Result<V<'c, 'a>, MlirError> {
        self.b.op(self.block, name, &[x], None, &[])
    }

    /// `x + y`, `x * y`, ... with reassociation allowed (reduction accumulators, so LLVM can
    /// vectorize the reduction loop).
    pub fn reassoc(&self, name: &str, x: V<'c, '_>, y: V<'c, '_>) -> Result<V<'c, 'a>, MlirError> {
        let fm = self.b.attr("#arith.fastmath<reassoc>")?;
        self.b
            .op(self.block, name, &[x, y], None, &[("fastmath", fm)])
    }

    /// `arith.cmpf`.
    pub fn cmp(
        &self,
        p: CmpfPredicate,
        x: V<'c, '_>,
        y: V<'c, '_>,
    ) -> Result<V<'c, 'a>, MlirError> {
        Ok(self
            .block
            .append_operation(arith::cmpf(self.b.ctx, p, x, y, self.b.loc))
            .result(0)?
            .into())
    }

    /// `arith.select`.
    pub fn select(&self, c: V<'c, '_>, x: V<'c, '_>, y: V<'c, '_>) -> Result<V<'c, 'a>, MlirError> {
        Ok(self
            .block
            .append_operation(arith::select(c, x, y, self.b.loc))
            .result(0)?
            .into())
    }

    /// `1 / x`.
    pub fn recip(&self, x: V<'c, '_>) -> Result<V<'c, 'a>, MlirError> {
        let one = self.c(1.0)?;
        self.bin("arith.divf", one, x)
    }

    /// `a · b + c` with one rounding (`math.fma`, a hardware FMA on the targets here).
    pub fn fma(&self, a: V<'c, '_>, b: V<'c, '_>, c: V<'c, '_>) -> Result<V<'c, 'a>, MlirError> {
        self.b.op(self.block, "math.fma", &[a, b, c], None, &[])
    }

    /// `e^x` as a vectorizable polynomial (see the module doc).
    pub fn exp(&self, x: V<'c, '_>) -> Result<V<'c, 'a>, MlirError> {
        let b = self.b;
        // Below -103.97 e^x rounds to 0 in f32; above 88.73 it overflows, and clamping at 89
        // (not at the bound) keeps that: 2^n with n = 129 overflows the product to +inf. NaN
        // passes through the clamps (`maximumf`/`minimumf` propagate it) and the float path.
        let xc = self.bin("arith.maximumf", x, self.c(-103.972_077_083_991_8)?)?;
        let xc = self.bin("arith.minimumf", xc, self.c(89.0)?)?;
        // n = round(x·log2 e) by adding 1.5·2^23 (whose ulp is 1) plus both exponent biases
        // (254): t's low mantissa bits hold n + 254 (104..=383 here), n = t - that sum.
        let magic = self.c(12_582_912.0)?;
        let biased = self.c(12_582_912.0 + 254.0)?;
        let t = self.fma(xc, self.c(std::f64::consts::LOG2_E)?, biased)?;
        let i32t = self.of("i32")?;
        let bits = |v| b.op(self.block, "arith.bitcast", &[v], Some(i32t), &[]);
        let e = self.bin("arith.subi", bits(t)?, bits(magic)?)?;
        let n = self.bin("arith.subf", t, biased)?;
        // r = x - n·ln2, ln2 split in two so n·C1 is exact.
        let r = self.fma(n, self.c(-0.693_359_375)?, xc)?;
        let r = self.fma(n, self.c(2.121_944_400_546_905_8e-4)?, r)?;
        let mut p = self.c(1.987_569_150_0e-4)?;
        for k in [
            1.398_199_950_7e-3,
            8.333_451_907_3e-3,
            4.166_579_589_4e-2,
            1.666_666_545_9e-1,
            5.000_000_120_1e-1,
        ] {
            p = self.fma(p, r, self.c(k)?)?;
        }
        let z = self.bin("arith.mulf", r, r)?;
        let y = self.fma(p, z, r)?;
        let y = self.bin("arith.addf", y, self.c(1.0)?)?;
        // 2^n as two normal factors 2^(e1 - 127) · 2^(e2 - 127), e1 + e2 = n + 254 (each
        // biased exponent within 52..=192), so subnormal results round once.
        let e1 = self.bin("arith.shrsi", e, self.int("i32", 1)?)?;
        let e2 = self.bin("arith.subi", e, e1)?;
        let shift = self.int("i32", 23)?;
        let mut out = y;
        for e in [e1, e2] {
            let bits = self.bin("arith.shli", e, shift)?;
            let scale = b.op(self.block, "arith.bitcast", &[bits], Some(self.ty()?), &[])?;
            out = self.bin("arith.mulf", out, scale)?;
        }
        Ok(out)
    }

    /// `1 / (1 + e^-x)`.
    fn sigmoid(&self, x: V<'c, '_>) -> Result<V<'c, 'a>, MlirError> {
        let e = self.exp(self.un("arith.negf", x)?)?;
        self.recip(self.bin("arith.addf", self.c(1.0)?, e)?)
    }

    /// A unary op on f32 (`not` on i1).
    pub fn unary(&self, u: UnaryOp, x: V<'c, '_>) -> Result<V<'c, 'a>, MlirError> {
        Ok(match u {
            UnaryOp::Neg => self.un("arith.negf", x)?,
            UnaryOp::Exp => self.exp(x)?,
            UnaryOp::Log => self.un("math.log", x)?,
            UnaryOp::Sqrt => self.un("math.sqrt", x)?,
            UnaryOp::Rsqrt => self.recip(self.un("math.sqrt", x)?)?,
            UnaryOp::Tanh => self.un("math.tanh", x)?,
            UnaryOp::Erf => self.un("math.erf", x)?,
            UnaryOp::Sigmoid => self.sigmoid(x)?,
            UnaryOp::Relu => {
                let neg = self.cmp(CmpfPredicate::Olt, x, self.c(0.0)?)?;
                self.select(neg, self.c(0.0)?, x)?
            }
            UnaryOp::Gelu => {
                let s = self.bin("arith.mulf", x, self.c(std::f64::consts::FRAC_1_SQRT_2)?)?;
                let e = self.bin("arith.addf", self.c(1.0)?, self.un("math.erf", s)?)?;
                self.bin("arith.mulf", self.bin("arith.mulf", x, self.c(0.5)?)?, e)?
            }
            UnaryOp::GeluTanh => {
                let k = (2.0 / std::f64::consts::PI).sqrt();
                let x3 = self.bin("arith.mulf", self.bin("arith.mulf", x, x)?, x)?;
                let inner = self.bin(
                    "arith.addf",
                    x,
                    self.bin("arith.mulf", x3, self.c(0.044715)?)?,
                )?;
                let t = self.un("math.tanh", self.bin("arith.mulf", inner, self.c(k)?)?)?;
                let e = self.bin("arith.addf", self.c(1.0)?, t)?;
                self.bin("arith.mulf", self.bin("arith.mulf", x, self.c(0.5)?)?, e)?
            }
            UnaryOp::Silu => {
                let e = self.exp(self.un("arith.negf", x)?)?;
                self.bin("arith.divf", x, self.bin("arith.addf", self.c(1.0)?, e)?)?
            }
            UnaryOp::Sin => self.un("math.sin", x)?,
            UnaryOp::Cos => self.un("math.cos", x)?,
            UnaryOp::Recip => self.recip(x)?,
            UnaryOp::Abs => self.un("math.absf", x)?,
            UnaryOp::Not => {
                let t = self.int("i1", 1)?;
                self.bin("arith.xori", x, t)?
            }
        })
    }

    /// A binary op on f32 (`and`/`or` on i1).
    pub fn binary(&self, op: BinaryOp, x: V<'c, '_>, y: V<'c, '_>) -> Result<V<'c, 'a>, MlirError> {
        let name = match op {
            BinaryOp::Add => "arith.addf",
            BinaryOp::Sub => "arith.subf",
            BinaryOp::Mul => "arith.mulf",
            BinaryOp::Div => "arith.divf",
            BinaryOp::Pow => "math.powf",
            BinaryOp::Max => "arith.maximumf",
            BinaryOp::Min => "arith.minimumf",
            BinaryOp::And => "arith.andi",
            BinaryOp::Or => "arith.ori",
        };
        self.bin(name, x, y)
    }

    /// A fused elementwise body over the block arguments `args` (f32 operands).
    pub fn expr(&self, e: &Expr, args: &[V<'c, 'a>]) -> Result<V<'c, 'a>, MlirError> {
        let bad = |what: String| MlirError::Unsupported(what);
        Ok(match e {
            Expr::Arg(i) => *args
                .get(*i)
                .ok_or_else(|| bad(format!("body refers to ${i}")))?,
            Expr::Const(lit) => match (lit.dtype(), lit.values().first()) {
                (DType::F32, Some(Scalar::Float(v))) => self.c(*v)?,
                (DType::Bool, Some(Scalar::Bool(v))) => self.int("i1", i64::from(*v))?,
                (d, _) => return Err(bad(format!("a {d} constant in a fused body"))),
            },
            Expr::Unary(u, a) => self.unary(*u, self.expr(a, args)?)?,
            Expr::Binary(op, x, y) => self.binary(*op, self.expr(x, args)?, self.expr(y, args)?)?,
            Expr::Compare(c, x, y) => {
                let p = match c {
                    CmpOp::Eq => CmpfPredicate::Oeq,
                    CmpOp::Ne => CmpfPredicate::Une,
                    CmpOp::Lt => CmpfPredicate::Olt,
                    CmpOp::Le => CmpfPredicate::Ole,
                    CmpOp::Gt => CmpfPredicate::Ogt,
                    CmpOp::Ge => CmpfPredicate::Oge,
                };
                self.cmp(p, self.expr(x, args)?, self.expr(y, args)?)?
            }
            Expr::Where(c, x, y) => self.select(
                self.expr(c, args)?,
                self.expr(x, args)?,
                self.expr(y, args)?,
            )?,
            Expr::Cast(to, a) => {
                let from = a
                    .dtype(&vec![DType::F32; args.len()])
                    .map_err(MlirError::Unsupported)?;
                let v = self.expr(a, args)?;
                match (from, *to) {
                    (f, t) if f == t => v,
                    (DType::Bool, DType::F32) => {
                        self.b
                            .op(self.block, "arith.uitofp", &[v], Some(self.ty()?), &[])?
                    }
                    (DType::F32, DType::Bool) => self.cmp(CmpfPredicate::Une, v, self.c(0.0)?)?,
                    (f, t) => return Err(bad(format!("cast from {f} to {t}"))),
                }
            }
        })
    }
}
