//! Erlang term <-> JSON, by hand.
//!
//! `rustler::serde` cannot express what DSPex users pass (atom keys, integers beyond 64 bits,
//! tuples), so terms are written straight to JSON bytes, and replies are parsed with serde_json
//! (`arbitrary_precision`, so big integers survive) and rebuilt as terms.
//!
//! Mapping, term -> JSON: `nil`/`true`/`false` -> literals; other atoms and UTF-8 binaries ->
//! strings; integers of any size -> numbers; floats -> numbers; lists and tuples -> arrays;
//! maps with atom, binary or integer keys -> objects. Pids, references, functions, ports,
//! non-UTF-8 binaries, improper lists, structs and other map keys are refused with a message
//! naming where in the term they sit. JSON -> term: objects become maps with binary keys (as
//! `Jason.decode/1` gives), `null` becomes `nil`.

use rustler::BigInt;
use rustler::{Encoder, Env, Term, TermType};
use serde_json::Value;

/// Deeper terms are refused rather than risk the stack of a scheduler thread.
const MAX_DEPTH: usize = 256;

/// Appends the JSON text of `term` to `out`.
///
/// # Errors
/// A description of the first part of the term that has no JSON form, with its path
/// (`args.messages[2].role`).
pub fn write_json(term: Term, out: &mut Vec<u8>) -> Result<(), String> {
    let mut path = Vec::new();
    write_value(term, out, &mut path)
}

#[derive(Clone)]
enum Seg {
    Key(String),
    Index(usize),
}

fn render_path(path: &[Seg]) -> String {
    let mut s = String::from("args");
    for seg in path {
        match seg {
            Seg::Key(k) => {
                s.push('.');
                s.push_str(k);
            }
            Seg::Index(i) => {
                s.push('[');
                s.push_str(&i.to_string());
                s.push(']');
            }
        }
    }
    s
}

fn refuse(path: &[Seg], what: &str) -> Result<(), String> {
    Err(format!("{} {what}", render_path(path)))
}

fn write_value(term: Term, out: &mut Vec<u8>, path: &mut Vec<Seg>) -> Result<(), String> {
    if path.len() > MAX_DEPTH {
        return refuse(path, &format!("is nested deeper than {MAX_DEPTH} levels"));
    }
    match term.get_type() {
        TermType::Atom => {
            let name = term.atom_to_string().map_err(|_| "atom".to_string())?;
            match name.as_str() {
                "nil" => out.extend_from_slice(b"null"),
                "true" => out.extend_from_slice(b"true"),
                "false" => out.extend_from_slice(b"false"),
                other => write_str(other, out),
            }
        }
        TermType::Binary => {
            let bin = rustler::Binary::from_term(term).map_err(|_| "binary".to_string())?;
            match std::str::from_utf8(bin.as_slice()) {
                Ok(s) => write_str(s, out),
                Err(e) => {
                    return refuse(
                        path,
                        &format!(
                            "is a binary that is not valid UTF-8 (invalid byte at offset {}); \
                             JSON strings must be UTF-8: Base64-encode raw bytes",
                            e.valid_up_to()
                        ),
                    )
                }
            }
        }
        TermType::Integer => {
            if let Ok(i) = term.decode::<i64>() {
                out.extend_from_slice(itoa::Buffer::new().format(i).as_bytes());
            } else if let Ok(u) = term.decode::<u64>() {
                out.extend_from_slice(itoa::Buffer::new().format(u).as_bytes());
            } else {
                let big: BigInt = term.decode().map_err(|_| "integer".to_string())?;
                out.extend_from_slice(big.to_string().as_bytes());
            }
        }
        TermType::Float => {
            let f: f64 = term.decode().map_err(|_| "float".to_string())?;
            if !f.is_finite() {
                return refuse(path, "is a non-finite float, which JSON cannot express");
            }
            out.extend_from_slice(ryu::Buffer::new().format_finite(f).as_bytes());
        }
        TermType::List => {
            out.push(b'[');
            let mut tail = term;
            let mut i = 0;
            loop {
                match tail.list_get_cell() {
                    Ok((head, rest)) => {
                        if i > 0 {
                            out.push(b',');
                        }
                        path.push(Seg::Index(i));
                        write_value(head, out, path)?;
                        path.pop();
                        tail = rest;
                        i += 1;
                    }
                    Err(_) if tail.is_empty_list() => break,
                    Err(_) => return refuse(path, "is an improper list"),
                }
            }
            out.push(b']');
        }
        TermType::Tuple => {
            let elems = rustler::types::tuple::get_tuple(term).map_err(|_| "tuple".to_string())?;
            out.push(b'[');
            for (i, e) in elems.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                path.push(Seg::Index(i));
                write_value(e, out, path)?;
                path.pop();
            }
            out.push(b']');
        }
        TermType::Map => write_map(term, out, path)?,
        TermType::Pid => return refuse(path, "is a pid, which has no JSON form"),
        TermType::Ref => return refuse(path, "is a reference, which has no JSON form"),
        TermType::Fun => return refuse(path, "is a function, which has no JSON form"),
        TermType::Port => return refuse(path, "is a port, which has no JSON form"),
        TermType::Unknown => return refuse(path, "is a term with no JSON form"),
    }
    Ok(())
}

fn write_map(term: Term, out: &mut Vec<u8>, path: &mut Vec<Seg>) -> Result<(), String> {
    let iter = rustler::types::map::MapIterator::new(term).ok_or("map")?;
    out.push(b'{');
    let mut first = true;
    for (k, v) in iter {
        let key = match k.get_type() {
            TermType::Atom => {
                let name = k.atom_to_string().map_err(|_| "atom".to_string())?;
                if name == "__struct__" {
                    let module = v.atom_to_string().unwrap_or_default();
                    return refuse(
                        path,
                        &format!(
                            "is a struct ({}); convert it to a plain map first",
                            module.trim_start_matches("Elixir.")
                        ),
                    );
                }
                name
            }
            TermType::Binary => match k.decode::<String>() {
                Ok(s) => s,
                Err(_) => return refuse(path, "has a map key that is not valid UTF-8"),
            },
            TermType::Integer => match k.decode::<i64>() {
                Ok(i) => i.to_string(),
                Err(_) => k.decode::<BigInt>().map_err(|_| "key")?.to_string(),
            },
            _ => {
                return refuse(
                    path,
                    "has a map key that is not an atom, string or integer, \
                     which a JSON object cannot hold",
                )
            }
        };
        if !first {
            out.push(b',');
        }
        first = false;
        write_str(&key, out);
        out.push(b':');
        path.push(Seg::Key(key));
        write_value(v, out, path)?;
        path.pop();
    }
    out.push(b'}');
    Ok(())
}

/// Writes `s` as a JSON string literal.
pub fn write_str(s: &str, out: &mut Vec<u8>) {
    // serde_json's escaping is exact and fast; writing to a Vec cannot fail.
    serde_json::to_writer(&mut *out, s).expect("writing to a Vec cannot fail");
}

/// Builds the term for a parsed JSON value.
pub fn to_term<'a>(env: Env<'a>, value: &Value) -> Term<'a> {
    match value {
        Value::Null => rustler::types::atom::nil().encode(env),
        Value::Bool(b) => b.encode(env),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                i.encode(env)
            } else if let Some(u) = n.as_u64() {
                u.encode(env)
            } else {
                let text = n.to_string();
                let integral = !text.contains(['.', 'e', 'E']);
                match (integral, text.parse::<BigInt>()) {
                    (true, Ok(big)) => big.encode(env),
                    // Beyond f64's range (1e400): no Erlang float can hold it.
                    _ => match n.as_f64().filter(|f| f.is_finite()) {
                        Some(f) => f.encode(env),
                        None => rustler::types::atom::nil().encode(env),
                    },
                }
            }
        }
        Value::String(s) => s.as_str().encode(env),
        Value::Array(items) => {
            let terms: Vec<Term<'a>> = items.iter().map(|v| to_term(env, v)).collect();
            terms.encode(env)
        }
        Value::Object(map) => {
            let mut keys = Vec::with_capacity(map.len());
            let mut values = Vec::with_capacity(map.len());
            for (k, v) in map {
                keys.push(k.as_str().encode(env));
                values.push(to_term(env, v));
            }
            // serde_json's map has unique keys, so this cannot fail.
            Term::map_from_arrays(env, &keys, &values).expect("JSON object keys are unique")
        }
    }
}
