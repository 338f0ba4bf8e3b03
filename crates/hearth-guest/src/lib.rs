//! The host↔guest protocol of Hearth's microVMs. The guest side (the
//! `hearth-guest` binary, PID 1 inside the VM) and the host side (the VM
//! runner) share these types.
//!
//! The agent's running of commands lives here too, rather than in the
//! binary, so that tests can drive it as an ordinary process.

pub mod exec;
pub mod protocol;
pub mod reap;
mod user;
