//! NBD URIs, as libnbd and qemu write them:
//! `nbd://HOST[:PORT][/EXPORT]` and `nbd+unix:///[EXPORT]?socket=PATH`.
//! TLS (`nbds`), vsock and SSH transports are recognised and refused with a clear reason.

use std::fmt;
use std::path::PathBuf;

use super::NbdClientError;

/// The NBD port when a URI names none.
pub const DEFAULT_PORT: u16 = 10809;

/// Where the server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NbdAddr {
    /// TCP host (a name, an IPv4 address or an IPv6 address without brackets) and port.
    Tcp { host: String, port: u16 },
    /// A Unix domain socket.
    Unix(PathBuf),
}

/// A parsed NBD URI: a server address and an export name (possibly empty: the default
/// export).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdUri {
    pub addr: NbdAddr,
    pub export: String,
}

impl NbdUri {
    /// Whether `s` looks like a URI of some NBD scheme (supported or not), so that callers
    /// can tell a URI from a file name before parsing it.
    pub fn looks_like_uri(s: &str) -> bool {
        s.split_once("://").is_some_and(|(scheme, _)| {
            scheme == "nbd" || scheme.starts_with("nbd+") || scheme.starts_with("nbds")
        })
    }

    /// Parses `nbd://HOST[:PORT][/EXPORT]` or `nbd+unix:///[EXPORT]?socket=PATH`.
    pub fn parse(uri: &str) -> Result<NbdUri, NbdClientError> {
        let bad = |reason: &str| NbdClientError::BadUri {
            uri: uri.to_string(),
            reason: reason.to_string(),
        };
        let (scheme, rest) = uri.split_once("://").ok_or_else(|| {
            bad("expected nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH")
        })?;
        let (before_query, query) = match rest.split_once('?') {
            Some((b, q)) => (b, Some(q)),
            None => (rest, None),
        };
        if before_query.contains('#') || query.is_some_and(|q| q.contains('#')) {
            return Err(bad("fragments (#...) are not allowed in NBD URIs"));
        }
        let (authority, path) = match before_query.find('/') {
            Some(i) => (&before_query[..i], &before_query[i + 1..]),
            None => (before_query, ""),
        };
        let export = percent_decode(path).ok_or_else(|| bad("bad %-escape in the export name"))?;
        let params = parse_query(query).ok_or_else(|| bad("bad %-escape in the query"))?;
        let addr = match scheme {
            "nbd" | "nbd+tcp" => {
                if let Some((k, _)) = params.first() {
                    return Err(bad(&format!("unsupported URI parameter {k:?}")));
                }
                let (host, port) = parse_authority(authority).map_err(|r| bad(&r))?;
                NbdAddr::Tcp { host, port }
            }
            "nbd+unix" => {
                if !authority.is_empty() {
                    return Err(bad(
                        "nbd+unix URIs have no host: write nbd+unix:///EXPORT?socket=PATH",
                    ));
                }
                let mut socket = None;
                for (k, v) in params {
                    match k.as_str() {
                        "socket" => socket = Some(PathBuf::from(v)),
                        other => return Err(bad(&format!("unsupported URI parameter {other:?}"))),
                    }
                }
                NbdAddr::Unix(socket.ok_or_else(|| bad("nbd+unix URIs need ?socket=PATH"))?)
            }
            s if s.starts_with("nbds") => {
                return Err(bad(
                    "TLS (nbds://) is not supported; use a Unix socket or an SSH tunnel",
                ))
            }
            s if s.starts_with("nbd+") => {
                return Err(bad(&format!(
                    "transport {s:?} is not supported (use nbd:// or nbd+unix://)"
                )))
            }
            s => return Err(bad(&format!("{s:?} is not an NBD URI scheme"))),
        };
        if export.len() > crate::nbd::MAX_NAME_LEN || export.contains('\0') {
            return Err(bad("the export name is too long or contains NUL"));
        }
        Ok(NbdUri { addr, export })
    }
}

/// Prints a URI that parses back to the same address and export: the export name and
/// the socket path are %-escaped (a name holding `?`, `#` or `%` stays a name).
impl fmt::Display for NbdUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let export = percent_encode(&self.export);
        match &self.addr {
            NbdAddr::Tcp { host, port } if host.contains(':') => {
                write!(f, "nbd://[{host}]:{port}/{export}")
            }
            NbdAddr::Tcp { host, port } => write!(f, "nbd://{host}:{port}/{export}"),
            NbdAddr::Unix(p) => {
                let socket = percent_encode(&p.to_string_lossy());
                write!(f, "nbd+unix:///{export}?socket={socket}")
            }
        }
    }
}

/// `HOST`, `HOST:PORT`, `[V6]`, `[V6]:PORT`.
fn parse_authority(a: &str) -> Result<(String, u16), String> {
    if a.contains('@') {
        return Err("user names are not supported in NBD URIs".into());
    }
    let (host, port) = if let Some(rest) = a.strip_prefix('[') {
        let (h, after) = rest.split_once(']').ok_or("unterminated [IPv6 address]")?;
        match after {
            "" => (h, None),
            p => (
                h,
                Some(p.strip_prefix(':').ok_or("expected :PORT after ]")?),
            ),
        }
    } else {
        match a.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (a, None),
        }
    };
    if host.is_empty() {
        return Err("missing host (nbd://HOST[:PORT]/EXPORT)".into());
    }
    if host.contains(['[', ']']) || (host.contains(':') && !a.starts_with('[')) {
        return Err(
            "bad host: write an IPv6 address in brackets (nbd://[ADDR]:PORT/EXPORT)".into(),
        );
    }
    let port = match port {
        None | Some("") => DEFAULT_PORT,
        Some(p) => p
            .parse::<u16>()
            .ok()
            .filter(|&n| n != 0)
            .ok_or_else(|| format!("bad port {p:?}"))?,
    };
    Ok((host.to_string(), port))
}

/// `k=v&k2=v2`, %-decoded.
fn parse_query(q: Option<&str>) -> Option<Vec<(String, String)>> {
    let mut out = Vec::new();
    for part in q.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = part.split_once('=').unwrap_or((part, ""));
        out.push((percent_decode(k)?, percent_decode(v)?));
    }
    Some(out)
}

/// `%XX` for every byte but the unreserved characters and `/` (what [`percent_decode`]
/// turns back into `s`).
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for &b in s.as_bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Decodes `%XX` escapes; `None` on a malformed escape or a result that is not UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        if b == b'%' {
            let hex = bytes.get(i + 1..i + 3)?;
            let hex = std::str::from_utf8(hex).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp(host: &str, port: u16, export: &str) -> NbdUri {
        NbdUri {
            addr: NbdAddr::Tcp {
                host: host.into(),
                port,
            },
            export: export.into(),
        }
    }

    #[test]
    fn parses_tcp_forms() {
        assert_eq!(NbdUri::parse("nbd://h").unwrap(), tcp("h", 10809, ""));
        assert_eq!(NbdUri::parse("nbd://h/").unwrap(), tcp("h", 10809, ""));
        assert_eq!(
            NbdUri::parse("nbd://127.0.0.1:1234/vol").unwrap(),
            tcp("127.0.0.1", 1234, "vol")
        );
        assert_eq!(
            NbdUri::parse("nbd://[::1]:99/a%20b").unwrap(),
            tcp("::1", 99, "a b")
        );
        assert_eq!(
            NbdUri::parse("nbd://[::1]/x").unwrap(),
            tcp("::1", 10809, "x")
        );
        assert_eq!(
            NbdUri::parse("nbd://h/a/b").unwrap(),
            tcp("h", 10809, "a/b"),
            "the export name is everything after the first slash"
        );
    }

    #[test]
    fn parses_unix_form() {
        let u = NbdUri::parse("nbd+unix:///disk?socket=/tmp/a%20b.sock").unwrap();
        assert_eq!(u.addr, NbdAddr::Unix(PathBuf::from("/tmp/a b.sock")));
        assert_eq!(u.export, "disk");
        let u = NbdUri::parse("nbd+unix://?socket=/s").unwrap();
        assert_eq!(u.export, "");
        assert_eq!(u.to_string(), "nbd+unix:///?socket=/s");
    }

    #[test]
    fn refuses_bad_uris_with_reasons() {
        for (uri, needle) in [
            ("nbd+unix:///x", "socket=PATH"),
            ("nbd+unix://host/x?socket=/s", "no host"),
            ("nbds://h/x", "TLS"),
            ("nbd+vsock:///x", "not supported"),
            ("nbd://h:0/x", "bad port"),
            ("nbd://h:99999/x", "bad port"),
            ("nbd://:10/x", "missing host"),
            ("nbd://h/%zz", "%-escape"),
            ("nbd://h/x?tls=on", "unsupported URI parameter"),
            ("nbd+unix:///x?socket=/s&foo=1", "unsupported URI parameter"),
            ("nbd://[::1/x", "unterminated"),
            ("http://h/x", "not an NBD URI"),
            ("/dev/sda", "expected nbd://"),
            ("nbd://u@h/x", "user names"),
            // Found by the nbd_uri fuzz target: printed as [h]sp:880]:8809, which did not parse.
            ("nbd://h]sp:880:8809/", "bad host"),
            ("nbd://::1/x", "bad host"),
            ("nbd://[[x]/y", "bad host"),
        ] {
            let e = NbdUri::parse(uri).unwrap_err().to_string();
            assert!(e.contains(needle), "{uri}: {e}");
        }
    }

    /// Found by the nbd_uri fuzz target: names holding `%`, `?` or `#` printed raw, so
    /// the printed URI (an import's recorded source) named another export or did not parse.
    #[test]
    fn printed_uris_parse_back_to_the_same_uri() {
        for uri in [
            "nbd://h:1/a%25b",
            "nbd://h:1/a%3Fb%23c",
            "nbd://[::1]:2/%20x",
            "nbd+unix:///e%26?socket=/tmp/a%26b%3D.sock",
            "nbd://h/a/b",
        ] {
            let parsed = NbdUri::parse(uri).unwrap();
            let printed = parsed.to_string();
            assert_eq!(
                NbdUri::parse(&printed).unwrap(),
                parsed,
                "{uri} printed as {printed}"
            );
        }
        assert_eq!(
            NbdUri::parse("nbd://h/a%25").unwrap().to_string(),
            "nbd://h:10809/a%25"
        );
    }

    #[test]
    fn tells_uris_from_paths() {
        assert!(NbdUri::looks_like_uri("nbd://h/x"));
        assert!(NbdUri::looks_like_uri("nbd+unix:///x?socket=/s"));
        assert!(NbdUri::looks_like_uri("nbds://h/x"));
        assert!(!NbdUri::looks_like_uri("/tmp/nbd://x"));
        assert!(!NbdUri::looks_like_uri("disk.raw"));
        assert!(!NbdUri::looks_like_uri("http://x"));
    }
}
