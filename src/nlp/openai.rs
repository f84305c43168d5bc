//! The OpenAI chat-completions protocol, as Cumulus ETL speaks it to a vLLM server (its `local`
//! provider) and to Azure OpenAI (`azure`): `GET .../models` to check that the server has the
//! model, and `POST .../chat/completions` with the system and user messages, a strict
//! JSON-schema response format (or a JSON object, for models that take no schema), `seed`
//! 12345 and `temperature` 0. The same client asks AWS Bedrock's Converse API for the `bedrock`
//! provider ([`super::bedrock`]). Retries, timeouts and the concurrency limit are [`Http`]'s.

use anyhow::{Context, Result, anyhow, bail};
use serde_json::{Value, json};

use super::bedrock::{BedrockModel, parse_converse};
use super::http::Http;

/// Token counts a run reports (from each answer's `usage`).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    /// Prompt tokens not read from the server's prompt cache.
    pub new_input_tokens: u64,
    pub cache_read_input_tokens: u64,
    /// Prompt tokens written to the server's prompt cache (Bedrock counts them).
    pub cache_written_input_tokens: u64,
    pub output_tokens: u64,
}

/// A model's answer: its JSON object, the server's `system_fingerprint`, and its tokens.
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    pub answer: Value,
    pub fingerprint: Option<String>,
    pub usage: Usage,
}

/// Where a model is served.
#[derive(Debug, Clone)]
pub enum Endpoint {
    /// An OpenAI-compatible server; its API's base URL ends in `/v1`.
    Local { base_url: String },
    /// Azure OpenAI: the resource's endpoint, its API key, and the deployment to ask.
    Azure {
        endpoint: String,
        api_key: String,
        deployment: String,
    },
    /// AWS Bedrock's Converse API, its requests signed with the credentials found.
    Bedrock {
        model: BedrockModel,
        credentials: object_store::aws::AwsCredentialProvider,
    },
}

/// The API version Cumulus ETL's Azure client asks for.
pub const AZURE_API_VERSION: &str = "2024-10-21";

/// A client of one model on one OpenAI-compatible server.
pub struct ChatClient {
    pub http: Http,
    endpoint: Endpoint,
    /// The model's name in requests (the deployment's, on Azure).
    model: String,
    /// Whether the model takes a strict JSON schema (else a JSON object is asked for).
    schema: bool,
}

impl ChatClient {
    /// A client of `model` (named so in the list of models) at `endpoint`.
    pub fn new(http: Http, endpoint: Endpoint, model: &str, schema: bool) -> ChatClient {
        let endpoint = match endpoint {
            Endpoint::Local { base_url } => Endpoint::Local {
                base_url: base_url.trim_end_matches('/').to_string(),
            },
            Endpoint::Azure {
                endpoint,
                api_key,
                deployment,
            } => Endpoint::Azure {
                endpoint: endpoint.trim_end_matches('/').to_string(),
                api_key,
                deployment,
            },
            bedrock @ Endpoint::Bedrock { .. } => bedrock,
        };
        let model = match &endpoint {
            Endpoint::Azure { deployment, .. } => deployment.clone(),
            Endpoint::Local { .. } => model.to_string(),
            Endpoint::Bedrock { model, .. } => model.model.clone(),
        };
        ChatClient {
            http,
            endpoint,
            model,
            schema,
        }
    }

    /// A request to `path` of the API (`models`, `chat/completions`), with its credentials.
    fn api(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        match &self.endpoint {
            Endpoint::Local { base_url } => self
                .http
                .client
                .request(method, format!("{base_url}/{path}")),
            Endpoint::Azure {
                endpoint,
                api_key,
                deployment,
            } => {
                // The resource's own paths; the rest belong to the deployment.
                let path = match path {
                    p if p == "models" || p.starts_with("files") || p.starts_with("batches") => {
                        p.to_string()
                    }
                    other => format!("deployments/{deployment}/{other}"),
                };
                self.http
                    .client
                    .request(method, format!("{endpoint}/openai/{path}"))
                    .query(&[("api-version", AZURE_API_VERSION)])
                    .header("api-key", api_key)
            }
            Endpoint::Bedrock { model, .. } => self.http.client.request(method, model.url()),
        }
    }

    /// Whether the start-up check applies: Bedrock lists no models (upstream checks nothing).
    pub fn checks_model(&self) -> bool {
        !matches!(self.endpoint, Endpoint::Bedrock { .. })
    }

    /// Checks that the server answers and lists the model (`listed`). The error says which.
    pub async fn check_model(&self, listed: &str) -> Result<(), ModelCheck> {
        let body = self
            .http
            .send(|| self.api(reqwest::Method::GET, "models"))
            .await
            .map_err(|e| ModelCheck::Unreachable(format!("{e:#}")))?;
        let list: Value = serde_json::from_slice(&body)
            .map_err(|_| ModelCheck::Unreachable("the model list is not JSON".into()))?;
        let has = list
            .get("data")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .any(|m| m.get("id").and_then(Value::as_str) == Some(listed));
        match has {
            true => Ok(()),
            false => Err(ModelCheck::NoModel(listed.to_string())),
        }
    }

    /// The request body for a note, as upstream builds it: with the strict `response_format`
    /// for OpenAI's protocol, with pydantic's `json_schema` for Bedrock's.
    pub fn request(
        &self,
        system: &str,
        user: &str,
        response_format: &Value,
        json_schema: &Value,
    ) -> Value {
        if let Endpoint::Bedrock { model, .. } = &self.endpoint {
            return model.request(system, user, json_schema);
        }
        let response_format = match self.schema {
            true => response_format.clone(),
            false => json!({"type": "json_object"}),
        };
        json!({
            "model": self.model,
            "messages": [
                {"role": "system", "content": system},
                {"role": "user", "content": user},
            ],
            "seed": 12345,
            "temperature": 0,
            "response_format": response_format,
        })
    }

    /// Whether the model is asked through Azure OpenAI (whose batch API `--batch` uses).
    pub fn is_azure(&self) -> bool {
        matches!(self.endpoint, Endpoint::Azure { .. })
    }

    /// The body of a batch row: the request as upstream puts it in its batch file, which
    /// carries the client's `timeout` argument (120 seconds) among the fields.
    pub fn batch_body(&self, system: &str, user: &str, response_format: &Value) -> Value {
        let request = self.request(system, user, response_format, &Value::Null);
        let mut body = serde_json::Map::new();
        for (key, value) in request.as_object().into_iter().flatten() {
            if key == "response_format" {
                body.insert("timeout".into(), json!(120));
            }
            body.insert(key.clone(), value.clone());
        }
        Value::Object(body)
    }

    /// Uploads a batch input file (`POST files`, multipart with `purpose` "batch"); its id.
    pub async fn upload_batch_file(&self, name: &str, data: Vec<u8>) -> Result<String> {
        // A boundary the file cannot hold: the hash of its own content.
        let digest = <sha2::Sha256 as sha2::Digest>::digest(&data);
        let boundary = format!("cumulus-etl-{}", hex::encode(&digest[..16]));
        let mut body = Vec::with_capacity(data.len() + 512);
        body.extend_from_slice(
            format!(
                "--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n\
                 --{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{name}\"\r\n\
                 Content-Type: application/octet-stream\r\n\r\n"
            )
            .as_bytes(),
        );
        body.extend_from_slice(&data);
        body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
        let answer = self
            .http
            .send(|| {
                self.api(reqwest::Method::POST, "files")
                    .header(
                        "Content-Type",
                        format!("multipart/form-data; boundary={boundary}"),
                    )
                    .body(body.clone())
            })
            .await
            .context("uploading a batch file")?;
        id_of(&answer, "the uploaded batch file")
    }

    /// Starts a batch of the chat completions in an uploaded file; the batch's id.
    pub async fn create_batch(&self, file_id: &str) -> Result<String> {
        let body = serde_json::to_vec(&json!({
            "completion_window": "24h",
            "endpoint": "/v1/chat/completions",
            "input_file_id": file_id,
        }))?;
        let answer = self
            .http
            .send(|| {
                self.api(reqwest::Method::POST, "batches")
                    .header("Content-Type", "application/json")
                    .body(body.clone())
            })
            .await
            .context("creating a batch")?;
        id_of(&answer, "the new batch")
    }

    /// A batch as the API describes it (`status`, `output_file_id`, `error_file_id`).
    pub async fn batch(&self, id: &str) -> Result<Value> {
        let answer = self
            .http
            .send(|| self.api(reqwest::Method::GET, &format!("batches/{id}")))
            .await
            .with_context(|| format!("asking about batch {id}"))?;
        serde_json::from_slice(&answer).with_context(|| format!("batch {id}'s description"))
    }

    /// A file's content (a batch's output or errors).
    pub async fn file_content(&self, id: &str) -> Result<Vec<u8>> {
        self.http
            .send(|| self.api(reqwest::Method::GET, &format!("files/{id}/content")))
            .await
            .with_context(|| format!("downloading file {id}"))
    }

    /// Asks the model; the answer must be complete (`finish_reason` "stop") and a JSON object.
    pub async fn complete(&self, request: &Value) -> Result<Completion> {
        let body = serde_json::to_vec(request)?;
        if let Endpoint::Bedrock { model, credentials } = &self.endpoint {
            let credential = credentials
                .get_credential()
                .await
                .context("finding AWS credentials for Bedrock")?;
            let url = model.url();
            // Checked once here; each attempt below signs again (a signature is good for
            // minutes), the same way.
            model.signature(&credential, &url, &body)?;
            let answer = self
                .http
                .send(|| {
                    let signed = model.signature(&credential, &url, &body);
                    let request = self
                        .api(reqwest::Method::POST, "converse")
                        .header("Content-Type", "application/json")
                        .body(body.clone());
                    match signed {
                        Ok(headers) => request.headers(headers),
                        Err(_) => request,
                    }
                })
                .await
                .context("Bedrock")?;
            return parse_converse(&answer);
        }
        let answer = self
            .http
            .send(|| {
                self.api(reqwest::Method::POST, "chat/completions")
                    .header("Content-Type", "application/json")
                    .body(body.clone())
            })
            .await
            .context("the NLP server")?;
        parse_completion(&answer)
    }
}

/// Why the start-up check failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelCheck {
    Unreachable(String),
    NoModel(String),
}

impl std::fmt::Display for ModelCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ModelCheck::Unreachable(why) => write!(f, "NLP server is unreachable: {why}"),
            ModelCheck::NoModel(model) => {
                write!(f, "NLP server does not have model ID '{model}'.")
            }
        }
    }
}

/// The `id` of an API object.
fn id_of(answer: &[u8], what: &str) -> Result<String> {
    let value: Value =
        serde_json::from_slice(answer).with_context(|| format!("{what}: not JSON"))?;
    value
        .get("id")
        .and_then(Value::as_str)
        .map(str::to_string)
        .ok_or_else(|| anyhow!("{what} has no id"))
}

/// A chat completion's answer, fingerprint and tokens.
pub fn parse_completion(body: &[u8]) -> Result<Completion> {
    let response: Value = serde_json::from_slice(body)
        .map_err(|_| anyhow!("the NLP server answered something other than JSON"))?;
    let choice = response
        .pointer("/choices/0")
        .ok_or_else(|| anyhow!("the NLP server's answer has no choices"))?;
    let content = choice
        .pointer("/message/content")
        .and_then(Value::as_str)
        .ok_or_else(|| anyhow!("the NLP server's answer has no message content"))?;
    let answer: Value =
        serde_json::from_str(content).map_err(|_| anyhow!("the model's answer is not JSON"))?;
    if !answer.is_object() {
        bail!("the model's answer is not a JSON object");
    }
    let finish = choice.get("finish_reason").and_then(Value::as_str);
    if finish != Some("stop") {
        bail!(
            "did not complete, with finish reason: {}",
            finish.unwrap_or("none")
        );
    }
    let count = |pointer: &str| response.pointer(pointer).and_then(Value::as_u64);
    let prompt = count("/usage/prompt_tokens").unwrap_or(0);
    let cached = count("/usage/prompt_tokens_details/cached_tokens").unwrap_or(0);
    Ok(Completion {
        answer,
        fingerprint: response
            .get("system_fingerprint")
            .and_then(Value::as_str)
            .map(str::to_string),
        usage: Usage {
            new_input_tokens: prompt.saturating_sub(cached),
            cache_read_input_tokens: cached,
            cache_written_input_tokens: 0,
            output_tokens: count("/usage/completion_tokens").unwrap_or(0),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_completion_gives_its_answer_fingerprint_and_tokens() {
        let body = json!({
            "choices": [{"finish_reason": "stop",
                         "message": {"content": "{\"age\": 45, \"spans\": [\"45\"]}"}}],
            "system_fingerprint": "fp1",
            "usage": {"prompt_tokens": 100, "completion_tokens": 7,
                      "prompt_tokens_details": {"cached_tokens": 40}},
        });
        let done = parse_completion(body.to_string().as_bytes()).unwrap();
        assert_eq!(done.answer, json!({"age": 45, "spans": ["45"]}));
        assert_eq!(done.fingerprint.as_deref(), Some("fp1"));
        assert_eq!(
            done.usage,
            Usage {
                new_input_tokens: 60,
                cache_read_input_tokens: 40,
                cache_written_input_tokens: 0,
                output_tokens: 7
            }
        );
    }

    #[test]
    fn unfinished_or_malformed_answers_are_errors() {
        let with = |finish: &str, content: &str| {
            json!({"choices": [{"finish_reason": finish, "message": {"content": content}}]})
                .to_string()
        };
        let e = parse_completion(with("length", "{}").as_bytes()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "did not complete, with finish reason: length"
        );
        let e = parse_completion(with("stop", "not json").as_bytes()).unwrap_err();
        assert_eq!(e.to_string(), "the model's answer is not JSON");
        let e = parse_completion(with("stop", "[1]").as_bytes()).unwrap_err();
        assert_eq!(e.to_string(), "the model's answer is not a JSON object");
        assert!(parse_completion(b"<html>").is_err());
    }
}
