//! Adapter choice, device creation and what the device can do.
//!
//! Acquiring a device is kept apart from the work: every operation takes a
//! [`Gpu`], which either requested its own device ([`Gpu::new`]) or wraps one
//! the caller already has ([`Gpu::from_device`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use crate::allocation::create_buffer_with;
use crate::error::{Error, Result};
use crate::pipelines::PipelineCache;

/// Optional features the kernels use when the adapter has them.
pub const WANTED_FEATURES: wgpu::Features = wgpu::Features::SHADER_F16
    .union(wgpu::Features::SUBGROUP)
    .union(wgpu::Features::TIMESTAMP_QUERY)
    .union(wgpu::Features::TIMESTAMP_QUERY_INSIDE_ENCODERS);

/// Set to 1 to request cooperative matrices ([`AdapterOptions::cooperative_matrix`]).
pub const COOPERATIVE_MATRIX_VAR: &str = "FLASH_ATTN_COOPERATIVE_MATRIX";

/// How to pick an adapter. [`AdapterOptions::from_env`] follows wgpu's usual
/// variables: `WGPU_BACKEND`, `WGPU_ADAPTER_NAME`, `WGPU_POWER_PREF`.
#[derive(Debug, Clone)]
pub struct AdapterOptions {
    /// Backends to search (`WGPU_BACKEND`, else wgpu's default set).
    pub backends: wgpu::Backends,
    /// Case-insensitive substring of the adapter name.
    pub adapter_name: Option<String>,
    /// Adapter preference when no name is given (`WGPU_POWER_PREF`).
    pub power_preference: wgpu::PowerPreference,
    /// Request wgpu's `EXPERIMENTAL_COOPERATIVE_MATRIX` feature where the
    /// adapter has it (`FLASH_ATTN_COOPERATIVE_MATRIX=1`), which offers
    /// [`crate::Tier::CooperativeMatrix`]. wgpu marks the feature
    /// experimental (its implementation may still have bugs), so it is off
    /// unless asked for. On Vulkan `PASSTHROUGH_SHADERS` comes with it: the
    /// matrix kernel's SPIR-V is the crate's own ([`crate::spirv`]).
    pub cooperative_matrix: bool,
    /// On a device without cooperative matrices, offer
    /// [`crate::Tier::CooperativeMatrix`] anyway with its matrix products
    /// emulated in scalar code (16x16 and 8x8, f16 and f32 operands): slow,
    /// for testing the kernel's logic on adapters without matrix units.
    pub emulate_cooperative_matrices: bool,
}

impl AdapterOptions {
    /// Options from `WGPU_BACKEND`, `WGPU_ADAPTER_NAME` (empty = unset) and `WGPU_POWER_PREF`,
    /// wgpu's defaults for unset ones.
    pub fn from_env() -> Self {
        AdapterOptions {
            backends: wgpu::Backends::from_env().unwrap_or_default(),
            adapter_name: std::env::var("WGPU_ADAPTER_NAME")
                .ok()
                .filter(|name| !name.is_empty()),
            power_preference: wgpu::PowerPreference::from_env().unwrap_or_default(),
            cooperative_matrix: std::env::var(COOPERATIVE_MATRIX_VAR).is_ok_and(|v| v == "1"),
            emulate_cooperative_matrices: false,
        }
    }

    /// The process-wide instance for these options' backends. Every `Gpu`
    /// the crate opens shares one instance per backend set, because wgpu
    /// numbers resources per instance: a buffer of one `Gpu` handed to
    /// another would otherwise name an unrelated resource of the second,
    /// instead of failing wgpu's device check with a typed error.
    fn instance(&self) -> wgpu::Instance {
        static INSTANCES: Mutex<Vec<(wgpu::Backends, wgpu::Instance)>> = Mutex::new(Vec::new());
        let mut instances = INSTANCES.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, instance)) = instances.iter().find(|(b, _)| *b == self.backends) {
            return instance.clone();
        }
        let mut desc = wgpu::InstanceDescriptor::new_without_display_handle_from_env();
        desc.backends = self.backends;
        let instance = wgpu::Instance::new(desc);
        instances.push((self.backends, instance.clone()));
        instance
    }

    /// Every adapter these options' backends can see.
    pub fn enumerate(&self) -> Vec<wgpu::Adapter> {
        pollster::block_on(self.instance().enumerate_adapters(self.backends))
    }

    /// The adapter these options select.
    pub async fn select(&self) -> Result<wgpu::Adapter> {
        let instance = self.instance();
        if let Some(wanted) = &self.adapter_name {
            let adapters = instance.enumerate_adapters(self.backends).await;
            let wanted_lower = wanted.to_lowercase();
            let names: Vec<String> = adapters.iter().map(|a| a.get_info().name).collect();
            return adapters
                .into_iter()
                .find(|a| a.get_info().name.to_lowercase().contains(&wanted_lower))
                .ok_or_else(|| Error::AdapterNotFound {
                    wanted: wanted.clone(),
                    available: names,
                });
        }
        instance
            .request_adapter(&wgpu::RequestAdapterOptions {
                power_preference: self.power_preference,
                ..Default::default()
            })
            .await
            .map_err(|_| Error::NoAdapter {
                backends: format!("{:?}", self.backends),
            })
    }
}

/// What the device offers, as the crate sees it.
#[derive(Debug, Clone)]
pub struct GpuInfo {
    /// The adapter's name, vendor, device type, backend and driver.
    pub adapter: wgpu::AdapterInfo,
    /// Features enabled on the device (a subset of the adapter's).
    pub features: wgpu::Features,
    /// Limits of the device (the adapter's real limits when the crate
    /// requested the device itself).
    pub limits: wgpu::Limits,
    /// Threads the host runs at once. On a CPU adapter (lavapipe, WARP)
    /// these are the compute units, so the decode planner sizes its key
    /// splits from them.
    pub host_threads: usize,
    /// The cooperative-matrix configurations the adapter reports, when
    /// the device has `EXPERIMENTAL_COOPERATIVE_MATRIX` enabled; empty
    /// otherwise (and for a caller's device wrapped by
    /// [`Gpu::from_device`], which has no adapter to ask, unless given one:
    /// [`Gpu::with_cooperative_matrices_of`]); the emulated
    /// configurations with [`GpuInfo::cooperative_matrix_emulation`].
    pub cooperative_matrices: Vec<wgpu::CooperativeMatrixProperties>,
    /// The cooperative-matrix tier runs with its products emulated
    /// ([`AdapterOptions::emulate_cooperative_matrices`]).
    pub cooperative_matrix_emulation: bool,
}

impl GpuInfo {
    /// What a device the crate opens on `adapter` with `options`
    /// ([`Gpu::from_adapter_with`]: all of its limits, the
    /// [`WANTED_FEATURES`] it has, cooperative matrices if asked for and
    /// offered, or emulated if asked for) would report, without opening
    /// one: for planning on adapters that are only listed.
    pub fn of_adapter(adapter: &wgpu::Adapter, options: &AdapterOptions) -> Self {
        let features = device_features(adapter, options.cooperative_matrix);
        let real = features.contains(wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX);
        let emulated = !real && options.emulate_cooperative_matrices;
        GpuInfo {
            adapter: adapter.get_info(),
            features,
            limits: adapter.limits(),
            host_threads: host_threads(),
            cooperative_matrices: if real {
                adapter.cooperative_matrix_properties()
            } else if emulated {
                emulated_cooperative_matrices()
            } else {
                Vec::new()
            },
            cooperative_matrix_emulation: emulated,
        }
    }
    /// Whether the device has `SHADER_F16` enabled.
    pub fn has_f16(&self) -> bool {
        self.features.contains(wgpu::Features::SHADER_F16)
    }
    /// Whether the device has `SUBGROUP` enabled (needed by [`crate::Tier::SubgroupBroadcast`]).
    pub fn has_subgroups(&self) -> bool {
        self.features.contains(wgpu::Features::SUBGROUP)
    }
    /// Whether the device has `TIMESTAMP_QUERY` enabled (GPU timing of passes).
    pub fn has_timestamps(&self) -> bool {
        self.features.contains(wgpu::Features::TIMESTAMP_QUERY)
    }
    /// Timestamps can be written between passes of one encoder, which is
    /// how flash-bench's timer brackets arbitrary recorded work.
    pub fn has_encoder_timestamps(&self) -> bool {
        self.features.contains(
            wgpu::Features::TIMESTAMP_QUERY | wgpu::Features::TIMESTAMP_QUERY_INSIDE_ENCODERS,
        )
    }

    /// Invocations one workgroup may have along x (the kernels are 1-D).
    pub fn max_invocations(&self) -> u32 {
        self.limits
            .max_compute_invocations_per_workgroup
            .min(self.limits.max_compute_workgroup_size_x)
    }

    /// `WorkgroupInvocations` unless a kernel of `needed` invocations fits.
    pub(crate) fn check_invocations(&self, needed: u32) -> crate::Result<()> {
        let limit = self.max_invocations();
        if needed > limit {
            return Err(crate::Error::WorkgroupInvocations { needed, limit });
        }
        Ok(())
    }

    /// [`Self::check_invocations`], then `WorkgroupMemory` (naming the
    /// call's head dims) unless `bytes` of workgroup memory fit: the checks
    /// of a tiling the caller chose rather than the planner.
    pub(crate) fn check_workgroup(
        &self,
        shape: &crate::AttentionShape,
        invocations: u32,
        bytes: u64,
    ) -> crate::Result<()> {
        self.check_invocations(invocations)?;
        let limit = self.limits.max_compute_workgroup_storage_size;
        if bytes > u64::from(limit) {
            return Err(crate::Error::WorkgroupMemory {
                head_dim: shape.head_dim,
                head_dim_v: shape.head_dim_v,
                needed: bytes,
                limit,
            });
        }
        Ok(())
    }

    /// The most loop iterations one shader invocation may run, where the
    /// driver imposes a cap: Mesa's llvmpipe (lavapipe on Vulkan, llvmpipe
    /// on GL) stops every loop of an invocation, silently, once all of them
    /// together have run 65535 iterations (gallivm's
    /// `LP_MAX_TGSI_LOOP_ITERATIONS`). Kernels are planned to stay under it
    /// (decoding adds splits) or refuse with [`Error::LoopBudget`].
    ///
    /// [`Error::LoopBudget`]: crate::Error::LoopBudget
    pub fn loop_budget(&self) -> Option<u64> {
        const LLVMPIPE_LOOP_ITERATIONS: u64 = 65_535;
        let adapter = &self.adapter;
        let llvmpipe = adapter.name.contains("llvmpipe") || adapter.driver.contains("llvmpipe");
        llvmpipe.then_some(LLVMPIPE_LOOP_ITERATIONS)
    }

    /// The major version of the LLVM a software adapter compiles kernels
    /// with, where it says (Mesa's llvmpipe names it in the adapter name
    /// and driver info: "llvmpipe (LLVM 15.0.6, 256 bits)"); `None`
    /// elsewhere. The decode planner sizes CPU kernels by it, since how
    /// long a wide kernel takes to compile depends on it.
    pub fn llvm_major(&self) -> Option<u32> {
        let adapter = &self.adapter;
        [&adapter.name, &adapter.driver_info]
            .into_iter()
            .find_map(|text| {
                let version = &text[text.find("LLVM ")? + "LLVM ".len()..];
                let digits = version
                    .find(|c: char| !c.is_ascii_digit())
                    .unwrap_or(version.len());
                version[..digits].parse().ok()
            })
    }

    /// One line: name, backend, device type.
    pub fn summary(&self) -> String {
        format!(
            "{} ({:?}, {:?}, driver {} {})",
            self.adapter.name,
            self.adapter.backend,
            self.adapter.device_type,
            self.adapter.driver,
            self.adapter.driver_info
        )
    }
}

/// A device and queue plus the crate's pipeline cache. Cheap to share by
/// reference; all methods take `&self`.
pub struct Gpu {
    pub(crate) device: wgpu::Device,
    pub(crate) queue: wgpu::Queue,
    info: GpuInfo,
    pub(crate) pipelines: PipelineCache,
    pub(crate) placeholders: Placeholders,
    /// Reusable device scratch by purpose (decode partial results), grown
    /// when a call needs more.
    scratch: Mutex<HashMap<&'static str, wgpu::Buffer>>,
    /// Why the device was lost, once its lost callback has said so
    /// ([`Gpu::device_lost_notifier`]: installed on the devices the crate
    /// requests, chained by callers of [`Gpu::from_device`]).
    lost: Arc<OnceLock<String>>,
    /// The first error a browser's error scopes reported after its call
    /// had returned (`crate::error_scopes`), for the next operation to
    /// report. Always empty on native backends.
    deferred: Arc<Mutex<Option<Error>>>,
}

/// Device objects made once per `Gpu` for the crate's own bookkeeping: tiny
/// buffers bound where an optional input or output is absent (every
/// binding of a bind group must be filled), and the one-binding layout
/// that probes which device a caller's buffer belongs to.
pub(crate) struct Placeholders {
    /// Bound where an absent output would be written (an lse not asked
    /// for, a latent cache's V); 64 bytes, never read back.
    pub writable: wgpu::Buffer,
    /// Bound where an absent read-only table would be read (head table,
    /// mask tile states, a dense call's sequence table); never read.
    pub read_only: wgpu::Buffer,
    /// One read-only storage binding, for [`Gpu::check_own_buffer`]: made
    /// on first use, so that wrapping a device that binds no storage
    /// buffer at all does not fail in wgpu.
    pub probe_layout: OnceLock<wgpu::BindGroupLayout>,
}

impl Placeholders {
    fn new(device: &wgpu::Device) -> Self {
        let make = |label| {
            device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(label),
                // One element of the largest array a placeholder stands in
                // for (a forward's SequenceRows, 48 bytes).
                size: 64,
                usage: wgpu::BufferUsages::STORAGE,
                mapped_at_creation: false,
            })
        };
        Placeholders {
            writable: make("wgpu-flash-attn placeholder (writable)"),
            read_only: make("wgpu-flash-attn placeholder (read-only)"),
            probe_layout: OnceLock::new(),
        }
    }
}

impl Gpu {
    /// Picks an adapter from the environment (see [`AdapterOptions::from_env`])
    /// and requests a device with its real limits and the optional features
    /// it has.
    ///
    /// In a browser, which cannot block, [`Error::BlockingInBrowser`]:
    /// await [`Gpu::request`] there.
    pub fn new() -> Result<Self> {
        if cfg!(target_arch = "wasm32") {
            return Err(Error::BlockingInBrowser {
                what: "requesting a device",
            });
        }
        pollster::block_on(Self::request(&AdapterOptions::from_env()))
    }

    /// Like [`Gpu::new`] with explicit options.
    pub async fn request(options: &AdapterOptions) -> Result<Self> {
        let adapter = options.select().await?;
        Self::from_adapter_with(&adapter, options).await
    }

    /// Requests a device from `adapter` with all of its limits and the
    /// subset of [`WANTED_FEATURES`] it supports.
    pub async fn from_adapter(adapter: &wgpu::Adapter) -> Result<Self> {
        let options = AdapterOptions {
            cooperative_matrix: false,
            emulate_cooperative_matrices: false,
            ..AdapterOptions::from_env()
        };
        Self::from_adapter_with(adapter, &options).await
    }

    /// [`Gpu::from_adapter`] with `options`' device choices: wgpu's
    /// experimental cooperative-matrix feature where asked for and offered
    /// ([`AdapterOptions::cooperative_matrix`]), or their emulation
    /// ([`AdapterOptions::emulate_cooperative_matrices`]).
    pub async fn from_adapter_with(
        adapter: &wgpu::Adapter,
        options: &AdapterOptions,
    ) -> Result<Self> {
        let wanted = GpuInfo::of_adapter(adapter, options);
        let features = wanted.features;
        let experimental_features =
            if features.contains(wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX) {
                // SAFETY: the caller asked for the experimental feature
                // (AdapterOptions::cooperative_matrix); wgpu's token only
                // records that consent. Only the cooperative-matrix kernel
                // uses it, after the planner checked the configuration.
                unsafe { wgpu::ExperimentalFeatures::enabled() }
            } else {
                wgpu::ExperimentalFeatures::disabled()
            };
        let (device, queue) = adapter
            .request_device(&wgpu::DeviceDescriptor {
                label: Some("wgpu-flash-attn"),
                required_features: features,
                required_limits: adapter.limits(),
                experimental_features,
                memory_hints: wgpu::MemoryHints::Performance,
                trace: wgpu::Trace::Off,
            })
            .await?;
        let mut gpu = Self::from_device(device, queue, adapter.get_info());
        // The device is the crate's own, so is its one lost callback.
        gpu.device
            .set_device_lost_callback(gpu.device_lost_notifier());
        gpu.info.cooperative_matrices = wanted.cooperative_matrices;
        gpu.info.cooperative_matrix_emulation = wanted.cooperative_matrix_emulation;
        Ok(gpu)
    }

    /// Wraps a device the caller already owns, so the crate shares it rather
    /// than opening a second one. Kernels adapt to the device's enabled
    /// features and limits. The device's lost callback stays the caller's
    /// (wgpu keeps one): call [`Gpu::device_lost_notifier`]'s function from
    /// it, or a lost device shows as [`Error::GpuValidation`] rather than
    /// [`Error::DeviceLost`].
    pub fn from_device(
        device: wgpu::Device,
        queue: wgpu::Queue,
        adapter: wgpu::AdapterInfo,
    ) -> Self {
        let info = GpuInfo {
            adapter,
            features: device.features(),
            limits: device.limits(),
            host_threads: host_threads(),
            cooperative_matrices: Vec::new(),
            cooperative_matrix_emulation: false,
        };
        let pipelines = PipelineCache::for_backend(info.adapter.backend);
        let placeholders = Placeholders::new(&device);
        Gpu {
            device,
            queue,
            info,
            pipelines,
            placeholders,
            scratch: Mutex::default(),
            lost: Arc::default(),
            deferred: Arc::default(),
        }
    }

    /// The cooperative-matrix configurations `adapter` reports, for a
    /// device wrapped with [`Gpu::from_device`] that was opened on that
    /// adapter with `EXPERIMENTAL_COOPERATIVE_MATRIX` (and, on Vulkan,
    /// `PASSTHROUGH_SHADERS`: the tier's kernel is the crate's own SPIR-V
    /// there): without them, which only the adapter can list, the
    /// wrapped device never runs [`crate::Tier::CooperativeMatrix`]. A
    /// device without the feature keeps none.
    pub fn with_cooperative_matrices_of(mut self, adapter: &wgpu::Adapter) -> Self {
        self.info.cooperative_matrices = if self
            .info
            .features
            .contains(wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX)
        {
            adapter.cooperative_matrix_properties()
        } else {
            Vec::new()
        };
        self
    }

    /// What the device's lost callback calls so that this `Gpu` reports
    /// [`Error::DeviceLost`] from then on. The crate installs it on the
    /// devices it requests; with [`Gpu::from_device`], call it from your own:
    ///
    /// ```no_run
    /// # fn wrap(device: wgpu::Device, queue: wgpu::Queue, info: wgpu::AdapterInfo) {
    /// let gpu = wgpu_flash_attn::Gpu::from_device(device.clone(), queue, info);
    /// let notify = gpu.device_lost_notifier();
    /// device.set_device_lost_callback(move |reason, message| {
    ///     eprintln!("device lost: {message}");
    ///     notify(reason, message);
    /// });
    /// # }
    /// ```
    pub fn device_lost_notifier(
        &self,
    ) -> impl Fn(wgpu::DeviceLostReason, String) + Send + Sync + 'static {
        let lost = Arc::clone(&self.lost);
        move |reason, message| {
            let _ = lost.set(format!("{reason:?}: {message}"));
        }
    }

    /// [`Error::DeviceLost`] once wgpu has reported the device lost (a
    /// driver reset, a watchdog timeout, `wgpu::Device::destroy`): every
    /// operation checks this first, so none records work for a dead device.
    /// In a browser, it also reports the error a previous call's scopes
    /// caught after that call had returned (once).
    pub(crate) fn check_alive(&self) -> Result<()> {
        if let Some(reason) = self.lost.get() {
            return Err(Error::DeviceLost {
                reason: reason.clone(),
            });
        }
        let deferred = self
            .deferred
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        deferred.map_or(Ok(()), Err)
    }

    /// Where a browser's error scopes leave what they caught.
    #[cfg(target_arch = "wasm32")]
    pub(crate) fn deferred_errors(&self) -> Arc<Mutex<Option<Error>>> {
        Arc::clone(&self.deferred)
    }

    /// The device-lost error if the device is gone, else `error`: what a
    /// failed scope reports.
    pub(crate) fn unless_lost(&self, error: Error) -> Error {
        self.check_alive().err().unwrap_or(error)
    }

    /// A storage buffer of at least `bytes` for `purpose`, reused across
    /// calls (a call's writes and reads of it are ordered on the queue like
    /// any other buffer's), replaced by a larger one when too small.
    pub(crate) fn scratch_buffer(&self, purpose: &'static str, bytes: u64) -> Result<wgpu::Buffer> {
        let mut scratch = self.scratch.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(buffer) = scratch.get(purpose).filter(|b| b.size() >= bytes) {
            return Ok(buffer.clone());
        }
        // The map lets go of the smaller buffer first (wgpu frees it once
        // the work already submitted is done with it), so that a failed
        // allocation of the larger one keeps nothing stale.
        scratch.remove(purpose);
        let buffer = self.create_buffer(
            purpose,
            bytes.max(16),
            // COPY_SRC: the backward copies the sinks' gradients out of its
            // deltas scratch.
            wgpu::BufferUsages::STORAGE
                | wgpu::BufferUsages::COPY_DST
                | wgpu::BufferUsages::COPY_SRC,
        )?;
        scratch.insert(purpose, buffer.clone());
        Ok(buffer)
    }

    /// A zeroed buffer of `size` bytes on this `Gpu`'s device. Unlike
    /// `wgpu::Device::create_buffer`, a device out of memory returns
    /// [`Error::OutOfMemory`] here rather than reaching wgpu's
    /// uncaptured-error handler (whose default panics). On wgpu's GL
    /// backend, which checks no allocation, a buffer of whole 4-byte words
    /// without `MAP_READ` is mapped at creation, so that running out of
    /// memory loses the device ([`Error::DeviceLost`]) rather than giving a
    /// buffer without storage.
    pub fn create_buffer(
        &self,
        label: &'static str,
        size: u64,
        usage: wgpu::BufferUsages,
    ) -> Result<wgpu::Buffer> {
        crate::allocation::create_buffer(self, label, size, usage)
    }

    /// Bytes of device scratch this `Gpu` holds for reuse (decode partial
    /// results, the forward's carry between key chunks and its logsumexp,
    /// the backward's deltas, KV-cache page copies): each purpose keeps the
    /// largest buffer a call has needed so far.
    pub fn scratch_bytes(&self) -> u64 {
        let scratch = self.scratch.lock().unwrap_or_else(|p| p.into_inner());
        scratch.values().map(wgpu::Buffer::size).sum()
    }

    /// Drops the scratch this `Gpu` holds ([`Gpu::scratch_bytes`]); the
    /// device frees it once the calls already submitted are done with it,
    /// and later calls allocate what they need again. For long-running
    /// programs after an unusually large call.
    pub fn release_scratch(&self) {
        self.scratch
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }

    /// A small uniform buffer holding `contents`.
    pub(crate) fn uniform_buffer(
        &self,
        label: &'static str,
        contents: &[u8],
    ) -> Result<wgpu::Buffer> {
        create_buffer_with(self, label, contents, wgpu::BufferUsages::UNIFORM)
    }

    /// A storage buffer holding `contents`; empty contents get 16 zero
    /// bytes, since a binding needs at least one element of its array
    /// (up to a vec4).
    pub(crate) fn storage_buffer(
        &self,
        label: &'static str,
        contents: &[u8],
    ) -> Result<wgpu::Buffer> {
        let padded;
        let contents = if contents.is_empty() {
            padded = [0u8; 16];
            &padded[..]
        } else {
            contents
        };
        create_buffer_with(
            self,
            label,
            contents,
            wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST,
        )
    }

    /// What the device offers: adapter, features, limits.
    pub fn info(&self) -> &GpuInfo {
        &self.info
    }
    /// The wgpu device the crate creates buffers and pipelines on.
    pub fn device(&self) -> &wgpu::Device {
        &self.device
    }
    /// The queue the crate submits to.
    pub fn queue(&self) -> &wgpu::Queue {
        &self.queue
    }

    /// Compiles the crate's kernels from now on without the runtime checks
    /// wgpu adds to every shader (index clamps on arrays, and on storage
    /// buffers where the driver lacks robust buffer access 2; a counter
    /// bounding every loop; checked integer division), and drops the
    /// pipelines already compiled (call it before running kernels on other
    /// threads, as [`Gpu::override_shader_file`]). For measuring what the checks cost
    /// (`flash-bench --unchecked-shaders`; `flash-bench shader-stats` shows
    /// what they do to the compiled code). By default only the loop
    /// counters go ([`crate::SkippedChecks::CRATE_DEFAULT`]), and only from
    /// kernels whose loops the crate proves finite ([`crate::unproven_loop`]:
    /// every kernel it ships); so here too.
    ///
    /// # Safety
    /// As [`wgpu::Device::create_shader_module_trusted`] with
    /// [`wgpu::ShaderRuntimeChecks::unchecked`]: the kernels must never
    /// index past an array (or divide by zero). The crate's tests check every
    /// kernel's results against the reference with the checks on, which
    /// would show most out-of-bounds reads as wrong results, but do not
    /// prove the kernels in bounds.
    pub unsafe fn skip_shader_runtime_checks(&self) {
        // SAFETY: forwarded to the caller.
        unsafe { self.skip_shader_runtime_checks_of(crate::SkippedChecks::ALL) }
    }

    /// As [`Gpu::skip_shader_runtime_checks`] for the checks in `skipped`
    /// only (the others stay on; [`crate::SkippedChecks::default`] turns
    /// them all back on, the loop counters too): which check costs what
    /// (`flash-bench --skip-checks bounds|loops|division|none`).
    ///
    /// # Safety
    /// As [`Gpu::skip_shader_runtime_checks`], for the checks skipped.
    pub unsafe fn skip_shader_runtime_checks_of(&self, skipped: crate::SkippedChecks) {
        // SAFETY: forwarded to the caller.
        unsafe { self.pipelines.skip_runtime_checks(skipped) }
    }

    /// Compiles the crate's kernels from now on with one of its WGSL files
    /// (`name`, a file name under the crate's `shaders/`, such as
    /// `flash_blocked.wgsl`) replaced by `text`, and drops the pipelines
    /// compiled before. For tuning kernels where no Rust toolchain is at
    /// hand (`flash-bench --shader-dir`): the text goes through the same
    /// generation as the file it replaces (constants, `// #if` variants,
    /// unrolled loops), and a text that no longer fits it, or that wgpu's
    /// compiler refuses, fails the calls that use it with
    /// [`Error::ShaderSource`] (with the compiler's message).
    /// Results are the replacement's: validate them against
    /// [`crate::reference`]. An unknown name is [`Error::UnknownShaderFile`].
    /// A call compiling on another thread meanwhile may still run the file
    /// it started from, for that call only: what it compiled is not
    /// cached, and later calls compile the new text.
    pub fn override_shader_file(&self, name: &str, text: impl Into<String>) -> Result<()> {
        self.pipelines.override_file(name, text.into())
    }

    /// The WGSL text this Gpu compiles for `plan`'s kernel (without a
    /// mask), with any replaced files ([`Gpu::override_shader_file`]): the
    /// template with the plan's constants, variants and unrolled loops;
    /// its entry point is `main`. For inspecting what a driver makes of
    /// it (`flash-bench shader-stats`).
    pub fn forward_wgsl(&self, plan: &crate::ForwardPlan) -> Result<String> {
        self.pipelines.source(&plan.specialization())
    }

    /// The WGSL text this Gpu compiles for `plan`'s decode kernel, as
    /// [`Gpu::forward_wgsl`] gives the forward's.
    pub fn decode_wgsl(&self, plan: &crate::DecodePlan) -> Result<String> {
        self.pipelines.source(&plan.specialization)
    }

    /// Whether the kernels compile without some of wgpu's runtime checks:
    /// true from the start (the loop counters,
    /// [`crate::SkippedChecks::CRATE_DEFAULT`]) until
    /// [`Gpu::skip_shader_runtime_checks_of`] turns every check back on.
    pub fn shader_runtime_checks_skipped(&self) -> bool {
        self.skipped_shader_runtime_checks().any()
    }

    /// The runtime checks the kernels compile without
    /// ([`Gpu::skip_shader_runtime_checks_of`]).
    pub fn skipped_shader_runtime_checks(&self) -> crate::SkippedChecks {
        self.pipelines.skipped_runtime_checks()
    }

    /// Number of compute pipelines cached now.
    pub fn pipeline_count(&self) -> usize {
        self.pipelines.len()
    }

    /// Keeps at most `capacity` compiled pipelines (default 64, at least
    /// 1): compiling one more evicts the least recently used, which a later
    /// call compiles again. Each can take tens of MB (about 29 MB on
    /// lavapipe), so a long-running program meeting many shapes should cap
    /// them.
    pub fn set_pipeline_capacity(&self, capacity: usize) {
        self.pipelines.set_capacity(capacity);
    }

    /// The most compiled pipelines kept (see [`Gpu::set_pipeline_capacity`]).
    pub fn pipeline_capacity(&self) -> usize {
        self.pipelines.capacity()
    }

    /// Records work into a new encoder with `record`, submits it and waits
    /// for it to finish: the one convenience over the recording operations
    /// ([`Gpu::forward`], [`Gpu::decode`], [`Gpu::merge`], [`Gpu::rope`],
    /// [`Gpu::naive_attention`], [`KvCache::append`](crate::KvCache::append)).
    /// Validation errors wgpu reports while recording or submitting come
    /// back as [`Error::GpuValidation`].
    ///
    /// ```no_run
    /// # use wgpu_flash_attn::{AttentionArgs, AttentionConfig, Gpu};
    /// # fn f(gpu: &Gpu, args: &AttentionArgs<'_>) -> Result<(), wgpu_flash_attn::Error> {
    /// gpu.run(|encoder| gpu.forward(encoder, args, &AttentionConfig::new().causal(true)))?;
    /// # Ok(()) }
    /// ```
    pub fn run<T>(&self, record: impl FnOnce(&mut wgpu::CommandEncoder) -> Result<T>) -> Result<T> {
        let value = self.submit_recorded("wgpu-flash-attn run", record)?;
        self.wait()?;
        Ok(value)
    }

    /// `WrongDevice` unless `device` is this `Gpu`'s: every operand (tensor,
    /// logsumexp, mask, cache) remembers the device it was made on, since
    /// wgpu does not refuse another device's buffer in a bind group here.
    pub(crate) fn check_owner(&self, device: &wgpu::Device, what: &'static str) -> Result<()> {
        if *device != self.device {
            return Err(Error::WrongDevice { tensor: what });
        }
        Ok(())
    }

    /// Checks that `buffer` was created on this `Gpu`'s device, by binding
    /// it in a throwaway bind group under a validation scope (wgpu refuses
    /// a buffer of another device there). `buffer` must have `STORAGE`
    /// usage, which every buffer the kernels read or write needs anyway.
    pub(crate) fn check_own_buffer(&self, name: &'static str, buffer: &wgpu::Buffer) -> Result<()> {
        let limit = self.info.limits.max_storage_buffers_per_shader_stage;
        if limit == 0 {
            return Err(Error::StorageBuffers {
                kernel: "any kernel",
                needed: 1,
                limit,
            });
        }
        let layout = self.placeholders.probe_layout.get_or_init(|| {
            self.device
                .create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
                    label: Some("wgpu-flash-attn device probe"),
                    entries: &[wgpu::BindGroupLayoutEntry {
                        binding: 0,
                        visibility: wgpu::ShaderStages::COMPUTE,
                        ty: wgpu::BindingType::Buffer {
                            ty: wgpu::BufferBindingType::Storage { read_only: true },
                            has_dynamic_offset: false,
                            min_binding_size: None,
                        },
                        count: None,
                    }],
                })
        });
        let probe = self.validated("device probe", || {
            self.device.create_bind_group(&wgpu::BindGroupDescriptor {
                label: Some("wgpu-flash-attn device probe"),
                layout,
                entries: &[wgpu::BindGroupEntry {
                    binding: 0,
                    resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                        buffer,
                        offset: 0,
                        size: Some(std::num::NonZeroU64::new(4).expect("4 is not zero")),
                    }),
                }],
            })
        });
        match probe {
            Ok(_) => Ok(()),
            Err(Error::GpuValidation { message, .. }) => Err(Error::ForeignBuffer {
                tensor: name,
                message,
            }),
            Err(other) => Err(other),
        }
    }

    /// Blocks until all submitted work has finished. (In a browser it
    /// returns at once: the async downloads wait there.)
    pub fn wait(&self) -> Result<()> {
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| self.unless_lost(Error::Readback(e.to_string())))?;
        self.check_alive()
    }

    /// Records into a new encoder and submits it, under a validation error
    /// scope (see [`Gpu::validated`]).
    pub(crate) fn submit_recorded<T>(
        &self,
        context: &'static str,
        record: impl FnOnce(&mut wgpu::CommandEncoder) -> Result<T>,
    ) -> Result<T> {
        let mut encoder = self
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some(context),
            });
        self.validated(context, || -> Result<T> {
            let value = record(&mut encoder)?;
            self.queue.submit([encoder.finish()]);
            Ok(value)
        })?
    }

    /// Runs `record` under validation and out-of-memory error scopes and
    /// reports the first validation error as [`Error::GpuValidation`], an
    /// out-of-memory one (a submission's, which wgpu would otherwise hand
    /// to its panicking default handler) as [`Error::OutOfMemory`], either
    /// as [`Error::DeviceLost`] when the device went with it (in a browser,
    /// from the next operation: `crate::error_scopes`).
    pub(crate) fn validated<T>(
        &self,
        context: &'static str,
        record: impl FnOnce() -> T,
    ) -> Result<T> {
        crate::error_scopes::under_error_scopes(self, context, None, record)
    }
}

/// Threads the host runs at once (4 when the platform cannot say).
fn host_threads() -> usize {
    std::thread::available_parallelism().map_or(4, |n| n.get())
}

/// The features a device the crate opens on `adapter` requests: the
/// [`WANTED_FEATURES`] it has, and cooperative matrices if asked for,
/// offered, and granted by the driver (see `vulkan_grants`), with SPIR-V
/// passthrough on Vulkan (the matrix kernel's SPIR-V is the crate's own,
/// `src/spirv/`).
fn device_features(adapter: &wgpu::Adapter, cooperative_matrix: bool) -> wgpu::Features {
    let mut wanted = WANTED_FEATURES;
    if cooperative_matrix
        && adapter
            .features()
            .contains(wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX)
        && crate::vulkan_grants::grants_cooperative_matrices(adapter)
    {
        wanted |= wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX;
        if adapter.get_info().backend == wgpu::Backend::Vulkan {
            wanted |= wgpu::Features::PASSTHROUGH_SHADERS;
        }
    }
    adapter.features() & wanted
}

/// The configurations the emulation offers: 16x16 and 8x8 matrices of f16
/// or f32 operands with f32 results.
pub(crate) fn emulated_cooperative_matrices() -> Vec<wgpu::CooperativeMatrixProperties> {
    use wgpu::CooperativeScalarType as Scalar;
    [16, 8]
        .into_iter()
        .flat_map(|size| {
            [Scalar::F16, Scalar::F32].map(|ab_type| wgpu::CooperativeMatrixProperties {
                m_size: size,
                n_size: size,
                k_size: size,
                ab_type,
                cr_type: Scalar::F32,
                saturating_accumulation: false,
            })
        })
        .collect()
}
