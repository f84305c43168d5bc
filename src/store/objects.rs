//! Objects under a location given as a URL: a local folder (`file://` or a plain path) or an
//! S3 prefix (`s3://bucket/prefix`), behind one interface, so that input discovery, the PHI
//! folder, the job config and the writers need not know where their files live.
//!
//! Both backends are the `object_store` crate's (the one delta-rs writes tables through), so a
//! Delta log store can share them: writes are atomic (a local file appears by rename, an S3
//! object whole), and `create` is a put-if-absent (S3's `If-None-Match: *`). S3 settings come
//! from the standard AWS environment (credentials, `AWS_REGION`, web identity, container and
//! instance credentials) and `AWS_ENDPOINT_URL`/`AWS_ENDPOINT_URL_S3` for S3-compatible
//! servers (a plain `http://` endpoint is allowed); `--s3-region` and `--s3-kms-key` override,
//! the key encrypting every object written with SSE-KMS. Buckets are never created.
//!
//! Calls are synchronous, for the threads that read inputs and write run files, and run on a
//! small runtime of their own; they must not be made from within an async runtime.

use std::io::Read;
use std::ops::Range;
use std::path::Path;
use std::sync::{Arc, LazyLock};

use anyhow::{Context, Result, anyhow, bail};
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use object_store::aws::{AmazonS3Builder, S3ConditionalPut};
use object_store::local::LocalFileSystem;
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

/// One object under a location: its key (relative to the location) and size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectEntry {
    pub key: String,
    pub size: u64,
}

/// A folder or an S3 prefix, and the store that holds it.
#[derive(Clone)]
pub struct ObjectLocation {
    store: Arc<dyn ObjectStore>,
    prefix: ObjectPath,
    /// How messages name it (`s3://bucket/prefix` or the folder's path).
    url: String,
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

    /// A local folder (created if missing).
    pub fn local(dir: &Path) -> Result<ObjectLocation> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let store = LocalFileSystem::new_with_prefix(dir)
            .with_context(|| format!("opening {}", dir.display()))?;
        Ok(ObjectLocation {
            store: Arc::new(store),
            prefix: ObjectPath::default(),
            url: dir.display().to_string(),
        })
    }

    /// The objects of `bucket` under `prefix`.
    pub fn s3(bucket: &str, prefix: &str, settings: &S3Settings) -> Result<ObjectLocation> {
        let mut builder = AmazonS3Builder::from_env()
            .with_bucket_name(bucket)
            .with_conditional_put(S3ConditionalPut::ETagMatch);
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
        if let Some(region) = &settings.region {
            builder = builder.with_region(region);
        }
        if let Some((id, secret)) = &settings.credentials {
            builder = builder
                .with_access_key_id(id)
                .with_secret_access_key(secret);
        }
        if let Some(key) = &settings.kms_key {
            builder = builder.with_sse_kms_encryption(key);
        }
        let store = builder
            .build()
            .with_context(|| format!("setting up S3 access for s3://{bucket}"))?;
        Ok(ObjectLocation {
            store: Arc::new(store),
            prefix: ObjectPath::from(prefix),
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

    fn path(&self, key: &str) -> ObjectPath {
        key.split('/')
            .filter(|part| !part.is_empty())
            .fold(self.prefix.clone(), |path, part| path.join(part))
    }

    /// Every object under the location (recursively), sorted by key.
    pub fn list(&self) -> Result<Vec<ObjectEntry>> {
        let prefix = (!self.prefix.as_ref().is_empty()).then_some(&self.prefix);
        let metas: Vec<object_store::ObjectMeta> = IO
            .block_on(self.store.list(prefix).try_collect())
            .map_err(|e| explain(e, &self.url))?;
        let mut entries: Vec<ObjectEntry> = metas
            .into_iter()
            .filter_map(|meta| {
                let key = meta.location.prefix_match(&self.prefix)?;
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
        let got = IO.block_on(async {
            let got = self.store.get(&self.path(key)).await?;
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
        IO.block_on(self.store.get_range(&self.path(key), range))
            .map_err(|e| explain(e, &self.url_of(key)))
    }

    /// The object `key` as a stream of bytes read as they come (no whole download).
    pub fn open(&self, key: &str) -> Result<Box<dyn Read + Send>> {
        let got = IO
            .block_on(self.store.get(&self.path(key)))
            .map_err(|e| explain(e, &self.url_of(key)))?;
        let url = self.url_of(key);
        let chunks = got
            .into_stream()
            .map_err(move |e| std::io::Error::other(explain(e, &url)));
        Ok(Box::new(StreamRead {
            chunks: chunks.boxed(),
            current: Bytes::new(),
        }))
    }

    /// Writes the object `key` whole: readers see the old content or the new, never a part.
    pub fn write(&self, key: &str, data: Bytes) -> Result<()> {
        IO.block_on(self.store.put(&self.path(key), PutPayload::from(data)))
            .map(|_| ())
            .map_err(|e| explain(e, &self.url_of(key)))
    }

    /// Writes the object `key` only if there is none yet; false if there was one.
    pub fn create(&self, key: &str, data: Bytes) -> Result<bool> {
        let options = PutOptions {
            mode: PutMode::Create,
            ..PutOptions::default()
        };
        let path = self.path(key);
        let put = self.store.put_opts(&path, PutPayload::from(data), options);
        match IO.block_on(put) {
            Ok(_) => Ok(true),
            Err(object_store::Error::AlreadyExists { .. }) => Ok(false),
            Err(e) => Err(explain(e, &self.url_of(key))),
        }
    }

    /// Deletes the object `key` (nothing if there is none).
    pub fn delete(&self, key: &str) -> Result<()> {
        match IO.block_on(self.store.delete(&self.path(key))) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(explain(e, &self.url_of(key))),
        }
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
            match IO.block_on(self.chunks.next()) {
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
