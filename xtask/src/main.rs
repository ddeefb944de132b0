//! `cargo xtask setup | demo | test | bench | fuzz`: everything a person runs.
use std::process::Command;

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

mod bench;
mod demo;
mod fuzz;
mod load;
mod setup;

#[derive(Parser)]
#[command(about = "enforcer developer tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install everything the build, tests, demo and benchmarks need (idempotent).
    Setup,
    /// Two nodes, a client and a server: shows captured connections and metrics.
    Demo,
    /// Every check: formatting, clippy, unit and integration tests (as root).
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Benchmarks (DESIGN §7): direct vs enforcer vs stunnel, side by side.
    Bench {
        /// Instead of measuring: record system-wide CPU profiles (perf,
        /// cpu-clock) of iperf3 and sockperf on each path and write where the
        /// time goes to bench/results/<date>-profile.md.
        #[arg(long)]
        profile: bool,
        /// Only the streamed-LLM figures (time to first token, per-chunk
        /// latency), written to bench/results/<date>-llm.json.
        #[arg(long)]
        llm_only: bool,
        /// Only new connections per second, 6 back-to-back rounds of 10 s
        /// on the direct path then through enforcer (a rate that falls as
        /// TIME_WAIT builds up shows), to bench/results/<date>-sustained.json.
        #[arg(long)]
        sustained: bool,
        /// Only memory: both agents' RSS idle, after 20 s of new
        /// connections, with 10 000 held, and after they closed, to
        /// bench/results/<date>-memory.json.
        #[arg(long)]
        memory: bool,
        /// Only the no-stall check: sockperf latency through enforcer alone
        /// and while new workloads with 1 GiB executables connect (each
        /// hashed by the agent), to bench/results/<date>-stall.json.
        #[arg(long)]
        stall: bool,
        /// Only the cost of traces: HTTP requests at b's L7 destination with
        /// b's `[traces]` off and on (exporting to an OTLP receiver in b's
        /// netns), alternated by hitless upgrades of b's agent, to
        /// bench/results/<date>-traces.json.
        #[arg(long)]
        traces: bool,
    },
    /// Soak (bench topology, policy on): HOLD idle connections held and
    /// RATE new connections/s for SECS seconds across the two nodes; both
    /// agents' RSS, fds, threads, open connections and capture-map entries
    /// sampled every 30 s must stay flat, and come back after the load.
    /// Results to bench/results/<date>-soak.json.
    Soak {
        #[arg(long, default_value_t = 600)]
        secs: u64,
        #[arg(long, default_value_t = 1000)]
        rate: u64,
    },
    /// Fuzz targets (fuzz/, cargo-fuzz): each runs SECS seconds from its
    /// committed corpus; new coverage is merged back; a crash fails.
    Fuzz {
        #[arg(long, default_value_t = 60)]
        secs: u64,
        /// Only this target.
        #[arg(long)]
        target: Option<String>,
        /// Stop each target after this many executions (SECS still caps it).
        #[arg(long)]
        runs: Option<u64>,
        /// `none` runs 4-5x more executions a second, but no longer catches
        /// memory errors in unsafe code that do not panic or abort.
        #[arg(long, value_enum, default_value_t = fuzz::Sanitizer::Address)]
        sanitizer: fuzz::Sanitizer,
    },
    /// (used by bench) echo server on [::]:PORT
    #[command(hide = true)]
    BenchEcho { port: u16 },
    /// (used by bench) HTTP/1.1 server (hyper, keep-alive) on [::]:PORT
    /// answering every request 200 with a 3-byte body
    #[command(hide = true)]
    BenchHttp { port: u16 },
    /// (used by bench) new connections per second against ADDR
    #[command(hide = true)]
    BenchLoad {
        addr: std::net::SocketAddr,
        secs: u64,
        workers: usize,
    },
    /// (used by bench) COUNT sequential new connections to ADDR, each
    /// timed from connect() to the answer's first byte: p50 and p99
    #[command(hide = true)]
    BenchSetup {
        addr: std::net::SocketAddr,
        count: usize,
    },
    /// (used by bench) REQUESTS streamed chat completions of WORDS words from
    /// the OpenAI-compatible stand-in at ADDR: time to first token, per-chunk latency
    #[command(hide = true)]
    BenchSse {
        addr: std::net::SocketAddr,
        requests: usize,
        words: usize,
    },
    /// (used by soak) PER_SEC new connections/s to ADDR for SECS
    #[command(hide = true)]
    BenchPaced {
        addr: std::net::SocketAddr,
        secs: u64,
        per_sec: u64,
    },
    /// (used by bench) hold COUNT idle connections to ADDR for SECS
    #[command(hide = true)]
    BenchHold {
        addr: std::net::SocketAddr,
        count: usize,
        secs: u64,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().task {
        Task::Setup => setup::run(),
        Task::Demo => {
            setup::run()?;
            build()?;
            demo::run()
        }
        Task::Test { args } => {
            setup::run()?;
            test(&args)
        }
        Task::Bench {
            profile,
            llm_only,
            sustained,
            memory,
            stall,
            traces,
        } => {
            use bench::Mode;
            let mode = match (profile, llm_only, sustained, memory, stall, traces) {
                (true, ..) => Mode::Profile,
                (_, true, ..) => Mode::LlmOnly,
                (_, _, true, ..) => Mode::Sustained,
                (_, _, _, true, ..) => Mode::Memory,
                (_, _, _, _, true, _) => Mode::Stall,
                (.., true) => Mode::Traces,
                _ => Mode::Full,
            };
            setup::run()?;
            bench::run(mode)
        }
        Task::Soak { secs, rate } => {
            setup::run()?;
            bench::run(bench::Mode::Soak {
                secs: secs.clamp(60, 3600),
                rate: rate.clamp(1, 5000),
            })
        }
        Task::Fuzz {
            secs,
            target,
            runs,
            sanitizer,
        } => {
            setup::run()?;
            fuzz::run(fuzz::Plan {
                secs: secs.clamp(1, 24 * 3600),
                runs,
                only: target.as_deref(),
                sanitizer,
            })
        }
        Task::BenchEcho { port } => load::echo(port),
        Task::BenchHttp { port } => load::http(port),
        Task::BenchLoad {
            addr,
            secs,
            workers,
        } => load::connect_rate(addr, secs.min(60), workers.min(256)),
        Task::BenchSetup { addr, count } => load::setup(addr, count.min(100_000)),
        Task::BenchSse {
            addr,
            requests,
            words,
        } => load::sse(addr, requests.min(1000), words.min(10_000)),
        Task::BenchHold { addr, count, secs } => {
            load::hold(addr, count.min(20_000), secs.min(3700))
        }
        Task::BenchPaced {
            addr,
            secs,
            per_sec,
        } => load::paced(addr, secs.min(3600), per_sec.clamp(1, 5000)),
    }
}

/// Runs a command, failing with its name if it does not succeed.
pub fn cargo(args: &[&str]) -> anyhow::Result<()> {
    step(Command::new(env!("CARGO")).args(args))
}

pub fn step(cmd: &mut Command) -> anyhow::Result<()> {
    eprintln!("==> {}", display(cmd));
    let status = cmd
        .status()
        .with_context(|| format!("spawning {}", display(cmd)))?;
    if !status.success() {
        bail!("`{}` failed ({status})", display(cmd));
    }
    Ok(())
}

fn display(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|s| s.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

fn build() -> anyhow::Result<()> {
    cargo(&[
        "build",
        "--package",
        "enforcer-user",
        "--package",
        "enforcer-cni",
    ])
}

fn test(extra: &[String]) -> anyhow::Result<()> {
    cargo(&["fmt", "--all", "--", "--check"])?;
    cargo(&["clippy", "--all-targets", "--", "-D", "warnings"])?;
    // The fuzz targets' entry points (fuzz/, built by `cargo xtask fuzz`).
    cargo(&[
        "clippy",
        "--package",
        "enforcer-user",
        "--features",
        "fuzzing",
        "--",
        "-D",
        "warnings",
    ])?;
    // The kernel crate is outside the host build; lint it for its own target.
    step(
        Command::new("cargo")
            .args([
                "+nightly",
                "clippy",
                "--package",
                "enforcer-ebpf",
                "--release",
                "--target",
                "bpfel-unknown-none",
                "-Z",
                "build-std=core",
                "--",
                "-D",
                "warnings",
            ])
            .env_remove("RUSTC")
            .env_remove("RUSTC_WORKSPACE_WRAPPER")
            .env("CARGO_TARGET_DIR", "target/ebpf-clippy"),
    )?;
    build()?;
    // The shipped Rego policies' own tests, like `opa test`.
    step(Command::new("target/debug/enforcer").args(["policy", "test", "--policy", "policies"]))?;
    // The fuzz targets' harnesses reach the code they fuzz (each feeds one
    // seed and checks what came out), so a harness that stops short fails
    // here rather than fuzzing nothing.
    let (hp, hf, hs) = tally(&[
        "test",
        "--package",
        "enforcer-user",
        "--features",
        "fuzzing",
        "--lib",
        "harness",
    ])?;
    let mut args = vec!["test", "--workspace", "--exclude", "enforcer-ebpf"];
    args.extend(extra.iter().map(String::as_str));
    let before = Leftovers::read();
    let (passed, failed, status) = tally(&args)?;
    let leaked = Leftovers::read().since(&before);
    if hp < 3 {
        bail!("the fuzz harness checks did not run ({hp} passed)");
    }
    let (passed, failed) = (passed + hp, failed + hf);
    println!("summary: {passed} passed, {failed} failed");
    if !hs.success() || !status.success() || failed > 0 {
        bail!("tests failed ({hs}, {status})");
    }
    if passed == 0 {
        bail!("no test ran");
    }
    if !leaked.is_empty() {
        bail!(
            "the tests left on this host (now removed): {}. A test must clean up what it makes (the testbed's drop does: netns, cgroups, `enforcer detach`)",
            leaked.join(", ")
        );
    }
    Ok(())
}

/// What the integration tests make on the host and must remove: agent
/// instances' bpffs pins (programs attached for as long as they exist),
/// network namespaces and the testbeds' cgroups. Read before and after
/// the tests: whatever is new afterwards leaked.
struct Leftovers {
    pins: std::collections::BTreeSet<std::path::PathBuf>,
    netns: std::collections::BTreeSet<String>,
    cgroups: std::collections::BTreeSet<std::path::PathBuf>,
}

const PINS: &str = "/sys/fs/bpf/enforcer";

impl Leftovers {
    fn read() -> Self {
        let entries = |dir: &std::path::Path| {
            std::fs::read_dir(dir)
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| e.path())
                .collect::<Vec<_>>()
        };
        let name = |p: &std::path::Path| p.file_name().map(|n| n.to_string_lossy().into_owned());
        // <bpffs>/enforcer/v<layout>/<instance>, of a testbed's instances
        // alone (`<test>-<pid>-<seq>-<node>`): an agent of the host's that
        // started meanwhile is none of the tests' business.
        let pins = entries(std::path::Path::new(PINS))
            .iter()
            .flat_map(|layout| entries(layout))
            .filter(|p| name(p).is_some_and(|n| is_test_instance(&n)))
            .collect();
        let netns = entries(std::path::Path::new("/run/netns"))
            .iter()
            .filter_map(|p| name(p))
            .filter(|n| n.starts_with("enft-"))
            .collect();
        let cgroups = cgroup2_mount()
            .map(|m| entries(&m))
            .unwrap_or_default()
            .into_iter()
            .filter(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("enforcer-test-"))
            })
            .collect();
        Self {
            pins,
            netns,
            cgroups,
        }
    }

    /// What is here now and was not `before`, each removed (the pins by
    /// unlinking them, which detaches their programs).
    fn since(&self, before: &Self) -> Vec<String> {
        let mut leaked = Vec::new();
        for p in self.pins.difference(&before.pins) {
            let _ = std::fs::remove_dir_all(p);
            leaked.push(format!("pins {}", p.display()));
        }
        for n in self.netns.difference(&before.netns) {
            let _ = Command::new("ip").args(["netns", "del", n]).status();
            leaked.push(format!("netns {n}"));
        }
        for c in self.cgroups.difference(&before.cgroups) {
            // Empty by now, or it holds a process a test left running
            // (named, not killed here: only the test knows it is its own).
            if std::fs::remove_dir(c).is_err() {
                leaked.push(format!("cgroup {} (could not be removed)", c.display()));
            } else {
                leaked.push(format!("cgroup {}", c.display()));
            }
        }
        // The directories the agents made above their instances, when
        // the tests made them and left them empty.
        if before.pins.is_empty() {
            for layout in std::fs::read_dir(PINS).into_iter().flatten().flatten() {
                let _ = std::fs::remove_dir(layout.path());
            }
            let _ = std::fs::remove_dir(PINS);
        }
        leaked
    }
}

/// A testbed's agent instance name: `<test>-<pid>-<seq>-<node>`.
fn is_test_instance(name: &str) -> bool {
    let parts: Vec<&str> = name.rsplitn(4, '-').collect();
    let numeric = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    parts.len() == 4 && numeric(parts[1]) && numeric(parts[2])
}

/// Where the cgroup2 hierarchy is mounted (the unified one on a hybrid
/// host).
fn cgroup2_mount() -> Option<std::path::PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    text.lines().find_map(|l| {
        let (left, right) = l.split_once(" - ")?;
        (right.split_whitespace().next()? == "cgroup2")
            .then(|| left.split_whitespace().nth(4).map(std::path::PathBuf::from))?
    })
}

/// Runs cargo with `args`, forwarding its output live and tallying every
/// "test result:" line, so the run ends with one summary of all test
/// binaries (cargo's own last line is often an empty doc-test run).
fn tally(args: &[&str]) -> anyhow::Result<(u64, u64, std::process::ExitStatus)> {
    let mut cmd = Command::new(env!("CARGO"));
    cmd.args(args).stdout(std::process::Stdio::piped());
    eprintln!("==> {}", display(&cmd));
    let mut child = cmd.spawn().context("spawning cargo test")?;
    let stdout = child.stdout.take().context("cargo test stdout")?;
    let (mut passed, mut failed) = (0u64, 0u64);
    for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)) {
        let line = line.context("reading cargo test output")?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            passed += count(rest, " passed");
            failed += count(rest, " failed");
        }
    }
    Ok((passed, failed, child.wait()?))
}

/// The number before `what` in a "test result:" line (e.g. "3 passed").
fn count(line: &str, what: &str) -> u64 {
    line.split(';')
        .find_map(|part| part.trim().strip_suffix(what.trim_start()))
        .and_then(|n| n.trim().rsplit(' ').next()?.parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    #[test]
    fn testbed_instances_are_told_from_the_hosts() {
        assert!(super::is_test_instance("upgbroken-14577-5-a"));
        assert!(super::is_test_instance("detachrun-2444-0-b"));
        assert!(!super::is_test_instance("node1"));
        assert!(!super::is_test_instance("worker-3"));
        assert!(!super::is_test_instance("a-b-c-d"));
    }

    #[test]
    fn counts_are_read_from_cargo_test_result_lines() {
        let l = "ok. 10 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out; finished in 6.97s";
        assert_eq!(super::count(l, " passed"), 10);
        assert_eq!(super::count(l, " failed"), 2);
        assert_eq!(
            super::count("FAILED. 0 passed; 9 failed; 0 ignored", " failed"),
            9
        );
    }
}
