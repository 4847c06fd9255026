//! Layers shared by the model families, traced from primitive ops exactly as transformers
//! computes them.

use kiln_ir::trace::{Tensor, TraceResult, Tracer};
use kiln_ir::DType;

/// `prefix.name`, or `name` alone when the prefix is empty (a layer traced on its own).
pub fn join(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_string()
    } else {
        format!("{prefix}.{name}")
    }
}

/// `x @ weight.T (+ bias)` for parameters `{name}.weight[out, in]` and `{name}.bias[out]`
/// (PyTorch `nn.Linear`).
pub fn linear(
    t: &Tracer,
    x: &Tensor,
    name: &str,
    out: usize,
    inp: usize,
    bias: bool,
) -> TraceResult {
    let w = t.param(&join(name, "weight"), x.dtype(), [out, inp]);
    let y = x.matmul_t(&w, false, true)?;
    if !bias {
        return Ok(y);
    }
    y.add(&t.param(&join(name, "bias"), x.dtype(), [out]))
}

/// Llama-style RMSNorm: `weight * (x * rsqrt(mean(x^2, -1) + eps))`, statistics in f32.
pub fn rms_norm(t: &Tracer, x: &Tensor, name: &str, eps: f64) -> TraceResult {
    let hidden = x.dim(-1)?;
    let w = t.param(name, x.dtype(), [hidden]);
    let x32 = x.cast(DType::F32)?;
    let var = x32.mul(&x32)?.mean(&[-1], true)?;
    let inv = (&var + eps)?.rsqrt()?;
    let normed = x32.mul(&inv)?.cast(x.dtype())?;
    w.mul(&normed)
}

/// LayerNorm over the last axis (`nn.LayerNorm`): `(x - mean) / sqrt(var + eps) * weight + bias`,
/// biased variance; parameters `{name}.weight` and `{name}.bias`.
pub fn layer_norm(t: &Tracer, x: &Tensor, name: &str, eps: f64) -> TraceResult {
    let hidden = x.dim(-1)?;
    let w = t.param(&join(name, "weight"), x.dtype(), [hidden.clone()]);
    let b = t.param(&join(name, "bias"), x.dtype(), [hidden]);
    let centered = x.sub(&x.mean(&[-1], true)?)?;
    let var = centered.mul(&centered)?.mean(&[-1], true)?;
    let normed = centered.mul(&(&var + eps)?.rsqrt()?)?;
    normed.mul(&w)?.add(&b)
}

/// The SwiGLU MLP: `down(silu(gate(x)) * up(x))`, weights under `prefix`.
pub fn swiglu_mlp(
    t: &Tracer,
    x: &Tensor,
    prefix: &str,
    hidden: usize,
    intermediate: usize,
) -> TraceResult {
    let gate = linear(
        t,
        x,
        &join(prefix, "gate_proj"),
        intermediate,
        hidden,
        false,
    )?;
    let up = linear(t, x, &join(prefix, "up_proj"), intermediate, hidden, false)?;
    let act = gate.silu()?.mul(&up)?;
    linear(
        t,
        &act,
        &join(prefix, "down_proj"),
        hidden,
        intermediate,
        false,
    )
}

/// Additive attention mask `[batch, 1, seq, kv]` from a 0/1 `attention_mask[batch, kv]` over
/// all key positions (cached and new): query `i` (at position `kv - seq + i`) sees key `j` when
/// the key is not padding and, if `causal`, `j <= pos` and, with a sliding `window`,
/// `j > pos - window`. Visible entries are 0, hidden ones the f32 minimum (transformers' eager
/// masks).
pub fn attention_mask(
    t: &Tracer,
    attention_mask: &Tensor,
    seq: &kiln_ir::Dim,
    causal: bool,
    window: Option<usize>,
) -> TraceResult {
    let kv = attention_mask.dim(1)?;
    let not_pad = attention_mask
        .ne(&t.constant(kiln_ir::Literal::scalar_int(attention_mask.dtype(), 0)))?
        .unsqueeze(1)?
        .unsqueeze(1)?;
    let mut visible = not_pad;
    if causal {
        let key_pos = t.iota(DType::I64, [kv.clone()], 0)?;
        let past = &kv - seq;
        let query_pos = key_pos.slice(0, past, kv.clone())?.unsqueeze(1)?;
        visible = visible.and(&key_pos.le(&query_pos)?)?;
        if let Some(w) = window {
            let w = t.constant(kiln_ir::Literal::scalar_int(DType::I64, w as i64));
            visible = visible.and(&key_pos.gt(&query_pos.sub(&w)?)?)?;
        }
    }
    let zero = t.scalar(DType::F32, 0.0);
    let min = t.scalar(DType::F32, f32::MIN.into());
    visible.where_(&zero, &min)
}

/// The activations of transformers' `ACT2FN` that kiln traces exactly (f32).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// Exact (erf) GELU: `gelu`, `gelu_python`.
    Gelu,
    /// Tanh-approximated GELU: `gelu_new`, `gelu_pytorch_tanh`, `gelu_python_tanh`, `gelu_fast`
    /// (the same formula; `gelu_fast` rounds `sqrt(2/pi)` to 10 digits).
    GeluTanh,
    /// `relu`.
    Relu,
    /// `silu`, `swish`.
    Silu,
    /// `tanh`.
    Tanh,
}

impl Activation {
    /// The accepted names, for messages.
    pub const NAMES: &'static str = "gelu, gelu_python, gelu_new, gelu_pytorch_tanh, \
                                     gelu_python_tanh, gelu_fast, relu, silu, swish, tanh";

    /// The activation transformers' `ACT2FN[name]` computes, if kiln supports it.
    pub fn from_name(name: &str) -> Option<Activation> {
        Some(match name {
            "gelu" | "gelu_python" => Activation::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_python_tanh" | "gelu_fast" => {
                Activation::GeluTanh
            }
            "relu" => Activation::Relu,
            "silu" | "swish" => Activation::Silu,
            "tanh" => Activation::Tanh,
            _ => return None,
        })
    }

    /// Applies the activation elementwise.
    pub fn apply(self, x: &Tensor) -> TraceResult {
        match self {
            Activation::Gelu => x.gelu(),
            Activation::GeluTanh => x.gelu_tanh(),
            Activation::Relu => x.relu(),
            Activation::Silu => x.silu(),
            Activation::Tanh => x.tanh(),
        }
    }
}

/// `x @ weight (+ bias)` for a GPT-2 `Conv1D`: parameters `{name}.weight[in, out]` (transposed
/// with respect to `nn.Linear`) and `{name}.bias[out]`.
pub fn conv1d(t: &Tracer, x: &Tensor, name: &str, inp: usize, out: usize) -> TraceResult {
    let w = t.param(&join(name, "weight"), x.dtype(), [inp, out]);
    let b = t.param(&join(name, "bias"), x.dtype(), [out]);
    x.matmul(&w)?.add(&b)
}

/// A copy of `graph` whose parameters are renamed by `rename` (everything else unchanged).
pub fn rename_params(
    graph: &kiln_ir::Graph,
    mut rename: impl FnMut(&str) -> String,
) -> kiln_ir::Graph {
    let mut out = kiln_ir::Graph::new();
    for node in graph.nodes() {
        let mut node = node.clone();
        if let kiln_ir::Op::Param { name } = &mut node.op {
            *name = rename(name);
        }
        out.push(node);
    }
    for o in graph.outputs() {
        out.add_output(&o.name, o.value);
    }
    out
}

/// Adapts a traced graph's parameter names to the tensors a checkpoint actually holds, as
/// transformers' `from_pretrained` does: a name the checkpoint lacks (`has` false) is looked up
/// without the base-model prefix `base_prefix` (e.g. `bert.`, for a base model saved alone and
/// loaded under a head) or with it (a headed model's base loaded alone), and a LayerNorm's
/// `weight`/`bias` also as the legacy `gamma`/`beta`. Names with no match are left as they are,
/// so that binding reports them as missing.
pub fn adapt_param_names(
    graph: &kiln_ir::Graph,
    base_prefix: &str,
    has: impl Fn(&str) -> bool,
) -> kiln_ir::Graph {
    let spellings = |name: &str| -> Vec<String> {
        let mut v = vec![name.to_string()];
        if let Some(stem) = name.strip_suffix(".weight") {
            v.push(format!("{stem}.gamma"));
        } else if let Some(stem) = name.strip_suffix(".bias") {
            v.push(format!("{stem}.beta"));
        }
        v
    };
    rename_params(graph, |name| {
        let mut candidates = vec![name.to_string()];
        if !base_prefix.is_empty() {
            match name.strip_prefix(base_prefix) {
                Some(bare) => candidates.push(bare.to_string()),
                None => candidates.push(format!("{base_prefix}{name}")),
            }
        }
        candidates
            .iter()
            .flat_map(|c| spellings(c))
            .find(|c| has(c))
            .unwrap_or_else(|| name.to_string())
    })
}
