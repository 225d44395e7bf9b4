//! Wasmtime's view of a [`Region`]: a `MemoryCreator` that backs every linear memory with a
//! region the runtime owns.
//!
//! Installed with `Config::with_host_memory` and `memory_may_move(false)`, so
//! `memory.data_ptr()` is the region's base for the memory's whole life. Wasmtime owns the
//! `LinearMemory` box; the runtime keeps a second [`Region`] handle, collected right after
//! instantiation with [`take_created_regions`] (instantiation is synchronous on the calling
//! thread, so a thread-local hand-off cannot mix up two actors).

use std::cell::RefCell;

use wasmtime::{LinearMemory, MemoryCreator, MemoryType};

use crate::region::Region;

thread_local! {
    static CREATED: RefCell<Vec<Region>> = const { RefCell::new(Vec::new()) };
}

/// The regions created on this thread since the last call, in creation order.
pub fn take_created_regions() -> Vec<Region> {
    CREATED.with(|c| std::mem::take(&mut *c.borrow_mut()))
}

/// Creates region-backed memories, capped at `limit` bytes each.
pub struct RegionMemoryCreator {
    pub limit: usize,
}

// SAFETY: every memory returned reserves `reserved_size_in_bytes` (when given) plus the guard as
// Wasmtime asks, never moves its base, and keeps its bytes mapped until Wasmtime drops it (the
// region is reference-counted, so a runtime handle only extends the mapping's life).
unsafe impl MemoryCreator for RegionMemoryCreator {
    fn new_memory(
        &self,
        ty: MemoryType,
        minimum: usize,
        maximum: Option<usize>,
        reserved_size_in_bytes: Option<usize>,
        guard_size_in_bytes: usize,
    ) -> Result<Box<dyn LinearMemory>, String> {
        if ty.is_shared() {
            return Err("shared memories are not supported by driftwood actors".into());
        }
        let limit = maximum.unwrap_or(usize::MAX).min(self.limit);
        if minimum > limit {
            return Err(format!("the actor needs at least {minimum} bytes of memory, but the limit is {limit} bytes (raise --max-memory)"));
        }
        let reservation = match reserved_size_in_bytes {
            Some(reserved) => reserved,
            None => limit,
        };
        let reserve = reservation
            .checked_add(guard_size_in_bytes)
            .ok_or_else(|| format!("memory reservation of {reservation} + {guard_size_in_bytes} bytes overflows"))?;
        let region = Region::reserve(reserve, minimum, limit.min(reservation)).map_err(|e| e.to_string())?;
        CREATED.with(|c| c.borrow_mut().push(region.clone()));
        Ok(Box::new(RegionMemory { region }))
    }
}

struct RegionMemory {
    region: Region,
}

// SAFETY: `as_ptr` is the region base, which never changes; `byte_size` is the committed,
// accessible length; growth only commits more of the reservation.
unsafe impl LinearMemory for RegionMemory {
    fn byte_size(&self) -> usize {
        self.region.committed()
    }

    fn byte_capacity(&self) -> usize {
        self.region.limit()
    }

    fn grow_to(&mut self, new_size: usize) -> wasmtime::Result<()> {
        self.region.grow_to(new_size).map_err(wasmtime::Error::msg)
    }

    fn as_ptr(&self) -> *mut u8 {
        self.region.base()
    }
}
