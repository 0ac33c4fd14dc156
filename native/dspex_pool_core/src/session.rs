//! What a session created, so that any worker can re-create it.
//!
//! The DSPy bridge keeps a session's programs and LM in the one Python process that ran the
//! commands. The pool watches the replies of the commands that change that state and keeps a
//! record; a worker whose copy is behind gets a `restore_session` frame before the session's
//! next request. Only what the commands say is recorded: program specs and the session's
//! `configure_lm` arguments, not Python objects mutated in place (use `:strict` for those).

use crate::json::RawObject;

/// A session's recorded state. `generation` grows with every change.
#[derive(Debug, Default)]
pub struct SessionRecord {
    /// Unique to this record among all the pool's records, ended ones included.
    pub epoch: u64,
    pub generation: u64,
    /// Each program's `create_program` arguments (its id set, the session's removed), and the
    /// session's `configure_lm` arguments: kept as written, so specs of any depth survive.
    programs: Vec<(String, RawObject)>,
    lm: Option<RawObject>,
    /// The worker whose copy is current and that the session prefers.
    pub home: Option<u64>,
    /// The worker its `:strict` requests ran on: the one that holds its Python state.
    pub strict_home: Option<u64>,
}

impl SessionRecord {
    /// An empty record with the given epoch.
    pub fn new(epoch: u64) -> SessionRecord {
        SessionRecord {
            epoch,
            ..SessionRecord::default()
        }
    }

    /// Drops everything recorded; every worker's copy becomes stale.
    pub fn forget(&mut self) {
        self.programs.clear();
        self.lm = None;
        self.generation += 1;
    }

    /// Whether a fresh worker needs anything re-created to serve this session.
    pub fn has_state(&self) -> bool {
        !self.programs.is_empty() || self.lm.is_some()
    }

    /// [`SessionRecord::apply_members`] on the arguments' text (the tests' form).
    #[cfg(test)]
    fn apply(&mut self, command: &str, args: &[u8], result: &[u8]) -> bool {
        RawObject::parse(args).is_some_and(|args| self.apply_members(command, args, result))
    }

    /// Applies a successful reply of `command` (`args`: its arguments' members; `result`: the
    /// reply's result, as JSON text); true when the record changed.
    pub fn apply_members(&mut self, command: &str, mut args: RawObject, result: &[u8]) -> bool {
        args.remove("session_id");
        let changed = match command {
            "create_program" => {
                // The reply's `program_id` when it has one (not a string: no id known).
                let id = match RawObject::parse(result).filter(|r| r.get("program_id").is_some()) {
                    Some(result) => result.get_str("program_id"),
                    None => args.get_str("id"),
                };
                match id {
                    Some(id) => {
                        let mut text = Vec::with_capacity(id.len() + 2);
                        serde_json::to_writer(&mut text, &id).expect("a string serialises");
                        args.insert("id", &text);
                        self.programs.retain(|(p, _)| *p != id);
                        self.programs.push((id, args));
                        true
                    }
                    None => false,
                }
            }
            "delete_program" => match args.get_str("program_id") {
                Some(id) => {
                    let before = self.programs.len();
                    self.programs.retain(|(p, _)| *p != id);
                    before != self.programs.len()
                }
                None => false,
            },
            "configure_lm" => {
                self.lm = Some(args);
                true
            }
            "cleanup_session" | "reset_state" | "cleanup" => {
                let had = self.has_state();
                self.programs.clear();
                self.lm = None;
                had
            }
            _ => false,
        };
        if changed {
            self.generation += 1;
        }
        changed
    }

    /// The `restore_session` arguments that re-create this session on a worker.
    pub fn restore_args(&self, session_id: &str) -> Vec<u8> {
        let mut out = Vec::with_capacity(64);
        out.extend_from_slice(b"{\"session_id\":");
        serde_json::to_writer(&mut out, session_id).expect("a string serialises");
        out.extend_from_slice(b",\"programs\":[");
        for (i, (_, program)) in self.programs.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            program.write(&mut out);
        }
        out.extend_from_slice(b"],\"lm\":");
        match &self.lm {
            Some(lm) => lm.write(&mut out),
            None => out.extend_from_slice(b"null"),
        }
        out.push(b'}');
        out
    }
}

/// Commands whose success changes session state and so must be recorded.
pub fn is_recorded(command: &str) -> bool {
    matches!(
        command,
        "create_program" | "delete_program" | "configure_lm" | "cleanup_session"
    )
}

/// [`is_global_config_of`] on the arguments' text (the tests' form).
#[cfg(test)]
fn is_global_config(command: &str, args: &[u8]) -> bool {
    is_global_config_of(command, RawObject::parse(args).as_ref())
}

/// A `configure_lm` without a session configures every worker, present and future (`members`:
/// its arguments' members, `None` when they are not an object).
pub fn is_global_config_of(command: &str, members: Option<&RawObject>) -> bool {
    command == "configure_lm"
        && !members
            .and_then(|m| m.get("session_id").map(|s| s != b"null"))
            .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::{Just, Strategy};
    use serde_json::Value;

    #[test]
    fn records_programs_and_lm_and_forgets_deleted_ones() {
        let mut r = SessionRecord::default();
        assert!(!r.has_state());
        let spec = br#"{"session_id":"s","signature":{"inputs":[],"outputs":[]}}"#;
        assert!(r.apply("create_program", spec, br#"{"program_id":"p1"}"#));
        assert!(r.apply(
            "configure_lm",
            br#"{"session_id":"s","provider":"dummy"}"#,
            b"{}"
        ));
        assert_eq!(r.generation, 2);
        let restore: Value = serde_json::from_slice(&r.restore_args("s")).unwrap();
        assert_eq!(restore["session_id"], "s");
        assert_eq!(restore["programs"][0]["id"], "p1");
        assert_eq!(
            restore["programs"][0]["signature"]["inputs"],
            Value::Array(vec![])
        );
        assert!(restore["programs"][0].get("session_id").is_none());
        assert_eq!(restore["lm"]["provider"], "dummy");
        assert!(r.apply("delete_program", br#"{"program_id":"p1"}"#, b"{}"));
        assert!(!r.apply("delete_program", br#"{"program_id":"p1"}"#, b"{}"));
        assert_eq!(r.generation, 3);
        let restore: Value = serde_json::from_slice(&r.restore_args("a\"b")).unwrap();
        assert_eq!(restore["session_id"], "a\"b");
        assert_eq!(restore["programs"], Value::Array(vec![]));
    }

    #[test]
    fn an_id_given_in_args_is_used_when_the_reply_names_none() {
        let mut r = SessionRecord::default();
        assert!(r.apply("create_program", br#"{"id":"mine","x":1}"#, b"{}"));
        assert!(!r.apply("create_program", br#"{"x":1}"#, b"[]"));
        let restore: Value = serde_json::from_slice(&r.restore_args("s")).unwrap();
        assert_eq!(restore["programs"][0]["id"], "mine");
        assert_eq!(restore["programs"].as_array().unwrap().len(), 1);
    }

    /// A spec nested far deeper than serde_json's 128 levels (and deeper than any stack could
    /// recurse through) is recorded and restored byte for byte. Before, it failed to parse and
    /// was silently not recorded: the program was gone on any other worker.
    #[test]
    fn specs_of_any_depth_are_recorded_and_restored_as_written() {
        let depth = 100_000;
        let deep = format!("{}1{}", "[".repeat(depth), "]".repeat(depth));
        let spec = format!(r#"{{"session_id":"s","signature":{deep}}}"#);
        let mut r = SessionRecord::default();
        assert!(r.apply("create_program", spec.as_bytes(), br#"{"program_id":"p"}"#));
        let restore = r.restore_args("s");
        let expected = format!(
            r#"{{"session_id":"s","programs":[{{"signature":{deep},"id":"p"}}],"lm":null}}"#
        );
        assert_eq!(String::from_utf8(restore).unwrap(), expected);
    }

    #[test]
    fn global_config_is_configure_lm_without_session() {
        assert!(is_global_config("configure_lm", br#"{"provider":"dummy"}"#));
        assert!(is_global_config("configure_lm", br#"{"session_id":null}"#));
        assert!(!is_global_config("configure_lm", br#"{"session_id":"s"}"#));
        assert!(!is_global_config("ping", b"{}"));
        // A session's configure_lm with deeply nested arguments stays the session's (it was
        // taken for a global one when serde_json gave up at 128 levels).
        let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
        let args = format!(r#"{{"session_id":"s","extra":{deep}}}"#);
        assert!(!is_global_config("configure_lm", args.as_bytes()));
    }

    /// An object of many members is read in linear time (it was quadratic: every member
    /// searched all the earlier ones for a duplicate; 200,000 members took minutes, 50,000
    /// tens of seconds, unoptimised). Now well under a second.
    #[test]
    fn an_object_of_many_members_is_read_in_linear_time() {
        let n = 50_000;
        let mut text = String::from("{");
        for i in 0..n {
            text.push_str(&format!("\"k{i}\":{i},"));
        }
        text.push_str(r#""k0":"last","session_id":"s"}"#);
        let started = std::time::Instant::now();
        let object = RawObject::parse(text.as_bytes()).unwrap();
        assert_eq!(object.get_str("k0").as_deref(), Some("last"));
        assert_eq!(object.get(&format!("k{}", n - 1)), Some(&b"49999"[..]));
        assert!(!is_global_config("configure_lm", text.as_bytes()));
        assert!(
            started.elapsed() < std::time::Duration::from_secs(5),
            "took {:?}",
            started.elapsed()
        );
    }

    /// The record as the serde_json version kept it, to compare with.
    #[derive(Default)]
    struct OldRecord {
        programs: Vec<(String, Value)>,
        lm: Option<Value>,
    }

    impl OldRecord {
        fn apply(&mut self, command: &str, args: &[u8], result: &[u8]) -> bool {
            let result: Value = serde_json::from_slice(result).unwrap_or(Value::Null);
            let Ok(Value::Object(mut args)) = serde_json::from_slice::<Value>(args) else {
                return false;
            };
            args.remove("session_id");
            match command {
                "create_program" => {
                    let id = result
                        .get("program_id")
                        .or_else(|| args.get("id"))
                        .and_then(Value::as_str)
                        .map(str::to_owned);
                    match id {
                        Some(id) => {
                            args.insert("id".into(), Value::String(id.clone()));
                            self.programs.retain(|(p, _)| *p != id);
                            self.programs.push((id, Value::Object(args)));
                            true
                        }
                        None => false,
                    }
                }
                "delete_program" => match args.get("program_id").and_then(Value::as_str) {
                    Some(id) => {
                        let before = self.programs.len();
                        self.programs.retain(|(p, _)| p != id);
                        before != self.programs.len()
                    }
                    None => false,
                },
                "configure_lm" => {
                    self.lm = Some(Value::Object(args));
                    true
                }
                _ => false,
            }
        }

        fn restore(&self, session_id: &str) -> Value {
            let programs: Vec<&Value> = self.programs.iter().map(|(_, v)| v).collect();
            serde_json::json!({"session_id": session_id, "programs": programs, "lm": self.lm})
        }
    }

    fn old_is_global_config(command: &str, args: &[u8]) -> bool {
        command == "configure_lm"
            && !matches!(
                serde_json::from_slice::<serde_json::Map<String, Value>>(args),
                Ok(m) if m.get("session_id").is_some_and(|s| !s.is_null())
            )
    }

    /// `s` as a JSON string, each character written plainly, `\u`-escaped or (for `/`)
    /// `\/`-escaped as `pick` says.
    fn escaped(s: &str, pick: &[u8]) -> String {
        let mut out = String::from("\"");
        for (i, c) in s.chars().enumerate() {
            match (pick.get(i % pick.len().max(1)).copied().unwrap_or(0) % 3, c) {
                (_, '"') => out.push_str("\\\""),
                (_, '\\') => out.push_str("\\\\"),
                (_, c) if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
                (1, c) => {
                    let mut units = [0; 2];
                    for u in c.encode_utf16(&mut units) {
                        out.push_str(&format!("\\u{u:04X}"));
                    }
                }
                (2, '/') => out.push_str("\\/"),
                (_, c) => out.push(c),
            }
        }
        out.push('"');
        out
    }

    fn ws() -> impl proptest::strategy::Strategy<Value = String> {
        proptest::sample::select(vec!["", " ", "\n", "\t ", "\r\n  "]).prop_map(str::to_owned)
    }

    fn key() -> impl proptest::strategy::Strategy<Value = String> {
        let plain = proptest::sample::select(vec![
            "id",
            "session_id",
            "program_id",
            "provider",
            "x",
            "",
            "a/b",
            "é",
            "😀",
            "\"q\"",
            "tab\t",
        ])
        .prop_map(str::to_owned);
        proptest::prop_oneof![4 => plain, 1 => ".{0,6}"]
    }

    /// A JSON text of a value, with random whitespace and escaping, nested at most `depth`.
    fn value_text(depth: u32) -> proptest::strategy::BoxedStrategy<String> {
        let leaf = proptest::prop_oneof![
            proptest::sample::select(vec![
                "null",
                "true",
                "false",
                "0",
                "-0",
                "1.5",
                "-2e3",
                "1E+2",
                "123456789012345678901",
            ])
            .prop_map(str::to_owned),
            (
                key(),
                proptest::collection::vec(proptest::prelude::any::<u8>(), 1..4)
            )
                .prop_map(|(s, pick)| escaped(&s, &pick)),
        ];
        leaf.prop_recursive(depth, 64, 6, |inner| {
            proptest::prop_oneof![
                proptest::collection::vec((ws(), inner.clone(), ws()), 0..5).prop_map(|items| {
                    let items: Vec<String> = items
                        .into_iter()
                        .map(|(a, v, b)| format!("{a}{v}{b}"))
                        .collect();
                    format!("[{}]", items.join(","))
                }),
                object_text(inner),
            ]
        })
        .boxed()
    }

    fn object_text(
        values: proptest::strategy::BoxedStrategy<String>,
    ) -> impl proptest::strategy::Strategy<Value = String> {
        (
            proptest::collection::vec(
                (
                    ws(),
                    key(),
                    proptest::collection::vec(proptest::prelude::any::<u8>(), 1..4),
                    ws(),
                    ws(),
                    values,
                    ws(),
                ),
                0..6,
            ),
            ws(),
        )
            .prop_map(|(members, end)| {
                let members: Vec<String> = members
                    .into_iter()
                    .map(|(a, k, pick, b, c, v, d)| {
                        format!("{a}{}{b}:{c}{v}{d}", escaped(&k, &pick))
                    })
                    .collect();
                format!("{{{}{end}}}", members.join(","))
            })
    }

    fn args_text() -> impl proptest::strategy::Strategy<Value = String> {
        proptest::prop_oneof![
            8 => object_text(value_text(4)),
            1 => value_text(3),
            1 => ".{0,12}",
        ]
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig {
            failure_persistence: None,
            cases: 512,
            ..Default::default()
        })]

        /// On any text serde_json reads (under its 128 levels), the raw record restores what
        /// the serde_json one did, and agrees on which configure_lm is global.
        #[test]
        fn raw_records_agree_with_serde_json(
            steps in proptest::collection::vec(
                (
                    proptest::sample::select(vec![
                        "create_program", "delete_program", "configure_lm", "ping",
                    ]),
                    args_text(),
                    proptest::prop_oneof![
                        Just(String::from("{}")),
                        Just(String::from("null")),
                        key().prop_map(|k| format!(r#"{{"program_id":{}}}"#, escaped(&k, &[0]))),
                        key().prop_map(|k| format!(r#"{{"pro\u0067ram_id" : {} }}"#, escaped(&k, &[1]))),
                        Just(String::from(r#"{"program_id":5}"#)),
                        Just(String::from(r#"{"program_id":null}"#)),
                    ],
                ),
                1..6,
            ),
        ) {
            let mut new = SessionRecord::default();
            let mut old = OldRecord::default();
            for (command, args, result) in &steps {
                proptest::prop_assert_eq!(
                    is_global_config(command, args.as_bytes()),
                    old_is_global_config(command, args.as_bytes()),
                    "is_global_config on {}", args
                );
                let changed_new = new.apply(command, args.as_bytes(), result.as_bytes());
                let changed_old = old.apply(command, args.as_bytes(), result.as_bytes());
                proptest::prop_assert_eq!(changed_new, changed_old, "{} {} -> {}", command, args, result);
                let restore = new.restore_args("s\"\u{e9}");
                let restore: Value = serde_json::from_slice(&restore)
                    .map_err(|e| proptest::test_runner::TestCaseError::fail(format!("{e}: {}", String::from_utf8_lossy(&restore))))?;
                proptest::prop_assert_eq!(restore, old.restore("s\"\u{e9}"));
            }
        }
    }
}
