//! Whole runs with INPUT, OUTPUT and PHI in S3 (moto's server, started per test), against the
//! same runs on local folders: the bundled sample, one file gzipped, read from S3; Delta tables
//! written to S3 and read back from S3 by Python `deltalake`; NDJSON output; the codebook; and
//! SSE-KMS with the given key on every object written.

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use cumulus_etl::store::ObjectLocation;
use serde_json::Value;

use crate::s3_server::S3Server;
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

    /// The environment that points the binary at the server (as a site sets AWS_* for AWS).
    fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ENDPOINT_URL", self.server.endpoint()),
            ("AWS_ACCESS_KEY_ID", "testing".into()),
            ("AWS_SECRET_ACCESS_KEY", "testing".into()),
            ("AWS_REGION", "us-east-1".into()),
        ]
    }

    /// Runs the ETL with `args` (INPUT OUTPUT PHI first); panics unless it exits 0.
    fn run(&self, args: &[&str]) -> String {
        let env = self.env();
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let out = run_etl_within(args, &env, Duration::from_secs(300));
        let text = stderr(&out);
        assert_eq!(out.status.code(), Some(0), "{text}");
        text
    }

    fn path(&self, name: &str) -> String {
        self.local.path().join(name).to_str().unwrap().to_string()
    }

    /// Every object under `prefix` with how it is encrypted: (key, SSE, KMS key id).
    fn encryption_of_all(&self, prefix: &str) -> Vec<(String, String, String)> {
        let script = r#"
import json, sys, boto3
s3 = boto3.client("s3", endpoint_url=sys.argv[1], region_name="us-east-1",
                  aws_access_key_id="testing", aws_secret_access_key="testing")
out = []
for page in s3.get_paginator("list_objects_v2").paginate(Bucket="hospital", Prefix=sys.argv[2]):
    for obj in page.get("Contents", []):
        head = s3.head_object(Bucket="hospital", Key=obj["Key"])
        out.append([obj["Key"], head.get("ServerSideEncryption", ""), head.get("SSEKMSKeyId", "")])
print(json.dumps(out))
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

/// Every table's rows as Python `deltalake` reads them, locally and from S3.
const COMPARE_DELTA: &str = r#"
import json, sys
from deltalake import DeltaTable
endpoint, local_root, s3_root = sys.argv[1], sys.argv[2], sys.argv[3]
options = {"AWS_ENDPOINT_URL": endpoint, "AWS_ALLOW_HTTP": "true", "AWS_REGION": "us-east-1",
           "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
def rows(table):
    rows = table.to_pyarrow_table().to_pylist()
    for row in rows:
        row.pop("etl_time", None)  # when each run started
    return sorted(json.dumps(r, sort_keys=True, default=str) for r in rows)
out = {}
for name in sys.argv[4].split(","):
    local = rows(DeltaTable(f"{local_root}/{name}"))
    remote = rows(DeltaTable(f"{s3_root}/{name}", storage_options=options))
    out[name] = {"local": len(local), "s3": len(remote), "same": local == remote}
print(json.dumps(out))
"#;

#[test]
fn an_etl_run_from_s3_into_s3_gives_the_tables_codebook_and_encryption_of_a_local_run() {
    let site = Site::new();
    let (export, output, phi) = (site.path("export"), site.path("output"), site.path("phi"));
    site.run(&[&export, &output, &phi]);
    let text = site.run(&[
        "s3://hospital/export",
        "s3://hospital/output",
        "s3://hospital/phi",
        "--s3-kms-key",
        KMS_KEY,
    ]);
    assert!(text.contains("All tasks completed successfully"), "{text}");

    let tables = local_tables(Path::new(&output));
    assert!(tables.len() >= 10, "{tables:?}");
    let compared = crate::readers::run_script(
        COMPARE_DELTA,
        &[
            &site.server.endpoint(),
            &output,
            "s3://hospital/output",
            &tables.join(","),
        ],
    );
    for table in &tables {
        let seen = &compared[table];
        assert_eq!(seen["same"], Value::Bool(true), "{table}: {seen}");
    }
    assert!(compared["condition"]["s3"].as_u64().unwrap() > 0);

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
    let env = site.env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let again = run_etl_within(
        &[
            &export,
            "s3://hospital/output",
            "s3://hospital/phi",
            "--output-format=ndjson",
            tasks,
        ],
        &env,
        Duration::from_secs(120),
    );
    assert_eq!(again.status.code(), Some(26), "{}", stderr(&again));
    assert!(
        stderr(&again).contains("'s3://hospital/output' already has contents"),
        "{}",
        stderr(&again)
    );
}
