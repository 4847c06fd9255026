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

/// `x @ weight.T` for a `weight[out, in]` parameter named `name` (PyTorch `nn.Linear`, no bias).
pub fn linear(t: &Tracer, x: &Tensor, name: &str, out: usize, inp: usize) -> TraceResult {
    let w = t.param(name, x.dtype(), [out, inp]);
    x.matmul_t(&w, false, true)
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
        &join(prefix, "gate_proj.weight"),
        intermediate,
        hidden,
    )?;
    let up = linear(t, x, &join(prefix, "up_proj.weight"), intermediate, hidden)?;
    let act = gate.silu()?.mul(&up)?;
    linear(
        t,
        &act,
        &join(prefix, "down_proj.weight"),
        hidden,
        intermediate,
    )
}
