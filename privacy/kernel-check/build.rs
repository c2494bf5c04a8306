//! Compiles the GPU noise kernel's source (`privacy/src/noise/discrete_gaussian.cu`) as plain C:
//! everything but the `__global__` entry point is shared by both builds, so the tests of this
//! crate exercise, on the CPU, the very device functions NVRTC compiles for the GPU.

use std::path::PathBuf;

fn main() {
    let source = PathBuf::from("../src/noise/discrete_gaussian.cu");
    println!("cargo:rerun-if-changed={}", source.display());
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    // A `.c` copy, so that every C compiler takes it as C whatever it makes of `.cu`.
    let c_file = out.join("discrete_gaussian.c");
    std::fs::copy(&source, &c_file).expect("copying the kernel source into OUT_DIR");
    cc::Build::new()
        .file(&c_file)
        .std("c11")
        // The dev profile would compile it at -O0: the tests draw millions of values.
        .opt_level(2)
        .warnings(true)
        .extra_warnings(true)
        .warnings_into_errors(true)
        .compile("tutela_noise_kernel");
}
