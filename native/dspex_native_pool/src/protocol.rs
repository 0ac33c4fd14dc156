//! The worker protocol: 4-byte big-endian length + UTF-8 JSON, both directions.
//!
//! Requests are `{"id": int, "command": str, "args": object}`; responses are
//! `{"id": int, "success": true, "result": any}` or `{"id": int, "success": false, "error": str}`.

use std::ops::Range;

use bytes::Bytes;
use tokio_util::codec::LengthDelimitedCodec;

use crate::error::PoolError;
use crate::json::{self, Event, Reader};

/// Default bound on a frame in either direction.
pub const DEFAULT_MAX_FRAME: usize = 64 * 1024 * 1024;

/// The codec that splits a worker's stdout into frames.
pub fn codec(max_frame: usize) -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .length_field_length(4)
        .big_endian()
        .max_frame_length(max_frame)
        .new_codec()
}

/// Encodes one request frame (header included) around already-encoded JSON `args`.
///
/// # Errors
/// [`PoolError::InvalidArgs`] when the frame would exceed `max_frame`.
pub fn encode_request(
    id: u64,
    command: &str,
    args_json: &[u8],
    max_frame: usize,
) -> Result<Vec<u8>, PoolError> {
    let mut out = Vec::with_capacity(args_json.len() + command.len() + 48);
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(b"{\"id\":");
    out.extend_from_slice(itoa::Buffer::new().format(id).as_bytes());
    out.extend_from_slice(b",\"command\":");
    crate::term::write_str(command, &mut out);
    out.extend_from_slice(b",\"args\":");
    out.extend_from_slice(args_json);
    out.push(b'}');
    let len = out.len() - 4;
    if len > max_frame {
        return Err(PoolError::InvalidArgs(format!(
            "the request is {len} bytes, over the pool's max_frame_size of {max_frame} bytes"
        )));
    }
    let len = u32::try_from(len)
        .map_err(|_| PoolError::InvalidArgs(format!("the request is {len} bytes, over 4 GiB")))?;
    out[..4].copy_from_slice(&len.to_be_bytes());
    Ok(out)
}

/// A decoded response frame. A successful result stays JSON text (a zero-copy slice of the
/// frame): it becomes a term only where it is delivered, straight from the text.
#[derive(Debug)]
pub struct Response {
    pub id: u64,
    pub outcome: Result<Bytes, PoolError>,
}

/// The members of a response object that matter, as byte ranges of their values.
#[derive(Default)]
struct Members {
    id: Option<Range<usize>>,
    success: Option<Range<usize>>,
    result: Option<Range<usize>>,
    error: Option<Range<usize>>,
}

/// Reads a response object's members, validating the whole text as JSON (any depth: nesting
/// lives on the heap; the result's depth is checked where it becomes a term, for that request
/// alone). `Ok(None)`: JSON, but not an object.
fn members(body: &[u8]) -> Result<Option<Members>, json::Error> {
    let mut reader = Reader::new(body, usize::MAX);
    let mut m = Members::default();
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        reader.skip_value()?;
        reader.finish()?;
        return Ok(None);
    }
    reader.next_event()?; // `{`
                          // Keys until the closing `}`.
    while let Event::Key(k) = reader.next_event()? {
        let value = reader.skip_value()?;
        match k.as_ref() {
            "id" => m.id = Some(value),
            "success" => m.success = Some(value),
            "result" => m.result = Some(value),
            "error" => m.error = Some(value),
            _ => {}
        }
    }
    reader.finish()?;
    Ok(Some(m))
}

/// Parses a response frame body.
///
/// # Errors
/// [`PoolError::Decode`] for bytes that are not JSON, [`PoolError::Malformed`] for JSON that is
/// not a response (no non-negative integer `id`, no boolean `success`, no `result`/`error`).
pub fn decode_response(body: &Bytes) -> Result<Response, PoolError> {
    let m = match members(body) {
        Ok(Some(m)) => m,
        Ok(None) => return Err(PoolError::Malformed),
        Err(e) => {
            let preview = String::from_utf8_lossy(&body[..body.len().min(80)]).into_owned();
            return Err(PoolError::Decode(format!(
                "invalid JSON from worker ({e}): {preview:?}"
            )));
        }
    };
    let text = |r: &Range<usize>| &body[r.clone()];
    let id =
        m.id.and_then(|r| std::str::from_utf8(text(&r)).ok()?.parse::<u64>().ok())
            .ok_or(PoolError::Malformed)?;
    let outcome = match (m.success.as_ref().map(text), m.result, m.error) {
        (Some(b"true"), Some(result), _) => Ok(body.slice(result)),
        (Some(b"false"), _, Some(err)) => Err(PoolError::Python(error_text(text(&err)))),
        _ => return Err(PoolError::Malformed),
    };
    Ok(Response { id, outcome })
}

/// A worker's error: the string itself, or the JSON text of whatever else it sent.
fn error_text(raw: &[u8]) -> String {
    let mut reader = Reader::new(raw, usize::MAX);
    match reader.next_event() {
        Ok(Event::Str(s)) => s.into_owned(),
        _ => String::from_utf8_lossy(raw).into_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BytesMut;
    use serde_json::Value;

    fn decode(body: &[u8]) -> Result<Response, PoolError> {
        decode_response(&Bytes::copy_from_slice(body))
    }
    use tokio_util::codec::Decoder;

    #[test]
    fn request_frame_has_length_header_and_json_body() {
        let frame = encode_request(7, "ping", br#"{"a":1}"#, DEFAULT_MAX_FRAME).unwrap();
        let len = u32::from_be_bytes(frame[..4].try_into().unwrap()) as usize;
        assert_eq!(len, frame.len() - 4);
        let v: Value = serde_json::from_slice(&frame[4..]).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"id": 7, "command": "ping", "args": {"a": 1}})
        );
    }

    #[test]
    fn request_over_max_frame_is_refused() {
        let err = encode_request(1, "echo", &[b'1'; 100], 64).unwrap_err();
        assert!(matches!(err, PoolError::InvalidArgs(m) if m.contains("max_frame_size")));
    }

    #[test]
    fn responses_decode_to_outcomes() {
        let ok = decode(br#"{"id":3,"success":true,"result":{"x":[1,2]},"t":1}"#).unwrap();
        assert_eq!(ok.id, 3);
        assert_eq!(&ok.outcome.unwrap()[..], br#"{"x":[1,2]}"#);
        let null = decode(br#"{"id":3,"success":true,"result":null}"#).unwrap();
        assert_eq!(&null.outcome.unwrap()[..], b"null");
        let err = decode(br#"{"id":4,"success":false,"error":"boom \"q\""}"#).unwrap();
        assert_eq!(
            err.outcome.unwrap_err(),
            PoolError::Python("boom \"q\"".into())
        );
    }

    #[test]
    fn bad_responses_are_decode_or_malformed_errors() {
        assert!(matches!(decode(b"not json{"), Err(PoolError::Decode(_))));
        assert_eq!(decode(b"[1]").unwrap_err(), PoolError::Malformed);
        let string_id = br#"{"id":"1","success":true,"result":1}"#;
        assert_eq!(decode(string_id).unwrap_err(), PoolError::Malformed);
        assert_eq!(
            decode(br#"{"id":1,"result":1}"#).unwrap_err(),
            PoolError::Malformed
        );
        assert_eq!(
            decode(br#"{"id":1,"success":true}"#).unwrap_err(),
            PoolError::Malformed
        );
    }

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
