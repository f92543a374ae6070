//! Run-time selection of the instruction set for hand-vectorised loops.

/// Defines `$name(args)` that runs the `#[inline(always)]` function `$imp(args)` compiled for the
/// best instruction set this CPU has (AVX-512, AVX2+FMA, or the baseline): each wrapper is a
/// separately compiled copy into which the row code is force-inlined, so its loops vectorise for
/// that instruction set. (A generic closure-taking wrapper does not work: the closure is too big
/// to be inlined and stays baseline code.)
macro_rules! multiversion {
    ($(#[$m:meta])* $vis:vis fn $name:ident => $imp:ident($($arg:ident: $ty:ty),*) -> $ret:ty) => {
        $(#[$m])*
        $vis fn $name($($arg: $ty),*) -> $ret {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512dq,avx512vl,avx2,fma")]
                $(#[$m])*
                unsafe fn avx512($($arg: $ty),*) -> $ret {
                    $imp($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                $(#[$m])*
                unsafe fn avx2($($arg: $ty),*) -> $ret {
                    $imp($($arg),*)
                }
                use std::arch::is_x86_feature_detected as has;
                if has!("avx512f") && has!("avx512dq") && has!("avx512vl") && has!("fma") {
                    // SAFETY: the CPU features this copy was compiled for were detected above.
                    return unsafe { avx512($($arg),*) };
                }
                if has!("avx2") && has!("fma") {
                    // SAFETY: as above.
                    return unsafe { avx2($($arg),*) };
                }
            }
            $imp($($arg),*)
        }
    };
}

pub(crate) use multiversion;
