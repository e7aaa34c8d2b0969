use std::collections::HashMap;
use std::path::PathBuf;

use serde_json::{json, Map};

use super::*;

const KAFKA: ParamSchema =
    ParamSchema { kind: "kafka_oauthbearer", required: &["principal"], optional: &["scope"], ..ParamSchema::PLAIN };

fn compile(text: &str) -> Result<PolicySet, PolicyError> {
    let context = CompileContext { issuers: None, backends: None, all_schemas: &[KAFKA] };
    PolicySet::compile(&[(PathBuf::from("policies/test.toml"), text.to_owned())], &context)
}

fn role_with_claims(claims: &str) -> String {
    format!(
        r#"
        [[role]]
        name = "deploy"
        backend = "kafka"
        issuer = "gitlab"
        default_ttl = "15m"
        max_ttl = "1h"
        principal = "ci:{{project_path}}"
        [role.claims]
        {claims}
        "#
    )
}

fn gitlab_claims() -> Map<String, Value> {
    json!({
        "project_path": "platform/orders",
        "job_project_path": "platform/orders",
        "namespace_path": "platform",
        "ref": "main",
        "ref_type": "branch",
        "ref_protected": "true",
        "runner_id": 42,
        "environment": "production",
    })
    .as_object()
    .unwrap()
    .clone()
}

fn gitlab() -> IssuerName {
    IssuerName::parse("gitlab").unwrap()
}

fn decide(claims_toml: &str, claims: &Map<String, Value>) -> Result<(), String> {
    let policies = compile(&role_with_claims(claims_toml)).unwrap();
    policies.decide("deploy", &gitlab(), claims).map(|_| ()).map_err(|d| d.0)
}

#[test]
fn all_bindings_must_match() {
    let claims = gitlab_claims();
    assert!(decide(r#"project_path = "platform/orders"
        ref = "main""#, &claims).is_ok());
    let reason = decide(r#"project_path = "platform/orders"
        ref = "develop""#, &claims).unwrap_err();
    assert!(reason.contains("claim ref"), "{reason}");
}

#[test]
fn glob_table() {
    let cases = [
        ("platform/*", "platform/orders", true),
        ("platform/*", "platform/team/orders", false),
        ("platform/**", "platform/team/orders", true),
        ("platform/ord*", "platform/orders", true),
        ("platform", "platform/orders", false),
        ("*/orders", "platform/orders", true),
    ];
    for (pattern, value, expected) in cases {
        let mut claims = gitlab_claims();
        claims.insert("project_path".into(), json!(value));
        let outcome = decide(&format!("project_path = {pattern:?}"), &claims).is_ok();
        assert_eq!(outcome, expected, "{pattern} vs {value}");
    }
}

#[test]
fn values_compare_by_json_type() {
    let claims = gitlab_claims();
    // ref_protected arrives as the string "true": a boolean binding does not match it.
    assert!(decide(r#"project_path = "platform/orders"
        ref_protected = "true""#, &claims).is_ok());
    let reason = decide(r#"project_path = "platform/orders"
        ref_protected = true"#, &claims).unwrap_err();
    assert!(reason.contains("a string"), "{reason}");
    // runner_id arrives as an integer: a string binding does not match it.
    assert!(decide(r#"project_path = "platform/orders"
        runner_id = 42"#, &claims).is_ok());
    assert!(decide(r#"project_path = "platform/orders"
        runner_id = "42""#, &claims).is_err());
}

#[test]
fn a_list_matches_any_element() {
    let claims = gitlab_claims();
    assert!(decide(r#"project_path = ["other/app", "platform/*"]"#, &claims).is_ok());
    assert!(decide(r#"project_path = ["other/app", "platform/x"]"#, &claims).is_err());
    assert!(decide(r#"project_path = "platform/orders"
        runner_id = [1, 42]"#, &claims).is_ok());
}

#[test]
fn a_missing_claim_fails() {
    let mut claims = gitlab_claims();
    claims.remove("environment");
    let reason = decide(r#"project_path = "platform/orders"
        environment = "production""#, &claims).unwrap_err();
    assert!(reason.contains("missing"), "{reason}");
}

#[test]
fn unknown_role_and_wrong_issuer_are_denied() {
    let policies = compile(&role_with_claims(r#"project_path = "platform/orders""#)).unwrap();
    assert!(policies.decide("nope", &gitlab(), &gitlab_claims()).is_err());
    let other = IssuerName::parse("keycloak").unwrap();
    let reason = policies.decide("deploy", &other, &gitlab_claims()).unwrap_err().0;
    assert!(reason.contains("trusts issuer gitlab"), "{reason}");
}

#[test]
fn a_role_must_be_scoped_to_a_project_or_namespace() {
    for claims in [r#"ref = "main""#, r#"project_path = "**""#, r#"namespace_path = "*""#, ""] {
        let error = compile(&role_with_claims(claims)).unwrap_err();
        assert_eq!(error.key.as_deref(), Some("claims"), "{claims}: {error}");
        assert_eq!(error.role.as_deref(), Some("deploy"));
    }
    assert!(compile(&role_with_claims(r#"job_namespace_path = "platform""#)).is_ok());
}

#[test]
fn load_errors_name_file_role_and_key() {
    let base = role_with_claims(r#"project_path = "platform/orders""#);
    let cases = [
        (base.replace("default_ttl = \"15m\"", "default_ttl = \"2h\""), "default_ttl"),
        (base.replace("max_ttl = \"1h\"", "max_ttl = \"forever\""), "max_ttl"),
        (base.replace("principal = ", "prinicpal = "), "prinicpal"),
        (base.replace("ci:{project_path}", "ci:{project_path"), "principal"),
        (base.replace("name = \"deploy\"", "name = \"Deploy Role\""), "name"),
        (base.replace("project_path = \"platform/orders\"", "project_path = \"platform/orders\"\nref = {}"), "claims.ref"),
        (base.replace("max_ttl = \"1h\"", "max_ttl = \"1h\"\nmin_ttl = \"2h\""), "min_ttl"),
    ];
    for (text, key) in cases {
        let error = compile(&text).unwrap_err();
        assert_eq!(error.key.as_deref(), Some(key), "{error}");
        let message = error.to_string();
        assert!(message.starts_with("policies/test.toml"), "{message}");
    }
}

#[test]
fn duplicate_role_names_are_rejected() {
    let role = role_with_claims(r#"project_path = "platform/orders""#);
    let error = compile(&format!("{role}\n{role}")).unwrap_err();
    assert!(error.to_string().contains("already defined"), "{error}");
}

#[test]
fn configured_context_checks_issuers_backends_and_required_params() {
    let issuers = [gitlab()];
    let backends = HashMap::from([(BackendName::parse("kafka").unwrap(), KAFKA)]);
    let context = CompileContext { issuers: Some(&issuers), backends: Some(&backends), all_schemas: &[KAFKA] };
    let base = role_with_claims(r#"project_path = "platform/orders""#);
    let compile_with = |text: String| PolicySet::compile(&[(PathBuf::from("p.toml"), text)], &context);
    assert!(compile_with(base.clone()).is_ok());
    let error = compile_with(base.replace("issuer = \"gitlab\"", "issuer = \"github\"")).unwrap_err();
    assert_eq!(error.key.as_deref(), Some("issuer"));
    let error = compile_with(base.replace("backend = \"kafka\"", "backend = \"vault\"")).unwrap_err();
    assert_eq!(error.key.as_deref(), Some("backend"));
    let error = compile_with(base.replace("principal = \"ci:{project_path}\"", "")).unwrap_err();
    assert_eq!(error.key.as_deref(), Some("principal"));
}

#[test]
fn params_render_from_claims() {
    let policies = compile(&role_with_claims(r#"project_path = "platform/orders""#)).unwrap();
    let role = policies.role("deploy").unwrap();
    let params = role.render_params(&gitlab_claims()).unwrap();
    assert_eq!(params.text["principal"], "ci:platform/orders");
}

#[test]
fn delivery_requirements_are_checked_at_load() {
    let role = |claims: &str, delivery: &str| format!("{}\n[role.delivery]\n{delivery}\n", role_with_claims(claims));
    let ok = compile(&role(r#"sub = "system:serviceaccount:data:loader""#, "repository = \"data/warehouse\"\nref = \"refs/heads/main\"\nmax_uses = 2")).unwrap();
    let delivery = ok.role("deploy").unwrap().delivery.as_ref().unwrap();
    assert_eq!(delivery.max_uses, 2);
    assert!(delivery.first_mismatch(&json!({"repository": "data/warehouse", "ref": "refs/heads/main"}).as_object().unwrap().clone()).is_none());
    let other_branch = json!({"repository": "data/warehouse", "ref": "refs/heads/dev"}).as_object().unwrap().clone();
    assert!(delivery.first_mismatch(&other_branch).unwrap().contains("ref"));

    let cases = [
        (role(r#"sub = "system:serviceaccount:data:loader""#, "ref = \"refs/heads/main\""), "delivery.repository"),
        (role(r#"sub = "system:serviceaccount:data:loader""#, "repository = \"*\""), "delivery.repository"),
        (role(r#"sub = "system:serviceaccount:data:loader""#, "repository = \"data/warehouse\"\nbranch = \"main\""), "delivery.branch"),
        (role(r#"sub = "system:serviceaccount:data:loader""#, "repository = \"data/warehouse\"\nmax_uses = 0"), "delivery.max_uses"),
        (role(r#"sub = "*""#, "repository = \"data/warehouse\""), "claims"),
        (role(r#"sub = "x""#, "repository = \"data/warehouse\"").replace("issuer = \"gitlab\"", "issuer = \"gogs\""), "delivery"),
    ];
    for (text, key) in cases {
        let error = compile(&text).unwrap_err();
        assert_eq!(error.key.as_deref(), Some(key), "{error}");
    }
}

mod properties {
    use proptest::prelude::*;

    use super::*;

    /// Every backend kind's parameter rules, as `policy check` offline uses them: their own
    /// checks run on whatever the generated roles hold.
    fn compile_offline(text: &str) -> Result<PolicySet, PolicyError> {
        let all_schemas = crate::backend::all_param_schemas();
        let context = CompileContext { issuers: None, backends: None, all_schemas: &all_schemas };
        PolicySet::compile(&[(PathBuf::from("policies/generated.toml"), text.to_owned())], &context)
    }

    /// A TOML value: mostly strings, which is what patterns and templates are.
    fn toml_value() -> impl Strategy<Value = String> {
        let text = prop_oneof![any::<String>(), "[a-z*{}/._ -]{0,24}", Just("**".to_owned()), Just("{project_path}".to_owned())];
        prop_oneof![
            4 => text.clone().prop_map(|s| toml::Value::String(s).to_string()),
            1 => any::<i64>().prop_map(|n| n.to_string()),
            1 => any::<bool>().prop_map(|b| b.to_string()),
            1 => prop::collection::vec(text.clone(), 0..3).prop_map(|items| toml::Value::from(items).to_string()),
            1 => (text, any::<i64>()).prop_map(|(s, n)| format!("{{ project_path = {}, runner_id = {n} }}", toml::Value::String(s))),
            1 => "[^\n]{0,16}",
        ]
    }

    fn key() -> impl Strategy<Value = String> {
        let known = [
            "name", "backend", "issuer", "default_ttl", "max_ttl", "min_ttl", "max_uses_per_token", "claims", "target",
            "description", "on_short_deadline", "allow_claims_in", "delivery", "max_uses", "principal", "scope", "project_path",
            "job_project_path", "repository", "sub", "ref", "role_arn", "session_tags", "policy", "vault_role", "mount",
            "path", "user", "user_id", "user_email", "ttl", "lease",
        ];
        prop_oneof![4 => prop::sample::select(known.to_vec()).prop_map(str::to_owned), 1 => "[a-z_.]{1,12}"]
    }

    fn line() -> impl Strategy<Value = String> {
        let header = prop::sample::select(vec![
            "[[role]]", "[role.claims]", "[role.delivery]", "[role.session_tags]", "[admins]", "[[admins]]", "[admins.claims]",
            "[auditors]", "[auditors.claims]", "[[auditors]]",
        ]);
        prop_oneof![
            1 => header.prop_map(str::to_owned),
            6 => (key(), toml_value()).prop_map(|(key, value)| format!("{key} = {value}")),
            // A plausible role start, so generated files often get past the first checks.
            1 => Just("[[role]]\nname = \"r\"\nbackend = \"b\"\nissuer = \"gitlab\"\ndefault_ttl = \"5m\"\nmax_ttl = \"1h\"".to_owned()),
        ]
    }

    proptest! {
        #[test]
        fn compiling_any_text_never_panics(text in any::<String>()) {
            let _ = compile_offline(&text);
        }

        #[test]
        fn compiling_toml_shaped_policies_never_panics(lines in prop::collection::vec(line(), 0..24)) {
            let _ = compile_offline(&lines.join("\n"));
        }

        /// Whatever the pattern and template, a role compiles or is refused naming the key; a
        /// compiled one decides and renders for any claim value without panicking.
        #[test]
        fn any_pattern_and_template_compiles_or_names_its_key(
            pattern in any::<String>(),
            template in any::<String>(),
            claim in any::<String>(),
        ) {
            let text = format!(
                "[[role]]\nname = \"deploy\"\nbackend = \"kafka\"\nissuer = \"gitlab\"\ndefault_ttl = \"15m\"\nmax_ttl = \"1h\"\n\
                 principal = {}\n[role.claims]\nproject_path = {}\n",
                toml::Value::String(template),
                toml::Value::String(pattern),
            );
            match compile(&text) {
                Ok(policies) => {
                    let claims = json!({"project_path": claim}).as_object().unwrap().clone();
                    if let Ok(role) = policies.decide("deploy", &gitlab(), &claims) {
                        let _ = role.render_params(&claims);
                    }
                }
                Err(error) => {
                    prop_assert!(error.key.is_some(), "{}", error);
                }
            }
        }

        #[test]
        fn globs_parse_and_match_anything_without_panicking(pattern in any::<String>(), value in any::<String>()) {
            if let Ok(glob) = Glob::parse(&pattern) {
                let _ = glob.matches(&value);
                prop_assert!(glob.matches(&pattern) || pattern.contains('*'), "a literal pattern matches itself");
            }
        }
    }
}
