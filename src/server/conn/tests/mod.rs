//! The transmission path over a socket pair against an in-memory device: no process, no
//! listener, no handshake (`Negotiated` is built directly). The harness is here; the
//! tests are split by topic: [`commands`], [`errors`] and [`lifecycle`] (disconnects).

mod commands;
mod errors;
mod lifecycle;

use std::io::{Read, Write};
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;

use tokio::sync::oneshot;

use super::state::Conn;
use super::stream::BlockingStream;
use std::net::Shutdown;

use crate::blockdev::{BlockDevice, MemDevice};
use crate::nbd::consts::{
    CMD_FLAG_FUA, CMD_FLAG_NO_HOLE, CMD_FLAG_REQ_ONE, REPLY_TYPE_BLOCK_STATUS, REPLY_TYPE_ERROR,
    REPLY_TYPE_OFFSET_DATA, REPLY_TYPE_OFFSET_HOLE,
};
use crate::nbd::structured::{decode_chunk_header, ChunkHeader, CHUNK_HEADER_LEN};
use crate::nbd::{self, NbdErrno, Negotiated, STATE_HOLE, STATE_ZERO};
use crate::nbd::{decode_simple_reply, encode_request, Command, Request, SIMPLE_REPLY_LEN};
use crate::server::budget::{BufferPool, ByteBudget};
use crate::server::{Exports, ServerConfig, Shared};
use std::os::unix::net::UnixStream;

const SIZE: u64 = 1 << 20;

struct Session {
    client: UnixStream,
    dev: Arc<MemDevice>,
    conn: Arc<Conn>,
    done: oneshot::Receiver<()>,
}

fn start(read_only: bool, structured: bool) -> Session {
    let dev = Arc::new(MemDevice::new(SIZE, 512, read_only).unwrap());
    let info = nbd::ExportInfo {
        name: "mem".into(),
        description: String::new(),
        size: SIZE,
        read_only,
        min_block: 512,
        preferred_block: 4096,
        max_block: nbd::MAX_PAYLOAD,
    };
    let negotiated = Negotiated {
        structured_replies: structured,
        base_allocation: structured.then_some(1),
    };
    let shared = Shared {
        exports: Exports::new(Vec::new()).into(),
        config: ServerConfig::default(),
        budget: Arc::new(ByteBudget::new(64 << 20)),
        buffers: Arc::new(BufferPool::new(1 << 20)),
        open_connections: Arc::new(AtomicUsize::new(0)),
        shutdown: tokio::sync::watch::channel(false).1,
    };
    let (client, server) = UnixStream::pair().unwrap();
    client
        .set_read_timeout(Some(std::time::Duration::from_secs(60)))
        .unwrap();
    let device: Arc<dyn BlockDevice> = dev.clone();
    let conn = Conn::new(
        BlockingStream::Unix(server),
        device,
        info,
        negotiated,
        1,
        &shared,
        Arc::new(crate::server::metrics::ExportMetrics::default()),
    )
    .unwrap();
    let conn = Arc::new(conn);
    let (tx, done) = oneshot::channel();
    *conn.done.lock().unwrap() = Some(tx);
    Conn::spawn_worker(&conn).unwrap();
    Session {
        client,
        dev,
        conn,
        done,
    }
}

impl Session {
    fn send(&mut self, command: Command, flags: u16, cookie: u64, offset: u64, len: u32) {
        let req = Request {
            flags,
            command,
            cookie,
            offset,
            len,
        };
        self.client.write_all(&encode_request(&req)).unwrap();
    }
    /// A simple reply: (error, cookie).
    fn simple(&mut self) -> (u32, u64) {
        let mut b = [0u8; SIMPLE_REPLY_LEN];
        self.client.read_exact(&mut b).unwrap();
        let r = decode_simple_reply(&b).expect("simple reply magic");
        (r.error, r.cookie)
    }
    fn chunk(&mut self) -> (ChunkHeader, Vec<u8>) {
        let mut b = [0u8; CHUNK_HEADER_LEN];
        self.client.read_exact(&mut b).unwrap();
        let h = decode_chunk_header(&b).expect("structured reply magic");
        let mut payload = vec![0u8; h.len as usize];
        self.client.read_exact(&mut payload).unwrap();
        (h, payload)
    }
    fn write(&mut self, cookie: u64, offset: u64, data: &[u8]) {
        self.send(Command::Write, 0, cookie, offset, data.len() as u32);
        self.client.write_all(data).unwrap();
    }
    /// Waits until every transmission thread has ended; the reason the connection closed.
    fn finish(self) -> String {
        let Session {
            client, conn, done, ..
        } = self;
        let _ = done.blocking_recv();
        drop(client);
        let reason = conn.reason.lock().unwrap().clone();
        reason.unwrap_or_default()
    }
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().unwrap())
}
