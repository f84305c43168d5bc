//! Delta tables read back by independent readers: the Python `deltalake` package and DuckDB's
//! delta extension (delta-kernel-rs based; it reads deletion vectors), installed once into a
//! virtualenv under the user's cache folder (or `CUMULUS_TEST_PYTHON`, a Python that has them),
//! with moto's S3 server (`tests/it/s3_server.rs`) and the reference's HTML-to-text converter.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use serde_json::Value;

/// The HTML-to-text converter the reference uses and the lxml (so libxml2) it reads HTML with,
/// at the reference's versions (`tests/it/html_text.rs` compares against them).
const INSCRIPTIS: [&str; 2] = ["inscriptis==2.7.6", "lxml==6.1.3"];

/// The DuckDB release, and the delta extension package built for it (they must match).
const DUCKDB: &str = "duckdb==1.4.4";
const DUCKDB_DELTA: &str = "duckdb-ext-delta==1.4.4.*";

/// A Python with `deltalake`, `pyarrow`, `duckdb` and its delta extension, and moto's S3 server;
/// installed once per test run (tests asking at once wait for it).
pub fn python() -> PathBuf {
    static PYTHON: OnceLock<PathBuf> = OnceLock::new();
    PYTHON.get_or_init(install).clone()
}

fn install() -> PathBuf {
    if let Ok(p) = std::env::var("CUMULUS_TEST_PYTHON") {
        return PathBuf::from(p);
    }
    let home = std::env::var("HOME").unwrap();
    let venv = Path::new(&home).join(".cache/cumulus-etl-test-venv");
    let python = venv.join("bin/python");
    let has = |p: &Path| {
        Command::new(p)
            .args([
                "-c",
                "import deltalake, pyarrow, duckdb, duckdb_ext, moto, flask_cors, inscriptis",
            ])
            .status()
            .is_ok_and(|s| s.success())
    };
    if !has(&python) {
        if !python.exists() {
            let ok = Command::new("python3")
                .args(["-m", "venv", venv.to_str().unwrap()])
                .status()
                .unwrap()
                .success();
            assert!(ok, "could not create {}", venv.display());
        }
        let ok = Command::new(&python)
            .args(["-m", "pip", "install", "--quiet", "deltalake", "pyarrow"])
            .args([DUCKDB, DUCKDB_DELTA, "moto[s3]", "flask", "flask-cors"])
            .args(INSCRIPTIS)
            .status()
            .unwrap()
            .success();
        assert!(ok, "could not install the Python Delta readers");
    }
    python
}

/// Runs a Python script (with the readers) on `args`; its standard output as JSON.
pub fn run_script(script: &str, args: &[&str]) -> Value {
    let out = Command::new(python())
        .arg("-c")
        .arg(script)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

const READ_BOTH: &str = r#"
import glob, json, os, sys
import duckdb, deltalake, pyarrow
path, columns, with_deltalake = sys.argv[1], sys.argv[2].split(","), sys.argv[3] == "1"
select = ", ".join(f'"{c}"' for c in columns)
out = {}
if with_deltalake:
    table = deltalake.DeltaTable(path)
    protocol = table.protocol()
    # Its query engine (to_pyarrow_table refuses tables with deletion vectors).
    query = deltalake.QueryBuilder().register("t", table).execute(f"SELECT {select} FROM t")
    out["deltalake"] = pyarrow.table(query.read_all()).to_pylist()
    out["protocol"] = {
        "minReaderVersion": protocol.min_reader_version,
        "minWriterVersion": protocol.min_writer_version,
        "readerFeatures": protocol.reader_features,
        "writerFeatures": protocol.writer_features,
    }
root = os.path.join(os.path.dirname(duckdb.__file__), "..", "duckdb_ext", "extensions")
extension = glob.glob(os.path.join(root, "v*", "*", "delta.duckdb_extension"))[0]
con = duckdb.connect(config={"allow_unsigned_extensions": "true"})
con.execute(f"LOAD '{extension}'")
cursor = con.execute(f"SELECT {select} FROM delta_scan('{path}')")
names = [d[0] for d in cursor.description]
out["duckdb"] = [dict(zip(names, row)) for row in cursor.fetchall()]
print(json.dumps(out, default=str), flush=True)
os._exit(0)  # skip interpreter teardown while the readers' threads may still run
"#;

/// What the readers saw of one table.
pub struct ReadBack {
    /// Rows read by Python `deltalake`'s query engine (None when not asked).
    pub deltalake: Option<Vec<Value>>,
    /// Rows read by DuckDB.
    pub duckdb: Vec<Value>,
    /// The protocol as Python `deltalake` read it (from the checkpoint when there is one).
    pub protocol: Option<Value>,
}

/// The `columns` of every row of the Delta table at `table`, as both readers read it (DuckDB
/// only, unless `with_deltalake`).
pub fn read_both(table: &Path, columns: &[&str], with_deltalake: bool) -> ReadBack {
    let flag = if with_deltalake { "1" } else { "0" };
    let out = run_script(
        READ_BOTH,
        &[table.to_str().unwrap(), &columns.join(","), flag],
    );
    let rows = |v: &Value| v.as_array().cloned();
    ReadBack {
        deltalake: rows(&out["deltalake"]),
        duckdb: rows(&out["duckdb"]).unwrap(),
        protocol: out.get("protocol").cloned(),
    }
}
