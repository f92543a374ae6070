//! Matrix multiply for frozen linear layers (a distillation teacher that only runs forward), W
//! packed once ([`Packed`]): in bf16, or in f32 for an f32 teacher.
//!
//! bf16: `y = x · Wᵀ` with both operands rounded to bf16 (round to nearest even) and products
//! accumulated in f32; x is converted per call. f32 ([`Element::F32`]): the f32-widen kernel's
//! register tiles and summation order on f32 panels (no rounding anywhere), so a frozen f32
//! teacher skips the gemm crate's per-call packing of W.
//!
//! Kernels, best first (see [`Kernel`]; chosen once per process by [`selected_kernel`] from the
//! CPU's features, or forced with `POCL_BF16_KERNEL=amx|avx512bf16|f32-widen|portable`):
//! - AMX (`tdpbf16ps` on 16×16 f32 tiles, Sapphire Rapids and later), through `asm!` since the
//!   AMX intrinsics are not stable;
//! - AVX512-BF16 (`vdpbf16ps`), the fallback on CPUs without AMX or when the OS denies the tile
//!   state (or `POCL_NO_AMX=1`);
//! - f32-widen, on CPUs without a bf16 dot-product instruction: W widened to f32 in registers,
//!   x kept in f32, f32 FMAs (AVX-512F or AVX2 + FMA; aarch64), so bf16 weights cost half the
//!   memory and no speed against f32;
//! - portable Rust, for everything else (and the reference).
//!
//! All four read the same packed layout, so one bf16 `Packed` serves any kernel.
//!
//! Packed W: output columns in panels of 32 (two 16-column B tiles), k in steps of 32. For panel
//! p, step s, half t ∈ {0, 1}: one 1 KiB tile of 16 lines × 64 bytes, line r holding, for the 16
//! columns j = 32p + 16t + c, the pair (W[j, 32s + 2r], W[j, 32s + 2r + 1]). This is the VNNI
//! layout `tdpbf16ps` wants for its B operand, and also exactly what `vdpbf16ps` wants when the
//! x pair is broadcast. Panels are contiguous over k, so every kernel streams memory in order.
//!
//! f32 panels: the same panels and steps with twice the lines: for panel p, step s, pair r, the
//! four lines 4r + 2e + t hold W[32p + 16t + c, 32s + 2r + e] for the 16 columns c (e: the even
//! or odd k of the pair, t: the half). The f32 kernel thus reads a pair's four vectors from 256
//! contiguous bytes and sums in f32-widen's order.
//!
//! Converted x (per call): rows in blocks of 32 (two 16-row A tiles); for block q, step s, half t:
//! one 1 KiB tile of 16 rows × 32 bf16 (k = 32s .. 32s + 32). Zero padded in m and k.
//!
//! Note on subnormals: AMX and `vdpbf16ps` treat subnormal bf16 inputs and outputs as zero (the
//! instructions ignore MXCSR; the portable kernel keeps them). bf16 has the f32 exponent range,
//! so this only affects values below 1.2e-38 in magnitude.
//!
//! Where things are:
//! - this file: [`Packed`], its constructors and the `matmul` entry points;
//! - `convert`: f32 ↔ bf16 rounding (scalar, and 32 values at a time into a tile line);
//! - `cpu`: which kernels this CPU and OS can run, and the one chosen ([`Kernel`],
//!   [`selected_kernel`], [`amx_available`]);
//! - `pack`: the layouts above (W packed once, x converted per call, a row unpacked);
//! - `matmul`: one product's driver (checks, per-thread x buffer, panels split over rayon
//!   tasks, the `Job` a kernel gets);
//! - `amx`, `avx512bf16`, `widen`, `portable`: the four kernels (`widen` also the f32 one).

#[cfg(target_arch = "x86_64")]
mod amx;
#[cfg(target_arch = "x86_64")]
mod avx512bf16;
mod convert;
mod cpu;
mod matmul;
mod pack;
mod portable;
mod widen;

pub use convert::{bf16_bits_to_f32, f32_to_bf16_bits};
pub use cpu::{amx_available, selected_kernel, Kernel, KernelError, KERNEL_ENV};

use pack::Line;

/// What a [`Packed`] matrix holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Element {
    /// bf16 (RNE), for the bf16 kernels ([`Kernel`]).
    Bf16,
    /// f32 as given, for the f32 kernel: f32-widen's register tiles without the widening (a
    /// frozen f32 teacher: the gemm crate packs W again on every call, 154 MB for GPT-2's tied
    /// head per chunk of rows, and its per-call packing is what this kernel saves).
    F32,
}

/// A frozen weight matrix W (logically [n_out, k], y = x·Wᵀ) packed once in the panel layout
/// described in the module docs: bf16 (RNE; half the bytes of the f32 weights) or f32 (the same
/// bytes), plus padding of n_out to a multiple of 32 and k to a multiple of 32.
///
/// Immutable after construction, `Send + Sync`: share it (e.g. in an `Arc`) and call
/// [`Packed::matmul`] from any number of threads at once. Each calling thread keeps its own
/// buffer for the converted x (at most about 1 MiB plus one 32-row block, kept between calls).
pub struct Packed {
    n_out: usize,
    k: usize,
    element: Element,
    /// k rounded up to a multiple of [`pack::TK`].
    steps: usize,
    /// Number of 32-column panels.
    panels: usize,
    data: Vec<Line>,
}

impl Packed {
    /// bf16 from `w` row-major [n_out, k] (torch nn.Linear layout; also an embedding
    /// [vocab, d] used as the lm head).
    pub fn bf16_out_in(w: &[f32], n_out: usize, k: usize) -> Self {
        Self::out_in(w, n_out, k, Element::Bf16)
    }

    /// bf16 from `w` row-major [k, n_out] (GPT-2 Conv1D layout).
    pub fn bf16_in_out(w: &[f32], k: usize, n_out: usize) -> Self {
        Self::in_out(w, k, n_out, Element::Bf16)
    }

    /// `w` row-major [n_out, k] as `element`.
    pub fn out_in(w: &[f32], n_out: usize, k: usize, element: Element) -> Self {
        assert_eq!(w.len(), n_out * k, "Packed::out_in: w is not [n_out, k]");
        match element {
            Element::F32 => Self::pack_f32(n_out, k, w, true),
            Element::Bf16 => Self::pack(n_out, k, element, |j, l| w[j * k + l]),
        }
    }

    /// `w` row-major [k, n_out] as `element`.
    pub fn in_out(w: &[f32], k: usize, n_out: usize, element: Element) -> Self {
        assert_eq!(w.len(), n_out * k, "Packed::in_out: w is not [k, n_out]");
        match element {
            Element::F32 => Self::pack_f32(n_out, k, w, false),
            Element::Bf16 => Self::pack(n_out, k, element, |j, l| w[l * n_out + j]),
        }
    }

    /// Whether this CPU runs the f32 kernel (the f32-widen variants' features: AVX-512F, or
    /// AVX2 + FMA, or aarch64).
    pub fn f32_supported() -> bool {
        Kernel::F32Widen.is_supported()
    }

    /// Whether f32 matrices are multiplied faster packed than by the `gemm` crate here, which
    /// decides where pocl packs them (an f32 teacher, the student's dx products): only with
    /// the AVX-512 variant. Measured on a Zen 4 with the crate's AVX2 kernels (PERFORMANCE.md,
    /// "An AVX2-only CPU"): f32 panels with the AVX2 + FMA variant ran the teacher's shapes at
    /// 176-212 GFLOP/s against the crate's 143-208, ahead on the lm head and behind at
    /// k = 3072; no clear gain, so on CPUs without AVX-512 (and on aarch64, unmeasured) f32
    /// matrices stay f32 tensors.
    pub fn f32_preferred() -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            cpu::has_avx512f()
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    }

    pub fn element(&self) -> Element {
        self.element
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
    /// j < n_out (other elements of `out` are untouched; f32-widen does not round x; an f32
    /// matrix rounds nothing). `x` is row-major [m, k] f32. Runs on the global rayon pool with
    /// the selected kernel ([`Kernel::best`]) for bf16, the f32 kernel for f32.
    pub fn matmul(&self, x: &[f32], m: usize, out: &mut [f32], ldo: usize) {
        self.matmul_with(self.best_kernel(), x, m, out, ldo)
    }

    /// The selected bf16 kernel for bf16; the f32 kernel for f32, whatever `POCL_BF16_KERNEL`
    /// says (it chooses among bf16 kernels only).
    fn best_kernel(&self) -> Kernel {
        match self.element {
            Element::Bf16 => Kernel::best(),
            Element::F32 => Kernel::F32Widen,
        }
    }

    /// [`Packed::matmul`] plus `bias` [n_out] on every row, added by each task to the
    /// columns it just computed (in parallel, while they are in cache).
    pub fn matmul_bias(&self, x: &[f32], m: usize, out: &mut [f32], ldo: usize, bias: &[f32]) {
        assert_eq!(bias.len(), self.n_out, "matmul: bias length");
        self.matmul_impl(self.best_kernel(), x, m, out, ldo, Some(bias))
    }

    /// [`Packed::matmul`] with an explicit bf16 kernel (an f32 matrix always runs the f32
    /// kernel). Panics if the CPU cannot run it.
    pub fn matmul_with(&self, kernel: Kernel, x: &[f32], m: usize, out: &mut [f32], ldo: usize) {
        self.matmul_impl(kernel, x, m, out, ldo, None)
    }

    /// [`Packed::matmul_bias`] with an explicit bf16 kernel, as [`Packed::matmul_with`].
    pub fn matmul_bias_with(
        &self,
        kernel: Kernel,
        x: &[f32],
        m: usize,
        out: &mut [f32],
        ldo: usize,
        bias: &[f32],
    ) {
        assert_eq!(bias.len(), self.n_out, "matmul: bias length");
        self.matmul_impl(kernel, x, m, out, ldo, Some(bias))
    }
}

#[cfg(test)]
mod tests {
    use super::Packed;

    #[test]
    fn packed_weights_are_shareable() {
        fn check<T: Send + Sync>() {}
        check::<Packed>();
    }
}
