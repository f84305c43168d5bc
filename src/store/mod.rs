//! Where files live: local folders and S3 prefixes ([`ObjectLocation`]), and the file-system
//! helpers the local side is built on. Every file the ETL reads or writes goes through here.

use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

pub mod aws_api;
pub mod aws_credentials;
pub mod aws_profile;
pub mod objects;
pub mod syncer;

pub use objects::{ObjectLocation, ObjectWriter, S3Settings, StoredObject};
pub use syncer::Syncer;

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
    open_options(access)
        .write(true)
        .truncate(true)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))
}

/// Options that create a missing file readable as `access` says (`0600` when private).
pub fn open_options(access: Access) -> std::fs::OpenOptions {
    let mut options = std::fs::OpenOptions::new();
    options.create(true);
    #[cfg(unix)]
    if access == Access::Private {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    options
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

/// A temporary file in `dir` (created with its parents), readable as `access` says: temporary
/// files start `0600`, and a shared one is opened up to `0644` before it takes its place.
pub fn temp_file_in(dir: &Path, access: Access) -> Result<tempfile::NamedTempFile> {
    create_dir(dir, access)?;
    let temp = tempfile::Builder::new()
        .prefix(".writing-")
        .tempfile_in(dir)
        .with_context(|| format!("writing in {}", dir.display()))?;
    #[cfg(unix)]
    if access == Access::Shared {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(temp.path(), std::fs::Permissions::from_mode(0o644))?;
    }
    Ok(temp)
}

/// Whether a path names a gzip file.
pub fn is_gz(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gz"))
}
