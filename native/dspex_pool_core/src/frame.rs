//! Frames of the worker protocol: encoding requests, decoding responses (no I/O).
//!
//! Each frame is a 4-byte big-endian length and that many bytes of UTF-8 JSON. Requests are
//! `{"id": int, "command": str, "args": object}`; responses are
//! `{"id": int, "success": true, "result": any}` or `{"id": int, "success": false, "error": str}`.
//! Splitting a byte stream into frames is the executor's (a length-delimited codec).

use bytes::Bytes;
use serde::de::IgnoredAny;
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::error::PoolError;

/// Default bound on a frame in either direction.
pub const DEFAULT_MAX_FRAME: usize = 64 * 1024 * 1024;

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
    serde_json::to_writer(&mut out, command).expect("a string serialises");
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
    /// An intermediate frame of protocol v2 (`{"id": N, "event": ...}`): `outcome` is then
    /// `Ok` with the whole frame's JSON text, and more frames follow for `id`.
    pub event: bool,
}

#[derive(Deserialize)]
struct Wire<'a> {
    id: Option<u64>,
    success: Option<bool>,
    #[serde(borrow, default, deserialize_with = "present")]
    result: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    error: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    event: Option<&'a RawValue>,
}

/// `Some` whenever the key is present, `null` included (plain `Option` would read `null` as
/// absent, and `"result": null` is a valid reply).
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue>::deserialize(d).map(Some)
}

/// Parses a response frame body.
///
/// # Errors
/// [`PoolError::Decode`] for bytes that are not JSON, [`PoolError::Malformed`] for JSON that is
/// not a response (no integer `id`, no boolean `success`, no `result`/`error`).
pub fn decode_response(body: &Bytes) -> Result<Response, PoolError> {
    let wire: Wire = match serde_json::from_slice(body) {
        Ok(w) => w,
        Err(e) => {
            return Err(if serde_json::from_slice::<IgnoredAny>(body).is_ok() {
                PoolError::Malformed
            } else {
                let preview = String::from_utf8_lossy(&body[..body.len().min(80)]).into_owned();
                PoolError::Decode(format!("invalid JSON from worker ({e}): {preview:?}"))
            })
        }
    };
    let id = wire.id.ok_or(PoolError::Malformed)?;
    if wire.event.is_some() && wire.success.is_none() {
        return Ok(Response {
            id,
            outcome: Ok(body.clone()),
            event: true,
        });
    }
    let outcome = match (wire.success, wire.result, wire.error) {
        (Some(true), Some(raw), _) => {
            let start = raw.get().as_ptr() as usize - body.as_ptr() as usize;
            Ok(body.slice(start..start + raw.get().len()))
        }
        (Some(false), _, Some(err)) => Err(PoolError::Python(
            serde_json::from_str::<String>(err.get()).unwrap_or_else(|_| err.get().to_owned()),
        )),
        _ => return Err(PoolError::Malformed),
    };
    Ok(Response {
        id,
        outcome,
        event: false,
    })
}

/// The arguments of the start-up ping: asks for protocol v2.
pub fn handshake_args(max_frame: usize) -> Vec<u8> {
    format!(r#"{{"handshake":true,"protocol":2,"max_frame_size":{max_frame}}}"#).into_bytes()
}

/// What a worker announced in its handshake reply: `Some(concurrency)` for protocol v2
/// (at least 1), `None` for a one-at-a-time worker.
pub fn announced_concurrency(result: &[u8]) -> Option<u32> {
    #[derive(Deserialize)]
    struct Hello {
        protocol: Option<serde_json::Value>,
        concurrency: Option<serde_json::Value>,
    }
    let hello: Hello = serde_json::from_slice(result).ok()?;
    if hello.protocol.and_then(|p| p.as_u64()) != Some(2) {
        return None;
    }
    let n = hello.concurrency.and_then(|c| c.as_u64()).unwrap_or(1);
    Some(n.clamp(1, u32::MAX as u64) as u32)
}

/// A control frame (header included) for request `id`: `body` is a JSON object, written with
/// `"id": id` first.
///
/// # Errors
/// [`PoolError::InvalidArgs`] when `body` is not a JSON object or exceeds `max_frame`.
pub fn encode_control(id: u64, body: &[u8], max_frame: usize) -> Result<Vec<u8>, PoolError> {
    let not_object = || PoolError::InvalidArgs("a control frame must be a JSON object".into());
    let map: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(body).map_err(|_| not_object())?;
    if map.contains_key("id") {
        return Err(PoolError::InvalidArgs(
            "a control frame's id is the pool's to set".into(),
        ));
    }
    let mut out = Vec::with_capacity(body.len() + 32);
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(b"{\"id\":");
    out.extend_from_slice(itoa::Buffer::new().format(id).as_bytes());
    for (k, v) in &map {
        out.push(b',');
        serde_json::to_writer(&mut out, k).expect("a string serialises");
        out.push(b':');
        serde_json::to_writer(&mut out, v).expect("a value serialises");
    }
    out.push(b'}');
    let len = out.len() - 4;
    if len > max_frame {
        return Err(PoolError::InvalidArgs(format!(
            "the control frame is {len} bytes, over the pool's max_frame_size of {max_frame} bytes"
        )));
    }
    out[..4].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(out)
}

/// A cancel control frame for request `id`.
pub fn encode_cancel(id: u64) -> Vec<u8> {
    encode_control(id, br#"{"control":"cancel"}"#, usize::MAX).expect("a valid control")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn decode(body: &[u8]) -> Result<Response, PoolError> {
        decode_response(&Bytes::copy_from_slice(body))
    }

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
    fn events_handshakes_and_controls() {
        let ev = decode(br#"{"id":5,"event":"chunk","field":"a","text":"x"}"#).unwrap();
        assert!(ev.event);
        assert_eq!(ev.id, 5);
        assert_eq!(
            &ev.outcome.unwrap()[..],
            br#"{"id":5,"event":"chunk","field":"a","text":"x"}"#
        );
        assert!(
            !decode(br#"{"id":5,"success":true,"result":1}"#)
                .unwrap()
                .event
        );
        // `id: null` (a request the bridge could not parse) is not a response of any request.
        assert_eq!(
            decode(br#"{"id":null,"success":false,"error":"bad"}"#).unwrap_err(),
            PoolError::Malformed
        );
        assert_eq!(
            announced_concurrency(br#"{"status":"ok","protocol":2,"concurrency":64}"#),
            Some(64)
        );
        assert_eq!(announced_concurrency(br#"{"status":"ok"}"#), None);
        assert_eq!(
            announced_concurrency(br#"{"protocol":3,"concurrency":9}"#),
            None
        );
        assert_eq!(announced_concurrency(b"\"pong\""), None);
        let args: Value = serde_json::from_slice(&handshake_args(1024)).unwrap();
        assert_eq!(
            args,
            serde_json::json!({"handshake": true, "protocol": 2, "max_frame_size": 1024})
        );
        let cancel = encode_cancel(9);
        assert_eq!(&cancel[4..], br#"{"id":9,"control":"cancel"}"#);
        let tool = encode_control(
            3,
            br#"{"control":"tool_result","call_id":1,"ok":true}"#,
            1024,
        )
        .unwrap();
        let v: Value = serde_json::from_slice(&tool[4..]).unwrap();
        assert_eq!(v["id"], 3);
        assert_eq!(v["call_id"], 1);
        assert!(encode_control(3, b"[1]", 1024).is_err());
        assert!(encode_control(3, br#"{"id":4}"#, 1024).is_err());
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
}
