//! Erlang term <-> JSON, by hand.
//!
//! `rustler::serde` cannot express what DSPex users pass (atom keys, integers beyond 64 bits,
//! tuples), so terms are written straight to JSON bytes, and replies are parsed by serde_json
//! straight into terms, with no intermediate `serde_json::Value`.
//!
//! Mapping, term -> JSON: `nil`/`true`/`false` -> literals; other atoms and UTF-8 binaries ->
//! strings; integers of any size -> numbers; floats -> numbers; lists and tuples -> arrays;
//! maps with atom, binary or integer keys -> objects. Pids, references, functions, ports,
//! non-UTF-8 binaries, improper lists, structs and other map keys are refused with a message
//! naming where in the term they sit. JSON -> term: objects become maps with binary keys (as
//! `Jason.decode/1` gives), `null` becomes `nil`, integers beyond 64 bits become floats.

use std::fmt;

use rustler::{BigInt, Encoder, Env, Term, TermType};
use serde::de::{DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};

/// Deeper terms are refused rather than risk the stack of a scheduler thread.
const MAX_DEPTH: usize = 256;

/// Why a term has no JSON form, or that it is larger than the caller's budget.
#[derive(Debug, PartialEq)]
pub enum EncodeError {
    /// The message names the offending part's path (`args.messages[2].role`).
    Invalid(String),
    /// The JSON outgrew the budget: encode again where blocking does not matter.
    OverBudget,
}

/// Where in the term an error sits; built only while an error unwinds.
enum Seg {
    Key(String),
    Index(usize),
}

struct Refusal {
    path: Vec<Seg>,
    what: String,
}

enum Fail {
    Refused(Refusal),
    OverBudget,
}

impl Fail {
    fn at(self, seg: impl FnOnce() -> Seg) -> Fail {
        match self {
            Fail::Refused(mut r) => {
                r.path.push(seg());
                Fail::Refused(r)
            }
            other => other,
        }
    }
}

fn refuse(what: impl Into<String>) -> Fail {
    Fail::Refused(Refusal {
        path: Vec::new(),
        what: what.into(),
    })
}

/// Appends the JSON text of `term` to `out`, giving up with [`EncodeError::OverBudget`] once
/// `out` is longer than `budget` bytes (so a NIF on a normal scheduler stays short).
///
/// # Errors
/// [`EncodeError::Invalid`] names the first part of the term that has no JSON form.
pub fn write_json(term: Term, out: &mut Vec<u8>, budget: usize) -> Result<(), EncodeError> {
    write_value(term, out, budget, 0).map_err(|fail| match fail {
        Fail::OverBudget => EncodeError::OverBudget,
        Fail::Refused(r) => {
            let mut path = String::from("args");
            for seg in r.path.iter().rev() {
                match seg {
                    Seg::Key(k) => {
                        path.push('.');
                        path.push_str(k);
                    }
                    Seg::Index(i) => path.push_str(&format!("[{i}]")),
                }
            }
            EncodeError::Invalid(format!("{path} {}", r.what))
        }
    })
}

fn write_value(term: Term, out: &mut Vec<u8>, budget: usize, depth: usize) -> Result<(), Fail> {
    if depth > MAX_DEPTH {
        return Err(refuse(format!("is nested deeper than {MAX_DEPTH} levels")));
    }
    if out.len() > budget {
        return Err(Fail::OverBudget);
    }
    match term.get_type() {
        TermType::Atom => {
            let name = term
                .atom_to_string()
                .map_err(|_| refuse("is an unreadable atom"))?;
            match name.as_str() {
                "nil" => out.extend_from_slice(b"null"),
                "true" => out.extend_from_slice(b"true"),
                "false" => out.extend_from_slice(b"false"),
                other => write_str(other, out),
            }
        }
        TermType::Binary => {
            let bin = rustler::Binary::from_term(term).map_err(|_| refuse("is a bitstring"))?;
            match std::str::from_utf8(bin.as_slice()) {
                Ok(s) => write_str(s, out),
                Err(e) => {
                    return Err(refuse(format!(
                        "is a binary that is not valid UTF-8 (invalid byte at offset {}); \
                         JSON strings must be UTF-8: Base64-encode raw bytes",
                        e.valid_up_to()
                    )))
                }
            }
        }
        TermType::Integer => {
            if let Ok(i) = term.decode::<i64>() {
                out.extend_from_slice(itoa::Buffer::new().format(i).as_bytes());
            } else if let Ok(u) = term.decode::<u64>() {
                out.extend_from_slice(itoa::Buffer::new().format(u).as_bytes());
            } else {
                let big: BigInt = term
                    .decode()
                    .map_err(|_| refuse("is an unreadable integer"))?;
                out.extend_from_slice(big.to_string().as_bytes());
            }
        }
        TermType::Float => {
            let f: f64 = term
                .decode()
                .map_err(|_| refuse("is an unreadable float"))?;
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
                        write_value(head, out, budget, depth + 1)
                            .map_err(|f| f.at(|| Seg::Index(i)))?;
                        tail = rest;
                        i += 1;
                    }
                    Err(_) if tail.is_empty_list() => break,
                    Err(_) => return Err(refuse("is an improper list")),
                }
            }
            out.push(b']');
        }
        TermType::Tuple => {
            let elems =
                rustler::types::tuple::get_tuple(term).map_err(|_| refuse("is a bad tuple"))?;
            out.push(b'[');
            for (i, e) in elems.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_value(e, out, budget, depth + 1).map_err(|f| f.at(|| Seg::Index(i)))?;
            }
            out.push(b']');
        }
        TermType::Map => write_map(term, out, budget, depth)?,
        TermType::Pid => return Err(refuse("is a pid, which has no JSON form")),
        TermType::Ref => return Err(refuse("is a reference, which has no JSON form")),
        TermType::Fun => return Err(refuse("is a function, which has no JSON form")),
        TermType::Port => return Err(refuse("is a port, which has no JSON form")),
        TermType::Unknown => return Err(refuse("is a term with no JSON form")),
    }
    Ok(())
}

fn write_map(term: Term, out: &mut Vec<u8>, budget: usize, depth: usize) -> Result<(), Fail> {
    let iter = rustler::types::map::MapIterator::new(term).ok_or_else(|| refuse("is a bad map"))?;
    out.push(b'{');
    let mut first = true;
    for (k, v) in iter {
        if !first {
            out.push(b',');
        }
        first = false;
        match k.get_type() {
            TermType::Atom => {
                let name = k
                    .atom_to_string()
                    .map_err(|_| refuse("has an unreadable atom key"))?;
                if name == "__struct__" {
                    let module = v.atom_to_string().unwrap_or_default();
                    return Err(refuse(format!(
                        "is a struct ({}); convert it to a plain map first",
                        module.trim_start_matches("Elixir.")
                    )));
                }
                write_str(&name, out);
            }
            TermType::Binary => match rustler::Binary::from_term(k)
                .ok()
                .and_then(|b| std::str::from_utf8(b.as_slice()).ok())
            {
                Some(s) => write_str(s, out),
                None => return Err(refuse("has a map key that is not valid UTF-8")),
            },
            TermType::Integer => {
                out.push(b'"');
                write_value(k, out, budget, depth + 1)?;
                out.push(b'"');
            }
            _ => {
                return Err(refuse(
                    "has a map key that is not an atom, string or integer, \
                     which a JSON object cannot hold",
                ))
            }
        }
        out.push(b':');
        write_value(v, out, budget, depth + 1).map_err(|f| f.at(|| Seg::Key(key_text(k))))?;
    }
    out.push(b'}');
    Ok(())
}

/// A map key as the error path shows it; only called while an error unwinds.
fn key_text(k: Term) -> String {
    k.atom_to_string()
        .or_else(|_| k.decode::<String>())
        .or_else(|_| k.decode::<BigInt>().map(|i| i.to_string()))
        .unwrap_or_else(|_| "?".into())
}

/// Writes `s` as a JSON string literal.
pub fn write_str(s: &str, out: &mut Vec<u8>) {
    // serde_json's escaping is exact and fast; writing to a Vec cannot fail.
    serde_json::to_writer(&mut *out, s).expect("writing to a Vec cannot fail");
}

/// Parses JSON text straight into a term.
///
/// # Errors
/// serde_json's description of the first syntax error.
pub fn json_to_term<'a>(env: Env<'a>, json: &[u8]) -> Result<Term<'a>, serde_json::Error> {
    let mut de = serde_json::Deserializer::from_slice(json);
    let term = TermSeed { env }.deserialize(&mut de)?;
    de.end()?;
    Ok(term)
}

#[derive(Clone, Copy)]
struct TermSeed<'a> {
    env: Env<'a>,
}

impl<'de, 'a> DeserializeSeed<'de> for TermSeed<'a> {
    type Value = Term<'a>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Term<'a>, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de, 'a> Visitor<'de> for TermSeed<'a> {
    type Value = Term<'a>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_unit<E: serde::de::Error>(self) -> Result<Term<'a>, E> {
        Ok(rustler::types::atom::nil().encode(self.env))
    }

    fn visit_none<E: serde::de::Error>(self) -> Result<Term<'a>, E> {
        self.visit_unit()
    }

    fn visit_bool<E>(self, v: bool) -> Result<Term<'a>, E> {
        Ok(v.encode(self.env))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Term<'a>, E> {
        Ok(v.encode(self.env))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Term<'a>, E> {
        Ok(v.encode(self.env))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Term<'a>, E> {
        // serde_json turns integers beyond 64 bits into floats; beyond f64's range, nothing fits.
        Ok(if v.is_finite() {
            v.encode(self.env)
        } else {
            rustler::types::atom::nil().encode(self.env)
        })
    }

    fn visit_str<E>(self, v: &str) -> Result<Term<'a>, E> {
        Ok(v.encode(self.env))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Term<'a>, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0));
        while let Some(t) = seq.next_element_seed(self)? {
            items.push(t);
        }
        Ok(items.encode(self.env))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Term<'a>, A::Error> {
        let mut keys = Vec::with_capacity(map.size_hint().unwrap_or(0));
        let mut values = Vec::with_capacity(keys.capacity());
        while let Some(k) = map.next_key_seed(self)? {
            keys.push(k);
            values.push(map.next_value_seed(self)?);
        }
        match Term::map_from_term_arrays(self.env, &keys, &values) {
            Ok(m) => Ok(m),
            // Duplicate keys are legal JSON: the last one wins, as in Jason.
            Err(_) => Ok(keys
                .into_iter()
                .zip(values)
                .fold(Term::map_new(self.env), |m, (k, v)| {
                    m.map_put(k, v).unwrap_or(m)
                })),
        }
    }
}
