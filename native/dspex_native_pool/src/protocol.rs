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

/// Fuzzing: whatever a worker writes, decoding answers (a frame, a response, an error) and
/// never panics; valid input decodes to what serde_json reads in it.
#[cfg(test)]
mod fuzz {
    use super::*;
    use bytes::BytesMut;
    use proptest::prelude::*;
    use serde_json::Value;
    use tokio_util::codec::Decoder;

    /// JSON values, nested a little (serde_json, the reference, stops at 128 levels).
    fn value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(Value::from),
            any::<String>().prop_map(Value::String),
            prop::collection::vec(
                prop::sample::select(&['"', '\\', '\n', '\u{0}', 'é', '😀', 'a'][..]),
                0..6
            )
            .prop_map(|cs| Value::String(cs.into_iter().collect())),
        ];
        leaf.prop_recursive(8, 64, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::btree_map(any::<String>(), inner, 0..6)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    /// A text changed at a few random places: mostly invalid, sometimes still valid JSON.
    fn mutated(text: String) -> impl Strategy<Value = Vec<u8>> {
        let len = text.len();
        prop::collection::vec((0..=len, any::<u8>(), 0..3u8), 1..4).prop_map(move |edits| {
            let mut bytes = text.clone().into_bytes();
            for (at, byte, op) in edits {
                let at = at.min(bytes.len());
                match op {
                    0 => bytes.insert(at, byte),
                    1 if at < bytes.len() => {
                        bytes.remove(at);
                    }
                    _ if at < bytes.len() => bytes[at] = byte,
                    _ => bytes.push(byte),
                }
            }
            bytes
        })
    }

    fn envelope() -> impl Strategy<Value = String> {
        (any::<u64>(), any::<bool>(), value(), value()).prop_map(|(id, ok, result, extra)| {
            let mut m = serde_json::Map::new();
            m.insert("extra".into(), extra);
            m.insert("id".into(), id.into());
            m.insert("success".into(), ok.into());
            if ok {
                m.insert("result".into(), result);
            } else {
                m.insert("error".into(), result.to_string().into());
            }
            Value::Object(m).to_string()
        })
    }

    /// A response's id and outcome (the result, or the error text).
    type Reading = (u64, Result<Value, String>);

    /// serde_json's verdict on a text: a response, a non-response, or not JSON.
    fn reference(body: &[u8]) -> Result<Option<Reading>, ()> {
        let v: Value = serde_json::from_slice(body).map_err(|_| ())?;
        let response = (|| {
            let id = v.get("id")?.as_u64()?;
            let outcome = match v.get("success")?.as_bool()? {
                true => Ok(v.get("result")?.clone()),
                false => Err(match v.get("error")? {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                }),
            };
            Some((id, outcome))
        })();
        Ok(response)
    }

    fn check_against_reference(body: &[u8]) -> Result<(), TestCaseError> {
        let ours = decode_response(&Bytes::copy_from_slice(body));
        match (reference(body), ours) {
            (Ok(Some((id, outcome))), Ok(r)) => {
                prop_assert_eq!(r.id, id);
                match (outcome, r.outcome) {
                    (Ok(v), Ok(raw)) => {
                        prop_assert_eq!(serde_json::from_slice::<Value>(&raw).unwrap(), v)
                    }
                    (Err(e), Err(PoolError::Python(m))) => prop_assert_eq!(e, m),
                    (a, b) => prop_assert!(false, "{a:?} vs {b:?}"),
                }
            }
            (Ok(None), Err(PoolError::Malformed)) => {}
            (Err(()), Err(PoolError::Decode(_))) => {}
            // serde_json refuses numbers beyond f64 (1e400) while reading; here that is the
            // term builder's business, so such a text is a response or malformed.
            (Err(()), Ok(_) | Err(PoolError::Malformed))
                if serde_json::from_slice::<Value>(body)
                    .unwrap_err()
                    .to_string()
                    .contains("out of range") => {}
            (a, b) => prop_assert!(false, "reference {a:?}, ours {b:?}"),
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig {
            cases: 512,
            failure_persistence: None,
            ..ProptestConfig::default()
        })]

        #[test]
        fn arbitrary_bytes_never_panic(body in prop::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode_response(&Bytes::from(body.clone()));
            let _ = codec(64).decode(&mut BytesMut::from(&body[..]));
        }

        #[test]
        fn valid_responses_decode_as_serde_json_reads_them(text in envelope()) {
            check_against_reference(text.as_bytes())?;
        }

        #[test]
        fn mutated_responses_are_classified_as_serde_json_does(
            body in envelope().prop_flat_map(mutated)
        ) {
            check_against_reference(&body)?;
        }

        #[test]
        fn arbitrary_values_are_classified_as_serde_json_does(
            body in value().prop_map(|v| v.to_string()).prop_flat_map(mutated)
        ) {
            check_against_reference(&body)?;
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
