//! Damaged input lines, made from the bundled Synthea sample with seeded byte-level damage of
//! the kinds real exports show: inserted escapes (lone surrogates among them), brackets and
//! quotes, deleted, flipped or replaced bytes, bytes cut from UTF-8 characters, duplicated spans
//! and truncation. And Python's verdict on JSON text, which is what Cumulus ETL accepts.

use std::io::Write;
use std::process::{Command, Stdio};

/// A small seeded generator (xorshift64*): the same damage on every run.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A number below `n` (n > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Inserted by the "escape" damage: valid and invalid escapes, lone and paired surrogates.
const ESCAPES: [&str; 10] = [
    "\\ud83d",
    "\\udc00",
    "\\ud83d\\ude00",
    "\\uDBFF",
    "\\u00e9",
    "\\u0000",
    "\\\"",
    "\\\\",
    "\\x",
    "\\u12",
];
const PUNCTUATION: &[u8] = b"[]{}\",:\\ 0-e.";
/// Pieces of UTF-8 characters, whole ones and cut ones.
const UTF8_PIECES: [&[u8]; 6] = [
    b"\xc3",
    b"\xe2\x82",
    b"\xe2\x82\xac",
    b"\xf0\x9f",
    b"\xff",
    b"\xed\xa0\x80",
];

/// `line` with one to four kinds of damage, none of it before `keep` (so a prefix such as the
/// resource type and a unique id can be kept) and never a newline (a line stays one line).
pub fn damage(line: &[u8], keep: usize, rng: &mut Rng) -> Vec<u8> {
    let mut out = line.to_vec();
    for _ in 0..1 + rng.below(4) {
        if out.len() <= keep {
            break;
        }
        let at = keep + rng.below(out.len() - keep);
        match rng.below(9) {
            0 => {
                let b = loop {
                    let b = rng.below(256) as u8;
                    if b != b'\n' {
                        break b;
                    }
                };
                out.insert(at, b);
            }
            1 => {
                let e = ESCAPES[rng.below(ESCAPES.len())].as_bytes();
                out.splice(at..at, e.iter().copied());
            }
            2 => out.insert(at, PUNCTUATION[rng.below(PUNCTUATION.len())]),
            3 => {
                let n = (1 + rng.below(8)).min(out.len() - at);
                out.drain(at..at + n);
            }
            4 => {
                let flipped = out[at] ^ (1 << rng.below(8));
                if flipped != b'\n' {
                    out[at] = flipped;
                }
            }
            5 => out.truncate(at.max(keep + 1)),
            6 => {
                let n = (1 + rng.below(40)).min(out.len() - at);
                let span = out[at..at + n].to_vec();
                let to = keep + rng.below(out.len() - keep);
                out.splice(to..to, span);
            }
            7 => {
                let piece = UTF8_PIECES[rng.below(UTF8_PIECES.len())];
                out.splice(at..at, piece.iter().copied());
            }
            _ => retype(&mut out, at, rng),
        }
    }
    out
}

/// Values that replace a string value: still JSON, but of another type.
const RETYPED: [&str; 5] = ["12", "true", "-0.5", "[\"x\"]", "{\"a\":1}"];

/// Replaces the first string value at or after `at` (one that follows `":`) with a value of
/// another type, keeping the line valid JSON: the damage a bad export or a schema drift does.
fn retype(out: &mut Vec<u8>, at: usize, rng: &mut Rng) {
    let Some(found) = out[at..].windows(3).position(|w| w == b"\":\"") else {
        return;
    };
    let start = at + found + 2;
    let Some(len) = out[start + 1..].iter().position(|&b| b == b'"') else {
        return;
    };
    if out[start + 1..start + 1 + len].contains(&b'\\') {
        return;
    }
    let value = RETYPED[rng.below(RETYPED.len())].as_bytes();
    out.splice(start..start + len + 2, value.iter().copied());
}

/// The sample's lines of one resource type, each given the id `{prefix}{n}` (unique) and put
/// first after the resource type, with the length of that kept prefix.
pub fn sample_lines(resource_type: &str, prefix: &str, count: usize) -> Vec<(Vec<u8>, usize)> {
    let path = crate::support::synthea().join(format!("{resource_type}.000.ndjson"));
    let text = std::fs::read_to_string(path).unwrap();
    let originals: Vec<serde_json::Map<String, serde_json::Value>> = text
        .lines()
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    (0..count)
        .map(|n| {
            let mut rest = originals[n % originals.len()].clone();
            rest.remove("resourceType");
            rest.remove("id");
            let head = format!(r#"{{"resourceType":"{resource_type}","id":"{prefix}{n}","#);
            let body = serde_json::to_string(&rest).unwrap();
            let mut line = head.clone().into_bytes();
            line.extend_from_slice(&body.as_bytes()[1..]);
            (line, head.len())
        })
        .collect()
}

/// Python's verdict on each text, read as Cumulus ETL reads a line (`json.loads` on its bytes):
/// true where it parses (to any value).
pub fn python_accepts(texts: &[Vec<u8>]) -> Vec<bool> {
    let script = r#"
import json, sys
for line in sys.stdin.buffer.read().split(b"\n")[:-1]:
    try:
        json.loads(line)
        print(1)
    except Exception:
        print(0)
"#;
    let mut child = Command::new("python3")
        .args(["-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3 runs");
    let mut input = Vec::new();
    for t in texts {
        assert!(!t.contains(&b'\n'));
        input.extend_from_slice(t);
        input.push(b'\n');
    }
    let mut stdin = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || stdin.write_all(&input).unwrap());
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap();
    assert!(out.status.success());
    let verdicts: Vec<bool> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| l == "1")
        .collect();
    assert_eq!(verdicts.len(), texts.len());
    verdicts
}
