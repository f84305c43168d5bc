//! The profiles of the AWS shared files (`~/.aws/credentials`, `~/.aws/config`), the selected
//! one named by `AWS_PROFILE` (else `AWS_DEFAULT_PROFILE`, else `default`): static keys, region,
//! and how a profile gets keys otherwise (`credential_process`, `role_arn` with a
//! `source_profile` or `credential_source`; [`super::aws_credentials`] resolves those). The S3
//! client reads the environment, web identity and instance credentials but not these files,
//! where a site's `aws configure` puts its keys. SSO profiles are not resolved.

use std::collections::BTreeMap;
use std::path::PathBuf;

/// What a profile holds that the AWS clients can use.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Profile {
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
    pub session_token: Option<String>,
    pub region: Option<String>,
    /// A command that prints the profile's credentials as JSON.
    pub credential_process: Option<String>,
    /// A role assumed with the keys of `source_profile` (or of `credential_source`).
    pub role_arn: Option<String>,
    pub source_profile: Option<String>,
    pub credential_source: Option<String>,
    pub external_id: Option<String>,
    pub role_session_name: Option<String>,
    pub duration_seconds: Option<u64>,
    /// AWS IAM Identity Center: the account and role, and the portal's start URL and region
    /// (in the profile, or in the `[sso-session NAME]` section it names).
    pub sso_account_id: Option<String>,
    pub sso_role_name: Option<String>,
    pub sso_session: Option<String>,
    pub sso_start_url: Option<String>,
    pub sso_region: Option<String>,
}

/// The texts of the shared credentials and config files.
#[derive(Debug, Default, Clone)]
pub struct SharedFiles {
    credentials: String,
    config: String,
}

impl SharedFiles {
    /// The files the environment names (`AWS_SHARED_CREDENTIALS_FILE`, `AWS_CONFIG_FILE`), else
    /// those under `~/.aws`; a missing file reads as empty.
    pub fn read() -> SharedFiles {
        let home = var("HOME").map(PathBuf::from).unwrap_or_default();
        let read = |override_var: &str, default: &str| {
            let path = var(override_var)
                .map(PathBuf::from)
                .unwrap_or_else(|| home.join(".aws").join(default));
            std::fs::read_to_string(path).unwrap_or_default()
        };
        SharedFiles {
            credentials: read("AWS_SHARED_CREDENTIALS_FILE", "credentials"),
            config: read("AWS_CONFIG_FILE", "config"),
        }
    }

    /// The profile `name`, as far as the files hold it; an SSO profile's start URL and region
    /// from the `[sso-session NAME]` section it names.
    pub fn profile(&self, name: &str) -> Profile {
        let mut profile = profile_from(name, &self.credentials, &self.config);
        if let Some(session) = &profile.sso_session {
            let section = section(&self.config, &format!("sso-session {session}"));
            profile.sso_start_url = section.get("sso_start_url").cloned();
            profile.sso_region = section.get("sso_region").cloned();
        }
        profile
    }
}

fn var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// The name of the selected profile.
pub fn selected_name() -> String {
    var("AWS_PROFILE")
        .or_else(|| var("AWS_DEFAULT_PROFILE"))
        .unwrap_or_else(|| "default".into())
}

/// The selected profile from the shared files, as far as they hold it.
pub fn selected_profile() -> Profile {
    SharedFiles::read().profile(&selected_name())
}

/// The profile `name` from the texts of the credentials and config files (the credentials
/// file wins where both set a key, as in the AWS CLI).
pub fn profile_from(name: &str, credentials: &str, config: &str) -> Profile {
    let in_credentials = section(credentials, name);
    let config_name = match name {
        "default" => "default".to_string(),
        other => format!("profile {other}"),
    };
    let in_config = section(config, &config_name);
    let get = |key: &str| {
        in_credentials
            .get(key)
            .or_else(|| in_config.get(key))
            .cloned()
    };
    Profile {
        access_key_id: get("aws_access_key_id"),
        secret_access_key: get("aws_secret_access_key"),
        session_token: get("aws_session_token"),
        region: get("region"),
        credential_process: get("credential_process"),
        role_arn: get("role_arn"),
        source_profile: get("source_profile"),
        credential_source: get("credential_source"),
        external_id: get("external_id"),
        role_session_name: get("role_session_name"),
        duration_seconds: get("duration_seconds").and_then(|d| d.parse().ok()),
        sso_account_id: get("sso_account_id"),
        sso_role_name: get("sso_role_name"),
        sso_session: get("sso_session"),
        sso_start_url: get("sso_start_url"),
        sso_region: get("sso_region"),
    }
}

/// The `key = value` lines of the section `[name]` of an INI text.
fn section(text: &str, name: &str) -> BTreeMap<String, String> {
    let mut inside = false;
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') || line.starts_with(';') || line.is_empty() {
            continue;
        }
        if let Some(header) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            inside = header.trim() == name;
            continue;
        }
        if let (true, Some((key, value))) = (inside, line.split_once('=')) {
            out.insert(key.trim().to_lowercase(), value.trim().to_string());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const CREDENTIALS: &str = "\
[default]
aws_access_key_id = AKIDDEFAULT
aws_secret_access_key = secret-default

# the site's ETL user
[etl]
aws_access_key_id=AKIDETL
aws_secret_access_key = secret-etl
aws_session_token = token-etl
";
    const CONFIG: &str = "\
[default]
region = us-east-2

[profile etl]
region = us-west-1
aws_secret_access_key = not-this-one
";

    #[test]
    fn a_named_profile_takes_keys_from_credentials_and_region_from_config() {
        let etl = profile_from("etl", CREDENTIALS, CONFIG);
        assert_eq!(etl.access_key_id.as_deref(), Some("AKIDETL"));
        assert_eq!(etl.secret_access_key.as_deref(), Some("secret-etl"));
        assert_eq!(etl.session_token.as_deref(), Some("token-etl"));
        assert_eq!(etl.region.as_deref(), Some("us-west-1"));
        let default = profile_from("default", CREDENTIALS, CONFIG);
        assert_eq!(default.access_key_id.as_deref(), Some("AKIDDEFAULT"));
        assert_eq!(default.session_token, None);
        assert_eq!(default.region.as_deref(), Some("us-east-2"));
        assert_eq!(
            profile_from("missing", CREDENTIALS, CONFIG),
            Profile::default()
        );
    }

    #[test]
    fn profiles_that_get_keys_otherwise_say_how() {
        let config = "\
[profile tool]
credential_process = /usr/local/bin/get-keys --account 12
[profile analyst]
role_arn = arn:aws:iam::123456789012:role/cumulus
source_profile = etl
external_id = site-7
duration_seconds = 900
";
        let tool = profile_from("tool", CREDENTIALS, config);
        assert_eq!(
            tool.credential_process.as_deref(),
            Some("/usr/local/bin/get-keys --account 12")
        );
        let analyst = profile_from("analyst", CREDENTIALS, config);
        assert_eq!(
            analyst.role_arn.as_deref(),
            Some("arn:aws:iam::123456789012:role/cumulus")
        );
        assert_eq!(analyst.source_profile.as_deref(), Some("etl"));
        assert_eq!(analyst.external_id.as_deref(), Some("site-7"));
        assert_eq!(analyst.duration_seconds, Some(900));
    }

    #[test]
    fn an_sso_profile_takes_its_portal_from_the_session_it_names() {
        let config = "\
[profile hospital]
sso_session = main
sso_account_id = 123456789012
sso_role_name = cumulus
[sso-session main]
sso_start_url = https://hospital.awsapps.com/start
sso_region = us-east-2
";
        let files = SharedFiles {
            credentials: String::new(),
            config: config.into(),
        };
        let hospital = files.profile("hospital");
        assert_eq!(hospital.sso_account_id.as_deref(), Some("123456789012"));
        assert_eq!(hospital.sso_role_name.as_deref(), Some("cumulus"));
        assert_eq!(
            hospital.sso_start_url.as_deref(),
            Some("https://hospital.awsapps.com/start")
        );
        assert_eq!(hospital.sso_region.as_deref(), Some("us-east-2"));
    }
}
