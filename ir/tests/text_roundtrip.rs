//! Property tests of the text format (and of serde): random well-formed graphs over the whole
//! op set, with symbolic shapes, special float constants and hostile names, print and parse
//! back to equal graphs.

use kiln_ir::text::{parse, print};
use kiln_ir::{
    verify, BinaryOp, CmpOp, DType, Dim, Expr, Graph, Literal, Op, ReduceOp, Scalar, Shape,
    TensorType, UnaryOp, ValueId, F64,
};
use proptest::prelude::*;
use std::collections::{BTreeSet, HashSet};

/// Builds a graph from a list of random choices (all zero once the list runs out).
struct Gen<'a> {
    choices: &'a [u32],
    pos: usize,
    names: &'a [String],
    used: HashSet<String>,
    /// Keep f64 attributes to a few plain values: JSON has no infinities, and serde_json
    /// (without its `float_roundtrip` feature) may misread the last bit of long decimals.
    json: bool,
    g: Graph,
}

impl Gen<'_> {
    fn pick(&mut self, n: usize) -> usize {
        let c = self.choices.get(self.pos).copied().unwrap_or(0);
        self.pos += 1;
        c as usize % n.max(1)
    }

    fn one<T: Clone>(&mut self, xs: &[T]) -> T {
        xs[self.pick(xs.len())].clone()
    }

    fn flip(&mut self) -> bool {
        self.pick(2) == 1
    }

    fn bits(&mut self) -> u32 {
        let c = self.choices.get(self.pos).copied().unwrap_or(0);
        self.pos += 1;
        c
    }

    /// A fresh name built from the random name pool.
    fn name(&mut self) -> String {
        let mut name = self.one(self.names);
        name.push_str(&self.used.len().to_string());
        while !self.used.insert(name.clone()) {
            name.push('\'');
        }
        name
    }

    fn dim(&mut self) -> Dim {
        let s = Dim::sym;
        let pool = [
            Dim::fixed(1),
            Dim::fixed(2),
            Dim::fixed(3),
            Dim::fixed(4),
            Dim::fixed(0),
            s("batch"),
            s("seq"),
            s("past"),
            &s("past") + &s("seq"),
            &Dim::fixed(2) * &s("seq"),
        ];
        self.one(&pool)
    }

    fn shape(&mut self, min_rank: usize) -> Shape {
        let rank = min_rank + self.pick(3);
        (0..rank).map(|_| self.dim()).collect()
    }

    fn leaf(&mut self, ty: TensorType) -> ValueId {
        let name = self.name();
        if self.flip() {
            self.g.input(&name, ty)
        } else {
            self.g.param(&name, ty)
        }
    }

    /// An existing value whose type passes `ok` and has rank >= `min_rank`, else a new leaf.
    fn get(&mut self, ok: impl Fn(DType) -> bool, dtype: DType, min_rank: usize) -> ValueId {
        let ids: Vec<ValueId> = self
            .g
            .iter()
            .filter(|(_, n)| ok(n.ty.dtype) && n.ty.rank() >= min_rank)
            .map(|(id, _)| id)
            .collect();
        if !ids.is_empty() && self.pick(4) != 0 {
            return self.one(&ids);
        }
        let shape = self.shape(min_rank);
        self.leaf(TensorType { dtype, shape })
    }

    fn any(&mut self, min_rank: usize) -> ValueId {
        let dtype = self.one(&DType::ALL);
        self.get(|_| true, dtype, min_rank)
    }

    fn float(&mut self, min_rank: usize) -> ValueId {
        self.get(DType::is_float, DType::F32, min_rank)
    }

    fn ty(&self, v: ValueId) -> TensorType {
        self.g.ty(v).clone()
    }

    fn add(&mut self, op: Op, ins: &[ValueId]) {
        let _ = self.g.add(op, ins);
    }

    fn f64(&mut self) -> f64 {
        let bits = u64::from(self.bits()) << 32 | u64::from(self.bits());
        let plain = [1e-6, 1e-5, 0.125, 0.0, -0.0];
        let x = f64::from_bits(bits);
        let special = [x, x, 5e-324, f64::MAX, f64::INFINITY, f64::NEG_INFINITY];
        match self.one(if self.json { &plain } else { &special }) {
            x if x.is_nan() => 0.5,
            x => x,
        }
    }

    fn scalar(&mut self, dtype: DType) -> Scalar {
        let r = self.bits();
        match dtype {
            DType::Bool => Scalar::Bool(r % 2 == 1),
            DType::U8 => Scalar::Int(i64::from(r % 256)),
            DType::I32 => Scalar::Int(i64::from(r as i32)),
            DType::I64 => {
                let pool = [0, -1, i64::MIN, i64::MAX, i64::from(r as i32) << 20];
                Scalar::Int(self.one(&pool))
            }
            _ => {
                let pool = [
                    0.0,
                    -0.0,
                    1.0,
                    -2.5,
                    f32::INFINITY,
                    f32::NEG_INFINITY,
                    f32::NAN,
                    f32::MAX,
                    f32::MIN_POSITIVE,
                    f32::from_bits(1),           // f32 subnormal
                    -f32::from_bits(0x7f_ffff),  // largest f32 subnormal
                    f32::from_bits(0x0001_0000), // bf16 subnormal
                    2f32.powi(-24),              // f16 subnormal
                    2f32.powi(-9),               // f8e4m3 subnormal
                    2f32.powi(-16),              // f8e5m2 subnormal
                    448.0,
                    f32::from_bits(r),
                    f32::from_bits(r),
                ];
                let x = self.one(&pool);
                // Any NaN becomes `nan`, which reads back as the canonical NaN.
                Scalar::Float(if x.is_nan() { f64::NAN } else { x.into() })
            }
        }
    }

    /// A random body over operands `$0..$3`, with casts that make most trees well typed.
    fn expr(&mut self, depth: usize) -> Expr {
        let b = Box::new;
        let dt = self.one(&DType::ALL);
        let choice = if depth == 0 { 0 } else { self.pick(7) };
        match choice {
            0 => Expr::Arg(self.pick(3)),
            1 => {
                let v = self.scalar(dt);
                Expr::Const(Literal::from_scalars(dt, vec![], &[v]).expect("one element"))
            }
            2 => {
                let u = self.one(&UnaryOp::ALL);
                let to = if u == UnaryOp::Not {
                    DType::Bool
                } else {
                    DType::F32
                };
                Expr::Unary(u, b(Expr::Cast(to, b(self.expr(depth - 1)))))
            }
            3 | 4 => {
                let x = Expr::Cast(dt, b(self.expr(depth - 1)));
                let y = Expr::Cast(dt, b(self.expr(depth - 1)));
                if choice == 3 {
                    Expr::Binary(self.one(&BinaryOp::ALL), b(x), b(y))
                } else {
                    Expr::Compare(self.one(&CmpOp::ALL), b(x), b(y))
                }
            }
            5 => Expr::Where(
                b(Expr::Cast(DType::Bool, b(self.expr(depth - 1)))),
                b(Expr::Cast(dt, b(self.expr(depth - 1)))),
                b(Expr::Cast(dt, b(self.expr(depth - 1)))),
            ),
            _ => Expr::Cast(dt, b(self.expr(depth - 1))),
        }
    }

    fn fused(&mut self) {
        let candidates = [self.any(0), self.any(0), self.any(0)];
        let body = self.expr(3);
        // Renumber the operands the body uses, in order of first use.
        let mut used: Vec<usize> = vec![];
        body.visit(&mut |e| {
            if let Expr::Arg(i) = e {
                if !used.contains(i) {
                    used.push(*i);
                }
            }
        });
        if used.is_empty() {
            return;
        }
        let body =
            body.substitute(&mut |i| Expr::Arg(used.iter().position(|&u| u == i).expect("used")));
        let ins: Vec<ValueId> = used.iter().map(|&i| candidates[i]).collect();
        self.add(Op::FusedElementwise { body }, &ins);
    }

    fn step(&mut self) {
        match self.pick(26) {
            25 => self.fused(),
            0 => {
                let (dtype, shape) = (self.one(&DType::ALL), self.shape(0));
                self.leaf(TensorType { dtype, shape });
            }
            1 => {
                let (u, x) = (self.one(&UnaryOp::ALL), self.any(0));
                self.add(Op::Unary(u), &[x]);
            }
            2 | 3 => {
                let a = self.any(0);
                let dtype = self.ty(a).dtype;
                let b = self.get(|d| d == dtype, dtype, 0);
                let op = if self.flip() {
                    Op::Binary(self.one(&BinaryOp::ALL))
                } else {
                    Op::Compare(self.one(&CmpOp::ALL))
                };
                let ins = if self.flip() { [a, b] } else { [b, a] };
                self.add(op, &ins);
            }
            4 => {
                let c = self.get(|d| d == DType::Bool, DType::Bool, 0);
                let a = self.any(0);
                let dtype = self.ty(a).dtype;
                let b = self.get(|d| d == dtype, dtype, 0);
                self.add(Op::Where, &[c, a, b]);
            }
            5 => {
                let (to, x) = (self.one(&DType::ALL), self.any(0));
                self.add(Op::Cast { to }, &[x]);
            }
            6 => {
                let x = self.any(1);
                let rank = self.ty(x).rank();
                let mask = self.bits() as usize;
                let axes = (0..rank).filter(|i| mask >> i & 1 == 1).collect();
                let (op, keepdim) = (self.one(&ReduceOp::ALL), self.flip());
                self.add(Op::Reduce { op, axes, keepdim }, &[x]);
            }
            7 => {
                let x = self.any(1);
                let (axis, keepdim) = (self.pick(self.ty(x).rank()), self.flip());
                self.add(Op::ArgMax { axis, keepdim }, &[x]);
            }
            8 => {
                let x = self.any(1);
                let (k, axis) = (1 + self.pick(2), self.pick(self.ty(x).rank()));
                self.add(Op::TopK { k, axis }, &[x]);
            }
            9 => {
                let x = self.float(1);
                let axis = self.pick(self.ty(x).rank());
                let op = self.one(&[Op::Softmax { axis }, Op::LogSoftmax { axis }]);
                self.add(op, &[x]);
            }
            10 => self.matmul(),
            11 => self.reshape(),
            12 => {
                let x = self.any(0);
                let mut perm: Vec<usize> = (0..self.ty(x).rank()).collect();
                for i in (1..perm.len()).rev() {
                    let j = self.pick(i + 1);
                    perm.swap(i, j);
                }
                self.add(Op::Permute { perm }, &[x]);
            }
            13 => {
                let x = self.any(0);
                let mut shape = self.ty(x).shape;
                for d in shape.iter_mut().filter(|d| d.as_fixed() == Some(1)) {
                    if self.flip() {
                        *d = self.dim();
                    }
                }
                if self.flip() {
                    shape.insert(0, self.dim());
                }
                self.add(Op::Expand { shape }, &[x]);
            }
            14 => {
                let x = self.any(1);
                let t = self.ty(x);
                let axis = self.pick(t.rank());
                let size = t.shape[axis].clone();
                let start = self.one(&[Dim::fixed(0), Dim::fixed(1), Dim::sym("past")]);
                let ends = [
                    size.clone(),
                    &size - &Dim::fixed(1),
                    Dim::sym("seq"),
                    2.into(),
                ];
                let end = self.one(&ends);
                self.add(Op::Slice { axis, start, end }, &[x]);
            }
            15 => {
                let x = self.any(1);
                let mut t = self.ty(x);
                let axis = self.pick(t.rank());
                let mut ins = vec![x; 1 + self.pick(3)];
                if self.flip() {
                    t.shape[axis] = self.dim();
                    ins.insert(self.pick(ins.len() + 1), self.leaf(t));
                }
                self.add(Op::Concat { axis }, &ins);
            }
            16 => {
                let data = self.any(1);
                let axis = self.pick(self.ty(data).rank());
                let dtype = self.one(&[DType::I64, DType::I32, DType::U8]);
                let idx = self.get(DType::is_int, dtype, 0);
                self.add(Op::Gather { axis }, &[data, idx]);
            }
            17 => {
                let data = self.any(1);
                let mut t = self.ty(data);
                let axis = self.pick(t.rank());
                t.shape[axis] = self.dim();
                t.dtype = self.one(&[DType::I64, DType::I32, DType::U8]);
                let idx = self.leaf(t);
                self.add(Op::GatherAlong { axis }, &[data, idx]);
            }
            18 => {
                let dtype = self.one(&DType::ALL[..8]);
                let shape = self.shape(1);
                let axis = self.pick(shape.len());
                self.add(Op::Iota { dtype, shape, axis }, &[]);
            }
            19 => {
                let x = self.any(2);
                let s = Dim::sym;
                let diagonals = [
                    0.into(),
                    1.into(),
                    (-1).into(),
                    &s("past") + &1.into(),
                    &0.into() - &s("seq"),
                ];
                let (upper, diagonal) = (self.flip(), self.one(&diagonals));
                self.add(Op::Triangle { upper, diagonal }, &[x]);
            }
            20 => {
                let x = self.float(1);
                let t = self.ty(x);
                let wt = TensorType {
                    dtype: t.dtype,
                    shape: t.shape[t.rank() - 1..].to_vec(),
                };
                let mut ins = vec![x, self.leaf(wt.clone())];
                let eps = F64(self.f64());
                let op = if self.flip() {
                    ins.push(self.leaf(wt));
                    Op::LayerNorm { eps }
                } else {
                    Op::RmsNorm { eps }
                };
                self.add(op, &ins);
            }
            21 => self.attention(),
            22 => self.moe(),
            23 => self.refine(),
            _ => self.constant(),
        }
    }

    /// A matmul, or (half the time) a linear layer with a random epilogue.
    fn matmul(&mut self) {
        let a = self.get(|d| d != DType::Bool, DType::F32, 2);
        let t = self.ty(a);
        let r = t.rank();
        let linear = self.flip();
        let (transpose_a, transpose_b) = (!linear && self.flip(), self.flip());
        let k = t.shape[if transpose_a { r - 2 } else { r - 1 }].clone();
        let n = self.dim();
        let mut shape = t.shape[self.pick(r - 1)..r - 2].to_vec();
        shape.extend(if transpose_b {
            [n.clone(), k]
        } else {
            [k, n.clone()]
        });
        let b = self.leaf(TensorType {
            dtype: t.dtype,
            shape,
        });
        let mm = Op::MatMul {
            transpose_a,
            transpose_b,
        };
        if !linear {
            self.add(mm, &[a, b]);
            return;
        }
        let Ok(y) = kiln_ir::infer(&mm, &[&t, &self.ty(b)]) else {
            return;
        };
        let (scaled, added) = (self.flip(), self.flip());
        let mut ins = vec![a, b];
        let column = TensorType {
            dtype: t.dtype,
            shape: vec![n],
        };
        if self.pick(4) == 0 {
            // A SwiGLU: a second weight of b's type, and a scale per weight.
            ins.push(self.leaf(self.ty(b)));
            if scaled {
                ins.push(self.leaf(column.clone()));
                ins.push(self.leaf(column));
            }
            self.add(
                Op::SwiGlu {
                    transpose_b,
                    scaled,
                },
                &ins,
            );
            return;
        }
        if scaled {
            ins.push(self.leaf(column.clone()));
        }
        if added {
            let addend = if self.flip() { y.clone() } else { column };
            ins.push(self.leaf(addend));
        }
        // Heads (rotated half the time), when the product's last axis splits into them.
        let heads = self.one(&[0, 0, 1, 2]);
        let mut rotary = false;
        let r = y.rank();
        let d = y.shape[r - 1]
            .as_fixed()
            .filter(|_| heads > 0)
            .map(|n| n / heads as i64);
        if let Some(d) = d.filter(|&d| d > 0 && self.flip()) {
            rotary = true;
            let mut table = y.shape[..r - 2].to_vec();
            table.extend([1.into(), y.shape[r - 2].clone(), Dim::fixed(d)]);
            for _ in 0..2 {
                ins.push(self.leaf(TensorType {
                    dtype: t.dtype,
                    shape: table.clone(),
                }));
            }
        }
        if heads > 0 && self.flip() {
            // A packed projection: this layer and a second of the same types (as k and v),
            // scaled and rotated groups leading.
            let tables = ins.split_off(ins.len() - 2 * usize::from(rotary));
            let mut second = vec![self.leaf(self.ty(b))];
            let both_scaled = scaled && self.flip();
            if both_scaled {
                second.push(self.leaf(self.ty(ins[2])));
            }
            if added {
                second.push(self.leaf(self.ty(ins[ins.len() - 1])));
            }
            ins.extend(second);
            ins.extend(tables);
            let count = |on: bool, both: bool| usize::from(on) + usize::from(on && both);
            let both_rotated = self.flip();
            let op = Op::PackedLinear {
                transpose_b,
                heads: vec![heads, heads],
                scaled: count(scaled, both_scaled),
                added,
                rotary: count(rotary, both_rotated),
            };
            self.add(op, &ins);
            return;
        }
        let op = Op::Linear {
            transpose_b,
            scaled,
            added,
            heads,
            rotary,
        };
        self.add(op, &ins);
    }

    fn reshape(&mut self) {
        let x = self.any(1);
        let t = self.ty(x);
        let mut shape = t.shape.clone();
        match self.pick(4) {
            0 => shape = vec![t.numel()],
            1 if shape.len() >= 2 => {
                let last = shape.pop().unwrap_or_default();
                let prev = shape.pop().unwrap_or_default();
                shape.push(&prev * &last);
            }
            2 => {
                let i = self.pick(shape.len());
                if let Some(half) = shape[i].div_exact(2) {
                    shape[i] = half;
                    shape.insert(i, 2.into());
                }
            }
            _ => shape.insert(self.pick(shape.len() + 1), 1.into()),
        }
        self.add(Op::Reshape { shape }, &[x]);
    }

    fn attention(&mut self) {
        let dtype = self.one(&DType::ALL[..5]);
        let (b, sq, sk, d, dv) = (self.dim(), self.dim(), self.dim(), self.dim(), self.dim());
        let hkv = self.one(&[1, 2, 4]);
        let hq = hkv * (1 + self.pick(2) as i64);
        let ty = |shape: Vec<Dim>| TensorType { dtype, shape };
        let q = self.leaf(ty(vec![b.clone(), hq.into(), sq.clone(), d.clone()]));
        let k = self.leaf(ty(vec![b.clone(), hkv.into(), sk.clone(), d]));
        let v = self.leaf(ty(vec![b.clone(), hkv.into(), sk.clone(), dv]));
        let mut ins = vec![q, k, v];
        let masks = [
            vec![sq.clone(), sk.clone()],
            vec![b, 1.into(), sq, sk.clone()],
            vec![1.into(), hq.into(), 1.into(), sk],
        ];
        if self.flip() {
            let shape = self.one(&masks);
            ins.push(self.leaf(ty(shape)));
        }
        let (scale, causal) = (F64(self.f64()), self.flip());
        let window = self.one(&[0, 1, 4, 4096]);
        let merge_heads = self.flip();
        self.add(
            Op::Attention {
                scale,
                causal,
                window,
                merge_heads,
            },
            &ins,
        );
    }

    fn moe(&mut self) {
        let x = self.float(1);
        let t = self.ty(x);
        let h = t.shape[t.rank() - 1].clone();
        let experts = 1 + self.pick(4);
        let inter = self.dim();
        let ty = |shape: Vec<Dim>| TensorType {
            dtype: t.dtype,
            shape,
        };
        let mut ins = vec![x, self.leaf(ty(vec![experts.into(), h.clone()]))];
        for _ in 0..experts {
            ins.push(self.leaf(ty(vec![inter.clone(), h.clone()])));
            ins.push(self.leaf(ty(vec![inter.clone(), h.clone()])));
            ins.push(self.leaf(ty(vec![h.clone(), inter.clone()])));
        }
        let top_k = 1 + self.pick(experts);
        self.add(Op::Moe { top_k }, &ins);
    }

    fn refine(&mut self) {
        let x = self.float(1);
        let t = self.ty(x);
        let (k, n) = (t.shape[t.rank() - 1].clone(), self.dim());
        let mut rows = t.shape[..t.rank() - 1].to_vec();
        rows.push(n.clone());
        let ty = |dtype, shape| TensorType { dtype, shape };
        let coarse = self.leaf(ty(t.dtype, rows));
        let r = self.leaf(ty(DType::F8E4M3, vec![n.clone(), k]));
        let s = self.leaf(ty(DType::F32, vec![n.clone()]));
        let b = self.leaf(ty(DType::F32, vec![n]));
        self.add(Op::RefineLogits, &[coarse, x, r, s, b]);
    }

    fn constant(&mut self) {
        let dtype = self.one(&DType::ALL);
        let shape: Vec<usize> = (0..self.pick(4)).map(|_| self.pick(4)).collect();
        let values: Vec<Scalar> = (0..shape.iter().product())
            .map(|_| self.scalar(dtype))
            .collect();
        let value = Literal::from_scalars(dtype, shape, &values).expect("sized by the shape");
        self.add(Op::Const { value }, &[]);
    }
}

fn build(choices: &[u32], names: &[String], json: bool) -> Graph {
    let mut gen = Gen {
        choices,
        pos: 0,
        names,
        used: HashSet::new(),
        json,
        g: Graph::new(),
    };
    while gen.pos < choices.len() {
        gen.step();
    }
    let mut outputs = HashSet::new();
    for _ in 0..gen.pick(4) {
        let v = ValueId(gen.pick(gen.g.nodes().len()) as u32);
        let name = gen.name();
        if gen.g.node(v).is_some() && outputs.insert(name.clone()) {
            gen.g.add_output(&name, v);
        }
    }
    gen.g
}

fn name() -> impl Strategy<Value = String> {
    let special = prop_oneof![
        Just('"'),
        Just('\\'),
        Just('\n'),
        Just('\t'),
        Just('\r'),
        Just('\0'),
        Just('\u{7f}'),
        Just('\u{85}'),
        Just('\u{2028}'),
        Just('é'),
        Just('🦀'),
        Just('#'),
        Just('%'),
        Just('a'),
    ];
    let ch = prop_oneof![any::<char>(), special];
    prop::collection::vec(ch, 0..6).prop_map(|cs| cs.into_iter().collect())
}

fn graphs(json: bool) -> impl Strategy<Value = Graph> {
    let choices = prop::collection::vec(any::<u32>(), 0..400);
    (choices, prop::collection::vec(name(), 1..6))
        .prop_map(move |(choices, names)| build(&choices, &names, json))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn text_round_trips_exactly(g in graphs(false)) {
        prop_assert_eq!(verify(&g), Ok(()));
        let text = print(&g);
        let back = parse(&text);
        prop_assert_eq!(&back, &Ok(g.clone()), "{}", text);
        prop_assert_eq!(back.map(|b| print(&b)), Ok(text));
    }

    #[test]
    fn serde_json_round_trips(g in graphs(true)) {
        let json = serde_json::to_string(&g).expect("serializes");
        let back: Graph = serde_json::from_str(&json).expect("deserializes");
        prop_assert_eq!(back, g);
    }
}

/// The generator reaches every mnemonic and makes constants of every dtype.
#[test]
fn generator_covers_the_op_set() {
    let names = ["n".to_string()];
    let (mut seen, mut const_dtypes) = (BTreeSet::new(), BTreeSet::new());
    let mut state = 0x2545_f491_4f6c_dd1du64;
    for _ in 0..400 {
        let choices: Vec<u32> = (0..300)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 32) as u32
            })
            .collect();
        let g = build(&choices, &names, false);
        for n in g.nodes() {
            seen.insert(n.op.name());
            if let Op::Const { value } = &n.op {
                const_dtypes.insert(value.dtype());
            }
        }
    }
    let mut all: Vec<&str> = ["input", "param", "const", "where", "cast", "argmax", "topk"].into();
    all.extend([
        "softmax",
        "log_softmax",
        "matmul",
        "linear",
        "reshape",
        "permute",
        "expand",
        "slice",
    ]);
    all.extend([
        "concat",
        "gather",
        "gather_along",
        "iota",
        "triu",
        "tril",
        "rmsnorm",
    ]);
    all.extend(["layernorm", "attention", "moe", "fused_elementwise"]);
    all.extend(["swiglu", "packed_linear"]);
    all.extend(UnaryOp::ALL.map(UnaryOp::name));
    all.extend(BinaryOp::ALL.map(BinaryOp::name));
    all.extend(CmpOp::ALL.map(CmpOp::name));
    all.extend(ReduceOp::ALL.map(ReduceOp::name));
    let missing: Vec<&&str> = all.iter().filter(|n| !seen.contains(**n)).collect();
    assert!(missing.is_empty(), "never generated: {missing:?}");
    assert_eq!(const_dtypes.len(), DType::ALL.len());
}
