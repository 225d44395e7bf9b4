use super::*;
use safetensors::tensor::TensorView;
use safetensors::SafeTensors;

/// splitmix64: deterministic, dependency-free randomness for the tests.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// A snapshot with `pages` pages of memory of which `nonzero` (spread out) hold data.
fn sample(n_layers: usize, kv_dim: usize, kv_len: usize, vocab: usize, pages: usize, nonzero: &[usize]) -> Snapshot {
    let mut rng = Rng(42);
    let module = b"\0asm\x01\0\0\0 pretend module".to_vec();
    let mut memory = vec![0u8; pages * PAGE_BYTES];
    for &p in nonzero {
        for b in &mut memory[p * PAGE_BYTES..(p + 1) * PAGE_BYTES] {
            *b = rng.next() as u8;
        }
    }
    let kv = (0..n_layers)
        .map(|_| {
            let mut t = || (0..kv_len * kv_dim).map(|_| rng.next() as u16).collect::<Vec<_>>();
            (t(), t())
        })
        .collect();
    Snapshot {
        meta: SnapshotMeta {
            format_version: FORMAT_VERSION,
            driftwood_version: "0.1.0".into(),
            created_unix: 1_700_000_000,
            actor_name: "echo".into(),
            module_sha256: module_sha256(&module),
            memory_bytes: memory.len() as u64,
            globals: vec![(0, GlobalValue::I32(-7)), (2, GlobalValue::F64(f64::NAN.to_bits() | 1))],
            model: Some(ModelRef {
                name: "tiny".into(),
                architecture: "llama".into(),
                weights_hash: "ab".repeat(32),
                tokenizer_hash: "cd".repeat(32),
                n_layers,
                kv_dim,
                vocab_size: vocab,
            }),
            sampler: Some(serde_json::json!({"temperature": 0.5, "seed": u64::MAX, "rng": [1, 2]})),
            kv_len,
            conversation_text: Some("user: hi\nassistant: \"hello\" ✓".into()),
        },
        module,
        memory,
        tokens: (0..kv_len as u32).map(|t| t * 7 + 1).collect(),
        kv,
        logits: (vocab > 0).then(|| (0..vocab).map(|i| i as f32 * 0.25 - 3.0).collect()),
    }
}

fn small() -> Snapshot {
    sample(4, 8, 13, 32, 3, &[1])
}

fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().expect("create temp dir")
}

/// Re-serialises the safetensors file `bytes` after `edit` changes its tensors or metadata.
fn rewrite(bytes: &[u8], edit: impl FnOnce(&mut Vec<(String, Dtype, Vec<usize>, Vec<u8>)>, &mut HashMap<String, String>)) -> Vec<u8> {
    let st = SafeTensors::deserialize(bytes).expect("valid input");
    let (_, md) = SafeTensors::read_metadata(bytes).expect("valid input");
    let mut meta = md.metadata().clone().unwrap_or_default();
    let mut tensors: Vec<_> = st.tensors().into_iter().map(|(n, t)| (n, t.dtype(), t.shape().to_vec(), t.data().to_vec())).collect();
    edit(&mut tensors, &mut meta);
    let views: Vec<_> = tensors.iter().map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).expect("consistent edit"))).collect();
    safetensors::serialize(views, Some(meta)).expect("serialize")
}

fn edit_meta(meta: &mut HashMap<String, String>, f: impl FnOnce(&mut SnapshotMeta)) {
    let mut m: SnapshotMeta = serde_json::from_str(&meta["driftwood"]).expect("meta json");
    f(&mut m);
    meta.insert("driftwood".into(), serde_json::to_string(&m).expect("encode"));
}

fn read_err(dir: &Path, bytes: &[u8]) -> String {
    let path = dir.join("snap.dws");
    std::fs::write(&path, bytes).expect("write test file");
    match read(&path) {
        Ok(_) => panic!("read accepted a bad file"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn round_trip_is_exact() {
    let dir = tempdir();
    for snap in [
        small(),
        sample(2, 4, 0, 16, 1, &[]),    // model, empty KV cache, no stored pages
        sample(1, 4, 3, 0, 2, &[0, 1]), // no logits
    ] {
        let mut snap = snap;
        if snap.meta.model.as_ref().is_some_and(|m| m.vocab_size == 0) {
            snap.meta.model.as_mut().expect("model").vocab_size = 5;
        }
        let path = dir.path().join("snap.dws");
        let stats = write(&path, &snap).expect("write");
        assert_eq!(stats.file_bytes, std::fs::metadata(&path).expect("stat").len());
        let back = read(&path).expect("read");
        assert_eq!(back, snap);
    }
}

#[test]
fn round_trip_without_model() {
    let dir = tempdir();
    let mut snap = sample(0, 0, 0, 0, 1, &[0]);
    snap.meta.model = None;
    snap.meta.sampler = None;
    snap.meta.conversation_text = None;
    let path = dir.path().join("bare.dws");
    write(&path, &snap).expect("write");
    assert_eq!(read(&path).expect("read"), snap);
}

#[test]
fn kv_len_zero_omits_kv_tensors_and_keeps_layers() {
    let dir = tempdir();
    let mut snap = sample(3, 4, 0, 16, 1, &[]);
    snap.logits = None;
    let path = dir.path().join("empty.dws");
    write(&path, &snap).expect("write");
    let (_, tensors) = read_meta(&path).expect("read_meta");
    let names: Vec<_> = tensors.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, [T_MODULE]);
    let back = read(&path).expect("read");
    assert_eq!(back.kv, vec![(vec![], vec![]); 3]);
    assert_eq!(back, snap);
}

#[test]
fn sparse_memory_stores_only_nonzero_pages() {
    let dir = tempdir();
    let snap = sample(1, 4, 2, 8, 16, &[3, 11]); // 1 MiB, 2 pages non-zero
    let path = dir.path().join("sparse.dws");
    let stats = write(&path, &snap).expect("write");
    assert_eq!(stats.memory_bytes, 1 << 20);
    assert_eq!(stats.stored_memory_bytes, 2 * PAGE_BYTES as u64);
    let len = std::fs::metadata(&path).expect("stat").len();
    assert!(len > 2 * PAGE_BYTES as u64 && len < 2 * PAGE_BYTES as u64 + 4096, "file is {len} bytes");
    let (_, tensors) = read_meta(&path).expect("read_meta");
    let index = tensors.iter().find(|t| t.name == T_PAGE_INDEX).expect("page index");
    assert_eq!(index.shape, [2]);
    assert_eq!(read(&path).expect("read").memory, snap.memory);
}

#[test]
fn read_meta_lists_every_tensor() {
    let dir = tempdir();
    let path = dir.path().join("snap.dws");
    write(&path, &small()).expect("write");
    let (meta, tensors) = read_meta(&path).expect("read_meta");
    assert_eq!(meta, small().meta);
    let kv = tensors.iter().find(|t| t.name == "kv.3.v").expect("kv.3.v");
    assert_eq!((kv.dtype.as_str(), kv.shape.as_slice(), kv.bytes), ("F16", &[13, 8][..], 13 * 8 * 2));
    assert_eq!(tensors.len(), 1 + 2 + 1 + 8 + 1);
}

#[test]
fn kv_shape_lie_names_the_tensor_and_the_metadata() {
    let dir = tempdir();
    let snap = sample(4, 192, 13, 16, 1, &[]);
    let path = dir.path().join("snap.dws");
    write(&path, &snap).expect("write");
    let bytes = std::fs::read(&path).expect("read back");
    let bad = rewrite(&bytes, |tensors, _| {
        let t = tensors.iter_mut().find(|t| t.0 == "kv.3.k").expect("kv.3.k");
        t.2 = vec![12, 192];
        t.3.truncate(12 * 192 * 2);
    });
    let msg = read_err(dir.path(), &bad);
    let want = format!("{}: tensor 'kv.3.k' has shape [12, 192], metadata says kv_len 13 × kv_dim 192", dir.path().join("snap.dws").display());
    assert_eq!(msg, want);
}

#[test]
fn structural_lies_are_rejected_with_clear_messages() {
    let dir = tempdir();
    let path = dir.path().join("snap.dws");
    write(&path, &small()).expect("write");
    let good = std::fs::read(&path).expect("read back");
    type Edit = fn(&mut Vec<(String, Dtype, Vec<usize>, Vec<u8>)>, &mut HashMap<String, String>);
    let cases: [(Edit, &str); _] = [
        (
            |_, m| {
                m.insert("format_version".into(), "2".into());
            },
            "format version 2, this driftwood reads version 1",
        ),
        (
            |_, m| {
                m.remove("driftwood");
            },
            "not a driftwood snapshot: __metadata__ has no 'driftwood'",
        ),
        (|t, _| t.retain(|t| t.0 != "kv.2.v"), "missing tensor 'kv.2.v' (metadata says kv_len 13 × kv_dim 8)"),
        (|t, _| t.push(("kv.4.k".into(), Dtype::F16, vec![13, 8], vec![0; 13 * 16])), "unexpected tensor 'kv.4.k'"),
        (|t, _| t.iter_mut().filter(|t| t.0 == T_TOKENS).for_each(|t| t.1 = Dtype::I32), "tensor 'conversation.tokens' has dtype I32, expected U32"),
        (|_, m| edit_meta(m, |m| m.module_sha256 = "00".repeat(32)), "module sha256 is"),
        (|_, m| edit_meta(m, |m| m.memory_bytes = 0), "tensor 'actor.memory.page_index' has shape [1]"),
        (|_, m| edit_meta(m, |m| m.memory_bytes = 65537), "memory_bytes 65537 is not a multiple of 65536"),
        (|_, m| edit_meta(m, |m| m.model.as_mut().expect("model").n_layers = 1 << 40), "model.n_layers 1099511627776 is not in"),
        (|_, m| edit_meta(m, |m| m.globals.reverse()), "globals are not strictly increasing"),
        (
            |t, _| t.iter_mut().filter(|t| t.0 == T_PAGE_INDEX).for_each(|t| t.3 = 7u32.to_le_bytes().to_vec()),
            "actor.memory.page_index entry 7 is out of range (memory has 3 pages)",
        ),
        (
            |t, _| {
                // Two stored pages, both claiming page 1.
                for t in t.iter_mut() {
                    if t.0 == T_PAGE_INDEX {
                        *t = (t.0.clone(), Dtype::U32, vec![2], [1u32, 1].iter().flat_map(|p| p.to_le_bytes()).collect());
                    } else if t.0 == T_PAGES {
                        t.2 = vec![2, PAGE_BYTES];
                        t.3 = vec![1; 2 * PAGE_BYTES];
                    }
                }
            },
            "actor.memory.page_index is not strictly increasing: 1 then 1",
        ),
    ];
    for (edit, want) in cases {
        let msg = read_err(dir.path(), &rewrite(&good, edit));
        assert!(msg.starts_with(&format!("{}: ", path.display())), "{msg}");
        assert!(msg.contains(want), "expected '{want}' in '{msg}'");
    }
}

#[test]
fn huge_header_length_is_rejected_without_allocating() {
    let dir = tempdir();
    let mut bytes = vec![0u8; 64];
    bytes[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    let msg = read_err(dir.path(), &bytes);
    assert!(msg.ends_with("header length 18446744073709551615 does not fit in a 64-byte file"), "{msg}");
    assert!(read_err(dir.path(), b"abc").ends_with("3-byte file is too short for a safetensors header"));
}

#[test]
fn failed_write_keeps_the_previous_snapshot() {
    let dir = tempdir();
    let path = dir.path().join("snap.dws");
    write(&path, &small()).expect("write");
    let before = std::fs::read(&path).expect("read back");

    let mut bad = small();
    bad.tokens.pop();
    let msg = write(&path, &bad).expect_err("inconsistent snapshot").to_string();
    assert!(msg.ends_with("snapshot to write is inconsistent: 12 tokens, kv_len is 13"), "{msg}");
    assert_eq!(std::fs::read(&path).expect("read back"), before);

    // Renaming over a non-empty directory fails after the temp file is complete.
    let blocked = dir.path().join("blocked.dws");
    std::fs::create_dir(&blocked).expect("mkdir");
    std::fs::write(blocked.join("keep"), b"x").expect("write");
    let msg = write(&blocked, &small()).expect_err("rename onto a directory").to_string();
    assert!(msg.contains("cannot rename temp file over it"), "{msg}");

    let names: Vec<_> = std::fs::read_dir(dir.path()).expect("list").map(|e| e.expect("entry").file_name().to_string_lossy().into_owned()).collect();
    assert!(names.iter().all(|n| !n.contains(".tmp-")), "temp files left behind: {names:?}");
    assert_eq!(read(&path).expect("read"), small());
}

#[test]
fn python_style_reader_sees_a_plain_safetensors_file() {
    // The safetensors crate's own parser is what Python's package uses underneath.
    let dir = tempdir();
    let path = dir.path().join("snap.dws");
    write(&path, &small()).expect("write");
    let bytes = std::fs::read(&path).expect("read back");
    let st = SafeTensors::deserialize(&bytes).expect("safetensors accepts the file");
    let k = st.tensor("kv.1.k").expect("kv.1.k");
    assert_eq!(k.dtype(), Dtype::F16);
    let first = u16::from_le_bytes([k.data()[0], k.data()[1]]);
    assert_eq!(first, small().kv[1].0[0]);
}

/// Mutates a valid snapshot thousands of ways; `read` must return (Ok or Err), never panic,
/// and never allocate wildly (a runaway allocation would abort the test).
#[test]
fn read_never_panics_on_corrupt_files() {
    let dir = tempdir();
    let src = dir.path().join("good.dws");
    let mut snap = sample(2, 4, 3, 8, 2, &[1]);
    // Keep the stored page small in entropy but present.
    snap.memory[PAGE_BYTES..PAGE_BYTES + 16].fill(0);
    write(&src, &snap).expect("write");
    let good = std::fs::read(&src).expect("read back");
    let header_end = 8 + u64::from_le_bytes(good[..8].try_into().expect("8 bytes")) as usize;
    let path = dir.path().join("fuzz.dws");
    let mut rng = Rng(7);
    let (mut ok, mut err) = (0usize, 0usize);
    let mut check = |bytes: &[u8]| {
        std::fs::write(&path, bytes).expect("write fuzz file");
        match read(&path) {
            Ok(_) => ok += 1,
            Err(e) => {
                assert!(e.to_string().starts_with(&path.display().to_string()), "{e}");
                err += 1
            }
        }
        let _ = read_meta(&path);
    };

    // Truncation: every length through the header, then a spread over the data.
    for len in (0..header_end + 64).chain((header_end..good.len()).step_by(997)) {
        check(&good[..len]);
    }
    // Header lengths that lie.
    for n in [0, 1, 7, header_end as u64 - 9, header_end as u64 - 7, good.len() as u64, u64::MAX, 1 << 40] {
        let mut b = good.clone();
        b[..8].copy_from_slice(&n.to_le_bytes());
        check(&b);
    }
    // Random byte flips, mostly in the header where they matter.
    for _ in 0..1500 {
        let mut b = good.clone();
        for _ in 0..1 + rng.below(4) {
            let at = if rng.below(4) == 0 { rng.below(b.len()) } else { rng.below(header_end) };
            b[at] ^= 1 << rng.below(8);
        }
        check(&b);
    }
    // Header JSON rewritten with lies about shapes, offsets, dtypes and metadata.
    let header: serde_json::Value = serde_json::from_slice(&good[8..header_end]).expect("header json");
    let names: Vec<String> = header.as_object().expect("object").keys().cloned().collect();
    let big = [0u64, 1, 2, 3, 4, 12, 65536, 1 << 32, (1 << 32) + 65536, u32::MAX as u64, u64::MAX / 2, u64::MAX];
    let dtypes = ["U8", "U32", "F16", "F32", "I64", "BOOL", "F4", "F6_E2M3", "nope"];
    for _ in 0..1500 {
        let mut h = header.clone();
        let name = &names[rng.below(names.len())];
        let entry = &mut h[name.as_str()];
        if name == "__metadata__" {
            let mut m: serde_json::Value = serde_json::from_str(entry["driftwood"].as_str().unwrap_or("{}")).unwrap_or_default();
            let v = serde_json::json!(big[rng.below(big.len())]);
            match rng.below(8) {
                0 => m["kv_len"] = v,
                1 => m["memory_bytes"] = v,
                2 => m["model"]["n_layers"] = v,
                3 => m["model"]["kv_dim"] = v,
                4 => m["model"]["vocab_size"] = v,
                5 => m["model"] = serde_json::Value::Null,
                6 => m["globals"] = serde_json::json!([[v, {"I32": 1}], [0, {"F64": 1}]]),
                _ => entry["format_version"] = serde_json::json!(v.to_string()),
            }
            entry["driftwood"] = serde_json::json!(m.to_string());
        } else {
            match rng.below(6) {
                0 => {
                    let dims = rng.below(4);
                    entry["shape"] = (0..dims).map(|_| big[rng.below(big.len())]).collect();
                }
                1 => {
                    let shape = entry["shape"].as_array_mut().expect("shape");
                    if let Some(d) = shape.first_mut() {
                        *d = serde_json::json!(d.as_u64().unwrap_or(0).wrapping_add(rng.below(3) as u64).saturating_sub(1));
                    }
                }
                2 => {
                    let o = &mut entry["data_offsets"];
                    let i = rng.below(2);
                    let cur = o[i].as_u64().unwrap_or(0);
                    o[i] = serde_json::json!(if rng.below(2) == 0 { big[rng.below(big.len())] } else { cur ^ (1 << rng.below(20)) });
                }
                3 => entry["dtype"] = serde_json::json!(dtypes[rng.below(dtypes.len())]),
                4 => {
                    let v = entry.clone();
                    h.as_object_mut().expect("object").insert(format!("kv.{}.k", rng.below(4)), v);
                }
                _ => {
                    h.as_object_mut().expect("object").remove(name);
                }
            }
        }
        let mut hb = serde_json::to_vec(&h).expect("encode");
        hb.resize(hb.len().next_multiple_of(8), b' ');
        let mut b = (hb.len() as u64).to_le_bytes().to_vec();
        b.extend_from_slice(&hb);
        b.extend_from_slice(&good[header_end..]);
        check(&b);
    }
    eprintln!("fuzz: {ok} accepted, {err} rejected");
    assert!(err > 2500, "most mutations must be caught, {err} were");
}

/// `cargo test --release -- --ignored --nocapture bench_large` for the numbers in the report.
#[test]
#[ignore]
fn bench_large_snapshot() {
    let dir = tempdir();
    let snap = sample(30, 192, 4096, 32000, 32, &(0..32).collect::<Vec<_>>());
    let path = dir.path().join("big.dws");
    let t = std::time::Instant::now();
    let stats = write(&path, &snap).expect("write");
    let tw = t.elapsed();
    let t = std::time::Instant::now();
    let back = read(&path).expect("read");
    let tr = t.elapsed();
    let t = std::time::Instant::now();
    read_meta(&path).expect("read_meta");
    let tm = t.elapsed();
    assert!(back == snap);
    eprintln!(
        "write {tw:?}, read {tr:?}, read_meta {tm:?}: file {} bytes, kv {} bytes, memory {} stored",
        stats.file_bytes, stats.kv_bytes, stats.stored_memory_bytes
    );
}
