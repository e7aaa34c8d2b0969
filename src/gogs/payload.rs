//! The parts of Gogs webhook payloads the broker acts on (REFERENCE.md, "Gogs webhooks").
//! Gogs sends push refs in full (`refs/heads/main`) but create/delete refs short (`main` with
//! `ref_type`); both become the full form here so a policy says `ref = "refs/heads/main"` once.

use serde_json::Value;

/// Events that can start automation; anything else is recorded and ignored.
pub const ACTED_ON: &[&str] = &["push", "create", "delete", "release"];

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Delivery {
    pub repository: Option<String>,
    pub git_ref: Option<String>,
    pub ref_type: Option<String>,
    pub before: Option<String>,
    pub after: Option<String>,
    pub pusher: Option<String>,
}

#[derive(Debug, thiserror::Error)]
#[error("payload of a {event} event: {message}")]
pub struct PayloadError {
    pub event: String,
    pub message: String,
}

/// Parses the signed payload. For events not acted on only the repository is read, and a
/// payload that is not JSON at all is still an error (Gogs never sends one).
pub fn parse(event: &str, payload: &[u8]) -> Result<Delivery, PayloadError> {
    let error = |message: &str| PayloadError { event: event.to_owned(), message: message.to_owned() };
    let json: Value = serde_json::from_slice(payload).map_err(|_| error("is not JSON"))?;
    let text = |value: &Value| value.as_str().filter(|s| !s.is_empty()).map(|s| s.chars().take(512).collect::<String>());
    let repository = text(&json["repository"]["full_name"]);
    let sender = text(&json["sender"]["username"]).or_else(|| text(&json["sender"]["login"]));
    let required = |value: Option<String>, name: &str| value.ok_or_else(|| error(&format!("`{name}` is missing")));
    let delivery = match event {
        "push" => {
            let git_ref = required(text(&json["ref"]), "ref")?;
            let ref_type = if git_ref.starts_with("refs/tags/") { "tag" } else { "branch" };
            Delivery {
                repository: Some(required(repository, "repository.full_name")?),
                ref_type: Some(ref_type.to_owned()),
                git_ref: Some(git_ref),
                before: text(&json["before"]),
                after: Some(required(text(&json["after"]), "after")?),
                pusher: text(&json["pusher"]["username"]).or_else(|| text(&json["pusher"]["login"])).or(sender),
            }
        }
        "create" | "delete" => {
            let short = required(text(&json["ref"]), "ref")?;
            let ref_type = required(text(&json["ref_type"]), "ref_type")?;
            Delivery {
                repository: Some(required(repository, "repository.full_name")?),
                git_ref: Some(full_ref(&short, &ref_type)),
                ref_type: Some(ref_type),
                before: None,
                // Gogs' create payload carries the new ref's commit; delete has none.
                after: text(&json["sha"]),
                pusher: sender,
            }
        }
        "release" => {
            let tag = required(text(&json["release"]["tag_name"]), "release.tag_name")?;
            Delivery {
                repository: Some(required(repository, "repository.full_name")?),
                git_ref: Some(format!("refs/tags/{tag}")),
                ref_type: Some("tag".to_owned()),
                before: None,
                after: text(&json["release"]["sha"]),
                pusher: text(&json["release"]["author"]["username"]).or_else(|| text(&json["release"]["author"]["login"])).or(sender),
            }
        }
        _ => Delivery { repository, pusher: sender, ..Delivery::default() },
    };
    Ok(delivery)
}

fn full_ref(short: &str, ref_type: &str) -> String {
    match ref_type {
        "branch" if !short.starts_with("refs/") => format!("refs/heads/{short}"),
        "tag" if !short.starts_with("refs/") => format!("refs/tags/{short}"),
        _ => short.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn push_create_delete_and_release_normalise_refs() {
        let push = br#"{"ref":"refs/heads/main","before":"a","after":"b","repository":{"full_name":"data/warehouse"},"pusher":{"username":"alice"},"sender":{"login":"alice"}}"#;
        let parsed = parse("push", push).unwrap();
        assert_eq!(parsed.git_ref.as_deref(), Some("refs/heads/main"));
        assert_eq!(parsed.ref_type.as_deref(), Some("branch"));
        assert_eq!(parsed.after.as_deref(), Some("b"));
        assert_eq!(parsed.pusher.as_deref(), Some("alice"));

        let create = br#"{"ref":"v1.2","ref_type":"tag","sha":"c","repository":{"full_name":"data/warehouse"},"sender":{"username":"bob"}}"#;
        let parsed = parse("create", create).unwrap();
        assert_eq!(parsed.git_ref.as_deref(), Some("refs/tags/v1.2"));
        assert_eq!(parsed.pusher.as_deref(), Some("bob"));

        let release = br#"{"action":"published","release":{"tag_name":"v2","author":{"username":"carol"}},"repository":{"full_name":"data/warehouse"},"sender":{"username":"carol"}}"#;
        let parsed = parse("release", release).unwrap();
        assert_eq!(parsed.git_ref.as_deref(), Some("refs/tags/v2"));

        assert!(parse("push", br#"{"repository":{"full_name":"x/y"}}"#).is_err());
        assert!(parse("issues", b"not json").is_err());
        assert_eq!(parse("issues", br#"{"repository":{"full_name":"x/y"}}"#).unwrap().repository.as_deref(), Some("x/y"));
    }
}
