//! Shape and dtype inference: the result type of every op from its operands' types, or the
//! reason the operands are not acceptable. The verifier and the tracer both call [`infer`].

use crate::shape::{broadcast_shapes, numel, DisplayShape};
use crate::{BinaryOp, DType, Dim, Op, ReduceOp, Shape, TensorType, UnaryOp};

type R = Result<TensorType, String>;

fn arity(op: &Op, ins: &[&TensorType], n: usize) -> Result<(), String> {
    if ins.len() != n {
        return Err(format!(
            "{} takes {} operand(s), got {}",
            op.name(),
            n,
            ins.len()
        ));
    }
    Ok(())
}

fn axis_ok(axis: usize, rank: usize) -> Result<(), String> {
    if axis >= rank {
        return Err(format!("axis {axis} out of range for rank {rank}"));
    }
    Ok(())
}

fn same_dtype(a: &TensorType, b: &TensorType) -> Result<(), String> {
    if a.dtype != b.dtype {
        return Err(format!("operand dtypes differ: {a} vs {b}"));
    }
    Ok(())
}

fn float_only(op: &str, t: &TensorType) -> Result<(), String> {
    if !t.dtype.is_float() {
        return Err(format!("{op} needs a float operand, got {t}"));
    }
    Ok(())
}

fn nonneg_fixed(d: &Dim) -> Result<(), String> {
    if d.as_fixed().is_some_and(|n| n < 0) {
        return Err(format!("negative dimension {d}"));
    }
    Ok(())
}

/// The result type of `op` applied to operands of types `ins`, or why that is ill-typed.
pub fn infer(op: &Op, ins: &[&TensorType]) -> R {
    match op {
        Op::Input { .. } | Op::Param { .. } => Err(format!(
            "{} has no operands: its type is declared, not inferred",
            op.name()
        )),
        Op::Const { value } => {
            arity(op, ins, 0)?;
            Ok(TensorType::new(
                value.dtype(),
                value.shape().iter().copied(),
            ))
        }
        Op::Iota { dtype, shape, axis } => {
            arity(op, ins, 0)?;
            axis_ok(*axis, shape.len())?;
            if *dtype == DType::Bool {
                return Err("iota cannot produce bool".into());
            }
            shape.iter().try_for_each(nonneg_fixed)?;
            Ok(TensorType {
                dtype: *dtype,
                shape: shape.clone(),
            })
        }
        Op::Unary(u) => {
            arity(op, ins, 1)?;
            let t = ins[0];
            match u {
                UnaryOp::Not if t.dtype != DType::Bool => {
                    return Err(format!("not needs a bool operand, got {t}"))
                }
                UnaryOp::Not => {}
                UnaryOp::Neg | UnaryOp::Abs | UnaryOp::Relu => {
                    if t.dtype == DType::Bool || (t.dtype == DType::U8 && *u != UnaryOp::Relu) {
                        return Err(format!(
                            "{} needs a signed numeric operand, got {t}",
                            u.name()
                        ));
                    }
                }
                _ => float_only(u.name(), t)?,
            }
            Ok(t.clone())
        }
        Op::Binary(b) => {
            arity(op, ins, 2)?;
            same_dtype(ins[0], ins[1])?;
            let dt = ins[0].dtype;
            match b {
                BinaryOp::And | BinaryOp::Or if dt != DType::Bool => {
                    return Err(format!("{} needs bool operands, got {dt}", b.name()))
                }
                BinaryOp::And | BinaryOp::Or => {}
                BinaryOp::Pow => float_only("pow", ins[0])?,
                _ if dt == DType::Bool => {
                    return Err(format!("{} needs numeric operands, got bool", b.name()))
                }
                _ => {}
            }
            Ok(TensorType {
                dtype: dt,
                shape: broadcast_shapes(&ins[0].shape, &ins[1].shape)?,
            })
        }
        Op::Compare(_) => {
            arity(op, ins, 2)?;
            same_dtype(ins[0], ins[1])?;
            Ok(TensorType {
                dtype: DType::Bool,
                shape: broadcast_shapes(&ins[0].shape, &ins[1].shape)?,
            })
        }
        Op::Where => {
            arity(op, ins, 3)?;
            if ins[0].dtype != DType::Bool {
                return Err(format!("where's condition must be bool, got {}", ins[0]));
            }
            same_dtype(ins[1], ins[2])?;
            let s = broadcast_shapes(&ins[0].shape, &ins[1].shape)?;
            Ok(TensorType {
                dtype: ins[1].dtype,
                shape: broadcast_shapes(&s, &ins[2].shape)?,
            })
        }
        Op::Cast { to } => {
            arity(op, ins, 1)?;
            Ok(TensorType {
                dtype: *to,
                shape: ins[0].shape.clone(),
            })
        }
        Op::Reduce {
            op: r,
            axes,
            keepdim,
        } => {
            arity(op, ins, 1)?;
            let t = ins[0];
            if axes.is_empty() || axes.windows(2).any(|w| w[0] >= w[1]) {
                return Err(format!(
                    "axes {axes:?} must be non-empty and strictly increasing"
                ));
            }
            axis_ok(*axes.last().unwrap_or(&0), t.rank())?;
            match r {
                ReduceOp::Mean => float_only("reduce_mean", t)?,
                _ if t.dtype == DType::Bool => {
                    return Err(format!("{} needs a numeric operand, got {t}", r.name()))
                }
                _ => {}
            }
            Ok(TensorType {
                dtype: t.dtype,
                shape: reduce_shape(&t.shape, axes, *keepdim),
            })
        }
        Op::ArgMax { axis, keepdim } => {
            arity(op, ins, 1)?;
            axis_ok(*axis, ins[0].rank())?;
            Ok(TensorType {
                dtype: DType::I64,
                shape: reduce_shape(&ins[0].shape, &[*axis], *keepdim),
            })
        }
        Op::TopK { k, axis } => {
            arity(op, ins, 1)?;
            let t = ins[0];
            axis_ok(*axis, t.rank())?;
            if let Some(n) = t.shape[*axis].as_fixed() {
                if *k as i64 > n {
                    return Err(format!("k = {k} exceeds axis {axis} of size {n}"));
                }
            }
            let mut shape = t.shape.clone();
            shape[*axis] = Dim::from(*k);
            Ok(TensorType {
                dtype: DType::I64,
                shape,
            })
        }
        Op::Softmax { axis } | Op::LogSoftmax { axis } => {
            arity(op, ins, 1)?;
            float_only(op.name(), ins[0])?;
            axis_ok(*axis, ins[0].rank())?;
            Ok(ins[0].clone())
        }
        Op::MatMul {
            transpose_a,
            transpose_b,
        } => {
            arity(op, ins, 2)?;
            let (a, b) = (ins[0], ins[1]);
            same_dtype(a, b)?;
            if a.dtype == DType::Bool {
                return Err("matmul needs numeric operands".into());
            }
            if a.rank() < 2 || b.rank() < 2 {
                return Err(format!("matmul needs rank >= 2 operands, got {a} and {b}"));
            }
            let (ra, rb) = (a.rank(), b.rank());
            let (m, ka) = if *transpose_a {
                (&a.shape[ra - 1], &a.shape[ra - 2])
            } else {
                (&a.shape[ra - 2], &a.shape[ra - 1])
            };
            let (kb, n) = if *transpose_b {
                (&b.shape[rb - 1], &b.shape[rb - 2])
            } else {
                (&b.shape[rb - 2], &b.shape[rb - 1])
            };
            if ka != kb {
                return Err(format!(
                    "cannot multiply {a} by {b}: contracted dims {ka} and {kb} differ"
                ));
            }
            let mut shape = broadcast_shapes(&a.shape[..ra - 2], &b.shape[..rb - 2])?;
            shape.push(m.clone());
            shape.push(n.clone());
            Ok(TensorType {
                dtype: a.dtype,
                shape,
            })
        }
        Op::Reshape { shape } => {
            arity(op, ins, 1)?;
            shape.iter().try_for_each(nonneg_fixed)?;
            let (from, to) = (ins[0].numel(), numel(shape));
            if from != to {
                return Err(format!(
                    "cannot reshape {} ({} elements) to {} ({} elements)",
                    ins[0],
                    from,
                    DisplayShape(shape),
                    to
                ));
            }
            Ok(TensorType {
                dtype: ins[0].dtype,
                shape: shape.clone(),
            })
        }
        Op::Permute { perm } => {
            arity(op, ins, 1)?;
            let t = ins[0];
            let mut seen = vec![false; t.rank()];
            if perm.len() != t.rank()
                || perm
                    .iter()
                    .any(|&p| p >= t.rank() || std::mem::replace(&mut seen[p], true))
            {
                return Err(format!("{perm:?} is not a permutation of the axes of {t}"));
            }
            Ok(TensorType {
                dtype: t.dtype,
                shape: perm.iter().map(|&p| t.shape[p].clone()).collect(),
            })
        }
        Op::Expand { shape } => {
            arity(op, ins, 1)?;
            let t = ins[0];
            let b = broadcast_shapes(&t.shape, shape)?;
            if b != *shape {
                return Err(format!("cannot expand {t} to {}", DisplayShape(shape)));
            }
            Ok(TensorType {
                dtype: t.dtype,
                shape: shape.clone(),
            })
        }
        Op::Slice { axis, start, end } => {
            arity(op, ins, 1)?;
            let t = ins[0];
            axis_ok(*axis, t.rank())?;
            let len = end - start;
            let bad = |why: &str| Err(format!("slice {start}..{end} of axis {axis} of {t}: {why}"));
            if start.as_fixed().is_some_and(|s| s < 0) || len.as_fixed().is_some_and(|l| l < 0) {
                return bad("bounds out of order or negative");
            }
            if let Some(over) = (end - &t.shape[*axis]).as_fixed() {
                if over > 0 {
                    return bad("end past the axis");
                }
            }
            let mut shape = t.shape.clone();
            shape[*axis] = len;
            Ok(TensorType {
                dtype: t.dtype,
                shape,
            })
        }
        Op::Concat { axis } => {
            let Some(first) = ins.first() else {
                return Err("concat needs at least one operand".into());
            };
            axis_ok(*axis, first.rank())?;
            let mut total = Dim::fixed(0);
            for t in ins {
                same_dtype(first, t)?;
                let rest_differs = t.rank() != first.rank()
                    || (0..t.rank()).any(|i| i != *axis && t.shape[i] != first.shape[i]);
                if rest_differs {
                    return Err(format!(
                        "cannot concatenate {first} and {t} along axis {axis}"
                    ));
                }
                total = &total + &t.shape[*axis];
            }
            let mut shape = first.shape.clone();
            shape[*axis] = total;
            Ok(TensorType {
                dtype: first.dtype,
                shape,
            })
        }
        Op::Gather { axis } => {
            arity(op, ins, 2)?;
            let (d, i) = (ins[0], ins[1]);
            axis_ok(*axis, d.rank())?;
            if !i.dtype.is_int() {
                return Err(format!("gather indices must be integers, got {i}"));
            }
            let mut shape: Shape = d.shape[..*axis].to_vec();
            shape.extend(i.shape.iter().cloned());
            shape.extend(d.shape[axis + 1..].iter().cloned());
            Ok(TensorType {
                dtype: d.dtype,
                shape,
            })
        }
        Op::GatherAlong { axis } => {
            arity(op, ins, 2)?;
            let (d, i) = (ins[0], ins[1]);
            axis_ok(*axis, d.rank())?;
            if !i.dtype.is_int() {
                return Err(format!("gather_along indices must be integers, got {i}"));
            }
            let other_differs = i.rank() != d.rank()
                || (0..d.rank()).any(|k| k != *axis && d.shape[k] != i.shape[k]);
            if other_differs {
                return Err(format!(
                    "gather_along indices {i} must match data {d} except on axis {axis}"
                ));
            }
            Ok(TensorType {
                dtype: d.dtype,
                shape: i.shape.clone(),
            })
        }
        Op::Triangle { .. } => {
            arity(op, ins, 1)?;
            if ins[0].rank() < 2 {
                return Err(format!("{} needs rank >= 2, got {}", op.name(), ins[0]));
            }
            Ok(ins[0].clone())
        }
        Op::RmsNorm { .. } | Op::LayerNorm { .. } => {
            let n = if matches!(op, Op::RmsNorm { .. }) {
                2
            } else {
                3
            };
            arity(op, ins, n)?;
            let x = ins[0];
            float_only(op.name(), x)?;
            let Some(last) = x.shape.last() else {
                return Err(format!("{} needs rank >= 1", op.name()));
            };
            for w in &ins[1..] {
                same_dtype(x, w)?;
                if w.shape.as_slice() != std::slice::from_ref(last) {
                    return Err(format!("{} weight {w} must be [{last}] for {x}", op.name()));
                }
            }
            Ok(x.clone())
        }
        Op::Rotary => {
            arity(op, ins, 3)?;
            let x = ins[0];
            float_only(op.name(), x)?;
            let d = x.shape.last().and_then(Dim::as_fixed);
            if d.is_none_or(|d| d % 2 != 0) {
                return Err(format!(
                    "rotary needs a last axis of even, fixed size, got {x}"
                ));
            }
            for t in &ins[1..] {
                same_dtype(x, t)?;
                if broadcast_shapes(&x.shape, &t.shape).as_ref() != Ok(&x.shape) {
                    return Err(format!("rotary table {t} does not broadcast to {x}"));
                }
            }
            Ok(x.clone())
        }
        Op::Linear {
            transpose_b,
            scaled,
            added,
            heads,
            rotary,
        } => {
            let (epilogue, n) = op.linear_arity().unwrap_or_default();
            arity(op, ins, n)?;
            let y = infer_product(*transpose_b, *scaled, *added, &ins[..epilogue])?;
            if *heads == 0 {
                return match rotary {
                    true => Err("linear rotary=true needs heads > 0".into()),
                    false => Ok(y),
                };
            }
            let y = split_heads(y, *heads)?;
            match rotary {
                true => infer(&Op::Rotary, &[&y, ins[epilogue], ins[epilogue + 1]]),
                false => Ok(y),
            }
        }
        Op::PackedLinear { heads, .. } => {
            let groups = op.packed_groups(ins.len()).ok_or_else(|| {
                format!(
                    "packed_linear with heads {heads:?} has the wrong flags or operand count {}",
                    ins.len()
                )
            })?;
            let mut out: Option<TensorType> = None;
            for (linear, at) in groups {
                let group: Vec<&TensorType> = at.iter().map(|&i| ins[i]).collect();
                let y = infer(&linear, &group)?;
                let r = y.rank();
                out = Some(match out {
                    None => y,
                    Some(mut t) => {
                        let same = t.dtype == y.dtype
                            && t.shape[..r - 3] == y.shape[..r - 3]
                            && t.shape[r - 2..] == y.shape[r - 2..];
                        if !same {
                            return Err(format!(
                                "packed_linear groups {t} and {y} differ beyond their heads"
                            ));
                        }
                        t.shape[r - 3] = &t.shape[r - 3] + &y.shape[r - 3];
                        t
                    }
                });
            }
            out.ok_or_else(|| "packed_linear needs a group".into())
        }
        Op::SwiGlu {
            transpose_b,
            scaled,
        } => {
            let n = 1 + usize::from(*scaled);
            arity(op, ins, 1 + 2 * n)?;
            // The operands of the gate (0) or up (1) layer: x, its weight, its scale.
            let layer = |j: usize| -> Vec<&TensorType> {
                let scale = scaled.then(|| ins[3 + j]);
                [ins[0], ins[1 + j]].into_iter().chain(scale).collect()
            };
            let g = infer_product(*transpose_b, *scaled, false, &layer(0))?;
            let u = infer_product(*transpose_b, *scaled, false, &layer(1))?;
            float_only(op.name(), &g)?;
            if g != u {
                return Err(format!("swiglu gate {g} and up {u} projections differ"));
            }
            Ok(g)
        }
        Op::Attention {
            causal: false,
            window: 1..,
            ..
        } => Err("a sliding window requires causal=true".into()),
        Op::Attention {
            merge_heads: true, ..
        } => {
            let o = infer_attention(ins)?;
            let rows = &o.shape[1] * &o.shape[3];
            let shape = vec![o.shape[0].clone(), o.shape[2].clone(), rows];
            Ok(TensorType { shape, ..o })
        }
        Op::Attention { .. } => infer_attention(ins),
        Op::Moe { top_k } => infer_moe(*top_k, ins),
        Op::RefineLogits => infer_refine(ins),
        Op::FusedElementwise { body } => infer_fused(body, ins),
    }
}

/// `refine_logits(coarse[.., n], x[.., k], r[n, k], s[n], bound[n])`: `coarse`'s type.
fn infer_refine(ins: &[&TensorType]) -> R {
    arity(&Op::RefineLogits, ins, 5)?;
    let (c, x, r) = (ins[0], ins[1], ins[2]);
    for t in ins {
        float_only("refine_logits", t)?;
    }
    let (cr, xr) = (c.rank(), x.rank());
    if cr == 0 || cr != xr || c.shape[..cr - 1] != x.shape[..xr - 1] {
        return Err(format!(
            "refine_logits: coarse {c} and x {x} must agree but for their last axis"
        ));
    }
    let (n, k) = (&c.shape[cr - 1], &x.shape[xr - 1]);
    if r.shape.as_slice() != [n.clone(), k.clone()] {
        return Err(format!("refine_logits: residual {r} must be [{n}, {k}]"));
    }
    for t in &ins[3..] {
        if t.shape.as_slice() != std::slice::from_ref(n) {
            return Err(format!("refine_logits: scale and bound {t} must be [{n}]"));
        }
    }
    Ok(c.clone())
}

/// A linear layer's product and epilogue: `(x, w[, scale][, addend])` as the flags say.
fn infer_product(transpose_b: bool, scaled: bool, added: bool, ins: &[&TensorType]) -> R {
    let mm = Op::MatMul {
        transpose_a: false,
        transpose_b,
    };
    let y = infer(&mm, &ins[..2])?;
    let n = std::slice::from_ref(&y.shape[y.rank() - 1]);
    if scaled {
        let s = ins[2];
        same_dtype(&y, s)?;
        if s.shape.as_slice() != n {
            return Err(format!("linear scale {s} must be [{}] for {y}", n[0]));
        }
    }
    if added {
        let a = ins[ins.len() - 1];
        same_dtype(&y, a)?;
        if a.shape.as_slice() != n && a.shape != y.shape {
            return Err(format!("linear addend {a} must be {y} or [{}]", n[0]));
        }
    }
    Ok(y)
}

/// `y[.., s, n]` as `heads` heads `[.., heads, s, n / heads]`.
fn split_heads(y: TensorType, heads: usize) -> R {
    let r = y.rank();
    let n = y.shape[r - 1].as_fixed();
    let h = i64::try_from(heads).unwrap_or(i64::MAX);
    let Some(d) = n.filter(|n| n % h == 0).map(|n| n / h) else {
        return Err(format!(
            "linear heads={heads} must divide a fixed last axis of {y}"
        ));
    };
    let mut shape = y.shape[..r - 2].to_vec();
    shape.extend([Dim::fixed(h), y.shape[r - 2].clone(), Dim::fixed(d)]);
    Ok(TensorType { shape, ..y })
}

fn infer_fused(body: &crate::Expr, ins: &[&TensorType]) -> R {
    if ins.is_empty() {
        return Err("fused_elementwise needs at least one operand".into());
    }
    let mut used = vec![false; ins.len()];
    body.visit(&mut |e| {
        if let crate::Expr::Arg(i) = e {
            if let Some(u) = used.get_mut(*i) {
                *u = true;
            }
        }
    });
    if let Some(i) = used.iter().position(|u| !u) {
        return Err(format!("fused_elementwise body does not use operand ${i}"));
    }
    let dtypes: Vec<DType> = ins.iter().map(|t| t.dtype).collect();
    let dtype = body
        .dtype(&dtypes)
        .map_err(|e| format!("fused_elementwise body {body}: {e}"))?;
    let mut shape: Shape = vec![];
    for t in ins {
        shape = broadcast_shapes(&shape, &t.shape)?;
    }
    Ok(TensorType { dtype, shape })
}

fn infer_moe(top_k: usize, ins: &[&TensorType]) -> R {
    if ins.len() < 5 || !(ins.len() - 2).is_multiple_of(3) {
        return Err(format!(
            "moe takes x, gate and three weights per expert (w1, w3, w2), got {} operands",
            ins.len()
        ));
    }
    let (x, gate) = (ins[0], ins[1]);
    let experts = (ins.len() - 2) / 3;
    float_only("moe", x)?;
    let Some(h) = x.shape.last() else {
        return Err(format!("moe needs x of rank >= 1, got {x}"));
    };
    if top_k == 0 || top_k > experts {
        return Err(format!("moe top_k = {top_k} must be in 1..={experts}"));
    }
    same_dtype(x, gate)?;
    if gate.shape != [Dim::from(experts), h.clone()] {
        return Err(format!("moe gate {gate} must be [{experts}, {h}] for {x}"));
    }
    let inter = ins[2].shape.first().cloned().unwrap_or_default();
    for (e, w) in ins[2..].chunks(3).enumerate() {
        for (name, t, want) in [
            ("w1", w[0], [inter.clone(), h.clone()]),
            ("w3", w[1], [inter.clone(), h.clone()]),
            ("w2", w[2], [h.clone(), inter.clone()]),
        ] {
            same_dtype(x, t)?;
            if t.shape != want {
                return Err(format!(
                    "moe expert {e} {name} {t} must be {} (x {x}, experts' intermediate size {inter})",
                    DisplayShape(&want)
                ));
            }
        }
    }
    Ok(x.clone())
}

fn reduce_shape(shape: &[Dim], axes: &[usize], keepdim: bool) -> Shape {
    shape
        .iter()
        .enumerate()
        .filter_map(|(i, d)| match (axes.contains(&i), keepdim) {
            (false, _) => Some(d.clone()),
            (true, true) => Some(Dim::fixed(1)),
            (true, false) => None,
        })
        .collect()
}

fn infer_attention(ins: &[&TensorType]) -> R {
    if !(3..=4).contains(&ins.len()) {
        return Err(format!(
            "attention takes q, k, v and an optional mask, got {} operands",
            ins.len()
        ));
    }
    let (q, k, v) = (ins[0], ins[1], ins[2]);
    float_only("attention", q)?;
    same_dtype(q, k)?;
    same_dtype(q, v)?;
    if q.rank() != 4 || k.rank() != 4 || v.rank() != 4 {
        return Err(format!("attention needs rank-4 q, k, v, got {q}, {k}, {v}"));
    }
    let (hq, hk) = (&q.shape[1], &k.shape[1]);
    let groups_ok = match (hq.as_fixed(), hk.as_fixed()) {
        (Some(a), Some(b)) => b > 0 && a % b == 0,
        _ => hq == hk,
    };
    if q.shape[0] != k.shape[0]
        || k.shape[..3] != v.shape[..3]
        || q.shape[3] != k.shape[3]
        || !groups_ok
    {
        return Err(format!(
            "attention shapes disagree: q {q}, k {k}, v {v} (need q[b,hq,sq,d], k[b,hkv,sk,d], v[b,hkv,sk,dv], hq a multiple of hkv)"
        ));
    }
    let out_shape = vec![
        q.shape[0].clone(),
        hq.clone(),
        q.shape[2].clone(),
        v.shape[3].clone(),
    ];
    if let Some(m) = ins.get(3) {
        same_dtype(q, m)?;
        let scores = vec![
            q.shape[0].clone(),
            hq.clone(),
            q.shape[2].clone(),
            k.shape[2].clone(),
        ];
        if m.rank() > 4 || broadcast_shapes(&m.shape, &scores)? != scores {
            return Err(format!(
                "attention mask {m} does not broadcast to the scores {}",
                DisplayShape(&scores)
            ));
        }
    }
    Ok(TensorType {
        dtype: q.dtype,
        shape: out_shape,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f32s(shape: &[i64]) -> TensorType {
        TensorType::new(DType::F32, shape.iter().copied())
    }

    #[test]
    fn linear_operands() {
        let x = TensorType::new(DType::F32, [Dim::sym("seq"), Dim::fixed(4)]);
        let y = TensorType::new(DType::F32, [Dim::sym("seq"), Dim::fixed(6)]);
        let (w, n, k) = (f32s(&[6, 4]), f32s(&[6]), f32s(&[4]));
        let linear = |scaled, added, ins: &[&TensorType]| {
            let op = Op::Linear {
                transpose_b: true,
                scaled,
                added,
                heads: 0,
                rotary: false,
            };
            infer(&op, ins)
        };
        assert_eq!(linear(false, false, &[&x, &w]), Ok(y.clone()));
        assert_eq!(linear(true, true, &[&x, &w, &n, &y]), Ok(y.clone()));
        assert_eq!(linear(false, true, &[&x, &w, &n]), Ok(y.clone()));
        let e = linear(true, false, &[&x, &w, &k]).unwrap_err();
        assert!(e.contains("scale f32[4] must be [6]"), "{e}");
        let e = linear(true, false, &[&x, &w, &f32s(&[1, 6])]).unwrap_err();
        assert!(e.contains("must be [6]"), "{e}");
        let e = linear(false, true, &[&x, &w, &f32s(&[2, 6])]).unwrap_err();
        assert!(
            e.contains("addend f32[2, 6] must be f32[seq, 6] or [6]"),
            "{e}"
        );
        let e = linear(true, true, &[&x, &w, &n]).unwrap_err();
        assert!(e.contains("takes 4 operand(s), got 3"), "{e}");
        let e = linear(false, false, &[&x, &f32s(&[4, 6])]).unwrap_err();
        assert!(e.contains("contracted dims"), "{e}");
        let half = TensorType::new(DType::BF16, [6]);
        assert!(linear(false, true, &[&x, &w, &half]).is_err());
    }

    #[test]
    fn head_layouts_and_swiglu_operands() {
        let s = Dim::sym("seq");
        let x = TensorType::new(DType::F32, [Dim::fixed(2), s.clone(), Dim::fixed(8)]);
        let heads = TensorType::new(DType::F32, [2.into(), 2.into(), s.clone(), 4.into()]);
        let table = TensorType::new(DType::F32, [2.into(), 1.into(), s.clone(), 4.into()]);
        let (w, w6) = (f32s(&[8, 8]), f32s(&[6, 8]));
        let linear = |heads, rotary, ins: &[&TensorType]| {
            let op = Op::Linear {
                transpose_b: true,
                scaled: false,
                added: false,
                heads,
                rotary,
            };
            infer(&op, ins)
        };
        assert_eq!(linear(2, false, &[&x, &w]), Ok(heads.clone()));
        assert_eq!(
            linear(2, true, &[&x, &w, &table, &table]),
            Ok(heads.clone())
        );
        let e = linear(3, false, &[&x, &w]).unwrap_err();
        assert!(e.contains("heads=3 must divide"), "{e}");
        let e = linear(0, true, &[&x, &w, &table, &table]).unwrap_err();
        assert!(e.contains("rotary=true needs heads > 0"), "{e}");
        let e = linear(2, true, &[&x, &w]).unwrap_err();
        assert!(e.contains("takes 4 operand(s), got 2"), "{e}");
        // Tables that do not broadcast to the heads, and an odd head size.
        let wide = TensorType::new(DType::F32, [2.into(), 1.into(), s.clone(), 8.into()]);
        assert!(linear(2, true, &[&x, &w, &wide, &wide]).is_err());
        assert!(linear(4, true, &[&x, &w, &table, &table]).is_err());

        let swiglu = |scaled, ins: &[&TensorType]| {
            let op = Op::SwiGlu {
                transpose_b: true,
                scaled,
            };
            infer(&op, ins)
        };
        let y = TensorType::new(DType::F32, [Dim::fixed(2), s.clone(), Dim::fixed(6)]);
        let n = f32s(&[6]);
        assert_eq!(swiglu(false, &[&x, &w6, &w6]), Ok(y.clone()));
        assert_eq!(swiglu(true, &[&x, &w6, &w6, &n, &n]), Ok(y));
        let e = swiglu(false, &[&x, &w6, &w]).unwrap_err();
        assert!(e.contains("projections differ"), "{e}");
        assert!(swiglu(true, &[&x, &w6, &w6, &n]).is_err());
        let ints = TensorType::new(DType::I64, [2, 8]);
        let iw = TensorType::new(DType::I64, [6, 8]);
        assert!(swiglu(false, &[&ints, &iw, &iw]).is_err());

        let attention = |merge_heads| Op::Attention {
            scale: crate::F64(0.5),
            causal: true,
            window: 0,
            merge_heads,
        };
        let q = TensorType::new(DType::F32, [2.into(), 4.into(), s.clone(), 8.into()]);
        let kv = TensorType::new(DType::F32, [2.into(), 2.into(), s.clone(), 8.into()]);
        let rows = TensorType::new(DType::F32, [2.into(), s, 32.into()]);
        assert_eq!(infer(&attention(true), &[&q, &kv, &kv]), Ok(rows));
        assert_eq!(infer(&attention(false), &[&q, &kv, &kv]), Ok(q.clone()));
    }

    #[test]
    fn moe_operands() {
        let x = TensorType::new(DType::F32, [Dim::sym("seq"), Dim::fixed(4)]);
        let (gate, w1, w2) = (f32s(&[2, 4]), f32s(&[6, 4]), f32s(&[4, 6]));
        let moe = |top_k, ins: &[&TensorType]| infer(&Op::Moe { top_k }, ins);
        let two = [&x, &gate, &w1, &w1, &w2, &w1, &w1, &w2];
        assert_eq!(moe(2, &two), Ok(x.clone()));
        let e = moe(1, &[&x, &gate, &w1, &w1, &w2]).unwrap_err();
        assert!(e.contains("gate f32[2, 4] must be [1, 4]"), "{e}");
        let e = moe(0, &two).unwrap_err();
        assert!(e.contains("top_k = 0 must be in 1..=2"), "{e}");
        let e = moe(1, &[&x, &gate, &w1, &w1, &w2, &w1, &w2, &w2]).unwrap_err();
        assert!(e.contains("expert 1 w3"), "{e}");
        let e = moe(1, &[&x, &gate, &w1, &w1]).unwrap_err();
        assert!(e.contains("three weights per expert"), "{e}");
        let ints = TensorType::new(DType::I64, [2, 4]);
        assert!(moe(1, &[&ints, &gate, &w1, &w1, &w2]).is_err());
    }
}
