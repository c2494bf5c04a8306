//! Makes binaries and tests that link libtorch runnable without LD_LIBRARY_PATH.
//!
//! torch-sys links libtorch but gives the final binary no rpath, so `cargo test` would fail with
//! "libtorch_cpu.so: cannot open shared object file". torch-sys publishes the directory it linked
//! against as `cargo:libtorch_lib`, which reaches this script as `DEP_TCH_LIBTORCH_LIB` because we
//! depend on torch-sys directly.
//!
//! `--no-as-needed -ltorch` keeps libtorch.so (and through it libtorch_cuda.so) in the binary's
//! NEEDED list even though no Rust symbol refers to it directly; without it the linker drops
//! libtorch_cuda and `tch::Cuda::is_available()` is false even on a GPU machine (tch-rs #980).

fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    match std::env::var("DEP_TCH_LIBTORCH_LIB") {
        Ok(lib_dir) => {
            println!("cargo:rustc-link-arg=-Wl,-rpath,{lib_dir}");
            println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
            println!("cargo:rustc-link-arg=-ltorch");
        }
        Err(_) => println!(
            "cargo:warning=torch-sys did not report its libtorch directory (DEP_TCH_LIBTORCH_LIB); \
             binaries will need LD_LIBRARY_PATH to find libtorch"
        ),
    }
}
