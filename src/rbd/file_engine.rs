//! The volume layer's [`FileEngine`] over an RBD image: the same blocking, positioned
//! calls as a file (offsets are image offsets), so a `Volume` can keep its data area on
//! RBD once its open path takes an engine (docs/rbd.md).

use std::io;

use super::image::RbdImage;
use crate::volume::FileEngine;

impl FileEngine for RbdImage {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        Ok(self.read_at(buf, offset)?)
    }

    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        Ok(self.write_at(buf, offset)?)
    }

    fn sync_data(&self) -> io::Result<()> {
        Ok(self.flush()?)
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        // Zeroes, not an advisory discard: the contract is "reads as zeros after".
        Ok(self.write_zeroes(offset, len)?)
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.size()?)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        Ok(self.resize(len)?)
    }

    fn sync_all(&self) -> io::Result<()> {
        // An image has no file metadata apart from its size, which librbd commits
        // before `resize` returns: a flush makes everything durable.
        Ok(self.flush()?)
    }

    fn name(&self) -> &'static str {
        "rbd"
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::process::{Command, Stdio};

    use super::*;
    use crate::rbd::{Cluster, ClusterOptions, ImageSpec};

    const MIB: u64 = 1 << 20;

    /// A one-node cluster of this test's own (scripts/ceph-cluster.sh), stopped and removed
    /// by a detached `tail --pid` reaper when the test process exits.
    fn start_cluster() -> PathBuf {
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/ceph-cluster.sh");
        let dir = std::env::temp_dir().join(format!("cryptvol-rbd-unit-{}", std::process::id()));
        let reaper = format!(
            "tail --pid={} -f /dev/null; '{}' stop '{}'; rm -rf '{}'",
            std::process::id(),
            script.display(),
            dir.display(),
            dir.display()
        );
        let status = Command::new("setsid")
            .args(["-f", "sh", "-c", &reaper])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("setsid");
        assert!(status.success());
        let out = Command::new(&script)
            .arg("start")
            .arg(&dir)
            .output()
            .expect("ceph-cluster.sh");
        assert!(
            out.status.success(),
            "ceph-cluster.sh start failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        dir
    }

    #[test]
    fn the_file_engine_contract_holds_on_rbd() {
        let dir = start_cluster();
        let opts = ClusterOptions {
            conf: Some(dir.join("ceph.conf")),
            ..Default::default()
        };
        let cluster = Cluster::connect(&opts).expect("connect");
        let spec = ImageSpec::parse("rbd:rbd/engine").unwrap();
        RbdImage::create(&cluster, &spec, 4 * MIB).unwrap();
        let engine: Box<dyn FileEngine> = Box::new(RbdImage::open(&cluster, &spec).unwrap());

        assert_eq!(engine.len().unwrap(), 4 * MIB);
        engine.write_all_at(&[0x5a; 8192], 4096).unwrap();
        engine.sync_data().unwrap();
        let mut buf = vec![0u8; 8192];
        engine.read_exact_at(&mut buf, 4096).unwrap();
        assert!(buf.iter().all(|&b| b == 0x5a));

        // Bytes past the end read as zeros, as in a short file.
        engine.write_all_at(&[0x11; 4096], 4 * MIB - 4096).unwrap();
        engine.read_exact_at(&mut buf, 4 * MIB - 4096).unwrap();
        assert!(buf[..4096].iter().all(|&b| b == 0x11));
        assert!(buf[4096..].iter().all(|&b| b == 0));

        // A punched range reads as zeros; the rest stays.
        engine.punch_hole(4096, 4096).unwrap();
        engine.read_exact_at(&mut buf, 4096).unwrap();
        assert!(buf[..4096].iter().all(|&b| b == 0));
        assert!(buf[4096..].iter().all(|&b| b == 0x5a));

        // The image does not grow by writing: a write past the end is an error.
        let err = engine.write_all_at(&[1; 4096], 4 * MIB).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{err}");
        assert!(err.to_string().contains("past the image's end"), "{err}");
    }
}
