//! OPA/Rego policy (DESIGN §3): package `enforcer.authz`, entry
//! `data.enforcer.authz.allow` (bool) and optional `data.enforcer.authz.reason`.
//! Evaluated on both sides of every connection; no policy, an undefined
//! `allow` or an evaluation error all deny (fail closed).
pub mod audit;
pub mod load;
pub mod source;
pub mod testing;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, RwLock},
    time::Instant,
};

use regorus::{Engine, Value};
use serde::Serialize;

pub use load::LoadError;

pub const ALLOW_RULE: &str = "data.enforcer.authz.allow";
pub const REASON_RULE: &str = "data.enforcer.authz.reason";
/// `path` of the decision-log lines.
pub const DECISION_PATH: &str = "enforcer/authz/allow";
/// Decisions kept in the cache before it is emptied.
const CACHE_LIMIT: usize = 16_384;

/// The input document (DESIGN §3). Absent fields are unknown.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct Input {
    pub direction: &'static str,
    pub source: Peer,
    pub destination: Peer,
    pub protocol: &'static str,
}

#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct Peer {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub spiffe_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trust_domain: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub authenticated: Option<bool>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub selectors: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
}

impl Peer {
    /// Sets the SPIFFE ID and its trust domain.
    pub fn with_id(mut self, id: Option<&spiffe::SpiffeId>) -> Self {
        if let Some(id) = id {
            self.spiffe_id = Some(id.to_string());
            self.trust_domain = Some(id.trust_domain_name().to_owned());
        }
        self
    }
}

/// `enforce`: deny means deny. `dry-run`: a deny is logged as "would deny" and allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    #[default]
    Enforce,
    DryRun,
}

/// The outcome of one evaluation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// What the policy said (`false` for errors and no policy).
    pub allow: bool,
    pub reason: Option<String>,
    /// Set when evaluation failed (then `allow` is false).
    pub error: Option<String>,
    pub cached: bool,
}

impl Decision {
    fn deny(reason: &str, error: Option<String>) -> Self {
        Self {
            allow: false,
            reason: Some(reason.to_owned()),
            error,
            cached: false,
        }
    }
}

/// A compiled policy set and where it came from.
pub struct Loaded {
    engine: Mutex<Engine>,
    pub revision: String,
}

impl Loaded {
    /// Compiles `files` and checks that the entry point evaluates.
    pub fn compile(
        origin: &str,
        revision: String,
        files: &[load::PolicyFile],
    ) -> Result<Self, LoadError> {
        let mut engine = load::compile(origin, files)?;
        // Evaluating once prepares the engine and surfaces errors that only
        // show when rules are resolved.
        engine.set_input(Value::new_object());
        engine
            .eval_rule(ALLOW_RULE.to_owned())
            .map_err(|e| LoadError::Check(format!("{origin}: evaluating {ALLOW_RULE}: {e}")))?;
        Ok(Self {
            engine: Mutex::new(engine),
            revision,
        })
    }

    /// Evaluates `allow` and `reason` for one input.
    pub fn evaluate(&self, input_json: &str) -> Decision {
        let mut engine = self.engine.lock().unwrap_or_else(|p| p.into_inner());
        let input = match Value::from_json_str(input_json) {
            Ok(v) => v,
            Err(e) => return Decision::deny("invalid input", Some(e.to_string())),
        };
        engine.set_input(input);
        let allow = match engine.eval_rule(ALLOW_RULE.to_owned()) {
            Ok(Value::Bool(b)) => b,
            Ok(Value::Undefined) => false,
            Ok(other) => {
                return Decision::deny(
                    "policy error",
                    Some(format!("{ALLOW_RULE} is not a boolean: {other}")),
                );
            }
            Err(e) => return Decision::deny("policy error", Some(e.to_string())),
        };
        let reason = match engine.eval_rule(REASON_RULE.to_owned()) {
            Ok(Value::String(s)) => Some(s.to_string()),
            _ => None,
        };
        Decision {
            allow,
            reason,
            error: None,
            cached: false,
        }
    }
}

/// The policy in force, its decision cache, and the audit trail.
pub struct Policy {
    current: RwLock<Option<Arc<Loaded>>>,
    pub mode: Mode,
    cache: Mutex<HashMap<String, Decision>>,
    pub audit: audit::AuditLog,
    pub metrics: Arc<crate::admin::Metrics>,
}

/// The verdict applied to a connection, after the mode.
#[derive(Debug, Clone)]
pub struct Verdict {
    pub allowed: bool,
    pub decision: Decision,
    pub decision_id: String,
}

impl Policy {
    pub fn new(mode: Mode, audit: audit::AuditLog, metrics: Arc<crate::admin::Metrics>) -> Self {
        Self {
            current: RwLock::new(None),
            mode,
            cache: Mutex::default(),
            audit,
            metrics,
        }
    }

    /// Puts a new policy set in force and empties the decision cache.
    pub fn install(&self, loaded: Loaded) {
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(loaded));
        self.invalidate();
    }

    /// Empties the decision cache (policy reload, identity change).
    pub fn invalidate(&self) {
        self.cache.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }

    pub fn revision(&self) -> Option<String> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|l| l.revision.clone())
    }

    /// Decides one connection, audits the decision and counts it.
    pub fn decide(&self, input: &Input, conn_id: u64) -> Verdict {
        let (d, evaluated) = self.evaluate(input);
        self.finish(input, conn_id, d, evaluated)
    }

    /// The decision alone (cache, then policy), without audit or metrics;
    /// for an evaluation, also its duration and the policy revision.
    pub fn evaluate(&self, input: &Input) -> (Decision, Option<(std::time::Duration, String)>) {
        let input_json = match serde_json::to_string(input) {
            Ok(j) => j,
            Err(e) => return (Decision::deny("invalid input", Some(e.to_string())), None),
        };
        if let Some(d) = self
            .cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&input_json)
        {
            let mut d = d.clone();
            d.cached = true;
            return (d, None);
        }
        let loaded = self
            .current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let Some(loaded) = loaded else {
            return (Decision::deny("no policy loaded", None), None);
        };
        let started = Instant::now();
        let d = loaded.evaluate(&input_json);
        let elapsed = started.elapsed();
        if d.error.is_none() {
            let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            if cache.len() >= CACHE_LIMIT {
                cache.clear();
            }
            cache.insert(input_json, d.clone());
        }
        (d, Some((elapsed, loaded.revision.clone())))
    }

    fn finish(
        &self,
        input: &Input,
        conn_id: u64,
        decision: Decision,
        evaluated: Option<(std::time::Duration, String)>,
    ) -> Verdict {
        let allowed = decision.allow || self.mode == Mode::DryRun;
        let result = match (decision.allow, &decision.error, self.mode) {
            (true, _, _) => "allow",
            (false, Some(_), Mode::Enforce) => "error",
            (false, _, Mode::DryRun) => "would_deny",
            (false, None, Mode::Enforce) => "deny",
        };
        if let Some((elapsed, _)) = &evaluated {
            self.metrics
                .policy_eval_seconds
                .observe(elapsed.as_secs_f64());
        }
        self.metrics.policy_decision(
            input.direction,
            result,
            input.source.spiffe_id.as_deref(),
            input.destination.spiffe_id.as_deref(),
        );
        let decision_id = uuid::Uuid::new_v4().to_string();
        if let Some(e) = &decision.error {
            tracing::warn!(conn_id, decision_id, error = %e, "policy evaluation failed; denying");
        }
        if !decision.allow && self.mode == Mode::DryRun {
            tracing::warn!(conn_id, decision_id, reason = ?decision.reason, "would deny (dry-run): allowing");
        }
        self.audit.record(&audit::Line {
            decision_id: &decision_id,
            conn_id,
            input,
            allow: decision.allow,
            reason: decision.reason.as_deref(),
            error: decision.error.as_deref(),
            enforced: self.mode == Mode::Enforce,
            cached: decision.cached,
            revision: evaluated.as_ref().map(|(_, r)| r.as_str()),
        });
        Verdict {
            allowed,
            decision,
            decision_id,
        }
    }
}
