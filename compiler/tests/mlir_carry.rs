//! The MLIR an artifact carries (`kiln_compiler::mlir::carry`), against the reference executor:
//! a graph of odd sizes (3 × 7 × 33 activations, 5 output features) with every kind of node the
//! provider lowers (fused elementwise, rmsnorm, softmax, a product of activations), recorded;
//! every carried module parses back and verifies; the CPU backend seeded with the record
//! compiles every kernel from it and its outputs match `kiln_runtime::reference::run` on random
//! inputs; modules edited in the record (unparsable, computing something else, another key's)
//! or missing from it are not used: lowered afresh, the outputs still right.
//! Tolerance: |got − want| ≤ 1e-4·(|want| + 1), the f32 kernels' accumulation over a row of
//! 33 against the reference's f64 arithmetic.
#![cfg(feature = "mlir")]

use kiln_compiler::mlir::carry::{self, Source};
use kiln_compiler::mlir::{lower::verify, KernelKey, KernelSpec, MlirProvider};
use kiln_ir::trace::Tracer;
use kiln_ir::{Bindings, DType, Expr, Graph, Op, F64};
use kiln_runtime::cpu::external::{KernelProvider, Provider};
use kiln_runtime::cpu::CpuGraph;
use kiln_runtime::reference::{run, NoParams};
use kiln_runtime::Tensor;
use melior::ir::Module;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::HashMap;
use std::sync::Arc;

const X: [usize; 3] = [3, 7, 33];

/// `y = softmax(rmsnorm(x, w)) @ b` and `z = silu(x) * x`, every node f32.
fn graph() -> Graph {
    let t = Tracer::new();
    let x = t.input("x", DType::F32, X.to_vec());
    let w = t.input("w", DType::F32, vec![X[2]]);
    let b = t.input("b", DType::F32, vec![X[0], X[2], 5]);
    let eps = F64(1e-6);
    let n = t.apply(Op::RmsNorm { eps }, &[&x, &w]).unwrap();
    let s = t.apply(Op::Softmax { axis: 2 }, &[&n]).unwrap();
    let mm = Op::MatMul {
        transpose_a: false,
        transpose_b: false,
    };
    let y = t.apply(mm, &[&s, &b]).unwrap();
    let body = "(mul (silu $0) $0)".parse::<Expr>().unwrap();
    let z = t.apply(Op::FusedElementwise { body }, &[&x]).unwrap();
    t.output("y", &y);
    t.output("z", &z);
    t.finish().unwrap()
}

fn inputs(seed: u64) -> HashMap<String, Tensor> {
    let mut r = ChaCha8Rng::seed_from_u64(seed);
    let mut random = |shape: Vec<usize>| {
        let n = shape.iter().product();
        let v = (0..n).map(|_| r.random_range(-3.0f32..3.0)).collect();
        Tensor::from_f32(shape, v).unwrap()
    };
    HashMap::from([
        ("x".to_string(), random(X.to_vec())),
        ("w".to_string(), random(vec![X[2]])),
        ("b".to_string(), random(vec![X[0], X[2], 5])),
    ])
}

/// Runs `g` on the CPU backend with `mlir`'s kernels and compares every output with the
/// reference executor's.
fn check_against_reference(g: &Graph, mlir: Arc<MlirProvider>) {
    let provider = Provider::new(mlir as Arc<dyn KernelProvider>);
    let plan = CpuGraph::compile_with(vec![g.clone()], &NoParams, Some(&provider))
        .unwrap()
        .remove(0);
    let ins = inputs(7);
    let want = run(g, &ins, &NoParams).unwrap();
    let got = plan.run(&ins, &NoParams).unwrap();
    assert!(provider.runs() >= 4, "{} MLIR kernel runs", provider.runs());
    for (name, w) in &want {
        let (got, w) = (got[name].as_f32().unwrap(), w.as_f32().unwrap());
        assert_eq!(got.len(), w.len());
        for (i, (a, b)) in got.iter().zip(w).enumerate() {
            let bound = 1e-4 * (b.abs() + 1.0);
            assert!((a - b).abs() <= bound, "{name}[{i}]: {a} vs {b}");
        }
    }
}

#[test]
fn every_carried_module_parses_back_and_verifies() {
    let record = carry::record(&[graph()]);
    assert!(record.problem().is_none(), "{:?}", record.problem());
    // rmsnorm, softmax, matmul, fused elementwise: one key each at these fixed sizes.
    assert_eq!(record.kernels.len(), 4, "{:#?}", record.kernels);
    let ctx = kiln_compiler::mlir::build::context();
    for k in &record.kernels {
        let m = Module::parse(&ctx, &k.mlir).unwrap_or_else(|| panic!("{}", k.key));
        verify(&ctx, &m).unwrap();
        assert_eq!(m.as_operation().to_string(), k.mlir, "{}", k.key);
    }
}

/// The key of each computing node of `g`, by its text.
fn keys(g: &Graph) -> HashMap<String, KernelKey> {
    g.nodes()
        .iter()
        .filter(|n| !n.inputs.is_empty())
        .map(|n| {
            let tys: Vec<_> = n.inputs.iter().map(|v| g.ty(*v)).collect();
            let key = KernelSpec::from_types(&n.op, &tys, &Bindings::new())
                .and_then(|s| s.key())
                .unwrap();
            (key.text(), key)
        })
        .collect()
}

#[test]
fn kernels_compiled_from_carried_mlir_match_the_reference() {
    let g = graph();
    let record = carry::record(std::slice::from_ref(&g));
    let mlir = Arc::new(MlirProvider::carrying(record.clone()));
    check_against_reference(&g, mlir.clone());
    assert_eq!(mlir.compilations(), record.kernels.len());
    assert_eq!(
        mlir.from_carried(),
        mlir.compilations(),
        "all from the record"
    );
    // Each node's key finds its module and compiles from it.
    let keys = keys(&g);
    assert_eq!(keys.len(), record.kernels.len());
    for (text, key) in &keys {
        let (_, source) = carry::compile(key, record.module(text)).unwrap();
        assert_eq!(source, Source::Carried, "{text}");
    }
}

#[test]
fn edited_or_missing_modules_are_lowered_afresh() {
    let g = graph();
    let keys = keys(&g);
    let mut record = carry::record(std::slice::from_ref(&g));
    let k = &mut record.kernels;
    // One module no longer parses, one verifies but computes something else, one is another
    // key's module, one is missing.
    k[0].mlir.push_str(" }}} not mlir");
    let at = k
        .iter()
        .rposition(|k| k.mlir.contains("arith.mulf"))
        .unwrap();
    assert_ne!(at, 0, "{}", k[0].key);
    k[at].mlir = k[at].mlir.replacen("arith.mulf", "arith.addf", 1);
    let other = (1..4).find(|&i| i != at).unwrap();
    let last = (1..4).rfind(|&i| i != at).unwrap();
    k[other].mlir = k[last].mlir.clone();
    let why = |i: usize| match carry::compile(&keys[&k[i].key], Some(&k[i].mlir))
        .unwrap()
        .1
    {
        Source::Afresh(why) => why,
        Source::Carried => panic!("{}: an edited module was used", k[i].key),
    };
    assert!(why(0).contains("does not parse: "), "{}", why(0));
    assert!(why(at).contains("not this kiln's lowering"), "{}", why(at));
    assert!(
        why(other).contains("not this kiln's lowering"),
        "{}",
        why(other)
    );
    let removed = k.remove(last);
    let (_, source) = carry::compile(&keys[&removed.key], record.module(&removed.key)).unwrap();
    assert!(matches!(source, Source::Afresh(why) if why.contains("carries no module")));
    let mlir = Arc::new(MlirProvider::carrying(record));
    check_against_reference(&g, mlir.clone());
    assert_eq!(mlir.compilations(), 4);
    assert_eq!(mlir.from_carried(), 0, "no edited module is used");
}
