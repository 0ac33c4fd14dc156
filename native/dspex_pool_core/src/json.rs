//! A pull parser for JSON text, with no recursion.
//!
//! serde_json's deserializer recurses once per nesting level (and caps it at 128); on a dirty
//! scheduler's ~320 KiB stack or a runtime thread that is either a crash waiting for the right
//! input or a limit lower than the one requests have. This reader keeps its nesting on a heap
//! `Vec` instead, so any depth is safe; callers choose the depth they accept (the NIF crate's
//! `term::MAX_DEPTH` for values that become terms, none for reading a frame's envelope).
//!
//! It yields [`Event`]s one at a time and is strict RFC 8259: no trailing commas, no comments,
//! no leading zeros, no lone surrogates, nothing but whitespace after the value.

use std::borrow::Cow;
use std::fmt;

/// One step of a JSON text.
#[derive(Debug, PartialEq)]
pub enum Event<'a> {
    Null,
    Bool(bool),
    /// A number as written; `int` when it has no fraction and no exponent.
    Number {
        text: &'a str,
        int: bool,
    },
    /// A string value (escapes resolved).
    Str(Cow<'a, str>),
    /// An object key (escapes resolved); its value follows.
    Key(Cow<'a, str>),
    StartArray,
    EndArray,
    StartObject,
    EndObject,
}

/// Why a text is not JSON, with the byte offset where reading stopped.
#[derive(Debug, Clone, PartialEq)]
pub struct Error {
    pub offset: usize,
    pub what: String,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} at byte {}", self.what, self.offset)
    }
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum State {
    /// A value is due (the top level, after `[`'s first element check, after `,` in an array,
    /// after `:`).
    Value,
    /// Just after `[`: a value or `]`.
    ArrayFirst,
    /// After an array element: `,` or `]`.
    ArrayNext,
    /// Just after `{`: a key or `}`.
    ObjectFirst,
    /// After a member's value: `,` or `}`.
    ObjectNext,
    /// After `,` in an object: a key.
    Key,
    /// The top-level value is complete.
    Done,
}

/// A stack of bits: the first 64 levels in a word (no allocation for an ordinary reply), the
/// rest on the heap.
#[derive(Default)]
struct Nesting {
    depth: usize,
    word: u64,
    spill: Vec<bool>,
}

impl Nesting {
    fn push(&mut self, object: bool) {
        if self.depth < 64 {
            self.word = (self.word & !(1 << self.depth)) | (u64::from(object) << self.depth);
        } else {
            self.spill.push(object);
        }
        self.depth += 1;
    }

    fn top(&self) -> Option<bool> {
        match self.depth {
            0 => None,
            d if d <= 64 => Some(self.word >> (d - 1) & 1 == 1),
            _ => self.spill.last().copied(),
        }
    }

    fn pop(&mut self) -> bool {
        let top = self.top().expect("a container is open");
        if self.depth > 64 {
            self.spill.pop();
        }
        self.depth -= 1;
        top
    }
}

/// Reads one JSON value from `buf`, event by event.
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    /// The open containers: `true` for an object, `false` for an array, innermost last.
    stack: Nesting,
    max_depth: usize,
    state: State,
}

impl<'a> Reader<'a> {
    /// A reader that refuses more than `max_depth` nested arrays and objects.
    pub fn new(buf: &'a [u8], max_depth: usize) -> Reader<'a> {
        Reader {
            buf,
            pos: 0,
            stack: Nesting::default(),
            max_depth,
            state: State::Value,
        }
    }

    /// How many arrays and objects are open.
    pub fn depth(&self) -> usize {
        self.stack.depth
    }

    /// The offset where the next value starts (after whitespace).
    pub fn value_start(&mut self) -> usize {
        self.skip_ws();
        self.pos
    }

    /// The offset just after the last event.
    pub fn offset(&self) -> usize {
        self.pos
    }

    fn fail<T>(&self, what: impl Into<String>) -> Result<T, Error> {
        Err(Error {
            offset: self.pos,
            what: what.into(),
        })
    }

    fn skip_ws(&mut self) {
        while let Some(&b) = self.buf.get(self.pos) {
            if matches!(b, b' ' | b'\t' | b'\n' | b'\r') {
                self.pos += 1;
            } else {
                break;
            }
        }
    }

    fn peek(&mut self) -> Result<u8, Error> {
        self.skip_ws();
        match self.buf.get(self.pos) {
            Some(&b) => Ok(b),
            None => self.fail("unexpected end of input"),
        }
    }

    /// The state after a complete value.
    fn after_value(&mut self) {
        self.state = match self.stack.top() {
            None => State::Done,
            Some(true) => State::ObjectNext,
            Some(false) => State::ArrayNext,
        };
    }

    /// Checks that nothing but whitespace follows the value.
    ///
    /// # Errors
    /// When the value is incomplete or followed by other characters.
    pub fn finish(&mut self) -> Result<(), Error> {
        if self.state != State::Done {
            return self.fail("unexpected end of input");
        }
        self.skip_ws();
        if self.pos < self.buf.len() {
            return self.fail("trailing characters after the JSON value");
        }
        Ok(())
    }

    /// The next event.
    ///
    /// # Errors
    /// The first syntax error, or nesting deeper than the reader's limit.
    pub fn next_event(&mut self) -> Result<Event<'a>, Error> {
        match self.state {
            State::Value => self.value(),
            State::ArrayFirst => {
                if self.peek()? == b']' {
                    self.pos += 1;
                    self.close()
                } else {
                    self.value()
                }
            }
            State::ArrayNext => match self.peek()? {
                b',' => {
                    self.pos += 1;
                    self.value()
                }
                b']' => {
                    self.pos += 1;
                    self.close()
                }
                _ => self.fail("expected `,` or `]`"),
            },
            State::ObjectFirst => match self.peek()? {
                b'}' => {
                    self.pos += 1;
                    self.close()
                }
                b'"' => self.key(),
                _ => self.fail("expected a string key or `}`"),
            },
            State::ObjectNext => match self.peek()? {
                b',' => {
                    self.pos += 1;
                    self.state = State::Key;
                    self.next_event()
                }
                b'}' => {
                    self.pos += 1;
                    self.close()
                }
                _ => self.fail("expected `,` or `}`"),
            },
            State::Key => match self.peek()? {
                b'"' => self.key(),
                _ => self.fail("expected a string key"),
            },
            State::Done => self.fail("the JSON value is already complete"),
        }
    }

    /// Reads past one whole value (the next event's), returning its byte range.
    ///
    /// # Errors
    /// As [`Reader::next_event`].
    pub fn skip_value(&mut self) -> Result<std::ops::Range<usize>, Error> {
        let start = self.value_start();
        let depth = self.depth();
        loop {
            match self.next_event()? {
                Event::Key(_) => {}
                _ if self.depth() == depth => return Ok(start..self.pos),
                _ => {}
            }
        }
    }

    fn close(&mut self) -> Result<Event<'a>, Error> {
        let object = self.stack.pop();
        self.after_value();
        Ok(if object {
            Event::EndObject
        } else {
            Event::EndArray
        })
    }

    fn open(&mut self, object: bool) -> Result<Event<'a>, Error> {
        if self.stack.depth >= self.max_depth {
            return self.fail(format!(
                "nested deeper than {} levels of arrays and objects",
                self.max_depth
            ));
        }
        self.pos += 1;
        self.stack.push(object);
        Ok(if object {
            self.state = State::ObjectFirst;
            Event::StartObject
        } else {
            self.state = State::ArrayFirst;
            Event::StartArray
        })
    }

    fn key(&mut self) -> Result<Event<'a>, Error> {
        let k = self.string()?;
        if self.peek()? != b':' {
            return self.fail("expected `:`");
        }
        self.pos += 1;
        self.state = State::Value;
        Ok(Event::Key(k))
    }

    fn value(&mut self) -> Result<Event<'a>, Error> {
        let ev = match self.peek()? {
            b'[' => return self.open(false),
            b'{' => return self.open(true),
            b'"' => Event::Str(self.string()?),
            b'n' => self.literal(b"null", Event::Null)?,
            b't' => self.literal(b"true", Event::Bool(true))?,
            b'f' => self.literal(b"false", Event::Bool(false))?,
            b'-' | b'0'..=b'9' => self.number()?,
            _ => return self.fail("expected a JSON value"),
        };
        self.after_value();
        Ok(ev)
    }

    fn literal(&mut self, word: &[u8], ev: Event<'a>) -> Result<Event<'a>, Error> {
        if self.buf[self.pos..].starts_with(word) {
            self.pos += word.len();
            Ok(ev)
        } else {
            self.fail("expected a JSON value")
        }
    }

    fn digits(&mut self) -> usize {
        let start = self.pos;
        while matches!(self.buf.get(self.pos), Some(b'0'..=b'9')) {
            self.pos += 1;
        }
        self.pos - start
    }

    fn number(&mut self) -> Result<Event<'a>, Error> {
        let start = self.pos;
        let mut int = true;
        if self.buf[self.pos] == b'-' {
            self.pos += 1;
        }
        match self.buf.get(self.pos) {
            Some(b'0') => self.pos += 1,
            Some(b'1'..=b'9') => {
                self.digits();
            }
            _ => return self.fail("expected a digit"),
        }
        if self.buf.get(self.pos) == Some(&b'.') {
            int = false;
            self.pos += 1;
            if self.digits() == 0 {
                return self.fail("expected a digit after `.`");
            }
        }
        if matches!(self.buf.get(self.pos), Some(b'e' | b'E')) {
            int = false;
            self.pos += 1;
            if matches!(self.buf.get(self.pos), Some(b'+' | b'-')) {
                self.pos += 1;
            }
            if self.digits() == 0 {
                return self.fail("expected a digit in the exponent");
            }
        }
        let bytes = &self.buf[start..self.pos];
        // SAFETY: every byte of a number was matched above as a digit, sign, `.`, `e` or `E`.
        let text = unsafe { std::str::from_utf8_unchecked(bytes) };
        Ok(Event::Number { text, int })
    }

    /// Reads a string literal at `pos` (which holds `"`).
    fn string(&mut self) -> Result<Cow<'a, str>, Error> {
        self.pos += 1;
        let start = self.pos;
        let (mut end, mut non_ascii) = self.run_end()?;
        // Fast path: no escapes, borrowed straight from the input.
        if self.buf[end] == b'"' {
            let s = self.text(start, end, non_ascii)?;
            self.pos = end + 1;
            return Ok(Cow::Borrowed(s));
        }
        let mut owned = String::with_capacity(end - start + 16);
        loop {
            owned.push_str(self.text(self.pos, end, non_ascii)?);
            self.pos = end;
            if self.buf[end] == b'"' {
                self.pos += 1;
                return Ok(Cow::Owned(owned));
            }
            self.pos += 1; // the backslash
            let c = match self.buf.get(self.pos) {
                Some(b'u') => {
                    self.pos += 1;
                    self.unicode_escape()?
                }
                Some(&e) => {
                    let c = match e {
                        b'"' => '"',
                        b'\\' => '\\',
                        b'/' => '/',
                        b'b' => '\u{8}',
                        b'f' => '\u{c}',
                        b'n' => '\n',
                        b'r' => '\r',
                        b't' => '\t',
                        _ => return self.fail("invalid escape"),
                    };
                    self.pos += 1;
                    c
                }
                None => return self.fail("unterminated string"),
            };
            owned.push(c);
            (end, non_ascii) = self.run_end()?;
        }
    }

    /// The offset of the next `"` or `\` from `pos`, and whether a non-ASCII byte comes before
    /// it; a control character or the end of the input first is an error.
    fn run_end(&mut self) -> Result<(usize, bool), Error> {
        let (end, non_ascii) = scan(self.buf, self.pos);
        match self.buf.get(end) {
            Some(b'"' | b'\\') => Ok((end, non_ascii)),
            Some(_) => {
                self.pos = end;
                self.fail("control character in a string")
            }
            None => self.fail("unterminated string"),
        }
    }

    /// The bytes `start..end` as text; only a run with non-ASCII bytes needs checking.
    fn text(&self, start: usize, end: usize, non_ascii: bool) -> Result<&'a str, Error> {
        let bytes = &self.buf[start..end];
        if non_ascii {
            return std::str::from_utf8(bytes).map_err(|e| Error {
                offset: start + e.valid_up_to(),
                what: "invalid UTF-8 in a string".into(),
            });
        }
        debug_assert!(bytes.is_ascii());
        // SAFETY: `scan` saw no byte >= 0x80 in this run: it is ASCII, hence UTF-8.
        Ok(unsafe { std::str::from_utf8_unchecked(bytes) })
    }

    /// The character of a `\u` escape whose hex digits start at `pos` (a surrogate pair
    /// takes two escapes).
    fn unicode_escape(&mut self) -> Result<char, Error> {
        let hi = self.hex4()?;
        let c = match hi {
            0xD800..=0xDBFF => {
                if !self.buf[self.pos..].starts_with(b"\\u") {
                    return self.fail("lone leading surrogate in a \\u escape");
                }
                self.pos += 2;
                let lo = self.hex4()?;
                if !(0xDC00..=0xDFFF).contains(&lo) {
                    return self.fail("lone leading surrogate in a \\u escape");
                }
                0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00)
            }
            0xDC00..=0xDFFF => return self.fail("lone trailing surrogate in a \\u escape"),
            c => c,
        };
        Ok(char::from_u32(c).expect("a valid scalar value"))
    }

    fn hex4(&mut self) -> Result<u32, Error> {
        let Some(hex) = self.buf.get(self.pos..self.pos + 4) else {
            return self.fail("unterminated \\u escape");
        };
        let mut v = 0;
        for &h in hex {
            let d = match h {
                b'0'..=b'9' => h - b'0',
                b'a'..=b'f' => h - b'a' + 10,
                b'A'..=b'F' => h - b'A' + 10,
                _ => return self.fail("invalid \\u escape"),
            };
            v = v * 16 + u32::from(d);
        }
        self.pos += 4;
        Ok(v)
    }
}

/// The offset of the first `"`, `\` or control character in `buf` from `from` (`buf.len()` if
/// none), and whether a byte >= 0x80 comes before it. Eight bytes at a time: a string's
/// content is most of a reply.
fn scan(buf: &[u8], from: usize) -> (usize, bool) {
    const ONES: u64 = u64::from_ne_bytes([1; 8]);
    const HIGHS: u64 = ONES << 7;
    // Bytes equal to `b` get their high bit set (exact for the lowest such byte).
    let equal = |chunk: u64, b: u8| {
        let x = chunk ^ (ONES * u64::from(b));
        x.wrapping_sub(ONES) & !x
    };
    let mut i = from;
    let mut high = 0;
    while let Some(bytes) = buf.get(i..i + 8) {
        let chunk = u64::from_le_bytes(bytes.try_into().expect("8 bytes"));
        let control = chunk.wrapping_sub(ONES * 0x20) & !chunk;
        let hits = (control | equal(chunk, b'"') | equal(chunk, b'\\')) & HIGHS;
        if hits != 0 {
            let at = hits.trailing_zeros() as usize / 8;
            let before = chunk & HIGHS & ((1u64 << (at * 8)) - 1);
            return (i + at, high | before != 0);
        }
        high |= chunk & HIGHS;
        i += 8;
    }
    while let Some(&b) = buf.get(i) {
        if b == b'"' || b == b'\\' || b < 0x20 {
            break;
        }
        high |= u64::from(b & 0x80);
        i += 1;
    }
    (i, high != 0)
}

/// A JSON object's top-level members, each value kept as the text it was written as: read and
/// written again at any depth, with no recursion (what a `serde_json::Value` could not do past
/// 128 levels). A repeated key: the last one counts, as in serde_json.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RawObject(Vec<(String, Box<[u8]>)>);

impl RawObject {
    /// The members of `text`; `None` when it is not one valid JSON object.
    pub fn parse(text: &[u8]) -> Option<RawObject> {
        let mut reader = Reader::new(text, usize::MAX);
        if reader.next_event().ok()? != Event::StartObject {
            return None;
        }
        let mut members: Vec<(String, Box<[u8]>)> = Vec::new();
        while let Event::Key(k) = reader.next_event().ok()? {
            let value = reader.skip_value().ok()?;
            members.push((k.into_owned(), text[value].into()));
        }
        reader.finish().ok()?;
        // A repeated key keeps its last member, in one pass (not a search per member).
        let mut seen = std::collections::HashSet::with_capacity(members.len());
        let last: Vec<bool> = members
            .iter()
            .rev()
            .map(|(k, _)| seen.insert(k.as_str()))
            .collect();
        let mut last = last.into_iter().rev();
        members.retain(|_| last.next().expect("one flag a member"));
        Some(RawObject(members))
    }

    /// The text of `key`'s value.
    pub fn get(&self, key: &str) -> Option<&[u8]> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, v)| &**v)
    }

    /// `key`'s value when it is a JSON string.
    pub fn get_str(&self, key: &str) -> Option<String> {
        match Reader::new(self.get(key)?, 0).next_event() {
            Ok(Event::Str(s)) => Some(s.into_owned()),
            _ => None,
        }
    }

    /// Sets `key` to the JSON text `value` (which must be one valid JSON value).
    pub fn insert(&mut self, key: &str, value: &[u8]) {
        self.remove(key);
        self.0.push((key.to_owned(), value.into()));
    }

    pub fn remove(&mut self, key: &str) {
        self.0.retain(|(k, _)| k != key);
    }

    /// Appends the object's JSON text to `out`.
    pub fn write(&self, out: &mut Vec<u8>) {
        out.push(b'{');
        for (i, (k, v)) in self.0.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            serde_json::to_writer(&mut *out, k).expect("a string serialises");
            out.push(b':');
            out.extend_from_slice(v);
        }
        out.push(b'}');
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn events(text: &str) -> Result<Vec<Event<'_>>, Error> {
        let mut r = Reader::new(text.as_bytes(), 64);
        let mut out = vec![r.next_event()?];
        while r.depth() > 0 {
            out.push(r.next_event()?);
        }
        r.finish()?;
        Ok(out)
    }

    #[test]
    fn reads_every_kind_of_value() {
        use Event::*;
        let num = |text, int| Number { text, int };
        assert_eq!(
            events(r#" {"a": [1, -2.5e3, true, null, "x\"\u00e9\ud83d\ude00"], "b": {}} "#)
                .unwrap(),
            vec![
                StartObject,
                Key("a".into()),
                StartArray,
                num("1", true),
                num("-2.5e3", false),
                Bool(true),
                Null,
                Str("x\"é😀".into()),
                EndArray,
                Key("b".into()),
                StartObject,
                EndObject,
                EndObject
            ]
        );
        assert_eq!(events("0").unwrap(), vec![num("0", true)]);
        assert_eq!(
            events(r#""\/\b\f\n\r\t""#).unwrap(),
            vec![Str("/\u{8}\u{c}\n\r\t".into())]
        );
    }

    #[test]
    fn refuses_what_is_not_json() {
        for bad in [
            "",
            "[",
            "[1,]",
            "{\"a\" 1}",
            "{\"a\":1,}",
            "{1:2}",
            "01",
            "1.",
            "1e",
            "-",
            "+1",
            "[1] 2",
            "tru",
            "\"a",
            "\"\\x\"",
            "\"\\ud800\"",
            "\"\\udc00\"",
            "\"\\ud800\\u0041\"",
            "\"\t\"",
            "nul",
            "[1 2]",
            "NaN",
            "\"\\u12\"",
        ] {
            assert!(events(bad).is_err(), "{bad:?} was accepted");
        }
        assert!(Reader::new(b"\"\xff\"", 4).next_event().is_err());
    }

    #[test]
    fn depth_is_limited_without_recursion() {
        let at = format!("{}{}", "[".repeat(64), "]".repeat(64));
        assert!(events(&at).is_ok());
        let over = format!("{}{}", "[".repeat(65), "]".repeat(65));
        let e = events(&over).unwrap_err();
        assert!(e.what.contains("deeper than 64"), "{e}");
        // A deep text on an unlimited reader costs heap, not stack.
        let deep = format!("{}1{}", "[{\"k\":".repeat(200_000), "}]".repeat(200_000));
        let mut r = Reader::new(deep.as_bytes(), usize::MAX);
        assert_eq!(r.skip_value().unwrap(), 0..deep.len());
        r.finish().unwrap();
    }

    /// The value `text` holds, built from this reader's events (the reference: serde_json).
    fn via_events(text: &str) -> Result<serde_json::Value, Error> {
        use serde_json::Value;
        let mut r = Reader::new(text.as_bytes(), 1000);
        let mut open: Vec<(Vec<Value>, Vec<String>, bool)> = Vec::new();
        loop {
            let v = match r.next_event()? {
                Event::StartArray => {
                    open.push((vec![], vec![], false));
                    continue;
                }
                Event::StartObject => {
                    open.push((vec![], vec![], true));
                    continue;
                }
                Event::Key(k) => {
                    open.last_mut().unwrap().1.push(k.into_owned());
                    continue;
                }
                Event::EndArray | Event::EndObject => {
                    let (vals, keys, object) = open.pop().unwrap();
                    if object {
                        Value::Object(keys.into_iter().zip(vals).collect())
                    } else {
                        Value::Array(vals)
                    }
                }
                Event::Null => Value::Null,
                Event::Bool(b) => Value::Bool(b),
                // serde_json's own float reading is off by an ulp at times; Rust's is exact.
                Event::Number { text, int: true } => text
                    .parse::<i64>()
                    .map(Value::from)
                    .unwrap_or_else(|_| Value::from(text.parse::<u64>().unwrap())),
                Event::Number { text, .. } => Value::from(text.parse::<f64>().unwrap()),
                Event::Str(s) => Value::String(s.into_owned()),
            };
            match open.last_mut() {
                Some(top) => top.0.push(v),
                None => {
                    r.finish()?;
                    return Ok(v);
                }
            }
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig {
            failure_persistence: None,
            ..Default::default()
        })]

        /// The eight-bytes-at-a-time scan finds what a byte-by-byte one finds.
        #[test]
        fn scan_agrees_with_a_plain_loop(
            bytes in proptest::collection::vec(
                proptest::prop_oneof![
                    proptest::prelude::Just(b'"'),
                    proptest::prelude::Just(b'\\'),
                    0u8..0x20,
                    0x20u8..0x80,
                    0x80u8..=0xFF,
                ],
                0..40,
            ),
            from in 0usize..40,
        ) {
            let from = from.min(bytes.len());
            let end = bytes[from..]
                .iter()
                .position(|&b| b == b'"' || b == b'\\' || b < 0x20)
                .map_or(bytes.len(), |i| from + i);
            let high = bytes[from..end].iter().any(|&b| b >= 0x80);
            proptest::prop_assert_eq!(scan(&bytes, from), (end, high));
        }

        #[test]
        fn events_rebuild_what_serde_json_reads(
            s in proptest::prelude::any::<String>(),
            n in proptest::prelude::any::<f64>(),
            i in proptest::prelude::any::<i64>(),
        ) {
            let v = serde_json::json!({"s": s, "list": [n.is_finite().then_some(n), i, [{}], []]});
            let text = v.to_string();
            proptest::prop_assert_eq!(via_events(&text).unwrap(), v.clone());
            // Escaped differently (\u for everything non-ASCII), read alike.
            let ascii: String = text
                .chars()
                .map(|c| {
                    if c.is_ascii() {
                        c.to_string()
                    } else {
                        let mut units = [0; 2];
                        c.encode_utf16(&mut units).iter().map(|u| format!("\\u{u:04x}")).collect()
                    }
                })
                .collect();
            proptest::prop_assert_eq!(via_events(&ascii).unwrap(), v);
        }
    }
}
