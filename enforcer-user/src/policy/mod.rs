//! OPA/Rego policy (DESIGN §3): package `enforcer.authz`, entry
//! `data.enforcer.authz.allow` (bool) and optional `data.enforcer.authz.reason`.
//! Evaluated on both sides of every connection; no policy, an undefined
//! `allow` or an evaluation error all deny (fail closed).
pub mod audit;
pub mod budgets;
pub mod bundle;
pub mod load;
pub mod pool;
pub mod rewrite;
pub mod ship;
pub mod signing;
pub mod source;
pub mod testing;

use std::{
    sync::{Arc, Mutex, RwLock},
    time::{Duration, Instant},
};

use regorus::{
    Engine, Value,
    languages::rego::compiler::Compiler,
    rvm::{Program, RegoVM},
};
use serde::Serialize;

pub use load::LoadError;

pub const ALLOW_RULE: &str = "data.enforcer.authz.allow";
pub const REASON_RULE: &str = "data.enforcer.authz.reason";
/// `path` of the decision-log lines.
pub const DECISION_PATH: &str = "enforcer/authz/allow";
/// Decisions kept in the cache (then the least recently used leave).
const CACHE_LIMIT: usize = 16_384;
/// Bytes of keys kept in the cache (then the least recently used leave).
const CACHE_BYTES: usize = 8 << 20;
/// The longest cache key: an input whose read parts are longer is not cached.
const MAX_KEY: usize = 4096;

/// The input document (DESIGN §3). Absent fields are unknown.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct Input {
    pub direction: &'static str,
    pub source: Peer,
    pub destination: Peer,
    pub protocol: &'static str,
    /// For a decision on one L7 request: the request-level fields (DESIGN
    /// §3: `attributes`, `parsed_path`, `parsed_query`, `parsed_body`,
    /// `truncated_body`, `mcp`), beside the connection's.
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub request: Option<Box<serde_json::Map<String, serde_json::Value>>>,
}

impl Input {
    /// The input as a regorus value: the same document as its JSON
    /// serialization (a unit test checks), built without a text round trip.
    pub fn to_value(&self) -> Value {
        let mut v = Value::new_object();
        if let Ok(m) = v.as_object_mut() {
            m.insert("direction".into(), self.direction.into());
            m.insert("source".into(), self.source.to_value());
            m.insert("destination".into(), self.destination.to_value());
            m.insert("protocol".into(), self.protocol.into());
            for (k, x) in self.request.iter().flat_map(|r| r.iter()) {
                // Read by reference as `Value::from` reads an owned one
                // (regorus's `Deserialize`), without copying the request's
                // JSON first; a value it cannot read is undefined, as there.
                let x = <Value as serde::Deserialize>::deserialize(x).unwrap_or(Value::Undefined);
                m.insert(k.as_str().into(), x);
            }
        }
        v
    }
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
    fn to_value(&self) -> Value {
        let mut v = Value::new_object();
        if let Ok(m) = v.as_object_mut() {
            let mut put = |k: &str, x: Option<Value>| {
                if let Some(x) = x {
                    m.insert(k.into(), x);
                }
            };
            put("spiffe_id", self.spiffe_id.as_deref().map(Value::from));
            put(
                "trust_domain",
                self.trust_domain.as_deref().map(Value::from),
            );
            put("authenticated", self.authenticated.map(Value::from));
            put(
                "selectors",
                (!self.selectors.is_empty()).then(|| {
                    Value::from(
                        self.selectors
                            .iter()
                            .map(|s| Value::from(s.as_str()))
                            .collect::<Vec<_>>(),
                    )
                }),
            );
            put("address", self.address.as_deref().map(Value::from));
            put("port", self.port.map(|p| Value::from(u64::from(p))));
            put("node", self.node.as_deref().map(Value::from));
        }
        v
    }

    /// Sets the SPIFFE ID and its trust domain.
    pub fn with_id(mut self, id: Option<&spiffe::SpiffeId>) -> Self {
        if let Some(id) = id {
            self.spiffe_id = Some(id.to_string());
            self.trust_domain = Some(id.trust_domain_name().to_owned());
        }
        self
    }
}

pub use crate::config::{DEFAULT_EVAL_TIMEOUT, EngineKind, Mode};

/// The outcome of one evaluation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// What the policy said (`false` for errors and no policy).
    pub allow: bool,
    /// Shared: a cached decision is cloned for every connection it
    /// decides, and its reason with it.
    pub reason: Option<Arc<str>>,
    /// Set when evaluation failed (then `allow` is false).
    pub error: Option<String>,
    pub cached: bool,
    /// `allow` was undefined (denied; OPA logs no `result`).
    pub undefined: bool,
    /// The evaluation ran past its budget (an error, but one the same input
    /// would give again: cached, so a runaway input is not re-run).
    pub timed_out: bool,
}

impl Decision {
    fn deny(reason: &str, error: Option<String>) -> Self {
        Self {
            allow: false,
            reason: Some(reason.into()),
            error,
            cached: false,
            undefined: false,
            timed_out: false,
        }
    }
}

/// Upper bound on VM instructions for one rule evaluation; beyond it the
/// evaluation fails and the connection is denied.
const VM_MAX_INSTRUCTIONS: usize = 10_000_000;

enum Evaluator {
    /// Compiled bytecode and the data document; a fresh VM per evaluation,
    /// so evaluations on different threads do not wait for each other.
    Vm {
        program: Arc<Program>,
        data: Value,
        has_reason: bool,
    },
    /// The prepared engine; each thread evaluates on its own clone
    /// (`ENGINES`), so evaluations never wait for each other. `entry`: it
    /// holds [`ENTRY_MODULE`], which gives `allow` and `reason` in one
    /// evaluation.
    Interpreter { engine: Box<Engine>, entry: bool },
}

/// A module enforcer adds to the interpreter's copy of a policy: one rule
/// whose value is `allow` and `reason`, each as an array of its value (empty
/// when undefined). One evaluation of it gives both, each rule they depend
/// on evaluated once; two `eval_rule` calls start afresh each time, and an
/// uncached decision with the shipped policy took 1.6× as long that way
/// (bench/README.md, "One evaluation for allow and reason").
const ENTRY_MODULE: &str = "package enforcer_internal_entry_7c1f\n\n\
     decision := [[x | x := data.enforcer.authz.allow], [x | x := data.enforcer.authz.reason]]\n";
const ENTRY_PACKAGE: &str = "data.enforcer_internal_entry_7c1f";
const ENTRY_RULE: &str = "data.enforcer_internal_entry_7c1f.decision";

/// `engine` with [`ENTRY_MODULE`] added, if the policy leaves its package
/// free and the entry gives what the two rules give on the empty input;
/// `None` (and the engine as it was) otherwise.
fn with_entry(engine: &Engine, empty: &(Value, Value)) -> Option<Engine> {
    let packages = engine.get_packages().ok()?;
    if packages.iter().any(|p| p == ENTRY_PACKAGE)
        || engine.get_data()[ENTRY_PACKAGE.trim_start_matches("data.")] != Value::Undefined
    {
        return None;
    }
    let mut with = engine.clone();
    with.add_policy("enforcer-internal-entry.rego".into(), ENTRY_MODULE.into())
        .ok()?;
    with.set_input(Value::new_object());
    let both = with.eval_rule(ENTRY_RULE.to_owned()).ok()?;
    (entry_values(&both)? == *empty).then_some(with)
}

/// `allow` and `reason` from the entry rule's value (`Undefined` for an
/// empty array); `None` if it has another shape.
fn entry_values(v: &Value) -> Option<(Value, Value)> {
    let parts = v.as_array().ok()?;
    let [allow, reason] = parts.as_slice() else {
        return None;
    };
    let one = |x: &Value| -> Option<Value> {
        match x.as_array().ok()?.as_slice() {
            [] => Some(Value::Undefined),
            [v] => Some(v.clone()),
            _ => None,
        }
    };
    Some((one(allow)?, one(reason)?))
}

/// Whether regorus stopped the evaluation at its time budget.
fn out_of_time(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        matches!(
            c.downcast_ref::<regorus::utils::limits::LimitError>(),
            Some(regorus::utils::limits::LimitError::TimeLimitExceeded { .. })
        )
    })
}

/// Identifies a `Loaded` for the per-thread engine clones.
static NEXT_LOADED_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

thread_local! {
    /// This thread's clone of the interpreter engine of one `Loaded` (by id).
    static ENGINES: std::cell::RefCell<Option<(u64, Engine)>> = const { std::cell::RefCell::new(None) };
}

/// A compiled policy set and where it came from.
pub struct Loaded {
    evaluator: Evaluator,
    /// A digest of the set's files: what the logs and reload compare.
    pub revision: String,
    /// The bundle's name and manifest revision, when it came as a bundle.
    pub bundle: Option<load::BundleRevision>,
    id: u64,
    /// Some module calls a builtin whose value is not a function of the input
    /// (`time.now_ns`…): its decisions are never cached.
    pub volatile: bool,
    /// The parts of `input` the policy can read (`rewrite::Seg` paths):
    /// a decision is cached under those parts of its input alone, so two
    /// requests that differ only in what the policy never reads (a request
    /// id, a client port) share it. `None`: under the whole input.
    pub input_reads: Option<Arc<Vec<Vec<rewrite::Seg>>>>,
    /// Paths it only tests for truth: the key holds whether each is
    /// defined and not false, not its value.
    input_truths: Arc<Vec<Vec<rewrite::Seg>>>,
    timeout: Duration,
    /// LLM token budgets from `data.enforcer.llm.budgets`.
    pub llm_budgets: Arc<budgets::Budgets>,
}

impl Loaded {
    /// Compiles `files` (no manifest) and checks that the entry point
    /// evaluates.
    pub fn compile(
        origin: &str,
        files: &[load::PolicyFile],
        kind: EngineKind,
    ) -> Result<Self, LoadError> {
        let set = load::PolicySet::plain(files.to_vec());
        Self::compile_with(origin, &set, kind, DEFAULT_EVAL_TIMEOUT)
    }

    /// Compiles a policy set with the evaluation time budget.
    pub fn compile_with(
        origin: &str,
        set: &load::PolicySet,
        kind: EngineKind,
        timeout: Duration,
    ) -> Result<Self, LoadError> {
        let load::Compiled {
            mut engine,
            volatile,
            input_reads,
            input_truths,
        } = load::compile_set(origin, set.files(), set.roots())?;
        engine.set_execution_timer_config(timer(timeout));
        let llm_budgets = serde_json::to_value(engine.get_data())
            .map_err(|e| e.to_string())
            .and_then(|data| budgets::Budgets::from_data(&data))
            .map_err(|e| LoadError::Check(format!("{origin}: {e}")))?;
        // Evaluating once prepares the engine and surfaces errors that only
        // show when rules are resolved.
        engine.set_input(Value::new_object());
        let empty = engine
            .eval_rule(ALLOW_RULE.to_owned())
            .map_err(|e| LoadError::Check(format!("{origin}: evaluating {ALLOW_RULE}: {e}")))?;
        // The interpreter, with the entry rule where it gives what the two
        // rules give on the empty input (`reason` read only here: the VM
        // compiles its own).
        let interpreter = |mut engine: Engine| {
            engine.set_input(Value::new_object());
            let reason = engine
                .eval_rule(REASON_RULE.to_owned())
                .unwrap_or(Value::Undefined);
            match with_entry(&engine, &(empty.clone(), reason)) {
                Some(with) => Evaluator::Interpreter {
                    engine: Box::new(with),
                    entry: true,
                },
                None => {
                    tracing::debug!(origin, "allow and reason are evaluated one after the other");
                    Evaluator::Interpreter {
                        engine: Box::new(engine),
                        entry: false,
                    }
                }
            }
        };
        let evaluator = match kind {
            EngineKind::Interpreter => interpreter(engine),
            EngineKind::Vm => match vm_program(&mut engine) {
                Ok((program, has_reason)) => {
                    let vm = Evaluator::Vm {
                        program,
                        data: engine.get_data(),
                        has_reason,
                    };
                    // The two evaluators must agree on the empty input.
                    let check = vm.eval(0, timeout, Value::new_object());
                    if matches!(&check, Ok((allow, _)) if *allow == empty) {
                        vm
                    } else {
                        tracing::warn!(origin, vm = ?check, interpreter = %empty,
                            "the regorus VM and the interpreter disagree on the empty input; using the interpreter");
                        interpreter(engine)
                    }
                }
                Err(why) => {
                    tracing::info!(origin, why = %why,
                        "the policy runs on the regorus interpreter, not the VM");
                    interpreter(engine)
                }
            },
        };
        Ok(Self {
            evaluator,
            revision: set.digest().to_owned(),
            bundle: set.bundle().cloned(),
            id: NEXT_LOADED_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            volatile,
            input_reads: input_reads.map(Arc::new),
            input_truths: Arc::new(input_truths),
            timeout,
            llm_budgets: Arc::new(llm_budgets),
        })
    }

    /// `vm` or `interpreter`: what evaluates this policy.
    pub fn engine(&self) -> &'static str {
        match self.evaluator {
            Evaluator::Vm { .. } => "vm",
            Evaluator::Interpreter { .. } => "interpreter",
        }
    }

    /// Evaluates `allow` and `reason` for one input document, on this
    /// thread (blocking: within the time budget, or past it by at most one
    /// builtin call). The agent calls it on the evaluation pool.
    pub fn evaluate(&self, input: Value) -> Decision {
        let (allow, reason) = match self.evaluator.eval(self.id, self.timeout, input) {
            Ok(r) => r,
            Err(e) => return Decision::deny("policy error", Some(e)),
        };
        let undefined = allow == Value::Undefined;
        let allow = match allow {
            Value::Bool(b) => b,
            Value::Undefined => false,
            other => {
                return Decision::deny(
                    "policy error",
                    Some(format!("{ALLOW_RULE} is not a boolean: {other}")),
                );
            }
        };
        Decision {
            allow,
            reason: match reason {
                Value::String(s) => Some(s.as_ref().into()),
                _ => None,
            },
            error: None,
            cached: false,
            undefined,
            timed_out: false,
        }
    }
}

/// regorus's cooperative time limit: checked every few hundred steps.
fn timer(limit: Duration) -> regorus::utils::limits::ExecutionTimerConfig {
    regorus::utils::limits::ExecutionTimerConfig {
        limit,
        check_interval: std::num::NonZeroU32::new(256).unwrap_or(std::num::NonZeroU32::MIN),
    }
}

/// Compiles the entry points to regorus VM bytecode, if the VM decides
/// `allow` exactly as the interpreter (OPA semantics) does; else says why not.
/// Also says whether the policy declares `reason`.
fn vm_program(engine: &mut Engine) -> Result<(Arc<Program>, bool), String> {
    let entry: regorus::Rc<str> = ALLOW_RULE.into();
    let compiled = engine
        .compile_with_entrypoint(&entry)
        .map_err(|e| e.to_string())?;
    // The rules `allow` depends on, alone: the ones that must not diverge.
    let allow_only =
        Compiler::compile_from_policy(&compiled, &[ALLOW_RULE]).map_err(|e| e.to_string())?;
    if let Some(why) = vm_divergence(&allow_only) {
        return Err(why);
    }
    // `reason` is optional: compiled in when the policy declares it.
    if !compiled.get_rules().contains_key(REASON_RULE) {
        return Ok((allow_only, false));
    }
    let both = Compiler::compile_from_policy(&compiled, &[ALLOW_RULE, REASON_RULE])
        .map_err(|e| e.to_string())?;
    Ok((both, true))
}

/// Where the VM could decide differently from OPA. OPA (and the regorus
/// interpreter) fail an evaluation when a complete rule or function yields
/// two different values, and enforcer denies; the VM instead treats the rule
/// as undefined, and under `not` that would allow. So the VM is used only
/// when no rule in `program` can yield two values: every complete rule and
/// function has one definition, or definitions that all give the same
/// constant, and takes no non-constant value inside an iteration; no partial
/// object rule (duplicate keys); no dynamic `data[x]` rule lookup.
fn vm_divergence(program: &Program) -> Option<String> {
    use regorus::rvm::{Instruction as I, program::RuleType};
    for rule in &program.rule_infos {
        let name = &rule.name;
        match rule.rule_type {
            RuleType::PartialSet => continue,
            RuleType::PartialObject => {
                return Some(format!("{name} is a partial object rule"));
            }
            RuleType::Complete if rule.early_exit_on_first_success => continue,
            RuleType::Complete => {}
        }
        if rule.definitions.len() > 1 {
            return Some(format!(
                "{name} has {} definitions that can give different values",
                rule.definitions.len()
            ));
        }
        for &entry in rule.definitions.iter().flatten() {
            let mut loops = 0u32;
            let mut comprehensions = 0u32;
            let mut previous: Option<I> = None;
            for &ins in program.instructions.iter().skip(entry as usize) {
                match ins {
                    I::RuleReturn {} => break,
                    I::ComprehensionBegin { .. } => comprehensions += 1,
                    I::ComprehensionEnd {} => comprehensions = comprehensions.saturating_sub(1),
                    I::LoopStart { .. } if comprehensions == 0 => loops += 1,
                    I::LoopNext { .. } if comprehensions == 0 => loops = loops.saturating_sub(1),
                    I::Move { dest, src } if dest == rule.result_reg && loops > 0 => {
                        let constant = matches!(previous,
                            Some(I::Load { dest: d, .. } | I::LoadBool { dest: d, .. }
                                | I::LoadTrue { dest: d } | I::LoadFalse { dest: d }
                                | I::LoadNull { dest: d }) if d == src);
                        if !constant {
                            return Some(format!("{name} takes its value inside an iteration"));
                        }
                    }
                    _ => {}
                }
                previous = Some(ins);
            }
        }
    }
    program
        .instructions
        .iter()
        .any(|i| matches!(i, I::VirtualDataDocumentLookup { .. }))
        .then(|| "the policy looks up rules by a computed path".to_owned())
}

impl Evaluator {
    /// `allow` and `reason` (`Undefined` when absent); `Err` when `allow`
    /// cannot be evaluated.
    fn eval(&self, id: u64, timeout: Duration, input: Value) -> Result<(Value, Value), String> {
        match self {
            Self::Vm {
                program,
                data,
                has_reason,
            } => {
                let mut vm = RegoVM::new();
                vm.load_program(program.clone());
                vm.set_max_instructions(VM_MAX_INSTRUCTIONS);
                // A builtin error fails the evaluation (deny), as in the
                // interpreter; the VM's default would read it as undefined,
                // which under `not` allows.
                vm.set_strict_builtin_errors(true);
                vm.set_execution_timer_config(Some(timer(timeout)));
                vm.set_data(data.clone()).map_err(|e| e.to_string())?;
                vm.set_input(input);
                let allow = vm
                    .execute_entry_point_by_name(ALLOW_RULE)
                    .map_err(|e| e.to_string())?;
                let reason = if *has_reason {
                    vm.execute_entry_point_by_name(REASON_RULE)
                        .unwrap_or(Value::Undefined)
                } else {
                    Value::Undefined
                };
                Ok((allow, reason))
            }
            Self::Interpreter {
                engine: template,
                entry,
            } => ENGINES.with(|cell| {
                let mut slot = cell.borrow_mut();
                if slot.as_ref().is_some_and(|(held, _)| *held != id) {
                    *slot = None;
                }
                let (_, engine) = slot.get_or_insert_with(|| (id, template.as_ref().clone()));
                engine.set_input(input);
                if *entry {
                    match engine.eval_rule(ENTRY_RULE.to_owned()) {
                        Ok(both) => {
                            if let Some(both) = entry_values(&both) {
                                return Ok(both);
                            }
                        }
                        // Out of time: so would the two rules be (the caller
                        // has stopped waiting by now).
                        Err(e) if out_of_time(&e) => return Err(e.to_string()),
                        // Either rule failed: evaluated one by one, a failing
                        // `allow` denies and a failing `reason` is absent.
                        Err(_) => {}
                    }
                }
                let allow = engine
                    .eval_rule(ALLOW_RULE.to_owned())
                    .map_err(|e| e.to_string())?;
                let reason = engine
                    .eval_rule(REASON_RULE.to_owned())
                    .unwrap_or(Value::Undefined);
                Ok((allow, reason))
            }),
        }
    }
}

/// The policy in force, its decision cache, and the audit trail.
pub struct Policy {
    current: RwLock<Option<Arc<Loaded>>>,
    pub mode: Mode,
    /// The evaluator new policy sets are compiled for.
    pub engine: EngineKind,
    cache: Mutex<DecisionCache>,
    /// The cache's generation: moved only under the cache's lock, when it
    /// is emptied, and read without it before a decision (a cached decision
    /// then takes the lock once). A decision evaluated under an older
    /// generation is not kept (it may be the old policy's).
    generation: std::sync::atomic::AtomicU64,
    pub audit: audit::AuditLog,
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Where evaluations run (never on the async runtime's threads).
    pool: pool::EvalPool,
    /// Evaluation budget new policy sets are compiled with (each `Loaded`
    /// keeps its own).
    pub eval_timeout: Duration,
    /// When the policy in force was installed, and the last revision
    /// rejected (`/status`).
    history: Mutex<History>,
}

/// Decisions by input, for the policy (and identities) of one generation
/// ([`Policy::invalidate`] empties it and starts the next).
///
/// Bounded by count and by the keys' bytes; past either bound the least
/// recently used decisions leave, so inputs seen once (a policy that reads
/// each request's id, MCP calls whose arguments never repeat) push out each
/// other, not the decisions every connection of a workload looks up.
struct DecisionCache {
    /// foldhash, seeded at random per process: the keys are a few hundred
    /// bytes and SipHash took a tenth of a cached decision; the map is
    /// bounded ([`CACHE_LIMIT`]), so a flood of colliding keys could not
    /// grow it either.
    decisions: lru::LruCache<Vec<u8>, Decision, foldhash::quality::RandomState>,
    /// The keys' bytes.
    bytes: usize,
    /// At most this many decisions ([`CACHE_LIMIT`]; tests set less).
    limit: usize,
}

impl Default for DecisionCache {
    fn default() -> Self {
        Self {
            // Grows as decisions come in (nothing allocated up front).
            decisions: lru::LruCache::unbounded_with_hasher(Default::default()),
            bytes: 0,
            limit: CACHE_LIMIT,
        }
    }
}

impl DecisionCache {
    fn get(&mut self, key: &[u8]) -> Option<Decision> {
        self.decisions.get(key).cloned()
    }

    /// Keeps `d` under `key`, first letting the least recently used
    /// decisions go while the cache is at a bound.
    fn insert(&mut self, key: Vec<u8>, d: Decision) {
        // The same input evaluated twice at once: the later answer stays.
        if let Some(kept) = self.decisions.get_mut(&key) {
            *kept = d;
            return;
        }
        while !self.decisions.is_empty()
            && (self.decisions.len() >= self.limit || self.bytes + key.len() > CACHE_BYTES)
        {
            if let Some((old, _)) = self.decisions.pop_lru() {
                self.bytes -= old.len();
            }
        }
        self.bytes += key.len();
        self.decisions.put(key, d);
    }

    fn clear(&mut self) {
        self.decisions.clear();
        self.bytes = 0;
    }
}

/// The cache key of a decision of policy `policy` on `input`: the
/// connection's part of the input whole, as tagged bytes (small, and what
/// the policy reads of it cannot change between the connections of one
/// workload anyway), and of a request's part, as JSON, only the values at the paths the policy can
/// read (`reads`; `None`: all of it), written into `buf` (emptied first).
/// `None` (not cached) when it would be longer than [`MAX_KEY`] (a large
/// body the policy reads).
fn cache_key(
    buf: &mut Vec<u8>,
    policy: u64,
    input: &Input,
    reads: Option<(&[rewrite::Path], &[rewrite::Path])>,
) -> Option<()> {
    // Every field, named: a field added to `Input` fails to compile here
    // until the key holds it too.
    let Input {
        direction,
        source,
        destination,
        protocol,
        request,
    } = input;
    buf.clear();
    buf.extend_from_slice(&policy.to_le_bytes());
    key_str(buf, KEY_DIRECTION, Some(direction));
    key_str(buf, KEY_PROTOCOL, Some(protocol));
    key_peer(buf, source);
    key_peer(buf, destination);
    // Serializing the request cannot fail; should it, the decision is not
    // cached.
    if let Some(request) = request {
        match reads {
            None => serde_json::to_writer(&mut *buf, request).ok()?,
            Some((reads, truths)) => {
                let at = |path: &[rewrite::Seg]| -> Option<&serde_json::Value> {
                    let (rewrite::Seg::Key(first), rest) = path.split_first()? else {
                        return None;
                    };
                    let mut at = request.get(first);
                    for seg in rest {
                        at = at.and_then(|v| match seg {
                            rewrite::Seg::Key(k) => v.get(k),
                            rewrite::Seg::Index(n) => v.get(usize::try_from(*n).ok()?),
                        });
                    }
                    at
                };
                // Absent is not null: only what is there goes in.
                let parts: Vec<(usize, &serde_json::Value)> = reads
                    .iter()
                    .enumerate()
                    .filter_map(|(i, p)| Some((i, at(p)?)))
                    .collect();
                // A truth test: defined and not false.
                let tested: Vec<bool> = truths
                    .iter()
                    .map(|p| at(p).is_some_and(|v| *v != serde_json::Value::Bool(false)))
                    .collect();
                serde_json::to_writer(&mut *buf, &(parts, tested)).ok()?;
            }
        }
    }
    (buf.len() <= MAX_KEY).then_some(())
}

// The tags of a cache key's connection fields: each field written is its
// tag, then its value (a string's length first), so two inputs that differ
// in any field never write the same bytes; a peer ends with KEY_END.
const KEY_END: u8 = 0;
const KEY_DIRECTION: u8 = 1;
const KEY_PROTOCOL: u8 = 2;
const KEY_SPIFFE_ID: u8 = 3;
const KEY_TRUST_DOMAIN: u8 = 4;
const KEY_AUTHENTICATED: u8 = 5;
const KEY_SELECTOR: u8 = 6;
const KEY_ADDRESS: u8 = 7;
const KEY_PORT: u8 = 8;
const KEY_NODE: u8 = 9;

/// A string field of a cache key (nothing when absent).
fn key_str(buf: &mut Vec<u8>, tag: u8, value: Option<&str>) {
    if let Some(v) = value {
        buf.push(tag);
        buf.extend_from_slice(&(v.len() as u64).to_le_bytes());
        buf.extend_from_slice(v.as_bytes());
    }
}

/// A peer's part of a cache key: every field the policy can read of it
/// (written as bytes, not JSON: a cached decision is mostly this).
fn key_peer(buf: &mut Vec<u8>, peer: &Peer) {
    // Every field, named: a field added to `Peer` fails to compile here
    // until the key holds it too (else two inputs that differ in it would
    // share a decision).
    let Peer {
        spiffe_id,
        trust_domain,
        authenticated,
        selectors,
        address,
        port,
        node,
    } = peer;
    key_str(buf, KEY_SPIFFE_ID, spiffe_id.as_deref());
    key_str(buf, KEY_TRUST_DOMAIN, trust_domain.as_deref());
    if let Some(a) = authenticated {
        buf.extend_from_slice(&[KEY_AUTHENTICATED, u8::from(*a)]);
    }
    for s in selectors {
        key_str(buf, KEY_SELECTOR, Some(s));
    }
    key_str(buf, KEY_ADDRESS, address.as_deref());
    if let Some(p) = port {
        buf.push(KEY_PORT);
        buf.extend_from_slice(&p.to_le_bytes());
    }
    key_str(buf, KEY_NODE, node.as_deref());
    buf.push(KEY_END);
}

thread_local! {
    /// The buffer a decision's cache key is built in: a hit allocates
    /// nothing; a miss keeps a copy to insert its answer under.
    static KEY: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(Vec::with_capacity(512));
}

#[derive(Default)]
struct History {
    installed_at: Option<std::time::SystemTime>,
    last_rejected: Option<(std::time::SystemTime, String)>,
}

pub use crate::timefmt::rfc3339;

/// The verdict applied to a connection, after the mode.
#[derive(Debug, Clone)]
pub struct Verdict {
    pub allowed: bool,
    pub decision: Decision,
    pub decision_id: String,
    /// The decision's `result` label: `allow`, `deny`, `error` (enforced) or
    /// `would_deny` (dry-run).
    pub result: &'static str,
}

impl Policy {
    pub fn new(
        mode: Mode,
        engine: EngineKind,
        audit: audit::AuditLog,
        metrics: Arc<crate::metrics::Metrics>,
        eval_timeout: Duration,
    ) -> std::io::Result<Self> {
        Ok(Self {
            current: RwLock::new(None),
            mode,
            engine,
            cache: Mutex::default(),
            generation: Default::default(),
            audit,
            metrics,
            pool: pool::EvalPool::for_host()?,
            eval_timeout,
            history: Mutex::default(),
        })
    }

    /// Puts a new policy set in force and empties the decision cache.
    pub fn install(&self, loaded: Loaded) {
        let (bundle, revision) = loaded
            .bundle
            .as_ref()
            .map(|b| (b.name.clone(), b.revision.clone()))
            .unwrap_or_default();
        self.metrics
            .policy_in_force(crate::metrics::PolicyInfoLabels {
                bundle,
                revision,
                digest: loaded.revision.clone(),
                engine: loaded.engine(),
            });
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(loaded));
        self.history
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .installed_at = Some(std::time::SystemTime::now());
        self.invalidate();
    }

    /// A new revision was rejected (the one in force stays): kept for
    /// `/status`.
    pub fn rejected(&self, error: String) {
        self.history
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .last_rejected = Some((std::time::SystemTime::now(), error));
    }

    /// The policy in force and the last rejected revision, for `/status`.
    pub fn status(&self) -> serde_json::Value {
        let current = self
            .current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let history = self.history.lock().unwrap_or_else(|p| p.into_inner());
        serde_json::json!({
            "mode": self.mode,
            "in_force": current.map(|l| serde_json::json!({
                "digest": l.revision,
                "bundle": l.bundle.as_ref().map(|b| &b.name),
                "bundle_revision": l.bundle.as_ref().map(|b| &b.revision),
                "engine": l.engine(),
                "installed_at": history.installed_at.map(rfc3339),
            })),
            "last_rejected": history.last_rejected.as_ref().map(|(at, e)| serde_json::json!({
                "at": rfc3339(*at),
                "error": e,
            })),
        })
    }

    /// Caps the decision cache at `limit` decisions (tests).
    #[cfg(test)]
    fn set_cache_limit(&self, limit: usize) {
        self.cache.lock().unwrap_or_else(|p| p.into_inner()).limit = limit;
    }

    /// Decisions cached now, and their keys' bytes (tests).
    #[cfg(test)]
    fn cached(&self) -> (usize, usize) {
        let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        (cache.decisions.len(), cache.bytes)
    }

    /// The cache's generation. It moves only under the cache's lock; a
    /// decision reads it without the lock before the policy, and again
    /// under the lock when its result is looked up or kept.
    fn current_generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Empties the decision cache (policy reload, identity change) and
    /// starts a new generation.
    pub fn invalidate(&self) {
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        cache.clear();
        self.generation
            .fetch_add(1, std::sync::atomic::Ordering::Release);
    }

    /// The LLM token budgets of the policy in force.
    pub fn llm_budgets(&self) -> Arc<budgets::Budgets> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|l| l.llm_budgets.clone())
            .unwrap_or_default()
    }

    pub fn revision(&self) -> Option<String> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|l| l.revision.clone())
    }

    /// Decides one connection, audits the decision and counts it.
    pub async fn decide(&self, input: &Input, conn_id: u64) -> Verdict {
        self.decide_for(input, (conn_id, None)).await
    }

    /// Decides one L7 request (its id goes to the audit line).
    pub async fn decide_request(&self, input: &Input, conn_id: u64, request_id: &str) -> Verdict {
        self.decide_for(input, (conn_id, Some(request_id))).await
    }

    /// Boxed: an evaluation (the pool hand-off, the audit receipt) is a
    /// large future, and a connection's task is as large as its largest
    /// state for as long as the connection lives.
    fn decide_for<'a>(
        &'a self,
        input: &'a Input,
        ids: (u64, Option<&'a str>),
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Verdict> + Send + 'a>> {
        Box::pin(async move {
            let (d, elapsed, loaded) = self.evaluate(input).await;
            let (v, receipt) = self.finish(input, ids, d, elapsed, loaded.as_deref());
            self.audited(input, v, receipt).await
        })
    }

    /// With `policy.audit_on_failure = "deny"`, a decision whose audit line
    /// was not written is a denial; then the decision is counted.
    async fn audited(&self, input: &Input, mut v: Verdict, receipt: audit::Receipt) -> Verdict {
        if !receipt.written().await && v.allowed {
            tracing::warn!(
                decision_id = v.decision_id,
                "the decision's audit line could not be written; denying (policy.audit_on_failure = \"deny\")"
            );
            v.allowed = false;
            v.result = "error";
            v.decision.allow = false;
            v.decision.reason =
                Some("audit log unwritable (policy.audit_on_failure = deny)".into());
        }
        self.metrics.policy_decision(
            input.direction,
            v.result,
            input.source.spiffe_id.as_deref(),
            input.destination.spiffe_id.as_deref(),
        );
        v
    }

    /// The decision alone (cache, then policy on the evaluation pool),
    /// without audit or metrics; for an evaluation, also its duration; and
    /// the policy in force.
    pub async fn evaluate(
        &self,
        input: &Input,
    ) -> (Decision, Option<Duration>, Option<Arc<Loaded>>) {
        // The cache's generation before the policy is read: an install
        // swaps the policy and then starts a new generation, so a decision
        // of this generation is never one of an older policy.
        let generation = self.current_generation();
        let loaded = self
            .current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        // The cache key: the parts of the input the policy can read, and
        // the policy (two policies may read different parts). A request's
        // id and the client's port, which it rarely reads, make no miss.
        let looked_up = loaded.as_ref().filter(|l| !l.volatile).and_then(|l| {
            KEY.with_borrow_mut(|buf| {
                cache_key(
                    buf,
                    l.id,
                    input,
                    l.input_reads
                        .as_deref()
                        .map(|r| (r.as_slice(), l.input_truths.as_slice())),
                )?;
                let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
                let hit = (self.current_generation() == generation)
                    .then(|| cache.get(buf.as_slice()))
                    .flatten();
                drop(cache);
                Some(hit.ok_or_else(|| buf.clone()))
            })
        });
        let key = match looked_up {
            Some(Ok(mut d)) => {
                d.cached = true;
                return (d, None, loaded);
            }
            Some(Err(key)) => Some(key),
            None => None,
        };
        let Some(loaded) = loaded else {
            return (Decision::deny("no policy loaded", None), None, None);
        };
        let started = Instant::now();
        // The budget the policy was compiled with: regorus's timer and the
        // wait here agree.
        let budget = loaded.timeout;
        let d = self
            .pool
            .evaluate(loaded.clone(), input.to_value(), budget)
            .await;
        let elapsed = started.elapsed();
        // A deterministic outcome is cached: a decision, or running out of
        // budget on this input (else an attacker repeats a runaway input).
        if let Some(key) = key.filter(|_| d.error.is_none() || d.timed_out) {
            let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            // Not when a new policy (or identity) came in meanwhile.
            if self.current_generation() == generation {
                cache.insert(key, d.clone());
            }
        }
        (d, Some(elapsed), Some(loaded))
    }

    fn finish(
        &self,
        input: &Input,
        (conn_id, request_id): (u64, Option<&str>),
        decision: Decision,
        elapsed: Option<Duration>,
        loaded: Option<&Loaded>,
    ) -> (Verdict, audit::Receipt) {
        let allowed = decision.allow || self.mode == Mode::DryRun;
        let result = match (decision.allow, &decision.error, self.mode) {
            (true, _, _) => "allow",
            (false, Some(_), Mode::Enforce) => "error",
            (false, _, Mode::DryRun) => "would_deny",
            (false, None, Mode::Enforce) => "deny",
        };
        if let Some(elapsed) = &elapsed {
            self.metrics
                .policy_eval_seconds
                .observe(elapsed.as_secs_f64());
        }
        let decision_id = uuid::Uuid::new_v4().to_string();
        if let Some(e) = &decision.error {
            tracing::warn!(conn_id, decision_id, error = %e, "policy evaluation failed; denying");
        }
        if !decision.allow && self.mode == Mode::DryRun {
            tracing::warn!(conn_id, decision_id, reason = ?decision.reason, "would deny (dry-run): allowing");
        }
        let receipt = self.audit.record(&audit::Line {
            decision_id: &decision_id,
            conn_id,
            request_id,
            input,
            result: (!decision.undefined && loaded.is_some()).then_some(decision.allow),
            reason: decision.reason.as_deref(),
            error: decision
                .error
                .as_deref()
                .map(|e| audit::ErrorObject::classify(e, decision.timed_out)),
            enforced: self.mode == Mode::Enforce,
            cached: decision.cached,
            policy_digest: loaded.map(|l| l.revision.as_str()),
            bundle: loaded.and_then(|l| l.bundle.as_ref()),
            eval_ns: elapsed.map(|e| e.as_nanos() as u64),
        });
        let v = Verdict {
            allowed,
            decision,
            decision_id,
            result,
        };
        (v, receipt)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(rego: &str, data: Option<&str>) -> Vec<load::PolicyFile> {
        let mut f = vec![load::PolicyFile {
            path: "p/policy.rego".into(),
            contents: rego.as_bytes().to_vec(),
        }];
        if let Some(d) = data {
            f.push(load::PolicyFile {
                path: "data.json".into(),
                contents: d.as_bytes().to_vec(),
            });
        }
        f
    }

    fn both(f: &[load::PolicyFile]) -> (Loaded, Loaded) {
        let vm = Loaded::compile("t", f, EngineKind::Vm).expect("compiles");
        let it = Loaded::compile("t", f, EngineKind::Interpreter).expect("compiles");
        (vm, it)
    }

    fn shipped() -> Vec<load::PolicyFile> {
        load::read_dir(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies"))
            .expect("shipped policy")
    }

    fn peer(id: Option<&str>, port: Option<u16>) -> Peer {
        Peer {
            port,
            selectors: vec!["unix:uid:0".into()],
            address: Some("10.0.0.1".into()),
            ..Peer::default().with_id(id.and_then(|i| spiffe::SpiffeId::new(i).ok()).as_ref())
        }
    }

    #[test]
    fn input_value_is_the_json_document() {
        let input = Input {
            direction: "outbound",
            source: Peer {
                authenticated: Some(true),
                node: Some("n1".into()),
                ..peer(Some("spiffe://td/a"), None)
            },
            destination: peer(None, Some(8101)),
            protocol: "tcp",
            request: None,
        };
        let json = serde_json::to_string(&input).expect("json");
        assert_eq!(
            input.to_value(),
            Value::from_json_str(&json).expect("parse")
        );
        // A request's parts: every JSON type, numbers past i64 and f64's
        // integers, escapes, nesting; read as regorus reads their text, and
        // as `Value::from` reads an owned copy.
        let request = serde_json::json!({
            "attributes": {"request": {"http": {"method": "POST", "headers": {"a": "b\"c\u{e9}"}}}},
            "parsed_body": {"n": [0, -1, 1.5, 18446744073709551615u64, -9223372036854775808i64,
                                  9007199254740993u64, 1e300, null, true, false],
                            "o": {"": {}, "x": []}},
            "truncated_body": false,
            "mcp": {"method": "tools/call", "id": "7", "arguments": {"q": "line\nbreak"}},
        });
        let input = Input {
            request: request.as_object().cloned().map(Box::new),
            ..input
        };
        let json = serde_json::to_string(&input).expect("json");
        let v = input.to_value();
        assert_eq!(v, Value::from_json_str(&json).expect("parse"));
        for (k, x) in request.as_object().into_iter().flatten() {
            assert_eq!(v[k.as_str()], Value::from(x.clone()), "{k}");
        }
    }

    /// The VM decides every input of a grid exactly as the interpreter does
    /// (allow and reason), on the shipped policy.
    #[test]
    fn vm_agrees_with_the_interpreter_on_the_shipped_policy() {
        let (vm, it) = both(&shipped());
        assert_eq!(vm.engine(), "vm");
        assert_eq!(it.engine(), "interpreter");
        let ids = [
            None,
            Some("spiffe://ai.example.org/agent/support"),
            Some("spiffe://ai.example.org/agent"),
            Some("spiffe://ai.example.org/mcp/docs"),
            Some("spiffe://ai.example.org/llm"),
            Some("spiffe://ai.example.org/vectordb"),
            Some("spiffe://other.example.org/agent/x"),
        ];
        let mut n = 0;
        let mut allowed = 0;
        for dir in ["outbound", "inbound"] {
            for s in ids {
                for d in ids {
                    for port in [None, Some(8000), Some(8101)] {
                        let input = Input {
                            direction: dir,
                            source: peer(s, None),
                            destination: peer(d, port),
                            protocol: "tcp",
                            request: None,
                        };
                        let a = vm.evaluate(input.to_value());
                        let b = it.evaluate(input.to_value());
                        assert_eq!(a, b, "{input:?}");
                        assert!(a.error.is_none(), "{input:?}: {a:?}");
                        n += 1;
                        allowed += usize::from(a.allow);
                    }
                }
            }
        }
        assert!(allowed > 0 && allowed < n, "{allowed} of {n} allowed");
    }

    /// Policies where the VM would treat a rule that yields two values as
    /// undefined (OPA: an error) run on the interpreter, and deny with an
    /// error. Under `not`, the VM's reading would have allowed.
    #[test]
    fn rules_that_can_yield_two_values_run_on_the_interpreter_and_deny() {
        let head = "package enforcer.authz\nimport rego.v1\n";
        let cases = [
            "allow := true if input.x\nallow := false if input.y\n",
            "b := true if input.x\nb := false if input.y\nallow if not b\n",
            "f(a) := 1 if a == 1\nf(a) := 2 if a > 0\nallow if not f(input.a)\n",
            "x := v if { some v in input.vals }\nallow if not x\n",
            "o[k] := v if { some v in input.vals; k := \"a\" }\nallow if not o.a\n",
        ];
        let input =
            Value::from_json_str(r#"{"vals":[false,true],"x":true,"y":true,"a":1}"#).expect("json");
        for c in cases {
            let (vm, it) = both(&files(&format!("{head}{c}"), None));
            assert_eq!(vm.engine(), "interpreter", "{c}");
            for d in [vm.evaluate(input.clone()), it.evaluate(input.clone())] {
                assert!(!d.allow, "{c}: {d:?}");
                assert!(d.error.is_some(), "{c}: {d:?}");
            }
        }
    }

    /// Iterations that cannot give a rule two values stay on the VM, and a
    /// non-boolean or undefined `allow` and a missing `reason` are read the
    /// same way by both evaluators.
    #[test]
    fn vm_and_interpreter_agree_on_safe_iterations_and_odd_results() {
        let head = "package enforcer.authz\nimport rego.v1\n";
        let cases = [
            (
                "y if { some v in input.vals; v }\nz := count([v | some v in input.vals])\nallow if { y; z == 2 }\n",
                Some(true),
            ),
            ("allow := \"yes\"\n", None),
            ("allow if input.protocol == \"udp\"\n", Some(false)),
        ];
        let input =
            Value::from_json_str(r#"{"vals":[false,true],"protocol":"tcp"}"#).expect("json");
        for (c, allow) in cases {
            let (vm, it) = both(&files(&format!("{head}{c}"), None));
            assert_eq!(vm.engine(), "vm", "{c}");
            let a = vm.evaluate(input.clone());
            assert_eq!(a, it.evaluate(input.clone()), "{c}");
            match allow {
                Some(allow) => {
                    assert_eq!((a.allow, &a.error, &a.reason), (allow, &None, &None), "{c}")
                }
                None => assert!(!a.allow && a.error.is_some(), "{c}: {a:?}"),
            }
        }
    }

    /// A policy the VM compiler does not take (`with`) still loads, on the
    /// interpreter, and decides the same.
    #[test]
    fn policy_the_vm_cannot_compile_runs_on_the_interpreter() {
        let rego = "package enforcer.authz\nimport rego.v1\ntcp if input.protocol == \"tcp\"\nallow if tcp with input.protocol as \"tcp\"\nreason := \"with\"\n";
        let (vm, it) = both(&files(rego, None));
        assert_eq!(vm.engine(), "interpreter");
        let input = Input {
            protocol: "udp",
            ..Default::default()
        };
        let d = vm.evaluate(input.to_value());
        assert_eq!(d, it.evaluate(input.to_value()));
        assert!(d.allow);
        assert_eq!(d.reason.as_deref(), Some("with"));
    }

    /// The VM stops a runaway evaluation and the connection is denied.
    #[test]
    fn vm_instruction_limit_denies() {
        let rego = "package enforcer.authz\nimport rego.v1\nallow if {\ninput.protocol == \"tcp\"\ncount([x | some i in numbers.range(1, 3000); some j in numbers.range(1, 3000); x := i * j]) > 0\n}\n";
        let vm = Loaded::compile("t", &files(rego, None), EngineKind::Vm).expect("compiles");
        assert_eq!(vm.engine(), "vm");
        let input = Input {
            protocol: "tcp",
            request: None,
            ..Default::default()
        };
        let d = vm.evaluate(input.to_value());
        assert!(!d.allow, "{d:?}");
        assert!(d.error.is_some(), "{d:?}");
    }

    fn policy_with(rego: &str, timeout: Duration) -> Policy {
        let p = Policy::new(
            Mode::Enforce,
            EngineKind::Interpreter,
            audit::AuditLog::open(std::path::Path::new("/dev/null")).expect("/dev/null"),
            Arc::new(crate::metrics::Metrics::new("t")),
            timeout,
        )
        .expect("pool");
        p.install(
            Loaded::compile_with(
                "t",
                &load::PolicySet::plain(files(rego, None)),
                EngineKind::Interpreter,
                timeout,
            )
            .expect("compiles"),
        );
        p
    }

    /// The attack: a decision still being evaluated under the old policy
    /// when a new one is installed. Found by the reload test: b's first
    /// decision after a reload ran under the old deny-all policy, was cached
    /// after the reload emptied the cache, and every later connection with
    /// that input was denied from the cache under the new policy — and a
    /// revoked allow would stay allowed the same way.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_decision_of_the_old_policy_is_never_cached_for_the_new_one() {
        // The old policy allows port 80 after a slow computation.
        let old = "package enforcer.authz\nimport rego.v1\n\
            allow if {\n  input.destination.port == 80\n  count([x | some x in numbers.range(1, 300000); x % 7 == 0]) > 0\n}\n";
        let p = Arc::new(policy_with(old, Duration::from_secs(10)));
        let in_flight = {
            let p = p.clone();
            tokio::spawn(async move { p.evaluate(&to_port(80)).await.0 })
        };
        // The new policy revokes it, while that evaluation runs.
        tokio::time::sleep(Duration::from_millis(5)).await;
        p.install(
            Loaded::compile_with(
                "t",
                &load::PolicySet::plain(files(
                    "package enforcer.authz\nimport rego.v1\ndefault allow := false\n",
                    None,
                )),
                EngineKind::Interpreter,
                Duration::from_secs(10),
            )
            .expect("compiles"),
        );
        let first = in_flight.await.expect("task");
        assert!(first.allow, "decided under the old policy: {first:?}");
        let (again, _, _) = p.evaluate(&to_port(80)).await;
        assert!(
            !again.allow,
            "the new policy denies; the old decision came from the cache: {again:?}"
        );
    }

    /// An L7 request input: `GET path` with a fresh request id and client
    /// port each time, as every request has.
    fn request(method: &str, path: &str, n: u64) -> Input {
        let mut input = to_port(8080);
        input.protocol = "http";
        let req = serde_json::json!({
            "attributes": {
                "request": {"http": {"id": format!("req-{n}"), "method": method, "path": path}},
                "source": {"address": {"socketAddress": {"address": "10.0.0.1", "portValue": 40000 + n}}},
            },
            "parsed_path": path.trim_start_matches('/').split('/').collect::<Vec<_>>(),
        });
        input.request = req.as_object().cloned().map(Box::new);
        input
    }

    /// At its bound the cache lets its least recently used decisions go,
    /// not all of them. The attack: a workload (or a policy that reads
    /// each request's id) sends inputs that are never seen again; when the
    /// cache was emptied whole at its bound, each flood of them also threw
    /// out the decision every connection of the other workloads looks up,
    /// so they were all evaluated again, flood after flood.
    #[tokio::test]
    async fn inputs_seen_once_do_not_push_out_a_decision_in_use() {
        let rego = "package enforcer.authz\nimport rego.v1\n\
            allow if startswith(input.attributes.request.http.id, \"req-\")\n";
        let p = policy_with(rego, Duration::from_secs(10));
        p.set_cache_limit(8);
        let hot = request("GET", "/docs", 0);
        let (first, _, _) = p.evaluate(&hot).await;
        assert!(first.allow && !first.cached, "{first:?}");
        for n in 1..=40 {
            let (once, evaluated, _) = p.evaluate(&request("GET", "/docs", n)).await;
            assert!(
                once.allow && !once.cached && evaluated.is_some(),
                "request {n} is new: {once:?}"
            );
            let (again, evaluated, _) = p.evaluate(&hot).await;
            assert!(
                again.allow && again.cached && evaluated.is_none(),
                "the decision in use was pushed out after {n} inputs seen once: {again:?}"
            );
            let (len, bytes) = p.cached();
            assert!(len <= 8, "{len} decisions cached, over the bound of 8");
            assert!(bytes > 0, "keys' bytes not counted: {bytes}");
        }
        // The oldest of those seen once went first.
        let (oldest, evaluated, _) = p.evaluate(&request("GET", "/docs", 1)).await;
        assert!(!oldest.cached && evaluated.is_some(), "{oldest:?}");
        let (newest, _, _) = p.evaluate(&request("GET", "/docs", 40)).await;
        assert!(newest.cached, "{newest:?}");
        // Emptied whole on a reload, its bytes too.
        p.invalidate();
        assert_eq!(p.cached(), (0, 0));
    }

    /// The keys' bytes are bounded the same way, and a key cached twice
    /// (two evaluations of one input at once) is counted once.
    #[test]
    fn the_cache_keeps_its_keys_bytes_under_the_bound() {
        let mut cache = DecisionCache::default();
        let d = Decision::deny("t", None);
        let third = CACHE_BYTES / 3 + 1;
        for n in 0..5u8 {
            cache.insert(vec![n; third], d.clone());
            assert!(cache.bytes <= CACHE_BYTES, "{} bytes kept", cache.bytes);
            assert_eq!(
                cache.bytes,
                cache.decisions.iter().map(|(k, _)| k.len()).sum::<usize>()
            );
        }
        assert_eq!(cache.decisions.len(), 2, "two keys of a third fit");
        assert!(cache.get(&vec![4; third]).is_some(), "the newest stays");
        cache.insert(vec![4; third], d.clone());
        assert_eq!((cache.decisions.len(), cache.bytes), (2, 2 * third));
    }

    /// The connection's part of a cache key: inputs that differ in any
    /// field the policy can read have different keys — also when a value
    /// moves from one field to the next, or the boundary between two
    /// selectors moves (the attack: one workload's cached allow answering
    /// another's connection).
    #[test]
    fn connection_inputs_that_differ_anywhere_have_different_keys() {
        let base = Input {
            direction: "outbound",
            source: Peer {
                spiffe_id: Some("spiffe://td/a".into()),
                trust_domain: Some("td".into()),
                authenticated: Some(true),
                selectors: vec!["unix:uid:1".into(), "unix:uid:2".into()],
                address: Some("10.0.0.1".into()),
                port: Some(1),
                node: Some("n".into()),
            },
            destination: Peer {
                address: Some("10.0.0.2".into()),
                port: Some(80),
                ..Default::default()
            },
            protocol: "tcp",
            request: None,
        };
        let key = |i: &Input| {
            let mut buf = Vec::new();
            cache_key(&mut buf, 7, i, None).expect("a key");
            buf
        };
        type Change = fn(&mut Input);
        let changes: [(&str, Change); 15] = [
            ("direction", |i| i.direction = "inbound"),
            ("protocol", |i| i.protocol = "http"),
            ("spiffe_id", |i| i.source.spiffe_id = None),
            ("trust_domain", |i| {
                i.source.trust_domain = Some("tdx".into())
            }),
            ("authenticated", |i| i.source.authenticated = Some(false)),
            ("no authenticated", |i| i.source.authenticated = None),
            ("a selector", |i| i.source.selectors.push("x".into())),
            ("selector boundary", |i| {
                i.source.selectors = vec!["unix:uid:1unix:uid:2".into()]
            }),
            ("selector boundary 2", |i| {
                i.source.selectors = vec!["unix:uid:".into(), "1".into(), "unix:uid:2".into()]
            }),
            ("a tag inside a value", |i| {
                i.source.selectors = vec![format!("unix:uid:1{}unix:uid:2", KEY_SELECTOR as char)]
            }),
            ("address", |i| i.source.address = Some("10.0.0.3".into())),
            ("port", |i| i.source.port = Some(2)),
            ("node", |i| i.source.node = None),
            ("a value moved to the next field", |i| {
                i.source.address = None;
                i.source.node = Some("10.0.0.1".into());
            }),
            ("a field moved to the other peer", |i| {
                i.destination.port = None;
                i.source.port = Some(80);
                i.destination.node = i.source.node.take();
            }),
        ];
        let mut seen = std::collections::HashMap::from([(key(&base), "base")]);
        for (what, change) in changes {
            let mut i = base.clone();
            change(&mut i);
            if let Some(other) = seen.insert(key(&i), what) {
                panic!("{what} has the key of {other}");
            }
        }
        // The same input, the same key; another policy, another.
        assert_eq!(key(&base), key(&base.clone()));
        let mut other_policy = Vec::new();
        cache_key(&mut other_policy, 8, &base, None).expect("a key");
        assert_ne!(key(&base), other_policy);
    }

    /// A request decision is cached under what the policy reads: requests
    /// that differ only in their id and client port share it; one that
    /// differs in a part the policy reads is evaluated (the attack: a
    /// cached allow for `GET /docs` must not answer `DELETE /docs`, nor
    /// one for a source the policy names answer another source).
    #[tokio::test]
    async fn request_decisions_are_cached_under_what_the_policy_reads() {
        let rego = "package enforcer.authz\nimport rego.v1\n\
            allow if {\n  input.attributes.request.http.method == \"GET\"\n  \
            input.attributes.source.address.socketAddress.address == \"10.0.0.1\"\n}\n";
        let p = policy_with(rego, Duration::from_secs(10));
        let (first, evaluated, _) = p.evaluate(&request("GET", "/docs", 1)).await;
        assert!(
            first.allow && !first.cached && evaluated.is_some(),
            "{first:?}"
        );
        let (again, evaluated, _) = p.evaluate(&request("GET", "/docs", 2)).await;
        assert!(
            again.allow && again.cached && evaluated.is_none(),
            "{again:?}"
        );
        let (delete, evaluated, _) = p.evaluate(&request("DELETE", "/docs", 3)).await;
        assert!(
            !delete.allow && !delete.cached && evaluated.is_some(),
            "{delete:?}"
        );
        let mut other = request("GET", "/docs", 4);
        if let Some(r) = other.request.as_mut() {
            r["attributes"]["source"]["address"]["socketAddress"]["address"] =
                serde_json::json!("10.0.0.9");
        }
        let (from_other, evaluated, _) = p.evaluate(&other).await;
        assert!(
            !from_other.allow && !from_other.cached && evaluated.is_some(),
            "{from_other:?}"
        );
        // A part the policy does not read (the path) shares the decision.
        let (path, _, _) = p.evaluate(&request("GET", "/other", 5)).await;
        assert!(path.allow && path.cached, "{path:?}");

        // A policy that reads the whole input: no two requests share one.
        let whole = policy_with(
            "package enforcer.authz\nimport rego.v1\nallow if count(input) > 0\n",
            Duration::from_secs(10),
        );
        let _ = whole.evaluate(&request("GET", "/docs", 1)).await;
        let (d, evaluated, _) = whole.evaluate(&request("GET", "/docs", 2)).await;
        assert!(!d.cached && evaluated.is_some(), "{d:?}");
        // A request tested for (`is_request if input.attributes`, as the
        // shipped policy does) is keyed by that test, not by all of
        // `attributes` (which holds the request id).
        let tested = policy_with(
            "package enforcer.authz\nimport rego.v1\nis_request if input.attributes\n\
             allow if { is_request; input.attributes.request.http.method == \"GET\" }\n\
             allow if { not is_request; input.destination.port == 8080 }\n",
            Duration::from_secs(10),
        );
        let _ = tested.evaluate(&request("GET", "/docs", 1)).await;
        let (d, _, _) = tested.evaluate(&request("GET", "/docs", 2)).await;
        assert!(d.allow && d.cached, "{d:?}");
        // Without `attributes` (a connection's decision), not that one.
        let (conn, evaluated, _) = tested.evaluate(&to_port(8080)).await;
        assert!(
            conn.allow && !conn.cached && evaluated.is_some(),
            "{conn:?}"
        );
        let mut falsy = request("GET", "/docs", 3);
        if let Some(r) = falsy.request.as_mut() {
            r.insert("attributes".into(), serde_json::json!(false));
        }
        let (f, evaluated, _) = tested.evaluate(&falsy).await;
        assert!(
            !f.cached && evaluated.is_some(),
            "attributes: false is not a request: {f:?}"
        );
        // Nor one that reads the request id.
        let by_id = policy_with(
            "package enforcer.authz\nimport rego.v1\nallow if input.attributes.request.http.id != \"\"\n",
            Duration::from_secs(10),
        );
        let _ = by_id.evaluate(&request("GET", "/docs", 1)).await;
        let (d, evaluated, _) = by_id.evaluate(&request("GET", "/docs", 2)).await;
        assert!(!d.cached && evaluated.is_some(), "{d:?}");
    }

    fn to_port(port: u16) -> Input {
        Input {
            direction: "inbound",
            destination: Peer {
                port: Some(port),
                ..Default::default()
            },
            protocol: "tcp",
            request: None,
            ..Default::default()
        }
    }

    /// A policy an attacker can drive into a runaway (the destination port
    /// sizes an iteration, or one huge builtin call) is denied at the
    /// evaluation budget, with an error; meanwhile other connections are
    /// decided (each within the same budget, or they would be errors too),
    /// and a runaway input is not evaluated again (cached).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn runaway_evaluation_denies_at_its_budget_while_others_are_decided() {
        // The first rule reads the source address: each ordinary
        // connection below (a new address each time) is evaluated.
        let rego = "package enforcer.authz\nimport rego.v1\n\
            allow if {\n  input.destination.port == 80\n  startswith(input.source.address, \"10.\")\n}\n\
            allow if {\n  input.destination.port > 20000\n  count(numbers.range(1, input.destination.port * 300)) > 0\n}\n\
            allow if {\n  input.destination.port > 10000\n  input.destination.port < 20000\n\
              count([x | some x in numbers.range(1, input.destination.port); some y in numbers.range(1, input.destination.port); x == y]) > 0\n}\n";
        // 200 ms, not the default 50: the ordinary decisions must finish
        // within the budget while four runaways hold the evaluation
        // threads, and a full test run loads both cores (one ordinary
        // decision once went past 50 ms there). The runaways take seconds.
        let p = Arc::new(policy_with(rego, Duration::from_millis(200)));
        let runaways: Vec<u16> = vec![20001, 20002, 10001, 10002];
        let attacks: Vec<_> = runaways
            .iter()
            .map(|&port| {
                let p = p.clone();
                tokio::spawn(async move { p.evaluate(&to_port(port)).await.0 })
            })
            .collect();
        // Ordinary connections while the runaways run.
        for i in 0..30u16 {
            let port = if i % 2 == 0 { 80 } else { 81 };
            // A new source address each time: evaluated, not cached.
            let mut input = to_port(port);
            input.source.address = Some(format!("10.0.0.{i}"));
            let (d, evaluated, _) = p.evaluate(&input).await;
            assert_eq!(d.error, None, "decision {i} (port {port}) stalled: {d:?}");
            assert_eq!(d.allow, port == 80, "decision {i}: {d:?}");
            assert!(evaluated.is_some());
        }
        for (a, port) in attacks.into_iter().zip(&runaways) {
            let d = a.await.expect("task");
            assert!(!d.allow, "runaway port {port} allowed: {d:?}");
            let e = d.error.clone().unwrap_or_default();
            assert!(
                e.contains("budget") || e.contains("time limit"),
                "runaway port {port}: {d:?}"
            );
        }
        // The attacker's retry is served from the cache, not re-run.
        let (again, evaluated, _) = p.evaluate(&to_port(20001)).await;
        assert!(
            !again.allow && again.cached && evaluated.is_none(),
            "{again:?}"
        );
    }

    /// An evaluation wakes one evaluation thread, not every idle one. The
    /// pool's threads each sleep once per job they take, so 200 decisions
    /// one after another put them to sleep about 200 times in all. With the
    /// workers sharing a `Mutex` around a std receiver, it was about 400:
    /// the thread waiting for the lock was woken when the job's taker let it
    /// go, and went back to sleep on the channel.
    #[test]
    fn an_evaluation_wakes_one_evaluation_thread() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let rego = "package enforcer.authz\nimport rego.v1\n\
            allow if startswith(input.source.address, \"10.\")\n";
        let p = policy_with(rego, Duration::from_secs(5));
        let threads = pool::EvalPool::host_workers();
        // Until every worker has started (and waits for work).
        let started = std::time::Instant::now();
        let tids = loop {
            let tids = p.pool.tids.lock().expect("tids").clone();
            if tids.len() == threads {
                break tids;
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "{} of {threads} evaluation threads started",
                tids.len()
            );
            std::thread::sleep(Duration::from_millis(5));
        };
        let sleeps = || -> u64 {
            tids.iter()
                .map(|tid| {
                    let status = std::fs::read_to_string(format!("/proc/self/task/{tid}/status"))
                        .expect("a worker's status");
                    status
                        .lines()
                        .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
                        .and_then(|n| n.trim().parse::<u64>().ok())
                        .expect("voluntary_ctxt_switches")
                })
                .sum()
        };
        let before = sleeps();
        rt.block_on(async {
            for i in 0..200u32 {
                let mut input = to_port(80);
                input.source.address = Some(format!("10.0.0.{i}"));
                let (d, evaluated, _) = p.evaluate(&input).await;
                assert!(d.allow && evaluated.is_some(), "decision {i}: {d:?}");
            }
        });
        let slept = sleeps() - before;
        // 200 and a few (a worker wakes once a second when idle).
        assert!(
            slept < 300,
            "the evaluation threads slept {slept} times for 200 evaluations"
        );
    }

    impl Loaded {
        /// The same policy, `allow` and `reason` evaluated one after the
        /// other (as before the entry rule): the reference it must match.
        fn one_by_one(&self) -> Self {
            let Evaluator::Interpreter { engine, entry } = &self.evaluator else {
                panic!("an interpreter policy");
            };
            assert!(*entry, "the entry rule is in use");
            Self {
                evaluator: Evaluator::Interpreter {
                    engine: engine.clone(),
                    entry: false,
                },
                revision: self.revision.clone(),
                bundle: None,
                id: NEXT_LOADED_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
                volatile: self.volatile,
                input_reads: self.input_reads.clone(),
                input_truths: self.input_truths.clone(),
                timeout: self.timeout,
                llm_budgets: self.llm_budgets.clone(),
            }
        }
    }

    /// What a decision is, for comparing two: allow, reason, whether it
    /// failed, whether `allow` was undefined.
    fn outcome(d: &Decision) -> (bool, Option<String>, bool, bool) {
        (
            d.allow,
            d.reason.as_deref().map(str::to_owned),
            d.error.is_some(),
            d.undefined,
        )
    }

    /// `allow` and `reason` in one evaluation decide as the two rules one
    /// after the other do: for values, undefined ones, a rule that fails
    /// (two values, a builtin error), a non-boolean `allow`, a `reason` that
    /// is not a string, and every input of the shipped policy's grid.
    #[test]
    fn allow_and_reason_in_one_evaluation_decide_as_one_after_the_other() {
        let v = |s: &str| Value::from_json_str(s).expect("json");
        // allow, reason, failed, allow undefined
        type Want = (bool, Option<&'static str>, bool, bool);
        let cases: &[(&str, &[&str], Want)] = &[
            // Both defined.
            (
                "package enforcer.authz\nallow if input.ok\nreason := \"because\" if input.ok",
                &[r#"{"ok": true}"#],
                (true, Some("because"), false, false),
            ),
            // Both undefined (no default).
            (
                "package enforcer.authz\nallow if input.ok\nreason := \"because\" if input.ok",
                &[r#"{"ok": false}"#, "{}"],
                (false, None, false, true),
            ),
            // `reason` fails (two values), `allow` holds: allowed, no reason.
            (
                "package enforcer.authz\nallow := true\nreason := \"a\" if input.a\nreason := \"b\" if input.b",
                &[r#"{"a": true, "b": true}"#],
                (true, None, false, false),
            ),
            // `reason` fails (a builtin error): allowed, no reason.
            (
                "package enforcer.authz\nallow := true\nreason := sprintf(\"%d\", input.n) if input.n",
                &[r#"{"n": "x"}"#],
                (true, None, false, false),
            ),
            // `allow` fails (two values): denied with an error.
            (
                "package enforcer.authz\nallow := true if input.a\nallow := false if input.b\nreason := \"r\"",
                &[r#"{"a": true, "b": true}"#],
                (false, Some("policy error"), true, false),
            ),
            // `allow` is not a boolean: denied with an error.
            (
                "package enforcer.authz\nallow := \"yes\" if input.a\nreason := \"r\"",
                &[r#"{"a": true}"#],
                (false, Some("policy error"), true, false),
            ),
            // `reason` is not a string: none.
            (
                "package enforcer.authz\nallow := true\nreason := {\"why\": 1}",
                &["{}"],
                (true, None, false, false),
            ),
            // No `reason` rule at all.
            (
                "package enforcer.authz\nallow := true",
                &["{}"],
                (true, None, false, false),
            ),
        ];
        for (rego, inputs, want) in cases {
            let l = Loaded::compile("t", &files(rego, None), EngineKind::Interpreter)
                .expect("compiles");
            let reference = l.one_by_one();
            for input in *inputs {
                let got = l.evaluate(v(input));
                let expected = reference.evaluate(v(input));
                assert_eq!(outcome(&got), outcome(&expected), "{rego}\ninput {input}");
                let want = (want.0, want.1.map(str::to_owned), want.2, want.3);
                assert_eq!(outcome(&got), want, "{rego}\ninput {input}: {got:?}");
            }
        }
        // The shipped policy, on its connection grid and an MCP call.
        let l = Loaded::compile("t", &shipped(), EngineKind::Interpreter).expect("shipped");
        let reference = l.one_by_one();
        let ids = [
            None,
            Some("spiffe://ai.example.org/agent/support"),
            Some("spiffe://ai.example.org/mcp/docs"),
            Some("spiffe://ai.example.org/llm"),
            Some("spiffe://ai.example.org/vectordb"),
        ];
        let mut allowed = 0;
        for dir in ["outbound", "inbound"] {
            for s in ids {
                for d in ids {
                    for protocol in ["tcp", "mcp", "http"] {
                        let mut input = Input {
                            direction: dir,
                            source: peer(s, None),
                            destination: peer(d, Some(8000)),
                            protocol,
                            request: None,
                        };
                        if protocol == "mcp" {
                            let request = serde_json::json!({
                                "attributes": {"request": {"http": {"method": "POST"}}},
                                "mcp": {"method": "tools/call", "tool": "search_docs",
                                        "arguments": {"collection": "support-docs"}}});
                            input.request = request.as_object().cloned().map(Box::new);
                        }
                        let got = l.evaluate(input.to_value());
                        let expected = reference.evaluate(input.to_value());
                        assert_eq!(outcome(&got), outcome(&expected), "{input:?}");
                        allowed += usize::from(got.allow);
                    }
                }
            }
        }
        assert!(allowed > 0, "the grid allows some inputs");
    }

    /// A `reason` that runs past the evaluation budget denies (the caller
    /// has stopped waiting by then), and is not evaluated a second time.
    #[test]
    fn a_reason_out_of_time_denies_once() {
        let rego = "package enforcer.authz\nallow := true\nreason := \"r\" if {\n  input.slow\n  count([x | some x in numbers.range(1, 5000); some y in numbers.range(1, 5000); x == y]) < 0\n}";
        let set = load::PolicySet::plain(files(rego, None));
        let budget = Duration::from_millis(50);
        let l = Loaded::compile_with("t", &set, EngineKind::Interpreter, budget).expect("compiles");
        assert!(matches!(
            l.evaluator,
            Evaluator::Interpreter { entry: true, .. }
        ));
        let fast = l.evaluate(Value::new_object());
        assert!(fast.allow && fast.error.is_none(), "{fast:?}");
        // Denied with the time limit's error: evaluated one by one again,
        // `allow` would hold and the second `reason` would time out unseen.
        let d = l.evaluate(Value::from_json_str(r#"{"slow": true}"#).expect("json"));
        assert!(!d.allow, "{d:?}");
        assert!(
            d.error.as_deref().is_some_and(|e| e.contains("time limit")),
            "{d:?}"
        );
    }

    /// A policy that has the entry rule's package itself keeps it: its
    /// rules are evaluated one after the other.
    #[test]
    fn a_policy_with_the_entry_package_keeps_it() {
        let mut f = files(
            "package enforcer.authz\nallow := data.enforcer_internal_entry_7c1f.decision == 1",
            None,
        );
        f.push(load::PolicyFile {
            path: "p/other.rego".into(),
            contents: b"package enforcer_internal_entry_7c1f\ndecision := 1".to_vec(),
        });
        let l = Loaded::compile("t", &f, EngineKind::Interpreter).expect("compiles");
        assert!(matches!(
            l.evaluator,
            Evaluator::Interpreter { entry: false, .. }
        ));
        assert!(l.evaluate(Value::new_object()).allow);
    }
}
