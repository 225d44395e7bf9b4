//! Driftwood: a runtime for stateful WebAssembly actors that drive LLM inference.
//!
//! The house, bottom up (dependencies point down only):
//! - the ground floor, which imports nothing above it: [`region`] (the memory an actor's linear
//!   memory lives in, shared with devices), [`quant`] (the weight-format table and row codec) and
//!   [`numeric`] (argmax, medians);
//! - [`backend`]: compute devices (CPU, CUDA), using only the ground floor;
//! - [`engine`]: the model (weights, tokenizer, sampler, the forward pass over the backend);
//! - [`actor`]: Wasmtime, the host ABI; [`snapshot`]: freezing and thawing actors;
//! - [`bench`]: measurements. The `driftwood` binary (src/main.rs, src/cli/) is a thin layer
//!   over these modules.

pub mod actor;
pub mod backend;
pub mod bench;
pub mod engine;
pub mod numeric;
pub mod options;
pub mod quant;
pub mod region;
pub mod snapshot;
