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
                use $crate::ops::simd::{forced, Level};
                let level = forced();
                if level.is_none_or(|l| l == Level::Avx512)
                    && has!("avx512f") && has!("avx512dq") && has!("avx512vl") && has!("fma")
                {
                    // SAFETY: the CPU features this copy was compiled for were detected above.
                    return unsafe { avx512($($arg),*) };
                }
                if level.is_none_or(|l| l == Level::Avx2) && has!("avx2") && has!("fma") {
                    // SAFETY: as above.
                    return unsafe { avx2($($arg),*) };
                }
            }
            $imp($($arg),*)
        }
    };
}

pub(crate) use multiversion;

/// The compiled copies [`multiversion`] chooses between.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Level {
    Avx512,
    Avx2,
    /// Only ever forced by tests (the macro's fall-through is the baseline copy).
    #[cfg_attr(not(test), allow(dead_code))]
    Baseline,
}

impl Level {
    #[cfg(test)]
    pub(crate) const ALL: [Level; 3] = [Level::Avx512, Level::Avx2, Level::Baseline];

    /// Whether this CPU runs the copy (the baseline runs everywhere).
    #[cfg(test)]
    pub(crate) fn is_supported(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            match self {
                Level::Avx512 => {
                    has!("avx512f") && has!("avx512dq") && has!("avx512vl") && has!("fma")
                }
                Level::Avx2 => has!("avx2") && has!("fma"),
                Level::Baseline => true,
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            self == Level::Baseline
        }
    }
}

/// The copy a unit test forces on the calling thread ([`force`]); always `None` outside tests,
/// so the choice is the CPU's.
#[inline(always)]
pub(crate) fn forced() -> Option<Level> {
    #[cfg(test)]
    {
        FORCED.with(|f| f.get())
    }
    #[cfg(not(test))]
    {
        None
    }
}

#[cfg(test)]
thread_local! {
    static FORCED: std::cell::Cell<Option<Level>> = const { std::cell::Cell::new(None) };
}

/// Runs `f` with [`multiversion`] functions forced to `level` on this thread (tests only; run
/// the code under test on a one-thread pool from inside `f` so it stays on this thread).
#[cfg(test)]
pub(crate) fn force<R>(level: Level, f: impl FnOnce() -> R) -> R {
    FORCED.with(|c| c.set(Some(level)));
    let r = f();
    FORCED.with(|c| c.set(None));
    r
}
