//! credbroker: exchanges a CI job's OIDC token for a credential that lives no longer than the job.
//!
//! The folders follow the flow of one exchange: [`oidc`] verifies the job token, [`policy`]
//! decides (pure, no I/O), [`backend`] mints, [`audit`] records (the only module with SQL),
//! and [`http`] / [`cli`] are thin edges. [`broker`] wires verify → decide → claim → mint →
//! record → hand over, for every kind of request. Under them: [`config`] and [`types`] (the
//! bottom layer), [`signing`] (JWT signing keys), [`vault`] (the Vault client), [`revocation`]
//! (the durable revocation schedule), [`gogs`] (webhooks), [`events`] (the outbox publisher).

#[cfg(feature = "server")]
pub mod audit;
#[cfg(feature = "server")]
pub mod backend;
#[cfg(feature = "server")]
pub mod broker;
pub mod cli;
#[cfg(feature = "server")]
pub mod config;
#[cfg(feature = "server")]
pub mod dev;
#[cfg(feature = "server")]
pub mod events;
#[cfg(feature = "server")]
pub mod gogs;
#[cfg(feature = "server")]
pub mod http;
#[cfg(feature = "server")]
pub mod metrics;
#[cfg(feature = "server")]
pub mod revocation;
#[cfg(feature = "server")]
pub mod oidc;
#[cfg(feature = "server")]
pub mod policy;
#[cfg(feature = "server")]
pub mod signing;
#[cfg(feature = "server")]
pub mod startup;
pub mod types;
#[cfg(feature = "server")]
pub mod vault;
