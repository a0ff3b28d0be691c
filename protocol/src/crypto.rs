//! SM4-CMAC message authentication and per-terminal key diversification.
//!
//! Every frame carries a 16-byte SM4-CMAC (NIST SP 800-38B with the SM4 block cipher) computed
//! under the terminal's own key. Terminal keys are never stored: they are diversified on demand
//! from the master key of the key version the terminal announces, so a leaked terminal key
//! exposes one gate and a key rollover only needs a new master key version.

use cmac::{Cmac, KeyInit, Mac};
use sm4::Sm4;
use sm4::cipher::{Array, BlockCipherEncrypt};

/// Length of every SM4 key in bytes.
pub const KEY_LEN: usize = 16;
/// Length of the MAC tag on every frame.
pub const TAG_LEN: usize = 16;

/// A frame's authentication tag.
pub type Tag = [u8; TAG_LEN];

/// A master key: the root from which every terminal key of one key version is derived.
#[derive(Clone)]
pub struct MasterKey([u8; KEY_LEN]);

impl MasterKey {
    pub const fn new(bytes: [u8; KEY_LEN]) -> Self {
        Self(bytes)
    }

    /// Parses 32 hex digits.
    pub fn from_hex(hex_digits: &str) -> Result<Self, KeyParseError> {
        parse_key_hex(hex_digits).map(Self)
    }

    /// Derives the key of one terminal:
    /// `K_T = SM4_Encrypt(MK, TID || NOT(TID))`, where TID is the terminal id as 8 big-endian bytes
    /// and NOT is the bitwise complement (the PBOC-style diversification of a 16-byte block).
    pub fn diversify(&self, terminal_id: u64) -> TerminalKey {
        let tid = terminal_id.to_be_bytes();
        let mut block = [0u8; 16];
        block[..8].copy_from_slice(&tid);
        for (dst, src) in block[8..].iter_mut().zip(tid) {
            *dst = !src;
        }
        TerminalKey(sm4_encrypt_block(&self.0, block))
    }
}

impl core::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("MasterKey(..)")
    }
}

/// A diversified per-terminal key.
#[derive(Clone, PartialEq, Eq)]
pub struct TerminalKey([u8; KEY_LEN]);

impl TerminalKey {
    pub const fn new(bytes: [u8; KEY_LEN]) -> Self {
        Self(bytes)
    }

    pub fn as_bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }

    /// Expands the key into a ready-to-use MAC context. Do this once per session, not per frame:
    /// the SM4 key schedule and the CMAC subkeys are computed here.
    pub fn mac_key(&self) -> MacKey {
        MacKey {
            cmac: <Cmac<Sm4> as KeyInit>::new(&Array(self.0)),
        }
    }
}

impl core::fmt::Debug for TerminalKey {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("TerminalKey(..)")
    }
}

/// A terminal key with its SM4 round keys and CMAC subkeys already computed.
#[derive(Clone)]
pub struct MacKey {
    cmac: Cmac<Sm4>,
}

impl MacKey {
    /// The SM4-CMAC of `message`.
    pub fn tag(&self, message: &[u8]) -> Tag {
        let mut mac = self.cmac.clone();
        mac.update(message);
        mac.finalize().into_bytes().0
    }

    /// Checks `tag` against `message` in constant time.
    pub fn verify(&self, message: &[u8], tag: &[u8]) -> Result<(), BadMac> {
        let mut mac = self.cmac.clone();
        mac.update(message);
        mac.verify_slice(tag).map_err(|_| BadMac)
    }
}

impl core::fmt::Debug for MacKey {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("MacKey(..)")
    }
}

/// The tag did not match the frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("message authentication code does not match")]
pub struct BadMac;

/// Master keys by key version. Version numbers are chosen by the key custodian; a terminal names
/// the version its key was diversified from in its Hello.
#[derive(Debug, Clone, Default)]
pub struct KeyRing {
    versions: Vec<(u8, MasterKey)>,
}

impl KeyRing {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds or replaces the master key of `version`.
    pub fn insert(&mut self, version: u8, key: MasterKey) {
        match self.versions.iter_mut().find(|(v, _)| *v == version) {
            Some(slot) => slot.1 = key,
            None => self.versions.push((version, key)),
        }
    }

    pub fn master(&self, version: u8) -> Option<&MasterKey> {
        self.versions
            .iter()
            .find(|(v, _)| *v == version)
            .map(|(_, k)| k)
    }

    /// The key of `terminal_id` under `version`, or `None` when the version is unknown.
    pub fn terminal_key(&self, version: u8, terminal_id: u64) -> Option<TerminalKey> {
        self.master(version).map(|mk| mk.diversify(terminal_id))
    }

    pub fn versions(&self) -> impl Iterator<Item = u8> + '_ {
        self.versions.iter().map(|(v, _)| *v)
    }
}

/// A key given as text was not 32 hex digits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a key must be exactly 32 hexadecimal digits")]
pub struct KeyParseError;

/// A key as 32 hex digits, as [`parse_key_hex`] reads it.
pub fn key_hex(key: &[u8; KEY_LEN]) -> String {
    hex::encode(key)
}

/// Parses 32 hex digits into 16 bytes.
pub fn parse_key_hex(text: &str) -> Result<[u8; KEY_LEN], KeyParseError> {
    let text = text.trim().as_bytes();
    if text.len() != KEY_LEN * 2 {
        return Err(KeyParseError);
    }
    let mut key = [0u8; KEY_LEN];
    for (byte, pair) in key.iter_mut().zip(text.chunks_exact(2)) {
        let hi = hex_value(pair[0]).ok_or(KeyParseError)?;
        let lo = hex_value(pair[1]).ok_or(KeyParseError)?;
        *byte = hi << 4 | lo;
    }
    Ok(key)
}

fn hex_value(digit: u8) -> Option<u8> {
    (digit as char).to_digit(16).map(|v| v as u8)
}

/// One SM4 block encryption (GB/T 32907).
pub fn sm4_encrypt_block(key: &[u8; KEY_LEN], block: [u8; 16]) -> [u8; 16] {
    let cipher = <Sm4 as KeyInit>::new(&Array(*key));
    let mut block = Array(block);
    cipher.encrypt_block(&mut block);
    block.0
}

/// SM3 digest (GB/T 32905).
pub fn sm3(data: &[u8]) -> [u8; 32] {
    use sm3::Digest;
    sm3::Sm3::digest(data).into()
}

/// Names a card without its number: SM3 over a secret key and the number, cut short. Lines
/// (logs) or books (settlement's per-card ledgers) about one card can be put together by
/// whoever reads them, but the number cannot be read back without the key, and a key of its
/// own per use keeps one use's names from matching another's.
#[derive(Clone)]
pub struct CardPseudonymizer {
    key: [u8; 16],
}

impl std::fmt::Debug for CardPseudonymizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CardPseudonymizer(..)")
    }
}

impl CardPseudonymizer {
    pub fn new(key: [u8; 16]) -> Self {
        Self { key }
    }

    fn digest(&self, card_id: u64) -> [u8; 32] {
        // A fixed-length input after the key, so no other input can extend a digest.
        let mut input = [0u8; 24];
        input[..16].copy_from_slice(&self.key);
        input[16..].copy_from_slice(&card_id.to_be_bytes());
        sm3(&input)
    }

    /// Twelve hex digits, for log lines.
    pub fn pseudonym(&self, card_id: u64) -> String {
        self.digest(card_id)[..6]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    /// Eight bytes, for books that count per card: two cards of a population of millions
    /// share one with a chance of about one in a million.
    pub fn book_key(&self, card_id: u64) -> u64 {
        let d = self.digest(card_id);
        u64::from_be_bytes(d[..8].try_into().expect("eight bytes"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pseudonyms_are_stable_per_key_and_hide_the_number() {
        let a = CardPseudonymizer::new([1; 16]);
        let b = CardPseudonymizer::new([2; 16]);
        let id = 6_222_000_123_456_789;
        assert_eq!(a.pseudonym(id), a.pseudonym(id));
        assert_ne!(a.pseudonym(id), b.pseudonym(id));
        assert!(!a.pseudonym(id).contains("6789"));
        assert_eq!(a.pseudonym(id).len(), 12);
        assert_eq!(a.book_key(id), a.book_key(id));
        assert_ne!(a.book_key(id), b.book_key(id));
        assert_ne!(a.book_key(id), a.book_key(id + 1));
    }

    fn h16(s: &str) -> [u8; 16] {
        hex::decode(s).unwrap().try_into().unwrap()
    }

    #[test]
    fn sm4_matches_the_gbt_32907_vector() {
        let key = h16("0123456789abcdeffedcba9876543210");
        assert_eq!(
            sm4_encrypt_block(&key, key),
            h16("681edf34d206965e86b3e94f536e4246")
        );
    }

    #[test]
    fn sm3_matches_the_gbt_32905_vector() {
        assert_eq!(
            hex::encode(sm3(b"abc")),
            "66c7f0f462eeedd9d1f2d46bdc10e4e24167c4875cf2f7a2297da02b8f4ba8e0"
        );
    }

    #[test]
    fn diversification_encrypts_id_and_complement() {
        let mk = MasterKey::from_hex("0123456789abcdeffedcba9876543210").unwrap();
        let id: u64 = 0x0123_4567_89ab_cdef;
        // The block for this id is the GB/T test plaintext itself, so the derived key is the
        // standard's ciphertext.
        assert_eq!(
            mk.diversify(id).as_bytes(),
            &h16("681edf34d206965e86b3e94f536e4246")
        );
        assert_ne!(mk.diversify(1), mk.diversify(2));
    }

    #[test]
    fn cmac_verifies_its_own_tag_and_rejects_others() {
        let key = TerminalKey::new([7; 16]).mac_key();
        let tag = key.tag(b"frame bytes");
        assert!(key.verify(b"frame bytes", &tag).is_ok());
        assert_eq!(key.verify(b"frame bytez", &tag), Err(BadMac));
        assert_eq!(key.verify(b"frame bytes", &tag[..8]), Err(BadMac));
        let other = TerminalKey::new([8; 16]).mac_key();
        assert_eq!(other.verify(b"frame bytes", &tag), Err(BadMac));
    }

    /// SM4-CMAC tags computed independently with OpenSSL 3.0
    /// (`openssl mac -cipher SM4-CBC -macopt hexkey:KEY CMAC`) over the bytes 0, 1, 2, … of each
    /// length, covering the empty message, partial and complete final blocks.
    #[test]
    fn cmac_matches_openssl() {
        let vectors = [
            (0, "29e154322e5c7bd8ee6a25ba549b24bc"),
            (1, "837a8fa6afb57e988981e68e7961547f"),
            (15, "675f6907d1c417219180781157293532"),
            (16, "2153e9aa9db68253d06775c03483b3cc"),
            (17, "f2502b5e191ef735da559cc453b68399"),
            (32, "9faa86ca987a5c834083c4b79601e12b"),
            (50, "de0c05f0d92eaece8fe34b9254cea095"),
        ];
        let mac = TerminalKey::new(h16("0123456789abcdeffedcba9876543210")).mac_key();
        for (len, tag) in vectors {
            let msg: Vec<u8> = (0..len as u8).collect();
            assert_eq!(hex::encode(mac.tag(&msg)), tag, "length {len}");
        }
    }

    #[test]
    fn key_ring_selects_master_by_version() {
        let mut ring = KeyRing::new();
        ring.insert(1, MasterKey::new([1; 16]));
        ring.insert(2, MasterKey::new([2; 16]));
        assert_eq!(
            ring.terminal_key(2, 99),
            Some(MasterKey::new([2; 16]).diversify(99))
        );
        assert_eq!(ring.terminal_key(3, 99), None);
        ring.insert(1, MasterKey::new([9; 16]));
        assert_eq!(ring.versions().count(), 2);
        assert_eq!(
            ring.terminal_key(1, 5),
            Some(MasterKey::new([9; 16]).diversify(5))
        );
    }

    #[test]
    fn key_hex_parsing_rejects_bad_text() {
        assert!(MasterKey::from_hex("00").is_err());
        assert!(MasterKey::from_hex("zz23456789abcdeffedcba9876543210").is_err());
        assert!(MasterKey::from_hex(" 0123456789abcdeffedcba9876543210\n").is_ok());
    }
}
