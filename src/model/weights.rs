//! Weights: reading HF safetensors checkpoints (single file or sharded index; f32, f16 or bf16
//! stored, upcast to f32) and the trainable parameter store that is saved back under HF key names.

use crate::backend::{Backend, Kernels, StudentPrecision};
use crate::ops::bf16::{Element, Packed};
use crate::ops::grad::GradBuffer;
use crate::ops::Weight;
use anyhow::{anyhow, bail, Context, Result};
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// How a model keeps its matrices (linear layers, embeddings, lm head) once taken.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Matrices {
    /// f32 tensors as loaded: a trained model, or a frozen one for evaluation and decoding (the
    /// streamed matmul reads them for the few rows of a decoding step).
    #[default]
    F32,
    /// Frozen f32 packed once for the fused CPU kernels' f32 kernel (`ops::bf16::Element::F32`):
    /// a teacher, whose forward passes are many rows (plain f32 tensors on other kernel sets,
    /// and on CPUs where the kernel is not faster than the `gemm` crate:
    /// `ops::bf16::Packed::f32_preferred`).
    F32Packed,
    /// Frozen bf16: packed for the fused kernels, bf16 tensors for the others.
    Bf16,
}

impl Matrices {
    /// Whether f32 matrices in this form are packed with `kernels` on this CPU.
    pub fn packs_f32(self, kernels: Kernels) -> bool {
        self == Matrices::F32Packed && kernels == Kernels::Fused && Packed::f32_preferred()
    }
}

/// The tensors of a checkpoint by key name, upcast to f32 when taken; keys are consumed by the
/// model builders so that leftovers (unknown tensors) can be reported. Loading maps the files and
/// reads their headers only: a tensor's bytes are read (and converted) when the model takes it,
/// and their pages are dropped again at once, so loading needs about the final model's memory.
pub struct StateDict {
    dir: PathBuf,
    /// The tensors not yet taken, by name.
    tensors: HashMap<String, Stored>,
    /// The checkpoint's files, memory-mapped.
    files: Vec<MappedFile>,
    /// Build a frozen model (see [`Params::frozen`]).
    pub frozen: bool,
    /// How a frozen model keeps its matrices (see [`Params::weight`]).
    pub matrices: Matrices,
    /// Where the model computes: its tensors are moved to this device as they are taken.
    pub backend: Backend,
    /// How a trainable model's linear layers multiply (see [`Params::weight`]).
    pub precision: StudentPrecision,
    /// Fresh initialisation instead of a file: `take` draws every tensor (see [`StateDict::random`]).
    random_seed: Option<u64>,
}

/// A safetensors file mapped read-only, its header parsed and checked against its length.
struct MappedFile {
    path: PathBuf,
    map: memmap2::Mmap,
    /// Where the data section starts (8 + header length).
    data_start: usize,
}

/// Where a tensor lies: its file (index in `StateDict::files`) and header entry.
struct Stored {
    file: usize,
    info: safetensors::tensor::TensorInfo,
}

impl MappedFile {
    fn open(path: PathBuf) -> Result<(Self, safetensors::tensor::Metadata)> {
        let file = std::fs::File::open(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        // SAFETY: a read-only private mapping that nothing here writes. Every tensor's offsets are
        // checked against the mapped length just below (`read_metadata` fails unless the header's
        // data section covers the file exactly), so no read goes past the end of the file. As with
        // any mapping, another process shrinking the file while it is mapped would fault;
        // checkpoints are written to a new file and renamed into place, never truncated.
        let map = unsafe { memmap2::Mmap::map(&file) }
            .with_context(|| format!("cannot read {}", path.display()))?;
        let (header, meta) = safetensors::SafeTensors::read_metadata(&map)
            .map_err(|e| anyhow!("{}: corrupt safetensors file: {e}", path.display()))?;
        let data_start = 8 + header;
        Ok((
            MappedFile {
                path,
                map,
                data_start,
            },
            meta,
        ))
    }

    /// The bytes of tensor `info` (within the map: checked at `open`).
    fn bytes(&self, info: &safetensors::tensor::TensorInfo) -> &[u8] {
        let (a, b) = info.data_offsets;
        &self.map[self.data_start + a..self.data_start + b]
    }

    /// Drops the pages of tensor `info` from this process (they stay in the page cache): touched
    /// pages of a file mapping count in the resident set until unmapped.
    fn release(&self, info: &safetensors::tensor::TensorInfo) {
        let (a, b) = info.data_offsets;
        // SAFETY: no reference into these bytes is alive (the caller converted them to an owned
        // tensor), and the map is read-only and never written, so the pages are only dropped: a
        // later read of a shared page edge faults them back in from the file unchanged. Failure
        // only costs memory, so it is ignored.
        unsafe {
            self.map
                .unchecked_advise_range(
                    memmap2::UncheckedAdvice::DontNeed,
                    self.data_start + a,
                    b - a,
                )
                .ok();
        }
    }
}

/// The safetensors files of a checkpoint directory: `model.safetensors`, or the shards listed in
/// `model.safetensors.index.json`.
fn checkpoint_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        let text = std::fs::read_to_string(&index)
            .with_context(|| format!("cannot read {}", index.display()))?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{}: invalid JSON", index.display()))?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| anyhow!("{}: missing \"weight_map\"", index.display()))?;
        let files: BTreeSet<&str> = map.values().filter_map(|f| f.as_str()).collect();
        return Ok(files.into_iter().map(|f| dir.join(f)).collect());
    }
    if dir.join("pytorch_model.bin").is_file() {
        bail!("{}: only safetensors weights are supported (found pytorch_model.bin; convert it with transformers' save_pretrained)", dir.display());
    }
    bail!(
        "{}: no model.safetensors or model.safetensors.index.json",
        dir.display()
    )
}

impl StateDict {
    /// Maps the checkpoint's files and reads their headers; a corrupt or truncated file, or a
    /// tensor of an unsupported dtype, is reported here, naming the file (and tensor).
    pub fn load(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            bail!("{}: not a directory", dir.display());
        }
        let mut tensors = HashMap::new();
        let mut files = Vec::new();
        for path in checkpoint_files(dir)? {
            let (file, meta) = MappedFile::open(path)?;
            for (name, info) in meta.tensors() {
                stored_dtype(info.dtype)
                    .with_context(|| format!("{}: tensor \"{name}\"", file.path.display()))?;
                let (file, info) = (files.len(), info.clone());
                tensors.insert(name, Stored { file, info });
            }
            files.push(file);
        }
        Ok(StateDict {
            dir: dir.to_path_buf(),
            tensors,
            files,
            frozen: false,
            matrices: Matrices::F32,
            backend: Backend::cpu(),
            precision: StudentPrecision::F32,
            random_seed: None,
        })
    }

    /// A source of freshly initialised weights, as transformers initialises these families:
    /// norm weights 1, biases 0, everything else normal(0, 0.02); each tensor's values depend only
    /// on (seed, name), so initialisation is reproducible.
    pub fn random(seed: u64) -> Self {
        StateDict {
            dir: PathBuf::from("<random init>"),
            tensors: HashMap::new(),
            files: Vec::new(),
            frozen: false,
            matrices: Matrices::F32,
            backend: Backend::cpu(),
            precision: StudentPrecision::F32,
            random_seed: Some(seed),
        }
    }

    fn draw(seed: u64, name: &str, shape: &[usize]) -> candle_core::Result<Tensor> {
        use rand::{Rng, SeedableRng};
        let n: usize = shape.iter().product();
        let is_norm = ["ln_", "norm", "layernorm", "layer_norm"]
            .iter()
            .any(|k| name.contains(k));
        let data: Vec<f32> = if name.ends_with(".bias") {
            vec![0.0; n]
        } else if is_norm && shape.len() == 1 {
            vec![1.0; n]
        } else {
            let h = name.bytes().fold(0xcbf29ce484222325u64, |h, b| {
                (h ^ b as u64).wrapping_mul(0x100000001b3)
            });
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ h);
            // Box-Muller: two uniforms give one standard normal.
            (0..n)
                .map(|_| {
                    let (u1, u2): (f64, f64) = (rng.random::<f64>().max(1e-300), rng.random());
                    (0.02 * (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
                })
                .collect()
        };
        // A variable owning its data, as `view_to_f32` gives: `Params::add` takes it without a copy.
        Ok(Var::from_vec(data, shape, &Device::Cpu)?.into_inner())
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// Removes and returns tensor `name`, checking its shape; its bytes are converted to f32 now.
    pub fn take(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
        if let Some(seed) = self.random_seed {
            return Ok(Self::draw(seed, name, shape)?);
        }
        let Stored { file, info } = self
            .tensors
            .remove(name)
            .ok_or_else(|| anyhow!("{}: missing tensor \"{name}\"", self.dir.display()))?;
        if info.shape != shape {
            bail!(
                "{}: tensor \"{name}\" has shape {:?}, expected {:?}",
                self.dir.display(),
                info.shape,
                shape
            );
        }
        let file = &self.files[file];
        let t =
            safetensors::tensor::TensorView::new(info.dtype, info.shape.clone(), file.bytes(&info))
                .map_err(|e| anyhow!("{e}"))
                .and_then(|view| view_to_f32(&view))
                .with_context(|| format!("{}: tensor \"{name}\"", file.path.display()))?;
        file.release(&info);
        Ok(t)
    }

    /// Names left after the model took its tensors, minus known non-parameter buffers.
    pub fn leftovers(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .tensors
            .keys()
            .filter(|k| {
                !(k.ends_with(".attn.bias")
                    || k.ends_with(".attn.masked_bias")
                    || k.ends_with("rotary_emb.inv_freq"))
            })
            .cloned()
            .collect();
        names.sort();
        names
    }
}

/// The candle dtype a stored dtype is read as (before the upcast to f32).
fn stored_dtype(dtype: safetensors::Dtype) -> Result<DType> {
    Ok(match dtype {
        safetensors::Dtype::F32 => DType::F32,
        safetensors::Dtype::F16 => DType::F16,
        safetensors::Dtype::BF16 => DType::BF16,
        safetensors::Dtype::F64 => DType::F64,
        safetensors::Dtype::I64 => DType::I64,
        safetensors::Dtype::U8 | safetensors::Dtype::BOOL => DType::U8,
        other => bail!("unsupported dtype {other:?}"),
    })
}

/// The tensor of `view`, upcast to f32 (integer buffers keep their dtype). A float tensor comes
/// back as a candle variable owning its data, so that [`Params::add`] registers it without a copy.
fn view_to_f32(view: &safetensors::tensor::TensorView) -> Result<Tensor> {
    let shape = view.shape().to_vec();
    let data = view.data();
    let dtype = stored_dtype(view.dtype())?;
    fn upcast<const N: usize>(data: &[u8], f: impl Fn([u8; N]) -> f32) -> Vec<f32> {
        data.chunks_exact(N)
            .map(|b| f(b.try_into().expect("chunks of N bytes")))
            .collect()
    }
    let data = match dtype {
        DType::F32 => upcast(data, f32::from_le_bytes),
        DType::F16 => upcast(data, |b| half::f16::from_le_bytes(b).to_f32()),
        DType::BF16 => upcast(data, |b| half::bf16::from_le_bytes(b).to_f32()),
        DType::F64 => upcast(data, |b| f64::from_le_bytes(b) as f32),
        _ => return Ok(Tensor::from_raw_buffer(data, dtype, &shape, &Device::Cpu)?),
    };
    // A NaN weight turns every output it reaches into garbage: refuse it here, where the caller
    // names the file and tensor.
    let bad = crate::finite::count_non_finite(&data);
    if bad > 0 {
        let (i, _, x) = crate::finite::first_non_finite(&data, 1).expect("counted above");
        bail!(
            "holds {bad} non-finite values (the first, {x}, at flat index {i} of shape {shape:?}); \
             the checkpoint is corrupt or comes from a diverged run"
        );
    }
    Ok(Var::from_vec(data, shape, &Device::Cpu)?.into_inner())
}

/// Trainable parameters under the HF key names they are saved with, on the model's device.
#[derive(Default)]
pub struct Params {
    entries: Vec<(String, Var)>,
    /// In-place gradient buffers of the matrices (`ops::grad`, fused kernels only), by entry
    /// index.
    buffers: Vec<(usize, Arc<GradBuffer>)>,
    /// Frozen models (teachers, evaluation) compute with detached tensors: candle then records
    /// no graph for them, which saves the memory and time of tracking ops nobody differentiates.
    pub frozen: bool,
    backend: Backend,
    precision: StudentPrecision,
}

impl Params {
    /// An empty store for a model built from `sd` (frozen or not, on `sd`'s backend).
    pub fn new(sd: &StateDict) -> Self {
        Params {
            entries: Vec::new(),
            buffers: Vec::new(),
            frozen: sd.frozen,
            backend: sd.backend.clone(),
            precision: sd.precision,
        }
    }

    /// The device and kernels the model computes with.
    pub fn backend(&self) -> &Backend {
        &self.backend
    }

    /// Registers a trainable tensor taken from `sd` and returns the tensor the model computes with
    /// (it shares storage with the Var, so optimiser updates are seen by the model).
    pub fn take(
        &mut self,
        sd: &mut StateDict,
        from: &str,
        save_as: &str,
        shape: &[usize],
    ) -> Result<Tensor> {
        let t = sd.take(from, shape)?;
        Ok(self.add(save_as, t)?)
    }

    /// Like [`Params::take`] for a matrix used by a linear layer (or a tied embedding / lm head):
    /// `out_in` tells its layout. A frozen model's matrices take the form `sd.matrices` says: a
    /// bf16 model gets them in bf16 (packed for the fused kernels, a bf16 tensor for the
    /// portable ones), an f32 teacher packed once for the fused kernels' f32 kernel; then
    /// neither the f32 tensor nor a parameter entry is kept (such a model is never trained or
    /// saved). A trainable matrix
    /// of a bf16-mixed model multiplies as torch.autocast does ([`Weight::bf16_mixed`]); else it
    /// gets an in-place gradient buffer when the fused kernels compute with it.
    pub fn weight(
        &mut self,
        sd: &mut StateDict,
        from: &str,
        save_as: &str,
        shape: &[usize],
        out_in: bool,
    ) -> Result<Weight> {
        match (sd.matrices, self.backend.kernels) {
            (Matrices::Bf16, Kernels::Fused) => {
                return Ok(Weight::to_packed(
                    &sd.take(from, shape)?,
                    out_in,
                    Element::Bf16,
                )?)
            }
            (Matrices::Bf16, Kernels::Portable | Kernels::Cuda) => {
                let t = sd.take(from, shape)?.to_device(&self.backend.device)?;
                return Ok(Weight::to_bf16_tensor(&t, out_in)?);
            }
            (m, k) if m.packs_f32(k) => {
                return Ok(Weight::to_packed(
                    &sd.take(from, shape)?,
                    out_in,
                    Element::F32,
                )?)
            }
            _ => {}
        }
        let t = self.take(sd, from, save_as, shape)?;
        if !self.frozen && self.precision == StudentPrecision::Bf16Mixed {
            return Ok(Weight::bf16_mixed(t, out_in));
        }
        // The in-place gradient buffers are the fused CPU kernels' (host memory).
        if self.frozen || self.backend.kernels != Kernels::Fused {
            return Ok(if out_in {
                Weight::out_in(t)
            } else {
                Weight::in_out(t)
            });
        }
        let buffer = Arc::new(GradBuffer::new(t.shape()));
        self.buffers.push((self.entries.len() - 1, buffer.clone()));
        Ok(Weight::trainable(t, out_in, buffer))
    }

    /// [`Params::weight`] for a token embedding, which may also be the lm head ([vocab, d]):
    /// f32 whatever the precision. The lm head feeds the KD loss, whose divergences compare
    /// logits: bf16 logits (steps of 1/8 at |logit| 16..32) would quantise exactly the
    /// teacher-student differences distillation learns from, and the fused heads never
    /// materialise the logits, so bf16 would save no memory there (NOTES.md, "CUDA").
    pub fn embedding(
        &mut self,
        sd: &mut StateDict,
        from: &str,
        save_as: &str,
        shape: &[usize],
    ) -> Result<Weight> {
        let precision = std::mem::take(&mut self.precision); // f32
        let w = self.weight(sd, from, save_as, shape, true);
        self.precision = precision;
        w
    }

    /// The gradient of every parameter after a backward pass, in `vars()` order (shared
    /// tensors, no copies): the in-place buffer where a fused op wrote one, candle's store
    /// otherwise (and their sum if both hold a part).
    pub fn grads(&self, store: &GradStore) -> candle_core::Result<Vec<Option<Tensor>>> {
        let mut grads: Vec<Option<Tensor>> = self
            .entries
            .iter()
            .map(|(_, v)| store.get(v.as_tensor()).cloned())
            .collect();
        for (i, buffer) in &self.buffers {
            if let Some(b) = buffer.grad()? {
                grads[*i] = Some(match grads[*i].take() {
                    Some(g) => (b + g)?,
                    None => b,
                });
            }
        }
        Ok(grads)
    }

    /// Ends an optimiser step: the in-place gradient buffers start over (torch's `zero_grad`;
    /// the next write overwrites, so no memory is touched here).
    pub fn zero_grad(&self) {
        for (_, b) in &self.buffers {
            b.zero();
        }
    }

    pub fn add(&mut self, save_as: &str, t: Tensor) -> candle_core::Result<Tensor> {
        let var = Var::from_tensor(&t.to_device(&self.backend.device)?.contiguous()?)?;
        let t = if self.frozen {
            var.as_tensor().detach()
        } else {
            var.as_tensor().clone()
        };
        self.entries.push((save_as.to_string(), var));
        Ok(t)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &Var)> {
        self.entries.iter().map(|(n, v)| (n.as_str(), v))
    }

    pub fn vars(&self) -> Vec<Var> {
        self.entries.iter().map(|(_, v)| v.clone()).collect()
    }

    pub fn get(&self, name: &str) -> Option<&Var> {
        self.entries.iter().find(|(n, _)| n == name).map(|(_, v)| v)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn num_elements(&self) -> usize {
        self.entries.iter().map(|(_, v)| v.elem_count()).sum()
    }

    /// safetensors bytes of every parameter (f32), with the `format: pt` metadata transformers expects.
    pub fn to_safetensors(&self) -> Result<Vec<u8>> {
        safetensors_bytes(
            self.iter()
                .map(|(n, v)| (n.to_string(), v.as_tensor().clone())),
        )
    }
}

/// safetensors bytes of named tensors, with the `format: pt` metadata transformers expects.
pub fn safetensors_bytes(tensors: impl IntoIterator<Item = (String, Tensor)>) -> Result<Vec<u8>> {
    let tensors: Vec<(String, Tensor)> = tensors.into_iter().collect();
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize(tensors.iter().map(|(n, t)| (n.as_str(), t)), Some(meta))
        .map_err(|e| anyhow!("safetensors: {e}"))
}
