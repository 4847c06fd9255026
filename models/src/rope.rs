//! Rotary position embeddings (RoPE) as transformers computes them: the inverse frequencies in
//! f32, `cos`/`sin` of `positions ⊗ inv_freq` duplicated over both halves, and
//! `x * cos + rotate_half(x) * sin`.

use kiln_ir::trace::{Tensor, TraceResult, Tracer};
use kiln_ir::{DType, Dim, Literal, Scalar};

/// `1 / base^(2i / dim)` for `i in 0..dim/2`, rounded as transformers computes it in f32.
pub fn inv_freq(base: f64, dim: usize) -> Vec<f32> {
    (0..dim / 2)
        .map(|i| {
            let exponent = (2 * i) as f32 / dim as f32;
            1.0 / (base as f32).powf(exponent)
        })
        .collect()
}

/// `(cos, sin)` of shape `[batch, seq, dim]` for i64 `positions[batch, seq]`.
pub fn cos_sin(
    t: &Tracer,
    positions: &Tensor,
    inv_freq: &[f32],
) -> Result<(Tensor, Tensor), kiln_ir::OpError> {
    let half = inv_freq.len();
    let values: Vec<Scalar> = inv_freq.iter().map(|&f| Scalar::Float(f.into())).collect();
    let freq = t.constant(
        Literal::from_scalars(DType::F32, vec![half], &values).expect("length matches shape"),
    );
    let pos = positions.cast(DType::F32)?.unsqueeze(-1)?;
    let angles = pos.mul(&freq)?;
    let emb = Tensor::cat(&[&angles, &angles], -1)?;
    Ok((emb.cos()?, emb.sin()?))
}

/// `x * cos + rotate_half(x) * sin` for `x[batch, heads, seq, dim]` and `cos`/`sin[batch, seq, dim]`.
pub fn apply(x: &Tensor, cos: &Tensor, sin: &Tensor) -> TraceResult {
    let d = x.dim(-1)?;
    let half = d.div_exact(2).ok_or_else(|| kiln_ir::OpError {
        op: "rope".into(),
        operands: vec![x.ty().to_string()],
        reason: "head dim must be even".into(),
    })?;
    let x1 = x.slice(-1, Dim::fixed(0), half.clone())?;
    let x2 = x.slice(-1, half, d)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], -1)?;
    let cos = cos.unsqueeze(1)?;
    let sin = sin.unsqueeze(1)?;
    x.mul(&cos)?.add(&rotated.mul(&sin)?)
}
