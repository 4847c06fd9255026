//! Mixtral's sparse mixture-of-experts MLP, traced as transformers computes it: router logits,
//! softmax in f32, top-k experts, weights renormalized over the chosen experts, and the
//! weighted sum of the chosen experts' SwiGLU MLPs. Written densely with primitive ops (every
//! expert's contribution is multiplied by a routing weight that is zero unless the expert was
//! chosen); the optimizer's MoE rule turns this into a dispatch that skips unchosen experts.

use crate::llama::LayerConfig;
use crate::nn;
use kiln_ir::trace::{Tensor, TraceResult, Tracer};
use kiln_ir::{DType, Dim};
use serde::Deserialize;

/// The expert configuration (`num_local_experts`, `num_experts_per_tok`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct MoeConfig {
    /// Experts per layer.
    pub num_local_experts: usize,
    /// Experts chosen per token.
    pub num_experts_per_tok: usize,
}

/// `[.., experts]` routing weights: the chosen experts' renormalized probabilities, 0 elsewhere.
fn routing_weights(
    t: &Tracer,
    x: &Tensor,
    prefix: &str,
    hidden: usize,
    m: &MoeConfig,
) -> TraceResult {
    let e = m.num_local_experts;
    let logits = nn::linear(t, x, &nn::join(prefix, "gate"), e, hidden, false)?;
    let probs = logits.cast(DType::F32)?.softmax(-1)?;
    let chosen = probs.topk(m.num_experts_per_tok, -1)?;
    let weights = probs.gather_along(-1, &chosen)?;
    let weights = weights.div(&weights.sum(&[-1], true)?)?.cast(x.dtype())?;
    let mut shape: Vec<Dim> = x.shape()[..x.rank() - 1].to_vec();
    shape.push(Dim::from(e));
    let expert_ids = t.iota(DType::I64, shape, x.rank() - 1)?;
    let zero = t.scalar(x.dtype(), 0.0);
    let mut dense: Option<Tensor> = None;
    for k in 0..m.num_experts_per_tok {
        let idx = chosen.slice(-1, k, k + 1)?;
        let w = weights.slice(-1, k, k + 1)?;
        let part = expert_ids.eq(&idx)?.where_(&w, &zero)?;
        dense = Some(match dense {
            Some(d) => d.add(&part)?,
            None => part,
        });
    }
    dense.ok_or_else(|| kiln_ir::OpError {
        op: "moe".into(),
        operands: vec![x.ty().to_string()],
        reason: "num_experts_per_tok must be at least 1".into(),
    })
}

/// The sparse MoE block on `x[.., hidden]`, weights under `prefix` (`...block_sparse_moe`):
/// router `gate.weight[experts, hidden]`, experts `experts.{e}.w1/w3.weight[inter, hidden]` and
/// `experts.{e}.w2.weight[hidden, inter]`.
pub fn sparse_moe(
    t: &Tracer,
    x: &Tensor,
    prefix: &str,
    cfg: &LayerConfig,
    m: &MoeConfig,
) -> TraceResult {
    let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
    let weights = routing_weights(t, x, prefix, h, m)?;
    let mut out: Option<Tensor> = None;
    for e in 0..m.num_local_experts {
        let p = nn::join(prefix, &format!("experts.{e}"));
        let gate = nn::linear(t, x, &nn::join(&p, "w1"), i, h, false)?;
        let up = nn::linear(t, x, &nn::join(&p, "w3"), i, h, false)?;
        let y = nn::linear(t, &gate.silu()?.mul(&up)?, &nn::join(&p, "w2"), h, i, false)?;
        let y = y.mul(&weights.slice(-1, e, e + 1)?)?;
        out = Some(match out {
            Some(acc) => acc.add(&y)?,
            None => y,
        });
    }
    out.ok_or_else(|| kiln_ir::OpError {
        op: "moe".into(),
        operands: vec![x.ty().to_string()],
        reason: "num_local_experts must be at least 1".into(),
    })
}
