//! Erlang term <-> JSON, by hand, with no recursion.
//!
//! `rustler::serde` cannot express what DSPex users pass (atom keys, tuples), so terms are
//! written straight to JSON bytes, and replies are read by [`dspex_pool_core::json::Reader`] straight into
//! terms, with no intermediate `serde_json::Value`. Both directions keep their nesting on a heap
//! stack, not the thread's: a dirty scheduler has ~320 KiB of stack, and a term's shape is the
//! caller's to choose.
//!
//! Mapping, term -> JSON: `nil`/`true`/`false` -> literals; other atoms (any Unicode) and UTF-8
//! binaries -> strings; integers in [`INT_MIN`]`..=`[`INT_MAX`] -> numbers; floats -> numbers;
//! lists and tuples -> arrays; maps with atom, binary or integer keys -> objects. Refused, with
//! a message naming where in the term they sit: pids, references, functions, ports, non-UTF-8
//! binaries, improper lists, integers outside 64 bits, maps whose keys collide once written
//! (`%{:a => 1, "a" => 2}`), other map keys, and nesting deeper than [`MAX_DEPTH`]. Structs are
//! reported apart ([`EncodeError::Struct`]) so the Elixir side can convert them and try again.
//!
//! JSON -> term: objects become maps with binary keys (as `Jason.decode/1` gives; a repeated
//! key keeps its last value), `null` becomes `nil`, integers outside 64 bits become floats (as
//! Python's orjson reads them), numbers beyond a float's range and nesting deeper than
//! [`MAX_DEPTH`] are decode errors.

use std::collections::HashMap;
use std::fmt::Write as _;

use rustler::types::map::MapIterator;
use rustler::{Encoder, Env, Term, TermType};

use dspex_pool_core::json::{Event, Reader};

/// Most levels of nested lists, tuples and maps (or arrays and objects) in either direction,
/// the arguments or the result counting as the first. The Python bridge's orjson writes at most
/// 254 levels, the reply's envelope included, so a worker can echo anything this accepts.
pub const MAX_DEPTH: usize = 250;

/// The smallest integer sent: what orjson, the bridge's parser, reads exactly (beyond 64 bits
/// it reads a lossy float, and beyond a float's range nothing at all).
pub const INT_MIN: i64 = i64::MIN;
/// The largest integer sent (see [`INT_MIN`]).
pub const INT_MAX: u64 = u64::MAX;

/// Why a term has no JSON form, or that it is larger than the caller's budget.
#[derive(Debug, PartialEq)]
pub enum EncodeError {
    /// The message names the offending part's path (`args.messages[2].role`).
    Invalid(String),
    /// The term holds a struct (the message says where and which): convert it and try again.
    Struct(String),
    /// The JSON would outgrow the budget: encode again where blocking does not matter, or not
    /// at all. Sizes are counted before copying, so one large binary costs nothing here.
    OverBudget,
}

/// A container being written, and where in it the writer is.
// Frames live in one `Vec` for the whole term: boxing the map iterator would cost an allocation
// per map and save nothing.
#[allow(clippy::large_enum_variant)]
enum Frame<'a> {
    List {
        tail: Term<'a>,
        index: usize,
    },
    Tuple {
        /// The tuple's elements, in place (no copy: a tuple of millions of elements must not
        /// cost a normal scheduler anything before the budget is checked).
        elems: &'a [rustler::sys::ErlNifTerm],
        index: usize,
    },
    Map {
        map: Term<'a>,
        iter: MapIterator<'a>,
        /// The key whose value is being written (`None` while the key itself is).
        key: Option<Term<'a>>,
        count: usize,
        /// Which kinds of key the map has: atoms, binaries, integers (one bit each). Keys of
        /// one kind cannot collide in JSON; a mixed map is checked when it closes.
        kinds: u8,
        /// Where this map's keys start in the list of written keys.
        keys_from: usize,
    },
}

enum Fail {
    /// `what` is about the current element; `container`: about the innermost open container.
    Refused {
        what: String,
        container: bool,
    },
    /// `container`: the struct is the innermost open container (else the current element).
    Struct {
        module: String,
        container: bool,
    },
    OverBudget,
}

/// About the current element.
fn refusal(what: impl Into<String>) -> Fail {
    Fail::Refused {
        what: what.into(),
        container: false,
    }
}

/// About the innermost open container.
fn container_refusal(what: impl Into<String>) -> Fail {
    Fail::Refused {
        what: what.into(),
        container: true,
    }
}

fn refuse<T>(what: impl Into<String>) -> Result<T, Fail> {
    Err(refusal(what))
}

fn refuse_container<T>(what: impl Into<String>) -> Result<T, Fail> {
    Err(container_refusal(what))
}

/// Appends the JSON text of `term` to `out`, giving up with [`EncodeError::OverBudget`] before
/// `out` would grow past `budget` bytes (so a NIF on a normal scheduler stays short, and a
/// request over the frame limit is refused before it is built).
///
/// # Errors
/// [`EncodeError::Invalid`] names the first part of the term that has no JSON form;
/// [`EncodeError::Struct`] the first struct.
pub fn write_json(term: Term, out: &mut Vec<u8>, budget: usize) -> Result<(), EncodeError> {
    let mut stack: Vec<Frame> = Vec::new();
    // The byte range in `out` of each key of the open maps, for their collision check.
    let mut keys: Vec<(usize, usize)> = Vec::new();
    let mut next = Some(term);
    loop {
        let step = match next.take() {
            Some(t) => write_value(t, out, budget, &mut stack, keys.len()).map(|()| None),
            None => match stack.last_mut() {
                None => return Ok(()),
                Some(top) => advance(term.get_env(), top, out, budget, &mut keys).inspect(|n| {
                    if n.is_none() {
                        stack.pop();
                    }
                }),
            },
        };
        match step {
            Ok(n) => next = n,
            Err(Fail::OverBudget) => return Err(EncodeError::OverBudget),
            Err(Fail::Struct { module, container }) => {
                return Err(EncodeError::Struct(format!(
                    "{} is a struct ({module}): DSPex.NativePool.Structs.convert/1 writes \
                     structs, the NIF does not",
                    path(&stack, container)
                )))
            }
            Err(Fail::Refused { what, container }) => {
                return Err(EncodeError::Invalid(format!(
                    "{} {what}",
                    path(&stack, container)
                )))
            }
        }
    }
}

/// Writes a scalar, or opens a container (pushing its frame for [`advance`]).
fn write_value<'a>(
    term: Term<'a>,
    out: &mut Vec<u8>,
    budget: usize,
    stack: &mut Vec<Frame<'a>>,
    keys_len: usize,
) -> Result<(), Fail> {
    if out.len() >= budget {
        return Err(Fail::OverBudget);
    }
    let open = |stack: &Vec<Frame<'a>>| {
        if stack.len() >= MAX_DEPTH {
            refuse(format!("is nested deeper than {MAX_DEPTH} levels"))
        } else {
            Ok(())
        }
    };
    match term.get_type() {
        TermType::Atom => {
            let literal = term.decode::<rustler::Atom>().ok().and_then(|a| {
                use rustler::types::atom::{false_, nil, true_};
                [(nil(), "null"), (true_(), "true"), (false_(), "false")]
                    .into_iter()
                    .find(|(l, _)| *l == a)
            });
            match literal {
                Some((_, text)) => out.extend_from_slice(text.as_bytes()),
                None => with_atom_name(term, |name| write_str(name, out))?,
            }
        }
        TermType::Binary => write_binary(term, out, budget)?,
        TermType::Integer => write_int(term, out)?,
        TermType::Float => {
            let f: f64 = term
                .decode()
                .map_err(|_| refusal("is an unreadable float"))?;
            out.extend_from_slice(ryu::Buffer::new().format_finite(f).as_bytes());
        }
        TermType::List => {
            open(stack)?;
            out.push(b'[');
            stack.push(Frame::List {
                tail: term,
                index: 0,
            });
        }
        TermType::Tuple => {
            open(stack)?;
            let elems = tuple_elements(term).ok_or_else(|| refusal("is a bad tuple"))?;
            out.push(b'[');
            stack.push(Frame::Tuple { elems, index: 0 });
        }
        TermType::Map => {
            // A struct is a value once converted (a DateTime's string): at the depth limit it
            // is reported as a struct, as anywhere else, not refused as too deep.
            if stack.len() >= MAX_DEPTH {
                if let Some(module) = struct_module(term) {
                    return Err(Fail::Struct {
                        module,
                        container: false,
                    });
                }
            }
            open(stack)?;
            let iter = MapIterator::new(term).ok_or_else(|| refusal("is a bad map"))?;
            out.push(b'{');
            stack.push(Frame::Map {
                map: term,
                iter,
                key: None,
                count: 0,
                kinds: 0,
                keys_from: keys_len,
            });
        }
        TermType::Pid => return refuse("is a pid, which has no JSON form"),
        TermType::Ref => return refuse("is a reference, which has no JSON form"),
        TermType::Fun => return refuse("is a function, which has no JSON form"),
        TermType::Port => return refuse("is a port, which has no JSON form"),
        TermType::Unknown => return refuse("is a term with no JSON form"),
    }
    Ok(())
}

/// Moves to the top container's next element: `Some(term)` to write next, or `None` when the
/// container is closed (the caller pops it).
fn advance<'a>(
    env: Env<'a>,
    top: &mut Frame<'a>,
    out: &mut Vec<u8>,
    budget: usize,
    keys: &mut Vec<(usize, usize)>,
) -> Result<Option<Term<'a>>, Fail> {
    match top {
        Frame::List { tail, index } => match tail.list_get_cell() {
            Ok((head, rest)) => {
                if *index > 0 {
                    out.push(b',');
                }
                *tail = rest;
                *index += 1;
                Ok(Some(head))
            }
            Err(_) if tail.is_empty_list() => {
                out.push(b']');
                Ok(None)
            }
            Err(_) => refuse_container("is an improper list"),
        },
        Frame::Tuple { elems, index } => match elems.get(*index) {
            Some(&e) => {
                if *index > 0 {
                    out.push(b',');
                }
                *index += 1;
                // SAFETY: an element of a tuple that lives as long as the env does.
                Ok(Some(unsafe { Term::new(env, e) }))
            }
            None => {
                out.push(b']');
                Ok(None)
            }
        },
        Frame::Map {
            map,
            iter,
            key,
            count,
            kinds,
            keys_from,
        } => match iter.next() {
            Some((k, v)) => {
                *key = None;
                if *count > 0 {
                    out.push(b',');
                }
                *count += 1;
                let start = out.len();
                *kinds |= write_key(k, v, out, budget)?;
                keys.push((start, out.len()));
                out.push(b':');
                *key = Some(k);
                Ok(Some(v))
            }
            None => {
                *key = None;
                if kinds.count_ones() > 1 && written_twice(out, &mut keys[*keys_from..]) {
                    check_collisions(*map)?;
                }
                keys.truncate(*keys_from);
                out.push(b'}');
                Ok(None)
            }
        },
    }
}

const ATOM_KEY: u8 = 1;
const BINARY_KEY: u8 = 2;
const INTEGER_KEY: u8 = 4;

/// A tuple's elements, read in place.
fn tuple_elements<'a>(term: Term<'a>) -> Option<&'a [rustler::sys::ErlNifTerm]> {
    let mut arity = 0;
    let mut array = std::ptr::null();
    // SAFETY: the env and term are live; on success ERTS points `array` at the tuple's `arity`
    // elements, which live as long as the term.
    unsafe {
        let ok = rustler::sys::enif_get_tuple(
            term.get_env().as_c_arg(),
            term.as_c_arg(),
            &mut arity,
            &mut array,
        );
        match (ok, arity) {
            (0, _) => None,
            // `array` may be null for `{}`, and a slice must not be.
            (_, 0) => Some(&[]),
            _ => Some(std::slice::from_raw_parts(array, arity as usize)),
        }
    }
}

/// Writes a map key as a JSON string; returns its kind.
fn write_key(k: Term, v: Term, out: &mut Vec<u8>, budget: usize) -> Result<u8, Fail> {
    match k.get_type() {
        TermType::Atom => {
            let is_struct = with_atom_name(k, |name| {
                let is_struct = name == "__struct__" && v.is_atom();
                if !is_struct {
                    write_str(name, out);
                }
                is_struct
            })
            .map_err(|_| container_refusal("has an unreadable atom key"))?;
            if is_struct {
                let module = atom_text(v).unwrap_or_default();
                return Err(Fail::Struct {
                    module: elixir_name(&module),
                    container: true,
                });
            }
            Ok(ATOM_KEY)
        }
        TermType::Binary => {
            let bin = rustler::Binary::from_term(k)
                .map_err(|_| container_refusal("has a bitstring map key"))?;
            if out.len().saturating_add(bin.len()) > budget {
                return Err(Fail::OverBudget);
            }
            match std::str::from_utf8(bin.as_slice()) {
                Ok(s) => write_str(s, out),
                Err(_) => return refuse_container("has a map key that is not valid UTF-8"),
            }
            Ok(BINARY_KEY)
        }
        TermType::Integer => {
            out.push(b'"');
            write_int(k, out).map_err(|_| {
                container_refusal(format!("has an integer key outside {INT_MIN}..{INT_MAX}"))
            })?;
            out.push(b'"');
            Ok(INTEGER_KEY)
        }
        _ => refuse_container(
            "has a map key that is not an atom, string or integer, \
             which a JSON object cannot hold",
        ),
    }
}

/// Whether two of these keys (byte ranges of `out`) were written alike. Equal strings are
/// escaped alike, so comparing the JSON text is comparing the keys.
fn written_twice(out: &[u8], keys: &mut [(usize, usize)]) -> bool {
    let text = |&(a, b): &(usize, usize)| &out[a..b];
    if keys.len() <= 16 {
        return keys
            .iter()
            .enumerate()
            .any(|(i, k)| keys[i + 1..].iter().any(|j| text(j) == text(k)));
    }
    keys.sort_unstable_by(|x, y| text(x).cmp(text(y)));
    keys.windows(2).any(|w| text(&w[0]) == text(&w[1]))
}

/// Refuses a map two of whose keys are written alike (`:a` and `"a"`, `1` and `"1"`): the
/// worker would see one of them only. Called once [`written_twice`] saw it, to name the keys.
fn check_collisions(map: Term) -> Result<(), Fail> {
    let mut seen: HashMap<String, Term> = HashMap::new();
    for (k, _) in MapIterator::new(map).into_iter().flatten() {
        let text = key_text(k);
        if let Some(prev) = seen.insert(text.clone(), k) {
            return refuse_container(format!(
                "has keys {} and {} that are both {text:?} in JSON: keep one",
                show_key(prev),
                show_key(k)
            ));
        }
    }
    Ok(())
}

fn write_binary(term: Term, out: &mut Vec<u8>, budget: usize) -> Result<(), Fail> {
    let bin = rustler::Binary::from_term(term).map_err(|_| refusal("is a bitstring"))?;
    // Counted before the copy: one 60 MiB binary must not be scanned on a normal scheduler.
    if out.len().saturating_add(bin.len()) > budget {
        return Err(Fail::OverBudget);
    }
    match std::str::from_utf8(bin.as_slice()) {
        Ok(s) => {
            write_str(s, out);
            Ok(())
        }
        Err(e) => refuse(format!(
            "is a binary that is not valid UTF-8 (invalid byte at offset {}); \
             JSON strings must be UTF-8: Base64-encode raw bytes",
            e.valid_up_to()
        )),
    }
}

/// Writes an integer the worker reads exactly; a bignum is refused at once (no conversion
/// to decimal, which costs seconds for a 2^16M).
fn write_int(term: Term, out: &mut Vec<u8>) -> Result<(), Fail> {
    if let Ok(i) = term.decode::<i64>() {
        out.extend_from_slice(itoa::Buffer::new().format(i).as_bytes());
    } else if let Ok(u) = term.decode::<u64>() {
        out.extend_from_slice(itoa::Buffer::new().format(u).as_bytes());
    } else {
        return refuse(format!(
            "is an integer outside {INT_MIN}..{INT_MAX}, which the worker cannot read \
             exactly: send it as a string"
        ));
    }
    Ok(())
}

/// The module of a struct (its `__struct__` atom), or None for another map.
fn struct_module(map: Term) -> Option<String> {
    let env = map.get_env();
    let key = rustler::Atom::from_str(env, "__struct__")
        .ok()?
        .to_term(env);
    let module = map.map_get(key).ok().filter(|m| m.is_atom())?;
    let name = atom_text(module).ok()?;
    Some(elixir_name(&name))
}

/// A module's name as Elixir writes it (`Elixir.Date` -> `Date`).
fn elixir_name(module: &str) -> String {
    module.trim_start_matches("Elixir.").to_owned()
}

/// An atom's name, whatever its characters.
fn atom_text(term: Term) -> Result<String, Fail> {
    with_atom_name(term, str::to_owned)
}

/// Calls `f` with an atom's name, whatever its characters, without allocating for the usual
/// (Latin-1) ones.
fn with_atom_name<R>(term: Term, f: impl FnOnce(&str) -> R) -> Result<R, Fail> {
    use rustler::sys::{c_char, enif_get_atom, ErlNifCharEncoding};
    if !term.is_atom() {
        return refuse("is not an atom");
    }
    // Atoms have at most 255 characters; the NIF API adds a NUL.
    let mut buf = [0u8; 256];
    // SAFETY: the env and term are live for this call, and `buf` is as long as we say.
    let n = unsafe {
        enif_get_atom(
            term.get_env().as_c_arg(),
            term.as_c_arg(),
            buf.as_mut_ptr() as *mut c_char,
            buf.len() as _,
            ErlNifCharEncoding::ERL_NIF_LATIN1,
        )
    };
    if n > 0 {
        let latin1 = &buf[..n as usize - 1];
        return Ok(match std::str::from_utf8(latin1) {
            Ok(ascii) if latin1.is_ascii() => f(ascii),
            _ => f(&latin1.iter().map(|&b| char::from(b)).collect::<String>()),
        });
    }
    // OTP 25's NIF API reads atom names as Latin-1 only; the external format has them as UTF-8.
    let ext = term.to_binary();
    let name = match ext.as_slice() {
        [131, 119, len, rest @ ..] if rest.len() == *len as usize => rest,
        [131, 118, hi, lo, rest @ ..] if rest.len() == u16::from_be_bytes([*hi, *lo]) as usize => {
            rest
        }
        _ => return refuse("is an unreadable atom"),
    };
    match std::str::from_utf8(name) {
        Ok(name) => Ok(f(name)),
        Err(_) => refuse("is an unreadable atom"),
    }
}

/// The path of the current element (`container`: of the innermost open container). A deep
/// path keeps its ends: `args.a[0][0]...(230 more)...[0].b`.
fn path(stack: &[Frame], container: bool) -> String {
    let n = if container {
        stack.len().saturating_sub(1)
    } else {
        stack.len()
    };
    let segment = |frame: &Frame| match frame {
        Frame::List { index, .. } | Frame::Tuple { index, .. } => {
            format!("[{}]", index.saturating_sub(1))
        }
        Frame::Map { key: Some(k), .. } => format!(".{}", key_text(*k)),
        Frame::Map { key: None, .. } => String::new(),
    };
    let mut p = String::from("args");
    const ENDS: usize = 10;
    for (i, frame) in stack[..n].iter().enumerate() {
        if n > 2 * ENDS + 1 && i == ENDS {
            let _ = write!(p, "...({} more)...", n - 2 * ENDS);
        }
        if n <= 2 * ENDS + 1 || i < ENDS || i >= n - ENDS {
            p.push_str(&segment(frame));
        }
    }
    p
}

/// A map key as JSON has it (atom name, string, decimal integer).
fn key_text(k: Term) -> String {
    atom_text(k)
        .ok()
        .or_else(|| k.decode::<String>().ok())
        .or_else(|| k.decode::<i64>().ok().map(|i| i.to_string()))
        .or_else(|| k.decode::<u64>().ok().map(|i| i.to_string()))
        .unwrap_or_else(|| "?".into())
}

/// A map key as Elixir writes it, for messages.
fn show_key(k: Term) -> String {
    if k.is_atom() {
        format!(":{}", key_text(k))
    } else if k.is_binary() {
        format!("{:?}", key_text(k))
    } else {
        key_text(k)
    }
}

/// Writes `s` as a JSON string literal.
pub fn write_str(s: &str, out: &mut Vec<u8>) {
    // serde_json's escaping is exact and fast; writing to a Vec cannot fail.
    serde_json::to_writer(&mut *out, s).expect("writing to a Vec cannot fail");
}

/// Parses JSON text straight into a term, refusing more than [`MAX_DEPTH`] levels.
///
/// # Errors
/// The first syntax error, a number beyond a float's range, or nesting over the limit.
pub fn json_to_term<'a>(
    env: Env<'a>,
    json: &[u8],
) -> Result<Term<'a>, dspex_pool_core::json::Error> {
    let mut reader = Reader::new(json, MAX_DEPTH);
    // Elements of the open containers, innermost last; keys of the open objects likewise.
    let mut values: Vec<Term<'a>> = Vec::new();
    let mut keys: Vec<Term<'a>> = Vec::new();
    // Where each open container's elements (and keys) start in `values` (and `keys`).
    let mut open: Vec<(usize, usize)> = Vec::new();
    loop {
        let at = reader.offset();
        let term = match reader.next_event()? {
            Event::StartArray | Event::StartObject => {
                open.push((values.len(), keys.len()));
                continue;
            }
            Event::Key(k) => {
                keys.push(k.as_ref().encode(env));
                continue;
            }
            Event::EndArray => {
                let (v, _) = open.pop().expect("an open array");
                let list = values[v..].encode(env);
                values.truncate(v);
                list
            }
            Event::EndObject => {
                let (v, k) = open.pop().expect("an open object");
                let map = Term::map_from_term_arrays(env, &keys[k..], &values[v..]).unwrap_or_else(
                    |_| {
                        // Repeated keys are legal JSON: the last one wins, as in Jason.
                        keys[k..]
                            .iter()
                            .zip(&values[v..])
                            .fold(Term::map_new(env), |m, (&k, &v)| {
                                m.map_put(k, v).unwrap_or(m)
                            })
                    },
                );
                values.truncate(v);
                keys.truncate(k);
                map
            }
            Event::Null => rustler::types::atom::nil().encode(env),
            Event::Bool(b) => b.encode(env),
            Event::Str(s) => s.as_ref().encode(env),
            Event::Number { text, int } => {
                number(env, text, int).ok_or_else(|| dspex_pool_core::json::Error {
                    offset: at,
                    what: format!("number out of range ({text})"),
                })?
            }
        };
        if open.is_empty() {
            reader.finish()?;
            return Ok(term);
        }
        values.push(term);
    }
}

fn number<'a>(env: Env<'a>, text: &str, int: bool) -> Option<Term<'a>> {
    if int {
        if let Ok(i) = text.parse::<i64>() {
            return Some(i.encode(env));
        }
        if let Ok(u) = text.parse::<u64>() {
            return Some(u.encode(env));
        }
    }
    let f: f64 = text.parse().ok()?;
    f.is_finite().then(|| f.encode(env))
}
