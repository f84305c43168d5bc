//! Calls to AWS service APIs other than S3 (Bedrock's runtime, Athena): the endpoint boto3
//! would call (`AWS_ENDPOINT_URL_<SERVICE>`, then `AWS_ENDPOINT_URL`, then the service's own
//! host in the region), and the request signed with Signature Version 4 by object_store's
//! signer, with the account the S3 store finds ([`super::objects::aws_account`]).

use anyhow::Result;
use object_store::aws::{AwsAuthorizer, AwsCredential};

/// The base URL of a service: `service_env` (boto3's per-service variable, such as
/// `AWS_ENDPOINT_URL_ATHENA`), else `AWS_ENDPOINT_URL`, else `default`; without a trailing `/`.
pub fn service_url(service_env: &str, default: String) -> String {
    let named = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    named(service_env)
        .or_else(|| named("AWS_ENDPOINT_URL"))
        .unwrap_or(default)
        .trim_end_matches('/')
        .to_string()
}

/// The headers that sign a POST of `body` (of `content_type`) to `url` for `service` in
/// `region`, at the time now; `content-type` among them.
pub fn signed_post(
    credential: &AwsCredential,
    (service, region): (&str, &str),
    url: &str,
    content_type: &str,
    body: &[u8],
) -> Result<reqwest::header::HeaderMap> {
    let mut request =
        object_store::client::HttpRequest::new(bytes::Bytes::copy_from_slice(body).into());
    *request.method_mut() = reqwest::Method::POST;
    *request.uri_mut() = url.parse()?;
    request
        .headers_mut()
        .insert("content-type", content_type.parse()?);
    AwsAuthorizer::new(credential, service, region).authorize(&mut request, None);
    Ok(request.headers().clone())
}

/// A signed request to an AWS API: `body` (of `content_type`) posted to `url` for `service` in
/// `region`, with `extra` headers left unsigned (such as `X-Amz-Target`).
pub struct SignedPost<'a> {
    pub service: &'a str,
    pub region: &'a str,
    pub url: &'a str,
    pub content_type: &'a str,
    pub extra: Option<(&'a str, String)>,
}

impl SignedPost<'_> {
    /// Sends `body` signed with `credential`; the answer's status and bytes, or what stopped
    /// the request (`what` names it).
    pub async fn send(
        &self,
        client: &reqwest::Client,
        credential: &AwsCredential,
        body: Vec<u8>,
        what: &str,
    ) -> Result<(reqwest::StatusCode, bytes::Bytes)> {
        let headers = signed_post(
            credential,
            (self.service, self.region),
            self.url,
            self.content_type,
            &body,
        )?;
        let mut request = client.post(self.url).headers(headers).body(body);
        if let Some((name, value)) = &self.extra {
            request = request.header(*name, value);
        }
        let response = request
            .send()
            .await
            .map_err(|e| anyhow::anyhow!("{what}: {e}"))?;
        let status = response.status();
        Ok((status, response.bytes().await?))
    }
}
