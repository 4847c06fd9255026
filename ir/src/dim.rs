//! Symbolic dimensions: polynomials with integer coefficients over named size symbols
//! (`batch`, `seq`, `past`, ...), such as `past+seq` or `batch*seq`, bound to numbers at run time.

use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::fmt;

/// One term of a [`Dim`]: `coeff * sym1 * sym2 * ...` (symbols sorted, repeats allowed).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Term {
    /// The integer coefficient (never zero in a normalized [`Dim`]).
    pub coeff: i64,
    /// The symbols multiplied together, sorted; empty for the constant term.
    pub syms: Vec<String>,
}

/// A tensor dimension (or a size-valued attribute such as a slice bound): a polynomial over
/// size symbols with integer coefficients, kept in a canonical form so that equal
/// expressions compare equal (`seq+past == past+seq`). Arithmetic saturates at the i64 range
/// rather than overflow (no real tensor comes near it; hostile graphs must not panic).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "Vec<Term>", into = "Vec<Term>")]
pub struct Dim {
    terms: Vec<Term>,
}

/// Values bound to size symbols, e.g. `{batch: 2, seq: 7}`.
pub type Bindings = HashMap<String, i64>;

/// Why a dim could not be evaluated or built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DimError {
    /// A symbol had no value bound.
    #[error("size symbol `{0}` is not bound")]
    Unbound(String),
    /// Arithmetic overflowed i64.
    #[error("dimension `{0}` overflows")]
    Overflow(String),
    /// A serialized dim was not in canonical form.
    #[error("dimension terms are not canonical: {0}")]
    NotCanonical(String),
}

impl Dim {
    /// A fixed size.
    pub fn fixed(n: i64) -> Dim {
        Dim::from_map(BTreeMap::from([(Vec::new(), n)]))
    }

    /// A size symbol such as `seq`.
    pub fn sym(name: &str) -> Dim {
        Dim::from_map(BTreeMap::from([(vec![name.to_string()], 1)]))
    }

    fn from_map(map: BTreeMap<Vec<String>, i64>) -> Dim {
        let terms = map
            .into_iter()
            .filter(|(_, c)| *c != 0)
            .map(|(syms, coeff)| Term { coeff, syms })
            .collect();
        Dim { terms }
    }

    fn to_map(&self) -> BTreeMap<Vec<String>, i64> {
        self.terms
            .iter()
            .map(|t| (t.syms.clone(), t.coeff))
            .collect()
    }

    /// The terms in canonical order (constant first, then by symbols).
    pub fn terms(&self) -> &[Term] {
        &self.terms
    }

    /// The value if the dim has no symbols.
    pub fn as_fixed(&self) -> Option<i64> {
        match self.terms.as_slice() {
            [] => Some(0),
            [t] if t.syms.is_empty() => Some(t.coeff),
            _ => None,
        }
    }

    /// True when the dim has no symbols.
    pub fn is_fixed(&self) -> bool {
        self.as_fixed().is_some()
    }

    /// The symbol name if the dim is exactly one symbol with coefficient 1.
    pub fn as_sym(&self) -> Option<&str> {
        match self.terms.as_slice() {
            [t] if t.coeff == 1 && t.syms.len() == 1 => Some(&t.syms[0]),
            _ => None,
        }
    }

    /// Every symbol the dim mentions.
    pub fn symbols(&self) -> impl Iterator<Item = &str> {
        self.terms
            .iter()
            .flat_map(|t| t.syms.iter().map(String::as_str))
    }

    /// Evaluates the dim with the given bindings.
    pub fn eval(&self, env: &Bindings) -> Result<i64, DimError> {
        let overflow = || DimError::Overflow(self.to_string());
        let mut total: i64 = 0;
        for t in &self.terms {
            let mut v = t.coeff;
            for s in &t.syms {
                let x = *env.get(s).ok_or_else(|| DimError::Unbound(s.clone()))?;
                v = v.checked_mul(x).ok_or_else(overflow)?;
            }
            total = total.checked_add(v).ok_or_else(overflow)?;
        }
        Ok(total)
    }

    /// Exact division by a fixed positive integer, if every coefficient is divisible.
    pub fn div_exact(&self, d: i64) -> Option<Dim> {
        if d <= 0 || self.terms.iter().any(|t| t.coeff % d != 0) {
            return None;
        }
        Some(Dim {
            terms: self
                .terms
                .iter()
                .map(|t| Term {
                    coeff: t.coeff / d,
                    syms: t.syms.clone(),
                })
                .collect(),
        })
    }

    /// Exact division by another dim when the divisor is a single term dividing every term
    /// (e.g. `batch*seq*64 / seq = batch*64`).
    pub fn div_dim(&self, d: &Dim) -> Option<Dim> {
        let [div] = d.terms.as_slice() else {
            return None;
        };
        if div.coeff <= 0 {
            return None;
        }
        let mut out = BTreeMap::new();
        for t in &self.terms {
            if t.coeff % div.coeff != 0 {
                return None;
            }
            let mut syms = t.syms.clone();
            for s in &div.syms {
                let pos = syms.iter().position(|x| x == s)?;
                syms.remove(pos);
            }
            *out.entry(syms).or_insert(0) += t.coeff / div.coeff;
        }
        Some(Dim::from_map(out))
    }
}

impl Default for Dim {
    fn default() -> Self {
        Dim::fixed(0)
    }
}

impl From<i64> for Dim {
    fn from(n: i64) -> Self {
        Dim::fixed(n)
    }
}

impl From<i32> for Dim {
    fn from(n: i32) -> Self {
        Dim::fixed(n.into())
    }
}

impl From<usize> for Dim {
    fn from(n: usize) -> Self {
        Dim::fixed(n as i64)
    }
}

impl From<&str> for Dim {
    fn from(s: &str) -> Self {
        Dim::sym(s)
    }
}

impl TryFrom<Vec<Term>> for Dim {
    type Error = DimError;
    fn try_from(terms: Vec<Term>) -> Result<Self, DimError> {
        let mut map = BTreeMap::new();
        for t in &terms {
            let mut syms = t.syms.clone();
            syms.sort();
            *map.entry(syms).or_insert(0i64) += t.coeff;
        }
        let dim = Dim::from_map(map);
        if dim.terms != terms {
            return Err(DimError::NotCanonical(format!("{terms:?}")));
        }
        Ok(dim)
    }
}

impl From<Dim> for Vec<Term> {
    fn from(d: Dim) -> Self {
        d.terms
    }
}

impl std::ops::Add for &Dim {
    type Output = Dim;
    fn add(self, rhs: &Dim) -> Dim {
        let mut map = self.to_map();
        for t in &rhs.terms {
            let c = map.entry(t.syms.clone()).or_insert(0i64);
            *c = c.saturating_add(t.coeff);
        }
        Dim::from_map(map)
    }
}

impl std::ops::Sub for &Dim {
    type Output = Dim;
    fn sub(self, rhs: &Dim) -> Dim {
        let mut map = self.to_map();
        for t in &rhs.terms {
            let c = map.entry(t.syms.clone()).or_insert(0i64);
            *c = c.saturating_sub(t.coeff);
        }
        Dim::from_map(map)
    }
}

impl std::ops::Mul for &Dim {
    type Output = Dim;
    fn mul(self, rhs: &Dim) -> Dim {
        let mut map = BTreeMap::new();
        for a in &self.terms {
            for b in &rhs.terms {
                let mut syms: Vec<String> = a.syms.iter().chain(&b.syms).cloned().collect();
                syms.sort();
                let c = map.entry(syms).or_insert(0i64);
                *c = c.saturating_add(a.coeff.saturating_mul(b.coeff));
            }
        }
        Dim::from_map(map)
    }
}

impl std::ops::Add for Dim {
    type Output = Dim;
    fn add(self, rhs: Dim) -> Dim {
        &self + &rhs
    }
}

impl std::ops::Sub for Dim {
    type Output = Dim;
    fn sub(self, rhs: Dim) -> Dim {
        &self - &rhs
    }
}

impl std::ops::Mul for Dim {
    type Output = Dim;
    fn mul(self, rhs: Dim) -> Dim {
        &self * &rhs
    }
}

/// Prints `3`, `seq`, `past+seq`, `2*batch*seq-1`: symbolic terms first, constant last.
impl fmt::Display for Dim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.terms.is_empty() {
            return f.write_str("0");
        }
        let ordered = self
            .terms
            .iter()
            .filter(|t| !t.syms.is_empty())
            .chain(self.terms.iter().filter(|t| t.syms.is_empty()));
        for (i, t) in ordered.enumerate() {
            let mag = t.coeff.unsigned_abs();
            if i == 0 {
                if t.coeff < 0 {
                    f.write_str("-")?;
                }
            } else {
                f.write_str(if t.coeff < 0 { "-" } else { "+" })?;
            }
            if t.syms.is_empty() {
                write!(f, "{mag}")?;
                continue;
            }
            if mag != 1 {
                write!(f, "{mag}*")?;
            }
            f.write_str(&t.syms.join("*"))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_and_printed() {
        let d = &Dim::sym("seq") + &Dim::sym("past");
        assert_eq!(d, &Dim::sym("past") + &Dim::sym("seq"));
        assert_eq!(d.to_string(), "past+seq");
        let bs = &Dim::sym("seq") * &Dim::sym("batch");
        assert_eq!(bs.to_string(), "batch*seq");
        let e = &(&bs * &Dim::fixed(2)) - &Dim::fixed(1);
        assert_eq!(e.to_string(), "2*batch*seq-1");
        assert_eq!((&Dim::fixed(0) - &Dim::sym("k")).to_string(), "-k");
        assert_eq!(Dim::fixed(0).to_string(), "0");
        assert_eq!((&Dim::sym("s") - &Dim::sym("s")).as_fixed(), Some(0));
    }

    #[test]
    fn eval_and_errors() {
        let d = &(&Dim::sym("past") + &Dim::sym("seq")) + &Dim::fixed(3);
        let env = Bindings::from([("past".to_string(), 5), ("seq".to_string(), 2)]);
        assert_eq!(d.eval(&env), Ok(10));
        assert_eq!(
            Dim::sym("batch").eval(&env),
            Err(DimError::Unbound("batch".into()))
        );
        let big = &Dim::sym("past") * &Dim::fixed(i64::MAX);
        assert!(matches!(big.eval(&env), Err(DimError::Overflow(_))));
    }

    #[test]
    fn division() {
        let bs64 = &(&Dim::sym("batch") * &Dim::sym("seq")) * &Dim::fixed(64);
        assert_eq!(
            bs64.div_dim(&Dim::sym("seq")).unwrap().to_string(),
            "64*batch"
        );
        assert_eq!(bs64.div_exact(32).unwrap().to_string(), "2*batch*seq");
        assert!(bs64.div_exact(128).is_none());
        assert!(bs64.div_dim(&Dim::sym("past")).is_none());
    }

    #[test]
    fn serde_rejects_non_canonical() {
        let bad = vec![
            Term {
                coeff: 1,
                syms: vec!["seq".into()],
            },
            Term {
                coeff: 2,
                syms: vec![],
            },
        ];
        assert!(Dim::try_from(bad).is_err());
    }
}
