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

mod decode;
mod gguf_vocab;
mod hf;
mod template;

use decode::*;
use gguf_vocab::*;
use hf::*;
use template::*;

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

#[cfg(test)]
mod tests;
