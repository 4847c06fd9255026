//! Compiled fused elementwise programs: the body of [`kiln_ir::Op::FusedElementwise`] turned
//! into a list of instructions over chunk-sized f32 registers.
//!
//! [`Program::compile`] types every node of the [`Expr`] with the primitive ops' rules and
//! emits one instruction per node (post-order); [`Program::run`] walks the output in chunks of
//! [`CHUNK`] elements of the innermost run and executes each instruction as one tight loop over
//! the chunk (LLVM vectorizes them), so the interpretation cost is paid per chunk, not per
//! element. Operands whose innermost stride is 1 are read in place, broadcast ones (stride 0)
//! are splatted once per run, others gathered; axes that are contiguous for every operand are
//! merged first. Large outputs are split over [`crate::threads`] threads; the chunk loop is
//! plain Rust compiled for AVX-512, AVX2 + FMA and portably and picked at run time.
//!
//! Values live in f32 lanes: narrower float operands arrive widened, bools as 0.0/1.0. Each
//! node is computed as its primitive op and rounded to its dtype: bf16 and f16 to nearest even
//! (as `half`), fp8 as [`kiln_ir::f8`]. Accuracy against the reference (which evaluates in f64
//! and rounds to f32, then to the node's dtype): add, sub, mul, div, sqrt, recip, neg, abs,
//! relu, max, min, comparisons, where and casts are bit-exact; rsqrt, log, sin, cos and pow
//! evaluate the IR's own f64 formula per element (bit-exact, but scalar code); exp, sigmoid and
//! silu use a vectorized f32 exponential and are within 1e-6 relative (a few ulp) or 1e-30
//! absolute; tanh and erf use vectorized f32 rational approximations (a few ulp), and gelu and
//! gelu_tanh are computed from them in f32 as PyTorch's CPU kernels do, within 2e-6 relative
//! or 2e-6 absolute (the `1 + erf` of a negative tail loses digits to cancellation in f32). A node narrower than f32 inherits that: a few-ulp
//! f32 difference can move its rounding by one ulp of its own dtype.

use crate::simd::{erf, exp, gelu, gelu_tanh, round_bf16, tanh, vector_level, Isa};
use crate::KernelError;
use kiln_ir::{f8, BinaryOp, CmpOp, DType, Expr, UnaryOp};
use rayon::prelude::*;
use smallvec::{smallvec, SmallVec};

/// Elements per register: one chunk of an innermost run.
pub const CHUNK: usize = 256;
/// Output elements per parallel task.
const TASK: usize = 1 << 15;

/// Where an instruction reads an operand.
#[derive(Debug, Clone, Copy)]
enum Src {
    /// A register written by an earlier instruction.
    Reg(usize),
    /// Operand `$i`.
    Arg(usize),
    /// A constant, splatted into constant slot `i`.
    Const(usize),
}

/// What an instruction computes from its sources.
#[derive(Debug, Clone, Copy)]
enum Kind {
    /// The first source unchanged (a body that is just an operand or a constant).
    Copy,
    Unary(UnaryOp),
    Binary(BinaryOp),
    Compare(CmpOp),
    Where,
    /// `x != 0` as 0/1 (a cast to bool).
    ToBool,
}

/// Rounding applied to an instruction's result: to its node's dtype.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Round {
    None,
    Bf16,
    F16,
    F8E4M3,
    F8E5M2,
}

#[derive(Debug, Clone, Copy)]
struct Instr {
    kind: Kind,
    src: [Src; 3],
    round: Round,
}

/// A compiled fused elementwise body: instruction `i` writes register `i`; the last one is the
/// result.
#[derive(Debug, Clone)]
pub struct Program {
    instrs: Vec<Instr>,
    consts: Vec<f32>,
    n_args: usize,
}

fn unsupported(what: String) -> KernelError {
    KernelError::Layout(format!("fused elementwise: {what}"))
}

fn round_of(d: DType) -> Result<Round, KernelError> {
    Ok(match d {
        DType::F32 | DType::Bool => Round::None,
        DType::BF16 => Round::Bf16,
        DType::F16 => Round::F16,
        DType::F8E4M3 => Round::F8E4M3,
        DType::F8E5M2 => Round::F8E5M2,
        DType::I64 | DType::I32 | DType::U8 => {
            return Err(unsupported(format!("integer node of type {}", d.name())))
        }
    })
}

impl Program {
    /// Compiles a FusedElementwise body over operands of the given dtypes. Float nodes (f32,
    /// bf16, f16, f8e4m3, f8e5m2) and bool nodes are supported; integer-typed nodes return Err
    /// (the executor then falls back to the reference executor).
    pub fn compile(body: &Expr, arg_dtypes: &[DType]) -> Result<Program, KernelError> {
        for d in arg_dtypes {
            round_of(*d)?;
        }
        let mut p = Program {
            instrs: Vec::new(),
            consts: Vec::new(),
            n_args: arg_dtypes.len(),
        };
        let root = p.emit(body, arg_dtypes)?;
        if !matches!(root, Src::Reg(_)) {
            p.instrs.push(Instr {
                kind: Kind::Copy,
                src: [root; 3],
                round: Round::None,
            });
        }
        Ok(p)
    }

    /// Emits the instructions of `e` (children first); returns where its value is.
    fn emit(&mut self, e: &Expr, args: &[DType]) -> Result<Src, KernelError> {
        let dtype = e.dtype(args).map_err(unsupported)?;
        let round = round_of(dtype)?;
        let mut sub = |c: &Expr| self.emit(c, args);
        let (kind, src) = match e {
            Expr::Arg(i) => return Ok(Src::Arg(*i)),
            Expr::Const(lit) => {
                let v = lit
                    .values()
                    .first()
                    .map(|s| s.as_f64() as f32)
                    .ok_or_else(|| unsupported("empty constant".into()))?;
                self.consts.push(v);
                return Ok(Src::Const(self.consts.len() - 1));
            }
            Expr::Unary(u, a) => {
                let a = sub(a)?;
                (Kind::Unary(*u), [a; 3])
            }
            Expr::Binary(b, x, y) => {
                let (x, y) = (sub(x)?, sub(y)?);
                (Kind::Binary(*b), [x, y, y])
            }
            Expr::Compare(c, x, y) => {
                let (x, y) = (sub(x)?, sub(y)?);
                (Kind::Compare(*c), [x, y, y])
            }
            Expr::Where(c, x, y) => {
                let (c, x, y) = (sub(c)?, sub(x)?, sub(y)?);
                (Kind::Where, [c, x, y])
            }
            Expr::Cast(to, a) => {
                let a = sub(a)?;
                let kind = if *to == DType::Bool {
                    Kind::ToBool
                } else {
                    Kind::Copy
                };
                (kind, [a; 3])
            }
        };
        self.instrs.push(Instr { kind, src, round });
        Ok(Src::Reg(self.instrs.len() - 1))
    }

    /// Evaluates over `out_shape` (row-major, contiguous `out`). Each operand is f32 data
    /// (values of narrower float dtypes are stored widened to f32; bool as 0.0/1.0) with one
    /// element stride per output axis (0 = broadcast along that axis).
    pub fn run(
        &self,
        out_shape: &[usize],
        args: &[(&[f32], &[usize])],
        out: &mut [f32],
    ) -> Result<(), KernelError> {
        self.run_with(Isa::best(), out_shape, args, out)
    }

    /// As [`Program::run`] at instruction-set level `isa`.
    pub fn run_with(
        &self,
        isa: Isa,
        out_shape: &[usize],
        args: &[(&[f32], &[usize])],
        out: &mut [f32],
    ) -> Result<(), KernelError> {
        let plan = Plan::new(self.n_args, out_shape, args, out.len())?;
        if out.is_empty() {
            return Ok(());
        }
        let level = vector_level(isa);
        let f = |start: usize, o: &mut [f32], s: &mut Scratch| match level {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 | Isa::Avx512Bf16 => {
                // SAFETY: `vector_level` returned an available level, so AVX-512 F/BW/VL, AVX2
                // and FMA are present.
                unsafe { x86::range_avx512(self, &plan, start, o, s) }
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => {
                // SAFETY: `vector_level` returned an available level, so AVX2 and FMA are
                // present.
                unsafe { x86::range_avx2(self, &plan, start, o, s) }
            }
            _ => range_body::<false>(self, &plan, start, o, s),
        };
        if crate::threads() > 1 && out.len() >= 2 * TASK {
            out.par_chunks_mut(TASK)
                .enumerate()
                .for_each_init(|| Scratch::take(self), |s, (t, o)| f(t * TASK, o, s));
        } else {
            f(0, out, &mut Scratch::take(self));
        }
        Ok(())
    }
}

/// The operands' layout after merging axes that are contiguous for all of them.
struct Plan<'a> {
    /// Merged output dims (at least one).
    dims: Axes,
    /// Each operand's data and strides over `dims`.
    args: SmallVec<[(&'a [f32], Axes); 8]>,
}

/// Sizes or strides per axis, inline up to 8 axes (a call allocates no plan).
type Axes = SmallVec<[usize; 8]>;

impl<'a> Plan<'a> {
    fn new(
        n_args: usize,
        shape: &[usize],
        args: &[(&'a [f32], &[usize])],
        out_len: usize,
    ) -> Result<Plan<'a>, KernelError> {
        let bad = |m: String| Err(KernelError::Layout(format!("fused elementwise: {m}")));
        if args.len() != n_args {
            return bad(format!("{} operands for a body over {n_args}", args.len()));
        }
        let numel = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
        if numel != Some(out_len) {
            return bad(format!("out has {out_len} elements for shape {shape:?}"));
        }
        for (i, (data, st)) in args.iter().enumerate() {
            if st.len() != shape.len() {
                return bad(format!(
                    "${i} has {} strides for rank {}",
                    st.len(),
                    shape.len()
                ));
            }
            if out_len > 0 {
                let last = shape
                    .iter()
                    .zip(st.iter())
                    .try_fold(0usize, |a, (&d, &s)| a.checked_add((d - 1).checked_mul(s)?));
                if last.is_none_or(|l| l >= data.len()) {
                    return bad(format!(
                        "${i} has {} elements, too few for shape {shape:?} at strides {st:?}",
                        data.len()
                    ));
                }
            }
        }
        // Merge axis a into a+1 when every operand steps over a as over a+1's whole extent.
        let mut dims = Axes::new();
        let mut strides: SmallVec<[Axes; 8]> = smallvec![Axes::new(); args.len()];
        for (ax, &d) in shape.iter().enumerate() {
            if d == 1 {
                continue;
            }
            let merge = !dims.is_empty()
                && args
                    .iter()
                    .zip(&strides)
                    .all(|((_, st), ms)| ms.last().copied() == st[ax].checked_mul(d));
            if let (true, Some(last)) = (merge, dims.last_mut()) {
                *last *= d;
                for ((_, st), ms) in args.iter().zip(strides.iter_mut()) {
                    if let Some(p) = ms.last_mut() {
                        *p = st[ax];
                    }
                }
            } else {
                dims.push(d);
                for ((_, st), ms) in args.iter().zip(strides.iter_mut()) {
                    ms.push(st[ax]);
                }
            }
        }
        if dims.is_empty() {
            dims.push(1);
            for ms in &mut strides {
                ms.push(0);
            }
        }
        Ok(Plan {
            dims,
            args: args.iter().map(|(d, _)| *d).zip(strides).collect(),
        })
    }
}

/// One thread's [`Buffers`] for a call, given back to the thread ([`SPARE`]) when dropped.
struct Scratch(Buffers);

/// Registers and operand buffers.
#[derive(Default)]
struct Buffers {
    regs: Vec<Vec<f32>>,
    /// Per operand: a splatted or gathered chunk.
    bufs: Vec<Vec<f32>>,
    /// Per operand: `Some(start)` when read in place from its data, `None` when from `bufs`.
    direct: Vec<Option<usize>>,
    consts: Vec<Vec<f32>>,
}

thread_local! {
    /// The scratch of this thread's last call, given back when dropped.
    static SPARE: std::cell::Cell<Option<Buffers>> = const { std::cell::Cell::new(None) };
}

impl Scratch {
    /// The thread's spare scratch (or a new one), sized for `p`, its constants filled.
    fn take(p: &Program) -> Scratch {
        let s = SPARE
            .try_with(std::cell::Cell::take)
            .ok()
            .flatten()
            .unwrap_or_default();
        // Grown, never shrunk: programs of different sizes take turns on a thread.
        let grow = |v: &mut Vec<Vec<f32>>, n: usize| {
            if v.len() < n {
                v.resize_with(n, || vec![0.0; CHUNK]);
            }
        };
        let mut s = Scratch(s);
        grow(&mut s.regs, p.instrs.len());
        grow(&mut s.bufs, p.n_args);
        s.direct.clear();
        s.direct.resize(p.n_args, None);
        grow(&mut s.consts, p.consts.len());
        for (v, &c) in s.consts.iter_mut().zip(&p.consts) {
            v.fill(c);
        }
        s
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let kept = std::mem::take(&mut self.0);
        let _ = SPARE.try_with(|spare| spare.set(Some(kept)));
    }
}

impl std::ops::Deref for Scratch {
    type Target = Buffers;
    fn deref(&self) -> &Buffers {
        &self.0
    }
}

impl std::ops::DerefMut for Scratch {
    fn deref_mut(&mut self) -> &mut Buffers {
        &mut self.0
    }
}

/// Computes output elements `start..start + out.len()`.
#[inline(always)]
fn range_body<const FMA: bool>(
    p: &Program,
    plan: &Plan,
    start: usize,
    out: &mut [f32],
    s: &mut Scratch,
) {
    let rank = plan.dims.len();
    let inner = plan.dims[rank - 1];
    let end = start + out.len();
    let mut pos = start;
    let mut bases: Axes = smallvec![0; plan.args.len()];
    while pos < end {
        let (row, col) = (pos / inner, pos % inner);
        let n = (inner - col).min(end - pos);
        // Offsets of this run's first element in each operand.
        for (b, (_, st)) in bases.iter_mut().zip(&plan.args) {
            let mut r = row;
            let mut off = col * st[rank - 1];
            for ax in (0..rank - 1).rev() {
                off += (r % plan.dims[ax]) * st[ax];
                r /= plan.dims[ax];
            }
            *b = off;
        }
        for (i, (data, st)) in plan.args.iter().enumerate() {
            if st[rank - 1] == 0 {
                s.bufs[i][..n.min(CHUNK)].fill(data[bases[i]]);
            }
        }
        let mut c0 = 0;
        while c0 < n {
            let m = CHUNK.min(n - c0);
            for (i, (data, st)) in plan.args.iter().enumerate() {
                let step = st[rank - 1];
                let b = bases[i] + c0 * step;
                s.direct[i] = match step {
                    0 => None,
                    1 => Some(b),
                    _ => {
                        for (t, o) in s.bufs[i][..m].iter_mut().enumerate() {
                            *o = data[b + t * step];
                        }
                        None
                    }
                };
            }
            let o = pos - start + c0;
            run_chunk::<FMA>(p, plan, s, &mut out[o..o + m]);
            c0 += m;
        }
        pos += n;
    }
}

/// Runs every instruction over one chunk of `out.len()` elements, the last into `out`.
#[inline(always)]
fn run_chunk<const FMA: bool>(p: &Program, plan: &Plan, s: &mut Scratch, out: &mut [f32]) {
    let m = out.len();
    let last = p.instrs.len() - 1;
    for (k, ins) in p.instrs.iter().enumerate() {
        let mut dst = if k == last {
            Vec::new()
        } else {
            std::mem::take(&mut s.regs[k])
        };
        {
            let get = |src: Src| -> &[f32] {
                match src {
                    Src::Reg(r) => &s.regs[r][..m],
                    Src::Const(c) => &s.consts[c][..m],
                    Src::Arg(a) => match s.direct[a] {
                        Some(b) => &plan.args[a].0[b..b + m],
                        None => &s.bufs[a][..m],
                    },
                }
            };
            let (a, b, c) = (get(ins.src[0]), get(ins.src[1]), get(ins.src[2]));
            let o = if k == last { &mut *out } else { &mut dst[..m] };
            exec::<FMA>(ins.kind, a, b, c, o);
            round(ins.round, o);
        }
        if k != last {
            s.regs[k] = dst;
        }
    }
}

/// `o = kind(a, b, c)` elementwise (unused sources are ignored).
#[inline(always)]
fn exec<const FMA: bool>(kind: Kind, a: &[f32], b: &[f32], c: &[f32], o: &mut [f32]) {
    let a = &a[..o.len()];
    let b = &b[..o.len()];
    let c = &c[..o.len()];
    macro_rules! map1 {
        (|$x:ident| $e:expr) => {
            for (o, &$x) in o.iter_mut().zip(a) {
                *o = $e;
            }
        };
    }
    macro_rules! map2 {
        (|$x:ident, $y:ident| $e:expr) => {
            for ((o, &$x), &$y) in o.iter_mut().zip(a).zip(b) {
                *o = $e;
            }
        };
    }
    let flag = |t: bool| if t { 1.0f32 } else { 0.0 };
    match kind {
        Kind::Copy => o.copy_from_slice(a),
        Kind::ToBool => map1!(|x| flag(x != 0.0)),
        Kind::Where => {
            for (((o, &k), &x), &y) in o.iter_mut().zip(a).zip(b).zip(c) {
                *o = if k != 0.0 { x } else { y };
            }
        }
        Kind::Unary(u) => match u {
            UnaryOp::Neg => map1!(|x| -x),
            UnaryOp::Abs => map1!(|x| x.abs()),
            UnaryOp::Relu => map1!(|x| if x < 0.0 { 0.0 } else { x }),
            UnaryOp::Sqrt => map1!(|x| x.sqrt()),
            UnaryOp::Recip => map1!(|x| 1.0 / x),
            UnaryOp::Not => map1!(|x| flag(x == 0.0)),
            UnaryOp::Exp => map1!(|x| exp_full::<FMA>(x)),
            // exp(-x) overflowing to +inf below x = -88.37 gives ±0 where the exact result is
            // below 1e-36 in magnitude.
            UnaryOp::Sigmoid => map1!(|x| 1.0 / (1.0 + exp::<FMA>(-x))),
            UnaryOp::Silu => map1!(|x| x / (1.0 + exp::<FMA>(-x))),
            UnaryOp::Rsqrt => map1!(|x| (1.0 / f64::from(x).sqrt()) as f32),
            UnaryOp::Tanh => map1!(|x| tanh::<FMA>(x)),
            UnaryOp::Erf => map1!(|x| erf::<FMA>(x)),
            UnaryOp::Gelu => map1!(|x| gelu::<FMA>(x)),
            UnaryOp::GeluTanh => map1!(|x| gelu_tanh::<FMA>(x)),
            UnaryOp::Log | UnaryOp::Sin | UnaryOp::Cos => map1!(|x| u.eval(f64::from(x)) as f32),
        },
        Kind::Binary(op) => match op {
            BinaryOp::Add => map2!(|x, y| x + y),
            BinaryOp::Sub => map2!(|x, y| x - y),
            BinaryOp::Mul => map2!(|x, y| x * y),
            BinaryOp::Div => map2!(|x, y| x / y),
            BinaryOp::Max => map2!(|x, y| if x.is_nan() || y.is_nan() {
                f32::NAN
            } else {
                x.max(y)
            }),
            BinaryOp::Min => map2!(|x, y| if x.is_nan() || y.is_nan() {
                f32::NAN
            } else {
                x.min(y)
            }),
            BinaryOp::And => map2!(|x, y| flag(x != 0.0 && y != 0.0)),
            BinaryOp::Or => map2!(|x, y| flag(x != 0.0 || y != 0.0)),
            BinaryOp::Pow => map2!(|x, y| f64::from(x).powf(f64::from(y)) as f32),
        },
        Kind::Compare(op) => match op {
            CmpOp::Eq => map2!(|x, y| flag(x == y)),
            CmpOp::Ne => map2!(|x, y| flag(x != y)),
            CmpOp::Lt => map2!(|x, y| flag(x < y)),
            CmpOp::Le => map2!(|x, y| flag(x <= y)),
            CmpOp::Gt => map2!(|x, y| flag(x > y)),
            CmpOp::Ge => map2!(|x, y| flag(x >= y)),
        },
    }
}

/// `e^x` over f32's whole finite range as `exp(x/2)²` (within 5 ulp): [`exp`] alone gives +inf
/// from 88.38 on, short of the overflow threshold 88.72. One polynomial, no branch, so the
/// loop stays vectorized.
#[inline(always)]
fn exp_full<const FMA: bool>(x: f32) -> f32 {
    let h = exp::<FMA>(x * 0.5);
    h * h
}

/// Rounds `o` in place to the values of a narrower dtype.
#[inline(always)]
fn round(r: Round, o: &mut [f32]) {
    match r {
        Round::None => {}
        Round::Bf16 => {
            for x in o.iter_mut() {
                *x = round_bf16(*x);
            }
        }
        Round::F16 => {
            for x in o.iter_mut() {
                *x = half::f16::from_f32(*x).to_f32();
            }
        }
        Round::F8E4M3 => {
            for x in o.iter_mut() {
                *x = f8::f8e4m3_to_f32(f8::f32_to_f8e4m3(*x));
            }
        }
        Round::F8E5M2 => {
            for x in o.iter_mut() {
                *x = f8::f8e5m2_to_f32(f8::f32_to_f8e5m2(*x));
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{range_body, Plan, Program, Scratch};

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
    pub(super) fn range_avx512(
        p: &Program,
        plan: &Plan,
        start: usize,
        out: &mut [f32],
        s: &mut Scratch,
    ) {
        range_body::<true>(p, plan, start, out, s)
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) fn range_avx2(
        p: &Program,
        plan: &Plan,
        start: usize,
        out: &mut [f32],
        s: &mut Scratch,
    ) {
        range_body::<true>(p, plan, start, out, s)
    }
}
