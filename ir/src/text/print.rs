//! The printer of the text format: one `%N: type = op ...` line per node, then the outputs.

use super::{fields, Field};
use crate::shape::DisplayShape;
use crate::{Graph, Literal, Op, Scalar};
use std::fmt::{self, Write};

/// Prints `g` in the text format; [`super::parse`] reads the result back to an equal graph.
pub fn print(g: &Graph) -> String {
    let mut s = String::new();
    for (id, node) in g.iter() {
        let _ = write!(s, "{id}: {} = {}", node.ty, node.op.name());
        match &node.op {
            Op::Input { name } | Op::Param { name } => {
                s.push(' ');
                quote(&mut s, name);
            }
            Op::Const { value } => {
                s.push(' ');
                literal(&mut s, value);
            }
            op => {
                if !op.is_source() || !node.inputs.is_empty() {
                    let operands: Vec<String> = node.inputs.iter().map(|v| v.to_string()).collect();
                    let _ = write!(s, "({})", operands.join(", "));
                }
                attrs(&mut s, op);
            }
        }
        s.push('\n');
    }
    for out in g.outputs() {
        s.push_str("output ");
        quote(&mut s, &out.name);
        let _ = writeln!(s, " = {}", out.value);
    }
    s
}

/// An op as a node line of the text format writes it, without operands: its mnemonic, then
/// its attributes (e.g. `softmax axis=1`); for naming an op outside a graph (kernel keys).
/// Sources (`input`, `param`, `const`) print their mnemonic only.
pub fn op_text(op: &Op) -> String {
    let mut s = op.name().to_string();
    attrs(&mut s, op);
    s
}

/// Writes ` key=value` for each attribute of `op`.
fn attrs(s: &mut String, op: &Op) {
    for (key, field) in fields(&mut op.clone()) {
        let _ = write!(s, " {key}=");
        attr(s, &field);
    }
}

/// Prints the graph in the text format (see [`crate::text`]).
impl fmt::Display for Graph {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&print(self))
    }
}

fn attr(s: &mut String, field: &Field<'_>) {
    let _ = match field {
        Field::Usize(n) => write!(s, "{n}"),
        Field::Axes(axes) => {
            let items: Vec<String> = axes.iter().map(ToString::to_string).collect();
            write!(s, "[{}]", items.join(", "))
        }
        Field::Bool(b) => write!(s, "{b}"),
        Field::DType(d) => write!(s, "{d}"),
        Field::Shape(shape) => write!(s, "{}", DisplayShape(shape)),
        Field::Dim(d) => write!(s, "{d}"),
        Field::F64(x) => write!(s, "{x}"),
        Field::Expr(e) => {
            quote(s, &e.to_string());
            Ok(())
        }
    };
}

/// An f32 as the parser reads it back: shortest round-trip digits, `inf`, `-inf` or `nan`.
fn f32_text(x: f32) -> String {
    if x.is_nan() {
        "nan".into()
    } else {
        format!("{x:?}")
    }
}

/// Writes `text` double-quoted, escaping quotes, backslashes and control characters.
fn quote(s: &mut String, text: &str) {
    s.push('"');
    for c in text.chars() {
        match c {
            '"' => s.push_str("\\\""),
            '\\' => s.push_str("\\\\"),
            '\n' => s.push_str("\\n"),
            '\t' => s.push_str("\\t"),
            c if c.is_control() => {
                let _ = write!(s, "\\u{{{:x}}}", u32::from(c));
            }
            c => s.push(c),
        }
    }
    s.push('"');
}

/// Writes a constant's elements nested by its shape like numpy's repr (`[[1.0, 2.5], [3.0,
/// 4.0]]`, a scalar bare). Iterative, so that a huge rank cannot overflow the stack.
fn literal(s: &mut String, lit: &Literal) {
    let shape = lit.shape();
    // Items are the elements, or, when some axis has size 0, one `[]` per list along it.
    let (outer, items): (&[usize], Vec<String>) = match shape.iter().position(|&n| n == 0) {
        Some(z) => {
            let outer = shape.get(..z).unwrap_or_default();
            (outer, vec!["[]".to_string(); outer.iter().product()])
        }
        None => (shape, lit.values().into_iter().map(scalar).collect()),
    };
    // blocks[k]: the number of items in one list along axis k.
    let mut blocks = vec![1usize; outer.len() + 1];
    for k in (0..outer.len()).rev() {
        blocks[k] = blocks[k + 1] * outer[k];
    }
    let blocks = blocks.get(..outer.len()).unwrap_or_default();
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            s.push_str(", ");
        }
        for &b in blocks {
            if i % b == 0 {
                s.push('[');
            }
        }
        s.push_str(item);
        for &b in blocks {
            if (i + 1) % b == 0 {
                s.push(']');
            }
        }
    }
}

fn scalar(v: Scalar) -> String {
    match v {
        // Every float dtype's values are f32 values, so this prints them exactly.
        Scalar::Float(x) => f32_text(x as f32),
        Scalar::Int(i) => i.to_string(),
        Scalar::Bool(b) => b.to_string(),
    }
}
