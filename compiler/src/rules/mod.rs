//! Rule sets, one module each: [`algebra`] (algebra and layout clean-ups), [`norm`]
//! (normalization fusion), [`rotary`] (rotary embedding), [`attention`] (scaled-dot-product
//! attention fusion), [`moe`] (mixture-of-experts dispatch), [`fuse`] (elementwise kernel
//! fusion), and after precision lowering [`epilogue`] (matmul epilogues), [`heads`] (head
//! layouts in projections and attention), [`qkv`] (q, k and v projections packed into one
//! kernel; a graph pass) and [`swiglu`] (gated MLPs).

pub mod algebra;
pub mod attention;
pub mod epilogue;
pub mod fuse;
pub mod heads;
pub mod moe;
pub mod norm;
pub mod qkv;
pub mod rotary;
pub mod swiglu;

#[cfg(test)]
pub(crate) mod check {
    //! Runs one rule set on a small graph and checks the result against the original.

    use crate::egraph::Rewrite;
    use crate::pipeline::{run_passes, Limits, Pass, PassKind};
    use crate::testutil::{assert_close, random_tensor};
    use crate::{dce, Target};
    use kiln_ir::{Graph, Op};
    use kiln_runtime::{reference, Tensor};
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;
    use std::collections::HashMap;

    type Tensors = HashMap<String, Tensor>;

    /// Random tensors for every input and parameter of `g` (all of fixed shape), seeded.
    fn random_sources(g: &Graph, seed: u64) -> (Tensors, Tensors) {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let inputs = g
            .inputs()
            .map(|(n, _, ty)| (n.to_string(), random_tensor(&mut rng, ty)))
            .collect();
        let params = g
            .params()
            .map(|(n, _, ty)| (n.to_string(), random_tensor(&mut rng, ty)))
            .collect();
        (inputs, params)
    }

    /// The non-source ops of `g` (constants included), in order.
    pub fn ops(g: &Graph) -> Vec<&'static str> {
        g.nodes()
            .iter()
            .filter(|n| !matches!(n.op, Op::Input { .. } | Op::Param { .. }))
            .map(|n| n.op.name())
            .collect()
    }

    /// `g` rewritten with `rules` and cleaned up, without warnings.
    pub fn rewrite(g: &Graph, rules: fn() -> Vec<Rewrite>) -> Graph {
        let passes = [
            Pass {
                name: "rules",
                kind: PassKind::Rewrite(rules),
            },
            Pass {
                name: "dce",
                kind: PassKind::Graph(dce::eliminate),
            },
        ];
        let (h, report) = run_passes(g, &passes, &Target::cpu(), &Limits::default()).unwrap();
        assert!(report.warnings.is_empty(), "{report}");
        h
    }

    /// As [`rewrite`], also checking that the reference executor gives the same outputs on
    /// random inputs.
    pub fn rewrite_same(g: &Graph, rules: fn() -> Vec<Rewrite>) -> Graph {
        let h = rewrite(g, rules);
        let (inputs, params) = random_sources(g, 7);
        let want = reference::run(g, &inputs, &params).unwrap();
        let got = reference::run(&h, &inputs, &params).unwrap();
        assert_close(&got, &want);
        h
    }

    /// As [`rewrite`], also checking that the reference executor gives bit-identical outputs
    /// on random inputs.
    pub fn rewrite_exact(g: &Graph, rules: fn() -> Vec<Rewrite>) -> Graph {
        let h = rewrite(g, rules);
        assert_exact(g, &h);
        h
    }

    /// `pass(g)`, verified, checked as [`rewrite_exact`] checks a rule set's result.
    pub fn pass_exact(g: &Graph, pass: fn(&Graph) -> Graph) -> Graph {
        let h = pass(g);
        kiln_ir::verify(&h).unwrap();
        assert_exact(g, &h);
        h
    }

    /// The reference executor gives `h` bit-identical outputs to `g`'s on random inputs.
    fn assert_exact(g: &Graph, h: &Graph) {
        let (inputs, params) = random_sources(g, 7);
        let want = reference::run(g, &inputs, &params).unwrap();
        let got = reference::run(h, &inputs, &params).unwrap();
        assert_eq!(got.len(), want.len());
        for (name, w) in &want {
            let g = &got[name];
            assert_eq!((g.dtype(), g.shape()), (w.dtype(), w.shape()), "{name}");
            for i in 0..w.numel() {
                let (a, b) = (g.get(i).as_f64(), w.get(i).as_f64());
                assert!(a.to_bits() == b.to_bits(), "{name}[{i}]: {a} vs {b}");
            }
        }
    }
}
