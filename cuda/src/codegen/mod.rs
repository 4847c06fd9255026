//! CUDA C sources: the code generator for fused elementwise bodies ([`elementwise`]) and the
//! hand-written kernels (`cu/*.cu`), instantiated per storage type and head dimension by
//! [`Kernel::source`].
//!
//! Every module starts with `cu/prelude.cuh` (storage types and conversions), `cu/math.cuh`
//! (scalar helpers, valid in host code too: [`MATH`]) and `cu/reduce.cuh` (block reductions);
//! `KILN_FP8` enables `cuda_fp8.h`, only for architectures with fp8 ([`Arch::has_fp8`]).
//! Kernel entry points are `extern "C"` and named `<kernel>_<suffix>` through `KILN_NAME`.

pub mod elementwise;

use crate::compile::{Arch, KernelSource};
use crate::CudaError;
use kiln_ir::DType;

const PRELUDE: &str = include_str!("cu/prelude.cuh");
/// kiln's scalar helpers (NaN-propagating min/max, float-to-int casts, wrapping integer
/// division, GELU), plain C++ that also compiles for the host.
pub const MATH: &str = include_str!("cu/math.cuh");
const REDUCE: &str = include_str!("cu/reduce.cuh");
/// Tensor-core MMA, ldmatrix, cp.async and exp2 helpers of the attention kernels.
const TENSOR: &str = include_str!("cu/tensor.cuh");

/// 16-byte vectors each thread of a row-wise kernel keeps in registers (`ROW_R` in
/// `cu/rowwise.cu`): rows of up to `ROW_VECTORS * 1024` vectors are read once.
pub const ROW_VECTORS: usize = 4;

/// Query heads one decode block serves (`HG` in `cu/decode.cu`, one warp each: the kernel
/// is laid out for 4): a KV group's keys and values are read once for up to this many heads.
pub const DECODE_HEADS: usize = 4;
/// Keys per shared-memory tile of the decode kernel (`TK` in `cu/decode.cu`; its softmax
/// takes two keys per lane, so 64).
pub const DECODE_TILE: usize = 64;

/// The CUDA C storage type of a dtype.
pub fn c_type(d: DType) -> &'static str {
    match d {
        DType::F32 => "float",
        DType::F16 => "__half",
        DType::BF16 => "__nv_bfloat16",
        DType::F8E4M3 => "__nv_fp8_e4m3",
        DType::F8E5M2 => "__nv_fp8_e5m2",
        DType::I64 => "long long",
        DType::I32 => "int",
        DType::U8 | DType::Bool => "unsigned char",
    }
}

/// A module's full text: the prelude with `defines` before it, then `body`.
pub(crate) fn assemble(arch: Arch, defines: &[(&str, String)], body: &str) -> String {
    let mut s = format!("#define KILN_FP8 {}\n", u8::from(arch.has_fp8()));
    for (k, v) in defines {
        s += &format!("#define {k} {v}\n");
    }
    s + PRELUDE + "\n" + MATH + "\n" + REDUCE + "\n" + body
}

/// The hand-written kernel families.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kernel {
    /// `rmsnorm_<t>`, `layernorm_<t>`, `softmax_<t>` over the last axis (f32, f16, bf16).
    Rowwise(DType),
    /// `rope_<t>`: rotate-half rotary embedding with cos/sin tables (f32, f16, bf16).
    Rope(DType),
    /// `embedding_<t>`: row gather by i64 ids (any float storage type).
    Embedding(DType),
    /// `argmax_<t>`: greedy sampling, one index per row (f32, f16, bf16).
    Argmax(DType),
    /// `attention_prefill{,_wide}_bf16_d<D>`: flash attention prefill, bf16, D = 64 or 128,
    /// 16 or 32 query rows per warp.
    AttentionPrefill(usize),
    /// `attention_decode_{split,combine}_bf16_d<D>`: split-KV flash decoding, D = 64 or 128.
    AttentionDecode(usize),
    /// `gemv_<w>`: decode GEMV with bf16 or fp8 e4m3 weights (fp8 on sm_89+).
    Gemv(DType),
}

fn suffix(d: DType) -> &'static str {
    d.name()
}

impl Kernel {
    /// Every hand-written module kiln builds for `arch`.
    pub fn all(arch: Arch) -> Vec<Kernel> {
        let mut v = vec![];
        for d in [DType::F32, DType::F16, DType::BF16] {
            v.extend([
                Kernel::Rowwise(d),
                Kernel::Rope(d),
                Kernel::Embedding(d),
                Kernel::Argmax(d),
            ]);
        }
        for hd in [64, 128] {
            v.extend([Kernel::AttentionPrefill(hd), Kernel::AttentionDecode(hd)]);
        }
        v.push(Kernel::Gemv(DType::BF16));
        if arch.has_fp8() {
            v.push(Kernel::Gemv(DType::F8E4M3));
        }
        v
    }

    /// The module's `extern "C"` entry points.
    pub fn entries(self) -> Vec<String> {
        let s = self.suffix();
        let names: &[&str] = match self {
            Kernel::Rowwise(_) => &["rmsnorm", "layernorm", "softmax"],
            Kernel::Rope(_) => &["rope"],
            Kernel::Embedding(_) => &["embedding"],
            Kernel::Argmax(_) => &["argmax"],
            Kernel::AttentionPrefill(_) => &["attention_prefill", "attention_prefill_wide"],
            Kernel::AttentionDecode(_) => &["attention_decode_split", "attention_decode_combine"],
            Kernel::Gemv(_) => &["gemv"],
        };
        names.iter().map(|n| format!("{n}_{s}")).collect()
    }

    fn suffix(self) -> String {
        match self {
            Kernel::Rowwise(d) | Kernel::Rope(d) | Kernel::Embedding(d) | Kernel::Argmax(d) => {
                suffix(d).to_string()
            }
            Kernel::AttentionPrefill(hd) | Kernel::AttentionDecode(hd) => format!("bf16_d{hd}"),
            Kernel::Gemv(w) => suffix(w).to_string(),
        }
    }

    /// The module's source for `arch`, or why this instantiation does not exist.
    pub fn source(self, arch: Arch) -> Result<KernelSource, CudaError> {
        let (body, t) = match self {
            Kernel::Rowwise(d) => (include_str!("cu/rowwise.cu").to_string(), d),
            Kernel::Rope(d) => (include_str!("cu/rope.cu").to_string(), d),
            Kernel::Embedding(d) => (include_str!("cu/gather.cu").to_string(), d),
            Kernel::Argmax(d) => (include_str!("cu/argmax.cu").to_string(), d),
            Kernel::AttentionPrefill(_) => (
                TENSOR.to_string() + include_str!("cu/attention.cu"),
                DType::BF16,
            ),
            Kernel::AttentionDecode(_) => (
                TENSOR.to_string() + include_str!("cu/decode.cu"),
                DType::BF16,
            ),
            Kernel::Gemv(w) => (include_str!("cu/gemv.cu").to_string(), w),
        };
        let float_storage = matches!(t, DType::F32 | DType::F16 | DType::BF16);
        let ok = match self {
            Kernel::AttentionPrefill(hd) | Kernel::AttentionDecode(hd) => hd == 64 || hd == 128,
            Kernel::Gemv(w) => w == DType::BF16 || (w == DType::F8E4M3 && arch.has_fp8()),
            _ => float_storage,
        };
        if !ok {
            return Err(CudaError::Codegen(format!(
                "no {self:?} kernel for {arch} (fp8 needs sm_89 or later)"
            )));
        }
        let s = self.suffix();
        let mut defines = vec![
            ("T", c_type(t).to_string()),
            ("KILN_NAME(x)", format!("x##_{s}")),
        ];
        match self {
            Kernel::AttentionPrefill(hd) => defines.push(("D", hd.to_string())),
            Kernel::AttentionDecode(hd) => defines.extend([
                ("D", hd.to_string()),
                ("HG", DECODE_HEADS.to_string()),
                ("TK", DECODE_TILE.to_string()),
            ]),
            Kernel::Rowwise(_) => defines.push(("ROW_R", ROW_VECTORS.to_string())),
            Kernel::Gemv(w) => {
                defines.push(("W_T", c_type(w).to_string()));
                defines.push(("VEC", (16 / w.size_bytes()).to_string()));
            }
            _ => {}
        }
        Ok(KernelSource {
            name: format!(
                "{}_{s}",
                self.entries()[0].trim_end_matches(&format!("_{s}"))
            ),
            source: assemble(arch, &defines, &body),
            entries: self.entries(),
        })
    }
}
