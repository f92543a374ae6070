//! The tile layout described in the `ops::bf16` module docs: W packed once, x converted per
//! call, one row of W unpacked.

#[cfg(target_arch = "x86_64")]
use super::convert::convert_line_avx512;
use super::convert::{bf16_bits_to_f32, convert_line, f32_to_bf16_bits};
#[cfg(target_arch = "x86_64")]
use super::cpu::has_avx512f;
use super::{Element, Packed};
use rayon::prelude::*;

/// k per tile step: 32 bf16 = one 64-byte line of an A tile.
pub(super) const TK: usize = 32;
/// Output columns per packed panel (two 16-column B tiles).
pub(super) const PANEL: usize = 32;
/// Rows per converted x block (two 16-row A tiles).
pub(super) const PAIR: usize = 32;
/// Lines (64 bytes each) per tile.
pub(super) const TILE: usize = 16;
/// Lines per k step of a panel or an x block: two tiles.
pub(super) const STEP: usize = 2 * TILE;

/// 64 bytes, 64-byte aligned: tile rows never straddle cache lines. A bf16 line holds 32 bf16;
/// an f32 line 16 f32, each as its two little-endian halves (what a vector load reads).
#[derive(Clone, Copy)]
#[repr(C, align(64))]
pub(super) struct Line(pub(super) [u16; 32]);

pub(super) const ZERO_LINE: Line = Line([0; 32]);

impl Packed {
    pub(super) fn pack(
        n_out: usize,
        k: usize,
        element: Element,
        get: impl Fn(usize, usize) -> f32 + Sync,
    ) -> Self {
        let steps = k.div_ceil(TK);
        let panels = n_out.div_ceil(PANEL);
        let panel_lines = steps * step_lines(element);
        let mut data = vec![ZERO_LINE; panels * panel_lines];
        if panel_lines > 0 {
            data.par_chunks_mut(panel_lines)
                .enumerate()
                .for_each(|(p, panel)| {
                    for s in 0..steps {
                        for t in 0..2 {
                            let j0 = p * PANEL + t * 16;
                            let cols = n_out.saturating_sub(j0).min(16);
                            for r in 0..TILE {
                                for e in 0..2 {
                                    let l = s * TK + 2 * r + e;
                                    if l >= k {
                                        continue;
                                    }
                                    for c in 0..cols {
                                        let v = get(j0 + c, l);
                                        match element {
                                            Element::Bf16 => {
                                                let line = &mut panel[s * STEP + t * TILE + r].0;
                                                line[2 * c + e] = f32_to_bf16_bits(v);
                                            }
                                            Element::F32 => {
                                                let i = s * 2 * STEP + 4 * r + 2 * e + t;
                                                set_f32(&mut panel[i], c, v);
                                            }
                                        }
                                    }
                                }
                            }
                        }
                    }
                });
        }
        Packed {
            n_out,
            k,
            element,
            steps,
            panels,
            data,
        }
    }

    /// f32 panels of W, [n_out, k] row-major when `out_in`, else [k, n_out]. In f32 a panel's
    /// line s·2·STEP + 4r + 2e + t holds k = s·TK + 2r + e for columns 16t..16t + 16, so the
    /// panel, read as f32, is W's 32 columns as a [steps·TK, 32] row-major block: a copy of
    /// rows (in_out) or a transpose (out_in), instead of [`Packed::pack`]'s element-wise
    /// calls (the student's dx products pack W on every backward).
    pub(super) fn pack_f32(n_out: usize, k: usize, w: &[f32], out_in: bool) -> Self {
        if cfg!(target_endian = "big") {
            // Lines hold an f32 as its little-endian halves; the block view needs them native.
            let get = |j: usize, l: usize| {
                if out_in {
                    w[j * k + l]
                } else {
                    w[l * n_out + j]
                }
            };
            return Self::pack(n_out, k, Element::F32, get);
        }
        let steps = k.div_ceil(TK);
        let panels = n_out.div_ceil(PANEL);
        let panel_lines = steps * step_lines(Element::F32);
        let mut data = vec![ZERO_LINE; panels * panel_lines];
        if panel_lines > 0 {
            data.par_chunks_mut(panel_lines)
                .enumerate()
                .for_each(|(p, panel)| {
                    // SAFETY: a Line is 64 bytes of plain integers, 64-byte aligned: the panel
                    // is 16·len f32 of any bit pattern, borrowed mutably once here.
                    let f = unsafe {
                        std::slice::from_raw_parts_mut(
                            panel.as_mut_ptr() as *mut f32,
                            16 * panel.len(),
                        )
                    };
                    let (j0, cols) = (p * PANEL, (n_out - p * PANEL).min(PANEL));
                    if out_in {
                        // 32 k at a time, so the block written stays in L1.
                        for l0 in (0..k).step_by(TK) {
                            let kl = (k - l0).min(TK);
                            for c in 0..cols {
                                let row = &w[(j0 + c) * k + l0..][..kl];
                                for (dl, &v) in row.iter().enumerate() {
                                    f[(l0 + dl) * PANEL + c] = v;
                                }
                            }
                        }
                    } else {
                        for l in 0..k {
                            f[l * PANEL..l * PANEL + cols]
                                .copy_from_slice(&w[l * n_out + j0..][..cols]);
                        }
                    }
                });
        }
        Packed {
            n_out,
            k,
            element: Element::F32,
            steps,
            panels,
            data,
        }
    }

    /// Row j of W ([n_out, k] view) as f32, unpacked: the embedding lookup of a tied embedding
    /// kept only in packed form.
    pub fn row(&self, j: usize, out: &mut [f32]) {
        assert!(j < self.n_out && out.len() >= self.k, "row: out of range");
        let (p, t, c) = (j / PANEL, (j % PANEL) / 16, j % 16);
        let n = self.steps * step_lines(self.element);
        let panel = &self.data[p * n..(p + 1) * n];
        for (l, o) in out[..self.k].iter_mut().enumerate() {
            let (s, r, e) = (l / TK, (l % TK) / 2, l % 2);
            *o = match self.element {
                Element::Bf16 => bf16_bits_to_f32(panel[s * STEP + t * TILE + r].0[2 * c + e]),
                Element::F32 => get_f32(&panel[s * 2 * STEP + 4 * r + 2 * e + t], c),
            };
        }
    }
}

/// Lines per k step of a panel: two bf16 tiles, or twice that in f32.
pub(super) fn step_lines(element: Element) -> usize {
    match element {
        Element::Bf16 => STEP,
        Element::F32 => 2 * STEP,
    }
}

/// Lane c of a line read as 16 f32 (little-endian halves: what a vector load of the line sees).
pub(super) fn get_f32(line: &Line, c: usize) -> f32 {
    f32::from_bits(line.0[2 * c] as u32 | (line.0[2 * c + 1] as u32) << 16)
}

fn set_f32(line: &mut Line, c: usize, v: f32) {
    let b = v.to_bits();
    line.0[2 * c] = b as u16;
    line.0[2 * c + 1] = (b >> 16) as u16;
}

/// Converts `x` ([rows, k] f32) to bf16 x blocks in `a` (zero padded), in parallel over blocks.
pub(super) fn convert_x(x: &[f32], k: usize, steps: usize, a: &mut [Line]) {
    let rows = x.len() / k.max(1);
    a.par_chunks_mut(steps * STEP)
        .enumerate()
        .for_each(|(q, block)| {
            // Row rr of the block sits in tile rr / 16, line rr % 16: line rr of each step.
            for rr in 0..PAIR {
                let i = q * PAIR + rr;
                if i < rows {
                    convert_row(&x[i * k..(i + 1) * k], block, rr, steps);
                } else {
                    for s in 0..steps {
                        block[rr + s * STEP] = ZERO_LINE;
                    }
                }
            }
        });
}

/// One x row (k values) → its `steps` lines `block[off + s * STEP]`, zero padded past k.
fn convert_row(src: &[f32], block: &mut [Line], off: usize, steps: usize) {
    assert!(off + (steps - 1) * STEP < block.len() && src.len() <= steps * TK);
    #[cfg(target_arch = "x86_64")]
    if has_avx512f() {
        // SAFETY: AVX512F detected; bounds asserted above.
        unsafe { convert_row_avx512(src, block, off, steps) };
        return;
    }
    for s in 0..steps {
        let chunk = &src[(s * TK).min(src.len())..(s * TK + TK).min(src.len())];
        convert_line(chunk, &mut block[off + s * STEP]);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn convert_row_avx512(src: &[f32], block: &mut [Line], off: usize, steps: usize) {
    for s in 0..steps {
        let chunk = &src[(s * TK).min(src.len())..(s * TK + TK).min(src.len())];
        // SAFETY: AVX512F enabled here; chunk.len() ≤ 32.
        unsafe { convert_line_avx512(chunk, &mut block[off + s * STEP]) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_unpack_the_f32_weights_exactly() {
        let (n, k) = (45, 70);
        let w: Vec<f32> = (0..n * k).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
        let p = Packed::out_in(&w, n, k, Element::F32);
        let mut row = vec![0f32; k];
        for j in 0..n {
            p.row(j, &mut row);
            assert_eq!(row, w[j * k..(j + 1) * k], "row {j}");
        }
    }

    /// The f32 block copies lay out exactly what the element-wise packer's definition does,
    /// from either source layout, on partial panels and a partial last k step (the padding
    /// included: the whole buffers are compared).
    #[test]
    fn f32_panels_match_the_element_wise_packer() {
        for (n, k) in [(45, 70), (32, 32), (1, 1), (70, 33)] {
            let w: Vec<f32> = (0..n * k).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
            let wt: Vec<f32> = (0..k * n).map(|i| w[(i % n) * k + i / n]).collect();
            let spec = Packed::pack(n, k, Element::F32, |j, l| w[j * k + l]);
            let bits = |p: &Packed| p.data.iter().flat_map(|l| l.0).collect::<Vec<u16>>();
            let out_in = Packed::out_in(&w, n, k, Element::F32);
            let in_out = Packed::in_out(&wt, k, n, Element::F32);
            assert!(bits(&out_in) == bits(&spec), "out_in [{n}, {k}]");
            assert!(bits(&in_out) == bits(&spec), "in_out [{n}, {k}]");
        }
    }

    #[test]
    fn rows_unpack_the_rounded_weights() {
        let (n, k) = (45, 70);
        let w: Vec<f32> = (0..n * k).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
        let p = Packed::bf16_out_in(&w, n, k);
        let mut row = vec![0f32; k];
        for j in [0, 15, 16, 31, 32, 44] {
            p.row(j, &mut row);
            for l in 0..k {
                assert_eq!(
                    row[l],
                    bf16_bits_to_f32(f32_to_bf16_bits(w[j * k + l])),
                    "({j}, {l})"
                );
            }
        }
    }
}
