//! Driftwood's integration tests: one binary, one module per subsystem.
//!
//! `common` builds the example actors once (for wasm32-wasip1) and runs the built `driftwood`
//! binary in fresh temp dirs.

mod abi;
mod actors;
mod common;
mod convert;
mod formats;
mod model;
mod runtime;
mod snapshot;
mod synth;
