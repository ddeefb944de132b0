//! LLM token budgets, from the policy's data (`data.enforcer.llm.budgets`):
//! per caller SPIFFE ID (or `"*"` for every caller without its own entry),
//! tokens per window in all, and optionally per model. Checked when a
//! policy set is loaded: a malformed budget rejects the set, and the
//! previous one stays in force.
use std::collections::{BTreeMap, HashMap};

use serde::Deserialize;

/// Where in `data` the budgets live.
pub const DATA_PATH: &str = "/enforcer/llm/budgets";
/// The window when a budget names none, and the window usage is counted
/// over for callers without a budget.
pub const DEFAULT_WINDOW_SECS: u64 = 3600;
const MAX_WINDOW_SECS: u64 = 31 * 24 * 3600;

/// One caller's budget.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Budget {
    /// Tokens (prompt and completion, all models) per window.
    #[serde(default)]
    pub tokens: Option<u64>,
    #[serde(default = "default_window")]
    pub window_secs: u64,
    /// Tokens per window of one model.
    #[serde(default)]
    pub models: BTreeMap<String, u64>,
}

fn default_window() -> u64 {
    DEFAULT_WINDOW_SECS
}

/// What a caller has used in its current window.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Used {
    /// All models.
    pub total: u64,
    /// The model of the request.
    pub model: u64,
}

impl Budget {
    /// Why the caller may not start another request: the cap it reached.
    pub fn spent(&self, used: Used, model: Option<&str>) -> Option<String> {
        if let Some(cap) = self.tokens
            && used.total >= cap
        {
            return Some(format!(
                "token budget spent: {} of {cap} tokens used in this {} s window",
                used.total, self.window_secs
            ));
        }
        let (m, cap) = model.and_then(|m| self.models.get_key_value(m))?;
        (used.model >= *cap).then(|| {
            format!(
                "token budget for model {m} spent: {} of {cap} tokens used in this {} s window",
                used.model, self.window_secs
            )
        })
    }

    /// Whether a running count passed a cap (a stream is cut).
    pub fn passed(&self, used: Used, model: Option<&str>) -> bool {
        self.tokens.is_some_and(|cap| used.total > cap)
            || model
                .and_then(|m| self.models.get(m))
                .is_some_and(|cap| used.model > *cap)
    }
}

/// Every caller's budget.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Budgets(HashMap<String, Budget>);

impl Budgets {
    /// Reads `data.enforcer.llm.budgets` (absent: no budgets).
    pub fn from_data(data: &serde_json::Value) -> Result<Self, String> {
        let Some(v) = data.pointer(DATA_PATH) else {
            return Ok(Self::default());
        };
        let map: HashMap<String, Budget> = serde_json::from_value(v.clone())
            .map_err(|e| format!("data.enforcer.llm.budgets: {e}"))?;
        for (id, b) in &map {
            if !(1..=MAX_WINDOW_SECS).contains(&b.window_secs) {
                return Err(format!(
                    "data.enforcer.llm.budgets[{id:?}].window_secs: {} is outside 1..={MAX_WINDOW_SECS}",
                    b.window_secs
                ));
            }
            if id != "*" && spiffe::SpiffeId::new(id).is_err() {
                return Err(format!(
                    "data.enforcer.llm.budgets: {id:?} is neither a SPIFFE ID nor \"*\""
                ));
            }
        }
        Ok(Self(map))
    }

    /// The caller's budget: its own, else `"*"`'s.
    pub fn of(&self, source: &str) -> Option<&Budget> {
        self.0.get(source).or_else(|| self.0.get("*"))
    }

    /// The budgets as JSON (the admin endpoint).
    pub fn to_json(&self) -> serde_json::Value {
        self.0
            .iter()
            .map(|(id, b)| {
                (
                    id.clone(),
                    serde_json::json!({"tokens": b.tokens, "window_secs": b.window_secs, "models": b.models}),
                )
            })
            .collect::<serde_json::Map<_, _>>()
            .into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn budgets_are_read_from_policy_data_and_checked() {
        let data = json!({"enforcer": {"llm": {"budgets": {
            "spiffe://td/agent/a": {"tokens": 100, "window_secs": 60, "models": {"big": 10}},
            "*": {"tokens": 5},
        }}}});
        let b = Budgets::from_data(&data).expect("budgets");
        let a = b.of("spiffe://td/agent/a").expect("a");
        assert_eq!(a.window_secs, 60);
        assert_eq!(b.of("spiffe://td/other").and_then(|b| b.tokens), Some(5));
        assert_eq!(
            b.of("spiffe://td/other").map(|b| b.window_secs),
            Some(DEFAULT_WINDOW_SECS)
        );
        let used = |total, model| Used { total, model };
        assert!(a.spent(used(99, 9), Some("big")).is_none());
        assert!(a.spent(used(100, 0), None).is_some());
        assert!(
            a.spent(used(10, 10), Some("big"))
                .expect("spent")
                .contains("model big")
        );
        assert!(a.spent(used(10, 10), Some("small")).is_none());
        assert!(!a.passed(used(100, 10), Some("big")));
        assert!(a.passed(used(101, 0), None));
        assert!(a.passed(used(20, 11), Some("big")));
        assert_eq!(Budgets::from_data(&json!({})), Ok(Budgets::default()));

        for (bad, says) in [
            (json!({"spiffe://td/a": {"tokens": -1}}), "budgets"),
            (json!({"spiffe://td/a": {"tokenz": 1}}), "tokenz"),
            (json!({"spiffe://td/a": {"window_secs": 0}}), "window_secs"),
            (json!({"agent-a": {"tokens": 1}}), "agent-a"),
            (json!([1]), "budgets"),
        ] {
            let data = json!({"enforcer": {"llm": {"budgets": bad}}});
            let err = Budgets::from_data(&data).expect_err("refused");
            assert!(err.contains(says), "{err}");
        }
    }
}
