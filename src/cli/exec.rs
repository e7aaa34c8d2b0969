//! `credbroker exec --role R [--role R2 ...] -- CMD ARGS...`: runs CMD with credentials for
//! its whole life and no longer. Exchanges the job token for each role, runs CMD with the
//! credentials in its environment and in files (`$CREDBROKER_CREDENTIALS_DIR/ROLE.json` and
//! `ROLE.env`, mode 0600, in a private temp dir), re-exchanges before a credential expires
//! while the job's deadline allows (the new one replaces the files; each renewal names the
//! first issuance) and then revokes the credential it replaced, forwards signals to CMD,
//! revokes what it still holds when CMD exits (or when exec fails, CMD not starting included),
//! and exits with CMD's status (128 + N when CMD died of signal N).
//!
//! A process's environment cannot be changed from outside, so CMD's environment keeps the
//! first credential; after a renewal only the files hold a live one (the first is revoked
//! where its backend allows). Tools that run longer than one credential must read the files.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use serde_json::{json, Value};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use super::exchange::{call, read_token, write_native_files, BrokerEndpoint};
use crate::types::{rfc3339, Ttl};

#[derive(Args)]
#[command(after_long_help = "\
Credentials reach CMD twice: as environment variables, and as files in $CREDBROKER_CREDENTIALS_DIR \
(ROLE.json, the broker's answer; ROLE.env, NAME=value lines; mode 0600, removed at the end).

Renewal: once two thirds of a credential's lifetime have passed and the job's deadline allows a \
longer one (the role's max_uses_per_token must permit another exchange), exec exchanges again, \
replaces that role's files atomically, and then revokes the credential it replaced (where the \
backend can revoke: Vault leases, Looker sessions). CMD's ENVIRONMENT IS NOT UPDATED: it keeps the \
first credential, which stops working at that first renewal (revocable backends) or at its own \
expiry. A tool that runs longer than one credential lifetime must read the file, not the variable.

When CMD exits, exec revokes what it still holds and exits with CMD's status (128 + N if CMD died \
of signal N; 5 if CMD could not be started, after revoking what it had obtained).")]
pub struct ExecArgs {
    #[command(flatten)]
    broker: BrokerEndpoint,
    /// A role to obtain a credential for; repeat for several.
    #[arg(long = "role", required = true)]
    roles: Vec<String>,
    /// Requested lifetime of each credential (renewed before it ends).
    #[arg(long)]
    ttl: Option<String>,
    /// Environment variable holding the job token.
    #[arg(long, default_value = "CREDBROKER_ID_TOKEN", conflicts_with = "token_file")]
    token_env: String,
    /// File holding the job token.
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// Also keep each credential in the files its standard client reads (see `exchange
    /// --out-dir`), replaced in place at every renewal.
    #[arg(long, value_name = "DIR")]
    out_dir: Option<PathBuf>,
    /// The command and its arguments.
    #[arg(last = true, required = true)]
    command: Vec<String>,
}

/// Status when exec itself fails before CMD runs (exchange failures use the exchange codes).
const EXEC_FAILED: u8 = 5;

struct Held {
    role: String,
    first_issuance: String,
    /// Issuances obtained for the role and not yet revoked, the current one last.
    issuances: Vec<String>,
    obtained_at: OffsetDateTime,
    expires_at: OffsetDateTime,
    job_deadline: OffsetDateTime,
    /// None once renewal is impossible (the role's uses are spent, or the deadline is reached).
    renew_at: Option<OffsetDateTime>,
}

fn timestamp(reply: &Value, field: &str) -> Result<OffsetDateTime, (u8, String)> {
    reply[field]
        .as_str()
        .and_then(|text| OffsetDateTime::parse(text, &Rfc3339).ok())
        .ok_or_else(|| (3, format!("the broker's answer has no valid {field}")))
}

/// Renew once two thirds of the lifetime have passed, unless it already lasts to the deadline.
fn next_renewal(obtained_at: OffsetDateTime, expires_at: OffsetDateTime, job_deadline: OffsetDateTime) -> Option<OffsetDateTime> {
    if expires_at + time::Duration::seconds(2) >= job_deadline {
        return None;
    }
    Some(obtained_at + (expires_at - obtained_at) * 2 / 3)
}

pub async fn run(args: ExecArgs) -> ExitCode {
    match exec(&args).await {
        Ok(status) => ExitCode::from(status),
        Err((status, message)) => {
            eprintln!("credbroker exec: {message}");
            ExitCode::from(status)
        }
    }
}

async fn exec(args: &ExecArgs) -> Result<u8, (u8, String)> {
    let token = read_token(&args.token_env, args.token_file.as_deref())?;
    let ttl = args.ttl.as_deref().map(|raw| Ttl::parse(raw).map_err(|m| (2, format!("--ttl: {m}")))).transpose()?;
    let dir = private_dir().map_err(|e| (EXEC_FAILED, format!("cannot create a private temp dir: {e}")))?;
    let outcome = supervise(args, &token, ttl, &dir).await;
    let _ = std::fs::remove_dir_all(&dir);
    outcome
}

/// Every credential minted is released before exec exits, whatever ends it: the command's
/// exit, or exec failing before or while the command runs (a command that cannot start).
async fn supervise(args: &ExecArgs, token: &str, ttl: Option<Ttl>, dir: &Path) -> Result<u8, (u8, String)> {
    let mut held: Vec<Held> = Vec::new();
    let outcome = run_with_credentials(args, token, ttl, dir, &mut held).await;
    revoke_all(args, token, &held).await;
    outcome
}

/// Obtains the credentials and runs the command with them; everything minted is in `held`.
async fn run_with_credentials(args: &ExecArgs, token: &str, ttl: Option<Ttl>, dir: &Path, held: &mut Vec<Held>) -> Result<u8, (u8, String)> {
    let mut env = BTreeMap::new();
    for role in &args.roles {
        let reply = obtain(args, token, role, ttl, None).await?;
        held.push(Held::new(role, &reply));
        held.last_mut().expect("just pushed").schedule(&reply)?;
        write_files(dir, role, &reply).map_err(|e| (EXEC_FAILED, format!("cannot write the credential files: {e}")))?;
        if let Some(out_dir) = &args.out_dir {
            write_native_files(out_dir, role, &reply, &args.broker.url, token).map_err(|(_, message)| (EXEC_FAILED, message))?;
        }
        for (name, value) in reply["env"].as_object().into_iter().flatten() {
            if let Some(value) = value.as_str() {
                env.insert(name.clone(), value.to_owned());
            }
        }
    }
    env.insert("CREDBROKER_CREDENTIALS_DIR".into(), dir.display().to_string());

    // Listening before the command starts: a failure here must not leave it running unsupervised.
    let mut signals = Signals::new().map_err(|e| (EXEC_FAILED, format!("cannot listen for signals: {e}")))?;
    let mut child = std::process::Command::new(&args.command[0])
        .args(&args.command[1..])
        .envs(&env)
        .spawn()
        .map_err(|e| (EXEC_FAILED, format!("cannot run {:?}: {e}", args.command[0])))?;
    let pid = child.id() as i32;
    let (exited_tx, mut exited) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let _ = exited_tx.send(child.wait());
    });

    let status = loop {
        let next = held.iter().filter_map(|h| h.renew_at).min();
        let wait = next.map(|at| (at - OffsetDateTime::now_utc()).max(time::Duration::ZERO).unsigned_abs()).unwrap_or(Duration::from_secs(3600));
        tokio::select! {
            status = &mut exited => break status.map_err(|_| (EXEC_FAILED, "lost the command".to_owned()))?,
            signal = signals.recv() => {
                // SAFETY: kill(2) with the pid of our own child and a valid signal number.
                unsafe { libc::kill(pid, signal) };
            }
            () = tokio::time::sleep(wait), if next.is_some() => {
                let now = OffsetDateTime::now_utc();
                for entry in held.iter_mut().filter(|h| h.renew_at.is_some_and(|at| at <= now)) {
                    renew(args, token, ttl, dir, entry).await;
                }
            }
        }
    };
    let status = status.map_err(|e| (EXEC_FAILED, format!("cannot wait for the command: {e}")))?;
    use std::os::unix::process::ExitStatusExt;
    Ok(match (status.code(), status.signal()) {
        (Some(code), _) => code as u8,
        (None, Some(signal)) => 128u8.saturating_add(signal as u8),
        (None, None) => EXEC_FAILED,
    })
}

impl Held {
    /// Held from the moment it is minted, so that every way out releases it.
    fn new(role: &str, reply: &Value) -> Self {
        let issuance = reply["issuance_id"].as_str().unwrap_or_default().to_owned();
        let now = OffsetDateTime::now_utc();
        Held {
            role: role.to_owned(),
            first_issuance: issuance.clone(),
            issuances: vec![issuance],
            obtained_at: now,
            expires_at: now,
            job_deadline: now,
            renew_at: None,
        }
    }

    /// Takes the lifetime of a credential just obtained and plans its renewal; an answer
    /// without valid times is never renewed.
    fn schedule(&mut self, reply: &Value) -> Result<(), (u8, String)> {
        self.renew_at = None;
        let expires_at = timestamp(reply, "expires_at")?;
        let job_deadline = timestamp(reply, "job_deadline")?;
        self.obtained_at = OffsetDateTime::now_utc();
        self.expires_at = expires_at;
        self.job_deadline = job_deadline;
        self.renew_at = next_renewal(self.obtained_at, expires_at, job_deadline);
        Ok(())
    }
}

async fn obtain(args: &ExecArgs, token: &str, role: &str, ttl: Option<Ttl>, renews: Option<&str>) -> Result<Value, (u8, String)> {
    let mut body = json!({ "role": role });
    if let Some(ttl) = ttl {
        body["ttl_seconds"] = json!(ttl.seconds());
    }
    if let Some(first) = renews {
        body["renews"] = json!(first);
    }
    call(reqwest::Method::POST, &args.broker, "/v1/credentials", token, &body).await
}

/// One renewal attempt. Failing for want of uses is final and said plainly; anything else is
/// tried again shortly, while the current credential still lives.
async fn renew(args: &ExecArgs, token: &str, ttl: Option<Ttl>, dir: &Path, entry: &mut Held) {
    match obtain(args, token, &entry.role, ttl, Some(&entry.first_issuance)).await {
        Ok(reply) => {
            let written = write_files(dir, &entry.role, &reply).map_err(|e| e.to_string()).and_then(|()| match &args.out_dir {
                Some(out_dir) => write_native_files(out_dir, &entry.role, &reply, &args.broker.url, token).map_err(|(_, message)| message),
                None => Ok(()),
            });
            if let Err(error) = &written {
                eprintln!("credbroker exec: cannot write the renewed credential for {}: {error}", entry.role);
            }
            let issuance = reply["issuance_id"].as_str().unwrap_or_default().to_owned();
            // Without valid times the renewed credential is kept to the end but not renewed again.
            let _ = entry.schedule(&reply);
            let superseded = std::mem::take(&mut entry.issuances);
            entry.issuances.push(issuance.clone());
            if written.is_err() {
                // The files still hold the old credential: it stays until the end.
                entry.issuances.splice(0..0, superseded);
                return;
            }
            for old in superseded {
                if !release(args, token, &entry.role, &old, Some(&issuance)).await {
                    entry.issuances.insert(entry.issuances.len() - 1, old);
                }
            }
        }
        Err((_, message)) if message.starts_with("token_replayed") => {
            eprintln!(
                "credbroker exec: cannot renew {}: the role's max_uses_per_token does not allow another exchange of this job token \
                 ({message}); the credential ends at {}",
                entry.role,
                rfc3339(entry.expires_at)
            );
            entry.renew_at = None;
        }
        Err((_, message)) => {
            let retry = OffsetDateTime::now_utc() + time::Duration::seconds(5);
            entry.renew_at = (retry < entry.expires_at).then_some(retry);
            eprintln!(
                "credbroker exec: renewing {} failed: {message}; {}",
                entry.role,
                if entry.renew_at.is_some() { "retrying" } else { "giving up" }
            );
        }
    }
}

async fn revoke_all(args: &ExecArgs, token: &str, held: &[Held]) {
    for entry in held {
        for issuance in &entry.issuances {
            release(args, token, &entry.role, issuance, None).await;
        }
    }
}

/// Asks the broker to end one credential (`superseded_by`: the renewal that replaced it).
/// True when nothing more can be done about it (revoked, or not revocable at all).
async fn release(args: &ExecArgs, token: &str, role: &str, issuance: &str, superseded_by: Option<&str>) -> bool {
    let path = format!("/v1/credentials/{issuance}");
    let body = match superseded_by {
        Some(by) => json!({ "superseded_by": by }),
        None => json!({}),
    };
    match call(reqwest::Method::DELETE, &args.broker, &path, token, &body).await {
        Ok(reply) if matches!(reply["outcome"].as_str(), Some("not_revocable" | "revoked" | "already_revoked")) => true,
        Ok(reply) => {
            eprintln!("credbroker exec: {role} ({issuance}): {}", reply["outcome"]);
            false
        }
        Err((_, message)) => {
            eprintln!("credbroker exec: could not revoke {role} ({issuance}): {message}");
            false
        }
    }
}

fn private_dir() -> std::io::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("credbroker-exec-{}", uuid::Uuid::new_v4().simple()));
    std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
    Ok(dir)
}

/// `ROLE.json` (the broker's answer) and `ROLE.env` (NAME=value lines), each written to a
/// temporary name and renamed, so a reader never sees half a credential.
fn write_files(dir: &Path, role: &str, reply: &Value) -> std::io::Result<()> {
    let dotenv: String =
        reply["env"].as_object().into_iter().flatten().filter_map(|(name, value)| Some(format!("{name}={}\n", value.as_str()?))).collect();
    for (extension, content) in [("json", format!("{reply:#}\n")), ("env", dotenv)] {
        let path = dir.join(format!("{role}.{extension}"));
        let partial = dir.join(format!(".{role}.{extension}.partial"));
        let mut file = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&partial)?;
        file.write_all(content.as_bytes())?;
        file.sync_all()?;
        std::fs::rename(&partial, &path)?;
    }
    Ok(())
}

/// The signals a supervisor passes on to its child.
struct Signals(Vec<(i32, tokio::signal::unix::Signal)>);

impl Signals {
    fn new() -> std::io::Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        let kinds = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT, libc::SIGUSR1, libc::SIGUSR2];
        Ok(Self(kinds.into_iter().map(|number| Ok((number, signal(SignalKind::from_raw(number))?))).collect::<std::io::Result<_>>()?))
    }

    async fn recv(&mut self) -> i32 {
        let waits = self.0.iter_mut().map(|(number, signal)| {
            let number = *number;
            Box::pin(async move {
                signal.recv().await;
                number
            })
        });
        futures_select_all(waits).await
    }
}

/// The first of several futures to finish.
async fn futures_select_all<F: std::future::Future<Output = i32> + Unpin>(futures: impl Iterator<Item = F>) -> i32 {
    let mut futures: Vec<F> = futures.collect();
    std::future::poll_fn(move |context| {
        for future in futures.iter_mut() {
            if let std::task::Poll::Ready(value) = std::pin::Pin::new(future).poll(context) {
                return std::task::Poll::Ready(value);
            }
        }
        std::task::Poll::Pending
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renews_after_two_thirds_unless_it_already_reaches_the_deadline() {
        let now = OffsetDateTime::now_utc();
        let minute = time::Duration::minutes(1);
        assert_eq!(next_renewal(now, now + 3 * minute, now + 60 * minute), Some(now + 2 * minute));
        assert_eq!(next_renewal(now, now + 60 * minute, now + 60 * minute), None);
    }
}
