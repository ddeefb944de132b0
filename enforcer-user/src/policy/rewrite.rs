//! Source rewrites that make regorus decide as OPA does (docs/policy.md,
//! "Semantics"). Applied to every module before it is compiled, by the agent
//! and by `enforcer policy test` alike; line numbers are kept (every edit
//! stays on its line), so errors still point at the operator's source.
//!
//! 1. **Arguments under `not` are bound first.** OPA rewrites a negated
//!    expression's call arguments, dynamic lookup indices and nested calls
//!    into separate expressions before the `not` (so `not f(input.x)` with
//!    `input.x` undefined is *undefined*, not true); regorus negates the
//!    whole expression. The same hoisting is done here, with OPA's rule: the
//!    direct operands of `==` and `=` stay in place, everything else that
//!    can be undefined is bound to a fresh variable before the literal.
//! 2. **RE2's ASCII Perl classes.** In a literal regex pattern, `\d`, `\w`,
//!    `\s` (and negations) become the ASCII classes RE2 gives them, and
//!    `\b`/`\B` ASCII word boundaries. Patterns not written as literals keep
//!    Perl classes unavailable: they fail to compile and the decision denies.
//! 3. **Unknown functions are refused** at load, naming the function, file
//!    and line, instead of failing (or, under `not`, passing) at evaluation.
use regorus::Source;
use regorus::unstable::{
    AssignOp, BoolOp, Expr, Literal, Module, Parser, Query, Ref, Rule, RuleHead,
};

/// A function a policy calls that enforcer does not provide.
#[derive(Debug, thiserror::Error)]
#[error("{file}:{line}: {message}")]
pub struct Refused {
    pub file: String,
    pub line: u32,
    pub message: String,
}

/// Builtins refused at load although regorus could run them: each decision
/// must be a function of its input and the loaded data (decisions are cached
/// and evaluated on the data path).
const REFUSED_BUILTINS: &[(&str, &str)] = &[
    (
        "http.send",
        "a policy must not make network calls per decision; put the data in the policy's data.json or bundle",
    ),
    (
        "net.lookup_ip_addr",
        "a policy must not resolve names per decision; match on input.destination.address",
    ),
];

/// Builtins whose result changes between evaluations of the same input: a
/// policy calling one is never served from the decision cache.
const VOLATILE_BUILTINS: &[&str] = &["time.now_ns", "rand.intn", "uuid.rfc4122", "opa.runtime"];

/// One step of a path into the input document.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Seg {
    Key(String),
    Index(u64),
}

/// A path into the input document.
pub type Path = Vec<Seg>;

/// One rewritten module.
pub struct Rewritten {
    pub text: String,
    /// The module calls a builtin whose value is not a function of the input.
    pub volatile: bool,
    /// The parts of `input` the module can read: each path is a prefix
    /// (the module may read anything below it). `None`: it may read any
    /// part (it names `input` itself, indexes it with a value it computes
    /// at the top, or does not parse).
    pub input_reads: Option<Vec<Vec<Seg>>>,
    /// Constant paths into `input` the module only tests for truth (a
    /// literal `input.x.y` or `not input.x.y`: defined and not false), not
    /// read for their value.
    pub input_truths: Vec<Vec<Seg>>,
    /// Full paths (`data.pkg.f`) of the functions the module defines, and
    /// the calls it makes that are not builtins: checked across all modules
    /// by [`check_calls`].
    pub defines: Vec<String>,
    pub calls: Vec<Call>,
    /// The module's package (`data.a.b`); empty when it does not parse.
    pub package: String,
}

/// A call to a function the module does not define.
pub struct Call {
    /// The data path it resolves to.
    pub path: String,
    /// As written.
    pub name: String,
    pub line: u32,
}

/// Parses one module as the engine will (Rego v1 unless it says otherwise,
/// as in OPA 1.x); None when it does not parse — the compiler then reports
/// the syntax error with its context.
pub fn parse_module(file: &str, text: &str) -> Option<Module> {
    let source = Source::from_contents(file.to_owned(), text.to_owned()).ok()?;
    let mut parser = Parser::new(&source).ok()?;
    parser.enable_rego_v1().ok()?;
    parser.parse().ok()
}

/// Rewrites one module (see the module docs). `file` names it in errors.
pub fn rewrite(file: &str, text: &str) -> Result<Rewritten, Refused> {
    let Some(module) = parse_module(file, text) else {
        return Ok(Rewritten {
            text: text.to_owned(),
            volatile: false,
            input_reads: None,
            input_truths: Vec::new(),
            defines: Vec::new(),
            calls: Vec::new(),
            package: String::new(),
        });
    };
    let mut prefix = String::from("enforcer_arg");
    while text.contains(&prefix) {
        prefix.push('_');
    }
    let mut w = Walker {
        text,
        edits: Vec::new(),
        fresh: 0,
        prefix,
        calls: Vec::new(),
        volatile: false,
        refused: None,
        module_path: package_path(&module),
        imports: imports(&module),
        locals: function_names(&module),
        input_reads: Some(Vec::new()),
        input_truths: Vec::new(),
        in_with_target: false,
    };
    // `import input.x as y`: whatever `y` reads is under `input.x`.
    for i in &module.imports {
        w.input_ref(&i.refr);
    }
    for rule in &module.policy {
        w.rule(rule);
    }
    if let Some((line, message)) = w.refused {
        return Err(Refused {
            file: file.to_owned(),
            line,
            message,
        });
    }
    let defines = w
        .locals
        .iter()
        .map(|f| format!("{}.{f}", w.module_path))
        .collect();
    Ok(Rewritten {
        text: apply(text, 0, text.len(), &mut w.edits),
        volatile: w.volatile,
        input_reads: w.input_reads,
        input_truths: w.input_truths,
        defines,
        calls: w.calls,
        package: w.module_path,
    })
}

/// Checks, across all modules of a set, that every call names a function
/// some module defines or a builtin enforcer provides.
pub fn check_calls(modules: &[(String, Rewritten)]) -> Result<(), Refused> {
    let defined: std::collections::HashSet<&str> = modules
        .iter()
        .flat_map(|(_, m)| m.defines.iter().map(String::as_str))
        .collect();
    for (file, m) in modules {
        if let Some(c) = m.calls.iter().find(|c| !defined.contains(c.path.as_str())) {
            return Err(Refused {
                file: file.clone(),
                line: c.line,
                message: format!(
                    "{} is not a function any module defines nor a builtin enforcer provides \
                     (docs/policy.md lists what is missing from OPA's builtins)",
                    c.name
                ),
            });
        }
    }
    Ok(())
}

/// A text edit: replace `start..end` by `text`. Insertions have start == end;
/// `order` sorts edits at one position (open brace, hoists, close brace).
struct Edit {
    start: usize,
    end: usize,
    order: u8,
    text: String,
}

/// `text[start..end]` with the edits inside that range applied (and removed
/// from `edits`).
fn apply(text: &str, start: usize, end: usize, edits: &mut Vec<Edit>) -> String {
    let mut inside: Vec<Edit> = Vec::new();
    let mut i = 0;
    while i < edits.len() {
        if edits[i].start >= start && edits[i].end <= end {
            inside.push(edits.swap_remove(i));
        } else {
            i += 1;
        }
    }
    inside.sort_by_key(|e| (e.start, e.order, e.end));
    let mut out = String::with_capacity(end - start + 64);
    let mut at = start;
    for e in inside {
        if e.start < at {
            // Overlapping edits cannot be produced; keep the first.
            continue;
        }
        out.push_str(text.get(at..e.start).unwrap_or(""));
        out.push_str(&e.text);
        at = e.end;
    }
    out.push_str(text.get(at..end).unwrap_or(""));
    out
}

/// The byte range of a span, quotes included: regorus's string spans (and
/// so the spans of expressions and queries that begin or end with a string
/// literal) leave out the quotes. Next to a complete expression a quote can
/// only be its own.
fn range(text: &str, span: &regorus::unstable::Span) -> (usize, usize) {
    let (mut start, mut end) = (span.start as usize, span.end as usize);
    let quote = |i: usize| matches!(text.as_bytes().get(i), Some(b'"' | b'`'));
    if start > 0 && quote(start - 1) {
        start -= 1;
    }
    if quote(end) {
        end += 1;
    }
    (start, end)
}

/// `a.b.c` of a ref made of names (`data.x.f`, `io.jwt.decode`); None for
/// anything else.
fn dotted(e: &Expr) -> Option<String> {
    match e {
        Expr::Var { span, .. } => Some(span.text().to_owned()),
        Expr::RefDot { refr, field, .. } => Some(format!("{}.{}", dotted(refr)?, field.0.text())),
        Expr::RefBrack { refr, index, .. } => match index.as_ref() {
            Expr::String { value, .. } => {
                Some(format!("{}.{}", dotted(refr)?, value.as_string().ok()?))
            }
            _ => None,
        },
        _ => None,
    }
}

fn package_path(m: &Module) -> String {
    let p = dotted(&m.package.refr).unwrap_or_default();
    format!("data.{}", p.trim_start_matches("data."))
}

/// Import aliases: `import data.lib` → (lib, data.lib); `… as l` → (l, …).
fn imports(m: &Module) -> Vec<(String, String)> {
    m.imports
        .iter()
        .filter_map(|i| {
            let path = dotted(&i.refr)?;
            if !path.starts_with("data.") {
                return None;
            }
            let alias = match &i.r#as {
                Some(a) => a.text().to_owned(),
                None => path.rsplit('.').next()?.to_owned(),
            };
            Some((alias, path))
        })
        .collect()
}

/// Names of the functions (and rules: a call may name a rule path too)
/// a module defines, relative to its package.
fn function_names(m: &Module) -> Vec<String> {
    let mut out = Vec::new();
    for r in &m.policy {
        let refr = match r.as_ref() {
            Rule::Spec { head, .. } => match head {
                RuleHead::Func { refr, .. }
                | RuleHead::Compr { refr, .. }
                | RuleHead::Set { refr, .. } => refr,
            },
            Rule::Default { refr, .. } => refr,
        };
        if let Some(name) = dotted(refr) {
            out.push(name);
        }
    }
    out.sort();
    out.dedup();
    out
}

struct Walker<'a> {
    /// The module's source; edits are offsets into it.
    text: &'a str,
    edits: Vec<Edit>,
    fresh: usize,
    prefix: String,
    calls: Vec<Call>,
    volatile: bool,
    refused: Option<(u32, String)>,
    module_path: String,
    imports: Vec<(String, String)>,
    locals: Vec<String>,
    /// What the module reads of `input` (see [`Rewritten::input_reads`]).
    input_reads: Option<Vec<Vec<Seg>>>,
    input_truths: Vec<Vec<Seg>>,
    /// Walking the target of a `with`: a replacement, not a read (what the
    /// replaced part is read as is walked where it is read).
    in_with_target: bool,
}

/// The constant path of a reference into `input` (`input.a["b"][0]`), up
/// to its first computed index; `None` when the reference is not into
/// `input`.
fn input_path(e: &Expr) -> Option<(Vec<Seg>, bool)> {
    match e {
        Expr::Var { span, .. } => (span.text() == "input").then(|| (Vec::new(), true)),
        Expr::RefDot { refr, field, .. } => {
            let (mut path, open) = input_path(refr)?;
            if open {
                path.push(Seg::Key(field.0.text().to_owned()));
            }
            Some((path, open))
        }
        Expr::RefBrack { refr, index, .. } => {
            let (mut path, open) = input_path(refr)?;
            if !open {
                return Some((path, false));
            }
            let seg = match index.as_ref() {
                Expr::String { value, .. } | Expr::RawString { value, .. } => {
                    value.as_string().ok().map(|s| Seg::Key(s.to_string()))
                }
                Expr::Number { value, .. } => value.as_u64().ok().map(Seg::Index),
                _ => None,
            };
            match seg {
                Some(s) => {
                    path.push(s);
                    Some((path, true))
                }
                None => Some((path, false)),
            }
        }
        _ => None,
    }
}

/// Where a query sits: a rule body written `if literal` (no braces) must be
/// wrapped in braces before literals can be added to it.
#[derive(Clone, Copy, PartialEq)]
enum QueryKind {
    RuleBody,
    Nested,
}

impl Walker<'_> {
    fn rule(&mut self, rule: &Ref<Rule>) {
        match rule.as_ref() {
            Rule::Spec { head, bodies, .. } => {
                match head {
                    RuleHead::Compr { refr, assign, .. } => {
                        self.expr(refr);
                        if let Some(a) = assign {
                            self.expr(&a.value);
                        }
                    }
                    RuleHead::Set { refr, key, .. } => {
                        self.expr(refr);
                        if let Some(k) = key {
                            self.expr(k);
                        }
                    }
                    RuleHead::Func { args, assign, .. } => {
                        for a in args {
                            self.expr(a);
                        }
                        if let Some(a) = assign {
                            self.expr(&a.value);
                        }
                    }
                }
                for b in bodies {
                    if let Some(a) = &b.assign {
                        self.expr(&a.value);
                    }
                    self.query(&b.query, QueryKind::RuleBody);
                }
            }
            Rule::Default { value, args, .. } => {
                for a in args {
                    self.expr(a);
                }
                self.expr(value);
            }
        }
    }

    fn query(&mut self, q: &Query, kind: QueryKind) {
        let mut hoisted = false;
        for stmt in &q.stmts {
            for w in &stmt.with_mods {
                self.in_with_target = true;
                self.expr(&w.refr);
                self.in_with_target = false;
                self.expr(&w.r#as);
            }
            match &stmt.literal {
                Literal::SomeVars { .. } => {}
                Literal::SomeIn {
                    key,
                    value,
                    collection,
                    ..
                } => self.membership(key.as_ref(), value, collection),
                Literal::Expr { expr, .. } => {
                    if !self.input_truth(expr) {
                        self.expr(expr)
                    }
                }
                Literal::NotExpr { expr, .. } => {
                    if !self.input_truth(expr) {
                        self.expr(expr);
                    }
                    let mut hoists = Vec::new();
                    self.not_operand(expr, &mut hoists);
                    if !hoists.is_empty() {
                        hoisted = true;
                        // The literal's `with` modifiers apply to what is hoisted.
                        let lit_end = literal_end(self.text, &stmt.literal);
                        let (stmt_start, stmt_end) = range(self.text, &stmt.span);
                        let with = self
                            .text
                            .get(lit_end..stmt_end.max(lit_end))
                            .unwrap_or("")
                            .trim_end_matches(';')
                            .to_owned();
                        let text: String = hoists.iter().map(|h| format!("{h}{with}; ")).collect();
                        self.edits.push(Edit {
                            start: stmt_start,
                            end: stmt_start,
                            order: 1,
                            text,
                        });
                    }
                }
                Literal::Every { domain, query, .. } => {
                    self.expr(domain);
                    self.query(query, QueryKind::Nested);
                }
            }
        }
        if !hoisted || kind != QueryKind::RuleBody {
            return;
        }
        let (s, e) = range(self.text, &q.span);
        let braced = self
            .text
            .get(s..e)
            .is_some_and(|t| t.trim_start().starts_with('{'));
        if !braced {
            self.edits.push(Edit {
                start: s,
                end: s,
                order: 0,
                text: "{ ".into(),
            });
            self.edits.push(Edit {
                start: e,
                end: e,
                order: 2,
                text: " }".into(),
            });
        }
    }

    /// A literal that is a constant path into `input` and nothing else
    /// (`input.attributes`, `not input.mcp.listing`): it succeeds when the
    /// path is defined and not false, whatever else the value holds;
    /// recorded as such. False when `e` is not one.
    fn input_truth(&mut self, e: &Expr) -> bool {
        match input_path(e) {
            Some((path, true)) if !path.is_empty() && !self.in_with_target => {
                self.input_truths.push(path);
                true
            }
            _ => false,
        }
    }

    /// Records what a reference into `input` reads; false when `e` is not
    /// one. Its computed indexes are visited as expressions.
    fn input_ref(&mut self, e: &Expr) -> bool {
        let Some((path, _)) = input_path(e) else {
            return false;
        };
        if !self.in_with_target {
            match (&mut self.input_reads, path.is_empty()) {
                (reads, true) => *reads = None,
                (Some(reads), false) => reads.push(path),
                (None, false) => {}
            }
        }
        let mut at = e;
        loop {
            match at {
                Expr::RefDot { refr, .. } => at = refr,
                Expr::RefBrack { refr, index, .. } => {
                    self.expr(index);
                    at = refr;
                }
                _ => return true,
            }
        }
    }

    /// Visits every expression: nested queries, regex literals, calls, and
    /// what is read of `input`.
    fn expr(&mut self, e: &Expr) {
        if self.input_ref(e) {
            return;
        }
        match e {
            Expr::Array { items, .. } | Expr::Set { items, .. } => {
                for i in items {
                    self.expr(i);
                }
            }
            Expr::Object { fields, .. } => {
                for (_, k, v) in fields {
                    self.expr(k);
                    self.expr(v);
                }
            }
            Expr::ArrayCompr { term, query, .. } | Expr::SetCompr { term, query, .. } => {
                self.expr(term);
                self.query(query, QueryKind::Nested);
            }
            Expr::ObjectCompr {
                key, value, query, ..
            } => {
                self.expr(key);
                self.expr(value);
                self.query(query, QueryKind::Nested);
            }
            Expr::Call {
                fcn, params, span, ..
            } => {
                self.call(fcn, params, span.line);
                for p in params {
                    self.expr(p);
                }
            }
            Expr::UnaryExpr { expr, .. } => self.expr(expr),
            Expr::RefDot { refr, .. } => self.expr(refr),
            Expr::RefBrack { refr, index, .. } => {
                self.expr(refr);
                self.expr(index);
            }
            Expr::BinExpr { lhs, rhs, .. }
            | Expr::BoolExpr { lhs, rhs, .. }
            | Expr::ArithExpr { lhs, rhs, .. }
            | Expr::AssignExpr { lhs, rhs, .. } => {
                self.expr(lhs);
                self.expr(rhs);
            }
            Expr::Membership {
                key,
                value,
                collection,
                ..
            } => self.membership(key.as_ref(), value, collection),
            _ => {}
        }
    }

    /// `key, value in collection` (a `some … in` or a membership test).
    fn membership(&mut self, key: Option<&Ref<Expr>>, value: &Expr, collection: &Expr) {
        if let Some(k) = key {
            self.expr(k);
        }
        self.expr(value);
        self.expr(collection);
    }

    /// Resolves a call's function; records data calls, refuses unknown and
    /// refused builtins, rewrites literal regex patterns.
    fn call(&mut self, fcn: &Expr, params: &[Ref<Expr>], line: u32) {
        let Some(name) = dotted(fcn) else { return };
        let first = name.split('.').next().unwrap_or("");
        if self.locals.contains(&name) {
            return;
        }
        if name.starts_with("data.") {
            self.calls.push(Call {
                path: name.clone(),
                name,
                line,
            });
            return;
        }
        if let Some((_, path)) = self.imports.iter().find(|(a, _)| a == first) {
            let rest = name.strip_prefix(first).unwrap_or("");
            self.calls.push(Call {
                path: format!("{path}{rest}"),
                name,
                line,
            });
            return;
        }
        if let Some((_, why)) = REFUSED_BUILTINS.iter().find(|(b, _)| *b == name) {
            self.refuse(line, format!("{name} is refused: {why}"));
            return;
        }
        if VOLATILE_BUILTINS.contains(&name.as_str()) {
            self.volatile = true;
        }
        if name != "print" && !regorus::unstable::BUILTINS.contains_key(name.as_str()) {
            // Defined by another module of the same package, or unknown.
            self.calls.push(Call {
                path: format!("{}.{name}", self.module_path),
                name,
                line,
            });
            return;
        }
        let pattern_arg = match name.as_str() {
            "regex.match"
            | "re_match"
            | "regex.split"
            | "regex.find_n"
            | "regex.is_valid"
            | "regex.find_all_string_submatch_n" => 0,
            "regex.replace" => 1,
            _ => return,
        };
        if let Some(p) = params.get(pattern_arg) {
            self.regex_literal(p);
        }
    }

    fn refuse(&mut self, line: u32, message: String) {
        if self.refused.is_none() {
            self.refused = Some((line, message));
        }
    }

    fn regex_literal(&mut self, e: &Expr) {
        let (Expr::String { value, .. } | Expr::RawString { value, .. }) = e else {
            return;
        };
        let Ok(pattern) = value.as_string() else {
            return;
        };
        let translated = re2_to_rust(pattern);
        if translated.as_str() != pattern.as_ref() {
            let (start, end) = range(self.text, e.span());
            // serde_json's escapes are all valid in Rego strings.
            let text = serde_json::to_string(&translated).unwrap_or_default();
            self.edits.push(Edit {
                start,
                end,
                order: 1,
                text,
            });
        }
    }

    fn bind(&mut self, e: &Expr, hoists: &mut Vec<String>) {
        let (s, end) = range(self.text, e.span());
        let inner = apply(self.text, s, end, &mut self.edits);
        let var = format!("{}{}", self.prefix, self.fresh);
        self.fresh += 1;
        // An operator expression is bound in parentheses (`k, v in c`).
        hoists.push(if is_ref(e) || matches!(e, Expr::Call { .. }) {
            format!("{var} = {inner}")
        } else {
            format!("{var} = ({inner})")
        });
        self.edits.push(Edit {
            start: s,
            end,
            order: 1,
            text: var,
        });
    }

    /// The operand of `not`: OPA's rewrite of a negated expression.
    fn not_operand(&mut self, e: &Expr, hoists: &mut Vec<String>) {
        match e {
            // Equality keeps its direct operands in place.
            Expr::BoolExpr {
                op: BoolOp::Eq,
                lhs,
                rhs,
                ..
            }
            | Expr::AssignExpr {
                op: AssignOp::Eq,
                lhs,
                rhs,
                ..
            } => {
                for side in [lhs, rhs] {
                    if is_call_like(side) {
                        self.dynamic(side, hoists);
                    } else {
                        self.components(side, hoists);
                    }
                }
            }
            _ => self.components(e, hoists),
        }
    }

    /// The parts of `e` that OPA binds, but not `e` itself.
    fn components(&mut self, e: &Expr, hoists: &mut Vec<String>) {
        match e {
            Expr::RefDot { refr, .. } => self.components(refr, hoists),
            Expr::RefBrack { refr, index, .. } => {
                self.components(refr, hoists);
                self.dynamic(index, hoists);
            }
            Expr::Call { params, .. } => {
                for p in params {
                    self.dynamic(p, hoists);
                }
            }
            Expr::BoolExpr { lhs, rhs, .. }
            | Expr::ArithExpr { lhs, rhs, .. }
            | Expr::BinExpr { lhs, rhs, .. } => {
                self.dynamic(lhs, hoists);
                self.dynamic(rhs, hoists);
            }
            Expr::UnaryExpr { expr, .. } => self.dynamic(expr, hoists),
            Expr::Membership {
                key,
                value,
                collection,
                ..
            } => {
                if let Some(k) = key {
                    self.dynamic(k, hoists);
                }
                self.dynamic(value, hoists);
                self.dynamic(collection, hoists);
            }
            Expr::Array { items, .. } | Expr::Set { items, .. } => {
                for i in items {
                    self.dynamic(i, hoists);
                }
            }
            Expr::Object { fields, .. } => {
                for (_, k, v) in fields {
                    self.dynamic(k, hoists);
                    self.dynamic(v, hoists);
                }
            }
            _ => {}
        }
    }

    /// OPA's rewrite of one term: refs and calls are bound to a variable
    /// (after their own parts), collections have their items rewritten.
    fn dynamic(&mut self, e: &Expr, hoists: &mut Vec<String>) {
        match e {
            _ if is_ref(e) || is_call_like(e) => {
                self.components(e, hoists);
                self.bind(e, hoists);
            }
            Expr::Array { .. } | Expr::Set { .. } | Expr::Object { .. } => {
                self.components(e, hoists)
            }
            _ => {}
        }
    }
}

fn is_ref(e: &Expr) -> bool {
    matches!(e, Expr::RefDot { .. } | Expr::RefBrack { .. })
}

fn is_call_like(e: &Expr) -> bool {
    matches!(
        e,
        Expr::Call { .. }
            | Expr::BoolExpr { .. }
            | Expr::ArithExpr { .. }
            | Expr::BinExpr { .. }
            | Expr::UnaryExpr { .. }
            | Expr::Membership { .. }
    )
}

/// Where a literal's own text ends (before any `with`). An expression's
/// span leaves out the parentheses around it (`not (x in s)`): they are the
/// literal's, so the end moves past them.
fn literal_end(text: &str, l: &Literal) -> usize {
    match l {
        Literal::NotExpr { expr, .. } | Literal::Expr { expr, .. } => {
            let end = range(text, expr.span()).1;
            let rest = text.get(end..).unwrap_or("");
            let closing = rest
                .find(|c: char| c != ')' && !c.is_whitespace())
                .unwrap_or(rest.len());
            end + rest[..closing].rfind(')').map_or(0, |i| i + 1)
        }
        Literal::SomeVars { span, .. }
        | Literal::SomeIn { span, .. }
        | Literal::Every { span, .. } => range(text, span).1,
    }
}

/// An RE2 pattern as the `regex` crate reads it with the same meaning:
/// RE2's `\d`, `\w`, `\s` and `\b` are ASCII-only, the crate's are Unicode.
pub fn re2_to_rust(p: &str) -> String {
    let mut out = String::with_capacity(p.len() + 16);
    let mut chars = p.chars().peekable();
    let mut in_class = false;
    // A `]` right after `[` or `[^` is a literal in both syntaxes.
    let mut class_start = false;
    while let Some(c) = chars.next() {
        if c == '\\' {
            let Some(n) = chars.next() else {
                out.push('\\');
                break;
            };
            let class = match n {
                'd' => Some(("0-9", false)),
                'D' => Some(("0-9", true)),
                'w' => Some(("0-9A-Za-z_", false)),
                'W' => Some(("0-9A-Za-z_", true)),
                's' => Some(("\\t\\n\\f\\r ", false)),
                'S' => Some(("\\t\\n\\f\\r ", true)),
                _ => None,
            };
            match (class, in_class) {
                (Some((set, false)), true) => out.push_str(set),
                (Some((set, negated)), _) => {
                    out.push('[');
                    if negated {
                        out.push('^');
                    }
                    out.push_str(set);
                    out.push(']');
                }
                (None, false) if n == 'b' || n == 'B' => {
                    out.push_str("(?-u:\\");
                    out.push(n);
                    out.push(')');
                }
                (None, _) => {
                    out.push('\\');
                    out.push(n);
                }
            }
            class_start = false;
            continue;
        }
        if in_class {
            if c == ']' && !class_start {
                in_class = false;
            } else if c == '[' && chars.peek() == Some(&':') {
                // POSIX class: copy through its `:]`.
                out.push(c);
                let mut prev = '[';
                for n in chars.by_ref() {
                    out.push(n);
                    if prev == ':' && n == ']' {
                        break;
                    }
                    prev = n;
                }
                class_start = false;
                continue;
            } else if c == '[' {
                // RE2 has no nested classes: `[` inside one is a literal.
                out.push_str("\\[");
                class_start = false;
                continue;
            }
            class_start = class_start && c == '^' && out.ends_with('[');
            out.push(c);
            continue;
        }
        if c == '[' {
            in_class = true;
            class_start = true;
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn re2_perl_classes_become_ascii() {
        let cases = [
            (r"^\d+$", "^[0-9]+$"),
            (r"\D", "[^0-9]"),
            (r"[\d.]+", "[0-9.]+"),
            (r"[^\w-]", "[^0-9A-Za-z_-]"),
            (r"\bfoo\B", r"(?-u:\b)foo(?-u:\B)"),
            (r"[[:alpha:]\s]", "[[:alpha:]\\t\\n\\f\\r ]"),
            (r"\pL\p{Greek}", r"\pL\p{Greek}"),
            (r"[]a]", "[]a]"),
            (r"[a[]", r"[a\[]"),
            (r"\\d", r"\\d"),
            (r"(?i)abc", "(?i)abc"),
        ];
        for (re2, rust) in cases {
            assert_eq!(re2_to_rust(re2), rust, "{re2}");
        }
    }

    fn rewritten(src: &str) -> String {
        rewrite("t.rego", src).expect("rewrites").text
    }

    #[test]
    fn what_a_module_reads_of_input() {
        use Seg::{Index, Key};
        let k = |p: &[&str]| -> Vec<Seg> { p.iter().map(|s| Key((*s).to_owned())).collect() };
        let head = "package p\nimport rego.v1\n";
        let cases: Vec<(&str, Option<Vec<Vec<Seg>>>)> = vec![
            (
                "allow if input.attributes.request.http.method == \"GET\"",
                Some(vec![k(&["attributes", "request", "http", "method"])]),
            ),
            // A computed index ends the path; the index is read too.
            (
                "allow if input.x[input.y] == 1",
                Some(vec![k(&["x"]), k(&["y"])]),
            ),
            (
                "allow if { some h; input.h[h] == 1 }",
                Some(vec![k(&["h"])]),
            ),
            (
                "allow if input.a[\"b\"][0] == 1",
                Some(vec![vec![Key("a".into()), Key("b".into()), Index(0)]]),
            ),
            // The whole input, one way or another.
            ("allow if count(input) > 0", None),
            ("allow if { some k; input[k] == 1 }", None),
            ("allow if walk(input, [p, v])", None),
            ("import input\nallow if input.x", None),
            // An import of a part of it.
            (
                "import input.attributes as a\nallow if a.x == 1",
                Some(vec![k(&["attributes"])]),
            ),
            // In rule heads, comprehensions, `every`, function arguments.
            ("r := input.h\nallow if r", Some(vec![k(&["h"])])),
            (
                "allow if { every x in input.xs { x > 1 } }",
                Some(vec![k(&["xs"])]),
            ),
            ("f(x) := x\nallow if f(input.z)", Some(vec![k(&["z"])])),
            // `with input as` replaces; the replacement is not a read.
            (
                "allow if data.p.q with input as {\"a\": 1}\nq if input.a == 1",
                Some(vec![k(&["a"])]),
            ),
            ("allow if true", Some(vec![])),
            // A bare test reads no value (see input_truths below).
            (
                "allow if input.attributes\nallow if not input.x.y",
                Some(vec![]),
            ),
        ];
        for (src, want) in cases {
            let got = rewrite("t.rego", &format!("{head}{src}\n"))
                .unwrap_or_else(|e| panic!("{src}: {e:?}"))
                .input_reads;
            let sorted = |v: Option<Vec<Vec<Seg>>>| {
                v.map(|mut v| {
                    v.sort();
                    v.dedup();
                    v
                })
            };
            assert_eq!(sorted(got), sorted(want), "{src}");
        }
        let truths = |src: &str| {
            let mut t = rewrite("t.rego", &format!("{head}{src}\n"))
                .expect("rewrites")
                .input_truths;
            t.sort();
            t
        };
        assert_eq!(
            truths("allow if input.attributes\nallow if not input.x.y"),
            [k(&["attributes"]), k(&["x", "y"])]
        );
        // Compared, or computed into: a read, not a truth test.
        assert!(truths("allow if input.attributes == {}").is_empty());
        assert!(truths("allow if { some k; input.a[k] }").is_empty());
    }

    #[test]
    fn negated_calls_bind_their_arguments_first() {
        let head = "package p\nimport rego.v1\n";
        let cases = [
            (
                "allow if not f(input.x)\n",
                "allow if { enforcer_arg0 = input.x; not f(enforcer_arg0) }\n",
            ),
            (
                "allow if {\n\tnot input.x == 1\n}\n",
                "allow if {\n\tnot input.x == 1\n}\n",
            ),
            (
                "allow if {\n\tnot data.m[input.x]\n}\n",
                "allow if {\n\tenforcer_arg0 = input.x; not data.m[enforcer_arg0]\n}\n",
            ),
            (
                "allow if not lower(input.x) == \"a\"\n",
                "allow if { enforcer_arg0 = input.x; enforcer_arg1 = lower(enforcer_arg0); not enforcer_arg1 == \"a\" }\n",
            ),
            (
                "allow if not f(input.x) with input.y as 1\n",
                "allow if { enforcer_arg0 = input.x with input.y as 1; not f(enforcer_arg0) with input.y as 1 }\n",
            ),
            (
                "k := [v | some v in input.vals; not startswith(v, input.x)]\n",
                "k := [v | some v in input.vals; enforcer_arg0 = input.x; not startswith(v, enforcer_arg0)]\n",
            ),
            ("allow if not r\n", "allow if not r\n"),
            (
                "allow if {\n\tnot (input.x in {\"a\"})\n}\n",
                "allow if {\n\tenforcer_arg0 = input.x; not (enforcer_arg0 in {\"a\"})\n}\n",
            ),
            (
                "allow if {\n\tnot ((f(input.x))) with input.y as 1\n}\n",
                "allow if {\n\tenforcer_arg0 = input.x with input.y as 1; not ((f(enforcer_arg0))) with input.y as 1\n}\n",
            ),
        ];
        for (src, want) in cases {
            assert_eq!(
                rewritten(&format!("{head}f(a) if a\n{src}")),
                format!("{head}f(a) if a\n{want}"),
                "{src}"
            );
        }
    }

    #[test]
    fn unknown_and_refused_functions_name_file_and_line() {
        let m = rewrite(
            "p.rego",
            "package p\nimport rego.v1\n\nallow if net.cidr_nope(\"a\", \"b\")\n",
        )
        .expect("parses");
        let e = check_calls(&[("p.rego".into(), m)]).expect_err("refused");
        assert_eq!((e.file.as_str(), e.line), ("p.rego", 4));
        assert!(e.message.contains("net.cidr_nope"), "{e}");
        // A function of the same package in another module is found.
        let a = rewrite("a.rego", "package p\nimport rego.v1\nallow if g(1)\n").expect("a");
        let b = rewrite("b.rego", "package p\nimport rego.v1\ng(x) if x == 1\n").expect("b");
        check_calls(&[("a.rego".into(), a), ("b.rego".into(), b)]).expect("g is defined");
        let Err(e) = rewrite(
            "p.rego",
            "package p\nimport rego.v1\nallow if http.send({\"method\": \"get\", \"url\": \"x\"})\n",
        ) else {
            panic!("http.send must be refused");
        };
        assert!(e.message.contains("http.send is refused"), "{e}");
        let ok = rewrite(
            "p.rego",
            "package p\nimport rego.v1\nallow if time.now_ns() > 0\n",
        )
        .expect("loads");
        assert!(ok.volatile);
    }
}
