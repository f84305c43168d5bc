//! Bad input never stops a run: each bad line is reported with file and line, counted by reason,
//! and sent to `--errors-to`, while the good rows around it are written.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::support::{read_table, run_etl, stderr};

const GOOD_1: &str =
    r#"{"resourceType":"Condition","id":"good-1","subject":{"reference":"Patient/p1"}}"#;
const GOOD_2: &str =
    r#"{"resourceType":"Condition","id":"good-2","subject":{"reference":"Patient/p2"}}"#;

struct Outcome {
    stderr: String,
    rows: usize,
    rejected: Vec<Value>,
    code: Option<i32>,
}

/// Runs the condition task on a file holding GOOD_1, `bad`, GOOD_2 (in that order).
fn run_with(bad: &[u8]) -> Outcome {
    let mut content = Vec::new();
    writeln!(content, "{GOOD_1}").unwrap();
    content.extend_from_slice(bad);
    writeln!(content).unwrap();
    writeln!(content, "{GOOD_2}").unwrap();
    run_with_file("Condition.ndjson", &content)
}

fn run_with_file(name: &str, content: &[u8]) -> Outcome {
    run_with_file_and(name, content, "ndjson", &[])
}

/// [`run_with_file`] to an output `format`, with more options (rows are counted for NDJSON
/// output only).
fn run_with_file_and(name: &str, content: &[u8], format: &str, options: &[&str]) -> Outcome {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in");
    std::fs::create_dir_all(&input).unwrap();
    std::fs::write(input.join(name), content).unwrap();
    let (out, phi, errors) = (
        tmp.path().join("out"),
        tmp.path().join("phi"),
        tmp.path().join("errors"),
    );
    let p = |p: &PathBuf| p.to_str().unwrap().to_string();
    let (errors, input, out, phi) = (p(&errors), p(&input), p(&out), p(&phi));
    let format = format!("--output-format={format}");
    let mut args = vec![
        "etl",
        &format,
        "--task=condition",
        "--export-group=g",
        "--export-timestamp=2024-01-01T00:00:00Z",
        "--errors-to",
        &errors,
    ];
    args.extend_from_slice(options);
    args.extend([input.as_str(), out.as_str(), phi.as_str()]);
    let run = run_etl(&args);
    let rejected = std::fs::read_to_string(Path::new(&errors).join("rejected-rows.ndjson"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    Outcome {
        stderr: stderr(&run),
        rows: read_table(&Path::new(&out).join("condition"), "id").len(),
        rejected,
        code: run.status.code(),
    }
}

fn assert_skipped(o: &Outcome, reason: &str, line: u64) {
    assert_eq!(o.code, Some(0), "{}", o.stderr);
    assert_eq!(o.rows, 2, "both good rows are written:\n{}", o.stderr);
    assert!(
        o.stderr
            .contains(&format!("Condition.ndjson:{line}: skipped: {reason}")),
        "{}",
        o.stderr
    );
    assert!(
        o.stderr.contains(reason) && o.stderr.contains("Skipped input (1 in all)"),
        "{}",
        o.stderr
    );
    assert_eq!(o.rejected.len(), 1, "{:?}", o.rejected);
    assert_eq!(o.rejected[0]["line"], line);
    assert_eq!(o.rejected[0]["reason"], reason);
}

#[test]
fn unparseable_line() {
    let o = run_with(br#"{"resourceType":"Condition","id":"x""#);
    assert_skipped(&o, "unparseable JSON", 2);
}

#[test]
fn line_that_is_not_an_object() {
    assert_skipped(&run_with(b"[1, 2, 3]"), "not a JSON object", 2);
}

#[test]
fn wrong_or_unknown_resource_type() {
    assert_skipped(
        &run_with(br#"{"resourceType":"Patient","id":"p"}"#),
        "wrong or missing resourceType",
        2,
    );
    assert_skipped(
        &run_with(br#"{"resourceType":"Nonsense","id":"n"}"#),
        "wrong or missing resourceType",
        2,
    );
}

#[test]
fn resource_without_id() {
    assert_skipped(
        &run_with(br#"{"resourceType":"Condition","subject":{"reference":"Patient/p"}}"#),
        "resource without id",
        2,
    );
}

#[test]
fn bad_reference() {
    let o = run_with(br#"{"resourceType":"Condition","id":"b","subject":{"reference":"http://elsewhere.org/Patient/1"}}"#);
    assert_skipped(&o, "unparseable reference", 2);
    assert!(
        !o.stderr.contains("elsewhere.org"),
        "messages never quote values"
    );
}

#[test]
fn unknown_modifier_extension() {
    let o = run_with(br#"{"resourceType":"Condition","id":"m","modifierExtension":[{"url":"http://x.org/negated","valueBoolean":true}]}"#);
    assert_skipped(&o, "unknown modifierExtension", 2);
    assert!(
        o.stderr
            .contains("Resources skipped due to unrecognized modifier extensions"),
        "{}",
        o.stderr
    );
}

#[test]
fn invalid_utf8() {
    assert_skipped(
        &run_with(
            b"{\"resourceType\":\"Condition\",\"id\":\"u\",\"code\":{\"text\":\"\xff\xfe\"}}",
        ),
        "invalid UTF-8",
        2,
    );
}

#[test]
fn deeply_nested_json() {
    let deep = format!(
        r#"{{"resourceType":"Condition","id":"d","x":{}{}}}"#,
        "[".repeat(10_000),
        "]".repeat(10_000)
    );
    assert_skipped(&run_with(deep.as_bytes()), "JSON nested too deeply", 2);
}

#[test]
fn a_line_of_100_megabytes() {
    let text = "a".repeat(100 << 20);
    let big = format!(r#"{{"resourceType":"Condition","id":"big","code":{{"text":"{text}"}}}}"#);
    let mut content = Vec::new();
    writeln!(content, "{GOOD_1}").unwrap();
    writeln!(content, "{big}").unwrap();
    writeln!(content, "{GOOD_2}").unwrap();
    let o = run_with_file("Condition.ndjson", &content);
    assert_eq!(o.code, Some(0), "{}", o.stderr);
    assert_eq!(o.rows, 3, "a huge but valid row is processed, not dropped");
}

#[test]
fn truncated_gzip() {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    for i in 0..2000 {
        writeln!(encoder, r#"{{"resourceType":"Condition","id":"c{i}","code":{{"text":"condition number {i} with some filler text"}}}}"#).unwrap();
    }
    let full = encoder.finish().unwrap();
    let truncated = &full[..full.len() / 2];
    let o = run_with_file("Condition.ndjson.gz", truncated);
    assert_eq!(o.code, Some(0), "{}", o.stderr);
    assert!(
        o.rows > 0 && o.rows < 2000,
        "rows before the damage are kept: {}",
        o.rows
    );
    assert!(
        o.stderr.contains("Condition.ndjson.gz:") && o.stderr.contains("stopped reading"),
        "{}",
        o.stderr
    );
    assert!(
        o.stderr.contains("unreadable or truncated file"),
        "{}",
        o.stderr
    );
}

#[test]
fn all_kinds_together_are_counted_by_reason() {
    let lines = [
        GOOD_1,
        "{oops",
        "42",
        r#"{"resourceType":"Condition"}"#,
        r#"{"resourceType":"Condition","id":"r","subject":{"reference":"1234"}}"#,
        GOOD_2,
    ];
    let o = run_with_file("Condition.000.ndjson", lines.join("\n").as_bytes());
    assert_eq!(o.rows, 2);
    assert!(
        o.stderr.contains("Skipped input (4 in all)"),
        "{}",
        o.stderr
    );
    for reason in [
        "unparseable JSON",
        "not a JSON object",
        "resource without id",
        "unparseable reference",
    ] {
        assert!(
            o.stderr
                .lines()
                .any(|l| l.trim_start().starts_with(reason) && l.trim_end().ends_with(" 1")),
            "{reason}: {}",
            o.stderr
        );
    }
    assert_eq!(o.rejected.len(), 4);
}

#[test]
fn bad_lines_in_every_slice_of_a_large_file_are_numbered_right() {
    // About 11 MB: at the smallest budget, on four workers, the file is read in slices of
    // 1 MiB, and a slice's first line is worked out only when one of its lines is bad.
    let mut content = String::new();
    let mut bad_lines = Vec::new();
    let mut good = 0;
    for line in 1..=150_000u64 {
        if line % 1_000 == 0 {
            content.push('\n');
        } else if line % 9_973 == 7 || line == 149_999 {
            content.push_str("{oops\n");
            bad_lines.push(line);
        } else {
            content.push_str(&format!(
                r#"{{"resourceType":"Condition","id":"c{line}","subject":{{"reference":"Patient/p1"}}}}"#
            ));
            content.push('\n');
            good += 1;
        }
    }
    // Delta output keeps a row index, whose lookups would number every line: a first load
    // has nothing to look up, so its lines are numbered only for the messages too.
    for format in ["ndjson", "deltalake"] {
        let options = ["--memory=16MiB", "--workers=4"];
        let o = run_with_file_and("Condition.ndjson", content.as_bytes(), format, &options);
        assert_eq!(o.code, Some(0), "{format}: {}", o.stderr);
        if format == "ndjson" {
            assert_eq!(o.rows, good);
        }
        let mut numbered: Vec<u64> = o
            .rejected
            .iter()
            .map(|r| r["line"].as_u64().unwrap())
            .collect();
        numbered.sort_unstable();
        assert_eq!(numbered, bad_lines, "{format}");
        // The first few are named on stderr too.
        let named: Vec<u64> = o
            .stderr
            .lines()
            .filter_map(|l| {
                l.split("Condition.ndjson:")
                    .nth(1)?
                    .split(':')
                    .next()?
                    .parse()
                    .ok()
            })
            .collect();
        assert!(!named.is_empty(), "{format}: {}", o.stderr);
        assert!(
            named.iter().all(|n| bad_lines.contains(n)),
            "{format}: {}",
            o.stderr
        );
        let written = format!("condition {good} {good}");
        let summary: String = o.stderr.split_whitespace().collect::<Vec<_>>().join(" ");
        assert!(summary.contains(&written), "{format}: {}", o.stderr);
    }
}
