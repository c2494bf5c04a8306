//! Where a DP release's noise is drawn: the one choice between the CPU sampler and the GPU kernel,
//! made from the device of the tensor the noise is added to ([`StepNoise::tensor_for`]).
//!
//! * **CPU tensors** (and every tensor when the GPU path is unavailable): the exact discrete
//!   Gaussian of [`SecureGaussian`], drawn ahead on a worker thread ([`NoiseWorker`]) from
//!   ChaCha20 keyed by the OS once per training run.
//! * **CUDA tensors**: the same sampler in its keyed, per-element form ([`KeyedGaussian`]),
//!   drawn on the tensor's GPU by [`crate::gpu_noise::GpuNoise`] with a fresh OS key per
//!   release, into a buffer on that device (no copy over the bus). For the same key the GPU
//!   writes exactly what [`KeyedGaussian::fill`] writes on the CPU (tested on the kernel's source
//!   in CI and on a GPU by `scripts/gpu-check.sh`), and the keyed form is the sequential sampler
//!   run on one ChaCha20 stream per chunk: the same distribution as the CPU path.
//!
//! Where the GPU path cannot start (no libcuda or libnvrtc, or the kernel fails to compile),
//! the step says so once in the log and draws on the CPU, copying the values to the device:
//! slower, the same release. A kernel that starts and then fails is an error of the step.

use std::num::NonZeroUsize;
use std::sync::mpsc;

use tch::{Device, Tensor};
use tutela_privacy::noise::{KeyedGaussian, NoiseKey, SecureGaussian};

use super::dp_error;
use crate::gpu_noise::{GpuNoise, GpuNoiseError};
use crate::train::TrainError;

/// Where a release's noise was drawn (reported by `DpSgdStep::noise_device`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NoiseDevice {
    /// The CPU sampler (`SecureGaussian`); for a CUDA tensor the values were then copied to it.
    Cpu,
    /// The noise kernel on this CUDA device.
    Gpu(usize),
}

/// The GPU sampler, started on the first release for a CUDA tensor.
#[derive(Debug)]
enum GpuSlot {
    Untried,
    Ready(GpuNoise),
    /// The GPU path could not start (logged once); releases draw on the CPU.
    Unavailable,
}

/// A DP-SGD step's noise, on whichever device its release is.
#[derive(Debug)]
pub(crate) struct StepNoise {
    cpu: NoiseWorker,
    keyed: KeyedGaussian,
    gpu: GpuSlot,
    last: Option<NoiseDevice>,
}

impl StepNoise {
    /// `noise` is the step's CPU sampler; the GPU draws the same distribution (its σ and grid).
    pub(crate) fn new(noise: SecureGaussian) -> Result<Self, TrainError> {
        let keyed = KeyedGaussian::new(noise.sigma(), noise.granularity())
            .map_err(|e| dp_error(e.to_string()))?;
        Ok(StepNoise {
            cpu: NoiseWorker::spawn(noise)?,
            keyed,
            gpu: GpuSlot::Untried,
            last: None,
        })
    }

    /// Where the last release's noise was drawn.
    pub(crate) fn last_device(&self) -> Option<NoiseDevice> {
        self.last
    }

    /// `len` fresh noise values for a release on `device`, as a float32 tensor on `device`:
    /// **the** place that chooses the CPU sampler or the GPU kernel. `steps_left` bounds how far
    /// ahead the CPU sampler draws.
    pub(crate) fn tensor_for(
        &mut self,
        len: usize,
        device: Device,
        steps_left: u64,
    ) -> Result<Tensor, TrainError> {
        if let Device::Cuda(ordinal) = device {
            self.start_gpu(ordinal);
        }
        if let (Device::Cuda(ordinal), GpuSlot::Ready(gpu)) = (device, &self.gpu) {
            let key = NoiseKey::from_os().map_err(|e| dp_error(e.to_string()))?;
            let values = gpu
                .draw(&self.keyed, &key, len)
                .map_err(|e| dp_error(format!("drawing DP noise on the GPU: {e}")))?;
            self.last = Some(NoiseDevice::Gpu(ordinal));
            return Ok(values);
        }
        let values = Tensor::f_from_slice(self.cpu.next(len, steps_left)?)?;
        self.last = Some(NoiseDevice::Cpu);
        Ok(values.f_to_device(device)?)
    }

    /// `len` fresh noise values in host memory (the CPU route that releases in place).
    pub(crate) fn host(&mut self, len: usize, steps_left: u64) -> Result<&[f32], TrainError> {
        self.last = Some(NoiseDevice::Cpu);
        self.cpu.next(len, steps_left)
    }

    /// Starts the GPU sampler on device `ordinal` unless it runs there already or the GPU path
    /// is known to be unavailable (then the CPU draws).
    fn start_gpu(&mut self, ordinal: usize) {
        let stale = match &self.gpu {
            GpuSlot::Ready(gpu) => gpu.ordinal() != ordinal,
            GpuSlot::Untried => true,
            GpuSlot::Unavailable => false,
        };
        if stale {
            self.gpu = match GpuNoise::new(ordinal) {
                Ok(gpu) => GpuSlot::Ready(gpu),
                Err(e) => {
                    log_unavailable(&e);
                    GpuSlot::Unavailable
                }
            };
        }
    }
}

fn log_unavailable(e: &GpuNoiseError) {
    if e.is_unavailable() {
        tracing::warn!(
            error = %e,
            "DP noise for CUDA tensors is drawn on the CPU and copied to the GPU"
        );
    } else {
        tracing::error!(
            error = %e,
            "the GPU noise sampler did not start; DP noise is drawn on the CPU and copied to the GPU"
        );
    }
}

/// Values a noise buffer holds at least (when a step needs fewer, a buffer serves several steps):
/// 2^16 draws, some milliseconds of the sampler, so that a small model's steps hand work to the
/// worker thread once every few dozen steps rather than every step (waking a thread costs tens
/// of microseconds on a virtual machine, a tenth of a small MLP's step).
const NOISE_BUFFER_VALUES: usize = 1 << 16;

/// Draws noise on a background thread, ahead of the steps that add it.
///
/// The noise does not depend on the data, so it can be drawn before the gradients it will cover
/// exist: the worker fills the next buffer while steps consume the current one, and the exact
/// discrete Gaussian's cost (about 0.1 µs a value on this machine) stops adding to the step time
/// whenever a core is free. The worker owns the generator and sees nothing but empty buffers;
/// every value is handed out once, in the order drawn, so the released noise is the same
/// sequence of draws as a synchronous fill would give. Values left over when a step needs more
/// than the buffer has left are discarded, never released.
#[derive(Debug)]
pub(crate) struct NoiseWorker {
    requests: Option<mpsc::Sender<Vec<f32>>>,
    filled: mpsc::Receiver<Vec<f32>>,
    /// Whether a buffer is being filled.
    in_flight: bool,
    /// The buffer being consumed, and how much of it is used.
    current: Vec<f32>,
    used: usize,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl NoiseWorker {
    fn spawn(mut noise: SecureGaussian) -> Result<Self, TrainError> {
        let (requests, work) = mpsc::channel::<Vec<f32>>();
        let (done, filled) = mpsc::channel::<Vec<f32>>();
        // Leave one core to the training thread: the worker runs while the step does, and a
        // worker on every core would take a slice of the step's own core each time.
        let threads = std::thread::available_parallelism()
            .ok()
            .and_then(|n| NonZeroUsize::new(n.get() - 1))
            .unwrap_or(NonZeroUsize::MIN);
        let thread = std::thread::Builder::new()
            .name("dp-noise".into())
            .spawn(move || {
                for mut buffer in work {
                    noise.fill_parallel(&mut buffer, threads);
                    if done.send(buffer).is_err() {
                        break;
                    }
                }
            })
            .map_err(|e| dp_error(format!("starting the noise thread: {e}")))?;
        Ok(NoiseWorker {
            requests: Some(requests),
            filled,
            in_flight: false,
            current: Vec::new(),
            used: 0,
            thread: Some(thread),
        })
    }

    fn request(&mut self, buffer: Vec<f32>) -> Result<(), TrainError> {
        self.requests
            .as_ref()
            .and_then(|r| r.send(buffer).ok())
            .ok_or_else(|| dp_error("the noise thread has stopped".into()))?;
        self.in_flight = true;
        Ok(())
    }

    fn receive(&mut self) -> Result<Vec<f32>, TrainError> {
        self.in_flight = false;
        self.filled
            .recv()
            .map_err(|_| dp_error("the noise thread has stopped".into()))
    }

    /// `len` fresh noise values (`g·X`, `X ~ N_ℤ(0, σ_g²)`), never handed out before; at most
    /// `steps_left` steps of `len` values are drawn ahead (a short round does not pay for a
    /// buffer it will not use).
    fn next(&mut self, len: usize, steps_left: u64) -> Result<&[f32], TrainError> {
        if self.current.len() - self.used < len {
            let ahead = usize::try_from(steps_left.max(1)).unwrap_or(usize::MAX);
            let size = len.max((NOISE_BUFFER_VALUES / len.max(1)).min(ahead) * len);
            let mut fresh = if self.in_flight {
                self.receive()?
            } else {
                Vec::new()
            };
            if fresh.len() < len {
                // None was being filled, or one too small for this step (the model changed):
                // draw one of the right size now.
                fresh.resize(size, 0.0);
                self.request(fresh)?;
                fresh = self.receive()?;
            }
            let mut spent = std::mem::replace(&mut self.current, fresh);
            self.used = 0;
            // Refill the spent buffer's storage in the background for the steps to come.
            spent.resize(size, 0.0);
            self.request(spent)?;
        }
        let values = &self.current[self.used..self.used + len];
        self.used += len;
        Ok(values)
    }
}

impl Drop for NoiseWorker {
    fn drop(&mut self) {
        self.requests = None; // ends the worker's loop after its current fill
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
