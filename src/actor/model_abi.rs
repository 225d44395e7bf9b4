//! The model imports of module `driftwood`: tokenizer, chat template, eval, sampling, KV cache.
//!
//! Each reaches the actor's own [`Session`] in its store. Buffers go through
//! [`abi::guest_range`]; results are written straight into guest memory. Logits too: on CUDA
//! the device stores them into the actor's registered pages itself; the CPU backend's are copied
//! once into the guest.
//! Functions that fill a caller buffer return the size needed, snprintf-style.

use std::time::Instant;

use driftwood_guest::abi::{imports, status, MODULE};
use wasmtime::{Caller, Linker};

use super::abi::{self, guest_range, read_str, AbiError};
use super::ActorState;
use crate::engine::sampler::SamplerConfig;
use crate::engine::{EngineError, Session};

fn session<'a>(caller: &'a mut Caller<'_, ActorState>) -> Option<&'a mut Session> {
    caller.data_mut().session.as_mut()
}

/// Copies `bytes` into the guest buffer `out[..cap]` (as much as fits) and returns the full size.
fn write_bytes(caller: &mut Caller<'_, ActorState>, func: &'static str, out: u32, cap: u32, bytes: &[u8]) -> wasmtime::Result<i32> {
    let mem = abi::memory(caller, func)?;
    let data = mem.data_mut(&mut *caller);
    let range = guest_range(data.len(), out, u64::from(cap), 1, func, "out")?;
    let n = bytes.len().min(cap as usize);
    data[range.start..range.start + n].copy_from_slice(&bytes[..n]);
    Ok(i32::try_from(bytes.len()).unwrap_or(i32::MAX))
}

/// Writes u32 values into the guest array `out[..cap]` (as many as fit), returns the count.
fn write_u32s(caller: &mut Caller<'_, ActorState>, func: &'static str, out: u32, cap: u32, values: &[u32]) -> wasmtime::Result<i32> {
    let mem = abi::memory(caller, func)?;
    let data = mem.data_mut(&mut *caller);
    let range = guest_range(data.len(), out, u64::from(cap) * 4, 4, func, "out")?;
    let n = values.len().min(cap as usize);
    for (chunk, v) in data[range].chunks_exact_mut(4).zip(&values[..n]) {
        chunk.copy_from_slice(&v.to_le_bytes());
    }
    Ok(i32::try_from(values.len()).unwrap_or(i32::MAX))
}

fn read_u32s(caller: &mut Caller<'_, ActorState>, func: &'static str, ptr: u32, n: u32) -> Result<Vec<u32>, AbiError> {
    let mem = abi::memory(caller, func)?;
    let data = mem.data(&*caller);
    let range = guest_range(data.len(), ptr, u64::from(n) * 4, 4, func, "tokens")?;
    Ok(data[range].chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
}

fn engine_status(caller: &Caller<'_, ActorState>, func: &str, e: &EngineError) -> i32 {
    match e {
        EngineError::ContextFull { .. } => status::CONTEXT_FULL,
        EngineError::BadToken { .. } => status::INVALID_ARGUMENT,
        EngineError::Backend(err) => {
            eprintln!("[{}] {func}: {err}", caller.data().name);
            status::BACKEND_ERROR
        }
    }
}

/// Adds the model imports to the linker.
pub fn add_to_linker(linker: &mut Linker<ActorState>) -> wasmtime::Result<()> {
    linker.func_wrap(MODULE, imports::MODEL_INFO, |mut caller: Caller<'_, ActorState>, out: i32, cap: i32| -> wasmtime::Result<i32> {
        let Some(s) = session(&mut caller) else { return Ok(status::NO_MODEL) };
        let (m, c, t) = (&s.model.identity, &s.model.config, &s.tokenizer);
        let eog: Vec<String> = t.eog_ids().iter().map(|i| i.to_string()).collect();
        let info = format!(
            "name={}\narchitecture={}\nvocab_size={}\ncontext_length={}\nmax_seq={}\nn_layers={}\ndim={}\neog={}\nchat_template={}\n",
            m.name,
            m.architecture,
            c.vocab_size,
            c.context_length,
            s.max_seq(),
            c.n_layers,
            c.dim,
            eog.join(","),
            t.has_chat_template()
        );
        write_bytes(&mut caller, imports::MODEL_INFO, out as u32, cap as u32, info.as_bytes())
    })?;

    linker.func_wrap(MODULE, imports::VOCAB_SIZE, |mut caller: Caller<'_, ActorState>| -> i32 {
        session(&mut caller).map(|s| s.model.config.vocab_size as i32).unwrap_or(status::NO_MODEL)
    })?;

    linker.func_wrap(
        MODULE,
        imports::TOKENIZE,
        |mut caller: Caller<'_, ActorState>, text: i32, len: i32, special: i32, out: i32, cap: i32| -> wasmtime::Result<i32> {
            const F: &str = imports::TOKENIZE;
            let text = read_str(&mut caller, text as u32, len as u32, F, "text")?;
            let Some(s) = session(&mut caller) else { return Ok(status::NO_MODEL) };
            let ids = match s.tokenizer.encode(&text, special != 0) {
                Ok(ids) => ids,
                Err(e) => {
                    eprintln!("[{}] tokenize: {e}", caller.data().name);
                    return Ok(status::INVALID_ARGUMENT);
                }
            };
            write_u32s(&mut caller, F, out as u32, cap as u32, &ids)
        },
    )?;

    linker.func_wrap(MODULE, imports::DETOKENIZE, |mut caller: Caller<'_, ActorState>, tokens: i32, n: i32, out: i32, cap: i32| -> wasmtime::Result<i32> {
        const F: &str = imports::DETOKENIZE;
        let ids = read_u32s(&mut caller, F, tokens as u32, n as u32)?;
        let Some(s) = session(&mut caller) else { return Ok(status::NO_MODEL) };
        let text = match s.tokenizer.decode(&ids, false) {
            Ok(t) => t,
            Err(_) => return Ok(status::INVALID_ARGUMENT),
        };
        write_bytes(&mut caller, F, out as u32, cap as u32, text.as_bytes())
    })?;

    linker.func_wrap(
        MODULE,
        imports::CHAT_TEMPLATE,
        |mut caller: Caller<'_, ActorState>, msgs: i32, len: i32, add_gen: i32, out: i32, cap: i32| -> wasmtime::Result<i32> {
            const F: &str = imports::CHAT_TEMPLATE;
            let packed = read_str(&mut caller, msgs as u32, len as u32, F, "messages")?;
            let parts: Vec<&str> = packed.split('\0').collect();
            // "role\0content\0" repeated: an even number of parts plus the empty tail.
            if parts.last() != Some(&"") || parts.len().is_multiple_of(2) {
                return Err(AbiError::Overflow { func: F, arg: "messages", what: "expected role\\0content\\0 pairs".into() }.into());
            }
            let messages: Vec<crate::engine::tokenizer::ChatMessage> =
                parts[..parts.len() - 1].chunks(2).map(|p| crate::engine::tokenizer::ChatMessage::new(p[0], p[1])).collect();
            let Some(s) = session(&mut caller) else { return Ok(status::NO_MODEL) };
            let text = match s.tokenizer.apply_chat_template(&messages, add_gen != 0) {
                Ok(t) => t,
                Err(e) => {
                    eprintln!("[{}] chat_template: {e}", caller.data().name);
                    return Ok(status::INVALID_ARGUMENT);
                }
            };
            write_bytes(&mut caller, F, out as u32, cap as u32, text.as_bytes())
        },
    )?;

    linker.func_wrap(MODULE, imports::EVAL, |mut caller: Caller<'_, ActorState>, tokens: i32, n: i32, logits: i32| -> wasmtime::Result<i32> {
        const F: &str = imports::EVAL;
        let ids = read_u32s(&mut caller, F, tokens as u32, n as u32)?;
        let Some(vocab) = session(&mut caller).map(|s| s.model.config.vocab_size) else { return Ok(status::NO_MODEL) };
        // Check the output range before computing, so a bad pointer traps without side effects.
        let mem = abi::memory(&mut caller, F)?;
        let out_range = if logits != 0 { Some(guest_range(mem.data_size(&caller), logits as u32, vocab as u64 * 4, 4, F, "logits")?) } else { None };
        let started = Instant::now();
        let result = match out_range {
            Some(range) => {
                let (data, state) = mem.data_and_store_mut(&mut caller);
                state.session.as_mut().map(|s| s.eval_into(&ids, &mut data[range])).unwrap_or(Ok(false))
            }
            None => session(&mut caller).map(|s| s.eval(&ids).map(|()| false)).unwrap_or(Ok(false)),
        };
        let in_place = match result {
            Ok(d) => d,
            Err(e) => return Ok(engine_status(&caller, "eval", &e)),
        };
        let st = &mut caller.data_mut().host_stats;
        st.logits_in_place += u64::from(in_place);
        st.calls += 1;
        st.tokens_evaluated += ids.len() as u64;
        st.compute += started.elapsed();
        Ok(status::OK)
    })?;

    linker.func_wrap(MODULE, imports::SAMPLE, |mut caller: Caller<'_, ActorState>| -> i32 {
        match session(&mut caller) {
            None => status::NO_MODEL,
            Some(s) => s.sample().map(|t| t as i32).unwrap_or(status::INVALID_ARGUMENT),
        }
    })?;

    linker.func_wrap(
        MODULE,
        imports::SET_SAMPLER,
        |mut caller: Caller<'_, ActorState>, temperature: f32, top_k: i32, top_p: f32, min_p: f32, repeat_penalty: f32, seed: i64| -> i32 {
            let valid = temperature.is_finite()
                && temperature >= 0.0
                && top_k >= 0
                && (0.0..=1.0).contains(&top_p)
                && (0.0..=1.0).contains(&min_p)
                && repeat_penalty > 0.0;
            let Some(s) = session(&mut caller) else { return status::NO_MODEL };
            if !valid {
                return status::INVALID_ARGUMENT;
            }
            let config = SamplerConfig { temperature, top_k: top_k as usize, top_p, min_p, repeat_penalty, seed: seed as u64, ..s.sampler.config.clone() };
            s.sampler = crate::engine::sampler::Sampler::new(config);
            status::OK
        },
    )?;

    linker.func_wrap(MODULE, imports::GENERATE_STEP, |mut caller: Caller<'_, ActorState>| -> i32 {
        let started = Instant::now();
        let Some(s) = session(&mut caller) else { return status::NO_MODEL };
        let result = s.generate_step();
        let code = match result {
            Ok(Some((_, true))) => status::END_OF_SEQUENCE,
            Ok(Some((t, false))) => t as i32,
            Ok(None) => status::INVALID_ARGUMENT,
            Err(e) => return engine_status(&caller, "generate_step", &e),
        };
        let st = &mut caller.data_mut().host_stats;
        st.calls += 1;
        st.tokens_evaluated += u64::from(code >= 0);
        st.compute += started.elapsed();
        code
    })?;

    linker.func_wrap(MODULE, imports::KV_LEN, |mut caller: Caller<'_, ActorState>| -> i32 {
        session(&mut caller).map(|s| s.kv_len() as i32).unwrap_or(status::NO_MODEL)
    })?;

    linker.func_wrap(MODULE, imports::KV_TRUNCATE, |mut caller: Caller<'_, ActorState>, n: i32| -> i32 {
        if n < 0 {
            return status::INVALID_ARGUMENT;
        }
        match session(&mut caller) {
            None => status::NO_MODEL,
            Some(s) => {
                s.truncate(n as usize);
                s.kv_len() as i32
            }
        }
    })?;

    linker.func_wrap(MODULE, imports::IS_EOG, |mut caller: Caller<'_, ActorState>, token: i32| -> i32 {
        match session(&mut caller) {
            None => status::NO_MODEL,
            Some(s) => i32::from(token >= 0 && s.tokenizer.is_end_of_generation(token as u32)),
        }
    })?;
    Ok(())
}
