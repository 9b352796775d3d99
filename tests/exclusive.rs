//! One volume file must have one writer. Serving the same file twice (two export names in
//! one server, or two server processes) gives two independent read-modify-write paths over
//! the same sectors, so concurrent partial-sector writes lose updates.

mod common;

use std::process::{Output, Stdio};

use common::*;

/// Two clients write disjoint bytes of the same sectors, one through each of `uris`
/// (pipelined, 1-byte writes); returns how many bytes lost their update.
fn lost_updates(a: (&Server, &str), b: (&Server, &str)) -> usize {
    const REGION: u64 = 8 * 4096;
    const BASE: u64 = 1 << 20;
    std::thread::scope(|sc| {
        for (t, (srv, name)) in [a, b].into_iter().enumerate() {
            sc.spawn(move || {
                let (mut r, _, _) = Raw::open(srv, name);
                let mut w = Raw {
                    s: r.s.try_clone().expect("clone"),
                };
                let t = t as u64;
                let writer = std::thread::spawn(move || {
                    let mut off = t;
                    while off < REGION {
                        w.request(0, proto::CMD_WRITE, off, BASE + off, 1, &[0xa0 + t as u8])
                            .expect("send");
                        off += 2;
                    }
                });
                for _ in 0..REGION / 2 {
                    assert_eq!(r.reply().expect("reply").0, 0);
                }
                writer.join().expect("writer");
                r.disconnect();
            });
        }
    });
    let (mut r, _, _) = Raw::open(a.0, a.1);
    let got = r.read(1, BASE, REGION as u32).expect("read");
    r.disconnect();
    got.iter()
        .enumerate()
        .filter(|(i, &v)| v != 0xa0 + (*i as u64 % 2) as u8)
        .count()
}

/// Runs `cryptvol serve VOLUMES` on a scratch socket until it either exits or answers on
/// that socket (the events waited for; the clock only bounds the wait): its output when
/// it exited, `None` when it started serving (it is then killed).
fn serve_outcome(env: &Env, volumes: &[&str]) -> Option<Output> {
    let sock = env.path("t.sock");
    let mut child = env
        .cmd()
        .arg("serve")
        .arg("--unix")
        .arg(&sock)
        .args(volumes)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn cryptvol serve");
    let mut answered = false;
    wait_until(PATIENCE, "the second server to exit or to answer", || {
        answered = std::os::unix::net::UnixStream::connect(&sock).is_ok();
        answered || matches!(child.try_wait(), Ok(Some(_)))
    });
    if answered {
        let _ = child.kill();
        let _ = child.wait();
        return None;
    }
    Some(child.wait_with_output().expect("wait for cryptvol serve"))
}

#[test]
fn same_file_twice_in_one_server_is_refused() {
    let env = Env::new();
    let vol = env.create("v.img", "8M", &[]);
    let x = format!("x={}", s(&vol));
    let y = format!("y={}", s(&vol));
    let Some(out) = serve_outcome(&env, &[&x, &y]) else {
        // It started: show the consequence.
        let srv = env.serve(&[&x, &y], &[], false);
        let lost = lost_updates((&srv, "x"), (&srv, "y"));
        panic!(
            "serving one file as two exports was accepted; concurrent partial-sector writes \
             through the two exports lost {lost} byte updates"
        );
    };
    assert!(!out.status.success());
}

#[test]
fn second_server_on_an_open_volume_is_refused() {
    let env = Env::new();
    let vol = env.create("v.img", "8M", &[]);
    let first = env.serve(&[s(&vol)], &[], false);
    let Some(out) = serve_outcome(&env, &[s(&vol)]) else {
        let second = env.serve(&[s(&vol)], &[], false);
        let lost = lost_updates((&first, "v"), (&second, "v"));
        panic!(
            "a second server opened a volume that is already being served; concurrent \
             partial-sector writes through the two servers lost {lost} byte updates"
        );
    };
    assert!(!out.status.success());
    assert!(first.stop().contains("stopped"));
}
