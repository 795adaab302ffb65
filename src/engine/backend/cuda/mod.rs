//! The CUDA backend's device code: kernels in `kernels/*.cu`, compiled at run time with NVRTC for
//! the device's compute capability. The host side (cuBLASLt GEMMs, streams, the `Backend` impl)
//! is not built yet; what exists is checked on machines without a GPU by compiling every kernel
//! to PTX (`tests/cuda_kernels.rs`).

pub mod kernels;
