//! The op set: every operation a kiln graph can contain, with its exact semantics.
//!
//! Primitive ops are what model code traces into; composite ops (`rmsnorm`, `layernorm`,
//! `rotary`, `linear`, `packed_linear`, `attention`, `swiglu`, `moe`, `fused_elementwise`)
//! are what the optimizer creates and backends implement as single kernels.
//! Each op's semantics is stated on its variant; [`UnaryOp::eval`], [`BinaryOp::eval`] and
//! [`CmpOp::eval`] define the scalar functions, computed in f64 and then rounded to the
//! result dtype: to f32 first, then (for f16, bf16 and fp8) from that f32 to the narrower
//! format, as f32-accumulating kernels do. Integer results wrap as the dtype's C cast would.
//! Shape and dtype rules live in [`crate::infer`].
//!
//! Edge cases: max, min and argmax over an empty axis are run-time errors; sum over an empty
//! axis is 0 and mean is NaN; `max(-0.0, 0.0)` may give either zero.

use crate::{DType, Dim, Expr, Literal, Shape, F64};
use serde::{Deserialize, Serialize};

/// Elementwise functions of one operand. Float operands unless stated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum UnaryOp {
    /// `-x` (floats and signed integers).
    Neg,
    /// `e^x`.
    Exp,
    /// Natural log; `log(0) = -inf`, `log(x<0) = NaN`.
    Log,
    /// Square root; NaN below zero.
    Sqrt,
    /// `1 / sqrt(x)`.
    Rsqrt,
    /// Hyperbolic tangent.
    Tanh,
    /// The error function.
    Erf,
    /// `1 / (1 + e^-x)`.
    Sigmoid,
    /// `max(x, 0)`, NaN stays NaN (floats and integers).
    Relu,
    /// Exact GELU: `x/2 * (1 + erf(x / sqrt 2))` (`torch.nn.functional.gelu`).
    Gelu,
    /// Tanh GELU: `x/2 * (1 + tanh(sqrt(2/pi) * (x + 0.044715 x^3)))` (`approximate='tanh'`).
    GeluTanh,
    /// `x * sigmoid(x)` (SiLU / swish).
    Silu,
    /// Sine (radians).
    Sin,
    /// Cosine (radians).
    Cos,
    /// `1 / x`.
    Recip,
    /// `|x|` (floats and signed integers).
    Abs,
    /// Logical not (bool only).
    Not,
}

impl UnaryOp {
    /// Every unary op.
    pub const ALL: [UnaryOp; 17] = [
        UnaryOp::Neg,
        UnaryOp::Exp,
        UnaryOp::Log,
        UnaryOp::Sqrt,
        UnaryOp::Rsqrt,
        UnaryOp::Tanh,
        UnaryOp::Erf,
        UnaryOp::Sigmoid,
        UnaryOp::Relu,
        UnaryOp::Gelu,
        UnaryOp::GeluTanh,
        UnaryOp::Silu,
        UnaryOp::Sin,
        UnaryOp::Cos,
        UnaryOp::Recip,
        UnaryOp::Abs,
        UnaryOp::Not,
    ];

    /// Mnemonic in the text format.
    pub fn name(self) -> &'static str {
        match self {
            UnaryOp::Neg => "neg",
            UnaryOp::Exp => "exp",
            UnaryOp::Log => "log",
            UnaryOp::Sqrt => "sqrt",
            UnaryOp::Rsqrt => "rsqrt",
            UnaryOp::Tanh => "tanh",
            UnaryOp::Erf => "erf",
            UnaryOp::Sigmoid => "sigmoid",
            UnaryOp::Relu => "relu",
            UnaryOp::Gelu => "gelu",
            UnaryOp::GeluTanh => "gelu_tanh",
            UnaryOp::Silu => "silu",
            UnaryOp::Sin => "sin",
            UnaryOp::Cos => "cos",
            UnaryOp::Recip => "recip",
            UnaryOp::Abs => "abs",
            UnaryOp::Not => "not",
        }
    }

    /// The scalar function on a float (bool `not` maps 0 to 1 and anything else to 0).
    pub fn eval(self, x: f64) -> f64 {
        match self {
            UnaryOp::Neg => -x,
            UnaryOp::Exp => x.exp(),
            UnaryOp::Log => x.ln(),
            UnaryOp::Sqrt => x.sqrt(),
            UnaryOp::Rsqrt => 1.0 / x.sqrt(),
            UnaryOp::Tanh => x.tanh(),
            UnaryOp::Erf => libm::erf(x),
            UnaryOp::Sigmoid => 1.0 / (1.0 + (-x).exp()),
            UnaryOp::Relu => {
                if x < 0.0 {
                    0.0
                } else {
                    x
                }
            }
            UnaryOp::Gelu => 0.5 * x * (1.0 + libm::erf(x / std::f64::consts::SQRT_2)),
            UnaryOp::GeluTanh => {
                let k = (2.0 / std::f64::consts::PI).sqrt();
                0.5 * x * (1.0 + (k * (x + 0.044715 * x * x * x)).tanh())
            }
            UnaryOp::Silu => x / (1.0 + (-x).exp()),
            UnaryOp::Sin => x.sin(),
            UnaryOp::Cos => x.cos(),
            UnaryOp::Recip => 1.0 / x,
            UnaryOp::Abs => x.abs(),
            UnaryOp::Not => {
                if x == 0.0 {
                    1.0
                } else {
                    0.0
                }
            }
        }
    }
}

/// Elementwise functions of two operands of one dtype, broadcast by numpy's rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum BinaryOp {
    /// `a + b`.
    Add,
    /// `a - b`.
    Sub,
    /// `a * b`.
    Mul,
    /// `a / b` (floats: IEEE, `x/0 = ±inf`; integers: truncating, division by zero is a run-time error).
    Div,
    /// `a ^ b` (floats; negative base with non-integer exponent is NaN).
    Pow,
    /// Larger of the two; NaN if either is NaN (`torch.maximum`).
    Max,
    /// Smaller of the two; NaN if either is NaN (`torch.minimum`).
    Min,
    /// Logical and (bool only).
    And,
    /// Logical or (bool only).
    Or,
}

impl BinaryOp {
    /// Every binary op.
    pub const ALL: [BinaryOp; 9] = [
        BinaryOp::Add,
        BinaryOp::Sub,
        BinaryOp::Mul,
        BinaryOp::Div,
        BinaryOp::Pow,
        BinaryOp::Max,
        BinaryOp::Min,
        BinaryOp::And,
        BinaryOp::Or,
    ];

    /// Mnemonic in the text format.
    pub fn name(self) -> &'static str {
        match self {
            BinaryOp::Add => "add",
            BinaryOp::Sub => "sub",
            BinaryOp::Mul => "mul",
            BinaryOp::Div => "div",
            BinaryOp::Pow => "pow",
            BinaryOp::Max => "max",
            BinaryOp::Min => "min",
            BinaryOp::And => "and",
            BinaryOp::Or => "or",
        }
    }

    /// The scalar function on floats (bools as 0/1).
    pub fn eval(self, a: f64, b: f64) -> f64 {
        match self {
            BinaryOp::Add => a + b,
            BinaryOp::Sub => a - b,
            BinaryOp::Mul => a * b,
            BinaryOp::Div => a / b,
            BinaryOp::Pow => a.powf(b),
            BinaryOp::Max => {
                if a.is_nan() || b.is_nan() {
                    f64::NAN
                } else {
                    a.max(b)
                }
            }
            BinaryOp::Min => {
                if a.is_nan() || b.is_nan() {
                    f64::NAN
                } else {
                    a.min(b)
                }
            }
            BinaryOp::And => f64::from(u8::from(a != 0.0 && b != 0.0)),
            BinaryOp::Or => f64::from(u8::from(a != 0.0 || b != 0.0)),
        }
    }
}

/// Elementwise comparisons of two operands of one dtype, broadcast; the result is bool.
/// Comparisons with NaN are false except `ne`, as in IEEE 754.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum CmpOp {
    /// `a == b`.
    Eq,
    /// `a != b`.
    Ne,
    /// `a < b`.
    Lt,
    /// `a <= b`.
    Le,
    /// `a > b`.
    Gt,
    /// `a >= b`.
    Ge,
}

impl CmpOp {
    /// Every comparison.
    pub const ALL: [CmpOp; 6] = [
        CmpOp::Eq,
        CmpOp::Ne,
        CmpOp::Lt,
        CmpOp::Le,
        CmpOp::Gt,
        CmpOp::Ge,
    ];

    /// Mnemonic in the text format.
    pub fn name(self) -> &'static str {
        match self {
            CmpOp::Eq => "eq",
            CmpOp::Ne => "ne",
            CmpOp::Lt => "lt",
            CmpOp::Le => "le",
            CmpOp::Gt => "gt",
            CmpOp::Ge => "ge",
        }
    }

    /// The comparison on any ordered values.
    pub fn eval<T: PartialOrd>(self, a: T, b: T) -> bool {
        match self {
            CmpOp::Eq => a == b,
            CmpOp::Ne => a != b,
            CmpOp::Lt => a < b,
            CmpOp::Le => a <= b,
            CmpOp::Gt => a > b,
            CmpOp::Ge => a >= b,
        }
    }
}

/// Reductions over a set of axes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum ReduceOp {
    /// Sum (accumulated in f64 for floats, i64 for integers).
    Sum,
    /// Arithmetic mean (floats only).
    Mean,
    /// Maximum; NaN if any element is NaN.
    Max,
    /// Minimum; NaN if any element is NaN.
    Min,
}

impl ReduceOp {
    /// Every reduction.
    pub const ALL: [ReduceOp; 4] = [ReduceOp::Sum, ReduceOp::Mean, ReduceOp::Max, ReduceOp::Min];

    /// Mnemonic in the text format.
    pub fn name(self) -> &'static str {
        match self {
            ReduceOp::Sum => "reduce_sum",
            ReduceOp::Mean => "reduce_mean",
            ReduceOp::Max => "reduce_max",
            ReduceOp::Min => "reduce_min",
        }
    }
}

/// An operation. Operands are listed on the node; attributes live here.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Op {
    /// A graph input, bound by name at run time (token ids, masks, KV cache). No operands.
    Input {
        /// The input's name.
        name: String,
    },
    /// A named parameter (weight), bound by name from a checkpoint. No operands.
    Param {
        /// The parameter's name, e.g. `model.layers.0.mlp.up_proj.weight`.
        name: String,
    },
    /// A constant tensor of fixed shape. No operands.
    Const {
        /// Its value.
        value: Literal,
    },
    /// Elementwise unary function.
    Unary(UnaryOp),
    /// Elementwise binary function with broadcasting; both operands of one dtype.
    Binary(BinaryOp),
    /// Elementwise comparison with broadcasting; result bool.
    Compare(CmpOp),
    /// `where(cond, a, b)`: `a` where `cond` is true, else `b`; all three broadcast together.
    Where,
    /// Converts the element type. Float to integer truncates toward zero (NaN gives 0; out of
    /// range saturates to i64, then wraps to the dtype); to bool is `x != 0`;
    /// to f16/bf16 rounds to nearest even; to fp8 rounds as PyTorch's cast (see [`crate::f8`]).
    Cast {
        /// The result dtype.
        to: DType,
    },
    /// Reduces over `axes` (strictly increasing), removing them or keeping them as size 1.
    Reduce {
        /// Which reduction.
        op: ReduceOp,
        /// The reduced axes, strictly increasing.
        axes: Vec<usize>,
        /// Keep reduced axes as size 1.
        keepdim: bool,
    },
    /// Index (i64) of the largest element along `axis`; ties give the first index; NaN counts
    /// as larger than everything (as `torch.argmax`).
    ArgMax {
        /// The reduced axis.
        axis: usize,
        /// Keep the axis as size 1.
        keepdim: bool,
    },
    /// Indices (i64) of the `k` largest elements along `axis`, largest first; ties give the lower
    /// index first. The axis becomes size `k`.
    TopK {
        /// How many.
        k: usize,
        /// The axis searched.
        axis: usize,
    },
    /// `exp(x - max) / sum(exp(x - max))` along `axis`; a row of all `-inf` gives NaN (as PyTorch).
    Softmax {
        /// The normalized axis.
        axis: usize,
    },
    /// `x - max - log(sum(exp(x - max)))` along `axis`.
    LogSoftmax {
        /// The normalized axis.
        axis: usize,
    },
    /// Batched matrix product `a[..., m, k] · b[..., k, n]`, batch axes broadcast (rank ≥ 2 each).
    /// A transpose flag reads that operand's last two axes swapped.
    MatMul {
        /// Read `a` as `[..., k, m]` transposed.
        transpose_a: bool,
        /// Read `b` as `[..., n, k]` transposed.
        transpose_b: bool,
    },
    /// Same elements in row-major order, new shape of equal element count.
    Reshape {
        /// The new shape.
        shape: Shape,
    },
    /// Axis permutation: result axis `i` is operand axis `perm[i]`.
    Permute {
        /// A permutation of `0..rank`.
        perm: Vec<usize>,
    },
    /// Broadcasts the operand to `shape` (numpy rules, leading axes may be added).
    Expand {
        /// The target shape.
        shape: Shape,
    },
    /// Elements `start..end` (step 1) along `axis`; bounds may be symbolic (`past..past+seq`).
    /// At run time `0 <= start <= end <= size` must hold.
    Slice {
        /// The sliced axis.
        axis: usize,
        /// First index kept.
        start: Dim,
        /// One past the last index kept.
        end: Dim,
    },
    /// Joins one or more operands of equal dtype and rank along `axis`.
    Concat {
        /// The joined axis.
        axis: usize,
    },
    /// `index_select`: operands `(data, indices)`; the result's shape is
    /// `data[..axis] ++ indices.shape ++ data[axis+1..]` and picks `data` rows by index
    /// (integer indices; out-of-range is a run-time error). An embedding lookup is axis 0.
    Gather {
        /// The indexed axis of `data`.
        axis: usize,
    },
    /// `take_along_dim`: operands `(data, indices)` of equal rank; the result has the indices'
    /// shape and `out[.., i, ..] = data[.., indices[.., i, ..], ..]` along `axis` (other axes equal).
    GatherAlong {
        /// The indexed axis.
        axis: usize,
    },
    /// A tensor whose element is its index along `axis` (`arange` broadcast to `shape`). No operands.
    Iota {
        /// Result dtype (integer or float).
        dtype: DType,
        /// Result shape.
        shape: Shape,
        /// The counting axis.
        axis: usize,
    },
    /// Triangular mask on the last two axes (`torch.triu`/`torch.tril`): with `upper`, keeps
    /// elements where `col - row >= diagonal`, otherwise keeps `col - row <= diagonal`; the rest
    /// become zero (false for bool).
    Triangle {
        /// `triu` if true, `tril` if false.
        upper: bool,
        /// Diagonal offset (may be symbolic, e.g. `past+1`).
        diagonal: Dim,
    },
    /// Composite: `x / sqrt(mean(x^2 over last axis) + eps) * weight`, statistics in f32 or wider;
    /// operands `(x, weight[last])`.
    RmsNorm {
        /// Added to the mean square.
        eps: F64,
    },
    /// Composite: `(x - mean) / sqrt(var + eps) * weight + bias` over the last axis
    /// (biased variance); operands `(x, weight[last], bias[last])`.
    LayerNorm {
        /// Added to the variance.
        eps: F64,
    },
    /// Composite rotary position embedding in rotate-half form (Llama's `apply_rotary_pos_emb`):
    /// operands `(x[.., d], cos, sin)`, `d` even, `cos` and `sin` broadcastable to `x`'s shape,
    /// all one float dtype; the result is `x * cos + rotate_half(x) * sin` with
    /// `rotate_half(x)[.., i] = -x[.., i + d/2]` for `i < d/2` and `x[.., i - d/2]` after, each
    /// product and the sum rounded to the dtype as the primitive ops would.
    Rotary,
    /// Composite linear layer with its epilogue (the matmul epilogues backends run in the GEMM's
    /// output stage). Operands `(x, w)`, then `scale` if `scaled`, then `addend` if `added`,
    /// all of one numeric dtype (not bool). The result is `y = matmul(x, w)` with
    /// `transpose_a = false` and this op's `transpose_b` (see [`Op::MatMul`]), then, if
    /// `scaled`, `y * scale` with `scale` of shape `[n]`, `n` the product's last axis (one
    /// factor per output column: fp8's per-channel weight scales), then, if `added`,
    /// `y + addend` with `addend` of the product's shape (a residual) or `[n]` (a bias). Each
    /// step is its primitive op ([`Op::MatMul`], [`Op::Binary`]), rounded as that op rounds,
    /// so the op equals that chain bit for bit ([`crate::decompose`]).
    ///
    /// Then the head layout of an attention projection, when `heads = h > 0`: the result
    /// `y[.., s, n]` (`n` fixed, a multiple of `h`) is reshaped to `[.., s, h, n/h]` and
    /// permuted to `[.., h, s, n/h]` (the two axes before the last swapped: [`Op::Reshape`],
    /// [`Op::Permute`] `[0, 2, 1, 3]` for a `[b, s, n]` product); then, if `rotary` (which
    /// requires `heads > 0`), [`Op::Rotary`] of those heads with the `cos` and `sin` operands,
    /// which come last. With `heads = 0` the result has the product's type, else
    /// `[.., h, s, n/h]`.
    Linear {
        /// Read `w` as `[.., n, k]` transposed (a checkpoint's `[out, in]` weight).
        transpose_b: bool,
        /// A per-column `scale` operand follows `w`.
        scaled: bool,
        /// An `addend` operand follows `w` and the scale.
        added: bool,
        /// Split the result's last axis into this many heads moved before the rows; 0 for none
        /// (the default when absent from serialized graphs written before the field existed).
        #[serde(default)]
        heads: usize,
        /// Rotate the heads (rotary embedding): `cos` and `sin` operands come last.
        #[serde(default)]
        rotary: bool,
    },
    /// Composite packed projection (a fused QKV): `g >= 1` [`Op::Linear`] layers with head
    /// layouts over one activation, their heads written side by side. Operands: `x`, then for
    /// each group `i` in order its weight `w_i`, its per-column `scale_i` if `i < scaled`, its
    /// `addend_i` if `added`; then `cos` and `sin` if `rotary > 0`. Group `i` is
    /// `linear(x, w_i[, scale_i][, addend_i][, cos, sin]) heads=heads[i]` with this op's
    /// `transpose_b`, rotated when `i < rotary` (so the rotated groups come first, as q and k
    /// before v), each of type `[.., heads[i], s, d]`: every group must have one dtype, one
    /// head size `d` and one batch and row shape. The result is their [`Op::Concat`] along
    /// the head axis (rank − 3): `[.., Σ heads, s, d]`, group `i` at heads
    /// `Σ_{j<i} heads[j] ..` (computed as that chain, bit for bit: [`crate::decompose`]).
    ///
    /// No weight is concatenated: the weights stay separate operands, so a backend runs one
    /// GEMM over the groups' output columns (or one per group) and nothing is computed at
    /// load. A [`Op::Slice`] of the result that selects exactly one group's heads is that
    /// group's projection: [`crate::decompose::group_part`] recognizes it and
    /// [`crate::decompose::expand`] replaces it by the group's own result, so no backend
    /// copies it (the kernel count leaves such parts out for that reason).
    PackedLinear {
        /// Read every weight as `[.., n_i, k]` transposed.
        transpose_b: bool,
        /// Heads of each group, in order (each > 0).
        heads: Vec<usize>,
        /// How many leading groups carry a per-column scale operand (fp8's scaled q with
        /// bf16 k and v: 1).
        scaled: usize,
        /// Every group carries an addend (a bias) after its weight and scale.
        added: bool,
        /// How many leading groups are rotated by the `cos` and `sin` operands, which come last.
        rotary: usize,
    },
    /// Composite scaled-dot-product attention. Operands `(q[b, hq, sq, d], k[b, hkv, sk, d],
    /// v[b, hkv, sk, dv])` and optionally an additive `mask` broadcastable to `[b, hq, sq, sk]`.
    /// `hq` is a multiple of `hkv`; query head `h` uses key/value head `h / (hq / hkv)`.
    /// Query `i` sits at position `sk - sq + i`; with `causal` it sees keys `j <= pos`, and a
    /// sliding `window = w > 0` (which requires `causal`) also hides keys `j <= pos - w`.
    /// Scores are `scale * q·k + mask`, softmax over the visible keys; a query with no visible
    /// key yields zeros, while visible keys all masked with `-inf` give NaN (as softmax does).
    /// Result `[b, hq, sq, dv]`; with `merge_heads`, that result permuted to `[b, sq, hq, dv]`
    /// and reshaped to `[b, sq, hq·dv]` ([`Op::Permute`] `[0, 2, 1, 3]`, [`Op::Reshape`]): the
    /// heads side by side in each row, as the output projection reads them.
    Attention {
        /// Multiplies `q·k`.
        scale: F64,
        /// Apply the causal mask.
        causal: bool,
        /// Sliding-window size; 0 for none.
        window: usize,
        /// Write the result as rows `[b, sq, hq·dv]` instead of heads (false when absent from
        /// serialized graphs written before the field existed).
        #[serde(default)]
        merge_heads: bool,
    },
    /// Composite SwiGLU of two linear layers over one activation (a gated MLP's gate and up
    /// projections with its activation). Operands `(x, w_gate, w_up)`, then
    /// `(scale_gate, scale_up)` if `scaled`. With `g` and `u` the [`Op::Linear`] layers
    /// `linear(x, w_gate[, scale_gate])` and `linear(x, w_up[, scale_up])` (this op's
    /// `transpose_b` and `scaled`, no addend, no heads), which must have one type, the result is
    /// `silu(g) * u`: [`UnaryOp::Silu`] then [`BinaryOp::Mul`], each rounded to the dtype as that
    /// primitive op would, so the op equals that chain bit for bit ([`crate::decompose`]). The
    /// result has `g`'s type; float dtypes only.
    SwiGlu {
        /// Read both weights as `[.., n, k]` transposed.
        transpose_b: bool,
        /// Per-column scale operands follow the weights.
        scaled: bool,
    },
    /// Composite sparse mixture-of-experts block (Mixtral's `block_sparse_moe`). Variadic
    /// operands `(x[.., h], gate[E, h], w1_0, w3_0, w2_0, w1_1, w3_1, w2_1, ..)`: after `x` and
    /// the router weight come `E >= 1` experts, three operands each, `w1_e[i, h]` (gate
    /// projection), `w3_e[i, h]` (up projection) and `w2_e[h, i]` (down projection), as the
    /// checkpoint stores them (`experts.{e}.w1.weight`, ...); all of `x`'s float dtype, `i`
    /// the same for every expert, `1 <= top_k <= E`. The result has `x`'s type.
    ///
    /// For each token (each row of `x` along its last axis), with `d` the dtype and every step
    /// rounded to its result dtype as the primitive op would:
    /// 1. `probs = softmax(cast(x·gateᵀ, f32))` over the experts (the cast absent when `d` is
    ///    f32);
    /// 2. `chosen = topk(probs, top_k)` (largest first, ties to the lower expert, as
    ///    [`Op::TopK`]); `p = probs[chosen]`; `w = cast(p / sum(p), d)`;
    /// 3. `y_e = (silu(x·w1_eᵀ) * (x·w3_eᵀ))·w2_eᵀ` for each chosen expert `e`, and
    ///    `out = Σ w_e * y_e` accumulated in ascending expert order (each product and each
    ///    partial sum rounded to `d`).
    ///
    /// This is the dense traced form (`models/src/moe.rs`) with every unchosen expert's
    /// contribution, `0 * y_e`, left out: the two agree except that an unchosen expert's
    /// non-finite output cannot reach the result here, and a zero may differ in sign.
    /// Backends implement it as token permutation, grouped GEMM and a weighted scatter: no
    /// expert computes on tokens not routed to it.
    Moe {
        /// Experts chosen per token.
        top_k: usize,
    },
    /// Composite: the logits of an output projection whose weight is stored in two parts, a
    /// coarse one that every column reads and a residual read only where it can change which
    /// column is largest. Operands `(coarse[.., n], x[.., k], r[n, k], s[n], bound[n])`, all
    /// float: `coarse` is `x` times the coarse part (e.g. an fp8 `linear`), the weight's
    /// residual is `s[j] · r[j, :]` (`r` stored narrow, e.g. e4m3, read as its f32 values),
    /// and `bound[j] ≥ 0` bounds the residual row's L2 norm. For each row of `x` (the leading
    /// axes of `coarse` and `x` agree), with `e_j = bound_j · ‖x‖₂` (so a residual product
    /// `|x · s_j r_j|` is at most `e_j` when the bound holds) and `m = max_j (coarse_j − e_j)`,
    /// every column with `coarse_j + e_j ≥ m` (the candidates) becomes `coarse_j + s_j ·
    /// (x · r_j)`, computed exactly and rounded once; the other columns are `coarse_j`. So the
    /// largest value and its column are those of the whole refined product (coarse plus
    /// residual for every column), reading the residual for the candidates only. NaN
    /// anywhere in a row's `coarse` or `x` makes every column of it a candidate. The result
    /// has `coarse`'s type.
    RefineLogits,
    /// Composite: a tree of elementwise ops ([`Expr`]) over the operands `$0`, `$1`, ...
    /// (at least one, each referred to by the body), evaluated as one kernel. Every operand is
    /// broadcast to the result shape, the numpy broadcast of all operand shapes; then, for
    /// each element, every node of the body is computed exactly as its primitive op
    /// ([`Op::Unary`], [`Op::Binary`], [`Op::Compare`], [`Op::Where`], [`Op::Cast`], a rank-0
    /// [`Op::Const`]) computes that element, rounded to the node's own dtype (which the
    /// primitive op's typing rule gives). So a fused node equals, bit for bit, the chain of
    /// primitive ops it replaces; an integer division by zero anywhere in the body is an
    /// error, as it is in that chain. The result has the body's dtype.
    FusedElementwise {
        /// The expression computed per element.
        body: Expr,
    },
}

impl Op {
    /// The mnemonic used in the text format.
    pub fn name(&self) -> &'static str {
        match self {
            Op::Input { .. } => "input",
            Op::Param { .. } => "param",
            Op::Const { .. } => "const",
            Op::Unary(u) => u.name(),
            Op::Binary(b) => b.name(),
            Op::Compare(c) => c.name(),
            Op::Where => "where",
            Op::Cast { .. } => "cast",
            Op::Reduce { op, .. } => op.name(),
            Op::ArgMax { .. } => "argmax",
            Op::TopK { .. } => "topk",
            Op::Softmax { .. } => "softmax",
            Op::LogSoftmax { .. } => "log_softmax",
            Op::MatMul { .. } => "matmul",
            Op::Reshape { .. } => "reshape",
            Op::Permute { .. } => "permute",
            Op::Expand { .. } => "expand",
            Op::Slice { .. } => "slice",
            Op::Concat { .. } => "concat",
            Op::Gather { .. } => "gather",
            Op::GatherAlong { .. } => "gather_along",
            Op::Iota { .. } => "iota",
            Op::Triangle { upper: true, .. } => "triu",
            Op::Triangle { upper: false, .. } => "tril",
            Op::RmsNorm { .. } => "rmsnorm",
            Op::LayerNorm { .. } => "layernorm",
            Op::Rotary => "rotary",
            Op::Linear { .. } => "linear",
            Op::PackedLinear { .. } => "packed_linear",
            Op::Attention { .. } => "attention",
            Op::SwiGlu { .. } => "swiglu",
            Op::Moe { .. } => "moe",
            Op::RefineLogits => "refine_logits",
            Op::FusedElementwise { .. } => "fused_elementwise",
        }
    }

    /// For an [`Op::Linear`]: how many leading operands its product and epilogue take (`x`,
    /// the weight, then the scale if `scaled` and the addend if `added`) and its whole arity
    /// (`cos` and `sin` after them when `rotary`); `None` for other ops.
    pub fn linear_arity(&self) -> Option<(usize, usize)> {
        let Op::Linear {
            scaled,
            added,
            rotary,
            ..
        } = self
        else {
            return None;
        };
        let epilogue = 2 + usize::from(*scaled) + usize::from(*added);
        Some((epilogue, epilogue + 2 * usize::from(*rotary)))
    }

    /// For a [`Op::PackedLinear`] with `operands` operands: each group's [`Op::Linear`] and
    /// the indices of its operands (`x`, weight, scale, addend, `cos`, `sin`); `None` for other
    /// ops or a wrong operand count.
    pub fn packed_groups(&self, operands: usize) -> Option<Vec<(Op, Vec<usize>)>> {
        let Op::PackedLinear {
            transpose_b,
            heads,
            scaled,
            added,
            rotary,
        } = self
        else {
            return None;
        };
        let per = |i: usize| 1 + usize::from(i < *scaled) + usize::from(*added);
        let weights: usize = (0..heads.len()).map(per).sum();
        let tables = 1 + weights;
        let arity = tables + 2 * usize::from(*rotary > 0);
        if heads.is_empty() || *scaled > heads.len() || *rotary > heads.len() || operands != arity {
            return None;
        }
        let mut next = 1;
        let groups = heads.iter().enumerate().map(|(i, &h)| {
            let mut ins = vec![0];
            ins.extend(next..next + per(i));
            next += per(i);
            if i < *rotary {
                ins.extend([tables, tables + 1]);
            }
            let op = Op::Linear {
                transpose_b: *transpose_b,
                scaled: i < *scaled,
                added: *added,
                heads: h,
                rotary: i < *rotary,
            };
            (op, ins)
        });
        Some(groups.collect())
    }

    /// True for ops with no operands that introduce a value (inputs, params, constants, iota).
    pub fn is_source(&self) -> bool {
        matches!(
            self,
            Op::Input { .. } | Op::Param { .. } | Op::Const { .. } | Op::Iota { .. }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique() {
        let mut names: Vec<&str> = UnaryOp::ALL.iter().map(|u| u.name()).collect();
        names.extend(BinaryOp::ALL.iter().map(|b| b.name()));
        names.extend(CmpOp::ALL.iter().map(|c| c.name()));
        names.extend(ReduceOp::ALL.iter().map(|r| r.name()));
        let n = names.len();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), n);
    }

    #[test]
    fn graphs_serialized_before_the_layout_fields_still_read() {
        let linear = r#"{"Linear":{"transpose_b":true,"scaled":false,"added":true}}"#;
        let op: Op = serde_json::from_str(linear).unwrap();
        let want = Op::Linear {
            transpose_b: true,
            scaled: false,
            added: true,
            heads: 0,
            rotary: false,
        };
        assert_eq!(op, want);
        let attention = r#"{"Attention":{"scale":0.5,"causal":true,"window":0}}"#;
        let op: Op = serde_json::from_str(attention).unwrap();
        assert!(matches!(
            op,
            Op::Attention {
                merge_heads: false,
                ..
            }
        ));
        // And the new fields round-trip.
        let heads = Op::Linear {
            transpose_b: true,
            scaled: false,
            added: true,
            heads: 4,
            rotary: true,
        };
        let text = serde_json::to_string(&heads).unwrap();
        assert_eq!(serde_json::from_str::<Op>(&text).unwrap(), heads);
    }

    #[test]
    fn hand_checked_scalars() {
        assert_eq!(UnaryOp::Relu.eval(-2.0), 0.0);
        assert!(UnaryOp::Relu.eval(f64::NAN).is_nan());
        assert_eq!(UnaryOp::Sigmoid.eval(0.0), 0.5);
        assert_eq!(UnaryOp::Gelu.eval(0.0), 0.0);
        // gelu(1) = 0.5 * (1 + erf(1/sqrt 2)) = 0.841344746...
        assert!((UnaryOp::Gelu.eval(1.0) - 0.841_344_746_068_543).abs() < 1e-12);
        assert!((UnaryOp::GeluTanh.eval(1.0) - 0.841_191_990_607_477_2).abs() < 1e-12);
        assert_eq!(UnaryOp::Rsqrt.eval(4.0), 0.5);
        assert_eq!(UnaryOp::Log.eval(0.0), f64::NEG_INFINITY);
        assert!(BinaryOp::Max.eval(f64::NAN, 1.0).is_nan());
        assert!(BinaryOp::Min.eval(1.0, f64::NAN).is_nan());
        assert_eq!(BinaryOp::Pow.eval(-2.0, 3.0), -8.0);
        assert!(BinaryOp::Pow.eval(-2.0, 0.5).is_nan());
        assert!(!CmpOp::Eq.eval(f64::NAN, f64::NAN));
        assert!(CmpOp::Ne.eval(f64::NAN, f64::NAN));
    }
}
