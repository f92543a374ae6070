//! What this CPU (and OS) can run: the kernel choice, AMX permission, AVX-512 detection.

use std::sync::OnceLock;

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
}
