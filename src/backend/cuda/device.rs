//! The device side of the CUDA backend: sharing host memory (actor regions) with the GPU, and
//! the measurements the benchmarks take.

use super::*;

impl Device for CudaBackend {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }

    fn share_region(&self, region: &Region) -> Result<(), BackendError> {
        let regs = Registrations::new(&self.ctx);
        let page = page_size();
        region
            .add_grow_hook(Box::new(move |base, old, new| {
                let (from, to) = (old.div_ceil(page) * page, new.div_ceil(page) * page);
                if to > from {
                    // SAFETY: `from..to` was just committed by the region and stays mapped until
                    // the region drops this hook (and with it `regs`, which unregisters).
                    regs.register(unsafe { base.add(from) }, to - from)?;
                }
                Ok(())
            }))
            .map_err(|e| dev_err("share_region", e.to_string()))
    }

    fn device_ptr(&self, host: *const u8) -> Result<usize, BackendError> {
        let _e = self.enter("device_ptr")?;
        driver::device_pointer(host).map_err(|e| dev_err("device_ptr", e))
    }

    unsafe fn gemm_shared(&self, a: *const f32, b: *const f32, c: *mut f32, m: usize, n: usize, k: usize) -> Result<(), BackendError> {
        check_gemm_dims(m * k, k * n, m * n, m, n, k)?;
        let _e = self.enter("gemm")?;
        let dev = |p: *const f32| -> Result<usize, BackendError> {
            if self.identity_mapping {
                Ok(p as usize)
            } else {
                driver::device_pointer(p.cast()).map_err(|e| dev_err("gemm", e))
            }
        };
        let (da, db, dc) = (dev(a)?, dev(b)?, dev(c)?);
        self.sgemm_row_major(da, db, dc, m, n, k)?;
        self.sync("gemm")
    }

    unsafe fn write_shared(&self, src: &Buffer, dst: *mut f32, n: usize) -> Result<bool, BackendError> {
        if n == 0 {
            return Ok(true);
        }
        let _e = self.enter("write_shared")?;
        let m = cuda_buf(src, "write_shared")?;
        check_len("write_shared", "source", m.bytes(), n)?;
        // Both ends must be registered and map to one contiguous device range (they always do
        // where device pointers equal host pointers); otherwise the caller copies.
        // SAFETY: `dst..dst + n` is valid (caller); only its addresses are looked up here.
        let last = unsafe { dst.add(n - 1) };
        let (Ok(first), Ok(end)) = (driver::device_pointer(dst.cast()), driver::device_pointer(last.cast())) else { return Ok(false) };
        if end != first + 4 * (n - 1) {
            return Ok(false);
        }
        let (sp, dp, ni) = (m.ptr(), first as CUdeviceptr, n as i64);
        self.launch("write_shared", self.k.copy_f32, (n.div_ceil(256).min(1024) as u32, 1, 1), 256, &mut args![sp, dp, ni])?;
        self.sync("write_shared")?;
        Ok(true)
    }

    fn install(&self, f: &mut (dyn FnMut() + Send)) {
        match self.enter("install") {
            Ok(_e) => f(),
            // A context that cannot be bound fails every op inside with the same error.
            Err(_) => f(),
        }
    }
}

impl Probes for CudaBackend {
    fn gemm_copied(&self, a: &[f32], b: &[f32], c: &mut [f32], m: usize, n: usize, k: usize) -> Result<(), BackendError> {
        check_gemm_dims(a.len(), b.len(), c.len(), m, n, k)?;
        let _e = self.enter("gemm")?;
        let need = [m * k * 4, k * n * 4, m * n * 4];
        let mut bufs = self.copy_bufs.lock().unwrap_or_else(|e| e.into_inner());
        if bufs.len() != 3 || bufs.iter().zip(need).any(|(b, n)| b.bytes() < n) {
            bufs.clear();
            for bytes in need {
                bufs.push(DevMem::alloc(&self.ctx, bytes).map_err(|e| dev_err("gemm", e))?);
            }
        }
        let op = |e| dev_err("gemm", err("cuMemcpy", e));
        // The operands may lie in actor memory, which is registered chunk by chunk as it grew,
        // and the driver refuses a copy that spans two registrations: stage through ordinary
        // host memory, as a program without zero-copy would.
        let (ha, hb) = (a[..m * k].to_vec(), b[..k * n].to_vec());
        let mut hc = vec![0f32; m * n];
        // SAFETY: each device buffer holds at least the bytes copied into or out of it.
        unsafe {
            result::memcpy_htod_sync(bufs[0].ptr(), &ha).map_err(op)?;
            result::memcpy_htod_sync(bufs[1].ptr(), &hb).map_err(op)?;
        }
        self.sgemm_row_major(bufs[0].ptr() as usize, bufs[1].ptr() as usize, bufs[2].ptr() as usize, m, n, k)?;
        self.sync("gemm")?;
        // SAFETY: as above.
        unsafe { result::memcpy_dtoh_sync(&mut hc, bufs[2].ptr()) }.map_err(op)?;
        c[..m * n].copy_from_slice(&hc);
        Ok(())
    }

    fn device_memory_used(&self) -> Option<usize> {
        let _e = self.enter("memory").ok()?;
        self.sync("memory").ok()?;
        result::mem_get_info().ok().map(|(free, total)| total - free)
    }

    fn memory_bandwidth(&self) -> Option<f64> {
        let _e = self.enter("bandwidth").ok()?;
        const BYTES: usize = 1 << 30;
        const COPIES: usize = 8;
        let (src, dst) = (DevMem::zeroed(&self.ctx, BYTES).ok()?, DevMem::zeroed(&self.ctx, BYTES).ok()?);
        // Timed with device events: a host clock also counts the host's scheduling (a busy CPU
        // halved this figure once).
        use cudarc::driver::{result::event, sys::CUevent_flags};
        let (start, end) = (event::create(CUevent_flags::CU_EVENT_DEFAULT).ok()?, event::create(CUevent_flags::CU_EVENT_DEFAULT).ok()?);
        let mut samples = Vec::new();
        for _ in 0..5 {
            // SAFETY: both events and buffers are live; each copy stays inside BYTES.
            let ms = unsafe {
                event::record(start, self.s()).ok()?;
                for _ in 0..COPIES {
                    result::memcpy_dtod_async(dst.ptr(), src.ptr(), BYTES, self.s()).ok()?;
                }
                event::record(end, self.s()).ok()?;
                self.sync("bandwidth").ok()?;
                event::elapsed(start, end).ok()?
            };
            samples.push(f64::from(ms) / 1e3);
        }
        // SAFETY: the stream is synchronized; nothing uses the events any more.
        unsafe {
            let _ = event::destroy(start);
            let _ = event::destroy(end);
        }
        let secs = crate::numeric::median_ms(&mut samples[1..]);
        Some((2 * BYTES * COPIES) as f64 / secs / 1e9)
    }

    fn upload(&self, bytes: &[u8]) -> Result<Box<dyn DeviceBuffer>, BackendError> {
        let _e = self.enter("upload")?;
        Ok(Box::new(self.upload_bytes("upload", bytes)?))
    }
}
