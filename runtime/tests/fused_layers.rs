//! The fused layer ops the optimizer's `heads`, `swiglu` and `qkv` passes create (`linear`
//! with a head layout and RoPE, `attention` with merged heads, `swiglu`, `packed_linear` and
//! its parts) run by the reference
//! executor bit for bit as the chains of ops they are defined as
//! (`kiln_ir::decompose::expand` of them, run by the same executor), in f32 and bf16, on
//! pseudo-random data; the head layout is also checked by hand.

use kiln_ir::decompose::expand;
use kiln_ir::{DType, Dim, Graph, Op, TensorType, ValueId, F64};
use kiln_runtime::reference::{run, NoParams};
use kiln_runtime::Tensor;
use std::collections::HashMap;

/// Pseudo-random values in [-2, 2) (a fixed LCG), rounded to `dtype`.
fn tensor(shape: &[usize], dtype: DType, seed: u64) -> Tensor {
    let mut s = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
    let data: Vec<f32> = (0..shape.iter().product())
        .map(|_| {
            s = s
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
        })
        .collect();
    Tensor::from_f32(shape.to_vec(), data).unwrap().cast(dtype)
}

/// A graph of one op over inputs of the given shapes (all `dtype`), with its inputs' values.
fn one_op(op: Op, shapes: &[&[usize]], dtype: DType) -> (Graph, HashMap<String, Tensor>) {
    let mut g = Graph::new();
    let mut inputs = HashMap::new();
    let ids: Vec<ValueId> = shapes
        .iter()
        .enumerate()
        .map(|(i, shape)| {
            let name = format!("x{i}");
            let t = tensor(shape, dtype, i as u64 + 1);
            let dims = shape.iter().map(|&n| Dim::fixed(n as i64)).collect();
            inputs.insert(name.clone(), t);
            g.input(&name, TensorType { dtype, shape: dims })
        })
        .collect();
    let y = g.add(op, &ids).unwrap();
    g.add_output("y", y);
    (g, inputs)
}

/// Runs `g` and its full expansion; asserts the two outputs are equal bit for bit and that the
/// expansion has none of `g`'s fused ops left. Returns the output.
fn same_as_expansion(g: &Graph, inputs: &HashMap<String, Tensor>) -> Tensor {
    let h = expand(g, |_| true).unwrap();
    assert!(
        h.nodes().iter().all(|n| !matches!(
            n.op,
            Op::Linear { .. }
                | Op::PackedLinear { .. }
                | Op::SwiGlu { .. }
                | Op::Rotary
                | Op::Attention {
                    merge_heads: true,
                    ..
                }
        )),
        "{h}"
    );
    let got = run(g, inputs, &NoParams).unwrap().remove("y").unwrap();
    let want = run(&h, inputs, &NoParams).unwrap().remove("y").unwrap();
    assert_eq!((got.dtype(), got.shape()), (want.dtype(), want.shape()));
    let (a, b) = (got.to_f64_vec(), want.to_f64_vec());
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        assert_eq!(x.to_bits(), y.to_bits(), "element {i}: {x} vs {y}");
    }
    got
}

fn linear(scaled: bool, added: bool, heads: usize, rotary: bool) -> Op {
    Op::Linear {
        transpose_b: true,
        scaled,
        added,
        heads,
        rotary,
    }
}

#[test]
fn linear_heads_and_rope_are_their_chain() {
    for dtype in [DType::F32, DType::BF16] {
        for (scaled, added) in [(false, false), (true, false), (false, true), (true, true)] {
            for rotary in [false, true] {
                // x [2, 3, 8] · wᵀ (w [8, 8]) split into 2 heads of 4, tables [2, 1, 3, 4].
                let mut shapes: Vec<&[usize]> = vec![&[2, 3, 8], &[8, 8]];
                shapes.extend(scaled.then_some(&[8][..]));
                shapes.extend(added.then_some(&[8][..]));
                if rotary {
                    shapes.extend([&[2, 1, 3, 4][..], &[2, 1, 3, 4][..]]);
                }
                let (g, inputs) = one_op(linear(scaled, added, 2, rotary), &shapes, dtype);
                let y = same_as_expansion(&g, &inputs);
                assert_eq!(y.shape(), [2, 2, 3, 4]);
            }
        }
    }
}

#[test]
fn heads_layout_by_hand() {
    // x · Iᵀ = x: out[b, h, s, j] = x[b, s, 4h + j].
    let x = tensor(&[2, 3, 8], DType::F32, 9);
    let mut eye = vec![0.0f32; 64];
    for i in 0..8 {
        eye[i * 9] = 1.0;
    }
    let (mut g, _) = one_op(
        linear(false, false, 2, false),
        &[&[2, 3, 8], &[8, 8]],
        DType::F32,
    );
    g.add_output("x", ValueId(0));
    let inputs = HashMap::from([
        ("x0".to_string(), x.clone()),
        ("x1".to_string(), Tensor::from_f32(vec![8, 8], eye).unwrap()),
    ]);
    let y = run(&g, &inputs, &NoParams).unwrap().remove("y").unwrap();
    let (xv, yv) = (x.to_f64_vec(), y.to_f64_vec());
    for b in 0..2 {
        for h in 0..2 {
            for s in 0..3 {
                for j in 0..4 {
                    let got = yv[((b * 2 + h) * 3 + s) * 4 + j];
                    assert_eq!(got, xv[(b * 3 + s) * 8 + 4 * h + j], "{b} {h} {s} {j}");
                }
            }
        }
    }
}

#[test]
fn merged_attention_is_its_chain() {
    for dtype in [DType::F32, DType::BF16] {
        for causal in [false, true] {
            let op = Op::Attention {
                scale: F64(0.5),
                causal,
                window: 0,
                merge_heads: true,
            };
            let shapes: [&[usize]; 4] =
                [&[2, 4, 3, 4], &[2, 2, 5, 4], &[2, 2, 5, 6], &[2, 1, 1, 5]];
            let (g, inputs) = one_op(op, &shapes, dtype);
            let y = same_as_expansion(&g, &inputs);
            assert_eq!(y.shape(), [2, 3, 24]);
        }
    }
}

#[test]
fn swiglu_is_its_chain() {
    for dtype in [DType::F32, DType::BF16] {
        for scaled in [false, true] {
            let op = Op::SwiGlu {
                transpose_b: true,
                scaled,
            };
            let mut shapes: Vec<&[usize]> = vec![&[2, 3, 8], &[6, 8], &[6, 8]];
            if scaled {
                shapes.extend([&[6][..], &[6][..]]);
            }
            let (g, inputs) = one_op(op, &shapes, dtype);
            let y = same_as_expansion(&g, &inputs);
            assert_eq!(y.shape(), [2, 3, 6]);
        }
    }
}

#[test]
fn packed_linear_and_its_parts_are_their_chain() {
    for dtype in [DType::F32, DType::BF16] {
        for scaled in [0, 1, 3] {
            for (added, rotary) in [(false, 0), (true, 2), (false, 2), (true, 3)] {
                // q 4 heads, k and v 2 heads, of size 2 over x [2, 3, 8]; tables [2, 1, 3, 2].
                let mut shapes: Vec<&[usize]> = vec![&[2, 3, 8]];
                for (i, (w, n)) in [(&[8, 8][..], &[8][..]), (&[4, 8], &[4]), (&[4, 8], &[4])]
                    .into_iter()
                    .enumerate()
                {
                    shapes.push(w);
                    shapes.extend((i < scaled).then_some(n));
                    shapes.extend(added.then_some(n));
                }
                if rotary > 0 {
                    shapes.extend([&[2, 1, 3, 2][..], &[2, 1, 3, 2][..]]);
                }
                let op = Op::PackedLinear {
                    transpose_b: true,
                    heads: vec![4, 2, 2],
                    scaled,
                    added,
                    rotary,
                };
                let (mut g, inputs) = one_op(op, &shapes, dtype);
                let y = same_as_expansion(&g, &inputs);
                assert_eq!(y.shape(), [2, 8, 3, 2]);
                // The parts: each the group's own result in the expansion, bit for bit.
                let p = g.outputs()[0].value;
                for (name, start, end) in [("q", 0, 4), ("k", 4, 6), ("v", 6, 8)] {
                    let slice = Op::Slice {
                        axis: 1,
                        start: Dim::fixed(start),
                        end: Dim::fixed(end),
                    };
                    let part = g.add(slice, &[p]).unwrap();
                    g.add_output(name, part);
                }
                let h = expand(&g, |op| matches!(op, Op::PackedLinear { .. })).unwrap();
                let want = run(&g, &inputs, &NoParams).unwrap();
                let got = run(&h, &inputs, &NoParams).unwrap();
                for name in ["y", "q", "k", "v"] {
                    let (a, b) = (got[name].to_f64_vec(), want[name].to_f64_vec());
                    assert_eq!(got[name].shape(), want[name].shape());
                    assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()));
                }
            }
        }
    }
}
