//! f32 ↔ bf16 conversion, round to nearest even: one value, or up to 32 into a tile line.

#[cfg(target_arch = "x86_64")]
use super::cpu::has_avx512f;
use super::pack::Line;

/// f32 → bf16 bits, round to nearest even; NaN stays NaN (quieted), ±inf stays ±inf.
#[inline]
pub fn f32_to_bf16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    if (b & 0x7fff_ffff) > 0x7f80_0000 {
        return ((b >> 16) | 0x40) as u16;
    }
    // Adding 0x7fff plus the lsb of the kept part rounds half to even; no overflow, since the
    // largest non-NaN pattern is 0xff80_0000.
    ((b + 0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

/// bf16 bits → f32 (exact).
#[inline]
pub fn bf16_bits_to_f32(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

/// Up to 32 f32 → one line of bf16, zero filled.
pub(super) fn convert_line(src: &[f32], dst: &mut Line) {
    #[cfg(target_arch = "x86_64")]
    if has_avx512f() {
        // SAFETY: AVX512F detected; src.len() ≤ 32 (asserted inside).
        unsafe { convert_line_avx512(src, dst) };
        return;
    }
    for (d, s) in dst
        .0
        .iter_mut()
        .zip(src.iter().chain(std::iter::repeat(&0.0)))
    {
        *d = f32_to_bf16_bits(*s);
    }
}

/// [`f32_to_bf16_bits`] on 32 lanes, bit-identical to it (vcvtne2ps2bf16 would flush subnormals).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
pub(super) unsafe fn convert_line_avx512(src: &[f32], dst: &mut Line) {
    use core::arch::x86_64::*;
    assert!(src.len() <= 32);
    let n = src.len();
    let lo_mask: __mmask16 = if n >= 16 { 0xffff } else { (1u16 << n) - 1 };
    let hi_mask: __mmask16 = if n >= 32 {
        0xffff
    } else if n > 16 {
        (1u16 << (n - 16)) - 1
    } else {
        0
    };
    let cvt = |v: __m512| -> __m256i {
        let b = _mm512_castps_si512(v);
        let lsb = _mm512_and_si512(_mm512_srli_epi32::<16>(b), _mm512_set1_epi32(1));
        let r = _mm512_srli_epi32::<16>(_mm512_add_epi32(
            b,
            _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)),
        ));
        let abs = _mm512_and_si512(b, _mm512_set1_epi32(0x7fff_ffff));
        let nan = _mm512_cmpgt_epu32_mask(abs, _mm512_set1_epi32(0x7f80_0000));
        let quiet = _mm512_or_si512(_mm512_srli_epi32::<16>(b), _mm512_set1_epi32(0x40));
        _mm512_cvtepi32_epi16(_mm512_mask_mov_epi32(r, nan, quiet))
    };
    // SAFETY: masked loads touch only the first n ≤ 32 elements of `src` (masked-out lanes never
    // fault); `dst` is a 64-byte aligned, 64-byte Line.
    unsafe {
        let p = src.as_ptr();
        let v0 = _mm512_maskz_loadu_ps(lo_mask, p);
        let v1 = _mm512_maskz_loadu_ps(hi_mask, p.wrapping_add(16));
        let d = dst.0.as_mut_ptr() as *mut __m256i;
        _mm256_store_si256(d, cvt(v0));
        _mm256_store_si256(d.add(1), cvt(v1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_rounding_is_nearest_even() {
        let h = f32_to_bf16_bits;
        assert_eq!(h(1.0), 0x3f80);
        assert_eq!(h(-2.0), 0xc000);
        assert_eq!(h(0.0), 0x0000);
        assert_eq!(h(-0.0), 0x8000);
        assert_eq!(h(3.140625), 0x4049); // exactly representable
        assert_eq!(h(std::f32::consts::PI), 0x4049); // 3.14159… → 3.140625
        let one = 1f32.to_bits();
        // Halfway cases round to the even neighbour.
        assert_eq!(h(f32::from_bits(one + 0x8000)), 0x3f80);
        assert_eq!(h(f32::from_bits(one + 0x1_8000)), 0x3f82);
        // Just above halfway rounds up, just below down.
        assert_eq!(h(f32::from_bits(one + 0x8001)), 0x3f81);
        assert_eq!(h(f32::from_bits(one + 0x7fff)), 0x3f80);
        assert_eq!(h(f32::INFINITY), 0x7f80);
        assert_eq!(h(f32::NEG_INFINITY), 0xff80);
        assert_eq!(h(f32::MAX), 0x7f80); // overflows to inf, as torch
        assert!(bf16_bits_to_f32(h(f32::NAN)).is_nan());
        // A NaN whose payload sits only in the low 16 bits must not become inf.
        assert!(bf16_bits_to_f32(h(f32::from_bits(0x7f80_0001))).is_nan());
        assert!(bf16_bits_to_f32(h(f32::from_bits(0xff80_0001))).is_nan());
        assert_eq!(bf16_bits_to_f32(0x3f81), 1.0078125);
    }

    #[test]
    fn bf16_rounding_agrees_with_half_and_the_vector_path() {
        let mut s = 0x1234_5678_9abc_def0u64;
        let bits: Vec<u32> = (0..1 << 16)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                s as u32
            })
            .chain([
                0x7f80_0001,
                0xffc0_0000,
                0x0000_8000,
                0x0000_0001,
                0x7f7f_ffff,
            ])
            .collect();
        for &b in &bits {
            let x = f32::from_bits(b);
            let ours = f32_to_bf16_bits(x);
            let theirs = half::bf16::from_f32(x);
            if x.is_nan() {
                assert!(bf16_bits_to_f32(ours).is_nan() && theirs.is_nan());
            } else {
                assert_eq!(ours, theirs.to_bits(), "{b:#x}");
            }
        }
        // The line converter (AVX-512 where present) is bit-identical to the scalar one,
        // including partial lines (zero filled).
        for chunk in bits.chunks(29) {
            let src: Vec<f32> = chunk.iter().map(|&b| f32::from_bits(b)).collect();
            for len in [src.len(), 16, 3, 0] {
                let len = len.min(src.len());
                let mut line = Line([0xffff; 32]);
                convert_line(&src[..len], &mut line);
                for (c, &got) in line.0.iter().enumerate() {
                    let want = src[..len].get(c).map_or(0, |&v| f32_to_bf16_bits(v));
                    assert_eq!(got, want);
                }
            }
        }
    }
}
