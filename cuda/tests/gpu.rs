//! Every CUDA kernel against the reference executor, on fresh random inputs with poisoned
//! outputs. Needs a GPU: without one each test prints "no CUDA device" and returns
//! (`KILN_REQUIRE_GPU=1`, set by `scripts/gpu-check`, turns that into a failure). Each test
//! prints its seed; `KILN_SEED` replays one.

mod common;
mod gpu_support;

use common::generated_kernels;
use gpu_support::*;
use kiln_cuda::codegen::elementwise::{ArgLayout, Elementwise};
use kiln_cuda::launch::{self, Attention, PrefillTiles, Rowwise};
use kiln_cuda::Device;
use kiln_ir::trace::Tracer;
use kiln_ir::{DType, Op, F64};
use kiln_runtime::reference::{run, NoParams};
use kiln_runtime::Tensor;
use std::collections::HashMap;

/// Runs `op` over `args` on the reference executor.
fn ulp_bound(d: DType) -> f64 {
    match d {
        DType::F32 => 1e-6,
        DType::F16 => 2e-3,
        DType::BF16 => 1e-2,
        _ => 0.13,
    }
}

/// The bound for the hand-written kernels, which compute in f32 (the reference in f64) and
/// round once to the storage type: f32 accumulation error, or two units of the narrow type.
fn kernel_bound(d: DType) -> f64 {
    match d {
        DType::F32 => 1e-5,
        _ => 2.0 * ulp_bound(d),
    }
}

#[test]
fn fused_elementwise_matches_reference() {
    let Some(dev) = device_or_skip("fused_elementwise") else {
        return;
    };
    let mut rng = rng("fused_elementwise");
    for (label, ew) in generated_kernels(dev.arch()) {
        let (ew, args, plan) = elementwise_case(&mut rng, ew, 37, [3, 37, 41], 1000);
        let out_dt = ew.out_dtype().unwrap();
        let n: usize = plan.out.iter().product();
        let bufs: Vec<_> = args.iter().map(|a| upload(&dev, a)).collect();
        let out = poisoned(&dev, out_dt, n);
        launch::elementwise(
            &dev,
            &ew,
            &out,
            &bufs.iter().collect::<Vec<_>>(),
            &plan.meta,
            n,
        )
        .unwrap();
        let got = download(&dev, &out, out_dt, &plan.out);
        let want = reference(
            Op::FusedElementwise {
                body: ew.body.clone(),
            },
            &args.iter().collect::<Vec<_>>(),
        );
        assert_matches(&label, &got, &want, ulp_bound(out_dt));
    }
    // An integer division by zero is reported, as the reference executor reports it.
    let div = Elementwise {
        body: "(div $0 $1)".parse().unwrap(),
        args: vec![DType::I64, DType::I64],
        layouts: vec![ArgLayout::Same, ArgLayout::Same],
        rank: 1,
    };
    let a = upload(&dev, &Tensor::from_i64(vec![2], vec![7, 8]).unwrap());
    let z = upload(&dev, &Tensor::from_i64(vec![2], vec![2, 0]).unwrap());
    let out = poisoned(&dev, DType::I64, 2);
    assert!(launch::elementwise(&dev, &div, &out, &[&a, &z], &[2], 2).is_err());
}

#[test]
fn rowwise_kernels_match_reference() {
    let Some(dev) = device_or_skip("rowwise") else {
        return;
    };
    let mut rng = rng("rowwise");
    // 1000: whole 16-byte vectors (the register path, some threads with fewer vectors);
    // 1001: the scalar path; 20000: the register path at 640 threads for 16-bit types, and
    // rows over 4096 vectors (the scalar path again) for f32.
    for (dt, (rows, n)) in [DType::F32, DType::F16, DType::BF16]
        .into_iter()
        .flat_map(|dt| [(7, 1000), (5, 1001), (3, 20000)].map(|s| (dt, s)))
    {
        let x = random(&mut rng, dt, &[rows, n], 4.0, false);
        let w = random(&mut rng, dt, &[n], 1.0, false);
        let b = random(&mut rng, dt, &[n], 1.0, false);
        let (xb, wb, bb) = (upload(&dev, &x), upload(&dev, &w), upload(&dev, &b));
        let cases: [(Rowwise<'_>, Op, Vec<&Tensor>); 3] = [
            (
                Rowwise::RmsNorm { w: &wb, eps: 1e-6 },
                Op::RmsNorm { eps: F64(1e-6) },
                vec![&x, &w],
            ),
            (
                Rowwise::LayerNorm {
                    w: &wb,
                    b: &bb,
                    eps: 1e-5,
                },
                Op::LayerNorm { eps: F64(1e-5) },
                vec![&x, &w, &b],
            ),
            (Rowwise::Softmax, Op::Softmax { axis: 1 }, vec![&x]),
        ];
        for (op, ref_op, args) in cases {
            let y = poisoned(&dev, dt, rows * n);
            launch::rowwise(&dev, dt, op, &xb, &y, rows, n).unwrap();
            let got = download(&dev, &y, dt, &[rows, n]);
            assert_matches(
                &format!("{} {dt} {rows}x{n}", ref_op.name()),
                &got,
                &reference(ref_op, &args),
                kernel_bound(dt),
            );
        }
    }
}

#[test]
fn rope_matches_reference() {
    let Some(dev) = device_or_skip("rope") else {
        return;
    };
    let mut rng = rng("rope");
    let (b, h, s, d, table) = (2, 3, 5, 64, 40);
    for dt in [DType::F32, DType::BF16] {
        let x = random(&mut rng, dt, &[b, h, s, d], 2.0, false);
        let cos = random(&mut rng, DType::F32, &[table, d], 1.0, false);
        let sin = random(&mut rng, DType::F32, &[table, d], 1.0, false);
        let pos = random(&mut rng, DType::I64, &[b, s], 1.0, true);
        let pos = Tensor::from_i64(
            vec![b, s],
            pos.as_i64()
                .unwrap()
                .iter()
                .map(|p| p.rem_euclid(table as i64))
                .collect(),
        )
        .unwrap();
        // The Hugging Face formula: x * cos[pos] + rotate_half(x) * sin[pos].
        let t = Tracer::new();
        let xi = t.input("x", dt, [b, h, s, d]);
        let ci = t.input("cos", DType::F32, [table, d]);
        let si = t.input("sin", DType::F32, [table, d]);
        let pi = t.input("pos", DType::I64, [b, s]);
        let gather = |tab: &kiln_ir::trace::Tensor| {
            tab.index_select(0, &pi)
                .unwrap()
                .unsqueeze(1)
                .unwrap()
                .cast(dt)
                .unwrap()
        };
        let (c, sn) = (gather(&ci), gather(&si));
        let x1 = xi.slice(3, 0, d / 2).unwrap();
        let x2 = xi.slice(3, d / 2, d).unwrap();
        let rot = kiln_ir::trace::Tensor::cat(&[&x2.neg().unwrap(), &x1], 3).unwrap();
        let y = xi.mul(&c).unwrap().add(&rot.mul(&sn).unwrap()).unwrap();
        t.output("y", &y);
        let g = t.finish().unwrap();
        let inputs: HashMap<String, Tensor> = [
            ("x", x.clone()),
            ("cos", cos.clone()),
            ("sin", sin.clone()),
            ("pos", pos.clone()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let want = run(&g, &inputs, &NoParams).unwrap()["y"].clone();
        let out = poisoned(&dev, dt, b * h * s * d);
        let (xb, pb, cb, sb) = (
            upload(&dev, &x),
            upload(&dev, &pos),
            upload(&dev, &cos),
            upload(&dev, &sin),
        );
        launch::rope(&dev, dt, &xb, &pb, &cb, &sb, &out, [b, h, s, d], table).unwrap();
        assert_matches(
            &format!("rope {dt}"),
            &download(&dev, &out, dt, &[b, h, s, d]),
            &want,
            kernel_bound(dt),
        );
    }
}

#[test]
fn embedding_and_argmax_match_reference() {
    let Some(dev) = device_or_skip("embedding_argmax") else {
        return;
    };
    let mut rng = rng("embedding_argmax");
    for dt in [DType::F32, DType::F16, DType::BF16] {
        let (vocab, hidden, rows) = (500, 96, 9);
        let table = random(&mut rng, dt, &[vocab, hidden], 1.0, false);
        let ids = random(&mut rng, DType::I64, &[rows], 1.0, true);
        let ids = Tensor::from_i64(
            vec![rows],
            ids.as_i64()
                .unwrap()
                .iter()
                .map(|p| p.rem_euclid(vocab as i64))
                .collect(),
        )
        .unwrap();
        let out = poisoned(&dev, dt, rows * hidden);
        let (tb, ib) = (upload(&dev, &table), upload(&dev, &ids));
        launch::embedding(&dev, dt, &tb, &ib, &out, rows, [vocab, hidden]).unwrap();
        assert_matches(
            &format!("embedding {dt}"),
            &download(&dev, &out, dt, &[rows, hidden]),
            &reference(Op::Gather { axis: 0 }, &[&table, &ids]),
            0.0,
        );
        let bad = Tensor::from_i64(vec![1], vec![vocab as i64]).unwrap();
        let err = launch::embedding(&dev, dt, &tb, &upload(&dev, &bad), &out, 1, [vocab, hidden]);
        assert!(err.is_err(), "an id outside the table must be reported");

        let logits = random(&mut rng, dt, &[rows, 32000], 8.0, false);
        let out = poisoned(&dev, DType::I64, rows);
        launch::argmax(&dev, dt, &upload(&dev, &logits), &out, rows, 32000).unwrap();
        assert_matches(
            &format!("argmax {dt}"),
            &download(&dev, &out, DType::I64, &[rows]),
            &reference(
                Op::ArgMax {
                    axis: 1,
                    keepdim: false,
                },
                &[&logits],
            ),
            0.0,
        );
    }
}

/// Attention inputs for `a` and, with `masked`, an additive bf16 mask `[b, 1, 1, sk]`: random
/// values in ±2, and -inf on the last keys of batch 1 (key padding).
fn attention_inputs(
    rng: &mut impl rand::Rng,
    a: &Attention,
    masked: bool,
) -> (Vec<Tensor>, Option<Tensor>) {
    let q = random(rng, DType::BF16, &[a.batch, a.hq, a.sq, a.d], 2.0, false);
    let k = random(rng, DType::BF16, &[a.batch, a.hkv, a.sk, a.d], 2.0, false);
    let v = random(rng, DType::BF16, &[a.batch, a.hkv, a.sk, a.d], 2.0, false);
    let mask = masked.then(|| {
        let vals: Vec<f64> = (0..a.batch * a.sk)
            .map(|i| {
                let (bi, j) = (i / a.sk, i % a.sk);
                if bi == 1 && j + 7 >= a.sk {
                    f64::NEG_INFINITY
                } else {
                    rng.random_range(-2.0..2.0)
                }
            })
            .collect();
        Tensor::new(
            vec![a.batch, 1, 1, a.sk],
            kiln_runtime::Storage::from_scalars(
                DType::BF16,
                vals.into_iter().map(kiln_ir::Scalar::Float),
            ),
        )
        .unwrap()
    });
    (vec![q, k, v], mask)
}

/// Which attention kernel a check runs.
#[derive(Debug, Clone, Copy)]
enum Run {
    Prefill(PrefillTiles),
    /// Decode with this many key splits.
    Decode(usize),
}

fn check_attention(dev: &Device, rng: &mut impl rand::Rng, a: Attention, masked: bool, run: Run) {
    let (qkv, mask) = attention_inputs(rng, &a, masked);
    let mut args: Vec<&Tensor> = qkv.iter().collect();
    if let Some(m) = &mask {
        args.push(m);
    }
    let want = reference(
        Op::Attention {
            scale: F64(f64::from(a.scale)),
            causal: a.causal,
            window: a.window,
            merge_heads: false,
        },
        &args,
    );
    let bufs: Vec<_> = qkv.iter().map(|t| upload(dev, t)).collect();
    let mb = mask.as_ref().map(|m| upload(dev, m));
    let mask_arg = mb.as_ref().map(|m| (m, [a.sk as i64, 0, 0, 1]));
    let out = poisoned(dev, DType::BF16, a.batch * a.hq * a.sq * a.d);
    match run {
        Run::Decode(splits) => launch::attention_decode(
            dev, &a, &bufs[0], &bufs[1], &bufs[2], mask_arg, &out, splits,
        ),
        Run::Prefill(tiles) => launch::attention_prefill_tiled(
            dev, &a, &bufs[0], &bufs[1], &bufs[2], mask_arg, &out, tiles,
        ),
    }
    .unwrap();
    let got = download(dev, &out, DType::BF16, &[a.batch, a.hq, a.sq, a.d]);
    assert_matches(
        &format!("attention {run:?} {a:?} masked={masked}"),
        &got,
        &want,
        2e-2,
    );
}

#[test]
fn flash_attention_prefill_matches_reference() {
    let Some(dev) = device_or_skip("attention_prefill") else {
        return;
    };
    let mut rng = rng("attention_prefill");
    for (d, tiles) in [64, 128]
        .into_iter()
        .flat_map(|d| PrefillTiles::ALL.map(|t| (d, t)))
    {
        let run = Run::Prefill(tiles);
        let base = Attention {
            batch: 2,
            hq: 4,
            hkv: 2,
            sq: 130,
            sk: 130,
            d,
            scale: 1.0 / (d as f32).sqrt(),
            causal: true,
            window: 0,
        };
        check_attention(&dev, &mut rng, base, false, run);
        check_attention(
            &dev,
            &mut rng,
            Attention {
                causal: false,
                ..base
            },
            true,
            run,
        );
        check_attention(&dev, &mut rng, Attention { window: 48, ..base }, false, run);
        check_attention(
            &dev,
            &mut rng,
            Attention {
                sq: 37,
                sk: 201,
                ..base
            },
            true,
            run,
        );
        // Longer sequences: several key tiles per query block, most of them unmasked (the
        // kernel's path without per-element masking), across the cp.async pipeline.
        let long = Attention {
            sq: 300,
            sk: 300,
            ..base
        };
        check_attention(&dev, &mut rng, long, false, run);
        check_attention(
            &dev,
            &mut rng,
            Attention {
                window: 100,
                ..long
            },
            false,
            run,
        );
        check_attention(
            &dev,
            &mut rng,
            Attention {
                causal: false,
                sq: 77,
                sk: 384,
                ..base
            },
            false,
            run,
        );
    }
}

#[test]
fn flash_decoding_matches_reference() {
    let Some(dev) = device_or_skip("attention_decode") else {
        return;
    };
    let mut rng = rng("attention_decode");
    for d in [64, 128] {
        let base = Attention {
            batch: 2,
            hq: 8,
            hkv: 2,
            sq: 1,
            sk: 333,
            d,
            scale: 1.0 / (d as f32).sqrt(),
            causal: true,
            window: 0,
        };
        check_attention(&dev, &mut rng, base, false, Run::Decode(5));
        check_attention(&dev, &mut rng, base, true, Run::Decode(5));
        check_attention(
            &dev,
            &mut rng,
            Attention {
                window: 100,
                ..base
            },
            false,
            Run::Decode(5),
        );
        // Six query heads per KV head: a full group of 4 and a partial one of 2; the split
        // count the launcher would pick (whole 64-key tiles, several per chunk here).
        let wide = Attention {
            hq: 12,
            sk: 1000,
            ..base
        };
        let splits = launch::decode_splits(&dev, &wide).unwrap();
        check_attention(&dev, &mut rng, wide, true, Run::Decode(splits));
        check_attention(&dev, &mut rng, wide, false, Run::Decode(3));
        // More splits than keys fit: empty trailing chunks.
        check_attention(
            &dev,
            &mut rng,
            Attention { sk: 9, ..base },
            false,
            Run::Decode(4),
        );
    }
}

#[test]
fn gemv_matches_reference() {
    let Some(dev) = device_or_skip("gemv") else {
        return;
    };
    let mut rng = rng("gemv");
    let mut weights = vec![DType::BF16];
    if dev.arch().has_fp8() {
        weights.push(DType::F8E4M3);
    }
    for wt in weights {
        for k in [1024, 1000] {
            let n = 300;
            let w = random(&mut rng, wt, &[n, k], 1.0, false);
            let x = random(&mut rng, DType::F32, &[k, 1], 1.0, false);
            let scale = 0.75f32;
            let wf = w.cast(DType::F32);
            let mut want = reference(
                Op::MatMul {
                    transpose_a: false,
                    transpose_b: false,
                },
                &[&wf, &x],
            );
            want = Tensor::from_f32(
                vec![n],
                want.as_f32().unwrap().iter().map(|v| v * scale).collect(),
            )
            .unwrap();
            let y = poisoned(&dev, DType::F32, n);
            launch::gemv(
                &dev,
                wt,
                &upload(&dev, &w),
                &upload(&dev, &x),
                &y,
                n,
                k,
                scale,
            )
            .unwrap();
            assert_matches(
                &format!("gemv {wt} k={k}"),
                &download(&dev, &y, DType::F32, &[n]),
                &want,
                1e-5,
            );
        }
    }
}

#[test]
fn allocator_reuses_freed_buffers() {
    let Some(dev) = device_or_skip("allocator") else {
        return;
    };
    let a = dev.allocator().alloc(1000).unwrap();
    drop(a);
    assert_eq!(dev.allocator().cached_bytes(), 1024);
    let b = dev.allocator().alloc(900).unwrap();
    assert_eq!(dev.allocator().cached_bytes(), 0);
    assert_eq!(b.len(), 900);
    drop(b);
    dev.allocator().trim();
    assert_eq!(dev.allocator().cached_bytes(), 0);
}
