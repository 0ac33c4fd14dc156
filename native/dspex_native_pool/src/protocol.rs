//! The worker protocol on pipes: the codec that splits a worker's stdout into frames.
//!
//! Encoding requests and decoding responses are pure and live in the core crate
//! ([`dspex_pool_core::frame`]); they are re-exported here.

use tokio_util::codec::LengthDelimitedCodec;

pub use dspex_pool_core::frame::{decode_response, encode_request, Response, DEFAULT_MAX_FRAME};

/// The codec that splits a worker's stdout into frames.
pub fn codec(max_frame: usize) -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .length_field_length(4)
        .big_endian()
        .max_frame_length(max_frame)
        .new_codec()
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BytesMut;
    use tokio_util::codec::Decoder;

    #[test]
    fn codec_rejects_frames_over_the_limit_at_the_header() {
        let mut c = codec(16);
        // "this" as a length is 1.9 GB: garbage on stdout fails at once, not after 1.9 GB.
        let mut buf = BytesMut::from(&b"this is not a frame\n"[..]);
        assert!(c.decode(&mut buf).is_err());
        let mut ok = BytesMut::from(&b"\x00\x00\x00\x02{}"[..]);
        assert_eq!(&c.decode(&mut ok).unwrap().unwrap()[..], b"{}");
    }
}
