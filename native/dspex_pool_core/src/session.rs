//! What a session created, so that any worker can re-create it.
//!
//! The DSPy bridge keeps a session's programs and LM in the one Python process that ran the
//! commands. The pool watches the replies of the commands that change that state and keeps a
//! record; a worker whose copy is behind gets a `restore_session` frame before the session's
//! next request. Only what the commands say is recorded: program specs and the session's
//! `configure_lm` arguments, not Python objects mutated in place (use `:strict` for those).

use serde_json::{json, Map, Value};

/// A session's recorded state. `generation` grows with every change.
#[derive(Debug, Default)]
pub struct SessionRecord {
    /// Unique to this record among all the pool's records, ended ones included.
    pub epoch: u64,
    pub generation: u64,
    programs: Vec<(String, Value)>,
    lm: Option<Value>,
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

    /// Applies a successful reply of `command`; true when the record changed.
    pub fn apply(&mut self, command: &str, args: &[u8], result: &Value) -> bool {
        let Ok(Value::Object(mut args)) = serde_json::from_slice::<Value>(args) else {
            return false;
        };
        args.remove("session_id");
        let changed = match command {
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
        let programs: Vec<&Value> = self.programs.iter().map(|(_, v)| v).collect();
        serde_json::to_vec(&json!({
            "session_id": session_id,
            "programs": programs,
            "lm": self.lm,
        }))
        .expect("JSON values serialise")
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
        && !matches!(
            serde_json::from_slice::<Map<String, Value>>(args),
            Ok(m) if m.get("session_id").is_some_and(|s| !s.is_null())
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_programs_and_lm_and_forgets_deleted_ones() {
        let mut r = SessionRecord::default();
        assert!(!r.has_state());
        let spec = br#"{"session_id":"s","signature":{"inputs":[],"outputs":[]}}"#;
        assert!(r.apply("create_program", spec, &json!({"program_id": "p1"})));
        assert!(r.apply(
            "configure_lm",
            br#"{"session_id":"s","provider":"dummy"}"#,
            &json!({})
        ));
        assert_eq!(r.generation, 2);
        let restore: Value = serde_json::from_slice(&r.restore_args("s")).unwrap();
        assert_eq!(restore["programs"][0]["id"], "p1");
        assert!(restore["programs"][0].get("session_id").is_none());
        assert_eq!(restore["lm"]["provider"], "dummy");
        assert!(r.apply("delete_program", br#"{"program_id":"p1"}"#, &json!({})));
        assert!(!r.apply("delete_program", br#"{"program_id":"p1"}"#, &json!({})));
        assert_eq!(r.generation, 3);
    }

    #[test]
    fn global_config_is_configure_lm_without_session() {
        assert!(is_global_config("configure_lm", br#"{"provider":"dummy"}"#));
        assert!(is_global_config("configure_lm", br#"{"session_id":null}"#));
        assert!(!is_global_config("configure_lm", br#"{"session_id":"s"}"#));
        assert!(!is_global_config("ping", b"{}"));
    }
}
