//! Fencing a served image: the exclusive lock (a second server is refused with the
//! holder's name) and the takeover of a dead server's image, which breaks its lock and
//! blocklists it (librbd's `rbd_blocklist_on_break_lock`, forced on in `cluster.rs`), so
//! a stale server can never write again.

use std::ptr;

use super::error::RbdError;
use super::ffi;
use super::image::{take_owner_strings, RbdImage};

/// More owners than an exclusive lock can have; a longer list is refused, not allocated.
const MAX_OWNERS: usize = 16;
/// The first size of each `rbd_list_lockers` buffer, and the most a retry may ask for.
const LOCKER_BUF: usize = 4096;
const MAX_LOCKER_BUF: usize = 1 << 16;

/// The non-empty strings of a NUL-separated buffer.
fn split_nul(buf: &[u8]) -> Vec<String> {
    buf.split(|&b| b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect()
}

impl RbdImage {
    /// Takes the image's exclusive lock and keeps it until [`unlock`](Self::unlock) or
    /// close; librbd will not hand it over to another client on request. Refused with
    /// [`RbdError::Locked`] naming the holder when another client holds it.
    pub fn lock_exclusive(&self) -> Result<(), RbdError> {
        // SAFETY: an open image.
        let r = unsafe { ffi::rbd_lock_acquire(self.raw(), ffi::RBD_LOCK_MODE_EXCLUSIVE) };
        if r == -libc::EROFS || r == -libc::EBUSY {
            let holder = self.holder_names();
            return Err(RbdError::Locked {
                image: self.name().to_string(),
                holder,
            });
        }
        self.check("taking the exclusive lock", r.into())
    }

    /// The clients holding the image's lock (`client.N` forms as librbd names them);
    /// empty when nobody does.
    pub fn lock_owners(&self) -> Result<Vec<String>, RbdError> {
        let mut owners = [ptr::null_mut(); MAX_OWNERS];
        let mut count = owners.len();
        let mut mode: ffi::RbdLockModeT = 0;
        // SAFETY: `owners` has room for `count` pointers; librbd fills at most that many
        // (or returns -ERANGE and fills none) and we free them in take_owner_strings.
        let r = unsafe {
            ffi::rbd_lock_get_owners(self.raw(), &mut mode, owners.as_mut_ptr(), &mut count)
        };
        if r == -libc::ENOENT {
            return Ok(Vec::new());
        }
        self.check("listing the lock owners", r.into())?;
        Ok(take_owner_strings(&mut owners, count))
    }

    /// Who holds the lock, for an error message: `client.N (ADDRESS)` from the lock's
    /// lockers, else the owner addresses, else "another client".
    fn holder_names(&self) -> String {
        if let Ok(lockers) = self.lockers() {
            if !lockers.is_empty() {
                let names: Vec<String> = lockers
                    .iter()
                    .map(|(client, addr)| format!("{client} ({addr})"))
                    .collect();
                return names.join(", ");
            }
        }
        match self.lock_owners() {
            Ok(owners) if !owners.is_empty() => owners.join(", "),
            _ => "another client".to_string(),
        }
    }

    /// The lock's lockers as (entity, address) pairs: `("client.4125",
    /// "127.0.0.1:0/1600395861")`, what `rbd lock ls` shows.
    pub fn lockers(&self) -> Result<Vec<(String, String)>, RbdError> {
        let mut caps = [LOCKER_BUF; 4];
        for _ in 0..2 {
            let mut bufs = caps.map(|n| vec![0u8; n]);
            let mut lens = caps;
            let mut exclusive = 0;
            let [tag, clients, cookies, addrs] = &mut bufs;
            let [tag_len, clients_len, cookies_len, addrs_len] = &mut lens;
            // SAFETY: each buffer is valid for writes of its length, passed beside it;
            // librbd writes at most that many bytes and stores the needed sizes.
            let r = unsafe {
                ffi::rbd_list_lockers(
                    self.raw(),
                    &mut exclusive,
                    tag.as_mut_ptr().cast(),
                    tag_len,
                    clients.as_mut_ptr().cast(),
                    clients_len,
                    cookies.as_mut_ptr().cast(),
                    cookies_len,
                    addrs.as_mut_ptr().cast(),
                    addrs_len,
                )
            };
            if r == -(libc::ERANGE as isize) && lens.iter().all(|&n| n <= MAX_LOCKER_BUF) {
                caps = lens.map(|n| n.max(1));
                continue;
            }
            self.check("listing the lockers", r as i64)?;
            let clients = split_nul(&bufs[1][..lens[1].min(bufs[1].len())]);
            let addrs = split_nul(&bufs[3][..lens[3].min(bufs[3].len())]);
            return Ok(clients.into_iter().zip(addrs).collect());
        }
        self.check("listing the lockers", -i64::from(libc::ERANGE))?;
        Ok(Vec::new())
    }

    /// True while this client holds the exclusive lock.
    pub fn is_lock_owner(&self) -> Result<bool, RbdError> {
        let mut owner = 0;
        // SAFETY: an open image and a valid out-pointer.
        let r = unsafe { ffi::rbd_is_exclusive_lock_owner(self.raw(), &mut owner) };
        self.check("checking the lock", r.into())?;
        Ok(owner != 0)
    }

    /// Releases the lock (a clean stop).
    pub fn unlock(&self) -> Result<(), RbdError> {
        // SAFETY: an open image.
        let r = unsafe { ffi::rbd_lock_release(self.raw()) };
        self.check("releasing the lock", r.into())
    }

    /// Failover when the previous server is dead: breaks every current owner's lock,
    /// which blocklists that client (its writes fail from then on), then takes the lock.
    /// Returns the owners that were fenced.
    pub fn take_over(&self) -> Result<Vec<String>, RbdError> {
        let owners = self.lock_owners()?;
        for owner in &owners {
            let name = super::cluster::cstring(owner.as_bytes(), "the lock owner")?;
            // SAFETY: an open image and a NUL-terminated owner name.
            let r = unsafe {
                ffi::rbd_lock_break(self.raw(), ffi::RBD_LOCK_MODE_EXCLUSIVE, name.as_ptr())
            };
            if r != -libc::ENOENT {
                self.check("breaking the old owner's lock", r.into())?;
            }
            tracing::warn!(image = %self.name(), owner = %owner, "took the image over: the previous owner is blocklisted");
        }
        self.lock_exclusive()?;
        Ok(owners)
    }
}

#[cfg(test)]
mod tests {
    use super::split_nul;

    #[test]
    fn nul_separated_lists() {
        assert_eq!(
            split_nul(b"client.4125\0client.7\0\0\0"),
            ["client.4125", "client.7"]
        );
        assert!(split_nul(b"\0\0").is_empty());
        assert!(split_nul(b"").is_empty());
        assert_eq!(split_nul(b"no-terminator"), ["no-terminator"]);
    }
}
