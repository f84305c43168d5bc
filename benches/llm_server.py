#!/usr/bin/env python3
"""An OpenAI-compatible chat-completions server for side-by-side runs and benchmarks of the LLM
NLP tasks: it speaks the protocol as a vLLM server does (`GET /v1/models`,
`POST /v1/chat/completions`) and answers every request after a fixed latency with the same
deterministic answer the integration tests' server gives (`tests/it/nlp_server.rs`): every field
as the request's JSON schema types it, built from the note (the user message after its last
blank line, or after `### Text ###`): booleans true, integers the note's word count, numbers
0.5, strings the note's first word, lists of one item, `spans` the note's first two words; asked
for a JSON object without a schema (the covid study on GPT-3.5), the keys the prompt lists, each
true when the note has its first word. It answers OpenAI's and Azure's paths alike.

    benches/llm_server.py PORT [LATENCY_SECONDS]

It also speaks Azure OpenAI's batch API (`/openai/files`, `/openai/batches`): a batch is complete
when first asked about, its requests answered as above; with UPLOADS_DIR set, every uploaded batch
file is kept there. It counts chat requests (batched ones included) and the most in flight at
once (`GET /stats`), and prints them on SIGTERM or Ctrl-C.
"""

import json
import os
import re
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MODELS = [
    "openai/gpt-oss-120b",
    "nvidia/Llama-4-Scout-17B-16E-Instruct-FP4",
    "gpt-4o",
    "gpt-35-turbo-0125",
    "gpt-4",
]
STATE = {"requests": 0, "in_flight": 0, "peak": 0}
LOCK = threading.Lock()


def value_for(schema, root, words, name):
    if "$ref" in schema:
        target = root
        for part in schema["$ref"].lstrip("#/").split("/"):
            target = target.get(part, {})
        return value_for(target, root, words, name)
    if "anyOf" in schema:
        options = [o for o in schema["anyOf"] if o.get("type") != "null"]
        return value_for(options[0] if options else {}, root, words, name)
    if schema.get("enum"):
        return schema["enum"][0]
    kind = schema.get("type")
    if kind == "object":
        return {
            field: value_for(sub, root, words, field)
            for field, sub in schema.get("properties", {}).items()
        }
    if kind == "array" and name == "spans":
        return [" ".join(words[:2])]
    if kind == "array":
        return [value_for(schema.get("items", {}), root, words, "")]
    return {
        "boolean": True,
        "integer": len(words),
        "number": 0.5,
        "string": words[0] if words else "",
    }.get(kind)


def answer_from_prompt(prompt, note):
    """A JSON object without a schema: the keys the prompt lists as `"<key>": boolean` (the
    covid study's), each true when the note mentions its first word."""
    note = note.lower()
    keys = re.findall(r'"([^"]+)": boolean', prompt)
    return {key: key.split(" ")[0].lower() in note for key in keys}


def completion(request):
    system = request["messages"][0]["content"]
    user = request["messages"][1]["content"]
    if "### Text ###\n" in user:
        note = user.rsplit("### Text ###\n", 1)[-1]
    else:
        note = user.rsplit("\n\n", 1)[-1]
    schema = request["response_format"].get("json_schema", {}).get("schema")
    if schema is None:
        content = json.dumps(answer_from_prompt(user, note))
    else:
        content = json.dumps(value_for(schema, schema, note.split(), ""))
    return {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": request["model"],
        "system_fingerprint": "fp_test",
        "choices": [
            {
                "index": 0,
                "finish_reason": "stop",
                "message": {"role": "assistant", "content": content},
            }
        ],
        "usage": {
            "prompt_tokens": (len(system) + len(user)) // 4,
            "completion_tokens": len(content) // 4,
            "total_tokens": (len(system) + len(user) + len(content)) // 4,
            "prompt_tokens_details": {"cached_tokens": 0},
        },
    }


def converse(request):
    """A Bedrock Converse answer: the to_json tool's input, or fenced JSON text without a tool."""
    user = request["messages"][0]["content"][0]["text"]
    note = user.rsplit("\n\n", 1)[-1]
    tool = (request.get("toolConfig") or {}).get("tools", [{}])[0].get("toolSpec")
    if tool:
        schema = tool["inputSchema"]["json"]
        block = {"toolUse": {"toolUseId": "t1", "name": tool["name"],
                             "input": value_for(schema, schema, note.split(), "")}}
    else:
        block = {"text": "```json\n{}\n```"}
    return {
        "output": {"message": {"role": "assistant", "content": [block]}},
        "stopReason": "tool_use" if tool else "end_turn",
        "usage": {"inputTokens": len(user) // 4, "outputTokens": 20, "totalTokens": 0},
        "metrics": {"latencyMs": 1},
    }


# Azure OpenAI's batch API: files uploaded or produced, and batches (their input file).
FILES = []
BATCHES = []


def upload(body, content_type):
    """`POST /openai/files`: the `file` part of a multipart upload, kept (and written to
    UPLOADS_DIR as `file-<n>.jsonl` when that is set, to compare what each tool uploaded)."""
    boundary = content_type.split("boundary=", 1)[1].strip('"').encode()
    for part in body.split(b"--" + boundary):
        head, _, content = part.partition(b"\r\n\r\n")
        if b'name="file"' in head:
            data = content.removesuffix(b"\r\n")
            with LOCK:
                FILES.append(data)
                n = len(FILES) - 1
            if os.environ.get("UPLOADS_DIR"):
                with open(os.path.join(os.environ["UPLOADS_DIR"], f"file-{n}.jsonl"), "wb") as f:
                    f.write(data)
            return {"id": f"file-{n}", "object": "file", "bytes": len(data),
                    "created_at": int(time.time()), "filename": "batch.jsonl",
                    "purpose": "batch", "status": "processed"}
    raise ValueError("no file in the upload")


def create_batch(request):
    with LOCK:
        BATCHES.append(int(request["input_file_id"].removeprefix("file-")))
        n = len(BATCHES) - 1
    return {"id": f"batch_{n}", "object": "batch", "endpoint": request["endpoint"],
            "input_file_id": request["input_file_id"], "completion_window": "24h",
            "status": "validating", "created_at": int(time.time())}


def batch_status(batch_id):
    """A batch is complete when first asked about: every request answered as
    `chat/completions` answers it, in an output file made then."""
    n = int(batch_id.removeprefix("batch_"))
    lines = []
    for line in FILES[BATCHES[n]].decode().splitlines():
        row = json.loads(line)
        with LOCK:
            STATE["requests"] += 1
        lines.append(json.dumps({"id": f"response-{len(lines)}", "custom_id": row["custom_id"],
                                 "response": {"status_code": 200, "request_id": "r",
                                              "body": completion(row["body"])},
                                 "error": None}))
    with LOCK:
        FILES.append(("\n".join(lines) + "\n").encode())
        output = f"file-{len(FILES) - 1}"
    return {"id": batch_id, "object": "batch", "endpoint": "/v1/chat/completions",
            "input_file_id": f"file-{BATCHES[n]}", "completion_window": "24h",
            "status": "completed", "output_file_id": output, "error_file_id": None,
            "created_at": int(time.time())}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    latency = 0.0
    request_log = None

    def log_message(self, *args):
        pass

    def answer(self, body):
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def send_raw(self, data):
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        path = self.path.split("?")[0]
        if self.path == "/stats":
            with LOCK:
                self.answer({"requests": STATE["requests"], "peak_in_flight": STATE["peak"]})
        elif path.endswith("/models"):
            self.answer({"object": "list", "data": [{"id": m, "object": "model"} for m in MODELS]})
        elif path.startswith("/openai/batches/"):
            self.answer(batch_status(path.rsplit("/", 1)[-1]))
        elif path.startswith("/openai/files/") and path.endswith("/content"):
            self.send_raw(FILES[int(path.split("/")[3].removeprefix("file-"))])
        else:
            self.send_error(404)

    def do_POST(self):
        length = int(self.headers.get("Content-Length", 0))
        raw = self.rfile.read(length)
        path = self.path.split("?")[0]
        if path == "/openai/files":
            self.answer(upload(raw, self.headers.get("Content-Type", "")))
            return
        if path == "/openai/batches":
            self.answer(create_batch(json.loads(raw)))
            return
        request = json.loads(raw)
        with LOCK:
            STATE["requests"] += 1
            STATE["in_flight"] += 1
            STATE["peak"] = max(STATE["peak"], STATE["in_flight"])
        if Handler.request_log:
            with LOCK, open(Handler.request_log, "a") as log:
                log.write(json.dumps({"path": self.path, "body": request}, sort_keys=True) + "\n")
        try:
            time.sleep(self.latency)
            if self.path.endswith("/converse"):
                self.answer(converse(request))
            else:
                self.answer(completion(request))
        finally:
            with LOCK:
                STATE["in_flight"] -= 1


def main():
    port = int(sys.argv[1])
    Handler.latency = float(sys.argv[2]) if len(sys.argv) > 2 else 0.0
    # Every POST's path and body, a JSON line each, when a third argument names a file.
    Handler.request_log = sys.argv[3] if len(sys.argv) > 3 else None
    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True

    def stop(*_):
        print(json.dumps({"requests": STATE["requests"], "peak_in_flight": STATE["peak"]}), flush=True)
        threading.Thread(target=server.shutdown).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    server.serve_forever()


if __name__ == "__main__":
    main()
