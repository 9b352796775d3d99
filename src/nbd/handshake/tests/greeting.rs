//! The greeting, client flags and option headers.

use super::*;

#[test]
fn greeting_is_nbdmagic_ihaveopt_and_flags() {
    let mut expected = b"NBDMAGICIHAVEOPT".to_vec();
    expected.extend_from_slice(&[0x00, 0x03]);
    assert_eq!(server_greeting().to_vec(), expected);
}

#[test]
fn client_flags_accept_advertised_bits_only() {
    assert_eq!(parse_client_flags([0, 0, 0, 3]), Ok(FIXED));
    assert_eq!(parse_client_flags([0, 0, 0, 1]), Ok(FIXED_WITH_ZEROES));
    assert_eq!(parse_client_flags([0, 0, 0, 0]), Ok(PLAIN));
    assert_eq!(
        parse_client_flags([0, 0, 0, 2]),
        Ok(ClientFlags {
            fixed_newstyle: false,
            no_zeroes: true
        })
    );
    assert_eq!(
        parse_client_flags([0, 0, 0, 7]),
        Err(HandshakeError::BadClientFlags(7))
    );
    assert_eq!(
        parse_client_flags([0x80, 0, 0, 1]),
        Err(HandshakeError::BadClientFlags(0x8000_0001))
    );
}

#[test]
fn option_header_checks_magic() {
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(b"IHAVEOPT");
    b[8..12].copy_from_slice(&7u32.to_be_bytes());
    b[12..].copy_from_slice(&0x0102_0304u32.to_be_bytes());
    assert_eq!(
        parse_option_header(&b),
        Ok(OptionHeader {
            option: 7,
            len: 0x0102_0304
        })
    );
    b[0] = b'i';
    assert_eq!(
        parse_option_header(&b),
        Err(HandshakeError::BadOptionMagic(0x6948_4156_454F_5054))
    );
}
