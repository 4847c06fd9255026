//! [`Expr`]: the body of [`crate::Op::FusedElementwise`], a small expression tree over the op's
//! operands (`$0`, `$1`, ...), rank-0 constants and the IR's elementwise ops.
//!
//! Its text form is an s-expression, written in the op's `body` attribute as a string:
//!
//! ```text
//! expr := '$' INT                        # operand i
//!       | '(' 'const' DTYPE scalar ')'   # a rank-0 constant, as the text format's scalars
//!       | '(' UNARY expr ')'             # silu, exp, neg, ... (UnaryOp names)
//!       | '(' BINARY expr expr ')'       # add, mul, max, ... (BinaryOp names)
//!       | '(' CMP expr expr ')'          # eq, lt, ... (CmpOp names)
//!       | '(' 'where' expr expr expr ')'
//!       | '(' 'cast' DTYPE expr ')'
//! ```
//!
//! e.g. `(mul (silu $0) $1)`. Tokens are separated by spaces; the printer writes exactly one
//! space between them, and nesting is limited to [`MAX_DEPTH`] levels.

use crate::scalar::Scalar;
use crate::{infer, BinaryOp, CmpOp, DType, Literal, Op, TensorType, UnaryOp, F64};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// The deepest nesting the parser accepts.
pub const MAX_DEPTH: usize = 64;

/// One node of a fused elementwise body. Every node's dtype follows from its operands as the
/// corresponding primitive op's does (an operand has its tensor's dtype, a constant its own).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Expr {
    /// Operand `i` of the fused op, broadcast to the result shape.
    Arg(usize),
    /// A rank-0 constant.
    Const(Literal),
    /// [`Op::Unary`].
    Unary(UnaryOp, Box<Expr>),
    /// [`Op::Binary`].
    Binary(BinaryOp, Box<Expr>, Box<Expr>),
    /// [`Op::Compare`].
    Compare(CmpOp, Box<Expr>, Box<Expr>),
    /// [`Op::Where`]: `(cond, a, b)`.
    Where(Box<Expr>, Box<Expr>, Box<Expr>),
    /// [`Op::Cast`].
    Cast(DType, Box<Expr>),
}

impl Expr {
    /// The primitive op of this node and its sub-expressions (`None` for an operand).
    pub fn op(&self) -> Option<(Op, Vec<&Expr>)> {
        Some(match self {
            Expr::Arg(_) => return None,
            Expr::Const(value) => (
                Op::Const {
                    value: value.clone(),
                },
                vec![],
            ),
            Expr::Unary(u, a) => (Op::Unary(*u), vec![a]),
            Expr::Binary(b, x, y) => (Op::Binary(*b), vec![x, y]),
            Expr::Compare(c, x, y) => (Op::Compare(*c), vec![x, y]),
            Expr::Where(c, x, y) => (Op::Where, vec![c, x, y]),
            Expr::Cast(to, a) => (Op::Cast { to: *to }, vec![a]),
        })
    }

    /// The node for a primitive elementwise `op` (unary, binary, compare, where, cast or a
    /// rank-0 const) over `args`; `None` for other ops or a wrong operand count.
    pub fn from_op(op: &Op, args: Vec<Expr>) -> Option<Expr> {
        let mut it = args.into_iter().map(Box::new);
        let e = match op {
            Op::Const { value } if value.shape().is_empty() => Expr::Const(value.clone()),
            Op::Unary(u) => Expr::Unary(*u, it.next()?),
            Op::Binary(b) => Expr::Binary(*b, it.next()?, it.next()?),
            Op::Compare(c) => Expr::Compare(*c, it.next()?, it.next()?),
            Op::Where => Expr::Where(it.next()?, it.next()?, it.next()?),
            Op::Cast { to } => Expr::Cast(*to, it.next()?),
            _ => return None,
        };
        it.next().is_none().then_some(e)
    }

    /// The number of nodes.
    pub fn size(&self) -> usize {
        1 + self
            .op()
            .map_or(0, |(_, cs)| cs.iter().map(|c| c.size()).sum())
    }

    /// Calls `f` on every node, parents before children, left to right.
    pub fn visit(&self, f: &mut impl FnMut(&Expr)) {
        f(self);
        if let Some((_, cs)) = self.op() {
            for c in cs {
                c.visit(f);
            }
        }
    }

    /// The same tree with every operand index `i` replaced by `map(i)`'s expression.
    pub fn substitute(&self, map: &mut impl FnMut(usize) -> Expr) -> Expr {
        match self {
            Expr::Arg(i) => map(*i),
            Expr::Const(v) => Expr::Const(v.clone()),
            Expr::Unary(u, a) => Expr::Unary(*u, Box::new(a.substitute(map))),
            Expr::Binary(b, x, y) => {
                Expr::Binary(*b, Box::new(x.substitute(map)), Box::new(y.substitute(map)))
            }
            Expr::Compare(c, x, y) => {
                Expr::Compare(*c, Box::new(x.substitute(map)), Box::new(y.substitute(map)))
            }
            Expr::Where(c, x, y) => Expr::Where(
                Box::new(c.substitute(map)),
                Box::new(x.substitute(map)),
                Box::new(y.substitute(map)),
            ),
            Expr::Cast(to, a) => Expr::Cast(*to, Box::new(a.substitute(map))),
        }
    }

    /// The dtype of this node given the operands' dtypes, checked with the primitive ops'
    /// rules, or why it is ill-typed.
    pub fn dtype(&self, args: &[DType]) -> Result<DType, String> {
        match self {
            Expr::Arg(i) => args.get(*i).copied().ok_or_else(|| {
                format!(
                    "body refers to ${i} but the op has {} operand(s)",
                    args.len()
                )
            }),
            Expr::Const(v) if !v.shape().is_empty() => {
                Err("a body constant must have rank 0".into())
            }
            _ => {
                let (op, cs) = self.op().unwrap_or_else(|| unreachable!("not an operand"));
                let tys = cs
                    .iter()
                    .map(|c| {
                        c.dtype(args).map(|d| TensorType {
                            dtype: d,
                            shape: vec![],
                        })
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                infer(&op, &tys.iter().collect::<Vec<_>>()).map(|t| t.dtype)
            }
        }
    }
}

impl fmt::Display for Expr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Expr::Arg(i) => write!(f, "${i}"),
            Expr::Const(v) => {
                let s = match v.values().first().copied() {
                    Some(Scalar::Float(x)) => F64(x).to_string(),
                    Some(Scalar::Int(i)) => i.to_string(),
                    Some(Scalar::Bool(b)) => b.to_string(),
                    None => String::new(),
                };
                write!(f, "(const {} {s})", v.dtype())
            }
            Expr::Cast(to, a) => write!(f, "(cast {to} {a})"),
            _ => {
                let (op, cs) = self.op().unwrap_or_else(|| unreachable!("not an operand"));
                write!(f, "({}", op.name())?;
                for c in cs {
                    write!(f, " {c}")?;
                }
                f.write_str(")")
            }
        }
    }
}

/// Why a body did not parse: the 0-based character offset and a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExprError {
    /// Character offset of the problem.
    pub at: usize,
    /// What was wrong.
    pub message: String,
}

impl fmt::Display for ExprError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "at character {}: {}", self.at, self.message)
    }
}

impl std::error::Error for ExprError {}

struct Reader<'a> {
    toks: Vec<(usize, &'a str)>,
    pos: usize,
    end: usize,
}

impl<'a> Reader<'a> {
    fn new(s: &'a str) -> Self {
        let mut toks = vec![];
        let mut start = None;
        for (i, c) in s.char_indices() {
            if c == '(' || c == ')' || c == ' ' {
                if let Some(st) = start.take() {
                    toks.push((st, &s[st..i]));
                }
                if c != ' ' {
                    toks.push((i, &s[i..i + 1]));
                }
            } else if start.is_none() {
                start = Some(i);
            }
        }
        if let Some(st) = start {
            toks.push((st, &s[st..]));
        }
        Reader {
            toks,
            pos: 0,
            end: s.len(),
        }
    }

    fn next(&mut self, what: &str) -> Result<(usize, &'a str), ExprError> {
        let t = self.toks.get(self.pos).copied().ok_or_else(|| ExprError {
            at: self.end,
            message: format!("expected {what}, found the end"),
        })?;
        self.pos += 1;
        Ok(t)
    }

    fn err<T>(at: usize, message: String) -> Result<T, ExprError> {
        Err(ExprError { at, message })
    }

    fn dtype(&mut self) -> Result<DType, ExprError> {
        let (at, t) = self.next("a dtype")?;
        DType::ALL
            .into_iter()
            .find(|d| d.to_string() == t)
            .map_or_else(
                || Self::err(at, format!("expected a dtype, found '{t}'")),
                Ok,
            )
    }

    fn expr(&mut self, depth: usize) -> Result<Expr, ExprError> {
        let (at, t) = self.next("an expression")?;
        if let Some(n) = t.strip_prefix('$') {
            let ok = !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit());
            return match n.parse::<usize>() {
                Ok(i) if ok => Ok(Expr::Arg(i)),
                _ => Self::err(at, format!("bad operand '{t}'")),
            };
        }
        if t != "(" {
            return Self::err(at, format!("expected '$N' or '(', found '{t}'"));
        }
        if depth >= MAX_DEPTH {
            return Self::err(at, format!("nested deeper than {MAX_DEPTH}"));
        }
        let (at, name) = self.next("an op name")?;
        let sub = |r: &mut Self| r.expr(depth + 1).map(Box::new);
        let e = if name == "const" {
            let dtype = self.dtype()?;
            let (vat, v) = self.next("a constant")?;
            let bad = || ExprError {
                at: vat,
                message: format!("bad {dtype} constant '{v}'"),
            };
            let lit = if dtype == DType::Bool {
                match v {
                    "true" => Literal::scalar_int(dtype, 1),
                    "false" => Literal::scalar_int(dtype, 0),
                    _ => return Err(bad()),
                }
            } else if dtype.is_float() {
                Literal::scalar(dtype, v.parse::<F64>().map_err(|_| bad())?.0)
            } else {
                let i: i64 = v.parse().map_err(|_| bad())?;
                let lit = Literal::scalar_int(dtype, i);
                if lit.values()[0] != Scalar::Int(i) {
                    return Err(bad());
                }
                lit
            };
            Expr::Const(lit)
        } else if name == "cast" {
            let to = self.dtype()?;
            Expr::Cast(to, sub(self)?)
        } else if name == "where" {
            Expr::Where(sub(self)?, sub(self)?, sub(self)?)
        } else if let Some(u) = UnaryOp::ALL.into_iter().find(|u| u.name() == name) {
            Expr::Unary(u, sub(self)?)
        } else if let Some(b) = BinaryOp::ALL.into_iter().find(|b| b.name() == name) {
            Expr::Binary(b, sub(self)?, sub(self)?)
        } else if let Some(c) = CmpOp::ALL.into_iter().find(|c| c.name() == name) {
            Expr::Compare(c, sub(self)?, sub(self)?)
        } else {
            return Self::err(at, format!("unknown elementwise op '{name}'"));
        };
        let (at, close) = self.next("')'")?;
        if close != ")" {
            return Self::err(at, format!("expected ')', found '{close}'"));
        }
        Ok(e)
    }
}

impl FromStr for Expr {
    type Err = ExprError;

    /// Parses the s-expression form (see the module documentation).
    fn from_str(s: &str) -> Result<Self, ExprError> {
        let mut r = Reader::new(s);
        let e = r.expr(0)?;
        match r.toks.get(r.pos) {
            Some(&(at, t)) => Reader::err(at, format!("unexpected '{t}' after the expression")),
            None => Ok(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prints_and_parses() {
        for s in [
            "(mul (silu $0) $1)",
            "$3",
            "(where (lt $0 (const f32 0.5)) (cast f32 $1) (const f32 -inf))",
            "(add (const i64 -9223372036854775808) (neg $0))",
            "(and (const bool true) (not $1))",
            "(mul $0 (const bf16 nan))",
        ] {
            let e: Expr = s.parse().unwrap();
            assert_eq!(e.to_string(), s);
        }
        for bad in [
            "",
            "$",
            "$-1",
            "(",
            "(mul $0)",
            "(mul $0 $1",
            "(foo $0)",
            "$0 $1",
            "(const u8 300)",
            "(const f32 x)",
            "(cast q $0)",
            ")",
        ] {
            assert!(bad.parse::<Expr>().is_err(), "{bad}");
        }
        let deep = "(neg ".repeat(MAX_DEPTH + 1) + "$0" + &")".repeat(MAX_DEPTH + 1);
        assert!(deep.parse::<Expr>().is_err());
    }

    #[test]
    fn dtypes_follow_the_primitive_ops() {
        let e: Expr = "(where (lt $0 $1) (cast f16 $0) $2)".parse().unwrap();
        assert_eq!(
            e.dtype(&[DType::F32, DType::F32, DType::F16]),
            Ok(DType::F16)
        );
        assert!(e.dtype(&[DType::F32, DType::F16, DType::F16]).is_err());
        assert!(e.dtype(&[DType::F32, DType::F32]).is_err());
        assert_eq!(e.size(), 7);
    }
}
