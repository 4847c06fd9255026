//! Binding size symbols to numbers from the concrete shapes of the supplied inputs and
//! parameters, and evaluating symbolic dims with those bindings.
//!
//! Order: (1) every declared dim that is a single symbol binds it, and two different values for
//! one symbol are a [`ExecError::DimConflict`]; (2) repeatedly, a dim with exactly one unbound
//! symbol that appears linearly (`past+seq` once `seq` is known, `2*n`) is solved for it;
//! (3) every declared dim must then evaluate to the supplied size, else
//! [`ExecError::InputType`] names the input and both types.

use super::ExecError;
use crate::Tensor;
use kiln_ir::{Bindings, DType, Dim, DimError, TensorType, ValueId};
use smallvec::SmallVec;

/// A graph input or parameter with the type of the value supplied for it.
#[derive(Debug, Clone, Copy)]
pub struct Source<'a> {
    /// `"input"` or `"param"`.
    pub kind: &'static str,
    /// The input or parameter name.
    pub name: &'a str,
    /// The defining node.
    pub id: ValueId,
    /// The declared type.
    pub ty: &'a TensorType,
    /// The supplied value's dtype.
    pub dtype: DType,
    /// The supplied value's shape.
    pub shape: &'a [usize],
}

impl Source<'_> {
    fn type_error(&self) -> ExecError {
        ExecError::InputType {
            kind: self.kind,
            name: self.name.to_string(),
            expected: self.ty.to_string(),
            got: TensorType::new(self.dtype, self.shape.iter().map(|&n| n as i64)).to_string(),
        }
    }

    fn axis(&self, axis: usize) -> String {
        format!("{} `{}` axis {}", self.kind, self.name, axis)
    }
}

/// The type of a concrete tensor, e.g. `f32[2, 8]`.
pub fn concrete_type(t: &Tensor) -> TensorType {
    TensorType::new(t.dtype(), t.shape().iter().map(|&n| n as i64))
}

/// Binds every size symbol that the sources' shapes determine, starting from `preset`
/// (explicit bindings, which the shapes must agree with), and checks every source's dtype and
/// shape against its declared type.
pub fn bind(sources: &[Source<'_>], preset: &Bindings) -> Result<Bindings, ExecError> {
    let mut env = preset.clone();
    solve(sources, &mut env)?;
    Ok(env)
}

/// [`bind`] with no explicit bindings, into `env` (whatever it held is replaced): a loop that
/// binds the same graph's sizes every step (a decode loop) reuses its symbols' names and its
/// table, so binding allocates nothing once the symbols are known.
pub fn bind_into(sources: &[Source<'_>], env: &mut Bindings) -> Result<(), ExecError> {
    for v in env.values_mut() {
        *v = UNSET;
    }
    solve(sources, env)
}

/// The value of a symbol [`bind_into`] has not bound yet in a reused `env` (no size is).
const UNSET: i64 = i64::MIN;

/// The value `env` binds `sym` to, if any.
fn bound(env: &Bindings, sym: &str) -> Option<i64> {
    env.get(sym).copied().filter(|&v| v != UNSET)
}

/// [`bind`]'s work on `env` (preset bindings, and [`UNSET`] entries to fill).
fn solve<'a>(sources: &[Source<'a>], env: &mut Bindings) -> Result<(), ExecError> {
    // Where each symbol was bound this time, (source, axis); a bound symbol not listed is an
    // explicit binding. Described only in an error.
    let mut origin: SmallVec<[(&'a str, (usize, usize)); 8]> = SmallVec::new();
    let describe = |at: Option<(usize, usize)>| match at {
        None => "the explicit bindings".to_string(),
        Some((i, axis)) => sources[i].axis(axis),
    };
    let mut set = |sym: &'a str, value: i64, at: (usize, usize), env: &mut Bindings| {
        match env.get_mut(sym) {
            Some(old) if *old == UNSET => *old = value,
            Some(old) if *old != value => {
                let first = origin.iter().find(|(s, _)| *s == sym).map(|&(_, at)| at);
                return Err(ExecError::DimConflict {
                    sym: sym.to_string(),
                    first: describe(first),
                    first_value: *old,
                    second: describe(Some(at)),
                    second_value: value,
                });
            }
            Some(_) => return Ok(()),
            None => {
                env.insert(sym.to_string(), value);
            }
        }
        origin.push((sym, at));
        Ok(())
    };
    // (0) dtype and rank.
    for s in sources {
        if s.dtype != s.ty.dtype || s.shape.len() != s.ty.rank() {
            return Err(s.type_error());
        }
    }
    // (1) dims that are a single symbol.
    for (i, s) in sources.iter().enumerate() {
        for (axis, (d, &n)) in s.ty.shape.iter().zip(s.shape).enumerate() {
            if let Some(sym) = d.as_sym() {
                set(sym, size_i64(n), (i, axis), env)?;
            }
        }
    }
    // (2) dims with one unbound symbol appearing linearly, until nothing changes.
    loop {
        let mut progress = false;
        for (i, s) in sources.iter().enumerate() {
            for (axis, (d, &n)) in s.ty.shape.iter().zip(s.shape).enumerate() {
                let Some((sym, coeff, rest)) = linear_in_unbound(d, env) else {
                    continue;
                };
                let solved = size_i64(n).checked_sub(rest).and_then(|diff| {
                    let q = diff.checked_div(coeff)?;
                    (q >= 0 && q.checked_mul(coeff)? == diff).then_some(q)
                });
                let Some(value) = solved else {
                    return Err(s.type_error());
                };
                set(sym, value, (i, axis), env)?;
                progress = true;
            }
        }
        if !progress {
            break;
        }
    }
    // (3) every dim evaluates to the supplied size (a symbol left unset is unbound).
    env.retain(|_, v| *v != UNSET);
    for s in sources {
        for (axis, (d, &n)) in s.ty.shape.iter().zip(s.shape).enumerate() {
            let at = || format!("{} ({d})", s.axis(axis));
            match d.eval(env) {
                Ok(v) if v == size_i64(n) => {}
                Ok(_) => return Err(s.type_error()),
                Err(e) => return Err(dim_error(e, d, at())),
            }
        }
    }
    Ok(())
}

/// If `d` has exactly one unbound symbol and every term mentions it at most once, returns
/// `(symbol, c, r)` with `d = c * symbol + r` under `env` (`c != 0`).
fn linear_in_unbound<'d>(d: &'d Dim, env: &Bindings) -> Option<(&'d str, i64, i64)> {
    let mut unbound = d.symbols().filter(|s| bound(env, s).is_none());
    let sym = unbound.next()?;
    if unbound.any(|s| s != sym) {
        return None;
    }
    let (mut coeff, mut rest) = (0i64, 0i64);
    for t in d.terms() {
        let mut v = t.coeff;
        let mut uses = 0;
        for s in &t.syms {
            if *s == sym {
                uses += 1;
            } else {
                v = v.checked_mul(bound(env, s)?)?;
            }
        }
        match uses {
            0 => rest = rest.checked_add(v)?,
            1 => coeff = coeff.checked_add(v)?,
            _ => return None,
        }
    }
    (coeff != 0).then_some((sym, coeff, rest))
}

fn size_i64(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// Converts a [`DimError`] from evaluating `d` for `at` into an [`ExecError`].
pub(crate) fn dim_error(e: DimError, d: &Dim, at: String) -> ExecError {
    match e {
        DimError::Unbound(sym) => ExecError::Unbound { sym, at },
        DimError::Overflow(_) | DimError::NotCanonical(_) => ExecError::BadDim {
            at,
            dim: d.to_string(),
            reason: "overflows".into(),
        },
    }
}

/// Evaluates `d` as a size (non-negative), for `at`.
pub(crate) fn eval_size(
    d: &Dim,
    env: &Bindings,
    at: impl Fn() -> String,
) -> Result<usize, ExecError> {
    let v = d.eval(env).map_err(|e| dim_error(e, d, at()))?;
    usize::try_from(v).map_err(|_| ExecError::BadDim {
        at: at(),
        dim: d.to_string(),
        reason: format!("evaluates to {v}, a negative size"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_ir::DType;

    fn ty(dims: &[&str]) -> TensorType {
        TensorType {
            dtype: DType::F32,
            shape: dims
                .iter()
                .map(|d| match d.parse::<i64>() {
                    Ok(n) => Dim::fixed(n),
                    Err(_) => d
                        .split('+')
                        .map(Dim::sym)
                        .fold(Dim::fixed(0), |a, b| &a + &b),
                })
                .collect(),
        }
    }

    fn zeros(shape: &[usize]) -> Tensor {
        Tensor::from_f32(shape.to_vec(), vec![0.0; shape.iter().product()]).unwrap()
    }

    fn src<'a>(name: &'a str, ty: &'a TensorType, t: &'a Tensor) -> Source<'a> {
        Source {
            kind: "input",
            name,
            id: ValueId(0),
            ty,
            dtype: t.dtype(),
            shape: t.shape(),
        }
    }

    /// Binding into a reused environment gives what [`bind`] gives, step after step (the
    /// sizes change, a symbol no source has any more is dropped), and the same errors.
    #[test]
    fn binding_into_a_reused_environment_agrees_with_bind() {
        let (tc, tx, ty1) = (ty(&["past+seq"]), ty(&["batch", "seq"]), ty(&["other"]));
        let mut env = Bindings::new();
        for (past, seq) in [(0, 5), (5, 1), (6, 1), (7, 3)] {
            let (c, x, o) = (zeros(&[past + seq]), zeros(&[2, seq]), zeros(&[past]));
            let mut sources = vec![src("cache", &tc, &c), src("x", &tx, &x)];
            if past == 5 {
                sources.push(src("o", &ty1, &o));
            }
            bind_into(&sources, &mut env).unwrap();
            assert_eq!(
                env,
                bind(&sources, &Bindings::new()).unwrap(),
                "{past}+{seq}"
            );
        }
        let (a, b) = (zeros(&[2, 3]), zeros(&[4, 3]));
        let bad = [src("x", &tx, &a), src("y", &tx, &b)];
        let want = bind(&bad, &Bindings::new()).unwrap_err().to_string();
        assert_eq!(bind_into(&bad, &mut env).unwrap_err().to_string(), want);
    }

    #[test]
    fn binds_single_symbols_then_solves_linear_dims() {
        // cache[past+seq] is seen before x[batch, seq]: solved on the second sweep.
        let (tc, tx) = (ty(&["past+seq"]), ty(&["batch", "seq"]));
        let (c, x) = (zeros(&[9]), zeros(&[2, 3]));
        let env = bind(
            &[src("cache", &tc, &c), src("x", &tx, &x)],
            &Bindings::new(),
        )
        .unwrap();
        assert_eq!(env["batch"], 2);
        assert_eq!(env["seq"], 3);
        assert_eq!(env["past"], 6);

        // 2*n from a size of 8 gives n = 4; from 7 it does not fit.
        let t2 = TensorType {
            dtype: DType::F32,
            shape: vec![&Dim::sym("n") * &Dim::fixed(2)],
        };
        let e8 = zeros(&[8]);
        assert_eq!(
            bind(&[src("v", &t2, &e8)], &Bindings::new()).unwrap()["n"],
            4
        );
        let e7 = zeros(&[7]);
        let err = bind(&[src("v", &t2, &e7)], &Bindings::new()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "input `v` should be f32[2*n] but is f32[7]"
        );
    }

    #[test]
    fn conflicts_and_unbound_symbols() {
        let (ta, tb) = (ty(&["batch", "7"]), ty(&["batch"]));
        let (a, b) = (zeros(&[2, 7]), zeros(&[3]));
        let err = bind(&[src("a", &ta, &a), src("b", &tb, &b)], &Bindings::new()).unwrap_err();
        assert!(matches!(err, ExecError::DimConflict { ref sym, .. } if sym == "batch"));
        assert_eq!(
            err.to_string(),
            "size symbol `batch` is 2 from input `a` axis 0 but 3 from input `b` axis 0"
        );

        let t = ty(&["a+b"]);
        let x = zeros(&[4]);
        let err = bind(&[src("x", &t, &x)], &Bindings::new()).unwrap_err();
        assert!(matches!(err, ExecError::Unbound { .. }), "{err}");
        assert!(err.to_string().contains("input `x` axis 0 (a+b)"), "{err}");
        // An explicit binding makes it solvable, and must itself agree with the shapes.
        let preset = Bindings::from([("a".to_string(), 1)]);
        assert_eq!(bind(&[src("x", &t, &x)], &preset).unwrap()["b"], 3);
        let t1 = ty(&["a"]);
        let err = bind(&[src("x", &t1, &x)], &preset).unwrap_err();
        assert_eq!(
            err.to_string(),
            "size symbol `a` is 1 from the explicit bindings but 4 from input `x` axis 0"
        );
    }

    #[test]
    fn dtype_rank_and_fixed_sizes_are_checked() {
        let t = ty(&["batch", "7"]);
        let wrong_size = zeros(&[2, 8]);
        let err = bind(&[src("x", &t, &wrong_size)], &Bindings::new()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "input `x` should be f32[batch, 7] but is f32[2, 8]"
        );
        let wrong_rank = zeros(&[2]);
        assert!(matches!(
            bind(&[src("x", &t, &wrong_rank)], &Bindings::new()),
            Err(ExecError::InputType { .. })
        ));
        let ints = Tensor::from_i64(vec![2, 7], vec![0; 14]).unwrap();
        let err = bind(&[src("x", &t, &ints)], &Bindings::new()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "input `x` should be f32[batch, 7] but is i64[2, 7]"
        );
    }

    #[test]
    fn eval_size_rejects_negative_and_unbound() {
        let env = Bindings::from([("n".to_string(), 2)]);
        let d = &Dim::sym("n") - &Dim::fixed(3);
        let err = eval_size(&d, &env, || "%1 (iota)".into()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "%1 (iota): dimension n-3 evaluates to -1, a negative size"
        );
        let err = eval_size(&Dim::sym("m"), &env, || "%1 (iota)".into()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "size symbol `m` is not bound (needed by %1 (iota))"
        );
    }
}
