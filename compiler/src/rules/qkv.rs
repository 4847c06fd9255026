//! The q, k and v projections of one attention as one kernel: the IR's `packed_linear`
//! ([`kiln_ir::Op::PackedLinear`]), whose result holds the three head layouts side by side,
//! each projection then being a `slice` of it that selects its heads (a part,
//! [`kiln_ir::decompose::group_part`]). Runs last, after [`super::heads`]
//! ([`crate::pipeline::lowered_passes`]), whose head-layout `linear` ops it packs.
//!
//! | rule | matches | becomes |
//! |---|---|---|
//! | `qkv` | `linear(x, Wq, ..) heads=hq`, `linear(x, Wk, ..) heads=hk`, `linear(x, Wv, ..) heads=hv` read (through `cast`s, and for k and v the last operand of a KV-cache `concat`) as operands 0, 1 and 2 of one `attention` | `p = packed_linear(x, Wq, .., Wk, .., Wv, ..[, cos, sin]) heads=[hq, hk, hv]`; q, k, v = `slice(p)` of their heads |
//!
//! Design. The IR has single-output nodes and the projections have readers besides attention
//! (the KV cache: graph outputs `present.*` and decode's `concat(past, new)`), so each
//! projection stays a value: the part of the packed result holding its heads. No weight is
//! concatenated (the op keeps the three weights, scales and biases as operands), so nothing
//! runs at load; and no backend copies a part: [`kiln_ir::decompose::expand`] writes the packed
//! op as its three projections and each part as its projection's result (the CPU backend's
//! legalization and the CUDA executor both plan that expansion, the reference executor
//! computes the op as the concatenation, whose parts are the projections bit for bit). So
//! `kiln inspect` counts the packed op as one kernel and its parts as none.
//!
//! This is a graph pass, not an e-graph rule: it matches three projections and an attention
//! at once and replaces three values by parts of one new one, which egg's one-class rewrites
//! and tree-cost extraction would not choose (the packed op counted once per part).
//!
//! Conditions (each guarded by a near-miss test): the three are distinct `linear` ops with
//! heads, over the same `x`, with the same `transpose_b`, all with an addend (a bias: Qwen2,
//! BERT) or none, scaled ones first (fp8 scales q while k and v stay bf16), rotated ones first
//! and with the same `cos` and `sin` (q and k with RoPE, v without), and one head size, dtype
//! and row shape ([`kiln_ir::infer`] of the packed op). Every reader of q (or of the casts
//! leading from it to the attention) is that chain or the attention; k and v and their casts
//! may also be read by a `concat` (the KV cache) or be graph outputs (`present.*`); anything
//! else (a second reader, another attention) leaves the three apart.

use kiln_ir::{infer, Dim, Graph, Node, Op, TensorType, ValueId};
use std::collections::HashMap;

/// `g` with the q, k and v projections of every attention that matches packed into one
/// `packed_linear` op (the pass; the rest of `g` unchanged).
pub fn pack(g: &Graph) -> Graph {
    let readers = readers(g);
    let outputs: Vec<ValueId> = g.outputs().iter().map(|o| o.value).collect();
    let mut nodes: Vec<Node> = g.nodes().to_vec();
    let mut replaced: HashMap<ValueId, ValueId> = HashMap::new();
    for (a, node) in g.iter() {
        if !matches!(node.op, Op::Attention { .. }) || node.inputs.len() < 3 {
            continue;
        }
        let Some(found) = projections(g, &readers, &outputs, a) else {
            continue;
        };
        if found.iter().any(|p| replaced.contains_key(p)) {
            continue;
        }
        let Some((op, operands, ty)) = packed(g, found) else {
            continue;
        };
        let p = ValueId(nodes.len() as u32);
        nodes.push(Node {
            op,
            inputs: operands,
            ty: ty.clone(),
        });
        let axis = ty.rank() - 3;
        let mut start = 0;
        for proj in found {
            let part_ty = g.ty(proj).clone();
            let h = part_ty.shape[axis].clone();
            let end = &Dim::fixed(start) + &h;
            let part = ValueId(nodes.len() as u32);
            nodes.push(Node {
                op: Op::Slice {
                    axis,
                    start: Dim::fixed(start),
                    end: end.clone(),
                },
                inputs: vec![p],
                ty: part_ty,
            });
            start = end.as_fixed().unwrap_or(start);
            replaced.insert(proj, part);
        }
    }
    if replaced.is_empty() {
        return g.clone();
    }
    emit(g, &nodes, &replaced)
}

/// Each value's readers: `(node, operand index)`.
fn readers(g: &Graph) -> HashMap<ValueId, Vec<(ValueId, usize)>> {
    let mut out: HashMap<ValueId, Vec<(ValueId, usize)>> = HashMap::new();
    for (v, node) in g.iter() {
        for (i, &x) in node.inputs.iter().enumerate() {
            out.entry(x).or_default().push((v, i));
        }
    }
    out
}

/// The q, k and v projections attention `a` reads, when each is a `linear` with heads whose
/// readers (and its casts' readers) are only the chain to `a`, and for k and v also KV-cache
/// concats and graph outputs.
fn projections(
    g: &Graph,
    readers: &HashMap<ValueId, Vec<(ValueId, usize)>>,
    outputs: &[ValueId],
    a: ValueId,
) -> Option<[ValueId; 3]> {
    let node = g.node(a)?;
    let mut found = [a; 3];
    for (i, slot) in found.iter_mut().enumerate() {
        let kv = i > 0;
        // Walk back from the attention's operand to the projection.
        let mut chain = vec![node.inputs[i]];
        let proj = loop {
            let v = *chain.last()?;
            let n = g.node(v)?;
            match &n.op {
                Op::Linear { heads: 1.., .. } => break v,
                Op::Cast { .. } => chain.push(n.inputs[0]),
                Op::Concat { .. } if kv && n.inputs.len() >= 2 => chain.push(*n.inputs.last()?),
                _ => return None,
            }
        };
        // Every reader along the chain: the next value toward the attention (for the first,
        // the attention at this operand), or for k and v the KV cache and the outputs.
        for (j, &v) in chain.iter().enumerate() {
            if !kv && outputs.contains(&v) {
                return None;
            }
            for &(r, at) in readers.get(&v).map_or(&[][..], Vec::as_slice) {
                let next = match j {
                    0 => r == a && at == i,
                    _ => r == chain[j - 1],
                };
                let cache = kv && matches!(g.node(r).map(|n| &n.op), Some(Op::Concat { .. }));
                if !(next || cache) {
                    return None;
                }
            }
        }
        *slot = proj;
    }
    // Three distinct projections: one read at two operands fails the reader check above.
    Some(found)
}

/// True when `now` equals the first value `seen` recorded (recording `now` if none).
fn same<T: Copy + PartialEq>(seen: &mut Option<T>, now: T) -> bool {
    *seen.get_or_insert(now) == now
}

/// The `packed_linear` of the projections `[q, k, v]`: its op, operands and type, when they
/// share `x`, `transpose_b` and the addend flag, scaled and rotated ones come first, rotated
/// ones share their tables, and the packed op's type infers.
fn packed(g: &Graph, projs: [ValueId; 3]) -> Option<(Op, Vec<ValueId>, TensorType)> {
    let mut x = None;
    let (mut transpose, mut add) = (None, None);
    let (mut heads, mut scaled, mut rotary) = (vec![], 0, 0);
    let mut tables: Option<&[ValueId]> = None;
    let mut operands = vec![];
    for (i, &p) in projs.iter().enumerate() {
        let n = g.node(p)?;
        let Op::Linear {
            transpose_b,
            scaled: s,
            added,
            heads: h,
            rotary: r,
        } = n.op
        else {
            return None;
        };
        if !same(&mut x, n.inputs[0])
            || !same(&mut transpose, transpose_b)
            || !same(&mut add, added)
        {
            return None;
        }
        // Rotated groups first (the op rotates a leading count). Scaled ones must come first
        // too; a scaled group after an unscaled one puts a weight (rank >= 2) where the op
        // reads a scale ([n]), which `infer` below rejects.
        if r && rotary < i {
            return None;
        }
        scaled += usize::from(s);
        rotary += usize::from(r);
        let epilogue = 2 + usize::from(s) + usize::from(added);
        if r {
            let t = &n.inputs[epilogue..epilogue + 2];
            if *tables.get_or_insert(t) != t {
                return None;
            }
        }
        heads.push(h);
        operands.extend_from_slice(&n.inputs[1..epilogue]);
    }
    let mut all = vec![x?];
    all.extend(operands);
    all.extend(tables.into_iter().flatten());
    let op = Op::PackedLinear {
        transpose_b: transpose?,
        heads,
        scaled,
        added: add?,
        rotary,
    };
    let tys: Vec<&TensorType> = all.iter().map(|&v| g.ty(v)).collect();
    let ty = infer(&op, &tys).ok()?;
    Some((op, all, ty))
}

/// The graph of `nodes` (`g`'s, then the packed ops and their parts) with every replaced
/// projection's readers reading its part instead, in `g`'s order: each part where its
/// projection was, the packed op (and any operand of it not yet written, such as fp8's
/// reshaped q scale) just before its first part. So the CPU backend's legalized graph, and
/// its plan, keep their order.
fn emit(g: &Graph, nodes: &[Node], replaced: &HashMap<ValueId, ValueId>) -> Graph {
    let mut out = Graph::new();
    let mut done: Vec<Option<ValueId>> = vec![None; nodes.len()];
    let resolve = |v: ValueId| replaced.get(&v).copied().unwrap_or(v);
    let mut stack: Vec<ValueId> = vec![];
    for i in 0..g.nodes().len() {
        stack.push(resolve(ValueId(i as u32)));
        while let Some(&top) = stack.last() {
            if done[top.index()].is_some() {
                stack.pop();
                continue;
            }
            let node = &nodes[top.index()];
            let pending: Vec<ValueId> = node
                .inputs
                .iter()
                .map(|&x| resolve(x))
                .filter(|x| done[x.index()].is_none())
                .collect();
            if pending.is_empty() {
                let inputs = node
                    .inputs
                    .iter()
                    .filter_map(|&x| done[resolve(x).index()])
                    .collect();
                done[top.index()] = Some(out.push(Node {
                    op: node.op.clone(),
                    inputs,
                    ty: node.ty.clone(),
                }));
                stack.pop();
            } else {
                stack.extend(pending);
            }
        }
    }
    for o in g.outputs() {
        if let Some(v) = done[resolve(o.value).index()] {
            out.add_output(&o.name, v);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::pack;
    use crate::rules::check::pass_exact;
    use kiln_ir::trace::{Tensor, Tracer};
    use kiln_ir::{DType, Graph, Op, F64};

    /// One attention block's projections: `x [2, 3, 16]`, `hq` query and `hkv` key/value heads
    /// of size 4 (v's size `dv`), q and k rotated, and the variations the fields name.
    #[derive(Clone, Copy)]
    struct Spec {
        hq: usize,
        hkv: usize,
        dv: usize,
        /// q, k, v with biases (Qwen2).
        bias: bool,
        /// q scaled per column (fp8, k and v bf16); `scale_k` scales k instead.
        scale_q: bool,
        scale_k: bool,
        /// Each projection rounded to bf16 and back before attention, the bf16 value the
        /// present output (precision lowering's form).
        cast: bool,
        /// k and v appended to a past cache by `concat` (decode).
        cache: bool,
        /// v projects another activation.
        v_other_x: bool,
        /// v's weight stored `[in, out]` (not transposed).
        v_plain: bool,
        /// k rotated with other tables.
        k_other_tables: bool,
        /// q, or k, also read by an `exp` that is a graph output.
        q_reader: bool,
        k_reader: bool,
        /// q itself a graph output.
        q_output: bool,
        /// q not rotated (k still is).
        q_unrotated: bool,
    }

    const LLAMA: Spec = Spec {
        hq: 4,
        hkv: 2,
        dv: 4,
        bias: false,
        scale_q: false,
        scale_k: false,
        cast: false,
        cache: false,
        v_other_x: false,
        v_plain: false,
        k_other_tables: false,
        q_reader: false,
        k_reader: false,
        q_output: false,
        q_unrotated: false,
    };

    fn layer(s: Spec) -> Graph {
        let t = Tracer::new();
        let x = t.input("x", DType::F32, [2, 3, 16]);
        let x2 = t.input("x2", DType::F32, [2, 3, 16]);
        let table = |name: &str| t.input(name, DType::F32, [2, 1, 3, 4]);
        let (cos, sin) = (table("cos"), table("sin"));
        let (cos2, sin2) = (table("cos2"), table("sin2"));
        let proj = |name: &str,
                    x: &Tensor,
                    heads: usize,
                    d: usize,
                    scaled: bool,
                    rope: Option<[&Tensor; 2]>,
                    transpose_b: bool| {
            let n = (heads * d) as i64;
            let w = match transpose_b {
                true => t.param(&format!("{name}.w"), DType::F32, [n, 16]),
                false => t.param(&format!("{name}.w"), DType::F32, [16, n]),
            };
            let mut ins = vec![x.clone(), w];
            if scaled {
                ins.push(t.param(&format!("{name}.s"), DType::F32, [n]));
            }
            if s.bias {
                ins.push(t.param(&format!("{name}.b"), DType::F32, [n]));
            }
            ins.extend(rope.into_iter().flatten().cloned());
            let op = Op::Linear {
                transpose_b,
                scaled,
                added: s.bias,
                heads,
                rotary: rope.is_some(),
            };
            let refs: Vec<&Tensor> = ins.iter().collect();
            t.apply(op, &refs).unwrap()
        };
        let k_tables = match s.k_other_tables {
            true => [&cos2, &sin2],
            false => [&cos, &sin],
        };
        let q_rope = (!s.q_unrotated).then_some([&cos, &sin]);
        let q = proj("q", &x, s.hq, 4, s.scale_q, q_rope, true);
        let k = proj("k", &x, s.hkv, 4, s.scale_k, Some(k_tables), true);
        let vx = if s.v_other_x { &x2 } else { &x };
        let v = proj("v", vx, s.hkv, s.dv, false, None, !s.v_plain);
        if s.q_reader {
            t.output("eq", &q.exp().unwrap());
        }
        if s.q_output {
            t.output("q", &q);
        }
        if s.k_reader {
            t.output("ek", &k.exp().unwrap());
        }
        let round = |p: &Tensor| match s.cast {
            true => {
                let b = p.cast(DType::BF16).unwrap();
                (b.cast(DType::F32).unwrap(), b)
            }
            false => (p.clone(), p.clone()),
        };
        let (q, _) = round(&q);
        let (mut k, present_k) = round(&k);
        let (mut v, present_v) = round(&v);
        if s.cache {
            let past = |name: &str, d: i64| t.input(name, DType::F32, [2, s.hkv as i64, 5, d]);
            let concat = Op::Concat { axis: 2 };
            let pk = past("past_k", 4);
            k = t.apply(concat.clone(), &[&pk, &k]).unwrap();
            let pv = past("past_v", s.dv as i64);
            v = t.apply(concat, &[&pv, &v]).unwrap();
        }
        t.output("present.k", &if s.cache { k.clone() } else { present_k });
        t.output("present.v", &if s.cache { v.clone() } else { present_v });
        let op = Op::Attention {
            scale: F64(0.5),
            causal: true,
            window: 0,
            merge_heads: true,
        };
        t.output("y", &t.apply(op, &[&q, &k, &v]).unwrap());
        t.finish().unwrap()
    }

    /// A `packed_linear`'s `(heads, scaled, added, rotary)`.
    type Packed = (Vec<usize>, usize, bool, usize);

    /// The fields of each `packed_linear` of `g`, and how many `linear` ops are left.
    fn packed(g: &Graph) -> (Vec<Packed>, usize) {
        let mut out = vec![];
        let mut linears = 0;
        for n in g.nodes() {
            match &n.op {
                Op::PackedLinear {
                    heads,
                    scaled,
                    added,
                    rotary,
                    ..
                } => out.push((heads.clone(), *scaled, *added, *rotary)),
                Op::Linear { .. } => linears += 1,
                _ => {}
            }
        }
        (out, linears)
    }

    fn packs(s: Spec) -> bool {
        let (p, linears) = packed(&pass_exact(&layer(s), pack));
        match p.len() {
            1 => {
                assert_eq!(linears, 0);
                true
            }
            _ => {
                assert_eq!((p.len(), linears), (0, 3));
                false
            }
        }
    }

    #[test]
    fn q_k_and_v_become_one_packed_linear() {
        let h = pass_exact(&layer(LLAMA), pack);
        assert_eq!(packed(&h), (vec![(vec![4, 2, 2], 0, false, 2)], 0));
        // Three slices, one per group, each a part the count leaves out.
        let parts = h
            .iter()
            .filter(|&(v, _)| kiln_ir::decompose::group_part(&h, v).is_some())
            .count();
        assert_eq!(parts, 3);
        // MHA, biases, fp8's scaled q, bf16 roundings, the decode cache, all at once too.
        let mha = Spec { hkv: 4, ..LLAMA };
        let h = pass_exact(&layer(mha), pack);
        assert_eq!(packed(&h).0, [(vec![4, 4, 4], 0, false, 2)]);
        let qwen2 = Spec {
            bias: true,
            ..LLAMA
        };
        assert!(packed(&pass_exact(&layer(qwen2), pack)).0[0].2);
        let fp8 = Spec {
            scale_q: true,
            cast: true,
            ..LLAMA
        };
        assert_eq!(packed(&pass_exact(&layer(fp8), pack)).0[0].1, 1);
        let decode = Spec {
            cache: true,
            cast: true,
            bias: true,
            ..LLAMA
        };
        assert!(packs(decode));
    }

    #[test]
    fn near_misses_stay_three_projections() {
        let misses = [
            Spec {
                v_other_x: true,
                ..LLAMA
            },
            Spec {
                v_plain: true,
                hkv: 4,
                ..LLAMA
            },
            Spec {
                scale_k: true,
                ..LLAMA
            },
            Spec { dv: 8, ..LLAMA },
            Spec {
                k_other_tables: true,
                ..LLAMA
            },
            Spec {
                q_reader: true,
                ..LLAMA
            },
            Spec {
                k_reader: true,
                ..LLAMA
            },
            Spec {
                q_reader: true,
                cast: true,
                ..LLAMA
            },
            Spec {
                q_output: true,
                ..LLAMA
            },
            Spec {
                q_unrotated: true,
                ..LLAMA
            },
        ];
        for (i, s) in misses.into_iter().enumerate() {
            assert!(!packs(s), "near miss {i} packed");
        }
        // The positive twins of the scale and reader misses still pack.
        assert!(packs(Spec {
            scale_q: true,
            scale_k: true,
            ..LLAMA
        }));
        assert!(packs(Spec {
            cache: true,
            ..LLAMA
        }));
    }
}
