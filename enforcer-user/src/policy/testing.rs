//! `enforcer policy test`: runs the test rules of a policy set, the way
//! `opa test` does. Test rules are found in the parsed modules (any
//! indentation, any package declaration): rules named `test_*` run and pass
//! when they evaluate to `true`; `todo_test_*` rules are skipped. A test
//! name defined more than once runs once per definition, named as OPA names
//! them (`test_x`, `test_x#01`, …), so a failing definition is never hidden
//! behind a passing one.
use std::collections::HashMap;

use regorus::{
    Value,
    unstable::{Rule, RuleHead},
};

use super::load::{self, LoadError, PolicyFile};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TestResult {
    /// `data.<package>.<rule>`, with `#NN` for a repeated definition.
    pub name: String,
    pub passed: bool,
    /// A `todo_test_*` rule: not run.
    pub skipped: bool,
    /// Why it failed (false, undefined, or an error).
    pub detail: Option<String>,
}

/// A test rule found in a module.
struct Found {
    package: String,
    /// As OPA reports it.
    name: String,
    /// The rule to evaluate (a repeated definition is renamed).
    rule: String,
    skipped: bool,
}

/// Finds the test rules of one module and renames repeated definitions so
/// each can be evaluated alone. Returns the module text to compile.
fn find_tests(path: &str, text: &str) -> (String, Vec<Found>) {
    // Syntax errors are reported by the compiler.
    let Some(module) = super::rewrite::parse_module(path, text) else {
        return (text.to_owned(), Vec::new());
    };
    let package = module.package.refr.span().text().to_owned();
    let mut found: Vec<Found> = Vec::new();
    // Definitions seen so far, per test name.
    let mut seen: HashMap<&str, usize> = HashMap::new();
    let mut renames: Vec<(usize, usize, String)> = Vec::new();
    for rule in &module.policy {
        let Rule::Spec {
            head: RuleHead::Compr { refr, .. },
            ..
        } = rule.as_ref()
        else {
            continue;
        };
        let span = refr.span();
        let name = span.text();
        let skipped = name.starts_with("todo_test_");
        if !(name.starts_with("test_") || skipped) || name.contains(['.', '[']) {
            continue;
        }
        let count = seen.entry(name).or_default();
        let seen = *count;
        *count += 1;
        let (shown, rule_name) = if seen == 0 {
            (name.to_owned(), name.to_owned())
        } else {
            let renamed = format!("{name}__enforcer_def{seen}");
            renames.push((span.start as usize, span.end as usize, renamed.clone()));
            (format!("{name}#{seen:02}"), renamed)
        };
        found.push(Found {
            package: package.clone(),
            name: shown,
            rule: rule_name,
            skipped,
        });
    }
    let mut out = text.to_owned();
    for (start, end, renamed) in renames.into_iter().rev() {
        out.replace_range(start..end, &renamed);
    }
    (out, found)
}

pub fn run(origin: &str, files: &[PolicyFile]) -> Result<Vec<TestResult>, LoadError> {
    let mut tests = Vec::new();
    let files: Vec<PolicyFile> = files
        .iter()
        .map(|f| {
            if !f.path.ends_with(".rego") {
                return f.clone();
            }
            let text = String::from_utf8_lossy(&f.contents);
            let (text, found) = find_tests(&f.path, &text);
            tests.extend(found);
            PolicyFile {
                path: f.path.clone(),
                contents: text.into_bytes(),
            }
        })
        .collect();
    // Compile everything together (tests see the policies and the data).
    let mut engine = load::compile(origin, &files)?;
    let mut results = Vec::new();
    for t in tests {
        let name = format!("data.{}.{}", t.package, t.name);
        if t.skipped {
            results.push(TestResult {
                name,
                passed: false,
                skipped: true,
                detail: None,
            });
            continue;
        }
        engine.set_input(Value::Undefined);
        let (passed, detail) = match engine.eval_rule(format!("data.{}.{}", t.package, t.rule)) {
            Ok(Value::Bool(true)) => (true, None),
            Ok(Value::Undefined) => (false, Some("undefined".into())),
            Ok(v) => (false, Some(format!("evaluated to {v}"))),
            Err(e) => (false, Some(e.to_string())),
        };
        results.push(TestResult {
            name,
            passed,
            skipped: false,
            detail,
        });
    }
    Ok(results)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Indented rules, a package line with a comment, repeated names (each
    /// definition run on its own, as OPA's `#01`), and `todo_test_` skips.
    #[test]
    fn finds_every_test_rule_as_opa_does() {
        let t = "package p # the package\nimport rego.v1\n  test_a if { true }\n\ttest_b if { 1 == 2 }\n\
                 test_b if { true }\ntodo_test_c if { false }\nnot_test_d if true\n";
        let files = vec![PolicyFile {
            path: "p.rego".into(),
            contents: t.as_bytes().to_vec(),
        }];
        let r = run("mem", &files).expect("compiles");
        let got: Vec<(&str, bool, bool)> = r
            .iter()
            .map(|t| (t.name.as_str(), t.passed, t.skipped))
            .collect();
        assert_eq!(
            got,
            [
                ("data.p.test_a", true, false),
                ("data.p.test_b", false, false),
                ("data.p.test_b#01", true, false),
                ("data.p.todo_test_c", false, true),
            ]
        );
    }

    #[test]
    fn passing_failing_and_erroring_tests_are_reported() {
        let files = vec![PolicyFile {
            path: "p.rego".into(),
            contents: b"package p\nimport rego.v1\nx := 1\ntest_ok if { x == 1 }\ntest_bad if { x == 2 }\n".to_vec(),
        }];
        let r = run("mem", &files).expect("compiles");
        assert_eq!(r.len(), 2);
        assert!(r[0].passed && r[0].name == "data.p.test_ok");
        assert!(!r[1].passed && r[1].name == "data.p.test_bad");
    }
}
