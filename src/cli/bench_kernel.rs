//! The CPU kernels `kiln bench kernel` times: for each `--op`, its shape syntax and dtypes, the
//! operands it builds (deterministic data), what one call computes and moves, and the median
//! time of the runs. [`super::bench`] reports them against the ceilings.

use super::CliError;
use half::bf16;
use kiln::ir::{DType, Expr};
use kiln::runtime::cpu::{moe_f32, MoeData};
use kiln::runtime::tensor::Elements;
use kiln_kernels::attention::{
    attention_bf16_kv, attention_f32, AttnOptions, AttnShape, Bf16View, Strides4, View,
};
use kiln_kernels::fused::Program;
use kiln_kernels::gemm::{matmul_f32, Gemm};
use kiln_kernels::gemm_bf16::{matmul_bf16, PackedBf16};
use kiln_kernels::{elementwise, gemv, rowwise};
use std::time::Instant;

/// The ops, as `--op` names them.
pub const OPS: &str = "matmul, gemv, attention, moe, rmsnorm, layernorm, softmax, silu_mul, fused";

/// The element type of a kernel's weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelDtype {
    /// f32 everywhere.
    F32,
    /// bf16 weights, f32 accumulation (matmul, gemv: activations rounded to bf16; moe: the
    /// experts' weights as bf16 precision stores them, activations f32; attention: keys and
    /// values stored bf16, as a bf16 model's KV cache).
    Bf16,
    /// fp8 e4m3 weights (gemv: a per-tensor scale, bf16 activations; moe: per-row scales as
    /// fp8 precision stores the experts, activations f32).
    Fp8,
}

impl KernelDtype {
    /// `--dtype` for `op`, or why `op` has no kernel for it.
    pub fn parse(op: &str, dtype: &str) -> Result<KernelDtype, CliError> {
        let d = match dtype {
            "f32" => return Ok(KernelDtype::F32),
            "bf16" => KernelDtype::Bf16,
            "fp8" | "f8e4m3" => KernelDtype::Fp8,
            d => {
                return Err(CliError::Input(format!(
                    "--dtype {d:?}: expected f32, bf16 or fp8"
                )))
            }
        };
        match (op, d) {
            ("matmul" | "attention", KernelDtype::Bf16) | ("gemv" | "moe", _) => Ok(d),
            _ => Err(CliError::Input(format!(
                "--dtype {dtype}: {op} has f32 kernels only (bf16: matmul, gemv, moe and \
                 attention; fp8: gemv and moe)"
            ))),
        }
    }
}

/// What one kernel call moves and computes.
pub struct Work {
    /// The kernel and shape, for the report.
    pub label: String,
    /// Floating-point operations.
    pub flops: f64,
    /// Bytes read and written.
    pub bytes: f64,
}

/// Median wall time of `runs` calls of `f` after two warm-up calls, in seconds.
pub fn median_secs(runs: usize, mut f: impl FnMut()) -> f64 {
    f();
    f();
    let mut t: Vec<f64> = (0..runs.max(1))
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed().as_secs_f64()
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[t.len() / 2]
}

/// Deterministic data in [-0.5, 0.5).
fn data(n: usize, seed: f32) -> Vec<f32> {
    (0..n)
        .map(|i| ((i as f32 + seed) * 0.618_034).fract() - 0.5)
        .collect()
}

/// `C = A · B`, f32.
pub struct Matmul {
    p: Gemm,
    a: Vec<f32>,
    b: Vec<f32>,
    c: std::cell::RefCell<Vec<f32>>,
}

impl Matmul {
    /// Operands of `m × k` and `k × n`.
    pub fn new(m: usize, n: usize, k: usize) -> Matmul {
        Matmul {
            p: Gemm::dense(m, n, k, false, false),
            a: data(m * k, 0.0),
            b: data(k * n, 1.0),
            c: std::cell::RefCell::new(vec![0.0; m * n]),
        }
    }
    /// Flops of one call.
    pub fn flops(&self) -> f64 {
        self.p.flops()
    }
    /// One call.
    pub fn run(&self) {
        matmul_f32(&self.p, &self.a, &self.b, &mut self.c.borrow_mut()).expect("dense layout");
    }
}

/// `C = bf16(A) · Wᵀ` with prepacked bf16 weights (packing is not timed).
pub struct MatmulBf16 {
    m: usize,
    a: Vec<f32>,
    w: PackedBf16,
    c: std::cell::RefCell<Vec<f32>>,
}

impl MatmulBf16 {
    /// Operands of `m × k` and `n × k`.
    pub fn new(m: usize, n: usize, k: usize) -> MatmulBf16 {
        let w: Vec<bf16> = data(n * k, 1.0)
            .iter()
            .map(|&v| bf16::from_f32(v))
            .collect();
        MatmulBf16 {
            m,
            a: data(m * k, 0.0),
            w: PackedBf16::pack(n, k, &w).expect("dense layout"),
            c: std::cell::RefCell::new(vec![0.0; m * n]),
        }
    }
    /// Flops of one call.
    pub fn flops(&self) -> f64 {
        2.0 * self.m as f64 * self.w.n() as f64 * self.w.k() as f64
    }
    /// One call.
    pub fn run(&self) {
        matmul_bf16(self.m, &self.a, &self.w, &mut self.c.borrow_mut()).expect("dense layout");
    }
}

/// The weights of a GEMV in one of the dtypes.
enum GemvWeights {
    F32(Vec<f32>),
    Bf16(Vec<bf16>),
    Fp8(Vec<u8>),
}

/// `y = W · x` with `W` of `n × k`.
pub struct Gemv {
    n: usize,
    k: usize,
    w: GemvWeights,
    x: Vec<f32>,
    y: std::cell::RefCell<Vec<f32>>,
}

impl Gemv {
    /// Weights of `n × k` in `dtype`.
    pub fn new(n: usize, k: usize, dtype: KernelDtype) -> Gemv {
        let w = data(n * k, 0.0);
        let w = match dtype {
            KernelDtype::F32 => GemvWeights::F32(w),
            KernelDtype::Bf16 => GemvWeights::Bf16(w.iter().map(|&v| bf16::from_f32(v)).collect()),
            // Scaled as fp8 precision stores weights: the largest magnitude near e4m3's 448.
            KernelDtype::Fp8 => GemvWeights::Fp8(
                w.iter()
                    .map(|&v| kiln::ir::f8::f32_to_f8e4m3(v * 800.0))
                    .collect(),
            ),
        };
        Gemv {
            n,
            k,
            w,
            x: data(k, 2.0),
            y: std::cell::RefCell::new(vec![0.0; n]),
        }
    }
    /// Bytes of the weights (what a call streams).
    pub fn weight_bytes(&self) -> f64 {
        let size = match self.w {
            GemvWeights::F32(_) => 4,
            GemvWeights::Bf16(_) => 2,
            GemvWeights::Fp8(_) => 1,
        };
        (self.n * self.k * size) as f64
    }
    /// One call.
    pub fn run(&self) {
        let y = &mut self.y.borrow_mut();
        let (n, k, x) = (self.n, self.k, &self.x);
        match &self.w {
            GemvWeights::F32(w) => gemv::gemv_f32(n, k, w, x, y),
            GemvWeights::Bf16(w) => gemv::gemv_bf16(n, k, w, x, y),
            GemvWeights::Fp8(w) => gemv::gemv_f8e4m3(n, k, w, 1.0 / 800.0, x, y),
        }
        .expect("dense layout");
    }
}

/// `--shape` as positive integers separated by `x`, with one of the counts in `arity`.
fn parse_shape(op: &str, shape: &str, arity: &[usize]) -> Result<Vec<usize>, CliError> {
    let dims: Result<Vec<usize>, _> = shape
        .split(['x', 'X'])
        .map(|d| d.trim().parse::<usize>())
        .collect();
    match dims {
        Ok(d) if arity.contains(&d.len()) && d.iter().all(|&v| v > 0) => Ok(d),
        _ => {
            let want = match op {
                "matmul" => "MxNxK, e.g. 2048x2048x2048",
                "gemv" => "NxK, e.g. 4096x4096",
                "attention" => {
                    "BxHQxHKVxSQxSKxD (batch, query heads, kv heads, queries, keys, head dim), \
                     e.g. 1x12x4x512x512x64 (prefill) or 1x12x4x1x1024x64 (decode)"
                }
                "moe" => {
                    "TxHxIxExK (tokens, hidden, intermediate, experts, experts per token), \
                     e.g. 1x4096x14336x8x2"
                }
                "silu_mul" | "fused" => "N or RxC, e.g. 4194304 or 1024x4096",
                _ => "RxC, e.g. 1024x4096",
            };
            Err(CliError::Input(format!(
                "--shape {shape:?}: {op} takes {want} (positive integers)"
            )))
        }
    }
}

/// Times `op` on `shape` (validated here) in `dtype` (see [`KernelDtype::parse`]), with the
/// expression `body` of `--op fused` (`$0`, `$1`, ... are its operands): what one call computes
/// and moves, and the median seconds of `runs` calls.
pub fn measure(
    op: &str,
    shape: &str,
    dtype: KernelDtype,
    body: Option<&str>,
    runs: usize,
) -> Result<(Work, f64), CliError> {
    Ok(match op {
        "fused" => fused(shape, body, runs)?,
        "matmul" => {
            let d = parse_shape(op, shape, &[3])?;
            let (m, n, k) = (d[0], d[1], d[2]);
            if dtype == KernelDtype::Bf16 {
                let mm = MatmulBf16::new(m, n, k);
                let w = Work {
                    label: format!("matmul bf16 weights {m}x{n}x{k}"),
                    flops: mm.flops(),
                    bytes: (4 * m * k + 2 * k * n + 4 * m * n) as f64,
                };
                (w, median_secs(runs, || mm.run()))
            } else {
                let mm = Matmul::new(m, n, k);
                let w = Work {
                    label: format!("matmul f32 {m}x{n}x{k}"),
                    flops: mm.flops(),
                    bytes: 4.0 * (m * k + k * n + m * n) as f64,
                };
                (w, median_secs(runs, || mm.run()))
            }
        }
        "gemv" => {
            let d = parse_shape(op, shape, &[2])?;
            let g = Gemv::new(d[0], d[1], dtype);
            let name = match dtype {
                KernelDtype::F32 => "f32",
                KernelDtype::Bf16 => "bf16",
                KernelDtype::Fp8 => "fp8 e4m3",
            };
            let w = Work {
                label: format!("gemv {name} weights {}x{}", d[0], d[1]),
                flops: 2.0 * (d[0] * d[1]) as f64,
                bytes: g.weight_bytes(),
            };
            (w, median_secs(runs, || g.run()))
        }
        "attention" => attention(shape, dtype, runs)?,
        "moe" => moe(shape, dtype, runs)?,
        "rmsnorm" | "layernorm" | "softmax" => {
            let d = parse_shape(op, shape, &[2])?;
            let (rows, cols) = (d[0], d[1]);
            let x = data(rows * cols, 0.0);
            let (g, b) = (data(cols, 3.0), data(cols, 4.0));
            let mut y = vec![0.0; rows * cols];
            let n = (rows * cols) as f64;
            let (flops, params) = match op {
                "rmsnorm" => (4.0 * n, 1.0),
                "layernorm" => (8.0 * n, 2.0),
                _ => (20.0 * n, 0.0),
            };
            let w = Work {
                label: format!("{op} f32 {rows}x{cols}"),
                flops,
                bytes: 8.0 * n + 4.0 * params * cols as f64,
            };
            let secs = median_secs(runs, || {
                match op {
                    "rmsnorm" => rowwise::rmsnorm(rows, cols, &x, &g, 1e-6, &mut y),
                    "layernorm" => rowwise::layernorm(rows, cols, &x, &g, &b, 1e-5, &mut y),
                    _ => rowwise::softmax(rows, cols, &x, &mut y),
                }
                .expect("layout")
            });
            (w, secs)
        }
        _ => {
            let d = parse_shape(op, shape, &[1, 2])?;
            let n: usize = d.iter().product();
            let a = data(n, 0.0);
            let b = data(n, 1.0);
            let mut y = vec![0.0; n];
            let w = Work {
                label: format!("silu_mul f32 {n}"),
                flops: 20.0 * n as f64,
                bytes: 12.0 * n as f64,
            };
            (
                w,
                median_secs(runs, || {
                    elementwise::silu_mul(&a, &b, &mut y).expect("layout")
                }),
            )
        }
    })
}

/// A fused elementwise body compiled as the CPU backend compiles the optimizer's
/// `fused_elementwise` ops (`kiln_kernels::fused::Program`), over f32 operands of the shape
/// (each read once) into one output; flops count one per operation node per element.
fn fused(shape: &str, body: Option<&str>, runs: usize) -> Result<(Work, f64), CliError> {
    let Some(text) = body else {
        return Err(CliError::Input(
            "--op fused needs --body, an expression over $0, $1, ..., e.g. \"(mul (silu $0) $1)\""
                .into(),
        ));
    };
    let expr: Expr = text
        .parse()
        .map_err(|e| CliError::Input(format!("--body {text:?}: {e}")))?;
    let mut args = 0;
    let mut nodes = 0;
    expr.visit(&mut |e| match e {
        Expr::Arg(i) => args = args.max(i + 1),
        Expr::Const(_) => {}
        _ => nodes += 1,
    });
    let prog = Program::compile(&expr, &vec![DType::F32; args])
        .map_err(|e| CliError::Input(format!("--body {text:?}: {e}")))?;
    let d = parse_shape("fused", shape, &[1, 2])?;
    let n: usize = d.iter().product();
    let operands: Vec<Vec<f32>> = (0..args).map(|a| data(n, a as f32)).collect();
    let strides: Vec<usize> = match d.len() {
        1 => vec![1],
        _ => vec![d[1], 1],
    };
    let mut out = vec![0.0; n];
    let w = Work {
        label: format!("fused {text} f32 {shape}"),
        flops: (nodes * n) as f64,
        bytes: (4 * (args + 1) * n) as f64,
    };
    let secs = median_secs(runs, || {
        let views: Vec<(&[f32], &[usize])> = operands
            .iter()
            .map(|o| (o.as_slice(), strides.as_slice()))
            .collect();
        prog.run(&d, &views, &mut out).expect("dense operands")
    });
    Ok((w, secs))
}

/// Causal flash attention (the queries are the last `SQ` positions of the `SK` keys, as in
/// prefill and decode), f32, dense `[batch, heads, seq, dim]` operands; with `dtype` bf16 the
/// keys and values stored bf16 and the queries bf16 values (a bf16 model's KV cache and
/// attention operands); flops count the visible query-key pairs only.
fn attention(shape: &str, dtype: KernelDtype, runs: usize) -> Result<(Work, f64), CliError> {
    let d = parse_shape("attention", shape, &[6])?;
    let (b, hq, hkv, sq, sk, dim) = (d[0], d[1], d[2], d[3], d[4], d[5]);
    if hq % hkv != 0 || sq > sk {
        return Err(CliError::Input(format!(
            "--shape {shape:?}: the query heads ({hq}) must be a multiple of the kv heads \
             ({hkv}), and the queries ({sq}) at most the keys ({sk})"
        )));
    }
    let s = AttnShape {
        batch: b,
        q_heads: hq,
        kv_heads: hkv,
        q_len: sq,
        kv_len: sk,
        head_dim: dim,
        v_dim: dim,
    };
    let opts = AttnOptions {
        scale: 1.0 / (dim as f32).sqrt(),
        causal: true,
        window: 0,
    };
    let bf16_kv = dtype == KernelDtype::Bf16;
    let mut q = data(b * hq * sq * dim, 0.0);
    if bf16_kv {
        // A bf16 graph's queries are bf16 values too (decode then scores with `vdpbf16ps`).
        q.iter_mut().for_each(|x| *x = bf16::from_f32(*x).to_f32());
    }
    let (k, v) = (data(b * hkv * sk * dim, 1.0), data(b * hkv * sk * dim, 2.0));
    let mut out = vec![0.0; q.len()];
    let (qs, ks) = (Strides4::dense(hq, sq, dim), Strides4::dense(hkv, sk, dim));
    let visible = sq * (sk - sq) + sq * (sq + 1) / 2;
    let kv_size = if bf16_kv { 2 } else { 4 };
    let w = Work {
        label: format!(
            "attention {} causal {b}x{hq}x{hkv}x{sq}x{sk}x{dim}",
            if bf16_kv { "bf16 k/v" } else { "f32" }
        ),
        flops: 4.0 * (b * hq * visible * dim) as f64,
        bytes: (4 * 2 * q.len() + kv_size * 2 * k.len()) as f64,
    };
    let q = View {
        data: &q,
        strides: qs,
    };
    let secs = if bf16_kv {
        let narrow = |x: &[f32]| -> Vec<bf16> { x.iter().map(|&v| bf16::from_f32(v)).collect() };
        let (k, v) = (narrow(&k), narrow(&v));
        median_secs(runs, || {
            let view = |data, strides| Bf16View { data, strides };
            let (k, v) = (view(&k, ks), view(&v, ks));
            attention_bf16_kv(&s, &opts, q, k, v, None, &mut out, qs).expect("dense layout")
        })
    } else {
        median_secs(runs, || {
            let view = |data, strides| View { data, strides };
            let (k, v) = (view(&k, ks), view(&v, ks));
            attention_f32(&s, &opts, q, k, v, None, &mut out, qs).expect("dense layout")
        })
    };
    Ok((w, secs))
}

/// The CPU backend's mixture-of-experts step: the router, then each expert's SwiGLU MLP on
/// the tokens routed to it, with the experts' weights in `dtype` as precision lowering stores
/// them (bf16; fp8 e4m3 with a scale per row); bytes count the weights of the experts the
/// tokens reach (at most all of them) and the activations.
fn moe(shape: &str, dtype: KernelDtype, runs: usize) -> Result<(Work, f64), CliError> {
    let d = parse_shape("moe", shape, &[5])?;
    let (t, h, i, e, k) = (d[0], d[1], d[2], d[3], d[4]);
    if k > e {
        return Err(CliError::Input(format!(
            "--shape {shape:?}: {k} experts per token of {e}"
        )));
    }
    let x = data(t * h, 0.0);
    let gate = data(e * h, 1.0);
    let f32s: Vec<[Vec<f32>; 3]> = (0..e)
        .map(|j| {
            let s = 3.0 * j as f32;
            [data(i * h, s), data(i * h, s + 1.0), data(h * i, s + 2.0)]
        })
        .collect();
    let bf16s: Vec<Vec<bf16>> = match dtype {
        KernelDtype::Bf16 => f32s
            .iter()
            .flatten()
            .map(|w| w.iter().map(|&v| bf16::from_f32(v)).collect())
            .collect(),
        _ => Vec::new(),
    };
    let fp8s: Vec<Vec<u8>> = match dtype {
        KernelDtype::Fp8 => f32s
            .iter()
            .flatten()
            .map(|w| {
                w.iter()
                    .map(|&v| kiln::ir::f8::f32_to_f8e4m3(v * 800.0))
                    .collect()
            })
            .collect(),
        _ => Vec::new(),
    };
    let (row_scale_i, row_scale_h) = (vec![1.0 / 800.0; i], vec![1.0 / 800.0; h]);
    let weight = |j: usize| -> MoeData<'_> {
        let rows = if j % 3 == 2 {
            &row_scale_h
        } else {
            &row_scale_i
        };
        match dtype {
            KernelDtype::F32 => MoeData::F32(&f32s[j / 3][j % 3]),
            KernelDtype::Bf16 => MoeData::Narrow {
                elements: Elements::BF16(&bf16s[j]),
                scale: None,
            },
            KernelDtype::Fp8 => MoeData::Narrow {
                elements: Elements::F8E4M3(&fp8s[j]),
                scale: Some(rows),
            },
        }
    };
    let experts: Vec<[MoeData<'_>; 3]> = (0..e)
        .map(|j| [weight(3 * j), weight(3 * j + 1), weight(3 * j + 2)])
        .collect();
    let (size, name) = match dtype {
        KernelDtype::F32 => (4, "f32"),
        KernelDtype::Bf16 => (2, "bf16"),
        KernelDtype::Fp8 => (1, "fp8 e4m3"),
    };
    let mut out = vec![0.0; t * h];
    let reached = (t * k).min(e);
    let w = Work {
        label: format!("moe {name} experts {t}x{h}x{i}x{e}x{k}"),
        flops: (2 * t * e * h + t * k * 6 * h * i) as f64,
        bytes: (size * reached * 3 * h * i + 4 * (e * h + 2 * t * h)) as f64,
    };
    let secs = median_secs(runs, || {
        moe_f32(k, h, &x, MoeData::F32(&gate), &experts, &mut out).expect("dense layout")
    });
    Ok((w, secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dtype_error(op: &str, dtype: &str) -> String {
        match KernelDtype::parse(op, dtype) {
            Err(e @ CliError::Input(_)) => e.to_string(),
            other => panic!("{op} {dtype}: {other:?}"),
        }
    }

    #[test]
    fn dtypes_and_shapes_are_checked() {
        assert_eq!(KernelDtype::parse("gemv", "fp8").unwrap(), KernelDtype::Fp8);
        assert_eq!(
            KernelDtype::parse("moe", "bf16").unwrap(),
            KernelDtype::Bf16
        );
        assert!(dtype_error("softmax", "bf16").contains("f32 kernels only"));
        assert!(dtype_error("matmul", "fp8").contains("fp8: gemv and moe"));
        assert_eq!(
            KernelDtype::parse("attention", "bf16").unwrap(),
            KernelDtype::Bf16
        );
        assert!(dtype_error("gemv", "f16").contains("f32, bf16 or fp8"));
        let shape_error =
            |op: &str, shape: &str| match measure(op, shape, KernelDtype::F32, None, 1) {
                Err(e) => e.to_string(),
                Ok(_) => panic!("{op} {shape} accepted"),
            };
        assert!(shape_error("attention", "1x12x4x512x64").contains("BxHQxHKVxSQxSKxD"));
        assert!(shape_error("attention", "1x12x5x1x8x64").contains("multiple of the kv heads"));
        assert!(shape_error("attention", "1x4x4x9x8x64").contains("at most the keys"));
        assert!(shape_error("moe", "1x8x16x4x5").contains("5 experts per token of 4"));
        assert!(shape_error("layernorm", "3").contains("RxC"));
        let body_error = |body: Option<&str>| match measure("fused", "8", KernelDtype::F32, body, 1)
        {
            Err(e) => e.to_string(),
            Ok(_) => panic!("{body:?} accepted"),
        };
        assert!(body_error(None).contains("needs --body"));
        assert!(body_error(Some("(mul $0")).contains("--body"));
    }

    #[test]
    fn every_op_measures_small_shapes() {
        for (op, shape, dtype) in [
            ("matmul", "7x33x5", KernelDtype::F32),
            ("matmul", "7x33x5", KernelDtype::Bf16),
            ("gemv", "33x7", KernelDtype::Bf16),
            ("gemv", "33x7", KernelDtype::F32),
            ("gemv", "33x65", KernelDtype::Fp8),
            ("attention", "1x6x2x3x9x16", KernelDtype::F32),
            ("attention", "2x4x4x1x33x8", KernelDtype::F32),
            ("moe", "3x8x16x4x2", KernelDtype::F32),
            ("moe", "1x8x16x4x2", KernelDtype::Bf16),
            ("moe", "9x8x16x4x2", KernelDtype::Fp8),
            ("rmsnorm", "3x33", KernelDtype::F32),
            ("layernorm", "3x33", KernelDtype::F32),
            ("softmax", "3x33", KernelDtype::F32),
            ("silu_mul", "33", KernelDtype::F32),
            ("silu_mul", "3x7", KernelDtype::F32),
        ] {
            let (work, secs) = measure(op, shape, dtype, None, 2).unwrap();
            assert!(work.flops > 0.0 && work.bytes > 0.0 && secs >= 0.0, "{op}");
        }
        for (shape, body) in [
            ("33", "(mul (silu $0) $1)"),
            ("3x7", "(add (mul $0 $1) $2)"),
        ] {
            let (work, _) = measure("fused", shape, KernelDtype::F32, Some(body), 2).unwrap();
            assert!(work.flops > 0.0 && work.bytes > 0.0, "{body}");
        }
    }
}
