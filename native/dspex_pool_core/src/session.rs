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

    /// Applies a successful reply of `command` (`result`: the reply's result, as JSON text);
    /// true when the record changed.
    pub fn apply(&mut self, command: &str, args: &[u8], result: &[u8]) -> bool {
        let Some(mut args) = RawObject::parse(args) else {
            return false;
        };
        args.remove("session_id");
        let changed = match command {
            "create_program" => {
                let id = RawObject::parse(result)
                    .and_then(|r| r.get_str("program_id"))
                    .or_else(|| args.get_str("id"));
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

/// A `configure_lm` without a session configures every worker, present and future.
pub fn is_global_config(command: &str, args: &[u8]) -> bool {
    command == "configure_lm"
        && !RawObject::parse(args)
            .and_then(|m| m.get("session_id").map(|s| s != b"null"))
            .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;
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
}
