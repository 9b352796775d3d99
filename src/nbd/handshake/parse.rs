//! Parsing option data: the `INFO`/`GO` request and export names.

use super::MAX_NAME_LEN;
use crate::nbd::wire::Reader;

/// The data of an `NBD_OPT_INFO` / `NBD_OPT_GO` request.
#[derive(Debug)]
pub(super) struct InfoRequest<'a> {
    pub(super) name: &'a str,
    pub(super) infos: Vec<u16>,
}

/// Parses `u32 namelen, name, u16 n, n × u16`, requiring the lengths to add up exactly.
pub(super) fn parse_info_request(data: &[u8]) -> Result<InfoRequest<'_>, String> {
    if data.len() < 6 {
        return Err(format!("{} bytes of data, need at least 6", data.len()));
    }
    let mut r = Reader(data);
    let name_len = r.u32().unwrap_or_default();
    let name = usize::try_from(name_len)
        .ok()
        .filter(|&n| n <= data.len() - 6)
        .and_then(|n| r.take(n))
        .ok_or_else(|| {
            format!(
                "export name length {name_len} does not fit in {} bytes of data",
                data.len()
            )
        })?;
    let count = r.u16().unwrap_or_default();
    if r.remaining() != usize::from(count) * 2 {
        return Err(format!(
            "{count} information requests announced but {} bytes follow",
            r.remaining()
        ));
    }
    let mut infos = Vec::with_capacity(usize::from(count));
    while let Some(info) = r.u16() {
        infos.push(info);
    }
    let name = check_name(name)?;
    Ok(InfoRequest { name, infos })
}

/// An export name must be UTF-8 without NUL and at most [`MAX_NAME_LEN`] bytes.
pub(super) fn check_name(name: &[u8]) -> Result<&str, String> {
    if name.len() > MAX_NAME_LEN {
        return Err(format!(
            "export name is {} bytes, the limit is {MAX_NAME_LEN}",
            name.len()
        ));
    }
    let name = std::str::from_utf8(name).map_err(|_| "export name is not valid UTF-8")?;
    if name.contains('\0') {
        return Err("export name contains a NUL character".to_owned());
    }
    Ok(name)
}
