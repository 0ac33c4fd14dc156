//! A pull parser for JSON text, with no recursion.
//!
//! serde_json's deserializer recurses once per nesting level (and caps it at 128); on a dirty
//! scheduler's ~320 KiB stack or a runtime thread that is either a crash waiting for the right
//! input or a limit lower than the one requests have. This reader keeps its nesting on a heap
//! `Vec` instead, so any depth is safe; callers choose the depth they accept
//! ([`crate::term::MAX_DEPTH`] for values that become terms, none for skipping a reply's result).
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

/// Reads one JSON value from `buf`, event by event.
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    /// `true` for an object, `false` for an array, innermost last.
    stack: Vec<bool>,
    max_depth: usize,
    state: State,
}

impl<'a> Reader<'a> {
    /// A reader that refuses more than `max_depth` nested arrays and objects.
    pub fn new(buf: &'a [u8], max_depth: usize) -> Reader<'a> {
        Reader {
            buf,
            pos: 0,
            stack: Vec::new(),
            max_depth,
            state: State::Value,
        }
    }

    /// How many arrays and objects are open.
    pub fn depth(&self) -> usize {
        self.stack.len()
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
        self.state = match self.stack.last() {
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
        let object = self.stack.pop().expect("a container is open");
        self.after_value();
        Ok(if object {
            Event::EndObject
        } else {
            Event::EndArray
        })
    }

    fn open(&mut self, object: bool) -> Result<Event<'a>, Error> {
        if self.stack.len() >= self.max_depth {
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
        while self.buf.get(self.pos).is_some_and(u8::is_ascii_digit) {
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
        let text = std::str::from_utf8(&self.buf[start..self.pos]).expect("ASCII");
        Ok(Event::Number { text, int })
    }

    /// Reads a string literal at `pos` (which holds `"`).
    fn string(&mut self) -> Result<Cow<'a, str>, Error> {
        self.pos += 1;
        let start = self.pos;
        // Fast path: no escapes, borrowed straight from the input.
        loop {
            match self.buf.get(self.pos) {
                None => return self.fail("unterminated string"),
                Some(b'"') => {
                    let s = self.utf8(start, self.pos)?;
                    self.pos += 1;
                    return Ok(Cow::Borrowed(s));
                }
                Some(b'\\') => break,
                Some(&b) if b < 0x20 => return self.fail("control character in a string"),
                Some(_) => self.pos += 1,
            }
        }
        let mut owned = String::from(self.utf8(start, self.pos)?);
        loop {
            let run = self.pos;
            loop {
                match self.buf.get(self.pos) {
                    None => return self.fail("unterminated string"),
                    Some(b'"' | b'\\') => break,
                    Some(&b) if b < 0x20 => return self.fail("control character in a string"),
                    Some(_) => self.pos += 1,
                }
            }
            owned.push_str(self.utf8(run, self.pos)?);
            if self.buf[self.pos] == b'"' {
                self.pos += 1;
                return Ok(Cow::Owned(owned));
            }
            self.pos += 1;
            let c = match self.buf.get(self.pos) {
                Some(b'"') => '"',
                Some(b'\\') => '\\',
                Some(b'/') => '/',
                Some(b'b') => '\u{8}',
                Some(b'f') => '\u{c}',
                Some(b'n') => '\n',
                Some(b'r') => '\r',
                Some(b't') => '\t',
                Some(b'u') => {
                    self.pos += 1;
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
                        0xDC00..=0xDFFF => {
                            return self.fail("lone trailing surrogate in a \\u escape")
                        }
                        c => c,
                    };
                    owned.push(char::from_u32(c).expect("a valid scalar value"));
                    continue;
                }
                _ => return self.fail("invalid escape"),
            };
            owned.push(c);
            self.pos += 1;
        }
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

    fn utf8(&self, start: usize, end: usize) -> Result<&'a str, Error> {
        std::str::from_utf8(&self.buf[start..end]).map_err(|e| Error {
            offset: start + e.valid_up_to(),
            what: "invalid UTF-8 in a string".into(),
        })
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
