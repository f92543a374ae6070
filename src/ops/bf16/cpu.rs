//! What this CPU (and OS) can run, and which bf16 kernel this process uses: chosen once, at the
//! first product (or at start-up, where the CLI asks [`selected_kernel`]), from the CPU's
//! features, or forced by `POCL_BF16_KERNEL` for tests and benchmarks.

use std::sync::OnceLock;

/// Which inner kernel runs a product.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    /// AMX tiles (`tdpbf16ps`).
    Amx,
    /// AVX512-BF16 (`vdpbf16ps`).
    Avx512Bf16,
    /// No bf16 arithmetic: the packed bf16 weights are widened to f32 in registers and
    /// multiplied with the f32 x by f32 FMAs (AVX-512F, or AVX2 + FMA; NEON on aarch64). Half
    /// the weight memory at f32 speed on CPUs without a bf16 dot-product instruction; x is not
    /// rounded to bf16, so this path is the closest to f32 of all.
    F32Widen,
    /// Plain Rust over the bf16 values widened to f32 (the reference; any CPU).
    Portable,
}

/// The environment variable that forces a kernel (one of [`Kernel::name`]).
pub const KERNEL_ENV: &str = "POCL_BF16_KERNEL";

/// A forced kernel this process cannot use (an unknown name, or one the CPU cannot run).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelError(String);

impl std::fmt::Display for KernelError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for KernelError {}

impl Kernel {
    /// Every kernel, fastest first.
    pub const ALL: [Kernel; 4] = [
        Kernel::Amx,
        Kernel::Avx512Bf16,
        Kernel::F32Widen,
        Kernel::Portable,
    ];

    /// The name printed by `pocl bench` and accepted by `POCL_BF16_KERNEL`.
    pub fn name(self) -> &'static str {
        match self {
            Kernel::Amx => "amx",
            Kernel::Avx512Bf16 => "avx512bf16",
            Kernel::F32Widen => "f32-widen",
            Kernel::Portable => "portable",
        }
    }

    /// The kernel called `name` ([`Kernel::name`]), if any.
    pub fn from_name(name: &str) -> Option<Kernel> {
        Kernel::ALL.into_iter().find(|k| k.name() == name)
    }

    /// The kernel this process uses ([`selected_kernel`]). Panics, with the message of
    /// [`KernelError`], if `POCL_BF16_KERNEL` names an unknown kernel or one this CPU cannot
    /// run; the CLI checks [`selected_kernel`] at start-up, so a user sees that as an error line.
    pub fn best() -> Kernel {
        selected_kernel().unwrap_or_else(|e| panic!("{e}"))
    }

    /// The fastest kernel this CPU and OS can run (AMX, then AVX512-BF16, then f32-widen, then
    /// portable), leaving out AMX when `no_amx`. No environment is read here.
    pub fn detect(no_amx: bool) -> Kernel {
        Kernel::ALL
            .into_iter()
            .find(|k| k.is_supported() && !(no_amx && *k == Kernel::Amx))
            .unwrap_or(Kernel::Portable)
    }

    /// Whether this CPU (and OS, for AMX) can run the kernel, regardless of the environment.
    pub fn is_supported(self) -> bool {
        match self {
            Kernel::Amx => amx_hw(),
            Kernel::Avx512Bf16 => avx512bf16_hw(),
            Kernel::F32Widen => f32_widen_hw(),
            Kernel::Portable => true,
        }
    }
}

impl std::fmt::Display for Kernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The bf16 kernel this process uses, decided once: `POCL_BF16_KERNEL` if set (`amx`,
/// `avx512bf16`, `f32-widen` or `portable`; an unknown name or a kernel this CPU cannot run is
/// an error), else the fastest this CPU runs ([`Kernel::detect`]; `POCL_NO_AMX=1` leaves out
/// AMX). `pocl bench` prints its [`Kernel::name`].
pub fn selected_kernel() -> Result<Kernel, KernelError> {
    static CHOICE: OnceLock<Result<Kernel, KernelError>> = OnceLock::new();
    CHOICE
        .get_or_init(|| {
            let forced = std::env::var(KERNEL_ENV).ok();
            let no_amx = std::env::var("POCL_NO_AMX").is_ok_and(|v| !v.is_empty() && v != "0");
            choose(forced.as_deref(), no_amx)
        })
        .clone()
}

/// [`selected_kernel`]'s rule, on explicit inputs (testable without the environment).
fn choose(forced: Option<&str>, no_amx: bool) -> Result<Kernel, KernelError> {
    let Some(name) = forced.map(str::trim).filter(|n| !n.is_empty()) else {
        return Ok(Kernel::detect(no_amx));
    };
    let names = || {
        Kernel::ALL
            .iter()
            .map(|k| k.name())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let kernel = Kernel::from_name(&name.to_ascii_lowercase()).ok_or_else(|| {
        KernelError(format!(
            "{KERNEL_ENV}={name:?} is not a bf16 kernel; use one of: {}",
            names()
        ))
    })?;
    if !kernel.is_supported() {
        let runnable: Vec<_> = Kernel::ALL
            .iter()
            .filter(|k| k.is_supported())
            .map(|k| k.name())
            .collect();
        return Err(KernelError(format!(
            "{KERNEL_ENV}={name}: this CPU (or OS) cannot run the {name} kernel; it can run: {}",
            runnable.join(", ")
        )));
    }
    Ok(kernel)
}

/// Whether the AMX path is in use: the selected kernel ([`selected_kernel`]) is AMX, i.e. the
/// CPU has AMX-TILE and AMX-BF16, the OS granted the tile data state (arch_prctl
/// ARCH_REQ_XCOMP_PERM), and neither `POCL_NO_AMX=1` nor `POCL_BF16_KERNEL` chose another.
pub fn amx_available() -> bool {
    selected_kernel() == Ok(Kernel::Amx)
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

/// f32-widen: f32 FMAs in 512-bit or 256-bit vectors (x86), or NEON (aarch64, always there).
#[cfg(target_arch = "x86_64")]
fn f32_widen_hw() -> bool {
    has_avx512f() || (is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))
}

#[cfg(target_arch = "aarch64")]
fn f32_widen_hw() -> bool {
    true
}

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
fn f32_widen_hw() -> bool {
    false
}

#[cfg(target_arch = "x86_64")]
pub(super) fn has_avx512f() -> bool {
    static AVX512: OnceLock<bool> = OnceLock::new();
    *AVX512.get_or_init(|| is_x86_feature_detected!("avx512f"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amx_is_reported_consistently() {
        // POCL_NO_AMX may be set by whoever runs the tests; amx_available never exceeds support.
        assert!(!amx_available() || Kernel::Amx.is_supported());
        if !Kernel::Amx.is_supported() {
            eprintln!("note: no AMX here (CPU or OS); AMX kernel not tested");
        }
    }

    #[test]
    fn the_choice_follows_the_cpu_unless_forced() {
        let detected = Kernel::detect(false);
        assert!(detected.is_supported());
        assert_eq!(choose(None, false), Ok(detected));
        assert_eq!(choose(Some(""), false), Ok(detected));
        assert_ne!(choose(None, true), Ok(Kernel::Amx));
        // Without a bf16 instruction the default is never the slow portable kernel where f32
        // FMAs exist.
        if !Kernel::Amx.is_supported() && !Kernel::Avx512Bf16.is_supported() {
            assert_eq!(
                detected == Kernel::F32Widen,
                Kernel::F32Widen.is_supported()
            );
        }
        for k in Kernel::ALL {
            assert_eq!(Kernel::from_name(k.name()), Some(k));
            let forced = choose(Some(k.name()), true);
            if k.is_supported() {
                assert_eq!(forced, Ok(k), "a forced kernel wins over POCL_NO_AMX");
            } else {
                let e = forced.unwrap_err().to_string();
                assert!(
                    e.contains("cannot run the") && e.contains("portable"),
                    "{e}"
                );
            }
        }
        assert_eq!(choose(Some(" F32-Widen "), false), Ok(Kernel::F32Widen));
        let e = choose(Some("avx2"), false).unwrap_err().to_string();
        assert_eq!(
            e,
            "POCL_BF16_KERNEL=\"avx2\" is not a bf16 kernel; use one of: amx, avx512bf16, \
             f32-widen, portable"
        );
    }
}
