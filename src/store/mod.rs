//! Where files live. Today only local folders; every path the ETL touches goes through here so an
//! object-storage backend (`s3://`) can be added without touching the pipeline.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

pub mod objects;

/// A location given on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// A folder on a local or mounted file system.
    Local(PathBuf),
}

impl Location {
    /// Parses a command-line path; URLs of unsupported schemes are refused with a clear message.
    pub fn parse(arg: &str) -> Result<Location> {
        if let Some((scheme, _)) = arg.split_once("://") {
            bail!("'{arg}': {scheme}:// locations are not supported yet; use a local folder");
        }
        Ok(Location::Local(PathBuf::from(arg)))
    }

    /// The local path of this location.
    pub fn local_path(&self) -> &Path {
        match self {
            Location::Local(p) => p,
        }
    }

    /// Shown to users and recorded in job configs.
    pub fn display(&self) -> String {
        self.local_path().display().to_string()
    }
}

/// Every regular file under `root`, recursively, following symlinks, sorted by path.
pub fn list_files_recursive(root: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let entries =
            std::fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))?;
        for entry in entries {
            let path = entry?.path();
            let meta = std::fs::metadata(&path);
            match meta {
                Ok(m) if m.is_dir() => stack.push(path),
                Ok(m) if m.is_file() => out.push(path),
                _ => {}
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Whether a folder is missing or has nothing in it.
pub fn is_empty_dir(path: &Path) -> Result<bool> {
    match std::fs::read_dir(path) {
        Ok(mut it) => Ok(it.next().is_none()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(true),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// Writes a file so that readers see either the old or the new content, never a torn one.
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    write_atomic_parts(path, &[data])
}

/// As `write_atomic`, for content in pieces (large files need not be joined in memory first).
pub fn write_atomic_parts(path: &Path, parts: &[&[u8]]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    {
        let mut f = File::create(&tmp).with_context(|| format!("writing {}", tmp.display()))?;
        for part in parts {
            f.write_all(part)?;
        }
        f.sync_all().ok();
    }
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// Opens a file for reading, decompressing gzip when the name ends in `.gz`.
pub fn open_maybe_gz(path: &Path) -> Result<Box<dyn Read + Send>> {
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let reader = std::io::BufReader::with_capacity(1 << 20, file);
    if is_gz(path) {
        Ok(Box::new(flate2::read::MultiGzDecoder::new(reader)))
    } else {
        Ok(Box::new(reader))
    }
}

/// Whether a path names a gzip file.
pub fn is_gz(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gz"))
}
