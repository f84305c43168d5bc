//! A real S3-compatible server for the tests: moto's (`moto_server`, from the readers'
//! virtualenv), started on a free local port per test and stopped when dropped. It honours
//! conditional writes (`If-None-Match: *`) and records SSE-KMS settings. [`FaultyProxy`] puts
//! throttling answers and cut connections between a client and the server.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use cumulus_etl::store::objects::S3Settings;

pub struct S3Server {
    child: Child,
    port: u16,
}

impl S3Server {
    /// Starts a server and waits until it answers.
    pub fn start() -> S3Server {
        let python = crate::readers::python();
        let server = python.parent().unwrap().join("moto_server");
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(server)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting moto_server");
        let started = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "moto_server did not start"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        S3Server { child, port }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Settings that reach this server (moto takes any credentials).
    pub fn settings(&self) -> S3Settings {
        S3Settings {
            region: Some("us-east-1".into()),
            endpoint: Some(self.endpoint()),
            credentials: Some(("testing".into(), "testing".into())),
            ..S3Settings::default()
        }
    }

    /// Creates a bucket (this tool never does).
    pub fn create_bucket(&self, bucket: &str) {
        let (status, _) = self.request("PUT", &format!("/{bucket}"));
        assert_eq!(status, 200, "creating bucket {bucket}");
    }

    /// How an object is encrypted, as a signed HEAD (boto3) sees it: (`ServerSideEncryption`,
    /// `SSEKMSKeyId`), each empty when absent.
    pub fn encryption(&self, bucket: &str, key: &str) -> (String, String) {
        let script = r#"
import json, sys, boto3
s3 = boto3.client("s3", endpoint_url=sys.argv[1], region_name="us-east-1",
                  aws_access_key_id="testing", aws_secret_access_key="testing")
head = s3.head_object(Bucket=sys.argv[2], Key=sys.argv[3])
print(json.dumps([head.get("ServerSideEncryption", ""), head.get("SSEKMSKeyId", "")]))
"#;
        let out = crate::readers::run_script(script, &[&self.endpoint(), bucket, key]);
        (
            out[0].as_str().unwrap().to_string(),
            out[1].as_str().unwrap().to_string(),
        )
    }

    /// One plain HTTP/1.1 request (moto does not check signatures).
    fn request(&self, method: &str, path: &str) -> (u16, BTreeMap<String, String>) {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            self.port
        );
        stream.write_all(request.as_bytes()).unwrap();
        let mut response = Vec::new();
        stream.read_to_end(&mut response).unwrap();
        let text = String::from_utf8_lossy(&response);
        let head = text.split("\r\n\r\n").next().unwrap_or_default();
        let mut lines = head.lines();
        let status = lines
            .next()
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        (status, headers)
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A proxy in front of a server that fails a share of requests: every `fail_every`th request
/// gets a 503 `SlowDown` without reaching the server, and every `cut_every`th successful GET
/// of more than a few kilobytes has its connection cut halfway through the body. Each client
/// connection carries one request.
pub struct FaultyProxy {
    port: u16,
    /// Requests answered 503.
    pub failed: Arc<AtomicUsize>,
    /// Responses cut mid-body.
    pub cut: Arc<AtomicUsize>,
}

impl FaultyProxy {
    pub fn start(upstream: &S3Server, fail_every: usize, cut_every: usize) -> FaultyProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let upstream = upstream.port;
        let failed = Arc::new(AtomicUsize::new(0));
        let cut = Arc::new(AtomicUsize::new(0));
        let requests = Arc::new(AtomicUsize::new(0));
        let gets = Arc::new(AtomicUsize::new(0));
        let (failed_, cut_) = (failed.clone(), cut.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                let counters = (
                    requests.clone(),
                    gets.clone(),
                    failed_.clone(),
                    cut_.clone(),
                );
                std::thread::spawn(move || {
                    let _ = relay(client, upstream, counters, fail_every, cut_every);
                });
            }
        });
        FaultyProxy { port, failed, cut }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

type Counters = (
    Arc<AtomicUsize>,
    Arc<AtomicUsize>,
    Arc<AtomicUsize>,
    Arc<AtomicUsize>,
);

/// Relays one request, failing or cutting it when its turn comes.
fn relay(
    mut client: TcpStream,
    upstream: u16,
    (requests, gets, failed, cut): Counters,
    fail_every: usize,
    cut_every: usize,
) -> std::io::Result<()> {
    let mut reader = std::io::BufReader::new(client.try_clone()?);
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let before = head.len();
        std::io::BufRead::read_until(&mut reader, b'\n', &mut head)?;
        if head.len() == before {
            return Ok(());
        }
    }
    let text = String::from_utf8_lossy(&head).into_owned();
    let length: usize = text
        .lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse().ok())
        .unwrap_or(0);
    let mut body = vec![0; length];
    reader.read_exact(&mut body)?;
    if requests.fetch_add(1, Ordering::SeqCst) % fail_every == fail_every - 1 {
        failed.fetch_add(1, Ordering::SeqCst);
        let xml = "<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>";
        let answer = format!(
            "HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{xml}",
            xml.len()
        );
        return client.write_all(answer.as_bytes());
    }
    // One request per connection, both ways.
    let mut forwarded: String = text
        .split("\r\n")
        .filter(|l| !l.is_empty() && !l.to_ascii_lowercase().starts_with("connection:"))
        .map(|l| format!("{l}\r\n"))
        .collect();
    forwarded.push_str("Connection: close\r\n\r\n");
    let mut server = TcpStream::connect(("127.0.0.1", upstream))?;
    server.write_all(forwarded.as_bytes())?;
    server.write_all(&body)?;
    let mut response = Vec::new();
    server.read_to_end(&mut response)?;
    let split = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(response.len(), |p| p + 4);
    let ok = response.starts_with(b"HTTP/1.1 200") || response.starts_with(b"HTTP/1.1 206");
    let big = response.len() - split > 4096;
    if text.starts_with("GET ")
        && ok
        && big
        && gets.fetch_add(1, Ordering::SeqCst) % cut_every == cut_every - 1
    {
        cut.fetch_add(1, Ordering::SeqCst);
        let half = split + (response.len() - split) / 2;
        client.write_all(&response[..half])?;
        return client.shutdown(std::net::Shutdown::Both);
    }
    client.write_all(&response)
}
