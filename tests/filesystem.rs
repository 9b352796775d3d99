//! A real kernel filesystem over the server: nbdfuse exposes the export as a file, a loop
//! device turns it into a block device, ext4 goes on top. The data survives a server
//! restart, e2fsck finds the filesystem clean, and no plaintext reaches the backing file.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use common::*;

/// Runs a command under `timeout` (a wedged FUSE or loop device fails the test, never hangs it).
fn sh_ok(args: &[&str]) -> String {
    run_ok(Command::new("timeout").args(["-k", "5", "120"]).args(args))
}

/// Everything mounted or attached, undone in reverse order on drop (also on failure).
#[derive(Default)]
struct Cleanup {
    mounts: Vec<PathBuf>,
    loops: Vec<String>,
    fuses: Vec<(PathBuf, Child)>,
}

impl Cleanup {
    /// nbdfuse DIR/disk URI; waits until the virtual file has the export's size.
    fn fuse(&mut self, dir: &Path, uri: &str, size: u64) -> PathBuf {
        std::fs::create_dir_all(dir).expect("mkdir fuse dir");
        let file = dir.join("disk");
        let child = Command::new("nbdfuse")
            .arg(&file)
            .arg(uri)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn nbdfuse");
        self.fuses.push((dir.to_path_buf(), child));
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if std::fs::metadata(&file)
                .map(|m| m.len() == size)
                .unwrap_or(false)
            {
                return file;
            }
            if let Some((_, c)) = self.fuses.last_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    panic!("nbdfuse exited early: {st}");
                }
            }
            assert!(Instant::now() < deadline, "nbdfuse did not come up");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    /// `losetup` with `-b SECTOR`, or the loop driver's default (512) for `None`.
    fn losetup(&mut self, file: &Path, sector: Option<&str>, read_only: bool) -> String {
        let mut args = vec!["losetup", "-f", "--show"];
        if let Some(sector) = sector {
            args.extend(["-b", sector]);
        }
        if read_only {
            args.push("-r");
        }
        args.push(s(file));
        let dev = sh_ok(&args).trim().to_string();
        assert!(dev.starts_with("/dev/loop"), "losetup printed {dev:?}");
        self.loops.push(dev.clone());
        dev
    }
    fn mount(&mut self, dev: &str, dir: &Path, opts: &str) {
        std::fs::create_dir_all(dir).expect("mkdir mountpoint");
        sh_ok(&["mount", "-t", "ext4", "-o", opts, dev, s(dir)]);
        self.mounts.push(dir.to_path_buf());
    }
    /// Cleanly undoes everything, asserting success.
    fn finish(&mut self) {
        while let Some(m) = self.mounts.pop() {
            sh_ok(&["umount", s(&m)]);
        }
        while let Some(l) = self.loops.pop() {
            sh_ok(&["losetup", "-d", &l]);
        }
        while let Some((d, mut c)) = self.fuses.pop() {
            sh_ok(&["fusermount3", "-u", s(&d)]);
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                if let Ok(Some(st)) = c.try_wait() {
                    assert!(st.success(), "nbdfuse exited with {st}");
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "nbdfuse did not exit after unmount"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for m in self.mounts.drain(..).rev() {
            let _ = Command::new("umount").arg("-l").arg(&m).status();
        }
        for l in self.loops.drain(..).rev() {
            let _ = Command::new("losetup").args(["-d", &l]).status();
        }
        for (d, mut c) in self.fuses.drain(..).rev() {
            let _ = Command::new("fusermount3").arg("-u").arg(&d).status();
            let _ = Command::new("fusermount3").arg("-uz").arg(&d).status();
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn sha256(b: &[u8]) -> Vec<u8> {
    Sha256::digest(b).to_vec()
}

fn require_fs_tools() {
    for t in [
        "nbdfuse",
        "fusermount3",
        "losetup",
        "mkfs.ext4",
        "e2fsck",
        "mount",
        "umount",
        "timeout",
    ] {
        require(t);
    }
}

/// e2fsck -fn on DEV, asserting a clean filesystem.
fn fsck_clean(dev: &str) {
    let out = run(Command::new("timeout").args(["-k", "5", "120", "e2fsck", "-fn", dev]));
    assert!(
        out.status.success(),
        "e2fsck -fn found problems ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn ext4_round_trip(sector: &str) {
    require_fs_tools();
    let env = Env::new();
    let size: u64 = 96 << 20;
    let vol = env.create("fs.img", "96M", &["--sector-size", sector]);
    let canary = format!("CRYPTVOL-PLAINTEXT-CANARY-{}-{sector}", std::process::id());
    let mut files: Vec<(String, Vec<u8>)> = (0..12u64)
        .map(|i| {
            (
                format!("f{i}.bin"),
                pattern(((i * 97_531) % (1 << 20)) as usize + 1, i + 100),
            )
        })
        .collect();
    files.push(("canary.txt".into(), canary.repeat(500).into_bytes()));
    let sums: Vec<Vec<u8>> = files.iter().map(|(_, d)| sha256(d)).collect();

    // Write.
    {
        let srv = env.serve(&[s(&vol)], &[], false);
        let mut c = Cleanup::default();
        let disk = c.fuse(&env.path("fuse"), &srv.uri("fs"), size);
        let dev = c.losetup(&disk, Some(sector), false);
        sh_ok(&["mkfs.ext4", "-q", "-F", "-L", "cryptvol-it", &dev]);
        let mnt = env.path("mnt");
        c.mount(&dev, &mnt, "rw");
        std::fs::create_dir_all(mnt.join("dir")).expect("mkdir");
        for (name, data) in &files {
            std::fs::write(mnt.join("dir").join(name), data).expect("write file");
        }
        sh_ok(&["sync"]);
        c.finish();
        let log = srv.stop(); // SIGTERM: asserts a clean exit (status 0)
        assert!(!log.contains("panicked"), "{log}");
    }

    // No plaintext on disk.
    let disk = read(&vol);
    assert!(
        !contains(&disk, canary.as_bytes()),
        "a file's plaintext is in the backing file"
    );
    assert!(
        !contains(&disk, b"cryptvol-it"),
        "the ext4 label is in the backing file in plaintext"
    );

    // Read back after a restart: fsck clean, same checksums.
    let srv = env.serve(&[s(&vol)], &[], false);
    let mut c = Cleanup::default();
    let disk = c.fuse(&env.path("fuse"), &srv.uri("fs"), size);
    let dev = c.losetup(&disk, Some(sector), true);
    fsck_clean(&dev);
    let mnt = env.path("mnt");
    c.mount(&dev, &mnt, "ro");
    for ((name, _), sum) in files.iter().zip(&sums) {
        let got = std::fs::read(mnt.join("dir").join(name)).expect("read file");
        assert_eq!(&sha256(&got), sum, "{name} changed across the restart");
    }
    c.finish();
    srv.stop();
}

#[test]
fn ext4_over_nbdfuse_and_loop_4096() {
    ext4_round_trip("4096");
}

#[test]
fn ext4_over_nbdfuse_and_loop_512() {
    ext4_round_trip("512");
}

/// Issue 16 item 8: a loop device with its default 512-byte sectors over a 4096-byte-sector
/// volume. The loop driver sends 512-byte-aligned requests; nbdfuse (strict libnbd) passes
/// them on because the minimum block size advertised is 1, and the server serves them by
/// read-modify-write. No `--sector-size` needed.
#[test]
fn ext4_over_nbdfuse_and_a_default_loop_device() {
    require_fs_tools();
    let env = Env::new();
    let size: u64 = 64 << 20;
    let vol = env.create("plain.img", "64M", &[]);
    let data = pattern(300_001, 8);
    let srv = env.serve(&[s(&vol)], &[], false);
    let mut c = Cleanup::default();
    let disk = c.fuse(&env.path("fuse"), &srv.uri("plain"), size);
    let dev = c.losetup(&disk, None, false);
    let lbs = std::fs::read_to_string(format!(
        "/sys/block/{}/queue/logical_block_size",
        dev.trim_start_matches("/dev/")
    ))
    .expect("loop device's logical block size");
    assert_eq!(lbs.trim(), "512", "losetup's default sector size");
    sh_ok(&["mkfs.ext4", "-q", "-F", &dev]);
    let mnt = env.path("mnt");
    c.mount(&dev, &mnt, "rw");
    std::fs::write(mnt.join("file.bin"), &data).expect("write file");
    sh_ok(&["sync"]);
    sh_ok(&["umount", s(&mnt)]);
    c.mounts.pop();
    fsck_clean(&dev);
    c.mount(&dev, &mnt, "ro");
    let got = std::fs::read(mnt.join("file.bin")).expect("read file back");
    assert!(got == data, "the file changed after umount and e2fsck");
    c.finish();
    let log = srv.stop();
    assert!(!log.contains("panicked"), "{log}");
}

#[test]
fn backing_filesystem_full_gives_enospc_and_the_server_survives() {
    require("mount");
    let env = Env::new();
    let dir = env.path("small");
    std::fs::create_dir_all(&dir).expect("mkdir");
    let mut c = Cleanup::default();
    sh_ok(&["mount", "-t", "tmpfs", "-o", "size=4M", "tmpfs", s(&dir)]);
    c.mounts.push(dir.clone());
    // A 64 MiB sparse volume on a 4 MiB filesystem.
    let vol = dir.join("v.img");
    run_ok(env.cmd().args(["create", "--size", "64M"]).arg(&vol));
    let srv = env.serve(&[s(&vol)], &[], false);
    qemu_io(&srv.uri("v"), &["write -P 0x61 0 1M"]);
    let out = run(Command::new("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "write -P 0x62 8M 8M",
        &srv.uri("v"),
    ]));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("No space left on device"),
        "a write beyond the backing filesystem's space did not fail with ENOSPC:\n{text}"
    );
    // Earlier data intact, server alive and serving.
    qemu_io(&srv.uri("v"), &["read -P 0x61 0 1M"]);
    let log = srv.stop();
    assert!(!log.contains("panicked"), "{log}");
    c.finish();
}
