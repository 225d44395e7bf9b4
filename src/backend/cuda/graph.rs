//! Decode graphs: a session's single-token pass captured once as a CUDA graph and replayed.
//!
//! GRAPH_CONTRACT_PLACEHOLDER

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
