//! The policy set serving requests, replaced whole and at once by a reload (`SIGHUP`,
//! `POST /v1/policies/reload`): a request decides with the set it loaded when it started, and a
//! set that does not compile never replaces the one serving.

use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;

use crate::metrics::{Metrics, Outcomes};
use crate::policy::PolicySet;

/// Compiles the set from its files again; startup builds it from the configuration.
pub type PolicySource = Box<dyn Fn() -> Result<PolicySet, String> + Send + Sync>;

pub struct Policies {
    current: ArcSwap<PolicySet>,
    /// Why the last reload failed, until one succeeds (`/readyz` shows it).
    last_reload_error: Mutex<Option<String>>,
    source: PolicySource,
    /// Reloads by outcome, for `credbroker_policy_reloads_total`.
    reloads: Outcomes,
}

impl Policies {
    pub fn new(initial: PolicySet, source: PolicySource, reloads: Outcomes) -> Self {
        Self { current: ArcSwap::from_pointee(initial), last_reload_error: Mutex::new(None), source, reloads }
    }

    /// The set serving now; a request keeps this one until it ends.
    pub fn current(&self) -> Arc<PolicySet> {
        self.current.load_full()
    }

    /// Compiles the set from the files as they are now, changing nothing.
    pub fn compile(&self) -> Result<PolicySet, String> {
        (self.source)()
    }

    /// Replaces the serving set; returns its version.
    pub fn install(&self, set: PolicySet) -> String {
        Metrics::count(&self.reloads, "ok");
        let version = set.version().to_owned();
        self.current.store(Arc::new(set));
        *self.last_reload_error.lock().expect("reload error lock") = None;
        version
    }

    /// Remembers a failed reload; the set serving stays.
    pub fn reload_failed(&self, error: &str) {
        Metrics::count(&self.reloads, "failed");
        *self.last_reload_error.lock().expect("reload error lock") = Some(error.to_owned());
    }

    /// Compiles and installs, or keeps the serving set and remembers why not.
    pub fn reload(&self) -> Result<String, String> {
        match self.compile() {
            Ok(set) => Ok(self.install(set)),
            Err(error) => {
                self.reload_failed(&error);
                Err(error)
            }
        }
    }

    pub fn last_reload_error(&self) -> Option<String> {
        self.last_reload_error.lock().expect("reload error lock").clone()
    }
}
