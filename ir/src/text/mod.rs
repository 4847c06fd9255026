//! The IR text format: [`print()`] writes a [`Graph`](crate::Graph) as one definition per line
//! and [`parse()`] reads it back (then runs [`crate::verify()`]): `parse(&print(&g)) == Ok(g)`
//! for every verified graph (up to the NaN caveat and size limits below).
//!
//! ```text
//! # comments run from `#` to the end of the line; blank lines are ignored
//! %0: i64[batch, seq] = input "input_ids"
//! %1: f32[1000, 64] = param "embed.weight"
//! %2: f32[batch, seq, 64] = gather(%1, %0) axis=0
//! %3: f32[] = const 0.125
//! %4: f32[2, 2] = const [[1.0, 2.5], [-0.0, inf]]
//! %5: f32[batch, seq, 64] = mul(%2, %3)
//! %6: f32[batch, seq, 1] = reduce_mean(%5) axes=[2] keepdim=true
//! %7: f32[seq, past+seq] = param "mask"
//! %8: f32[seq, past+seq] = triu(%7) diagonal=past+1
//! %9: f32[batch, seq, 32] = slice(%5) axis=2 start=0 end=32
//! output "hidden" = %5
//! ```
//!
//! Grammar (tokens may be separated by spaces and tabs; a line never continues on the next):
//!
//! ```text
//! line    := def | output | (empty)
//! def     := VALUE ':' type '=' opexpr
//! output  := 'output' STRING '=' VALUE
//! type    := DTYPE shape
//! shape   := '[' (dim (',' dim)*)? ']'
//! dim     := '-'? term (('+' | '-') term)*        # past+seq, 2*batch*seq-1, -k
//! term    := factor ('*' factor)*                  # N, sym, N*sym*sym...
//! factor  := INT | IDENT
//! opexpr  := 'input' STRING | 'param' STRING | 'const' literal
//!          | MNEMONIC ('(' (VALUE (',' VALUE)*)? ')')? (IDENT '=' attr)*
//! literal := scalar | '[' (literal (',' literal)*)? ']'   # nested by the declared shape
//! scalar  := float | '-'? INT | 'true' | 'false'  # as the declared dtype requires
//! float   := '-'? NUMBER | '-'? 'inf' | 'nan'
//! attr    := INT | '[' (INT (',' INT)*)? ']' | 'true' | 'false' | DTYPE | shape | dim | float
//!          | STRING                                # as the attribute's field requires; the
//!                                                  # string is a fused body (crate::expr)
//! VALUE   := '%' IDENT | '%' INT                   # any name; renumbered by definition order
//! STRING  := '"' ... '"'                           # escapes \" \\ \n \t \u{hex}
//! NUMBER  := INT ('.' DIGITS)? ([eE] [+-]? DIGITS)?
//! IDENT   := [A-Za-z_][A-Za-z0-9_]*
//! ```
//!
//! - Values must be defined before use and only once; the printer names them `%N` by node index.
//! - Mnemonics are [`Op::name`]. Ops other than `input`, `param`, `const` and `iota` take a
//!   parenthesized operand list. Every attribute of the [`Op`] variant is written `key=value`
//!   with the variant's field name, in field order (the parser accepts any order, each once);
//!   `triu`/`tril` stand for `upper=true/false`, and the reduction op is part of `reduce_*`.
//! - Attributes added to an op after the format's first use (`LATER_ATTRIBUTES`: `linear`'s
//!   `heads` and `rotary`, `attention`'s `merge_heads`) may be absent and then take the value
//!   that keeps the op's earlier meaning (`0`, `false`); the printer always writes them.
//! - `f64` attributes print with Rust's `{:?}` (shortest round-trip) and so round-trip bit-exactly.
//! - A constant's dtype and shape come from its declared type, which must be fixed. Float
//!   elements print as the f32 value with `{:?}` (exact for f32, f16, bf16 and fp8) and parse
//!   as f32 before conversion; integers print in decimal (range-checked for the dtype); bools
//!   as `true`/`false`.
//! - Infinities are `inf`/`-inf`. Any NaN prints as `nan`, which parses to the canonical
//!   (positive, quiet) NaN of the dtype (`f64::NAN` converted: `0x7fc00000` in f32, `0x7e00` in
//!   f16, `0x7fc0` in bf16, `0x7f` in both fp8 formats): NaN sign and payload bits are not
//!   preserved, in constants and in `f64` attributes alike.
//! - Strings escape `"`, `\`, newline, tab and other control characters (`\u{1b}`); any other
//!   Unicode is written as is.
//! - So that later shape arithmetic cannot overflow or blow up, the parser limits sizes: the
//!   absolute coefficients of a dim sum to at most 2^40, and over a shape, the product of those
//!   sums must fit in an `i64` and the product of the dims' term counts be at most 4096.
//!
//! Errors name the 1-based line and column of the offending token, what was expected and what
//! was found (`line 3, column 24: expected ',' or ')' after operand, found 'x'`).

mod parse;
mod print;

pub use parse::{parse, ParseError};
pub use print::{op_text, print};

use crate::{BinaryOp, CmpOp, DType, Dim, Expr, Literal, Op, ReduceOp, Shape, UnaryOp, F64};

/// One attribute of an op, borrowed mutably: the printer reads it and the parser fills it.
pub(crate) enum Field<'a> {
    /// A non-negative integer (`axis=1`, `k=2`, `window=0`).
    Usize(&'a mut usize),
    /// A list of axes (`axes=[0, 2]`, `perm=[1, 0]`).
    Axes(&'a mut Vec<usize>),
    /// `true` or `false`.
    Bool(&'a mut bool),
    /// A dtype name.
    DType(&'a mut DType),
    /// A shape of dims (`shape=[batch, 4]`).
    Shape(&'a mut Shape),
    /// One dim (`start=past`, `diagonal=past+1`).
    Dim(&'a mut Dim),
    /// A float (`eps=1e-6`).
    F64(&'a mut F64),
    /// A fused elementwise body, written as a string holding its s-expression
    /// (`body="(mul (silu $0) $1)"`, see [`crate::expr`]).
    Expr(&'a mut Expr),
}

/// The attributes of `op` in printing order, named as the fields of its variant. `input`,
/// `param` and `const` have special syntax and report none here.
pub(crate) fn fields(op: &mut Op) -> Vec<(&'static str, Field<'_>)> {
    use Field as F;
    match op {
        Op::Input { .. } | Op::Param { .. } | Op::Const { .. } => vec![],
        Op::Unary(_)
        | Op::Binary(_)
        | Op::Compare(_)
        | Op::Where
        | Op::Rotary
        | Op::RefineLogits => vec![],
        Op::Cast { to } => vec![("to", F::DType(to))],
        Op::Reduce { axes, keepdim, .. } => {
            vec![("axes", F::Axes(axes)), ("keepdim", F::Bool(keepdim))]
        }
        Op::ArgMax { axis, keepdim } => {
            vec![("axis", F::Usize(axis)), ("keepdim", F::Bool(keepdim))]
        }
        Op::TopK { k, axis } => vec![("k", F::Usize(k)), ("axis", F::Usize(axis))],
        Op::Softmax { axis }
        | Op::LogSoftmax { axis }
        | Op::Concat { axis }
        | Op::Gather { axis }
        | Op::GatherAlong { axis } => vec![("axis", F::Usize(axis))],
        Op::MatMul {
            transpose_a,
            transpose_b,
        } => vec![
            ("transpose_a", F::Bool(transpose_a)),
            ("transpose_b", F::Bool(transpose_b)),
        ],
        Op::Linear {
            transpose_b,
            scaled,
            added,
            heads,
            rotary,
        } => vec![
            ("transpose_b", F::Bool(transpose_b)),
            ("scaled", F::Bool(scaled)),
            ("added", F::Bool(added)),
            ("heads", F::Usize(heads)),
            ("rotary", F::Bool(rotary)),
        ],
        Op::PackedLinear {
            transpose_b,
            heads,
            scaled,
            added,
            rotary,
        } => vec![
            ("transpose_b", F::Bool(transpose_b)),
            ("heads", F::Axes(heads)),
            ("scaled", F::Usize(scaled)),
            ("added", F::Bool(added)),
            ("rotary", F::Usize(rotary)),
        ],
        Op::SwiGlu {
            transpose_b,
            scaled,
        } => vec![
            ("transpose_b", F::Bool(transpose_b)),
            ("scaled", F::Bool(scaled)),
        ],
        Op::Reshape { shape } | Op::Expand { shape } => vec![("shape", F::Shape(shape))],
        Op::Permute { perm } => vec![("perm", F::Axes(perm))],
        Op::Slice { axis, start, end } => vec![
            ("axis", F::Usize(axis)),
            ("start", F::Dim(start)),
            ("end", F::Dim(end)),
        ],
        Op::Iota { dtype, shape, axis } => vec![
            ("dtype", F::DType(dtype)),
            ("shape", F::Shape(shape)),
            ("axis", F::Usize(axis)),
        ],
        Op::Triangle { diagonal, .. } => vec![("diagonal", F::Dim(diagonal))],
        Op::RmsNorm { eps } | Op::LayerNorm { eps } => vec![("eps", F::F64(eps))],
        Op::Attention {
            scale,
            causal,
            window,
            merge_heads,
        } => vec![
            ("scale", F::F64(scale)),
            ("causal", F::Bool(causal)),
            ("window", F::Usize(window)),
            ("merge_heads", F::Bool(merge_heads)),
        ],
        Op::Moe { top_k } => vec![("top_k", F::Usize(top_k))],
        Op::FusedElementwise { body } => vec![("body", F::Expr(body))],
    }
}

/// Attributes added to an op after graphs were first written in this format, as (mnemonic,
/// attribute): a line without one keeps the [`templates`] value, which is the op's meaning
/// before the attribute existed, so artifacts written by earlier kiln versions still load.
/// Every other attribute is required.
pub(crate) const LATER_ATTRIBUTES: &[(&str, &str)] = &[
    ("linear", "heads"),
    ("linear", "rotary"),
    ("attention", "merge_heads"),
];

/// One op of every mnemonic, with default attributes: the parser looks mnemonics up here and
/// then fills in the attributes through [`fields`].
pub(crate) fn templates() -> Vec<Op> {
    let mut ops = vec![
        Op::Input {
            name: String::new(),
        },
        Op::Param {
            name: String::new(),
        },
        Op::Const {
            value: Literal::scalar(DType::F32, 0.0),
        },
        Op::Where,
        Op::Cast { to: DType::F32 },
        Op::ArgMax {
            axis: 0,
            keepdim: false,
        },
        Op::TopK { k: 0, axis: 0 },
        Op::Softmax { axis: 0 },
        Op::LogSoftmax { axis: 0 },
        Op::MatMul {
            transpose_a: false,
            transpose_b: false,
        },
        Op::Reshape { shape: vec![] },
        Op::Permute { perm: vec![] },
        Op::Expand { shape: vec![] },
        Op::Slice {
            axis: 0,
            start: Dim::default(),
            end: Dim::default(),
        },
        Op::Concat { axis: 0 },
        Op::Gather { axis: 0 },
        Op::GatherAlong { axis: 0 },
        Op::Iota {
            dtype: DType::I64,
            shape: vec![],
            axis: 0,
        },
        Op::Triangle {
            upper: true,
            diagonal: Dim::default(),
        },
        Op::Triangle {
            upper: false,
            diagonal: Dim::default(),
        },
        Op::RmsNorm { eps: F64(0.0) },
        Op::LayerNorm { eps: F64(0.0) },
        Op::Attention {
            scale: F64(0.0),
            causal: false,
            window: 0,
            merge_heads: false,
        },
        Op::Moe { top_k: 0 },
        Op::Rotary,
        Op::RefineLogits,
        Op::Linear {
            transpose_b: false,
            scaled: false,
            added: false,
            heads: 0,
            rotary: false,
        },
        Op::PackedLinear {
            transpose_b: false,
            heads: vec![],
            scaled: 0,
            added: false,
            rotary: 0,
        },
        Op::SwiGlu {
            transpose_b: false,
            scaled: false,
        },
        Op::FusedElementwise { body: Expr::Arg(0) },
    ];
    ops.extend(UnaryOp::ALL.map(Op::Unary));
    ops.extend(BinaryOp::ALL.map(Op::Binary));
    ops.extend(CmpOp::ALL.map(Op::Compare));
    ops.extend(ReduceOp::ALL.map(|op| Op::Reduce {
        op,
        axes: vec![],
        keepdim: false,
    }));
    ops
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn templates_cover_unique_mnemonics_and_fields() {
        let ops = templates();
        let names: HashSet<&str> = ops.iter().map(Op::name).collect();
        assert_eq!(names.len(), ops.len());
        assert_eq!(ops.len(), 3 + 25 + 19 + 9 + 6 + 4);
        for mut op in ops {
            let keys: Vec<&str> = fields(&mut op).into_iter().map(|(k, _)| k).collect();
            let unique: HashSet<&&str> = keys.iter().collect();
            assert_eq!(unique.len(), keys.len(), "{keys:?}");
        }
    }

    /// An op's text is what the printer writes on its node line after the operands.
    #[test]
    fn op_text_is_the_node_line_without_operands() {
        let src = "%0: f32[2, 3] = input \"x\"\n\
                   %1: f32[2, 3] = softmax(%0) axis=1\n\
                   %2: f32[2, 3] = add(%0, %1)\n\
                   output \"y\" = %1\n\
                   output \"z\" = %2\n";
        let g = parse(src).unwrap();
        let printed = print(&g);
        for (id, node) in g.iter().skip(1) {
            let text = op_text(&node.op);
            let line = printed
                .lines()
                .find(|l| l.starts_with(&format!("{id}:")))
                .unwrap();
            let rest = line.split_once(')').map_or(line, |(_, r)| r);
            assert!(
                line.contains(node.op.name()) && text.ends_with(rest),
                "{line} / {text}"
            );
        }
        assert_eq!(op_text(&g.nodes()[1].op), "softmax axis=1");
    }
}
