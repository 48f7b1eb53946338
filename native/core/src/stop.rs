//! Stop strings over a stream of decoded text deltas.
//!
//! [`StopMatcher`] releases text as soon as it can no longer become part of a
//! stop string, holds back the longest tail that is a prefix of some stop
//! string, and on a match releases only the text before it.
//!
//! Which match wins: the one that *ends* first, as generation stops the moment
//! a stop string is complete; of those ending at the same place, the longest
//! (the one starting first); of equal stop strings, the first listed. This
//! choice does not depend on how the text is split into deltas.
//!
//! The matcher is an Aho–Corasick automaton over the UTF-8 bytes of the stop
//! strings: its state after the text seen so far is the longest suffix of
//! that text which is a prefix of a stop string, which is exactly the text to
//! hold back. A push costs O(len(delta) + max stop length). Every cut falls on
//! a char boundary: a stop string starts with a lead byte, and a suffix of
//! valid UTF-8 equal to a prefix of one is whole chars.

use thiserror::Error;

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum StopError {
    #[error("stop string {index} is empty")]
    Empty { index: usize },
}

/// What one [`StopMatcher::push`] gives back.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StopPush {
    /// Text that may be shown now: it can no longer be part of a stop string.
    pub release: String,
    /// The index (into the stop strings) of the stop string this push completed.
    pub matched: Option<usize>,
}

const ROOT: usize = 0;

#[derive(Debug, Clone)]
struct Node {
    /// Trie edges, by byte.
    children: Vec<(u8, usize)>,
    /// The node of the longest proper suffix of this node's text that is also a node.
    fail: usize,
    /// Length in bytes of this node's text.
    depth: usize,
    /// The longest stop string that is a suffix of this node's text (first listed on ties).
    output: Option<usize>,
}

impl Node {
    fn new(depth: usize) -> Self {
        Self {
            children: Vec::new(),
            fail: ROOT,
            depth,
            output: None,
        }
    }

    fn child(&self, byte: u8) -> Option<usize> {
        self.children
            .iter()
            .find_map(|&(b, next)| (b == byte).then_some(next))
    }
}

/// Finds the first stop string in a stream of text deltas.
#[derive(Debug, Clone)]
pub struct StopMatcher {
    stops: Vec<String>,
    nodes: Vec<Node>,
    /// Transitions out of the root for every byte, the common case.
    root_next: [usize; 256],
    /// The automaton's state; its depth is `held.len()`.
    state: usize,
    /// Text held back: the longest suffix of the text so far that is a prefix of a stop string.
    held: String,
    matched: Option<usize>,
}

impl StopMatcher {
    /// A matcher for `stops`; an empty stop string is an error. No stop strings at all
    /// is allowed: every push then releases its delta whole.
    pub fn new(stops: Vec<String>) -> Result<Self, StopError> {
        if let Some(index) = stops.iter().position(String::is_empty) {
            return Err(StopError::Empty { index });
        }
        let mut nodes = vec![Node::new(0)];
        for (index, stop) in stops.iter().enumerate() {
            let mut node = ROOT;
            for &byte in stop.as_bytes() {
                node = match nodes[node].child(byte) {
                    Some(next) => next,
                    None => {
                        let next = nodes.len();
                        nodes.push(Node::new(nodes[node].depth + 1));
                        nodes[node].children.push((byte, next));
                        next
                    }
                };
            }
            nodes[node].output.get_or_insert(index);
        }
        // Breadth-first, so that a node's failure target is finished before the node.
        let mut queue = std::collections::VecDeque::from([ROOT]);
        while let Some(node) = queue.pop_front() {
            for i in 0..nodes[node].children.len() {
                let (byte, child) = nodes[node].children[i];
                let fail = if node == ROOT {
                    ROOT
                } else {
                    let mut f = nodes[node].fail;
                    loop {
                        if let Some(next) = nodes[f].child(byte) {
                            break next;
                        }
                        if f == ROOT {
                            break ROOT;
                        }
                        f = nodes[f].fail;
                    }
                };
                nodes[child].fail = fail;
                // A stop string ending at `child` itself is longer than any on its
                // failure chain.
                if nodes[child].output.is_none() {
                    nodes[child].output = nodes[fail].output;
                }
                queue.push_back(child);
            }
        }
        let mut root_next = [ROOT; 256];
        for &(byte, next) in &nodes[ROOT].children {
            root_next[byte as usize] = next;
        }
        Ok(Self {
            stops,
            nodes,
            root_next,
            state: ROOT,
            held: String::new(),
            matched: None,
        })
    }

    /// The stop strings, as given.
    pub fn stops(&self) -> &[String] {
        &self.stops
    }

    /// Whether a stop string has matched; every later push releases nothing.
    pub fn finished(&self) -> bool {
        self.matched.is_some()
    }

    /// The index of the stop string that matched, if one has.
    pub fn matched(&self) -> Option<usize> {
        self.matched
    }

    /// The text held back now.
    pub fn held(&self) -> &str {
        &self.held
    }

    fn next(&self, mut node: usize, byte: u8) -> usize {
        loop {
            if node == ROOT {
                return self.root_next[byte as usize];
            }
            if let Some(next) = self.nodes[node].child(byte) {
                return next;
            }
            node = self.nodes[node].fail;
        }
    }

    /// Add decoded text; returns what may be released now and whether a stop string matched.
    pub fn push(&mut self, delta: &str) -> StopPush {
        if self.matched.is_some() {
            return StopPush::default();
        }
        let mut state = self.state;
        for (i, &byte) in delta.as_bytes().iter().enumerate() {
            state = self.next(state, byte);
            if let Some(index) = self.nodes[state].output {
                // The match ends at byte i of the delta and lies within held + delta.
                let start = self.held.len() + i + 1 - self.stops[index].len();
                let mut release = std::mem::take(&mut self.held);
                if start <= release.len() {
                    release.truncate(start);
                } else {
                    release.push_str(&delta[..start - release.len()]);
                }
                self.state = ROOT;
                self.matched = Some(index);
                return StopPush {
                    release,
                    matched: Some(index),
                };
            }
        }
        let mut release = std::mem::take(&mut self.held);
        release.push_str(delta);
        let cut = release.len() - self.nodes[state].depth;
        self.held = release.split_off(cut);
        self.state = state;
        StopPush {
            release,
            matched: None,
        }
    }

    /// Release the held-back text at the end of generation (nothing once a stop
    /// string matched). A stop string cannot span a flush.
    pub fn flush(&mut self) -> String {
        self.state = ROOT;
        std::mem::take(&mut self.held)
    }
}

#[cfg(test)]
#[path = "stop_tests.rs"]
mod tests;
