//! cuBLAS / cuBLASLt products ([`kiln_cuda::blas`]) against the reference executor on fresh
//! random inputs with poisoned outputs: f32 (strict, 1e-5), bf16 operands with f32 results
//! (1e-5: both sides compute the same bf16 values' products, accumulation order aside), every
//! transpose combination, odd sizes and a broadcast batch; fp8 e4m3 with per-tensor scales
//! against the reference matmul of the dequantized operands (bf16 result: 1e-2).
//! Skips without a GPU unless `KILN_REQUIRE_GPU=1`.

mod gpu_support;

use gpu_support::*;
use kiln_cuda::blas::{Blas, GemmShape};
use kiln_ir::{DType, Op};
use kiln_runtime::Tensor;

#[test]
fn gemm_matches_reference() {
    let Some(dev) = device_or_skip("gemm") else {
        return;
    };
    let blas = Blas::new(&dev).expect("cuBLAS");
    let mut rng = rng("gemm");
    for ab in [DType::F32, DType::BF16] {
        for (m, n, k) in [(1, 7, 33), (7, 33, 4097), (65, 1, 3), (33, 130, 64)] {
            for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
                for batch in [1usize, 3] {
                    let a_shape = if ta {
                        vec![batch, k, m]
                    } else {
                        vec![batch, m, k]
                    };
                    // A broadcast B when batched: one matrix for every product.
                    let b_shape = if tb { vec![1, n, k] } else { vec![1, k, n] };
                    let a = random(&mut rng, ab, &a_shape, 1.0, false);
                    let b = random(&mut rng, ab, &b_shape, 1.0, false);
                    let bb = Tensor::new(
                        [vec![batch], b_shape[1..].to_vec()].concat(),
                        kiln_runtime::Storage::F32(
                            b.cast(DType::F32).as_f32().unwrap().repeat(batch),
                        ),
                    )
                    .unwrap();
                    let want = reference(
                        Op::MatMul {
                            transpose_a: ta,
                            transpose_b: tb,
                        },
                        &[&a.cast(DType::F32), &bb],
                    );
                    let c = poisoned(&dev, DType::F32, batch * m * n);
                    let s = GemmShape {
                        m,
                        n,
                        k,
                        ta,
                        tb,
                        batch,
                        stride_a: m * k,
                        stride_b: 0,
                    };
                    blas.gemm(
                        &s,
                        ab,
                        DType::F32,
                        (&upload(&dev, &a), 0),
                        (&upload(&dev, &b), 0),
                        (&c, 0),
                    )
                    .unwrap();
                    let got = download(&dev, &c, DType::F32, &[batch, m, n]);
                    assert_matches(
                        &format!("gemm {ab} m{m} n{n} k{k} ta{ta} tb{tb} batch{batch}"),
                        &got,
                        &want,
                        1e-5,
                    );
                }
            }
        }
    }
}

#[test]
fn fp8_gemm_matches_reference() {
    let Some(dev) = device_or_skip("fp8 gemm") else {
        return;
    };
    if !dev.arch().has_fp8() {
        eprintln!("fp8 gemm: {} has no fp8", dev.name());
        return;
    }
    let blas = Blas::new(&dev).expect("cuBLAS");
    let mut rng = rng("fp8 gemm");
    for (m, n, k) in [(16, 32, 64), (128, 96, 256), (48, 64, 4096)] {
        let a = random(&mut rng, DType::F8E4M3, &[m, k], 4.0, false);
        let b = random(&mut rng, DType::F8E4M3, &[n, k], 4.0, false);
        let (sa, sb) = (0.5f32, 0.125f32);
        let scaled = |t: &Tensor, s: f32| {
            let f = t.cast(DType::F32);
            Tensor::from_f32(
                f.shape().to_vec(),
                f.as_f32().unwrap().iter().map(|x| x * s).collect(),
            )
            .unwrap()
        };
        let want = reference(
            Op::MatMul {
                transpose_a: false,
                transpose_b: true,
            },
            &[&scaled(&a, sa), &scaled(&b, sb)],
        )
        .cast(DType::BF16);
        let d = poisoned(&dev, DType::BF16, m * n);
        let sa_buf = dev.upload(&sa.to_le_bytes()).unwrap();
        let sb_buf = dev.upload(&sb.to_le_bytes()).unwrap();
        blas.gemm_fp8(
            [m, n, k],
            &upload(&dev, &a),
            &upload(&dev, &b),
            &sa_buf,
            &sb_buf,
            &d,
        )
        .unwrap();
        let got = download(&dev, &d, DType::BF16, &[m, n]);
        assert_matches(&format!("fp8 gemm m{m} n{n} k{k}"), &got, &want, 1e-2);
    }
}
