//! Where a model computes and with which implementation of its ops: the device (CPU, or a CUDA
//! GPU in a build with the `cuda` feature) and the kernels ([`Kernels::Fused`]: pocl's own CPU
//! kernels; [`Kernels::Portable`]: compositions of candle tensor ops that run on any candle
//! device; [`Kernels::Cuda`]: pocl's CUDA kernels where one exists, portable ops elsewhere).
//! Both are chosen here, once, from the user's words (`--device`, `--kernels`, the
//! recipe's `run.device` / `run.kernels`), and so is the student's default precision
//! ([`Backend::student_precision`]); every layer below receives a [`Backend`] and never looks
//! at a device to decide how to compute.

use anyhow::{bail, Result};
use candle_core::{Device, DeviceLocation};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// The device a user asked for: `cpu`, `cuda` (GPU 0) or `cuda:N`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DeviceChoice {
    #[default]
    Cpu,
    Cuda(usize),
}

impl FromStr for DeviceChoice {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        let s = s.trim();
        match s {
            "cpu" => return Ok(DeviceChoice::Cpu),
            "cuda" => return Ok(DeviceChoice::Cuda(0)),
            _ => {}
        }
        if let Some(n) = s.strip_prefix("cuda:") {
            if let Ok(n) = n.parse() {
                return Ok(DeviceChoice::Cuda(n));
            }
        }
        bail!("unknown device \"{s}\": expected cpu, cuda or cuda:N")
    }
}

impl fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            DeviceChoice::Cpu => write!(f, "cpu"),
            DeviceChoice::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// How the model ops (linear layers, embedding, norms, activations, attention, the lm head fused
/// with the KD loss, AdamW and the gradient clip) are computed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernels {
    /// pocl's fused CPU kernels (`ops::fused` and the modules it calls): the fast path on the CPU.
    Fused,
    /// candle tensor ops only, each with candle's backward (`ops::portable`): runs on any candle
    /// device; the first GPU path and the CPU kernels' test oracle.
    Portable,
    /// What `fused` means on a CUDA device: pocl's own kernels (`ops::cuda`, `kd::chunked`: the
    /// lm head fused with the KD loss, AdamW, the gradient norm) where one exists, the portable
    /// ops everywhere else. Never parsed from the user's words: [`Backend::new`] picks it for
    /// `--kernels fused` on CUDA. Each of these ops is a candle op whose CPU side runs the same
    /// arithmetic, so this path also runs (slowly) on the CPU, which is how its chunking and
    /// gradients are tested without a GPU.
    Cuda,
}

impl FromStr for Kernels {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        match s.trim() {
            "fused" => Ok(Kernels::Fused),
            "portable" => Ok(Kernels::Portable),
            // The user's word for Kernels::Cuda is "fused" (Backend::new maps it).
            other => bail!("unknown kernels \"{other}\": expected fused or portable"),
        }
    }
}

impl fmt::Display for Kernels {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(match self {
            // Cuda prints as the word that selects it, so a saved recipe reads back the same.
            Kernels::Fused | Kernels::Cuda => "fused",
            Kernels::Portable => "portable",
        })
    }
}

/// Serialises as its string form (recipes, run directories).
macro_rules! serde_as_string {
    ($t:ty) => {
        impl Serialize for $t {
            fn serialize<S: serde::Serializer>(
                &self,
                s: S,
            ) -> std::result::Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: serde::Deserializer<'de>>(
                d: D,
            ) -> std::result::Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                s.parse()
                    .map_err(|e: anyhow::Error| serde::de::Error::custom(e))
            }
        }
    };
}
serde_as_string!(DeviceChoice);
serde_as_string!(Kernels);
serde_as_string!(StudentPrecision);

/// How a trainable model (the student) computes its linear layers (recipe key
/// `model.student_precision`, `--student-precision`). The weights, their gradients, the
/// optimiser and checkpoints are f32 either way.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum StudentPrecision {
    /// Everything in f32.
    #[default]
    F32,
    /// torch.autocast(bfloat16) for the linear layers: x and W rounded to bf16 (RNE), the
    /// product accumulated in f32 and rounded to bf16, read as f32 downstream; the backward's
    /// products likewise (see `ops::portable::linear_bf16_mixed`). Norms, softmax, attention,
    /// activations, the embedding, the lm head and the loss stay f32.
    #[value(name = "bf16-mixed")]
    Bf16Mixed,
}

impl FromStr for StudentPrecision {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        match s.trim() {
            "f32" => Ok(StudentPrecision::F32),
            "bf16-mixed" => Ok(StudentPrecision::Bf16Mixed),
            other => bail!("unknown student precision \"{other}\": expected f32 or bf16-mixed"),
        }
    }
}

impl fmt::Display for StudentPrecision {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(match self {
            StudentPrecision::F32 => "f32",
            StudentPrecision::Bf16Mixed => "bf16-mixed",
        })
    }
}

/// A device and the kernels that compute on it; every model is loaded onto one.
#[derive(Clone, Debug)]
pub struct Backend {
    pub device: Device,
    pub kernels: Kernels,
}

impl Backend {
    /// The CPU with the fused kernels (the default everywhere).
    pub fn cpu() -> Self {
        Backend {
            device: Device::Cpu,
            kernels: Kernels::Fused,
        }
    }

    /// The CPU with the given kernels.
    pub fn cpu_with(kernels: Kernels) -> Self {
        Backend {
            device: Device::Cpu,
            kernels,
        }
    }

    /// Opens `device` with `kernels` (default: fused on the CPU, portable elsewhere). The one
    /// place where a device is opened and a kernel choice checked against it: `fused` on a CUDA
    /// device becomes [`Kernels::Cuda`] (pocl's CUDA kernels, portable ops where none exists).
    ///
    /// The default on CUDA stays `portable`: the CUDA set passed `pocl doctor --device cuda` on
    /// an H200 once, but its later changes (`ops::recompute`) have not run on a GPU yet.
    pub fn new(device: DeviceChoice, kernels: Option<Kernels>) -> Result<Self> {
        let (device, default) = match device {
            DeviceChoice::Cpu => (Device::Cpu, Kernels::Fused),
            DeviceChoice::Cuda(n) => (open_cuda(n)?, Kernels::Portable),
        };
        let kernels = match (kernels.unwrap_or(default), &device) {
            (Kernels::Fused | Kernels::Cuda, Device::Cpu) => Kernels::Fused,
            (Kernels::Fused | Kernels::Cuda, Device::Cuda(_)) => Kernels::Cuda,
            (Kernels::Fused | Kernels::Cuda, d) => {
                bail!("pocl has no fused kernels for {d:?}; use --kernels portable")
            }
            (Kernels::Portable, _) => Kernels::Portable,
        };
        Ok(Backend { device, kernels })
    }

    /// The student's precision: `asked`, else the device's default, decided here only: f32 on
    /// the CPU (exact, and the CPU has no fast bf16 gemm with a backward: the mixed path widens
    /// to f32 there, so it is slower than f32), bf16-mixed on a GPU (cuBLAS bf16 products, as
    /// PyTorch users train).
    pub fn student_precision(&self, asked: Option<StudentPrecision>) -> StudentPrecision {
        asked.unwrap_or(match self.device {
            Device::Cpu => StudentPrecision::F32,
            _ => StudentPrecision::Bf16Mixed,
        })
    }

    /// A short label for logs and benchmark output, e.g. "cpu/fused".
    pub fn label(&self) -> String {
        let kernels = match self.kernels {
            Kernels::Cuda => "fused-cuda".to_string(),
            k => k.to_string(),
        };
        format!("{}/{kernels}", self.device_name())
    }

    /// The device as `--device` names it: "cpu", "cuda:0" (or "metal:0").
    pub fn device_name(&self) -> String {
        match self.device.location() {
            DeviceLocation::Cpu => "cpu".to_string(),
            DeviceLocation::Cuda { gpu_id } => DeviceChoice::Cuda(gpu_id).to_string(),
            DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
        }
    }
}

impl Default for Backend {
    fn default() -> Self {
        Backend::cpu()
    }
}

#[cfg(feature = "cuda")]
fn open_cuda(n: usize) -> Result<Device> {
    use anyhow::Context;
    // Without a GPU (or with the build-time libcuda stub on the library path) the driver's
    // first call fails here; say what to check rather than only the driver's error code.
    let device = Device::new_cuda(n).with_context(|| {
        format!(
            "cannot open CUDA device {n} (no NVIDIA GPU or driver >= 580 here? see README, 'GPU')"
        )
    })?;
    if let Device::Cuda(d) = &device {
        // Without stream-ordered allocation (some virtualised GPUs) candle falls back to
        // cuMemAlloc, and there is no pool to tune or to read a peak from: run without.
        if d.cuda_stream().context().has_async_alloc() {
            cuda_pool::keep_freed_memory(d).context("setting up CUDA's memory pool")?;
        }
        // cudarc gives every allocation a read and a write event, recorded and waited on only
        // once its context has more than one stream. candle runs every kernel on one per-thread
        // stream, which cudarc does not count, so the events were never waited on: they cost
        // two driver calls to make and two to destroy per tensor, for nothing.
        // SAFETY: pocl issues all its CUDA work, tensor drops included, from one host thread
        // onto that one stream, so no use of a buffer needs ordering against another stream.
        unsafe { d.disable_event_tracking() };
    }
    Ok(device)
}

/// The most device memory in use by pocl's tensors since the last [`reset_peak_memory`] (CUDA's
/// pool high-water mark: what torch calls `max_memory_allocated`); None off a GPU.
pub fn peak_memory(device: &Device) -> Option<u64> {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(d) if d.cuda_stream().context().has_async_alloc() => {
            cuda_pool::used_high(d).ok()
        }
        _ => None,
    }
}

/// Starts [`peak_memory`] again from the memory in use now.
pub fn reset_peak_memory(device: &Device) {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = device {
        cuda_pool::reset_used_high(d).ok();
    }
    let _ = device;
}

/// The device's memory pool, from which candle allocates (cuMemAllocAsync on its stream).
#[cfg(feature = "cuda")]
mod cuda_pool {
    use candle_core::cuda_backend::cudarc::driver::{sys, DriverError};
    use candle_core::cuda_backend::CudaDevice;
    use sys::CUmemPool_attribute as Attr;

    fn pool(d: &CudaDevice) -> Result<sys::CUmemoryPool, DriverError> {
        let ctx = d.cuda_stream().context().clone();
        ctx.bind_to_thread()?;
        let mut pool = std::ptr::null_mut();
        // SAFETY: an out-pointer to a pool handle, for the context's own device.
        unsafe { sys::cuDeviceGetMemPool(&mut pool, ctx.cu_device()) }.result()?;
        Ok(pool)
    }

    fn set(d: &CudaDevice, attr: Attr, mut value: u64) -> Result<(), DriverError> {
        let pool = pool(d)?;
        // SAFETY: both attributes set here take a cuuint64_t.
        unsafe { sys::cuMemPoolSetAttribute(pool, attr, (&mut value as *mut u64).cast()) }.result()
    }

    /// Freed memory stays in the pool for the next allocations. The default release threshold,
    /// 0, hands it back to the driver at every synchronisation (each phase, each KD head chunk
    /// that reads a status back), and the next allocations map it again; torch's caching
    /// allocator keeps it likewise.
    pub fn keep_freed_memory(d: &CudaDevice) -> Result<(), DriverError> {
        set(d, Attr::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD, u64::MAX)
    }

    pub fn used_high(d: &CudaDevice) -> Result<u64, DriverError> {
        let pool = pool(d)?;
        let mut value = 0u64;
        // SAFETY: USED_MEM_HIGH is read into a cuuint64_t.
        unsafe {
            sys::cuMemPoolGetAttribute(
                pool,
                Attr::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
                (&mut value as *mut u64).cast(),
            )
        }
        .result()?;
        Ok(value)
    }

    /// Resets the high-water mark to the memory in use now (the driver accepts only 0).
    pub fn reset_used_high(d: &CudaDevice) -> Result<(), DriverError> {
        set(d, Attr::CU_MEMPOOL_ATTR_USED_MEM_HIGH, 0)
    }
}

#[cfg(not(feature = "cuda"))]
fn open_cuda(_: usize) -> Result<Device> {
    bail!("this pocl was built without CUDA support; see README, 'GPU'")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_choices_parse_and_print() {
        for (s, d) in [
            ("cpu", DeviceChoice::Cpu),
            ("cuda", DeviceChoice::Cuda(0)),
            ("cuda:3", DeviceChoice::Cuda(3)),
        ] {
            assert_eq!(s.parse::<DeviceChoice>().unwrap(), d);
        }
        assert_eq!(DeviceChoice::Cuda(2).to_string(), "cuda:2");
        for bad in ["gpu", "cuda:", "cuda:x", "CPU", ""] {
            let e = bad.parse::<DeviceChoice>().unwrap_err().to_string();
            assert!(e.contains("expected cpu, cuda or cuda:N"), "{bad}: {e}");
        }
    }

    #[test]
    fn kernels_default_by_device() {
        let b = Backend::new(DeviceChoice::Cpu, None).unwrap();
        assert_eq!(b.kernels, Kernels::Fused);
        let b = Backend::new(DeviceChoice::Cpu, Some(Kernels::Portable)).unwrap();
        assert_eq!(b.kernels, Kernels::Portable);
        assert_eq!(b.label(), "cpu/portable");
        assert!("avx".parse::<Kernels>().is_err());
        // Kernels::Cuda is what "fused" becomes on a CUDA device; it prints (and saves) as the
        // user's word, and asked for on the CPU it is the CPU's fused kernels.
        assert_eq!(Kernels::Cuda.to_string(), "fused");
        assert!("cuda".parse::<Kernels>().is_err());
        let b = Backend::new(DeviceChoice::Cpu, Some(Kernels::Cuda)).unwrap();
        assert_eq!(b.kernels, Kernels::Fused);
    }

    #[test]
    fn student_precision_parses_and_defaults_to_f32_on_the_cpu() {
        for (s, p) in [
            ("f32", StudentPrecision::F32),
            ("bf16-mixed", StudentPrecision::Bf16Mixed),
        ] {
            assert_eq!(s.parse::<StudentPrecision>().unwrap(), p);
            assert_eq!(p.to_string(), s);
        }
        let e = "bf16".parse::<StudentPrecision>().unwrap_err().to_string();
        assert!(e.contains("expected f32 or bf16-mixed"), "{e}");
        for kernels in [Kernels::Fused, Kernels::Portable] {
            let b = Backend::cpu_with(kernels);
            assert_eq!(b.student_precision(None), StudentPrecision::F32);
            assert_eq!(
                b.student_precision(Some(StudentPrecision::Bf16Mixed)),
                StudentPrecision::Bf16Mixed
            );
        }
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_is_refused_without_the_feature() {
        let e = Backend::new(DeviceChoice::Cuda(0), None).unwrap_err();
        assert_eq!(
            e.to_string(),
            "this pocl was built without CUDA support; see README, 'GPU'"
        );
    }
}
