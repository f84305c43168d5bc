//! Credentials of a shared-files profile that has no static keys but gets them another way, as
//! the AWS CLI does: `credential_process` (a command that prints them as JSON, run again
//! before they expire), `role_arn` (an STS `AssumeRole` with the keys of the profile's
//! `source_profile`, which may itself run a process, sign in with SSO or assume a role, or of
//! the environment for `credential_source = Environment`; assumed again before the keys
//! expire), and IAM Identity Center (SSO: the role's keys from the portal, asked with the token
//! `aws sso login` left in `~/.aws/sso/cache`; an expired token says to sign in again). Both S3 and the
//! other AWS services (Bedrock, Athena) take them through [`super::objects::aws_account`].

use std::sync::Arc;

use anyhow::{Context, Result, anyhow, bail};
use chrono::{DateTime, Duration as Age, Utc};
use futures::future::BoxFuture;
use object_store::aws::{AwsCredential, AwsCredentialProvider};
use object_store::client::CredentialProvider;

use super::aws_api::{SignedPost, service_url};
use super::aws_profile::{Profile, SharedFiles};

/// Credentials this close to their expiry are fetched again.
const REFRESH_BEFORE: Age = Age::minutes(5);

/// How many profiles a chain of `source_profile`s may pass through.
const MAX_CHAIN: usize = 5;

/// The provider of profile `name`'s credentials, when it gets them by a process or a role;
/// None for a profile of static keys (or none), which the S3 client's own settings cover.
pub fn profile_provider(
    files: &SharedFiles,
    name: &str,
    region: Option<&str>,
) -> Result<Option<AwsCredentialProvider>> {
    let profile = files.profile(name);
    if profile.role_arn.is_none()
        && profile.credential_process.is_none()
        && profile.sso_account_id.is_none()
    {
        return Ok(None);
    }
    let source = source_of(files, name, &profile, region, 0)?;
    Ok(Some(Arc::new(Refreshing {
        source,
        cached: tokio::sync::Mutex::new(None),
    })))
}

/// Where a profile's keys come from.
#[derive(Debug)]
enum Source {
    Static(Arc<AwsCredential>),
    Process(String),
    AssumeRole(Box<AssumeRole>),
    Sso(SsoRole),
}

/// A role in an account, signed in to through IAM Identity Center.
#[derive(Debug)]
struct SsoRole {
    account_id: String,
    role_name: String,
    /// The portal's region, and what names the cached token (the session's name, else the
    /// start URL).
    region: String,
    token_name: String,
}

#[derive(Debug)]
struct AssumeRole {
    role_arn: String,
    session_name: String,
    external_id: Option<String>,
    duration_seconds: Option<u64>,
    region: Option<String>,
    /// Whose keys ask for the role.
    source: Source,
}

fn source_of(
    files: &SharedFiles,
    name: &str,
    profile: &Profile,
    region: Option<&str>,
    depth: usize,
) -> Result<Source> {
    if depth > MAX_CHAIN {
        bail!("AWS profile {name}: source_profile chain longer than {MAX_CHAIN}");
    }
    if let Some(role_arn) = &profile.role_arn {
        let source = match (
            &profile.source_profile,
            profile.credential_source.as_deref(),
        ) {
            (Some(source), _) if source == name => static_keys(name, profile)?,
            (Some(source), _) => {
                let source_profile = files.profile(source);
                source_of(files, source, &source_profile, region, depth + 1)?
            }
            (None, Some("Environment")) => environment_keys()?,
            (None, Some(other)) => bail!(
                "AWS profile {name}: credential_source {other} is not supported (use \
                 source_profile or Environment)"
            ),
            (None, None) => bail!("AWS profile {name}: role_arn needs a source_profile"),
        };
        let session_name = profile
            .role_session_name
            .clone()
            .unwrap_or_else(|| format!("cumulus-etl-{}", Utc::now().timestamp_millis()));
        return Ok(Source::AssumeRole(Box::new(AssumeRole {
            role_arn: role_arn.clone(),
            session_name,
            external_id: profile.external_id.clone(),
            duration_seconds: profile.duration_seconds,
            region: profile.region.clone().or(region.map(str::to_string)),
            source,
        })));
    }
    if let Some(command) = &profile.credential_process {
        return Ok(Source::Process(command.clone()));
    }
    if let Some(account_id) = &profile.sso_account_id {
        let missing = |what: &str| anyhow!("AWS profile {name}: SSO without {what}");
        return Ok(Source::Sso(SsoRole {
            account_id: account_id.clone(),
            role_name: profile
                .sso_role_name
                .clone()
                .ok_or_else(|| missing("sso_role_name"))?,
            region: profile
                .sso_region
                .clone()
                .ok_or_else(|| missing("sso_region"))?,
            token_name: profile
                .sso_session
                .clone()
                .or_else(|| profile.sso_start_url.clone())
                .ok_or_else(|| missing("sso_session or sso_start_url"))?,
        }));
    }
    static_keys(name, profile)
}

fn static_keys(name: &str, profile: &Profile) -> Result<Source> {
    match (&profile.access_key_id, &profile.secret_access_key) {
        (Some(key_id), Some(secret_key)) => Ok(Source::Static(Arc::new(AwsCredential {
            key_id: key_id.clone(),
            secret_key: secret_key.clone(),
            token: profile.session_token.clone(),
        }))),
        _ => bail!("AWS profile {name} has no keys, credential_process or role_arn"),
    }
}

fn environment_keys() -> Result<Source> {
    let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    match (var("AWS_ACCESS_KEY_ID"), var("AWS_SECRET_ACCESS_KEY")) {
        (Some(key_id), Some(secret_key)) => Ok(Source::Static(Arc::new(AwsCredential {
            key_id,
            secret_key,
            token: var("AWS_SESSION_TOKEN"),
        }))),
        _ => bail!("credential_source Environment: AWS_ACCESS_KEY_ID is not set"),
    }
}

/// Keys and when they expire (never, for static ones).
type Timed = (Arc<AwsCredential>, Option<DateTime<Utc>>);

impl Source {
    fn fetch(&self) -> BoxFuture<'_, Result<Timed>> {
        Box::pin(async move {
            match self {
                Source::Static(keys) => Ok((keys.clone(), None)),
                Source::Process(command) => run_process(command).await,
                Source::AssumeRole(role) => {
                    let (keys, _) = role.source.fetch().await?;
                    assume_role(role, &keys).await
                }
                Source::Sso(role) => sso_role_keys(role).await,
            }
        })
    }
}

/// Runs a `credential_process` command (through the shell) and reads the keys it prints.
async fn run_process(command: &str) -> Result<Timed> {
    let output = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(command)
        .output()
        .await
        .with_context(|| format!("running credential_process '{command}'"))?;
    if !output.status.success() {
        bail!(
            "credential_process '{command}' failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    let keys: serde_json::Value = serde_json::from_slice(&output.stdout)
        .with_context(|| format!("credential_process '{command}' printed no JSON"))?;
    if keys["Version"] != 1 {
        bail!("credential_process '{command}': Version must be 1");
    }
    let field = |name: &str| keys[name].as_str().map(str::to_string);
    let (Some(key_id), Some(secret_key)) = (field("AccessKeyId"), field("SecretAccessKey")) else {
        bail!("credential_process '{command}' printed no AccessKeyId and SecretAccessKey");
    };
    let expires = match field("Expiration") {
        Some(text) => Some(expiry(&text)?),
        None => None,
    };
    let keys = AwsCredential {
        key_id,
        secret_key,
        token: field("SessionToken"),
    };
    Ok((Arc::new(keys), expires))
}

fn expiry(text: &str) -> Result<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(text)
        .map(|t| t.with_timezone(&Utc))
        .with_context(|| format!("an expiration time '{text}'"))
}

/// Asks STS for the role's keys, signed with `source`.
async fn assume_role(role: &AssumeRole, source: &AwsCredential) -> Result<Timed> {
    let region = role.region.clone().unwrap_or_else(|| "us-east-1".into());
    let url = service_url(
        "AWS_ENDPOINT_URL_STS",
        format!("https://sts.{region}.amazonaws.com"),
    ) + "/";
    let mut form = vec![
        ("Action", "AssumeRole".to_string()),
        ("Version", "2011-06-15".to_string()),
        ("RoleArn", role.role_arn.clone()),
        ("RoleSessionName", role.session_name.clone()),
    ];
    if let Some(seconds) = role.duration_seconds {
        form.push(("DurationSeconds", seconds.to_string()));
    }
    if let Some(id) = &role.external_id {
        form.push(("ExternalId", id.clone()));
    }
    let body = form
        .iter()
        .map(|(k, v)| format!("{k}={}", form_encode(v)))
        .collect::<Vec<_>>()
        .join("&");
    let post = SignedPost {
        service: "sts",
        region: &region,
        url: &url,
        content_type: "application/x-www-form-urlencoded; charset=utf-8",
        extra: None,
    };
    let what = format!("STS AssumeRole {}", role.role_arn);
    let (status, answer) = post
        .send(&reqwest::Client::new(), source, body.into_bytes(), &what)
        .await?;
    let text = String::from_utf8_lossy(&answer);
    if !status.is_success() {
        let message = tag(&text, "Message").unwrap_or_else(|| format!("HTTP status {status}"));
        bail!("STS AssumeRole {}: {message}", role.role_arn);
    }
    let field = |name: &str| {
        tag(&text, name).ok_or_else(|| anyhow!("STS AssumeRole answered without {name}"))
    };
    let keys = AwsCredential {
        key_id: field("AccessKeyId")?,
        secret_key: field("SecretAccessKey")?,
        token: Some(field("SessionToken")?),
    };
    Ok((Arc::new(keys), Some(expiry(&field("Expiration")?)?)))
}

/// The role's keys from the IAM Identity Center portal, with the cached sign-in token.
async fn sso_role_keys(role: &SsoRole) -> Result<Timed> {
    let digest = ring::digest::digest(
        &ring::digest::SHA1_FOR_LEGACY_USE_ONLY,
        role.token_name.as_bytes(),
    );
    let home = std::env::var("HOME").unwrap_or_default();
    let path = std::path::Path::new(&home)
        .join(".aws/sso/cache")
        .join(format!("{}.json", hex::encode(digest.as_ref())));
    let sign_in = || {
        format!(
            "run 'aws sso login' for {} (its token is kept in {})",
            role.token_name,
            path.display()
        )
    };
    let cached: serde_json::Value = std::fs::read(&path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or_else(|| anyhow!("no SSO sign-in: {}", sign_in()))?;
    let token = cached["accessToken"].as_str().unwrap_or_default();
    let expired = cached["expiresAt"]
        .as_str()
        .and_then(|t| expiry(t).ok())
        .is_none_or(|t| t <= Utc::now());
    if token.is_empty() || expired {
        bail!("the SSO sign-in has expired: {}", sign_in());
    }
    let url = service_url(
        "AWS_ENDPOINT_URL_SSO",
        format!("https://portal.sso.{}.amazonaws.com", role.region),
    );
    let response = reqwest::Client::new()
        .get(format!("{url}/federation/credentials"))
        .query(&[
            ("role_name", &role.role_name),
            ("account_id", &role.account_id),
        ])
        .header("x-amz-sso_bearer_token", token)
        .send()
        .await
        .context("IAM Identity Center")?;
    let status = response.status();
    if !status.is_success() {
        bail!(
            "IAM Identity Center refused the role {} in {} (HTTP status {status}): {}",
            role.role_name,
            role.account_id,
            sign_in()
        );
    }
    let answer: serde_json::Value = serde_json::from_slice(&response.bytes().await?)
        .context("IAM Identity Center answered something other than JSON")?;
    let keys = &answer["roleCredentials"];
    let field = |name: &str| {
        keys[name]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| anyhow!("IAM Identity Center answered without {name}"))
    };
    let expires = keys["expiration"]
        .as_i64()
        .and_then(DateTime::from_timestamp_millis);
    let keys = AwsCredential {
        key_id: field("accessKeyId")?,
        secret_key: field("secretAccessKey")?,
        token: Some(field("sessionToken")?),
    };
    Ok((Arc::new(keys), expires))
}

/// The text of the first `<name>` element of an XML answer.
fn tag(xml: &str, name: &str) -> Option<String> {
    let open = format!("<{name}>");
    let start = xml.find(&open)? + open.len();
    let end = xml[start..].find(&format!("</{name}>"))? + start;
    Some(xml[start..end].trim().to_string())
}

/// A form value with everything but unreserved characters percent-encoded.
fn form_encode(value: &str) -> String {
    let mut out = String::new();
    for byte in value.bytes() {
        match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(char::from(byte))
            }
            other => out.push_str(&format!("%{other:02X}")),
        }
    }
    out
}

/// A source's keys, kept until shortly before they expire.
#[derive(Debug)]
struct Refreshing {
    source: Source,
    cached: tokio::sync::Mutex<Option<Timed>>,
}

impl CredentialProvider for Refreshing {
    type Credential = AwsCredential;

    fn get_credential<'a, 'b>(
        &'a self,
    ) -> std::pin::Pin<
        Box<dyn std::future::Future<Output = object_store::Result<Arc<AwsCredential>>> + Send + 'b>,
    >
    where
        'a: 'b,
        Self: 'b,
    {
        Box::pin(async move {
            let mut cached = self.cached.lock().await;
            if let Some((keys, expires)) = cached.as_ref()
                && expires.is_none_or(|t| t - REFRESH_BEFORE > Utc::now())
            {
                return Ok(keys.clone());
            }
            let fresh = self
                .source
                .fetch()
                .await
                .map_err(|e| object_store::Error::Generic {
                    store: "S3",
                    source: format!("AWS credentials: {e:#}").into(),
                })?;
            let keys = fresh.0.clone();
            *cached = Some(fresh);
            Ok(keys)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sts_answers_and_form_values_are_read_and_written_as_aws_does() {
        let xml = "<AssumeRoleResponse><AssumeRoleResult><Credentials>\
            <AccessKeyId>ASIAX</AccessKeyId><SecretAccessKey>s</SecretAccessKey>\
            <SessionToken>t</SessionToken><Expiration>2026-12-07T16:00:00Z</Expiration>\
            </Credentials></AssumeRoleResult></AssumeRoleResponse>";
        assert_eq!(tag(xml, "AccessKeyId").as_deref(), Some("ASIAX"));
        assert_eq!(tag(xml, "Missing"), None);
        assert_eq!(
            form_encode("arn:aws:iam::1:role/a b"),
            "arn%3Aaws%3Aiam%3A%3A1%3Arole%2Fa%20b"
        );
        assert_eq!(
            expiry("2026-12-07T16:00:00Z").unwrap().to_rfc3339(),
            "2026-12-07T16:00:00+00:00"
        );
    }
}
