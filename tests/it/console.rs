//! What people see on standard error: a live progress display on a terminal (run under a
//! pseudo-terminal by util-linux `script`), plain lines anywhere else.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::support::{phi_with_salt, run_etl, synthea};

const SALT: &str = "e359591c4d1d4bc8e7b7b0a7c6e1f4a0b1c2d3e4f5a6b7c8d9e0f1a2b3c4d5e6";

/// A PHI folder with its salt and a path for the output, in `tmp`.
fn phi_and_output(tmp: &Path) -> (PathBuf, PathBuf) {
    let phi = tmp.join("phi");
    phi_with_salt(&phi, SALT);
    (phi, tmp.join("out"))
}

#[test]
fn on_a_terminal_the_run_draws_live_bars_and_leaves_the_last_frame_above_the_summary() {
    let tmp = tempfile::tempdir().unwrap();
    let (phi, out) = phi_and_output(tmp.path());
    let command = format!(
        "{} etl --output-format=ndjson {} {} {}",
        env!("CARGO_BIN_EXE_cumulus-etl"),
        synthea().display(),
        out.display(),
        phi.display()
    );
    let run = Command::new("script")
        .args(["--quiet", "--return", "--command", &command, "/dev/null"])
        .env("TERM", "xterm")
        .output()
        .expect("util-linux `script` runs (it gives the run a terminal)");
    let screen = String::from_utf8_lossy(&run.stdout);
    assert!(run.status.success(), "{screen}");
    // The last frame: the input read whole, and a full bar for a table whose rows are written.
    let frame_start = screen.rfind("input ").expect("a live frame");
    let summary = screen.find("Table ").expect("the summary");
    assert!(
        frame_start < summary,
        "the frame stays above the summary: {screen}"
    );
    let frame = &screen[frame_start..summary];
    assert!(frame.contains("100%") && frame.contains("done"), "{frame}");
    assert!(frame.contains("memory "), "{frame}");
    let patient = frame
        .lines()
        .find(|l| l.starts_with("patient "))
        .unwrap_or_else(|| panic!("a bar for patient: {frame}"));
    assert!(patient.contains(&"█".repeat(24)), "{patient}");
    assert!(patient.contains("13/13 rows"), "{patient}");
    // No plain progress lines on a terminal.
    assert!(!screen.contains("] read "), "{screen}");
    assert!(
        screen.contains("All tasks completed successfully"),
        "{screen}"
    );
}

#[test]
fn elsewhere_messages_are_plain_lines_without_terminal_codes() {
    let tmp = tempfile::tempdir().unwrap();
    let (phi, out) = phi_and_output(tmp.path());
    let run = run_etl(&[
        "--output-format=ndjson",
        synthea().to_str().unwrap(),
        out.to_str().unwrap(),
        phi.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{stderr}");
    assert!(!stderr.contains('\x1b'), "{stderr}");
    assert!(!stderr.contains('█'), "{stderr}");
    assert!(
        stderr.contains("All tasks completed successfully"),
        "{stderr}"
    );
}
