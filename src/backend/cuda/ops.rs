//! The model ops and fused blocks on the GPU.

use super::*;

impl ModelOps for CudaBackend {
    fn forward_pass(&self, state: u64, tokens: &[u32], pos0: usize, pass: &mut dyn FnMut() -> Result<(), BackendError>) -> Result<(), BackendError> {
        let _e = self.enter("forward")?;
        self.write_step("forward", pos0, tokens.len(), Some(tokens))?;
        *self.pass.lock().unwrap_or_else(|e| e.into_inner()) = PassState { active: true, pos0, n: tokens.len() };
        let result = self.run_pass(state, tokens.len(), pass);
        self.pass.lock().unwrap_or_else(|e| e.into_inner()).active = false;
        result
    }

    fn buffer(&self, len: usize) -> Result<Buffer, BackendError> {
        let _e = self.enter("buffer")?;
        Ok(Buffer::new(len, DevMem::zeroed(&self.ctx, len * 4).map_err(|e| dev_err("buffer", e))?))
    }

    fn upload_f32(&self, data: &[f32]) -> Result<Buffer, BackendError> {
        let _e = self.enter("upload")?;
        Ok(Buffer::new(data.len(), self.upload_bytes("upload", bytemuck_f32(data))?))
    }

    fn download(&self, buf: &Buffer, out: &mut [f32]) -> Result<(), BackendError> {
        let _e = self.enter("download")?;
        let m = cuda_buf(buf, "download")?;
        check_len("download", "buffer", m.bytes(), out.len())?;
        let bytes = out.len() * 4;
        if bytes < DOWNLOAD_STAGED {
            self.sync("download")?;
            // SAFETY: the buffer holds at least `out.len()` values.
            return unsafe { result::memcpy_dtoh_sync(out, m.ptr()) }.map_err(|e| dev_err("download", err("cuMemcpyDtoH", e)));
        }
        // Large results (a vocabulary of logits) go through pinned memory: queued behind the
        // pass, one synchronization, and a DMA straight into host memory, where a copy into
        // pageable memory is staged in pieces by the driver (about 0.1 ms for 128k logits).
        let mut pin = self.download_pin.lock().unwrap_or_else(|e| e.into_inner());
        if pin.as_ref().is_none_or(|(_, cap)| *cap < bytes) {
            *pin = None;
            let cap = bytes.next_power_of_two();
            *pin = Some((Pinned::alloc(&self.ctx, cap).map_err(|e| dev_err("download", e))?, cap));
        }
        let (staging, _) = pin.as_ref().expect("allocated above");
        // SAFETY: the pinned buffer holds at least `bytes` (4 * out.len()), f32-aligned (page
        // aligned), and only this call, under the lock, touches it.
        let staged = unsafe { std::slice::from_raw_parts_mut(staging.ptr().cast::<f32>(), out.len()) };
        // SAFETY: the device buffer holds at least `out.len()` values (checked above); the stream
        // is synchronized before the staging buffer is read or reused.
        unsafe { result::memcpy_dtoh_async(staged, m.ptr(), self.s()) }.map_err(|e| dev_err("download", err("cuMemcpyDtoHAsync", e)))?;
        self.sync("download")?;
        out.copy_from_slice(staged);
        Ok(())
    }

    fn argmax(&self, buf: &Buffer, n: usize) -> Result<u32, BackendError> {
        let _e = self.enter("argmax")?;
        let m = cuda_buf(buf, "argmax")?;
        check_len("argmax", "buffer", m.bytes(), n)?;
        let (x, ni, key) = (m.ptr(), n as i64, self.result_dev.ptr());
        // SAFETY: result_dev holds 16 bytes; the memset is ordered before the kernel on the stream.
        unsafe { cudarc::driver::sys::cuMemsetD32Async(key, 0, 2, self.s()) }.result().map_err(|e| dev_err("argmax", err("cuMemsetD32Async", e)))?;
        let blocks = n.div_ceil(256 * 8).clamp(1, 4 * self.sms) as u32;
        self.launch("argmax", self.k.argmax_f32, (blocks, 1, 1), 256, &mut args![x, ni, key])?;
        let host = self.result_host.ptr().cast::<u64>();
        // SAFETY: both ends hold 16 bytes; the stream is synchronized before the host reads it,
        // and only this call (under the backend lock) uses the pinned buffer.
        unsafe { cudarc::driver::sys::cuMemcpyDtoHAsync_v2(host.cast(), key, 8, self.s()) }
            .result()
            .map_err(|e| dev_err("argmax", err("cuMemcpyDtoHAsync", e)))?;
        self.sync("argmax")?;
        // SAFETY: written by the copy above, which the synchronization completed.
        let key = unsafe { host.read() };
        // The low half holds the complemented index of the winner; 0: nothing beat -inf.
        Ok(if key == 0 { 0 } else { !(key as u32) })
    }

    fn load_linear(&self, w: Linear) -> Result<Linear, BackendError> {
        let _e = self.enter("load")?;
        let mem = match &w.data {
            WeightData::Host(bytes) if repacked(w.dtype) => {
                let packed = repack_rows(w.dtype, w.cols, bytes)
                    .map_err(|reason| BackendError::InvalidArgument { op: "load", reason: format!("{}: {reason}", w.name) })?;
                self.upload_bytes("load", &packed)?
            }
            WeightData::Host(bytes) => self.upload_bytes("load", bytes)?,
            WeightData::Device(_) => return Ok(w),
        };
        Ok(Linear { data: WeightData::Device(Arc::new(Handle::new(mem))), ..w })
    }

    fn kv_layer(&self, max_seq: usize, kv_dim: usize) -> Result<KvLayer, BackendError> {
        let _e = self.enter("kv_layer")?;
        let bytes = max_seq * kv_dim * 2;
        let alloc = || DevMem::zeroed(&self.ctx, bytes).map_err(|e| dev_err("kv_layer", e));
        Ok(KvLayer::new(max_seq, kv_dim, CudaKv { k: alloc()?, v: alloc()? }))
    }

    fn embed(&self, table: &Linear, tokens: &[u32], out: &mut Buffer) -> Result<(), BackendError> {
        let _e = self.enter("embed")?;
        if let Some(&id) = tokens.iter().find(|&&t| t as usize >= table.rows) {
            return Err(BackendError::InvalidArgument { op: "embed", reason: format!("token id {id} is outside the vocabulary of {}", table.rows) });
        }
        let o = cuda_buf(out, "embed")?;
        check_len("embed", "output", o.bytes(), tokens.len() * table.cols)?;
        // Embedding needs the token ids, not a position: keep the pass's (or the last) position.
        let pos0 = self.pass.lock().unwrap_or_else(|e| e.into_inner()).pos0;
        self.stage_step("embed", pos0, tokens.len(), Some(tokens))?;
        let (dt, rb, cols) = (table.dtype.kernel_code() as usize as i32, device_row_bytes(table.dtype, table.cols) as i64, table.cols as i32);
        let (tbl, step, op) = (weight_mem(table, "embed")?.ptr(), self.step_dev.ptr(), o.ptr());
        let grid = (table.cols.div_ceil(256) as u32, tokens.len() as u32, 1);
        self.launch("embed", self.k.embed, grid, 256, &mut args![tbl, dt, rb, cols, step, op])
    }

    fn rms_norm(&self, x: &Buffer, w: &Buffer, out: &mut Buffer, rows: usize, dim: usize, eps: f32) -> Result<(), BackendError> {
        let _e = self.enter("rms_norm")?;
        let (xm, wm, om) = (cuda_buf(x, "rms_norm")?, cuda_buf(w, "rms_norm")?, cuda_buf(out, "rms_norm")?);
        check_len("rms_norm", "input", xm.bytes(), rows * dim)?;
        check_len("rms_norm", "output", om.bytes(), rows * dim)?;
        check_len("rms_norm", "weight", wm.bytes(), dim)?;
        let (xp, wp, op, d) = (xm.ptr(), wm.ptr(), om.ptr(), dim as i32);
        let block = if dim >= 1024 { 1024 } else { dim.div_ceil(32).max(1) as u32 * 32 };
        self.launch("rms_norm", self.k.rms_norm, (rows as u32, 1, 1), block, &mut args![xp, wp, op, d, eps])
    }

    fn matmul(&self, w: &Linear, x: &Buffer, out: &mut Buffer, n_tokens: usize) -> Result<(), BackendError> {
        self.matmul_many(&[w], x, &mut [out], n_tokens)
    }

    fn matmul_many(&self, ws: &[&Linear], x: &Buffer, outs: &mut [&mut Buffer], n_tokens: usize) -> Result<(), BackendError> {
        let _e = self.enter("matmul")?;
        let xm = cuda_buf(x, "matmul")?;
        let mut ys = [0 as CUdeviceptr; 8];
        if ws.len() > ys.len() || ws.len() != outs.len() {
            return Err(BackendError::InvalidArgument { op: "matmul", reason: format!("{} weights for {} outputs", ws.len(), outs.len()) });
        }
        for (i, (w, out)) in ws.iter().zip(outs.iter()).enumerate() {
            check_len("matmul", "input", xm.bytes(), n_tokens * w.cols)?;
            let o = cuda_buf(out, "matmul")?;
            check_len("matmul", &w.name, o.bytes(), n_tokens * w.rows)?;
            ys[i] = o.ptr();
        }
        self.product(ws, xm.ptr(), &ys[..ws.len()], n_tokens, false)
    }

    fn rope(&self, x: &mut Buffer, rope: &Rope, n_tokens: usize, n_heads: usize, pos0: usize) -> Result<(), BackendError> {
        let _e = self.enter("rope")?;
        let xm = cuda_buf(x, "rope")?;
        check_len("rope", "input", xm.bytes(), n_tokens * n_heads * rope.head_dim)?;
        self.stage_step("rope", pos0, n_tokens, None)?;
        let table = self.rope_table(rope)?;
        let (xp, n, h, hd, hs, step) =
            (xm.ptr(), n_tokens as i32, n_heads as i32, rope.head_dim as i32, (rope.style == RopeStyle::HalfSplit) as i32, self.step_dev.ptr());
        let total = n_tokens * n_heads * rope.head_dim / 2;
        self.launch("rope", self.k.rope, (total.div_ceil(256) as u32, 1, 1), 256, &mut args![xp, table, n, h, hd, hs, step])
    }

    fn attention(&self, q: &Buffer, k: &Buffer, v: &Buffer, kv: &mut KvLayer, out: &mut Buffer, s: AttentionShape) -> Result<(), BackendError> {
        let _e = self.enter("attention")?;
        let (kc, vc, max_seq) = self.check_attention(q, k, v, kv, out, s)?;
        let (kp, vp, step, ni, kvd) =
            (cuda_buf(k, "attention")?.ptr(), cuda_buf(v, "attention")?.ptr(), self.step_dev.ptr(), s.n_tokens as i32, (s.n_kv_heads * s.head_dim) as i32);
        let total = (s.n_tokens * s.n_kv_heads * s.head_dim) as u32;
        self.launch("attention", self.k.kv_store, (total.div_ceil(256), 1, 1), 256, &mut args![kp, vp, kc, vc, ni, kvd, step])?;
        self.attend(cuda_buf(q, "attention")?.ptr(), kc, vc, cuda_buf(out, "attention")?.ptr(), max_seq, s)
    }

    fn silu_mul(&self, gate: &mut Buffer, up: &Buffer, n: usize) -> Result<(), BackendError> {
        let _e = self.enter("silu_mul")?;
        let (g, u) = (cuda_buf(gate, "silu_mul")?, cuda_buf(up, "silu_mul")?);
        check_len("silu_mul", "gate", g.bytes(), n)?;
        check_len("silu_mul", "up", u.bytes(), n)?;
        let (gp, up_, ni) = (g.ptr(), u.ptr(), n as i64);
        self.launch("silu_mul", self.k.silu_mul, (n.div_ceil(256).min(65535) as u32, 1, 1), 256, &mut args![gp, up_, ni])
    }

    fn add(&self, x: &mut Buffer, y: &Buffer, n: usize) -> Result<(), BackendError> {
        let _e = self.enter("add")?;
        let (xm, ym) = (cuda_buf(x, "add")?, cuda_buf(y, "add")?);
        check_len("add", "x", xm.bytes(), n)?;
        check_len("add", "y", ym.bytes(), n)?;
        let (xp, yp, ni) = (xm.ptr(), ym.ptr(), n as i64);
        self.launch("add", self.k.add, (n.div_ceil(256).min(65535) as u32, 1, 1), 256, &mut args![xp, yp, ni])
    }

    fn copy(&self, src: &Buffer, src_off: usize, dst: &mut Buffer, dst_off: usize, n: usize) -> Result<(), BackendError> {
        let _e = self.enter("copy")?;
        let (sm, dm) = (cuda_buf(src, "copy")?, cuda_buf(dst, "copy")?);
        check_len("copy", "source", sm.bytes(), src_off + n)?;
        check_len("copy", "destination", dm.bytes(), dst_off + n)?;
        // SAFETY: both ranges were checked against their buffers.
        unsafe { result::memcpy_dtod_async(dm.ptr() + (dst_off * 4) as u64, sm.ptr() + (src_off * 4) as u64, n * 4, self.s()) }
            .map_err(|e| dev_err("copy", err("cuMemcpyDtoDAsync", e)))
    }

    fn kv_export(&self, kv: &KvLayer, len: usize, k: &mut [u16], v: &mut [u16]) -> Result<(), BackendError> {
        let _e = self.enter("kv_export")?;
        let (max_seq, kv_dim) = (&kv.max_seq, &kv.kv_dim);
        let CudaKv { k: kc, v: vc } = kv.mem::<CudaKv>("kv_export")?;
        let n = len * kv_dim;
        if len > *max_seq || k.len() < n || v.len() < n {
            return Err(BackendError::InvalidArgument { op: "kv_export", reason: format!("{len} positions of {kv_dim} do not fit") });
        }
        self.sync("kv_export")?;
        let e = |e| dev_err("kv_export", err("cuMemcpyDtoH", e));
        // SAFETY: both caches hold max_seq × kv_dim values, of which the first n are read.
        unsafe {
            result::memcpy_dtoh_sync(&mut k[..n], kc.ptr()).map_err(e)?;
            result::memcpy_dtoh_sync(&mut v[..n], vc.ptr()).map_err(e)
        }
    }

    fn kv_import(&self, kv: &mut KvLayer, len: usize, k: &[u16], v: &[u16]) -> Result<(), BackendError> {
        let _e = self.enter("kv_import")?;
        let (max_seq, kv_dim) = (&kv.max_seq, &kv.kv_dim);
        let CudaKv { k: kc, v: vc } = kv.mem::<CudaKv>("kv_import")?;
        let n = len * *kv_dim;
        if len > *max_seq || k.len() < n || v.len() < n {
            return Err(BackendError::InvalidArgument { op: "kv_import", reason: format!("{len} positions of {kv_dim} do not fit a cache of {max_seq}") });
        }
        self.sync("kv_import")?;
        let e = |e| dev_err("kv_import", err("cuMemcpyHtoD", e));
        // SAFETY: as in kv_export.
        unsafe {
            result::memcpy_htod_sync(kc.ptr(), bytemuck_u16(&k[..n])).map_err(e)?;
            result::memcpy_htod_sync(vc.ptr(), bytemuck_u16(&v[..n])).map_err(e)
        }
    }
}

impl FusedOps for CudaBackend {
    fn matmul_add(&self, w: &Linear, x: &Buffer, out: &mut Buffer, _scratch: &mut Buffer, n_tokens: usize) -> Result<(), BackendError> {
        let _e = self.enter("matmul")?;
        let (xm, om) = (cuda_buf(x, "matmul")?, cuda_buf(out, "matmul")?);
        check_len("matmul", "input", xm.bytes(), n_tokens * w.cols)?;
        check_len("matmul", &w.name, om.bytes(), n_tokens * w.rows)?;
        self.product(&[w], xm.ptr(), &[om.ptr()], n_tokens, true)
    }

    fn norm_matmul_many(
        &self,
        x: &Buffer,
        norm: Norm<'_>,
        xn: &mut Buffer,
        ws: &[&Linear],
        outs: &mut [&mut Buffer],
        n_tokens: usize,
    ) -> Result<(), BackendError> {
        let _e = self.enter("matmul")?;
        if n_tokens != 1 || ws.is_empty() || !fusable_norm(ws) || ws.len() != outs.len() {
            let cols = ws.first().map(|w| w.cols).unwrap_or(0);
            self.rms_norm(x, norm.weight, xn, n_tokens, cols, norm.eps)?;
            return self.matmul_many(ws, xn, outs, n_tokens);
        }
        let (xm, nm) = (cuda_buf(x, "matmul")?, cuda_buf(norm.weight, "matmul")?);
        check_len("matmul", "input", xm.bytes(), ws[0].cols)?;
        check_len("matmul", "norm", nm.bytes(), ws[0].cols)?;
        let mut ys = [0 as CUdeviceptr; 3];
        for (i, (w, out)) in ws.iter().zip(outs.iter()).enumerate() {
            let o = cuda_buf(out, "matmul")?;
            check_len("matmul", &w.name, o.bytes(), w.rows)?;
            ys[i] = o.ptr();
        }
        self.matvec(ws, xm.ptr(), &ys[..ws.len()], false, Some((nm.ptr(), norm.eps)))
    }

    fn attention_block(
        &self,
        x: &Buffer,
        norm: Norm<'_>,
        xn: &mut Buffer,
        w: [&Linear; 3],
        qkv: [&mut Buffer; 3],
        rope: &Rope,
        kv: &mut KvLayer,
        out: &mut Buffer,
        s: AttentionShape,
    ) -> Result<(), BackendError> {
        let _e = self.enter("attention")?;
        let [q, k, v] = qkv;
        // Fused for one token with GGUF's pair layout (rows 2i, 2i+1 rotate together).
        let fusable = s.n_tokens == 1 && rope.style == RopeStyle::Interleaved && rope.head_dim == s.head_dim && fusable_norm(&w);
        if !fusable {
            self.norm_matmul_many(x, norm, xn, &w, &mut [&mut *q, &mut *k, &mut *v], s.n_tokens)?;
            return self.rope_attention(q, k, v, rope, kv, out, s);
        }
        let (kc, vc, max_seq) = self.check_attention(q, k, v, kv, out, s)?;
        let (xm, nm) = (cuda_buf(x, "attention")?, cuda_buf(norm.weight, "attention")?);
        check_len("attention", "input", xm.bytes(), w[0].cols)?;
        check_len("attention", "norm", nm.bytes(), w[0].cols)?;
        let ys = [cuda_buf(q, "attention")?.ptr(), cuda_buf(k, "attention")?.ptr(), cuda_buf(v, "attention")?.ptr()];
        let rs = RopeStore {
            inv_freq: self.rope_table(rope)?,
            kc,
            vc,
            kv_dim: (s.n_kv_heads * s.head_dim) as i32,
            head_dim: s.head_dim as i32,
            step: self.step_dev.ptr(),
        };
        self.matvec_rope(&w, xm.ptr(), &ys, false, Some((nm.ptr(), norm.eps)), rs)?;
        self.attend(ys[0], kc, vc, cuda_buf(out, "attention")?.ptr(), max_seq, s)
    }

    fn ffn_gate_up(
        &self,
        x: &Buffer,
        norm: Norm<'_>,
        xn: &mut Buffer,
        w_gate: &Linear,
        w_up: &Linear,
        gate: &mut Buffer,
        up: &mut Buffer,
        n_tokens: usize,
    ) -> Result<(), BackendError> {
        let _e = self.enter("matmul")?;
        let fusable = n_tokens == 1 && w_gate.rows == w_up.rows && fusable_norm(&[w_gate, w_up]);
        if !fusable {
            self.norm_matmul_many(x, norm, xn, &[w_gate, w_up], &mut [&mut *gate, &mut *up], n_tokens)?;
            return self.silu_mul(gate, up, n_tokens * w_gate.rows);
        }
        let (xm, gm, nm) = (cuda_buf(x, "matmul")?, cuda_buf(gate, "matmul")?, cuda_buf(norm.weight, "matmul")?);
        check_len("matmul", "input", xm.bytes(), w_gate.cols)?;
        check_len("matmul", "norm", nm.bytes(), w_gate.cols)?;
        check_len("matmul", &w_gate.name, gm.bytes(), w_gate.rows)?;
        let (wg, wu, out) = (weight_mem(w_gate, "matmul")?.ptr(), weight_mem(w_up, "matmul")?.ptr(), gm.ptr());
        let (rows, row_bytes, cols) = (w_gate.rows as i32, device_row_bytes(w_gate.dtype, w_gate.cols) as i64, w_gate.cols as i32);
        if let Some(plan) = self.dense_plan(w_gate, 2) {
            let (f, tl, gate, (nw, eps)) = (self.k.dense_ffn[plan.dtype][plan.chunks], plan.tl, Seg { w: wg, y: out, rows }, (nm.ptr(), norm.eps));
            return self.launch("matmul", f, (plan.blocks(w_gate.rows, self.sms), 1, 1), 256, &mut args![gate, wu, row_bytes, cols, xm.ptr(), nw, eps, tl]);
        }
        let f = self.k.ffn[w_gate.dtype.kernel_code() as usize];
        let input = self.product_input(xm.ptr(), w_gate, Some((nm.ptr(), norm.eps)))?;
        let (xp, nw, eps, prep, xq, ds) = (input.x, input.norm_w, input.eps, input.prep, input.xq, input.ds);
        let slices = k_slices(w_gate.rows, self.steps_cap(w_gate), self.max_blocks);
        let (grid, sl) = (self.product_blocks(w_gate.rows.div_ceil(8 / slices)), slices as i32);
        self.launch_smem("matmul", f, (grid, 1, 1), 256, input.smem, &mut args![wg, wu, out, rows, row_bytes, cols, xp, nw, eps, sl, prep, xq, ds])
    }

    fn rope_attention(
        &self,
        q: &mut Buffer,
        k: &mut Buffer,
        v: &Buffer,
        rope: &Rope,
        kv: &mut KvLayer,
        out: &mut Buffer,
        s: AttentionShape,
    ) -> Result<(), BackendError> {
        let _e = self.enter("attention")?;
        if rope.head_dim != s.head_dim {
            return Err(BackendError::InvalidArgument { op: "attention", reason: format!("rope head_dim {} != {}", rope.head_dim, s.head_dim) });
        }
        let (kc, vc, max_seq) = self.check_attention(q, k, v, kv, out, s)?;
        let table = self.rope_table(rope)?;
        let (qp, kp, vp, step) = (cuda_buf(q, "attention")?.ptr(), cuda_buf(k, "attention")?.ptr(), cuda_buf(v, "attention")?.ptr(), self.step_dev.ptr());
        let (n, nh, nkv, hd, hs) = (s.n_tokens as i32, s.n_heads as i32, s.n_kv_heads as i32, s.head_dim as i32, (rope.style == RopeStyle::HalfSplit) as i32);
        let threads = (s.n_tokens * (s.n_heads + s.n_kv_heads) * s.head_dim / 2).max(s.n_tokens * s.n_kv_heads * s.head_dim);
        self.launch(
            "attention",
            self.k.rope_store,
            (threads.div_ceil(256) as u32, 1, 1),
            256,
            &mut args![qp, kp, vp, kc, vc, table, n, nh, nkv, hd, hs, step],
        )?;
        self.attend(qp, kc, vc, cuda_buf(out, "attention")?.ptr(), max_seq, s)
    }
}

impl CudaBackend {
    /// Checks an attention call's buffers and cache, stages the position, and returns the cache.
    pub(super) fn check_attention(
        &self,
        q: &Buffer,
        k: &Buffer,
        v: &Buffer,
        kv: &KvLayer,
        out: &Buffer,
        s: AttentionShape,
    ) -> Result<(CUdeviceptr, CUdeviceptr, usize), BackendError> {
        let (max_seq, kv_dim) = (&kv.max_seq, &kv.kv_dim);
        let CudaKv { k: kc, v: vc } = kv.mem::<CudaKv>("attention")?;
        let (hd, nh, nkv, n) = (s.head_dim, s.n_heads, s.n_kv_heads, s.n_tokens);
        if s.pos0 + n > *max_seq {
            return Err(BackendError::InvalidArgument { op: "attention", reason: format!("positions up to {} exceed the cache of {max_seq}", s.pos0 + n) });
        }
        if hd % 32 != 0 || hd > 256 || nkv == 0 || nh % nkv != 0 || *kv_dim != nkv * hd {
            return Err(BackendError::InvalidArgument { op: "attention", reason: format!("unsupported shape: head_dim {hd}, {nh} heads, {nkv} KV heads") });
        }
        check_len("attention", "q", cuda_buf(q, "attention")?.bytes(), n * nh * hd)?;
        check_len("attention", "k", cuda_buf(k, "attention")?.bytes(), n * nkv * hd)?;
        check_len("attention", "v", cuda_buf(v, "attention")?.bytes(), n * nkv * hd)?;
        check_len("attention", "output", cuda_buf(out, "attention")?.bytes(), n * nh * hd)?;
        self.stage_step("attention", s.pos0, n, None)?;
        Ok((kc.ptr(), vc.ptr(), *max_seq))
    }

    /// Attention over the cache (K/V of the new tokens already stored): one block per head up
    /// to 1024 positions, split over the context and combined beyond.
    pub(super) fn attend(
        &self,
        q: CUdeviceptr,
        kc: CUdeviceptr,
        vc: CUdeviceptr,
        out: CUdeviceptr,
        max_seq: usize,
        s: AttentionShape,
    ) -> Result<(), BackendError> {
        let (hd, nh, n) = (s.head_dim, s.n_heads, s.n_tokens);
        let (splits, chunk) = Self::splits(max_seq, n, s.pos0 + n);
        let step = self.step_dev.ptr();
        let (nhi, nkvi, hdi, chunki, scale) = (nh as i32, s.n_kv_heads as i32, hd as i32, chunk as i32, 1.0f32 / (hd as f32).sqrt());
        if splits == 1 {
            return self.launch("attention", self.k.attn_small, (nh as u32, n as u32, 1), 256, &mut args![q, kc, vc, out, nhi, nkvi, hdi, scale, step]);
        }
        let part = self.scratch("attention", |s| &mut s.partials, n * nh * splits * (hd + 2) * 4)?;
        self.launch(
            "attention",
            self.k.attn_partial,
            (nh as u32, n as u32, splits as u32),
            128,
            &mut args![q, kc, vc, part, nhi, nkvi, hdi, chunki, scale, step],
        )?;
        let spl = splits as i32;
        self.launch("attention", self.k.attn_combine, (nh as u32, n as u32, 1), hd as u32, &mut args![part, out, nhi, hdi, spl])
    }
}
