//! The Kafka-protocol test peer: tansu (PEERS.md), one broker with in-memory storage on a
//! loopback port, started and stopped (SIGKILL, by its own child handle) per test.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The test peer. Missing tansu fails the test (it is never skipped): scripts/test.sh installs it.
fn tansu_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("TANSU_BIN") {
        return PathBuf::from(path);
    }
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .chain(std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cargo/bin")))
        .map(|dir| dir.join("tansu"))
        .find(|candidate| candidate.is_file());
    on_path.unwrap_or_else(|| {
        panic!(
            "tansu (the Kafka-protocol test peer) is not installed: run scripts/test.sh, which installs it with \
             `cargo install tansu --locked --features dynostore`, or set TANSU_BIN"
        )
    })
}

/// One tansu broker with in-memory storage on a fixed loopback port, so a restart comes back
/// where the sink's bootstrap list points.
pub struct Tansu {
    pub port: u16,
    child: Option<Child>,
    log: PathBuf,
}

impl Tansu {
    pub async fn start(dir: &std::path::Path) -> Self {
        // A port found free can be taken by another test's server before tansu binds it:
        // tansu then ends at once. Try another port.
        for _ in 0..5 {
            let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
            let mut tansu = Tansu { port, child: None, log: dir.join("tansu.log") };
            if tansu.launch().await.is_ok() {
                return tansu;
            }
        }
        panic!("tansu did not start on five ports in a row: {}", std::fs::read_to_string(dir.join("tansu.log")).unwrap_or_default());
    }

    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub async fn restart(&mut self) {
        if let Err(status) = self.launch().await {
            panic!("tansu exited with {status}: {}", std::fs::read_to_string(&self.log).unwrap_or_default());
        }
    }

    /// Starts tansu and waits until it listens; its exit status if it ended instead.
    async fn launch(&mut self) -> Result<(), std::process::ExitStatus> {
        assert!(self.child.is_none(), "tansu is already running");
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).unwrap();
        let child = Command::new(tansu_binary())
            .args(["broker", "--cluster-id", "credbroker-test", "--listener-url", &url, "--advertised-listener-url", &url])
            .args(["--storage-engine", "memory://tansu/", "--silent"])
            .env_remove("STORAGE_ENGINE")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start tansu: {e}"));
        self.child = Some(child);
        let started = Instant::now();
        loop {
            let listening = tokio::net::TcpStream::connect(("127.0.0.1", self.port)).await.is_ok();
            // Checked after a connection too: what listens may be another test's server.
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.child = None;
                return Err(status);
            }
            if listening {
                return Ok(());
            }
            assert!(started.elapsed() < Duration::from_secs(20), "tansu did not listen on {}", self.port);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// SIGKILL, as a crash or a network cut would leave it: no goodbye to the clients.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        self.stop();
    }
}
