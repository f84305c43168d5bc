//! Cluster runs: several processes of the binary on this machine, connected by timely's cluster
//! mode through a hostfile of free local ports, give the tables and codebook of one process.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::{keyed_tables, phi_with_salt, read_table, run_etl, stderr, synthea};

/// A hostfile of `n` free ports on this machine.
fn hostfile(dir: &Path, n: usize) -> PathBuf {
    let listeners: Vec<std::net::TcpListener> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    let lines: Vec<String> = listeners
        .iter()
        .map(|l| l.local_addr().unwrap().to_string())
        .collect();
    let file = dir.join("hosts");
    std::fs::write(&file, lines.join("\n") + "\n").unwrap();
    file
}

/// Starts process `process` of a cluster run with these arguments.
fn start(args: &[&str], hosts: &Path, process: usize) -> Child {
    Command::new(env!("CARGO_BIN_EXE_cumulus-etl"))
        .args(args)
        .args(["--hostfile", hosts.to_str().unwrap()])
        .args(["--process", &process.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits for every process (at most `limit` in all); their exit codes and messages.
fn wait_all(children: Vec<Child>, limit: Duration) -> Vec<(Option<i32>, String)> {
    let deadline = Instant::now() + limit;
    children
        .into_iter()
        .map(|mut child| {
            while child.try_wait().unwrap().is_none() {
                if Instant::now() > deadline {
                    let _ = child.kill();
                    panic!("a cluster process was still running after {limit:?}");
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let out = child.wait_with_output().unwrap();
            (
                out.status.code(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            )
        })
        .collect()
}

/// Runs `processes` processes of `etl` into `out`; their exit codes and messages.
fn cluster_etl(
    dir: &Path,
    (input, out, phi): (&Path, &Path, &Path),
    processes: usize,
    extra: &[&str],
) -> Vec<(Option<i32>, String)> {
    let hosts = hostfile(dir, processes);
    let mut args = vec![
        input.to_str().unwrap(),
        out.to_str().unwrap(),
        phi.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let children = (0..processes).map(|p| start(&args, &hosts, p)).collect();
    wait_all(children, Duration::from_secs(120))
}

/// `copies` copies of the sample's files in `dir` (hard links, not copies of the bytes).
fn linked_copies(dir: &Path, copies: usize) {
    std::fs::create_dir_all(dir).unwrap();
    for entry in std::fs::read_dir(synthea()).unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(stem) = name.strip_suffix(".ndjson").filter(|s| *s != "log") {
            for copy in 0..copies {
                std::fs::hard_link(entry.path(), dir.join(format!("{stem}.{copy}.ndjson")))
                    .unwrap();
            }
        } else {
            std::fs::copy(entry.path(), dir.join(&name)).unwrap();
        }
    }
}

fn mappings(phi: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(phi.join("codebook-cached-mappings.json")).unwrap())
        .unwrap()
}

/// Every table of an NDJSON output, keyed by id (the completion table by table name, without
/// its run time).
fn ndjson_tables(out: &Path) -> Vec<(String, Vec<Value>)> {
    let mut tables = Vec::new();
    for entry in std::fs::read_dir(out).unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let key = match name.as_str() {
            "JobConfig" => continue,
            "etl__completion" => "table_name",
            "etl__completion_encounters" => "encounter_id",
            _ => "id",
        };
        let rows = read_table(&entry.path(), key)
            .into_values()
            .map(|mut row| {
                if let Some(row) = row.as_object_mut() {
                    row.remove("etl_time");
                }
                row
            })
            .collect();
        tables.push((name, rows));
    }
    tables.sort_by(|a, b| a.0.cmp(&b.0));
    tables
}

#[test]
fn three_processes_write_the_tables_and_codebook_of_one() {
    let tmp = tempfile::tempdir().unwrap();
    let (single, phi_single) = (tmp.path().join("single"), tmp.path().join("phi-single"));
    let (out, phi) = (tmp.path().join("out"), tmp.path().join("phi"));
    phi_with_salt(&phi_single, "c0ffee");
    phi_with_salt(&phi, "c0ffee");
    // The sample with a damaged line in each of two files (read by two processes, the
    // largest and a small one).
    let input = tmp.path().join("input");
    std::fs::create_dir_all(&input).unwrap();
    for entry in std::fs::read_dir(synthea()).unwrap().flatten() {
        let mut text = std::fs::read(entry.path()).unwrap();
        let name = entry.file_name().to_string_lossy().into_owned();
        if ["DocumentReference.000.ndjson", "Device.000.ndjson"].contains(&name.as_str()) {
            text.extend_from_slice(b"{\"resourceType\": \"Device\", broken\n");
        }
        std::fs::write(input.join(&name), text).unwrap();
    }
    let args = |out: &Path, phi: &Path| {
        [input.clone(), out.to_path_buf(), phi.to_path_buf()]
            .map(|p| p.to_str().unwrap().to_string())
    };
    let one = run_etl(
        &args(&single, &phi_single)
            .iter()
            .map(String::as_str)
            .chain(["--output-format", "ndjson"])
            .collect::<Vec<_>>(),
    );
    assert!(one.status.success(), "{}", stderr(&one));

    let runs = cluster_etl(
        tmp.path(),
        (&input, &out, &phi),
        3,
        &["--output-format", "ndjson", "--workers", "1"],
    );
    for (process, (code, log)) in runs.iter().enumerate() {
        assert_eq!(*code, Some(0), "process {process}: {log}");
    }
    // Process 0 prints the run's summary; the others say where it is.
    assert!(
        runs[0]
            .1
            .contains("⭐ All tasks completed successfully! ⭐"),
        "{}",
        runs[0].1
    );
    for (process, (_, log)) in runs.iter().enumerate().skip(1) {
        assert!(
            log.contains(&format!("Process {process}: its share is written")),
            "{log}"
        );
        assert!(!log.contains("Attempted"), "{log}");
    }
    // Each process read a share of the files, and the summary counts all of them.
    let procedures = runs[0]
        .1
        .lines()
        .find(|l| l.starts_with("procedure "))
        .unwrap()
        .to_string();
    assert!(procedures.contains(" 2056 "), "{procedures}");
    // The damaged lines are counted, and process 0 prints every process's warnings.
    let log = &runs[0].1;
    assert!(log.contains("Skipped input (2 in all):"), "{log}");
    let warned = log
        .lines()
        .filter(|l| l.contains(".ndjson:") && l.contains("skipped: unparseable JSON"))
        .count();
    assert_eq!(warned, 2, "{log}");
    assert!(log.contains("Warnings of process "), "{log}");
    // Rows crossed between processes on their way to their tables' sinks, and were counted.
    let sent = log
        .lines()
        .find_map(|l| l.strip_prefix("Cluster: 3 processes sent each other "))
        .unwrap_or_else(|| panic!("{log}"));
    assert!(!sent.starts_with("0 B"), "{sent}");

    assert_eq!(ndjson_tables(&out), ndjson_tables(&single));
    assert_eq!(mappings(&phi), mappings(&phi_single));
}

#[test]
fn three_processes_of_two_workers_write_the_delta_tables_of_one() {
    let tmp = tempfile::tempdir().unwrap();
    let (single, out, phi) = (
        tmp.path().join("single"),
        tmp.path().join("out"),
        tmp.path().join("phi"),
    );
    phi_with_salt(&phi, "c0ffee");
    // Five copies of the sample, far more than a budget of 16 MiB holds.
    let input = tmp.path().join("input");
    linked_copies(&input, 5);
    let one = run_etl(&[
        input.to_str().unwrap(),
        single.to_str().unwrap(),
        phi.to_str().unwrap(),
    ]);
    assert!(one.status.success(), "{}", stderr(&one));
    // A budget far below the input: rows that cross to another process must give their
    // memory back where they were read, or that process's reading waits forever.
    let runs = cluster_etl(
        tmp.path(),
        (&input, &out, &phi),
        3,
        &["--workers", "2", "--memory", "16MiB"],
    );
    for (process, (code, log)) in runs.iter().enumerate() {
        assert_eq!(*code, Some(0), "process {process}: {log}");
    }
    assert_eq!(keyed_tables(&out), keyed_tables(&single));
    // One completion row per task, in one commit by process 0.
    let completion = crate::support::read_delta_rows(&out.join("etl__completion"));
    assert_eq!(completion.len(), keyed_tables(&single).len() - 1);
}

#[test]
fn a_process_that_never_starts_stops_the_others_within_the_connect_timeout() {
    let tmp = tempfile::tempdir().unwrap();
    let (out, phi) = (tmp.path().join("out"), tmp.path().join("phi"));
    let hosts = hostfile(tmp.path(), 3);
    let input = synthea();
    let args = [
        input.to_str().unwrap(),
        out.to_str().unwrap(),
        phi.to_str().unwrap(),
        "--connect-timeout",
        "2",
    ];
    // Process 2 is never started.
    let started = Instant::now();
    let runs = wait_all(
        vec![start(&args, &hosts, 0), start(&args, &hosts, 1)],
        Duration::from_secs(60),
    );
    assert!(started.elapsed() < Duration::from_secs(30));
    for (code, log) in &runs {
        assert_eq!(*code, Some(1), "{log}");
        let last = log.lines().last().unwrap_or_default();
        assert!(last.contains("process 2 (127.0.0.1:"), "{log}");
        assert!(last.contains("did not connect within 2s"), "{log}");
    }
}

#[test]
fn a_process_killed_mid_run_stops_the_others_with_the_reason_and_a_rerun_completes_the_tables() {
    let tmp = tempfile::tempdir().unwrap();
    let (input, out, phi) = (
        tmp.path().join("input"),
        tmp.path().join("out"),
        tmp.path().join("phi"),
    );
    // Twenty copies of the sample: a run long enough to be killed in the middle of.
    linked_copies(&input, 20);
    let hosts = hostfile(tmp.path(), 3);
    let args = [
        input.to_str().unwrap(),
        out.to_str().unwrap(),
        phi.to_str().unwrap(),
        "--workers",
        "1",
    ];
    let mut children: Vec<Child> = (0..3).map(|p| start(&args, &hosts, p)).collect();
    std::thread::sleep(Duration::from_millis(2500));
    let mut killed = children.pop().unwrap();
    assert!(
        killed.try_wait().unwrap().is_none(),
        "process 2 ended before it was killed"
    );
    killed.kill().unwrap();
    killed.wait().unwrap();
    let started = Instant::now();
    let runs = wait_all(children, Duration::from_secs(60));
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
    for (code, log) in &runs {
        assert_eq!(*code, Some(1), "{log}");
        let last = log.lines().last().unwrap_or_default();
        assert!(
            last.contains("the connection to process 2 of the cluster run was lost"),
            "{log}"
        );
        assert!(!log.contains("This is a bug"), "{log}");
        assert!(!log.contains("MergeQueue"), "{log}");
        assert!(last.contains("a re-run completes them"), "{log}");
    }

    // The same command again on every process completes the Delta tables.
    let runs = wait_all(
        (0..3).map(|p| start(&args, &hosts, p)).collect(),
        Duration::from_secs(120),
    );
    for (process, (code, log)) in runs.iter().enumerate() {
        assert_eq!(*code, Some(0), "process {process}: {log}");
    }
    let single = tmp.path().join("single");
    let one = run_etl(&[
        input.to_str().unwrap(),
        single.to_str().unwrap(),
        phi.to_str().unwrap(),
    ]);
    assert!(one.status.success(), "{}", stderr(&one));
    assert_eq!(keyed_tables(&out), keyed_tables(&single));
}
