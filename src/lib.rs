//! credbroker: exchanges a CI job's OIDC token for a credential that lives no longer than the job.
//!
//! The folders follow the flow of one exchange: [`oidc`] verifies the job token, [`policy`]
//! decides (pure, no I/O), [`backend`] mints, [`audit`] records (the only module with SQL),
//! and [`http`] / [`cli`] are thin edges. [`broker`] wires verify → decide → claim → mint →
//! record → hand over, for every kind of request. Under them: [`config`] and [`types`] (the
//! bottom layer), [`signing`] (JWT signing keys), [`vault`] (the Vault client), [`revocation`]
//! (the durable revocation schedule), [`gogs`] (webhooks), [`events`] (the outbox publisher),
//! [`metrics`] (the Prometheus registry every part counts into), [`logging`] (the log's JSON lines).

/// The broker's modules, built with the `server` feature (the default); the job-image client
/// (`--no-default-features --features client`) is `cli` and `types` alone.
macro_rules! server_modules {
    ($($module:ident),* $(,)?) => { $( #[cfg(feature = "server")] pub mod $module; )* };
}

server_modules!(audit, backend, broker, config, dev, events, gogs, http, logging, metrics, oidc, policy, revocation, signing, startup, vault);
pub mod cli;
pub mod types;
