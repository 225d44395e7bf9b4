//! Decode graphs: a session's single-token pass captured once as a CUDA graph and replayed.
//!
//! # The contract a captured pass relies on
//!
//! From a session's second single-token pass on, [`ModelOps::forward_pass`] does not call the
//! pass closure at all: it replays the kernel launches recorded while the closure ran once under
//! capture, with the arguments and buffer addresses of that run. Only the device-side `Step`
//! record (first position, token ids), written before every pass, changes between replays. So:
//!
//! 1. The model code (`engine::model::forward`) must issue the same ops with the same shapes and
//!    buffers at every position: no branch on the position, the tokens or the cache length.
//! 2. An op must not decide anything on the host from the position or the tokens (which kernel,
//!    how many attention splits: `splits` depends on the cache size only, and kernels read the
//!    position from `Step`), must not read anything back to the host, and must not allocate:
//!    growing a scratch buffer bumps `Scratch::generation`, which drops the captured graphs.
//! 3. Anything that does vary (a new cache size, a multi-token pass) must reach this module as a
//!    different `state` or a pass of `n != 1`, which runs the closure.
//!
//! A host-side branch inside an op is frozen at capture: it breaks silently, not loudly. The CPU
//! test `decode_steps_run_the_same_ops_at_every_position` (engine/model.rs) records the ops of
//! decode passes at different positions and checks (1).

use super::*;

/// Captured decode graphs kept (one per live session, least recently used dropped first).
pub(super) const GRAPH_CACHE: usize = 8;

/// Where the current pass stands (under the backend lock).
#[derive(Default)]
pub(super) struct PassState {
    /// Inside [`Backend::forward_pass`]: the Step record already holds this pass.
    pub(super) active: bool,
    pub(super) pos0: usize,
    pub(super) n: usize,
}

pub(super) struct CachedGraph {
    pub(super) graph: Graph,
    pub(super) generation: u64,
    pub(super) last_used: u64,
}

/// A session's decode graph: not yet captured (one plain pass ran), or ready to replay.
pub(super) enum GraphSlot {
    Warm,
    Ready(CachedGraph),
}

impl CudaBackend {
    pub(super) fn graph_tick(&self) -> u64 {
        let mut c = self.graph_clock.lock().unwrap_or_else(|e| e.into_inner());
        *c += 1;
        *c
    }

    /// Runs a pass: replays the session's captured decode graph, or captures one on a
    /// single-token pass that follows an uncaptured one (which has grown any scratch buffer the
    /// pass needs, so nothing allocates during capture), or runs the ops directly.
    pub(super) fn run_pass(&self, state: u64, n: usize, pass: &mut dyn FnMut() -> Result<(), BackendError>) -> Result<(), BackendError> {
        if n != 1 || !self.use_graphs {
            self.copy_step("forward")?;
            return pass();
        }
        let generation = self.scratch.lock().unwrap_or_else(|e| e.into_inner()).generation;
        let tick = self.graph_tick();
        let ready = {
            let mut graphs = self.graphs.lock().unwrap_or_else(|e| e.into_inner());
            match graphs.get_mut(&state) {
                Some(GraphSlot::Ready(g)) if g.generation == generation => {
                    g.last_used = tick;
                    return g.graph.launch(self.s()).map_err(|e| dev_err("forward", e));
                }
                Some(GraphSlot::Warm) => true,
                _ => {
                    graphs.insert(state, GraphSlot::Warm);
                    false
                }
            }
        };
        if ready {
            let captured = Graph::capture(&self.ctx, self.s(), || {
                self.copy_step("forward")?;
                pass()
            });
            let unchanged = self.scratch.lock().unwrap_or_else(|e| e.into_inner()).generation == generation;
            match captured {
                Ok(Ok(graph)) if unchanged => {
                    graph.launch(self.s()).map_err(|e| dev_err("forward", e))?;
                    let mut graphs = self.graphs.lock().unwrap_or_else(|e| e.into_inner());
                    graphs.insert(state, GraphSlot::Ready(CachedGraph { graph, generation, last_used: tick }));
                    while graphs.len() > GRAPH_CACHE {
                        let oldest = graphs.iter().min_by_key(|(_, g)| if let GraphSlot::Ready(g) = g { g.last_used } else { 0 }).map(|(k, _)| *k);
                        if let Some(k) = oldest {
                            graphs.remove(&k);
                        }
                    }
                    return Ok(());
                }
                // A buffer moved under the capture: nothing ran; run it plainly (and capture later).
                Ok(Ok(_)) => {}
                // The capture failed: nothing ran; run it plainly, and say so once.
                Ok(Err(e)) => warn_capture_failed(&e),
                Err(e) => warn_capture_failed(&e.to_string()),
            }
        }
        self.copy_step("forward")?;
        pass()
    }
}

pub(super) fn warn_capture_failed(e: &str) {
    static WARNED: std::sync::Once = std::sync::Once::new();
    WARNED.call_once(|| eprintln!("driftwood: capturing the CUDA decode graph failed ({e}); this pass runs without it"));
}
