//! A fake cTAKES + cNLP server for the tests: a real HTTP/1.1 server on a local port (keep-alive,
//! Content-Length bodies) whose answers follow Cumulus ETL's test mock: word 2 of a note is a
//! fever (two SNOMED codes) and a nausea concept on the same span, word 3 an itch (not a covid
//! symptom), word 1 an IdentifiedAnnotation. cNLP negation says every span is positive;
//! termexists says the first span is negative. It records requests and the peak number in
//! flight, can answer slowly, and can fail the first requests with a chosen status.
//!
//! It also speaks the OpenAI chat-completions protocol as a vLLM server does (`GET /v1/models`,
//! `POST /v1/chat/completions`): its answer follows the request's JSON schema, built from the
//! note (see [`llm_answer`]), so any study's task gets a valid, deterministic answer.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

/// How long a stalled request waits before answering.
pub const STALL: Duration = Duration::from_millis(2500);

/// One request the server received.
#[derive(Debug, Clone)]
pub struct Seen {
    pub path: String,
    pub content_type: String,
    /// The `api-key` header (Azure OpenAI's).
    pub api_key: String,
    /// The `authorization` header (AWS's signature, for Bedrock).
    pub authorization: String,
    /// `X-Amz-Target`: the operation of an AWS JSON API (Athena's).
    pub target: String,
    pub body: Vec<u8>,
}

/// How the server behaves and what it saw.
#[derive(Default)]
pub struct ServerState {
    pub delay: Duration,
    /// Statuses to answer the first requests with, in order (e.g. 503, 429); 0 stalls for
    /// `STALL` (longer than a 1 s client timeout), then answers normally.
    pub failures: Mutex<Vec<u16>>,
    pub requests: Mutex<Vec<Seen>>,
    pub in_flight: AtomicUsize,
    pub peak_in_flight: AtomicUsize,
    /// TCP connections accepted (fewer than requests when the client reuses them).
    pub connections: AtomicUsize,
    /// Azure's batch API: uploaded and produced files, and batches (their input file and how
    /// many times they were looked at).
    pub files: Mutex<Vec<Vec<u8>>>,
    pub batches: Mutex<Vec<(usize, usize)>>,
    /// Athena: the results the next queries give (rows of text cells, the column names first),
    /// and the queries started (their text and their result).
    pub athena_results: Mutex<Vec<Vec<Vec<String>>>>,
    pub athena_queries: Mutex<Vec<(String, Vec<Vec<String>>)>>,
    /// What `GetWorkGroup` answers (its `WorkGroup`).
    pub athena_workgroup: Mutex<Value>,
}

/// A running fake server (stops with its runtime when dropped).
pub struct FakeNlpServer {
    pub addr: SocketAddr,
    pub state: Arc<ServerState>,
    _runtime: tokio::runtime::Runtime,
}

impl FakeNlpServer {
    /// Starts a server answering after `delay`, failing the first requests with `failures`.
    pub fn start(delay: Duration, failures: Vec<u16>) -> FakeNlpServer {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let state = Arc::new(ServerState {
            delay,
            failures: Mutex::new(failures),
            ..Default::default()
        });
        let listener = runtime.block_on(TcpListener::bind("127.0.0.1:0")).unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = state.clone();
        runtime.spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                shared.connections.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(serve_connection(stream, shared.clone()));
            }
        });
        FakeNlpServer {
            addr,
            state,
            _runtime: runtime,
        }
    }

    /// `URL_CTAKES_REST` for this server.
    pub fn ctakes_url(&self) -> String {
        format!("http://{}/ctakes-web-rest/service/analyze", self.addr)
    }

    /// `URL_CNLP_NEGATION` for this server.
    pub fn negation_url(&self) -> String {
        format!("http://{}/negation/process", self.addr)
    }

    /// `URL_CNLP_TERM_EXISTS` for this server.
    pub fn term_exists_url(&self) -> String {
        format!("http://{}/termexists/process", self.addr)
    }

    /// The base URL of its OpenAI-compatible API (`CUMULUS_<MODEL>_URL`).
    pub fn llm_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// Requests received so far.
    pub fn requests(&self) -> Vec<Seen> {
        self.state.requests.lock().unwrap().clone()
    }
}

async fn serve_connection(stream: TcpStream, state: Arc<ServerState>) {
    let mut reader = BufReader::new(stream);
    loop {
        let mut request_line = String::new();
        if reader.read_line(&mut request_line).await.unwrap_or(0) == 0 {
            return;
        }
        let path = request_line
            .split_whitespace()
            .nth(1)
            .unwrap_or("/")
            .to_string();
        let mut length = 0usize;
        let mut content_type = String::new();
        let mut api_key = String::new();
        let mut authorization = String::new();
        let mut target = String::new();
        let mut sso_token = String::new();
        loop {
            let mut header = String::new();
            if reader.read_line(&mut header).await.unwrap_or(0) == 0 {
                return;
            }
            let header = header.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':') {
                match name.trim().to_ascii_lowercase().as_str() {
                    "content-length" => length = value.trim().parse().unwrap_or(0),
                    "content-type" => content_type = value.trim().to_string(),
                    "api-key" => api_key = value.trim().to_string(),
                    "authorization" => authorization = value.trim().to_string(),
                    "x-amz-target" => target = value.trim().to_string(),
                    "x-amz-sso_bearer_token" => sso_token = value.trim().to_string(),
                    _ => {}
                }
            }
        }
        let mut body = vec![0; length];
        if reader.read_exact(&mut body).await.is_err() {
            return;
        }
        let now = state.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        state.peak_in_flight.fetch_max(now, Ordering::SeqCst);
        state.requests.lock().unwrap().push(Seen {
            path: path.clone(),
            content_type,
            api_key,
            authorization,
            target: target.clone(),
            body: body.clone(),
        });
        tokio::time::sleep(state.delay).await;
        let failure = {
            let mut f = state.failures.lock().unwrap();
            (!f.is_empty()).then(|| f.remove(0))
        };
        let (status, answer) = match failure {
            Some(0) => {
                tokio::time::sleep(STALL).await;
                (200, answer(&path, (&target, &sso_token), &body, &state))
            }
            Some(code) => (code, json!({"error": "injected"})),
            None => (200, answer(&path, (&target, &sso_token), &body, &state)),
        };
        state.in_flight.fetch_sub(1, Ordering::SeqCst);
        // A file's content is sent as it is; everything else as JSON.
        let text = match answer {
            Value::String(raw) => raw,
            other => other.to_string(),
        };
        let reason = if status == 200 { "OK" } else { "Error" };
        let response = format!(
            "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{text}",
            text.len()
        );
        if reader
            .get_mut()
            .write_all(response.as_bytes())
            .await
            .is_err()
        {
            return;
        }
    }
}

/// The models the server lists.
pub const LLM_MODELS: [&str; 5] = [
    "openai/gpt-oss-120b",
    "nvidia/Llama-4-Scout-17B-16E-Instruct-FP4",
    "gpt-4o",
    "gpt-35-turbo-0125",
    "gpt-4",
];

fn answer(
    path: &str,
    (target, sso_token): (&str, &str),
    body: &[u8],
    state: &ServerState,
) -> Value {
    // IAM Identity Center's portal: a role's keys for the token `aws sso login` cached.
    if path.starts_with("/federation/credentials?") {
        let asked = path.contains("role_name=cumulus") && path.contains("account_id=123456789012");
        if sso_token != "sso-token" || !asked {
            return json!({"message": "Session token not found or invalid"});
        }
        return json!({"roleCredentials": {"accessKeyId": "AKIDSSO", "secretAccessKey": "s",
            "sessionToken": "t", "expiration": 4_102_444_800_000_i64}});
    }
    let path = path.split('?').next().unwrap_or(path);
    if let Some(operation) = target.strip_prefix("AmazonAthena.") {
        return athena(operation, body, state);
    }
    if let Some(answer) = batch_api(path, body, state) {
        return answer;
    }
    if path.ends_with("/models") {
        let data: Vec<Value> = LLM_MODELS
            .iter()
            .map(|id| json!({"id": id, "object": "model"}))
            .collect();
        return json!({"object": "list", "data": data});
    }
    if path.ends_with("/chat/completions") {
        let request: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
        return chat_completion(&request);
    }
    if path.ends_with("/converse") {
        let request: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
        return converse(&request);
    }
    if path.contains("negation") || path.contains("termexists") {
        let request: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
        let spans = request["entities"].as_array().map_or(0, Vec::len);
        let statuses: Vec<i64> = if path.contains("negation") {
            vec![-1; spans]
        } else {
            (0..spans).map(|i| if i == 0 { -1 } else { 1 }).collect()
        };
        return json!({ "statuses": statuses });
    }
    ctakes_answer(&String::from_utf8_lossy(body))
}

/// Athena's JSON API (`X-Amz-Target: AmazonAthena.<operation>`): a query takes the next
/// queued result; it is running the first time it is looked at and succeeded after; its rows
/// come two to a page, with a `NextToken` to the next.
fn athena(operation: &str, body: &[u8], state: &ServerState) -> Value {
    let request: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let id_of = |request: &Value| {
        request["QueryExecutionId"]
            .as_str()
            .and_then(|id| id.strip_prefix("query-"))
            .and_then(|n| n.parse::<usize>().ok())
    };
    match operation {
        "StartQueryExecution" => {
            let mut queued = state.athena_results.lock().unwrap();
            let rows = if queued.is_empty() {
                Vec::new()
            } else {
                queued.remove(0)
            };
            let mut queries = state.athena_queries.lock().unwrap();
            let sql = request["QueryString"].as_str().unwrap_or("").to_string();
            queries.push((sql, rows));
            json!({"QueryExecutionId": format!("query-{}", queries.len() - 1)})
        }
        "GetQueryExecution" => {
            let id = request["QueryExecutionId"].clone();
            // Looked at once before: running; after: done.
            let looks = state
                .requests
                .lock()
                .unwrap()
                .iter()
                .filter(|r| r.target.ends_with("GetQueryExecution") && r.body == body)
                .count();
            let status = if looks <= 1 { "RUNNING" } else { "SUCCEEDED" };
            json!({"QueryExecution": {"QueryExecutionId": id, "Status": {"State": status}}})
        }
        "GetWorkGroup" => json!({"WorkGroup": state.athena_workgroup.lock().unwrap().clone()}),
        "GetQueryResults" => {
            let Some(n) = id_of(&request) else {
                return json!({"message": "no such query"});
            };
            let rows = state.athena_queries.lock().unwrap()[n].1.clone();
            let from: usize = request["NextToken"]
                .as_str()
                .and_then(|t| t.parse().ok())
                .unwrap_or(0);
            let page: Vec<Value> = rows
                .iter()
                .skip(from)
                .take(2)
                .map(|row| json!({"Data": row.iter().map(|c| json!({"VarCharValue": c})).collect::<Vec<_>>()}))
                .collect();
            let mut answer = json!({"ResultSet": {"Rows": page}});
            if from + 2 < rows.len() {
                answer["NextToken"] = json!((from + 2).to_string());
            }
            answer
        }
        _ => json!({"message": format!("unknown operation {operation}")}),
    }
}

/// Azure OpenAI's batch API under `/openai/`: `files` takes a multipart upload, `batches`
/// starts a batch of an uploaded file, `batches/<id>` says it is in progress the first time it
/// is asked and completed after (its output file made then: every request of the input
/// answered as `chat/completions` answers it, but a note that says "overloaded" failed), and
/// `files/<id>/content` gives a file.
fn batch_api(path: &str, body: &[u8], state: &ServerState) -> Option<Value> {
    let rest = path.strip_prefix("/openai/")?;
    let file_id = |n: usize| format!("file-{n}");
    let number = |id: &str, prefix: &str| id.strip_prefix(prefix)?.parse::<usize>().ok();
    if rest == "files" {
        let text = String::from_utf8_lossy(body);
        let boundary = text.lines().next()?.trim().to_string();
        let part = text
            .split(&boundary)
            .find(|p| p.contains("name=\"file\""))?;
        let content = part.split_once("\r\n\r\n")?.1;
        let content = content.strip_suffix("\r\n").unwrap_or(content);
        let mut files = state.files.lock().unwrap();
        files.push(content.as_bytes().to_vec());
        return Some(json!({"id": file_id(files.len() - 1), "object": "file", "purpose": "batch"}));
    }
    if rest == "batches" {
        let request: Value = serde_json::from_slice(body).ok()?;
        let input = number(request["input_file_id"].as_str()?, "file-")?;
        let mut batches = state.batches.lock().unwrap();
        batches.push((input, 0));
        return Some(json!({"id": format!("batch_{}", batches.len() - 1), "status": "validating"}));
    }
    if let Some(id) = rest.strip_prefix("batches/") {
        let n = number(id, "batch_")?;
        let (input, looks) = {
            let mut batches = state.batches.lock().unwrap();
            let batch = batches.get_mut(n)?;
            batch.1 += 1;
            *batch
        };
        if looks == 1 {
            return Some(json!({"id": id, "status": "in_progress"}));
        }
        let input = state.files.lock().unwrap().get(input)?.clone();
        let mut output = String::new();
        let mut errors = String::new();
        for line in String::from_utf8_lossy(&input).lines() {
            let row: Value = serde_json::from_str(line).ok()?;
            let user = row["body"]["messages"][1]["content"].as_str().unwrap_or("");
            if user.contains("overloaded") {
                errors.push_str(
                    &json!({"custom_id": row["custom_id"], "error": {"message": {"error":
                    {"message": "the model is overloaded"}}}})
                    .to_string(),
                );
                errors.push('\n');
                continue;
            }
            let completion = chat_completion(&row["body"]);
            output.push_str(
                &json!({"custom_id": row["custom_id"],
                "response": {"status_code": 200, "body": completion}})
                .to_string(),
            );
            output.push('\n');
        }
        let mut files = state.files.lock().unwrap();
        files.push(output.into_bytes());
        let output_id = file_id(files.len() - 1);
        let error_id = (!errors.is_empty()).then(|| {
            files.push(errors.into_bytes());
            file_id(files.len() - 1)
        });
        return Some(
            json!({"id": id, "status": "completed", "output_file_id": output_id,
                           "error_file_id": error_id}),
        );
    }
    let id = rest.strip_prefix("files/")?.strip_suffix("/content")?;
    let file = state
        .files
        .lock()
        .unwrap()
        .get(number(id, "file-")?)?
        .clone();
    Some(Value::String(String::from_utf8_lossy(&file).into_owned()))
}

/// The mock cTAKES answer (UTF-16 offsets, as the Java server reports them).
fn ctakes_answer(note: &str) -> Value {
    let words: Vec<&str> = note.split_whitespace().collect();
    if words.len() < 3 {
        return json!({});
    }
    let len16 = |s: &str| s.encode_utf16().count() as i64;
    let fever_begin = len16(words[0]) + 1;
    let fever_end = fever_begin + len16(words[1]);
    let itch_begin = fever_end + 1;
    let itch_end = itch_begin + len16(words[2]);
    let concept = |code: &str, cui: &str| json!({"code": code, "cui": cui, "codingScheme": "SNOMEDCT_US", "tui": "T184"});
    let mention = |b: i64, e: i64, text: &str, concepts: Vec<Value>| {
        json!({"begin": b, "end": e, "text": text, "polarity": 0,
               "conceptAttributes": concepts, "type": "SignSymptomMention"})
    };
    json!({
        "SignSymptomMention": [
            mention(fever_begin, fever_end, words[1],
                vec![concept("386661006", "C0015967"), concept("50177009", "C0015967")]),
            mention(fever_begin, fever_end, words[1], vec![concept("422587007", "C0027497")]),
            mention(itch_begin, itch_end, words[2],
                vec![concept("418290006", "C0033774"), concept("279333002", "C0033774")]),
        ],
        "IdentifiedAnnotation": [
            {"begin": 0, "end": len16(words[0]), "text": words[0], "polarity": 0,
             "conceptAttributes": [{"code": "n/a", "cui": "CE_64", "codingScheme": "custom", "tui": "T0NA"}],
             "type": "IdentifiedAnnotation"}
        ]
    })
}

/// A chat completion answering `request` with [`llm_answer`].
fn chat_completion(request: &Value) -> Value {
    let system = request["messages"][0]["content"].as_str().unwrap_or("");
    let user = request["messages"][1]["content"].as_str().unwrap_or("");
    // Every study's user message ends with the note: after a blank line where the study adds
    // an introduction, after `### Text ###` in the covid study's.
    let note = match user.rsplit_once("### Text ###\n") {
        Some((_, note)) => note,
        None => user.rsplit("\n\n").next().unwrap_or(user),
    };
    let schema = &request["response_format"]["json_schema"]["schema"];
    let content = match schema.is_object() {
        true => llm_answer(schema, note),
        // A JSON object without a schema: the keys the prompt lists (the covid study's).
        false => answer_from_prompt(user, note),
    }
    .to_string();
    json!({
        "id": "chatcmpl-test", "object": "chat.completion",
        "model": request["model"], "system_fingerprint": "fp_test",
        "choices": [{"index": 0, "finish_reason": "stop",
                     "message": {"role": "assistant", "content": content}}],
        "usage": {"prompt_tokens": (system.len() + user.len()) / 4,
                  "completion_tokens": content.len() / 4,
                  "prompt_tokens_details": {"cached_tokens": 0}},
    })
}

/// A Bedrock Converse answer to `request` with [`llm_answer`]: the `to_json` tool's input when
/// the request offers the tool, else the answer as JSON in a Markdown fence (as llama4 writes
/// it), after a reasoning block (as gpt-oss gives one).
fn converse(request: &Value) -> Value {
    let user = request["messages"][0]["content"][0]["text"]
        .as_str()
        .unwrap_or("");
    let note = user.rsplit("\n\n").next().unwrap_or(user);
    let tool = &request["toolConfig"]["tools"][0]["toolSpec"];
    let block = match tool["inputSchema"]["json"].is_object() {
        true => json!({"toolUse": {"toolUseId": "t1", "name": tool["name"],
                                   "input": llm_answer(&tool["inputSchema"]["json"], note)}}),
        false => json!({"text": format!("```json\n{}\n```", json!({}))}),
    };
    let stop = if tool.is_object() {
        "tool_use"
    } else {
        "end_turn"
    };
    json!({
        "output": {"message": {"role": "assistant", "content": [
            {"reasoningContent": {"reasoningText": {"text": "thinking"}}}, block]}},
        "stopReason": stop,
        "usage": {"inputTokens": user.len() / 4, "outputTokens": 20,
                  "cacheReadInputTokens": 0, "cacheWriteInputTokens": 100},
    })
}

/// The answer to a prompt that lists its keys as `"<key>": boolean` (the covid study's GPT
/// prompt): each key true when the note mentions its first word (in lowercase).
fn answer_from_prompt(prompt: &str, note: &str) -> Value {
    let note = note.to_lowercase();
    let mut answer = serde_json::Map::new();
    for (end, _) in prompt.match_indices("\": boolean") {
        let Some(start) = prompt[..end].rfind('"') else {
            continue;
        };
        let key = &prompt[start + 1..end];
        let first = key.split(' ').next().unwrap_or(key).to_lowercase();
        answer.insert(key.to_string(), Value::Bool(note.contains(&first)));
    }
    Value::Object(answer)
}

/// The answer the fake model gives a note: every field as its schema types it (the first
/// option of `anyOf` that is not null, an enum's first value): booleans true, integers the
/// note's word count, numbers 0.5, strings the note's first word, lists of one item, and
/// `spans` the note's first two words (so they are found in it).
pub fn llm_answer(schema: &Value, note: &str) -> Value {
    let words: Vec<&str> = note.split_whitespace().collect();
    value_for(schema, schema, &words, "")
}

fn value_for(schema: &Value, root: &Value, words: &[&str], name: &str) -> Value {
    if let Some(reference) = schema.get("$ref").and_then(Value::as_str) {
        let target = reference.trim_start_matches('#');
        return value_for(
            root.pointer(target).unwrap_or(&Value::Null),
            root,
            words,
            name,
        );
    }
    if let Some(options) = schema.get("anyOf").and_then(Value::as_array) {
        let option = options
            .iter()
            .find(|o| o.get("type").and_then(Value::as_str) != Some("null"))
            .unwrap_or(&Value::Null);
        return value_for(option, root, words, name);
    }
    if let Some(first) = schema.get("enum").and_then(|e| e.get(0)) {
        return first.clone();
    }
    match schema.get("type").and_then(Value::as_str) {
        Some("object") => {
            let mut out = serde_json::Map::new();
            for (field, sub) in schema["properties"].as_object().into_iter().flatten() {
                out.insert(field.clone(), value_for(sub, root, words, field));
            }
            Value::Object(out)
        }
        Some("array") if name == "spans" => {
            json!([words.iter().take(2).copied().collect::<Vec<_>>().join(" ")])
        }
        Some("array") => json!([value_for(&schema["items"], root, words, "")]),
        Some("boolean") => json!(true),
        Some("integer") => json!(words.len()),
        Some("number") => json!(0.5),
        Some("string") => json!(words.first().copied().unwrap_or("")),
        _ => Value::Null,
    }
}
