//! Frames from a QUIC receive stream: the one read loop the gateway, the gates and the tools
//! share.

use bytes::BytesMut;
use tapgate_protocol::{DecodeError, MAX_FRAME_LEN, SealedFrame, take_frame};

/// How much one read asks the stream for.
pub const READ_CHUNK: usize = 16 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// The stream or its connection ended abruptly or broke.
    #[error("stream: {0}")]
    Stream(#[from] quinn::ReadError),
}

pub struct FrameReader {
    recv: quinn::RecvStream,
    buf: BytesMut,
}

impl FrameReader {
    pub fn new(recv: quinn::RecvStream) -> FrameReader {
        FrameReader {
            recv,
            buf: BytesMut::with_capacity(1024),
        }
    }

    /// The next whole frame, structurally checked but not authenticated; `Ok(None)` when the
    /// peer finished its stream cleanly.
    pub async fn next(&mut self) -> Result<Option<SealedFrame>, ReadError> {
        loop {
            if let Some(frame) = take_frame(&mut self.buf)? {
                return Ok(Some(frame));
            }
            // take_frame refuses any frame over MAX_FRAME_LEN, so the buffer stays below that
            // plus one chunk.
            match self.recv.read_chunk(READ_CHUNK, true).await? {
                Some(chunk) => {
                    self.buf.extend_from_slice(&chunk.bytes);
                    debug_assert!(self.buf.len() <= MAX_FRAME_LEN + READ_CHUNK);
                }
                None if self.buf.is_empty() => return Ok(None),
                // A stream that ends inside a frame is malformed (PROTOCOL.md section 7), not a
                // clean finish.
                None => return Err(DecodeError::Truncated(self.buf.len()).into()),
            }
        }
    }
}
