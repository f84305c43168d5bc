//! AWS Bedrock's Converse API, as Cumulus ETL's `bedrock` provider asks it (boto3's
//! `bedrock-runtime` client): `POST <endpoint>/model/<model id>/converse` with the system prompt,
//! the user message and `temperature` 0; for models that take a schema, a `to_json` tool whose
//! input schema is the task's and which the model must use; a cache point after the system
//! prompt and the tools for models with prompt caching. The answer is the tool's input, or JSON
//! in the text (fenced as Markdown or not). Requests are signed with AWS Signature Version 4
//! (object_store's signer), with the credentials the S3 store finds (environment, web identity,
//! ECS or instance roles).

use anyhow::{Result, anyhow, bail};
use serde_json::{Value, json};

use super::openai::{Completion, Usage};

/// Where the Converse API is and how to ask a model there.
#[derive(Debug, Clone)]
pub struct BedrockModel {
    /// The runtime's base URL (`https://bedrock-runtime.<region>.amazonaws.com`, or the
    /// endpoint boto3 would take from `AWS_ENDPOINT_URL_BEDROCK_RUNTIME` or `AWS_ENDPOINT_URL`).
    pub base_url: String,
    pub region: String,
    /// The model id (`modelId`).
    pub model: String,
    /// Whether the model takes a tool's input schema, and whether it caches prompts.
    pub schema: bool,
    pub cache: bool,
}

/// The service name requests are signed for (boto3's for `bedrock-runtime`).
const SIGNING_SERVICE: &str = "bedrock";

impl BedrockModel {
    /// The runtime of `region`, or the endpoint the environment names for it (as boto3 reads it).
    pub fn base_url_from_env(region: &str) -> String {
        crate::store::aws_api::service_url(
            "AWS_ENDPOINT_URL_BEDROCK_RUNTIME",
            format!("https://bedrock-runtime.{region}.amazonaws.com"),
        )
    }

    /// The Converse URL of the model (its id escaped as one path segment, as botocore does).
    pub fn url(&self) -> String {
        let mut id = String::new();
        for byte in self.model.bytes() {
            match byte {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                    id.push(char::from(byte))
                }
                other => id.push_str(&format!("%{other:02X}")),
            }
        }
        format!("{}/model/{id}/converse", self.base_url)
    }

    /// The request body for a note, as upstream builds it (`schema`: pydantic's JSON schema).
    pub fn request(&self, system: &str, user: &str, schema: &Value) -> Value {
        let mut system_prompts = vec![json!({"text": system})];
        if self.cache {
            system_prompts.push(json!({"cachePoint": {"type": "default"}}));
        }
        let mut request = json!({
            "system": system_prompts,
            "messages": [{"role": "user", "content": [{"text": user}]}],
            "inferenceConfig": {"temperature": 0},
        });
        if self.schema {
            let mut tools = vec![json!({"toolSpec": {
                "name": "to_json",
                "description": "convert to JSON",
                "inputSchema": {"json": schema},
            }})];
            if self.cache {
                tools.push(json!({"cachePoint": {"type": "default"}}));
            }
            request["toolConfig"] = json!({
                "tools": tools,
                "toolChoice": {"tool": {"name": "to_json"}},
            });
        }
        request
    }

    /// The headers that sign a POST of `body` to `url` with `credential`, at the time now.
    pub fn signature(
        &self,
        credential: &object_store::aws::AwsCredential,
        url: &str,
        body: &[u8],
    ) -> Result<reqwest::header::HeaderMap> {
        crate::store::aws_api::signed_post(
            credential,
            (SIGNING_SERVICE, &self.region),
            url,
            "application/json",
            body,
        )
    }
}

/// The model's answer in a Converse response: a `to_json` tool's input (unwrapped from the
/// single `parameter` or `$PARAMETER_NAME` field some models wrap it in), or JSON in a text
/// block (inside a Markdown fence, if there is one); with the tokens it took.
pub fn parse_converse(body: &[u8]) -> Result<Completion> {
    let response: Value = serde_json::from_slice(body)
        .map_err(|_| anyhow!("Bedrock answered something other than JSON"))?;
    let stop = response.get("stopReason").and_then(Value::as_str);
    if !matches!(stop, Some("end_turn" | "tool_use")) {
        bail!(
            "did not complete, with stop reason: {}",
            stop.unwrap_or("none")
        );
    }
    let blocks = response
        .pointer("/output/message/content")
        .and_then(Value::as_array)
        .ok_or_else(|| anyhow!("no response content found"))?;
    let mut answer = None;
    for block in blocks {
        if let Some(input) = block.pointer("/toolUse/input") {
            let mut input = input.clone();
            if let Some(object) = input.as_object()
                && object.len() == 1
                && let Some(inner) = object
                    .get("parameter")
                    .or_else(|| object.get("$PARAMETER_NAME"))
            {
                input = inner.clone();
            }
            answer = Some(input);
            break;
        }
        if let Some(text) = block.get("text").and_then(Value::as_str) {
            let pieces: Vec<&str> = text.split("```").collect();
            let json_text = match pieces.len() {
                3 => pieces[1].strip_prefix("json").unwrap_or(pieces[1]),
                _ => text,
            };
            let parsed: Value = serde_json::from_str(json_text.trim())
                .map_err(|_| anyhow!("the model's answer is not JSON"))?;
            answer = Some(parsed);
            break;
        }
    }
    let answer = answer.ok_or_else(|| anyhow!("no response content found"))?;
    if !answer.is_object() {
        bail!("the model's answer is not a JSON object");
    }
    let count = |name: &str| {
        response
            .pointer(&format!("/usage/{name}"))
            .and_then(Value::as_u64)
            .unwrap_or(0)
    };
    Ok(Completion {
        answer,
        fingerprint: None,
        usage: Usage {
            new_input_tokens: count("inputTokens"),
            cache_read_input_tokens: count("cacheReadInputTokens"),
            cache_written_input_tokens: count("cacheWriteInputTokens"),
            output_tokens: count("outputTokens"),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(schema: bool, cache: bool) -> BedrockModel {
        BedrockModel {
            base_url: "http://127.0.0.1:9".into(),
            region: "us-east-1".into(),
            model: "us.anthropic.claude-sonnet-4-5-20250929-v1:0".into(),
            schema,
            cache,
        }
    }

    #[test]
    fn requests_carry_the_tool_and_cache_points_the_model_takes() {
        let schema = json!({"type": "object"});
        let full = model(true, true).request("sys", "note", &schema);
        assert_eq!(
            full,
            json!({
                "system": [{"text": "sys"}, {"cachePoint": {"type": "default"}}],
                "messages": [{"role": "user", "content": [{"text": "note"}]}],
                "inferenceConfig": {"temperature": 0},
                "toolConfig": {
                    "tools": [
                        {"toolSpec": {"name": "to_json", "description": "convert to JSON",
                                      "inputSchema": {"json": schema}}},
                        {"cachePoint": {"type": "default"}},
                    ],
                    "toolChoice": {"tool": {"name": "to_json"}},
                },
            })
        );
        let bare = model(false, false).request("sys", "note", &schema);
        assert_eq!(bare["system"], json!([{"text": "sys"}]));
        assert!(bare.get("toolConfig").is_none());
        assert_eq!(
            model(true, false).url(),
            "http://127.0.0.1:9/model/us.anthropic.claude-sonnet-4-5-20250929-v1%3A0/converse"
        );
    }

    #[test]
    fn answers_come_from_the_tool_or_from_fenced_text() {
        let tool = json!({"stopReason": "tool_use",
            "output": {"message": {"content": [
                {"reasoningContent": {"reasoningText": {"text": "hmm"}}},
                {"toolUse": {"name": "to_json", "input": {"parameter": {"a": 1}}}}]}},
            "usage": {"inputTokens": 10, "outputTokens": 3, "cacheReadInputTokens": 5,
                      "cacheWriteInputTokens": 7}});
        let done = parse_converse(tool.to_string().as_bytes()).unwrap();
        assert_eq!(done.answer, json!({"a": 1}));
        assert_eq!(
            done.usage,
            Usage {
                new_input_tokens: 10,
                cache_read_input_tokens: 5,
                cache_written_input_tokens: 7,
                output_tokens: 3
            }
        );
        let text = json!({"stopReason": "end_turn", "output": {"message": {"content": [
            {"text": "Here:\n```json\n{\"b\": true}\n```"}]}}});
        assert_eq!(
            parse_converse(text.to_string().as_bytes()).unwrap().answer,
            json!({"b": true})
        );
        let cut = json!({"stopReason": "max_tokens", "output": {"message": {"content": []}}});
        let e = parse_converse(cut.to_string().as_bytes()).unwrap_err();
        assert!(format!("{e}").contains("max_tokens"), "{e}");
    }

    #[test]
    fn a_signed_request_names_the_key_region_and_service() {
        let credential = object_store::aws::AwsCredential {
            key_id: "AKIDEXAMPLE".into(),
            secret_key: "secret".into(),
            token: Some("session".into()),
        };
        let m = model(true, false);
        let headers = m.signature(&credential, &m.url(), b"{}").unwrap();
        let auth = headers["authorization"].to_str().unwrap();
        assert!(
            auth.starts_with("AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/")
                && auth.contains("/us-east-1/bedrock/aws4_request"),
            "{auth}"
        );
        assert_eq!(headers["x-amz-security-token"], "session");
        assert!(headers.contains_key("x-amz-date"));
    }
}
