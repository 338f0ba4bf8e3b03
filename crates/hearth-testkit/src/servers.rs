//! Real storage engines for the scale-out tests: SeaweedFS as the S3
//! server and Debian's redis-server, each on free loopback ports with its
//! data in a temp dir, killed on drop. `scripts/install-test-servers.sh`
//! installs both.

use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::free_port;

/// `weed mini` (master, volume, filer and S3 in one process) with one
/// bucket and one identity.
pub struct SeaweedFs {
    /// `http://127.0.0.1:PORT`
    pub endpoint: String,
    pub bucket: String,
    pub access_key: String,
    pub secret_key: String,
    pub dir: tempfile::TempDir,
    child: Child,
}

impl SeaweedFs {
    pub fn start() -> SeaweedFs {
        let dir = tempfile::tempdir().unwrap();
        let (access_key, secret_key) =
            ("hearth-test".to_string(), "hearth-test-secret".to_string());
        let bucket = "hearth".to_string();
        let identities = format!(
            r#"{{"identities":[{{"name":"hearth","credentials":[{{"accessKey":"{access_key}","secretKey":"{secret_key}"}}],"actions":["Admin","Read","Write","List","Tagging"]}}]}}"#
        );
        let config = dir.path().join("identities.json");
        std::fs::write(&config, identities).unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir_all(&data).unwrap();
        let s3 = free_port();
        let mut cmd = Command::new("weed");
        cmd.arg("mini")
            .arg(format!("-dir={}", data.display()))
            .args(["-ip=127.0.0.1", "-ip.bind=127.0.0.1"]);
        for port in [
            "master.port",
            "master.port.grpc",
            "volume.port",
            "volume.port.grpc",
            "filer.port",
            "filer.port.grpc",
            "s3.port.grpc",
            "admin.port",
            "admin.port.grpc",
        ] {
            cmd.arg(format!("-{port}={}", free_port()));
        }
        cmd.arg(format!("-s3.port={s3}"))
            .args([
                "-admin.ui=false",
                "-master.telemetry=false",
                "-webdav=false",
                "-s3.port.iceberg=0",
                "-s3.port.lance=0",
            ])
            .arg(format!("-s3.config={}", config.display()))
            .arg(format!("-bucket={bucket}"));
        let log = std::fs::File::create(dir.path().join("weed.log")).unwrap();
        let child = cmd
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .expect("weed (SeaweedFS) must be installed: scripts/install-test-servers.sh");
        let server = SeaweedFs {
            endpoint: format!("http://127.0.0.1:{s3}"),
            bucket,
            access_key,
            secret_key,
            dir,
            child,
        };
        wait_for_port(s3, "weed mini", &server.dir.path().join("weed.log"));
        server.wait_for_bucket();
        server
    }

    /// The `--s3-*` flags that point `hearth` at this server.
    pub fn hearth_flags(&self) -> Vec<String> {
        [
            ("--s3-endpoint", self.endpoint.as_str()),
            ("--s3-access-key-id", &self.access_key),
            ("--s3-secret-access-key", &self.secret_key),
            ("--s3-region", "us-east-1"),
            ("--s3-allow-http", "true"),
        ]
        .into_iter()
        .flat_map(|(flag, value)| [flag.to_string(), value.to_string()])
        .collect()
    }

    /// The S3 port opens before the filer has made the bucket: waits until
    /// an anonymous request is told the bucket needs credentials rather
    /// than that it does not exist.
    fn wait_for_bucket(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let url = format!("{}/{}/", self.endpoint, self.bucket);
        loop {
            let body = Command::new("curl")
                .args(["-s", &url])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default();
            if !body.is_empty() && !body.contains("NoSuchBucket") {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "SeaweedFS made no bucket: {body}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for SeaweedFs {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `redis-server` with no persistence.
pub struct Redis {
    /// `redis://127.0.0.1:PORT/0`
    pub url: String,
    pub port: u16,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Redis {
    pub fn start() -> Redis {
        Self::start_on(free_port())
    }

    /// On a given port (a restart where clients expect it).
    pub fn start_on(port: u16) -> Redis {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("redis.log");
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(dir.path())
            .arg("--logfile")
            .arg(&log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed: scripts/install-test-servers.sh");
        wait_for_port(port, "redis-server", &log);
        Redis {
            url: format!("redis://127.0.0.1:{port}/0"),
            port,
            child,
            _dir: dir,
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_for_port(port: u16, what: &str, log: &std::path::Path) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "{what} did not start: {}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
