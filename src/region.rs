//! The shared memory region that backs an actor's linear memory.
//!
//! The runtime, not Wasmtime, owns the bytes of an actor's memory: one anonymous `mmap`
//! reservation (the memory's maximum plus Wasmtime's guard, `PROT_NONE`), whose prefix is made
//! readable and writable ("committed") as the memory grows. The base never moves, so the same
//! address can be handed to a compute device once and stay valid: the CPU backend computes on
//! these bytes directly, the CUDA backend host-registers each committed chunk (a growth hook is
//! called with every newly committed range). The mapping is released when the last handle drops.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// A growth listener: called with `(base, old_committed, new_committed)` after pages are
/// committed and before the guest sees them. An error makes the guest's `memory.grow` fail.
pub type GrowHook = Box<dyn Fn(*mut u8, usize, usize) -> Result<(), String> + Send + Sync>;

/// Errors creating or growing a region.
#[derive(Debug, thiserror::Error)]
pub enum RegionError {
    #[error("region: cannot reserve {bytes} bytes of address space: {source}")]
    Reserve { bytes: usize, source: std::io::Error },
    #[error("region: cannot commit bytes {from}..{to}: {source}")]
    Commit { from: usize, to: usize, source: std::io::Error },
    #[error("region: growing to {requested} bytes exceeds the limit of {limit} bytes")]
    Limit { requested: usize, limit: usize },
    #[error("region: growth hook refused bytes {from}..{to}: {reason}")]
    Hook { from: usize, to: usize, reason: String },
}

/// The page size the region commits in (the host page size).
pub fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if size > 0 {
        size as usize
    } else {
        4096
    }
}

struct Mapping {
    base: *mut u8,
    reserved: usize,
}

// SAFETY: the mapping is plain memory; all access to its bytes is through raw pointers whose
// synchronization is the user's (Wasmtime's store is single-threaded; backends run to completion
// inside host calls).
unsafe impl Send for Mapping {}
// SAFETY: see above; `Mapping` itself is immutable after creation.
unsafe impl Sync for Mapping {}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `base..base+reserved` is exactly the mapping created in `Region::reserve`, and
        // this is the last owner (the `Arc<Inner>` is dropping).
        unsafe {
            libc::munmap(self.base.cast(), self.reserved);
        }
    }
}

struct Inner {
    // Declared first so it drops first: a hook's captured state (a device's registration of
    // these pages) is released while the pages are still mapped.
    hooks: Mutex<Vec<GrowHook>>,
    mapping: Mapping,
    committed: AtomicUsize,
    limit: usize,
}

/// A handle to one region. Cloning is cheap and shares the region; the memory is unmapped when
/// the last clone drops.
#[derive(Clone)]
pub struct Region {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Region {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Region")
            .field("base", &self.base())
            .field("committed", &self.committed())
            .field("reserved", &self.reserved())
            .field("limit", &self.limit())
            .finish()
    }
}

impl Region {
    /// Reserves `reserve` bytes of address space (rounded up to pages) and commits the first
    /// `initial` bytes. Growth beyond `limit` bytes is refused.
    pub fn reserve(reserve: usize, initial: usize, limit: usize) -> Result<Region, RegionError> {
        let page = page_size();
        let reserved = reserve.max(page).div_ceil(page) * page;
        let limit = limit.min(reserved);
        if initial > limit {
            return Err(RegionError::Limit { requested: initial, limit });
        }
        // SAFETY: an anonymous private PROT_NONE mapping at an address the kernel picks; no
        // existing memory is affected.
        let ptr = unsafe { libc::mmap(std::ptr::null_mut(), reserved, libc::PROT_NONE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE, -1, 0) };
        if ptr == libc::MAP_FAILED {
            return Err(RegionError::Reserve { bytes: reserved, source: std::io::Error::last_os_error() });
        }
        let region = Region {
            inner: Arc::new(Inner { mapping: Mapping { base: ptr.cast(), reserved }, committed: AtomicUsize::new(0), limit, hooks: Mutex::new(Vec::new()) }),
        };
        region.grow_to(initial)?;
        Ok(region)
    }

    /// The first byte of the region; stable for the region's whole life.
    pub fn base(&self) -> *mut u8 {
        self.inner.mapping.base
    }

    /// Bytes currently readable and writable (the guest's memory size).
    pub fn committed(&self) -> usize {
        self.inner.committed.load(Ordering::Acquire)
    }

    /// Bytes of address space reserved (committed part + room to grow + guard).
    pub fn reserved(&self) -> usize {
        self.inner.mapping.reserved
    }

    /// The most bytes this region may ever commit.
    pub fn limit(&self) -> usize {
        self.inner.limit
    }

    /// Registers a growth hook and calls it at once for the already committed range, so a device
    /// that attaches late still sees every committed byte exactly once.
    pub fn add_grow_hook(&self, hook: GrowHook) -> Result<(), RegionError> {
        let mut hooks = self.inner.hooks.lock().unwrap_or_else(|e| e.into_inner());
        let committed = self.committed();
        if committed > 0 {
            hook(self.base(), 0, committed).map_err(|reason| RegionError::Hook { from: 0, to: committed, reason })?;
        }
        hooks.push(hook);
        Ok(())
    }

    /// Commits pages up to `new_size` bytes (a no-op when already that large) and tells the
    /// growth hooks. Never moves the base.
    pub fn grow_to(&self, new_size: usize) -> Result<(), RegionError> {
        let hooks = self.inner.hooks.lock().unwrap_or_else(|e| e.into_inner());
        let old = self.committed();
        if new_size <= old {
            return Ok(());
        }
        if new_size > self.inner.limit {
            return Err(RegionError::Limit { requested: new_size, limit: self.inner.limit });
        }
        let page = page_size();
        let from = old.div_ceil(page) * page;
        let to = new_size.div_ceil(page) * page;
        if to > from {
            // SAFETY: `from..to` lies inside the reservation (`to <= limit <= reserved`, both
            // page-aligned) and only changes protection of pages this region owns.
            let rc = unsafe { libc::mprotect(self.base().add(from).cast(), to - from, libc::PROT_READ | libc::PROT_WRITE) };
            if rc != 0 {
                return Err(RegionError::Commit { from, to, source: std::io::Error::last_os_error() });
            }
        }
        for hook in hooks.iter() {
            hook(self.base(), old, new_size).map_err(|reason| RegionError::Hook { from: old, to: new_size, reason })?;
        }
        self.inner.committed.store(new_size, Ordering::Release);
        Ok(())
    }

    /// Bytes of the committed range that are resident in RAM (from `mincore`), for reports.
    pub fn resident_bytes(&self) -> usize {
        let page = page_size();
        let len = self.committed().div_ceil(page) * page;
        if len == 0 {
            return 0;
        }
        let mut vec = vec![0u8; len / page];
        // SAFETY: `base..base+len` is mapped (committed pages, page-rounded); `vec` has one byte
        // per page as mincore requires.
        let rc = unsafe { libc::mincore(self.base().cast(), len, vec.as_mut_ptr()) };
        if rc != 0 {
            return 0;
        }
        vec.iter().filter(|b| **b & 1 != 0).count() * page
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_in_place_and_calls_hooks_with_new_ranges() {
        let region = Region::reserve(1 << 24, 65536, 1 << 20).unwrap();
        let base = region.base();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        region
            .add_grow_hook(Box::new(move |_, a, b| {
                log.lock().unwrap().push((a, b));
                Ok(())
            }))
            .unwrap();
        region.grow_to(3 * 65536).unwrap();
        assert_eq!(region.base(), base);
        assert_eq!(region.committed(), 3 * 65536);
        // SAFETY: the first 3 pages of 64 KiB are committed.
        unsafe { *base.add(3 * 65536 - 1) = 7 };
        assert_eq!(*seen.lock().unwrap(), vec![(0, 65536), (65536, 3 * 65536)]);
        let err = region.grow_to(2 << 20).unwrap_err();
        assert!(matches!(err, RegionError::Limit { .. }), "{err}");
        assert_eq!(region.committed(), 3 * 65536);
    }

    #[test]
    fn refusing_hook_fails_growth_without_committing() {
        let region = Region::reserve(1 << 22, 0, 1 << 22).unwrap();
        region.add_grow_hook(Box::new(|_, _, new| if new > 65536 { Err("device full".into()) } else { Ok(()) })).unwrap();
        region.grow_to(65536).unwrap();
        let err = region.grow_to(131072).unwrap_err().to_string();
        assert!(err.contains("device full"), "{err}");
        assert_eq!(region.committed(), 65536);
    }

    /// A device's registration lives in its hook; the region must drop hooks while the pages are
    /// still mapped (reading an unmapped page here would crash the test).
    #[test]
    fn hooks_are_dropped_while_the_pages_are_still_mapped() {
        struct Probe {
            base: *mut u8,
            seen: Arc<AtomicUsize>,
        }
        // SAFETY: the probe only reads the region's first byte, in drop.
        unsafe impl Send for Probe {}
        // SAFETY: as above.
        unsafe impl Sync for Probe {}
        impl Drop for Probe {
            fn drop(&mut self) {
                // SAFETY: the first page is committed; the test checks it is still mapped.
                let v = unsafe { self.base.read_volatile() };
                self.seen.store(v as usize + 1, Ordering::SeqCst);
            }
        }
        let region = Region::reserve(1 << 20, 65536, 1 << 20).unwrap();
        // SAFETY: the first 64 KiB are committed.
        unsafe { region.base().write(41) };
        let seen = Arc::new(AtomicUsize::new(0));
        let probe = Probe { base: region.base(), seen: seen.clone() };
        region
            .add_grow_hook(Box::new(move |_, _, _| {
                let _ = &probe;
                Ok(())
            }))
            .unwrap();
        drop(region);
        assert_eq!(seen.load(Ordering::SeqCst), 42, "the hook's state saw the region's bytes when it was dropped");
    }
}
