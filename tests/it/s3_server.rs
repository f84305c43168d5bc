//! A real S3-compatible server for the tests: moto's (`moto_server`, from the readers'
//! virtualenv), started on a free local port per test and stopped when dropped. It honours
//! conditional writes (`If-None-Match: *`) and records SSE-KMS settings.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
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
