//! A multi-turn chat actor.
//!
//! The conversation lives in the actor's memory (so a snapshot carries it). Each message is a
//! user turn: the actor renders the whole conversation with the model's chat template, evaluates
//! only the tokens the KV cache does not already hold (the shared prefix is reused), then
//! streams the reply to stdout token by token until the model ends its turn.
//!
//! Commands: `/reset` forgets the conversation, `/max N` sets the reply length limit,
//! `/system TEXT` sets a system prompt (and resets).

use std::io::Write;

use driftwood_guest::{model, Actor};

struct Chat {
    /// (role, content) turns so far.
    turns: Vec<(String, String)>,
    /// Token ids the host's KV cache holds, in order (mirrors kv_len).
    cached: Vec<u32>,
    max_tokens: usize,
    system: Option<String>,
}

impl Chat {
    fn reset(&mut self) {
        self.turns.clear();
        self.cached.clear();
        if let Err(e) = model::kv_truncate(0) {
            eprintln!("chat: kv_truncate failed: {e}");
        }
    }

    fn reply(&mut self, user: &str) -> Result<String, String> {
        self.turns.push(("user".into(), user.into()));
        let mut msgs: Vec<(&str, &str)> = Vec::new();
        if let Some(sys) = &self.system {
            msgs.push(("system", sys));
        }
        msgs.extend(self.turns.iter().map(|(r, c)| (r.as_str(), c.as_str())));
        let prompt = model::chat_template(&msgs, true).map_err(|e| format!("chat template: {e}"))?;
        let tokens = model::tokenize(&prompt, true).map_err(|e| format!("tokenize: {e}"))?;
        // Reuse the cached prefix; evaluate only what is new.
        let common = self.cached.iter().zip(&tokens).take_while(|(a, b)| a == b).count();
        let common = common.min(tokens.len().saturating_sub(1));
        model::kv_truncate(common).map_err(|e| format!("kv_truncate: {e}"))?;
        self.cached.truncate(common);
        model::eval(&tokens[common..]).map_err(|e| format!("eval of {} prompt tokens: {e}", tokens.len() - common))?;
        self.cached.extend_from_slice(&tokens[common..]);

        let mut out = std::io::stdout();
        let mut text = String::new();
        let mut gen = model::generate(self.max_tokens);
        for piece in &mut gen {
            let piece = piece.map_err(|e| format!("generate: {e}"))?;
            let _ = out.write_all(piece.text.as_bytes());
            let _ = out.flush();
            text.push_str(&piece.text);
        }
        // The host evaluated every generated token except an end-of-turn one.
        let generated = gen.tokens();
        let evaluated = generated.iter().filter(|t| !model::is_eog(**t)).count();
        self.cached.extend_from_slice(&generated[..evaluated]);
        let _ = out.write_all(b"\n");
        let _ = out.flush();
        self.turns.push(("assistant".into(), text.trim().to_string()));
        Ok(String::new())
    }
}

impl Actor for Chat {
    fn init() -> Self {
        Chat { turns: Vec::new(), cached: Vec::new(), max_tokens: 256, system: None }
    }

    fn handle(&mut self, msg: &str) -> String {
        let msg = msg.trim();
        if msg == "/reset" {
            self.reset();
            return "(conversation reset)".into();
        }
        if let Some(n) = msg.strip_prefix("/max ") {
            return match n.trim().parse() {
                Ok(n) => {
                    self.max_tokens = n;
                    format!("(max reply length {n} tokens)")
                }
                Err(_) => format!("(bad /max value '{n}')"),
            };
        }
        if let Some(sys) = msg.strip_prefix("/system ") {
            self.system = Some(sys.to_string());
            self.reset();
            return "(system prompt set)".into();
        }
        if msg.is_empty() {
            return String::new();
        }
        match self.reply(msg) {
            Ok(s) => s,
            Err(e) => {
                // Drop the failed turn so the conversation stays consistent.
                self.turns.pop();
                format!("(error: {e})")
            }
        }
    }
}

driftwood_guest::export_actor!(Chat);
