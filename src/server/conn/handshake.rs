//! The handshake phase on the async runtime: the greeting, option negotiation (driving
//! the pure `nbd::Negotiation` state machine) and the STARTTLS upgrade, ending in the
//! export and what was negotiated for it.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::refusals::Refusals;
use super::stream::Transport;
use crate::nbd::{
    self, parse_client_flags, parse_option_header, server_greeting, ExportInfo, Negotiated,
    Negotiation, Next, TlsMode, MAX_OPTION_LEN,
};
use crate::server::export::AuthorizedCatalog;
use crate::server::peer::PeerIdentity;
use crate::server::tls::{cert_identity, handshake_failure};
use crate::server::Shared;

/// Why a connection ended before transmission.
#[derive(Debug, thiserror::Error)]
pub(super) enum HandshakeFailure {
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("protocol: {0}")]
    Protocol(#[from] nbd::HandshakeError),
    #[error("client ended the negotiation")]
    Closed,
    #[error("handshake timed out")]
    Timeout,
    #[error("server is shutting down")]
    Shutdown,
    #[error("more than {MAX_REFUSALS} requests for exports the client may not open")]
    TooManyRefusals,
    /// Logged as "TLS handshake with PEER failed: ...".
    #[error("{0}")]
    Tls(String),
    #[error(
        "plaintext client refused: this server requires TLS (--tls require) and the client \
         did not send NBD_OPT_STARTTLS; no export was listed or opened"
    )]
    TlsRequired,
}

/// What the handshake settled.
pub(super) struct Handshake<S> {
    pub(super) transport: Transport<S>,
    pub(super) export: String,
    /// What the handshake told the client (its size holds for the whole session, even
    /// if the export grows meanwhile).
    pub(super) info: ExportInfo,
    pub(super) negotiated: Negotiated,
}

/// Refused export requests a connection may make before it is closed (a client probing
/// names costs at most this many audit records per connection).
pub(super) const MAX_REFUSALS: usize = 16;

/// The whole handshake: greeting, options, and the TLS upgrade when the client sends
/// `NBD_OPT_STARTTLS` (and TLS is configured). A verified client certificate becomes part
/// of `peer` as soon as TLS is up, before any export is listed or opened over it.
pub(super) async fn handshake<S>(
    mut s: S,
    shared: &Shared,
    peer: &mut PeerIdentity,
    id: u64,
) -> Result<Handshake<S>, HandshakeFailure>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut refusals = Refusals::default();
    s.write_all(&server_greeting()).await?;
    let mut flags = [0u8; 4];
    read_or_closed(&mut s, &mut flags).await?;
    let client = parse_client_flags(flags)?;
    let tls = shared.config.tls.as_deref();
    let mode = tls.map_or(TlsMode::Off, |t| t.mode());
    let mut neg = Negotiation::with_tls(client, mode);
    let step = match options(&mut s, &mut neg, shared, peer, &mut refusals).await {
        Err(HandshakeFailure::Closed) if neg.tls_refusals() > 0 => {
            return Err(HandshakeFailure::TlsRequired)
        }
        r => r?,
    };
    let Some(tls) = tls.filter(|_| step.is_none()) else {
        let (info, negotiated) = step.ok_or(HandshakeFailure::Closed)?;
        return Ok(Handshake {
            transport: Transport::Plain(s),
            export: info.name.clone(),
            info,
            negotiated,
        });
    };
    // NBD_OPT_STARTTLS was acknowledged: the TLS handshake follows at once.
    let mut s = tls
        .acceptor()
        .accept(s)
        .await
        .map_err(|e| HandshakeFailure::Tls(handshake_failure(&e)))?;
    neg.tls_started();
    // rustls returns client certificates only when it verified them (--tls-client-ca).
    peer.cert = s
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .and_then(cert_identity);
    match &peer.cert {
        Some(c) => {
            tracing::info!(conn = id, peer = %peer, "TLS established; verified client certificate: {c}")
        }
        None => tracing::info!(conn = id, peer = %peer, "TLS established (no client certificate)"),
    }
    let (info, negotiated) = options(&mut s, &mut neg, shared, peer, &mut refusals)
        .await?
        .ok_or(HandshakeFailure::Closed)?;
    Ok(Handshake {
        transport: Transport::Tls(Box::new(s)),
        export: info.name.clone(),
        info,
        negotiated,
    })
}

/// Negotiates options until transmission (`Some`) or an acknowledged `NBD_OPT_STARTTLS`
/// (`None`). Exports are listed and opened through `peer`'s view of the catalog; refusals
/// are recorded before the client hears of them.
pub(super) async fn options<S>(
    s: &mut S,
    neg: &mut Negotiation,
    shared: &Shared,
    peer: &PeerIdentity,
    refusals: &mut Refusals,
) -> Result<Option<(ExportInfo, Negotiated)>, HandshakeFailure>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let daemon_uid = nix::unistd::geteuid().as_raw();
    loop {
        let mut hdr = [0u8; 16];
        read_or_closed(s, &mut hdr).await?;
        let hdr = parse_option_header(&hdr)?;
        let outcome = if hdr.len > MAX_OPTION_LEN {
            let mut limited = (&mut *s).take(u64::from(hdr.len));
            let skipped = tokio::io::copy(&mut limited, &mut tokio::io::sink()).await?;
            if skipped != u64::from(hdr.len) {
                return Err(HandshakeFailure::Closed);
            }
            neg.handle_oversized(&hdr)
        } else {
            let mut data = vec![0u8; hdr.len as usize];
            read_or_closed(s, &mut data).await?;
            let catalog = AuthorizedCatalog {
                exports: &shared.exports,
                peer,
                daemon_uid,
            };
            neg.handle_option(&hdr, &data, &catalog)
        };
        if let Some(refusal) = &outcome.refusal {
            // Recorded before the client hears of it.
            refusals.record(shared, peer, refusal).await?;
        }
        s.write_all(&outcome.reply).await?;
        // Nothing may stay queued in a TLS session when it leaves the runtime.
        s.flush().await?;
        match outcome.next {
            Next::Continue => {}
            Next::Transmit { export, .. } => return Ok(Some((export, neg.negotiated()))),
            Next::StartTls => return Ok(None),
            Next::Close => return Err(HandshakeFailure::Closed),
        }
    }
}

pub(super) async fn read_or_closed<R: AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut [u8],
) -> Result<(), HandshakeFailure> {
    match rd.read_exact(buf).await {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(HandshakeFailure::Closed),
        Err(e) => Err(e.into()),
    }
}
