//! TLS on the NBD port (`serve --tls on|require`, `--tls-client-ca`, SIGHUP reload) against
//! the real clients that speak NBD over TLS: nbdinfo/nbdcopy/nbdsh (libnbd, GnuTLS) and
//! qemu-img (tls-creds-x509). Certificates are made with openssl at test time.
//! The kernel's nbd-client over TLS is exercised by scripts/kernel-test.sh.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// A test PKI in a temporary directory.
///
/// - `ca` signs the server certificate (CN=localhost, SAN DNS:localhost + IP:127.0.0.1)
///   and the client certificate `CN=client1`;
/// - `other` is an unrelated CA that signs the client certificate `CN=intruder`;
/// - client directories in the layout libnbd and qemu expect (`ca-cert.pem`,
///   `client-cert.pem`, `client-key.pem`): `good` (client1), `intruder` (intruder),
///   `anonymous` (no client certificate). All of them trust `ca` for the server.
struct Pki {
    dir: PathBuf,
}

fn openssl(dir: &Path, args: &[&str]) {
    require("openssl");
    run_ok(Command::new("openssl").current_dir(dir).args(args));
}

impl Pki {
    fn new(env: &Env) -> Pki {
        let dir = env.path("pki");
        std::fs::create_dir_all(&dir).expect("pki dir");
        let pki = Pki { dir };
        pki.make_ca("ca", "/O=cryptvol tests/CN=Test CA");
        pki.make_ca("other", "/O=somebody else/CN=Other CA");
        pki.issue(
            "ca",
            "server",
            "/CN=localhost",
            "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
        );
        pki.issue(
            "ca",
            "client1",
            "/O=cryptvol tests/CN=client1",
            "extendedKeyUsage=clientAuth\nsubjectAltName=DNS:client1.example\n",
        );
        pki.issue(
            "other",
            "intruder",
            "/CN=intruder",
            "extendedKeyUsage=clientAuth\n",
        );
        pki.client_dir("good", "ca", Some("client1"));
        pki.client_dir("intruder", "ca", Some("intruder"));
        pki.client_dir("anonymous", "ca", None);
        pki
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn make_ca(&self, name: &str, subject: &str) {
        openssl(
            &self.dir,
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-days",
                "2",
                "-subj",
                subject,
                "-keyout",
                &format!("{name}-key.pem"),
                "-out",
                &format!("{name}-cert.pem"),
            ],
        );
    }

    /// `NAME-cert.pem` / `NAME-key.pem` signed by `ca`, with these extensions.
    fn issue(&self, ca: &str, name: &str, subject: &str, ext: &str) {
        let ext_file = format!("{name}.ext");
        std::fs::write(self.path(&ext_file), ext).expect("ext file");
        openssl(
            &self.dir,
            &[
                "req",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-subj",
                subject,
                "-keyout",
                &format!("{name}-key.pem"),
                "-out",
                &format!("{name}.csr"),
            ],
        );
        openssl(
            &self.dir,
            &[
                "x509",
                "-req",
                "-days",
                "2",
                "-in",
                &format!("{name}.csr"),
                "-CA",
                &format!("{ca}-cert.pem"),
                "-CAkey",
                &format!("{ca}-key.pem"),
                "-CAcreateserial",
                "-extfile",
                &ext_file,
                "-out",
                &format!("{name}-cert.pem"),
            ],
        );
        set_mode(&self.path(&format!("{name}-key.pem")), 0o600);
    }

    /// A client directory trusting `server_ca`, with `client`'s certificate if any.
    fn client_dir(&self, dir: &str, server_ca: &str, client: Option<&str>) -> PathBuf {
        let d = self.path(dir);
        std::fs::create_dir_all(&d).expect("client dir");
        std::fs::copy(
            self.path(&format!("{server_ca}-cert.pem")),
            d.join("ca-cert.pem"),
        )
        .expect("copy CA");
        if let Some(c) = client {
            std::fs::copy(
                self.path(&format!("{c}-cert.pem")),
                d.join("client-cert.pem"),
            )
            .expect("copy client cert");
            std::fs::copy(self.path(&format!("{c}-key.pem")), d.join("client-key.pem"))
                .expect("copy client key");
            set_mode(&d.join("client-key.pem"), 0o600);
        }
        d
    }

    /// `serve` arguments: TLS `mode` with the server certificate, and client certificates
    /// required from `ca` when `mutual`.
    fn serve_args(&self, mode: &str, mutual: bool) -> Vec<String> {
        let mut v = vec![
            "--tls".to_string(),
            mode.to_string(),
            "--tls-cert".to_string(),
            s(&self.path("server-cert.pem")).to_string(),
            "--tls-key".to_string(),
            s(&self.path("server-key.pem")).to_string(),
        ];
        if mutual {
            v.push("--tls-client-ca".to_string());
            v.push(s(&self.path("ca-cert.pem")).to_string());
        }
        v
    }
}

fn set_mode(p: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

/// A TLS server whose exports admit anyone who can connect (plaintext TCP clients too):
/// for the tests of the TLS layer itself.
fn serve_tls(env: &Env, vols: &[&str], args: &[String]) -> Server {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    env.serve(vols, &args, true)
}

/// A TLS server whose exports keep their access policy: clients are admitted by their
/// verified certificates (or refused).
fn serve_tls_policy(env: &Env, vols: &[&str], args: &[String]) -> Server {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    env.serve_tcp_policy(vols, &args)
}

/// `nbds://127.0.0.1:PORT/EXPORT?tls-certificates=DIR`
fn nbds(srv: &Server, export: &str, certs: &Path) -> String {
    format!(
        "nbds://127.0.0.1:{}/{export}?tls-certificates={}",
        srv.port.expect("TCP listener"),
        certs.display()
    )
}

/// Waits until the server log contains `needle` (the server may log a refusal just after
/// the client has given up).
fn wait_log(srv: &Server, needle: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let log = srv.log_text();
        if log.contains(needle) {
            return log;
        }
        assert!(
            Instant::now() < deadline,
            "the server never logged {needle:?}:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn nbdinfo_size(uri: &str) -> u64 {
    require("nbdinfo");
    run_ok(Command::new("nbdinfo").args(["--size", uri]))
        .trim()
        .parse()
        .expect("nbdinfo --size prints a number")
}

#[test]
fn nbdinfo_and_nbdcopy_over_tls_with_a_client_certificate() {
    require("nbdcopy");
    let env = Env::new();
    let pki = Pki::new(&env);
    let vol = env.create("data.img", "16M", &[]);
    let srv = serve_tls_policy(&env, &[s(&vol)], &pki.serve_args("require", true));
    let good = pki.path("good");

    assert_eq!(nbdinfo_size(&nbds(&srv, "data", &good)), 16 << 20);
    let log = wait_log(&srv, "verified client certificate");
    assert!(
        log.contains(r#"subject "CN=client1,O=cryptvol tests", SANs DNS:client1.example"#),
        "the client certificate's identity is not logged:\n{log}"
    );

    let data = pattern(16 << 20, 0x5eed_7715);
    let src = env.path("src.raw");
    std::fs::write(&src, &data).expect("write source");
    run_ok(Command::new("nbdcopy").args([s(&src), &nbds(&srv, "data", &good)]));
    let out = env.path("out.raw");
    run_ok(Command::new("nbdcopy").args([&nbds(&srv, "data", &good), s(&out)]));
    assert!(read(&out) == data, "nbdcopy over TLS changed the data");
    // The volume holds ciphertext only.
    assert!(!contains(&read(&vol), &data[..4096]));
    let log = srv.stop();
    assert!(
        !log.contains("TLS handshake with"),
        "a handshake failed:\n{log}"
    );
}

#[test]
fn qemu_img_convert_round_trips_over_tls() {
    require("qemu-img");
    let env = Env::new();
    let pki = Pki::new(&env);
    let vol = env.create("img.img", "32M", &[]);
    let srv = serve_tls_policy(&env, &[s(&vol)], &pki.serve_args("require", true));
    let port = srv.port.expect("TCP listener");
    let creds = format!(
        "tls-creds-x509,id=tls0,dir={},endpoint=client",
        pki.path("good").display()
    );
    let target = format!("driver=nbd,host=127.0.0.1,port={port},export=img,tls-creds=tls0");
    let data = pattern(32 << 20, 0x0dd_ba11);
    let src = env.path("src.raw");
    std::fs::write(&src, &data).expect("write source");
    run_ok(Command::new("qemu-img").args([
        "convert",
        "-n",
        "--object",
        &creds,
        "-f",
        "raw",
        "--target-image-opts",
        s(&src),
        &target,
    ]));
    let out = env.path("out.raw");
    run_ok(Command::new("qemu-img").args([
        "convert",
        "--object",
        &creds,
        "--image-opts",
        &target,
        "-O",
        "raw",
        s(&out),
    ]));
    let back = read(&out);
    assert_eq!(back.len(), data.len(), "size of the converted-out image");
    assert!(
        back == data,
        "qemu-img round trip over TLS changed the data"
    );
    let log = srv.stop();
    assert!(log.contains("tls=true"), "{log}");
}

#[test]
fn plaintext_client_is_refused_before_any_export_is_listed_under_tls_require() {
    require("nbdinfo");
    let env = Env::new();
    let pki = Pki::new(&env);
    let vol = env.create("secret-name.img", "8M", &[]);
    let srv = serve_tls(&env, &[s(&vol)], &pki.serve_args("require", false));

    let out = run(Command::new("nbdinfo").args(["--list", &srv.tcp_uri("")]));
    assert!(
        !out.status.success(),
        "nbdinfo --list succeeded in plaintext"
    );
    assert!(
        !contains(&out.stdout, b"secret-name") && !contains(&out.stderr, b"secret-name"),
        "the export name leaked: {out:?}"
    );
    let out = run(Command::new("nbdinfo").arg(srv.tcp_uri("secret-name")));
    assert!(!out.status.success(), "nbdinfo read plaintext");
    wait_log(&srv, "plaintext client refused: this server requires TLS");

    // The Unix socket requires TLS too; LIST gets NBD_REP_ERR_TLS_REQD, GO as well.
    let mut raw = Raw::start(&srv);
    raw.option(proto::OPT_LIST, &[]).expect("send LIST");
    let r = raw.opt_reply().expect("LIST reply");
    assert_eq!(r.kind, (1 << 31) + 5, "LIST before STARTTLS: {r:?}");
    let refused = raw.go("secret-name").expect_err("GO before STARTTLS");
    assert_eq!(
        refused.kind,
        (1 << 31) + 5,
        "GO before STARTTLS: {refused:?}"
    );

    // With TLS (and no client certificate needed) the same export is served.
    assert_eq!(
        nbdinfo_size(&nbds(&srv, "secret-name", &pki.path("anonymous"))),
        8 << 20
    );
    wait_log(&srv, "TLS established (no client certificate)");
}

#[test]
fn client_without_a_certificate_is_refused_when_client_certificates_are_required() {
    require("nbdinfo");
    let env = Env::new();
    let pki = Pki::new(&env);
    let vol = env.create("data.img", "8M", &[]);
    let srv = serve_tls_policy(&env, &[s(&vol)], &pki.serve_args("require", true));
    let out = run(Command::new("nbdinfo").arg(nbds(&srv, "data", &pki.path("anonymous"))));
    assert!(
        !out.status.success(),
        "a client without certificate was served"
    );
    wait_log(
        &srv,
        "failed: the client presented no certificate, and this server requires one",
    );
    let log = srv.stop();
    assert!(!log.contains("client connected"), "{log}");
}

#[test]
fn client_certificate_from_another_ca_is_refused() {
    require("nbdinfo");
    let env = Env::new();
    let pki = Pki::new(&env);
    let vol = env.create("data.img", "8M", &[]);
    let srv = serve_tls_policy(&env, &[s(&vol)], &pki.serve_args("require", true));
    let out = run(Command::new("nbdinfo").arg(nbds(&srv, "data", &pki.path("intruder"))));
    assert!(
        !out.status.success(),
        "a certificate from another CA was accepted"
    );
    wait_log(&srv, "failed: client certificate signed by an unknown CA");
    let log = srv.stop();
    assert!(!log.contains("client connected"), "{log}");
}

#[test]
fn tls_on_serves_plaintext_and_tls_clients() {
    require("nbdinfo");
    let env = Env::new();
    let pki = Pki::new(&env);
    // A key others can read is served, with a warning.
    set_mode(&pki.path("server-key.pem"), 0o644);
    let vol = env.create("data.img", "8M", &[]);
    let srv = serve_tls(&env, &[s(&vol)], &pki.serve_args("on", false));
    assert_eq!(nbdinfo_size(&srv.tcp_uri("data")), 8 << 20);
    assert_eq!(
        nbdinfo_size(&nbds(&srv, "data", &pki.path("anonymous"))),
        8 << 20
    );
    let log = srv.stop();
    assert!(
        log.contains("tls=false") && log.contains("tls=true"),
        "{log}"
    );
    assert!(
        log.contains("has mode 0644: other accounts may be able to read it"),
        "{log}"
    );
}

#[test]
fn tls_without_certificate_is_a_clear_startup_error() {
    let env = Env::new();
    let vol = env.create("data.img", "8M", &[]);
    let out = run(Command::new("timeout")
        .arg("30")
        .arg(bin())
        .env("CRYPTVOL_KEYSTORE", env.keystore())
        .args([
            "serve",
            "--unix",
            s(&env.path("x.sock")),
            "--tls",
            "require",
            s(&vol),
        ]));
    assert!(
        !out.status.success() && out.status.code() != Some(124),
        "{out:?}"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--tls require needs the server certificate and its private key"),
        "{err}"
    );

    let out = run(Command::new("timeout")
        .arg("30")
        .arg(bin())
        .env("CRYPTVOL_KEYSTORE", env.keystore())
        .args(["serve", "--unix", s(&env.path("x.sock")), "--tls", "on"])
        .args(["--tls-cert", s(&env.path("missing-cert.pem"))])
        .args(["--tls-key", s(&env.path("missing-key.pem")), s(&vol)]));
    assert!(
        !out.status.success() && out.status.code() != Some(124),
        "{out:?}"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot read certificate file") && err.contains("missing-cert.pem"),
        "{err}"
    );
}

#[test]
fn sighup_reloads_the_certificate_and_keeps_open_connections() {
    require("nbdinfo");
    require_python_nbd();
    let env = Env::new();
    let pki = Pki::new(&env);
    let vol = env.create("data.img", "8M", &[]);
    // The server's certificate and key files, replaced later.
    let cert = env.path("live-cert.pem");
    let key = env.path("live-key.pem");
    std::fs::copy(pki.path("server-cert.pem"), &cert).expect("copy");
    std::fs::copy(pki.path("server-key.pem"), &key).expect("copy");
    set_mode(&key, 0o600);
    let args = [
        "--tls".to_string(),
        "require".to_string(),
        "--tls-cert".to_string(),
        s(&cert).to_string(),
        "--tls-key".to_string(),
        s(&key).to_string(),
    ];
    let srv = serve_tls(&env, &[s(&vol)], &args);
    let old_ca = pki.path("anonymous");

    // A client that stays connected across the reload: writes, waits, reads back.
    let script = "import os, sys\n\
                  h.set_uri_allow_local_file(True)\n\
                  h.connect_uri(os.environ['URI'])\n\
                  h.pwrite(b'\\xab' * 4096, 0)\n\
                  print('ready', flush=True)\n\
                  sys.stdin.readline()\n\
                  print('ok' if h.pread(4096, 0) == b'\\xab' * 4096 else 'bad', flush=True)\n";
    let mut held = Command::new("nbdsh")
        .env(
            "PATH",
            format!(
                "/usr/bin:/bin:{}",
                std::env::var("PATH").unwrap_or_default()
            ),
        )
        .env("URI", nbds(&srv, "data", &old_ca))
        .args(["-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn nbdsh");
    let mut lines = BufReader::new(held.stdout.take().expect("stdout")).lines();
    assert_eq!(lines.next().and_then(Result::ok).as_deref(), Some("ready"));

    // A new server certificate from a new CA; a client trusting only that CA.
    pki.make_ca("newca", "/CN=New CA");
    pki.issue(
        "newca",
        "newserver",
        "/CN=localhost",
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
    );
    let new_ca = pki.client_dir("trusts-new", "newca", None);
    // A broken file first: the reload fails and the old certificate stays.
    std::fs::write(&cert, "garbage").expect("write");
    srv.signal("HUP");
    wait_log(
        &srv,
        "TLS reload failed, the previous certificates stay in use",
    );
    assert_eq!(nbdinfo_size(&nbds(&srv, "data", &old_ca)), 8 << 20);

    std::fs::copy(pki.path("newserver-cert.pem"), &cert).expect("copy");
    std::fs::copy(pki.path("newserver-key.pem"), &key).expect("copy");
    srv.signal("HUP");
    wait_log(&srv, "TLS certificates reloaded");
    assert_eq!(nbdinfo_size(&nbds(&srv, "data", &new_ca)), 8 << 20);
    let out = run(Command::new("nbdinfo").arg(nbds(&srv, "data", &old_ca)));
    assert!(
        !out.status.success(),
        "the old certificate is still served after SIGHUP"
    );

    // The connection opened before the reload still works.
    writeln!(held.stdin.as_mut().expect("stdin")).expect("wake nbdsh");
    assert_eq!(lines.next().and_then(Result::ok).as_deref(), Some("ok"));
    assert!(held.wait().expect("nbdsh").success());
    let log = srv.stop();
    assert_eq!(log.matches("client disconnected").count(), 3, "{log}");
}

/// The audit log of a server started by `Env` (the keystore's `audit.jsonl`).
fn audit_lines(env: &Env) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(env.keystore().join("audit.jsonl")).unwrap_or_default();
    text.lines()
        .map(|l| serde_json::from_str(l).expect("audit line is JSON"))
        .collect()
}

#[test]
fn tls_client_certificates_are_matched_against_the_exports_allow_lists() {
    require("nbdinfo");
    let env = Env::new();
    let pki = Pki::new(&env);
    let vol = env.create("data.img", "8M", &[]);
    let good = pki.path("good");

    // Another subject is listed: client1's verified certificate does not open the export,
    // and the export is not even listed to it.
    let mut args = pki.serve_args("require", true);
    args.extend([
        "--allow-tls-subject".to_string(),
        "CN=someone else".to_string(),
    ]);
    let srv = serve_tls_policy(&env, &[s(&vol)], &args);
    let out = run(Command::new("nbdinfo").arg(nbds(&srv, "data", &good)));
    assert!(
        !out.status.success(),
        "a certificate outside the allow list read the export"
    );
    // libnbd reports the refusal of NBD_OPT_GO (NBD_REP_ERR_POLICY) without the server's text.
    assert!(
        contains(&out.stderr, b"server replied with error to opt_go request"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listed = run(Command::new("nbdinfo").args(["--list", &nbds(&srv, "", &good)]));
    assert!(
        !contains(&listed.stdout, b"data"),
        "the refused export was listed: {listed:?}"
    );
    let log = wait_log(&srv, "refused: the client may not open this export");
    assert!(log.contains("CN=client1,O=cryptvol tests"), "{log}");
    drop(srv.stop());
    let refusals: Vec<_> = audit_lines(&env)
        .into_iter()
        .filter(|l| l["operation"] == "open-export")
        .collect();
    assert!(!refusals.is_empty(), "no audit record of the refusal");
    assert_eq!(refusals[0]["result"], "denied");
    assert_eq!(refusals[0]["export"], "data");
    assert_eq!(refusals[0]["tls_subject"], "CN=client1,O=cryptvol tests");

    // Its SAN is listed: it reads the export; the exact subject works as well.
    for allow in [
        ["--allow-tls-san", "DNS:client1.example"],
        ["--allow-tls-subject", "CN=client1,O=cryptvol tests"],
    ] {
        let mut args = pki.serve_args("require", true);
        args.extend(allow.iter().map(|a| a.to_string()));
        let srv = serve_tls_policy(&env, &[s(&vol)], &args);
        assert_eq!(
            nbdinfo_size(&nbds(&srv, "data", &good)),
            8 << 20,
            "{allow:?}"
        );
        drop(srv.stop());
    }
}

#[test]
fn tls_client_without_a_certificate_has_no_identity_and_is_refused() {
    require("nbdinfo");
    let env = Env::new();
    let pki = Pki::new(&env);
    let vol = env.create("data.img", "8M", &[]);
    // Server-authenticated TLS only: the traffic is private, the client anonymous.
    let srv = serve_tls_policy(&env, &[s(&vol)], &pki.serve_args("require", false));
    let out = run(Command::new("nbdinfo").arg(nbds(&srv, "data", &pki.path("anonymous"))));
    assert!(
        !out.status.success(),
        "an anonymous TLS client read the export"
    );
    let log = wait_log(&srv, "refused: the client may not open this export");
    assert!(
        log.contains("TLS established (no client certificate)"),
        "{log}"
    );
    assert!(!log.contains("client connected"), "{log}");
}
