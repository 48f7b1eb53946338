//! Grammar-constrained decoding with llguidance: one `Vocabulary` per
//! tokenizer (the token trie and llguidance's parser factory, built once),
//! one `GrammarMatcher` per constrained sequence, and a batch call that fills
//! the u32 token bitmask of many rows at once, in parallel.
//!
//! Bit `t % 32` of word `t / 32` of a row is 1 when token `t` is allowed.
//! A grammar that fails to compile is an error of `compile`; a matcher that
//! fails later (a token the grammar rejects, a parser limit) keeps a sticky
//! error that its row reports, and no other row is touched.

use std::sync::Arc;

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{ApproximateTokEnv, TokEnv, TokRxInfo, TokTrie};
use llguidance::{Matcher, ParserFactory};
use rayon::prelude::*;
use serde_json::{json, Value};
use thiserror::Error;

/// What a constraint's source text is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConstraintKind {
    /// A Rust-regex-syntax regular expression the whole output must match.
    Regex,
    /// A JSON schema (as JSON text).
    JsonSchema,
    /// Any JSON object (the source is ignored).
    JsonObject,
    /// A grammar in llguidance's Lark dialect.
    Lark,
    /// llguidance's own format: a Lark grammar, or its JSON grammar list.
    Llguidance,
}

impl ConstraintKind {
    pub fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "regex" => Self::Regex,
            "json_schema" | "json" => Self::JsonSchema,
            "json_object" => Self::JsonObject,
            "lark" => Self::Lark,
            "llguidance" => Self::Llguidance,
            _ => return None,
        })
    }
}

#[derive(Debug, Error, Clone, PartialEq)]
pub enum GrammarError {
    #[error("invalid vocabulary: {0}")]
    Vocabulary(String),
    #[error("the grammar does not compile: {0}")]
    Compile(String),
    #[error("grammar matcher failed: {0}")]
    Matcher(String),
    #[error("shape mismatch: {0}")]
    Shape(String),
}

/// Number of u32 words in one bitmask row of `vocab_size` tokens.
pub fn bitmask_words(vocab_size: usize) -> usize {
    vocab_size.div_ceil(32)
}

/// The token side of grammars for one tokenizer: built once, shared by every
/// matcher compiled from it.
pub struct Vocabulary {
    factory: Arc<ParserFactory>,
    /// Every token that ends generation; the grammar knows only the first.
    eos_ids: Arc<[u32]>,
    vocab_size: usize,
}

impl Vocabulary {
    /// `tokens[i]` is the bytes token `i` decodes to; a special token's bytes
    /// must start with 0xFF (llguidance's marker, so grammar text never
    /// matches it) and an empty entry is a token the grammar never allows
    /// (padding rows of the embedding). `eos_ids[0]` is the grammar's EOS.
    pub fn new(tokens: Vec<Vec<u8>>, eos_ids: Vec<u32>) -> Result<Self, GrammarError> {
        let vocab_size = tokens.len();
        let Some(&eos) = eos_ids.first() else {
            return Err(GrammarError::Vocabulary(
                "at least one EOS token id is needed".into(),
            ));
        };
        if let Some(&bad) = eos_ids.iter().find(|&&id| id as usize >= vocab_size) {
            return Err(GrammarError::Vocabulary(format!(
                "EOS id {bad} is outside the vocabulary of {vocab_size} tokens"
            )));
        }
        let info = TokRxInfo::new(vocab_size as u32, eos);
        let trie = TokTrie::from(&info, &tokens);
        let env: TokEnv = Arc::new(ApproximateTokEnv::new(trie));
        let mut factory = ParserFactory::new_simple(&env)
            .map_err(|err| GrammarError::Vocabulary(err.to_string()))?;
        factory.quiet();
        Ok(Self {
            factory: Arc::new(factory),
            eos_ids: eos_ids.into(),
            vocab_size,
        })
    }

    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// A fresh matcher at the start of the output.
    pub fn compile(
        &self,
        kind: ConstraintKind,
        source: &str,
    ) -> Result<GrammarMatcher, GrammarError> {
        let grammar = top_level_grammar(kind, source)?;
        let parser = self
            .factory
            .create_parser(grammar)
            .map_err(|err| GrammarError::Compile(err.to_string()))?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(err) = matcher.get_error() {
            return Err(GrammarError::Compile(err));
        }
        Ok(GrammarMatcher {
            matcher,
            eos_ids: self.eos_ids.clone(),
            vocab_size: self.vocab_size,
        })
    }
}

/// Compact JSON with the separators models write most (as Python's
/// `json.dumps`), and no free whitespace, unless the schema sets its own
/// `x-guidance` options: a free-whitespace grammar lets a small model emit
/// newlines until it runs out of tokens.
fn json_grammar(mut schema: Value) -> Result<TopLevelGrammar, GrammarError> {
    let Some(object) = schema.as_object_mut() else {
        if schema.is_boolean() {
            return Ok(TopLevelGrammar::from_json_schema(schema));
        }
        return Err(GrammarError::Compile(
            "a JSON schema must be an object or a boolean".into(),
        ));
    };
    object.entry("x-guidance").or_insert_with(
        || json!({"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "}),
    );
    Ok(TopLevelGrammar::from_json_schema(schema))
}

fn top_level_grammar(kind: ConstraintKind, source: &str) -> Result<TopLevelGrammar, GrammarError> {
    let compile = |err: String| GrammarError::Compile(err);
    match kind {
        ConstraintKind::Regex => Ok(TopLevelGrammar::from_regex(source)),
        ConstraintKind::JsonSchema => {
            let schema: Value = serde_json::from_str(source)
                .map_err(|err| compile(format!("the schema is not valid JSON: {err}")))?;
            json_grammar(schema)
        }
        ConstraintKind::JsonObject => json_grammar(json!({"type": "object"})),
        ConstraintKind::Lark => Ok(TopLevelGrammar::from_lark(source.to_string())),
        ConstraintKind::Llguidance => {
            TopLevelGrammar::from_lark_or_grammar_list(source).map_err(|e| compile(e.to_string()))
        }
    }
}

/// The grammar state of one sequence.
#[derive(Clone)]
pub struct GrammarMatcher {
    matcher: Matcher,
    eos_ids: Arc<[u32]>,
    vocab_size: usize,
}

impl GrammarMatcher {
    /// Write the allowed tokens into `out` (`bitmask_words(vocab_size)` words).
    /// Once the grammar is complete only the EOS tokens are allowed; where it
    /// may end, every EOS id is allowed with the grammar's own.
    pub fn fill_bitmask(&mut self, out: &mut [u32]) -> Result<(), GrammarError> {
        let words = bitmask_words(self.vocab_size);
        if out.len() != words {
            return Err(GrammarError::Shape(format!(
                "a bitmask row of {} words for a vocabulary of {} tokens needs {words}",
                out.len(),
                self.vocab_size
            )));
        }
        let mask = self
            .matcher
            .compute_mask_or_eos()
            .map_err(|err| GrammarError::Matcher(err.to_string()))?;
        let src = mask.as_slice();
        let n = src.len().min(words);
        out[..n].copy_from_slice(&src[..n]);
        out[n..].fill(0);
        let first = self.eos_ids[0] as usize;
        if out[first / 32] >> (first % 32) & 1 == 1 {
            for &id in self.eos_ids.iter() {
                out[id as usize / 32] |= 1 << (id % 32);
            }
        }
        Ok(())
    }

    /// Advance over a sampled token; any EOS id counts as the grammar's EOS.
    pub fn consume(&mut self, token: u32) -> Result<(), GrammarError> {
        let token = if self.eos_ids.contains(&token) {
            if self.matcher.is_stopped() && !self.matcher.is_error() {
                return Ok(()); // the grammar was complete: EOS was all it allowed
            }
            self.eos_ids[0]
        } else {
            token
        };
        self.matcher
            .consume_token(token)
            .map_err(|err| GrammarError::Matcher(err.to_string()))
    }

    /// Undo the last `num_tokens` consumed tokens.
    pub fn rollback(&mut self, num_tokens: usize) -> Result<(), GrammarError> {
        self.matcher
            .rollback(num_tokens)
            .map_err(|err| GrammarError::Matcher(err.to_string()))
    }

    /// The output so far is a complete sentence of the grammar.
    pub fn is_accepting(&mut self) -> bool {
        self.matcher.is_accepting().unwrap_or(false)
    }

    /// Nothing but EOS can follow (or the matcher failed).
    pub fn is_stopped(&self) -> bool {
        self.matcher.is_stopped()
    }

    pub fn error(&self) -> Option<String> {
        self.matcher.get_error()
    }

    /// An independent copy in the same state (an `n > 1` choice).
    pub fn fork(&self) -> Self {
        Self {
            matcher: self.matcher.deep_clone(),
            eos_ids: self.eos_ids.clone(),
            vocab_size: self.vocab_size,
        }
    }
}

/// Fill one bitmask row per matcher, in parallel: row `i` of `out`
/// (`matchers.len()` rows of `words` u32) is matcher `i`'s. Returns each
/// row's error; a failed row is left all zero.
pub fn fill_bitmasks(
    matchers: &mut [&mut GrammarMatcher],
    out: &mut [u32],
    words: usize,
) -> Result<Vec<Option<GrammarError>>, GrammarError> {
    if out.len() != matchers.len() * words {
        return Err(GrammarError::Shape(format!(
            "a bitmask of {} words for {} rows of {words}",
            out.len(),
            matchers.len()
        )));
    }
    if let Some(m) = matchers
        .iter()
        .find(|m| bitmask_words(m.vocab_size) != words)
    {
        return Err(GrammarError::Shape(format!(
            "bitmask rows of {words} words for a vocabulary of {} tokens (needs {})",
            m.vocab_size,
            bitmask_words(m.vocab_size)
        )));
    }
    let fill = |(matcher, row): (&mut &mut GrammarMatcher, &mut [u32])| {
        let result = matcher.fill_bitmask(row);
        if result.is_err() {
            row.fill(0);
        }
        result.err()
    };
    if matchers.is_empty() {
        return Ok(Vec::new());
    }
    // One row is cheap enough that a thread hand-off would cost more than it saves.
    Ok(if matchers.len() == 1 {
        matchers
            .iter_mut()
            .zip(out.chunks_mut(words))
            .map(fill)
            .collect()
    } else {
        matchers
            .par_iter_mut()
            .zip(out.par_chunks_mut(words))
            .map(fill)
            .collect()
    })
}

/// Set `logits[r, t]` to -inf where bit `t` of bitmask row `r` is 0.
pub fn apply_bitmask(
    logits: &mut [f32],
    vocab_size: usize,
    bitmask: &[u32],
    words: usize,
) -> Result<(), GrammarError> {
    if vocab_size == 0 || !logits.len().is_multiple_of(vocab_size) {
        return Err(GrammarError::Shape(format!(
            "{} logits are not rows of {vocab_size}",
            logits.len()
        )));
    }
    let rows = logits.len() / vocab_size;
    if bitmask.len() != rows * words || words * 32 < vocab_size {
        return Err(GrammarError::Shape(format!(
            "a bitmask of {} words for {rows} rows of {vocab_size} logits needs rows of at least {} words",
            bitmask.len(),
            bitmask_words(vocab_size)
        )));
    }
    for (row, mask) in logits.chunks_mut(vocab_size).zip(bitmask.chunks(words)) {
        for (chunk, &bits) in row.chunks_mut(32).zip(mask) {
            if bits == u32::MAX {
                continue;
            }
            for (j, x) in chunk.iter_mut().enumerate() {
                if bits >> j & 1 == 0 {
                    *x = f32::NEG_INFINITY;
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
#[path = "grammar_tests.rs"]
mod tests;
