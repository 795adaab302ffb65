//! The wgpu plumbing under the backend: the device (on the adapter `adapter.rs` chooses), cached pipelines, a buffer
//! pool, and a recorder that batches every op of a forward pass into one submission.
//!
//! Recording: ops append compute passes to one pending command encoder; their `Params` go to a
//! host-side copy of a uniform ring buffer (one 256-byte-aligned slot per dispatch, bound through
//! one bind group with a dynamic offset). `flush` writes the ring and submits everything at once;
//! it runs when results are downloaded, at `sync`, or when the ring is full. Buffers freed while
//! recording go back to the pool and may be reused by later ops of the same submission: the queue
//! runs passes in order and wgpu puts barriers between them, so a reuse never races a read.

use std::collections::HashMap;
use std::num::NonZeroU64;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{anyhow, bail, ensure, Context as _, Result};
use wgpu::util::DeviceExt;

use super::adapter::choose;
use super::shaders::{self, Op};
use crate::engine::Precision;

/// Bytes per uniform slot; `Params` structs are at most 32 bytes.
const PARAMS_SIZE: u64 = 32;
/// Slots in the uniform ring: dispatches one submission can hold.
const RING_SLOTS: u64 = 2048;

/// Buffers of one size class, reused across ops and batches.
#[derive(Default)]
pub struct Pool {
    free: Mutex<HashMap<u64, Vec<wgpu::Buffer>>>,
}

impl Pool {
    fn take(&self, size: u64) -> Option<wgpu::Buffer> {
        self.free.lock().unwrap().get_mut(&size)?.pop()
    }
    pub fn give(&self, buffer: wgpu::Buffer) {
        let size = buffer.size();
        self.free
            .lock()
            .unwrap()
            .entry(size)
            .or_default()
            .push(buffer);
    }
}

/// Round a byte size up to a size class (steps of an eighth of a power of two, so at most 12.5%
/// is wasted) so that batches of slightly different lengths reuse the same buffers.
fn size_class(bytes: u64) -> u64 {
    let bytes = bytes.max(256);
    let top = 63 - bytes.leading_zeros() as u64;
    let step = 1u64 << top.saturating_sub(3);
    bytes.div_ceil(step) * step
}

struct Recording {
    encoder: Option<wgpu::CommandEncoder>,
    /// Host copy of the uniform ring for the pending submission.
    params: Vec<u8>,
    slots: u64,
    dispatches: u64,
}

/// Counters for `mira bench` and tests.
#[derive(Debug, Default, Clone, Copy)]
pub struct Counters {
    pub submits: u64,
    pub dispatches: u64,
    pub buffers_created: u64,
    pub bind_groups_created: u64,
}

pub struct Context {
    pub device: wgpu::Device,
    pub queue: wgpu::Queue,
    pub info: wgpu::AdapterInfo,
    pub limits: wgpu::Limits,
    pub f16: bool,
    pub pool: Arc<Pool>,
    params_layout: wgpu::BindGroupLayout,
    ring: wgpu::Buffer,
    ring_group: wgpu::BindGroup,
    slot_stride: u64,
    layouts: Mutex<HashMap<Op, Arc<(wgpu::BindGroupLayout, wgpu::PipelineLayout)>>>,
    pipelines: Mutex<HashMap<(Op, u32), Arc<wgpu::ComputePipeline>>>,
    bind_groups: Mutex<HashMap<(Op, Vec<wgpu::Buffer>), wgpu::BindGroup>>,
    staging: Mutex<Vec<wgpu::Buffer>>,
    recording: Mutex<Recording>,
    error: Arc<Mutex<Option<String>>>,
    counters: Mutex<Counters>,
    /// Placeholders bound where an optional input (read) or output (written) is absent: two,
    /// since one dispatch may not bind a buffer both read-only and writable.
    pub dummy: wgpu::Buffer,
    pub dummy_rw: wgpu::Buffer,
    /// Tests: every new activation starts as NaN instead of coming from the pool.
    pub poison: AtomicBool,
}

impl Context {
    // Long: the device's setup in order (adapter, limits, features, device, ring buffer, pools),
    // each step using the results of the last.
    pub fn new(ordinal: Option<usize>, precision: Precision) -> Result<Context> {
        let adapter = choose(ordinal)?;
        let info = adapter.get_info();
        let has_f16 = adapter.features().contains(wgpu::Features::SHADER_F16);
        let f16 = match precision {
            Precision::Auto => has_f16,
            Precision::F32 => false,
            Precision::Bf16 => bail!(
                "wgpu has no bf16 storage (WGSL has no bf16 type): use --precision f16 or f32"
            ),
            Precision::Int8 => {
                bail!("int8 runs on the cpu only: use --precision f16 or f32 on wgpu")
            }
            Precision::F16 => {
                ensure!(
                    has_f16,
                    "{} ({:?}) has no SHADER_F16: f16 storage is not available (use f32)",
                    info.name,
                    info.backend
                );
                true
            }
        };
        // Ask for everything the adapter offers: bigger bindings mean bigger batches.
        let limits = adapter.limits();
        let mut usable = limits.clone();
        // MIRA_WGPU_MAX_BINDING (bytes) caps what mira binds at once, to reproduce a device
        // with small limits (tests, or a driver whose large bindings misbehave).
        if let Ok(cap) = std::env::var("MIRA_WGPU_MAX_BINDING") {
            let cap: u64 = cap
                .trim()
                .parse()
                .map_err(|_| anyhow!("MIRA_WGPU_MAX_BINDING='{cap}' is not a number of bytes"))?;
            usable.max_storage_buffer_binding_size =
                usable.max_storage_buffer_binding_size.min(cap);
        }
        let features = if f16 {
            wgpu::Features::SHADER_F16
        } else {
            wgpu::Features::empty()
        };
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("mira"),
            required_features: features,
            required_limits: limits.clone(),
            experimental_features: wgpu::ExperimentalFeatures::disabled(),
            memory_hints: wgpu::MemoryHints::Performance,
            trace: wgpu::Trace::Off,
        }))
        .with_context(|| format!("cannot open wgpu device {} ({:?})", info.name, info.backend))?;
        let error: Arc<Mutex<Option<String>>> = Arc::default();
        let sink = error.clone();
        device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
            let mut slot = sink.lock().unwrap();
            if slot.is_none() {
                *slot = Some(e.to_string());
            }
        }));

        let params_layout = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
            label: Some("params"),
            entries: &[wgpu::BindGroupLayoutEntry {
                binding: 0,
                visibility: wgpu::ShaderStages::COMPUTE,
                ty: wgpu::BindingType::Buffer {
                    ty: wgpu::BufferBindingType::Uniform,
                    has_dynamic_offset: true,
                    min_binding_size: NonZeroU64::new(PARAMS_SIZE),
                },
                count: None,
            }],
        });
        let slot_stride = (limits.min_uniform_buffer_offset_alignment as u64).max(PARAMS_SIZE);
        let ring = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("params ring"),
            size: slot_stride * RING_SLOTS,
            usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let ring_group = device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some("params ring"),
            layout: &params_layout,
            entries: &[wgpu::BindGroupEntry {
                binding: 0,
                resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                    buffer: &ring,
                    offset: 0,
                    size: NonZeroU64::new(PARAMS_SIZE),
                }),
            }],
        });
        let dummy = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("absent input"),
            size: 256,
            usage: wgpu::BufferUsages::STORAGE,
            mapped_at_creation: false,
        });
        let dummy_rw = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("absent output"),
            size: 256,
            usage: wgpu::BufferUsages::STORAGE,
            mapped_at_creation: false,
        });
        Ok(Context {
            device,
            queue,
            info,
            limits: usable,
            f16,
            pool: Arc::default(),
            params_layout,
            ring,
            ring_group,
            slot_stride,
            layouts: Mutex::default(),
            pipelines: Mutex::default(),
            bind_groups: Mutex::default(),
            staging: Mutex::default(),
            recording: Mutex::new(Recording {
                encoder: None,
                params: Vec::new(),
                slots: 0,
                dispatches: 0,
            }),
            error,
            counters: Mutex::default(),
            dummy,
            dummy_rw,
            poison: AtomicBool::new(false),
        })
    }

    pub fn elem_bytes(&self) -> u64 {
        if self.f16 {
            2
        } else {
            4
        }
    }

    /// The largest buffer one binding may cover.
    pub fn max_binding(&self) -> u64 {
        self.limits
            .max_storage_buffer_binding_size
            .min(self.limits.max_buffer_size)
    }

    pub fn counters(&self) -> Counters {
        *self.counters.lock().unwrap()
    }

    /// A device error recorded since the last check, as an `Err`.
    pub fn check(&self) -> Result<()> {
        if let Some(e) = self.error.lock().unwrap().take() {
            bail!("wgpu device error on {}: {e}", self.info.name);
        }
        Ok(())
    }

    /// A storage buffer of at least `bytes` from the pool (contents undefined). `what` names the
    /// tensor in the error when the adapter's binding limit is too small.
    pub fn alloc(&self, bytes: u64, what: &str) -> Result<wgpu::Buffer> {
        let max = self.max_binding();
        ensure!(
            bytes <= max,
            "{what} needs a {bytes}-byte buffer but {} binds at most {max} bytes: use smaller \
             batches (--batch-tokens){}",
            self.info.name,
            if self.f16 { "" } else { " or f16 storage" }
        );
        let size = size_class(bytes)
            .min(max / 4 * 4)
            .max(bytes.div_ceil(4) * 4);
        let poison = self.poison.load(Ordering::Relaxed);
        if !poison {
            if let Some(b) = self.pool.take(size) {
                return Ok(b);
            }
        }
        self.counters.lock().unwrap().buffers_created += 1;
        let buffer = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(what),
            size,
            usage: wgpu::BufferUsages::STORAGE
                | wgpu::BufferUsages::COPY_SRC
                | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: poison,
        });
        if poison {
            // All ones: NaN in f32 and in f16, so any value an op fails to write shows.
            let mut view = buffer
                .slice(..)
                .get_mapped_range_mut()
                .map_err(|e| anyhow!("wgpu: cannot map a new buffer: {e}"))?;
            view.copy_from_slice(&vec![0xFF; size as usize]);
            drop(view);
            buffer.unmap();
        }
        Ok(buffer)
    }

    /// A pooled buffer holding `bytes` (batch indices), written through the queue: the write
    /// lands before the next submission's commands, so the caller flushes first.
    pub fn write_pooled(&self, bytes: &[u8], what: &str) -> Result<wgpu::Buffer> {
        let padded = bytes.len().div_ceil(4).max(1) * 4;
        let buffer = self.alloc(padded as u64, what)?;
        let mut data = bytes.to_vec();
        data.resize(padded, 0);
        self.queue.write_buffer(&buffer, 0, &data);
        Ok(buffer)
    }

    /// A buffer holding `bytes`, outside the pool (weights, rotary tables).
    pub fn upload(&self, bytes: &[u8], what: &str) -> Result<wgpu::Buffer> {
        let max = self.max_binding();
        ensure!(
            (bytes.len() as u64) <= max,
            "{what} is {} bytes but {} binds at most {max} bytes{}",
            bytes.len(),
            self.info.name,
            if self.f16 {
                ""
            } else {
                " (f16 storage halves it)"
            }
        );
        let mut padded;
        let contents = if bytes.len() < 16 || !bytes.len().is_multiple_of(4) {
            padded = bytes.to_vec();
            padded.resize(bytes.len().div_ceil(4).max(4) * 4, 0);
            &padded[..]
        } else {
            bytes
        };
        self.counters.lock().unwrap().buffers_created += 1;
        Ok(self
            .device
            .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some(what),
                contents,
                usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC,
            }))
    }

    fn layout(&self, op: Op) -> Arc<(wgpu::BindGroupLayout, wgpu::PipelineLayout)> {
        let mut layouts = self.layouts.lock().unwrap();
        layouts
            .entry(op)
            .or_insert_with(|| {
                let entries: Vec<_> = op
                    .bindings()
                    .iter()
                    .enumerate()
                    .map(|(i, &writable)| wgpu::BindGroupLayoutEntry {
                        binding: i as u32,
                        visibility: wgpu::ShaderStages::COMPUTE,
                        ty: wgpu::BindingType::Buffer {
                            ty: wgpu::BufferBindingType::Storage {
                                read_only: !writable,
                            },
                            has_dynamic_offset: false,
                            min_binding_size: None,
                        },
                        count: None,
                    })
                    .collect();
                let group =
                    self.device
                        .create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
                            label: Some(op.name()),
                            entries: &entries,
                        });
                let pipeline =
                    self.device
                        .create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
                            label: Some(op.name()),
                            bind_group_layouts: &[Some(&group), Some(&self.params_layout)],
                            immediate_size: 0,
                        });
                Arc::new((group, pipeline))
            })
            .clone()
    }

    /// The pipeline of `op` specialised for `variant` (the head size for attention), compiled
    /// once per process and device.
    fn pipeline(&self, op: Op, variant: u32) -> Result<Arc<wgpu::ComputePipeline>> {
        if let Some(p) = self.pipelines.lock().unwrap().get(&(op, variant)) {
            return Ok(p.clone());
        }
        let source = shaders::source(op, self.f16, variant);
        let layout = self.layout(op);
        let module = self
            .device
            .create_shader_module(wgpu::ShaderModuleDescriptor {
                label: Some(op.name()),
                source: wgpu::ShaderSource::Wgsl(source.into()),
            });
        let pipeline = self
            .device
            .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(op.name()),
                layout: Some(&layout.1),
                module: &module,
                entry_point: Some("main"),
                compilation_options: Default::default(),
                cache: None,
            });
        self.check()
            .with_context(|| format!("cannot build the {} shader", op.name()))?;
        let pipeline = Arc::new(pipeline);
        self.pipelines
            .lock()
            .unwrap()
            .insert((op, variant), pipeline.clone());
        Ok(pipeline)
    }

    /// The bind group of `op` over `buffers`, reused whenever the same buffers meet again (pooled
    /// activations and fixed weights make that the rule from the second batch on).
    fn bind_group(&self, op: Op, buffers: &[&wgpu::Buffer]) -> wgpu::BindGroup {
        let key = (op, buffers.iter().map(|&b| b.clone()).collect::<Vec<_>>());
        let mut cache = self.bind_groups.lock().unwrap();
        if let Some(g) = cache.get(&key) {
            return g.clone();
        }
        if cache.len() >= 8192 {
            cache.clear();
        }
        let layout = self.layout(op);
        let entries: Vec<_> = buffers
            .iter()
            .enumerate()
            .map(|(i, b)| wgpu::BindGroupEntry {
                binding: i as u32,
                resource: b.as_entire_binding(),
            })
            .collect();
        let group = self.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some(op.name()),
            layout: &layout.0,
            entries: &entries,
        });
        self.counters.lock().unwrap().bind_groups_created += 1;
        cache.insert(key, group.clone());
        group
    }

    /// Split `n` workgroups over x and y so neither passes the per-dimension limit.
    pub fn grid(&self, n: u32) -> (u32, u32) {
        let max = self.limits.max_compute_workgroups_per_dimension.max(1);
        if n <= max {
            (n.max(1), 1)
        } else {
            (max, n.div_ceil(max))
        }
    }

    /// Record one dispatch of `op` over `buffers` (in binding order) with `params` (≤ 32 bytes).
    pub fn dispatch(
        &self,
        op: Op,
        variant: u32,
        buffers: &[&wgpu::Buffer],
        params: &[u8],
        groups: (u32, u32, u32),
    ) -> Result<()> {
        debug_assert!(params.len() as u64 <= PARAMS_SIZE);
        debug_assert_eq!(buffers.len(), op.bindings().len());
        let max = self.limits.max_compute_workgroups_per_dimension;
        ensure!(
            groups.0 <= max && groups.1 <= max && groups.2 <= max,
            "{}: {groups:?} workgroups exceed the adapter's {max} per dimension",
            op.name()
        );
        let pipeline = self.pipeline(op, variant)?;
        let group = self.bind_group(op, buffers);
        let mut rec = self.recording.lock().unwrap();
        if rec.slots == RING_SLOTS {
            self.submit(&mut rec);
        }
        let offset = rec.slots * self.slot_stride;
        rec.params.resize((offset + self.slot_stride) as usize, 0);
        rec.params[offset as usize..offset as usize + params.len()].copy_from_slice(params);
        rec.slots += 1;
        rec.dispatches += 1;
        let encoder = rec.encoder.get_or_insert_with(|| {
            self.device
                .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                    label: Some("mira"),
                })
        });
        {
            let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some(op.name()),
                timestamp_writes: None,
            });
            pass.set_pipeline(&pipeline);
            pass.set_bind_group(0, &group, &[]);
            pass.set_bind_group(1, &self.ring_group, &[offset as u32]);
            if groups.0 > 0 && groups.1 > 0 && groups.2 > 0 {
                pass.dispatch_workgroups(groups.0, groups.1, groups.2);
            }
        }
        Ok(())
    }

    fn submit(&self, rec: &mut Recording) {
        if let Some(encoder) = rec.encoder.take() {
            self.queue.write_buffer(&self.ring, 0, &rec.params);
            self.queue.submit([encoder.finish()]);
            let mut c = self.counters.lock().unwrap();
            c.submits += 1;
            c.dispatches += rec.dispatches;
        }
        rec.params.clear();
        rec.slots = 0;
        rec.dispatches = 0;
    }

    /// Submit everything recorded so far.
    pub fn flush(&self) {
        let mut rec = self.recording.lock().unwrap();
        self.submit(&mut rec);
    }

    /// Wait until the device is idle, surfacing any recorded device error.
    pub fn wait(&self) -> Result<()> {
        self.flush();
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| anyhow!("wgpu device on {}: {e}", self.info.name))?;
        self.check()
    }

    /// Copy the first `bytes` of `buffer` to the host (submits pending work first).
    pub fn read(&self, buffer: &wgpu::Buffer, bytes: u64) -> Result<Vec<u8>> {
        if bytes == 0 {
            return Ok(Vec::new());
        }
        let size = size_class(bytes);
        let staging = {
            let mut free = self.staging.lock().unwrap();
            match free.iter().position(|b| b.size() == size) {
                Some(i) => free.swap_remove(i),
                None => self.device.create_buffer(&wgpu::BufferDescriptor {
                    label: Some("download"),
                    size,
                    usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                    mapped_at_creation: false,
                }),
            }
        };
        {
            let mut rec = self.recording.lock().unwrap();
            let encoder = rec.encoder.get_or_insert_with(|| {
                self.device
                    .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                        label: Some("mira"),
                    })
            });
            encoder.copy_buffer_to_buffer(buffer, 0, &staging, 0, bytes.div_ceil(4) * 4);
            self.submit(&mut rec);
        }
        let slice = staging.slice(..bytes.div_ceil(4) * 4);
        let (tx, rx) = std::sync::mpsc::channel();
        slice.map_async(wgpu::MapMode::Read, move |r| {
            let _ = tx.send(r);
        });
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| anyhow!("wgpu device on {}: {e}", self.info.name))?;
        self.check()?;
        rx.recv()
            .map_err(|_| anyhow!("wgpu: the download was dropped"))?
            .map_err(|e| anyhow!("wgpu: cannot map the download buffer: {e}"))?;
        let data = slice
            .get_mapped_range()
            .map_err(|e| anyhow!("wgpu: cannot read the download buffer: {e}"))?[..bytes as usize]
            .to_vec();
        staging.unmap();
        let mut free = self.staging.lock().unwrap();
        if free.len() < 8 {
            free.push(staging);
        }
        Ok(data)
    }
}
