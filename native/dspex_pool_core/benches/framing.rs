//! Framing and JSON costs of the worker protocol, without the BEAM and without Python.
//!
//!     cargo bench -p dspex_pool_core --bench framing            # ~20 s
//!     cargo bench -p dspex_pool_core --bench framing -- --quick # ~3 s
//!     cargo bench -p dspex_pool_core --bench framing -- --quick decode_response
//!
//! Arguments other than flags keep only the benchmarks whose name contains one of them (for
//! profiling one, e.g. under `valgrind --tool=callgrind`).
//!
//! Each line is the median over samples of (batch time / batch size), in ns per operation, for
//! a small payload (a ping-sized reply) and 1 MiB payloads (one long string, and ~1 MiB of small
//! objects). `decode_response` parses the envelope and keeps `result` as raw JSON (a slice of the
//! frame) for the term builder. References use serde_json alone: `serde_json::to_vec` of the
//! whole request (what the splice in `encode_request` avoids), `from_slice::<Value>` (a full
//! parse into a tree, what a reply cost before results went straight to terms) and
//! `from_slice::<IgnoredAny>` (a validating scan: the least any decoder of the frame must do).
//!
//! Term conversion (JSON <-> terms) needs a BEAM; `mix dspex_native_pool.bench` measures it
//! through the `json_encode`/`json_decode` NIFs.
//!
//! Output: a markdown table on stdout, and one `BENCH name median_ns min_ns bytes` line per
//! benchmark for tools.

use std::hint::black_box;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use dspex_pool_core::frame::{self as protocol, DEFAULT_MAX_FRAME};
use serde::de::IgnoredAny;
use serde_json::{json, Value};
use tokio_util::codec::Decoder;

/// The executor's frame codec (`dspex_native_pool::protocol::codec`), rebuilt here: this bench
/// lives in the core crate so that it links without the BEAM.
fn codec(max_frame: usize) -> tokio_util::codec::LengthDelimitedCodec {
    tokio_util::codec::LengthDelimitedCodec::builder()
        .length_field_length(4)
        .big_endian()
        .max_frame_length(max_frame)
        .new_codec()
}

struct Bench {
    quick: bool,
    filters: Vec<String>,
    rows: Vec<(String, f64, f64, usize)>,
}

impl Bench {
    /// Times `f` (one operation per call) in batches sized to ~`target` each.
    fn run(&mut self, name: &str, bytes: usize, mut f: impl FnMut()) {
        if !self.filters.is_empty() && !self.filters.iter().any(|p| name.contains(p.as_str())) {
            return;
        }
        if name.contains("1MiB") && bytes < 1_000_000 {
            return; // payloads not built: no filter asked for a 1 MiB benchmark
        }
        let (samples, target) = if self.quick {
            (15, Duration::from_millis(10))
        } else {
            (51, Duration::from_millis(40))
        };
        // Calibrate the batch size on a warm cache.
        let mut batch = 1usize;
        loop {
            let t = Instant::now();
            for _ in 0..batch {
                f();
            }
            let el = t.elapsed();
            if el >= target / 4 || batch >= 1 << 24 {
                let per = el.as_nanos().max(1) as f64 / batch as f64;
                batch = ((target.as_nanos() as f64 / per) as usize).max(1);
                break;
            }
            batch *= 4;
        }
        let mut per_op: Vec<f64> = (0..samples)
            .map(|_| {
                let t = Instant::now();
                for _ in 0..batch {
                    f();
                }
                t.elapsed().as_nanos() as f64 / batch as f64
            })
            .collect();
        per_op.sort_by(f64::total_cmp);
        let median = per_op[per_op.len() / 2];
        let min = per_op[0];
        println!("BENCH {name} {median:.1} {min:.1} {bytes}");
        self.rows.push((name.to_string(), median, min, bytes));
    }

    fn table(&self) {
        println!();
        println!("| benchmark | payload bytes | median ns/op | min ns/op | MB/s (median) |");
        println!("|---|---:|---:|---:|---:|");
        for (name, median, min, bytes) in &self.rows {
            let mbs = if *bytes > 0 {
                format!("{:.0}", *bytes as f64 / median * 1e9 / 1e6)
            } else {
                "–".into()
            };
            println!("| {name} | {bytes} | {median:.0} | {min:.0} | {mbs} |");
        }
    }
}

fn frame_of(body: &[u8]) -> Vec<u8> {
    let mut f = (body.len() as u32).to_be_bytes().to_vec();
    f.extend_from_slice(body);
    f
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let filters = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let mut b = Bench {
        quick,
        filters,
        rows: Vec::new(),
    };

    // ---- payloads ----------------------------------------------------------------------
    let small_args = br#"{"question":"What is the capital of France?","session_id":"s1"}"#.to_vec();
    // Built only when a 1 MiB benchmark runs, so a profile of the small ones stays clean.
    let big = b.filters.is_empty() || b.filters.iter().any(|f| f.contains("1MiB"));
    let big_string = if big {
        "x".repeat(1 << 20)
    } else {
        String::new()
    };
    let big_args = serde_json::to_vec(&json!({ "data": big_string })).unwrap();
    let objects: Vec<Value> = (0..)
        .map(|i| json!({"i": i, "name": format!("item {i}"), "score": 0.5, "tags": ["a", "b"]}))
        .take(if big { 17_500 } else { 0 })
        .collect();
    let big_objects_args = serde_json::to_vec(&json!({ "items": objects })).unwrap();

    let small_reply =
        br#"{"id":12345,"success":true,"result":{"status":"ok","worker_id":"3","pid":41234}}"#
            .to_vec();
    let reply_of = |args: &[u8]| {
        let mut r = br#"{"id":12345,"success":true,"result":"#.to_vec();
        r.extend_from_slice(args);
        r.push(b'}');
        r
    };
    let big_reply = reply_of(&big_args);
    let big_objects_reply = reply_of(&big_objects_args);

    // ---- encode_request ----------------------------------------------------------------
    for (label, args) in [
        ("small", &small_args),
        ("1MiB string", &big_args),
        ("1MiB objects", &big_objects_args),
    ] {
        let mut id = 0u64;
        b.run(&format!("encode_request {label}"), args.len(), || {
            id += 1;
            black_box(
                protocol::encode_request(id, "execute_program", black_box(args), DEFAULT_MAX_FRAME)
                    .unwrap(),
            );
        });
        // The whole request as one Value, built once; only the id changes per operation.
        let mut req = json!({"id": 0, "command": "execute_program"});
        req["args"] = serde_json::from_slice(args).unwrap();
        let mut id = 0u64;
        b.run(
            &format!("ref: serde_json::to_vec request {label}"),
            args.len(),
            || {
                id += 1;
                req["id"] = id.into();
                black_box(serde_json::to_vec(black_box(&req)).unwrap());
            },
        );
    }

    // ---- codec: splitting a read buffer into frames -------------------------------------
    // A read buffer holding `k` frames, as the reader gets them from the pipe; the copy into
    // the buffer is part of every read, so it is counted.
    for (label, body, k) in [
        ("small", &small_reply, 1024usize),
        ("1MiB string", &big_reply, 1),
    ] {
        let one = frame_of(body);
        let mut src = Vec::with_capacity(one.len() * k);
        for _ in 0..k {
            src.extend_from_slice(&one);
        }
        let mut codec = codec(DEFAULT_MAX_FRAME);
        let mut buf = BytesMut::with_capacity(src.len());
        let mut left = 0usize;
        b.run(
            &format!("codec decode (incl. buffer fill) {label}"),
            body.len(),
            || {
                if left == 0 {
                    buf.clear();
                    buf.extend_from_slice(&src);
                    left = k;
                }
                black_box(codec.decode(&mut buf).unwrap().unwrap());
                left -= 1;
            },
        );
    }

    // ---- decode_response ---------------------------------------------------------------
    for (label, body) in [
        ("small", &small_reply),
        ("1MiB string", &big_reply),
        ("1MiB objects", &big_objects_reply),
    ] {
        let frame = bytes::Bytes::from(body.clone());
        b.run(&format!("decode_response {label}"), body.len(), || {
            black_box(protocol::decode_response(black_box(&frame)).unwrap());
        });
        b.run(
            &format!("ref: serde_json::from_slice::<Value> {label}"),
            body.len(),
            || {
                black_box(serde_json::from_slice::<Value>(black_box(body)).unwrap());
            },
        );
        b.run(
            &format!("ref: serde_json::from_slice::<IgnoredAny> {label}"),
            body.len(),
            || {
                black_box(serde_json::from_slice::<IgnoredAny>(black_box(body)).unwrap());
            },
        );
    }

    b.table();
}
