//! `copy_strided` against the reference executor's permute, slice, expand and concat on random
//! data (odd sizes, a transpose of the last two axes large enough to run tiled and in parallel),
//! and its errors on operands that do not fit. Copies are exact: results must be bit-identical.

mod common;

use common::{eval, f32t, random, rng};
use kiln_ir::trace::Tracer;
use kiln_ir::{DType, Dim};
use kiln_kernels::layout::copy_strided;
use kiln_kernels::KernelError;

fn dense_strides(shape: &[usize]) -> Vec<usize> {
    let mut st = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        st[i] = st[i + 1] * shape[i + 1];
    }
    st
}

fn dims(shape: &[usize]) -> Vec<Dim> {
    shape.iter().map(|&d| Dim::from(d)).collect()
}

#[test]
fn permute_matches_reference() {
    let cases: [(&[usize], &[usize]); 6] = [
        (&[7], &[0]),
        (&[33, 7], &[1, 0]),
        (&[2, 3, 5, 7], &[0, 2, 1, 3]), // [b, s, h, d] ↔ [b, h, s, d]
        (&[2, 3, 5, 7], &[3, 2, 1, 0]),
        (&[1, 33, 1, 9], &[2, 0, 3, 1]),
        (&[64, 4097], &[1, 0]), // tiled and parallel
    ];
    for (i, (shape, perm)) in cases.into_iter().enumerate() {
        let n: usize = shape.iter().product();
        let x = random(&mut rng(i as u64), n, -1.0, 1.0);
        let t = Tracer::new();
        let xi = t.input("x", DType::F32, dims(shape));
        t.output("y", &xi.permute(perm).unwrap());
        let want = eval(&t, vec![("x", f32t(shape, &x))]);
        let st = dense_strides(shape);
        let out_shape: Vec<usize> = perm.iter().map(|&p| shape[p]).collect();
        let src_st: Vec<usize> = perm.iter().map(|&p| st[p]).collect();
        let mut got = vec![f32::NAN; n];
        copy_strided(
            &out_shape,
            &x,
            0,
            &src_st,
            &mut got,
            0,
            &dense_strides(&out_shape),
        )
        .unwrap();
        assert_eq!(got, want, "permute {shape:?} by {perm:?}");
    }
}

#[test]
fn slice_and_expand_match_reference() {
    let mut r = rng(10);
    let shape = [5usize, 33, 7];
    let x = random(&mut r, shape.iter().product(), -1.0, 1.0);
    let st = dense_strides(&shape);
    for (axis, start, end) in [(0, 1, 4), (1, 0, 1), (1, 7, 33), (2, 3, 7), (2, 0, 0)] {
        let t = Tracer::new();
        let xi = t.input("x", DType::F32, dims(&shape));
        t.output("y", &xi.slice(axis as isize, start, end).unwrap());
        let want = eval(&t, vec![("x", f32t(&shape, &x))]);
        let mut out_shape = shape;
        out_shape[axis] = end - start;
        let mut got = vec![f32::NAN; out_shape.iter().product()];
        let off = start * st[axis];
        copy_strided(
            &out_shape,
            &x,
            off,
            &st,
            &mut got,
            0,
            &dense_strides(&out_shape),
        )
        .unwrap();
        assert_eq!(got, want, "slice axis {axis} {start}..{end}");
    }
    // expand [33, 1] → [4, 33, 9] and [1, 7] → [4097, 7] (parallel).
    for (small, big) in [
        (&[33usize, 1][..], &[4usize, 33, 9][..]),
        (&[1, 7], &[4097, 7]),
    ] {
        let x = random(&mut r, small.iter().product(), -1.0, 1.0);
        let t = Tracer::new();
        let xi = t.input("x", DType::F32, dims(small));
        t.output("y", &xi.expand(&dims(big)).unwrap());
        let want = eval(&t, vec![("x", f32t(small, &x))]);
        let sst = dense_strides(small);
        let mut src_st = vec![0; big.len()];
        for (i, &d) in small.iter().enumerate() {
            let ax = big.len() - small.len() + i;
            src_st[ax] = if d == 1 { 0 } else { sst[i] };
        }
        let mut got = vec![f32::NAN; big.iter().product()];
        copy_strided(big, &x, 0, &src_st, &mut got, 0, &dense_strides(big)).unwrap();
        assert_eq!(got, want, "expand {small:?} to {big:?}");
    }
}

#[test]
fn concat_matches_reference() {
    let mut r = rng(20);
    for axis in 0..3 {
        let shapes: Vec<[usize; 3]> = [1usize, 7, 33]
            .iter()
            .map(|&n| {
                let mut s = [3, 5, 9];
                s[axis] = n;
                s
            })
            .collect();
        let xs: Vec<Vec<f32>> = shapes
            .iter()
            .map(|s| random(&mut r, s.iter().product(), -1.0, 1.0))
            .collect();
        let t = Tracer::new();
        let ins: Vec<_> = shapes
            .iter()
            .enumerate()
            .map(|(i, s)| t.input(&format!("x{i}"), DType::F32, dims(s)))
            .collect();
        let y =
            kiln_ir::trace::Tensor::cat(&ins.iter().collect::<Vec<_>>(), axis as isize).unwrap();
        t.output("y", &y);
        let names = ["x0", "x1", "x2"];
        let want = eval(
            &t,
            names
                .iter()
                .zip(shapes.iter().zip(&xs))
                .map(|(n, (s, x))| (*n, f32t(s, x)))
                .collect(),
        );
        let mut out_shape = [3usize, 5, 9];
        out_shape[axis] = 1 + 7 + 33;
        let ost = dense_strides(&out_shape);
        let mut got = vec![f32::NAN; out_shape.iter().product()];
        let mut at = 0;
        for (s, x) in shapes.iter().zip(&xs) {
            copy_strided(s, x, 0, &dense_strides(s), &mut got, at * ost[axis], &ost).unwrap();
            at += s[axis];
        }
        assert_eq!(got, want, "concat along {axis}");
    }
}

#[test]
fn other_element_types_copy_too() {
    let x: Vec<u16> = (0..35).collect();
    let mut y = vec![0u16; 35];
    copy_strided(&[5, 7], &x, 0, &[1, 5], &mut y, 0, &[7, 1]).unwrap();
    for i in 0..5 {
        for j in 0..7 {
            assert_eq!(y[i * 7 + j], x[j * 5 + i]);
        }
    }
}

#[test]
fn operands_that_do_not_fit_are_errors() {
    let x = [0.0f32; 12];
    let mut y = [0.0f32; 12];
    let bad = [
        copy_strided(&[3, 4], &x, 1, &[4, 1], &mut y, 0, &[4, 1]), // src past the end
        copy_strided(&[3, 4], &x, 0, &[4, 1], &mut y, 0, &[5, 1]), // dst past the end
        copy_strided(&[3, 4], &x, 0, &[4], &mut y, 0, &[4, 1]),    // stride count
        copy_strided(&[3, usize::MAX], &x, 0, &[4, 2], &mut y, 0, &[4, 1]), // overflow
    ];
    for (i, e) in bad.into_iter().enumerate() {
        assert!(matches!(e, Err(KernelError::Layout(_))), "{i}: {e:?}");
    }
    // Empty shapes copy nothing, whatever the strides.
    copy_strided(&[0, 4], &x, 99, &[4, 1], &mut y, 99, &[4, 1]).unwrap();
}
