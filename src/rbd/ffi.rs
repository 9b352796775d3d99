//! The few librados and librbd functions the engine calls, declared by hand from
//! `/usr/include/rados/librados.h` and `/usr/include/rbd/librbd.h` (Ceph 16, librbd 1.16).
//! Nothing here is safe to call directly; `cluster.rs`, `completion.rs` and `image.rs`
//! wrap each call with the invariants it needs.

use std::ffi::{c_char, c_int, c_void};

pub(super) type RadosT = *mut c_void;
pub(super) type RadosIoctxT = *mut c_void;
pub(super) type RbdImageT = *mut c_void;
pub(super) type RbdCompletionT = *mut c_void;
pub(super) type RbdCallbackT = unsafe extern "C" fn(cb: RbdCompletionT, arg: *mut c_void);
/// `rbd_lock_mode_t`: `RBD_LOCK_MODE_EXCLUSIVE = 0`, `RBD_LOCK_MODE_SHARED = 1`.
pub(super) type RbdLockModeT = c_int;
pub(super) const RBD_LOCK_MODE_EXCLUSIVE: RbdLockModeT = 0;

#[link(name = "rados")]
unsafe extern "C" {
    pub(super) fn rados_create2(
        pcluster: *mut RadosT,
        clustername: *const c_char,
        name: *const c_char,
        flags: u64,
    ) -> c_int;
    pub(super) fn rados_conf_read_file(cluster: RadosT, path: *const c_char) -> c_int;
    pub(super) fn rados_conf_set(
        cluster: RadosT,
        option: *const c_char,
        value: *const c_char,
    ) -> c_int;
    pub(super) fn rados_connect(cluster: RadosT) -> c_int;
    pub(super) fn rados_shutdown(cluster: RadosT);
    pub(super) fn rados_get_instance_id(cluster: RadosT) -> u64;
    pub(super) fn rados_getaddrs(cluster: RadosT, addrs: *mut *mut c_char) -> c_int;
    pub(super) fn rados_buffer_free(buf: *mut c_char);
    pub(super) fn rados_blocklist_add(
        cluster: RadosT,
        client_address: *mut c_char,
        expire_seconds: u32,
    ) -> c_int;
    pub(super) fn rados_ioctx_create(
        cluster: RadosT,
        pool_name: *const c_char,
        ioctx: *mut RadosIoctxT,
    ) -> c_int;
    pub(super) fn rados_ioctx_destroy(io: RadosIoctxT);
    pub(super) fn rados_ioctx_set_namespace(io: RadosIoctxT, nspace: *const c_char);
}

#[link(name = "rbd")]
unsafe extern "C" {
    pub(super) fn rbd_create(
        io: RadosIoctxT,
        name: *const c_char,
        size: u64,
        order: *mut c_int,
    ) -> c_int;
    pub(super) fn rbd_remove(io: RadosIoctxT, name: *const c_char) -> c_int;
    pub(super) fn rbd_open(
        io: RadosIoctxT,
        name: *const c_char,
        image: *mut RbdImageT,
        snap_name: *const c_char,
    ) -> c_int;
    pub(super) fn rbd_close(image: RbdImageT) -> c_int;
    pub(super) fn rbd_get_size(image: RbdImageT, size: *mut u64) -> c_int;
    pub(super) fn rbd_resize(image: RbdImageT, size: u64) -> c_int;

    pub(super) fn rbd_lock_acquire(image: RbdImageT, lock_mode: RbdLockModeT) -> c_int;
    pub(super) fn rbd_lock_release(image: RbdImageT) -> c_int;
    pub(super) fn rbd_is_exclusive_lock_owner(image: RbdImageT, is_owner: *mut c_int) -> c_int;
    pub(super) fn rbd_lock_get_owners(
        image: RbdImageT,
        lock_mode: *mut RbdLockModeT,
        lock_owners: *mut *mut c_char,
        max_lock_owners: *mut usize,
    ) -> c_int;
    pub(super) fn rbd_lock_get_owners_cleanup(lock_owners: *mut *mut c_char, count: usize);
    pub(super) fn rbd_lock_break(
        image: RbdImageT,
        lock_mode: RbdLockModeT,
        lock_owner: *const c_char,
    ) -> c_int;

    pub(super) fn rbd_list_lockers(
        image: RbdImageT,
        exclusive: *mut c_int,
        tag: *mut c_char,
        tag_len: *mut usize,
        clients: *mut c_char,
        clients_len: *mut usize,
        cookies: *mut c_char,
        cookies_len: *mut usize,
        addrs: *mut c_char,
        addrs_len: *mut usize,
    ) -> isize;

    pub(super) fn rbd_aio_create_completion(
        cb_arg: *mut c_void,
        complete_cb: RbdCallbackT,
        c: *mut RbdCompletionT,
    ) -> c_int;
    pub(super) fn rbd_aio_get_return_value(c: RbdCompletionT) -> isize;
    pub(super) fn rbd_aio_release(c: RbdCompletionT);
    pub(super) fn rbd_aio_write(
        image: RbdImageT,
        off: u64,
        len: usize,
        buf: *const c_char,
        c: RbdCompletionT,
    ) -> c_int;
    pub(super) fn rbd_aio_read(
        image: RbdImageT,
        off: u64,
        len: usize,
        buf: *mut c_char,
        c: RbdCompletionT,
    ) -> c_int;
    pub(super) fn rbd_aio_discard(image: RbdImageT, off: u64, len: u64, c: RbdCompletionT)
        -> c_int;
    pub(super) fn rbd_aio_write_zeroes(
        image: RbdImageT,
        off: u64,
        len: usize,
        c: RbdCompletionT,
        zero_flags: c_int,
        op_flags: c_int,
    ) -> c_int;
    pub(super) fn rbd_aio_flush(image: RbdImageT, c: RbdCompletionT) -> c_int;
}
