//! Hugging Face tokenizer folders: `tokenizer.json`, `tokenizer_config.json`, the chat template.

use super::*;

pub(super) fn read_file(path: &Path) -> Result<Vec<u8>, TokenizerError> {
    std::fs::read(path).map_err(|source| TokenizerError::Io { path: path.to_path_buf(), source })
}

pub(super) fn parse_json(path: &Path, bytes: &[u8]) -> Result<Json, TokenizerError> {
    serde_json::from_slice(bytes).map_err(|e| TokenizerError::BadFile { path: path.to_path_buf(), message: e.to_string() })
}

pub(super) fn read_optional_json(path: &Path) -> Result<Option<Json>, TokenizerError> {
    match std::fs::read(path) {
        Ok(bytes) => parse_json(path, &bytes).map(Some),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(TokenizerError::Io { path: path.to_path_buf(), source }),
    }
}

/// A token named in tokenizer_config.json: a string or an `AddedToken` object with `content`.
pub(super) fn token_content(v: &Json) -> Option<&str> {
    v.as_str().or_else(|| v.get("content").and_then(Json::as_str))
}

/// An id or a list of ids (`eos_token_id: [128001, 128008, 128009]`).
pub(super) fn json_ids(v: &Json) -> Vec<u32> {
    let one = |v: &Json| v.as_u64().and_then(|id| u32::try_from(id).ok());
    match v {
        Json::Array(items) => items.iter().filter_map(one).collect(),
        other => one(other).into_iter().collect(),
    }
}

/// `chat_template.jinja` wins over tokenizer_config.json's `chat_template`, which is a string
/// or a list of named templates (the one named "default" is used).
pub(super) fn read_hf_chat_template(dir: &Path, config: Option<&Json>) -> Result<Option<String>, TokenizerError> {
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
pub(super) fn decoder_types(decoder: &Json, out: &mut Vec<String>) {
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

pub(super) fn hf_piece_style(tokenizer_json: &Json) -> PieceStyle {
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
pub(super) fn hf_strips_leading_space(tokenizer_json: &Json) -> bool {
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
pub(super) fn hf_merges(tokenizer_json: &Json) -> Vec<String> {
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
