//! Thin, owned wrappers over the CUDA driver API (through `cudarc`'s dynamically loaded bindings):
//! device memory, pinned staging memory, host registration of actor memory, compiled modules and
//! captured graphs. Every handle frees itself on drop with its context bound to the dropping
//! thread, so they can be dropped anywhere.

use std::ffi::{c_void, CString};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use cudarc::driver::sys::{self, CUdeviceptr, CUfunction, CUgraphExec, CUmodule, CUstream};
use cudarc::driver::{result, CudaContext, DriverError};

/// Whether the CUDA driver library can be loaded at all. cudarc's dynamic loading panics on the
/// first call into a missing library, so nothing touches CUDA before this says yes.
pub fn driver_present() -> bool {
    // SAFETY: only tries to dlopen the library; no CUDA call is made.
    unsafe { sys::is_culib_present() }
}

/// Whether NVRTC (run-time kernel compilation) and cuBLAS can be loaded.
pub fn libraries_present() -> (bool, bool) {
    // SAFETY: as above, dlopen only.
    unsafe { (cudarc::nvrtc::sys::is_culib_present(), cudarc::cublas::sys::is_culib_present()) }
}

/// A driver error with the call that failed.
pub fn err(what: &str, e: DriverError) -> String {
    let name = e.error_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|_| format!("{:?}", e.0));
    let text = e.error_string().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    format!("{what}: {name} ({text})")
}

/// Device memory (`cuMemAlloc`), freed on drop.
pub struct DevMem {
    ptr: CUdeviceptr,
    bytes: usize,
    ctx: Arc<CudaContext>,
}

// SAFETY: a device allocation is a plain address; access is ordered by the backend's stream.
unsafe impl Send for DevMem {}
// SAFETY: as above.
unsafe impl Sync for DevMem {}

impl DevMem {
    /// `bytes` of uninitialized device memory (at least one byte is allocated).
    pub fn alloc(ctx: &Arc<CudaContext>, bytes: usize) -> Result<DevMem, String> {
        ctx.bind_to_thread().map_err(|e| err("cuCtxSetCurrent", e))?;
        // SAFETY: plain allocation; the pointer is owned by the returned value.
        let ptr = unsafe { result::malloc_sync(bytes.max(1)) }.map_err(|e| err(&format!("cuMemAlloc of {bytes} bytes"), e))?;
        Ok(DevMem { ptr, bytes, ctx: ctx.clone() })
    }

    /// Like [`DevMem::alloc`], zero-filled.
    pub fn zeroed(ctx: &Arc<CudaContext>, bytes: usize) -> Result<DevMem, String> {
        let m = DevMem::alloc(ctx, bytes)?;
        // SAFETY: `m` owns `bytes` bytes at `ptr`.
        unsafe { result::memset_d8_sync(m.ptr, 0, bytes) }.map_err(|e| err("cuMemsetD8", e))?;
        Ok(m)
    }

    pub fn ptr(&self) -> CUdeviceptr {
        self.ptr
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

impl Drop for DevMem {
    fn drop(&mut self) {
        if self.ctx.bind_to_thread().is_ok() {
            // SAFETY: `ptr` came from cuMemAlloc and is freed once, here.
            let _ = unsafe { result::free_sync(self.ptr) };
        }
    }
}

/// Page-locked host memory (`cuMemHostAlloc`): the source of copies that a captured graph
/// replays, so the copy reads whatever the host wrote there last.
pub struct Pinned {
    ptr: *mut u8,
    ctx: Arc<CudaContext>,
}

// SAFETY: plain host memory owned by this value; writers synchronize through the backend lock.
unsafe impl Send for Pinned {}
// SAFETY: as above.
unsafe impl Sync for Pinned {}

impl Pinned {
    pub fn alloc(ctx: &Arc<CudaContext>, bytes: usize) -> Result<Pinned, String> {
        ctx.bind_to_thread().map_err(|e| err("cuCtxSetCurrent", e))?;
        // SAFETY: plain allocation, owned by the returned value.
        let ptr = unsafe { result::malloc_host(bytes, 0) }.map_err(|e| err("cuMemHostAlloc", e))?;
        Ok(Pinned { ptr: ptr.cast(), ctx: ctx.clone() })
    }

    pub fn ptr(&self) -> *mut u8 {
        self.ptr
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        if self.ctx.bind_to_thread().is_ok() {
            // SAFETY: `ptr` came from cuMemHostAlloc and is freed once, here.
            let _ = unsafe { result::free_host(self.ptr.cast()) };
        }
    }
}

/// Host ranges registered with `cuMemHostRegister` (device-mapped), unregistered on drop. One
/// per shared actor region; the region's growth hook owns it, and the region drops its hooks
/// before unmapping, so every range is unregistered while still mapped.
pub struct Registrations {
    ranges: Mutex<Vec<(usize, usize)>>,
    ctx: Arc<CudaContext>,
}

impl Registrations {
    pub fn new(ctx: &Arc<CudaContext>) -> Registrations {
        Registrations { ranges: Mutex::new(Vec::new()), ctx: ctx.clone() }
    }

    /// Registers `len` bytes at `host` and returns the device address the device sees them at.
    pub fn register(&self, host: *mut u8, len: usize) -> Result<usize, String> {
        self.ctx.bind_to_thread().map_err(|e| err("cuCtxSetCurrent", e))?;
        let flags = sys::CU_MEMHOSTREGISTER_DEVICEMAP | sys::CU_MEMHOSTREGISTER_PORTABLE;
        // SAFETY: the caller passes committed, mapped pages it keeps mapped until this value is
        // dropped (which unregisters them).
        unsafe { sys::cuMemHostRegister_v2(host.cast(), len, flags) }.result().map_err(|e| err(&format!("cuMemHostRegister of {len} bytes"), e))?;
        self.ranges.lock().unwrap_or_else(|e| e.into_inner()).push((host as usize, len));
        device_pointer(host)
    }
}

/// The device address of registered host memory.
pub fn device_pointer(host: *const u8) -> Result<usize, String> {
    let mut dptr: CUdeviceptr = 0;
    // SAFETY: writes one CUdeviceptr; fails cleanly for unregistered memory.
    unsafe { sys::cuMemHostGetDevicePointer_v2(&mut dptr, host as *mut c_void, 0) }.result().map_err(|e| err("cuMemHostGetDevicePointer", e))?;
    Ok(dptr as usize)
}

impl Drop for Registrations {
    fn drop(&mut self) {
        if self.ctx.bind_to_thread().is_err() {
            return;
        }
        for (ptr, _) in self.ranges.lock().unwrap_or_else(|e| e.into_inner()).drain(..) {
            // SAFETY: registered above and still mapped (see the type's docs).
            let _ = unsafe { sys::cuMemHostUnregister(ptr as *mut c_void) };
        }
    }
}

/// A loaded module and its functions.
pub struct Module {
    module: CUmodule,
    ctx: Arc<CudaContext>,
}

// SAFETY: module handles are context-wide and immutable once loaded.
unsafe impl Send for Module {}
// SAFETY: as above.
unsafe impl Sync for Module {}

impl Module {
    /// Loads PTX text (the driver compiles it for the device, caching the result itself).
    pub fn load_ptx(ctx: &Arc<CudaContext>, ptx: &str) -> Result<Module, String> {
        ctx.bind_to_thread().map_err(|e| err("cuCtxSetCurrent", e))?;
        let image = CString::new(ptx).map_err(|_| "PTX contains a NUL byte".to_string())?;
        // SAFETY: `image` is a NUL-terminated PTX image that outlives the call.
        let module = unsafe { result::module::load_data(image.as_ptr().cast()) }.map_err(|e| err("cuModuleLoadData", e))?;
        Ok(Module { module, ctx: ctx.clone() })
    }

    pub fn function(&self, name: &str) -> Result<CUfunction, String> {
        let cname = CString::new(name).map_err(|_| format!("bad kernel name {name}"))?;
        // SAFETY: the module is loaded; the name is NUL-terminated.
        unsafe { result::module::get_function(self.module, cname) }.map_err(|e| err(&format!("kernel {name}"), e))
    }

    /// How many blocks of `block` threads of `f` (a function of this module) fit on one
    /// multiprocessor at once, as the driver computes it from the compiled kernel's registers
    /// and shared memory.
    pub fn resident_blocks(&self, f: CUfunction, block: u32) -> Result<usize, String> {
        let mut n: std::ffi::c_int = 0;
        // SAFETY: `f` belongs to this loaded module; `n` is a valid out-pointer.
        unsafe { sys::cuOccupancyMaxActiveBlocksPerMultiprocessor(&mut n, f, block as std::ffi::c_int, 0) }
            .result()
            .map_err(|e| err("cuOccupancyMaxActiveBlocksPerMultiprocessor", e))?;
        Ok(n.max(0) as usize)
    }
}

impl Drop for Module {
    fn drop(&mut self) {
        if self.ctx.bind_to_thread().is_ok() {
            // SAFETY: loaded in `load_ptx`, unloaded once.
            let _ = unsafe { result::module::unload(self.module) };
        }
    }
}

/// Compiles CUDA C++ to PTX for `arch` (e.g. "sm_90") with NVRTC, caching the PTX on disk
/// under `cache_dir` keyed by a hash of the source, the architecture and the options.
pub fn compile_cached(source: &str, arch: &str, cache_dir: Option<PathBuf>) -> Result<String, String> {
    use sha2::Digest;
    let options = [format!("--gpu-architecture={arch}"), "--std=c++17".to_string(), "-default-device".to_string()];
    let mut h = sha2::Sha256::new();
    h.update(source.as_bytes());
    for o in &options {
        h.update(o.as_bytes());
    }
    let key: String = h.finalize().iter().take(12).map(|b| format!("{b:02x}")).collect();
    let cached = cache_dir.as_ref().map(|d| d.join(format!("kernels-{key}-{arch}.ptx")));
    if let Some(text) = cached.as_ref().and_then(|p| std::fs::read_to_string(p).ok()) {
        if text.contains(".entry") {
            return Ok(text);
        }
    }
    let ptx = compile(source, &options)?;
    if let (Some(path), Some(dir)) = (cached, cache_dir) {
        // Best effort: a cache that cannot be written only costs a recompile next time.
        let tmp = dir.join(format!(".kernels-{key}.{}.tmp", std::process::id()));
        if std::fs::create_dir_all(&dir).is_ok() && std::fs::write(&tmp, &ptx).is_ok() {
            let _ = std::fs::rename(&tmp, &path);
        }
    }
    Ok(ptx)
}

/// NVRTC compilation without the cache; the compiler log is the error on failure.
pub fn compile(source: &str, options: &[String]) -> Result<String, String> {
    use cudarc::nvrtc::result as nvrtc;
    let src = CString::new(source).map_err(|_| "kernel source contains a NUL byte".to_string())?;
    let name = CString::new("driftwood.cu").expect("no NUL");
    let prog = nvrtc::create_program(&src, Some(&name)).map_err(|e| format!("nvrtcCreateProgram: {e:?}"))?;
    // SAFETY: `prog` is a valid program; it is destroyed exactly once below.
    let compiled = unsafe { nvrtc::compile_program(prog, options) };
    let out = match compiled {
        Ok(()) => {
            // SAFETY: compilation succeeded, so the PTX is available.
            unsafe { nvrtc::get_ptx(prog) }.map_err(|e| format!("nvrtcGetPTX: {e:?}")).map(|chars| c_chars_to_string(&chars))
        }
        Err(e) => {
            // SAFETY: the log of a failed compilation.
            let log = unsafe { nvrtc::get_program_log(prog) }.map(|c| c_chars_to_string(&c)).unwrap_or_default();
            Err(format!("NVRTC could not compile the kernels ({e:?}):\n{log}"))
        }
    };
    // SAFETY: created above, destroyed once.
    let _ = unsafe { nvrtc::destroy_program(prog) };
    out
}

fn c_chars_to_string(chars: &[std::ffi::c_char]) -> String {
    let bytes: Vec<u8> = chars.iter().take_while(|&&c| c != 0).map(|&c| c as u8).collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// A captured, instantiated graph (one decode step).
pub struct Graph {
    exec: CUgraphExec,
    ctx: Arc<CudaContext>,
}

// SAFETY: an executable graph is launched only under the backend lock.
unsafe impl Send for Graph {}

impl Graph {
    /// Captures everything `body` enqueues on `stream` into a graph. The capture is ended even
    /// when `body` fails, so the stream is usable afterwards.
    pub fn capture<E>(ctx: &Arc<CudaContext>, stream: CUstream, body: impl FnOnce() -> Result<(), E>) -> Result<Result<Graph, String>, E> {
        // SAFETY: `stream` is the backend's live stream; thread-local mode keeps other threads'
        // CUDA calls out of this capture.
        if let Err(e) = unsafe { result::stream::begin_capture(stream, sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL) } {
            return Ok(Err(err("cuStreamBeginCapture", e)));
        }
        let outcome = body();
        // SAFETY: ends the capture begun above.
        let graph = unsafe { result::stream::end_capture(stream) };
        outcome?;
        let graph = match graph {
            Ok(g) => g,
            Err(e) => return Ok(Err(err("cuStreamEndCapture", e))),
        };
        // SAFETY: `graph` was just captured; it is destroyed after instantiation.
        let exec = unsafe { result::graph::instantiate(graph, sys::CUgraphInstantiate_flags(0)) };
        // SAFETY: the template graph is no longer needed once instantiated (or on failure).
        let _ = unsafe { result::graph::destroy(graph) };
        Ok(exec.map(|exec| Graph { exec, ctx: ctx.clone() }).map_err(|e| err("cuGraphInstantiate", e)))
    }

    pub fn launch(&self, stream: CUstream) -> Result<(), String> {
        // SAFETY: a live executable graph on the backend's stream.
        unsafe { result::graph::launch(self.exec, stream) }.map_err(|e| err("cuGraphLaunch", e))
    }
}

impl Drop for Graph {
    fn drop(&mut self) {
        if self.ctx.bind_to_thread().is_ok() {
            // SAFETY: instantiated in `capture`, destroyed once.
            let _ = unsafe { result::graph::exec_destroy(self.exec) };
        }
    }
}
