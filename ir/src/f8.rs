//! fp8 conversions, bit-for-bit identical to PyTorch's `float8_e4m3fn` and `float8_e5m2` casts.
//!
//! Two 8-bit float formats are supported:
//!
//! * **E4M3 "fn"** (`torch.float8_e4m3fn`): 1 sign, 4 exponent (bias 7), 3 mantissa bits. There
//!   are no infinities; `S.1111.111` (0x7f / 0xff) is NaN, so the largest finite value is
//!   `S.1111.110` = 448. The smallest subnormal is 2^-9.
//! * **E5M2** (`torch.float8_e5m2`): 1 sign, 5 exponent (bias 15), 2 mantissa bits, laid out
//!   like IEEE binary16 truncated to its upper byte: exponent 31 with a zero mantissa is
//!   infinity, with a non-zero mantissa NaN. The largest finite value is 57344 and the smallest
//!   subnormal 2^-16.
//!
//! The narrowing casts round to nearest, ties to even, exactly as PyTorch's `c10::Float8_*`
//! conversions do (checked against `tests/fixtures/core/f8.json`, made with torch 2.15),
//! including their behaviour outside the finite range:
//!
//! * E4M3: PyTorch's cast **saturates**: every finite magnitude that rounds past 448 and
//!   ±infinity become ±448 (`0x7e` / `0xfe`); NaN becomes `0x7f` with the input's sign bit
//!   (`0xff` when negative). (PyTorch releases before the saturating change gave NaN on
//!   overflow instead; the current one is matched here.)
//! * E5M2: the cast does not saturate: magnitudes at or above 61440 (halfway between 57344 and
//!   65536, rounding to even goes up) and infinities become ±infinity (`0x7c` / `0xfc`); NaN
//!   becomes `0x7f` with the input's sign bit.
//!
//! The `_saturating` variants clamp finite and infinite inputs to the format's largest finite
//! magnitude before the cast (NaN stays NaN); that is the cast used when quantizing with a scale.
//! For E4M3 it gives the same result as the plain cast; for E5M2 it maps overflow to ±57344.
//!
//! Everything is computed with integer operations on the f32 bit pattern plus, for results that
//! are subnormal in the fp8 format, one IEEE f32 addition (which rounds to nearest even), so f32
//! subnormal inputs and signed zeros are handled exactly.

/// Largest finite E4M3 value.
const E4M3_MAX: f32 = 448.0;
/// Largest finite E5M2 value.
const E5M2_MAX: f32 = 57344.0;

/// Casts an f32 to fp8 E4M3 (`fn` variant), as PyTorch's `x.to(torch.float8_e4m3fn)`.
///
/// Rounds to nearest, ties to even. Like PyTorch, saturates: magnitudes that round past 448 and
/// infinities give ±448 (`0x7e` / `0xfe`); NaN gives NaN (`0x7f`, or `0xff` for a negative sign
/// bit).
pub fn f32_to_f8e4m3(x: f32) -> u8 {
    // 480 (0x43f0_0000): the first magnitude PyTorch sends straight to the overflow branch.
    // Magnitudes in (464, 480) round to the NaN pattern 0x7f below and are saturated there.
    const OVERFLOW_THRESHOLD: u32 = 1087 << 20;
    const F32_INF: u32 = 0xff << 23;
    // 2^-6, the smallest normal E4M3 value.
    const MIN_NORMAL: u32 = 121 << 23;
    // 2^-6 * 2^3: adding it aligns the f32 mantissa so that its lowest bits are the E4M3
    // subnormal mantissa (ulp 2^-9), rounded by the f32 addition itself.
    const DENORM_MAGIC: u32 = 141 << 23;

    let bits = x.to_bits();
    let sign = ((bits >> 24) & 0x80) as u8;
    let abs = bits & 0x7fff_ffff;
    let magnitude = if abs > F32_INF {
        0x7f
    } else if abs >= OVERFLOW_THRESHOLD {
        0x7e
    } else if abs < MIN_NORMAL {
        let magic = f32::from_bits(DENORM_MAGIC);
        let sum = (f32::from_bits(abs) + magic).to_bits();
        (sum - DENORM_MAGIC) as u8
    } else {
        let mant_odd = (abs >> 20) & 1;
        // Rebias the exponent (127 -> 7) and round the 20 dropped mantissa bits to nearest
        // even; a carry out of the mantissa correctly bumps the exponent.
        let rounded = abs
            .wrapping_sub((127 - 7) << 23)
            .wrapping_add(0x7_ffff + mant_odd);
        // Rounding up into the NaN pattern saturates to 448, as in PyTorch.
        ((rounded >> 20) as u8).min(0x7e)
    };
    magnitude | sign
}

/// Widens an fp8 E4M3 (`fn` variant) bit pattern to f32 (exact). `0x7f` and `0xff` are NaN.
pub fn f8e4m3_to_f32(bits: u8) -> f32 {
    let negative = bits & 0x80 != 0;
    let exponent = u32::from((bits >> 3) & 0x0f);
    let mantissa = u32::from(bits & 0x07);
    let magnitude = if exponent == 0x0f && mantissa == 0x07 {
        f32::NAN
    } else if exponent == 0 {
        // Subnormal: mantissa * 2^-9, exact in f32.
        mantissa as f32 * f32::from_bits((127 - 9) << 23)
    } else {
        f32::from_bits(((exponent + 127 - 7) << 23) | (mantissa << 20))
    };
    if negative {
        -magnitude
    } else {
        magnitude
    }
}

/// Casts an f32 to fp8 E5M2, as PyTorch's `x.to(torch.float8_e5m2)`.
///
/// Rounds to nearest, ties to even. Magnitudes that round past 57344 and infinities give
/// ±infinity (`0x7c` / `0xfc`); NaN gives `0x7f` with the input's sign bit.
pub fn f32_to_f8e5m2(x: f32) -> u8 {
    // 2^16: the first magnitude that PyTorch sends straight to inf/NaN. Magnitudes in
    // [61440, 65536) reach infinity through the rounding carry below.
    const OVERFLOW_THRESHOLD: u32 = 143 << 23;
    const F32_INF: u32 = 0xff << 23;
    // 2^-14, the smallest normal E5M2 value.
    const MIN_NORMAL: u32 = 113 << 23;
    // 2^-14 * 2^2: adding it leaves the E5M2 subnormal mantissa (ulp 2^-16) in the low bits.
    const DENORM_MAGIC: u32 = 134 << 23;

    let bits = x.to_bits();
    let sign = ((bits >> 24) & 0x80) as u8;
    let abs = bits & 0x7fff_ffff;
    let magnitude = if abs >= OVERFLOW_THRESHOLD {
        if abs > F32_INF {
            0x7f
        } else {
            0x7c
        }
    } else if abs < MIN_NORMAL {
        let magic = f32::from_bits(DENORM_MAGIC);
        let sum = (f32::from_bits(abs) + magic).to_bits();
        (sum - DENORM_MAGIC) as u8
    } else {
        let mant_odd = (abs >> 21) & 1;
        let rounded = abs
            .wrapping_sub((127 - 15) << 23)
            .wrapping_add(0xf_ffff + mant_odd);
        (rounded >> 21) as u8
    };
    magnitude | sign
}

/// Widens an fp8 E5M2 bit pattern to f32 (exact), with infinities and NaNs as in IEEE binary16.
pub fn f8e5m2_to_f32(bits: u8) -> f32 {
    let negative = bits & 0x80 != 0;
    let exponent = u32::from((bits >> 2) & 0x1f);
    let mantissa = u32::from(bits & 0x03);
    let magnitude = if exponent == 0x1f {
        if mantissa == 0 {
            f32::INFINITY
        } else {
            f32::NAN
        }
    } else if exponent == 0 {
        // Subnormal: mantissa * 2^-16, exact in f32.
        mantissa as f32 * f32::from_bits((127 - 16) << 23)
    } else {
        f32::from_bits(((exponent + 127 - 15) << 23) | (mantissa << 21))
    };
    if negative {
        -magnitude
    } else {
        magnitude
    }
}

/// Casts an f32 to fp8 E4M3 after clamping it to ±448, so finite overflow and infinities give
/// ±448 (`0x7e` / `0xfe`); NaN still gives NaN. This is the cast used when quantizing with a
/// scale. Since PyTorch's E4M3 cast saturates too, this equals [`f32_to_f8e4m3`]; it exists so
/// that quantizing code states its intent and does not depend on that.
pub fn f32_to_f8e4m3_saturating(x: f32) -> u8 {
    // `clamp` passes NaN through unchanged, sign bit included.
    f32_to_f8e4m3(x.clamp(-E4M3_MAX, E4M3_MAX))
}

/// Casts an f32 to fp8 E5M2 after clamping it to ±57344, so finite overflow and infinities give
/// ±57344 (`0x7b` / `0xfb`); NaN still gives NaN.
pub fn f32_to_f8e5m2_saturating(x: f32) -> u8 {
    f32_to_f8e5m2(x.clamp(-E5M2_MAX, E5M2_MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e4m3_hand_checked() {
        assert_eq!(f32_to_f8e4m3(0.0), 0x00);
        assert_eq!(f32_to_f8e4m3(-0.0), 0x80);
        assert_eq!(f32_to_f8e4m3(1.0), 0x38);
        assert_eq!(f32_to_f8e4m3(-1.0), 0xb8);
        assert_eq!(f32_to_f8e4m3(1.125), 0x39);
        assert_eq!(f32_to_f8e4m3(448.0), 0x7e);
        assert_eq!(f32_to_f8e4m3(-448.0), 0xfe);
        // Smallest normal, smallest subnormal (2^-9 ~ 0.0019531) and largest subnormal.
        assert_eq!(f32_to_f8e4m3(2f32.powi(-6)), 0x08);
        assert_eq!(f32_to_f8e4m3(2f32.powi(-9)), 0x01);
        assert_eq!(f32_to_f8e4m3(0.001_953_1), 0x01);
        assert_eq!(f32_to_f8e4m3(7.0 * 2f32.powi(-9)), 0x07);
        // Ties to even: 1.0625 is halfway between 1.0 (0x38) and 1.125 (0x39).
        assert_eq!(f32_to_f8e4m3(1.0625), 0x38);
        // 1.1875 is halfway between 1.125 (0x39) and 1.25 (0x3a).
        assert_eq!(f32_to_f8e4m3(1.1875), 0x3a);
        // 2^-10 is halfway between 0 and the smallest subnormal: rounds to 0.
        assert_eq!(f32_to_f8e4m3(2f32.powi(-10)), 0x00);
        assert_eq!(f32_to_f8e4m3(3.0 * 2f32.powi(-10)), 0x02);
        // Overflow saturates to ±448, as in PyTorch (>= 2.x with the saturating cast).
        assert_eq!(f32_to_f8e4m3(464.0), 0x7e);
        assert_eq!(f32_to_f8e4m3(464.1), 0x7e);
        assert_eq!(f32_to_f8e4m3(479.9), 0x7e);
        assert_eq!(f32_to_f8e4m3(480.0), 0x7e);
        assert_eq!(f32_to_f8e4m3(1e6), 0x7e);
        assert_eq!(f32_to_f8e4m3(-1e6), 0xfe);
        assert_eq!(f32_to_f8e4m3(f32::INFINITY), 0x7e);
        assert_eq!(f32_to_f8e4m3(f32::NEG_INFINITY), 0xfe);
        // NaN stays NaN, keeping its sign bit.
        assert_eq!(f32_to_f8e4m3(f32::NAN), 0x7f);
        assert_eq!(f32_to_f8e4m3(-f32::NAN), 0xff);
        // f32 subnormals flush to (signed) zero.
        assert_eq!(f32_to_f8e4m3(f32::from_bits(1)), 0x00);
        assert_eq!(f32_to_f8e4m3(-f32::from_bits(1)), 0x80);
    }

    #[test]
    fn e5m2_hand_checked() {
        assert_eq!(f32_to_f8e5m2(0.0), 0x00);
        assert_eq!(f32_to_f8e5m2(-0.0), 0x80);
        assert_eq!(f32_to_f8e5m2(1.0), 0x3c);
        assert_eq!(f32_to_f8e5m2(-2.0), 0xc0);
        assert_eq!(f32_to_f8e5m2(57344.0), 0x7b);
        assert_eq!(f32_to_f8e5m2(2f32.powi(-16)), 0x01);
        assert_eq!(f32_to_f8e5m2(2f32.powi(-14)), 0x04);
        // 61440 is the tie between 57344 (odd mantissa) and 65536: rounds to even = inf.
        assert_eq!(f32_to_f8e5m2(61439.0), 0x7b);
        assert_eq!(f32_to_f8e5m2(61440.0), 0x7c);
        assert_eq!(f32_to_f8e5m2(1e9), 0x7c);
        assert_eq!(f32_to_f8e5m2(-1e9), 0xfc);
        assert_eq!(f32_to_f8e5m2(f32::INFINITY), 0x7c);
        assert_eq!(f32_to_f8e5m2(f32::NEG_INFINITY), 0xfc);
        assert_eq!(f32_to_f8e5m2(f32::NAN), 0x7f);
        assert_eq!(f32_to_f8e5m2(-f32::NAN), 0xff);
        // 1.125 is halfway between 1.0 and 1.25: ties to even -> 1.0.
        assert_eq!(f32_to_f8e5m2(1.125), 0x3c);
        assert_eq!(f32_to_f8e5m2(1.375), 0x3e);
    }

    #[test]
    fn saturating() {
        assert_eq!(f32_to_f8e4m3_saturating(1e6), 0x7e);
        assert_eq!(f32_to_f8e4m3_saturating(-1e6), 0xfe);
        assert_eq!(f32_to_f8e4m3_saturating(f32::INFINITY), 0x7e);
        assert_eq!(f32_to_f8e4m3_saturating(f32::NEG_INFINITY), 0xfe);
        assert_eq!(f32_to_f8e4m3_saturating(f32::NAN), 0x7f);
        assert_eq!(f32_to_f8e4m3_saturating(1.0), 0x38);
        assert_eq!(f32_to_f8e5m2_saturating(1e9), 0x7b);
        assert_eq!(f32_to_f8e5m2_saturating(f32::NEG_INFINITY), 0xfb);
        assert_eq!(f32_to_f8e5m2_saturating(f32::NAN), 0x7f);
        assert_eq!(f32_to_f8e5m2_saturating(-1.0), 0xbc);
    }

    #[test]
    fn decode_round_trips() {
        for bits in 0..=255u8 {
            let v = f8e4m3_to_f32(bits);
            if bits & 0x7f == 0x7f {
                assert!(v.is_nan());
            } else {
                assert_eq!(f32_to_f8e4m3(v), bits, "e4m3 {bits:#04x}");
            }
            let v = f8e5m2_to_f32(bits);
            if bits & 0x7f > 0x7c {
                assert!(v.is_nan());
            } else {
                assert_eq!(f32_to_f8e5m2(v), bits, "e5m2 {bits:#04x}");
            }
        }
        assert_eq!(f8e4m3_to_f32(0x7e), 448.0);
        assert_eq!(f8e4m3_to_f32(0x01), 2f32.powi(-9));
        assert_eq!(f8e5m2_to_f32(0x7b), 57344.0);
        assert_eq!(f8e5m2_to_f32(0xfc), f32::NEG_INFINITY);
        assert_eq!(f8e5m2_to_f32(0x01), 2f32.powi(-16));
    }

    fn parse_f32(v: &serde_json::Value) -> f32 {
        match v {
            serde_json::Value::Number(n) => {
                // serde_json's default float parser may be one f64 ulp off; rounding to f32
                // still gives the exact value, which must agree to far below f32 precision.
                let d = n.as_f64().expect("number");
                let f = d as f32;
                assert!(
                    (f64::from(f) - d).abs() <= d.abs() * 1e-12,
                    "fixture value {d} is not an f32"
                );
                f
            }
            serde_json::Value::String(s) => match s.as_str() {
                "inf" => f32::INFINITY,
                "-inf" => f32::NEG_INFINITY,
                "nan" => f32::NAN,
                other => panic!("unexpected string {other:?} in fixture"),
            },
            other => panic!("unexpected value {other} in fixture"),
        }
    }

    fn parse_u8s(v: &serde_json::Value) -> Vec<u8> {
        v.as_array()
            .expect("array")
            .iter()
            .map(|b| u8::try_from(b.as_u64().expect("integer")).expect("byte"))
            .collect()
    }

    #[test]
    fn matches_torch_fixture() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/fixtures/core/f8.json"
        );
        let text = std::fs::read_to_string(path).expect("read f8.json fixture");
        let json: serde_json::Value = serde_json::from_str(&text).expect("parse f8.json");

        let inputs: Vec<f32> = json["inputs"]
            .as_array()
            .expect("inputs")
            .iter()
            .map(parse_f32)
            .collect();
        let e4m3 = parse_u8s(&json["e4m3fn_bits"]);
        let e5m2 = parse_u8s(&json["e5m2_bits"]);
        assert_eq!(inputs.len(), e4m3.len());
        assert_eq!(inputs.len(), e5m2.len());
        assert!(inputs.len() > 300);
        for ((&x, &want4), &want5) in inputs.iter().zip(&e4m3).zip(&e5m2) {
            assert_eq!(
                f32_to_f8e4m3(x),
                want4,
                "e4m3 of {x:e} (bits {:#010x})",
                x.to_bits()
            );
            assert_eq!(
                f32_to_f8e5m2(x),
                want5,
                "e5m2 of {x:e} (bits {:#010x})",
                x.to_bits()
            );
        }

        for (key, decode) in [
            ("e4m3fn_decode", f8e4m3_to_f32 as fn(u8) -> f32),
            ("e5m2_decode", f8e5m2_to_f32),
        ] {
            let want = json[key].as_array().expect(key);
            assert_eq!(want.len(), 256, "{key}");
            for (bits, w) in (0..=255u8).zip(want) {
                let w = parse_f32(w);
                let got = decode(bits);
                if w.is_nan() {
                    assert!(got.is_nan(), "{key}[{bits:#04x}] = {got}, want NaN");
                } else {
                    assert_eq!(
                        got.to_bits(),
                        w.to_bits(),
                        "{key}[{bits:#04x}] = {got}, want {w}"
                    );
                }
            }
        }
    }
}
