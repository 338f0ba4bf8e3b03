//! The executor. [`Executor`] turns an assignment into an ActionResult:
//! fetch inputs into a private workspace, hand the command to the [`Runner`]
//! for the requested isolation type, collect and upload outputs.
//! [`session`] keeps it connected to the scheduler.

// Deprecated REAPI fields (Command.output_files, …) are honoured on purpose:
// Bazel 2.1 and 4.2 still use them.
#![allow(deprecated)]

pub mod client;
pub mod confined;
mod error;
mod executor;
mod host;
mod local_cas;
mod materialize;
mod outputs;
mod remote_cas;
mod runner;
mod sandbox;
pub mod session;
mod static_bin;
mod tracker;

pub use error::ExecError;
pub use executor::{Executor, ExecutorConfig};
pub use host::{HostRunner, Sandbox, SANDBOX_ROOT};
pub use local_cas::LocalCas;
pub use remote_cas::{write_requests, GrpcStore};
pub use runner::{RunOutcome, RunSpec, Runner, RunnerStart, SharedSnapshot, StartKind};
pub use static_bin::{find_static_binary, is_static_elf};
