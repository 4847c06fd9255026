//! The parser of the text format: a per-line lexer and a recursive-descent parser that builds
//! the graph node by node (renumbering values by definition order), then runs the verifier.
//! It never panics: every error is a [`ParseError`] naming the line and column.

use super::{fields, templates, Field, LATER_ATTRIBUTES};
use crate::{dtype::UnknownDType, VerifyError};
use crate::{verify, DType, Dim, Graph, Literal, Node, Op, Scalar, Shape, TensorType, ValueId};
use std::collections::{BTreeMap, HashMap};

/// The largest sum of absolute coefficients a parsed dim may have.
const MAX_DIM: i128 = 1 << 40;
/// The most terms the element count of a parsed shape may have when multiplied out.
const MAX_NUMEL_TERMS: usize = 1 << 12;

/// Why text could not be read as a graph.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// Malformed text, at a 1-based line and column (counted in characters).
    #[error("line {line}, column {col}: {message}")]
    Syntax {
        /// Line of the offending token.
        line: usize,
        /// Column of the offending token.
        col: usize,
        /// What was expected and what was found.
        message: String,
    },
    /// The text describes a graph that the verifier rejects.
    #[error(transparent)]
    Invalid(#[from] VerifyError),
}

/// Parses a graph in the text format (see [`crate::text`]) and verifies it.
pub fn parse(src: &str) -> Result<Graph, ParseError> {
    let mut g = Graph::new();
    // Source name -> (value, line of definition).
    let mut names = HashMap::new();
    for (i, text) in src.split('\n').enumerate() {
        lex(text, i + 1)?.line(&mut g, &mut names)?;
    }
    verify(&g)?;
    Ok(g)
}

impl std::str::FromStr for Graph {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, ParseError> {
        parse(s)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// `[A-Za-z_][A-Za-z0-9_]*`: mnemonics, dtypes, size symbols, keywords.
    Ident,
    /// `%name`; the text is the name without `%`.
    Value,
    /// Digits with an optional fraction and exponent.
    Number,
    /// A string; the text is its decoded content.
    Str,
    Punct(char),
    End,
}

#[derive(Debug, Clone)]
struct Tok {
    kind: Kind,
    text: String,
    col: usize,
}

impl Tok {
    fn is(&self, c: char) -> bool {
        self.kind == Kind::Punct(c)
    }

    fn is_int(&self) -> bool {
        self.kind == Kind::Number && self.text.bytes().all(|b| b.is_ascii_digit())
    }

    fn describe(&self) -> String {
        match self.kind {
            Kind::End => "end of line".into(),
            Kind::Str => format!("string {:?}", self.text),
            Kind::Value => format!("'%{}'", self.text),
            _ => format!("'{}'", self.text),
        }
    }
}

fn is_ident_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

fn skip(cs: &[char], mut i: usize, pred: impl Fn(char) -> bool) -> usize {
    while cs.get(i).is_some_and(|&c| pred(c)) {
        i += 1;
    }
    i
}

fn collect(cs: &[char], from: usize, to: usize) -> String {
    cs.get(from..to).unwrap_or_default().iter().collect()
}

/// Splits one line into tokens, dropping spaces and a trailing `#` comment.
fn lex(text: &str, line: usize) -> Result<Cursor, ParseError> {
    let cs: Vec<char> = text.chars().collect();
    let err = |col: usize, message: String| ParseError::Syntax { line, col, message };
    let mut toks = Vec::new();
    let mut i = 0;
    while let Some(&c) = cs.get(i) {
        let start = i;
        let kind = match c {
            ' ' | '\t' | '\r' => {
                i += 1;
                continue;
            }
            '#' => break,
            '"' => {
                let (s, next) = lex_string(&cs, i).map_err(|(col, m)| err(col, m))?;
                toks.push(Tok {
                    kind: Kind::Str,
                    text: s,
                    col: start + 1,
                });
                i = next;
                continue;
            }
            '%' => {
                i = skip(&cs, i + 1, is_ident_char);
                let name = collect(&cs, start + 1, i);
                let numeric = name.starts_with(|c: char| c.is_ascii_digit());
                if name.is_empty() || (numeric && !name.bytes().all(|b| b.is_ascii_digit())) {
                    return Err(err(
                        start + 1,
                        format!("bad value name '%{name}' (expected %identifier or %number)"),
                    ));
                }
                toks.push(Tok {
                    kind: Kind::Value,
                    text: name,
                    col: start + 1,
                });
                continue;
            }
            '0'..='9' => {
                i = skip(&cs, i, |c| c.is_ascii_digit());
                if cs.get(i) == Some(&'.') && cs.get(i + 1).is_some_and(char::is_ascii_digit) {
                    i = skip(&cs, i + 1, |c| c.is_ascii_digit());
                }
                if matches!(cs.get(i), Some('e' | 'E')) {
                    let j = i + usize::from(matches!(cs.get(i + 1), Some('+' | '-'))) + 1;
                    if cs.get(j).is_some_and(char::is_ascii_digit) {
                        i = skip(&cs, j, |c| c.is_ascii_digit());
                    }
                }
                Kind::Number
            }
            c if c.is_ascii_alphabetic() || c == '_' => {
                i = skip(&cs, i, is_ident_char);
                Kind::Ident
            }
            ':' | '=' | '(' | ')' | '[' | ']' | ',' | '+' | '-' | '*' => {
                i += 1;
                Kind::Punct(c)
            }
            c => return Err(err(start + 1, format!("unexpected character {c:?}"))),
        };
        toks.push(Tok {
            kind,
            text: collect(&cs, start, i),
            col: start + 1,
        });
    }
    let end = Tok {
        kind: Kind::End,
        text: String::new(),
        col: i + 1,
    };
    Ok(Cursor {
        toks,
        pos: 0,
        end,
        line,
    })
}

/// Reads the string starting at the quote `cs[open]`; returns its content and the index after
/// the closing quote, or the column and message of an error.
fn lex_string(cs: &[char], open: usize) -> Result<(String, usize), (usize, String)> {
    let mut s = String::new();
    let mut i = open + 1;
    loop {
        let c = match cs.get(i) {
            None => return Err((open + 1, "unterminated string".into())),
            Some('"') => return Ok((s, i + 1)),
            Some('\\') => match cs.get(i + 1) {
                Some('"') => '"',
                Some('\\') => '\\',
                Some('n') => '\n',
                Some('t') => '\t',
                Some('u') if cs.get(i + 2) == Some(&'{') => {
                    let end = skip(cs, i + 3, |c| c.is_ascii_hexdigit());
                    let hex = collect(cs, i + 3, end);
                    let c = u32::from_str_radix(&hex, 16).ok().and_then(char::from_u32);
                    match c {
                        Some(c) if cs.get(end) == Some(&'}') && hex.len() <= 6 => {
                            i = end - 1;
                            c
                        }
                        _ => return Err((i + 1, "bad unicode escape (expected \\u{hex})".into())),
                    }
                }
                None => return Err((open + 1, "unterminated string".into())),
                Some(&e) => {
                    return Err((
                        i + 1,
                        format!(
                            "unknown escape '\\{e}' (expected \\\" \\\\ \\n \\t or \\u{{hex}})"
                        ),
                    ))
                }
            },
            Some(&c) => {
                s.push(c);
                i += 1;
                continue;
            }
        };
        s.push(c);
        i += 2;
    }
}

/// The tokens of one line and the parsing functions for its grammar.
struct Cursor {
    toks: Vec<Tok>,
    pos: usize,
    end: Tok,
    line: usize,
}

type Names = HashMap<String, (ValueId, usize)>;

impl Cursor {
    fn peek(&self) -> &Tok {
        self.toks.get(self.pos).unwrap_or(&self.end)
    }

    fn next(&mut self) -> Tok {
        let t = self.peek().clone();
        self.pos = (self.pos + 1).min(self.toks.len());
        t
    }

    fn eat(&mut self, c: char) -> bool {
        let hit = self.peek().is(c);
        if hit {
            self.next();
        }
        hit
    }

    fn error(&self, col: usize, message: String) -> ParseError {
        ParseError::Syntax {
            line: self.line,
            col,
            message,
        }
    }

    fn unexpected(&self, t: &Tok, what: &str) -> ParseError {
        self.error(t.col, format!("expected {what}, found {}", t.describe()))
    }

    fn expected(&self, what: &str) -> ParseError {
        self.unexpected(self.peek(), what)
    }

    fn expect(&mut self, c: char, what: &str) -> Result<(), ParseError> {
        if self.eat(c) {
            Ok(())
        } else {
            Err(self.expected(what))
        }
    }

    fn expect_end(&self, what: &str) -> Result<(), ParseError> {
        match self.peek().kind {
            Kind::End => Ok(()),
            _ => Err(self.expected(what)),
        }
    }

    /// `def | output | (empty)`
    fn line(&mut self, g: &mut Graph, names: &mut Names) -> Result<(), ParseError> {
        let t = self.next();
        match t.kind {
            Kind::End => Ok(()),
            Kind::Value => self.def(t, g, names),
            Kind::Ident if t.text == "output" => {
                let name = self.string("the output's name (a string)")?;
                self.expect('=', "'=' after the output's name")?;
                let value = self.value_ref(names)?;
                g.add_output(&name, value);
                self.expect_end("end of line")
            }
            _ => Err(self.unexpected(&t, "a definition '%name: type = op' or 'output'")),
        }
    }

    /// `VALUE ':' type '=' opexpr`, the value token already read.
    fn def(&mut self, name: Tok, g: &mut Graph, names: &mut Names) -> Result<(), ParseError> {
        if let Some((_, line)) = names.get(&name.text) {
            let msg = format!(
                "redefinition of %{} (first defined on line {line})",
                name.text
            );
            return Err(self.error(name.col, msg));
        }
        self.expect(
            ':',
            &format!("':' and the result type after %{}", name.text),
        )?;
        let ty_col = self.peek().col;
        let ty = self.ty()?;
        self.expect('=', "'=' after the result type")?;
        let mnemonic = self.next();
        if mnemonic.kind != Kind::Ident {
            return Err(self.unexpected(&mnemonic, "an op name"));
        }
        let mut inputs = vec![];
        let op = match mnemonic.text.as_str() {
            "input" => Op::Input {
                name: self.string("the input's name (a string)")?,
            },
            "param" => Op::Param {
                name: self.string("the parameter's name (a string)")?,
            },
            "const" => Op::Const {
                value: self.literal(&ty, ty_col)?,
            },
            m => {
                let Some(mut op) = templates().into_iter().find(|t| t.name() == m) else {
                    return Err(self.error(mnemonic.col, format!("unknown op '{m}'")));
                };
                if self.eat('(') {
                    inputs = self.operands(names)?;
                }
                self.attrs(&mut op)?;
                op
            }
        };
        let what = match op {
            Op::Input { .. } | Op::Param { .. } | Op::Const { .. } => "end of line",
            _ => "an attribute (key=value) or end of line",
        };
        self.expect_end(what)?;
        let id = g.push(Node { op, inputs, ty });
        names.insert(name.text, (id, self.line));
        Ok(())
    }

    /// `(VALUE (',' VALUE)*)? ')'`, after the `(`.
    fn operands(&mut self, names: &Names) -> Result<Vec<ValueId>, ParseError> {
        let mut out = vec![];
        if self.eat(')') {
            return Ok(out);
        }
        loop {
            out.push(self.value_ref(names)?);
            if self.eat(')') {
                return Ok(out);
            }
            if !self.eat(',') {
                return Err(self.expected("',' or ')' after operand"));
            }
        }
    }

    fn value_ref(&mut self, names: &Names) -> Result<ValueId, ParseError> {
        let t = self.next();
        if t.kind != Kind::Value {
            return Err(self.unexpected(&t, "a value (%name)"));
        }
        match names.get(&t.text) {
            Some((v, _)) => Ok(*v),
            None => Err(self.error(t.col, format!("unknown value %{}", t.text))),
        }
    }

    /// `(IDENT '=' attr)*`: fills the attributes of `op`, each exactly once, in any order.
    fn attrs(&mut self, op: &mut Op) -> Result<(), ParseError> {
        let name = op.name();
        let mut fs: Vec<_> = fields(op).into_iter().map(|(k, f)| (k, f, false)).collect();
        while self.peek().kind == Kind::Ident {
            let key = self.next();
            let Some((_, field, seen)) = fs.iter_mut().find(|(k, ..)| *k == key.text) else {
                let msg = format!("unexpected attribute `{}` for op {name}", key.text);
                return Err(self.error(key.col, msg));
            };
            if std::mem::replace(seen, true) {
                let msg = format!("duplicate attribute `{}`", key.text);
                return Err(self.error(key.col, msg));
            }
            self.expect('=', &format!("'=' after attribute `{}`", key.text))?;
            self.field(field, &key.text)?;
        }
        let required = |k: &str| !LATER_ATTRIBUTES.contains(&(name, k));
        match fs.iter().find(|(k, _, seen)| !seen && required(k)) {
            Some((k, ..)) => {
                let msg = format!("missing attribute `{k}` for op {name}");
                Err(self.error(self.peek().col, msg))
            }
            None => Ok(()),
        }
    }

    fn field(&mut self, field: &mut Field<'_>, key: &str) -> Result<(), ParseError> {
        let what = format!("`{key}`");
        match field {
            Field::Usize(n) => **n = self.usize(&what)?,
            Field::Axes(axes) => **axes = self.list("axis", |p| p.usize(&what))?,
            Field::Bool(b) => **b = self.bool()?,
            Field::DType(d) => **d = self.dtype()?,
            Field::Shape(s) => **s = self.shape()?,
            Field::Dim(d) => **d = self.dim()?,
            Field::F64(x) => {
                let (text, col) = self.float_text()?;
                **x = text
                    .parse()
                    .map_err(|_| self.error(col, format!("bad number '{text}'")))?;
            }
            Field::Expr(e) => {
                let col = self.peek().col;
                let text = self.string(&format!("a quoted expression for {what}"))?;
                **e = text
                    .parse()
                    .map_err(|err| self.error(col, format!("bad {what}: {err}")))?;
            }
        }
        Ok(())
    }

    fn string(&mut self, what: &str) -> Result<String, ParseError> {
        let t = self.next();
        match t.kind {
            Kind::Str => Ok(t.text),
            _ => Err(self.unexpected(&t, what)),
        }
    }

    fn usize(&mut self, what: &str) -> Result<usize, ParseError> {
        let t = self.next();
        if !t.is_int() {
            return Err(self.unexpected(&t, &format!("a non-negative integer for {what}")));
        }
        t.text
            .parse()
            .map_err(|_| self.error(t.col, format!("number {} is too large", t.text)))
    }

    fn bool(&mut self) -> Result<bool, ParseError> {
        let t = self.next();
        match (t.kind, t.text.as_str()) {
            (Kind::Ident, "true") => Ok(true),
            (Kind::Ident, "false") => Ok(false),
            _ => Err(self.unexpected(&t, "true or false")),
        }
    }

    fn dtype(&mut self) -> Result<DType, ParseError> {
        let t = self.next();
        if t.kind != Kind::Ident {
            return Err(self.unexpected(&t, "a dtype"));
        }
        t.text
            .parse()
            .map_err(|e: UnknownDType| self.error(t.col, e.to_string()))
    }

    /// `'-'? NUMBER | '-'? 'inf' | 'nan'`, as text that Rust's float parsers accept.
    fn float_text(&mut self) -> Result<(String, usize), ParseError> {
        let col = self.peek().col;
        let minus = if self.eat('-') { "-" } else { "" };
        let t = self.next();
        match (t.kind, t.text.as_str()) {
            (Kind::Number, _) | (Kind::Ident, "inf") => Ok((format!("{minus}{}", t.text), col)),
            (Kind::Ident, "nan") if minus.is_empty() => Ok(("NaN".into(), col)),
            _ => Err(self.unexpected(&t, "a number")),
        }
    }

    /// `'[' (item (',' item)*)? ']'`
    fn list<T>(
        &mut self,
        what: &str,
        mut item: impl FnMut(&mut Self) -> Result<T, ParseError>,
    ) -> Result<Vec<T>, ParseError> {
        self.expect('[', &format!("'[' to start a list of {what}s"))?;
        let mut out = vec![];
        if self.eat(']') {
            return Ok(out);
        }
        loop {
            out.push(item(self)?);
            if self.eat(']') {
                return Ok(out);
            }
            if !self.eat(',') {
                return Err(self.expected(&format!("',' or ']' after {what}")));
            }
        }
    }

    /// `DTYPE shape`
    fn ty(&mut self) -> Result<TensorType, ParseError> {
        let dtype = self.dtype()?;
        let shape = self.shape()?;
        Ok(TensorType { dtype, shape })
    }

    /// `'[' (dim (',' dim)*)? ']'`. Multiplied out, its element count must have coefficients
    /// that fit in an i64 and at most [`MAX_NUMEL_TERMS`] terms.
    fn shape(&mut self) -> Result<Shape, ParseError> {
        let col = self.peek().col;
        let shape = self.list("dimension", Self::dim)?;
        let (mut coeffs, mut terms) = (Some(1i64), Some(1usize));
        for d in &shape {
            let ts = d.terms();
            let m = ts
                .iter()
                .fold(0i64, |m, t| m.saturating_add(t.coeff.saturating_abs()));
            coeffs = coeffs.and_then(|c| c.checked_mul(m.max(1)));
            terms = terms
                .and_then(|n| n.checked_mul(ts.len().max(1)))
                .filter(|&n| n <= MAX_NUMEL_TERMS);
        }
        if coeffs.is_none() {
            let msg = "shape too large: its element count overflows i64";
            return Err(self.error(col, msg.into()));
        }
        if terms.is_none() {
            let msg =
                format!("shape too complex: its element count has over {MAX_NUMEL_TERMS} terms");
            return Err(self.error(col, msg));
        }
        Ok(shape)
    }

    /// `'-'? term (('+' | '-') term)*` with `term := factor ('*' factor)*`.
    fn dim(&mut self) -> Result<Dim, ParseError> {
        let col = self.peek().col;
        let too_large = |p: &Self| {
            p.error(
                col,
                "dimension too large (coefficients may total at most 2^40)".into(),
            )
        };
        let mut terms: BTreeMap<Vec<String>, i128> = BTreeMap::new();
        let mut sign: i128 = if self.eat('-') { -1 } else { 1 };
        loop {
            let mut coeff = sign;
            let mut syms = vec![];
            loop {
                let t = self.next();
                match t.kind {
                    Kind::Ident => syms.push(t.text),
                    _ if t.is_int() => {
                        let n: i128 = t.text.parse().unwrap_or(i128::MAX);
                        coeff = coeff.saturating_mul(n);
                        if coeff.abs() > MAX_DIM {
                            return Err(too_large(self));
                        }
                    }
                    _ => return Err(self.unexpected(&t, "a dimension (integer or size symbol)")),
                }
                if !self.eat('*') {
                    break;
                }
            }
            syms.sort();
            let c = terms.entry(syms).or_insert(0);
            *c = c.saturating_add(coeff);
            sign = if self.eat('+') {
                1
            } else if self.eat('-') {
                -1
            } else {
                break;
            };
        }
        let total = terms.values().fold(0i128, |m, c| m.saturating_add(c.abs()));
        if total > MAX_DIM {
            return Err(too_large(self));
        }
        let mut dim = Dim::fixed(0);
        for (syms, c) in terms {
            let c = i64::try_from(c).map_err(|_| too_large(self))?;
            let term = syms.iter().fold(Dim::fixed(c), |d, s| &d * &Dim::sym(s));
            dim = &dim + &term;
        }
        Ok(dim)
    }

    /// A constant of type `ty` (declared at column `ty_col`): a scalar, or lists nested by
    /// the shape. Iterative, so that deep nesting cannot overflow the stack.
    fn literal(&mut self, ty: &TensorType, ty_col: usize) -> Result<Literal, ParseError> {
        let shape: Option<Vec<usize>> = ty
            .shape
            .iter()
            .map(|d| d.as_fixed().and_then(|n| usize::try_from(n).ok()))
            .collect();
        let Some(shape) = shape else {
            let msg = format!("a constant needs a fixed, non-negative shape, found {ty}");
            return Err(self.error(ty_col, msg));
        };
        let mut values = vec![];
        if shape.is_empty() {
            values.push(self.scalar(ty.dtype)?);
        } else {
            // Element counts of the open lists, outermost first.
            let mut open: Vec<usize> = vec![];
            let mut want_item = true;
            loop {
                if want_item {
                    if open.len() < shape.len() {
                        self.expect('[', "'[' to start a list of the constant")?;
                        open.push(0);
                        want_item = !self.peek().is(']');
                        continue;
                    }
                    values.push(self.scalar(ty.dtype)?);
                    if let Some(n) = open.last_mut() {
                        *n += 1;
                    }
                }
                let t = self.next();
                if t.is(',') {
                    want_item = true;
                    continue;
                }
                if !t.is(']') {
                    return Err(self.unexpected(&t, "',' or ']' in the constant"));
                }
                want_item = false;
                let n = open.pop().unwrap_or(0);
                let axis = open.len();
                let want = shape.get(axis).copied().unwrap_or(0);
                if n != want {
                    let msg =
                        format!("expected {want} elements along axis {axis} of {ty}, found {n}");
                    return Err(self.error(t.col, msg));
                }
                match open.last_mut() {
                    Some(n) => *n += 1,
                    None => break,
                }
            }
        }
        Literal::from_scalars(ty.dtype, shape, &values)
            .map_err(|e| self.error(ty_col, e.to_string()))
    }

    /// One element of a constant of `dtype`.
    fn scalar(&mut self, dtype: DType) -> Result<Scalar, ParseError> {
        if dtype.is_float() {
            let (text, col) = self.float_text()?;
            let x: f32 = text
                .parse()
                .map_err(|_| self.error(col, format!("bad number '{text}'")))?;
            return Ok(Scalar::Float(if x.is_nan() { f64::NAN } else { x.into() }));
        }
        if dtype == DType::Bool {
            return self.bool().map(Scalar::Bool);
        }
        let col = self.peek().col;
        let minus = if self.eat('-') { "-" } else { "" };
        let t = self.next();
        if !t.is_int() {
            return Err(self.unexpected(&t, &format!("an integer for a {dtype} constant")));
        }
        let (lo, hi) = match dtype {
            DType::I32 => (i32::MIN.into(), i32::MAX.into()),
            DType::U8 => (0, 255),
            _ => (i64::MIN, i64::MAX),
        };
        let text = format!("{minus}{}", t.text);
        match text.parse::<i64>() {
            Ok(v) if (lo..=hi).contains(&v) => Ok(Scalar::Int(v)),
            _ => Err(self.error(col, format!("{text} is out of range for {dtype}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::text::print;
    use crate::F64;

    const EXAMPLE: &str = r#"
# the module example, with operands that verify
%0: i64[batch, seq] = input "input_ids"
%1: f32[1000, 64] = param "embed.weight"
%2: f32[batch, seq, 64] = gather(%1, %0) axis=0
%3: f32[] = const 0.125
%4: f32[2, 2] = const [[1.0, 2.5], [-0.0, inf]]
%5: f32[batch, seq, 64] = mul(%2, %3)
%6: f32[batch, seq, 1] = reduce_mean(%5) axes=[2] keepdim=true
%mask: f32[seq, past+seq] = param "mask"
%7: f32[seq, past+seq] = triu(%mask) diagonal=past+1
%8: f32[batch, seq, 32] = slice(%5) axis=2 start=0 end=32
%q: f32[batch, 4, seq, 16] = param "q"
%k: f32[batch, 2, past+seq, 16] = param "k"
%v: f32[batch, 2, past+seq, 16] = param "v"
%9: f32[batch, 4, seq, 16] = attention(%q, %k, %v, %7) scale=0.25 causal=true window=0 merge_heads=false
output "hidden" = %5
"#;

    /// Lines as kiln wrote them before `linear` had `heads`/`rotary` and `attention` had
    /// `merge_heads` (artifacts compiled then) parse with the earlier meaning; the other
    /// attributes stay required.
    #[test]
    fn attributes_added_later_may_be_absent() {
        let old = "%x: f32[2, 3, 8] = input \"x\"\n\
                   %w: f32[8, 8] = param \"w\"\n\
                   %y: f32[2, 3, 8] = linear(%x, %w) transpose_b=true scaled=false added=false\n\
                   %q: f32[2, 4, 3, 16] = input \"q\"\n\
                   %m: f32[2, 1, 3, 3] = input \"m\"\n\
                   %a: f32[2, 4, 3, 16] = attention(%q, %q, %q, %m) scale=0.25 causal=true window=0\n\
                   output \"y\" = %y\noutput \"a\" = %a\n";
        let g = parse(old).unwrap();
        let ops: Vec<&Op> = g.nodes().iter().map(|n| &n.op).collect();
        assert!(ops.contains(&&Op::Linear {
            transpose_b: true,
            scaled: false,
            added: false,
            heads: 0,
            rotary: false
        }));
        assert!(ops.contains(&&Op::Attention {
            scale: F64(0.25),
            causal: true,
            window: 0,
            merge_heads: false
        }));
        let err = parse(&old.replace(" window=0", ""))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("missing attribute `window` for op attention"),
            "{err}"
        );
    }

    /// The first line of the sources of the errors on line 2 below.
    const X: &str = "%0: f32[2] = input \"x\"\n";

    /// `(source, line, column, message fragment)`; sources of line-2 errors follow [`X`].
    #[rustfmt::skip]
    const ERRORS: &[(&str, usize, usize, &str)] = &[
        // Operands and value names.
        ("%1: f32[2] = add(%0 x)", 2, 21, "expected ',' or ')' after operand, found 'x'"),
        ("%1: f32[2] = add(%0,", 2, 21, "expected a value (%name), found end of line"),
        ("%1: f32[2] = exp(%7)", 2, 18, "unknown value %7"),
        ("%1: f32[2] = exp(%1)", 1, 18, "unknown value %1"),
        ("%0: f32[2] = exp(%0)", 2, 1, "redefinition of %0 (first defined on line 1)"),
        ("%1a: f32[2] = input \"x\"", 1, 1, "bad value name '%1a'"),
        ("%é: f32[2] = exp(%0)", 2, 1, "bad value name '%'"),
        ("f32[2] = input \"x\"", 1, 1, "expected a definition '%name: type = op' or 'output', found 'f32'"),
        // Ops and types.
        ("%1: f32[2] = matmull(%0, %0)", 2, 14, "unknown op 'matmull'"),
        ("%1: f32[2] = (%0)", 2, 14, "expected an op name, found '('"),
        ("%0: f64[2] = input \"x\"", 1, 5, "unknown dtype `f64`"),
        ("%0 = input \"x\"", 1, 4, "expected ':' and the result type after %0, found '='"),
        ("%0: = input \"x\"", 1, 5, "expected a dtype, found '='"),
        ("%0: f32 = input \"x\"", 1, 9, "expected '[' to start a list of dimensions, found '='"),
        ("%0: f32[2, ] = input \"x\"", 1, 12, "expected a dimension (integer or size symbol), found ']'"),
        ("%0: f32[2 3] = input \"x\"", 1, 11, "expected ',' or ']' after dimension, found '3'"),
        ("%0: f32[2] input \"x\"", 1, 12, "expected '=' after the result type, found 'input'"),
        ("%0: f32[2] = input x", 1, 20, "expected the input's name (a string), found 'x'"),
        ("%0: f32[2] = input \"x\" \"y\"", 1, 24, "expected end of line, found string \"y\""),
        ("%1: f32[2] = exp(%0),", 2, 21, "expected an attribute (key=value) or end of line, found ','"),
        // Attributes.
        ("%1: f32[2] = exp(%0) extra", 2, 22, "unexpected attribute `extra` for op exp"),
        ("%1: f32[2] = reshape(%0) foo=1", 2, 26, "unexpected attribute `foo` for op reshape"),
        ("%1: f32[2] = softmax(%0)", 2, 25, "missing attribute `axis` for op softmax"),
        ("%1: f32[2] = softmax(%0) # none", 2, 26, "missing attribute `axis` for op softmax"),
        ("%1: f32[2] = softmax(%0) axis=0 axis=0", 2, 33, "duplicate attribute `axis`"),
        ("%1: f32[2] = softmax(%0) axis 0", 2, 31, "expected '=' after attribute `axis`, found '0'"),
        ("%1: f32[2] = softmax(%0) axis=1.5", 2, 31, "non-negative integer for `axis`, found '1.5'"),
        ("%1: f32[2] = softmax(%0) axis=-1", 2, 31, "non-negative integer for `axis`, found '-'"),
        ("%1: f32[2] = softmax(%0) axis=99999999999999999999", 2, 31, "99999999999999999999 is too large"),
        ("%1: f32[2] = reduce_sum(%0) axes=[0 1]", 2, 37, "expected ',' or ']' after axis, found '1'"),
        ("%1: f32[2] = cast(%0) to=f64", 2, 26, "unknown dtype `f64`"),
        ("%1: f32[2] = argmax(%0) axis=0 keepdim=yes", 2, 40, "expected true or false, found 'yes'"),
        ("%1: f32[2] = rmsnorm(%0, %0) eps=-nan", 2, 35, "expected a number, found 'nan'"),
        ("%1: f32[2] = rmsnorm(%0, %0) eps=x", 2, 34, "expected a number, found 'x'"),
        // Sizes that later shape arithmetic could overflow on.
        ("%0: f32[1099511627777] = input \"x\"", 1, 9, "dimension too large"),
        ("%0: f32[1099511627776*2] = input \"x\"", 1, 9, "dimension too large"),
        ("%0: f32[s+1099511627776] = input \"x\"", 1, 9, "dimension too large"),
        ("%0: f32[999999999999999999999999999999999999999999] = input \"x\"", 1, 9, "dimension too large"),
        ("%0: f32[1099511627776, 1099511627776] = input \"x\"", 1, 8, "shape too large"),
        // Strings and characters.
        ("%0: f32[2] = input \"x", 1, 20, "unterminated string"),
        ("%0: f32[2] = input \"x\\", 1, 20, "unterminated string"),
        ("%0: f32[2] = input \"a\\qb\"", 1, 22, "unknown escape '\\q'"),
        ("%0: f32[2] = input \"a\\u{d800}\"", 1, 22, "bad unicode escape"),
        ("%0: f32[2] = input \"a\\u{110000}\"", 1, 22, "bad unicode escape"),
        ("%0: f32[2] = input \"a\\u{41\"", 1, 22, "bad unicode escape"),
        ("%0: f32[2] = input 'x'", 1, 20, "unexpected character '\\''"),
        // Constants.
        ("%0: f32[2, 2] = const [[1.0, 2.0], [3.0]]", 1, 40, "expected 2 elements along axis 1 of f32[2, 2], found 1"),
        ("%0: f32[2] = const [1.0, 2.0, 3.0]", 1, 34, "expected 2 elements along axis 0 of f32[2], found 3"),
        ("%0: f32[2] = const [[1.0], [2.0]]", 1, 21, "expected a number, found '['"),
        ("%0: f32[2] = const 1.0", 1, 20, "expected '[' to start a list of the constant, found '1.0'"),
        ("%0: f32[2] = const [1.0 2.0]", 1, 25, "expected ',' or ']' in the constant, found '2.0'"),
        ("%0: f32[seq] = const [1.0]", 1, 5, "a constant needs a fixed, non-negative shape, found f32[seq]"),
        ("%0: u8[] = const 256", 1, 18, "256 is out of range for u8"),
        ("%0: u8[] = const -1", 1, 18, "-1 is out of range for u8"),
        ("%0: i32[] = const -2147483649", 1, 19, "-2147483649 is out of range for i32"),
        ("%0: i64[] = const 9223372036854775808", 1, 19, "9223372036854775808 is out of range for i64"),
        ("%0: i64[] = const 1.0", 1, 19, "expected an integer for a i64 constant, found '1.0'"),
        ("%0: bool[] = const 1", 1, 20, "expected true or false, found '1'"),
        // Outputs.
        ("output \"y\" = %0", 1, 14, "unknown value %0"),
        ("output y = %0", 2, 8, "expected the output's name (a string), found 'y'"),
        ("output \"y\" %0", 2, 12, "expected '=' after the output's name, found '%0'"),
        ("output \"y\" = %0 %0", 2, 17, "expected end of line, found '%0'"),
    ];

    #[test]
    fn syntax_errors_name_line_column_and_tokens() {
        for &(src, line, col, fragment) in ERRORS {
            let src = if line == 2 {
                format!("{X}{src}")
            } else {
                src.to_string()
            };
            match parse(&src) {
                Err(ParseError::Syntax {
                    line: l,
                    col: c,
                    message,
                }) => {
                    assert_eq!((l, c), (line, col), "{src:?}: {message}");
                    assert!(
                        message.contains(fragment),
                        "{src:?}: {message:?} lacks {fragment:?}"
                    );
                }
                other => panic!("expected a syntax error for {src:?}, got {other:?}"),
            }
        }
    }

    #[test]
    fn verifier_errors_are_invalid() {
        let e = parse(&format!("{X}%1: f32[3] = exp(%0)")).unwrap_err();
        assert!(matches!(&e, ParseError::Invalid(v) if v.reason.contains("declared type f32[3]")));
        assert!(
            e.to_string().starts_with("invalid graph at %1 (exp)"),
            "{e}"
        );
        for bad in [
            "%1: f32[2] = softmax(%0) axis=1",
            "output \"y\" = %0\noutput \"y\" = %0",
        ] {
            let e = parse(&format!("{X}{bad}")).unwrap_err();
            assert!(matches!(e, ParseError::Invalid(_)), "{e}");
        }
    }

    #[test]
    fn accepted_edge_cases() {
        // 2^40 is accepted, and so is a big shape whose element count bound fits.
        parse("%0: f32[1099511627776, 8388607] = input \"x\"").unwrap();
        let sums: Vec<String> = (0..13).map(|i| format!("a{i}+b{i}")).collect();
        let src = format!("%0: f32[{}] = input \"x\"", sums.join(", "));
        let Err(ParseError::Syntax {
            col: 8, message, ..
        }) = parse(&src)
        else {
            panic!()
        };
        assert!(message.contains("shape too complex"), "{message}");
        parse(&format!("%0: f32[{}] = input \"x\"", sums[1..].join(", "))).unwrap();
        // Escapes, and Unicode as is.
        let g = parse(r#"%0: f32[2] = input "q\"b\\n\n\t\u{7}\u{1F980}é""#).unwrap();
        assert_eq!(
            g.nodes()[0].op,
            Op::Input {
                name: "q\"b\\n\n\t\u{7}🦀é".into()
            }
        );
        assert!(
            print(&g).contains(r#"input "q\"b\\n\n\t\u{7}🦀é""#),
            "{}",
            print(&g)
        );
        // Integer extremes and empty constants.
        let g = parse("%0: i64[2] = const [-9223372036854775808, 9223372036854775807]").unwrap();
        let Op::Const { value } = &g.nodes()[0].op else {
            panic!()
        };
        assert_eq!(
            value.values(),
            vec![Scalar::Int(i64::MIN), Scalar::Int(i64::MAX)]
        );
        let src =
            "%0: f32[2, 0] = const [[], []]\n%1: f32[0, 2] = const []\n%2: bool[] = const true\n";
        assert_eq!(print(&parse(src).unwrap()), src);
    }

    #[test]
    fn parses_the_example() {
        let g = parse(EXAMPLE).unwrap();
        assert_eq!(g.nodes().len(), 14);
        assert_eq!(g.nodes()[2].op, Op::Gather { axis: 0 });
        let Op::Const { value } = &g.nodes()[4].op else {
            panic!()
        };
        let v: Vec<f64> = value.values().into_iter().map(Scalar::as_f64).collect();
        assert_eq!(v[..2], [1.0, 2.5]);
        assert!(v[2] == 0.0 && v[2].is_sign_negative() && v[3] == f64::INFINITY);
        let past_seq = &Dim::sym("past") + &Dim::sym("seq");
        assert_eq!(
            g.nodes()[8].op,
            Op::Triangle {
                upper: true,
                diagonal: &Dim::sym("past") + &Dim::fixed(1)
            }
        );
        assert_eq!(g.nodes()[7].ty.shape, vec![Dim::sym("seq"), past_seq]);
        assert_eq!(g.outputs()[0].value, ValueId(5));
        // Renumbered by definition order: %mask is %7, the example's %7 is %8.
        let text = print(&g);
        assert!(
            text.contains("%8: f32[seq, past+seq] = triu(%7) diagonal=past+1\n"),
            "{text}"
        );
        assert!(text.contains("= attention(%10, %11, %12, %8) scale=0.25 causal=true window=0"));
        assert!(text.contains("= const [[1.0, 2.5], [-0.0, inf]]\n"));
        assert_eq!(parse(&text), Ok(g.clone()));
        assert_eq!(text.parse::<Graph>(), Ok(g.clone()));
        assert_eq!(g.to_string(), text);
    }

    #[test]
    fn dims_parse_their_printed_form() {
        let src =
            "%a: f32[2*batch*seq-1, past+seq, 3, seq*2, 0, batch*seq - batch*seq] = param \"w\"\n\
                   %b: f32[2*batch*seq-1, past+seq, 3, seq*2, 0, 0] = tril(%a) diagonal=-k\n";
        let g = parse(src).unwrap();
        let text = print(&g);
        assert!(
            text.starts_with("%0: f32[2*batch*seq-1, past+seq, 3, 2*seq, 0, 0] = param \"w\"\n")
        );
        assert!(text.contains("tril(%0) diagonal=-k\n"), "{text}");
        assert_eq!(parse(&text), Ok(g));
    }

    #[test]
    fn comments_blank_lines_crlf_and_attribute_order() {
        let src = "  # header\r\n\r\n%x: f32[2, 3] = input \"x\" # trailing\r\n\
                   %y: f32[2, 1] = reduce_sum(%x) keepdim=true axes=[1]\r\noutput \"y\" = %y\r\n";
        let g = parse(src).unwrap();
        assert_eq!(
            g.nodes()[1].op,
            Op::Reduce {
                op: crate::ReduceOp::Sum,
                axes: vec![1],
                keepdim: true
            }
        );
        assert_eq!(
            print(&g).lines().nth(1),
            Some("%1: f32[2, 1] = reduce_sum(%0) axes=[1] keepdim=true")
        );
    }

    #[test]
    fn display_of_syntax_errors() {
        let e = parse(&format!("{X}\n%1: f32[2] = add(%0 x)")).unwrap_err();
        assert_eq!(
            e.to_string(),
            "line 3, column 21: expected ',' or ')' after operand, found 'x'"
        );
    }

    #[test]
    fn nan_parses_to_the_canonical_nan_of_each_dtype() {
        let src = "%0: f32[2] = const [nan, -inf]\n%1: f16[] = const nan\n%2: bf16[] = const nan\n\
                   %3: f8e4m3[] = const nan\n%4: f8e5m2[] = const nan";
        let g = parse(src).unwrap();
        let bytes: Vec<&[u8]> = g
            .nodes()
            .iter()
            .map(|n| match &n.op {
                Op::Const { value } => value.bytes(),
                _ => panic!(),
            })
            .collect();
        assert_eq!(bytes[0], [0, 0, 0xc0, 0x7f, 0, 0, 0x80, 0xff]);
        assert_eq!(bytes[1], 0x7e00u16.to_le_bytes());
        assert_eq!(bytes[2], 0x7fc0u16.to_le_bytes());
        assert_eq!(bytes[3..], [[0x7f], [0x7f]]);
        assert_eq!(
            print(&g),
            src.replace("                   ", "").replace("\\\n", "") + "\n"
        );
    }

    #[test]
    fn never_panics_on_mangled_text() {
        let chars: Vec<char> = EXAMPLE.chars().collect();
        for i in 0..chars.len() {
            let prefix: String = chars[..i].iter().collect();
            let _ = parse(&prefix);
            let dropped: String = chars
                .iter()
                .enumerate()
                .filter(|&(j, _)| j != i)
                .map(|(_, c)| c)
                .collect();
            let _ = parse(&dropped);
            for extra in ['[', ']', '-', '9', '"', '%', '*', '\\'] {
                let mut s = chars.clone();
                s.insert(i, extra);
                let _ = parse(&s.iter().collect::<String>());
            }
        }
        // Deep nesting and huge ranks stay iterative.
        let rank = 100_000;
        let src = format!(
            "%0: f32[{}] = const {}1.0{}",
            vec!["1"; rank].join(", "),
            "[".repeat(rank),
            "]".repeat(rank)
        );
        let g = parse(&src).unwrap();
        assert_eq!(print(&g), format!("{src}\n"));
        let _ = parse(&format!(
            "%0: f32[{}] = const {}",
            vec!["1"; rank].join(", "),
            "[".repeat(rank)
        ));
        let _ = parse(&format!(
            "%0: f32[{}] = input \"x\"\n%1: f32[1] = reshape(%0) shape=[1]",
            ["1099511627776"; 3].join("*")
        ));
    }
}
