//! The daemon's control channel: a Unix socket (`cryptvol serve --control PATH`, mode
//! 0600) through which `cryptvol status`, `cryptvol reencrypt EXPORT` and `cryptvol
//! snapshot create EXPORT` talk to a running server.
//!
//! Protocol: newline-delimited JSON, one request per connection. The client sends one
//! line `{"op": "...", ...}` (at most [`MAX_REQUEST_BYTES`]); the daemon answers with
//! zero or more `{"event":"progress",...}` lines and ends with `{"ok":true,...}` or
//! `{"ok":false,"error":"..."}`, then closes the connection.
//!
//! | op | fields | answer |
//! |---|---|---|
//! | `status` | | `exports` (see [`ExportStatus`]), `connections`, `pid` |
//! | `reencrypt` | `export`, `wait` (default true) | progress events, then `export`, `done` |
//! | `reencrypt-status` | `export` | `export`, `in_progress`, `reencrypt` |
//! | `snapshot` | `export`, `store`, `description`, `parent` (optional) | progress events, then `export`, `snapshot` |
//! | `export-add` | `name`, `path` (absolute), `read_only`, `discard`, `allow_uid`, `allow_gid`, `allow_tls_subject`, `allow_tls_san`, `allow_anyone` | `export` (see [`ExportEntry`]) |
//! | `export-remove` | `name`, `force` (default false) | `export`, `disconnected` |
//! | `export-list` | | `exports` (see [`ExportList`]) |
//! | `resize` | `export`, `size` or `add` (bytes) | see [`ResizeReply`] |
//!
//!
//! Modules: [`protocol`] (the requests and replies as pure types and functions: parsing
//! and validation, unit-tested), [`path`] (where the socket is), [`hooks`] (what the CLI
//! plugs in), [`socket`] (the listener and the per-connection handler), one module per
//! request family ([`status`], [`reencryption`], [`snapshot`], [`exports`] with its
//! pure types in [`exports_protocol`], [`resize`] with [`resize_protocol`]) and [`client`] (a small
//! blocking client for the CLI).

mod client;
mod exports;
mod exports_protocol;
mod hooks;
mod path;
mod protocol;
mod reencryption;
mod resize;
mod resize_protocol;
mod snapshot;
mod socket;
mod status;

pub use client::{request, ControlError};
pub use exports_protocol::{ExportAdd, ExportEntry, ExportList, ExportsRequest};
pub use hooks::{ControlHooks, DataKeyMaker, ExportOpener, HookError, SnapshotJob, SnapshotTaker};
pub use path::{choose_control_path, control_path};
pub use protocol::{
    err_line, ok_line, parse_reply, parse_request, validate, ExportStatus, ProgressEvent,
    ProtocolError, ReencryptInfo, Reply, Request, StatusReply, DEFAULT_CONTROL_PATH,
    MAX_DESCRIPTION_LEN, MAX_EXPORT_LEN, MAX_PARENT_LEN, MAX_REQUEST_BYTES, MAX_STORE_LEN, OPS,
    SNAPSHOT_CHUNK_SIZE,
};
pub use resize_protocol::{ResizeReply, ResizeRequest, ResizeTo};
pub use socket::ControlSocket;
pub(crate) use socket::{control_loop, ControlState};

#[cfg(test)]
pub(crate) mod tests;
