//! AES-256-XTS over whole sectors (IEEE 1619, XTS-AES-256), tweak = sector number
//! as a 128-bit little-endian integer (dm-crypt `plain64`), data unit = one sector.
//!
//! The engine is batched: for every sector the tweak is encrypted once (the tweaks of
//! up to [`TWEAK_BATCH`] sectors in one call of the tweak cipher), the per-block tweaks
//! are derived by multiplication by alpha in GF(2^128), and the data blocks are
//! whitened, encrypted and whitened again a whole pipeline width at a time inside the
//! `aes` crate's backend closure. That closure runs under the backend's runtime-detected
//! CPU features (AES-NI, VAES-256 or VAES-512), so the XOR passes and the tweak
//! arithmetic are compiled for them too and the AES pipeline stays full. Sector sizes
//! are multiples of 16 bytes, so ciphertext stealing never occurs.
//!
//! Performance note: the `aes` crate's VAES-512 batch function is only fully inlined
//! when this package is compiled as one codegen unit (`[profile.release.package.cryptvol]
//! codegen-units = 1` in Cargo.toml); with several units AES throughput roughly halves.
//! A lone 512-byte sector is shorter than the VAES-512 batch (64 blocks) and goes
//! through the crate's block-at-a-time path, so it is the slowest case per byte.

use aes::cipher::{
    consts::U16, typenum::Unsigned, BlockCipherDecBackend, BlockCipherDecClosure,
    BlockCipherDecrypt, BlockCipherEncBackend, BlockCipherEncClosure, BlockCipherEncrypt,
    BlockSizeUser, KeyInit, ParBlocks, ParBlocksSizeUser,
};
use aes::{Aes256, Aes256Enc, Block};
use zeroize::Zeroize;

use super::locked::Locked;
use super::{CryptoError, Dek, SectorSize};

/// AES block length in bytes.
const BLOCK_LEN: usize = 16;

/// Number of sectors whose tweaks are encrypted together by one tweak-cipher call.
const TWEAK_BATCH: usize = 64;

/// Independent alpha-multiplication chains used when deriving block tweaks.
const TWEAK_LANES: usize = 8;

/// An XTS engine keyed with one volume's DEK. Cheap to share between threads (`Sync`).
#[allow(missing_debug_implementations)] // no Debug by design: holds key material
pub struct XtsEngine {
    /// The expanded AES key schedules, in their own locked, non-dumpable page.
    pub(super) keys: Locked<Keys>,
    sector_size: usize,
}

/// The two key schedules (zeroized on drop by the `aes` crate's `zeroize` feature).
pub(super) struct Keys {
    /// Key 1 (DEK bytes 0..32): encrypts and decrypts the data blocks.
    data: Aes256,
    /// Key 2 (DEK bytes 32..64): encrypts the sector tweaks.
    tweak: Aes256Enc,
}

#[derive(Clone, Copy)]
enum Direction {
    Encrypt,
    Decrypt,
}

impl XtsEngine {
    /// `sector_size` is the XTS data unit (validated where it was parsed).
    pub fn new(dek: &Dek, sector_size: SectorSize) -> Result<XtsEngine, CryptoError> {
        let sector_size = sector_size.bytes();
        let k = dek.expose();
        let (k1, k2) = k.split_at(32);
        let keys = Locked::try_new_with(|| {
            Ok(Keys {
                data: Aes256::new_from_slice(k1).map_err(|_| CryptoError::BadKeyLength(k.len()))?,
                tweak: Aes256Enc::new_from_slice(k2)
                    .map_err(|_| CryptoError::BadKeyLength(k.len()))?,
            })
        })?;
        Ok(XtsEngine { keys, sector_size })
    }

    pub fn sector_size(&self) -> usize {
        self.sector_size
    }

    fn check(&self, buf: &[u8]) -> Result<(), CryptoError> {
        if !buf.len().is_multiple_of(self.sector_size) {
            return Err(CryptoError::Unaligned {
                len: buf.len(),
                sector_size: self.sector_size,
            });
        }
        Ok(())
    }

    /// Encrypts `buf` in place; `buf` holds whole sectors, the first being `first_sector`.
    pub fn encrypt_sectors(&self, buf: &mut [u8], first_sector: u64) -> Result<(), CryptoError> {
        self.run(buf, first_sector, Direction::Encrypt)
    }

    /// Decrypts `buf` in place; `buf` holds whole sectors, the first being `first_sector`.
    pub fn decrypt_sectors(&self, buf: &mut [u8], first_sector: u64) -> Result<(), CryptoError> {
        self.run(buf, first_sector, Direction::Decrypt)
    }

    fn run(&self, buf: &mut [u8], first_sector: u64, dir: Direction) -> Result<(), CryptoError> {
        self.check(buf)?;
        let (blocks, rest) = Block::slice_as_chunks_mut(buf);
        if !rest.is_empty() {
            // Unreachable: sector sizes are multiples of the block size.
            return Err(CryptoError::Unaligned {
                len: blocks.len() * BLOCK_LEN + rest.len(),
                sector_size: self.sector_size,
            });
        }
        let blocks_per_sector = self.sector_size / BLOCK_LEN;
        // u128 arithmetic: the sector number cannot overflow whatever the buffer length.
        let mut sector = u128::from(first_sector);
        let mut tweaks = [Block::default(); TWEAK_BATCH];
        let used = (blocks.len() / blocks_per_sector).min(TWEAK_BATCH);
        for group in blocks.chunks_mut(TWEAK_BATCH * blocks_per_sector) {
            let n = group.len() / blocks_per_sector;
            let sector_tweaks = &mut tweaks[..n];
            for t in sector_tweaks.iter_mut() {
                *t = Block::from(sector.to_le_bytes());
                sector += 1;
            }
            self.keys.tweak.encrypt_blocks(sector_tweaks);
            let pass = Pass {
                blocks: group,
                sector_tweaks,
                blocks_per_sector,
            };
            match dir {
                Direction::Encrypt => self.keys.data.encrypt_with_backend(pass),
                Direction::Decrypt => self.keys.data.decrypt_with_backend(pass),
            }
        }
        Block::slice_as_flattened_mut(&mut tweaks[..used]).zeroize();
        Ok(())
    }
}

/// One backend pass over a run of whole sectors whose encrypted tweaks are known.
struct Pass<'a> {
    blocks: &'a mut [Block],
    /// Encrypted tweak of each sector in `blocks`, in order.
    sector_tweaks: &'a [Block],
    blocks_per_sector: usize,
}

impl BlockSizeUser for Pass<'_> {
    type BlockSize = U16;
}

impl BlockCipherEncClosure for Pass<'_> {
    #[inline(always)]
    fn call<B: BlockCipherEncBackend<BlockSize = U16>>(self, backend: &B) {
        self.process::<B>(
            |par| backend.encrypt_par_blocks_inplace(par),
            |tail| backend.encrypt_tail_blocks_inplace(tail),
        );
    }
}

impl BlockCipherDecClosure for Pass<'_> {
    #[inline(always)]
    fn call<B: BlockCipherDecBackend<BlockSize = U16>>(self, backend: &B) {
        self.process::<B>(
            |par| backend.decrypt_par_blocks_inplace(par),
            |tail| backend.decrypt_tail_blocks_inplace(tail),
        );
    }
}

impl Pass<'_> {
    /// XEX over `blocks`, one backend pipeline width (`B::ParBlocksSize`) at a time:
    /// derive the chunk's block tweaks, XOR, run the cipher, XOR again.
    #[inline(always)]
    fn process<B: ParBlocksSizeUser<BlockSize = U16>>(
        self,
        mut par: impl FnMut(&mut ParBlocks<B>),
        mut tail: impl FnMut(&mut [Block]),
    ) {
        let width = B::ParBlocksSize::USIZE;
        let mut tw_buf = ParBlocks::<B>::default();
        let mut sectors = self.sector_tweaks.iter();
        let mut t = 0u128;
        let mut left_in_sector = 0usize;
        let used = self.blocks.len().min(width);
        for chunk in self.blocks.chunks_mut(width) {
            let m = chunk.len();
            let tw = &mut tw_buf[..m];
            let mut j = 0;
            while j < m {
                if left_in_sector == 0 {
                    let Some(next) = sectors.next() else {
                        // Unreachable: `blocks` holds exactly one sector per tweak.
                        debug_assert!(false, "fewer sector tweaks than sectors");
                        tw[j..].fill(Block::default());
                        break;
                    };
                    t = u128::from_le_bytes(next.0);
                    left_in_sector = self.blocks_per_sector;
                }
                let seg = (m - j).min(left_in_sector);
                t = fill_tweaks(&mut tw[j..j + seg], t);
                j += seg;
                left_in_sector -= seg;
            }
            xor_blocks(chunk, tw);
            match <&mut ParBlocks<B>>::try_from(&mut *chunk) {
                Ok(full) => par(full),
                Err(_) => tail(chunk),
            }
            xor_blocks(chunk, tw);
        }
        Block::slice_as_flattened_mut(&mut tw_buf[..used]).zeroize();
        t.zeroize();
    }
}

/// Writes the tweaks `t, t*alpha, t*alpha^2, ...` into `tw` and returns the tweak that
/// follows.
///
/// Eight consecutive tweaks are kept side by side as sixteen little-endian 64-bit
/// words, exactly the byte layout of eight blocks, and all advanced by alpha^8 at once
/// with uniform lane operations, which the compiler turns into a few vector
/// instructions per eight blocks.
#[inline(always)]
fn fill_tweaks(tw: &mut [Block], t: u128) -> u128 {
    let mut st = [0u64; 2 * TWEAK_LANES];
    for k in 0..TWEAK_LANES {
        let v = mul_alpha_pow(t, k as u32);
        st[2 * k] = v as u64;
        st[2 * k + 1] = (v >> 64) as u64;
    }
    let mut groups = tw.chunks_exact_mut(TWEAK_LANES);
    for group in &mut groups {
        store_words(group, &st);
        st = step_alpha8(&st);
    }
    let rest = groups.into_remainder();
    store_words(rest, &st);
    let r = rest.len() % TWEAK_LANES;
    let next = u128::from(st[2 * r]) | (u128::from(st[2 * r + 1]) << 64);
    st.zeroize();
    next
}

/// Multiplies each of the eight tweaks held in `st` (low word, high word, ...) by
/// alpha^8: every word moves up a byte, the byte leaving a low word enters its high
/// word, and the byte leaving a high word is reduced (carry-less times 0x87) into its
/// low word. Written lane-uniformly so that it vectorizes.
#[inline(always)]
fn step_alpha8(st: &[u64; 2 * TWEAK_LANES]) -> [u64; 2 * TWEAK_LANES] {
    let mut out = [0u64; 2 * TWEAK_LANES];
    for i in 0..2 * TWEAK_LANES {
        let c = st[i ^ 1] >> 56;
        let reduce = if i % 2 == 0 { u64::MAX } else { 0 };
        out[i] = (st[i] << 8) ^ c ^ (((c << 1) ^ (c << 2) ^ (c << 7)) & reduce);
    }
    out
}

/// `blocks[k] = tweak k` for the tweaks held in `st`.
#[inline(always)]
fn store_words(blocks: &mut [Block], st: &[u64; 2 * TWEAK_LANES]) {
    for (b, w) in blocks.iter_mut().zip(st.chunks_exact(2)) {
        b.0[..8].copy_from_slice(&w[0].to_le_bytes());
        b.0[8..].copy_from_slice(&w[1].to_le_bytes());
    }
}

/// Multiplication by alpha (x) in GF(2^128) mod x^128 + x^7 + x^2 + x + 1, on the
/// little-endian integer view of a tweak (IEEE 1619 section 5.2): the reference the
/// tests check the batched tweak derivation against.
#[cfg(test)]
fn mul_alpha(t: u128) -> u128 {
    let carry = 0u128.wrapping_sub(t >> 127);
    (t << 1) ^ (carry & 0x87)
}

/// Multiplication by alpha^k for 0 <= k <= 8: shift by k bits and fold the k bits shifted
/// out back in as their carry-less product with 0x87 (x^7 + x^2 + x + 1), which has
/// at most 15 bits and so needs no further reduction. Constant time.
#[inline(always)]
fn mul_alpha_pow(t: u128, k: u32) -> u128 {
    debug_assert!(k <= 8);
    if k == 0 {
        return t;
    }
    let top = t >> (128 - k);
    (t << k) ^ top ^ (top << 1) ^ (top << 2) ^ (top << 7)
}

#[inline(always)]
fn xor_blocks(blocks: &mut [Block], tweaks: &[Block]) {
    let blocks = Block::slice_as_flattened_mut(blocks);
    for (b, w) in blocks.iter_mut().zip(Block::slice_as_flattened(tweaks)) {
        *b ^= *w;
    }
}

#[cfg(test)]
mod tests;
