//! Byte-level decoding: GPT-2's byte table and SentencePiece byte pieces back to UTF-8 bytes.

use super::*;

/// GPT-2's byte-to-unicode table, inverted: `table[c]` is the byte that printable character `c`
/// stands for. Printable bytes map to themselves, the other 68 to U+0100.. in byte order, so
/// every character of the table is below U+0144.
pub(super) fn byte_decoder() -> [Option<u8>; 0x144] {
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
pub(super) fn parse_byte_token(text: &str) -> Option<u8> {
    let hex = text.strip_prefix("<0x")?.strip_suffix('>')?;
    (hex.len() == 2).then(|| u8::from_str_radix(hex, 16).ok()).flatten()
}

pub(super) fn append_piece_bytes(out: &mut Vec<u8>, text: &str, kind: TokenKind, style: PieceStyle, bytes: &[Option<u8>]) {
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
