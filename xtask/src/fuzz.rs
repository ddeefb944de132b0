//! `cargo xtask fuzz --secs N`: every cargo-fuzz target in `fuzz/`, each
//! for N seconds (libFuzzer, address sanitizer, nightly), from its corpus
//! in `fuzz/corpus/<target>/`. New inputs that reach new code are merged
//! into that corpus (libFuzzer's `-merge=1`, so it stays minimal); a crash
//! leaves its input in `fuzz/artifacts/<target>/` and fails the run.
//! `--runs M` stops each target after M executions; `--sanitizer none`
//! builds without the address sanitizer (in `fuzz/target/sanitizer-none/`,
//! so the default build is kept): 4–5× the executions a second, for long
//! runs, at the price of not catching memory errors that neither panic nor
//! abort (those can only come from unsafe code).
use std::{path::Path, process::Command};

use anyhow::{Context as _, bail};

use crate::{display, step};

const TARGETS: [&str; 7] = [
    "config",
    "selectors",
    "certificate",
    "http_request",
    "hbone",
    "l7_answer",
    "llm_chunk",
];

/// Whether the targets are built with the address sanitizer.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Sanitizer {
    Address,
    None,
}

impl Sanitizer {
    fn name(self) -> &'static str {
        match self {
            Self::Address => "address",
            Self::None => "none",
        }
    }

    /// cargo-fuzz's flags for this choice (build and run alike).
    fn args(self) -> &'static [&'static str] {
        match self {
            Self::Address => &["-O", "-s", "address"],
            Self::None => &["-O", "-s", "none", "--target-dir", "target/sanitizer-none"],
        }
    }
}

/// What to run: how long, how many executions, which targets, how built.
pub struct Plan<'a> {
    pub secs: u64,
    pub runs: Option<u64>,
    pub only: Option<&'a str>,
    pub sanitizer: Sanitizer,
}

/// What one target's run gave.
struct Ran {
    target: &'static str,
    execs: u64,
    per_sec: u64,
    coverage: u64,
    crashed: bool,
}

pub fn run(plan: Plan<'_>) -> anyhow::Result<()> {
    cargo_fuzz()?;
    let targets: Vec<&'static str> = match plan.only {
        Some(t) => vec![
            *TARGETS
                .iter()
                .find(|n| **n == t)
                .with_context(|| format!("no fuzz target {t}; there are {TARGETS:?}"))?,
        ],
        None => TARGETS.to_vec(),
    };
    // The certificate seed is made with the agent's own `ca init`.
    crate::build()?;
    for t in &targets {
        let dir = Path::new("fuzz/corpus").join(t);
        let empty = std::fs::read_dir(&dir).map_or(true, |mut d| d.next().is_none());
        if empty {
            step(Command::new("python3").args(["fuzz/seeds.py", t]))?;
        }
    }
    step(fuzz_cmd().arg("build").args(plan.sanitizer.args()))?;
    let mut results = Vec::new();
    for t in targets {
        results.push(run_one(t, &plan)?);
    }
    let runs = plan
        .runs
        .map(|r| format!(", at most {r} executions"))
        .unwrap_or_default();
    eprintln!(
        "\nfuzz, {} s per target{runs} (libFuzzer, -O, sanitizer: {}):",
        plan.secs,
        plan.sanitizer.name()
    );
    eprintln!(
        "{:<14} {:>12} {:>10} {:>8}  result",
        "target", "execs", "execs/s", "cov"
    );
    for r in &results {
        eprintln!(
            "{:<14} {:>12} {:>10} {:>8}  {}",
            r.target,
            r.execs,
            r.per_sec,
            r.coverage,
            if r.crashed {
                "CRASH (fuzz/artifacts/)"
            } else {
                "clean"
            }
        );
    }
    if results.iter().any(|r| r.crashed) {
        bail!("a fuzz target crashed; its input is in fuzz/artifacts/<target>/");
    }
    Ok(())
}

fn fuzz_cmd() -> Command {
    let mut c = Command::new("cargo");
    c.args(["+nightly", "fuzz"])
        .current_dir("fuzz")
        .env_remove("RUSTC")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env_remove("CARGO_TARGET_DIR");
    c
}

fn run_one(target: &'static str, plan: &Plan<'_>) -> anyhow::Result<Ran> {
    let work = Path::new("fuzz/target/work").join(target);
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    let corpus = format!("corpus/{target}");
    let work_rel = format!("target/work/{target}");
    let mut cmd = fuzz_cmd();
    cmd.arg("run")
        .args(plan.sanitizer.args())
        .args([target, &work_rel, &corpus, "--"])
        .arg(format!("-max_total_time={}", plan.secs))
        .args(["-print_final_stats=1", "-timeout=10", "-rss_limit_mb=2048"]);
    if let Some(runs) = plan.runs {
        cmd.arg(format!("-runs={runs}"));
    }
    eprintln!("==> {}", display(&cmd));
    let out = cmd
        .output()
        .with_context(|| format!("running fuzz target {target}"))?;
    let log = String::from_utf8_lossy(&out.stderr);
    let stat = |key: &str| {
        log.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    let coverage = log
        .lines()
        .rev()
        .find_map(|l| {
            l.split_once(" cov: ")
                .and_then(|(_, r)| r.split_whitespace().next())
        })
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let crashed = !out.status.success();
    if crashed {
        let tail: Vec<&str> = log.lines().rev().take(60).collect();
        eprintln!("{}", tail.into_iter().rev().collect::<Vec<_>>().join("\n"));
    } else {
        // Keep what reached new code: merged into the committed corpus.
        step(
            fuzz_cmd()
                .arg("run")
                .args(plan.sanitizer.args())
                .args([target, &corpus, &work_rel, "--", "-merge=1"])
                .stderr(std::process::Stdio::null()),
        )?;
    }
    Ok(Ran {
        target,
        execs: stat("stat::number_of_executed_units:"),
        per_sec: stat("stat::average_exec_per_sec:"),
        coverage,
        crashed,
    })
}

/// cargo-fuzz, installed from crates.io when missing (idempotent).
fn cargo_fuzz() -> anyhow::Result<()> {
    let have = Command::new("cargo")
        .args(["fuzz", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if have {
        return Ok(());
    }
    step(Command::new(env!("CARGO")).args(["install", "cargo-fuzz", "--locked"]))
        .context("installing cargo-fuzz")
}
