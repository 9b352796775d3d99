//! The copy of an import, on a blocking thread: blocks read from the source, hashed, and
//! written to the volume except for zero runs, with periodic checkpoints; then the
//! read-back verification. See [`super::import`] for the design.

use std::time::{Duration, Instant};

use sha2::digest::common::hazmat::{SerializableState, SerializedState};
use sha2::{Digest, Sha256};

use super::journal::{Journal, Record};
use super::source::Source;
use super::{
    finish_hex, hash_zeros, is_zero, test_delay, test_write_zeros, zero_runs, Cancel, MigrateError,
    BLOCK, ZERO_UNIT,
};
use crate::progress::Progress;
use crate::volume::Volume;

/// A checkpoint is written after this many bytes...
pub const CHECKPOINT_BYTES: u64 = 32 << 20;
/// ...or this much time, whichever comes first.
pub const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(2);
/// Extents are asked for in windows of this size (bounded memory on big volumes).
const EXTENT_WINDOW: u64 = 1 << 30;

pub(super) fn restore_hasher(hex_state: &str) -> Option<Sha256> {
    let bytes = hex::decode(hex_state).ok()?;
    let state = SerializedState::<Sha256>::try_from(bytes.as_slice()).ok()?;
    Sha256::deserialize(&state).ok()
}

/// The copy and verification, run on a blocking thread.
pub(super) struct Job {
    pub(super) source: Source,
    pub(super) vol: Volume,
    pub(super) journal: Journal,
    pub(super) hasher: Sha256,
    /// Source bytes done (hashed, and written or skipped).
    pub(super) done: u64,
    pub(super) written: u64,
    pub(super) skipped: u64,
    pub(super) resumed_from: Option<u64>,
    /// The source's checksum, once the copy is complete.
    pub(super) source_sha256: Option<String>,
    pub(super) write_zeros: bool,
    pub(super) delay: Option<Duration>,
}

/// A finished copy, verified.
pub(super) struct Done {
    pub(super) job: Job,
    pub(super) source_sha256: String,
    pub(super) volume_sha256: String,
}

impl Job {
    pub(super) fn new(
        source: Source,
        vol: Volume,
        journal: Journal,
        hasher: Sha256,
        resumed_from: Option<u64>,
    ) -> Job {
        Job {
            source,
            vol,
            journal,
            hasher,
            done: 0,
            written: 0,
            skipped: 0,
            resumed_from,
            source_sha256: None,
            write_zeros: test_write_zeros(),
            delay: test_delay(),
        }
    }

    fn total(&self) -> u64 {
        self.source.size()
    }

    pub(super) fn run(mut self: Box<Self>, cancel: &Cancel) -> Result<Done, MigrateError> {
        self.copy(cancel)?;
        let now = self.source.current_identity()?;
        if now != *self.source.identity() {
            return Err(MigrateError::SourceChanged(format!(
                "it was {} and is now {now}",
                self.source.identity()
            )));
        }
        let source_sha256 = self
            .source_sha256
            .clone()
            .ok_or_else(|| MigrateError::Internal("copy ended without a checksum".into()))?;
        let volume_sha256 = verify(&self.vol, self.total(), cancel)?;
        Ok(Done {
            job: *self,
            source_sha256,
            volume_sha256,
        })
    }

    fn copy(&mut self, cancel: &Cancel) -> Result<(), MigrateError> {
        if self.source_sha256.is_some() {
            return Ok(()); // copied before the interruption; only the verification remains
        }
        let total = self.total();
        let progress = Progress::new(format!("import {}", self.source.identity().location), total);
        progress.set_done(self.done);
        let mut buf = vec![0u8; BLOCK + 4096];
        let mut last = (self.done, Instant::now());
        while self.done < total {
            if cancel.is_cancelled() {
                self.checkpoint()?;
                progress.finish();
                return Err(MigrateError::Interrupted {
                    done: self.done,
                    total,
                });
            }
            let start = self.done;
            let block_end = (start / BLOCK as u64 + 1)
                .saturating_mul(BLOCK as u64)
                .min(total);
            let data = self.source.next_data(start)?;
            let data = (data - data % ZERO_UNIT as u64).max(start);
            if data >= block_end {
                self.zeros(start, block_end - start)?;
            } else {
                self.zeros(start, data - start)?;
                self.data(&mut buf, data, block_end)?;
            }
            self.done = block_end;
            progress.advance(block_end - start);
            if let Some(d) = self.delay {
                std::thread::sleep(d);
            }
            let due =
                self.done - last.0 >= CHECKPOINT_BYTES || last.1.elapsed() >= CHECKPOINT_INTERVAL;
            if due && self.done < total {
                self.checkpoint()?;
                last = (self.done, Instant::now());
            }
        }
        self.vol.flush()?;
        let digest = finish_hex(self.hasher.clone());
        self.journal.append(&Record::Copied {
            sha256: digest.clone(),
            written: self.written,
            skipped: self.skipped,
        })?;
        self.source_sha256 = Some(digest);
        progress.finish();
        Ok(())
    }

    /// `len` zero bytes of the source at `offset`: hashed, not written.
    fn zeros(&mut self, offset: u64, len: u64) -> Result<(), MigrateError> {
        if len == 0 {
            return Ok(());
        }
        hash_zeros(&mut self.hasher, len);
        if self.write_zeros {
            self.vol.write_zeroes(offset, len, false)?;
            self.written += len;
        } else {
            self.skipped += len;
        }
        Ok(())
    }

    /// Source bytes `[from, to)` (at most one block): read, hashed, and written except
    /// for zero runs. The source's last block is zero-padded to the volume's size.
    fn data(&mut self, buf: &mut [u8], from: u64, to: u64) -> Result<(), MigrateError> {
        let n = (to - from) as usize; // ≤ BLOCK
        let buf = buf
            .get_mut(..n + 4096)
            .ok_or_else(|| MigrateError::Internal("block larger than the copy buffer".into()))?;
        self.source.read_at(&mut buf[..n], from)?;
        self.hasher.update(&buf[..n]);
        let padded = if to == self.total() {
            let pad = (self.vol.size() - to) as usize; // < sector size ≤ 4096
            buf[n..n + pad].fill(0);
            n + pad
        } else {
            n
        };
        let mut runs = Vec::new();
        zero_runs(&buf[..padded], |r, zero| runs.push((r, zero)));
        for (r, zero) in runs {
            let (off, len) = (from + r.start as u64, r.len() as u64);
            if zero && !self.write_zeros {
                self.skipped += len;
            } else {
                // The buffer is not needed again: encrypt it in place.
                self.vol.write_at_mut(&mut buf[r], off, false)?;
                self.written += len;
            }
        }
        Ok(())
    }

    /// Makes the volume durable up to `done`, then records it. Only at block boundaries:
    /// there the hash state holds no unprocessed (plaintext) bytes.
    fn checkpoint(&mut self) -> Result<(), MigrateError> {
        if !self.done.is_multiple_of(BLOCK as u64) {
            return Err(MigrateError::Internal(format!(
                "checkpoint at {} is not at a block boundary",
                self.done
            )));
        }
        self.vol.flush()?;
        let state = self.hasher.serialize();
        self.journal.append(&Record::Checkpoint {
            done: self.done,
            sha256_state: hex::encode(state.as_slice()),
            written: self.written,
            skipped: self.skipped,
        })
    }
}

/// Reads the whole volume back and hashes its first `source_size` bytes; the rest (the
/// padding) must be zeros. Unallocated extents are hashed as zeros without reading.
pub(super) fn verify(
    vol: &Volume,
    source_size: u64,
    cancel: &Cancel,
) -> Result<String, MigrateError> {
    let size = vol.size();
    let progress = Progress::new(format!("verify {}", vol.path()), size);
    let mut hasher = Sha256::new();
    let mut padding_zero = true;
    let mut buf = vec![0u8; BLOCK];
    let mut window = 0;
    while window < size {
        let wlen = EXTENT_WINDOW.min(size - window);
        for ext in vol.extents(window, wlen)? {
            let mut pos = ext.offset;
            let end = ext.offset + ext.len;
            while pos < end {
                if cancel.is_cancelled() {
                    progress.finish();
                    return Err(MigrateError::Interrupted {
                        done: source_size,
                        total: source_size,
                    });
                }
                let n = (BLOCK as u64).min(end - pos);
                let in_source = source_size.saturating_sub(pos).min(n);
                if ext.allocated {
                    let b = &mut buf[..n as usize];
                    vol.read_at(b, pos)?;
                    let (head, pad) = b.split_at(in_source as usize);
                    hasher.update(head);
                    padding_zero &= is_zero(pad);
                } else {
                    hash_zeros(&mut hasher, in_source);
                }
                pos += n;
                progress.advance(n);
            }
        }
        window += wlen;
    }
    progress.finish();
    let digest = finish_hex(hasher);
    Ok(if padding_zero {
        digest
    } else {
        format!("{digest} (and the zero padding after the source's end reads back non-zero)")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hasher_state_survives_a_round_trip() {
        let mut a = Sha256::new();
        a.update(vec![5u8; 4 << 20]);
        let saved = hex::encode(a.serialize().as_slice());
        let mut b = restore_hasher(&saved).unwrap();
        a.update(b"tail");
        b.update(b"tail");
        assert_eq!(finish_hex(a), finish_hex(b));
        assert!(restore_hasher("00").is_none());
    }
}
