//! No input line may crash or hang a run: strings as Python reads them (lone surrogates), a bug
//! on one line costs that line, a bug anywhere else stops the run promptly with a message that
//! names the file or the table, and damaged exports finish in every format with every line
//! accounted for.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::mutate::{Rng, damage, python_accepts, sample_lines};
use crate::support::{
    phi_with_salt, read_delta_rows, read_parquet_rows, run_etl_within, stderr, synthea,
};

pub const SALT: &str = "e1a5f0c1b2d3e4f5a6b7c8d9e0f1a2b3c4d5e6f7a8b9c0d1e2f3a4b5c6d7e8f9";
/// Longer than any of these runs takes (a debug build runs the sample in a few seconds), short
/// enough that a hang fails the test rather than the suite.
const LIMIT: Duration = Duration::from_secs(60);

/// Lone surrogates in a kept value (alone, before a pair, first of its string), a dropped field
/// and a dropped key; in an id and in a reference (Python's tool cannot hash those and skips the
/// line, as we do); and DEL and the ASCII separators Python's `strip()` removes.
pub const LONE_SURROGATE_LINES: [&str; 5] = [
    r#"{"resourceType":"Condition","id":"c1","subject":{"reference":"Patient/p1"},"code":{"text":"pain \ud83d then","coding":[{"system":"http://snomed.info/sct","code":"1","display":"  \udc00x\ud83d\ude00 "}]},"unknownField":"drop \ud83d","x\ud83d":1}"#,
    r#"{"resourceType":"Condition","id":"c2\ud83d","subject":{"reference":"Patient/p1"}}"#,
    r#"{"resourceType":"Condition","id":"c3","subject":{"reference":"Patient/p\udfff"}}"#,
    r#"{"resourceType":"Condition","id":"c4","subject":{"reference":"Patient/p1"},"code":{"text":"del\u007f and \u001c"}}"#,
    r#"{"resourceType":"Condition","id":"c5","subject":{"reference":"Patient/p1"},"code":{"text":"\u001c\u001f trimmed \u001f"}}"#,
];

/// What Cumulus ETL 4.3.6 wrote for `LONE_SURROGATE_LINES` with `SALT` (the ignored test
/// `reference::lone_surrogates_match_the_reference` runs it again).
pub const REFERENCE_ROWS: [&str; 3] = [
    r#"{"resourceType":"Condition","id":"b666d2dc402c3ea264e0e8f27a75980d6552e974237555f8cf441abf5d9652a7","subject":{"reference":"Patient/586878d270d3dee07710acfc2dfa6f3c2f81a734652a950de7c54c27ba8b3194"},"code":{"text":"pain \ud83d then","coding":[{"system":"http://snomed.info/sct","code":"1","display":"\udc00x\ud83d\ude00"}]}}"#,
    r#"{"resourceType":"Condition","id":"aa909cdeb3d975e07cb80d17d1612c0370574c5461996f1ba78fca0680d732aa","subject":{"reference":"Patient/586878d270d3dee07710acfc2dfa6f3c2f81a734652a950de7c54c27ba8b3194"},"code":{"text":"del\u007f and"}}"#,
    r#"{"resourceType":"Condition","id":"c2665191dcc56c220ade45e173aaad13d71227f4346caf0cb2d9a99dd3343fc1","subject":{"reference":"Patient/586878d270d3dee07710acfc2dfa6f3c2f81a734652a950de7c54c27ba8b3194"},"code":{"text":"trimmed"}}"#,
];

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// A finished run: its exit code, stderr, and the folders it used.
pub struct Run {
    pub code: Option<i32>,
    pub stderr: String,
    pub out: PathBuf,
    pub errors: PathBuf,
    _tmp: tempfile::TempDir,
}

/// Runs `etl` on `files` (name, content) with the test salt, within `LIMIT`.
pub fn run_on(
    files: &[(&str, Vec<u8>)],
    format: &str,
    extra: &[&str],
    env: &[(&str, &str)],
) -> Run {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in");
    std::fs::create_dir_all(&input).unwrap();
    for (name, content) in files {
        std::fs::write(input.join(name), content).unwrap();
    }
    let (out, phi, errors) = (
        tmp.path().join("out"),
        tmp.path().join("phi"),
        tmp.path().join("errors"),
    );
    phi_with_salt(&phi, SALT);
    let format = format!("--output-format={format}");
    let mut args = vec![
        "etl",
        &format,
        "--export-group=g",
        "--export-timestamp=2024-01-01T00:00:00Z",
        "--errors-to",
        p(&errors),
    ];
    args.extend_from_slice(extra);
    args.extend([p(&input), p(&out), p(&phi)]);
    let run = run_etl_within(&args, env, LIMIT);
    Run {
        code: run.status.code(),
        stderr: stderr(&run),
        out,
        errors,
        _tmp: tmp,
    }
}

fn lone_surrogate_file() -> Vec<(&'static str, Vec<u8>)> {
    vec![(
        "Condition.ndjson",
        (LONE_SURROGATE_LINES.join("\n") + "\n").into_bytes(),
    )]
}

/// The lines of every NDJSON file of a table folder, in file order.
fn ndjson_lines(dir: &Path) -> Vec<String> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    files.sort();
    files
        .iter()
        .filter(|f| f.extension().is_some_and(|e| e == "ndjson"))
        .flat_map(|f| {
            std::fs::read_to_string(f)
                .unwrap()
                .lines()
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .collect()
}

fn rejected_lines(errors: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(errors.join("rejected-rows.ndjson"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn lone_surrogates_are_kept_as_python_writes_them() {
    let run = run_on(&lone_surrogate_file(), "ndjson", &["--task=condition"], &[]);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert_eq!(ndjson_lines(&run.out.join("condition")), REFERENCE_ROWS);
    // The id and the reference cannot be hashed: skipped, as the reference skips them.
    let rejected = rejected_lines(&run.errors);
    let lines: Vec<u64> = rejected
        .iter()
        .map(|r| r["line"].as_u64().unwrap())
        .collect();
    assert_eq!(lines, [2, 3], "{rejected:?}");
    assert!(
        rejected
            .iter()
            .all(|r| r["reason"] == "text with an unpaired surrogate escape"),
        "{rejected:?}"
    );
    assert!(
        run.stderr.contains(
            "Condition.ndjson:2: skipped: text with an unpaired surrogate escape (field id"
        ),
        "{}",
        run.stderr
    );
}

#[test]
fn parquet_and_delta_skip_a_kept_lone_surrogate_and_say_why() {
    for format in ["parquet", "deltalake"] {
        let run = run_on(&lone_surrogate_file(), format, &["--task=condition"], &[]);
        assert_eq!(run.code, Some(0), "{format}: {}", run.stderr);
        let table = run.out.join("condition");
        let rows = if format == "parquet" {
            read_parquet_rows(&table)
        } else {
            read_delta_rows(&table)
        };
        let texts: Vec<&str> = rows
            .iter()
            .map(|r| r["code"]["text"].as_str().unwrap())
            .collect();
        assert_eq!(texts.len(), 2, "{format}: {rows:?}");
        assert!(
            texts.contains(&"del\u{7f} and") && texts.contains(&"trimmed"),
            "{texts:?}"
        );
        let rejected = rejected_lines(&run.errors);
        let lines: Vec<u64> = rejected
            .iter()
            .map(|r| r["line"].as_u64().unwrap())
            .collect();
        assert_eq!(lines, [1, 2, 3], "{format}: {rejected:?}");
        assert!(
            run.stderr.contains("Condition.ndjson:1: skipped: text with an unpaired surrogate escape (a kept text value; Parquet and Delta hold only UTF-8 text"),
            "{format}: {}",
            run.stderr
        );
    }
}

const GOOD: [&str; 3] = [
    r#"{"resourceType":"Condition","id":"g1","subject":{"reference":"Patient/p1"}}"#,
    r#"{"resourceType":"Condition","id":"g2","subject":{"reference":"Patient/p2"}}"#,
    r#"{"resourceType":"Condition","id":"g3","subject":{"reference":"Patient/p3"}}"#,
];

fn good_file() -> Vec<(&'static str, Vec<u8>)> {
    vec![("Condition.ndjson", (GOOD.join("\n") + "\n").into_bytes())]
}

#[test]
fn a_panic_on_one_line_skips_that_line_and_the_run_goes_on() {
    for format in ["ndjson", "parquet", "deltalake"] {
        let env = [("CUMULUS_ETL_TEST_PANIC", "line:Condition.ndjson:2")];
        let run = run_on(&good_file(), format, &["--task=condition"], &env);
        assert_eq!(run.code, Some(0), "{format}: {}", run.stderr);
        let rows = match format {
            "ndjson" => ndjson_lines(&run.out.join("condition")).len(),
            "parquet" => read_parquet_rows(&run.out.join("condition")).len(),
            _ => read_delta_rows(&run.out.join("condition")).len(),
        };
        assert_eq!(rows, 2, "{format}: {}", run.stderr);
        assert!(
            run.stderr.contains("Condition.ndjson:2: skipped: internal error (a bug: please report it) (internal error at src/panic_guard.rs"),
            "{format}: {}",
            run.stderr
        );
        let rejected = rejected_lines(&run.errors);
        assert_eq!(rejected.len(), 1, "{rejected:?}");
        assert_eq!(rejected[0]["row"], GOOD[1]);
    }
}

/// Runs the sample with a panic injected at `site`, and checks the run stops at once with
/// `code` and a message holding `names`.
fn assert_stops(site: &str, format: &str, code: i32, names: &[&str]) {
    let files: Vec<(String, Vec<u8>)> = std::fs::read_dir(synthea())
        .unwrap()
        .flatten()
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect();
    let files: Vec<(&str, Vec<u8>)> = files.iter().map(|(n, c)| (n.as_str(), c.clone())).collect();
    let env = [("CUMULUS_ETL_TEST_PANIC", site)];
    let started = std::time::Instant::now();
    let run = run_on(&files, format, &["--workers=2"], &env);
    assert_eq!(run.code, Some(code), "{site} {format}: {}", run.stderr);
    let last = run.stderr.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("The run stopped: "),
        "{site} {format}: {}",
        run.stderr
    );
    for name in names {
        assert!(last.contains(name), "{site} {format}: no {name} in {last}");
    }
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "{site} {format}: took {:?}",
        started.elapsed()
    );
}

#[test]
fn a_panic_in_a_source_stops_the_run_with_the_file_in_hand() {
    for format in ["ndjson", "deltalake"] {
        assert_stops(
            "source:Condition.000.ndjson",
            format,
            1,
            &[
                "reading ",
                "Condition.000.ndjson",
                "internal error at src/panic_guard.rs",
            ],
        );
    }
}

#[test]
fn a_panic_in_a_writer_stops_the_run_with_the_table() {
    for format in ["ndjson", "parquet", "deltalake"] {
        assert_stops(
            "writer:condition",
            format,
            19,
            &[
                "writing table condition",
                "internal error at src/panic_guard.rs",
            ],
        );
    }
}

#[test]
fn a_panic_in_a_delta_committer_stops_the_run_with_the_table() {
    assert_stops(
        "committer:condition",
        "deltalake",
        19,
        &[
            "writing table condition",
            "internal error at src/panic_guard.rs",
        ],
    );
}

#[test]
fn a_worker_thread_that_dies_takes_the_dataflow_down() {
    for worker in ["0", "1"] {
        assert_stops(
            &format!("worker:{worker}"),
            "ndjson",
            1,
            &[&format!("worker thread {worker} stopped")],
        );
    }
}

/// Damaged Patient and Condition lines (unique ids, so no row is a duplicate of another).
fn damaged_export() -> (Vec<(&'static str, Vec<u8>)>, usize) {
    let mut rng = Rng::new(0xdead_beef);
    let mut files = Vec::new();
    let mut count = 0;
    for (resource_type, name) in [
        ("Patient", "Patient.ndjson"),
        ("Condition", "Condition.ndjson"),
    ] {
        let mut content = Vec::new();
        for (line, keep) in sample_lines(resource_type, "d", 3000) {
            content.extend(damage(&line, keep, &mut rng));
            content.push(b'\n');
            count += 1;
        }
        files.push((name, content));
    }
    (files, count)
}

/// The number after "Skipped input (" in the run's summary (0 when nothing was skipped).
fn skipped_in_summary(stderr: &str) -> usize {
    stderr
        .split("Skipped input (")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .map_or(0, |n| n.replace(',', "").parse().unwrap())
}

#[test]
fn damaged_exports_finish_in_every_format_with_every_line_accounted_for() {
    let (files, lines) = damaged_export();
    for format in ["ndjson", "parquet", "deltalake"] {
        let run = run_on(&files, format, &["--task=patient,condition"], &[]);
        assert_eq!(run.code, Some(0), "{format}: {}", run.stderr);
        let mut written = 0;
        for table in ["patient", "condition"] {
            let dir = run.out.join(table);
            written += match format {
                "ndjson" => {
                    let rows: Vec<Vec<u8>> = ndjson_lines(&dir)
                        .into_iter()
                        .map(String::into_bytes)
                        .collect();
                    assert!(python_accepts(&rows).iter().all(|ok| *ok), "{table}");
                    rows.len()
                }
                "parquet" => read_parquet_rows(&dir).len(),
                _ => read_delta_rows(&dir).len(),
            };
        }
        let skipped = skipped_in_summary(&run.stderr);
        assert_eq!(written + skipped, lines, "{format}: {}", run.stderr);
        assert!(
            written > lines / 10 && skipped > lines / 4,
            "{format}: {written} {skipped}"
        );
        let rejected = rejected_lines(&run.errors).len();
        let unfit = unfit_rows(&run.errors);
        assert_eq!(rejected + unfit, skipped, "{format}: {}", run.stderr);
        // Values of the wrong type reach the Arrow writers, which leave out only their rows.
        assert_eq!(unfit > 0, format != "ndjson", "{format}: {}", run.stderr);
    }
}

/// Rows the Arrow writers could not fit into their table's schema, saved in the errors folder.
fn unfit_rows(errors: &Path) -> usize {
    ["patient", "condition"]
        .iter()
        .map(|t| {
            std::fs::read_to_string(errors.join(t).join("unfit-rows.ndjson"))
                .map_or(0, |s| s.lines().count())
        })
        .sum()
}

#[test]
fn lines_are_framed_as_python_reads_them() {
    // A byte order mark before the first line, a line of CRs, surrogates encoded in UTF-8
    // bytes (Python's surrogatepass reads them as lone surrogates), and a line of spaces, which
    // is no JSON (the reference warns about it; we count it).
    let mut content = Vec::new();
    content.extend_from_slice(b"\xef\xbb\xbf");
    content.extend_from_slice(GOOD[0].as_bytes());
    content.extend_from_slice(b"\n\r\n   \n");
    content.extend_from_slice(
        b"{\"resourceType\":\"Condition\",\"id\":\"s\",\"code\":{\"text\":\"a\xed\xa0\xbdb\"}}\n",
    );
    content.extend_from_slice(GOOD[1].as_bytes());
    let run = run_on(
        &[("Condition.ndjson", content)],
        "ndjson",
        &["--task=condition"],
        &[],
    );
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    let rows = ndjson_lines(&run.out.join("condition"));
    assert_eq!(rows.len(), 3, "{rows:?}");
    assert!(rows[1].contains(r#""text":"a\ud83db""#), "{rows:?}");
    let rejected = rejected_lines(&run.errors);
    assert_eq!(rejected.len(), 1, "{rejected:?}");
    assert_eq!(rejected[0]["line"], 3);
    assert_eq!(rejected[0]["reason"], "unparseable JSON");
}

/// Observations with numbers Python and serde_json read differently (also run side by side with
/// the reference in `reference.rs`).
pub const NUMBER_LINES: [&str; 4] = [
    r#"{"resourceType":"Observation","id":"o1","status":"final","code":{"text":"x"},"valueQuantity":{"value":123456789012345678901234}}"#,
    r#"{"resourceType":"Observation","id":"o2","status":"final","code":{"text":"x"},"valueInteger":18446744073709551616}"#,
    r#"{"resourceType":"Observation","id":"o3","status":"final","code":{"text":"x"},"valueInteger":-0}"#,
    r#"{"resourceType":"Observation","id":"o4","status":"final","code":{"text":"x"},"component":[{"valueQuantity":{"value":-9223372036854775809}},{"valueQuantity":{"value":1.5E+3}},{"valueQuantity":{"value":-0.0}}]}"#,
];

#[test]
fn integers_of_any_size_keep_their_digits_in_ndjson_and_columns_say_what_they_cannot_hold() {
    let file = vec![(
        "Observation.ndjson",
        (NUMBER_LINES.join("\n") + "\n").into_bytes(),
    )];
    let run = run_on(&file, "ndjson", &["--task", "observation"], &[]);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    let written = ndjson_lines(&run.out.join("observation")).join("\n");
    assert!(
        written.contains(r#""value":123456789012345678901234}"#),
        "{written}"
    );
    assert!(
        written.contains(r#""valueInteger":18446744073709551616}"#),
        "{written}"
    );
    assert!(
        written.contains(r#""valueInteger":0}"#),
        "Python reads -0 as 0: {written}"
    );
    // Parquet: a decimal column holds the nearest double; an integer column cannot hold the
    // integer beyond its range, so that row is skipped, saying why.
    let run = run_on(&file, "parquet", &["--task", "observation"], &[]);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    let rows = read_parquet_rows(&run.out.join("observation"));
    assert_eq!(rows.len(), 3, "{rows:?}");
    let quantity = rows
        .iter()
        .find_map(|r| r["valueQuantity"]["value"].as_f64());
    assert_eq!(quantity, Some(1.2345678901234568e23));
    assert!(
        run.stderr
            .contains("cannot read \"18446744073709551616\" as an integer"),
        "{}",
        run.stderr
    );
}
