//! TLS: `hearth up` and `hearth server` on grpcs://, clients (a remote
//! executor, `hearth status`, a test client) that trust the operator's CA
//! and present API keys, and client certificates when the server asks.

mod common;

use std::process::{Child, Command as Proc, Stdio};
use std::time::{Duration, Instant};

use common::tls::{make_certs, Certs};
use common::*;
use hearth_executor::client::{connect, ServerAddress};
use hearth_proto::worker::{worker_service_client::WorkerServiceClient, StatusRequest};

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn port(h: &Hearth) -> String {
    h.addr.rsplit(':').next().unwrap().to_string()
}

fn grpcs(h: &Hearth) -> String {
    format!("grpcs://localhost:{}", port(h))
}

/// `hearth CMD` on TLS with the test keys; with `client_ca`, clients must
/// present a certificate of the same CA.
fn tls_hearth(cmd: &str, client_ca: bool) -> (Hearth, Certs) {
    let dir = tempfile::tempdir().unwrap();
    let certs = make_certs(dir.path());
    let keys = keys_file(dir.path());
    let data = dir.path().join("data").to_str().unwrap().to_string();
    let (cert, key) = (
        certs.cert.to_str().unwrap().to_string(),
        certs.key.to_str().unwrap().to_string(),
    );
    let mut args = vec![
        cmd,
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        &data,
        "--auth-keys",
        &keys,
        "--tls-cert",
        &cert,
        "--tls-key",
        &key,
    ];
    if cmd == "up" {
        args.extend(["--vm", "off"]);
    }
    let ca = certs.ca.to_str().unwrap().to_string();
    if client_ca {
        args.extend(["--tls-client-ca", &ca]);
    }
    (spawn_listening(&args, dir), certs)
}

fn client(h: &Hearth, certs: &Certs, key: &str) -> Channel {
    connect(&ServerAddress {
        url: grpcs(h),
        tls_ca: Some(certs.ca.clone()),
        api_key: Some(key.into()),
        ..Default::default()
    })
    .expect("a grpcs channel")
}

async fn run_echo(c: &Channel, text: &str) -> String {
    let action = make_action(c, &ActionSpec::new(&format!("echo {text}"))).await;
    let (_, response) = execute(c, action, true).await.expect("Execute over TLS");
    let result = response.result.expect("a result");
    assert_eq!(result.exit_code, 0);
    String::from_utf8(
        read_blob(c, result.stdout_digest.as_ref().unwrap())
            .await
            .to_vec(),
    )
    .unwrap()
}

#[tokio::test]
async fn hearth_up_on_grpcs_runs_actions_with_its_own_executor() {
    let (h, certs) = tls_hearth("up", false);
    let c = client(&h, &certs, "key-a");
    assert_eq!(run_echo(&c, "over-tls").await, "over-tls\n");
    // Plaintext to the TLS port gets nowhere.
    let plain = channel_with_key(&h, Some("key-a")).await;
    assert!(find_missing_ok(&plain).await.is_err());
}

async fn find_missing_ok(c: &Channel) -> Result<(), tonic::Status> {
    cas(c)
        .find_missing_blobs(hearth_proto::reapi::FindMissingBlobsRequest::default())
        .await
        .map(drop)
}

#[tokio::test]
async fn a_remote_executor_and_status_over_grpcs_with_keys() {
    let (h, certs) = tls_hearth("server", false);
    let dir = h.dir.path().to_path_buf();
    std::fs::write(dir.join("exec.key"), "key-exec\n").unwrap();
    std::fs::write(dir.join("admin.key"), "key-admin").unwrap();
    let _executor = Killed(
        Proc::new(bin())
            .args([
                "executor",
                "--server",
                &grpcs(&h),
                "--capacity",
                "1",
                "--vm",
                "off",
            ])
            .arg("--tls-ca")
            .arg(&certs.ca)
            .arg("--api-key-file")
            .arg(dir.join("exec.key"))
            .arg("--work-dir")
            .arg(dir.join("exec"))
            .env("HEARTH_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .expect("starting hearth executor"),
    );
    let admin = client(&h, &certs, "key-admin");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let s = WorkerServiceClient::new(admin.clone())
            .status(StatusRequest {})
            .await
            .expect("status over TLS")
            .into_inner();
        if s.executors.len() == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "the executor never connected");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let c = client(&h, &certs, "key-a");
    assert_eq!(run_echo(&c, "remote-tls").await, "remote-tls\n");

    let out = Proc::new(bin())
        .args(["status", "--server", &grpcs(&h)])
        .arg("--tls-ca")
        .arg(&certs.ca)
        .arg("--api-key-file")
        .arg(dir.join("admin.key"))
        .output()
        .expect("running hearth status");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("executors  1"), "{text}");
}

#[tokio::test]
async fn a_server_requiring_client_certificates_takes_only_its_cas() {
    let (h, certs) = tls_hearth("up", true);
    let with = |cert: Option<&Certs>| {
        connect(&ServerAddress {
            url: grpcs(&h),
            tls_ca: Some(certs.ca.clone()),
            tls_client_cert: cert.map(|c| c.client_cert.clone()),
            tls_client_key: cert.map(|c| c.client_key.clone()),
            api_key: Some("key-a".into()),
        })
        .unwrap()
    };
    find_missing_ok(&with(Some(&certs)))
        .await
        .expect("a certificate of the server's client CA");
    assert!(
        find_missing_ok(&with(None)).await.is_err(),
        "no certificate"
    );
    let other = tempfile::tempdir().unwrap();
    let stranger = make_certs(other.path());
    assert!(
        find_missing_ok(&with(Some(&stranger))).await.is_err(),
        "a certificate of another CA"
    );
    // With no key, the certificate's subject (CN=team-a-ci) stands for one.
    let by_cert = connect(&ServerAddress {
        url: grpcs(&h),
        tls_ca: Some(certs.ca.clone()),
        tls_client_cert: Some(certs.client_cert.clone()),
        tls_client_key: Some(certs.client_key.clone()),
        api_key: None,
    })
    .unwrap();
    assert_eq!(
        run_echo(&by_cert, "by-certificate").await,
        "by-certificate\n"
    );
}
