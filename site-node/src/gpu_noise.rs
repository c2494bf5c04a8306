//! DP noise for CUDA tensors, drawn on the GPU: the privacy crate's keyed exact discrete Gaussian
//! ([`KeyedGaussian`]), as CUDA C ([`DEVICE_KERNEL_SOURCE`]) compiled at run time by NVRTC
//! through `cudarc`, one GPU thread per chunk of [`tutela_privacy::noise::KEYED_CHUNK`] values.
//!
//! # Same distribution as the CPU, by construction and by test
//!
//! The kernel is the same ChaCha20 keystream and the same integer-only sampler as
//! [`KeyedGaussian::fill`]: for the same key it writes the same float32 values, bit for bit. CI
//! (no GPU) checks the kernel's source, compiled as C, against the Rust sampler over millions of
//! values (`privacy/kernel-check`); `scripts/gpu-check.sh` checks the device against the Rust
//! sampler over 10^7 values. The key is 32 bytes from the operating system, fresh for every
//! release; it reaches the GPU only as the launch's arguments.
//!
//! # Where the values go
//!
//! Into a float32 tensor allocated by libtorch on the gradient's device (its raw device pointer,
//! `Tensor::data_ptr`, is the kernel's output argument): the noise never crosses the PCIe bus,
//! which for a 10^8-parameter model is 400 MB a step, and the release then adds it with the same
//! tensor ops as CPU-drawn noise (`crate::dp`), so the arithmetic after sampling is unchanged.
//! The kernel runs on the context's legacy default stream, which libtorch's default stream is
//! too, so it is ordered after the allocation and before the addition; the launch is then
//! waited for, so that a fault surfaces here, as this module's error, and not in a later op.
//!
//! # No GPU
//!
//! `cudarc` loads libcuda and libnvrtc at run time (`dynamic-loading`): the node builds without
//! CUDA, and [`GpuNoise::new`] returns [`GpuNoiseError::NoGpu`] / [`GpuNoiseError::NoNvrtc`]
//! where they are missing (a driver call without them would panic; STACK.md pitfall 4).

use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaFunction, CudaStream, LaunchConfig, PushKernelArg};
use cudarc::nvrtc::{CompileOptions, Ptx, compile_ptx_with_opts};
use tch::{Device, Kind, Tensor};
use tutela_privacy::noise::{
    DEVICE_KERNEL_NAME, DEVICE_KERNEL_SOURCE, KeyedGaussian, NoiseKey, split_u128,
};

/// GPU threads per block of the noise kernel. Each thread loops over its chunk with data-
/// dependent rejection loops; 128 keeps a warp's divergence local and fills an SM with few
/// registers' worth of blocks.
const THREADS_PER_BLOCK: u32 = 128;

/// Why noise cannot be drawn on the GPU. The caller (`crate::dp`) draws it on the CPU instead
/// for the first two; the others are faults.
#[derive(Debug, thiserror::Error)]
pub enum GpuNoiseError {
    #[error("no GPU: the CUDA driver library (libcuda) is not installed on this machine")]
    NoGpu,
    #[error(
        "the CUDA runtime compiler library (libnvrtc) is not installed on this machine: the \
         noise kernel cannot be compiled"
    )]
    NoNvrtc,
    #[error("the noise buffer is on {0:?}, not on a CUDA device")]
    NotCuda(Device),
    #[error(
        "the noise buffer must be a contiguous float32 tensor, got {kind:?} (contiguous: {contiguous})"
    )]
    BadBuffer { kind: Kind, contiguous: bool },
    #[error("the noise buffer is on CUDA device {buffer}, the sampler on device {sampler}")]
    WrongDevice { buffer: usize, sampler: usize },
    #[error("compiling the noise kernel with NVRTC: {0}")]
    Compile(String),
    #[error("CUDA driver, {context}: {message}")]
    Driver {
        context: &'static str,
        message: String,
    },
    #[error("libtorch, {context}: {source}")]
    Torch {
        context: &'static str,
        #[source]
        source: tch::TchError,
    },
    #[error("a noise key could not be drawn: {0}")]
    Key(#[from] tutela_privacy::noise::NoiseError),
}

impl GpuNoiseError {
    /// Whether the machine lacks what the GPU path needs (so the CPU path should run), rather
    /// than the GPU path having failed.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, GpuNoiseError::NoGpu | GpuNoiseError::NoNvrtc)
    }
}

fn driver(context: &'static str) -> impl FnOnce(cudarc::driver::DriverError) -> GpuNoiseError {
    move |e| GpuNoiseError::Driver {
        context,
        message: e.to_string(),
    }
}

fn torch(context: &'static str) -> impl FnOnce(tch::TchError) -> GpuNoiseError {
    move |source| GpuNoiseError::Torch { context, source }
}

/// Whether libcuda can be loaded here (no driver call is made without it).
pub fn driver_present() -> bool {
    // SAFETY: only tries to dlopen the library under its usual names.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// Whether libnvrtc can be loaded here.
pub fn nvrtc_present() -> bool {
    // SAFETY: as above.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// The noise kernel's source compiled to PTX by NVRTC (no GPU needed: NVRTC runs on the CPU;
/// the driver turns the PTX into the device's code when [`GpuNoise::new`] loads it).
pub fn compile_noise_kernel() -> Result<Ptx, GpuNoiseError> {
    if !nvrtc_present() {
        return Err(GpuNoiseError::NoNvrtc);
    }
    let options = CompileOptions {
        // `unsigned __int128` where the Rust sampler uses u128.
        options: vec!["--device-int128".to_owned()],
        // The only floating-point step, (float)((double)x * g), has no addition to fuse; keep
        // NVRTC from contracting anything all the same.
        fmad: Some(false),
        name: Some("tutela_discrete_gaussian.cu".to_owned()),
        ..CompileOptions::default()
    };
    compile_ptx_with_opts(DEVICE_KERNEL_SOURCE, options)
        .map_err(|e| GpuNoiseError::Compile(e.to_string()))
}

/// The noise kernel, compiled and loaded on one CUDA device.
pub struct GpuNoise {
    ordinal: usize,
    stream: Arc<CudaStream>,
    function: CudaFunction,
}

impl std::fmt::Debug for GpuNoise {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuNoise")
            .field("ordinal", &self.ordinal)
            .finish_non_exhaustive()
    }
}

impl GpuNoise {
    /// Compiles the kernel with NVRTC and loads it into device `ordinal`'s primary context (the
    /// one libtorch uses). Typed errors, never a panic, where libcuda or libnvrtc is missing.
    pub fn new(ordinal: usize) -> Result<Self, GpuNoiseError> {
        if !driver_present() {
            return Err(GpuNoiseError::NoGpu);
        }
        if !nvrtc_present() {
            return Err(GpuNoiseError::NoNvrtc);
        }
        let context = CudaContext::new(ordinal).map_err(driver("opening the device"))?;
        let ptx = compile_noise_kernel()?;
        let module = context
            .load_module(ptx)
            .map_err(driver("loading the noise kernel"))?;
        let function = module
            .load_function(DEVICE_KERNEL_NAME)
            .map_err(driver("finding the noise kernel"))?;
        Ok(GpuNoise {
            ordinal,
            stream: context.default_stream(),
            function,
        })
    }

    /// The CUDA device this sampler draws on.
    pub fn ordinal(&self) -> usize {
        self.ordinal
    }

    /// `len` values of the release keyed `key` (elements `0 .. len`), as a new float32 tensor on
    /// this device.
    pub fn draw(
        &self,
        sampler: &KeyedGaussian,
        key: &NoiseKey,
        len: usize,
    ) -> Result<Tensor, GpuNoiseError> {
        let mut out = Tensor::f_empty([len as i64], (Kind::Float, Device::Cuda(self.ordinal)))
            .map_err(torch("allocating the noise buffer"))?;
        self.fill(sampler, key, &mut out)?;
        Ok(out)
    }

    /// Overwrites `out` (a contiguous float32 tensor on this device) with the release keyed
    /// `key`: element `i` is [`KeyedGaussian::fill`]'s element `i`, bit for bit.
    pub fn fill(
        &self,
        sampler: &KeyedGaussian,
        key: &NoiseKey,
        out: &mut Tensor,
    ) -> Result<(), GpuNoiseError> {
        match out.device() {
            Device::Cuda(buffer) if buffer == self.ordinal => {}
            Device::Cuda(buffer) => {
                return Err(GpuNoiseError::WrongDevice {
                    buffer,
                    sampler: self.ordinal,
                });
            }
            other => return Err(GpuNoiseError::NotCuda(other)),
        }
        let contiguous = out.is_contiguous();
        if out.kind() != Kind::Float || !contiguous {
            return Err(GpuNoiseError::BadBuffer {
                kind: out.kind(),
                contiguous,
            });
        }
        let n = out.numel() as u64;
        if n == 0 {
            return Ok(());
        }
        let params = sampler.device_sampler();
        let chunks = n.div_ceil(params.chunk);
        let blocks =
            u32::try_from(chunks.div_ceil(u64::from(THREADS_PER_BLOCK))).map_err(|_| {
                GpuNoiseError::Driver {
                    context: "sizing the launch",
                    message: format!("{n} values need more than 2^32 blocks"),
                }
            })?;
        let pointer = out.data_ptr() as u64;
        let [k0, k1, k2, k3] = key.words();
        let (a_lo, a_hi) = split_u128(params.a);
        let (bt_lo, bt_hi) = split_u128(params.bt);
        let (den_lo, den_hi) = split_u128(params.den);
        let config = LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (THREADS_PER_BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut launch = self.stream.launch_builder(&self.function);
        launch
            .arg(&pointer)
            .arg(&n)
            .arg(&params.chunk)
            .arg(&k0)
            .arg(&k1)
            .arg(&k2)
            .arg(&k3)
            .arg(&a_lo)
            .arg(&a_hi)
            .arg(&bt_lo)
            .arg(&bt_hi)
            .arg(&den_lo)
            .arg(&den_hi)
            .arg(&params.t)
            .arg(&params.granularity);
        // SAFETY: the arguments match the kernel's signature in order and type (a device
        // pointer as u64, then u64s and a double); `pointer` addresses `n` float32 values of a
        // live, contiguous libtorch CUDA tensor on this device, and the kernel writes only
        // `out[0 .. n]`. The stream is waited for before `out` can be dropped or read.
        unsafe { launch.launch(config) }.map_err(driver("launching the noise kernel"))?;
        self.stream
            .synchronize()
            .map_err(driver("running the noise kernel"))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kernel_compiles_with_nvrtc_where_libnvrtc_is() {
        // libnvrtc ships in torch's CUDA wheels: with site-packages/nvidia/cu13/lib on
        // LD_LIBRARY_PATH this compiles the kernel here, without a GPU. (An rpath is not enough:
        // libnvrtc loads libnvrtc-builtins by name itself.) Without libnvrtc, the typed error.
        match compile_noise_kernel() {
            Ok(ptx) => {
                let text = ptx.to_src();
                assert!(
                    text.contains(DEVICE_KERNEL_NAME),
                    "no entry point in the PTX"
                );
                eprintln!(
                    "NVRTC compiled the noise kernel: {} bytes of PTX",
                    text.len()
                );
            }
            Err(e) => {
                assert!(!nvrtc_present(), "libnvrtc is here, yet: {e}");
                assert!(matches!(e, GpuNoiseError::NoNvrtc), "{e}");
            }
        }
    }

    #[test]
    fn without_libcuda_the_gpu_sampler_is_a_typed_error() {
        // On a machine with the driver this is the success path (checked by gpu-check.sh).
        if driver_present() {
            return;
        }
        let e = GpuNoise::new(0).unwrap_err();
        assert!(matches!(e, GpuNoiseError::NoGpu), "{e}");
        assert!(e.is_unavailable());
        assert!(e.to_string().contains("libcuda"));
    }
}
