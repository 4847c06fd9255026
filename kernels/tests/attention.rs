//! Flash attention against the reference executor's `attention` op on random data: with and
//! without a mask, causal or not, sliding windows, GQA 4:2 and 8:1, decode (q_len 1, long kv,
//! where the key range is split over threads), odd head dims, q/k/v read from a `[b, s, h, d]`
//! layout through strides and the output written as `[b, s, h, d]`, and the degenerate rows
//! (no visible key → zeros, all visible scores −inf → NaN), k/v read from a KV cache with spare
//! capacity (NaN there), k/v stored as bf16 (a narrow KV cache: equal, bit for bit, to the f32
//! kernel on the widened values); at every instruction-set level.
//!
//! Tolerance: inputs in [−1, 1], masks in [−2, 0]; every output is a convex combination of
//! value rows, so |out| ≤ 1 and |got − want| ≤ 2e-5 absolute (f32 dot products and online
//! softmax against the reference's f64).

mod common;

use common::{eval, f32t, isas, random, rng};
use kiln_ir::trace::Tracer;
use kiln_ir::{DType, Op, F64};
use kiln_kernels::attention::{
    attention_bf16_kv_with, attention_f32_with, AttnOptions, AttnShape, Bf16View, MaskView,
    Strides4, View,
};
use kiln_kernels::{Isa, KernelError};

/// Which mask operand a case passes.
#[derive(Clone, Copy, Debug)]
enum Mask {
    None,
    /// Full `[b, hq, sq, sk]`.
    Full,
    /// `[b, 1, 1, sk]` (a padding mask), broadcast over heads and queries.
    Padding,
}

#[derive(Clone, Copy, Debug)]
struct Case {
    b: usize,
    hq: usize,
    hkv: usize,
    sq: usize,
    sk: usize,
    d: usize,
    dv: usize,
    causal: bool,
    window: usize,
    mask: Mask,
    /// q/k/v stored as `[b, s, h, d]` and the output written as `[b, s, h, dv]`.
    bshd: bool,
    /// k/v stored as a KV cache with room for this many positions (`[b, h, cap, d]`, the
    /// spare rows NaN, so reading one shows); 0: dense.
    cap: usize,
    /// q and k rounded to bf16 values (a bf16 graph's operands: prefill scores them with
    /// `vdpbf16ps` where the CPU has it).
    bf16: bool,
    /// k and v rounded to bf16 values and passed as bf16 (a narrow KV cache).
    kv_bf16: bool,
}

fn case(b: usize, hq: usize, hkv: usize, sq: usize, sk: usize, d: usize) -> Case {
    Case {
        b,
        hq,
        hkv,
        sq,
        sk,
        d,
        dv: d,
        causal: false,
        window: 0,
        mask: Mask::None,
        bshd: false,
        cap: 0,
        bf16: false,
        kv_bf16: false,
    }
}

/// Dense `[b, h, s, d]` data stored with room for `cap` positions per head, the spare rows
/// NaN.
fn with_capacity(x: &[f32], s: usize, d: usize, cap: usize) -> Vec<f32> {
    let mut y = Vec::with_capacity(x.len() / s.max(1) * cap);
    for head in x.chunks_exact((s * d).max(1)) {
        y.extend_from_slice(head);
        y.resize(y.len() + (cap - s) * d, f32::NAN);
    }
    y
}

/// `[b, h, s, d]` dense data copied into a `[b, s, h, d]` buffer.
fn to_bshd(x: &[f32], b: usize, h: usize, s: usize, d: usize) -> Vec<f32> {
    let mut y = vec![0.0; x.len()];
    for bi in 0..b {
        for hi in 0..h {
            for si in 0..s {
                let src = ((bi * h + hi) * s + si) * d;
                let dst = ((bi * s + si) * h + hi) * d;
                y[dst..dst + d].copy_from_slice(&x[src..src + d]);
            }
        }
    }
    y
}

fn bshd_strides(h: usize, s: usize, d: usize) -> Strides4 {
    Strides4 {
        batch: s * h * d,
        head: d,
        seq: h * d,
    }
}

/// The reference result `[b, hq, sq, dv]` of one attention op.
fn reference(c: &Case, scale: f32, q: &[f32], k: &[f32], v: &[f32], m: Option<&[f32]>) -> Vec<f32> {
    let t = Tracer::new();
    let qs = [c.b, c.hq, c.sq, c.d];
    let ks = [c.b, c.hkv, c.sk, c.d];
    let vs = [c.b, c.hkv, c.sk, c.dv];
    let ms = mask_shape(c);
    let (qt, kt, vt) = (
        t.input("q", DType::F32, qs),
        t.input("k", DType::F32, ks),
        t.input("v", DType::F32, vs),
    );
    let op = Op::Attention {
        scale: F64(f64::from(scale)),
        causal: c.causal,
        window: c.window,
        merge_heads: false,
    };
    let mut inputs = vec![
        ("q", f32t(&qs, q)),
        ("k", f32t(&ks, k)),
        ("v", f32t(&vs, v)),
    ];
    let y = match m {
        Some(m) => {
            let mt = t.input("m", DType::F32, ms);
            inputs.push(("m", f32t(&ms, m)));
            t.apply(op, &[&qt, &kt, &vt, &mt]).unwrap()
        }
        None => t.apply(op, &[&qt, &kt, &vt]).unwrap(),
    };
    t.output("y", &y);
    eval(&t, inputs)
}

fn mask_shape(c: &Case) -> [usize; 4] {
    match c.mask {
        Mask::Padding => [c.b, 1, 1, c.sk],
        _ => [c.b, c.hq, c.sq, c.sk],
    }
}

/// Runs the kernel on `c` at `isa`; returns the output as dense `[b, hq, sq, dv]`.
#[allow(clippy::too_many_arguments)]
fn kernel(
    isa: Isa,
    c: &Case,
    scale: f32,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    m: Option<&[f32]>,
) -> Vec<f32> {
    let shape = AttnShape {
        batch: c.b,
        q_heads: c.hq,
        kv_heads: c.hkv,
        q_len: c.sq,
        kv_len: c.sk,
        head_dim: c.d,
        v_dim: c.dv,
    };
    let opts = AttnOptions {
        scale,
        causal: c.causal,
        window: c.window,
    };
    let (qd, kd, vd, qst, kst, vst, ost) = if c.bshd {
        (
            to_bshd(q, c.b, c.hq, c.sq, c.d),
            to_bshd(k, c.b, c.hkv, c.sk, c.d),
            to_bshd(v, c.b, c.hkv, c.sk, c.dv),
            bshd_strides(c.hq, c.sq, c.d),
            bshd_strides(c.hkv, c.sk, c.d),
            bshd_strides(c.hkv, c.sk, c.dv),
            bshd_strides(c.hq, c.sq, c.dv),
        )
    } else {
        let cap = c.cap.max(c.sk);
        (
            q.to_vec(),
            with_capacity(k, c.sk, c.d, cap),
            with_capacity(v, c.sk, c.dv, cap),
            Strides4::dense(c.hq, c.sq, c.d),
            Strides4::dense(c.hkv, cap, c.d),
            Strides4::dense(c.hkv, cap, c.dv),
            Strides4::dense(c.hq, c.sq, c.dv),
        )
    };
    let mask = m.map(|data| MaskView {
        data,
        strides: match c.mask {
            Mask::Padding => Strides4 {
                batch: c.sk,
                head: 0,
                seq: 0,
            },
            _ => Strides4::dense(c.hq, c.sq, c.sk),
        },
    });
    let mut out = vec![f32::NAN; c.b * c.hq * c.sq * c.dv];
    let q = View {
        data: &qd,
        strides: qst,
    };
    if c.kv_bf16 {
        let bits =
            |x: &[f32]| -> Vec<half::bf16> { x.iter().map(|&x| half::bf16::from_f32(x)).collect() };
        let (kb, vb) = (bits(&kd), bits(&vd));
        let (k, v) = (
            Bf16View {
                data: &kb,
                strides: kst,
            },
            Bf16View {
                data: &vb,
                strides: vst,
            },
        );
        attention_bf16_kv_with(isa, &shape, &opts, q, k, v, mask, &mut out, ost).unwrap();
    } else {
        let (k, v) = (
            View {
                data: &kd,
                strides: kst,
            },
            View {
                data: &vd,
                strides: vst,
            },
        );
        attention_f32_with(isa, &shape, &opts, q, k, v, mask, &mut out, ost).unwrap();
    }
    if c.bshd {
        // Back from [b, s, h, dv] to [b, h, s, dv].
        let mut y = vec![0.0; out.len()];
        for bi in 0..c.b {
            for hi in 0..c.hq {
                for si in 0..c.sq {
                    let src = ((bi * c.sq + si) * c.hq + hi) * c.dv;
                    let dst = ((bi * c.hq + hi) * c.sq + si) * c.dv;
                    y[dst..dst + c.dv].copy_from_slice(&out[src..src + c.dv]);
                }
            }
        }
        y
    } else {
        out
    }
}

fn check(seed: u64, c: Case) {
    let mut r = rng(seed);
    let mut q = random(&mut r, c.b * c.hq * c.sq * c.d, -1.0, 1.0);
    let mut k = random(&mut r, c.b * c.hkv * c.sk * c.d, -1.0, 1.0);
    if c.bf16 {
        for x in q.iter_mut().chain(k.iter_mut()) {
            *x = half::bf16::from_f32(*x).to_f32();
        }
    }
    let mut v = random(&mut r, c.b * c.hkv * c.sk * c.dv, -1.0, 1.0);
    if c.kv_bf16 {
        for x in k.iter_mut().chain(v.iter_mut()) {
            *x = half::bf16::from_f32(*x).to_f32();
        }
    }
    let m = match c.mask {
        Mask::None => None,
        _ => Some(random(&mut r, mask_shape(&c).iter().product(), -2.0, 0.0)),
    };
    let scale = 1.0 / (c.d as f32).sqrt();
    let want = reference(&c, scale, &q, &k, &v, m.as_deref());
    for isa in isas() {
        let got = kernel(isa, &c, scale, &q, &k, &v, m.as_deref());
        assert_close(&format!("{c:?} at {}", isa.name()), &got, &want);
        if c.kv_bf16 && !c.bf16 {
            // The narrow cache changes where the elements are read from, not the arithmetic
            // (unless the queries are bf16 values too: decode then scores with `vdpbf16ps`,
            // which sums in another order).
            let wide = Case {
                kv_bf16: false,
                ..c
            };
            let f32_kernel = kernel(isa, &wide, scale, &q, &k, &v, m.as_deref());
            let same = got
                .iter()
                .zip(&f32_kernel)
                .all(|(a, b)| a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()));
            assert!(same, "{c:?} at {}: bf16 k/v differ from f32", isa.name());
        }
    }
}

fn assert_close(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let ok = (g - w).abs() <= 2e-5 || (g.is_nan() && w.is_nan());
        assert!(ok, "{what}: element {i}: got {g}, want {w}");
    }
}

#[test]
fn prefill_matches_reference() {
    let mut seed = 0;
    for (b, hq, hkv, sq, d) in [
        (1, 1, 1, 1, 1),
        (1, 2, 2, 7, 7),
        (2, 4, 2, 33, 64),
        (1, 8, 1, 65, 128),
        (1, 3, 3, 130, 33),
    ] {
        for causal in [false, true] {
            for mask in [Mask::None, Mask::Full, Mask::Padding] {
                seed += 1;
                check(
                    seed,
                    Case {
                        causal,
                        mask,
                        ..case(b, hq, hkv, sq, sq, d)
                    },
                );
            }
        }
    }
}

#[test]
fn bf16_operands_match_reference() {
    // Prefill shapes of the score-GEMM path with q and k bf16 values (head dims ≥ 64 take
    // vdpbf16ps, smaller ones the f32 GEMM): key ranges starting inside a panel of 32 keys
    // (windows, kv longer than queries), odd head dims, a strided layout, masks, GQA.
    let mut seed = 200;
    for base in [
        case(2, 4, 2, 33, 33, 64),
        case(1, 3, 3, 130, 130, 65),
        case(1, 6, 2, 40, 150, 64),
        case(1, 2, 1, 100, 100, 128),
        case(1, 2, 1, 40, 40, 32),
    ] {
        for (causal, window, mask, bshd) in [
            (false, 0, Mask::None, false),
            (true, 0, Mask::Full, true),
            (true, 40, Mask::Padding, false),
            (false, 0, Mask::Full, true),
        ] {
            seed += 1;
            check(
                seed,
                Case {
                    causal,
                    window,
                    mask,
                    bshd,
                    bf16: true,
                    ..base
                },
            );
        }
    }
}

#[test]
fn sliding_window_and_kv_longer_than_queries() {
    for (i, (sq, sk, window)) in [
        (7, 7, 3),
        (33, 33, 1),
        (5, 40, 8),
        (33, 100, 64),
        (1, 77, 5),
    ]
    .into_iter()
    .enumerate()
    {
        check(
            100 + i as u64,
            Case {
                causal: true,
                window,
                mask: Mask::Full,
                ..case(1, 4, 2, sq, sk, 16)
            },
        );
    }
    // A value dim ≠ head dim.
    check(
        120,
        Case {
            causal: true,
            window: 4,
            dv: 9,
            ..case(2, 2, 1, 6, 10, 5)
        },
    );
}

#[test]
fn decode_with_long_kv_splits_the_key_range() {
    for (i, (b, hq, hkv, sk, d)) in [
        (1, 8, 1, 4097, 64),
        (2, 4, 2, 1500, 7),
        (1, 1, 1, 600, 128),
        (1, 2, 2, 4097, 33),
    ]
    .into_iter()
    .enumerate()
    {
        for mask in [Mask::None, Mask::Padding] {
            check(
                200 + i as u64,
                Case {
                    causal: true,
                    mask,
                    ..case(b, hq, hkv, 1, sk, d)
                },
            );
        }
    }
}

/// Few queries per head (decode, short prefill after a cache): GQA groups, query counts 1–7,
/// keys read from a cache with spare capacity, causal, windows and masks. The cache in f32, and
/// in bf16 (a narrow KV cache: decode widens each block of keys and values as it reads it, or
/// scores the keys as stored with `vdpbf16ps` when the queries are bf16 values too, a bf16
/// graph's; prefill-shaped calls, the last two shapes, widen them whole first).
#[test]
fn decode_reads_a_cache_with_spare_capacity() {
    let mut seed = 500;
    let shapes = [
        (1, 12, 4, 1, 550, 64),
        (1, 3, 1, 7, 33, 7),
        (2, 6, 2, 3, 1, 33),
        (1, 8, 8, 1, 7, 16),
        (3, 4, 1, 2, 300, 64),
        (1, 4, 4, 1, 131, 100),
        (1, 4, 2, 40, 97, 16),
        (2, 2, 1, 16, 16, 8),
    ];
    // (k/v bf16, queries bf16 values)
    for (kv_bf16, bf16) in [(false, false), (true, false), (true, true)] {
        for (b, hq, hkv, sq, sk, d) in shapes {
            for (causal, window, mask) in [
                (true, 0, Mask::None),
                (true, 0, Mask::Padding),
                (true, 5, Mask::Full),
                (false, 0, Mask::Full),
            ] {
                seed += 1;
                check(
                    seed,
                    Case {
                        causal,
                        window,
                        mask,
                        cap: 2 * sk + 3,
                        kv_bf16,
                        bf16,
                        ..case(b, hq, hkv, sq, sk, d)
                    },
                );
            }
        }
    }
}

/// The GEMM path in blocks of queries: causal and windowed key ranges that start past key 0
/// and blocks whose keys are all hidden.
#[test]
fn prefill_blocks_skip_hidden_keys() {
    for (i, (sq, sk, causal, window)) in [
        (130, 130, true, 0),
        (70, 200, true, 0),
        (129, 129, true, 33),
        (100, 40, true, 0),
        (97, 200, true, 7),
    ]
    .into_iter()
    .enumerate()
    {
        check(
            600 + i as u64,
            Case {
                causal,
                window,
                mask: Mask::Full,
                cap: sk + 64,
                ..case(1, 4, 2, sq, sk, 16)
            },
        );
    }
}

/// Decode-path rows whose visible scores are all −inf give NaN, others are unaffected.
#[test]
fn decode_rows_with_every_score_masked_are_nan() {
    let c = Case {
        mask: Mask::Full,
        causal: true,
        ..case(1, 4, 2, 2, 300, 8)
    };
    let mut r = rng(700);
    let q = random(&mut r, 4 * 2 * 8, -1.0, 1.0);
    let k = random(&mut r, 2 * 300 * 8, -1.0, 1.0);
    let v = random(&mut r, 2 * 300 * 8, -1.0, 1.0);
    let mut m = random(&mut r, 4 * 2 * 300, -2.0, 0.0);
    m[..300].fill(f32::NEG_INFINITY); // head 0, query 0: every key
    m[3 * 600 + 300 + 10] = f32::NEG_INFINITY; // head 3, query 1: one key
    let want = reference(&c, 0.3, &q, &k, &v, Some(&m));
    assert!(want[..8].iter().all(|x| x.is_nan()));
    assert!(want[8..].iter().all(|x| x.is_finite()));
    for isa in isas() {
        let got = kernel(isa, &c, 0.3, &q, &k, &v, Some(&m));
        assert_close(
            &format!("masked decode rows at {}", isa.name()),
            &got,
            &want,
        );
    }
}

#[test]
fn strided_operands_and_output_in_bshd_layout() {
    for (i, (sq, sk, causal)) in [(7, 7, true), (33, 40, false), (1, 1025, true)]
        .into_iter()
        .enumerate()
    {
        check(
            300 + i as u64,
            Case {
                causal,
                bshd: true,
                mask: Mask::Full,
                ..case(2, 4, 2, sq, sk, 64)
            },
        );
    }
}

#[test]
fn rows_without_visible_keys_are_zero_and_all_masked_rows_nan() {
    // More queries than keys with causal: the first queries sit before key 0 and see nothing.
    check(
        400,
        Case {
            causal: true,
            ..case(1, 2, 1, 9, 4, 8)
        },
    );
    // Every visible score −inf in some rows (a mask of −inf columns) gives NaN there.
    let c = Case {
        mask: Mask::Full,
        ..case(1, 1, 1, 3, 5, 4)
    };
    let mut r = rng(401);
    let q = random(&mut r, 12, -1.0, 1.0);
    let k = random(&mut r, 20, -1.0, 1.0);
    let v = random(&mut r, 20, -1.0, 1.0);
    let mut m = vec![0.0; 15];
    m[..5].fill(f32::NEG_INFINITY); // query 0: all keys masked
    m[5] = f32::NEG_INFINITY; // query 1: one key masked
    let want = reference(&c, 0.5, &q, &k, &v, Some(&m));
    assert!(want[..4].iter().all(|x| x.is_nan()));
    for isa in isas() {
        let got = kernel(isa, &c, 0.5, &q, &k, &v, Some(&m));
        assert_close(&format!("masked rows at {}", isa.name()), &got, &want);
    }
}

#[test]
fn bad_layouts_are_errors() {
    let shape = AttnShape {
        batch: 1,
        q_heads: 3,
        kv_heads: 2,
        q_len: 2,
        kv_len: 2,
        head_dim: 4,
        v_dim: 4,
    };
    let opts = AttnOptions {
        scale: 1.0,
        causal: false,
        window: 0,
    };
    let data = vec![0.0; 64];
    let view = |n: usize| View {
        data: &data[..n],
        strides: Strides4::dense(2, 2, 4),
    };
    let mut out = vec![0.0; 64];
    // 3 query heads over 2 kv heads.
    let e = attention_f32_with(
        Isa::best(),
        &shape,
        &opts,
        view(64),
        view(64),
        view(64),
        None,
        &mut out,
        Strides4::dense(3, 2, 4),
    );
    assert!(matches!(e, Err(KernelError::Layout(_))), "{e:?}");
    let shape = AttnShape {
        q_heads: 2,
        ..shape
    };
    // k too short.
    let e = attention_f32_with(
        Isa::best(),
        &shape,
        &opts,
        view(16),
        view(15),
        view(16),
        None,
        &mut out,
        Strides4::dense(2, 2, 4),
    );
    assert!(matches!(e, Err(KernelError::Layout(_))), "{e:?}");
    // Output rows overlapping (head stride 0).
    let e = attention_f32_with(
        Isa::best(),
        &shape,
        &opts,
        view(16),
        view(16),
        view(16),
        None,
        &mut out,
        Strides4 {
            batch: 16,
            head: 0,
            seq: 4,
        },
    );
    assert!(matches!(e, Err(KernelError::Layout(_))), "{e:?}");
}
