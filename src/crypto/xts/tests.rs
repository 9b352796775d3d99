//! Tests of the batched XTS engine: IEEE 1619-2007 vectors, cross-checks against the
//! `xts-mode` crate (the oracle), and the chunking logic at every pipeline width.

use aes::cipher::{
    array::ArraySize,
    consts::{U1, U16, U3, U30, U64, U8},
    inout::InOut,
    BlockCipherDecBackend, BlockCipherDecClosure, BlockCipherDecrypt, BlockCipherEncBackend,
    BlockCipherEncClosure, BlockCipherEncrypt, BlockSizeUser, KeyInit, ParBlocksSizeUser,
};
use aes::{Aes256, Block};
use proptest::prelude::*;
use xts_mode::{get_tweak_default, Xts128};

use super::{fill_tweaks, mul_alpha, mul_alpha_pow, Pass, XtsEngine, BLOCK_LEN};
use crate::crypto::{CryptoError, Dek, SectorSize};

fn unhex(s: &str) -> Vec<u8> {
    let digits: Vec<u8> = s
        .bytes()
        .filter(|c| !c.is_ascii_whitespace())
        .map(|c| match c {
            b'0'..=b'9' => c - b'0',
            b'a'..=b'f' => c - b'a' + 10,
            _ => panic!("bad hex digit {c}"),
        })
        .collect();
    assert_eq!(digits.len() % 2, 0, "odd number of hex digits");
    digits.chunks(2).map(|p| p[0] << 4 | p[1]).collect()
}

fn oracle(key: &[u8]) -> Xts128<Aes256> {
    let c1 = Aes256::new_from_slice(&key[..32]).unwrap();
    let c2 = Aes256::new_from_slice(&key[32..]).unwrap();
    Xts128::new(c1, c2)
}

// ---------------------------------------------------------------------------------
// IEEE Std 1619-2007, Annex B: XTS-AES-256 vectors 10 to 14. All five use the same
// key (Key1 = the digits of e, Key2 = the digits of pi), 512-byte data units, the
// plaintext 00 01 .. ff 00 01 .. ff, and data unit sequence numbers ff, ffff, ffffff,
// ffffffff and ffffffffff.

const IEEE_KEY: &str = "2718281828459045235360287471352662497757247093699959574966967627\
                        3141592653589793238462643383279502884197169399375105820974944592";

fn ieee_plaintext() -> Vec<u8> {
    (0..512).map(|i| (i % 256) as u8).collect()
}

const IEEE_VECTORS: [(u32, u64, &str); 5] = [
    (
        10,
        0xff,
        "1c3b3a102f770386e4836c99e370cf9bea00803f5e482357a4ae12d414a3e63b
         5d31e276f8fe4a8d66b317f9ac683f44680a86ac35adfc3345befecb4bb188fd
         5776926c49a3095eb108fd1098baec70aaa66999a72a82f27d848b21d4a741b0
         c5cd4d5fff9dac89aeba122961d03a757123e9870f8acf1000020887891429ca
         2a3e7a7d7df7b10355165c8b9a6d0a7de8b062c4500dc4cd120c0f7418dae3d0
         b5781c34803fa75421c790dfe1de1834f280d7667b327f6c8cd7557e12ac3a0f
         93ec05c52e0493ef31a12d3d9260f79a289d6a379bc70c50841473d1a8cc81ec
         583e9645e07b8d9670655ba5bbcfecc6dc3966380ad8fecb17b6ba02469a020a
         84e18e8f84252070c13e9f1f289be54fbc481457778f616015e1327a02b140f1
         505eb309326d68378f8374595c849d84f4c333ec4423885143cb47bd71c5edae
         9be69a2ffeceb1bec9de244fbe15992b11b77c040f12bd8f6a975a44a0f90c29
         a9abc3d4d893927284c58754cce294529f8614dcd2aba991925fedc4ae74ffac
         6e333b93eb4aff0479da9a410e4450e0dd7ae4c6e2910900575da401fc07059f
         645e8b7e9bfdef33943054ff84011493c27b3429eaedb4ed5376441a77ed4385
         1ad77f16f541dfd269d50d6a5f14fb0aab1cbb4c1550be97f7ab4066193c4caa
         773dad38014bd2092fa755c824bb5e54c4f36ffda9fcea70b9c6e693e148c151",
    ),
    (
        11,
        0xffff,
        "77a31251618a15e6b92d1d66dffe7b50b50bad552305ba0217a610688eff7e11
         e1d0225438e093242d6db274fde801d4cae06f2092c728b2478559df58e837c2
         469ee4a4fa794e4bbc7f39bc026e3cb72c33b0888f25b4acf56a2a9804f1ce6d
         3d6e1dc6ca181d4b546179d55544aa7760c40d06741539c7e3cd9d2f6650b201
         3fd0eeb8c2b8e3d8d240ccae2d4c98320a7442e1c8d75a42d6e6cfa4c2eca179
         8d158c7aecdf82490f24bb9b38e108bcda12c3faf9a21141c3613b58367f922a
         aa26cd22f23d708dae699ad7cb40a8ad0b6e2784973dcb605684c08b8d6998c6
         9aac049921871ebb65301a4619ca80ecb485a31d744223ce8ddc2394828d6a80
         470c092f5ba413c3378fa6054255c6f9df4495862bbb3287681f931b687c888a
         bf844dfc8fc28331e579928cd12bd2390ae123cf03818d14dedde5c0c24c8ab0
         18bfca75ca096f2d531f3d1619e785f1ada437cab92e980558b3dce1474afb75
         bfedbf8ff54cb2618e0244c9ac0d3c66fb51598cd2db11f9be39791abe447c63
         094f7c453b7ff87cb5bb36b7c79efb0872d17058b83b15ab0866ad8a58656c5a
         7e20dbdf308b2461d97c0ec0024a2715055249cf3b478ddd4740de654f75ca68
         6e0d7345c69ed50cdc2a8b332b1f8824108ac937eb050585608ee734097fc090
         54fbff89eeaeea791f4a7ab1f9868294a4f9e27b42af8100cb9d59cef9645803",
    ),
    (
        12,
        0xff_ffff,
        "e387aaa58ba483afa7e8eb469778317ecf4cf573aa9d4eac23f2cdf914e4e200
         a8b490e42ee646802dc6ee2b471b278195d60918ececb44bf79966f83faba049
         9298ebc699c0c8634715a320bb4f075d622e74c8c932004f25b41e361025b5a8
         7815391f6108fc4afa6a05d9303c6ba68a128a55705d415985832fdeaae6c8e1
         9110e84d1b1f199a2692119edc96132658f09da7c623efcec712537a3d94c0bf
         5d7e352ec94ae5797fdb377dc1551150721adf15bd26a8efc2fcaad56881fa9e
         62462c28f30ae1ceaca93c345cf243b73f542e2074a705bd2643bb9f7cc79bb6
         e7091ea6e232df0f9ad0d6cf502327876d82207abf2115cdacf6d5a48f6c1879
         a65b115f0f8b3cb3c59d15dd8c769bc014795a1837f3901b5845eb491adfefe0
         97b1fa30a12fc1f65ba22905031539971a10f2f36c321bb51331cdefb39e3964
         c7ef079994f5b69b2edd83a71ef549971ee93f44eac3938fcdd61d01fa71799d
         a3a8091c4c48aa9ed263ff0749df95d44fef6a0bb578ec69456aa5408ae32c7a
         f08ad7ba8921287e3bbee31b767be06a0e705c864a769137df28292283ea81a2
         480241b44d9921cdbec1bc28dc1fda114bd8e5217ac9d8ebafa720e9da4f9ace
         231cc949e5b96fe76ffc21063fddc83a6b8679c00d35e09576a875305bed5f36
         ed242c8900dd1fa965bc950dfce09b132263a1eef52dd6888c309f5a7d712826",
    ),
    (
        13,
        0xffff_ffff,
        "bf53d2dade78e822a4d949a9bc6766b01b06a8ef70d26748c6a7fc36d80ae4c5
         520f7c4ab0ac8544424fa405162fef5a6b7f229498063618d39f0003cb5fb8d1
         c86b643497da1ff945c8d3bedeca4f479702a7a735f043ddb1d6aaade3c4a0ac
         7ca7f3fa5279bef56f82cd7a2f38672e824814e10700300a055e1630b8f1cb0e
         919f5e942010a416e2bf48cb46993d3cb6a51c19bacf864785a00bc2ecff15d3
         50875b246ed53e68be6f55bd7e05cfc2b2ed6432198a6444b6d8c247fab941f5
         69768b5c429366f1d3f00f0345b96123d56204c01c63b22ce78baf116e525ed9
         0fdea39fa469494d3866c31e05f295ff21fea8d4e6e13d67e47ce722e9698a1c
         1048d68ebcde76b86fcf976eab8aa9790268b7068e017a8b9b749409514f1053
         027fd16c3786ea1bac5f15cb79711ee2abe82f5cf8b13ae73030ef5b9e4457e7
         5d1304f988d62dd6fc4b94ed38ba831da4b7634971b6cd8ec325d9c61c00f1df
         73627ed3745a5e8489f3a95c69639c32cd6e1d537a85f75cc844726e8a72fc00
         77ad22000f1d5078f6b866318c668f1ad03d5a5fced5219f2eabbd0aa5c0f460
         d183f04404a0d6f469558e81fab24a167905ab4c7878502ad3e38fdbe62a4155
         6cec37325759533ce8f25f367c87bb5578d667ae93f9e2fd99bcbc5f2fbba88c
         f6516139420fcff3b7361d86322c4bd84c82f335abb152c4a93411373aaa8220",
    ),
    (
        14,
        0xff_ffff_ffff,
        "64497e5a831e4a932c09be3e5393376daa599548b816031d224bbf50a818ed23
         50eae7e96087c8a0db51ad290bd00c1ac1620857635bf246c176ab463be30b80
         8da548081ac847b158e1264be25bb0910bbc92647108089415d45fab1b3d2604
         e8a8eff1ae4020cfa39936b66827b23f371b92200be90251e6d73c5f86de5fd4
         a950781933d79a28272b782a2ec313efdfcc0628f43d744c2dc2ff3dcb66999b
         50c7ca895b0c64791eeaa5f29499fb1c026f84ce5b5c72ba1083cddb5ce45434
         631665c333b60b11593fb253c5179a2c8db813782a004856a1653011e93fb6d8
         76c18366dd8683f53412c0c180f9c848592d593f8609ca736317d356e13e2bff
         3a9f59cd9aeb19cd482593d8c46128bb32423b37a9adfb482b99453fbe25a41b
         f6feb4aa0bef5ed24bf73c762978025482c13115e4015aac992e5613a3b5c2f6
         85b84795cb6e9b2656d8c88157e52c42f978d8634c43d06fea928f2822e465aa
         6576e9bf419384506cc3ce3c54ac1a6f67dc66f3b30191e698380bc999b05abc
         e19dc0c6dcc2dd001ec535ba18deb2df1a101023108318c75dc98611a09dc48a
         0acdec676fabdf222f07e026f059b672b56e5cbc8e1d21bbd867dd9272120546
         81d70ea737134cdfce93b6f82ae22423274e58a0821cc5502e2d0ab4585e94de
         6975be5e0b4efce51cd3e70c25a1fbbbd609d273ad5b0d59631c531f6a0a57b9",
    ),
];

fn ieee_engine() -> XtsEngine {
    let dek = Dek::from_slice(&unhex(IEEE_KEY)).unwrap();
    XtsEngine::new(&dek, SectorSize::S512).unwrap()
}

#[test]
fn ieee1619_vectors_10_to_14_encrypt_and_decrypt() {
    let engine = ieee_engine();
    let pt = ieee_plaintext();
    for (number, dusn, ct_hex) in IEEE_VECTORS {
        let ct = unhex(ct_hex);
        assert_eq!(ct.len(), 512, "vector {number}: transcription length");
        let mut buf = pt.clone();
        engine.encrypt_sectors(&mut buf, dusn).unwrap();
        assert_eq!(buf, ct, "vector {number}: encryption");
        engine.decrypt_sectors(&mut buf, dusn).unwrap();
        assert_eq!(buf, pt, "vector {number}: decryption");
    }
}

#[test]
fn ieee1619_vectors_agree_with_the_oracle() {
    // Double check of the transcribed vectors (and of the sequence numbers) against
    // an independent implementation.
    let xts = oracle(&unhex(IEEE_KEY));
    let pt = ieee_plaintext();
    for (number, dusn, ct_hex) in IEEE_VECTORS {
        let mut buf = pt.clone();
        xts.encrypt_sector(&mut buf, get_tweak_default(u128::from(dusn)));
        assert_eq!(buf, unhex(ct_hex), "vector {number}: xts-mode disagrees");
    }
}

#[test]
fn ieee1619_vector_inside_a_multi_sector_buffer() {
    // Vector 11's unit as the middle sector of a three-sector request, and vector 10's
    // as the 65th sector of a 130-sector one (a second tweak batch).
    let engine = ieee_engine();
    let pt = ieee_plaintext();
    let mut buf = [pt.as_slice(); 3].concat();
    engine.encrypt_sectors(&mut buf, 0xfffe).unwrap();
    assert_eq!(&buf[512..1024], unhex(IEEE_VECTORS[1].2).as_slice());

    let mut big = vec![0u8; 130 * 512];
    big[64 * 512..65 * 512].copy_from_slice(&pt);
    engine.encrypt_sectors(&mut big, 0xff - 64).unwrap();
    assert_eq!(
        &big[64 * 512..65 * 512],
        unhex(IEEE_VECTORS[0].2).as_slice()
    );
    engine.decrypt_sectors(&mut big, 0xff - 64).unwrap();
    assert_eq!(&big[64 * 512..65 * 512], pt.as_slice());
    assert!(big[..64 * 512].iter().all(|&b| b == 0));
}

// ---------------------------------------------------------------------------------
// API behaviour.

#[test]
fn unaligned_lengths_are_refused_and_leave_the_buffer_alone() {
    let dek = Dek::from_slice(
        &[7u8; 32]
            .iter()
            .chain(&[9u8; 32])
            .copied()
            .collect::<Vec<_>>(),
    )
    .unwrap();
    for (sector_size, len) in [(512, 511), (512, 513), (512, 16), (4096, 512), (4096, 4097)] {
        let engine = XtsEngine::new(&dek, SectorSize::try_from(sector_size).unwrap()).unwrap();
        let mut buf = vec![0x5au8; len];
        match engine.encrypt_sectors(&mut buf, 3) {
            Err(CryptoError::Unaligned {
                len: l,
                sector_size: s,
            }) => assert_eq!((l, s), (len, sector_size)),
            other => panic!("encrypt of {len} bytes: expected Unaligned, got {other:?}"),
        }
        assert!(matches!(
            engine.decrypt_sectors(&mut buf, 3),
            Err(CryptoError::Unaligned { .. })
        ));
        assert!(
            buf.iter().all(|&b| b == 0x5a),
            "refused call modified the buffer"
        );
    }
}

#[test]
fn empty_buffer_is_a_no_op() {
    let dek = Dek::generate().unwrap();
    let engine = XtsEngine::new(&dek, SectorSize::S4096).unwrap();
    let mut buf = [0u8; 0];
    engine.encrypt_sectors(&mut buf, u64::MAX).unwrap();
    engine.decrypt_sectors(&mut buf, 0).unwrap();
}

#[test]
fn unsupported_sector_sizes_are_refused() {
    let dek = Dek::generate().unwrap();
    // The engine takes a `SectorSize`: an unsupported size is refused where it becomes one.
    for size in [0usize, 16, 520, 1024, 2048, 8192] {
        assert!(
            matches!(SectorSize::try_from(size), Err(CryptoError::BadSectorSize(s)) if s == size),
            "sector size {size} accepted"
        );
    }
    assert_eq!(
        XtsEngine::new(&dek, SectorSize::S512)
            .unwrap()
            .sector_size(),
        512
    );
    assert_eq!(
        XtsEngine::new(&dek, SectorSize::S4096)
            .unwrap()
            .sector_size(),
        4096
    );
}

#[test]
fn equal_key_halves_are_refused() {
    let mut key = [0x42u8; 64];
    assert!(matches!(
        Dek::from_slice(&key),
        Err(CryptoError::EqualXtsHalves)
    ));
    key[63] ^= 1;
    assert!(Dek::from_slice(&key).is_ok());
}

#[test]
fn engine_is_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<XtsEngine>();
    // And it is actually usable from several threads at once.
    let dek = Dek::generate().unwrap();
    let engine = XtsEngine::new(&dek, SectorSize::S512).unwrap();
    let results: Vec<Vec<u8>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4u64)
            .map(|i| {
                let engine = &engine;
                s.spawn(move || {
                    let mut buf = vec![i as u8; 2048];
                    engine.encrypt_sectors(&mut buf, i).unwrap();
                    engine.decrypt_sectors(&mut buf, i).unwrap();
                    buf
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (i, buf) in results.iter().enumerate() {
        assert!(buf.iter().all(|&b| b == i as u8));
    }
}

#[test]
fn sector_number_is_the_tweak() {
    // Same plaintext, neighbouring sectors: different ciphertexts; and the sector after
    // u64::MAX continues into bit 64 of the 128-bit tweak like the oracle does.
    let dek = Dek::generate().unwrap();
    let engine = XtsEngine::new(&dek, SectorSize::S512).unwrap();
    let mut buf = vec![0u8; 1024];
    engine.encrypt_sectors(&mut buf, 41).unwrap();
    assert_ne!(buf[..512], buf[512..]);

    let xts = oracle(dek.expose());
    let mut ours = vec![0x11u8; 1024];
    let mut theirs = ours.clone();
    engine.encrypt_sectors(&mut ours, u64::MAX).unwrap();
    xts.encrypt_area(&mut theirs, 512, u128::from(u64::MAX), get_tweak_default);
    assert_eq!(ours, theirs);
}

// ---------------------------------------------------------------------------------
// GF(2^128) helpers.

proptest! {
    #[test]
    fn mul_alpha_pow_is_repeated_mul_alpha(t in any::<u128>()) {
        let mut slow = t;
        for k in 0..=8 {
            prop_assert_eq!(mul_alpha_pow(t, k), slow, "k = {}", k);
            slow = mul_alpha(slow);
        }
    }

    #[test]
    fn fill_tweaks_is_the_alpha_chain(t in any::<u128>(), n in 0usize..80) {
        let mut tw = vec![Block::default(); n];
        let next = fill_tweaks(&mut tw, t);
        let mut expect = t;
        for (j, w) in tw.iter().enumerate() {
            prop_assert_eq!(u128::from_le_bytes(w.0), expect, "block {}", j);
            expect = mul_alpha(expect);
        }
        prop_assert_eq!(next, expect);
    }
}

#[test]
fn mul_alpha_reduces_with_0x87() {
    assert_eq!(mul_alpha(1), 2);
    assert_eq!(mul_alpha(1 << 127), 0x87);
    assert_eq!(mul_alpha((1 << 127) | 1), 0x85);
}

// ---------------------------------------------------------------------------------
// Cross-checks against the xts-mode oracle.

fn key_strategy() -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(any::<u8>(), 64)
        .prop_filter("XTS halves must differ", |k| k[..32] != k[32..])
}

fn sector_strategy() -> impl Strategy<Value = u64> {
    prop_oneof![
        0u64..1024,
        (1u64 << 32) - 70..(1u64 << 32) + 70,
        any::<u64>(),
        u64::MAX - 140..=u64::MAX,
    ]
}

fn case_strategy() -> impl Strategy<Value = (Vec<u8>, usize, u64, Vec<u8>)> {
    (
        key_strategy(),
        prop_oneof![Just(512usize), Just(4096usize)],
        sector_strategy(),
        1usize..=140,
    )
        .prop_flat_map(|(key, ss, first, n)| {
            // Keep 4096-byte cases at most 70 sectors (still two tweak batches).
            let n = if ss == 4096 { n.div_ceil(2) } else { n };
            let data = proptest::collection::vec(any::<u8>(), n * ss);
            (Just(key), Just(ss), Just(first), data)
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn encrypt_matches_xts_mode((key, ss, first, data) in case_strategy()) {
        let engine = XtsEngine::new(&Dek::from_slice(&key).unwrap(), SectorSize::try_from(ss).unwrap()).unwrap();
        let mut ours = data.clone();
        engine.encrypt_sectors(&mut ours, first).unwrap();
        let mut theirs = data.clone();
        oracle(&key).encrypt_area(&mut theirs, ss, u128::from(first), get_tweak_default);
        prop_assert!(ours == theirs, "encryption differs from xts-mode");
        prop_assert!(ours != data);
    }

    #[test]
    fn decrypt_matches_xts_mode((key, ss, first, data) in case_strategy()) {
        let engine = XtsEngine::new(&Dek::from_slice(&key).unwrap(), SectorSize::try_from(ss).unwrap()).unwrap();
        let mut ours = data.clone();
        engine.decrypt_sectors(&mut ours, first).unwrap();
        let mut theirs = data.clone();
        oracle(&key).decrypt_area(&mut theirs, ss, u128::from(first), get_tweak_default);
        prop_assert!(ours == theirs, "decryption differs from xts-mode");
    }

    #[test]
    fn round_trip_and_per_sector_independence((key, ss, first, data) in case_strategy()) {
        let engine = XtsEngine::new(&Dek::from_slice(&key).unwrap(), SectorSize::try_from(ss).unwrap()).unwrap();
        let mut whole = data.clone();
        engine.encrypt_sectors(&mut whole, first).unwrap();
        // Sector by sector gives the same ciphertext as one call over the whole run.
        let mut pieces = data.clone();
        for (i, sector) in pieces.chunks_mut(ss).enumerate() {
            let s = first.wrapping_add(i as u64);
            if s < first {
                break; // would wrap u64; the whole-run call tweaks with bit 64 set instead
            }
            engine.encrypt_sectors(sector, s).unwrap();
            prop_assert_eq!(&whole[i * ss..(i + 1) * ss], &*sector);
        }
        engine.decrypt_sectors(&mut whole, first).unwrap();
        prop_assert!(whole == data, "round trip failed");
    }
}

// ---------------------------------------------------------------------------------
// The chunking logic at the pipeline widths of every `aes` backend (AES-NI and
// aarch64: 8, VAES-256: 30, VAES-512: 64, soft: 1 or few), whichever one this CPU
// picks at run time. A stand-in backend of the chosen width does the AES one block
// at a time through the public `aes` API.

struct Width<'a, P> {
    cipher: &'a Aes256,
    _width: std::marker::PhantomData<P>,
}

impl<P: ArraySize> BlockSizeUser for Width<'_, P> {
    type BlockSize = U16;
}

impl<P: ArraySize> ParBlocksSizeUser for Width<'_, P> {
    type ParBlocksSize = P;
}

impl<P: ArraySize> BlockCipherEncBackend for Width<'_, P> {
    fn encrypt_block(&self, mut block: InOut<'_, '_, Block>) {
        let mut b = *block.get_in();
        self.cipher.encrypt_block(&mut b);
        *block.get_out() = b;
    }
}

impl<P: ArraySize> BlockCipherDecBackend for Width<'_, P> {
    fn decrypt_block(&self, mut block: InOut<'_, '_, Block>) {
        let mut b = *block.get_in();
        self.cipher.decrypt_block(&mut b);
        *block.get_out() = b;
    }
}

fn run_at_width<P: ArraySize>(key: &[u8], ss: usize, first: u64, buf: &mut [u8], enc: bool) {
    let data = Aes256::new_from_slice(&key[..32]).unwrap();
    let tweak = Aes256::new_from_slice(&key[32..]).unwrap();
    let bps = ss / BLOCK_LEN;
    let mut sector_tweaks: Vec<Block> = (0..buf.len() / ss)
        .map(|i| Block::from((u128::from(first) + i as u128).to_le_bytes()))
        .collect();
    tweak.encrypt_blocks(&mut sector_tweaks);
    let (blocks, rest) = Block::slice_as_chunks_mut(buf);
    assert!(rest.is_empty());
    let pass = Pass {
        blocks,
        sector_tweaks: &sector_tweaks,
        blocks_per_sector: bps,
    };
    let backend = Width::<P> {
        cipher: &data,
        _width: std::marker::PhantomData,
    };
    assert_eq!(
        <Width<P> as ParBlocksSizeUser>::ParBlocksSize::USIZE,
        P::USIZE
    );
    if enc {
        BlockCipherEncClosure::call(pass, &backend);
    } else {
        BlockCipherDecClosure::call(pass, &backend);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn every_pipeline_width_matches_xts_mode(
        key in key_strategy(),
        ss in prop_oneof![Just(512usize), Just(4096usize)],
        first in sector_strategy(),
        n in 1usize..=5,
        seed in any::<u8>(),
    ) {
        let data: Vec<u8> = (0..n * ss).map(|i| (i as u8).wrapping_mul(31) ^ seed).collect();
        let mut expect = data.clone();
        oracle(&key).encrypt_area(&mut expect, ss, u128::from(first), get_tweak_default);
        type Runner = fn(&[u8], usize, u64, &mut [u8], bool);
        let widths: [(usize, Runner); 6] = [
            (1, run_at_width::<U1>),
            (3, run_at_width::<U3>),
            (8, run_at_width::<U8>),
            (30, run_at_width::<U30>),
            (64, run_at_width::<U64>),
            (4 * 64, run_at_width::<aes::cipher::consts::U256>),
        ];
        for (w, run) in widths {
            let mut buf = data.clone();
            run(&key, ss, first, &mut buf, true);
            prop_assert!(buf == expect, "width {}: encryption differs", w);
            run(&key, ss, first, &mut buf, false);
            prop_assert!(buf == data, "width {}: decryption differs", w);
        }
    }
}
