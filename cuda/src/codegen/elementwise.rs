//! CUDA C generated from a fused elementwise body ([`Expr`]).
//!
//! A grid-stride loop over packs of [`PACK`] consecutive elements: when
//! the output and the same-shape operands are 16-byte aligned, each pack of those is moved with
//! 16-byte vector accesses, and the last `n % PACK` elements one by one; otherwise every element
//! one by one. Index arithmetic is 32-bit when `n < 2^30` (the kernel picks), 64-bit beyond.
//! The body is one inlined function of the operands' values. Every node is computed as its primitive
//! op and rounded to the node's dtype, as the reference executor does: float values are held
//! as f32 rounded to their dtype; `+ - * /`, `sqrt` and `recip` run in f32 (correctly
//! rounded, so equal to the reference's f64-then-round), transcendental functions in f64 then
//! rounded; integers in wrapping i64 wrapped to their dtype (division by zero sets the error
//! flag); bools as `bool`.
//!
//! Operands are broadcast by strides: an operand whose shape is the output's is read at the
//! element's index, a one-element operand at 0, and any other through its strides (0 on
//! broadcast axes) in `meta`, the output dims followed by each strided operand's strides
//! (see [`Plan`]).

use super::{assemble, c_type};
use crate::compile::{content_hash, Arch, KernelSource};
use crate::CudaError;
use kiln_ir::scalar::Scalar;
use kiln_ir::{BinaryOp, CmpOp, DType, Expr, UnaryOp};
use std::fmt::Write;

/// Elements per pack: 16 bytes of bf16 (the kernel's unit of vector access; a launch needs
/// one thread per pack).
pub const PACK: usize = 8;

/// How the kernel reads one operand.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ArgLayout {
    /// Same shape as the output: element `i`.
    Same,
    /// One element, broadcast everywhere: element 0.
    Scalar,
    /// Broadcast through strides in `meta`.
    Strided,
}

/// The launch-time layout of a fused op on concrete shapes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The output shape (numpy broadcast of the operands').
    pub out: Vec<usize>,
    /// Per operand.
    pub layouts: Vec<ArgLayout>,
    /// The output dims, then the strides of each [`ArgLayout::Strided`] operand.
    pub meta: Vec<i64>,
}

/// Row-major strides of `shape` read broadcast to `out` (0 on broadcast and missing leading
/// axes), or `None` if it does not broadcast.
pub fn broadcast_strides(shape: &[usize], out: &[usize]) -> Option<Vec<i64>> {
    if shape.len() > out.len() {
        return None;
    }
    let lead = out.len() - shape.len();
    let mut strides = vec![0i64; out.len()];
    let mut s = 1i64;
    for (i, &d) in shape.iter().enumerate().rev() {
        let o = out[lead + i];
        if d == o {
            strides[lead + i] = if d == 1 { 0 } else { s };
        } else if d != 1 {
            return None;
        }
        s *= d as i64;
    }
    Some(strides)
}

/// The element offset the kernel reads for output element `idx` through `strides` over
/// `dims` (the kernel's index arithmetic, written out for tests).
pub fn strided_offset(idx: i64, dims: &[i64], strides: &[i64]) -> i64 {
    let (mut r, mut o) = (idx, 0);
    for d in (0..dims.len()).rev() {
        o += (r % dims[d]) * strides[d];
        r /= dims[d];
    }
    o
}

impl Plan {
    /// The plan for operands of `shapes`.
    pub fn new(shapes: &[&[usize]]) -> Result<Plan, CudaError> {
        let bad = || CudaError::Args(format!("shapes {shapes:?} do not broadcast"));
        let rank = shapes.iter().map(|s| s.len()).max().unwrap_or(0);
        let mut out = vec![1usize; rank];
        for s in shapes {
            for (i, &d) in s.iter().enumerate() {
                let o = &mut out[rank - s.len() + i];
                if *o == 1 {
                    *o = d;
                } else if d != 1 && d != *o {
                    return Err(bad());
                }
            }
        }
        let mut meta: Vec<i64> = out.iter().map(|&d| d as i64).collect();
        let mut layouts = vec![];
        for s in shapes {
            let st = broadcast_strides(s, &out).ok_or_else(bad)?;
            layouts.push(if *s == out.as_slice() {
                ArgLayout::Same
            } else if s.iter().product::<usize>() == 1 {
                ArgLayout::Scalar
            } else {
                meta.extend(st);
                ArgLayout::Strided
            });
        }
        Ok(Plan { out, layouts, meta })
    }
}

/// A fused elementwise kernel to generate.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Elementwise {
    /// The body.
    pub body: Expr,
    /// The operands' dtypes.
    pub args: Vec<DType>,
    /// How each operand is read.
    pub layouts: Vec<ArgLayout>,
    /// The output's rank.
    pub rank: usize,
}

/// The class a node's value is held in.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Class {
    Float,
    Int,
    Bool,
}

fn class(d: DType) -> Class {
    if d.is_float() {
        Class::Float
    } else if d == DType::Bool {
        Class::Bool
    } else {
        Class::Int
    }
}

/// The C type a value of `d` is held in.
fn held_type(d: DType) -> &'static str {
    match class(d) {
        Class::Float => "float",
        Class::Int => "i64",
        Class::Bool => "bool",
    }
}

/// `e` (an f32, f64 or i64 expression) rounded or wrapped to `d`'s held value.
fn round(d: DType, e: &str) -> String {
    match d {
        DType::F32 => format!("(float)({e})"),
        DType::F16 => format!("kiln_rnd_f16((float)({e}))"),
        DType::BF16 => format!("kiln_rnd_bf16((float)({e}))"),
        DType::F8E4M3 => format!("kiln_rnd_e4m3((float)({e}))"),
        DType::F8E5M2 => format!("kiln_rnd_e5m2((float)({e}))"),
        DType::I64 => format!("(i64)({e})"),
        DType::I32 => format!("(i64)(int)(unsigned int)(u64)({e})"),
        DType::U8 => format!("(i64)(unsigned char)(u64)({e})"),
        DType::Bool => format!("(bool)({e})"),
    }
}

struct Emitter<'a> {
    args: &'a [DType],
    lines: String,
    next: usize,
}

impl Emitter<'_> {
    /// Emits `e`'s statements; returns its variable and dtype.
    fn emit(&mut self, e: &Expr) -> Result<(String, DType), CudaError> {
        let bad = |m: String| CudaError::Codegen(m);
        let d = e.dtype(self.args).map_err(bad)?;
        let value = match e {
            Expr::Arg(i) => return Ok((format!("x{i}"), d)),
            Expr::Const(lit) => match lit.values().first().copied() {
                Some(Scalar::Float(v)) => round(
                    d,
                    &format!("__longlong_as_double(0x{:016x}LL)", v.to_bits()),
                ),
                Some(Scalar::Int(v)) => round(d, &format!("(i64)0x{:016x}ULL", v as u64)),
                Some(Scalar::Bool(b)) => b.to_string(),
                None => return Err(bad("empty constant".into())),
            },
            Expr::Unary(u, a) => {
                let (a, ad) = self.emit(a)?;
                unary(*u, &a, ad)?
            }
            Expr::Binary(op, a, b) => {
                let (a, ad) = self.emit(a)?;
                let (b, _) = self.emit(b)?;
                binary(*op, &a, &b, ad)?
            }
            Expr::Compare(c, a, b) => {
                let (a, _) = self.emit(a)?;
                let (b, _) = self.emit(b)?;
                let op = match c {
                    CmpOp::Eq => "==",
                    CmpOp::Ne => "!=",
                    CmpOp::Lt => "<",
                    CmpOp::Le => "<=",
                    CmpOp::Gt => ">",
                    CmpOp::Ge => ">=",
                };
                format!("({a} {op} {b})")
            }
            Expr::Where(c, a, b) => {
                let (c, _) = self.emit(c)?;
                let (a, _) = self.emit(a)?;
                let (b, _) = self.emit(b)?;
                format!("({c} ? {a} : {b})")
            }
            Expr::Cast(to, a) => {
                let (a, from) = self.emit(a)?;
                cast(&a, from, *to)
            }
        };
        let var = format!("v{}", self.next);
        self.next += 1;
        let _ = writeln!(
            self.lines,
            "        const {} {var} = {value};",
            held_type(d)
        );
        Ok((var, d))
    }
}

fn unary(u: UnaryOp, a: &str, d: DType) -> Result<String, CudaError> {
    let x = format!("(double){a}");
    let e = match (class(d), u) {
        (Class::Float, UnaryOp::Neg) => format!("-{a}"),
        (Class::Float, UnaryOp::Exp) => format!("exp({x})"),
        (Class::Float, UnaryOp::Log) => format!("log({x})"),
        (Class::Float, UnaryOp::Sqrt) => format!("sqrtf({a})"),
        (Class::Float, UnaryOp::Rsqrt) => format!("1.0 / sqrt({x})"),
        (Class::Float, UnaryOp::Tanh) => format!("tanh({x})"),
        (Class::Float, UnaryOp::Erf) => format!("erf({x})"),
        (Class::Float, UnaryOp::Sigmoid) => format!("1.0 / (1.0 + exp(-{x}))"),
        (Class::Float, UnaryOp::Relu) => format!("({a} < 0.0f ? 0.0f : {a})"),
        (Class::Float, UnaryOp::Gelu) => format!("kiln_gelu({x})"),
        (Class::Float, UnaryOp::GeluTanh) => format!("kiln_gelu_tanh({x})"),
        (Class::Float, UnaryOp::Silu) => format!("{x} / (1.0 + exp(-{x}))"),
        (Class::Float, UnaryOp::Sin) => format!("sin({x})"),
        (Class::Float, UnaryOp::Cos) => format!("cos({x})"),
        (Class::Float, UnaryOp::Recip) => format!("1.0f / {a}"),
        (Class::Float, UnaryOp::Abs) => format!("fabsf({a})"),
        (Class::Int, UnaryOp::Neg) => format!("(i64)(0ULL - (u64){a})"),
        (Class::Int, UnaryOp::Abs) => format!("({a} < 0 ? (i64)(0ULL - (u64){a}) : {a})"),
        (Class::Int, UnaryOp::Relu) => format!("({a} < 0 ? (i64)0 : {a})"),
        (Class::Bool, UnaryOp::Not) => return Ok(format!("!{a}")),
        _ => {
            return Err(CudaError::Codegen(format!(
                "{} is not defined on {d}",
                u.name()
            )))
        }
    };
    let narrow = match d {
        DType::BF16 => "kiln_narrow_bf16",
        DType::F16 => "kiln_narrow_f16",
        _ => return Ok(round(d, &e)),
    };
    Ok(match fast_f32(u, a) {
        Some(f) => format!("{narrow}({f}, [&] {{ return (float)({e}); }})"),
        None => round(d, &e),
    })
}

/// An f32 evaluation of `u` within 2^-16 of the exact value, relatively (CUDA's and libm's
/// f32 functions are within 4 ulp = 2^-21), or NaN where that is not known; for the
/// transcendental functions a 16-bit float node rounds: `kiln_narrow_*` (`cu/math.cuh`)
/// rounds it when the rounding is certain and falls back to the f64 evaluation otherwise, so
/// the result is the f64 evaluation's, bit for bit, at f32 cost for almost every input.
fn fast_f32(u: UnaryOp, a: &str) -> Option<String> {
    Some(match u {
        UnaryOp::Exp => format!("expf({a})"),
        UnaryOp::Tanh => format!("tanhf({a})"),
        UnaryOp::Erf => format!("erff({a})"),
        UnaryOp::Sigmoid => format!("1.0f / (1.0f + expf(-{a}))"),
        UnaryOp::Silu => format!("{a} / (1.0f + expf(-{a}))"),
        // 0.5 x erfc(-x/√2): erfc's relative error grows as 4z² ulp at z = -x/√2 (the
        // argument's rounding), so only for x > -5.5 (z < 3.9: ≤ 2^-18).
        UnaryOp::Gelu => format!(
            "({a} > -5.5f ? 0.5f * {a} * erfcf(-0.70710678118654752f * {a}) : __int_as_float(0x7fc00000))"
        ),
        _ => return None,
    })
}

fn binary(op: BinaryOp, a: &str, b: &str, d: DType) -> Result<String, CudaError> {
    let wrap = |o: &str| format!("(i64)((u64){a} {o} (u64){b})");
    let e = match (class(d), op) {
        (Class::Float, BinaryOp::Add) => format!("{a} + {b}"),
        (Class::Float, BinaryOp::Sub) => format!("{a} - {b}"),
        (Class::Float, BinaryOp::Mul) => format!("{a} * {b}"),
        (Class::Float, BinaryOp::Div) => format!("{a} / {b}"),
        (Class::Float, BinaryOp::Pow) => format!("pow((double){a}, (double){b})"),
        (Class::Float, BinaryOp::Max) => format!("kiln_max_nan({a}, {b})"),
        (Class::Float, BinaryOp::Min) => format!("kiln_min_nan({a}, {b})"),
        (Class::Int, BinaryOp::Add) => wrap("+"),
        (Class::Int, BinaryOp::Sub) => wrap("-"),
        (Class::Int, BinaryOp::Mul) => wrap("*"),
        (Class::Int, BinaryOp::Div) => format!("kiln_idiv({a}, {b}, err)"),
        (Class::Int, BinaryOp::Max) => format!("({a} > {b} ? {a} : {b})"),
        (Class::Int, BinaryOp::Min) => format!("({a} < {b} ? {a} : {b})"),
        (Class::Bool, BinaryOp::And) => return Ok(format!("({a} && {b})")),
        (Class::Bool, BinaryOp::Or) => return Ok(format!("({a} || {b})")),
        _ => {
            return Err(CudaError::Codegen(format!(
                "{} is not defined on {d}",
                op.name()
            )))
        }
    };
    Ok(round(d, &e))
}

fn cast(a: &str, from: DType, to: DType) -> String {
    match (class(from), class(to)) {
        (_, Class::Bool) => format!("({a} != 0)"),
        (Class::Float, Class::Float) | (Class::Int, Class::Int) => round(to, a),
        (Class::Float, Class::Int) => round(to, &format!("kiln_f2i((double){a})")),
        (Class::Int, Class::Float) => round(to, &format!("(float)(double){a}")),
        (Class::Bool, Class::Float) => round(to, &format!("({a} ? 1.0f : 0.0f)")),
        (Class::Bool, Class::Int) => format!("(i64){a}"),
    }
}

fn load(d: DType, e: &str) -> String {
    match class(d) {
        Class::Float => format!("kiln_f({e})"),
        Class::Int => format!("(i64){e}"),
        Class::Bool => format!("({e} != 0)"),
    }
}

fn store(d: DType, v: &str) -> String {
    match class(d) {
        Class::Float => format!("kiln_from_f<{}>({v})", c_type(d)),
        Class::Int | Class::Bool => format!("({}){v}", c_type(d)),
    }
}

impl Elementwise {
    /// The result dtype, or why the body is ill-typed.
    pub fn out_dtype(&self) -> Result<DType, CudaError> {
        self.body.dtype(&self.args).map_err(CudaError::Codegen)
    }

    /// The kernel's entry point name (content-addressed).
    pub fn entry(&self) -> String {
        let key = content_hash(&[format!("{self:?}").as_bytes()]);
        format!("kiln_ew_{:016x}", key as u64)
    }

    /// The kernel's own text (without the prelude: it needs `cu/prelude.cuh`'s conversions and
    /// [`super::MATH`]) for `arch`.
    pub fn kernel_text(&self, arch: Arch) -> Result<String, CudaError> {
        let out = self.out_dtype()?;
        if self.layouts.len() != self.args.len() {
            return Err(CudaError::Codegen(format!(
                "{} operand layouts for {} operands",
                self.layouts.len(),
                self.args.len()
            )));
        }
        let mut uses_fp8 = matches!(out, DType::F8E4M3 | DType::F8E5M2);
        self.body.visit(&mut |e| {
            if let Ok(d) = e.dtype(&self.args) {
                uses_fp8 |= matches!(d, DType::F8E4M3 | DType::F8E5M2);
            }
        });
        if uses_fp8 && !arch.has_fp8() {
            return Err(CudaError::Codegen(format!(
                "fp8 elementwise kernels need sm_89 or later, not {arch}"
            )));
        }
        let name = self.entry();
        let mut params = format!("{}* __restrict__ out", c_type(out));
        for (i, d) in self.args.iter().enumerate() {
            let _ = write!(params, ", const {}* __restrict__ a{i}", c_type(*d));
        }
        params += ", const i64* __restrict__ meta";

        // The body, one element: operands in, the stored output value out.
        let xs: Vec<String> = self
            .args
            .iter()
            .enumerate()
            .map(|(i, d)| format!("const {} x{i}", held_type(*d)))
            .collect();
        let mut em = Emitter {
            args: &self.args,
            lines: String::new(),
            next: 0,
        };
        let (v, _) = em.emit(&self.body)?;
        let mut k = format!(
            "static __device__ __forceinline__ {} {name}_body({}, int* err) {{\n{}        return {};\n}}\n",
            c_type(out),
            xs.join(", "),
            em.lines,
            store(out, &v)
        );

        // Element `i`'s operands (`p{i}` is a same-shape operand's pack, `e` the element in it)
        // and its output value.
        let strided: Vec<usize> = (0..self.args.len())
            .filter(|&i| self.layouts[i] == ArgLayout::Strided)
            .collect();
        let rank = self.rank;
        let element = |packed: bool| {
            let mut t = String::new();
            if !strided.is_empty() {
                let offs: Vec<String> = strided.iter().map(|i| format!("o{i} = 0")).collect();
                let _ = writeln!(t, "            I r = i, {};", offs.join(", "));
                let _ = writeln!(
                    t,
                    "#pragma unroll\n            for (int d = {rank} - 1; d >= 0; --d) {{"
                );
                t += "                const I c = r % (I)meta[d];\n                r /= (I)meta[d];\n";
                for (s, i) in strided.iter().enumerate() {
                    let _ = writeln!(
                        t,
                        "                o{i} += c * (I)meta[{} + d];",
                        rank * (1 + s)
                    );
                }
                t += "            }\n";
            }
            let args: Vec<String> = self
                .layouts
                .iter()
                .zip(&self.args)
                .enumerate()
                .map(|(i, (l, d))| match l {
                    ArgLayout::Same if packed => load(*d, &format!("p{i}.v[e]")),
                    ArgLayout::Same => load(*d, &format!("a{i}[i]")),
                    ArgLayout::Scalar => load(*d, &format!("a{i}[0]")),
                    ArgLayout::Strided => load(*d, &format!("a{i}[o{i}]")),
                })
                .collect();
            (t, format!("{name}_body({}, err)", args.join(", ")))
        };
        let same: Vec<usize> = (0..self.args.len())
            .filter(|&i| self.layouts[i] == ArgLayout::Same)
            .collect();
        let mut aligned = vec!["kiln_aligned16(out)".to_string()];
        aligned.extend(same.iter().map(|i| format!("kiln_aligned16(a{i})")));
        let (pack_offsets, pack_value) = element(true);
        let (offsets, value) = element(false);
        let _ = write!(
            k,
            "template <typename I>\nstatic __device__ __forceinline__ void {name}_run({params}, I n, int* err) {{\n"
        );
        k += "    const I stride = (I)gridDim.x * blockDim.x;\n";
        k += "    I start = (I)blockIdx.x * blockDim.x + threadIdx.x;\n";
        let _ = writeln!(k, "    if ({}) {{", aligned.join(" && "));
        let _ = writeln!(k, "        const I packs = n / {PACK};");
        k += "        for (I p = start; p < packs; p += stride) {\n";
        for i in &same {
            let _ = writeln!(
                k,
                "            const kiln_pack<{0}, {PACK}> p{i} = *reinterpret_cast<const kiln_pack<{0}, {PACK}>*>(a{i} + p * {PACK});",
                c_type(self.args[*i])
            );
        }
        let _ = writeln!(k, "            kiln_pack<{}, {PACK}> po;", c_type(out));
        let _ = writeln!(
            k,
            "#pragma unroll\n            for (int e = 0; e < {PACK}; ++e) {{"
        );
        if !strided.is_empty() {
            let _ = writeln!(k, "            const I i = p * {PACK} + e;");
        }
        k += &pack_offsets;
        let _ = writeln!(k, "            po.v[e] = {pack_value};\n            }}");
        let _ = writeln!(
            k,
            "            *reinterpret_cast<kiln_pack<{}, {PACK}>*>(out + p * {PACK}) = po;",
            c_type(out)
        );
        let _ = writeln!(k, "        }}\n        start += packs * {PACK};\n    }}");
        k += "    for (I i = start; i < n; i += stride) {\n";
        k += &offsets;
        let _ = writeln!(k, "        out[i] = {value};\n    }}\n}}");
        let args: Vec<String> = (0..self.args.len()).map(|i| format!("a{i}")).collect();
        let call = format!(
            "out, {}{}meta",
            args.join(", "),
            if args.is_empty() { "" } else { ", " }
        );
        let _ = write!(
            k,
            "extern \"C\" __global__ void {name}({params}, i64 n, int* __restrict__ err) {{\n    if (n < (1LL << 30))\n        {name}_run<int>({call}, (int)n, err);\n    else\n        {name}_run<i64>({call}, n, err);\n}}\n"
        );
        Ok(k)
    }

    /// The module's source for `arch`.
    pub fn source(&self, arch: Arch) -> Result<KernelSource, CudaError> {
        let name = self.entry();
        Ok(KernelSource {
            name: name.clone(),
            source: assemble(arch, &[], &self.kernel_text(arch)?),
            entries: vec![name],
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broadcast_plan_and_index_math() {
        let p = Plan::new(&[&[2, 3, 4], &[3, 1], &[1], &[2, 1, 4]]).unwrap();
        assert_eq!(p.out, vec![2, 3, 4]);
        assert_eq!(
            p.layouts,
            vec![
                ArgLayout::Same,
                ArgLayout::Strided,
                ArgLayout::Scalar,
                ArgLayout::Strided
            ]
        );
        assert_eq!(p.meta, vec![2, 3, 4, 0, 1, 0, 4, 0, 1]);
        assert!(Plan::new(&[&[2, 3], &[4, 3]]).is_err());
        assert_eq!(broadcast_strides(&[2, 3], &[3]), None);
    }

    /// The kernel's index arithmetic over the plan's strides reads what the reference
    /// executor's `expand` (numpy broadcasting) puts at each output element.
    #[test]
    fn strided_reads_match_reference_broadcast() {
        use kiln_ir::trace::Tracer;
        use kiln_runtime::reference::{run, NoParams};
        use kiln_runtime::Tensor;
        let out = [2usize, 3, 4, 5];
        for shape in [
            vec![3, 1, 5],
            vec![2, 1, 4, 1],
            vec![5],
            vec![1, 3, 4, 1],
            vec![2, 3, 4, 5],
        ] {
            let n: usize = shape.iter().product();
            let data: Vec<f32> = (0..n).map(|i| i as f32).collect();
            let t = Tracer::new();
            let x = t.input("x", DType::F32, shape.iter().copied());
            let dims: Vec<kiln_ir::Dim> = out.iter().map(|&d| (d as i64).into()).collect();
            let y = x.expand(&dims).unwrap();
            t.output("y", &y);
            let inputs = [(
                "x".to_string(),
                Tensor::from_f32(shape.clone(), data.clone()).unwrap(),
            )]
            .into_iter()
            .collect();
            let want = run(&t.finish().unwrap(), &inputs, &NoParams).unwrap()["y"].clone();
            let plan = Plan::new(&[&shape, &out]).unwrap();
            let strides = broadcast_strides(&shape, &out).unwrap();
            let meta_dims = &plan.meta[..out.len()];
            let got: Vec<f32> = (0..out.iter().product::<usize>() as i64)
                .map(|i| data[strided_offset(i, meta_dims, &strides) as usize])
                .collect();
            assert_eq!(got, want.as_f32().unwrap(), "{shape:?}");
        }
    }

    #[test]
    fn text_has_every_node() {
        let e: Elementwise = Elementwise {
            body: "(where (lt $0 (const f32 0.5)) (cast bf16 (silu $0)) $1)"
                .parse()
                .unwrap(),
            args: vec![DType::F32, DType::BF16],
            layouts: vec![ArgLayout::Same, ArgLayout::Strided],
            rank: 2,
        };
        let src = e.source(Arch::Sm80).unwrap();
        let s = &src.source;
        assert!(s.contains("__nv_bfloat16* __restrict__ out"));
        assert!(s.contains("o1 += c * (I)meta[2 + d]"));
        assert!(s.contains("kiln_rnd_bf16"));
        assert!(s.contains("__longlong_as_double(0x3fe0000000000000LL)"));
        let fp8 = Elementwise {
            body: "(cast f8e4m3 $0)".parse().unwrap(),
            args: vec![DType::F32],
            layouts: vec![ArgLayout::Same],
            rank: 1,
        };
        assert!(fp8.source(Arch::Sm80).is_err());
        assert!(fp8.source(Arch::Sm90).is_ok());
    }
}
