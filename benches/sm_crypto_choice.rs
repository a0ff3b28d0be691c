//! Chooses the SM3/SM4 implementation: RustCrypto (`sm4` + `cmac`, `sm3`) against `sm-crypto`,
//! on the 128-byte messages the issue names. Both sides are first checked to compute the same
//! values, so a faster wrong implementation cannot win.

use cmac::{Cmac, KeyInit, Mac};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use sm_crypto::sm4::CryptSM4ECB;
use sm4::Sm4;
use sm4::cipher::{Array, BlockCipherEncrypt};
use std::hint::black_box;

const KEY: [u8; 16] = [
    0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef, 0xfe, 0xdc, 0xba, 0x98, 0x76, 0x54, 0x32, 0x10,
];

/// One SM4 block with sm-crypto, which pads every input (PKCS#7), so a 16-byte block comes back
/// as 32 bytes whose first 16 are the block's ciphertext.
fn sm_crypto_block(ecb: &CryptSM4ECB<'_>, block: &[u8; 16]) -> [u8; 16] {
    ecb.encrypt_ecb(block)[..16].try_into().unwrap()
}

/// SP 800-38B CMAC on top of sm-crypto's block function (sm-crypto has no CMAC of its own).
fn sm_crypto_cmac(key: &[u8; 16], msg: &[u8]) -> [u8; 16] {
    fn dbl(b: [u8; 16]) -> [u8; 16] {
        let v = u128::from_be_bytes(b);
        ((v << 1) ^ if v >> 127 == 1 { 0x87 } else { 0 }).to_be_bytes()
    }
    let ecb = CryptSM4ECB::new(key);
    let k1 = dbl(sm_crypto_block(&ecb, &[0; 16]));
    let k2 = dbl(k1);
    let n = msg.len().div_ceil(16).max(1);
    let mut x = [0u8; 16];
    for i in 0..n {
        let chunk = &msg[i * 16..msg.len().min(i * 16 + 16)];
        let mut block = [0u8; 16];
        block[..chunk.len()].copy_from_slice(chunk);
        if i == n - 1 {
            let sub = if chunk.len() == 16 {
                k1
            } else {
                block[chunk.len()] = 0x80;
                k2
            };
            block.iter_mut().zip(sub).for_each(|(b, s)| *b ^= s);
        }
        x.iter_mut().zip(block).for_each(|(a, b)| *a ^= b);
        x = sm_crypto_block(&ecb, &x);
    }
    x
}

fn rustcrypto_cmac(prepared: &Cmac<Sm4>, msg: &[u8]) -> [u8; 16] {
    let mut mac = prepared.clone();
    mac.update(msg);
    mac.finalize().into_bytes().0
}

fn check_agreement(msg: &[u8]) {
    let prepared = <Cmac<Sm4> as KeyInit>::new(&Array(KEY));
    assert_eq!(
        rustcrypto_cmac(&prepared, msg),
        sm_crypto_cmac(&KEY, msg),
        "CMACs disagree"
    );
    let expected = "681edf34d206965e86b3e94f536e4246";
    let mut block = Array(KEY);
    <Sm4 as KeyInit>::new(&Array(KEY)).encrypt_block(&mut block);
    assert_eq!(hex::encode(block.0), expected);
    assert_eq!(
        hex::encode(sm_crypto_block(&CryptSM4ECB::new(&KEY), &KEY)),
        expected
    );
    let rc: [u8; 32] = {
        use sm3::Digest;
        sm3::Sm3::digest(msg).into()
    };
    assert_eq!(rc.to_vec(), sm_crypto::sm3::sm3_hash_raw(msg));
}

fn bench(c: &mut Criterion) {
    let msg: Vec<u8> = (0..128u8).collect();
    check_agreement(&msg);

    let mut g = c.benchmark_group("sm4_cmac_128B");
    g.throughput(Throughput::Bytes(msg.len() as u64));
    let prepared = <Cmac<Sm4> as KeyInit>::new(&Array(KEY));
    g.bench_function("rustcrypto_prepared_key", |b| {
        b.iter(|| rustcrypto_cmac(black_box(&prepared), black_box(&msg)))
    });
    g.bench_function("rustcrypto_fresh_key", |b| {
        b.iter(|| {
            let fresh = <Cmac<Sm4> as KeyInit>::new(&Array(*black_box(&KEY)));
            rustcrypto_cmac(&fresh, black_box(&msg))
        })
    });
    g.bench_function("sm_crypto", |b| {
        b.iter(|| sm_crypto_cmac(black_box(&KEY), black_box(&msg)))
    });
    g.finish();

    let mut g = c.benchmark_group("sm4_block");
    let cipher = <Sm4 as KeyInit>::new(&Array(KEY));
    g.bench_function("rustcrypto", |b| {
        b.iter(|| {
            let mut block = Array(*black_box(&KEY));
            cipher.encrypt_block(&mut block);
            block
        })
    });
    let ecb = CryptSM4ECB::new(&KEY);
    g.bench_function("sm_crypto", |b| {
        b.iter(|| sm_crypto_block(black_box(&ecb), black_box(&KEY)))
    });
    g.finish();

    let mut g = c.benchmark_group("sm3_128B");
    g.throughput(Throughput::Bytes(msg.len() as u64));
    g.bench_function("rustcrypto", |b| {
        b.iter(|| {
            use sm3::Digest;
            sm3::Sm3::digest(black_box(&msg))
        })
    });
    g.bench_function("sm_crypto", |b| {
        b.iter(|| sm_crypto::sm3::sm3_hash_raw(black_box(&msg)))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
