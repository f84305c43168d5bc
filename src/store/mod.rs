//! Where files live: local folders and S3 prefixes ([`ObjectLocation`]), and the file-system
//! helpers the local side is built on. Every file the ETL reads or writes goes through here.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

pub mod aws_profile;
pub mod objects;

pub use objects::{ObjectLocation, ObjectWriter, S3Settings, StoredObject};

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

/// Who may read what a location writes: everyone the file system lets (tables, job configs),
/// or only this user (PHI: the codebook's salt and id mappings, rejected input rows), whose
/// files are created `0600` and folders `0700`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Shared,
    Private,
}

/// Creates a folder and its missing parents (`0700` when private).
pub fn create_dir(dir: &Path, access: Access) -> Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    if access == Access::Private {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder
        .create(dir)
        .with_context(|| format!("creating {}", dir.display()))
}

/// Creates (or truncates) a file for writing (`0600` when private).
pub fn create_file(path: &Path, access: Access) -> Result<File> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if access == Access::Private {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    options
        .open(path)
        .with_context(|| format!("writing {}", path.display()))
}

/// The permission bits of a folder others can use (group or world), if any, so a run can warn
/// that a PHI folder it did not create is not private.
pub fn open_to_others(dir: &Path) -> Option<u32> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir).ok()?.permissions().mode() & 0o777;
        (mode & 0o077 != 0).then_some(mode)
    }
    #[cfg(not(unix))]
    {
        let _ = dir;
        None
    }
}

/// Writes a file so that readers see either the old or the new content, never a torn one.
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    write_atomic_parts(path, &[data], Access::Shared)
}

/// As `write_atomic`, for content in pieces (large files need not be joined in memory first),
/// with the given access.
pub fn write_atomic_parts(path: &Path, parts: &[&[u8]], access: Access) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    create_dir(dir, access)?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    {
        let mut f = create_file(&tmp, access)?;
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
