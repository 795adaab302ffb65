//! The CUDA backend: cuBLASLt for the GEMMs (bias and ReLU/tanh-GELU fused as epilogues), our
//! kernels (`kernels/*.cu`, compiled with NVRTC for the device's compute capability, once per
//! process) for everything else. bf16, f16 or f32 storage with f32 arithmetic.
//!
//! The ops themselves (`ops.rs`, with their shared state and helpers in `backend.rs`) are written
//! over [`KernelDevice`] (`kernel_device.rs`); `gpu.rs` is the GPU device: context, streams,
//! memory, kernel modules and cuBLASLt. Every kernel launch is plain data
//! (`launch.rs`), which is what lets the tests run the same ops on a CPU emulation of the
//! kernels (`tests/cuda_emu.rs`).
//!
//! Streams: every op is enqueued on one compute stream and nothing waits for the GPU until a
//! result is downloaded, so the host tokenizes, packs and enqueues while the GPU runs. A batch's
//! index data (ids, positions, `cu_seqlens`, attention blocks) goes up on a separate copy stream
//! from pinned host memory; upload slots are leased per batch and recycled, so while one batch
//! computes the next one's upload proceeds (double buffering), ordered by events:
//! the copy into a slot waits for the compute that last read it (`released`), and the compute
//! that reads it waits for the copy (`copied`).
//!
//! Activations come from CUDA's stream-ordered allocator (`cuMemAllocAsync` on the compute
//! stream, with the pool told to keep freed memory), so a repeated batch shape allocates nothing
//! from the driver and frees are ordered after the last kernel that reads them.
//!
//! Small batches can run as CUDA graphs (`graph/`): recorded op logs captured on a third
//! stream, in thread-local capture mode, and launched on the compute stream.
//!
//! Built with cudarc's `dynamic-loading`: nothing of CUDA is needed to build, and on a machine
//! without the driver [`device::unavailable_reason`] explains, before any CUDA call.

mod backend;
pub mod device;
pub mod gemm;
mod gpu;
pub mod graph;
mod kernel_device;
pub mod kernels;
pub mod launch;
mod ops;

use cudarc::driver::CudaSlice;

pub use backend::KernelBackend;
pub use device::DeviceInfo;
pub use gpu::{storage_for, Gpu, GpuGraph, SlotLease};
pub use kernel_device::{DevBatch, DevTensor, KernelDevice};

/// The CUDA backend on one GPU. Clones share the device, kernels and streams.
pub type CudaBackend = KernelBackend<Gpu>;
/// A row-major matrix in GPU memory, freed (stream-ordered) on drop.
pub type CudaTensor = DevTensor<CudaSlice<u8>>;
/// A batch's index data on the GPU (in one upload slot).
pub type CudaBatch = DevBatch<SlotLease>;
