//! The host↔guest protocol of Hearth's microVMs. The guest side (the
//! `hearth-guest` binary, PID 1 inside the VM) and the host side (the VM
//! runner) share these types.

pub mod protocol;
