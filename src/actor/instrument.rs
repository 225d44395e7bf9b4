//! Rewrites an actor module at load so every mutable global it defines is exported, as Wizer
//! does: Wasmtime only lets the host read and write exported globals, and a snapshot must carry
//! them all (`__stack_pointer` above all). This module owns that rewrite and nothing else; the
//! caller keeps the original bytes for the snapshot and instantiates the instrumented ones.
//!
//! Only the export section changes (one is added, in its proper place, if the module has none);
//! every other section, custom sections included, is copied byte for byte, so function, global
//! and memory indices are unchanged. A mutable global that is already exported keeps its export
//! name; the others get `__driftwood_global_{index}`. Imported globals are skipped: their state
//! belongs to whoever provides them, not to the actor. Mutable `v128` and reference-typed globals
//! are an error, not skipped, because a snapshot that silently lost them would resume wrongly.
//! Instrumenting an instrumented module returns it unchanged.

use std::ops::Range;

use wasm_encoder::{Encode, ExportKind, RawSection};
use wasmparser::{Encoding, ExternalKind, Parser, Payload, TypeRef, ValType, Validator, WasmFeatures};

/// Prefix of the export names given to mutable globals that had none.
pub const GLOBAL_EXPORT_PREFIX: &str = "__driftwood_global_";

/// Section ids from the core spec.
const EXPORT_SECTION: u8 = 7;
/// Sections that must come after the export section (start, element, code, data, data count).
const AFTER_EXPORT: [u8; 5] = [8, 9, 10, 11, 12];

/// Value type of a global a snapshot can carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GlobalKind {
    I32,
    I64,
    F32,
    F64,
}

/// One mutable defined global and the export through which the host reaches it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GlobalSlot {
    /// Index in the module's global index space (imported globals come first).
    pub index: u32,
    pub export: String,
    pub ty: GlobalKind,
}

/// Why a module could not be instrumented.
#[derive(Debug, thiserror::Error)]
pub enum InstrumentError {
    #[error("wasm module is not valid: {0}")]
    Invalid(#[from] wasmparser::BinaryReaderError),
    #[error("wasm module is a component; actors must be core wasm modules")]
    Component,
    #[error(
        "wasm module: mutable global {index} has type {ty}; snapshots carry only i32, i64, \
         f32 and f64 globals"
    )]
    UnsupportedGlobal { index: u32, ty: String },
    #[error("wasm module: export '{name}' already exists and is not mutable global {index}")]
    NameTaken { name: String, index: u32 },
}

/// What the first pass learns about the module.
struct Survey {
    imported_globals: u32,
    defined_globals: Vec<wasmparser::GlobalType>,
    /// (name, kind, index) of every existing export, in order.
    exports: Vec<(String, ExternalKind, u32)>,
    /// Byte range of the export section's contents, if there is one.
    export_section: Option<Range<usize>>,
    /// Byte offset, within the export section's contents, of the first entry (after the count).
    first_export_at: usize,
}

fn survey(wasm: &[u8]) -> Result<Survey, InstrumentError> {
    let mut s = Survey { imported_globals: 0, defined_globals: Vec::new(), exports: Vec::new(), export_section: None, first_export_at: 0 };
    for payload in Parser::new(0).parse_all(wasm) {
        match payload? {
            Payload::Version { encoding: Encoding::Component, .. } => return Err(InstrumentError::Component),
            Payload::ImportSection(reader) => {
                for import in reader.into_imports() {
                    if let TypeRef::Global(_) = import?.ty {
                        s.imported_globals += 1;
                    }
                }
            }
            Payload::GlobalSection(reader) => {
                for global in reader {
                    s.defined_globals.push(global?.ty);
                }
            }
            Payload::ExportSection(reader) => {
                let range = to_usize(reader.range());
                s.first_export_at = range.end;
                for (i, export) in reader.into_iter_with_offsets().enumerate() {
                    let (offset, export) = export?;
                    if i == 0 {
                        s.first_export_at = offset as usize;
                    }
                    s.exports.push((export.name.to_string(), export.kind, export.index));
                }
                s.first_export_at -= range.start;
                s.export_section = Some(range);
            }
            _ => {}
        }
    }
    Ok(s)
}

fn to_usize(r: Range<u64>) -> Range<usize> {
    // Offsets come from parsing an in-memory slice, so they fit in usize.
    r.start as usize..r.end as usize
}

/// Returns the module with every defined mutable global exported, and one slot per such global
/// in index order. If nothing needed exporting the bytes are returned unchanged.
pub fn instrument(wasm: &[u8]) -> Result<(Vec<u8>, Vec<GlobalSlot>), InstrumentError> {
    let s = survey(wasm)?;
    // The survey only parses; validation catches type errors before anything is rewritten.
    // Wasmtime validates again under its own feature set when it compiles the result.
    Validator::new_with_features(WasmFeatures::all()).validate_all(wasm)?;

    let mut slots = Vec::new();
    let mut added: Vec<(String, u32)> = Vec::new();
    for (i, ty) in s.defined_globals.iter().enumerate() {
        if !ty.mutable {
            continue;
        }
        // Validation bounds the global count far below u32::MAX.
        let index = s.imported_globals + i as u32;
        let kind = match ty.content_type {
            ValType::I32 => GlobalKind::I32,
            ValType::I64 => GlobalKind::I64,
            ValType::F32 => GlobalKind::F32,
            ValType::F64 => GlobalKind::F64,
            other => return Err(InstrumentError::UnsupportedGlobal { index, ty: other.to_string() }),
        };
        let existing = s.exports.iter().find(|(_, k, idx)| *k == ExternalKind::Global && *idx == index);
        let export = match existing {
            Some((name, ..)) => name.clone(),
            None => {
                let name = format!("{GLOBAL_EXPORT_PREFIX}{index}");
                if s.exports.iter().any(|(n, ..)| *n == name) {
                    return Err(InstrumentError::NameTaken { name, index });
                }
                added.push((name.clone(), index));
                name
            }
        };
        slots.push(GlobalSlot { index, export, ty: kind });
    }
    if added.is_empty() {
        return Ok((wasm.to_vec(), slots));
    }

    // New export section: new count, the old entries verbatim (whatever kinds they use), then ours.
    let mut exports = Vec::new();
    let total = s.exports.len() + added.len();
    // Validation caps exports far below u32::MAX; saturate rather than wrap if that ever changes.
    u32::try_from(total).unwrap_or(u32::MAX).encode(&mut exports);
    if let Some(range) = &s.export_section {
        exports.extend_from_slice(&wasm[range.start + s.first_export_at..range.end]);
    }
    for (name, index) in &added {
        name.as_str().encode(&mut exports);
        ExportKind::Global.encode(&mut exports);
        index.encode(&mut exports);
    }
    let export_section = RawSection { id: EXPORT_SECTION, data: &exports };

    let mut module = wasm_encoder::Module::new();
    let mut emitted = false;
    for payload in Parser::new(0).parse_all(wasm) {
        let Some((id, range)) = payload?.as_section() else {
            continue;
        };
        if id == EXPORT_SECTION || (!emitted && AFTER_EXPORT.contains(&id)) {
            if !emitted {
                module.section(&export_section);
                emitted = true;
            }
            if id == EXPORT_SECTION {
                continue;
            }
        }
        module.section(&RawSection { id, data: &wasm[to_usize(range)] });
    }
    if !emitted {
        module.section(&export_section);
    }
    Ok((module.finish(), slots))
}

#[cfg(test)]
mod tests {
    use super::*;
    use wasm_encoder as we;
    use wasmtime::{Engine, Instance, Module, Store, Val};

    fn gty(val_type: we::ValType, mutable: bool) -> we::GlobalType {
        we::GlobalType { val_type, mutable, shared: false }
    }

    fn memory(m: &mut we::Module) {
        let mut mem = we::MemorySection::new();
        mem.memory(we::MemoryType { minimum: 1, maximum: None, memory64: false, shared: false, page_size_log2: None });
        m.section(&mem);
    }

    /// Sections in order: `types` is (results) per function type, one function per type.
    fn module(
        results: &[&[we::ValType]],
        globals: &[(we::ValType, bool, we::ConstExpr)],
        exports: &[(&str, we::ExportKind, u32)],
        bodies: &[&dyn Fn(&mut we::InstructionSink<'_>)],
    ) -> Vec<u8> {
        let mut m = we::Module::new();
        let mut types = we::TypeSection::new();
        let mut funcs = we::FunctionSection::new();
        for (i, r) in results.iter().enumerate() {
            types.ty().function([], r.iter().copied());
            funcs.function(i as u32);
        }
        m.section(&types);
        m.section(&funcs);
        let mut gs = we::GlobalSection::new();
        for (ty, mutable, init) in globals {
            gs.global(gty(*ty, *mutable), init);
        }
        m.section(&gs);
        if !exports.is_empty() {
            let mut ex = we::ExportSection::new();
            for (name, kind, index) in exports {
                ex.export(name, *kind, *index);
            }
            m.section(&ex);
        }
        let mut code = we::CodeSection::new();
        for body in bodies {
            let mut f = we::Function::new([]);
            body(&mut f.instructions());
            f.instructions().end();
            code.function(&f);
        }
        m.section(&code);
        m.finish()
    }

    /// An imported global (index 0), mutable i32/i64/f32/f64 globals 1..=4, an immutable one
    /// (5), a mutable one already exported as "counter" (6), a memory, a data segment, getters.
    fn sample_module() -> Vec<u8> {
        use we::ValType::*;
        let mut m = we::Module::new();
        let mut types = we::TypeSection::new();
        for r in [&[I32][..], &[I64], &[F32], &[F64], &[]] {
            types.ty().function([], r.iter().copied());
        }
        m.section(&types);
        let mut imports = we::ImportSection::new();
        imports.import("env", "imported", gty(I32, true));
        m.section(&imports);
        let mut funcs = we::FunctionSection::new();
        for t in [0, 1, 2, 3, 0, 4] {
            funcs.function(t);
        }
        m.section(&funcs);
        memory(&mut m);
        let mut gs = we::GlobalSection::new();
        gs.global(gty(I32, true), &we::ConstExpr::i32_const(1));
        gs.global(gty(I64, true), &we::ConstExpr::i64_const(2));
        gs.global(gty(F32, true), &we::ConstExpr::f32_const(3.0f32.into()));
        gs.global(gty(F64, true), &we::ConstExpr::f64_const(4.0f64.into()));
        gs.global(gty(I32, false), &we::ConstExpr::i32_const(5));
        gs.global(gty(I32, true), &we::ConstExpr::i32_const(6));
        m.section(&gs);
        let mut ex = we::ExportSection::new();
        ex.export("counter", we::ExportKind::Global, 6);
        ex.export("memory", we::ExportKind::Memory, 0);
        for (i, name) in ["get_a", "get_b", "get_c", "get_d", "get_e", "bump"].iter().enumerate() {
            ex.export(name, we::ExportKind::Func, i as u32);
        }
        m.section(&ex);
        let mut code = we::CodeSection::new();
        for g in [1, 2, 3, 4, 6] {
            let mut f = we::Function::new([]);
            f.instructions().global_get(g).end();
            code.function(&f);
        }
        let mut bump = we::Function::new([]);
        bump.instructions().global_get(1).i32_const(1).i32_add().global_set(1).end();
        code.function(&bump);
        m.section(&code);
        let mut data = we::DataSection::new();
        data.active(0, &we::ConstExpr::i32_const(0), b"hi".iter().copied());
        m.section(&data);
        m.finish()
    }

    fn instantiate(engine: &Engine, wasm: &[u8]) -> (Store<()>, Instance) {
        let module = Module::new(engine, wasm).expect("instrumented module compiles");
        let mut store = Store::new(engine, ());
        let imports: Vec<wasmtime::Extern> = module
            .imports()
            .map(|_| {
                let ty = wasmtime::GlobalType::new(wasmtime::ValType::I32, wasmtime::Mutability::Var);
                wasmtime::Global::new(&mut store, ty, Val::I32(0)).expect("host global").into()
            })
            .collect();
        let instance = Instance::new(&mut store, &module, &imports).expect("instantiate");
        (store, instance)
    }

    #[test]
    fn exports_every_mutable_defined_global_and_they_are_live() {
        let (out, slots) = instrument(&sample_module()).expect("instrument");
        let summary: Vec<_> = slots.iter().map(|s| (s.index, s.export.as_str(), s.ty)).collect();
        assert_eq!(
            summary,
            [
                (1, "__driftwood_global_1", GlobalKind::I32),
                (2, "__driftwood_global_2", GlobalKind::I64),
                (3, "__driftwood_global_3", GlobalKind::F32),
                (4, "__driftwood_global_4", GlobalKind::F64),
                (6, "counter", GlobalKind::I32),
            ]
        );
        let engine = Engine::default();
        let (mut store, instance) = instantiate(&engine, &out);
        let values = [Val::I32(-11), Val::I64(1 << 40), Val::F32(2.5f32.to_bits()), Val::F64((-0.125f64).to_bits()), Val::I32(99)];
        for (slot, v) in slots.iter().zip(&values) {
            let g = instance.get_global(&mut store, &slot.export).expect("global is exported");
            g.set(&mut store, *v).expect("set global");
        }
        let call = |store: &mut Store<()>, name: &str| -> Val {
            let f = instance.get_func(&mut *store, name).expect("getter");
            let mut out = [Val::I32(0)];
            f.call(&mut *store, &[], &mut out).expect("call");
            out[0]
        };
        assert_eq!(call(&mut store, "get_a").unwrap_i32(), -11);
        assert_eq!(call(&mut store, "get_b").unwrap_i64(), 1 << 40);
        assert_eq!(call(&mut store, "get_c").unwrap_f32(), 2.5);
        assert_eq!(call(&mut store, "get_d").unwrap_f64(), -0.125);
        assert_eq!(call(&mut store, "get_e").unwrap_i32(), 99);
        // The other direction: guest writes are visible through the export.
        let bump = instance.get_func(&mut store, "bump").expect("bump");
        bump.call(&mut store, &[], &mut []).expect("call");
        let a = instance.get_global(&mut store, "__driftwood_global_1").expect("a");
        assert_eq!(a.get(&mut store).unwrap_i32(), -10);
        // The immutable global and the import got no export.
        assert!(instance.get_global(&mut store, "__driftwood_global_5").is_none());
        assert!(instance.get_global(&mut store, "__driftwood_global_0").is_none());
    }

    #[test]
    fn instrumenting_twice_changes_nothing() {
        let (once, slots1) = instrument(&sample_module()).expect("first");
        let (twice, slots2) = instrument(&once).expect("second");
        assert_eq!(once, twice);
        assert_eq!(slots1, slots2);
    }

    #[test]
    fn module_without_export_section_gets_one_in_order() {
        // Start, element, code and data sections must all follow the new export section.
        let mut m = we::Module::new();
        let mut types = we::TypeSection::new();
        types.ty().function([], []);
        m.section(&types);
        let mut funcs = we::FunctionSection::new();
        funcs.function(0);
        m.section(&funcs);
        let mut tables = we::TableSection::new();
        tables.table(we::TableType { element_type: we::RefType::FUNCREF, table64: false, minimum: 1, maximum: None, shared: false });
        m.section(&tables);
        memory(&mut m);
        let mut gs = we::GlobalSection::new();
        gs.global(gty(we::ValType::I32, true), &we::ConstExpr::i32_const(7));
        m.section(&gs);
        m.section(&we::StartSection { function_index: 0 });
        let mut elems = we::ElementSection::new();
        elems.active(None, &we::ConstExpr::i32_const(0), we::Elements::Functions([0u32][..].into()));
        m.section(&elems);
        let mut code = we::CodeSection::new();
        let mut set = we::Function::new([]);
        set.instructions().i32_const(42).global_set(0).end();
        code.function(&set);
        m.section(&code);
        let mut data = we::DataSection::new();
        data.active(0, &we::ConstExpr::i32_const(0), b"x".iter().copied());
        m.section(&data);

        let (out, slots) = instrument(&m.finish()).expect("instrument");
        Validator::new().validate_all(&out).expect("output validates");
        let engine = Engine::default();
        let (mut store, instance) = instantiate(&engine, &out);
        let g = instance.get_global(&mut store, &slots[0].export).expect("exported");
        assert_eq!(g.get(&mut store).unwrap_i32(), 42, "the start function's write is visible");
    }

    #[test]
    fn custom_sections_survive_in_place() {
        let mut m = we::Module::new();
        let mut gs = we::GlobalSection::new();
        gs.global(gty(we::ValType::I64, true), &we::ConstExpr::i64_const(1));
        m.section(&gs);
        m.section(&we::CustomSection { name: "note".into(), data: b"keep me"[..].into() });
        let (out, _) = instrument(&m.finish()).expect("instrument");
        let ids: Vec<u8> = Parser::new(0).parse_all(&out).filter_map(|p| p.expect("parses").as_section().map(|(id, _)| id)).collect();
        assert_eq!(ids, [6, 0, 7], "global, custom, then the added export section");
        let found = Parser::new(0).parse_all(&out).any(|p| matches!(p, Ok(Payload::CustomSection(c)) if c.name() == "note" && c.data() == b"keep me"));
        assert!(found);
    }

    #[test]
    fn module_without_mutable_globals_is_returned_unchanged() {
        let original = module(&[&[]], &[(we::ValType::I32, false, we::ConstExpr::i32_const(1))], &[("f", we::ExportKind::Func, 0)], &[&|_| {}]);
        let (out, slots) = instrument(&original).expect("instrument");
        assert_eq!(out, original);
        assert!(slots.is_empty());
    }

    #[test]
    fn invalid_module_is_an_error_naming_the_problem() {
        let msg = instrument(b"\0asm\x01\0\0\0\x99").expect_err("garbage").to_string();
        assert!(msg.starts_with("wasm module is not valid: "), "{msg}");
        let msg = instrument(b"not wasm at all").expect_err("garbage").to_string();
        assert!(msg.contains("magic header"), "{msg}");
        // Well-formed but ill-typed: only validation catches it.
        let bad = module(
            &[&[we::ValType::I32]],
            &[(we::ValType::I32, true, we::ConstExpr::i32_const(0))],
            &[],
            &[&|f| {
                f.i64_const(1);
            }],
        );
        let msg = instrument(&bad).expect_err("type error").to_string();
        assert!(msg.contains("type mismatch"), "{msg}");
    }

    #[test]
    fn mutable_v128_global_is_rejected() {
        let v128 = |mutable| module(&[], &[(we::ValType::V128, mutable, we::ConstExpr::v128_const(0))], &[], &[]);
        let msg = instrument(&v128(true)).expect_err("v128").to_string();
        assert_eq!(msg, "wasm module: mutable global 0 has type v128; snapshots carry only i32, i64, f32 and f64 globals");
        // Immutable ones are not state, so they are fine.
        instrument(&v128(false)).expect("immutable v128");
    }

    #[test]
    fn export_name_collision_is_an_error() {
        let wasm = module(&[&[]], &[(we::ValType::I32, true, we::ConstExpr::i32_const(0))], &[("__driftwood_global_0", we::ExportKind::Func, 0)], &[&|_| {}]);
        let msg = instrument(&wasm).expect_err("collision").to_string();
        assert_eq!(msg, "wasm module: export '__driftwood_global_0' already exists and is not mutable global 0");
    }

    #[test]
    fn rust_wasip1_actor_exposes_its_stack_pointer() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/target/wasm32-wasip1/release/echo.wasm");
        let Ok(original) = std::fs::read(path) else {
            eprintln!("skipping: {path} not built");
            return;
        };
        let (out, slots) = instrument(&original).expect("instrument echo.wasm");
        assert!(!slots.is_empty(), "a Rust cdylib has at least __stack_pointer");
        assert_eq!(slots[0].ty, GlobalKind::I32);
        let engine = Engine::default();
        let exports = |wasm: &[u8]| -> Vec<String> {
            let module = Module::new(&engine, wasm).expect("compiles");
            module.exports().map(|e| e.name().to_string()).collect()
        };
        let (before, after) = (exports(&original), exports(&out));
        for slot in &slots {
            assert!(after.contains(&slot.export), "{} missing from {after:?}", slot.export);
        }
        // Every original export is still there, first and in the same order.
        assert_eq!(&after[..before.len()], &before[..]);
        let (again, _) = instrument(&out).expect("second pass");
        assert_eq!(again, out);
    }
}
