//! Asking the CPU backend for some outputs only ([`GraphExecutor::run_outputs`]): exactly
//! those come back, equal to the reference executor's, and the steps only the others need do
//! not run — here the other branch would fail if it ran (an embedding lookup of an id past its
//! table), so the run succeeding shows it was skipped. A linear group (the two matmuls reading
//! `x`) still runs when only one of its layers is wanted.

use kiln_ir::trace::Tracer;
use kiln_ir::DType;
use kiln_runtime::cpu::CpuGraph;
use kiln_runtime::reference;
use kiln_runtime::{GraphExecutor, Tensor, Value};
use std::collections::HashMap;

#[test]
fn only_the_wanted_outputs_are_computed() {
    let t = Tracer::new();
    let x = t.input("x", DType::F32, [3i64, 4]);
    let ids = t.input("ids", DType::I64, [2i64]);
    let w1 = t.param("w1", DType::F32, [5i64, 4]);
    let w2 = t.param("w2", DType::F32, [6i64, 4]);
    let table = t.param("table", DType::F32, [7i64, 4]);
    t.output("a", &x.matmul_t(&w1, false, true).unwrap());
    t.output("b", &x.matmul_t(&w2, false, true).unwrap().exp().unwrap());
    t.output("rows", &table.index_select(0, &ids).unwrap());
    let graph = t.finish().unwrap();
    let values = |n: usize, scale: f32| (0..n).map(|i| (i as f32 * scale).sin()).collect();
    let params = HashMap::from([
        (
            "w1".to_string(),
            Tensor::from_f32(vec![5, 4], values(20, 0.3)).unwrap(),
        ),
        (
            "w2".to_string(),
            Tensor::from_f32(vec![6, 4], values(24, 0.7)).unwrap(),
        ),
        (
            "table".to_string(),
            Tensor::from_f32(vec![7, 4], values(28, 0.1)).unwrap(),
        ),
    ]);
    let x = Tensor::from_f32(vec![3, 4], values(12, 1.3)).unwrap();
    // Id 9 is past the table's 7 rows: computing `rows` is an error.
    let bad_ids = Tensor::from_i64(vec![2], vec![1, 9]).unwrap();
    let inputs = HashMap::from([("x".to_string(), x.clone()), ("ids".to_string(), bad_ids)]);
    let cpu = CpuGraph::compile(vec![graph.clone()], &params)
        .unwrap()
        .remove(0);
    assert!(
        cpu.run(&inputs, &params).is_err(),
        "every output: the lookup fails"
    );
    let good_ids = Tensor::from_i64(vec![2], vec![1, 2]).unwrap();
    let want = reference::run(
        &graph,
        &HashMap::from([("x".to_string(), x), ("ids".to_string(), good_ids)]),
        &params,
    )
    .unwrap();
    for wanted in [vec!["a"], vec!["b"], vec!["a", "b"]] {
        let host = |inputs: &HashMap<String, Tensor>| {
            inputs
                .iter()
                .map(|(k, v)| (k.clone(), Value::Host(v.clone())))
                .collect()
        };
        let got = cpu.run_outputs(host(&inputs), &params, &wanted).unwrap();
        let mut names: Vec<&str> = got.keys().map(String::as_str).collect();
        names.sort();
        assert_eq!(names, wanted);
        for (name, v) in got {
            let (g, w) = (
                v.into_host().unwrap().to_f64_vec(),
                want[&name].to_f64_vec(),
            );
            for (a, b) in g.iter().zip(&w) {
                assert!(
                    (a - b).abs() <= 1e-5 * b.abs().max(1.0),
                    "{name}: {a} vs {b}"
                );
            }
        }
    }
}
