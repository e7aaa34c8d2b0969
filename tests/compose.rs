//! The container files are not built or run in CI (there is no Docker engine there),
//! so these tests are what stops them from rotting: they check that
//! docker-compose.yml and the Dockerfile still agree with each other and with the
//! repository they claim to package.

use std::path::{Path, PathBuf};

use yaml_rust2::{Yaml, YamlLoader};

fn repo_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn read_repo_file(name: &str) -> String {
    let path = repo_root().join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

fn compose() -> Yaml {
    let mut docs =
        YamlLoader::load_from_str(&read_repo_file("docker-compose.yml")).unwrap_or_else(|e| panic!("docker-compose.yml is not valid YAML: {e}"));
    assert_eq!(docs.len(), 1, "docker-compose.yml must hold exactly one YAML document");
    docs.remove(0)
}

fn service<'a>(compose: &'a Yaml, name: &str) -> &'a Yaml {
    let svc = &compose["services"][name];
    assert!(svc.as_hash().is_some(), "docker-compose.yml has no service `{name}`");
    svc
}

/// A scalar as compose reads it: YAML may type `8080` or `true` as non-strings.
fn scalar(y: &Yaml) -> Option<String> {
    match y {
        Yaml::String(s) | Yaml::Real(s) => Some(s.clone()),
        Yaml::Integer(i) => Some(i.to_string()),
        Yaml::Boolean(b) => Some(b.to_string()),
        _ => None,
    }
}

/// `command:` in exec form (a list) or shell form (one string).
fn words(y: &Yaml) -> Vec<String> {
    match y {
        Yaml::Array(items) => items.iter().map(|i| scalar(i).unwrap_or_else(|| panic!("non-scalar command word: {i:?}"))).collect(),
        Yaml::String(s) => s.split_whitespace().map(str::to_owned).collect(),
        other => panic!("expected a command list or string, found {other:?}"),
    }
}

/// `environment:` as a map or as a list of `KEY=VALUE`.
fn env_var(svc: &Yaml, key: &str) -> Option<String> {
    match &svc["environment"] {
        Yaml::Hash(_) => scalar(&svc["environment"][key]),
        Yaml::Array(items) => {
            items.iter().filter_map(Yaml::as_str).find_map(|kv| kv.split_once('=').filter(|(k, _)| *k == key).map(|(_, v)| v.to_owned()))
        }
        _ => None,
    }
}

fn config_paths(command: &[String]) -> Vec<String> {
    let mut paths = Vec::new();
    let mut it = command.iter();
    while let Some(word) = it.next() {
        if word == "--config" {
            paths.push(it.next().expect("`--config` is the last word of the command").clone());
        } else if let Some(path) = word.strip_prefix("--config=") {
            paths.push(path.to_owned());
        }
    }
    paths
}

/// The Kafka demo broker, and the one minting Postgres users through OpenBao.
const BROKERS: [&str; 2] = ["broker", "broker-openbao"];

fn broker_config_paths() -> Vec<String> {
    let compose = compose();
    BROKERS
        .iter()
        .flat_map(|broker| {
            let paths = config_paths(&words(&service(&compose, broker)["command"]));
            assert!(!paths.is_empty(), "{broker}'s command passes no --config");
            paths
        })
        .collect()
}

/// One published port: (host ip if bound, host port, container port).
#[derive(Debug, PartialEq)]
struct Published {
    host_ip: Option<String>,
    host_port: Option<String>,
    container_port: String,
}

fn published_ports(svc: &Yaml) -> Vec<Published> {
    let Some(ports) = svc["ports"].as_vec() else {
        return Vec::new();
    };
    ports
        .iter()
        .map(|p| match p {
            Yaml::Hash(_) => Published {
                host_ip: scalar(&p["host_ip"]),
                host_port: scalar(&p["published"]),
                container_port: scalar(&p["target"]).expect("long-form port without `target`"),
            },
            _ => {
                let short = scalar(p).unwrap_or_else(|| panic!("unreadable port entry {p:?}"));
                let spec = short.split('/').next().unwrap_or_default();
                // IP:HOST:CONTAINER, HOST:CONTAINER or CONTAINER. An IPv6 host IP
                // is bracketed, so split the container and host ports off the right.
                let mut parts = spec.rsplitn(3, ':');
                let container_port = parts.next().unwrap_or_default().to_owned();
                let host_port = parts.next().map(str::to_owned);
                let host_ip = parts.next().map(str::to_owned);
                Published { host_ip, host_port, container_port }
            }
        })
        .collect()
}

/// Dockerfile instructions with continuations joined and comments dropped.
fn dockerfile() -> Vec<(String, String)> {
    let mut instructions = Vec::new();
    let mut pending = String::new();
    for line in read_repo_file("Dockerfile").lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || (trimmed.is_empty() && pending.is_empty()) {
            continue;
        }
        if let Some(head) = trimmed.strip_suffix('\\') {
            pending.push_str(head);
            pending.push(' ');
            continue;
        }
        pending.push_str(trimmed);
        let line = pending.trim();
        let (keyword, args) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
        instructions.push((keyword.to_ascii_uppercase(), args.trim().to_owned()));
        pending.clear();
    }
    instructions
}

/// The image that runs is the last stage; earlier stages only build.
fn final_stage() -> Vec<(String, String)> {
    let all = dockerfile();
    let start = all.iter().rposition(|(k, _)| k == "FROM").expect("Dockerfile has no FROM");
    all[start..].to_vec()
}

/// Arguments in exec form (a JSON array, which is also YAML) or shell form.
fn dockerfile_args(args: &str) -> Vec<String> {
    if args.starts_with('[') {
        let docs = YamlLoader::load_from_str(args).unwrap_or_else(|e| panic!("bad exec-form arguments {args}: {e}"));
        words(&docs[0])
    } else {
        args.split_whitespace().map(str::to_owned).collect()
    }
}

/// A COPY from the build context (not `--from` another stage), destination resolved
/// against the WORKDIR in effect.
struct ContextCopy {
    sources: Vec<String>,
    dest: PathBuf,
}

fn context_copies() -> Vec<ContextCopy> {
    let mut workdir = PathBuf::from("/");
    let mut copies = Vec::new();
    for (keyword, args) in final_stage() {
        match keyword.as_str() {
            "WORKDIR" => workdir = workdir.join(args),
            "COPY" | "ADD" => {
                let words = dockerfile_args(&args);
                if words.iter().any(|w| w.starts_with("--from")) {
                    continue;
                }
                let mut paths: Vec<String> = words.into_iter().filter(|w| !w.starts_with("--")).collect();
                let dest = paths.pop().expect("COPY without a destination");
                let sources = paths.iter().map(|s| s.trim_start_matches("./").trim_end_matches('/').to_owned()).collect();
                copies.push(ContextCopy { sources, dest: workdir.join(dest) });
            }
            _ => {}
        }
    }
    copies
}

fn final_workdir() -> PathBuf {
    final_stage().iter().filter(|(k, _)| k == "WORKDIR").fold(PathBuf::from("/"), |dir, (_, arg)| dir.join(arg))
}

#[test]
fn compose_defines_postgres_and_broker_services() {
    let compose = compose();
    service(&compose, "postgres");
    for broker in BROKERS {
        service(&compose, broker);
    }
}

/// OpenBao runs in dev mode, is set up by README's setup script before its broker starts, and
/// that broker's config (which has a [vault] section) is pointed at it.
#[test]
fn the_openbao_broker_waits_for_a_set_up_dev_server() {
    let compose = compose();
    let openbao = service(&compose, "openbao");
    assert!(words(&openbao["command"]).iter().any(|w| w == "-dev"), "OpenBao is documented as dev mode only");
    assert!(published_ports(openbao).is_empty(), "OpenBao is reached over the compose network only");
    let setup = service(&compose, "openbao-setup");
    assert!(words(&setup["entrypoint"]).iter().any(|w| w.ends_with("dev/vault/setup.sh")), "runs dev/vault/setup.sh");
    assert_eq!(setup["depends_on"]["openbao"]["condition"].as_str(), Some("service_healthy"));
    let broker = service(&compose, "broker-openbao");
    assert_eq!(broker["depends_on"]["openbao-setup"]["condition"].as_str(), Some("service_completed_successfully"));
    assert_eq!(env_var(broker, "CREDBROKER_VAULT_ADDRESS").as_deref(), Some("http://openbao:8200"));
    for path in config_paths(&words(&broker["command"])) {
        assert!(read_repo_file(&path).contains("\n[vault]\n"), "{path} has no [vault] section");
    }
}

#[test]
fn broker_builds_from_repo_root_dockerfile() {
    let compose = compose();
    let build = &service(&compose, "broker")["build"];
    let (context, dockerfile) = match build {
        Yaml::String(context) => (context.clone(), "Dockerfile".to_owned()),
        Yaml::Hash(_) => (build["context"].as_str().unwrap_or(".").to_owned(), build["dockerfile"].as_str().unwrap_or("Dockerfile").to_owned()),
        other => panic!("broker has no `build` (found {other:?}); it must build this repository"),
    };
    assert!(context == "." || context == "./", "broker build context is {context:?}, expected the repository root \".\"");
    let path = repo_root().join(&context).join(&dockerfile);
    assert!(path.is_file(), "{} does not exist", path.display());
}

#[test]
fn broker_config_files_exist_in_repo() {
    for path in broker_config_paths() {
        let file = repo_root().join(&path);
        assert!(file.is_file(), "broker command uses --config {path}, but {} does not exist", file.display());
    }
}

#[test]
fn broker_config_files_are_copied_into_the_image() {
    let workdir = final_workdir();
    let copies = context_copies();
    for path in broker_config_paths() {
        let in_image = workdir.join(&path);
        // Docker copies a directory's contents into the destination, so an image
        // path under DEST corresponds to SOURCE/<rest> in the repository.
        let shipped = copies.iter().any(|copy| {
            in_image.strip_prefix(&copy.dest).is_ok_and(|rest| {
                copy.sources.iter().any(|src| {
                    let repo_path = repo_root().join(src);
                    if rest.as_os_str().is_empty() {
                        repo_path.is_file()
                    } else {
                        repo_path.join(rest).is_file()
                    }
                })
            })
        });
        assert!(
            shipped,
            "broker runs with --config {path} (= {} in the image), but no COPY in the \
             Dockerfile's final stage puts that file there",
            in_image.display()
        );
    }
}

#[test]
fn published_ports_are_bound_to_loopback() {
    let compose = compose();
    let services = compose["services"].as_hash().expect("no services in docker-compose.yml");
    for (name, svc) in services {
        let name = name.as_str().unwrap_or("?");
        // Host networking publishes every listening port on every interface.
        assert_ne!(svc["network_mode"].as_str(), Some("host"), "service {name} uses host networking");
        for port in published_ports(svc) {
            assert_eq!(port.host_ip.as_deref(), Some("127.0.0.1"), "service {name} publishes {port:?} beyond loopback");
        }
    }
}

#[test]
fn broker_listens_where_its_port_is_published() {
    let compose = compose();
    for name in BROKERS {
        let broker = service(&compose, name);
        let listen = env_var(broker, "CREDBROKER_LISTEN").expect("broker has no CREDBROKER_LISTEN");
        let (_, listen_port) = listen.rsplit_once(':').expect("CREDBROKER_LISTEN has no port");
        let public = env_var(broker, "CREDBROKER_PUBLIC_URL").expect("broker has no CREDBROKER_PUBLIC_URL");
        let public_port = public.rsplit_once(':').and_then(|(_, rest)| rest.split('/').next());
        let ports = published_ports(broker);
        assert!(
            ports
                .iter()
                .any(|p| p.container_port == listen_port && p.host_port.as_deref() == public_port && p.host_ip.as_deref() == Some("127.0.0.1")),
            "{name} listens on {listen} and calls itself {public}, but publishes {ports:?}"
        );
    }
}

#[test]
fn broker_waits_for_healthy_postgres() {
    let compose = compose();
    assert!(
        service(&compose, "postgres")["healthcheck"]["test"].as_vec().is_some()
            || service(&compose, "postgres")["healthcheck"]["test"].as_str().is_some(),
        "postgres has no healthcheck, so `service_healthy` would never be reached"
    );
    for broker in BROKERS {
        assert_eq!(
            service(&compose, broker)["depends_on"]["postgres"]["condition"].as_str(),
            Some("service_healthy"),
            "{broker} must wait for postgres to accept connections before migrating"
        );
    }
}

#[test]
fn dockerfile_entrypoint_is_credbroker() {
    let stage = final_stage();
    let (_, args) = stage.iter().rev().find(|(k, _)| k == "ENTRYPOINT").expect("the final stage has no ENTRYPOINT");
    let argv = dockerfile_args(args);
    let program = argv.first().expect("empty ENTRYPOINT");
    assert_eq!(Path::new(program).file_name().and_then(|n| n.to_str()), Some("credbroker"), "ENTRYPOINT runs {program}, not the credbroker binary");
    let copied_binary =
        stage.iter().any(|(k, a)| k == "COPY" && a.contains("--from") && dockerfile_args(a).iter().any(|w| w.ends_with("/credbroker")));
    assert!(copied_binary, "the final stage never copies the credbroker binary in from the builder");
}

#[test]
fn dockerfile_copies_policies_and_dev_directories() {
    let copies = context_copies();
    for dir in ["policies", "dev"] {
        assert!(repo_root().join(dir).is_dir(), "{dir}/ is missing from the repository");
        let expected_dest = final_workdir().join(dir);
        assert!(
            copies.iter().any(|c| c.sources.iter().any(|s| s == dir) && c.dest == expected_dest),
            "the Dockerfile's final stage does not COPY {dir} to {}",
            expected_dest.display()
        );
    }
}
