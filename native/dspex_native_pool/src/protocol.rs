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

/// Fuzzing the codec: whatever a worker writes, splitting it into frames never panics nor
/// allocates a header's worth of garbage. (Decoding the frames is fuzzed in
/// `dspex_pool_core::frame`.)
#[cfg(test)]
mod fuzz {
    use super::*;
    use bytes::BytesMut;
    use proptest::prelude::*;
    use tokio_util::codec::Decoder;

    proptest! {
        #![proptest_config(ProptestConfig {
            cases: 512,
            failure_persistence: None,
            ..ProptestConfig::default()
        })]

        #[test]
        fn arbitrary_bytes_never_panic(body in prop::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode_response(&bytes::Bytes::from(body.clone()));
            let _ = codec(64).decode(&mut BytesMut::from(&body[..]));
        }

        /// Frames split at arbitrary points come out whole and in order; an oversized header
        /// is an error, never a panic or an allocation of its size.
        #[test]
        fn frames_survive_any_chunking(
            frames in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..300), 0..8),
            cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..10),
            junk in prop::collection::vec(any::<u8>(), 0..8),
        ) {
            let mut stream = Vec::new();
            for f in &frames {
                stream.extend_from_slice(&(f.len() as u32).to_be_bytes());
                stream.extend_from_slice(f);
            }
            let mut cuts: Vec<usize> = cuts.iter().map(|i| i.index(stream.len() + 1)).collect();
            cuts.push(stream.len());
            cuts.sort_unstable();
            let mut c = codec(256);
            let mut buf = BytesMut::new();
            let mut out = Vec::new();
            let mut failed = false;
            let mut from = 0;
            for cut in cuts {
                buf.extend_from_slice(&stream[from..cut]);
                from = cut;
                loop {
                    match c.decode(&mut buf) {
                        Ok(Some(f)) => out.push(f.to_vec()),
                        Ok(None) => break,
                        Err(_) => {
                            failed = true;
                            break;
                        }
                    }
                }
                if failed {
                    break;
                }
            }
            let oversized = frames.iter().position(|f| f.len() > 256);
            match oversized {
                None => prop_assert_eq!(&out, &frames),
                Some(i) => {
                    prop_assert!(failed);
                    prop_assert_eq!(&out[..], &frames[..i]);
                }
            }
            // Junk after the frames: an error or a wait for more, never a panic.
            buf.extend_from_slice(&junk);
            let _ = c.decode(&mut buf);
        }
    }
}
