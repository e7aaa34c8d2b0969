//! `--out-dir DIR` (`credbroker exchange`, `exec`): each credential in the files its standard
//! client reads, each file complete for that client, mode 0600 in a 0700 directory, replaced in
//! place (written to a temporary name, then renamed) on a rerun or a renewal, so a client that
//! re-reads its file never sees half a credential. README ("Native client files") lists them.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde_json::Value;

/// One file of a credential: its name in the directory and its whole content.
#[derive(Debug, PartialEq, Eq)]
pub struct NativeFile {
    pub name: String,
    pub content: String,
}

/// What the files need besides the broker's answer.
pub struct Context<'a> {
    /// Absolute: the Kafka properties name the token file by its path.
    pub dir: &'a Path,
    pub role: &'a str,
    /// The broker, for librdkafka's token endpoint.
    pub broker_url: &'a str,
    /// librdkafka's assertion for that endpoint.
    pub job_token: &'a str,
}

/// Creates `dir` (0700) when missing, refuses one that others can read, and returns it absolute.
pub fn prepare_dir(dir: &Path) -> std::io::Result<PathBuf> {
    match std::fs::DirBuilder::new().mode(0o700).recursive(false).create(dir) {
        Ok(()) => {}
        Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(error) => return Err(error),
    }
    let mode = std::fs::metadata(dir)?.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(std::io::Error::other(format!(
            "{} is mode {mode:o}: credentials need a directory only its owner can open (chmod 700)",
            dir.display()
        )));
    }
    std::path::absolute(dir)
}

/// The files for one role's credential (the broker's answer `reply`), by what the credential is.
pub fn files(context: &Context<'_>, reply: &Value) -> Vec<NativeFile> {
    let credential = &reply["credential"];
    let text = |name: &str| credential[name].as_str().unwrap_or_default().to_owned();
    let role = context.role;
    let file = |name: String, content: String| NativeFile { name, content };
    if credential["mechanism"] == "OAUTHBEARER" {
        let token_file = context.dir.join(format!("{role}.kafka-token"));
        let protocol = credential["client_properties"]["security.protocol"].as_str().unwrap_or("SASL_SSL");
        // Java: the default retriever reads a `file:` token endpoint again at each refresh,
        // which `credbroker exec` keeps current.
        let java = format!(
            "security.protocol={protocol}\nsasl.mechanism=OAUTHBEARER\n\
             sasl.jaas.config=org.apache.kafka.common.security.oauthbearer.OAuthBearerLoginModule required ;\n\
             sasl.login.callback.handler.class=org.apache.kafka.common.security.oauthbearer.OAuthBearerLoginCallbackHandler\n\
             sasl.oauthbearer.token.endpoint.url=file:{}\n",
            token_file.display()
        );
        // librdkafka reads no token from a file: it fetches its own from the broker's token
        // endpoint, with the job token (written next to it) as the jwt-bearer assertion.
        let job_token_file = context.dir.join(format!("{role}.kafka-assertion"));
        let librdkafka = format!(
            "security.protocol={protocol}\nsasl.mechanism=OAUTHBEARER\nsasl.oauthbearer.method=oidc\n\
             sasl.oauthbearer.grant.type=urn:ietf:params:oauth:grant-type:jwt-bearer\n\
             sasl.oauthbearer.token.endpoint.url={}/oauth/token\nsasl.oauthbearer.assertion.file={}\nsasl.oauthbearer.scope={role}\n",
            context.broker_url.trim_end_matches('/'),
            job_token_file.display()
        );
        return vec![
            file(format!("{role}.kafka-token"), text("token")),
            file(format!("{role}.kafka-java.properties"), java),
            file(format!("{role}.librdkafka.properties"), librdkafka),
            file(format!("{role}.kafka-assertion"), context.job_token.to_owned()),
        ];
    }
    if credential.get("access_key_id").is_some() && credential.get("session_token").is_some() {
        // The shared credentials file the AWS CLI and SDKs read (AWS_SHARED_CREDENTIALS_FILE),
        // one profile named after the role.
        let content = format!(
            "[{role}]\naws_access_key_id = {}\naws_secret_access_key = {}\naws_session_token = {}\n",
            text("access_key_id"),
            text("secret_access_key"),
            text("session_token")
        );
        let mut files = vec![file(format!("{role}.aws-credentials"), content)];
        if let Some(region) = credential["region"].as_str() {
            files.push(file(format!("{role}.aws-config"), format!("[profile {role}]\nregion = {region}\n")));
        }
        return files;
    }
    if credential.get("base_url").is_some() && credential.get("access_token").is_some() {
        // looker-sdk's ini file names the instance; the session token is read separately (README).
        let ini = format!("[Looker]\nbase_url = {}\nverify_ssl = true\n", text("base_url"));
        return vec![file(format!("{role}.looker.ini"), ini), file(format!("{role}.looker-token"), text("access_token"))];
    }
    if credential["authenticator"] == "WORKLOAD_IDENTITY" {
        let mut entry = format!(
            "[{}]\naccount = {}\nauthenticator = \"WORKLOAD_IDENTITY\"\nworkload_identity_provider = \"OIDC\"\ntoken = {}\n",
            toml_key(role),
            toml_string(&text("account")),
            toml_string(&text("token"))
        );
        for field in ["user", "host"] {
            if let Some(value) = credential[field].as_str() {
                entry.push_str(&format!("{field} = {}\n", toml_string(value)));
            }
        }
        return vec![file(format!("{role}.connections.toml"), entry)];
    }
    if reply["target"] == "snowflake" && credential.get("lease_id").is_some() {
        return snowflake_database_user(context, credential);
    }
    Vec::new()
}

/// A Snowflake user from Vault's database engine: its connections.toml entry, with the password,
/// or with the key pair as a private key file the connector reads and signs its own JWTs with.
fn snowflake_database_user(context: &Context<'_>, credential: &Value) -> Vec<NativeFile> {
    let role = context.role;
    let mut entry = format!("[{}]\n", toml_key(role));
    for (field, key) in
        [("account", "account"), ("username", "user"), ("warehouse", "warehouse"), ("database", "database"), ("schema", "schema"), ("role", "role")]
    {
        if let Some(value) = credential[field].as_str() {
            entry.push_str(&format!("{key} = {}\n", toml_string(value)));
        }
    }
    let mut files = Vec::new();
    match credential["private_key"].as_str() {
        Some(private_key) => {
            let key_name = format!("{role}.snowflake-key.p8");
            let key_file = context.dir.join(&key_name);
            entry.push_str(&format!("authenticator = \"SNOWFLAKE_JWT\"\nprivate_key_file = {}\n", toml_string(&key_file.display().to_string())));
            files.push(NativeFile { name: key_name, content: private_key.to_owned() });
        }
        None => entry.push_str(&format!("password = {}\n", toml_string(credential["password"].as_str().unwrap_or_default()))),
    }
    files.insert(0, NativeFile { name: format!("{role}.connections.toml"), content: entry });
    files
}

/// The one place a credential's files reach the disk.
pub fn write(dir: &Path, files: &[NativeFile]) -> std::io::Result<()> {
    for native in files {
        let partial = dir.join(format!(".{}.partial", native.name));
        let mut file = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&partial)?;
        file.write_all(native.content.as_bytes())?;
        file.sync_all()?;
        std::fs::rename(&partial, dir.join(&native.name))?;
    }
    Ok(())
}

/// A TOML basic string. JSON's string escapes (`\"`, `\\`, `\n`, `\uXXXX`, ...) are all TOML
/// escapes too and serde_json writes no other (never `\/`); TOML also wants DEL escaped, which
/// JSON leaves raw. (The client build has no TOML crate.)
fn toml_string(value: &str) -> String {
    serde_json::Value::String(value.to_owned()).to_string().replace('\u{7f}', "\\u007f")
}

/// A bare key when it is one, quoted otherwise.
fn toml_key(key: &str) -> String {
    if !key.is_empty() && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
        key.to_owned()
    } else {
        toml_string(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn context(role: &str) -> Context<'_> {
        Context { dir: Path::new("/run/job"), role, broker_url: "https://credbroker.example.com/", job_token: "job" }
    }

    #[test]
    fn kafka_properties_name_the_token_file_by_its_absolute_path() {
        let reply = json!({"credential": {"mechanism": "OAUTHBEARER", "token": "eyJ",
            "client_properties": {"security.protocol": "SASL_SSL"}}});
        let files = files(&context("orders"), &reply);
        let names: Vec<&str> = files.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names, ["orders.kafka-token", "orders.kafka-java.properties", "orders.librdkafka.properties", "orders.kafka-assertion"]);
        assert_eq!(files[0].content, "eyJ");
        assert!(files[1].content.contains("sasl.oauthbearer.token.endpoint.url=file:/run/job/orders.kafka-token\n"), "{}", files[1].content);
        assert!(files[2].content.contains("sasl.oauthbearer.token.endpoint.url=https://credbroker.example.com/oauth/token\n"));
        assert!(files[2].content.contains("sasl.oauthbearer.assertion.file=/run/job/orders.kafka-assertion\n"));
    }

    #[test]
    fn toml_strings_read_back_as_written() {
        for value in ["plain", "quote \" and backslash \\", "line\nbreak\ttab", "\u{0}\u{1f}\u{7f}", "é 雪 \u{2028} 🔑", ""] {
            let document: toml::Table = format!("key = {}", toml_string(value)).parse().unwrap_or_else(|e| panic!("{value:?}: {e}"));
            assert_eq!(document["key"].as_str(), Some(value));
        }
    }

    #[test]
    fn a_snowflake_entry_is_valid_toml_for_any_role_name() {
        let reply = json!({"credential": {"authenticator": "WORKLOAD_IDENTITY", "account": "ORG-ACCT", "token": "t\"x", "user": "SVC"}});
        let files = files(&context("loader.eu"), &reply);
        let parsed: toml::Table = files[0].content.parse().unwrap();
        let entry = &parsed["loader.eu"];
        assert_eq!((entry["token"].as_str(), entry["user"].as_str()), (Some("t\"x"), Some("SVC")));
    }

    #[test]
    fn a_credential_no_client_reads_from_files_gets_none() {
        assert!(files(&context("r"), &json!({"credential": {"username": "u", "password": "p"}})).is_empty());
    }
}
