//! Packed bf16 weights borrowed from memory that already holds them packed
//! ([`PackedBf16::from_words`], an artifact's weights): the same products and the same matrix
//! as the weights packed here, and words that [`PackedBf16::pack`] could not have made (wrong
//! length, non-zero padding) refused.

use half::bf16;
use kiln_kernels::gemm_bf16::{matmul_bf16_with, PackedBf16, PackedWords, NR};
use std::sync::Arc;
mod common;

use common::{isas, random, rng};

#[derive(Debug)]
struct Held(Vec<u32>);

impl PackedWords for Held {
    fn words(&self) -> &[u32] {
        &self.0
    }
}

fn borrowed(n: usize, k: usize, words: Vec<u32>) -> Result<PackedBf16, String> {
    PackedBf16::from_words(n, k, Arc::new(Held(words))).map_err(|e| e.to_string())
}

#[test]
fn borrowed_words_compute_what_packed_ones_do() {
    let mut r = rng(8);
    for (m, n, k) in [(1, 1, 1), (3, 33, 7), (9, 64, 48), (2, 70, 33)] {
        let w: Vec<bf16> = random(&mut r, n * k, -1.0, 1.0)
            .into_iter()
            .map(bf16::from_f32)
            .collect();
        let packed = PackedBf16::pack(n, k, &w).unwrap();
        assert!(!packed.is_borrowed());
        assert_eq!(packed.words().len(), PackedBf16::words_for(n, k).unwrap());
        let shared = borrowed(n, k, packed.words().to_vec()).unwrap();
        assert!(shared.is_borrowed());
        assert_eq!(
            (shared.n(), shared.k(), shared.bytes()),
            (n, k, packed.bytes())
        );
        let bits = |v: &[bf16]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&shared.unpack()), bits(&w), "{n}x{k} unpacks exactly");
        let a = random(&mut r, m * k, -1.0, 1.0);
        for isa in isas() {
            let (mut c1, mut c2) = (vec![f32::NAN; m * n], vec![f32::NAN; m * n]);
            matmul_bf16_with(isa, m, &a, &packed, &mut c1).unwrap();
            matmul_bf16_with(isa, m, &a, &shared, &mut c2).unwrap();
            assert_eq!(c1, c2, "{m}x{n}x{k} at {}", isa.name());
        }
    }
}

#[test]
fn words_packing_could_not_make_are_refused() {
    // 33 x 5: one full panel and one of a single column; k odd (3 pairs, the last half empty).
    let (n, k) = (33, 5);
    let w = vec![bf16::ONE; n * k];
    let good = PackedBf16::pack(n, k, &w).unwrap().words().to_vec();
    assert_eq!(good.len(), 2 * 3 * NR);
    assert!(borrowed(n, k, good.clone()).is_ok());
    let e = borrowed(n, k, good[1..].to_vec()).unwrap_err();
    assert!(e.contains("needs 192 words, not 191"), "{e}");
    assert!(borrowed(n + 32, k, good.clone()).is_err(), "too few words");
    assert!(borrowed(usize::MAX, usize::MAX, good.clone()).is_err());
    // A column past n in the last panel.
    let mut bad = good.clone();
    bad[3 * NR + 5] = 1;
    let e = borrowed(n, k, bad).unwrap_err();
    assert!(e.contains("non-zero padding"), "{e}");
    // The odd k index past k, in the first panel's last pair.
    let mut bad = good.clone();
    bad[2 * NR + 4] |= 0x3f80 << 16;
    assert!(borrowed(n, k, bad)
        .unwrap_err()
        .contains("non-zero padding"));
    // Real elements may be anything.
    let mut fine = good;
    fine[2 * NR + 4] = 0xffff;
    assert!(borrowed(n, k, fine).is_ok());
}
