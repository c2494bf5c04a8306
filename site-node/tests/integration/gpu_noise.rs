//! DP noise on the GPU (`src/gpu_noise.rs`) and the one choice of where a release's noise is
//! drawn (`src/dp/noise.rs`). Without CUDA (CI, this machine): typed errors, never a panic, and
//! the CPU sampler. With a GPU the first test checks the kernel against the CPU bit for bit;
//! `scripts/gpu-check.sh` runs the full GPU checks (10^7 values, DP-SGD steps on CUDA).

use std::num::NonZeroUsize;

use tch::{Device, Kind, Tensor};
use tutela_privacy::accountant::Accountant;
use tutela_privacy::accountant::plan::{DpSgdInputs, DpSgdPlan};
use tutela_privacy::noise::{KeyedGaussian, NoiseKey};
use tutela_site_node::dp::{DpSgdStep, NoiseDevice};
use tutela_site_node::gpu_noise::{GpuNoise, GpuNoiseError, driver_present};

#[test]
fn the_gpu_sampler_is_a_typed_error_without_libcuda_and_the_cpus_values_with_a_gpu() {
    let started = GpuNoise::new(0);
    if !driver_present() {
        let e = started.expect_err("no libcuda, yet the GPU sampler started");
        assert!(matches!(e, GpuNoiseError::NoGpu), "{e}");
        assert!(e.is_unavailable(), "{e}");
        return;
    }
    if !tch::Cuda::is_available() {
        // A driver library but no usable device: an error, not a panic.
        assert!(started.is_err());
        return;
    }
    let gpu = started.expect("a CUDA GPU and libcuda, but the noise kernel did not start");
    let sampler = KeyedGaussian::new(1.0, 2f64.powi(-16)).unwrap();
    let key = NoiseKey::insecure_from_bytes([9; 32]);
    let n = 1_000_003;
    let from_gpu =
        Vec::<f32>::try_from(gpu.draw(&sampler, &key, n).unwrap().to_device(Device::Cpu)).unwrap();
    let mut on_cpu = vec![0f32; n];
    sampler.fill_parallel(&key, &mut on_cpu, NonZeroUsize::new(4).unwrap());
    let same = on_cpu
        .iter()
        .zip(&from_gpu)
        .all(|(a, b)| a.to_bits() == b.to_bits());
    assert!(
        same,
        "the GPU's noise differs from the CPU's for the same key"
    );
}

fn plan(dimension: usize) -> DpSgdPlan {
    DpSgdPlan::new(&DpSgdInputs {
        rows: 1000,
        batch_size: 50,
        epochs_per_round: 1,
        rounds: 1,
        clip: 1.0,
        dimension,
        target_epsilon: None,
        noise_multiplier: Some(1.2),
        delta: 1e-5,
        accountant: Accountant::Rdp,
        metrics: None,
    })
    .unwrap()
}

#[test]
fn a_release_of_cpu_tensors_draws_its_noise_on_the_cpu() {
    let mut step = DpSgdStep::new(&plan(4096)).unwrap();
    assert_eq!(step.noise_device(), None);
    let released = step
        .privatize(&Tensor::zeros([4096], (Kind::Float, Device::Cpu)))
        .unwrap();
    assert_eq!(step.noise_device(), Some(NoiseDevice::Cpu));
    // Noise, not zeros: σ·C = 1.2, so nearly every value is non-zero.
    let nonzero = released.ne(0.0).sum(Kind::Int64).int64_value(&[]);
    assert!(nonzero > 4000, "{nonzero} non-zero values of 4096");
}
