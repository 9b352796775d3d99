//! Refused export requests of one connection: counted (a connection that probes too many
//! names is closed), logged, and recorded in the audit log once per export.

use super::handshake::{HandshakeFailure, MAX_REFUSALS};
use crate::nbd::Refusal;
use crate::server::peer::PeerIdentity;
use crate::server::Shared;

/// The refusals of one connection: each export's first refusal is logged and audited.
#[derive(Default)]
pub(super) struct Refusals {
    count: usize,
    audited: Vec<String>,
}

impl Refusals {
    pub(super) async fn record(
        &mut self,
        shared: &Shared,
        peer: &PeerIdentity,
        refusal: &Refusal,
    ) -> Result<(), HandshakeFailure> {
        self.count += 1;
        if self.count > MAX_REFUSALS {
            return Err(HandshakeFailure::TooManyRefusals);
        }
        if self.audited.contains(&refusal.export) {
            return Ok(());
        }
        self.audited.push(refusal.export.clone());
        tracing::warn!(
            peer = %peer,
            listener = %peer.listener,
            export = %refusal.export,
            "refused: the client may not open this export: {}",
            refusal.reason
        );
        let Some(log) = shared.config.audit_log.clone() else {
            return Ok(());
        };
        let (peer, refusal) = (peer.clone(), refusal.clone());
        let written = tokio::task::spawn_blocking(move || {
            let event = crate::keys::AccessEvent {
                export: &refusal.export,
                listener: &peer.listener,
                peer: &peer.addr,
                peer_uid: peer.cred.map(|c| c.uid),
                peer_gid: peer.cred.map(|c| c.gid),
                peer_pid: peer.cred.and_then(|c| c.pid),
                tls_subject: peer.cert.as_ref().map(|c| c.subject.as_str()),
                reason: &refusal.reason,
            };
            log.record_access(&event, &crate::keys::Principal::current())
        })
        .await;
        match written {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!("cannot audit a refused client: {e}"),
            Err(e) => tracing::error!("cannot audit a refused client: {e}"),
        }
        Ok(())
    }
}
