//! The server engine: cTAKES REST for symptom mentions, then cNLP transformers (negation or
//! termexists) for their polarity, both cached in the PHI folder. Requests share one pooled
//! client, at most `concurrency` notes talk to the servers at once, and timeouts, 429 and 5xx
//! answers are retried with exponential backoff.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use futures::future::BoxFuture;
use serde_json::{Value, json};

use super::cache::NlpCache;
use super::engine::{Finding, SymptomEngine, covid_candidates, positive_findings};
use super::http::{Http, RetryPolicy};
use super::mention::{Mention, NEGATED, POSITIVE, SIGN_SYMPTOM, Utf16Offsets};
use super::study::{EngineSettings, PolarityModel};

/// Default cTAKES endpoint (`URL_CTAKES_REST`).
pub const DEFAULT_CTAKES_URL: &str = "http://localhost:8080/ctakes-web-rest/service/analyze";
/// Default cNLP negation endpoint (`URL_CNLP_NEGATION`).
pub const DEFAULT_CNLP_NEGATION_URL: &str = "http://localhost:8000/negation/process";
/// Default cNLP termexists endpoint (`URL_CNLP_TERM_EXISTS`).
pub const DEFAULT_CNLP_TERM_EXISTS_URL: &str = "http://localhost:8000/termexists/process";

/// Where the servers are, from the environment as Cumulus ETL reads it.
#[derive(Debug, Clone)]
pub struct ServerUrls {
    pub ctakes: String,
    pub cnlp: String,
}

impl ServerUrls {
    /// The URLs for a polarity model, from `URL_CTAKES_REST`, `URL_CNLP_NEGATION` and
    /// `URL_CNLP_TERM_EXISTS` or their defaults.
    pub fn from_env(model: PolarityModel) -> ServerUrls {
        let env = |k: &str, d: &str| std::env::var(k).unwrap_or_else(|_| d.to_string());
        ServerUrls {
            ctakes: env("URL_CTAKES_REST", DEFAULT_CTAKES_URL),
            cnlp: match model {
                PolarityModel::Negation => env("URL_CNLP_NEGATION", DEFAULT_CNLP_NEGATION_URL),
                PolarityModel::TermExists => {
                    env("URL_CNLP_TERM_EXISTS", DEFAULT_CNLP_TERM_EXISTS_URL)
                }
            },
        }
    }
}

/// cTAKES plus cNLP as a `SymptomEngine`.
pub struct CtakesSymptoms {
    pub http: Http,
    urls: ServerUrls,
    settings: EngineSettings,
    cache: NlpCache,
    covid_cuis: Arc<HashSet<String>>,
}

impl CtakesSymptoms {
    /// An engine talking to `urls`, with `concurrency` notes in flight at most.
    pub fn new(
        urls: ServerUrls,
        settings: EngineSettings,
        cache: NlpCache,
        covid_cuis: Arc<HashSet<String>>,
        concurrency: usize,
        retry: RetryPolicy,
    ) -> Result<CtakesSymptoms> {
        Ok(CtakesSymptoms {
            http: Http::new(concurrency, retry)?,
            urls,
            settings,
            cache,
            covid_cuis,
        })
    }

    async fn find_async(&self, note: &str) -> Result<Vec<Finding>> {
        let response = match self
            .cache
            .read::<Value>(&self.settings.ctakes_namespace, note)
        {
            Some(cached) => {
                self.http.stats.cache_hits.fetch_add(1, Ordering::Relaxed);
                cached
            }
            None => {
                let _permit = self.http.permit().await?;
                let answer = self.ctakes(note).await?;
                self.cache
                    .write(&self.settings.ctakes_namespace, note, &answer)
                    .context("writing the cTAKES cache")?;
                answer
            }
        };
        let candidates = covid_candidates(sign_symptoms(&response)?, &self.covid_cuis);
        if candidates.is_empty() {
            return Ok(Vec::new());
        }
        let polarities = match self
            .cache
            .read::<Vec<i8>>(&self.settings.cnlp_namespace, note)
            .filter(|p| p.len() == candidates.len())
        {
            Some(cached) => {
                self.http.stats.cache_hits.fetch_add(1, Ordering::Relaxed);
                cached
            }
            None => {
                let _permit = self.http.permit().await?;
                let answer = self.cnlp(note, &candidates).await?;
                self.cache
                    .write(&self.settings.cnlp_namespace, note, &answer)
                    .context("writing the cNLP cache")?;
                answer
            }
        };
        let positive: Vec<bool> = polarities.iter().map(|&p| p == POSITIVE).collect();
        Ok(positive_findings(candidates, &positive))
    }

    /// Asks cTAKES; the answer's offsets are converted to character offsets.
    async fn ctakes(&self, note: &str) -> Result<Value> {
        let body = self
            .http
            .send(|| {
                self.http
                    .client
                    .post(&self.urls.ctakes)
                    .header("Content-Type", "text/plain; charset=UTF-8")
                    .body(note.to_string())
            })
            .await
            .context("cTAKES")?;
        let mut answer: Value =
            serde_json::from_slice(&body).context("cTAKES answered something other than JSON")?;
        let offsets = Utf16Offsets::new(note);
        if let Some(groups) = answer.as_object_mut() {
            for list in groups.values_mut().filter_map(Value::as_array_mut) {
                for m in list.iter_mut().filter_map(Value::as_object_mut) {
                    for key in ["begin", "end"] {
                        if let Some(v) = m.get(key).and_then(Value::as_i64) {
                            m.insert(key.into(), json!(offsets.to_char(v)));
                        }
                    }
                }
            }
        }
        Ok(answer)
    }

    /// Asks cNLP for the polarity of each candidate span; returns cTAKES polarity values.
    async fn cnlp(&self, note: &str, candidates: &[Mention]) -> Result<Vec<i8>> {
        let spans: Vec<[i64; 2]> = candidates.iter().map(|m| [m.begin, m.end]).collect();
        let request = serde_json::to_vec(&json!({"doc_text": note, "entities": spans}))?;
        let body = self
            .http
            .send(|| {
                self.http
                    .client
                    .post(&self.urls.cnlp)
                    .header("Content-Type", "application/json")
                    .body(request.clone())
            })
            .await
            .context("cNLP")?;
        let answer: Value =
            serde_json::from_slice(&body).context("cNLP answered something other than JSON")?;
        let statuses = answer
            .get("statuses")
            .and_then(Value::as_array)
            .ok_or_else(|| anyhow!("cNLP answer has no statuses list"))?;
        if statuses.len() != spans.len() {
            bail!(
                "cNLP returned {} statuses for {} spans",
                statuses.len(),
                spans.len()
            );
        }
        let (positive, negative) = match self.settings.polarity {
            PolarityModel::Negation => (-1, 1),
            PolarityModel::TermExists => (1, -1),
        };
        statuses
            .iter()
            .map(|s| match s.as_i64() {
                Some(v) if v == positive => Ok(POSITIVE),
                Some(v) if v == negative => Ok(NEGATED),
                _ => Err(anyhow!("cNLP returned an unknown status {s}")),
            })
            .collect()
    }
}

impl SymptomEngine for CtakesSymptoms {
    fn find<'a>(&'a self, note: &'a str) -> BoxFuture<'a, Result<Vec<Finding>>> {
        Box::pin(self.find_async(note))
    }
}

/// The `SignSymptomMention` list of a cTAKES answer.
fn sign_symptoms(answer: &Value) -> Result<Vec<Mention>> {
    let Some(list) = answer.get(SIGN_SYMPTOM) else {
        return Ok(Vec::new());
    };
    let mut mentions: Vec<Mention> = serde_json::from_value(list.clone())
        .context("cTAKES answer has an unexpected SignSymptomMention shape")?;
    mentions.iter_mut().for_each(Mention::sort_concepts);
    Ok(mentions)
}

/// Checks that a server accepts connections, as Cumulus ETL does before a run: `attempts`
/// tries, `interval` apart.
pub async fn check_reachable(url: &str, attempts: u32, interval: Duration) -> Result<()> {
    let parsed = url::Url::parse(url).with_context(|| format!("invalid URL {url}"))?;
    let host = parsed.host_str().unwrap_or("localhost").to_string();
    let port = parsed.port_or_known_default().unwrap_or(80);
    for attempt in 0..attempts.max(1) {
        if tokio::net::TcpStream::connect((host.as_str(), port))
            .await
            .is_ok()
        {
            return Ok(());
        }
        if attempt + 1 < attempts {
            tokio::time::sleep(interval).await;
        }
    }
    bail!("could not connect to {host}:{port}")
}
