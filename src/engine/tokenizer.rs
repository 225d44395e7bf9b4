//! Text ⇄ token ids for Llama-family models, and the model's chat template.
//!
//! This file owns everything between a string and the token ids the forward pass consumes:
//! building a tokenizer from GGUF metadata (`tokenizer.ggml.*`, filled into [`GgufVocab`] by the
//! GGUF reader) or from a Hugging Face folder (`tokenizer.json` and friends), encoding with or
//! without special-token parsing, decoding (whole or streamed token by token, never splitting a
//! UTF-8 character), end-of-generation detection, rendering the model's own Jinja chat template,
//! and a stable fingerprint that snapshots store to notice a different tokenizer.
//!
//! GGUF `gpt2` vocabularies become a byte-level BPE with the pre-tokenizer split regexes that
//! llama.cpp (`src/llama-vocab.cpp`, commit 0c1e570) uses for the file's `tokenizer.ggml.pre`
//! value; GGUF `llama` (SentencePiece) vocabularies become a BPE with byte fallback whose merges
//! are derived from the token scores, which reproduces SentencePiece's highest-score-first
//! merging. Encoding runs on the `tokenizers` crate; decoding uses byte tables built here once,
//! so streamed and whole decodes agree exactly and nothing is allocated per token beyond the
//! output text.

use std::collections::HashSet;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use serde_json::Value as Json;
use sha2::{Digest, Sha256};
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::{Prepend, Replace};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, NormalizerWrapper, PreTokenizerWrapper, SplitDelimiterBehavior};

type HfTokenizer = tokenizers::Tokenizer;

/// What a GGUF file says about its tokenizer (filled by the caller from the metadata keys
/// `tokenizer.ggml.*`). Empty `token_types`/`scores` mean the key was absent.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GgufVocab {
    /// `tokenizer.ggml.model`: "gpt2" (byte-level BPE) or "llama" (SentencePiece).
    pub model: String,
    /// `tokenizer.ggml.pre`: which pre-tokenizer split regexes apply ("smollm", "llama-bpe", …).
    pub pre: Option<String>,
    pub tokens: Vec<String>,
    /// llama.cpp token types: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte.
    pub token_types: Vec<i32>,
    /// BPE merges, "left right" per entry, in priority order.
    pub merges: Vec<String>,
    pub scores: Vec<f32>,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub eot: Option<u32>,
    pub eom: Option<u32>,
    pub pad: Option<u32>,
    pub add_bos: bool,
    pub add_eos: bool,
    pub chat_template: Option<String>,
}

impl GgufVocab {
    /// What llama.cpp assumes for `add_bos` when `tokenizer.ggml.add_bos_token` is absent:
    /// true for SentencePiece vocabularies and for the Llama-3-style BPE pre-tokenizers.
    pub fn default_add_bos(model: &str, pre: Option<&str>) -> bool {
        match model {
            "llama" => true,
            "gpt2" => matches!(pre.and_then(bpe_pre_tokenizer), Some(PreTokenizer { add_bos_by_default: true, .. })),
            _ => false,
        }
    }
}

/// One chat turn handed to the model's chat template.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage { role: role.into(), content: content.into() }
    }
}

/// Everything that can go wrong building or using a tokenizer.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("tokenizer: unsupported tokenizer model '{model}', expected 'gpt2' (byte-level BPE) or 'llama' (SentencePiece)")]
    UnsupportedModel { model: String },
    #[error("tokenizer: unsupported pre-tokenizer '{pre}' for a gpt2 vocabulary, expected one llama.cpp knows (e.g. 'default', 'gpt-2', 'smollm', 'llama-bpe', 'qwen2')")]
    UnsupportedPreTokenizer { pre: String },
    #[error("tokenizer: the vocabulary is empty, expected at least one token")]
    EmptyVocabulary,
    #[error("tokenizer: {field} has {got} entries, expected {expected} (one per token)")]
    LengthMismatch { field: &'static str, got: usize, expected: usize },
    #[error("tokenizer: {name} token id {id} is out of range for a vocabulary of {size} tokens")]
    SpecialIdOutOfRange { name: &'static str, id: u32, size: usize },
    #[error("tokenizer: merge {index} '{merge}' is not two tokens separated by a space")]
    BadMerge { index: usize, merge: String },
    #[error("tokenizer: token id {id} is out of range for a vocabulary of {size} tokens")]
    IdOutOfRange { id: u32, size: usize },
    #[error("tokenizer: cannot read {}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("tokenizer: {} is not valid: {message}", path.display())]
    BadFile { path: PathBuf, message: String },
    #[error("tokenizer: cannot build the {what}: {message}")]
    Build { what: &'static str, message: String },
    #[error("tokenizer: cannot encode {len} bytes of text: {message}")]
    Encode { len: usize, message: String },
    #[error("tokenizer: the model has no chat template, expected tokenizer.chat_template in the GGUF metadata or chat_template in tokenizer_config.json / chat_template.jinja")]
    NoChatTemplate,
    #[error("tokenizer: chat template failed: {message}")]
    ChatTemplate { message: String },
}

/// What a token is, llama.cpp's `tokenizer.ggml.token_type` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TokenKind {
    Normal,
    Unknown,
    Control,
    UserDefined,
    Unused,
    Byte,
}

impl TokenKind {
    fn from_gguf(t: i32) -> TokenKind {
        match t {
            2 => TokenKind::Unknown,
            3 => TokenKind::Control,
            4 => TokenKind::UserDefined,
            5 => TokenKind::Unused,
            6 => TokenKind::Byte,
            _ => TokenKind::Normal,
        }
    }

    /// Tokens that `decode(.., skip_special = true)` leaves out.
    fn is_special(self) -> bool {
        matches!(self, TokenKind::Control | TokenKind::Unknown)
    }
}

/// How vocabulary strings spell bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PieceStyle {
    /// GPT-2 byte-to-unicode table: every byte is one printable character ("Ġ" is a space).
    ByteLevel,
    /// SentencePiece: "▁" is a space, `<0xAB>` tokens are raw bytes.
    SentencePiece,
    /// The string is the text.
    Raw,
}

/// Token texts that end a generation, as llama.cpp lists them (`special_eog_ids`). A GGUF token
/// with one of these texts is a control token whatever its stored type, as in llama.cpp.
const EOG_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<|return|>",
    "<|call|>",
    "<|flush|>",
    "<|calls|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|eom_id|>",
    "<EOT>",
    "_<EOT>",
    "[EOT]",
    "[EOS]",
    "<|end_of_text|>",
    "<end_of_utterance>",
    "<eos>",
    "<turn|>",
    "<|tool_response>",
    "<｜end▁of▁sentence｜>",
    "[e~[",
];

/// Token texts llama.cpp takes as end-of-turn when the file names none, in priority order.
const EOT_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<EOT>",
    "_<EOT>",
    "<｜end▁of▁sentence｜>",
    "<end_of_utterance>",
];

/// Bounds the work a (model-supplied, so untrusted) chat template may do.
const CHAT_TEMPLATE_FUEL: u64 = 50_000_000;

/// A loaded tokenizer. Cheap to share (`Send + Sync`); all methods take `&self`.
pub struct Tokenizer {
    /// Splits special tokens out of the text ("<|im_start|>" becomes its id).
    parse: HfTokenizer,
    /// The same model with special tokens treated as plain text, made on first use.
    literal: OnceLock<HfTokenizer>,
    /// id → vocabulary string as stored in the model.
    texts: Vec<String>,
    kinds: Vec<TokenKind>,
    /// id → the bytes the token stands for: `piece_bytes[piece_starts[id]..piece_starts[id + 1]]`.
    piece_bytes: Vec<u8>,
    piece_starts: Vec<usize>,
    /// SentencePiece models prepend a space when encoding; decoding drops it again.
    strip_leading_space: bool,
    bos: Option<u32>,
    eos: Option<u32>,
    eot: Option<u32>,
    eom: Option<u32>,
    pad: Option<u32>,
    add_bos: bool,
    add_eos: bool,
    /// Sorted, deduplicated.
    eog: Vec<u32>,
    chat_template: Option<String>,
    fingerprint: String,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.texts.len())
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("eot", &self.eot)
            .field("eom", &self.eom)
            .field("eog", &self.eog)
            .field("add_bos", &self.add_bos)
            .field("fingerprint", &self.fingerprint)
            .finish_non_exhaustive()
    }
}

/// Special ids and flags shared by both constructors.
struct Specials {
    bos: Option<u32>,
    eos: Option<u32>,
    eot: Option<u32>,
    eom: Option<u32>,
    pad: Option<u32>,
    extra_eog: Vec<u32>,
    add_bos: bool,
    add_eos: bool,
}

impl Tokenizer {
    /// Builds the tokenizer a GGUF file describes.
    pub fn from_gguf_vocab(v: GgufVocab) -> Result<Tokenizer, TokenizerError> {
        let n = v.tokens.len();
        if n == 0 {
            return Err(TokenizerError::EmptyVocabulary);
        }
        if !v.token_types.is_empty() && v.token_types.len() < n {
            return Err(TokenizerError::LengthMismatch { field: "tokenizer.ggml.token_type", got: v.token_types.len(), expected: n });
        }
        if !v.scores.is_empty() && v.scores.len() < n {
            return Err(TokenizerError::LengthMismatch { field: "tokenizer.ggml.scores", got: v.scores.len(), expected: n });
        }
        // llama.cpp renames empty tokens so that every text is unique and non-empty.
        let texts: Vec<String> = v.tokens.into_iter().enumerate().map(|(i, t)| if t.is_empty() { format!("[EMPTY_{i}]") } else { t }).collect();
        let kinds: Vec<TokenKind> = (0..n)
            .map(|i| match v.token_types.get(i) {
                _ if EOG_TEXTS.contains(&texts[i].as_str()) => TokenKind::Control,
                Some(&t) => TokenKind::from_gguf(t),
                None => TokenKind::Normal,
            })
            .collect();

        let (mut bos, mut eos) = (v.bos, v.eos);
        if v.model == "llama" {
            // llama.cpp's SentencePiece defaults when the file names none.
            bos = bos.or(Some(1).filter(|&id| (id as usize) < n));
            eos = eos.or(Some(2).filter(|&id| (id as usize) < n));
        }
        // BOS/EOS out of range would put bad ids into every prompt: refuse. The optional ids are
        // dropped instead, as llama.cpp does, so a bad pad id does not make a model unloadable.
        for (name, id) in [("bos", bos), ("eos", eos)] {
            if let Some(id) = id {
                if id as usize >= n {
                    return Err(TokenizerError::SpecialIdOutOfRange { name, id, size: n });
                }
            }
        }
        let in_range = |id: Option<u32>| id.filter(|&id| (id as usize) < n);
        let (eot, eom, pad) = (in_range(v.eot), in_range(v.eom), in_range(v.pad));

        let (mut model, style, strip_leading_space) = match v.model.as_str() {
            "gpt2" => {
                let pre_name = v.pre.as_deref().filter(|p| !p.is_empty()).unwrap_or("default");
                let pre = bpe_pre_tokenizer(pre_name).ok_or_else(|| TokenizerError::UnsupportedPreTokenizer { pre: pre_name.to_string() })?;
                (build_gguf_bpe(&texts, &v.merges, &pre)?, PieceStyle::ByteLevel, false)
            }
            "llama" => (build_gguf_spm(&texts, &kinds, &v.scores)?, PieceStyle::SentencePiece, true),
            other => return Err(TokenizerError::UnsupportedModel { model: other.to_string() }),
        };
        add_gguf_special_tokens(&mut model, &texts, &kinds);

        let eot = eot.or_else(|| find_first_text(&texts, EOT_TEXTS));
        let eom = eom.or_else(|| find_first_text(&texts, &["<|eom_id|>"]));
        let specials = Specials { bos, eos, eot, eom, pad, extra_eog: Vec::new(), add_bos: v.add_bos, add_eos: v.add_eos };
        let fingerprint = fingerprint(&texts, v.merges.iter().map(String::as_str), &specials);
        Tokenizer::assemble(model, texts, kinds, style, strip_leading_space, specials, v.chat_template, fingerprint)
    }

    /// Loads a Hugging Face tokenizer folder: `tokenizer.json`, plus `tokenizer_config.json`
    /// (chat template, bos/eos/pad tokens, `add_bos_token`), `chat_template.jinja`,
    /// `generation_config.json` (`eos_token_id` may be a list) and `config.json` where present.
    pub fn from_hf_dir(dir: &Path) -> Result<Tokenizer, TokenizerError> {
        let tokenizer_path = dir.join("tokenizer.json");
        let raw = read_file(&tokenizer_path)?;
        let tokenizer_json: Json = parse_json(&tokenizer_path, &raw)?;
        let mut model = HfTokenizer::from_bytes(&raw).map_err(|e| TokenizerError::BadFile { path: tokenizer_path.clone(), message: e.to_string() })?;
        model.with_truncation(None).map_err(|e| TokenizerError::BadFile { path: tokenizer_path.clone(), message: e.to_string() })?;
        model.with_padding(None);

        let config = read_optional_json(&dir.join("tokenizer_config.json"))?;
        let generation = read_optional_json(&dir.join("generation_config.json"))?;
        let model_config = read_optional_json(&dir.join("config.json"))?;

        // id → text over the model vocabulary and the added tokens.
        let vocab = model.get_vocab(true);
        let size = vocab.values().max().map_or(0, |&m| m as usize + 1);
        if size == 0 {
            return Err(TokenizerError::EmptyVocabulary);
        }
        // Ids index tables here; a file claiming id 4e9 for a small vocabulary is not honoured.
        if size > vocab.len().saturating_mul(2).max(1024) {
            return Err(TokenizerError::BadFile {
                path: tokenizer_path,
                message: format!("token ids reach {} for {} tokens, expected ids close to 0..{}", size - 1, vocab.len(), vocab.len()),
            });
        }
        let mut texts = vec![String::new(); size];
        let mut present = vec![false; size];
        for (text, &id) in &vocab {
            texts[id as usize] = text.clone();
            present[id as usize] = true;
        }

        let style = hf_piece_style(&tokenizer_json);
        let byte_fallback = tokenizer_json.pointer("/model/byte_fallback").and_then(Json::as_bool).unwrap_or(false);
        let unk_text = tokenizer_json.pointer("/model/unk_token").and_then(Json::as_str);
        let mut kinds: Vec<TokenKind> = (0..size)
            .map(|id| {
                let text = &texts[id];
                if !present[id] {
                    TokenKind::Unused
                } else if Some(text.as_str()) == unk_text {
                    TokenKind::Unknown
                } else if byte_fallback && parse_byte_token(text).is_some() {
                    TokenKind::Byte
                } else {
                    TokenKind::Normal
                }
            })
            .collect();
        for (id, token) in model.get_added_tokens_decoder() {
            if let Some(kind) = kinds.get_mut(id as usize) {
                *kind = if token.special { TokenKind::Control } else { TokenKind::UserDefined };
            }
        }

        // Special tokens: tokenizer_config names them by text; the JSON configs by id.
        let id_of = |key: &str| -> Option<u32> { config.as_ref().and_then(|c| c.get(key)).and_then(token_content).and_then(|t| vocab.get(t).copied()) };
        let ids_in = |json: &Option<Json>, key: &str| -> Vec<u32> { json.as_ref().and_then(|j| j.get(key)).map(json_ids).unwrap_or_default() };
        let bos = id_of("bos_token")
            .or_else(|| ids_in(&generation, "bos_token_id").first().copied())
            .or_else(|| ids_in(&model_config, "bos_token_id").first().copied());
        let mut extra_eog = ids_in(&generation, "eos_token_id");
        extra_eog.extend(ids_in(&model_config, "eos_token_id"));
        extra_eog.retain(|&id| (id as usize) < size);
        let eos = id_of("eos_token").or_else(|| extra_eog.first().copied());
        let pad = id_of("pad_token").or_else(|| ids_in(&generation, "pad_token_id").first().copied());
        let eot = find_first_text(&texts, EOT_TEXTS);
        let eom = find_first_text(&texts, &["<|eom_id|>"]);
        for (name, id) in [("bos", bos), ("eos", eos)] {
            if let Some(id) = id {
                if id as usize >= size {
                    return Err(TokenizerError::SpecialIdOutOfRange { name, id, size });
                }
            }
        }
        let pad = pad.filter(|&id| (id as usize) < size);

        // add_bos/add_eos: the config's flag where given, else whatever the post-processor adds.
        let flag = |key: &str| config.as_ref().and_then(|c| c.get(key)).and_then(Json::as_bool);
        let probe = |add: bool| model.encode("a", add).map(|e| e.get_ids().to_vec()).unwrap_or_default();
        let (with, without) = (probe(true), probe(false));
        let add_bos = flag("add_bos_token").unwrap_or_else(|| bos.is_some() && with.first() == bos.as_ref() && without.first() != bos.as_ref());
        let add_eos = flag("add_eos_token").unwrap_or_else(|| eos.is_some() && with.last() == eos.as_ref() && without.last() != eos.as_ref());

        let chat_template = read_hf_chat_template(dir, config.as_ref())?;
        let strip_leading_space = style == PieceStyle::SentencePiece && hf_strips_leading_space(&tokenizer_json);
        let merges = hf_merges(&tokenizer_json);
        let specials = Specials { bos, eos, eot, eom, pad, extra_eog, add_bos, add_eos };
        let fingerprint = fingerprint(&texts, merges.iter().map(String::as_str), &specials);
        Tokenizer::assemble(model, texts, kinds, style, strip_leading_space, specials, chat_template, fingerprint)
    }

    #[allow(clippy::too_many_arguments)]
    fn assemble(
        parse: HfTokenizer,
        texts: Vec<String>,
        kinds: Vec<TokenKind>,
        style: PieceStyle,
        strip_leading_space: bool,
        specials: Specials,
        chat_template: Option<String>,
        fingerprint: String,
    ) -> Result<Tokenizer, TokenizerError> {
        let byte_decoder = byte_decoder();
        let mut piece_bytes = Vec::new();
        let mut piece_starts = Vec::with_capacity(texts.len() + 1);
        for (text, &kind) in texts.iter().zip(&kinds) {
            piece_starts.push(piece_bytes.len());
            append_piece_bytes(&mut piece_bytes, text, kind, style, &byte_decoder);
        }
        piece_starts.push(piece_bytes.len());

        let mut eog: Vec<u32> = texts.iter().enumerate().filter(|(_, t)| EOG_TEXTS.contains(&t.as_str())).map(|(id, _)| id as u32).collect();
        eog.extend([specials.eos, specials.eot, specials.eom].into_iter().flatten());
        eog.extend(&specials.extra_eog);
        eog.sort_unstable();
        eog.dedup();

        Ok(Tokenizer {
            parse,
            literal: OnceLock::new(),
            texts,
            kinds,
            piece_bytes,
            piece_starts,
            strip_leading_space,
            bos: specials.bos,
            eos: specials.eos,
            eot: specials.eot,
            eom: specials.eom,
            pad: specials.pad,
            add_bos: specials.add_bos,
            add_eos: specials.add_eos,
            eog,
            chat_template,
            fingerprint,
        })
    }

    /// Text to ids. Prepends BOS when the model asks for it (`add_bos`) and the text does not
    /// already start with it, and appends EOS when the model asks for that. With
    /// `parse_special`, special-token texts such as "<|im_start|>" become their ids; without,
    /// they are tokenized as ordinary text (user-defined tokens are always matched).
    pub fn encode(&self, text: &str, parse_special: bool) -> Result<Vec<u32>, TokenizerError> {
        let model = if parse_special {
            &self.parse
        } else {
            self.literal.get_or_init(|| {
                let mut literal = self.parse.clone();
                literal.set_encode_special_tokens(true);
                literal
            })
        };
        let encoding = model.encode(text, false).map_err(|e| TokenizerError::Encode { len: text.len(), message: e.to_string() })?;
        let body = encoding.get_ids();
        let mut ids = Vec::with_capacity(body.len() + 2);
        if let Some(bos) = self.bos.filter(|_| self.add_bos) {
            if body.first() != Some(&bos) {
                ids.push(bos);
            }
        }
        ids.extend_from_slice(body);
        if let Some(eos) = self.eos.filter(|_| self.add_eos) {
            ids.push(eos);
        }
        Ok(ids)
    }

    /// Ids to text. `skip_special` leaves out control tokens (BOS, EOS, "<|im_end|>", …).
    /// Invalid UTF-8 (e.g. a multi-byte character cut off at the end) becomes U+FFFD.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String, TokenizerError> {
        let mut bytes = Vec::with_capacity(ids.len() * 4);
        let mut started = false;
        for &id in ids {
            let piece = self.piece(id, skip_special).ok_or(TokenizerError::IdOutOfRange { id, size: self.texts.len() })?;
            if piece.is_empty() {
                continue;
            }
            bytes.extend_from_slice(if started { piece } else { self.strip_start(piece) });
            started = true;
        }
        Ok(match String::from_utf8(bytes) {
            Ok(s) => s,
            Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
        })
    }

    /// A decoder fed one id at a time that emits text only once whole UTF-8 characters are
    /// available. Control tokens are skipped, as with `decode(ids, true)`; concatenating
    /// everything it emits (and its final `flush`) equals that decode.
    pub fn stream_decoder(&self) -> StreamDecoder<'_> {
        StreamDecoder { tokenizer: self, pending: Vec::new(), started: false }
    }

    /// Number of token ids (the largest id + 1).
    pub fn vocab_size(&self) -> usize {
        self.texts.len()
    }

    pub fn bos_id(&self) -> Option<u32> {
        self.bos
    }

    pub fn eos_id(&self) -> Option<u32> {
        self.eos
    }

    pub fn pad_id(&self) -> Option<u32> {
        self.pad
    }

    /// Whether BOS is prepended by `encode`.
    pub fn add_bos(&self) -> bool {
        self.add_bos
    }

    /// True for EOS, EOT, EOM and the tokens the model marks as ending a turn
    /// ("<|im_end|>", "<|eot_id|>", generation_config's `eos_token_id` list, …).
    pub fn is_end_of_generation(&self, id: u32) -> bool {
        self.eog.binary_search(&id).is_ok()
    }

    /// The end-of-generation ids, sorted.
    pub fn eog_ids(&self) -> &[u32] {
        &self.eog
    }

    /// The token's vocabulary entry as stored in the model (byte-level BPE spells a space "Ġ",
    /// SentencePiece "▁"); `decode(&[id], false)` gives its text. `None` for ids outside the
    /// vocabulary and for holes in a Hugging Face vocabulary's id range.
    pub fn token_text(&self, id: u32) -> Option<String> {
        self.texts.get(id as usize).filter(|t| !t.is_empty()).cloned()
    }

    /// Renders the model's own Jinja chat template the way `transformers` does (trim_blocks,
    /// lstrip_blocks, `bos_token`/`eos_token`, `raise_exception`, `strftime_now`, Python string
    /// methods). The result is meant for `encode(text, true)`.
    pub fn apply_chat_template(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String, TokenizerError> {
        let source = self.chat_template.as_deref().ok_or(TokenizerError::NoChatTemplate)?;
        let text_of = |id: Option<u32>| id.and_then(|id| self.texts.get(id as usize)).cloned().unwrap_or_default();
        render_chat_template(source, messages, add_generation_prompt, &text_of(self.bos), &text_of(self.eos), &text_of(self.pad))
    }

    /// Whether the model ships a chat template.
    pub fn has_chat_template(&self) -> bool {
        self.chat_template.is_some()
    }

    /// Hex SHA-256 over the vocabulary (id order), the merges and the special ids.
    pub fn fingerprint(&self) -> String {
        self.fingerprint.clone()
    }

    /// The bytes `id` decodes to, `None` if out of range.
    fn piece(&self, id: u32, skip_special: bool) -> Option<&[u8]> {
        let i = id as usize;
        let kind = *self.kinds.get(i)?;
        if skip_special && kind.is_special() {
            return Some(&[]);
        }
        Some(&self.piece_bytes[self.piece_starts[i]..self.piece_starts[i + 1]])
    }

    /// Drops the space a SentencePiece model put in front of the text.
    fn strip_start<'p>(&self, piece: &'p [u8]) -> &'p [u8] {
        match piece {
            [b' ', rest @ ..] if self.strip_leading_space => rest,
            _ => piece,
        }
    }
}

/// Incremental decoder from [`Tokenizer::stream_decoder`].
pub struct StreamDecoder<'t> {
    tokenizer: &'t Tokenizer,
    /// Bytes of an incomplete UTF-8 character (at most 3).
    pending: Vec<u8>,
    /// Whether any byte has been produced (the SentencePiece leading space is dropped once).
    started: bool,
}

impl StreamDecoder<'_> {
    /// Feeds one token; returns the text that became complete, if any. Ids outside the
    /// vocabulary (a model's padded embedding rows) produce nothing.
    pub fn push(&mut self, id: u32) -> Option<String> {
        let piece = self.tokenizer.piece(id, true)?;
        if piece.is_empty() {
            return None;
        }
        let piece = if self.started { piece } else { self.tokenizer.strip_start(piece) };
        self.started = true;
        self.pending.extend_from_slice(piece);
        let mut out = String::new();
        let mut rest: &[u8] = &self.pending;
        loop {
            match std::str::from_utf8(rest) {
                Ok(s) => {
                    out.push_str(s);
                    rest = &[];
                    break;
                }
                Err(e) => {
                    let (valid, after) = rest.split_at(e.valid_up_to());
                    // `valid` is the prefix from_utf8 just vouched for; this cannot fail.
                    out.push_str(std::str::from_utf8(valid).unwrap_or_default());
                    match e.error_len() {
                        // An invalid sequence: replace it, as a whole decode would.
                        Some(bad) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            rest = &after[bad..];
                        }
                        // A character still being completed: keep its bytes for later.
                        None => {
                            rest = after;
                            break;
                        }
                    }
                }
            }
        }
        let keep = rest.len();
        let drain_to = self.pending.len() - keep;
        self.pending.drain(..drain_to);
        (!out.is_empty()).then_some(out)
    }

    /// Emits whatever is left (an unfinished character becomes U+FFFD) and resets.
    pub fn flush(&mut self) -> Option<String> {
        if self.pending.is_empty() {
            return None;
        }
        let out = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        Some(out)
    }
}

// ---------------------------------------------------------------------------------------------
// GGUF vocabularies

/// A llama.cpp BPE pre-tokenizer: split regexes applied in turn, each piece split again.
struct PreTokenizer {
    regexes: &'static [&'static str],
    /// A word that is itself a token is emitted whole, without merging (llama.cpp `ignore_merges`).
    ignore_merges: bool,
    add_bos_by_default: bool,
}

const GPT2_SPLIT: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
const LLAMA3_SPLIT: &str =
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_SPLIT: &str =
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN35_SPLIT: &str =
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
// The original tokenizer.json patterns: fancy-regex has the Unicode classes std::regex lacks.
const TEKKEN_SPLIT: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const GPT4O_SPLIT: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const SEED_CODER_SPLIT: &str =
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1}| ?[^\s\p{L}\p{N}\r\n]+|\s*[\r\n]+|\s+(?!\S)|\s+";
const BAILING_SPLIT: &str = r"'(?:[sSdDmMtT]|[lL][lL]|[vV][eE]|[rR][eE])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+";
const MINICPM5_SPLIT: &str =
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}+| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const DEEPSEEK3_SPLIT: &str =
    r##"[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"##;
const BLOOM_SPLIT: &str = r" ?[^(\s|.,!?…。，、।۔،)]+";

/// The split regexes llama.cpp (`llm_tokenizer_bpe`) uses for a `tokenizer.ggml.pre` value.
fn bpe_pre_tokenizer(pre: &str) -> Option<PreTokenizer> {
    let p = |regexes, ignore_merges, add_bos_by_default| PreTokenizer { regexes, ignore_merges, add_bos_by_default };
    Some(match pre {
        "default" => p(&[r"[\p{P}\$\+<=>\^~\|]+", GPT2_SPLIT, r"\p{N}+", r"[0-9][0-9][0-9]"], false, false),
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "midm-2.0" | "lfm2" | "jina-v5-nano" => p(&[LLAMA3_SPLIT], true, true),
        "dbrx" | "smaug-bpe" | "chatglm-bpe" => p(&[LLAMA3_SPLIT], false, false),
        "glm4" | "glm5" => p(&[LLAMA3_SPLIT], true, false),
        "deepseek-coder" => p(&[r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", r"[一-龥ࠀ-一가-퟿]+", r"\p{N}"], false, false),
        "deepseek-v3" | "hunyuan-dense" | "joyai-llm" | "hy_v4" => p(&[r"\p{N}{1,3}", r"[一-龥぀-ゟ゠-ヿ]+", DEEPSEEK3_SPLIT], false, false),
        "falcon" => p(&[r"[\p{P}\$\+<=>\^~\|`]+", GPT2_SPLIT, r"[0-9][0-9][0-9]"], false, false),
        "starcoder" | "refact" | "command-r" | "smollm" | "codeshell" | "exaone" | "minerva-7b" | "mellum2" => p(&[r"\p{N}", GPT2_SPLIT], false, false),
        "gpt-2" | "phi-2" | "jina-es" | "jina-de" | "gigachat" | "jina-v2-es" | "jina-v2-de" | "a.x-4.0" | "mellum" | "modern-bert" | "mpt" | "olmo"
        | "jais" | "trillion" | "granite-docling" | "exaone4" | "jina-v1-en" | "jina-v2-code" | "roberta-bpe" => p(&[GPT2_SPLIT], false, false),
        "qwen2" | "deepseek-r1-qwen" | "kormo" | "f2llmv2" | "megrez" | "stablelm2" | "hunyuan" | "solar-open" | "grok-2" => p(&[QWEN2_SPLIT], false, false),
        "qwen35" => p(&[QWEN35_SPLIT], false, false),
        "poro-chat" | "bloom" | "gpt3-finnish" => p(&[BLOOM_SPLIT], false, false),
        "viking" => p(&[BLOOM_SPLIT, r"\p{N}"], false, false),
        "tekken" => p(&[TEKKEN_SPLIT], true, true),
        "gpt-4o" | "llama4" | "kanana2" | "talkie" | "minimax-m2" => p(&[GPT4O_SPLIT], false, false),
        "seed-coder" => p(&[SEED_CODER_SPLIT], false, false),
        "bailingmoe" | "bailingmoe2" | "llada-moe" => p(&[BAILING_SPLIT], false, false),
        "minicpm5" => p(&[r"\p{N}{1,3}", MINICPM5_SPLIT], true, false),
        _ => return None,
    })
}

/// Byte-level BPE from GGUF tokens and merges, pre-tokenized like llama.cpp.
fn build_gguf_bpe(texts: &[String], merges: &[String], pre: &PreTokenizer) -> Result<HfTokenizer, TokenizerError> {
    // llama.cpp keeps the first rank of a repeated merge.
    let mut seen = HashSet::with_capacity(merges.len());
    let mut pairs = Vec::with_capacity(merges.len());
    for (index, merge) in merges.iter().enumerate() {
        // llama.cpp splits at the first space after the first byte, so " x" style tokens survive.
        let split = merge.bytes().skip(1).position(|b| b == b' ').map(|p| p + 1).ok_or_else(|| TokenizerError::BadMerge { index, merge: merge.clone() })?;
        if seen.insert(merge.as_str()) {
            pairs.push((merge[..split].to_string(), merge[split + 1..].to_string()));
        }
    }
    let build = |vocab: Vocab, pairs: Vec<(String, String)>| {
        BPE::builder()
            .vocab_and_merges(vocab, pairs)
            .ignore_merges(pre.ignore_merges)
            .build()
            .map_err(|e| TokenizerError::Build { what: "BPE model", message: e.to_string() })
    };
    let bpe = match build(vocab_map(texts), pairs) {
        Ok(bpe) => bpe,
        // A merge over tokens the vocabulary lacks can never apply (llama.cpp keeps it inert):
        // drop such merges rather than refuse the file. Only malformed files pay for this pass.
        Err(_) => {
            let vocab = vocab_map(texts);
            let mut seen = HashSet::with_capacity(merges.len());
            let mut joined = String::new();
            let mut pairs = Vec::with_capacity(merges.len());
            for merge in merges {
                if let Some(split) = merge.bytes().skip(1).position(|b| b == b' ').map(|p| p + 1) {
                    let (left, right) = (&merge[..split], &merge[split + 1..]);
                    joined.clear();
                    joined.push_str(left);
                    joined.push_str(right);
                    let known = vocab.contains_key(left) && vocab.contains_key(right) && vocab.contains_key(&joined);
                    if known && seen.insert(merge.as_str()) {
                        pairs.push((left.to_string(), right.to_string()));
                    }
                }
            }
            build(vocab, pairs)?
        }
    };

    let mut steps: Vec<PreTokenizerWrapper> = Vec::with_capacity(pre.regexes.len() + 1);
    for regex in pre.regexes {
        let split = Split::new(SplitPattern::Regex((*regex).to_string()), SplitDelimiterBehavior::Isolated, false)
            .map_err(|e| TokenizerError::Build { what: "pre-tokenizer regex", message: format!("{regex}: {e}") })?;
        steps.push(split.into());
    }
    steps.push(ByteLevel::new(false, false, false).into());
    let mut tokenizer = HfTokenizer::new(bpe);
    tokenizer.with_pre_tokenizer(Some(PreSequence::new(steps)));
    tokenizer.with_decoder(Some(ByteLevel::default()));
    Ok(tokenizer)
}

/// SentencePiece from GGUF tokens and scores: a byte-fallback BPE whose merges are every
/// (left, right) pair of tokens that joins into a token, ranked by the joined token's score —
/// the order in which SentencePiece (and llama.cpp's `llm_tokenizer_spm`) merges.
fn build_gguf_spm(texts: &[String], kinds: &[TokenKind], scores: &[f32]) -> Result<HfTokenizer, TokenizerError> {
    let vocab = vocab_map(texts);
    let score = |id: usize| scores.get(id).copied().unwrap_or(0.0);
    let mut ranked: Vec<(f32, u32, String, String)> = Vec::new();
    for (id, text) in texts.iter().enumerate() {
        if kinds[id] == TokenKind::Byte || vocab.get(text) != Some(&(id as u32)) {
            continue;
        }
        for (split, _) in text.char_indices().skip(1) {
            let (left, right) = text.split_at(split);
            if vocab.contains_key(left) && vocab.contains_key(right) {
                ranked.push((score(id), id as u32, left.to_string(), right.to_string()));
            }
        }
    }
    // Highest score first; ties by id, then by the left piece's length (longest first).
    ranked.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(b.2.len().cmp(&a.2.len())));
    let merges: Vec<(String, String)> = ranked.into_iter().map(|(_, _, l, r)| (l, r)).collect();

    let unk =
        kinds.iter().position(|&k| k == TokenKind::Unknown).map(|id| texts[id].clone()).or_else(|| vocab.contains_key("<unk>").then(|| "<unk>".to_string()));
    let mut builder = BPE::builder().vocab_and_merges(vocab, merges).byte_fallback(true).fuse_unk(true);
    if let Some(unk) = unk {
        builder = builder.unk_token(unk);
    }
    let bpe = builder.build().map_err(|e| TokenizerError::Build { what: "SentencePiece model", message: e.to_string() })?;
    let mut tokenizer = HfTokenizer::new(bpe);
    // llama.cpp escapes spaces and prepends one to every text fragment (the first, and each one
    // after a special token); a normalizer runs per fragment between added tokens, just so.
    let prepend: NormalizerWrapper = Prepend::new("▁".to_string()).into();
    let escape: NormalizerWrapper =
        Replace::new(" ", "▁").map_err(|e| TokenizerError::Build { what: "SentencePiece normalizer", message: e.to_string() })?.into();
    tokenizer.with_normalizer(Some(tokenizers::normalizers::Sequence::new(vec![prepend, escape])));
    Ok(tokenizer)
}

/// text → id; llama.cpp keeps the last id of a duplicated text.
fn vocab_map(texts: &[String]) -> Vocab {
    texts.iter().enumerate().map(|(id, t)| (t.clone(), id as u32)).collect()
}

/// Registers control and unknown tokens as special (parsed only with `parse_special`) and
/// user-defined tokens as always-parsed added tokens, all matched on the raw text before
/// normalization, as llama.cpp's `tokenizer_st_partition` does.
fn add_gguf_special_tokens(tokenizer: &mut HfTokenizer, texts: &[String], kinds: &[TokenKind]) {
    let added = |wanted: &dyn Fn(TokenKind) -> bool, special: bool| -> Vec<AddedToken> {
        texts.iter().zip(kinds).filter(|(_, &k)| wanted(k)).map(|(t, _)| AddedToken::from(t.clone(), special).normalized(false)).collect()
    };
    tokenizer.add_special_tokens(&added(&|k| k.is_special(), true));
    tokenizer.add_tokens(&added(&|k| k == TokenKind::UserDefined, false));
}

fn find_first_text(texts: &[String], candidates: &[&str]) -> Option<u32> {
    candidates.iter().find_map(|c| texts.iter().position(|t| t == c)).map(|id| id as u32)
}

// ---------------------------------------------------------------------------------------------
// Decoding tables

/// GPT-2's byte-to-unicode table, inverted: `table[c]` is the byte that printable character `c`
/// stands for. Printable bytes map to themselves, the other 68 to U+0100.. in byte order, so
/// every character of the table is below U+0144.
fn byte_decoder() -> [Option<u8>; 0x144] {
    let mut table = [None; 0x144];
    let mut next = 0x100;
    for b in 0..=255u8 {
        if matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF) {
            table[usize::from(b)] = Some(b);
        } else {
            table[next] = Some(b);
            next += 1;
        }
    }
    table
}

/// `<0xAB>` → 0xAB.
fn parse_byte_token(text: &str) -> Option<u8> {
    let hex = text.strip_prefix("<0x")?.strip_suffix('>')?;
    (hex.len() == 2).then(|| u8::from_str_radix(hex, 16).ok()).flatten()
}

fn append_piece_bytes(out: &mut Vec<u8>, text: &str, kind: TokenKind, style: PieceStyle, bytes: &[Option<u8>]) {
    match (kind, style) {
        // Control and user-defined tokens are stored as their literal text.
        (TokenKind::Control | TokenKind::UserDefined | TokenKind::Unknown, _) | (_, PieceStyle::Raw) => out.extend_from_slice(text.as_bytes()),
        (_, PieceStyle::ByteLevel) => {
            for c in text.chars() {
                match bytes.get(c as usize).copied().flatten() {
                    Some(b) => out.push(b),
                    // Not a byte-level character: keep it as it is rather than lose it.
                    None => out.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes()),
                }
            }
        }
        (TokenKind::Byte, PieceStyle::SentencePiece) => match parse_byte_token(text) {
            Some(b) => out.push(b),
            None => out.extend_from_slice(text.as_bytes()),
        },
        (_, PieceStyle::SentencePiece) => {
            for c in text.chars() {
                let c = if c == '▁' { ' ' } else { c };
                out.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes());
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Hugging Face folders

fn read_file(path: &Path) -> Result<Vec<u8>, TokenizerError> {
    std::fs::read(path).map_err(|source| TokenizerError::Io { path: path.to_path_buf(), source })
}

fn parse_json(path: &Path, bytes: &[u8]) -> Result<Json, TokenizerError> {
    serde_json::from_slice(bytes).map_err(|e| TokenizerError::BadFile { path: path.to_path_buf(), message: e.to_string() })
}

fn read_optional_json(path: &Path) -> Result<Option<Json>, TokenizerError> {
    match std::fs::read(path) {
        Ok(bytes) => parse_json(path, &bytes).map(Some),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(TokenizerError::Io { path: path.to_path_buf(), source }),
    }
}

/// A token named in tokenizer_config.json: a string or an `AddedToken` object with `content`.
fn token_content(v: &Json) -> Option<&str> {
    v.as_str().or_else(|| v.get("content").and_then(Json::as_str))
}

/// An id or a list of ids (`eos_token_id: [128001, 128008, 128009]`).
fn json_ids(v: &Json) -> Vec<u32> {
    let one = |v: &Json| v.as_u64().and_then(|id| u32::try_from(id).ok());
    match v {
        Json::Array(items) => items.iter().filter_map(one).collect(),
        other => one(other).into_iter().collect(),
    }
}

/// `chat_template.jinja` wins over tokenizer_config.json's `chat_template`, which is a string
/// or a list of named templates (the one named "default" is used).
fn read_hf_chat_template(dir: &Path, config: Option<&Json>) -> Result<Option<String>, TokenizerError> {
    let jinja = dir.join("chat_template.jinja");
    match std::fs::read_to_string(&jinja) {
        Ok(text) => return Ok(Some(text)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => return Err(TokenizerError::Io { path: jinja, source }),
    }
    let Some(template) = config.and_then(|c| c.get("chat_template")) else {
        return Ok(None);
    };
    Ok(match template {
        Json::String(s) => Some(s.clone()),
        Json::Array(named) => named
            .iter()
            .find(|t| t.get("name").and_then(Json::as_str) == Some("default"))
            .and_then(|t| t.get("template"))
            .and_then(Json::as_str)
            .map(str::to_string),
        _ => None,
    })
}

/// Collects the types of a decoder and its nested `Sequence` members.
fn decoder_types(decoder: &Json, out: &mut Vec<String>) {
    if let Some(t) = decoder.get("type").and_then(Json::as_str) {
        out.push(t.to_string());
        if t == "Replace" && decoder.pointer("/pattern/String").and_then(Json::as_str) == Some("▁") {
            out.push("ReplaceMetaspace".to_string());
        }
    }
    if let Some(items) = decoder.get("decoders").and_then(Json::as_array) {
        for item in items {
            decoder_types(item, out);
        }
    }
}

fn hf_piece_style(tokenizer_json: &Json) -> PieceStyle {
    let mut types = Vec::new();
    if let Some(decoder) = tokenizer_json.get("decoder") {
        decoder_types(decoder, &mut types);
    }
    let has = |t: &str| types.iter().any(|x| x == t);
    if has("ByteLevel") {
        PieceStyle::ByteLevel
    } else if has("Metaspace") || has("ByteFallback") || has("ReplaceMetaspace") {
        PieceStyle::SentencePiece
    } else {
        PieceStyle::Raw
    }
}

/// SentencePiece decoders drop the space the normalizer prepended (a `Strip` step, or a
/// `Metaspace` decoder that prepends).
fn hf_strips_leading_space(tokenizer_json: &Json) -> bool {
    let Some(decoder) = tokenizer_json.get("decoder") else {
        return false;
    };
    let mut stack = vec![decoder];
    while let Some(d) = stack.pop() {
        let strips = match d.get("type").and_then(Json::as_str) {
            Some("Strip") => d.get("start").and_then(Json::as_u64).unwrap_or(0) > 0,
            Some("Metaspace") => {
                let scheme = d.get("prepend_scheme").and_then(Json::as_str);
                let legacy = d.get("add_prefix_space").and_then(Json::as_bool);
                scheme.map_or(legacy.unwrap_or(true), |s| s != "never")
            }
            _ => false,
        };
        if strips {
            return true;
        }
        if let Some(items) = d.get("decoders").and_then(Json::as_array) {
            stack.extend(items);
        }
    }
    false
}

/// The model's merges as "left right" strings, whichever of the two JSON spellings is used.
fn hf_merges(tokenizer_json: &Json) -> Vec<String> {
    let Some(merges) = tokenizer_json.pointer("/model/merges").and_then(Json::as_array) else {
        return Vec::new();
    };
    merges
        .iter()
        .filter_map(|m| match m {
            Json::String(s) => Some(s.clone()),
            Json::Array(pair) => match pair.as_slice() {
                [Json::String(a), Json::String(b)] => Some(format!("{a} {b}")),
                _ => None,
            },
            _ => None,
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Fingerprint

fn fingerprint<'m>(texts: &[String], merges: impl Iterator<Item = &'m str>, s: &Specials) -> String {
    let mut h = Sha256::new();
    let mut put = |bytes: &[u8]| {
        h.update((bytes.len() as u64).to_le_bytes());
        h.update(bytes);
    };
    put(b"driftwood-tokenizer-v1");
    put(&(texts.len() as u64).to_le_bytes());
    for t in texts {
        put(t.as_bytes());
    }
    put(b"merges");
    for m in merges {
        put(m.as_bytes());
    }
    put(b"specials");
    for id in [s.bos, s.eos, s.eot, s.eom, s.pad] {
        put(&id.map_or(-1i64, i64::from).to_le_bytes());
    }
    h.finalize().iter().fold(String::with_capacity(64), |mut out, b| {
        let _ = write!(out, "{b:02x}");
        out
    })
}

// ---------------------------------------------------------------------------------------------
// Chat templates

fn render_chat_template(
    source: &str,
    messages: &[ChatMessage],
    add_generation_prompt: bool,
    bos_token: &str,
    eos_token: &str,
    pad_token: &str,
) -> Result<String, TokenizerError> {
    use minijinja::{Environment, Error, ErrorKind};

    let mut env = Environment::new();
    // transformers renders with trim_blocks and lstrip_blocks.
    let syntax = minijinja::syntax::SyntaxConfig::builder()
        .trim_blocks(true)
        .lstrip_blocks(true)
        .build()
        .map_err(|e| TokenizerError::ChatTemplate { message: describe_template_error(&e) })?;
    env.set_syntax(syntax);
    env.set_fuel(Some(CHAT_TEMPLATE_FUEL));
    minijinja_contrib::add_to_environment(&mut env);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function("raise_exception", |message: String| -> Result<String, Error> {
        Err(Error::new(ErrorKind::InvalidOperation, format!("template raised an exception: {message}")))
    });
    env.add_function("strftime_now", |format: String| -> String {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
        strftime_utc(&format, now)
    });
    let messages: Vec<minijinja::Value> =
        messages.iter().map(|m| minijinja::Value::from_pairs([("role", m.role.as_str()), ("content", m.content.as_str())])).collect();
    let template = env.template_from_str(source).map_err(|e| TokenizerError::ChatTemplate { message: describe_template_error(&e) })?;
    template
        .render(minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => bos_token,
            eos_token => eos_token,
            pad_token => pad_token,
        })
        .map_err(|e| TokenizerError::ChatTemplate { message: describe_template_error(&e) })
}

fn describe_template_error(e: &minijinja::Error) -> String {
    let mut message = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        let _ = write!(message, ": {s}");
        source = s.source();
    }
    message
}

/// `strftime` over UTC for the directives chat templates use (`%d %b %Y`, `%Y-%m-%d`, …);
/// `%-d` style drops zero padding as glibc does. Unknown directives are kept verbatim.
fn strftime_utc(format: &str, unix_secs: i64) -> String {
    const MONTHS: [&str; 12] = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October", "November", "December"];
    const DAYS: [&str; 7] = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"];
    let days = unix_secs.div_euclid(86_400);
    let secs = unix_secs.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    let weekday = (days + 3).rem_euclid(7) as usize; // 1970-01-01 was a Thursday
    let (hour, minute, second) = (secs / 3600, secs / 60 % 60, secs % 60);
    let day_of_year = days - days_from_civil(year, 1, 1) + 1;

    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let mut spec = chars.next();
        let unpadded = spec == Some('-');
        if unpadded {
            spec = chars.next();
        }
        let num = |out: &mut String, v: i64, width: usize| {
            let _ = if unpadded { write!(out, "{v}") } else { write!(out, "{v:0width$}") };
        };
        match spec {
            Some('Y') => num(&mut out, year, 4),
            Some('y') => num(&mut out, year.rem_euclid(100), 2),
            Some('m') => num(&mut out, month as i64, 2),
            Some('d') => num(&mut out, day as i64, 2),
            Some('e') => {
                let _ = write!(out, "{day:>2}");
            }
            Some('H') => num(&mut out, hour, 2),
            Some('I') => num(&mut out, (hour + 11) % 12 + 1, 2),
            Some('M') => num(&mut out, minute, 2),
            Some('S') => num(&mut out, second, 2),
            Some('j') => num(&mut out, day_of_year, 3),
            Some('p') => out.push_str(if hour < 12 { "AM" } else { "PM" }),
            Some('B') => out.push_str(MONTHS[month as usize - 1]),
            Some('b') | Some('h') => out.push_str(&MONTHS[month as usize - 1][..3]),
            Some('A') => out.push_str(DAYS[weekday]),
            Some('a') => out.push_str(&DAYS[weekday][..3]),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                if unpadded {
                    out.push('-');
                }
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

/// Days since 1970-01-01 → (year, month 1..=12, day 1..=31) (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(month);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
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
}
