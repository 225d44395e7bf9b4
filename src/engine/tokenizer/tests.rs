use super::*;

/// The 256 byte-level characters, in byte order.
fn byte_level_chars() -> Vec<String> {
    let table = byte_decoder();
    let mut chars = vec![String::new(); 256];
    for (c, b) in table.iter().enumerate() {
        if let (Some(b), Some(c)) = (b, char::from_u32(c as u32)) {
            chars[usize::from(*b)] = c.to_string();
        }
    }
    chars
}

const IM_START: u32 = 262;
const IM_END: u32 = 263;
const TOOL: u32 = 264;
const HELLO: u32 = 259;
const SPACE_HELLO: u32 = 260;

/// Bytes 0..=255, then "he" 256, "ll" 257, "hell" 258, "hello" 259, "Ġhello" 260, "12" 261,
/// then <|im_start|> 262 and <|im_end|> 263 (control) and <|tool|> 264 (user-defined).
fn tiny_bpe(pre: &str) -> GgufVocab {
    let merges: Vec<String> = ["h e", "l l", "he ll", "hell o", "Ġ hello", "1 2"].map(String::from).to_vec();
    let mut tokens = byte_level_chars();
    tokens.extend(merges.iter().map(|m| m.replace(' ', "")));
    tokens.extend(["<|im_start|>", "<|im_end|>", "<|tool|>"].map(String::from));
    let mut token_types = vec![1; tokens.len()];
    token_types[IM_START as usize] = 3;
    token_types[IM_END as usize] = 3;
    token_types[TOOL as usize] = 4;
    GgufVocab { model: "gpt2".into(), pre: Some(pre.into()), tokens, token_types, merges, chat_template: Some(CHATML.into()), ..Default::default() }
}

const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'].strip() + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

fn build(v: GgufVocab) -> Tokenizer {
    Tokenizer::from_gguf_vocab(v).expect("tiny vocabulary builds")
}

#[test]
fn byte_level_bpe_applies_merges_in_rank_order() {
    let t = build(tiny_bpe("gpt-2"));
    assert_eq!(t.encode("hello", false).unwrap(), [HELLO]);
    assert_eq!(t.encode("hello hello", false).unwrap(), [HELLO, SPACE_HELLO]);
    assert_eq!(t.encode("hel", false).unwrap(), [256, u32::from(b'l')]);
    assert_eq!(t.encode("12", false).unwrap(), [261]);
    assert_eq!(t.vocab_size(), 265);
}

#[test]
fn smollm_pre_tokenizer_splits_digits_one_by_one() {
    let t = build(tiny_bpe("smollm"));
    assert_eq!(t.encode("12", false).unwrap(), [u32::from(b'1'), u32::from(b'2')]);
    assert_eq!(t.encode("hello hello", false).unwrap(), [HELLO, SPACE_HELLO]);
}

#[test]
fn parse_special_controls_whether_control_tokens_are_matched() {
    let t = build(tiny_bpe("gpt-2"));
    assert_eq!(t.encode("<|im_start|>hello<|im_end|>", true).unwrap(), [IM_START, HELLO, IM_END]);
    let literal = t.encode("<|im_start|>hello<|im_end|>", false).unwrap();
    assert!(!literal.contains(&IM_START) && !literal.contains(&IM_END), "{literal:?}");
    assert_eq!(t.decode(&literal, false).unwrap(), "<|im_start|>hello<|im_end|>");
    // User-defined tokens are matched either way, as llama.cpp does.
    assert_eq!(t.encode("<|tool|>", false).unwrap(), [TOOL]);
    assert_eq!(t.encode("<|tool|>", true).unwrap(), [TOOL]);
}

#[test]
fn decode_round_trips_unicode_through_byte_tokens() {
    let t = build(tiny_bpe("gpt-2"));
    for text in ["héllo wörld 😀 日本語 e\u{301} Z\u{351}\u{352}", "\t\n  \r\n x  ", "👩‍👩‍👧‍👦 🇫🇷 \u{0}\u{7f}", ""] {
        let ids = t.encode(text, false).unwrap();
        assert_eq!(t.decode(&ids, false).unwrap(), text, "{ids:?}");
    }
}

#[test]
fn decode_skip_special_drops_control_but_keeps_user_defined() {
    let t = build(tiny_bpe("gpt-2"));
    let ids = [IM_START, HELLO, TOOL, IM_END];
    assert_eq!(t.decode(&ids, false).unwrap(), "<|im_start|>hello<|tool|><|im_end|>");
    assert_eq!(t.decode(&ids, true).unwrap(), "hello<|tool|>");
    assert!(matches!(t.decode(&[9999], false), Err(TokenizerError::IdOutOfRange { id: 9999, size: 265 })));
}

#[test]
fn stream_decoder_waits_for_whole_characters() {
    let t = build(tiny_bpe("gpt-2"));
    let ids = t.encode("😀", false).unwrap();
    assert_eq!(ids, [0xF0, 0x9F, 0x98, 0x80]);
    let mut s = t.stream_decoder();
    assert_eq!(s.push(ids[0]), None);
    assert_eq!(s.push(ids[1]), None);
    assert_eq!(s.push(ids[2]), None);
    assert_eq!(s.push(ids[3]).as_deref(), Some("😀"));
    assert_eq!(s.push(IM_END), None);
    assert_eq!(s.push(HELLO).as_deref(), Some("hello"));
    assert_eq!(s.push(u32::MAX), None);
    // A character cut short is flushed as U+FFFD, like a whole decode.
    assert_eq!(s.push(0xE6), None);
    assert_eq!(s.flush().as_deref(), Some("\u{FFFD}"));
    assert_eq!(t.decode(&[0xE6], true).unwrap(), "\u{FFFD}");
    // An invalid byte followed by text comes out at once.
    assert_eq!(s.push(0x80).as_deref(), Some("\u{FFFD}"));
}

#[test]
fn stream_output_concatenates_to_the_whole_decode() {
    let t = build(tiny_bpe("gpt-2"));
    let text = "<|im_start|>héllo 😀 日本語 e\u{301}<|im_end|>\u{10ffff}hello";
    let ids = t.encode(text, true).unwrap();
    let mut s = t.stream_decoder();
    let mut out: String = ids.iter().filter_map(|&id| s.push(id)).collect();
    out.extend(s.flush());
    assert_eq!(out, t.decode(&ids, true).unwrap());
}

#[test]
fn end_of_generation_covers_eos_and_turn_end_tokens() {
    let mut v = tiny_bpe("gpt-2");
    v.eos = Some(TOOL);
    let t = build(v);
    assert_eq!(t.eog_ids(), [IM_END, TOOL]);
    assert!(t.is_end_of_generation(IM_END));
    assert!(t.is_end_of_generation(TOOL));
    assert!(!t.is_end_of_generation(IM_START));
    assert!(!t.is_end_of_generation(HELLO));
}

#[test]
fn bos_is_added_once_when_the_model_asks() {
    let mut v = tiny_bpe("gpt-2");
    v.bos = Some(IM_START);
    v.eos = Some(IM_END);
    v.add_bos = true;
    let t = build(v.clone());
    assert_eq!(t.bos_id(), Some(IM_START));
    assert_eq!(t.encode("hello", true).unwrap(), [IM_START, HELLO]);
    assert_eq!(t.encode("<|im_start|>hello", true).unwrap(), [IM_START, HELLO]);
    assert_eq!(t.encode("", false).unwrap(), [IM_START]);
    v.add_bos = false;
    v.add_eos = true;
    assert_eq!(build(v).encode("hello", true).unwrap(), [HELLO, IM_END]);
}

#[test]
fn token_text_is_the_stored_vocabulary_entry() {
    let t = build(tiny_bpe("gpt-2"));
    assert_eq!(t.token_text(SPACE_HELLO).as_deref(), Some("Ġhello"));
    assert_eq!(t.token_text(IM_START).as_deref(), Some("<|im_start|>"));
    assert_eq!(t.token_text(265), None);
    assert_eq!(t.decode(&[SPACE_HELLO], false).unwrap(), " hello");
}

#[test]
fn fingerprint_is_pinned_and_tracks_the_vocabulary() {
    let t = build(tiny_bpe("gpt-2"));
    assert_eq!(t.fingerprint(), build(tiny_bpe("smollm")).fingerprint());
    assert_eq!(t.fingerprint(), "234fce3aeb6b33838ff03fd02aba09aac576e5c7e164cd7a94ff2dd67865eaa1");
    let mut v = tiny_bpe("gpt-2");
    v.merges.pop();
    assert_ne!(build(v).fingerprint(), t.fingerprint());
    let mut v = tiny_bpe("gpt-2");
    v.eos = Some(IM_END);
    assert_ne!(build(v).fingerprint(), t.fingerprint());
}

#[test]
fn malformed_vocabularies_are_refused_with_the_reason() {
    let err = |v: GgufVocab| Tokenizer::from_gguf_vocab(v).expect_err("must be refused").to_string();
    let mut v = tiny_bpe("gpt-2");
    v.model = "bert".into();
    assert!(err(v).contains("unsupported tokenizer model 'bert'"));
    assert!(err(tiny_bpe("no-such-pre")).contains("unsupported pre-tokenizer 'no-such-pre'"));
    let mut v = tiny_bpe("gpt-2");
    v.bos = Some(265);
    assert_eq!(err(v), "tokenizer: bos token id 265 is out of range for a vocabulary of 265 tokens");
    let mut v = tiny_bpe("gpt-2");
    v.pad = Some(70_000);
    assert_eq!(build(v).pad_id(), None, "an out-of-range pad id is dropped, as in llama.cpp");
    let mut v = tiny_bpe("gpt-2");
    v.token_types.truncate(3);
    assert!(err(v).contains("tokenizer.ggml.token_type has 3 entries, expected 265"));
    let mut v = tiny_bpe("gpt-2");
    v.merges.push("nospace".into());
    assert!(err(v).contains("merge 6 'nospace' is not two tokens"));
    assert!(matches!(Tokenizer::from_gguf_vocab(GgufVocab::default()), Err(TokenizerError::EmptyVocabulary)));
}

#[test]
fn merges_over_unknown_tokens_are_dropped_not_fatal() {
    let mut v = tiny_bpe("gpt-2");
    v.merges.insert(0, "zz qq".into());
    let t = build(v);
    assert_eq!(t.encode("hello", false).unwrap(), [HELLO]);
}

/// <unk> 0, <s> 1, </s> 2, <0x00>..<0xFF> 3..=258, then `pieces` with descending scores.
fn tiny_spm(pieces: [&str; 12]) -> GgufVocab {
    let mut tokens: Vec<String> = ["<unk>", "<s>", "</s>"].map(String::from).to_vec();
    let mut token_types = vec![2, 3, 3];
    for b in 0..=255u8 {
        tokens.push(format!("<0x{b:02X}>"));
        token_types.push(6);
    }
    tokens.extend(pieces.map(String::from));
    token_types.extend(pieces.map(|_| 1));
    let scores = (0..tokens.len()).map(|i| -(i as f32)).collect();
    GgufVocab { model: "llama".into(), tokens, token_types, scores, add_bos: true, ..Default::default() }
}

const SPM_PIECES: [&str; 12] = ["▁", "h", "e", "l", "o", "he", "ll", "hell", "hello", "▁hello", "▁h", "▁w"];

#[test]
fn sentencepiece_merges_the_highest_score_first() {
    let t = build(tiny_spm(["▁", "h", "e", "l", "o", "▁h", "he", "ll", "hell", "hello", "▁hello", "▁w"]));
    let id = |s: &str| t.texts.iter().position(|x| x == s).map(|i| i as u32).unwrap();
    // "▁h" outscores "he", so "▁hello" is out of reach.
    assert_eq!(t.encode("hello", false).unwrap(), [1, id("▁h"), id("e"), id("ll"), id("o")]);
}

#[test]
fn sentencepiece_prepends_a_space_and_falls_back_to_bytes() {
    let t = build(tiny_spm(SPM_PIECES));
    let id = |s: &str| t.texts.iter().position(|x| x == s).map(|i| i as u32);
    // The llama defaults: BOS 1, EOS 2.
    assert_eq!((t.bos_id(), t.eog_ids()), (Some(1), &[2u32][..]));
    assert_eq!(t.encode("hello", false).unwrap(), [1, id("▁hello").unwrap()]);
    // "i" is not a piece: its byte token stands in.
    assert_eq!(t.encode("hi", false).unwrap(), [1, id("▁h").unwrap(), 3 + u32::from(b'i')]);
    // Text after a special token gets its own space prefix, as in llama.cpp.
    assert_eq!(t.encode("<s>hello", true).unwrap(), [1, id("▁hello").unwrap()]);
    assert_eq!(t.encode("hello</s>hello", true).unwrap(), [1, id("▁hello").unwrap(), 2, id("▁hello").unwrap()]);
    for text in ["hello", " hello  w", "héllo 😀\n", "wörld"] {
        let ids = t.encode(text, false).unwrap();
        assert_eq!(t.decode(&ids, true).unwrap(), text, "{ids:?}");
        let mut s = t.stream_decoder();
        let streamed: String = ids.iter().filter_map(|&i| s.push(i)).collect();
        assert_eq!(streamed, text);
    }
}

#[test]
fn chat_template_renders_chatml_like_transformers() {
    let t = build(tiny_bpe("gpt-2"));
    let messages = [ChatMessage::new("system", "Be brief."), ChatMessage::new("user", "  Hi!  ")];
    assert_eq!(
        t.apply_chat_template(&messages, true).unwrap(),
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n"
    );
    assert_eq!(t.apply_chat_template(&messages[1..], false).unwrap(), "<|im_start|>user\nHi!<|im_end|>\n");
}

#[test]
fn chat_template_has_the_transformers_globals() {
    let mut v = tiny_bpe("gpt-2");
    v.bos = Some(IM_START);
    v.eos = Some(IM_END);
    v.chat_template = Some(
        "{{ bos_token }}{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}{{ m.content }}{% endfor %}{{ eos_token }}\n{% if strftime_now is defined %}{{ strftime_now('%Y') | length }}{% endif %}"
            .into(),
    );
    let t = build(v);
    let out = t.apply_chat_template(&[ChatMessage::new("user", "x")], false).unwrap();
    assert_eq!(out, "<|im_start|>x<|im_end|>\n4");
    let err = t.apply_chat_template(&[ChatMessage::new("system", "x")], false).unwrap_err();
    assert!(err.to_string().contains("System role not supported"), "{err}");
}

#[test]
fn missing_chat_template_is_a_clear_error() {
    let mut v = tiny_bpe("gpt-2");
    v.chat_template = None;
    let err = build(v).apply_chat_template(&[], true).unwrap_err();
    assert!(matches!(err, TokenizerError::NoChatTemplate));
    assert!(err.to_string().contains("has no chat template"));
}

#[test]
fn runaway_chat_template_is_stopped() {
    let mut v = tiny_bpe("gpt-2");
    v.chat_template = Some("{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}".into());
    assert!(matches!(build(v).apply_chat_template(&[], true), Err(TokenizerError::ChatTemplate { .. })));
}

#[test]
fn strftime_formats_utc_dates() {
    let t = 1_721_952_000 + 3661; // 2024-07-26 01:01:01 UTC, a Friday
    assert_eq!(strftime_utc("%d %b %Y", t), "26 Jul 2024");
    assert_eq!(strftime_utc("%A %-d %B %y %H:%M:%S %j %p %%", t), "Friday 26 July 24 01:01:01 208 AM %");
    assert_eq!(strftime_utc("%Y-%m-%d %Q", 0), "1970-01-01 %Q");
    assert_eq!(strftime_utc("%Y-%m-%d", 951_782_400), "2000-02-29");
}

#[test]
fn tokenizer_can_be_shared_across_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Tokenizer>();
}

/// A Hugging Face folder: ByteLevel BPE, named template list, eos list in generation_config.
fn write_hf_dir(dir: &Path) {
    let tokenizer = r#"{
      "version": "1.0", "truncation": {"direction": "Right", "max_length": 2, "strategy": "LongestFirst", "stride": 0}, "padding": null,
      "added_tokens": [
        {"id": 0, "content": "<|endoftext|>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
        {"id": 1, "content": "<|im_start|>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
        {"id": 2, "content": "<|im_end|>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}
      ],
      "normalizer": null,
      "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
      "post_processor": null,
      "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
      "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null, "end_of_word_suffix": null,
        "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
        "vocab": {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2, "h": 3, "e": 4, "l": 5, "o": 6, "he": 7, "ll": 8,
                  "hell": 9, "hello": 10, "Ġ": 11, "Ġhello": 12},
        "merges": ["h e", "l l", "he ll", "hell o", "Ġ hello"]}
    }"#;
    let config = serde_json::json!({
        "bos_token": null,
        "eos_token": {"content": "<|im_end|>", "special": true},
        "chat_template": [{"name": "default", "template": CHATML}, {"name": "tool_use", "template": "tools"}],
    });
    std::fs::write(dir.join("tokenizer.json"), tokenizer).unwrap();
    std::fs::write(dir.join("tokenizer_config.json"), config.to_string()).unwrap();
    std::fs::write(dir.join("generation_config.json"), r#"{"eos_token_id": [2, 0]}"#).unwrap();
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("driftwood-tokenizer-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn hf_dir_reads_specials_template_and_eos_list() {
    let dir = temp_dir("hf");
    write_hf_dir(&dir);
    let t = Tokenizer::from_hf_dir(&dir).unwrap();
    assert_eq!(t.vocab_size(), 13);
    assert_eq!(t.bos_id(), None);
    assert_eq!(t.eog_ids(), [0, 2]);
    // The file's truncation to 2 tokens is ignored.
    assert_eq!(t.encode("<|im_start|>hello hello<|im_end|>", true).unwrap(), [1, 10, 12, 2]);
    assert_eq!(t.decode(&[1, 10, 12, 2], true).unwrap(), "hello hello");
    let chat = t.apply_chat_template(&[ChatMessage::new("user", "hello")], true).unwrap();
    assert_eq!(chat, "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n");
    // chat_template.jinja wins over tokenizer_config.json.
    std::fs::write(dir.join("chat_template.jinja"), "{{ messages | length }}").unwrap();
    let t = Tokenizer::from_hf_dir(&dir).unwrap();
    assert_eq!(t.apply_chat_template(&[ChatMessage::new("user", "x")], true).unwrap(), "1");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn hf_dir_errors_name_the_file() {
    let dir = temp_dir("hf-bad");
    let err = Tokenizer::from_hf_dir(&dir).unwrap_err().to_string();
    assert!(err.starts_with("tokenizer: cannot read ") && err.contains("tokenizer.json"), "{err}");
    std::fs::write(dir.join("tokenizer.json"), "{not json").unwrap();
    let err = Tokenizer::from_hf_dir(&dir).unwrap_err().to_string();
    assert!(err.contains("tokenizer.json is not valid"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}
