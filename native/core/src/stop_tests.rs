//! Stop tokens and strings over a stream of deltas, split every way.

use super::*;
use crate::rng::uniform;

fn matcher(stops: &[&str]) -> StopMatcher {
    StopMatcher::new(stops.iter().map(|s| s.to_string()).collect()).unwrap()
}

/// The text to release and the stop string that matches, by brute force over the
/// whole text: the first end position at which some stop string ends, the longest
/// one ending there, the first listed of equal ones.
fn reference(text: &str, stops: &[&str]) -> (String, Option<usize>) {
    for end in (1..=text.len()).filter(|&e| text.is_char_boundary(e)) {
        let best = stops
            .iter()
            .enumerate()
            .filter(|(_, s)| text[..end].ends_with(*s))
            .min_by_key(|&(i, s)| (std::cmp::Reverse(s.len()), i));
        if let Some((i, s)) = best {
            return (text[..end - s.len()].to_string(), Some(i));
        }
    }
    (text.to_string(), None)
}

/// The longest suffix of `text` that is a proper prefix of some stop string.
fn longest_partial(text: &str, stops: &[&str]) -> usize {
    stops
        .iter()
        .flat_map(|s| {
            (1..s.len())
                .filter(|&n| s.is_char_boundary(n) && text.ends_with(&s[..n]))
                .max()
        })
        .max()
        .unwrap_or(0)
}

/// Feed `text` in the given pieces, checking every step: nothing released that the
/// reference cuts off, and everything released that can no longer join a stop.
fn run(text: &str, pieces: &[&str], stops: &[&str]) -> (String, Option<usize>) {
    let (want, want_match) = reference(text, stops);
    let mut m = matcher(stops);
    let mut out = String::new();
    let mut seen = String::new();
    let mut matched = None;
    for piece in pieces {
        let was_finished = m.finished();
        seen.push_str(piece);
        let push = m.push(piece);
        if was_finished {
            assert_eq!(push, StopPush::default());
        }
        out.push_str(&push.release);
        assert!(want.starts_with(&out), "{out:?} leaks past {want:?}");
        if let Some(i) = push.matched {
            assert!(matched.is_none());
            matched = Some(i);
            assert!(m.finished());
            assert_eq!(m.held(), "");
        } else if !m.finished() {
            // Maximal release: exactly the longest partial stop is held back.
            let keep = longest_partial(&seen, stops);
            assert_eq!(out.len(), seen.len() - keep, "{seen:?} {stops:?}");
            assert_eq!(m.held(), &seen[seen.len() - keep..]);
        }
    }
    out.push_str(&m.flush());
    assert_eq!(matched, m.matched());
    assert_eq!((out.clone(), matched), (want, want_match), "{pieces:?}");
    (out, matched)
}

fn boundaries(text: &str) -> Vec<usize> {
    (0..=text.len())
        .filter(|&i| text.is_char_boundary(i))
        .collect()
}

fn split_at(text: &str, cuts: &[usize]) -> Vec<String> {
    let mut pieces = Vec::new();
    let mut last = 0;
    for &c in cuts {
        pieces.push(text[last..c].to_string());
        last = c;
    }
    pieces.push(text[last..].to_string());
    pieces
}

/// Whole, one char at a time, split at every single boundary and at every pair.
fn check_all_splits(text: &str, stops: &[&str]) -> (String, Option<usize>) {
    let result = run(text, &[text], stops);
    let b = boundaries(text);
    let chars: Vec<String> = text.chars().map(String::from).collect();
    let chars: Vec<&str> = chars.iter().map(String::as_str).collect();
    assert_eq!(run(text, &chars, stops), result);
    for (i, &x) in b.iter().enumerate() {
        for &y in &b[i..] {
            let pieces = split_at(text, &[x, y]);
            let pieces: Vec<&str> = pieces.iter().map(String::as_str).collect();
            assert_eq!(run(text, &pieces, stops), result);
        }
    }
    result
}

#[test]
fn empty_stop_string_is_an_error() {
    let err = StopMatcher::new(vec!["a".into(), String::new()]).unwrap_err();
    assert_eq!(err, StopError::Empty { index: 1 });
    assert_eq!(err.to_string(), "stop string 1 is empty");
}

#[test]
fn no_stops_passes_text_through() {
    let mut m = matcher(&[]);
    assert_eq!(m.push("abc").release, "abc");
    assert_eq!(m.push("").release, "");
    assert_eq!(m.flush(), "");
    assert!(!m.finished());
}

#[test]
fn match_across_deltas_at_every_split() {
    let text = "Hello world, the end. More text";
    assert_eq!(
        check_all_splits(text, &["the end"]),
        ("Hello world, ".to_string(), Some(0))
    );
    assert_eq!(
        check_all_splits(text, &["xyz", "d. M", "world"]),
        ("Hello ".to_string(), Some(2))
    );
    assert_eq!(
        check_all_splits(text, &["nope", "ends"]),
        (text.to_string(), None)
    );
}

#[test]
fn hold_back_and_release() {
    let mut m = matcher(&["</s>"]);
    assert_eq!(m.push("abc<").release, "abc");
    assert_eq!(m.held(), "<");
    assert_eq!(m.push("/").release, "");
    assert_eq!(m.push("x").release, "</x");
    assert_eq!(m.held(), "");
    let push = m.push("y</");
    assert_eq!(push.release, "y");
    let push = m.push("s>tail");
    assert_eq!(
        push,
        StopPush {
            release: String::new(),
            matched: Some(0)
        }
    );
    assert!(m.finished());
    assert_eq!(m.push("more").release, "");
    assert_eq!(m.flush(), "");
}

#[test]
fn flush_releases_the_held_tail() {
    let mut m = matcher(&["STOP"]);
    assert_eq!(m.push("the end ST").release, "the end ");
    assert_eq!(m.flush(), "ST");
    assert_eq!(m.flush(), "");
    assert!(!m.finished());
    // A stop string cannot span a flush.
    assert_eq!(m.push("OP").release, "OP");
}

#[test]
fn multi_byte_chars() {
    let text = "naïve café → 🙂 déjà vu";
    assert_eq!(
        check_all_splits(text, &["é →", "vu"]),
        ("naïve caf".to_string(), Some(0))
    );
    assert_eq!(
        check_all_splits(text, &["🙂"]),
        ("naïve café → ".to_string(), Some(0))
    );
    // Stops sharing a lead byte with the text but not matching.
    assert_eq!(
        check_all_splits(text, &["🙃", "éz", "à!"]),
        (text.to_string(), None)
    );
    let mut m = matcher(&["→ 🙂!"]);
    assert_eq!(m.push("x → ").release, "x ");
    assert_eq!(m.push("🙂").release, "");
    assert_eq!(m.held(), "→ 🙂");
    assert_eq!(m.push("?").release, "→ 🙂?");
}

#[test]
fn overlapping_stops() {
    // Both end at the same place: the longer (earlier-starting) one wins.
    assert_eq!(
        check_all_splits("xxab yy", &["b", "ab"]),
        ("xx".to_string(), Some(1))
    );
    // "b" completes first.
    assert_eq!(
        check_all_splits("xxbab", &["ab", "b"]),
        ("xx".to_string(), Some(1))
    );
    // The shorter stop inside the longer one completes first.
    assert_eq!(
        check_all_splits("xabcd", &["abcd", "bc"]),
        ("xa".to_string(), Some(1))
    );
    assert_eq!(
        check_all_splits("aaab", &["aab"]),
        ("a".to_string(), Some(0))
    );
    assert_eq!(
        check_all_splits("abababc", &["ababc", "bx"]),
        ("ab".to_string(), Some(0))
    );
    // Equal stop strings: the first listed.
    assert_eq!(
        check_all_splits("xyz", &["q", "y", "y"]),
        ("x".to_string(), Some(1))
    );
}

#[test]
fn stop_that_is_a_prefix_of_another() {
    assert_eq!(
        check_all_splits("one two three", &["two three", "two"]),
        ("one ".to_string(), Some(1))
    );
    assert_eq!(
        check_all_splits("one tw", &["two three", "two"]),
        ("one tw".to_string(), None)
    );
    let mut m = matcher(&["abc", "ab"]);
    assert_eq!(m.push("xa").release, "x");
    let push = m.push("bc");
    assert_eq!((push.release.as_str(), push.matched), ("", Some(1)));
}

/// Seeded draws from the crate's counter-based generator.
struct Draws(u64);

impl Draws {
    fn below(&mut self, n: usize) -> usize {
        self.0 += 1;
        (uniform(42, self.0) * n as f64) as usize
    }

    fn word(&mut self, len: usize) -> String {
        // A small alphabet (with multi-byte chars) so that stops occur.
        let alphabet = ['a', 'b', 'é', '🙂'];
        (0..len).map(|_| alphabet[self.below(4)]).collect()
    }
}

#[test]
fn random_texts_and_splits() {
    let mut d = Draws(0);
    for _ in 0..300 {
        let len = d.below(24);
        let text = d.word(len);
        let stops: Vec<String> = (0..1 + d.below(3))
            .map(|_| {
                let len = 1 + d.below(4);
                d.word(len)
            })
            .collect();
        let stops: Vec<&str> = stops.iter().map(String::as_str).collect();
        let b = boundaries(&text);
        for _ in 0..10 {
            let mut cuts: Vec<usize> = (0..d.below(6)).map(|_| b[d.below(b.len())]).collect();
            cuts.sort_unstable();
            let pieces = split_at(&text, &cuts);
            let pieces: Vec<&str> = pieces.iter().map(String::as_str).collect();
            run(&text, &pieces, &stops);
        }
    }
}
