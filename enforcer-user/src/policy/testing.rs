//! `enforcer policy test`: runs every `test_*` rule of a policy set, the way
//! `opa test` does. A test passes when its rule evaluates to `true`.
use regorus::Value;

use super::load::{self, LoadError, PolicyFile};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TestResult {
    /// `data.<package>.<rule>`
    pub name: String,
    pub passed: bool,
    /// Why it failed (false, undefined, or an error).
    pub detail: Option<String>,
}

/// Test rule names in a Rego file: rules whose name starts with `test_` at the
/// start of a line.
fn test_rules(text: &str) -> Vec<String> {
    let mut out: Vec<String> = text
        .lines()
        .filter_map(|l| {
            let name: String = l
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            name.starts_with("test_").then_some(name)
        })
        .collect();
    out.dedup();
    out
}

pub fn run(origin: &str, files: &[PolicyFile]) -> Result<Vec<TestResult>, LoadError> {
    // Compile everything together (tests see the policies and the data).
    let mut engine = load::compile(origin, files)?;
    let mut results = Vec::new();
    for f in files.iter().filter(|f| f.path.ends_with(".rego")) {
        let text = String::from_utf8_lossy(&f.contents);
        let Some(package) = text.lines().find_map(|l| l.trim().strip_prefix("package ")) else {
            continue;
        };
        for rule in test_rules(&text) {
            let name = format!("data.{}.{rule}", package.trim());
            engine.set_input(Value::Undefined);
            let (passed, detail) = match engine.eval_rule(name.clone()) {
                Ok(Value::Bool(true)) => (true, None),
                Ok(Value::Undefined) => (false, Some("undefined".into())),
                Ok(v) => (false, Some(format!("evaluated to {v}"))),
                Err(e) => (false, Some(e.to_string())),
            };
            results.push(TestResult {
                name,
                passed,
                detail,
            });
        }
    }
    Ok(results)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_test_rules_only_at_line_start() {
        let t =
            "package p\ntest_a if { true }\n  test_b := 1\ntest_c if {\n}\nnot_test_d if true\n";
        assert_eq!(test_rules(t), vec!["test_a", "test_c"]);
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
