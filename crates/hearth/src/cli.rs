//! Command-line flags. Every flag can also be set in the TOML file given by
//! `--config`, under a table named after the subcommand (see config.rs).

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "hearth",
    version,
    about = "Remote build execution for Bazel and any REAPI v2 client"
)]
#[command(args_override_self = true)]
pub struct Cli {
    /// Log lines as human-readable text or as one JSON object per line (for
    /// log shippers). HEARTH_LOG sets the filter (e.g. `info,hearth_vm=debug`).
    #[arg(long, global = true, default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Server and one local executor in one process, with embedded storage.
    Up(Box<UpArgs>),
    /// The server alone (API, storage, scheduler); executors connect to it.
    Server(Box<ServerArgs>),
    /// An executor that connects to a server.
    Executor(Box<ExecutorArgs>),
    /// Shows connected executors, queued and running actions, cache size.
    Status(StatusArgs),
    /// Internal: joins stdin/stdout to a Unix socket (run by QEMU to forward
    /// a VM's connection to an allowed host service).
    #[command(hide = true)]
    ForwardUnix { socket: PathBuf },
}

#[derive(Args, Debug, Clone)]
pub struct ServerArgs {
    /// TOML file with defaults for these flags (table [server], [up] or [executor]).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Address to serve gRPC on (port 0 picks a free one).
    #[arg(long, default_value = "127.0.0.1:1985")]
    pub listen: SocketAddr,
    /// Where the CAS and action cache live.
    #[arg(long, default_value = "/var/lib/hearth")]
    pub data_dir: PathBuf,
    /// Upper bound of the CAS on disk, in bytes (e.g. 10GB); LRU eviction above it.
    #[arg(long, default_value = "10GB", value_parser = parse_size)]
    pub cas_max_bytes: u64,
    /// Where blobs are kept: `disk` (under --data-dir) or
    /// `s3://BUCKET/PREFIX`, an S3-compatible bucket with the disk store as
    /// a cache in front of it (bounded by --cas-max-bytes). Several servers
    /// can share one bucket.
    #[arg(long, default_value = "disk", value_parser = crate::storage::CasStore::parse)]
    pub cas_store: crate::storage::CasStore,
    #[command(flatten)]
    pub s3: crate::storage::S3Options,
    /// Where shared state is kept: `embedded` (this process and
    /// --data-dir) or `redis://[:PASSWORD@]HOST:PORT/DB`, shared by every
    /// replica that names it. In Redis today: the action cache.
    #[arg(long, default_value = "embedded", value_parser = crate::storage::StateStore::parse)]
    pub state: crate::storage::StateStore,
    /// Seconds an action-cache entry in Redis lives without being read
    /// (every hit renews it).
    #[arg(long, default_value_t = 7 * 24 * 3600, value_parser = clap::value_parser!(u64).range(1..))]
    pub ac_ttl_secs: u64,
    /// Instance names to serve (repeatable); none means any name is accepted.
    #[arg(long = "instance")]
    pub instances: Vec<String>,
    /// Seconds an action may wait for an executor before it fails.
    #[arg(long, default_value_t = 600)]
    pub queue_timeout_secs: u64,
    /// How many times an action is retried when its executor disconnects.
    #[arg(long, default_value_t = 3)]
    pub max_attempts: u32,
    /// Seconds an executor whose session broke may take to reconnect and
    /// keep its running actions; then they are re-queued (0 = at once).
    #[arg(long, default_value_t = 10)]
    pub executor_grace_secs: u64,
    /// Seconds without a word from an executor (they report every 5 s)
    /// after which it is taken as gone.
    #[arg(long, default_value_t = 60)]
    pub executor_silence_secs: u64,
    /// Seconds an action may run or wait with no client watching it (Bazel
    /// interrupted) before it is cancelled and forgotten.
    #[arg(long, default_value_t = 3)]
    pub abandon_unwatched_secs: u64,
    /// Largest Action, Command or Directory blob the server reads (before
    /// Execute, in GetTree); bigger ones are INVALID_ARGUMENT.
    #[arg(long, default_value = "16MiB", value_parser = parse_size)]
    pub max_metadata_blob_bytes: u64,
    /// Upper bound of the action cache, in bytes of stored results; least
    /// recently used results are evicted above it (0 = unbounded).
    #[arg(long, default_value = "1GiB", value_parser = parse_size)]
    pub ac_max_bytes: u64,
    /// Seconds an interrupted ByteStream upload is kept for resumption
    /// without activity; then it is dropped and its staging file deleted.
    #[arg(long, default_value_t = 3600)]
    pub partial_upload_idle_secs: u64,
    /// Most bytes interrupted ByteStream uploads may hold together; parking
    /// one more drops the least recently active ones first.
    #[arg(long, default_value = "10GiB", value_parser = parse_size)]
    pub partial_upload_max_bytes: u64,
    /// API keys and tenants (TOML, `[[key]]` tables; reloaded on SIGHUP).
    /// Without it the server is single-tenant and anonymous.
    #[arg(long)]
    pub auth_keys: Option<PathBuf>,
    /// PEM certificate chain to serve gRPC over TLS with (with --tls-key).
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// PEM CA certificate(s): clients must present a certificate it signed.
    #[arg(long, requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
    /// Address to serve Prometheus metrics on, at /metrics (off when unset),
    /// e.g. 127.0.0.1:9185.
    #[arg(long)]
    pub metrics_listen: Option<SocketAddr>,
    /// Address of the web view (executions, executors, cache), or `off`.
    /// `hearth up` serves it by default on the gRPC address's IP and the
    /// next port (127.0.0.1:1986; a free port when --listen has port 0);
    /// `hearth server` only when set.
    #[arg(long)]
    pub web_listen: Option<String>,
}

#[derive(Args, Debug, Clone)]
pub struct ExecutorOptions {
    /// Actions run at once (default: number of cores).
    #[arg(long)]
    pub capacity: Option<u32>,
    /// Executor properties for matching, NAME=VALUE (Pool, OSFamily, Arch); repeatable.
    #[arg(long = "property", value_parser = parse_property)]
    pub properties: Vec<(String, String)>,
    /// Timeout applied to actions that set none, in seconds.
    #[arg(long, default_value_t = 3600)]
    pub default_timeout_secs: u64,
    /// Longest any action may run, in seconds.
    #[arg(long, default_value_t = 3 * 3600)]
    pub max_timeout_secs: u64,
    /// Stable executor id (default: hostname and a random suffix).
    #[arg(long)]
    pub executor_id: Option<String>,
    /// Host actions (workload-isolation-type=none): `on` runs each in a
    /// sandbox (own PID and mount namespaces, as --run-as, inputs read-only);
    /// `off` runs them unconfined as the executor's user (trusted builds only).
    #[arg(long, default_value = "on", value_parser = ["on", "off"])]
    pub host_sandbox: String,
    /// The unprivileged user sandboxed host actions run as.
    #[arg(long, default_value = "hearth-action")]
    pub run_as: String,
    /// A host directory sandboxed host actions may read, besides /usr, /bin,
    /// /lib* and /etc (e.g. /opt/toolchain); repeatable.
    #[arg(long = "sandbox-visible")]
    pub sandbox_visible: Vec<PathBuf>,
    #[command(flatten)]
    pub vm: VmOptions,
}

#[derive(Args, Debug, Clone)]
pub struct VmOptions {
    /// MicroVMs (workload-isolation-type=firecracker): auto (KVM if a probe
    /// boot works, else software emulation), kvm, tcg, or off.
    #[arg(long = "vm", default_value = "auto", value_parser = ["auto", "kvm", "tcg", "off"])]
    pub mode: String,
    /// Directory with the guest kernel: vmlinuz, release, modules/<release>/.
    #[arg(long, default_value = "/opt/hearth-deps/kernel")]
    pub vm_kernel_dir: PathBuf,
    /// The image VMs boot when an action names none.
    #[arg(long, default_value = "/opt/hearth-deps/images/default.ext4")]
    pub vm_default_image: PathBuf,
    /// The static guest agent binary (default: next to this binary's build).
    #[arg(long)]
    pub guest_agent: Option<PathBuf>,
    /// The QEMU binary.
    #[arg(long, default_value = "qemu-system-x86_64")]
    pub qemu: PathBuf,
    /// Registry (HOST:PORT) that may be used over plain HTTP; repeatable.
    #[arg(long = "insecure-registry")]
    pub insecure_registries: Vec<String>,
    /// Registry mirror for dockerd in the VMs (init-dockerd=true); repeatable.
    #[arg(long = "docker-mirror")]
    pub docker_mirrors: Vec<String>,
    /// Most paused VMs kept for recycle-runner=true.
    #[arg(long, default_value_t = 4)]
    pub vm_pool_size: usize,
    /// Most memory (MiB) paused VMs may hold together.
    #[arg(long, default_value_t = 8192)]
    pub vm_pool_memory_mib: u64,
    /// Most recycled VMs kept saved on disk (evicted from the pool or
    /// pooled at shutdown); 0 saves none.
    #[arg(long, default_value_t = 8)]
    pub vm_snapshots: usize,
    /// Fresh VMs as clones of a clean snapshot of their configuration
    /// (made on first need, and at start for the default image); `off`
    /// boots every fresh VM.
    #[arg(long, default_value = "on", value_parser = ["on", "off"])]
    pub vm_clean_snapshots: String,
    /// Most disk bytes the clean snapshots may take (least recently used
    /// deleted first).
    #[arg(long, default_value = "20GiB", value_parser = parse_size)]
    pub vm_snapshot_bytes: u64,
    /// Default VM memory in MiB (EstimatedMemory overrides).
    #[arg(long, default_value_t = 1024)]
    pub vm_memory_mib: u64,
    /// Default VM scratch disk (EstimatedFreeDiskBytes overrides).
    #[arg(long, default_value = "4GB", value_parser = parse_size)]
    pub vm_disk_bytes: u64,
    /// Most memory (MiB) one VM may ask for with EstimatedMemory
    /// (default: the host's RAM); more is INVALID_ARGUMENT.
    #[arg(long)]
    pub vm_max_memory_mib: Option<u64>,
    /// Most vCPUs one VM may ask for with EstimatedCPU (default: the host's
    /// cores); more is INVALID_ARGUMENT.
    #[arg(long)]
    pub vm_max_cpus: Option<u32>,
    /// Most scratch disk one VM may ask for with EstimatedFreeDiskBytes;
    /// more is INVALID_ARGUMENT.
    #[arg(long, default_value = "64GiB", value_parser = parse_size)]
    pub vm_max_disk_bytes: u64,
    /// How long the host waits for a VM's agent to answer a control
    /// request (mount, unmount, ping) and for QEMU to answer a QMP command
    /// (pause, resume, snapshot), in seconds; a VM that does not is killed.
    #[arg(long, default_value_t = hearth_vm::CONTROL_TIMEOUT.as_secs())]
    pub vm_control_timeout_secs: u64,
    /// How long dockerd may take to start in a VM (init-dockerd=true), in
    /// seconds; the host waits this plus --vm-control-timeout-secs.
    #[arg(long, default_value_t = hearth_vm::DOCKERD_TIMEOUT.as_secs())]
    pub vm_dockerd_timeout_secs: u64,
    /// Upper bound of the converted container-image cache (bytes on disk);
    /// least recently used images not in use are deleted above it (0 = unbounded).
    #[arg(long, default_value = "50GiB", value_parser = parse_size)]
    pub image_cache_max_bytes: u64,
}

#[derive(Args, Debug, Clone)]
pub struct UpArgs {
    #[command(flatten)]
    pub server: ServerArgs,
    #[command(flatten)]
    pub executor: ExecutorOptions,
}

/// How a client reaches a server: its address, TLS and API key.
#[derive(Args, Debug, Clone, Default)]
pub struct ClientArgs {
    /// File holding the API key to present (a key with the `executor`
    /// capability for `hearth executor`).
    #[arg(long)]
    pub api_key_file: Option<PathBuf>,
    /// PEM CA certificate(s) that sign a grpcs:// server's certificate
    /// (default: the system's roots).
    #[arg(long)]
    pub tls_ca: Option<PathBuf>,
    /// PEM client certificate, for a server that requires one.
    #[arg(long, requires = "tls_client_key")]
    pub tls_client_cert: Option<PathBuf>,
    /// PEM private key of --tls-client-cert.
    #[arg(long, requires = "tls_client_cert")]
    pub tls_client_key: Option<PathBuf>,
}

impl ClientArgs {
    /// The address of `server` with these settings.
    pub fn address(&self, server: &str) -> Result<hearth_executor::client::ServerAddress, String> {
        let api_key = match &self.api_key_file {
            Some(f) => Some(
                std::fs::read_to_string(f)
                    .map_err(|e| format!("reading --api-key-file {}: {e}", f.display()))?
                    .trim()
                    .to_string(),
            ),
            None => None,
        };
        Ok(hearth_executor::client::ServerAddress {
            url: server.to_string(),
            tls_ca: self.tls_ca.clone(),
            tls_client_cert: self.tls_client_cert.clone(),
            tls_client_key: self.tls_client_key.clone(),
            api_key,
        })
    }
}

#[derive(Args, Debug, Clone)]
pub struct ExecutorArgs {
    /// TOML file with defaults for these flags (table [executor]).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// The server, grpc://HOST:PORT or grpcs://HOST:PORT. Repeat it to
    /// name replicas of one service: the executor uses the first it can
    /// reach and moves to the next when that one cannot be reached.
    #[arg(long, required = true)]
    pub server: Vec<String>,
    #[command(flatten)]
    pub client: ClientArgs,
    /// Local cache and workspaces.
    #[arg(long, default_value = "/var/lib/hearth-executor")]
    pub work_dir: PathBuf,
    /// Upper bound of the local input cache, in bytes.
    #[arg(long, default_value = "10GB", value_parser = parse_size)]
    pub cache_max_bytes: u64,
    /// Instance name used for the server's CAS.
    #[arg(long, default_value = "")]
    pub instance: String,
    /// Address to serve this executor's Prometheus metrics on, at /metrics
    /// (off when unset).
    #[arg(long)]
    pub metrics_listen: Option<SocketAddr>,
    #[command(flatten)]
    pub options: ExecutorOptions,
}

#[derive(Args, Debug, Clone)]
pub struct StatusArgs {
    /// The server, grpc://HOST:PORT or grpcs://HOST:PORT.
    #[arg(long, default_value = "grpc://127.0.0.1:1985")]
    pub server: String,
    #[command(flatten)]
    pub client: ClientArgs,
}

fn parse_size(s: &str) -> Result<u64, String> {
    hearth_scheduler::platform::parse_bytes(s)
}

fn parse_property(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not NAME=VALUE"))?;
    Ok((k.trim().to_string(), v.trim().to_string()))
}
