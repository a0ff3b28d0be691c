//! Feeds arbitrary bytes to the stream decoder, in arbitrary chunkings, and opens every frame it
//! produces under a fixed terminal key. Any panic, and any decode failure that claims to be a MAC
//! failure, is a bug.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use tapgate_protocol::{ErrorCode, MasterKey, take_frame};

fuzz_target!(|data: &[u8]| {
    let Some((&chunk, rest)) = data.split_first() else {
        return;
    };
    let key = MasterKey::new([0x5a; 16]).diversify(7).mac_key();
    let step = usize::from(chunk).max(1);
    let mut buf = BytesMut::new();
    for piece in rest.chunks(step) {
        buf.extend_from_slice(piece);
        loop {
            match take_frame(&mut buf) {
                Ok(Some(frame)) => {
                    let _ = frame.parse_unverified();
                    if let Err(e) = frame.open(&key) {
                        let _ = e.error_code();
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    assert_ne!(e.error_code(), ErrorCode::BadMac);
                    return;
                }
            }
        }
    }
});
