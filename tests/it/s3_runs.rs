//! Whole runs with INPUT, OUTPUT and PHI in S3 (moto's server, started per test), against the
//! same runs on local folders: the bundled sample, one file gzipped, read from S3; Delta tables
//! written to S3 and read back from S3 by Python `deltalake`; NDJSON output; the codebook; and
//! SSE-KMS with the given key on every object written.

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use bytes::Bytes;
use cumulus_etl::store::ObjectLocation;
use serde_json::Value;

use std::sync::atomic::Ordering::SeqCst;

use crate::s3_server::{FaultyProxy, S3Server};
use crate::support::{phi_with_salt, run_etl_within, stderr, synthea};

const KMS_KEY: &str = "arn:aws:kms:us-east-1:123456789012:key/cumulus-test";
const SALT: &str = "e359591c";
/// The sample file stored gzipped (in S3 and in the local twin).
const GZIPPED: &str = "Condition.000.ndjson";

/// A bucket holding the sample export under `export/` and a PHI codebook under `phi/`, and
/// the same export and codebook in local folders.
struct Site {
    server: S3Server,
    local: tempfile::TempDir,
}

impl Site {
    fn new() -> Site {
        let server = S3Server::start();
        server.create_bucket("hospital");
        let local = tempfile::tempdir().unwrap();
        let export = local.path().join("export");
        std::fs::create_dir_all(&export).unwrap();
        let bucket = ObjectLocation::parse("s3://hospital", &server.settings()).unwrap();
        for entry in std::fs::read_dir(synthea()).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_str().unwrap().to_string();
            let mut data = std::fs::read(&path).unwrap();
            let mut key = name.clone();
            if name == GZIPPED {
                data = gzip(&data);
                key.push_str(".gz");
            }
            std::fs::write(export.join(&key), &data).unwrap();
            bucket
                .write(&format!("export/{key}"), Bytes::from(data))
                .unwrap();
        }
        phi_with_salt(&local.path().join("phi"), SALT);
        let codebook = std::fs::read(local.path().join("phi/codebook.json")).unwrap();
        bucket.write("phi/codebook.json", codebook.into()).unwrap();
        Site { server, local }
    }

    /// The environment that points the binary at `endpoint`.
    fn env_via(&self, endpoint: &str) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ENDPOINT_URL", endpoint.to_string()),
            ("AWS_ACCESS_KEY_ID", "testing".into()),
            ("AWS_SECRET_ACCESS_KEY", "testing".into()),
            ("AWS_REGION", "us-east-1".into()),
        ]
    }

    /// Runs the ETL with `args` (INPUT OUTPUT PHI first); panics unless it exits 0.
    fn run(&self, args: &[&str]) -> String {
        self.run_via(&self.server.endpoint(), args)
    }

    /// [`Self::run`] with S3 reached at `endpoint`.
    fn run_via(&self, endpoint: &str, args: &[&str]) -> String {
        let out = self.attempt_via(endpoint, args);
        let text = stderr(&out);
        assert_eq!(out.status.code(), Some(0), "{text}");
        text
    }

    /// Runs the ETL with `args` against the server, whatever its exit code.
    fn attempt(&self, args: &[&str]) -> Output {
        self.attempt_via(&self.server.endpoint(), args)
    }

    fn attempt_via(&self, endpoint: &str, args: &[&str]) -> Output {
        let env = self.env_via(endpoint);
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        run_etl_within(args, &env, Duration::from_secs(300))
    }

    fn path(&self, name: &str) -> String {
        self.local.path().join(name).to_str().unwrap().to_string()
    }

    /// Every object under `prefix` with how it is encrypted: (key, SSE, KMS key id).
    fn encryption_of_all(&self, prefix: &str) -> Vec<(String, String, String)> {
        let script = r#"
import json, os, sys, boto3
s3 = boto3.client("s3", endpoint_url=sys.argv[1], region_name="us-east-1",
                  aws_access_key_id="testing", aws_secret_access_key="testing")
out = []
for page in s3.get_paginator("list_objects_v2").paginate(Bucket="hospital", Prefix=sys.argv[2]):
    for obj in page.get("Contents", []):
        head = s3.head_object(Bucket="hospital", Key=obj["Key"])
        out.append([obj["Key"], head.get("ServerSideEncryption", ""), head.get("SSEKMSKeyId", "")])
print(json.dumps(out), flush=True)
os._exit(0)  # skip interpreter teardown while the readers' threads may still run
"#;
        let out = crate::readers::run_script(script, &[&self.server.endpoint(), prefix]);
        out.as_array()
            .unwrap()
            .iter()
            .map(|row| {
                let field = |i: usize| row[i].as_str().unwrap().to_string();
                (field(0), field(1), field(2))
            })
            .collect()
    }
}

/// Completion rows without the time each run started.
fn without_etl_time(ndjson: &[u8]) -> Vec<Value> {
    let lines = ndjson.split(|&b| b == b'\n').filter(|l| !l.is_empty());
    lines
        .map(|line| {
            let mut row: Value = serde_json::from_slice(line).unwrap();
            row.as_object_mut()
                .unwrap()
                .remove("etl_time")
                .expect("etl_time");
            row
        })
        .collect()
}

fn gzip(data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(data).unwrap();
    encoder.finish().unwrap()
}

/// The tables (folders other than `JobConfig`) of a local output.
fn local_tables(output: &Path) -> Vec<String> {
    let mut tables: Vec<String> = std::fs::read_dir(output)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_str().unwrap().to_string())
        .filter(|name| name != "JobConfig")
        .collect();
    tables.sort();
    tables
}

/// What the Python scripts reading Delta tables from the server start with: `options` reach
/// it at the endpoint given as their first argument.
const DELTA_OPTIONS: &str = r#"
import json, os, sys
from deltalake import DeltaTable
options = {"AWS_ENDPOINT_URL": sys.argv[1], "AWS_ALLOW_HTTP": "true", "AWS_REGION": "us-east-1",
           "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
"#;

/// Runs a script that reads Delta tables from the server at `endpoint` (after its
/// [`DELTA_OPTIONS`]) with `args`.
fn read_delta_from(endpoint: &str, body: &str, args: &[&str]) -> Value {
    let script = format!("{DELTA_OPTIONS}{body}");
    let args: Vec<&str> = std::iter::once(endpoint)
        .chain(args.iter().copied())
        .collect();
    crate::readers::run_script(&script, &args)
}

/// Every table's rows as Python `deltalake` reads them, locally and from S3.
const COMPARE_DELTA: &str = r#"
local_root, s3_root = sys.argv[2], sys.argv[3]
def rows(table):
    rows = table.to_pyarrow_table().to_pylist()
    for row in rows:
        row.pop("etl_time", None)  # when each run started
    return sorted(json.dumps(r, sort_keys=True, default=str) for r in rows)
out = {}
for name in sys.argv[4].split(","):
    local = rows(DeltaTable(f"{local_root}/{name}"))
    remote = rows(DeltaTable(f"{s3_root}/{name}", storage_options=options))
    out[name] = {"local": len(local), "s3": len(remote), "same": set(local) == set(remote)}
    if name == "etl__completion":  # the rows of each run it records, by when the run started
        table = DeltaTable(f"{s3_root}/{name}", storage_options=options).to_pyarrow_table()
        times = table.column("etl_time").to_pylist()
        out[name]["runs"] = {t: times.count(t) for t in set(times)}
print(json.dumps(out), flush=True)
os._exit(0)  # skip interpreter teardown while the readers' threads may still run
"#;

/// Every Delta table of the local `output` holds the same rows in `s3://hospital/output`, into
/// which `runs` runs went, each recorded whole in `etl__completion`. Runs that started in the
/// same microsecond (two processes started at once can) write identical completion rows,
/// which the table keeps once, so between half of `runs` and `runs` runs are recorded.
fn assert_same_tables(site: &Site, output: &str, runs: usize) {
    let tables = local_tables(Path::new(output));
    assert!(tables.len() >= 10, "{tables:?}");
    let compared = read_delta_from(
        &site.server.endpoint(),
        COMPARE_DELTA,
        &[output, "s3://hospital/output", &tables.join(",")],
    );
    for table in &tables {
        let seen = &compared[table];
        assert_eq!(seen["same"], Value::Bool(true), "{table}: {seen}");
        let local = seen["local"].as_u64().unwrap();
        if table != "etl__completion" {
            assert_eq!(seen["s3"].as_u64().unwrap(), local, "{table}: {seen}");
            continue;
        }
        let recorded = seen["runs"].as_object().unwrap();
        assert!(
            recorded.len() <= runs && recorded.len() * 2 >= runs,
            "{table}: {seen}"
        );
        for rows in recorded.values() {
            assert_eq!(rows.as_u64(), Some(local), "{table}: {seen}");
        }
    }
    assert!(compared["condition"]["s3"].as_u64().unwrap() > 0);
}

/// The S3 side of the site's runs.
const S3_RUN: [&str; 3] = [
    "s3://hospital/export",
    "s3://hospital/output",
    "s3://hospital/phi",
];

#[test]
fn a_run_through_a_proxy_that_throttles_and_cuts_connections_ends_with_the_same_tables() {
    let site = Site::new();
    let (export, output, phi) = (site.path("export"), site.path("output"), site.path("phi"));
    site.run(&[&export, &output, &phi]);
    // One request in seven answered 503; one large GET in three cut halfway.
    let proxy = FaultyProxy::start(&site.server, 7, 3);
    site.run_via(&proxy.endpoint(), &S3_RUN);
    let (failed, cut) = (proxy.failed.load(SeqCst), proxy.cut.load(SeqCst));
    assert!(failed > 10 && cut > 3, "{failed} failed, {cut} cut");
    assert_same_tables(&site, &output, 1);
}

#[test]
fn two_runs_into_the_same_s3_tables_at_once_leave_every_row_once() {
    let site = Site::new();
    let (export, output, phi) = (site.path("export"), site.path("output"), site.path("phi"));
    site.run(&[&export, &output, &phi]);
    std::thread::scope(|scope| {
        let runs: Vec<_> = (0..2).map(|_| scope.spawn(|| site.run(&S3_RUN))).collect();
        for run in runs {
            run.join().unwrap();
        }
    });
    assert_same_tables(&site, &output, 2);
}

#[test]
fn an_etl_run_from_s3_into_s3_gives_the_tables_codebook_and_encryption_of_a_local_run() {
    let site = Site::new();
    let (export, output, phi) = (site.path("export"), site.path("output"), site.path("phi"));
    site.run(&[&export, &output, &phi]);
    let in_s3 = [S3_RUN[0], S3_RUN[1], S3_RUN[2], "--s3-kms-key", KMS_KEY];
    let text = site.run(&in_s3);
    assert!(text.contains("All tasks completed successfully"), "{text}");

    assert_same_tables(&site, &output, 1);

    // Again: the row indexes beside the tables in S3 leave every line out, and the tables
    // stay the same.
    let text = site.run(&in_s3);
    let condition = text
        .lines()
        .find(|l| l.trim_start().starts_with("condition: "))
        .unwrap_or_else(|| panic!("{text}"));
    let words: Vec<&str> = condition.split_whitespace().collect();
    assert_eq!(words[1], words[3], "{text}");
    assert!(words[1].parse::<u64>().unwrap() > 0, "{text}");
    assert!(text.contains("rows unchanged since the last run"), "{text}");
    assert_same_tables(&site, &output, 2);

    let bucket = ObjectLocation::parse("s3://hospital", &site.server.settings()).unwrap();
    for file in ["codebook.json", "codebook-cached-mappings.json"] {
        let local: Value =
            serde_json::from_slice(&std::fs::read(Path::new(&phi).join(file)).unwrap()).unwrap();
        let remote = bucket.read(&format!("phi/{file}")).unwrap().expect(file);
        let remote: Value = serde_json::from_slice(&remote).unwrap();
        assert_eq!(remote, local, "{file}");
    }
    let context = bucket.read("phi/context.json").unwrap().expect("context");
    let context: Value = serde_json::from_slice(&context).unwrap();
    assert_eq!(context["last_successful_input_dir"], "s3://hospital/export");

    // Everything this tool wrote, tables and PHI, is encrypted with the site's key.
    let written: Vec<_> = ["output/", "phi/context.json", "phi/codebook-cached"]
        .iter()
        .flat_map(|prefix| site.encryption_of_all(prefix))
        .collect();
    assert!(written.len() > 30, "{written:?}");
    for (key, sse, key_id) in &written {
        assert_eq!(
            (sse.as_str(), key_id.as_str()),
            ("aws:kms", KMS_KEY),
            "{key}"
        );
    }
}

#[test]
fn ndjson_output_in_s3_equals_the_local_output_file_for_file() {
    let site = Site::new();
    let (export, output, phi) = (site.path("export"), site.path("output"), site.path("phi"));
    let tasks = "--task=patient,condition,encounter";
    site.run(&[&export, &output, &phi, "--output-format=ndjson", tasks]);
    site.run(&[
        &export,
        "s3://hospital/output",
        "s3://hospital/phi",
        "--output-format=ndjson",
        tasks,
    ]);
    let local = ObjectLocation::local(Path::new(&output)).unwrap();
    let remote = ObjectLocation::parse("s3://hospital/output", &site.server.settings()).unwrap();
    let tables = |location: &ObjectLocation| -> Vec<String> {
        let entries = location.list().unwrap();
        let keys = entries.into_iter().map(|e| e.key);
        keys.filter(|k| !k.starts_with("JobConfig/")).collect()
    };
    let keys = tables(&local);
    assert!(
        keys.iter().any(|k| k == "condition/condition.000.ndjson"),
        "{keys:?}"
    );
    assert_eq!(tables(&remote), keys);
    for key in &keys {
        let (remote, local) = (remote.read(key).unwrap(), local.read(key).unwrap());
        if key.starts_with("etl__completion/") {
            assert_eq!(
                without_etl_time(&remote.unwrap()),
                without_etl_time(&local.unwrap())
            );
        } else {
            assert_eq!(remote, local, "{key}");
        }
    }
    // A second run into the same (now non-empty) prefix is refused, as for a folder.
    let again = site.attempt(&[
        &export,
        "s3://hospital/output",
        "s3://hospital/phi",
        "--output-format=ndjson",
        tasks,
    ]);
    assert_eq!(again.status.code(), Some(26), "{}", stderr(&again));
    assert!(
        stderr(&again).contains("'s3://hospital/output' already has contents"),
        "{}",
        stderr(&again)
    );
}

#[test]
fn a_missing_bucket_stops_the_run_with_one_line_naming_it() {
    let site = Site::new();
    let phi = site.path("phi");
    let out = site.attempt(&["s3://no-such-bucket/export", "s3://hospital/output", &phi]);
    let text = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    let line = text
        .lines()
        .find(|l| l.contains("no-such-bucket"))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(
        line.starts_with("s3://no-such-bucket/export: the bucket does not exist"),
        "{text}"
    );
    // Nothing was written for the run.
    let bucket = ObjectLocation::parse("s3://hospital/output", &site.server.settings()).unwrap();
    assert!(bucket.list().unwrap().is_empty());
}

#[test]
fn init_creates_empty_tables_in_s3_that_deltalake_reads() {
    let site = Site::new();
    let out = site.attempt(&["init", "s3://hospital/output", "--s3-kms-key", KMS_KEY]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let script = r#"
table = DeltaTable("s3://hospital/output/patient", storage_options=options)
print(json.dumps([table.to_pyarrow_table().num_rows, "birthDate" in table.schema().to_arrow().names]), flush=True)
os._exit(0)  # skip interpreter teardown while the readers' threads may still run
"#;
    let seen = read_delta_from(&site.server.endpoint(), script, &[]);
    assert_eq!(seen, serde_json::json!([0, true]));
}

#[test]
fn an_nlp_run_from_s3_into_s3_writes_the_files_of_a_local_run() {
    let site = Site::new();
    let (export, output, phi) = (site.path("export"), site.path("nlp"), site.path("phi"));
    let task = "--task=covid_symptom__nlp_results";
    site.run(&[
        "nlp",
        &export,
        &output,
        &phi,
        task,
        "--output-format=ndjson",
    ]);
    let s3 = [
        "s3://hospital/export",
        "s3://hospital/nlp",
        "s3://hospital/phi",
    ];
    site.run(&["nlp", s3[0], s3[1], s3[2], task, "--output-format=ndjson"]);
    let local = ObjectLocation::local(Path::new(&output)).unwrap();
    let remote = ObjectLocation::parse("s3://hospital/nlp", &site.server.settings()).unwrap();
    let results = |location: &ObjectLocation| -> Vec<String> {
        let keys = location.list().unwrap().into_iter().map(|e| e.key);
        keys.filter(|k| k.starts_with("covid_symptom/")).collect()
    };
    let keys = results(&local);
    assert!(keys.len() >= 2, "{keys:?}");
    assert_eq!(results(&remote), keys);
    for key in &keys {
        let (remote, local) = (remote.read(key).unwrap(), local.read(key).unwrap());
        let lines = |data: Option<Bytes>| -> Vec<Value> {
            let data = data.unwrap();
            let mut rows: Vec<Value> = data
                .split(|&b| b == b'\n')
                .filter(|l| !l.is_empty())
                .map(|line| match serde_json::from_slice::<Value>(line) {
                    Ok(mut row) => {
                        // When each run made the row.
                        row.as_object_mut().unwrap().remove("generated_on");
                        row
                    }
                    // The ids files list a note id per line.
                    Err(_) => Value::String(String::from_utf8_lossy(line).into_owned()),
                })
                .collect();
            rows.sort_by_key(|r| r.to_string());
            rows
        };
        assert_eq!(lines(remote), lines(local), "{key}");
    }
}

#[test]
fn an_errors_folder_in_s3_is_refused_since_it_holds_raw_rows() {
    let tmp = tempfile::tempdir().unwrap();
    let (out, phi) = (tmp.path().join("out"), tmp.path().join("phi"));
    let run = crate::support::run_etl(&[
        synthea().to_str().unwrap(),
        out.to_str().unwrap(),
        phi.to_str().unwrap(),
        "--errors-to=s3://hospital/errors",
    ]);
    assert_eq!(run.status.code(), Some(23), "{}", stderr(&run));
    assert!(
        stderr(&run).contains("--errors-to 's3://hospital/errors': must be a local folder"),
        "{}",
        stderr(&run)
    );
    assert!(!out.exists());
}

#[test]
fn convert_loads_an_ndjson_output_in_s3_into_delta_tables_in_s3() {
    let site = Site::new();
    let (export, phi) = (site.path("export"), site.path("phi"));
    let tasks = "--task=patient,condition";
    site.run(&[
        &export,
        "s3://hospital/ndjson",
        &phi,
        "--output-format=ndjson",
        tasks,
    ]);
    site.run(&["convert", "s3://hospital/ndjson", "s3://hospital/output"]);
    let script = r#"
out = {}
for name in ["patient", "condition"]:
    rows = DeltaTable(f"s3://hospital/output/{name}", storage_options=options).to_pyarrow_table()
    out[name] = sorted(rows.column("id").to_pylist())
print(json.dumps(out), flush=True)
os._exit(0)  # skip interpreter teardown while the readers' threads may still run
"#;
    let seen = read_delta_from(&site.server.endpoint(), script, &[]);
    let ndjson = ObjectLocation::parse("s3://hospital/ndjson", &site.server.settings()).unwrap();
    for table in ["patient", "condition"] {
        let text = ndjson
            .read(&format!("{table}/{table}.000.ndjson"))
            .unwrap()
            .expect(table);
        let mut ids: Vec<Value> = text
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| serde_json::from_slice::<Value>(l).unwrap()["id"].clone())
            .collect();
        ids.sort_by_key(|v| v.to_string());
        assert!(!ids.is_empty(), "{table}");
        assert_eq!(seen[table], Value::Array(ids), "{table}");
    }
    // The job configs came along: the Delta output belongs to the same PHI folder.
    let delta = ObjectLocation::parse("s3://hospital/output", &site.server.settings()).unwrap();
    let configs = delta.join("JobConfig").list().unwrap();
    assert!(
        configs.iter().any(|e| e.key.ends_with("/job_config.json")),
        "{configs:?}"
    );
}

#[test]
fn watch_loads_an_export_placed_in_s3_into_tables_in_s3_and_stops_on_sigterm() {
    let site = Site::new();
    let (export, output, phi) = (site.path("export"), site.path("output"), site.path("phi"));
    site.run(&[&export, &output, &phi]);
    let bucket = ObjectLocation::parse("s3://hospital", &site.server.settings()).unwrap();
    let mut watch = std::process::Command::new(env!("CARGO_BIN_EXE_cumulus-etl"));
    watch
        .args(["etl", "--watch", "--watch-interval", "1"])
        .args(["s3://hospital/exports", S3_RUN[1], S3_RUN[2]])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    for (key, value) in site.env_via(&site.server.endpoint()) {
        watch.env(key, value);
    }
    let watch = watch.spawn().unwrap();
    // The export appears once the watch runs; its log last (keys sort so), as an export
    // client writes `export_complete` once the files are written.
    for entry in bucket.list().unwrap() {
        if let Some(name) = entry.key.strip_prefix("export/") {
            let data = bucket.read(&entry.key).unwrap().unwrap();
            bucket.write(&format!("exports/one/{name}"), data).unwrap();
        }
    }
    let record = "output/JobConfig/watched-exports.ndjson";
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while bucket.read(record).unwrap().is_none() {
        assert!(
            std::time::Instant::now() < deadline,
            "the export was not loaded"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // SAFETY: a signal to the child this test started.
    unsafe { libc::kill(watch.id() as libc::pid_t, libc::SIGTERM) };
    let out = watch.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{log}");
    assert!(log.contains("watch: stopped (1 exports loaded)"), "{log}");
    let recorded: Value = serde_json::from_slice(&bucket.read(record).unwrap().unwrap()).unwrap();
    assert_eq!(recorded["export"], "one");
    assert_same_tables(&site, &output, 1);
}

#[test]
fn a_cluster_run_of_two_processes_from_s3_into_s3_gives_the_tables_of_a_local_run() {
    let site = Site::new();
    let (export, output, phi) = (site.path("export"), site.path("output"), site.path("phi"));
    site.run(&[&export, &output, &phi]);
    let ports: Vec<std::net::TcpListener> = (0..2)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    let hosts = site.local.path().join("hosts");
    let lines: Vec<String> = ports
        .iter()
        .map(|l| l.local_addr().unwrap().to_string())
        .collect();
    std::fs::write(&hosts, lines.join("\n")).unwrap();
    drop(ports);
    let env = site.env_via(&site.server.endpoint());
    let children: Vec<std::process::Child> = (0..2)
        .map(|process| {
            std::process::Command::new(env!("CARGO_BIN_EXE_cumulus-etl"))
                .args(S3_RUN)
                .args(["--hostfile", hosts.to_str().unwrap()])
                .args(["--process", &process.to_string()])
                .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for (process, child) in children.into_iter().enumerate() {
        let out = child.wait_with_output().unwrap();
        let log = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "process {process}: {log}");
    }
    assert_same_tables(&site, &output, 1);
    // Process 0 saved every process's id mappings in the PHI prefix.
    let bucket = ObjectLocation::parse("s3://hospital", &site.server.settings()).unwrap();
    let mappings = "codebook-cached-mappings.json";
    let in_s3: Value =
        serde_json::from_slice(&bucket.read(&format!("phi/{mappings}")).unwrap().unwrap()).unwrap();
    let local: Value =
        serde_json::from_slice(&std::fs::read(Path::new(&phi).join(mappings)).unwrap()).unwrap();
    assert_eq!(in_s3, local);
}

#[test]
fn a_first_loads_pieces_are_joined_in_s3_into_one_encrypted_file_that_deltalake_reads() {
    let site = Site::new();
    // 10,000 patients in two batches, each cut into two key ranges on two workers.
    let export = site.local.path().join("patients");
    std::fs::create_dir_all(&export).unwrap();
    let lines: Vec<String> = (0..10_000)
        .map(|i| format!(r#"{{"resourceType":"Patient","id":"p{i}","gender":"female"}}"#))
        .collect();
    std::fs::write(export.join("Patient.000.ndjson"), lines.join("\n")).unwrap();
    std::fs::copy(synthea().join("log.ndjson"), export.join("log.ndjson")).unwrap();
    site.run(&[
        export.to_str().unwrap(),
        "s3://hospital/joined",
        &site.path("phi"),
        "--task=patient",
        "--workers=2",
        "--batch-size=5000",
        "--s3-kms-key",
        KMS_KEY,
    ]);
    let body = r#"
table = DeltaTable("s3://hospital/joined/patient", storage_options=options)
files = table.file_uris()
rows = table.to_pyarrow_table().num_rows
print(json.dumps({"files": files, "rows": rows}), flush=True)
os._exit(0)
"#;
    let read = read_delta_from(&site.server.endpoint(), body, &[]);
    assert_eq!(read["rows"], 10_000, "{read}");
    assert_eq!(read["files"].as_array().unwrap().len(), 1, "{read}");
    // Four pieces were written and joined: every data file, joined or not, is encrypted.
    let written = site.encryption_of_all("joined/patient/");
    let data: Vec<_> = written
        .iter()
        .filter(|(key, _, _)| key.ends_with(".parquet") && !key.contains("_delta_log"))
        .collect();
    assert_eq!(data.len(), 5, "{written:?}");
    for (key, sse, key_id) in &written {
        assert_eq!(
            (sse.as_str(), key_id.as_str()),
            ("aws:kms", KMS_KEY),
            "{key}"
        );
    }
}
