//! bf16 matrix multiply for frozen linear layers (a distillation teacher that only runs forward).
//!
//! `y = x · Wᵀ` with both operands rounded to bf16 (round to nearest even) and products
//! accumulated in f32. W is converted and packed once ([`PackedBf16`]); x is converted per call.
//!
//! Kernels, best first (see [`Kernel`]):
//! - AMX (`tdpbf16ps` on 16×16 f32 tiles, Sapphire Rapids and later), through `asm!` since the
//!   AMX intrinsics are not stable;
//! - AVX512-BF16 (`vdpbf16ps`), the fallback on CPUs without AMX or when the OS denies the tile
//!   state (or `POCL_NO_AMX=1`);
//! - portable Rust, for everything else.
//!
//! All three read the same packed layout, so one `PackedBf16` serves any kernel.
//!
//! Packed W: output columns in panels of 32 (two 16-column B tiles), k in steps of 32. For panel
//! p, step s, half t ∈ {0, 1}: one 1 KiB tile of 16 lines × 64 bytes, line r holding, for the 16
//! columns j = 32p + 16t + c, the pair (W[j, 32s + 2r], W[j, 32s + 2r + 1]). This is the VNNI
//! layout `tdpbf16ps` wants for its B operand, and also exactly what `vdpbf16ps` wants when the
//! x pair is broadcast. Panels are contiguous over k, so every kernel streams memory in order.
//!
//! Converted x (per call): rows in blocks of 32 (two 16-row A tiles); for block q, step s, half t:
//! one 1 KiB tile of 16 rows × 32 bf16 (k = 32s .. 32s + 32). Zero padded in m and k.
//!
//! Note on subnormals: AMX and `vdpbf16ps` treat subnormal bf16 inputs and outputs as zero (the
//! instructions ignore MXCSR; the portable kernel keeps them). bf16 has the f32 exponent range,
//! so this only affects values below 1.2e-38 in magnitude.

use rayon::prelude::*;
use std::cell::RefCell;
use std::sync::OnceLock;

/// k per tile step: 32 bf16 = one 64-byte line of an A tile.
const TK: usize = 32;
/// Output columns per packed panel (two 16-column B tiles).
const PANEL: usize = 32;
/// Rows per converted x block (two 16-row A tiles).
const PAIR: usize = 32;
/// Lines (64 bytes each) per tile.
const TILE: usize = 16;
/// Lines per k step of a panel or an x block: two tiles.
const STEP: usize = 2 * TILE;
/// Target size of the converted x of one group of rows: it stays in the per-core L2 (2 MiB on
/// Sapphire Rapids) next to a chunk of W while every panel of W passes over it. Larger x is
/// done group by group, so the buffer never grows much beyond this.
const A_BLOCK_BYTES: usize = 1024 << 10;

/// 64 bytes, 64-byte aligned: tile rows never straddle cache lines.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u16; 32]);

const ZERO_LINE: Line = Line([0; 32]);

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

/// Which inner kernel runs a product.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    /// AMX tiles (`tdpbf16ps`).
    Amx,
    /// AVX512-BF16 (`vdpbf16ps`).
    Avx512Bf16,
    /// Plain Rust over the bf16 values widened to f32.
    Portable,
}

impl Kernel {
    /// The fastest kernel usable here; honours `POCL_NO_AMX=1`.
    pub fn best() -> Kernel {
        static BEST: OnceLock<Kernel> = OnceLock::new();
        *BEST.get_or_init(|| {
            if amx_available() {
                Kernel::Amx
            } else if Kernel::Avx512Bf16.is_supported() {
                Kernel::Avx512Bf16
            } else {
                Kernel::Portable
            }
        })
    }

    /// Whether this CPU (and OS, for AMX) can run the kernel, regardless of `POCL_NO_AMX`.
    pub fn is_supported(self) -> bool {
        match self {
            Kernel::Amx => amx_hw(),
            Kernel::Avx512Bf16 => avx512bf16_hw(),
            Kernel::Portable => true,
        }
    }
}

/// Whether the AMX path is in use: the CPU has AMX-TILE and AMX-BF16, the OS granted the tile
/// data state (arch_prctl ARCH_REQ_XCOMP_PERM), and `POCL_NO_AMX=1` is not set. Cached.
pub fn amx_available() -> bool {
    static NO_AMX: OnceLock<bool> = OnceLock::new();
    let disabled = *NO_AMX
        .get_or_init(|| std::env::var("POCL_NO_AMX").is_ok_and(|v| !v.is_empty() && v != "0"));
    !disabled && amx_hw()
}

#[cfg(target_arch = "x86_64")]
fn amx_hw() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| {
        // cpuid leaf 7 (queried only if leaf 0 says it exists), EDX bits 22 / 24.
        let max_leaf = core::arch::x86_64::__cpuid(0).eax;
        if max_leaf < 7 {
            return false;
        }
        let edx7 = core::arch::x86_64::__cpuid_count(7, 0).edx;
        let (amx_bf16, amx_tile) = (edx7 & (1 << 22) != 0, edx7 & (1 << 24) != 0);
        if !amx_bf16 || !amx_tile {
            return false;
        }
        request_xtiledata()
    })
}

#[cfg(not(target_arch = "x86_64"))]
fn amx_hw() -> bool {
    false
}

/// Asks Linux for the AMX tile data state (process-wide; needed before the first tile
/// instruction, which would otherwise fault with SIGILL).
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn request_xtiledata() -> bool {
    const ARCH_GET_XCOMP_PERM: libc::c_long = 0x1022;
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: arch_prctl with these codes only reads/sets the process's permitted xsave
    // features; the GET variant writes one u64 through a pointer to a live local.
    unsafe {
        if libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_REQ_XCOMP_PERM,
            XFEATURE_XTILEDATA,
        ) != 0
        {
            return false;
        }
        let mut mask: u64 = 0;
        libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_GET_XCOMP_PERM,
            &mut mask as *mut u64,
        ) == 0
            && mask & (1 << XFEATURE_XTILEDATA) != 0
    }
}

#[cfg(all(target_arch = "x86_64", not(target_os = "linux")))]
fn request_xtiledata() -> bool {
    false
}

#[cfg(target_arch = "x86_64")]
fn avx512bf16_hw() -> bool {
    is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bf16")
}

#[cfg(not(target_arch = "x86_64"))]
fn avx512bf16_hw() -> bool {
    false
}

/// A weight matrix W (logically [n_out, k], y = x·Wᵀ) converted once to bf16 (RNE) and packed
/// in the tile layout described in the module docs. Half the bytes of the f32 weights (plus
/// padding of n_out to a multiple of 32 and k to a multiple of 32).
///
/// Immutable after construction, `Send + Sync`: share it (e.g. in an `Arc`) and call
/// [`PackedBf16::matmul`] from any number of threads at once. Each calling thread keeps its own
/// buffer for the converted x (at most about 1 MiB plus one 32-row block, kept between calls).
pub struct PackedBf16 {
    n_out: usize,
    k: usize,
    /// k rounded up to a multiple of [`TK`].
    steps: usize,
    /// Number of 32-column panels.
    panels: usize,
    data: Vec<Line>,
}

impl PackedBf16 {
    /// `w` row-major [n_out, k] (torch nn.Linear layout; also an embedding [vocab, d] used as
    /// the lm head).
    pub fn from_out_in(w: &[f32], n_out: usize, k: usize) -> Self {
        assert_eq!(w.len(), n_out * k, "from_out_in: w is not [n_out, k]");
        Self::pack(n_out, k, |j, l| w[j * k + l])
    }

    /// `w` row-major [k, n_out] (GPT-2 Conv1D layout).
    pub fn from_in_out(w: &[f32], k: usize, n_out: usize) -> Self {
        assert_eq!(w.len(), n_out * k, "from_in_out: w is not [k, n_out]");
        Self::pack(n_out, k, |j, l| w[l * n_out + j])
    }

    fn pack(n_out: usize, k: usize, get: impl Fn(usize, usize) -> f32 + Sync) -> Self {
        let steps = k.div_ceil(TK);
        let panels = n_out.div_ceil(PANEL);
        let panel_lines = steps * STEP;
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
                                let line = &mut panel[s * STEP + t * TILE + r].0;
                                for e in 0..2 {
                                    let l = s * TK + 2 * r + e;
                                    if l >= k {
                                        continue;
                                    }
                                    for c in 0..cols {
                                        line[2 * c + e] = f32_to_bf16_bits(get(j0 + c, l));
                                    }
                                }
                            }
                        }
                    }
                });
        }
        PackedBf16 {
            n_out,
            k,
            steps,
            panels,
            data,
        }
    }

    pub fn n_out(&self) -> usize {
        self.n_out
    }

    pub fn k(&self) -> usize {
        self.k
    }

    /// Bytes held by the packed weights.
    pub fn bytes(&self) -> usize {
        self.data.len() * std::mem::size_of::<Line>()
    }

    /// `out[i*ldo + j] = Σ_l bf16(x[i*k + l]) · bf16(W[j, l])`, accumulated in f32, for i < m,
    /// j < n_out (other elements of `out` are untouched). `x` is row-major [m, k] f32. Runs on
    /// the global rayon pool with the best kernel ([`Kernel::best`]).
    pub fn matmul(&self, x: &[f32], m: usize, out: &mut [f32], ldo: usize) {
        self.matmul_with(Kernel::best(), x, m, out, ldo)
    }

    /// [`PackedBf16::matmul`] plus `bias` [n_out] on every row, added by each task to the
    /// columns it just computed (in parallel, while they are in cache).
    pub fn matmul_bias(&self, x: &[f32], m: usize, out: &mut [f32], ldo: usize, bias: &[f32]) {
        assert_eq!(bias.len(), self.n_out, "matmul: bias length");
        self.matmul_impl(Kernel::best(), x, m, out, ldo, Some(bias))
    }

    /// [`PackedBf16::matmul`] with an explicit kernel. Panics if the CPU cannot run it.
    pub fn matmul_with(&self, kernel: Kernel, x: &[f32], m: usize, out: &mut [f32], ldo: usize) {
        self.matmul_impl(kernel, x, m, out, ldo, None)
    }

    fn matmul_impl(
        &self,
        kernel: Kernel,
        x: &[f32],
        m: usize,
        out: &mut [f32],
        ldo: usize,
        bias: Option<&[f32]>,
    ) {
        assert!(
            kernel.is_supported(),
            "bf16 kernel {kernel:?} unsupported here"
        );
        assert!(x.len() >= m * self.k, "matmul: x shorter than m·k");
        assert!(ldo >= self.n_out, "matmul: ldo < n_out");
        if m == 0 || self.n_out == 0 {
            return;
        }
        assert!(
            out.len() >= (m - 1) * ldo + self.n_out,
            "matmul: out shorter than (m-1)·ldo + n_out"
        );
        let block_lines = self.steps * STEP; // lines per 32-row x block
        if block_lines == 0 {
            // k == 0: the empty sum.
            for i in 0..m {
                let row = &mut out[i * ldo..i * ldo + self.n_out];
                match bias {
                    Some(b) => row.copy_from_slice(b),
                    None => row.fill(0.0),
                }
            }
            return;
        }
        // Rows per group: the group's converted x stays under A_BLOCK_BYTES, groups even-sized.
        let blocks = m.div_ceil(PAIR);
        let bytes = blocks * block_lines * 64;
        let groups = bytes.div_ceil(A_BLOCK_BYTES).clamp(1, blocks);
        let group_blocks = blocks.div_ceil(groups);
        let lines = group_blocks * block_lines;
        let out_ptr = OutPtr(out.as_mut_ptr());

        let run = |a: &mut Vec<Line>| {
            if a.len() < lines {
                a.resize(lines, ZERO_LINE);
            }
            for row0 in (0..m).step_by(group_blocks * PAIR) {
                let rows = (m - row0).min(group_blocks * PAIR);
                let a = &mut a[..rows.div_ceil(PAIR) * block_lines];
                convert_x(
                    &x[row0 * self.k..(row0 + rows) * self.k],
                    self.k,
                    self.steps,
                    a,
                );
                self.compute(kernel, a, rows, row0, out_ptr, ldo, bias);
            }
        };
        // The converted x lives in a buffer owned by the calling thread and reused across calls;
        // a re-entrant call (this thread running another rayon job while it waits) gets a fresh one.
        A_BUF.with(|buf| match buf.try_borrow_mut() {
            Ok(mut a) => run(&mut a),
            Err(_) => run(&mut Vec::new()),
        });
    }

    /// One group of x rows (converted in `a`, `rows` valid rows starting at output row `row0`)
    /// against all panels, split over rayon tasks by panel ranges.
    #[allow(clippy::too_many_arguments)]
    fn compute(
        &self,
        kernel: Kernel,
        a: &[Line],
        rows: usize,
        row0: usize,
        out: OutPtr,
        ldo: usize,
        bias: Option<&[f32]>,
    ) {
        let threads = rayon::current_num_threads().max(1);
        let tasks = self.panels.min(4 * threads).max(1);
        let per = self.panels.div_ceil(tasks);
        let tasks = self.panels.div_ceil(per);
        (0..tasks).into_par_iter().for_each(|t| {
            let panels = t * per..((t + 1) * per).min(self.panels);
            let job = Job {
                w: self,
                a,
                rows,
                row0,
                out,
                ldo,
            };
            match kernel {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: `kernel.is_supported()` was asserted (AMX permission granted); the
                // job's pointers are checked in `matmul_with` (see `Job`).
                Kernel::Amx => unsafe { amx::run(&job, panels.clone()) },
                #[cfg(target_arch = "x86_64")]
                // SAFETY: AVX512F + AVX512-BF16 were detected (asserted in `matmul_with`).
                Kernel::Avx512Bf16 => unsafe { dp::run(&job, panels.clone()) },
                _ => portable::run(&job, panels.clone()),
            }
            if let Some(bias) = bias {
                let (j0, j1) = (panels.start * PANEL, (panels.end * PANEL).min(self.n_out));
                for i in 0..rows {
                    // SAFETY: this task alone writes columns j0..j1 of these rows (its panels),
                    // which `matmul_impl` checked lie inside `out`; the kernel above is done
                    // with them.
                    let row = unsafe { std::slice::from_raw_parts_mut(job.out_at(i, j0), j1 - j0) };
                    row.iter_mut().zip(&bias[j0..j1]).for_each(|(o, b)| *o += b);
                }
            }
        });
    }
}

thread_local! {
    static A_BUF: RefCell<Vec<Line>> = const { RefCell::new(Vec::new()) };
}

/// Raw output pointer shared by the tasks of one call.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: tasks write disjoint (row, column) sets of `out` (each owns a range of panels), and
// the `&mut [f32]` it came from outlives the parallel section.
unsafe impl Send for OutPtr {}
// SAFETY: as for Send; the pointer is only read to compute disjoint destinations.
unsafe impl Sync for OutPtr {}

/// What a task needs: W, the converted x group, and where its rows go.
/// Invariants (checked by `matmul_with`): `a` holds `rows.div_ceil(32)` blocks of
/// `w.steps * STEP` lines; `out` is valid for writes at `(row0 + i) * ldo + j` for i < rows,
/// j < n_out.
struct Job<'a> {
    w: &'a PackedBf16,
    a: &'a [Line],
    rows: usize,
    row0: usize,
    out: OutPtr,
    ldo: usize,
}

impl Job<'_> {
    fn panel(&self, p: usize) -> &[Line] {
        let n = self.w.steps * STEP;
        &self.w.data[p * n..(p + 1) * n]
    }

    fn block(&self, q: usize) -> &[Line] {
        let n = self.w.steps * STEP;
        &self.a[q * n..(q + 1) * n]
    }

    /// Valid columns of panel p (1..=32).
    fn cols(&self, p: usize) -> usize {
        (self.w.n_out - p * PANEL).min(PANEL)
    }

    /// Valid rows of x block q (1..=32).
    fn block_rows(&self, q: usize) -> usize {
        (self.rows - q * PAIR).min(PAIR)
    }

    /// Pointer to out[(row0 + i) * ldo + j].
    fn out_at(&self, i: usize, j: usize) -> *mut f32 {
        self.out.0.wrapping_add((self.row0 + i) * self.ldo + j)
    }
}

/// Converts `x` ([rows, k] f32) to bf16 x blocks in `a` (zero padded), in parallel over blocks.
fn convert_x(x: &[f32], k: usize, steps: usize, a: &mut [Line]) {
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

#[cfg(target_arch = "x86_64")]
fn has_avx512f() -> bool {
    static AVX512: OnceLock<bool> = OnceLock::new();
    *AVX512.get_or_init(|| is_x86_feature_detected!("avx512f"))
}

/// Up to 32 f32 → one line of bf16, zero filled.
fn convert_line(src: &[f32], dst: &mut Line) {
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
unsafe fn convert_line_avx512(src: &[f32], dst: &mut Line) {
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

/// AMX: 2×2 register blocking, tmm0-3 the C tiles (A0·B0, A0·B1, A1·B0, A1·B1), tmm4-5 the two A
/// tiles of a 32-row x block, tmm6-7 the two B tiles of a 32-column panel.
#[cfg(target_arch = "x86_64")]
mod amx {
    use super::{Job, Line, PAIR, PANEL, STEP, TILE};
    use core::arch::asm;

    /// Palette 1: all eight tiles 16 rows × 64 bytes.
    #[repr(C, align(64))]
    struct TileCfg {
        palette: u8,
        start_row: u8,
        reserved: [u8; 14],
        colsb: [u16; 16],
        rows: [u8; 16],
    }

    const CFG: TileCfg = TileCfg {
        palette: 1,
        start_row: 0,
        reserved: [0; 14],
        colsb: [64, 64, 64, 64, 64, 64, 64, 64, 0, 0, 0, 0, 0, 0, 0, 0],
        rows: [16, 16, 16, 16, 16, 16, 16, 16, 0, 0, 0, 0, 0, 0, 0, 0],
    };

    /// Stride between tile rows in packed memory.
    const STRIDE: usize = 64;

    /// Panels per chunk: at most this many...
    const CHUNK: usize = 8;
    /// ...and at most this many bytes of W, so a chunk stays in L2 while every x block of the
    /// group passes over it.
    const CHUNK_BYTES: usize = 256 << 10;

    /// One C tile, for tiles that are only partly inside `out`.
    #[repr(C, align(64))]
    struct Scratch([f32; 256]);

    /// # Safety
    /// AMX usable (permission granted); `job` satisfies its invariants; `panels` within W.
    pub(super) unsafe fn run(job: &Job, panels: std::ops::Range<usize>) {
        // Tile configuration is per thread and rayon may run this on any worker, so load it here
        // (cheap next to a task's work) and release at the end so the OS need not save tiles.
        // SAFETY: CFG is a valid palette-1 config (rows ≤ 16, colsb ≤ 64); ldtilecfg reads its
        // 64 bytes.
        unsafe { asm!("ldtilecfg [{}]", in(reg) &CFG, options(nostack, readonly)) };
        let steps = job.w.steps;
        let blocks = job.rows.div_ceil(PAIR);
        // Loop order: chunk of W panels (in L2) × x block (reused across the chunk's panels) ×
        // panel. One panel at a time over all blocks measured the same on the layer shapes but
        // 1.3-1.5× slower on the lm head (W from DRAM, each x block re-read per panel).
        let chunk = (CHUNK_BYTES / (steps * STEP * 64)).clamp(1, CHUNK);
        let mut scratch = Scratch([0.0; 256]);
        let mut c0 = panels.start;
        while c0 < panels.end {
            let c1 = (c0 + chunk).min(panels.end);
            for q in 0..blocks {
                let a = job.block(q).as_ptr();
                let rows = job.block_rows(q);
                for p in c0..c1 {
                    let b = job.panel(p).as_ptr();
                    let cols = job.cols(p);
                    // SAFETY: a and b point to `steps` steps of STEP lines each (Job
                    // invariants); tiles configured above.
                    unsafe {
                        match (rows > 16, cols > 16) {
                            (true, true) => block::<true, true>(a, b, steps),
                            (true, false) => block::<true, false>(a, b, steps),
                            (false, true) => block::<false, true>(a, b, steps),
                            (false, false) => block::<false, false>(a, b, steps),
                        }
                    }
                    for (tile, ta, tb) in [(0, 0, 0), (1, 0, 1), (2, 1, 0), (3, 1, 1)] {
                        let r = rows.saturating_sub(16 * ta).min(16);
                        let c = cols.saturating_sub(16 * tb).min(16);
                        if r == 0 || c == 0 {
                            continue;
                        }
                        let dst = job.out_at(q * PAIR + 16 * ta, p * PANEL + 16 * tb);
                        if r == 16 && c == 16 {
                            // SAFETY: the 16 × 16 tile's rows are < job.rows and its columns
                            // < n_out: inside `out` (Job invariants), owned by this task (its
                            // panels).
                            unsafe { store(tile, dst, job.ldo * 4) };
                        } else {
                            // SAFETY: the scratch holds a whole tile (stride 64 bytes); only its
                            // valid r × c corner is copied to `out`, in bounds as above.
                            unsafe {
                                store(tile, scratch.0.as_mut_ptr(), 64);
                                for y in 0..r {
                                    std::ptr::copy_nonoverlapping(
                                        scratch.0.as_ptr().add(16 * y),
                                        dst.add(y * job.ldo),
                                        c,
                                    );
                                }
                            }
                        }
                    }
                }
            }
            c0 = c1;
        }
        // SAFETY: returns the tiles to the init state; no tile is used after this.
        unsafe { asm!("tilerelease", options(nostack, nomem)) };
    }

    /// C tiles = Σ_s A(s) · B(s). A1 / B1 are skipped when the second half is padding.
    ///
    /// # Safety
    /// Tiles configured; `a`, `b` valid for `steps * STEP` lines.
    #[inline(always)]
    unsafe fn block<const A2: bool, const B2: bool>(a: *const Line, b: *const Line, steps: usize) {
        // SAFETY (all asm here): tile registers are not used by compiled code; loads read 16
        // lines of 64 bytes at a, a + TILE, b, b + TILE within the current step (caller's bound).
        unsafe {
            asm!(
                "tilezero tmm0",
                "tilezero tmm1",
                "tilezero tmm2",
                "tilezero tmm3",
                options(nostack, nomem)
            );
            for s in 0..steps {
                let a0 = a.add(s * STEP);
                let b0 = b.add(s * STEP);
                let a1 = a0.add(TILE);
                let b1 = b0.add(TILE);
                if A2 && B2 {
                    asm!(
                        "tileloadd tmm4, [{a0} + {st}*1]",
                        "tileloadd tmm6, [{b0} + {st}*1]",
                        "tileloadd tmm7, [{b1} + {st}*1]",
                        "tdpbf16ps tmm0, tmm4, tmm6",
                        "tdpbf16ps tmm1, tmm4, tmm7",
                        "tileloadd tmm5, [{a1} + {st}*1]",
                        "tdpbf16ps tmm2, tmm5, tmm6",
                        "tdpbf16ps tmm3, tmm5, tmm7",
                        a0 = in(reg) a0, a1 = in(reg) a1, b0 = in(reg) b0, b1 = in(reg) b1,
                        st = in(reg) STRIDE,
                        options(nostack, readonly)
                    );
                } else if A2 {
                    asm!(
                        "tileloadd tmm4, [{a0} + {st}*1]",
                        "tileloadd tmm6, [{b0} + {st}*1]",
                        "tdpbf16ps tmm0, tmm4, tmm6",
                        "tileloadd tmm5, [{a1} + {st}*1]",
                        "tdpbf16ps tmm2, tmm5, tmm6",
                        a0 = in(reg) a0, a1 = in(reg) a1, b0 = in(reg) b0,
                        st = in(reg) STRIDE,
                        options(nostack, readonly)
                    );
                } else if B2 {
                    asm!(
                        "tileloadd tmm4, [{a0} + {st}*1]",
                        "tileloadd tmm6, [{b0} + {st}*1]",
                        "tileloadd tmm7, [{b1} + {st}*1]",
                        "tdpbf16ps tmm0, tmm4, tmm6",
                        "tdpbf16ps tmm1, tmm4, tmm7",
                        a0 = in(reg) a0, b0 = in(reg) b0, b1 = in(reg) b1,
                        st = in(reg) STRIDE,
                        options(nostack, readonly)
                    );
                } else {
                    asm!(
                        "tileloadd tmm4, [{a0} + {st}*1]",
                        "tileloadd tmm6, [{b0} + {st}*1]",
                        "tdpbf16ps tmm0, tmm4, tmm6",
                        a0 = in(reg) a0, b0 = in(reg) b0,
                        st = in(reg) STRIDE,
                        options(nostack, readonly)
                    );
                }
            }
        }
    }

    /// Stores C tile `tile` (0-3) as 16 rows of 16 f32 at `dst`, rows `stride` bytes apart.
    ///
    /// # Safety
    /// Tiles configured; `dst` valid for 16 rows of 64 bytes at that stride.
    #[inline(always)]
    unsafe fn store(tile: usize, dst: *mut f32, stride: usize) {
        // SAFETY: caller's bound on dst; tile registers hold the block's result.
        unsafe {
            match tile {
                0 => {
                    asm!("tilestored [{d} + {st}*1], tmm0", d = in(reg) dst, st = in(reg) stride, options(nostack))
                }
                1 => {
                    asm!("tilestored [{d} + {st}*1], tmm1", d = in(reg) dst, st = in(reg) stride, options(nostack))
                }
                2 => {
                    asm!("tilestored [{d} + {st}*1], tmm2", d = in(reg) dst, st = in(reg) stride, options(nostack))
                }
                _ => {
                    asm!("tilestored [{d} + {st}*1], tmm3", d = in(reg) dst, st = in(reg) stride, options(nostack))
                }
            }
        }
    }
}

/// AVX512-BF16: `vdpbf16ps` on 8 rows × 32 columns (16 zmm accumulators); a broadcast x pair
/// times a B line is exactly one VNNI step, so it reads the AMX layout unchanged.
#[cfg(target_arch = "x86_64")]
mod dp {
    use super::{Job, Line, PAIR, PANEL, STEP, TILE};
    use core::arch::x86_64::*;

    /// # Safety
    /// AVX512F and AVX512-BF16 available; `job` satisfies its invariants.
    pub(super) unsafe fn run(job: &Job, panels: std::ops::Range<usize>) {
        let blocks = job.rows.div_ceil(PAIR);
        for p in panels {
            let b = job.panel(p);
            let cols = job.cols(p);
            for q in 0..blocks {
                let a = job.block(q);
                let rows = job.block_rows(q);
                for g in 0..rows.div_ceil(8) {
                    let r = (rows - 8 * g).min(8);
                    let dst = job.out_at(q * PAIR + 8 * g, p * PANEL);
                    // SAFETY: features checked by the caller; dst rows < job.rows and columns
                    // < n_out are in `out` and owned by this task (its panel).
                    unsafe { rows8(a, b, job.w.steps, g, r, cols, dst, job.ldo) };
                }
            }
        }
    }

    /// A 512-bit integer vector viewed as 32 bf16 (same bits).
    #[inline]
    fn bh(v: __m512i) -> __m512bh {
        // SAFETY: both are plain 64-byte vectors; every bit pattern is valid for either.
        unsafe { std::mem::transmute::<__m512i, __m512bh>(v) }
    }

    /// One line as 32 bf16.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn load(l: &Line) -> __m512bh {
        // SAFETY: a Line is 64 bytes, 64-byte aligned, as the aligned load requires.
        bh(unsafe { _mm512_load_si512(l.0.as_ptr() as *const __m512i) })
    }

    /// Rows 8g .. 8g + 8 of an x block against one panel; stores `r` rows × `cols` columns.
    #[target_feature(enable = "avx512f,avx512bf16")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn rows8(
        a: &[Line],
        b: &[Line],
        steps: usize,
        g: usize,
        r: usize,
        cols: usize,
        dst: *mut f32,
        ldo: usize,
    ) {
        let mut acc = [[_mm512_setzero_ps(); 2]; 8];
        for s in 0..steps {
            // Rows 8g .. 8g + 8 of the block are lines 8g .. 8g + 8 of each step.
            let at = &a[s * STEP + 8 * g..][..8];
            let bt = &b[s * STEP..][..STEP];
            for k2 in 0..TILE {
                let (b0, b1) = (load(&bt[k2]), load(&bt[TILE + k2]));
                for i in 0..8 {
                    // The x pair (k = 2·k2, 2·k2 + 1) of row i, broadcast to all 16 lanes.
                    let pair = (at[i].0[2 * k2] as u32) | ((at[i].0[2 * k2 + 1] as u32) << 16);
                    let av = bh(_mm512_set1_epi32(pair as i32));
                    acc[i][0] = _mm512_dpbf16_ps(acc[i][0], av, b0);
                    acc[i][1] = _mm512_dpbf16_ps(acc[i][1], av, b1);
                }
            }
        }
        let mask = |c: usize| -> __mmask16 {
            if c >= 16 {
                0xffff
            } else {
                (1u16 << c) - 1
            }
        };
        let (m0, m1) = (mask(cols), mask(cols.saturating_sub(16)));
        for (i, acc) in acc.iter().enumerate().take(r) {
            // SAFETY: masked stores write only columns < cols of row i < r, in bounds (caller).
            unsafe {
                let d = dst.add(i * ldo);
                _mm512_mask_storeu_ps(d, m0, acc[0]);
                if m1 != 0 {
                    _mm512_mask_storeu_ps(d.add(16), m1, acc[1]);
                }
            }
        }
    }
}

/// Portable kernel: 4 rows × 32 columns of f32 accumulators over the widened bf16 values
/// (products of two bf16 are exact in f32, so only the accumulation rounds).
mod portable {
    use super::{bf16_bits_to_f32, Job, Line, PAIR, PANEL, STEP, TILE};

    pub(super) fn run(job: &Job, panels: std::ops::Range<usize>) {
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2") {
            // SAFETY: AVX2 detected; the body is safe Rust compiled with AVX2 enabled.
            unsafe { run_avx2(job, panels) };
            return;
        }
        run_generic(job, panels)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn run_avx2(job: &Job, panels: std::ops::Range<usize>) {
        run_generic(job, panels)
    }

    #[inline(always)]
    fn run_generic(job: &Job, panels: std::ops::Range<usize>) {
        let blocks = job.rows.div_ceil(PAIR);
        let steps = job.w.steps;
        for p in panels {
            let b = job.panel(p);
            let cols = job.cols(p);
            for q in 0..blocks {
                let a = job.block(q);
                let rows = job.block_rows(q);
                for g in 0..rows.div_ceil(4) {
                    let acc = rows4(a, b, steps, g);
                    for (y, acc) in acc.iter().enumerate().take((rows - 4 * g).min(4)) {
                        let dst = job.out_at(q * PAIR + 4 * g + y, p * PANEL);
                        // SAFETY: row < job.rows and columns < n_out are inside `out` and
                        // owned by this task (its panel); Job invariants.
                        unsafe { std::ptr::copy_nonoverlapping(acc.as_ptr(), dst, cols) };
                    }
                }
            }
        }
    }

    #[inline(always)]
    fn rows4(a: &[Line], b: &[Line], steps: usize, g: usize) -> [[f32; PANEL]; 4] {
        let mut acc = [[0f32; PANEL]; 4];
        for s in 0..steps {
            // Rows 4g .. 4g + 4 of the block are lines 4g .. 4g + 4 of each step.
            let at = &a[s * STEP + 4 * g..][..4];
            let bt = &b[s * STEP..][..STEP];
            for k2 in 0..TILE {
                let (b0, b1) = (&bt[k2].0, &bt[TILE + k2].0);
                for (acc, al) in acc.iter_mut().zip(at) {
                    let x0 = bf16_bits_to_f32(al.0[2 * k2]);
                    let x1 = bf16_bits_to_f32(al.0[2 * k2 + 1]);
                    for c in 0..16 {
                        acc[c] +=
                            x0 * bf16_bits_to_f32(b0[2 * c]) + x1 * bf16_bits_to_f32(b0[2 * c + 1]);
                        acc[16 + c] +=
                            x0 * bf16_bits_to_f32(b1[2 * c]) + x1 * bf16_bits_to_f32(b1[2 * c + 1]);
                    }
                }
            }
        }
        acc
    }
}

impl PackedBf16 {
    /// Row j of W ([n_out, k] view) as f32, unpacked: the embedding lookup of a tied embedding
    /// kept only in packed form.
    pub fn row(&self, j: usize, out: &mut [f32]) {
        assert!(j < self.n_out && out.len() >= self.k, "row: out of range");
        let (p, t, c) = (j / PANEL, (j % PANEL) / 16, j % 16);
        let panel = &self.data[p * self.steps * STEP..(p + 1) * self.steps * STEP];
        for (l, o) in out[..self.k].iter_mut().enumerate() {
            let (s, r, e) = (l / TK, (l % TK) / 2, l % 2);
            *o = bf16_bits_to_f32(panel[s * STEP + t * TILE + r].0[2 * c + e]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic values in [-1, 1) (xorshift64*).
    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..n)
            .map(|_| {
                s ^= s >> 12;
                s ^= s << 25;
                s ^= s >> 27;
                let u = (s.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 40) as f32 / (1u64 << 24) as f32;
                2.0 * u - 1.0
            })
            .collect()
    }

    fn bf(x: f32) -> f64 {
        bf16_bits_to_f32(f32_to_bf16_bits(x)) as f64
    }

    /// Kernels to test here; prints a note for the ones this CPU lacks.
    fn kernels() -> Vec<Kernel> {
        [Kernel::Amx, Kernel::Avx512Bf16, Kernel::Portable]
            .into_iter()
            .filter(|k| {
                let ok = k.is_supported();
                if !ok {
                    eprintln!("note: {k:?} unsupported on this CPU/OS, not tested");
                }
                ok
            })
            .collect()
    }

    /// Checks every kernel and both constructors against an f64 reference of the bf16-rounded
    /// inputs: error ≤ 1e-5 · Σ_l |x||w| per element (f32 accumulation).
    fn check(m: usize, k: usize, n: usize, ldo: usize) {
        let x = values(m * k, (m * 31 + k * 7 + n) as u64);
        let w = values(n * k, (n * 13 + k) as u64 + 99); // [n, k]
        let wt: Vec<f32> = (0..k * n).map(|i| w[(i % n) * k + i / n]).collect(); // [k, n]
        let p = PackedBf16::from_out_in(&w, n, k);
        let pt = PackedBf16::from_in_out(&wt, k, n);
        assert_eq!((p.n_out(), p.k(), pt.n_out(), pt.k()), (n, k, n, k));
        assert!(
            p.data.iter().zip(&pt.data).all(|(a, b)| a.0 == b.0),
            "packings differ"
        );
        let xb: Vec<f64> = x.iter().map(|&v| bf(v)).collect();
        let wb: Vec<f64> = w.iter().map(|&v| bf(v)).collect();
        let mut want = vec![0f64; m * n];
        let mut scale = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                let (xr, wr) = (&xb[i * k..][..k], &wb[j * k..][..k]);
                want[i * n + j] = xr.iter().zip(wr).map(|(a, b)| a * b).sum();
                scale[i * n + j] = xr.iter().zip(wr).map(|(a, b)| (a * b).abs()).sum();
            }
        }
        const SENTINEL: f32 = 12345.0;
        for kernel in kernels() {
            for (name, packed) in [("out_in", &p), ("in_out", &pt)] {
                let mut out = vec![SENTINEL; m * ldo];
                packed.matmul_with(kernel, &x, m, &mut out, ldo);
                for i in 0..m {
                    for j in 0..ldo {
                        let got = out[i * ldo + j];
                        if j >= n {
                            assert_eq!(got, SENTINEL, "{kernel:?} wrote past n_out");
                            continue;
                        }
                        let (e, s) = (want[i * n + j], scale[i * n + j]);
                        assert!(
                            (got as f64 - e).abs() <= 1e-5 * s + 1e-30,
                            "{kernel:?} {name} m={m} k={k} n={n} [{i},{j}]: {got} vs {e} (scale {s})"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn matches_reference_on_awkward_shapes() {
        for m in [1, 3, 16, 17, 100] {
            for k in [1, 31, 64, 768, 770] {
                for n in [1, 15, 48, 2304] {
                    check(m, k, n, n);
                }
            }
        }
    }

    #[test]
    fn matches_reference_full_size() {
        check(512, 768, 2304, 2304);
        check(512, 770, 48, 48);
        // Several x groups (converted x > A_BLOCK_BYTES).
        check(300, 3072, 48, 48);
    }

    #[test]
    fn matches_reference_vocab() {
        check(1, 64, 50257, 50257);
        check(3, 770, 50257, 50257);
    }

    #[test]
    fn leading_dimension_larger_than_n_out() {
        check(17, 31, 15, 20);
        check(100, 770, 48, 53);
    }

    #[test]
    fn empty_inputs() {
        let p = PackedBf16::from_out_in(&[], 4, 0);
        let mut out = vec![1.0; 8];
        for kernel in kernels() {
            p.matmul_with(kernel, &[], 2, &mut out, 4);
            assert_eq!(out, vec![0.0; 8]);
            p.matmul_with(kernel, &[], 0, &mut [], 4);
        }
    }

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

    #[test]
    fn packed_weights_are_shareable() {
        fn check<T: Send + Sync>() {}
        check::<PackedBf16>();
    }

    #[test]
    fn matmul_runs_the_best_kernel() {
        let (m, k, n) = (5, 40, 33);
        let (x, w) = (values(m * k, 1), values(n * k, 2));
        let p = PackedBf16::from_out_in(&w, n, k);
        let (mut a, mut b) = (vec![0.0; m * n], vec![0.0; m * n]);
        p.matmul(&x, m, &mut a, n);
        p.matmul_with(Kernel::best(), &x, m, &mut b, n);
        assert_eq!(a, b);
        assert_eq!(Kernel::best() == Kernel::Amx, amx_available());
    }

    #[test]
    fn bias_is_added_to_every_row_by_the_tasks() {
        // Several panels and tasks (n = 200 over 32-column panels), a strided output, and the
        // empty-k case that only writes the bias.
        for (m, k, n, ldo) in [(37, 40, 200, 203), (3, 0, 70, 70)] {
            let (x, w, bias) = (values(m * k, 3), values(n * k, 4), values(n, 5));
            let p = PackedBf16::from_out_in(&w, n, k);
            let (mut plain, mut biased) = (vec![7.0; m * ldo], vec![7.0; m * ldo]);
            p.matmul(&x, m, &mut plain, ldo);
            p.matmul_bias(&x, m, &mut biased, ldo, &bias);
            for i in 0..m {
                for j in 0..ldo {
                    let want = if j < n {
                        plain[i * ldo + j] + bias[j]
                    } else {
                        7.0
                    };
                    assert_eq!(biased[i * ldo + j], want, "({i}, {j}) of [{m}, {n}]");
                }
            }
        }
    }

    #[test]
    fn amx_is_reported_consistently() {
        // POCL_NO_AMX may be set by whoever runs the tests; amx_available never exceeds support.
        assert!(!amx_available() || Kernel::Amx.is_supported());
        if !Kernel::Amx.is_supported() {
            eprintln!("note: no AMX here (CPU or OS); AMX kernel not tested");
        }
    }

    #[test]
    fn rows_unpack_the_rounded_weights() {
        let (n, k) = (45, 70);
        let w: Vec<f32> = (0..n * k).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
        let p = PackedBf16::from_out_in(&w, n, k);
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
