//! Tests of the control channel: [`protocol`] (the pure parsing and validation) and
//! [`daemon`] (a served volume answering over the socket, with fakes for the hooks, which
//! are here with the volume they serve).

mod daemon;
mod protocol;

use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

use super::*;
use crate::crypto::Dek;
use crate::keys::WrappedDek;
use crate::progress::Progress;
use crate::server::{Listener, ListenerSpec, ServerError};
use crate::volume::Volume;

use crate::server::{serve_with, shutdown_handle, Control, Export, Exports, ServerConfig};
use crate::volume::{OpenOptions, VolumeSpec};
use std::sync::atomic::{AtomicUsize, Ordering};

/// A thin volume in `dir` with one (fake) keyslot and its first sector written (7s).
pub(crate) fn volume(dir: &Path, size: u64) -> Volume {
    let path = dir.join("vol.img");
    let uuid = uuid::Uuid::new_v4();
    let dek = Dek::generate().unwrap();
    let slot = WrappedDek {
        backend: "local".into(),
        key_id: "mk-test".into(),
        blob: vec![1; 60],
        context: crate::keys::EncryptionContext::for_volume(&uuid),
        params: Default::default(),
    };
    let spec = VolumeSpec {
        size,
        sector_size: 4096,
    };
    let h = crate::volume::create(&path, &spec, uuid, vec![slot], &dek).unwrap();
    let v = Volume::open(&path, &h, dek, OpenOptions::default()).unwrap();
    v.write_at(&[7u8; 4096], 0, false).unwrap();
    v
}

struct FakeKeys {
    calls: AtomicUsize,
    refuse: bool,
}

#[async_trait::async_trait]
impl DataKeyMaker for FakeKeys {
    async fn new_data_key(&self, volume: &Volume) -> Result<(Dek, Vec<WrappedDek>), HookError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if self.refuse {
            return Err("fake: keyslot 1 is a passphrase keyslot".into());
        }
        let _ = volume.uuid();
        Ok((Dek::generate()?, Vec::new()))
    }
}

/// Reads every chunk of the view, like the snapshot store will.
struct FakeTaker;

#[async_trait::async_trait]
impl SnapshotTaker for FakeTaker {
    async fn take(&self, job: SnapshotJob, progress: &Progress) -> Result<Value, HookError> {
        let cs = job.view.chunk_size();
        let n = job.view.size().div_ceil(cs);
        let mut first = vec![0u8; cs as usize];
        for i in 0..n {
            let mut buf = vec![0u8; cs as usize];
            job.view.read_chunk(i, &mut buf)?;
            if i == 0 {
                first = buf;
            }
            progress.advance(cs.min(job.view.size() - i * cs));
        }
        Ok(serde_json::json!({
            "id": "snap-fake",
            "chunks": n,
            "first_byte": first[0],
            "store": job.store,
            "description": job.description,
            "parent": job.parent,
        }))
    }
}

fn raw(path: &Path, bytes: &[u8]) -> String {
    let mut s = std::os::unix::net::UnixStream::connect(path).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = s.write_all(bytes);
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}
