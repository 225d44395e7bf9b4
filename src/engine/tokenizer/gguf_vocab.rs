//! Vocabularies from GGUF metadata: llama.cpp's BPE pre-tokenizers and SentencePiece
//! pieces, built into a `tokenizers` model.

use super::*;

/// A llama.cpp BPE pre-tokenizer: split regexes applied in turn, each piece split again.
pub(super) struct PreTokenizer {
    pub(super) regexes: &'static [&'static str],
    /// A word that is itself a token is emitted whole, without merging (llama.cpp `ignore_merges`).
    pub(super) ignore_merges: bool,
    pub(super) add_bos_by_default: bool,
}

pub(super) const GPT2_SPLIT: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
pub(super) const LLAMA3_SPLIT: &str =
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
pub(super) const QWEN2_SPLIT: &str =
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
pub(super) const QWEN35_SPLIT: &str =
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
// The original tokenizer.json patterns: fancy-regex has the Unicode classes std::regex lacks.
pub(super) const TEKKEN_SPLIT: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
pub(super) const GPT4O_SPLIT: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
pub(super) const SEED_CODER_SPLIT: &str =
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1}| ?[^\s\p{L}\p{N}\r\n]+|\s*[\r\n]+|\s+(?!\S)|\s+";
pub(super) const BAILING_SPLIT: &str =
    r"'(?:[sSdDmMtT]|[lL][lL]|[vV][eE]|[rR][eE])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+";
pub(super) const MINICPM5_SPLIT: &str =
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}+| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
pub(super) const DEEPSEEK3_SPLIT: &str =
    r##"[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"##;
pub(super) const BLOOM_SPLIT: &str = r" ?[^(\s|.,!?…。，、।۔،)]+";

/// The split regexes llama.cpp (`llm_tokenizer_bpe`) uses for a `tokenizer.ggml.pre` value.
pub(super) fn bpe_pre_tokenizer(pre: &str) -> Option<PreTokenizer> {
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
pub(super) fn build_gguf_bpe(texts: &[String], merges: &[String], pre: &PreTokenizer) -> Result<HfTokenizer, TokenizerError> {
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
pub(super) fn build_gguf_spm(texts: &[String], kinds: &[TokenKind], scores: &[f32]) -> Result<HfTokenizer, TokenizerError> {
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
pub(super) fn vocab_map(texts: &[String]) -> Vocab {
    texts.iter().enumerate().map(|(id, t)| (t.clone(), id as u32)).collect()
}

/// Registers control and unknown tokens as special (parsed only with `parse_special`) and
/// user-defined tokens as always-parsed added tokens, all matched on the raw text before
/// normalization, as llama.cpp's `tokenizer_st_partition` does.
pub(super) fn add_gguf_special_tokens(tokenizer: &mut HfTokenizer, texts: &[String], kinds: &[TokenKind]) {
    let added = |wanted: &dyn Fn(TokenKind) -> bool, special: bool| -> Vec<AddedToken> {
        texts.iter().zip(kinds).filter(|(_, &k)| wanted(k)).map(|(t, _)| AddedToken::from(t.clone(), special).normalized(false)).collect()
    };
    tokenizer.add_special_tokens(&added(&|k| k.is_special(), true));
    tokenizer.add_tokens(&added(&|k| k == TokenKind::UserDefined, false));
}

pub(super) fn find_first_text(texts: &[String], candidates: &[&str]) -> Option<u32> {
    candidates.iter().find_map(|c| texts.iter().position(|t| t == c)).map(|id| id as u32)
}
