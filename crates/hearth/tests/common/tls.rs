//! A throwaway CA and a server certificate for localhost and 127.0.0.1,
//! written as PEM files, for tests of TLS.

use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, SanType};

pub struct Certs {
    /// The CA certificate clients trust (`--tls-ca`, Bazel's
    /// `--tls_certificate`).
    pub ca: PathBuf,
    /// The server's certificate and key (`--tls-cert`, `--tls-key`).
    pub cert: PathBuf,
    pub key: PathBuf,
    /// A client certificate and key the same CA signed.
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

pub fn make_certs(dir: &Path) -> Certs {
    let ca_key = KeyPair::generate().expect("CA key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "Hearth test CA");
    let ca = ca_params.self_signed(&ca_key).expect("CA certificate");
    let key = KeyPair::generate().expect("server key");
    let mut params = CertificateParams::new(vec!["localhost".to_string()]).expect("params");
    params
        .subject_alt_names
        .push(SanType::IpAddress("127.0.0.1".parse().expect("an address")));
    params
        .distinguished_name
        .push(DnType::CommonName, "localhost");
    let cert = params
        .signed_by(&key, &ca, &ca_key)
        .expect("server certificate");
    let client_key = KeyPair::generate().expect("client key");
    let mut client_params = CertificateParams::new(Vec::<String>::new()).expect("params");
    client_params
        .distinguished_name
        .push(DnType::CommonName, "team-a-ci");
    let client = client_params
        .signed_by(&client_key, &ca, &ca_key)
        .expect("client certificate");
    let certs = Certs {
        ca: dir.join("ca.pem"),
        cert: dir.join("server.pem"),
        key: dir.join("server.key"),
        client_cert: dir.join("client.pem"),
        client_key: dir.join("client.key"),
    };
    std::fs::write(&certs.client_cert, client.pem()).expect("writing client.pem");
    std::fs::write(&certs.client_key, client_key.serialize_pem()).expect("writing client.key");
    std::fs::write(&certs.ca, ca.pem()).expect("writing ca.pem");
    std::fs::write(&certs.cert, cert.pem()).expect("writing server.pem");
    std::fs::write(&certs.key, key.serialize_pem()).expect("writing server.key");
    certs
}
