//! Driftwood: a runtime for stateful WebAssembly actors that drive LLM inference.
//!
//! `actor` owns Wasmtime and the actors' shared memory; `backend` owns compute devices;
//! `bench` measures them. The `driftwood` binary (src/main.rs, src/cli/) is a thin layer over
//! these modules.

pub mod actor;
pub mod backend;
pub mod bench;
pub mod engine;
pub mod snapshot;
