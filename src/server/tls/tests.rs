//! Unit tests for certificate loading, reload, client identities and handshake messages.
//! The PEM files in `testdata/` were made with openssl (EC P-256, valid until 2125):
//! `ca-cert.pem` signed `server-cert.pem` (CN=localhost, SAN DNS:localhost, IP:127.0.0.1)
//! and `client-cert.pem`; `other-client-cert.pem` comes from another CA.

use super::*;

const CA: &str = include_str!("testdata/ca-cert.pem");
const SERVER_CERT: &str = include_str!("testdata/server-cert.pem");
const SERVER_KEY: &str = include_str!("testdata/server-key.pem");
const CLIENT_CERT: &str = include_str!("testdata/client-cert.pem");
const CLIENT_KEY: &str = include_str!("testdata/client-key.pem");
const OTHER_CLIENT_CERT: &str = include_str!("testdata/other-client-cert.pem");
const OTHER_CLIENT_KEY: &str = include_str!("testdata/other-client-key.pem");

fn der(pem: &str) -> CertificateDer<'static> {
    CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()
}

/// Writes the server's files into a temporary directory, keys with mode 0600.
fn files(client_ca: bool) -> (tempfile::TempDir, TlsFiles) {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        p
    };
    let files = TlsFiles {
        cert: write("cert.pem", SERVER_CERT),
        key: write("key.pem", SERVER_KEY),
        client_ca: client_ca.then(|| write("ca.pem", CA)),
    };
    (dir, files)
}

fn current(setup: &TlsSetup) -> Arc<ServerConfig> {
    setup.current.read().unwrap().clone()
}

#[test]
fn cert_identity_gives_rfc4514_subject_and_sans() {
    let id = cert_identity(&der(CLIENT_CERT)).expect("parses");
    assert_eq!(id.subject, r"CN=client1,OU=ops,O=Example\, Inc.,C=FR");
    assert_eq!(
        id.sans,
        [
            "DNS:host.example",
            "EMAIL:ops@example.com",
            "URI:spiffe://example/client1",
            "IP:192.0.2.7",
            "IP:2001:db8::1",
        ]
    );
    let server = cert_identity(&der(SERVER_CERT)).expect("parses");
    assert_eq!(server.subject, "CN=localhost");
    assert_eq!(server.sans, ["DNS:localhost", "IP:127.0.0.1"]);
}

#[test]
fn cert_identity_of_garbage_is_none() {
    assert_eq!(
        cert_identity(&CertificateDer::from(vec![0x30, 0x03, 1, 2])),
        None
    );
    assert_eq!(cert_identity(&CertificateDer::from(Vec::new())), None);
}

#[test]
fn rfc4514_escaping() {
    assert_eq!(escape_rfc4514("a,b+c"), r"a\,b\+c");
    assert_eq!(escape_rfc4514("#x"), r"\#x");
    assert_eq!(escape_rfc4514(" x "), r"\ x\ ");
    assert_eq!(escape_rfc4514(r#"q"<>;\"#), r#"q\"\<\>\;\\"#);
    assert_eq!(escape_rfc4514("plain é"), "plain é");
}

#[test]
fn load_with_and_without_client_ca() {
    let (_d, f) = files(false);
    let setup = TlsSetup::load(TlsMode::On, f).expect("loads");
    assert_eq!(setup.mode(), TlsMode::On);
    assert!(setup.describe().contains("no client certificates"));
    let (_d, f) = files(true);
    let setup = TlsSetup::load(TlsMode::Require, f).expect("loads");
    assert!(setup.describe().contains("client certificates required"));
}

#[test]
fn load_errors_name_the_file_and_the_problem() {
    let (dir, mut f) = files(false);
    f.cert = dir.path().join("missing.pem");
    let e = TlsSetup::load(TlsMode::On, f.clone())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("cannot read certificate file") && e.contains("missing.pem"),
        "{e}"
    );

    let (dir, mut f) = files(false);
    let not_a_key = dir.path().join("notkey.pem");
    std::fs::write(&not_a_key, SERVER_CERT).unwrap();
    f.key = not_a_key;
    let e = TlsSetup::load(TlsMode::On, f).unwrap_err().to_string();
    assert!(e.contains("contains no PRIVATE KEY"), "{e}");

    let (_dir, mut f) = files(false);
    f.key = f.cert.clone();
    f.cert = f.key.with_file_name("key.pem");
    let e = TlsSetup::load(TlsMode::On, f).unwrap_err().to_string();
    assert!(e.contains("contains no CERTIFICATE"), "{e}");

    // A key that does not match the certificate.
    let (dir, mut f) = files(false);
    let other = dir.path().join("other.pem");
    std::fs::write(&other, CLIENT_KEY).unwrap();
    f.key = other;
    let e = TlsSetup::load(TlsMode::On, f).unwrap_err().to_string();
    assert!(e.contains("cannot be used together"), "{e}");
}

#[test]
fn reload_swaps_the_config_and_a_failed_reload_keeps_the_old_one() {
    let (_dir, f) = files(true);
    let setup = TlsSetup::load(TlsMode::Require, f.clone()).expect("loads");
    let first = current(&setup);
    std::fs::write(&f.cert, "not pem at all").unwrap();
    assert!(setup.reload().is_err());
    assert!(
        Arc::ptr_eq(&first, &current(&setup)),
        "failed reload replaced the config"
    );
    reload_tls(&setup); // logs, keeps the old config
    assert!(Arc::ptr_eq(&first, &current(&setup)));
    std::fs::write(&f.cert, SERVER_CERT).unwrap();
    setup.reload().expect("reload");
    assert!(
        !Arc::ptr_eq(&first, &current(&setup)),
        "reload kept the old config"
    );
}

/// Runs a TLS handshake between the server configuration and a rustls client holding
/// `client` (certificate, key); returns the server's result as a message or the identity.
async fn handshake(
    setup: &TlsSetup,
    client: Option<(&str, &str)>,
) -> Result<Option<CertIdentity>, String> {
    let mut roots = RootCertStore::empty();
    roots.add(der(CA)).unwrap();
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let config = match client {
        Some((cert, key)) => builder
            .with_client_auth_cert(
                vec![der(cert)],
                PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let (c, s) = tokio::io::duplex(64 * 1024);
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let client_side = async move {
        use tokio::io::AsyncReadExt;
        // TLS 1.3: the client learns of a refused certificate only when it reads.
        if let Ok(mut s) = connector.connect(name, c).await {
            let _ = s.read(&mut [0u8; 1]).await;
        }
    };
    let server_side = async {
        use tokio::io::AsyncWriteExt;
        let mut tls = setup
            .acceptor()
            .accept(s)
            .await
            .map_err(|e| handshake_failure(&e))?;
        let id = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .and_then(cert_identity);
        let _ = tls.shutdown().await;
        Ok(id)
    };
    let ((), result) = tokio::join!(client_side, server_side);
    result
}

#[tokio::test]
async fn client_certificate_from_the_ca_is_accepted_and_identified() {
    let (_d, f) = files(true);
    let setup = TlsSetup::load(TlsMode::Require, f).unwrap();
    let id = handshake(&setup, Some((CLIENT_CERT, CLIENT_KEY)))
        .await
        .expect("handshake");
    assert_eq!(
        id.expect("identity").subject,
        r"CN=client1,OU=ops,O=Example\, Inc.,C=FR"
    );
}

#[tokio::test]
async fn client_without_certificate_is_refused_with_a_clear_reason() {
    let (_d, f) = files(true);
    let setup = TlsSetup::load(TlsMode::Require, f).unwrap();
    let e = handshake(&setup, None).await.unwrap_err();
    assert!(e.contains("presented no certificate"), "{e}");
}

#[tokio::test]
async fn client_certificate_from_another_ca_is_refused_with_a_clear_reason() {
    let (_d, f) = files(true);
    let setup = TlsSetup::load(TlsMode::Require, f).unwrap();
    let e = handshake(&setup, Some((OTHER_CLIENT_CERT, OTHER_CLIENT_KEY)))
        .await
        .unwrap_err();
    assert!(e.contains("signed by an unknown CA"), "{e}");
}

#[tokio::test]
async fn without_client_ca_no_client_certificate_is_needed() {
    let (_d, f) = files(false);
    let setup = TlsSetup::load(TlsMode::On, f).unwrap();
    assert_eq!(handshake(&setup, None).await, Ok(None));
}

/// The session leaves the runtime with plaintext it has already received, then carries
/// more than a TLS record's worth of data each way through the reader and writer handles
/// (a socket read timeout turns a lost record into a failure rather than a hang).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocking_tls_takes_over_the_session_without_losing_data() {
    use std::io::{Read, Write};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let (_d, f) = files(false);
    let setup = TlsSetup::load(TlsMode::On, f).unwrap();
    let mut roots = RootCertStore::empty();
    roots.add(der(CA)).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let (c, s) = tokio::net::UnixStream::pair().unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let (client, server) = tokio::join!(connector.connect(name, c), setup.acceptor().accept(s));
    let (mut client, mut server) = (client.unwrap(), server.unwrap());

    // "early" reaches the server session; it reads one byte and leaves four in it.
    client.write_all(b"early").await.unwrap();
    client.flush().await.unwrap();
    let mut one = [0u8; 1];
    server.read_exact(&mut one).await.unwrap();
    assert_eq!(&one, b"e");
    let (io, session) = server.into_inner();
    let sock = io.into_std().unwrap();
    sock.set_nonblocking(false).unwrap();
    sock.set_read_timeout(Some(std::time::Duration::from_secs(20)))
        .unwrap();
    let tls = BlockingTls::new(PlainSocket::Unix(sock), session).unwrap();

    let big: Vec<u8> = (0..3 * TLS_WRITE_CHUNK + 12345)
        .map(|i| (i % 251) as u8)
        .collect();
    let len = 4 + big.len();
    let echo = std::thread::spawn(move || {
        let mut rd = tls;
        let mut wr = rd.try_clone().unwrap();
        let mut got = vec![0u8; len];
        rd.read_exact(&mut got).unwrap();
        let (head, tail) = got.split_at(4);
        let mut done = 0;
        while done < got.len() {
            let n = if done < 4 {
                wr.write_vectored(&[
                    std::io::IoSlice::new(&head[done..]),
                    std::io::IoSlice::new(tail),
                ])
            } else {
                wr.write(&tail[done - 4..])
            }
            .unwrap();
            assert!(n > 0);
            done += n;
        }
        got
    });
    client.write_all(&big).await.unwrap();
    client.flush().await.unwrap();
    let mut back = vec![0u8; len];
    client.read_exact(&mut back).await.unwrap();
    let got = tokio::task::spawn_blocking(move || echo.join().unwrap())
        .await
        .unwrap();
    assert_eq!(&got[..4], b"arly");
    assert!(got[4..] == big[..], "data changed on the way in");
    assert!(back == got, "data changed on the way out");
    // Dropping the last handle sent close_notify: the client sees a clean end.
    let mut rest = Vec::new();
    assert_eq!(client.read_to_end(&mut rest).await.unwrap(), 0);
}
