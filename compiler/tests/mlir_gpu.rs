//! MLIR-generated PTX kernels in the CUDA backend (`--codegen mlir` on `--device cuda`,
//! [`MlirCudaProvider`]).
//!
//! Without a GPU: every case compiles to launches whose arguments pack into exactly the
//! `.param` list the PTX declares for the entry (MLIR's expanded memref descriptors), `ptxas`
//! assembles the PTX when it is found, bad buffers are errors, and opening a device on a
//! machine without one is an error, not a panic.
//!
//! With a GPU (`scripts/gpu-check` runs this binary with `KILN_REQUIRE_GPU=1`): each case is a
//! one-op graph planned by the CUDA backend with the provider, run on the device and compared
//! with the reference executor (tolerances as `tests/mlir.rs`: f32 kernels against f64
//! arithmetic; products and attention bounded by the same op on absolute values).
#![cfg(feature = "mlir")]

use kiln_compiler::mlir::{KernelSpec, MlirCudaProvider};
use kiln_cuda::exec::external::{entry_params, pack, Provider, PtxProvider};
use kiln_cuda::exec::{Backend, CudaGraph};
use kiln_cuda::{Arch, CudaError};
use kiln_ir::trace::Tracer;
use kiln_ir::{BinaryOp, DType, Expr, Graph, Op, F64};
use kiln_runtime::executor::{GraphExecutor, Value};
use kiln_runtime::reference::{run, NoParams};
use kiln_runtime::Tensor;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::HashMap;
use std::sync::Arc;

/// How a case's result is checked.
#[derive(Clone, Copy)]
enum Bound {
    /// |got − want| ≤ 1e-5·|want| + 1e-6.
    Rel,
    /// |got − want| ≤ 1e-5·(|want| + 1) (layernorm's centring).
    Norm,
    /// |got − want| ≤ 1e-5·(the op on |operands| `abs`) + 1e-6 (accumulations).
    Abs(&'static [usize]),
}

fn attention(causal: bool, window: usize, d: usize) -> Op {
    Op::Attention {
        scale: F64(1.0 / (d as f64).sqrt()),
        causal,
        window,
        merge_heads: false,
    }
}

/// Every kind of kernel the provider lowers, at odd sizes.
fn cases() -> Vec<(KernelSpec, Bound)> {
    let silu_mul = Op::FusedElementwise {
        body: "(mul (silu $0) $1)".parse::<Expr>().unwrap(),
    };
    let mm = |ta, tb| Op::MatMul {
        transpose_a: ta,
        transpose_b: tb,
    };
    vec![
        (KernelSpec::new(silu_mul, &[&[4097], &[4097]]), Bound::Rel),
        (
            KernelSpec::new(Op::Binary(BinaryOp::Mul), &[&[33, 1], &[1, 7]]),
            Bound::Rel,
        ),
        (
            KernelSpec::new(Op::Binary(BinaryOp::Add), &[&[4, 1, 33], &[5, 33]]),
            Bound::Rel,
        ),
        (
            KernelSpec::new(Op::RmsNorm { eps: F64(1e-6) }, &[&[33, 4097], &[4097]]),
            Bound::Rel,
        ),
        (
            KernelSpec::new(Op::LayerNorm { eps: F64(1e-5) }, &[&[7, 33], &[33], &[33]]),
            Bound::Norm,
        ),
        (
            KernelSpec::new(Op::Softmax { axis: 1 }, &[&[7, 33]]),
            Bound::Rel,
        ),
        (
            KernelSpec::new(Op::Softmax { axis: 2 }, &[&[3, 5, 1000]]),
            Bound::Rel,
        ),
        (
            KernelSpec::new(mm(false, false), &[&[7, 33], &[33, 65]]),
            Bound::Abs(&[0, 1]),
        ),
        (
            KernelSpec::new(mm(false, true), &[&[3, 33, 7], &[3, 5, 7]]),
            Bound::Abs(&[0, 1]),
        ),
        (
            KernelSpec::new(mm(true, false), &[&[2, 3, 9, 7], &[1, 9, 33]]),
            Bound::Abs(&[0, 1]),
        ),
        (
            KernelSpec::new(
                attention(true, 0, 16),
                &[&[2, 8, 5, 16], &[2, 2, 33, 16], &[2, 2, 33, 16]],
            ),
            Bound::Abs(&[2]),
        ),
        (
            KernelSpec::new(
                attention(true, 4, 7),
                &[&[1, 2, 33, 7], &[1, 1, 33, 7], &[1, 1, 33, 5]],
            ),
            Bound::Abs(&[2]),
        ),
        (
            KernelSpec::new(
                attention(false, 0, 33),
                &[&[3, 4, 9, 33], &[3, 2, 9, 33], &[3, 2, 9, 3], &[3, 1, 1, 9]],
            ),
            Bound::Abs(&[2]),
        ),
    ]
}

fn one_op_graph(spec: &KernelSpec) -> Graph {
    let t = Tracer::new();
    let ins: Vec<_> = spec
        .inputs
        .iter()
        .enumerate()
        .map(|(i, s)| t.input(&format!("x{i}"), DType::F32, s.clone()))
        .collect();
    let y = t
        .apply(spec.op.clone(), &ins.iter().collect::<Vec<_>>())
        .unwrap();
    t.output("y", &y);
    t.finish().unwrap()
}

fn inputs(spec: &KernelSpec, data: &[Vec<f32>]) -> HashMap<String, Tensor> {
    spec.inputs
        .iter()
        .zip(data)
        .enumerate()
        .map(|(i, (s, d))| {
            (
                format!("x{i}"),
                Tensor::from_f32(s.clone(), d.clone()).unwrap(),
            )
        })
        .collect()
}

fn reference(spec: &KernelSpec, data: &[Vec<f32>]) -> Vec<f32> {
    run(&one_op_graph(spec), &inputs(spec, data), &NoParams).unwrap()["y"]
        .as_f32()
        .unwrap()
        .to_vec()
}

/// Random operands; a mask gets some `-inf` keys.
fn data(spec: &KernelSpec, r: &mut ChaCha8Rng) -> Vec<Vec<f32>> {
    let mut d: Vec<Vec<f32>> = spec
        .inputs
        .iter()
        .map(|s| {
            (0..s.iter().product::<usize>())
                .map(|_| r.random_range(-2.0f32..2.0))
                .collect()
        })
        .collect();
    if matches!(spec.op, Op::Attention { .. }) {
        if let Some(m) = d.get_mut(3) {
            for x in m.iter_mut().step_by(4) {
                *x = f32::NEG_INFINITY;
            }
        }
    }
    d
}

fn numel(s: &[usize]) -> usize {
    s.iter().product()
}

#[test]
fn launches_pack_into_the_params_their_ptx_declares() {
    let libdevice = kiln_cuda::toolkit::libdevice_root();
    let provider = MlirCudaProvider::with_libdevice(libdevice.clone());
    let ptxas = kiln_cuda::toolkit::Toolkit::find()
        .ok()
        .and_then(|t| t.ptxas);
    let dir = std::env::temp_dir().join(format!("kiln-mlir-gpu-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for (c, (spec, _)) in cases().iter().enumerate() {
        let shapes: Vec<&[usize]> = spec.inputs.iter().map(Vec::as_slice).collect();
        let launches = match provider.launches(&spec.op, &shapes, Arch::Sm90) {
            Ok(l) => l,
            // Norms call `sqrt`, only libdevice has it on the GPU.
            Err(e) if libdevice.is_none() && e.contains("__nv_") => {
                eprintln!("no libdevice: {} not lowered ({e})", spec.op.name());
                continue;
            }
            Err(e) => panic!("{spec:?}: {e}"),
        };
        assert!(!launches.is_empty(), "{spec:?}");
        let out = spec.output_shape().unwrap();
        let mut buffers: Vec<(u64, usize)> = spec
            .inputs
            .iter()
            .enumerate()
            .map(|(i, s)| (0x1_0000_0000 * (i as u64 + 1), numel(s)))
            .collect();
        buffers.push((0x100_0000_0000, numel(&out)));
        for (j, l) in launches.iter().enumerate() {
            let params = entry_params(&l.ptx, &l.entry).unwrap();
            let values = pack(l, &params, &buffers).unwrap_or_else(|e| panic!("{spec:?}: {e}"));
            assert_eq!(values.len(), params.len());
            assert!(l.block.iter().product::<u32>() <= 1024, "{spec:?}: {l:?}");
            // Every operand and the result appear in some launch (the result in every one).
            let mut smaller = buffers.clone();
            smaller.last_mut().unwrap().1 -= 1;
            assert!(pack(l, &params, &smaller).is_err(), "{spec:?} launch {j}");
            if let Some(ptxas) = &ptxas {
                let src = dir.join(format!("c{c}_{j}.ptx"));
                std::fs::write(&src, &*l.ptx).unwrap();
                let o = std::process::Command::new(ptxas)
                    .args(["-arch=sm_90", "-o"])
                    .arg(dir.join(format!("c{c}_{j}.cubin")))
                    .arg(&src)
                    .output()
                    .unwrap();
                assert!(
                    o.status.success(),
                    "ptxas rejected {spec:?} launch {j}: {}",
                    String::from_utf8_lossy(&o.stderr)
                );
            }
        }
        let mut used: Vec<usize> = launches
            .iter()
            .flat_map(|l| &l.args)
            .filter_map(|a| match a {
                kiln_cuda::exec::external::LaunchArg::Memref { operand, .. } => Some(*operand),
                _ => None,
            })
            .collect();
        used.sort_unstable();
        used.dedup();
        assert_eq!(
            used,
            (0..=spec.inputs.len()).collect::<Vec<_>>(),
            "{spec:?}"
        );
    }
    if ptxas.is_none() {
        eprintln!("ptxas not found (scripts/fetch-cuda-tools, KILN_CUDA_HOME): not assembled");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn unlowered_ops_and_shapes_are_reasons() {
    let provider = MlirCudaProvider::with_libdevice(None);
    let gather = Op::Gather { axis: 0 };
    assert!(provider
        .launches(&gather, &[&[4, 3], &[2]], Arch::Sm90)
        .is_err());
    let mm = Op::MatMul {
        transpose_a: false,
        transpose_b: false,
    };
    let e = provider
        .launches(&mm, &[&[2, 3], &[4, 5]], Arch::Sm90)
        .unwrap_err();
    assert!(!e.is_empty());
    assert_eq!(provider.compilations(), 0);
}

/// The device, or `None` (after checking that its absence is an error, not a panic) when this
/// machine has none; `KILN_REQUIRE_GPU=1` makes that a failure.
fn backend(test: &str) -> Option<Arc<Backend>> {
    match Backend::open(0) {
        Ok(b) => Some(b),
        Err(e) if std::env::var("KILN_REQUIRE_GPU").as_deref() == Ok("1") => {
            panic!("{test}: KILN_REQUIRE_GPU=1 but {e}")
        }
        Err(e) => {
            assert!(
                matches!(
                    e,
                    CudaError::Unavailable(_) | CudaError::NoDevice(_) | CudaError::Driver(_)
                ),
                "{e}"
            );
            eprintln!("{test}: no CUDA device ({e}): the device half did not run");
            None
        }
    }
}

#[test]
fn mlir_ptx_kernels_match_the_reference_on_the_device() {
    let Some(b) = backend("mlir_ptx_kernels") else {
        return;
    };
    let provider = Provider::new(Arc::new(MlirCudaProvider::new()));
    let mut r = ChaCha8Rng::seed_from_u64(11);
    let cases = cases();
    for (spec, bound) in &cases {
        let g = one_op_graph(spec);
        let graphs = CudaGraph::compile_with(&b, vec![g], &NoParams, Some(&provider)).unwrap();
        assert!(
            graphs[0].plan().summary().contains("external"),
            "{spec:?}: {}",
            graphs[0].plan().summary()
        );
        let d = data(spec, &mut r);
        let ins = inputs(spec, &d)
            .into_iter()
            .map(|(k, v)| (k, Value::Host(v)))
            .collect();
        let got = graphs[0].run(ins, &NoParams).unwrap()["y"]
            .clone()
            .into_host()
            .unwrap();
        let got = got.as_f32().unwrap().to_vec();
        let want = reference(spec, &d);
        let scale = match bound {
            Bound::Abs(which) => {
                let mut abs = d.clone();
                for &i in *which {
                    abs[i] = abs[i].iter().map(|x| x.abs()).collect();
                }
                Some(reference(spec, &abs))
            }
            _ => None,
        };
        assert_eq!(got.len(), want.len(), "{spec:?}");
        let mut worst = 0f64;
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            let (gf, wf) = (f64::from(*g), f64::from(*w));
            let tol = match bound {
                Bound::Rel => 1e-5 * wf.abs() + 1e-6,
                Bound::Norm => 1e-5 * (wf.abs() + 1.0),
                Bound::Abs(_) => 1e-5 * f64::from(scale.as_ref().unwrap()[i]) + 1e-6,
            };
            let ok = (gf - wf).abs() <= tol || (g.is_nan() && w.is_nan()) || g == w;
            assert!(ok, "{spec:?}: element {i}: got {g}, want {w}");
            worst = worst.max((gf - wf).abs() / tol);
        }
        eprintln!(
            "{}: {:?}: worst error {worst:.3} of the bound",
            spec.op.name(),
            spec.inputs
        );
    }
    assert_eq!(provider.runs(), cases.len(), "{:?}", provider.fallbacks());
    assert!(
        provider.fallbacks().is_empty(),
        "{:?}",
        provider.fallbacks()
    );
}
