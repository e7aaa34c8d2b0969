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

/// Which acted-on event a payload is shaped like (REFERENCE.md): a push has `ref` without
/// `ref_type`; create and delete have `ref` and `ref_type`, and only delete has `pusher_type`;
/// a release has a `release` object and no `ref`. `None`: shaped like none of them.
pub fn shape(json: &Value) -> Option<&'static str> {
    let has = |name: &str| json.get(name).is_some_and(|value| !value.is_null());
    if has("ref") {
        return Some(match (has("ref_type"), has("pusher_type")) {
            (false, _) => "push",
            (true, false) => "create",
            (true, true) => "delete",
        });
    }
    json.get("release").filter(|release| release.is_object()).map(|_| "release")
}

/// Parses the signed payload. X-Gogs-Event is not signed, so the event must agree with the
/// payload's [`shape`]: a body shaped like an acted-on event is refused under any other event
/// name. Events not acted on cannot be told apart by shape; they are only recorded, so a
/// mislabelled one gains nothing. For them only the repository is read, and a payload that
/// is not JSON at all is still an error (Gogs never sends one).
pub fn parse(event: &str, payload: &[u8]) -> Result<Delivery, PayloadError> {
    let error = |message: &str| PayloadError { event: event.to_owned(), message: message.to_owned() };
    let json: Value = serde_json::from_slice(payload).map_err(|_| error("is not JSON"))?;
    match (shape(&json), ACTED_ON.contains(&event)) {
        (Some(looks_like), _) if looks_like == event => {}
        (None, false) => {}
        (Some(looks_like), _) => return Err(error(&format!("X-Gogs-Event says {event}, but the body looks like a {looks_like} event"))),
        (None, true) => return Err(error(&format!("the body does not look like a {event} event"))),
    }
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
                // Gogs sends push refs in full; a short one is completed like create's.
                git_ref: Some(full_ref(&git_ref, ref_type)),
                ref_type: Some(ref_type.to_owned()),
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

    #[test]
    fn the_event_must_agree_with_the_shape_of_the_body() {
        let create = br#"{"ref":"main","ref_type":"branch","sha":"c","repository":{"full_name":"d/w"},"sender":{"username":"bob"}}"#;
        let delete = br#"{"ref":"main","ref_type":"branch","pusher_type":"user","repository":{"full_name":"d/w"},"sender":{"username":"bob"}}"#;
        let push = br#"{"ref":"refs/heads/main","before":"a","after":"b","commits":[],"repository":{"full_name":"d/w"}}"#;
        let release = br#"{"action":"published","release":{"tag_name":"v2"},"repository":{"full_name":"d/w"}}"#;
        for (body, event) in [(&create[..], "create"), (&delete[..], "delete"), (&push[..], "push"), (&release[..], "release")] {
            parse(event, body).unwrap();
            for other in ACTED_ON.iter().copied().chain(["issues", "fork"]).filter(|other| *other != event) {
                let error = parse(other, body).unwrap_err().to_string();
                assert!(error.contains(&format!("looks like a {event} event")), "{event} body as {other}: {error}");
            }
        }
        let error = parse("push", br#"{"action":"opened","issue":{},"repository":{"full_name":"d/w"}}"#).unwrap_err();
        assert!(error.to_string().contains("does not look like a push event"), "{error}");
    }

    use proptest::prelude::*;

    /// JSON built from the names the parser reads, so generated bodies reach every branch.
    fn json_value() -> impl Strategy<Value = Value> {
        let names = prop::sample::select(vec![
            "ref", "ref_type", "pusher_type", "before", "after", "commits", "sha", "release", "tag_name", "action", "repository",
            "full_name", "pusher", "sender", "author", "username", "login", "other",
        ]);
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            prop::sample::select(vec!["", "main", "refs/heads/main", "refs/tags/v1", "v1", "branch", "tag", "d/w", "alice"]).prop_map(Value::from),
            ".{0,40}".prop_map(Value::from),
        ];
        leaf.prop_recursive(4, 64, 8, move |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                prop::collection::btree_map(names.clone(), inner, 0..8)
                    .prop_map(|map| Value::Object(map.into_iter().map(|(name, value)| (name.to_owned(), value)).collect())),
            ]
        })
    }

    /// Payloads of each event as Gogs sends them, with keys removed, replaced or added, mostly
    /// under their own event name so that many of them parse.
    fn gogs_like() -> impl Strategy<Value = (String, Value)> {
        let repository = serde_json::json!({"full_name": "d/w"});
        let templates = vec![
            ("push", serde_json::json!({"ref": "refs/heads/main", "before": "a", "after": "b", "commits": [], "repository": repository, "pusher": {"username": "alice"}})),
            ("create", serde_json::json!({"ref": "main", "ref_type": "branch", "sha": "c", "repository": repository, "sender": {"username": "bob"}})),
            ("delete", serde_json::json!({"ref": "v1", "ref_type": "tag", "pusher_type": "user", "repository": repository, "sender": {"login": "bob"}})),
            ("release", serde_json::json!({"action": "published", "release": {"tag_name": "v2", "author": {"username": "carol"}}, "repository": repository})),
            ("issues", serde_json::json!({"action": "opened", "issue": {"number": 4}, "repository": repository, "sender": {"username": "dave"}})),
        ];
        let names = prop::sample::select(vec!["ref", "ref_type", "pusher_type", "before", "after", "sha", "release", "repository", "pusher", "sender"]);
        let values = prop_oneof![
            prop::sample::select(vec!["", "main", "refs/heads/main", "refs/tags/v1", "v1", "branch", "tag", "other"]).prop_map(Value::from),
            json_value(),
        ];
        let edits = prop::collection::vec((names, prop::option::of(values)), 0..3);
        (prop::sample::select(templates), prop::option::weighted(0.2, event()), edits).prop_map(|((own_event, mut payload), other_event, edits)| {
            for (name, value) in edits {
                match value {
                    Some(value) => payload[name] = value,
                    None => {
                        if let Some(object) = payload.as_object_mut() {
                            object.remove(name);
                        }
                    }
                }
            }
            (other_event.unwrap_or_else(|| own_event.to_owned()), payload)
        })
    }

    fn event() -> impl Strategy<Value = String> {
        prop_oneof![prop::sample::select(vec!["push", "create", "delete", "release", "issues", "fork"]).prop_map(str::to_owned), "[a-z_]{0,12}"]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2048))]

        #[test]
        fn arbitrary_bytes_never_panic(event in event(), bytes in prop::collection::vec(any::<u8>(), 0..256)) {
            let _ = parse(&event, &bytes);
        }

        #[test]
        fn parsed_deliveries_are_consistent((event, json) in prop_oneof![gogs_like(), (event(), json_value())]) {
            let bytes = serde_json::to_vec(&json).unwrap();
            let parsed = parse(&event, &bytes);
            // Only the JSON value counts, not how it is laid out.
            let pretty = serde_json::to_vec_pretty(&json).unwrap();
            let reparsed = parse(&event, &pretty);
            prop_assert_eq!(parsed.as_ref().ok(), reparsed.as_ref().ok());
            let Ok(delivery) = parsed else { return Ok(()) };
            for text in [&delivery.repository, &delivery.git_ref, &delivery.ref_type, &delivery.before, &delivery.after, &delivery.pusher].into_iter().flatten() {
                prop_assert!(!text.is_empty());
            }
            if !ACTED_ON.contains(&event.as_str()) {
                prop_assert_eq!(shape(&json), None);
                prop_assert_eq!(&delivery, &Delivery { repository: delivery.repository.clone(), pusher: delivery.pusher.clone(), ..Delivery::default() });
                return Ok(());
            }
            // One body, one acted-on event: no other event name accepts it.
            prop_assert_eq!(shape(&json), Some(event.as_str()));
            for other in ACTED_ON.iter().filter(|other| **other != event) {
                prop_assert!(parse(other, &bytes).is_err(), "{} body accepted as {}", event, other);
            }
            prop_assert!(delivery.repository.is_some());
            let (git_ref, ref_type) = (delivery.git_ref.unwrap(), delivery.ref_type.unwrap());
            // Normalising a normalised ref changes nothing.
            prop_assert_eq!(full_ref(&git_ref, &ref_type), git_ref.clone());
            if ref_type == "branch" || ref_type == "tag" {
                prop_assert!(git_ref.starts_with("refs/"), "{} ({})", git_ref, ref_type);
            }
            if event == "push" || event == "release" {
                prop_assert_eq!(ref_type == "tag", git_ref.starts_with("refs/tags/"));
            }
        }

        #[test]
        fn ref_normalisation_is_idempotent(short in "(refs/)?[a-z/]{0,12}", ref_type in prop::sample::select(vec!["branch", "tag", "other"])) {
            let once = full_ref(&short, ref_type);
            prop_assert_eq!(full_ref(&once, ref_type), once);
        }
    }
}
