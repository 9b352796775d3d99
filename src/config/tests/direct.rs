//! `direct` (`serve --direct`): off by default, on from the file or the flag, and in
//! every export's open options.

use super::*;

#[test]
fn direct_comes_from_the_file_or_the_flag() {
    let off = resolve_full(with_default_socket()).expect("resolve");
    assert!(!off.direct && off.exports.iter().all(|e| !e.options.direct));

    let text = format!("direct = true\n{FULL}");
    let from_file = resolve(
        Some((Path::new("/etc/cryptvol/cryptvol.toml"), file(&text))),
        with_default_socket(),
    )
    .expect("resolve");
    assert!(from_file.direct && from_file.exports.iter().all(|e| e.options.direct));

    let cli = CliOverrides {
        direct: true,
        ..with_default_socket()
    };
    let from_flag = resolve_full(cli).expect("resolve");
    assert!(from_flag.direct && from_flag.exports.iter().all(|e| e.options.direct));
}
