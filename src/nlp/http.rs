//! HTTP to NLP servers: one pooled client per engine, at most `concurrency` notes talking to
//! the servers at once, and timeouts, connection failures, 429 and 5xx answers retried with
//! exponential backoff (or after the server's `Retry-After`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use tokio::sync::{Semaphore, SemaphorePermit};

/// How requests are retried.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Retries after the first attempt.
    pub retries: u32,
    /// The first backoff; each retry doubles it (capped at 30 s).
    pub base_delay: Duration,
    /// Per-request timeout (cTAKES can take a while on long notes).
    pub timeout: Duration,
}

impl Default for RetryPolicy {
    fn default() -> RetryPolicy {
        RetryPolicy {
            retries: 4,
            base_delay: Duration::from_millis(500),
            timeout: Duration::from_secs(300),
        }
    }
}

/// Counters a run reports.
#[derive(Debug, Default)]
pub struct ServerStats {
    pub requests: AtomicU64,
    pub retries: AtomicU64,
    pub cache_hits: AtomicU64,
}

/// A pooled client, its concurrency limit, retry policy and counters.
pub struct Http {
    pub client: reqwest::Client,
    retry: RetryPolicy,
    permits: Semaphore,
    pub stats: ServerStats,
}

impl Http {
    /// A client for at most `concurrency` notes at once, retrying as `retry` says.
    pub fn new(concurrency: usize, retry: RetryPolicy) -> Result<Http> {
        let client = reqwest::Client::builder()
            .timeout(retry.timeout)
            .pool_max_idle_per_host(concurrency.max(1))
            .build()
            .context("creating the HTTP client")?;
        Ok(Http {
            client,
            retry,
            permits: Semaphore::new(concurrency.max(1)),
            stats: ServerStats::default(),
        })
    }

    /// Waits for one of the `concurrency` places; a note holds it while it talks to servers.
    pub async fn permit(&self) -> Result<SemaphorePermit<'_>> {
        Ok(self.permits.acquire().await?)
    }

    /// Sends a request, retrying connection failures, timeouts, 429 and 5xx.
    pub async fn send(&self, request: impl Fn() -> reqwest::RequestBuilder) -> Result<Vec<u8>> {
        let mut attempt = 0;
        loop {
            self.stats.requests.fetch_add(1, Ordering::Relaxed);
            let outcome = request().send().await;
            let (retryable, error, wait) = match outcome {
                Ok(resp) if resp.status().is_success() => {
                    return Ok(resp.bytes().await.context("reading the answer")?.to_vec());
                }
                Ok(resp) => {
                    let status = resp.status();
                    let wait = resp
                        .headers()
                        .get("Retry-After")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.trim().parse::<u64>().ok())
                        .map(Duration::from_secs);
                    let retryable = status.as_u16() == 429 || status.is_server_error();
                    (retryable, anyhow!("HTTP status {status}"), wait)
                }
                Err(e) => (
                    e.is_timeout() || e.is_connect() || e.is_request(),
                    anyhow!("{}", describe(&e)),
                    None,
                ),
            };
            if !retryable || attempt >= self.retry.retries {
                let tries = attempt + 1;
                return Err(error.context(format!(
                    "failed after {tries} attempt{}",
                    if tries == 1 { "" } else { "s" }
                )));
            }
            let backoff = self.retry.base_delay * 2u32.saturating_pow(attempt);
            let delay = wait.unwrap_or(backoff).min(Duration::from_secs(30));
            self.stats.retries.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(delay).await;
            attempt += 1;
        }
    }
}

/// A transport error without the URL's query or any note text.
fn describe(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        "timed out".into()
    } else if e.is_connect() {
        "could not connect".into()
    } else {
        e.to_string()
    }
}
