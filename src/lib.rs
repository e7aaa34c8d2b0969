//! credbroker: exchanges a CI job's OIDC token for a credential that lives no longer than the job.
//!
//! The folders follow the flow of one exchange: [`oidc`] verifies the job token, [`policy`]
//! decides (pure, no I/O), [`backend`] mints, [`audit`] records (the only module with SQL),
//! and [`http`] / [`cli`] are thin edges. [`broker`] wires verify → decide → record → mint → record.

pub mod audit;
pub mod auditors;
pub mod backend;
pub mod broker;
pub mod cli;
pub mod config;
pub mod dev;
pub mod events;
pub mod gogs;
pub mod http;
pub mod lifecycle;
pub mod oidc;
pub mod policy;
pub mod startup;
pub mod types;
pub mod vault;
