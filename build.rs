//! Compiles `kernels/*.cu` to PTX with nvcc, only with the `cuda` feature (the default build
//! needs no CUDA toolkit). The PTX is embedded by `src/engine/cuda.rs` and loaded (JIT) by
//! the driver on first use. `CUDA_COMPUTE_CAP` (e.g. `90`) picks the virtual architecture;
//! without it, `80`, which every GPU with bf16 tensor cores runs. nvcc is taken from
//! `$CUDA_HOME/bin`, else from `PATH`.

use std::path::PathBuf;
use std::process::Command;

const KERNELS: [&str; 2] = ["flash_attn", "fused"];

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo:rerun-if-env-changed=CUDA_HOME");
    for k in KERNELS {
        println!("cargo:rerun-if-changed=kernels/{k}.cu");
    }
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let cap: u32 = match std::env::var("CUDA_COMPUTE_CAP") {
        Ok(s) => s
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("CUDA_COMPUTE_CAP must be a number like 90, got `{s}`")),
        Err(_) => 80,
    };
    if cap < 80 {
        panic!(
            "wildlong's CUDA kernels use bf16 tensor-core instructions (mma.sync m16n8k16): \
             compute capability 8.0 or newer is needed, CUDA_COMPUTE_CAP is {cap}"
        );
    }
    let nvcc = std::env::var_os("CUDA_HOME")
        .map(|h| PathBuf::from(h).join("bin").join("nvcc"))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("nvcc"));
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    for k in KERNELS {
        let ptx = out.join(format!("{k}.ptx"));
        let status = Command::new(&nvcc)
            .args(["--ptx", "-O3", "-std=c++17", "--use_fast_math"])
            .arg(format!("-arch=compute_{cap}"))
            .arg(format!("kernels/{k}.cu"))
            .arg("-o")
            .arg(&ptx)
            .status()
            .unwrap_or_else(|e| {
                panic!(
                    "running {} for kernels/{k}.cu: {e} (the cuda feature needs the CUDA \
                     toolkit: bash scripts/cuda/setup.sh, or set CUDA_HOME)",
                    nvcc.display()
                )
            });
        if !status.success() {
            panic!("nvcc failed on kernels/{k}.cu ({status})");
        }
    }
}
