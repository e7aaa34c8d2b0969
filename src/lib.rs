//! credbroker: exchanges a CI job's OIDC token for a credential that lives no longer than the job.
//!
//! The folders follow the flow of one exchange: [`oidc`] verifies the job token, [`policy`]
//! decides (pure, no I/O), [`backend`] mints, [`audit`] records (the only module with SQL),
//! and [`http`] / [`cli`] are thin edges. [`broker`] wires verify → decide → claim → mint →
//! record → hand over, for every kind of request. Under them: [`config`] and [`types`] (the
//! bottom layer), [`signing`] (JWT signing keys), [`vault`] (the Vault client), [`revocation`]
//! (the durable revocation schedule), [`gogs`] (webhooks), [`events`] (the outbox publisher).

pub mod audit;
pub mod backend;
pub mod broker;
pub mod cli;
pub mod config;
pub mod dev;
pub mod events;
pub mod gogs;
pub mod http;
pub mod metrics;
pub mod revocation;
pub mod oidc;
pub mod policy;
pub mod signing;
pub mod startup;
pub mod types;
pub mod vault;
