//! wildlong's own GPU kernels, shared by the engine (decode/prefill attention) and the
//! trainer (the autograd ops' CUDA paths): [`cuda`] launches the PTX that `build.rs` compiles
//! from `kernels/*.cu` with the `cuda` feature. The CPU kernels stay beside their one user
//! (`engine::packed` for quantized matmuls, `engine::attention` for decode attention).

#[cfg(feature = "cuda")]
pub mod cuda;
