//! TLS on the NBD port: certificates, the rustls server configuration, its reload on SIGHUP,
//! the identity of verified client certificates and readable handshake failures.
//!
//! The NBD side (`NBD_OPT_STARTTLS`, what `--tls require` refuses) is in the pure codec
//! (`nbd::Negotiation`); `server::conn` upgrades the socket when the codec says so.
//!
//! Crypto provider: **aws-lc-rs**. It is the provider rustls already builds with in this
//! program (the AWS SDK's HTTPS client uses it), so TLS adds no second crypto library to
//! audit and ship; it is rustls' default provider, its AES-GCM uses the CPU's AES and
//! carry-less multiply units (what bounds bulk throughput here), and it has a FIPS-validated
//! build should that ever be needed. The provider is passed explicitly
//! ([`ServerConfig::builder_with_provider`]), so nothing depends on process-wide defaults.
//!
//! PSK (offered by nbdkit and qemu) is not available: rustls implements no TLS-PSK cipher
//! suites (only resumption PSKs), so clients authenticate with certificates.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::{CertificateError, RootCertStore, ServerConfig, ServerConnection};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

use super::peer::CertIdentity;
use crate::nbd::TlsMode;

/// Largest certificate, key or CA bundle file read (PEM); real ones are a few KiB.
const MAX_PEM_FILE: u64 = 1 << 20;

/// Errors loading the TLS settings.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: String,
        source: std::io::Error,
    },
    #[error("{what} {path} is larger than {MAX_PEM_FILE} bytes; is it really a PEM file?")]
    TooLarge { what: &'static str, path: String },
    #[error("{what} {path} is not valid PEM: {message}")]
    Pem {
        what: &'static str,
        path: String,
        message: String,
    },
    #[error("{what} {path} contains no {expected}")]
    Empty {
        what: &'static str,
        path: String,
        expected: &'static str,
    },
    #[error("client CA file {path}: {message}")]
    ClientCa { path: String, message: String },
    #[error("certificate {cert} and key {key} cannot be used together: {message}")]
    Config {
        cert: String,
        key: String,
        message: String,
    },
}

/// The files TLS is configured from (PEM).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The server certificate chain (leaf first).
    pub cert: PathBuf,
    /// The server's private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// When set, clients must present a certificate signed by one of these CAs.
    pub client_ca: Option<PathBuf>,
}

/// The TLS settings of a running server: the mode and the current rustls configuration,
/// which [`TlsSetup::reload`] replaces (connections already up keep the one they started
/// with).
pub struct TlsSetup {
    mode: TlsMode,
    files: TlsFiles,
    current: RwLock<Arc<ServerConfig>>,
}

impl std::fmt::Debug for TlsSetup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsSetup")
            .field("mode", &self.mode)
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

impl TlsSetup {
    /// Reads the files and builds the configuration. `mode` must be `On` or `Require`.
    pub fn load(mode: TlsMode, files: TlsFiles) -> Result<TlsSetup, TlsError> {
        let config = build_config(&files)?;
        Ok(TlsSetup {
            mode,
            files,
            current: RwLock::new(config),
        })
    }

    pub fn mode(&self) -> TlsMode {
        self.mode
    }

    pub fn files(&self) -> &TlsFiles {
        &self.files
    }

    /// Re-reads the files and swaps the configuration in; on error the old one stays.
    pub fn reload(&self) -> Result<(), TlsError> {
        let config = build_config(&self.files)?;
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = config;
        Ok(())
    }

    /// An acceptor with the current configuration.
    pub(crate) fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(
            self.current
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .clone(),
        )
    }

    /// A one-line description for the startup log.
    pub fn describe(&self) -> String {
        let clients = match &self.files.client_ca {
            Some(ca) => format!(
                "client certificates required, verified against {}",
                ca.display()
            ),
            None => "no client certificates".to_string(),
        };
        format!(
            "TLS {} (certificate {}; {clients})",
            self.mode.as_str(),
            self.files.cert.display()
        )
    }
}

/// Reloads the TLS certificates (called on SIGHUP). A failure is logged and the previous
/// configuration stays in use; connections already up are never touched.
pub fn reload_tls(setup: &TlsSetup) {
    match setup.reload() {
        Ok(()) => tracing::info!(
            cert = %setup.files.cert.display(),
            "TLS certificates reloaded; new connections use them"
        ),
        Err(e) => tracing::error!("TLS reload failed, the previous certificates stay in use: {e}"),
    }
}

/// The crypto provider (see the module documentation for the choice).
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

fn build_config(files: &TlsFiles) -> Result<Arc<ServerConfig>, TlsError> {
    let certs = read_certs(&files.cert, "certificate file")?;
    let key = read_key(&files.key)?;
    let provider = provider();
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| config_error(files, e))?;
    let builder = match &files.client_ca {
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for cert in read_certs(ca, "client CA file")? {
                roots.add(cert).map_err(|e| TlsError::ClientCa {
                    path: ca.display().to_string(),
                    message: e.to_string(),
                })?;
            }
            // No CA names in the CertificateRequest: GnuTLS clients (libnbd, qemu,
            // nbd-client) then send whatever certificate they hold instead of silently
            // sending none, so a certificate from the wrong CA is logged as exactly that.
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .clear_root_hint_subjects()
                .build()
                .map_err(|e| TlsError::ClientCa {
                    path: ca.display().to_string(),
                    message: e.to_string(),
                })?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let config = builder
        .with_single_cert(certs, key)
        .map_err(|e| config_error(files, e))?;
    Ok(Arc::new(config))
}

fn config_error(files: &TlsFiles, e: rustls::Error) -> TlsError {
    TlsError::Config {
        cert: files.cert.display().to_string(),
        key: files.key.display().to_string(),
        message: e.to_string(),
    }
}

/// Reads a whole PEM file, bounded.
fn read_pem(path: &Path, what: &'static str) -> Result<Vec<u8>, TlsError> {
    use std::io::Read;
    let read_err = |source| TlsError::Read {
        what,
        path: path.display().to_string(),
        source,
    };
    let file = std::fs::File::open(path).map_err(read_err)?;
    let mut data = Vec::new();
    file.take(MAX_PEM_FILE + 1)
        .read_to_end(&mut data)
        .map_err(read_err)?;
    if data.len() as u64 > MAX_PEM_FILE {
        return Err(TlsError::TooLarge {
            what,
            path: path.display().to_string(),
        });
    }
    Ok(data)
}

fn read_certs(path: &Path, what: &'static str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let data = read_pem(path, what)?;
    let certs = CertificateDer::pem_slice_iter(&data)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            what,
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Empty {
            what,
            path: path.display().to_string(),
            expected: "CERTIFICATE block",
        });
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    const WHAT: &str = "private key file";
    warn_if_key_readable_by_others(path);
    let data = zeroize::Zeroizing::new(read_pem(path, WHAT)?);
    PrivateKeyDer::from_pem_slice(&data).map_err(|e| match e {
        rustls_pki_types::pem::Error::NoItemsFound => TlsError::Empty {
            what: WHAT,
            path: path.display().to_string(),
            expected: "PRIVATE KEY block",
        },
        e => TlsError::Pem {
            what: WHAT,
            path: path.display().to_string(),
            message: e.to_string(),
        },
    })
}

fn warn_if_key_readable_by_others(path: &Path) {
    if let Ok(meta) = std::fs::metadata(path) {
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            tracing::warn!(
                "TLS private key {} has mode {mode:04o}: other accounts may be able to read \
                 it; run chmod 600 {}",
                path.display(),
                path.display()
            );
        }
    }
}

/// A socket under a [`BlockingTls`].
pub(crate) enum PlainSocket {
    Tcp(std::net::TcpStream),
    Unix(std::os::unix::net::UnixStream),
}

impl PlainSocket {
    fn read(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        use std::io::Read;
        match self {
            PlainSocket::Tcp(s) => (&*s).read(buf),
            PlainSocket::Unix(s) => (&*s).read(buf),
        }
    }
    fn write_all(&self, buf: &[u8]) -> std::io::Result<()> {
        use std::io::Write;
        match self {
            PlainSocket::Tcp(s) => (&*s).write_all(buf),
            PlainSocket::Unix(s) => (&*s).write_all(buf),
        }
    }
    fn shutdown(&self, how: std::net::Shutdown) {
        let _ = match self {
            PlainSocket::Tcp(s) => s.shutdown(how),
            PlainSocket::Unix(s) => s.shutdown(how),
        };
    }
    fn set_timeouts(&self, t: Option<std::time::Duration>) -> std::io::Result<()> {
        match self {
            PlainSocket::Tcp(s) => {
                s.set_read_timeout(t)?;
                s.set_write_timeout(t)
            }
            PlainSocket::Unix(s) => {
                s.set_read_timeout(t)?;
                s.set_write_timeout(t)
            }
        }
    }
    /// Blocking writes that give up after [`CLOSE_NOTIFY_TIMEOUT`].
    fn set_close_timeout(&self) {
        let _ = self.set_timeouts(Some(CLOSE_NOTIFY_TIMEOUT));
    }
}

/// How long the end of a session may wait to send its close_notify alert.
const CLOSE_NOTIFY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// Ciphertext read from the socket at once by a [`BlockingTls`] reader.
const TLS_READ_BUFFER: usize = 64 * 1024;
/// Most plaintext encrypted by one write (bounds the ciphertext buffer of a writer).
const TLS_WRITE_CHUNK: usize = 256 * 1024;

/// The TLS session of a connection in transmission, shared by its reader and writer
/// handles.
struct TlsShared {
    conn: Mutex<ServerConnection>,
    /// Held from taking records out of `conn` until they are on the socket, so that
    /// records reach the socket in sequence. Lock order: `send`, then `conn`.
    send: Mutex<()>,
    sock: PlainSocket,
}

impl Drop for TlsShared {
    /// Ends the session with close_notify (waiting at most [`CLOSE_NOTIFY_TIMEOUT`]).
    fn drop(&mut self) {
        let conn = self.conn.get_mut().unwrap_or_else(PoisonError::into_inner);
        conn.send_close_notify();
        let mut out = Vec::new();
        while conn.wants_write() {
            if conn.write_tls(&mut out).is_err() {
                break;
            }
        }
        // The socket may still hold replies the client has not read yet: wait a little for
        // room (never long: the peer may be gone) rather than drop the close_notify.
        self.sock.set_close_timeout();
        let _ = self.sock.write_all(&out);
    }
}

/// TLS on a blocking socket for the transmission threads, with the same reader/writer
/// split as a plain socket: one handle reads (under the connection's read lock) while
/// another writes (under its write lock). Each handle keeps its own buffer; the session
/// is locked only to decrypt or encrypt, never during socket I/O, so a reader blocked on
/// the socket does not hold up replies.
pub(crate) struct BlockingTls {
    shared: Arc<TlsShared>,
    /// Ciphertext read from the socket; `raw[start..end]` is not yet given to rustls.
    raw: Vec<u8>,
    start: usize,
    end: usize,
    /// Records to send (writer side).
    out: Vec<u8>,
}

impl BlockingTls {
    /// Takes over a session whose handshake is complete (as tokio-rustls leaves it: any
    /// plaintext already received stays in the session and is read first).
    pub(crate) fn new(sock: PlainSocket, conn: ServerConnection) -> std::io::Result<BlockingTls> {
        let mut t = BlockingTls {
            shared: Arc::new(TlsShared {
                conn: Mutex::new(conn),
                send: Mutex::new(()),
                sock,
            }),
            raw: Vec::new(),
            start: 0,
            end: 0,
            out: Vec::new(),
        };
        t.send_pending()?;
        Ok(t)
    }

    /// Another handle on the same session (for the writer side).
    pub(crate) fn try_clone(&self) -> std::io::Result<BlockingTls> {
        Ok(BlockingTls {
            shared: self.shared.clone(),
            raw: Vec::new(),
            start: 0,
            end: 0,
            out: Vec::new(),
        })
    }

    pub(crate) fn shutdown(&self, how: std::net::Shutdown) {
        self.shared.sock.shutdown(how);
    }

    /// Sets `SO_RCVTIMEO` and `SO_SNDTIMEO` of the socket under the session (the idle
    /// timeout of transmission).
    pub(crate) fn set_timeouts(&self, t: Option<std::time::Duration>) -> std::io::Result<()> {
        self.shared.sock.set_timeouts(t)
    }

    /// Sends whatever records the session has queued (alerts, handshake leftovers).
    fn send_pending(&mut self) -> std::io::Result<()> {
        let _order = self
            .shared
            .send
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        self.out.clear();
        {
            let mut conn = lock(&self.shared);
            while conn.wants_write() {
                conn.write_tls(&mut self.out)?;
            }
        }
        if !self.out.is_empty() {
            self.shared.sock.write_all(&self.out)?;
        }
        Ok(())
    }
}

fn lock(shared: &TlsShared) -> std::sync::MutexGuard<'_, ServerConnection> {
    shared.conn.lock().unwrap_or_else(PoisonError::into_inner)
}

impl std::io::Read for BlockingTls {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            let mut alert = None;
            let mut wants_write = false;
            let mut fed = false;
            {
                let mut conn = lock(&self.shared);
                match conn.reader().read(buf) {
                    Ok(n) => return Ok(n),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
                if self.start < self.end {
                    let mut rd = self.raw.get(self.start..self.end).unwrap_or_default();
                    let n = conn.read_tls(&mut rd)?;
                    self.start += n;
                    fed = true;
                    match conn.process_new_packets() {
                        Ok(_) => wants_write = conn.wants_write(),
                        Err(e) => alert = Some(e),
                    }
                }
            }
            if let Some(e) = alert {
                let _ = self.send_pending();
                return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, e));
            }
            if wants_write {
                self.send_pending()?;
            }
            if fed {
                // New records were decrypted (or more ciphertext is buffered): look again.
                continue;
            }
            if self.raw.is_empty() {
                self.raw = vec![0u8; TLS_READ_BUFFER];
            }
            let n = self.shared.sock.read(&mut self.raw)?;
            if n == 0 {
                // The peer closed the socket (with or without close_notify): end of stream.
                return Ok(0);
            }
            self.start = 0;
            self.end = n;
        }
    }
}

impl std::io::Write for BlockingTls {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.write_vectored(&[std::io::IoSlice::new(buf)])
    }

    /// Encrypts up to [`TLS_WRITE_CHUNK`] bytes of `bufs` (header and data of a reply go
    /// into the same records) and sends them before returning.
    fn write_vectored(&mut self, bufs: &[std::io::IoSlice<'_>]) -> std::io::Result<usize> {
        let mut room = TLS_WRITE_CHUNK;
        let mut slices = Vec::with_capacity(bufs.len());
        for b in bufs {
            if room == 0 {
                break;
            }
            let take = b.len().min(room);
            if take > 0 {
                slices.push(std::io::IoSlice::new(b.get(..take).unwrap_or_default()));
                room -= take;
            }
        }
        if slices.is_empty() {
            return Ok(0);
        }
        let _order = self
            .shared
            .send
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        self.out.clear();
        let n = {
            let mut conn = lock(&self.shared);
            let n = conn.writer().write_vectored(&slices)?;
            while conn.wants_write() {
                conn.write_tls(&mut self.out)?;
            }
            n
        };
        self.shared.sock.write_all(&self.out)?;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Explains a failed TLS handshake in the words an operator needs (the error comes from
/// `TlsAcceptor::accept`).
pub(crate) fn handshake_failure(e: &std::io::Error) -> String {
    let rustls_error = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>());
    match rustls_error {
        Some(rustls::Error::NoCertificatesPresented) => {
            "the client presented no certificate, and this server requires one signed by its \
             --tls-client-ca"
                .to_string()
        }
        Some(rustls::Error::InvalidCertificate(c)) => match c {
            CertificateError::UnknownIssuer => {
                "client certificate signed by an unknown CA (not the --tls-client-ca)".to_string()
            }
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                "client certificate has expired".to_string()
            }
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                "client certificate is not valid yet".to_string()
            }
            CertificateError::Revoked => "client certificate is revoked".to_string(),
            CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. } => {
                "client certificate is not valid for TLS client authentication".to_string()
            }
            other => format!("client certificate rejected: {other:?}"),
        },
        Some(rustls::Error::AlertReceived(alert)) => format!(
            "the client aborted the handshake (TLS alert {alert:?}); it probably does not \
             trust this server's certificate"
        ),
        Some(rustls::Error::InvalidMessage(_))
        | Some(rustls::Error::InappropriateMessage { .. }) => {
            format!("the client did not speak TLS after NBD_OPT_STARTTLS ({e})")
        }
        Some(other) => other.to_string(),
        None if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            "the client closed the connection during the TLS handshake".to_string()
        }
        None => e.to_string(),
    }
}

impl std::fmt::Display for CertIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "subject {:?}", self.subject)?;
        if !self.sans.is_empty() {
            write!(f, ", SANs {}", self.sans.join(" "))?;
        }
        Ok(())
    }
}

/// The subject and SANs of an end-entity certificate; `None` if it cannot be parsed
/// (never the case for a certificate rustls verified).
pub(crate) fn cert_identity(end_entity: &CertificateDer) -> Option<CertIdentity> {
    use x509_parser::extensions::GeneralName;
    let (_, cert) = x509_parser::parse_x509_certificate(end_entity.as_ref()).ok()?;
    let mut rdns = Vec::new();
    for rdn in cert.subject().iter_rdn() {
        let attrs: Vec<String> = rdn
            .iter()
            .map(|attr| {
                let name = attribute_name(&attr.attr_type().to_id_string());
                let value = match attr.as_str() {
                    Ok(s) => escape_rfc4514(s),
                    Err(_) => format!("#{}", hex::encode(attr.attr_value().data)),
                };
                format!("{name}={value}")
            })
            .collect();
        rdns.push(attrs.join("+"));
    }
    rdns.reverse();
    let mut sans = Vec::new();
    if let Ok(Some(ext)) = cert.subject_alternative_name() {
        for name in &ext.value.general_names {
            match name {
                GeneralName::DNSName(s) => sans.push(format!("DNS:{s}")),
                GeneralName::RFC822Name(s) => sans.push(format!("EMAIL:{s}")),
                GeneralName::URI(s) => sans.push(format!("URI:{s}")),
                GeneralName::IPAddress(b) => {
                    if let Some(ip) = ip_from_bytes(b) {
                        sans.push(format!("IP:{ip}"));
                    }
                }
                _ => {}
            }
        }
    }
    Some(CertIdentity {
        subject: rdns.join(","),
        sans,
    })
}

/// The RFC 4514 short name of common attribute types, else the dotted OID.
fn attribute_name(oid: &str) -> String {
    match oid {
        "2.5.4.3" => "CN",
        "2.5.4.6" => "C",
        "2.5.4.7" => "L",
        "2.5.4.8" => "ST",
        "2.5.4.9" => "STREET",
        "2.5.4.10" => "O",
        "2.5.4.11" => "OU",
        "2.5.4.5" => "serialNumber",
        "0.9.2342.19200300.100.1.25" => "DC",
        "0.9.2342.19200300.100.1.1" => "UID",
        "1.2.840.113549.1.9.1" => "emailAddress",
        other => other,
    }
    .to_string()
}

/// Escapes an attribute value as RFC 4514 section 2.4 requires.
fn escape_rfc4514(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let last = s.chars().count().saturating_sub(1);
    for (i, c) in s.chars().enumerate() {
        match c {
            ',' | '+' | '"' | '\\' | '<' | '>' | ';' => {
                out.push('\\');
                out.push(c);
            }
            '#' if i == 0 => out.push_str("\\#"),
            ' ' if i == 0 || i == last => out.push_str("\\ "),
            '\0' => out.push_str("\\00"),
            c => out.push(c),
        }
    }
    out
}

fn ip_from_bytes(b: &[u8]) -> Option<std::net::IpAddr> {
    match b.len() {
        4 => <[u8; 4]>::try_from(b).ok().map(std::net::IpAddr::from),
        16 => <[u8; 16]>::try_from(b).ok().map(std::net::IpAddr::from),
        _ => None,
    }
}

#[cfg(test)]
mod tests;
