//! The host-action sandbox's wire format, shared by the `hearth-sandbox`
//! binary (PID 1 of a sandbox) and the executor that drives it.

pub mod wire;
