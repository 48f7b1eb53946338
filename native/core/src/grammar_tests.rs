use super::*;
use crate::rng::uniform;

const EOS: u32 = 256;
const IM_END: u32 = 257;
const PAD: u32 = 260;

/// Single bytes, two special end tokens, two multi-byte words, one padding row.
fn vocab() -> Vocabulary {
    let mut tokens: Vec<Vec<u8>> = (0..=255u8).map(|b| vec![b]).collect();
    tokens.push(b"\xFF<|endoftext|>".to_vec()); // 256
    tokens.push(b"\xFF<|im_end|>".to_vec()); // 257
    tokens.push(b"true".to_vec()); // 258
    tokens.push(b"\": ".to_vec()); // 259
    tokens.push(Vec::new()); // 260: padding
    Vocabulary::new(tokens, vec![EOS, IM_END]).unwrap()
}

fn allowed(row: &[u32]) -> Vec<u32> {
    (0..row.len() as u32 * 32)
        .filter(|&t| row[t as usize / 32] >> (t % 32) & 1 == 1)
        .collect()
}

fn mask(m: &mut GrammarMatcher) -> Vec<u32> {
    let mut row = vec![0u32; bitmask_words(261)];
    m.fill_bitmask(&mut row).unwrap();
    allowed(&row)
}

/// Sample uniformly among the allowed tokens until an EOS; the output bytes.
fn random_walk(m: &mut GrammarMatcher, seed: u64, max_steps: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for step in 0..max_steps {
        let ok = mask(m);
        assert!(!ok.is_empty(), "a live matcher allows some token");
        assert!(!ok.contains(&PAD));
        let token = ok[(uniform(seed, step as u64) * ok.len() as f64) as usize % ok.len()];
        m.consume(token).unwrap();
        if token == EOS || token == IM_END {
            return out;
        }
        match token {
            258 => out.extend_from_slice(b"true"),
            259 => out.extend_from_slice(b"\": "),
            t => out.push(t as u8),
        }
    }
    panic!(
        "no EOS after {max_steps} steps: {:?}",
        String::from_utf8_lossy(&out)
    );
}

#[test]
fn regex_allows_digits_then_only_end_tokens() {
    let v = vocab();
    let mut m = v.compile(ConstraintKind::Regex, "[0-9]{3}").unwrap();
    let digits: Vec<u32> = (b'0' as u32..=b'9' as u32).collect();
    assert_eq!(mask(&mut m), digits);
    for t in [b'1', b'2', b'3'] {
        m.consume(t as u32).unwrap();
    }
    assert!(m.is_accepting());
    assert_eq!(mask(&mut m), vec![EOS, IM_END]);
    m.consume(IM_END).unwrap();
    assert!(m.is_stopped());
    assert_eq!(m.error(), None);
}

#[test]
fn a_rejected_token_is_a_sticky_matcher_error() {
    let v = vocab();
    let mut m = v.compile(ConstraintKind::Regex, "[0-9]+").unwrap();
    assert!(matches!(
        m.consume(b'x' as u32),
        Err(GrammarError::Matcher(_))
    ));
    assert!(m.error().is_some());
    let mut row = vec![0u32; bitmask_words(261)];
    assert!(m.fill_bitmask(&mut row).is_err());
}

#[test]
fn bad_grammars_do_not_compile() {
    let v = vocab();
    for (kind, source) in [
        (ConstraintKind::JsonSchema, "{not json"),
        (ConstraintKind::JsonSchema, "[1, 2]"),
        (ConstraintKind::JsonSchema, r#"{"type": "no-such-type"}"#),
        (ConstraintKind::Lark, "start: undefined_rule"),
        (ConstraintKind::Regex, "(unclosed"),
        (ConstraintKind::Llguidance, "   "),
    ] {
        let err = v.compile(kind, source).err();
        assert!(
            matches!(err, Some(GrammarError::Compile(_))),
            "{kind:?} {source:?} gave {err:?}"
        );
    }
}

#[test]
fn json_schema_walks_always_parse_and_validate() {
    let v = vocab();
    let schema = r#"{"type": "object", "properties": {
        "ok": {"type": "boolean"},
        "n": {"type": "integer", "minimum": 0, "maximum": 99},
        "color": {"enum": ["red", "green"]}},
        "required": ["ok", "n", "color"], "additionalProperties": false}"#;
    for seed in 0..40 {
        let mut m = v.compile(ConstraintKind::JsonSchema, schema).unwrap();
        let text = random_walk(&mut m, seed, 400);
        let value: Value = serde_json::from_slice(&text)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&text)));
        assert!(value["ok"].is_boolean(), "{value}");
        let n = value["n"].as_i64().unwrap();
        assert!((0..=99).contains(&n), "{value}");
        assert!(["red", "green"].contains(&value["color"].as_str().unwrap()));
        assert_eq!(value.as_object().unwrap().len(), 3);
    }
}

#[test]
fn json_object_and_lark_walks_match() {
    let v = vocab();
    let mut m = v.compile(ConstraintKind::JsonObject, "").unwrap();
    assert_eq!(mask(&mut m), vec![b'{' as u32]);
    let lark = r#"start: "yes" | "no" | "maybe" /[0-9]/"#;
    for seed in 0..10 {
        let mut m = v.compile(ConstraintKind::Lark, lark).unwrap();
        let text = String::from_utf8(random_walk(&mut m, seed, 20)).unwrap();
        let ok = text == "yes"
            || text == "no"
            || (text.len() == 6
                && text.starts_with("maybe")
                && text.as_bytes()[5].is_ascii_digit());
        assert!(ok, "{text:?}");
    }
}

#[test]
fn fork_is_independent() {
    let v = vocab();
    let mut a = v.compile(ConstraintKind::Regex, "ab|ac").unwrap();
    a.consume(b'a' as u32).unwrap();
    let mut b = a.fork();
    a.consume(b'b' as u32).unwrap();
    assert_eq!(mask(&mut b), vec![b'b' as u32, b'c' as u32]);
    b.consume(b'c' as u32).unwrap();
    assert_eq!(mask(&mut a), vec![EOS, IM_END]);
}

#[test]
fn rollback_returns_to_an_earlier_state() {
    let v = vocab();
    let mut m = v.compile(ConstraintKind::Regex, "ab|cd").unwrap();
    m.consume(b'a' as u32).unwrap();
    m.rollback(1).unwrap();
    assert_eq!(mask(&mut m), vec![b'a' as u32, b'c' as u32]);
}

#[test]
fn batch_fill_equals_row_fills_and_isolates_errors() {
    let v = vocab();
    let mut a = v.compile(ConstraintKind::Regex, "[a-c]+").unwrap();
    let mut b = v.compile(ConstraintKind::JsonObject, "").unwrap();
    let mut bad = v.compile(ConstraintKind::Regex, "x").unwrap();
    let _ = bad.consume(b'y' as u32);
    let words = bitmask_words(v.vocab_size());
    let expect_a = mask(&mut a);
    let expect_b = mask(&mut b);
    let mut out = vec![u32::MAX; 3 * words];
    let errors = fill_bitmasks(&mut [&mut a, &mut bad, &mut b], &mut out, words).unwrap();
    assert!(errors[0].is_none() && errors[2].is_none());
    assert!(matches!(errors[1], Some(GrammarError::Matcher(_))));
    assert_eq!(allowed(&out[..words]), expect_a);
    assert!(out[words..2 * words].iter().all(|&w| w == 0));
    assert_eq!(allowed(&out[2 * words..]), expect_b);
    let err = fill_bitmasks(&mut [&mut a], &mut out, words).unwrap_err();
    assert!(matches!(err, GrammarError::Shape(_)));
}

#[test]
fn apply_bitmask_masks_exactly_the_zero_bits() {
    let vocab_size = 40;
    let words = bitmask_words(vocab_size);
    let mut logits: Vec<f32> = (0..2 * vocab_size).map(|i| i as f32).collect();
    let mut bitmask = vec![0u32; 2 * words];
    bitmask[0] = 0b101; // row 0: tokens 0 and 2
    bitmask[words + 1] = 1 << 3; // row 1: token 35
    apply_bitmask(&mut logits, vocab_size, &bitmask, words).unwrap();
    let finite: Vec<usize> = (0..2 * vocab_size)
        .filter(|&i| logits[i].is_finite())
        .collect();
    assert_eq!(finite, vec![0, 2, vocab_size + 35]);
    assert!(apply_bitmask(&mut logits, vocab_size, &bitmask[..words], words).is_err());
    assert!(apply_bitmask(&mut logits, 41, &bitmask, words).is_err());
}

#[test]
fn vocabulary_checks_its_eos_ids() {
    let tokens = vec![b"a".to_vec(), b"b".to_vec()];
    assert!(Vocabulary::new(tokens.clone(), vec![]).is_err());
    assert!(Vocabulary::new(tokens, vec![5]).is_err());
}
