//! The engine against an independent reference: llama.cpp's token ids and logits for the
//! default model (tests/reference/smollm2-135m-q4_1.json, produced by make_reference.sh).

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use driftwood::backend::cpu::CpuBackend;
use driftwood::engine::load;
use driftwood::engine::model::Model;
use driftwood::engine::sampler::{argmax, SamplerConfig};
use driftwood::engine::tokenizer::Tokenizer;
use driftwood::engine::{registry, Session};
use serde_json::Value;

/// The default model, or None (with a note) when it has not been fetched. CI fetches it, and
/// there a missing model is a failure.
pub fn default_model() -> Option<(Arc<Model>, Arc<Tokenizer>)> {
    static LOADED: OnceLock<Option<(Arc<Model>, Arc<Tokenizer>)>> = OnceLock::new();
    LOADED
        .get_or_init(|| match registry::resolve(registry::DEFAULT_MODEL) {
            Ok((path, name)) => {
                let (m, t) = load::load(&path, Arc::new(CpuBackend::new(Some(2))), Some(&name)).expect("load the default model");
                Some((Arc::new(m), Arc::new(t)))
            }
            Err(e) => {
                assert!(std::env::var_os("CI").is_none(), "CI must fetch the default model: {e}");
                eprintln!("skipping: {e}");
                None
            }
        })
        .clone()
}

fn reference() -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/reference/smollm2-135m-q4_1.json");
    serde_json::from_str(&std::fs::read_to_string(path).expect("reference file")).expect("reference json")
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().expect("id array").iter().map(|x| x.as_u64().expect("id") as u32).collect()
}

#[test]
fn tokenizer_matches_llama_cpp_token_ids() {
    let Some((_, tok)) = default_model() else { return };
    let r = reference();
    let mut checked = 0;
    for case in r["tokenize_only"].as_array().unwrap().iter().chain(r["cases"].as_array().unwrap()) {
        let text = case["text"].as_str().unwrap();
        let special = case["parse_special"].as_bool().unwrap();
        let want = ids(if case.get("ids").is_some() { &case["ids"] } else { &case["prompt_ids"] });
        assert_eq!(tok.encode(text, special).unwrap(), want, "tokenizing {text:?} (parse_special {special})");
        checked += 1;
    }
    assert!(checked >= 20, "{checked}");
}

#[test]
fn chat_template_renders_llama_cpp_prompt_text() {
    let Some((_, tok)) = default_model() else { return };
    let r = reference();
    let case = r["cases"].as_array().unwrap().iter().find(|c| c["name"] == "chat_capital").unwrap();
    let msgs = [driftwood::engine::tokenizer::ChatMessage::new("user", "What is the capital of France?")];
    assert_eq!(tok.apply_chat_template(&msgs, true).unwrap(), case["text"].as_str().unwrap());
}

/// Teacher forcing: feed llama.cpp's tokens, compare our logits for its top-8 candidates at
/// every step; then free-running greedy must agree until (at most) a near-tie.
///
/// The tolerances are measured, not wished for: this model has massive activations, and a
/// change as small as rounding Q to f16 in attention moves its logits by ±0.2. Two correct
/// implementations that sum in different orders (llama.cpp vs ours, or our scalar vs AVX2
/// kernels) differ by 0.17 on average here, so: mean < 0.3, every logit < 1.5, greedy allowed
/// to part only where llama.cpp's own top-2 gap is < 0.2, and most cases must agree on all 32.
#[test]
fn logits_and_greedy_tokens_match_llama_cpp() {
    let Some((model, tok)) = default_model() else { return };
    let r = reference();
    let mut worst = 0f32;
    let (mut sum_diff, mut n_diff) = (0f64, 0usize);
    let mut full_matches = 0;
    for case in r["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let prompt = ids(&case["prompt_ids"]);
        let greedy = ids(&case["greedy_ids"]);
        let steps = case["steps"].as_array().unwrap();
        let mut s = Session::new(model.clone(), tok.clone(), 1024, SamplerConfig::default()).unwrap();
        s.eval(&prompt).unwrap();
        let mut case_worst = 0f32;
        for (i, step) in steps.iter().enumerate() {
            let logits = s.logits();
            for pair in step["top"].as_array().unwrap() {
                let id = pair[0].as_u64().unwrap() as usize;
                let want = pair[1].as_f64().unwrap() as f32;
                let diff = (logits[id] - want).abs();
                case_worst = case_worst.max(diff);
                sum_diff += diff as f64;
                n_diff += 1;
                assert!(diff < 1.5, "{name} step {i}: logit[{id}] = {} vs llama.cpp {want} (diff {diff})", logits[id]);
            }
            if std::env::var_os("DW_STEPS").is_some() {
                let top = step["top"].as_array().unwrap();
                let d: Vec<String> =
                    top.iter().take(3).map(|p| format!("{:+.3}", logits[p[0].as_u64().unwrap() as usize] - p[1].as_f64().unwrap() as f32)).collect();
                println!("{name} step {i} pos {}: {}", step["pos"], d.join(" "));
            }
            if i + 1 < steps.len() {
                s.eval(&[greedy[i]]).unwrap();
            }
        }
        println!("{name:>20}: max |logit - llama.cpp| over top-8 = {case_worst:.4}");
        worst = worst.max(case_worst);

        // Free-running greedy from the prompt alone.
        let mut s = Session::new(model.clone(), tok.clone(), 1024, SamplerConfig::default()).unwrap();
        s.eval(&prompt).unwrap();
        let mut matched = true;
        for (i, &want) in greedy.iter().enumerate() {
            let got = argmax(s.logits());
            if got != want {
                let top = steps[i]["top"].as_array().unwrap();
                let gap = top[0][1].as_f64().unwrap() - top[1][1].as_f64().unwrap();
                println!("{name}: diverged at step {i} ({got} vs {want}), llama.cpp's top-2 gap {gap:.4}");
                assert!(gap < 0.2, "{name}: greedy token {i} is {got}, llama.cpp chose {want} with a clear margin of {gap}");
                matched = false;
                break;
            }
            if tok.is_end_of_generation(got) {
                break;
            }
            s.eval(&[got]).unwrap();
        }
        full_matches += usize::from(matched);
    }
    let mean = sum_diff / n_diff as f64;
    println!("worst logit difference over all cases: {worst:.4}, mean {mean:.4} over {n_diff}; {full_matches} cases match all greedy tokens");
    assert!(mean < 0.3, "mean logit difference {mean}");
    assert!(full_matches >= 4, "only {full_matches} cases reproduce llama.cpp's greedy tokens");
}

#[test]
fn batched_prefill_equals_token_by_token() {
    let Some((model, tok)) = default_model() else { return };
    let prompt = tok.encode("The quick brown fox jumps over the lazy dog because", false).unwrap();
    let mut a = Session::new(model.clone(), tok.clone(), 256, SamplerConfig::default()).unwrap();
    a.eval(&prompt).unwrap();
    let mut b = Session::new(model.clone(), tok.clone(), 256, SamplerConfig::default()).unwrap();
    for t in &prompt {
        b.eval(&[*t]).unwrap();
    }
    let max = a.logits().iter().zip(b.logits()).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    println!("prefill vs token-by-token: max |diff| = {max:.2e}; first values {:?} vs {:?}", &a.logits()[..4], &b.logits()[..4]);
    assert!(max < 2e-2, "max diff {max}");
    assert_eq!(argmax(a.logits()), argmax(b.logits()));
}

#[test]
fn context_full_is_an_error_not_a_panic() {
    let Some((model, tok)) = default_model() else { return };
    let mut s = Session::new(model, tok, 8, SamplerConfig::default()).unwrap();
    s.eval(&[1, 2, 3, 4, 5]).unwrap();
    let err = s.eval(&[6, 7, 8, 9]).unwrap_err().to_string();
    assert!(err.contains("context full: 5 tokens in the cache + 4 new exceed the context of 8"), "{err}");
    assert_eq!(s.kv_len(), 5, "a refused eval leaves the cache as it was");
    let err = s.eval(&[60000]).unwrap_err().to_string();
    assert!(err.contains("token id 60000 is outside the vocabulary of 49152"), "{err}");
}

/// Regression: a lock held across a parallel product deadlocked when two sessions on one
/// backend ran on two threads (a pool thread waiting in one pass picked up the other's).
#[test]
fn two_sessions_sharing_a_model_on_two_threads_do_not_deadlock() {
    let Some((model, tok)) = default_model() else { return };
    let prompt = tok.encode("Two conversations at once, on one model and one thread pool.", false).unwrap();
    let results: Vec<Vec<f32>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..3)
            .map(|_| {
                let (model, tok, prompt) = (model.clone(), tok.clone(), prompt.clone());
                scope.spawn(move || {
                    let mut s = Session::new(model, tok, 256, SamplerConfig::default()).unwrap();
                    s.eval(&prompt).unwrap();
                    for _ in 0..8 {
                        let t = argmax(s.logits());
                        s.eval(&[t]).unwrap();
                    }
                    s.logits().to_vec()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(results.windows(2).all(|w| w[0] == w[1]), "concurrent sessions computed different logits");
}
