//! Objects under a location given as a URL: a local folder (`file://` or a plain path) or an
//! S3 prefix (`s3://bucket/prefix`), behind one interface, so that input discovery, the PHI
//! folder, the job config and the writers need not know where their files live.
//!
//! A folder is read and written with the file system directly (so input can still be
//! memory-mapped, and large files are written from their parts without joining them); S3 goes
//! through the `object_store` crate, the one delta-rs writes tables through, so a Delta log
//! store can share it. Writes are atomic (a local file appears by rename, an S3 object whole),
//! and `create` is a put-if-absent (a hard link locally, S3's `If-None-Match: *`). S3 settings come
//! from the standard AWS environment (credentials, `AWS_REGION`, web identity, container and
//! instance credentials; a shared-files profile's static keys and region, [`super::aws_profile`])
//! and `AWS_ENDPOINT_URL`/`AWS_ENDPOINT_URL_S3` for S3-compatible servers (a plain `http://`
//! endpoint is allowed); `--s3-region` and `--s3-kms-key` override. Every object written asks
//! for SSE-KMS, with the key when one is given. Buckets are never created.
//!
//! Calls are synchronous, for the threads that read inputs and write run files, and run on a
//! small runtime of their own; from within a multi-threaded async runtime they leave it first
//! (never call them from a current-thread runtime).

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock};

use super::syncer::Syncer;

use anyhow::{Context, Result, anyhow, bail};
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey, S3ConditionalPut};
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt as _, PutMode, PutOptions, PutPayload};

/// The runtime object calls run on (two threads: they mostly wait on the network).
static IO: LazyLock<tokio::runtime::Runtime> = LazyLock::new(|| {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("store-io")
        .enable_all()
        .build()
        .expect("a runtime for object storage")
});

/// Runs an object call to its end on the I/O runtime. Called from a thread of another
/// (multi-threaded) runtime, such as the NLP client's, the thread first leaves it.
fn wait<F: std::future::Future>(call: F) -> F::Output {
    match tokio::runtime::Handle::try_current() {
        Ok(_) => tokio::task::block_in_place(|| IO.block_on(call)),
        Err(_) => IO.block_on(call),
    }
}

/// A handle on the runtime object calls run on, for async code (delta-rs) that shares a
/// location's store: its connections then live on one runtime whatever calls them.
pub fn io_handle() -> tokio::runtime::Handle {
    IO.handle().clone()
}

/// S3 settings beside the AWS environment's.
#[derive(Debug, Clone, Default)]
pub struct S3Settings {
    /// `--s3-region`: overrides `AWS_REGION`.
    pub region: Option<String>,
    /// `--s3-kms-key`: every object written is encrypted with this KMS key (SSE-KMS).
    pub kms_key: Option<String>,
    /// The endpoint of an S3-compatible server; None: from the environment, else AWS.
    pub endpoint: Option<String>,
    /// An access key id and secret; None: the AWS credential chain.
    pub credentials: Option<(String, String)>,
}

/// `builder` with the account's region and credentials: `settings` first, then the environment
/// (which `AmazonS3Builder::from_env` read), then the shared files' profile for what the
/// environment leaves out (static keys, or keys from a `credential_process` or an assumed role,
/// [`super::aws_credentials`]); without keys, object_store's chain (web identity, ECS,
/// instance roles) finds them.
fn with_account(mut builder: AmazonS3Builder, settings: &S3Settings) -> Result<AmazonS3Builder> {
    // The shared files' profile fills in what the environment leaves out.
    let set = |name: &str| std::env::var(name).is_ok_and(|v| !v.is_empty());
    let files = super::aws_profile::SharedFiles::read();
    let name = super::aws_profile::selected_name();
    let profile = files.profile(&name);
    let region = settings.region.clone().or_else(|| {
        let from_env = set("AWS_REGION") || set("AWS_DEFAULT_REGION");
        profile.region.clone().filter(|_| !from_env)
    });
    if let Some(region) = &region {
        builder = builder.with_region(region);
    }
    let credentials = settings.credentials.clone().or_else(|| {
        let keys = (
            profile.access_key_id.clone(),
            profile.secret_access_key.clone(),
        );
        match keys {
            (Some(id), Some(secret)) if !set("AWS_ACCESS_KEY_ID") => Some((id, secret)),
            _ => None,
        }
    });
    if let Some((id, secret)) = &credentials {
        builder = builder
            .with_access_key_id(id)
            .with_secret_access_key(secret);
        if settings.credentials.is_none()
            && let Some(token) = &profile.session_token
        {
            builder = builder.with_token(token);
        }
    } else if !set("AWS_ACCESS_KEY_ID") {
        let region = region
            .clone()
            .or_else(|| std::env::var("AWS_REGION").ok())
            .or_else(|| std::env::var("AWS_DEFAULT_REGION").ok());
        let provider = super::aws_credentials::profile_provider(&files, &name, region.as_deref())
            .with_context(|| format!("the AWS profile {name}"))?;
        if let Some(provider) = provider {
            builder = builder.with_credentials(provider);
        }
    }
    Ok(builder)
}

/// The AWS account as the S3 store finds it ([`with_account`], no S3 settings), for another AWS
/// service: its credentials, and its region if the environment or profile names one.
pub fn aws_account() -> Result<(object_store::aws::AwsCredentialProvider, Option<String>)> {
    let builder = with_account(
        AmazonS3Builder::from_env().with_bucket_name("unused"),
        &S3Settings::default(),
    )?;
    let region = builder
        .get_config_value(&AmazonS3ConfigKey::Region)
        .or_else(|| builder.get_config_value(&AmazonS3ConfigKey::DefaultRegion))
        .filter(|r| !r.is_empty());
    let store = builder.build().context("setting up AWS credentials")?;
    Ok((store.credentials().clone(), region))
}

/// One object under a location: its key (relative to the location) and size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectEntry {
    pub key: String,
    pub size: u64,
}

/// A folder or an S3 prefix.
#[derive(Clone)]
pub struct ObjectLocation {
    backend: Backend,
    /// How messages name it (`s3://bucket/prefix` or the folder's path).
    url: String,
}

#[derive(Clone)]
enum Backend {
    Folder(PathBuf, super::Access),
    Remote {
        store: Arc<dyn ObjectStore>,
        bucket: String,
        prefix: ObjectPath,
    },
}

impl std::fmt::Debug for ObjectLocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.url)
    }
}

impl ObjectLocation {
    /// The location `arg` names: `s3://bucket[/prefix]`, `file://` URL or a local path.
    pub fn parse(arg: &str, s3: &S3Settings) -> Result<ObjectLocation> {
        match arg.split_once("://") {
            Some(("s3", rest)) => {
                let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
                if bucket.is_empty() {
                    bail!("'{arg}' names no bucket");
                }
                Self::s3(bucket, prefix.trim_end_matches('/'), s3)
            }
            Some(("file", path)) => Self::local(Path::new(path)),
            Some((scheme, _)) => bail!("'{arg}': {scheme}:// locations are not supported"),
            None => Self::local(Path::new(arg)),
        }
    }

    /// A local folder (created when something is written to it).
    pub fn local(dir: &Path) -> Result<ObjectLocation> {
        Self::folder(dir, super::Access::Shared)
    }

    /// A local folder holding PHI: it and its files are created readable by this user only.
    pub fn private_folder(dir: &Path) -> Result<ObjectLocation> {
        Self::folder(dir, super::Access::Private)
    }

    fn folder(dir: &Path, access: super::Access) -> Result<ObjectLocation> {
        Ok(ObjectLocation {
            backend: Backend::Folder(dir.to_path_buf(), access),
            url: dir.display().to_string(),
        })
    }

    /// The local folder, if this is one (for memory-mapping input).
    pub fn local_dir(&self) -> Option<&Path> {
        match &self.backend {
            Backend::Folder(dir, _) => Some(dir),
            Backend::Remote { .. } => None,
        }
    }

    /// The objects of `bucket` under `prefix`.
    pub fn s3(bucket: &str, prefix: &str, settings: &S3Settings) -> Result<ObjectLocation> {
        // As Cumulus ETL: SSE-KMS is always asked for (with the account's default key unless
        // one is given).
        let sse: AmazonS3ConfigKey = "aws_server_side_encryption"
            .parse()
            .expect("object_store knows its own configuration keys");
        let mut builder = AmazonS3Builder::from_env()
            .with_bucket_name(bucket)
            .with_conditional_put(S3ConditionalPut::ETagMatch)
            .with_config(sse, "aws:kms");
        let endpoint = settings.endpoint.clone().or_else(|| {
            ["AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"]
                .iter()
                .find_map(|name| std::env::var(name).ok())
        });
        if let Some(endpoint) = endpoint {
            builder = builder
                .with_allow_http(endpoint.starts_with("http://"))
                .with_endpoint(endpoint);
        }
        builder = with_account(builder, settings)?;
        if let Some(key) = &settings.kms_key {
            builder = builder.with_sse_kms_encryption(key);
        }
        let store = builder
            .build()
            .with_context(|| format!("setting up S3 access for s3://{bucket}"))?;
        Ok(ObjectLocation {
            backend: Backend::Remote {
                store: Arc::new(store),
                bucket: bucket.to_string(),
                prefix: ObjectPath::from(prefix),
            },
            url: match prefix {
                "" => format!("s3://{bucket}"),
                _ => format!("s3://{bucket}/{prefix}"),
            },
        })
    }

    /// How messages name the object `key` of this location.
    pub fn url_of(&self, key: &str) -> String {
        match key {
            "" => self.url.clone(),
            _ => format!("{}/{key}", self.url.trim_end_matches('/')),
        }
    }

    /// How messages and job configs name this location.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Whether this is an S3 prefix (not a local folder).
    pub fn is_remote(&self) -> bool {
        matches!(self.backend, Backend::Remote { .. })
    }

    /// The same location, for PHI: a folder and the files written to it are private to this
    /// user (S3 access is the bucket's policy).
    pub fn private(mut self) -> ObjectLocation {
        if let Backend::Folder(_, access) = &mut self.backend {
            *access = super::Access::Private;
        }
        self
    }

    /// The location `key` below this one (a subfolder or a longer prefix).
    pub fn join(&self, key: &str) -> ObjectLocation {
        let backend = match &self.backend {
            Backend::Folder(dir, access) => Backend::Folder(Self::file(dir, key), *access),
            Backend::Remote {
                store,
                bucket,
                prefix,
            } => Backend::Remote {
                store: store.clone(),
                bucket: bucket.clone(),
                prefix: Self::object_path(prefix, key),
            },
        };
        ObjectLocation {
            backend,
            url: self.url_of(key),
        }
    }

    /// The object `key` of this location, for reading.
    pub fn object(&self, key: &str) -> StoredObject {
        StoredObject {
            location: self.clone(),
            name: self.url_of(key),
            key: key.to_string(),
        }
    }

    /// Whether nothing is stored under the location (a missing folder is empty).
    pub fn is_empty(&self) -> Result<bool> {
        let (store, prefix) = match &self.backend {
            Backend::Folder(dir, _) => return super::is_empty_dir(dir),
            Backend::Remote { store, prefix, .. } => (store, prefix),
        };
        let from = (!prefix.as_ref().is_empty()).then_some(prefix);
        let first = wait(async { store.list(from).next().await.transpose() });
        match first {
            Ok(found) => Ok(found.is_none()),
            Err(e) => Err(explain(e, &self.url)),
        }
    }

    /// Whether the location can be read: a folder that exists, or a prefix with objects
    /// under it (S3 has no folders). A missing bucket or refused credentials are errors.
    pub fn exists(&self) -> Result<bool> {
        match &self.backend {
            Backend::Folder(dir, _) => Ok(dir.is_dir()),
            Backend::Remote { .. } => Ok(!self.is_empty()?),
        }
    }

    /// Creates the location, for a folder (S3 prefixes need no creating).
    pub fn create_folder(&self) -> Result<()> {
        match &self.backend {
            Backend::Folder(dir, access) => super::create_dir(dir, *access),
            Backend::Remote { .. } => Ok(()),
        }
    }

    /// A writer of the object `key`, which appears whole when [`ObjectWriter::finish`]ed and
    /// not at all if the writer is dropped first: a local file by rename, an S3 object by a
    /// multipart upload completed (or aborted) at the end.
    pub fn writer(&self, key: &str) -> Result<ObjectWriter> {
        let url = self.url_of(key);
        let target = match &self.backend {
            Backend::Folder(dir, access) => {
                let path = Self::file(dir, key);
                let folder = path.parent().unwrap_or(Path::new("."));
                let temp =
                    super::temp_file_in(folder, *access).map_err(|e| anyhow!("{url}: {e:#}"))?;
                WriteTarget::File { temp, path }
            }
            Backend::Remote { store, prefix, .. } => {
                let path = Self::object_path(prefix, key);
                let upload = object_store::buffered::BufWriter::with_capacity(
                    store.clone(),
                    path,
                    UPLOAD_PART_BYTES,
                );
                WriteTarget::Upload(Some(upload))
            }
        };
        Ok(ObjectWriter {
            out: std::io::BufWriter::with_capacity(WRITE_BUFFER_BYTES, WriteSink { target, url }),
            written: 0,
        })
    }

    /// Where delta-rs finds the table `key`: its URL and, for S3, the bucket's store (delta-rs
    /// gets S3 through this store rather than building its own).
    pub fn table(&self, key: &str) -> Result<(url::Url, Option<Arc<dyn ObjectStore>>)> {
        match &self.backend {
            Backend::Folder(dir, access) => {
                let dir = Self::file(dir, key);
                super::create_dir(&dir, *access)?;
                let dir = dir.canonicalize()?;
                let url = url::Url::from_directory_path(&dir)
                    .map_err(|_| anyhow!("{} is not a usable table path", dir.display()))?;
                Ok((url, None))
            }
            Backend::Remote {
                store,
                bucket,
                prefix,
            } => {
                let path = Self::object_path(prefix, key);
                let url = url::Url::parse(&format!("s3://{bucket}/{path}/"))
                    .with_context(|| format!("the table {}", self.url_of(key)))?;
                Ok((url, Some(store.clone())))
            }
        }
    }

    fn file(dir: &Path, key: &str) -> PathBuf {
        key.split('/')
            .filter(|part| !part.is_empty())
            .fold(dir.to_path_buf(), |path, part| path.join(part))
    }

    fn object_path(prefix: &ObjectPath, key: &str) -> ObjectPath {
        key.split('/')
            .filter(|part| !part.is_empty())
            .fold(prefix.clone(), |path, part| path.join(part))
    }

    /// Every object under the location (recursively), sorted by key.
    pub fn list(&self) -> Result<Vec<ObjectEntry>> {
        let (store, prefix) = match &self.backend {
            Backend::Folder(dir, _) => return list_folder(dir),
            Backend::Remote { store, prefix, .. } => (store, prefix),
        };
        let from = (!prefix.as_ref().is_empty()).then_some(prefix);
        let metas: Vec<object_store::ObjectMeta> =
            wait(store.list(from).try_collect()).map_err(|e| explain(e, &self.url))?;
        let mut entries: Vec<ObjectEntry> = metas
            .into_iter()
            .filter_map(|meta| {
                let key = meta.location.prefix_match(prefix)?;
                let key: Vec<String> = key.map(|part| part.as_ref().to_string()).collect();
                Some(ObjectEntry {
                    key: key.join("/"),
                    size: meta.size,
                })
            })
            .collect();
        entries.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(entries)
    }

    /// The whole object `key`; None if there is none.
    pub fn read(&self, key: &str) -> Result<Option<Bytes>> {
        let (store, prefix) = match &self.backend {
            Backend::Folder(dir, _) => {
                return match std::fs::read(Self::file(dir, key)) {
                    Ok(data) => Ok(Some(data.into())),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                    Err(e) => Err(anyhow!("{}: {e}", self.url_of(key))),
                };
            }
            Backend::Remote { store, prefix, .. } => (store, prefix),
        };
        let got = wait(async {
            let got = store.get(&Self::object_path(prefix, key)).await?;
            got.bytes().await
        });
        match got {
            Ok(bytes) => Ok(Some(bytes)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(explain(e, &self.url_of(key))),
        }
    }

    /// Bytes `range` of the object `key`.
    pub fn read_range(&self, key: &str, range: Range<u64>) -> Result<Bytes> {
        match &self.backend {
            Backend::Folder(dir, _) => {
                let read = || -> std::io::Result<Vec<u8>> {
                    let mut file = File::open(Self::file(dir, key))?;
                    file.seek(SeekFrom::Start(range.start))?;
                    let mut data = vec![0; (range.end - range.start) as usize];
                    file.read_exact(&mut data)?;
                    Ok(data)
                };
                read()
                    .map(Bytes::from)
                    .map_err(|e| anyhow!("{}: {e}", self.url_of(key)))
            }
            Backend::Remote { store, prefix, .. } => {
                wait(store.get_range(&Self::object_path(prefix, key), range))
                    .map_err(|e| explain(e, &self.url_of(key)))
            }
        }
    }

    /// The object `key` as a stream of bytes read as they come (no whole download).
    pub fn open(&self, key: &str) -> Result<Box<dyn Read + Send>> {
        self.open_if_exists(key)?
            .ok_or_else(|| anyhow!("{}: no such file or object", self.url_of(key)))
    }

    /// The object `key` as a stream of bytes (see [`ObjectLocation::open`]); None if there is
    /// none.
    pub fn open_if_exists(&self, key: &str) -> Result<Option<Box<dyn Read + Send>>> {
        let (store, prefix) = match &self.backend {
            Backend::Folder(dir, _) => {
                let file = match File::open(Self::file(dir, key)) {
                    Ok(file) => file,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                    Err(e) => return Err(anyhow!("{}: {e}", self.url_of(key))),
                };
                return Ok(Some(Box::new(std::io::BufReader::with_capacity(
                    1 << 20,
                    file,
                ))));
            }
            Backend::Remote { store, prefix, .. } => (store, prefix),
        };
        let got = match wait(store.get(&Self::object_path(prefix, key))) {
            Ok(got) => got,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(explain(e, &self.url_of(key))),
        };
        let url = self.url_of(key);
        let chunks = got
            .into_stream()
            .map_err(move |e| std::io::Error::other(explain(e, &url)));
        Ok(Some(Box::new(StreamRead {
            chunks: chunks.boxed(),
            current: Bytes::new(),
        })))
    }

    /// Writes the object `key` whole: readers see the old content or the new, never a part.
    pub fn write(&self, key: &str, data: Bytes) -> Result<()> {
        self.write_parts(key, &[&data])
    }

    /// [`Self::write`] for content in pieces, which a folder gets without joining them.
    pub fn write_parts(&self, key: &str, parts: &[&[u8]]) -> Result<()> {
        match &self.backend {
            Backend::Folder(..) => {
                let mut out = self.writer(key)?;
                for part in parts {
                    out.write_all(part)
                        .map_err(|e| anyhow!("{}: {e}", self.url_of(key)))?;
                }
                out.finish()
            }
            Backend::Remote { store, prefix, .. } => {
                let payload: PutPayload = parts.iter().map(|p| Bytes::copy_from_slice(p)).collect();
                wait(store.put(&Self::object_path(prefix, key), payload))
                    .map(|_| ())
                    .map_err(|e| explain(e, &self.url_of(key)))
            }
        }
    }

    /// Writes the object `key` only if there is none yet; false if there was one.
    pub fn create(&self, key: &str, data: Bytes) -> Result<bool> {
        match &self.backend {
            Backend::Folder(dir, access) => {
                let path = Self::file(dir, key);
                create_new(&path, &data, *access)
                    .map_err(|e| anyhow!("{}: {e:#}", self.url_of(key)))
            }
            Backend::Remote { store, prefix, .. } => {
                let options = PutOptions {
                    mode: PutMode::Create,
                    ..PutOptions::default()
                };
                let path = Self::object_path(prefix, key);
                let put = store.put_opts(&path, PutPayload::from(data), options);
                match wait(put) {
                    Ok(_) => Ok(true),
                    Err(object_store::Error::AlreadyExists { .. }) => Ok(false),
                    Err(e) => Err(explain(e, &self.url_of(key))),
                }
            }
        }
    }

    /// Adds `data` at the end of the object `key` (creating it). S3 objects cannot be appended
    /// to, so one is read and written again whole: for small files only.
    pub fn append(&self, key: &str, data: &[u8]) -> Result<()> {
        match &self.backend {
            Backend::Folder(dir, access) => {
                let path = Self::file(dir, key);
                super::create_dir(path.parent().unwrap_or(Path::new(".")), *access)?;
                super::open_options(*access)
                    .append(true)
                    .open(&path)
                    .and_then(|mut file| file.write_all(data))
                    .map_err(|e| anyhow!("{}: {e}", self.url_of(key)))
            }
            Backend::Remote { .. } => {
                let mut whole = self.read(key)?.map(Vec::from).unwrap_or_default();
                whole.extend_from_slice(data);
                self.write(key, whole.into())
            }
        }
    }

    /// Deletes the object `key` (nothing if there is none).
    pub fn delete(&self, key: &str) -> Result<()> {
        match &self.backend {
            Backend::Folder(dir, _) => match std::fs::remove_file(Self::file(dir, key)) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(anyhow!("{}: {e}", self.url_of(key))),
            },
            Backend::Remote { store, prefix, .. } => {
                match wait(store.delete(&Self::object_path(prefix, key))) {
                    Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                    Err(e) => Err(explain(e, &self.url_of(key))),
                }
            }
        }
    }
}

/// Every file under `dir` as an object: key relative to it, `/`-separated.
fn list_folder(dir: &Path) -> Result<Vec<ObjectEntry>> {
    if !dir.exists() {
        return Ok(Vec::new());
    }
    let mut entries = Vec::new();
    for path in super::list_files_recursive(dir)? {
        let size = std::fs::metadata(&path)?.len();
        let relative = path.strip_prefix(dir)?;
        let key: Vec<String> = relative
            .components()
            .map(|c| c.as_os_str().to_string_lossy().into_owned())
            .collect();
        entries.push(ObjectEntry {
            key: key.join("/"),
            size,
        });
    }
    entries.sort_by(|a, b| a.key.cmp(&b.key));
    Ok(entries)
}

/// Writes `path` only if it does not exist: the content goes to a temporary file first, which
/// is then hard-linked into place (the link fails if the name is taken), so no reader sees a
/// partial file. False if it existed.
fn create_new(path: &Path, data: &[u8], access: super::Access) -> Result<bool> {
    let mut tmp = super::temp_file_in(path.parent().unwrap_or(Path::new(".")), access)?;
    tmp.write_all(data)?;
    let linked = std::fs::hard_link(tmp.path(), path);
    match linked {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// One line naming the URL and what went wrong, in words a site's IT staff can act on.
fn explain(error: object_store::Error, url: &str) -> anyhow::Error {
    let text = error.to_string();
    // S3 errors end with the server's XML body: its code and message say it best.
    let tag = |name: &str| {
        let start = text.find(&format!("<{name}>"))? + name.len() + 2;
        let end = start + text[start..].find(&format!("</{name}>"))?;
        Some(text[start..end].to_string())
    };
    let code = tag("Code").unwrap_or_default();
    let what = match code.as_str() {
        "NoSuchBucket" => "the bucket does not exist",
        "AccessDenied" => "access denied (check the credentials and the bucket's policy)",
        "InvalidAccessKeyId" | "SignatureDoesNotMatch" | "ExpiredToken" => {
            "the credentials were refused"
        }
        _ => "",
    };
    let detail = match (code.is_empty(), tag("Message")) {
        (false, Some(message)) => format!("{code}: {message}"),
        _ => text.lines().next().unwrap_or_default().to_string(),
    };
    match what {
        "" => anyhow!("{url}: {detail}"),
        _ => anyhow!("{url}: {what} ({detail})"),
    }
}

/// A `Read` over a stream of byte chunks, each fetched when the last is used up.
struct StreamRead {
    chunks: futures::stream::BoxStream<'static, std::io::Result<Bytes>>,
    current: Bytes,
}

impl Read for StreamRead {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.current.is_empty() {
            match wait(self.chunks.next()) {
                Some(chunk) => self.current = chunk?,
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current[..n]);
        self.current = self.current.slice(n..);
        Ok(n)
    }
}

/// Bytes of an S3 upload sent as one part (S3 wants at least 5 MiB per part but the last).
const UPLOAD_PART_BYTES: usize = 8 << 20;

/// The buffer of an [`ObjectWriter`]: a write at least as large goes straight through.
pub const WRITE_BUFFER_BYTES: usize = 1 << 20;

/// One object of a location, named for messages by its URL or path.
#[derive(Clone)]
pub struct StoredObject {
    location: ObjectLocation,
    key: String,
    name: String,
}

impl std::fmt::Debug for StoredObject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name)
    }
}

impl StoredObject {
    /// Its URL, or its path in a local folder.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its key below the location it was found in.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The last part of its key.
    pub fn file_name(&self) -> &str {
        self.key.rsplit('/').next().unwrap_or(&self.key)
    }

    /// Its path, when it is a local file (which can be memory-mapped).
    pub fn local_path(&self) -> Option<PathBuf> {
        let dir = self.location.local_dir()?;
        Some(ObjectLocation::file(dir, &self.key))
    }

    /// Whether its name ends in `.gz`.
    pub fn is_gz(&self) -> bool {
        super::is_gz(Path::new(self.file_name()))
    }

    /// Its bytes as they are read (an S3 object is streamed, and a dropped connection picks
    /// up where it stopped).
    pub fn open(&self) -> Result<Box<dyn Read + Send>> {
        self.location.open(&self.key)
    }

    /// Its content as they are read, gunzipped when its name ends in `.gz`.
    pub fn open_decoded(&self) -> Result<Box<dyn Read + Send>> {
        let raw = self.open()?;
        if self.is_gz() {
            let buffered = std::io::BufReader::with_capacity(1 << 20, raw);
            Ok(Box::new(flate2::read::MultiGzDecoder::new(buffered)))
        } else {
            Ok(raw)
        }
    }

    /// Its whole content; None if it does not exist.
    pub fn read(&self) -> Result<Option<Bytes>> {
        self.location.read(&self.key)
    }
}

/// Writes one object; see [`ObjectLocation::writer`].
pub struct ObjectWriter {
    out: std::io::BufWriter<WriteSink>,
    /// Bytes written so far.
    written: u64,
}

impl std::io::Write for ObjectWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let wrote = self.out.write(buf)?;
        self.written += wrote as u64;
        Ok(wrote)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        // Nothing is visible before `finish`; flushing the buffer early only costs writes.
        Ok(())
    }
}

impl ObjectWriter {
    /// A writer of the object at `path` in `store` (any store, such as a Delta table's), which
    /// appears whole when finished, by a multipart upload (see [`ObjectLocation::writer`]).
    pub fn upload(store: Arc<dyn ObjectStore>, path: object_store::path::Path) -> ObjectWriter {
        let url = path.to_string();
        let upload =
            object_store::buffered::BufWriter::with_capacity(store, path, UPLOAD_PART_BYTES);
        ObjectWriter {
            out: std::io::BufWriter::with_capacity(
                1 << 20,
                WriteSink {
                    target: WriteTarget::Upload(Some(upload)),
                    url,
                },
            ),
            written: 0,
        }
    }

    /// How many bytes have been written to the object.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Makes the object appear with everything written to it.
    pub fn finish(self) -> Result<()> {
        self.written_out()?.finish()
    }

    /// [`ObjectWriter::finish`], where a local file is made durable and put in place on
    /// `syncer`'s thread (`store::syncer`), which then calls `then` with the outcome; an
    /// upload (or any object without a syncer) is finished here, and `then` called at once.
    pub fn finish_then(
        self,
        syncer: Option<&Syncer>,
        then: impl FnOnce(Result<()>) + Send + 'static,
    ) {
        match (self.written_out(), syncer) {
            (Ok(sink), Some(syncer)) if matches!(sink.target, WriteTarget::File { .. }) => {
                syncer.run(move || then(sink.finish()))
            }
            (sink, _) => then(sink.and_then(WriteSink::finish)),
        }
    }

    /// The sink, with every byte written to it.
    fn written_out(self) -> Result<WriteSink> {
        self.out.into_inner().map_err(|e| {
            let (error, out) = e.into_parts();
            anyhow!("{}: {error}", out.get_ref().url)
        })
    }
}

struct WriteSink {
    target: WriteTarget,
    url: String,
}

enum WriteTarget {
    File {
        temp: tempfile::NamedTempFile,
        path: PathBuf,
    },
    /// None once completed.
    Upload(Option<object_store::buffered::BufWriter>),
}

impl std::io::Write for WriteSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match &mut self.target {
            WriteTarget::File { temp, .. } => temp.write(buf),
            WriteTarget::Upload(upload) => {
                let upload = upload
                    .as_mut()
                    .expect("an upload is written before it completes");
                let bytes = Bytes::copy_from_slice(buf);
                wait(upload.put(bytes))
                    .map_err(|e| std::io::Error::other(explain(e, &self.url)))?;
                Ok(buf.len())
            }
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl WriteSink {
    fn finish(mut self) -> Result<()> {
        let url = self.url.clone();
        match &mut self.target {
            WriteTarget::File { .. } => {
                let WriteTarget::File { temp, path } =
                    std::mem::replace(&mut self.target, WriteTarget::Upload(None))
                else {
                    unreachable!("matched above")
                };
                temp.as_file().sync_all().ok();
                temp.persist(&path)
                    .map_err(|e| anyhow!("{url}: {}", e.error))?;
                Ok(())
            }
            WriteTarget::Upload(upload) => {
                let mut upload = upload.take().expect("an upload completes once");
                wait(tokio::io::AsyncWriteExt::shutdown(&mut upload))
                    .map_err(|e| anyhow!("{url}: {e}"))
            }
        }
    }
}

impl Drop for WriteSink {
    /// An upload not completed is aborted, so S3 keeps none of its parts.
    fn drop(&mut self) {
        if let WriteTarget::Upload(Some(upload)) = &mut self.target {
            let _ = wait(upload.abort());
        }
    }
}
