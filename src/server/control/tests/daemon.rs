//! A daemon with a control socket: requests answered, bad ones survived, hook refusals
//! passed on to the client.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_answers_requests_and_survives_bad_ones() {
    let tmp = tempfile::tempdir().unwrap();
    let vol = volume(tmp.path(), 3 * SNAPSHOT_CHUNK_SIZE + 4096);
    let exports = Exports::new(vec![Export::new("vol".into(), vol)]);
    let nbd = Listener::bind(&ListenerSpec::Unix {
        path: tmp.path().join("nbd.sock"),
        mode: 0o600,
    })
    .await
    .unwrap();
    let ctl_path = tmp.path().join("ctl.sock");
    let socket = ControlSocket::bind(&ctl_path).await.unwrap();
    // A second daemon cannot take a live control socket.
    assert!(matches!(
        ControlSocket::bind(&ctl_path).await,
        Err(ServerError::SocketInUse(_))
    ));
    let keys = Arc::new(FakeKeys {
        calls: AtomicUsize::new(0),
        refuse: false,
    });
    let control = Control {
        socket: Some(socket),
        hooks: ControlHooks {
            keys: Some(keys.clone()),
            snapshots: Some(Arc::new(FakeTaker)),
            exports: None,
        },
        metrics: None,
    };
    let shutdown = shutdown_handle();
    let server = tokio::spawn(serve_with(
        exports,
        vec![nbd],
        ServerConfig::default(),
        shutdown.clone(),
        control,
    ));
    let p = ctl_path.clone();
    let k = keys.clone();
    tokio::task::spawn_blocking(move || {
        let call = |r: &Request| request(&p, r, |_| {});
        // Garbage first: each gets a clear error, the daemon keeps serving.
        let out = raw(&p, b"{nope\n");
        assert!(
            out.contains("\"ok\":false") && out.contains("not valid JSON"),
            "{out}"
        );
        let out = raw(&p, b"{\"op\":\"frobnicate\"}\n");
        assert!(out.contains("unknown op"), "{out}");
        let big = vec![b'x'; 1 << 20];
        let out = raw(&p, &big);
        assert!(out.contains("too large"), "{out}");
        // Status.
        let m = call(&Request::Status).unwrap();
        let st: StatusReply = serde_json::from_value(Value::Object(m)).unwrap();
        assert_eq!(st.exports.len(), 1);
        assert_eq!(st.exports[0].name, "vol");
        assert_eq!(st.exports[0].connections, 0);
        assert!(st.exports[0].thin && st.exports[0].allocated_bytes > 0);
        assert_eq!(st.exports[0].reencrypt, None);
        // Unknown export.
        let e = call(&Request::ReencryptStatus {
            export: "nope".into(),
        })
        .unwrap_err();
        assert!(
            e.to_string()
                .contains("no export named \"nope\"; this daemon serves \"vol\""),
            "{e}"
        );
        let m = call(&Request::ReencryptStatus {
            export: "vol".into(),
        })
        .unwrap();
        assert_eq!(m["in_progress"], false);
        // Re-encryption reaches the hook, then the volume (whose stub refuses).
        let e = call(&Request::Reencrypt {
            export: "vol".into(),
            wait: true,
        })
        .unwrap_err();
        assert!(
            e.to_string().contains("cannot start re-encrypting \"vol\""),
            "{e}"
        );
        assert_eq!(k.calls.load(Ordering::SeqCst), 1);
        // Snapshot through the fake store, with progress events.
        let mut events = Vec::new();
        let m = request(
            &p,
            &Request::Snapshot {
                export: "vol".into(),
                store: "/tmp/store".into(),
                description: "nightly".into(),
                parent: None,
            },
            |ev| events.push(ev.clone()),
        )
        .unwrap();
        assert_eq!(m["export"], "vol");
        assert_eq!(m["snapshot"]["id"], "snap-fake");
        assert_eq!(m["snapshot"]["chunks"], 4);
        assert_eq!(m["snapshot"]["first_byte"], 7);
        assert_eq!(m["snapshot"]["description"], "nightly");
        assert!(events
            .iter()
            .all(|e| e.op == "snapshot" && e.total == 3 * SNAPSHOT_CHUNK_SIZE + 4096));
        // Still serving.
        assert!(call(&Request::Status).is_ok());
    })
    .await
    .unwrap();
    shutdown.shutdown();
    server.await.unwrap().unwrap();
    assert!(!ctl_path.exists(), "control socket removed at shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_of_the_key_hook_reach_the_client() {
    let tmp = tempfile::tempdir().unwrap();
    let vol = volume(tmp.path(), 1 << 20);
    let exports = Exports::new(vec![Export::new("v".into(), vol)]);
    let nbd = Listener::bind(&ListenerSpec::Unix {
        path: tmp.path().join("nbd.sock"),
        mode: 0o600,
    })
    .await
    .unwrap();
    let ctl_path = tmp.path().join("ctl.sock");
    let control = Control {
        socket: Some(ControlSocket::bind(&ctl_path).await.unwrap()),
        hooks: ControlHooks {
            keys: Some(Arc::new(FakeKeys {
                calls: AtomicUsize::new(0),
                refuse: true,
            })),
            snapshots: None,
            exports: None,
        },
        metrics: None,
    };
    let shutdown = shutdown_handle();
    let server = tokio::spawn(serve_with(
        exports,
        vec![nbd],
        ServerConfig::default(),
        shutdown.clone(),
        control,
    ));
    let p = ctl_path.clone();
    tokio::task::spawn_blocking(move || {
        let e = request(
            &p,
            &Request::Reencrypt {
                export: "v".into(),
                wait: false,
            },
            |_| {},
        )
        .unwrap_err();
        assert!(e.to_string().contains("passphrase keyslot"), "{e}");
        let e = request(
            &p,
            &Request::Snapshot {
                export: "v".into(),
                store: "/s".into(),
                description: String::new(),
                parent: None,
            },
            |_| {},
        )
        .unwrap_err();
        assert!(e.to_string().contains("not available"), "{e}");
    })
    .await
    .unwrap();
    shutdown.shutdown();
    server.await.unwrap().unwrap();
}
