//! Rotary position embeddings (RoPE) as transformers computes them: inverse frequencies in f32
//! (with the `rope_scaling` types default, linear, dynamic and llama3), `cos`/`sin` of
//! `positions ⊗ inv_freq` duplicated over both halves, and `x * cos + rotate_half(x) * sin`.

use kiln_ir::trace::{Tensor, TraceResult, Tracer};
use kiln_ir::{DType, Dim, Literal, OpError, Scalar};

/// How the inverse frequencies are scaled (transformers' `rope_type`).
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE.
    Default,
    /// Positions divided by `factor` (frequencies divided by it).
    Linear {
        /// The scaling factor.
        factor: f64,
    },
    /// Dynamic NTK: past `max_position_embeddings`, the base grows with the sequence length,
    /// which is computed in the graph from the largest position id.
    Dynamic {
        /// The scaling factor.
        factor: f64,
        /// The length the model was trained for.
        max_position_embeddings: usize,
    },
    /// Llama 3.1's frequency-dependent scaling.
    Llama3 {
        /// The scaling factor.
        factor: f64,
        /// Wavelengths above `original / low_freq_factor` are scaled fully.
        low_freq_factor: f64,
        /// Wavelengths below `original / high_freq_factor` are not scaled.
        high_freq_factor: f64,
        /// The original context length.
        original_max_position_embeddings: usize,
    },
}

/// RoPE settings of a model.
#[derive(Debug, Clone, PartialEq)]
pub struct Rope {
    /// The base (`rope_theta`).
    pub theta: f64,
    /// The rotated width (the head dim).
    pub dim: usize,
    /// Scaling type.
    pub scaling: RopeScaling,
}

/// `arange(0, dim, 2) / dim` in f32, as transformers computes the exponents.
fn exponents(dim: usize) -> Vec<f32> {
    (0..dim / 2).map(|i| (2 * i) as f32 / dim as f32).collect()
}

/// `1 / base^(2i / dim)` for `i in 0..dim/2`, in f32 as transformers computes it.
pub fn inv_freq(base: f64, dim: usize) -> Vec<f32> {
    exponents(dim)
        .into_iter()
        .map(|e| 1.0 / (base as f32).powf(e))
        .collect()
}

fn f32_const(t: &Tracer, values: &[f32]) -> Tensor {
    let scalars: Vec<Scalar> = values.iter().map(|&f| Scalar::Float(f.into())).collect();
    match Literal::from_scalars(DType::F32, vec![values.len()], &scalars) {
        Ok(lit) => t.constant(lit),
        Err(e) => unreachable!("literal sized from its values: {e}"),
    }
}

impl Rope {
    /// The static inverse frequencies (all types but dynamic), in f32 as transformers computes them.
    fn static_inv_freq(&self) -> Vec<f32> {
        let base = inv_freq(self.theta, self.dim);
        match self.scaling {
            RopeScaling::Default | RopeScaling::Dynamic { .. } => base,
            RopeScaling::Linear { factor } => base.into_iter().map(|f| f / factor as f32).collect(),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                let (factor, low, high) = (
                    factor as f32,
                    low_freq_factor as f32,
                    high_freq_factor as f32,
                );
                let old = original_max_position_embeddings as f32;
                let (low_wavelen, high_wavelen) = (old / low, old / high);
                base.into_iter()
                    .map(|f| {
                        let wavelen = 2.0 * std::f32::consts::PI / f;
                        let scaled = if wavelen > low_wavelen { f / factor } else { f };
                        let smooth = (old / wavelen - low) / (high - low);
                        let smoothed = (1.0 - smooth) * scaled / factor + smooth * scaled;
                        let medium = (high_wavelen..=low_wavelen).contains(&wavelen);
                        if medium {
                            smoothed
                        } else {
                            scaled
                        }
                    })
                    .collect()
            }
        }
    }

    /// The inverse frequencies as a graph value `[dim/2]`; for dynamic scaling computed from the
    /// largest of `positions` (as transformers' `dynamic_rope_update`).
    fn inv_freq_value(&self, t: &Tracer, positions: &Tensor) -> TraceResult {
        let RopeScaling::Dynamic {
            factor,
            max_position_embeddings,
        } = self.scaling
        else {
            return Ok(f32_const(t, &self.static_inv_freq()));
        };
        let max_pos = max_position_embeddings as f64;
        let seq_len = (&positions.max(&[0, 1], false)?.cast(DType::F32)? + 1.0)?
            .maximum(&t.scalar(DType::F32, max_pos))?;
        let growth = (&(&(&seq_len * factor)? / max_pos)? - (factor - 1.0))?;
        let d = self.dim as f64;
        let base = (&growth.powf(d / (d - 2.0))? * self.theta)?;
        base.pow(&f32_const(t, &exponents(self.dim)))?.recip()
    }

    /// `(cos, sin)` of shape `[batch, seq, dim]` for i64 `positions[batch, seq]`.
    pub fn cos_sin(&self, t: &Tracer, positions: &Tensor) -> Result<(Tensor, Tensor), OpError> {
        let freq = self.inv_freq_value(t, positions)?;
        let angles = positions.cast(DType::F32)?.unsqueeze(-1)?.mul(&freq)?;
        let emb = Tensor::cat(&[&angles, &angles], -1)?;
        Ok((emb.cos()?, emb.sin()?))
    }
}

/// `x * cos + rotate_half(x) * sin` for `x[batch, heads, seq, dim]` and `cos`/`sin[batch, seq, dim]`.
pub fn apply(x: &Tensor, cos: &Tensor, sin: &Tensor) -> TraceResult {
    let d = x.dim(-1)?;
    let half = d.div_exact(2).ok_or_else(|| OpError {
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
