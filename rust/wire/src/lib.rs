//! Fernet tokens, the seal PySyncObj puts on every Raft message when the cluster has a secret
//! (spec: github.com/fernet/spec): `0x80 ‖ timestamp (u64, big-endian) ‖ IV (16) ‖
//! AES-128-CBC(PKCS#7(message)) ‖ HMAC-SHA256(signing key, everything before)`, base64url with
//! padding. The same tokens as `cryptography.fernet` makes and opens, so a peer running plain
//! PySyncObj reads ours and we read its (tests/test_wire.py checks both ways).
//!
//! Why in Rust: the Python codec spent ~18 µs sealing and ~21 µs opening a 3 KB AppendEntries
//! (cipher and HMAC objects per call, base64 and its url-safe translation as separate passes),
//! on the tick thread that every message of the node goes through; here each is one call over
//! one buffer (sealing allocates the token's bytes and then their base64).

use aes::cipher::{block_padding::Pkcs7, BlockDecryptMut, BlockEncryptMut, KeyIvInit};
use base64::engine::general_purpose::URL_SAFE;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

const VERSION: u8 = 0x80;
const HEADER_BYTES: usize = 1 + 8 + 16; // version, timestamp, IV
const MAC_BYTES: usize = 32;
const BLOCK_BYTES: usize = 16;
pub const KEY_BYTES: usize = 32;
pub const IV_BYTES: usize = 16;

/// Why a token was refused. One kind on purpose: a caller (and whoever sent the token) learns
/// nothing about which check failed.
#[derive(Debug, PartialEq, Eq)]
pub struct InvalidToken;

/// A Fernet key: the first half signs, the second encrypts (the spec's split).
pub struct FernetKey {
    mac: Hmac<Sha256>,
    aes: [u8; 16],
}

impl FernetKey {
    pub fn new(key: &[u8; KEY_BYTES]) -> Self {
        let mut aes = [0u8; 16];
        aes.copy_from_slice(&key[16..]);
        // HMAC accepts a key of any length; 16 bytes cannot fail.
        let mac = <Hmac<Sha256> as Mac>::new_from_slice(&key[..16]).expect("an HMAC key of 16 bytes");
        FernetKey { mac, aes }
    }

    /// The token of `message` made at `timestamp` (seconds) with `iv` (random, from the caller).
    pub fn seal(&self, message: &[u8], timestamp: u64, iv: &[u8; IV_BYTES]) -> Vec<u8> {
        let body = (message.len() / BLOCK_BYTES + 1) * BLOCK_BYTES;
        let mut raw = Vec::with_capacity(HEADER_BYTES + body + MAC_BYTES);
        raw.push(VERSION);
        raw.extend_from_slice(&timestamp.to_be_bytes());
        raw.extend_from_slice(iv);
        raw.extend_from_slice(message);
        raw.resize(HEADER_BYTES + body, 0);
        let cipher = cbc::Encryptor::<aes::Aes128>::new(&self.aes.into(), iv.into());
        let sealed = cipher
            .encrypt_padded_mut::<Pkcs7>(&mut raw[HEADER_BYTES..], message.len())
            .expect("the buffer holds the message and a whole block of padding")
            .len();
        debug_assert_eq!(sealed, body);
        let mut mac = self.mac.clone();
        mac.update(&raw);
        raw.extend_from_slice(&mac.finalize().into_bytes());
        URL_SAFE.encode(raw).into_bytes()
    }

    /// (timestamp, message) of a token sealed with this key; `InvalidToken` for anything else
    /// — not base64url, too short, another version, a body not of whole blocks, a wrong MAC
    /// (checked in constant time, before decrypting), or bad padding.
    pub fn open(&self, token: &[u8]) -> Result<(u64, Vec<u8>), InvalidToken> {
        let mut raw = URL_SAFE.decode(token).map_err(|_| InvalidToken)?;
        if raw.len() < HEADER_BYTES + BLOCK_BYTES + MAC_BYTES
            || (raw.len() - HEADER_BYTES - MAC_BYTES) % BLOCK_BYTES != 0
            || raw[0] != VERSION
        {
            return Err(InvalidToken);
        }
        let signed = raw.len() - MAC_BYTES;
        let mut mac = self.mac.clone();
        mac.update(&raw[..signed]);
        mac.verify_slice(&raw[signed..]).map_err(|_| InvalidToken)?;
        let timestamp = u64::from_be_bytes(raw[1..9].try_into().expect("8 bytes"));
        let iv: [u8; IV_BYTES] = raw[9..HEADER_BYTES].try_into().expect("16 bytes");
        let cipher = cbc::Decryptor::<aes::Aes128>::new(&self.aes.into(), &iv.into());
        let message = cipher
            .decrypt_padded_mut::<Pkcs7>(&mut raw[HEADER_BYTES..signed])
            .map_err(|_| InvalidToken)?
            .len();
        raw.copy_within(HEADER_BYTES..HEADER_BYTES + message, 0);
        raw.truncate(message);
        Ok((timestamp, raw))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> FernetKey {
        let mut k = [0u8; KEY_BYTES];
        for (i, b) in k.iter_mut().enumerate() {
            *b = i as u8;
        }
        FernetKey::new(&k)
    }

    #[test]
    fn the_spec_s_token_opens() {
        // The spec's test vector (github.com/fernet/spec, generate.json and verify.json):
        // message "hello" at 1985-10-26T01:20:00-07:00 with IV 00 01 .. 0f.
        let secret = URL_SAFE.decode("cw_0x689RpI-jtRR7oE8h_eQsKImvJapLeSbXpwF4e4=").unwrap();
        let key = FernetKey::new(&secret.try_into().unwrap());
        let token = b"gAAAAAAdwJ6wAAECAwQFBgcICQoLDA0ODy021cpGVWKZ_eEwCGM4BLLF_5CV9dOPmrhuVUPgJobwOz7JcbmrR64jVmpU4IwqDA==";
        let iv: [u8; 16] = core::array::from_fn(|i| i as u8);
        assert_eq!(key.seal(b"hello", 499162800, &iv), token.to_vec());
        assert_eq!(key.open(token), Ok((499162800, b"hello".to_vec())));
    }

    #[test]
    fn every_length_round_trips() {
        let k = key();
        let iv = [7u8; IV_BYTES];
        for n in 0..70 {
            let message: Vec<u8> = (0..n).map(|i| (i * 31) as u8).collect();
            let token = k.seal(&message, n as u64, &iv);
            assert_eq!(k.open(&token), Ok((n as u64, message)));
        }
    }

    #[test]
    fn a_changed_byte_anywhere_is_refused() {
        let k = key();
        let token = k.seal(b"append entries", 7, &[1u8; IV_BYTES]);
        let raw = URL_SAFE.decode(&token).unwrap();
        for at in 0..raw.len() {
            let mut bad = raw.clone();
            bad[at] ^= 0x01;
            assert_eq!(k.open(URL_SAFE.encode(&bad).as_bytes()), Err(InvalidToken), "byte {at}");
        }
        for garbage in [&b""[..], b"not base64 !", b"gAAAAA", URL_SAFE.encode(&raw[..raw.len() - 1]).as_bytes()] {
            assert_eq!(k.open(garbage), Err(InvalidToken));
        }
        let mut other = [0u8; KEY_BYTES];
        other[0] = 1;
        assert_eq!(FernetKey::new(&other).open(&token), Err(InvalidToken));
    }
}
