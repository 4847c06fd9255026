//! Dtype conversion kernels: little-endian bytes of one dtype into typed elements of another.
//!
//! Each `decode_*` function reads `bytes`, a packed little-endian array of `from` elements, and
//! appends them to `out` converted to the function's dtype. The conversions are:
//!
//! * the identity, bit for bit (NaN payloads included);
//! * between any two float dtypes (f32, f16, bf16, fp8 E4M3 "fn", fp8 E5M2): the source is
//!   widened to f32 (exact) and rounded once to the target, to nearest even, exactly as
//!   [`kiln_ir::scalar`] and PyTorch's `.to()` do (fp8 as in [`kiln_ir::f8`]: E4M3 saturates,
//!   E5M2 overflows to infinity);
//! * lossless integer widenings: u8 → i32, u8 → i64, i32 → i64.
//!
//! Anything else (float ↔ integer, integer narrowing, bool) is [`ConvertError::Unsupported`];
//! [`converts`] tells in advance. [`encode_f32`] goes the other way, f32 values to the bytes of
//! any float dtype. The loops run over `chunks_exact` of the input and append through
//! `Vec::extend`, so each call allocates at most once (the growth of `out`).

use half::{bf16, f16};
use kiln_ir::{f8, DType};

/// Why a conversion could not run. Nothing is appended to `out` when it fails.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConvertError {
    /// The input is not a whole number of elements of its dtype.
    #[error("{len} bytes are not a whole number of {dtype} elements ({} bytes each)", dtype.size_bytes())]
    Length {
        /// The dtype of the input bytes.
        dtype: DType,
        /// The input length in bytes.
        len: usize,
    },
    /// There is no conversion between the two dtypes.
    #[error(
        "cannot convert {from} to {to}: only conversions between float dtypes and lossless \
         integer widenings (u8 to i32 or i64, i32 to i64) are supported"
    )]
    Unsupported {
        /// The source dtype.
        from: DType,
        /// The target dtype.
        to: DType,
    },
}

/// The signature shared by the `decode_*` functions: source dtype, its bytes, output to append
/// to.
pub type Decoder<T> = fn(DType, &[u8], &mut Vec<T>) -> Result<(), ConvertError>;

/// True when the `decode_*` function for `to` accepts input of dtype `from`: the same dtype,
/// two float dtypes, or a lossless integer widening.
pub fn converts(from: DType, to: DType) -> bool {
    from == to
        || (from.is_float() && to.is_float())
        || matches!(
            (from, to),
            (DType::U8, DType::I32 | DType::I64) | (DType::I32, DType::I64)
        )
}

/// Checks that `from` converts to `to` and that `bytes` holds whole elements; returns the
/// element count.
fn check(from: DType, to: DType, bytes: &[u8]) -> Result<usize, ConvertError> {
    if !converts(from, to) {
        return Err(ConvertError::Unsupported { from, to });
    }
    let size = from.size_bytes();
    if !bytes.len().is_multiple_of(size) {
        return Err(ConvertError::Length {
            dtype: from,
            len: bytes.len(),
        });
    }
    Ok(bytes.len() / size)
}

/// The first `N` bytes of a chunk as an array (chunks come from `chunks_exact(N)`).
#[inline(always)]
fn le<const N: usize>(chunk: &[u8]) -> [u8; N] {
    let mut a = [0u8; N];
    a.copy_from_slice(chunk);
    a
}

/// Widens each element of the float dtype `from` to f32 (exact) and appends `f` of it.
/// `from` must be a float dtype and `bytes` whole elements (see [`check`]).
#[inline(always)]
fn map_float<T>(from: DType, bytes: &[u8], out: &mut Vec<T>, f: impl Fn(f32) -> T) {
    match from {
        DType::F32 => out.extend(bytes.chunks_exact(4).map(|c| f(f32::from_le_bytes(le(c))))),
        DType::F16 => out.extend(
            bytes
                .chunks_exact(2)
                .map(|c| f(f16::from_le_bytes(le(c)).to_f32())),
        ),
        DType::BF16 => out.extend(
            bytes
                .chunks_exact(2)
                .map(|c| f(bf16::from_le_bytes(le(c)).to_f32())),
        ),
        DType::F8E4M3 => out.extend(bytes.iter().map(|&b| f(f8::f8e4m3_to_f32(b)))),
        DType::F8E5M2 => out.extend(bytes.iter().map(|&b| f(f8::f8e5m2_to_f32(b)))),
        // Not float: `check` has already refused it.
        DType::I64 | DType::I32 | DType::U8 | DType::Bool => {}
    }
}

/// Appends `bytes` (elements of the float dtype `from`) converted to f32. Exact: every float
/// dtype widens to f32 without rounding.
pub fn decode_f32(from: DType, bytes: &[u8], out: &mut Vec<f32>) -> Result<(), ConvertError> {
    out.reserve(check(from, DType::F32, bytes)?);
    map_float(from, bytes, out, |x| x);
    Ok(())
}

/// Appends `bytes` (elements of the float dtype `from`) converted to f16, rounding to nearest
/// even; f16 input is copied bit for bit.
pub fn decode_f16(from: DType, bytes: &[u8], out: &mut Vec<f16>) -> Result<(), ConvertError> {
    out.reserve(check(from, DType::F16, bytes)?);
    if from == DType::F16 {
        out.extend(bytes.chunks_exact(2).map(|c| f16::from_le_bytes(le(c))));
    } else {
        map_float(from, bytes, out, f16::from_f32);
    }
    Ok(())
}

/// Appends `bytes` (elements of the float dtype `from`) converted to bf16, rounding to nearest
/// even; bf16 input is copied bit for bit.
pub fn decode_bf16(from: DType, bytes: &[u8], out: &mut Vec<bf16>) -> Result<(), ConvertError> {
    out.reserve(check(from, DType::BF16, bytes)?);
    if from == DType::BF16 {
        out.extend(bytes.chunks_exact(2).map(|c| bf16::from_le_bytes(le(c))));
    } else {
        map_float(from, bytes, out, bf16::from_f32);
    }
    Ok(())
}

/// Appends `bytes` (elements of the float dtype `from`) converted to fp8 E4M3 bit patterns, as
/// [`f8::f32_to_f8e4m3`] (saturating at ±448); E4M3 input is copied.
pub fn decode_f8e4m3(from: DType, bytes: &[u8], out: &mut Vec<u8>) -> Result<(), ConvertError> {
    out.reserve(check(from, DType::F8E4M3, bytes)?);
    if from == DType::F8E4M3 {
        out.extend_from_slice(bytes);
    } else {
        map_float(from, bytes, out, f8::f32_to_f8e4m3);
    }
    Ok(())
}

/// Appends `bytes` (elements of the float dtype `from`) converted to fp8 E5M2 bit patterns, as
/// [`f8::f32_to_f8e5m2`] (overflow gives ±infinity); E5M2 input is copied.
pub fn decode_f8e5m2(from: DType, bytes: &[u8], out: &mut Vec<u8>) -> Result<(), ConvertError> {
    out.reserve(check(from, DType::F8E5M2, bytes)?);
    if from == DType::F8E5M2 {
        out.extend_from_slice(bytes);
    } else {
        map_float(from, bytes, out, f8::f32_to_f8e5m2);
    }
    Ok(())
}

/// Appends `bytes` (i64, i32 or u8 elements) as i64.
pub fn decode_i64(from: DType, bytes: &[u8], out: &mut Vec<i64>) -> Result<(), ConvertError> {
    out.reserve(check(from, DType::I64, bytes)?);
    match from {
        DType::I64 => out.extend(bytes.chunks_exact(8).map(|c| i64::from_le_bytes(le(c)))),
        DType::I32 => out.extend(
            bytes
                .chunks_exact(4)
                .map(|c| i64::from(i32::from_le_bytes(le(c)))),
        ),
        DType::U8 => out.extend(bytes.iter().map(|&b| i64::from(b))),
        _ => {}
    }
    Ok(())
}

/// Appends `bytes` (i32 or u8 elements) as i32.
pub fn decode_i32(from: DType, bytes: &[u8], out: &mut Vec<i32>) -> Result<(), ConvertError> {
    out.reserve(check(from, DType::I32, bytes)?);
    match from {
        DType::I32 => out.extend(bytes.chunks_exact(4).map(|c| i32::from_le_bytes(le(c)))),
        DType::U8 => out.extend(bytes.iter().map(|&b| i32::from(b))),
        _ => {}
    }
    Ok(())
}

/// Appends `bytes` (u8 elements) unchanged.
pub fn decode_u8(from: DType, bytes: &[u8], out: &mut Vec<u8>) -> Result<(), ConvertError> {
    check(from, DType::U8, bytes)?;
    out.extend_from_slice(bytes);
    Ok(())
}

/// Appends `bytes` (bool elements, one byte each) as bools: any non-zero byte is true, as in
/// [`kiln_ir::scalar::decode`].
pub fn decode_bool(from: DType, bytes: &[u8], out: &mut Vec<bool>) -> Result<(), ConvertError> {
    out.reserve(check(from, DType::Bool, bytes)?);
    out.extend(bytes.iter().map(|&b| b != 0));
    Ok(())
}

/// Appends the little-endian bytes of `src` converted to the float dtype `to` (rounding to
/// nearest even; fp8 as in [`kiln_ir::f8`]).
pub fn encode_f32(to: DType, src: &[f32], out: &mut Vec<u8>) -> Result<(), ConvertError> {
    if !to.is_float() {
        return Err(ConvertError::Unsupported {
            from: DType::F32,
            to,
        });
    }
    out.reserve(src.len() * to.size_bytes());
    match to {
        DType::F32 => {
            for x in src {
                out.extend_from_slice(&x.to_le_bytes());
            }
        }
        DType::F16 => {
            for &x in src {
                out.extend_from_slice(&f16::from_f32(x).to_le_bytes());
            }
        }
        DType::BF16 => {
            for &x in src {
                out.extend_from_slice(&bf16::from_f32(x).to_le_bytes());
            }
        }
        DType::F8E4M3 => out.extend(src.iter().map(|&x| f8::f32_to_f8e4m3(x))),
        DType::F8E5M2 => out.extend(src.iter().map(|&x| f8::f32_to_f8e5m2(x))),
        DType::I64 | DType::I32 | DType::U8 | DType::Bool => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_ir::scalar::{self, Scalar};

    /// xorshift64*: deterministic pseudo-random bytes, so every bit pattern (NaNs, infinities,
    /// subnormals) turns up.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }

        fn bytes(&mut self, n: usize) -> Vec<u8> {
            (0..n).map(|_| self.next() as u8).collect()
        }
    }

    /// Interesting values: signed zeros, infinities, NaNs, format limits and rounding ties.
    const SPECIALS: [f64; 22] = [
        0.0,
        -0.0,
        1.0,
        -1.0,
        f64::INFINITY,
        f64::NEG_INFINITY,
        f64::NAN,
        448.0,
        464.0,
        480.0,
        57344.0,
        61440.0,
        65504.0,
        65520.0,
        -1e9,
        3.4e38,
        1.0625,
        1.1875,
        1e-8,
        1e-40,
        6.1e-5,
        0.333_333_343,
    ];

    /// Test input of dtype `from`: every bit pattern for the one- and two-byte types, random
    /// words plus the specials for the wider ones.
    fn inputs(from: DType, rng: &mut Rng) -> Vec<u8> {
        let mut bytes = match from.size_bytes() {
            1 => (0..=255u8).collect(),
            2 => (0..=u16::MAX).flat_map(u16::to_le_bytes).collect(),
            n => rng.bytes(4096 * n),
        };
        for v in SPECIALS {
            scalar::encode(from, Scalar::Float(-v), &mut bytes);
            scalar::encode(from, Scalar::Float(v), &mut bytes);
        }
        for v in [i64::MAX, i64::MIN, -1, 255, 256, i64::from(i32::MIN)] {
            scalar::encode(from, Scalar::Int(v), &mut bytes);
        }
        bytes
    }

    /// Runs the decoder for `to` and returns its output re-encoded as little-endian bytes.
    fn decode_to_bytes(from: DType, to: DType, bytes: &[u8]) -> Result<Vec<u8>, ConvertError> {
        fn run<T>(
            f: Decoder<T>,
            from: DType,
            bytes: &[u8],
            le: impl Fn(&T) -> Vec<u8>,
        ) -> Result<Vec<u8>, ConvertError> {
            // A non-empty `out` checks that the decoders append.
            let mut out = Vec::new();
            f(from, &[], &mut out)?;
            f(from, bytes, &mut out)?;
            Ok(out.iter().flat_map(le).collect())
        }
        match to {
            DType::F32 => run(decode_f32, from, bytes, |x| x.to_le_bytes().to_vec()),
            DType::F16 => run(decode_f16, from, bytes, |x| x.to_le_bytes().to_vec()),
            DType::BF16 => run(decode_bf16, from, bytes, |x| x.to_le_bytes().to_vec()),
            DType::F8E4M3 => run(decode_f8e4m3, from, bytes, |x| vec![*x]),
            DType::F8E5M2 => run(decode_f8e5m2, from, bytes, |x| vec![*x]),
            DType::I64 => run(decode_i64, from, bytes, |x| x.to_le_bytes().to_vec()),
            DType::I32 => run(decode_i32, from, bytes, |x| x.to_le_bytes().to_vec()),
            DType::U8 => run(decode_u8, from, bytes, |x| vec![*x]),
            DType::Bool => run(decode_bool, from, bytes, |x| vec![u8::from(*x)]),
        }
    }

    /// Compares two little-endian arrays of `dtype` element by element; NaN matches any NaN
    /// (payloads differ between the f64 route of the reference and the f32 route here).
    fn assert_same(from: DType, to: DType, input: &[u8], got: &[u8], want: &[u8]) {
        let (n, m) = (to.size_bytes(), from.size_bytes());
        assert_eq!(got.len(), want.len(), "{from} -> {to}: length");
        for (i, (g, w)) in got.chunks_exact(n).zip(want.chunks_exact(n)).enumerate() {
            let nan = |b: &[u8]| matches!(scalar::decode(to, b), Scalar::Float(x) if x.is_nan());
            if nan(w) {
                assert!(
                    nan(g),
                    "{from} -> {to}: element {i} should be NaN, got {g:?}"
                );
            } else {
                assert_eq!(
                    g,
                    w,
                    "{from} -> {to}: element {i} (input bytes {:?}, {:?})",
                    &input[i * m..(i + 1) * m],
                    scalar::decode(from, &input[i * m..(i + 1) * m])
                );
            }
        }
    }

    #[test]
    fn every_dtype_pair_matches_scalar_reference() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut checked = 0;
        for from in DType::ALL {
            let input = inputs(from, &mut rng);
            for to in DType::ALL {
                let got = decode_to_bytes(from, to, &input);
                if !converts(from, to) {
                    assert_eq!(got, Err(ConvertError::Unsupported { from, to }));
                    continue;
                }
                let got = got.unwrap_or_else(|e| panic!("{from} -> {to}: {e}"));
                let mut want = Vec::new();
                for chunk in input.chunks_exact(from.size_bytes()) {
                    scalar::encode(to, scalar::decode(from, chunk), &mut want);
                }
                assert_same(from, to, &input, &got, &want);
                checked += 1;
            }
        }
        // 25 float pairs, 4 integer/bool identities, 3 widenings.
        assert_eq!(checked, 32);
    }

    #[test]
    fn identity_is_bit_exact() {
        // Signalling NaNs and payloads survive a same-dtype decode.
        let f32_bytes = 0x7f80_0001u32.to_le_bytes();
        let mut out = Vec::new();
        decode_f32(DType::F32, &f32_bytes, &mut out).unwrap();
        assert_eq!(out[0].to_bits(), 0x7f80_0001);
        let mut out = Vec::new();
        decode_f16(DType::F16, &[0x01, 0x7c], &mut out).unwrap();
        assert_eq!(out[0].to_bits(), 0x7c01);
        let mut out = Vec::new();
        decode_bf16(DType::BF16, &[0x01, 0xff], &mut out).unwrap();
        assert_eq!(out[0].to_bits(), 0xff01);
    }

    #[test]
    fn hand_checked_conversions() {
        let mut out = Vec::new();
        decode_bf16(DType::F32, &(1.0f32 / 3.0).to_le_bytes(), &mut out).unwrap();
        assert_eq!(out, [bf16::from_f32(0.333_984_38)]);
        let mut out = Vec::new();
        decode_f8e4m3(DType::F16, &f16::from_f32(1e4).to_le_bytes(), &mut out).unwrap();
        assert_eq!(out, [0x7e], "e4m3 saturates");
        let mut out = Vec::new();
        decode_f8e5m2(DType::F32, &1e6f32.to_le_bytes(), &mut out).unwrap();
        assert_eq!(out, [0x7c], "e5m2 overflows to infinity");
        let mut out = Vec::new();
        decode_i64(DType::I32, &(-7i32).to_le_bytes(), &mut out).unwrap();
        assert_eq!(out, [-7]);
        let mut out = Vec::new();
        decode_i32(DType::U8, &[200], &mut out).unwrap();
        assert_eq!(out, [200]);
        let mut out = Vec::new();
        decode_bool(DType::Bool, &[0, 1, 2], &mut out).unwrap();
        assert_eq!(out, [false, true, true]);
    }

    #[test]
    fn ragged_input_is_refused_without_appending() {
        let mut out = vec![1.0f32];
        assert_eq!(
            decode_f32(DType::F32, &[0; 5], &mut out),
            Err(ConvertError::Length {
                dtype: DType::F32,
                len: 5
            })
        );
        assert_eq!(out, [1.0]);
        let mut out = Vec::new();
        let err = decode_i64(DType::I64, &[0; 12], &mut out).unwrap_err();
        assert_eq!(
            err.to_string(),
            "12 bytes are not a whole number of i64 elements (8 bytes each)"
        );
        assert!(out.is_empty());
        let err = decode_i32(DType::I64, &[0; 8], &mut Vec::new()).unwrap_err();
        assert_eq!(
            err,
            ConvertError::Unsupported {
                from: DType::I64,
                to: DType::I32
            }
        );
        assert!(err.to_string().starts_with("cannot convert i64 to i32"));
    }

    #[test]
    fn encode_matches_scalar_reference() {
        let mut rng = Rng(42);
        let mut src: Vec<f32> = (0..4096)
            .map(|_| f32::from_bits(rng.next() as u32))
            .collect();
        src.extend(SPECIALS.iter().flat_map(|&v| [v as f32, -v as f32]));
        for to in DType::ALL {
            let mut got = Vec::new();
            let result = encode_f32(to, &src, &mut got);
            if !to.is_float() {
                assert_eq!(
                    result,
                    Err(ConvertError::Unsupported {
                        from: DType::F32,
                        to
                    })
                );
                assert!(got.is_empty());
                continue;
            }
            result.unwrap();
            let mut want = Vec::new();
            for &x in &src {
                scalar::encode(to, Scalar::Float(x.into()), &mut want);
            }
            let input: Vec<u8> = src.iter().flat_map(|x| x.to_le_bytes()).collect();
            assert_same(DType::F32, to, &input, &got, &want);
        }
    }
}
