#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// The allocator: jemalloc, measured against glibc's malloc and mimalloc
/// (bench/README.md "Memory after load"): glibc kept the agent's RSS at its
/// peak after 9 000 connections closed (159 MiB against 23 idle), jemalloc
/// with these options gives most of it back within 15 s, at the same idle
/// RSS. Its options, read when it starts: background purging threads, two
/// arenas (the agent has few threads), freed pages returned after 1 s.
#[allow(non_upper_case_globals)]
#[unsafe(export_name = "_rjem_malloc_conf")]
pub static malloc_conf: &[u8; 70] =
    b"background_thread:true,narenas:2,dirty_decay_ms:1000,muzzy_decay_ms:0\0";

use std::path::PathBuf;

/// Threads of the runtime's blocking pool at most.
const MAX_BLOCKING_THREADS: usize = 64;
/// How long an idle thread of the blocking pool waits for a job before it
/// ends.
const BLOCKING_KEEP_ALIVE: std::time::Duration = std::time::Duration::from_secs(2);

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use enforcer::config::{Config, LogFormat};

/// enforcer: SPIFFE identity, mutual TLS and policy for every workload on a node.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the node agent.
    Run {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Validate a config file and exit.
    Check {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Evaluate or test policies.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Manage the embedded CA.
    #[command(subcommand)]
    Ca(CaCommand),
    /// Detach the kernel programs of the instance a config names and remove its
    /// bpffs pins. Captured connects then go direct again: use it to uninstall,
    /// with the agent stopped.
    Detach {
        /// The agent's config (its node_name, capture.bpffs and
        /// identity.state_dir are read).
        #[arg(long, short, required_unless_present = "node_name")]
        config: Option<PathBuf>,
        /// Without a config (none left, a package purged): the instance's
        /// node_name, and where its pins and state are when not at the
        /// defaults.
        #[arg(long, conflicts_with = "config")]
        node_name: Option<String>,
        #[arg(long, requires = "node_name", default_value = "/sys/fs/bpf")]
        bpffs: PathBuf,
        #[arg(long, requires = "node_name", default_value = "/var/lib/enforcer")]
        state_dir: PathBuf,
        /// Detach even while an agent of this config runs (it then runs on
        /// with nothing captured).
        #[arg(long)]
        force: bool,
    },
    /// Print what a running agent is doing (its `/status`): workloads and
    /// their identities, SVIDs, open connections, pooled HBONE connections,
    /// the policy in force, L7 destinations, token budgets.
    Status {
        /// The agent's config file (its `admin.status_addr` is asked).
        #[arg(long, short, conflicts_with = "addr")]
        config: Option<PathBuf>,
        /// The agent's `admin.status_addr` (default 127.0.0.1:15000).
        #[arg(long)]
        addr: Option<std::net::SocketAddr>,
        /// Print the JSON document instead of tables.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Print the decision of a policy for an input document (DESIGN §3).
    Eval {
        /// JSON input document.
        #[arg(long)]
        input: PathBuf,
        /// Policy directory or bundle (.tar.gz); default: policy.source of --config.
        #[arg(long)]
        policy: Option<String>,
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// `vm` or `interpreter`; default: policy.engine of --config, else `vm`.
        #[arg(long, value_parser = parse_engine)]
        engine: Option<enforcer::policy::EngineKind>,
    },
    /// Run the test_* rules of a policy directory or bundle, like `opa test`.
    Test {
        #[arg(long, default_value = "policies")]
        policy: String,
    },
}

fn parse_engine(s: &str) -> Result<enforcer::policy::EngineKind, String> {
    match s {
        "vm" => Ok(enforcer::policy::EngineKind::Vm),
        "interpreter" => Ok(enforcer::policy::EngineKind::Interpreter),
        _ => Err(format!("{s:?}: expected `vm` or `interpreter`")),
    }
}

fn policy_cmd(cmd: PolicyCommand) -> anyhow::Result<()> {
    use enforcer::policy::{source::PolicySource, testing};
    match cmd {
        PolicyCommand::Eval {
            input,
            policy,
            config,
            engine,
        } => {
            let from_config = config
                .map(|c| enforcer::settings::load(&c).map(|cfg| (cfg, c)))
                .transpose()?;
            let src = match (policy, &from_config) {
                (Some(p), _) => p,
                (None, Some((c, _))) => c.policy.source.clone(),
                (None, None) => anyhow::bail!("name the policy with --policy DIR or --config FILE"),
            };
            let engine = engine
                .or(from_config.as_ref().map(|(c, _)| c.policy.engine))
                .unwrap_or_default();
            let src = PolicySource::parse(&src).map_err(anyhow::Error::msg)?;
            let timeout = from_config
                .as_ref()
                .map_or(enforcer::policy::DEFAULT_EVAL_TIMEOUT, |(c, _)| {
                    c.policy.eval_timeout()
                });
            let opts = match &from_config {
                Some((c, path)) => enforcer::policy::source::SourceOptions::for_config(c, path)?,
                None => Default::default(),
            };
            let loaded = enforcer::policy::source::load_local(&src, &opts, engine, timeout)?;
            let text = std::fs::read_to_string(&input)
                .with_context(|| format!("reading {}", input.display()))?;
            let value = regorus::Value::from_json_str(&text)
                .with_context(|| format!("{} is not JSON", input.display()))?;
            let d = loaded.evaluate(value);
            let out = serde_json::json!({
                "allow": d.allow,
                "reason": d.reason,
                "error": d.error,
                "revision": loaded.revision,
                "bundles": loaded.bundle.as_ref().map(|b| serde_json::json!({b.name.clone(): {"revision": b.revision}})),
                "engine": loaded.engine(),
            });
            println!("{}", serde_json::to_string_pretty(&out)?);
            Ok(())
        }
        PolicyCommand::Test { policy } => {
            let src = PolicySource::parse(&policy).map_err(anyhow::Error::msg)?;
            if matches!(src, PolicySource::Url(_)) {
                anyhow::bail!("policy test takes a directory or a bundle file");
            }
            // Bundles are read as the agent reads them (limits, roots), but
            // not verified: `policy test` checks what the bundle does.
            let mut opts = enforcer::policy::source::SourceOptions::default();
            opts.bundle.skip_verification = true;
            let files = enforcer::policy::source::read_local(&src, &opts)?.into_files();
            let results = testing::run(&src.describe(), &files)?;
            let failed = results.iter().filter(|r| !r.passed && !r.skipped).count();
            let skipped = results.iter().filter(|r| r.skipped).count();
            for r in &results {
                match (&r.detail, r.skipped) {
                    (_, true) => println!("SKIPPED: {}", r.name),
                    (None, false) => println!("PASS: {}", r.name),
                    (Some(d), false) => println!("FAIL: {} ({d})", r.name),
                }
            }
            println!(
                "--------------------------------------------------------------------------------"
            );
            if results.is_empty() {
                anyhow::bail!("no test_* rules found in {}", src.describe());
            }
            let total = results.len();
            let passed = total - failed - skipped;
            // As `opa test` summarizes.
            if passed > 0 {
                println!("PASS: {passed}/{total}");
            }
            if failed > 0 {
                println!("FAIL: {failed}/{total}");
            }
            if skipped > 0 {
                println!("SKIPPED: {skipped}/{total}");
            }
            if failed > 0 {
                anyhow::bail!("{failed} policy test(s) failed");
            }
            Ok(())
        }
    }
}

#[derive(Subcommand)]
enum CaCommand {
    /// Create a CA (ca.pem, ca.key with mode 0600) in DIR, to share one trust
    /// root across nodes (identity.ca_cert / identity.ca_key).
    Init {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        trust_domain: String,
    },
    /// Print the trust bundle (CA certificate, PEM) of the CA a config uses,
    /// for other nodes' identity.federation.
    ExportBundle {
        #[arg(long, short)]
        config: PathBuf,
    },
}

fn ca(cmd: CaCommand) -> anyhow::Result<()> {
    match cmd {
        CaCommand::Init { dir, trust_domain } => {
            let td = spiffe::TrustDomain::new(&trust_domain)
                .with_context(|| format!("--trust-domain {trust_domain:?}"))?;
            let ca = enforcer::identity::Ca::generate(&td)?;
            ca.write(&dir.join("ca.pem"), &dir.join("ca.key"))?;
            println!(
                "created CA for trust domain {td}: {} and {} (0600)",
                dir.join("ca.pem").display(),
                dir.join("ca.key").display()
            );
            Ok(())
        }
        CaCommand::ExportBundle { config } => {
            let cfg = enforcer::settings::load(&config)?;
            let (ca, _) = enforcer::agent::load_identity(&cfg)?;
            print!("{}", ca.cert_pem());
            Ok(())
        }
    }
}

fn init_logging(cfg: &Config) {
    // RUST_LOG, else log.level (validated at load); field values of either
    // are matched as literals (see `config::log_filter`).
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|v| enforcer::config::log_filter(&v).ok())
        .or_else(|| enforcer::config::log_filter(&cfg.log.level).ok())
        .unwrap_or_else(|| tracing_subscriber::EnvFilter::new("info"));
    // Lines go to standard error through the log writer's thread, never
    // written by a runtime thread (`logsink`); should it not start, as
    // they come.
    use tracing_subscriber::fmt::writer::BoxMakeWriter;
    let writer = match enforcer::logsink::start() {
        Ok(sink) => BoxMakeWriter::new(sink),
        Err(e) => {
            eprintln!(
                "starting the log writer thread failed ({e}); log lines are written as they come"
            );
            BoxMakeWriter::new(std::io::stderr)
        }
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    match cfg.log.format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .init(),
        LogFormat::Text => builder.init(),
    }
}

/// The keys `enforcer detach` needs: from the config loaded whole, or,
/// when it no longer loads, from those three keys alone, saying so —
/// uninstalling must not depend on the rest of the file (an agent that
/// cannot start on it keeps its pins, and so its programs, attached).
fn detach_keys(config: &std::path::Path) -> anyhow::Result<enforcer::config::DetachKeys> {
    use enforcer::config::DetachKeys;
    // Read once: loaded whole, or, failing that, its three keys alone.
    let text = enforcer::config::read_text(config).map_err(|e| {
        anyhow::anyhow!(
            "{e}: detach by name (enforcer detach --node-name <node_name>), or remove the instance's pins by hand (rm -r <capture.bpffs>/enforcer/v{}/<node_name>)",
            enforcer_common::LAYOUT_VERSION
        )
    })?;
    let whole = match enforcer::settings::parse(config, &text) {
        Ok(cfg) => return Ok(DetachKeys::of(&cfg)),
        Err(e) => e,
    };
    let keys = DetachKeys::parse(config, &text).map_err(|e| {
        anyhow::anyhow!(
            "{whole}; nor could node_name, capture.bpffs and identity.state_dir be read alone ({e}): fix the file, or detach by name (enforcer detach --node-name <node_name>), or remove the instance's pins by hand (rm -r <capture.bpffs>/enforcer/v{}/<node_name>)",
            enforcer_common::LAYOUT_VERSION
        )
    })?;
    eprintln!(
        "warning: {whole}\n  detaching by node_name {:?}, capture.bpffs {} and identity.state_dir {} as the file gives them; its other keys are not read",
        keys.node_name,
        keys.bpffs.display(),
        keys.state_dir.display()
    );
    Ok(keys)
}

/// `RUST_BACKTRACE=1`, set for panics' backtraces, also has every error
/// value capture a stack trace, and the policy engine builds error values on
/// ordinary lookups (regorus, for a rule path such as `grants[dst][src]`):
/// uncached decisions were ≈ 15 % slower (bench/README.md, "Backtraces
/// off for errors"). So unless the operator set `RUST_LIB_BACKTRACE`
/// (which decides for errors alone), errors capture none; panics still
/// print theirs.
fn no_error_backtraces() {
    if std::env::var_os("RUST_LIB_BACKTRACE").is_none() {
        // SAFETY: first thing in `main`: no other thread of this process
        // reads or writes the environment now (the only ones started
        // before `main` are jemalloc's background threads, which do not).
        unsafe { std::env::set_var("RUST_LIB_BACKTRACE", "0") };
    }
}

fn main() -> anyhow::Result<()> {
    no_error_backtraces();
    let cli = Cli::parse();
    match cli.command {
        Command::Check { config } => {
            // Exactly what `run` checks before it starts.
            let cfg = enforcer::settings::load(&config)?;
            enforcer::agent::preflight(&cfg, &config)?;
            println!("{}: ok", config.display());
            Ok(())
        }
        Command::Ca(cmd) => ca(cmd),
        Command::Policy(cmd) => policy_cmd(cmd),
        Command::Status { config, addr, json } => {
            let addr = match (addr, config) {
                (Some(a), _) => a,
                (None, Some(c)) => enforcer::settings::load(&c)?
                    .status_addr(&c)?
                    .with_context(|| {
                        format!("{}: admin.status_addr is \"\" (disabled)", c.display())
                    })?,
                (None, None) => enforcer::config::DEFAULT_STATUS_ADDR
                    .parse()
                    .context("the default status address")?,
            };
            let doc = enforcer::admin::status::fetch(addr)
                .map_err(anyhow::Error::msg)
                .with_context(|| format!("asking the agent at {addr} for /status"))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&doc)?);
            } else {
                print!("{}", enforcer::admin::status::render(&doc));
            }
            Ok(())
        }
        Command::Detach {
            config,
            node_name,
            bpffs,
            state_dir,
            force,
        } => {
            let (keys, config) = match (config, node_name) {
                (Some(config), _) => (detach_keys(&config)?, config.display().to_string()),
                (None, Some(node_name)) => {
                    let keys = enforcer::config::DetachKeys::named(node_name, bpffs, state_dir)
                        .map_err(anyhow::Error::msg)?;
                    let of = format!("node_name {}", keys.node_name);
                    (keys, of)
                }
                (None, None) => anyhow::bail!("detach needs --config or --node-name"),
            };
            let dir = enforcer::capture::pin_dir(&keys.bpffs, &keys.node_name);
            // The pins are what holds the programs attached (the agent
            // keeps no link of its own): detached under a running agent,
            // its workloads would connect direct, uncaptured, while it
            // reports itself ready.
            if !force {
                let state_dir = &keys.state_dir;
                let running = enforcer::handover::agent_running(state_dir).with_context(|| {
                    format!(
                        "checking whether an agent of {config} runs (--force detaches without checking)"
                    )
                })?;
                if let Some(pid) = running {
                    anyhow::bail!(
                        "an agent of {config} is running (pid {pid}, serving {}): stop it first (systemctl stop enforcer), then detach. Detached under it, the programs would be gone while it runs on and reports ready, its workloads' connections going direct, uncaptured; --force detaches anyway",
                        state_dir.join(enforcer::handover::SOCKET).display()
                    );
                }
            }
            if enforcer::capture::detach(&keys.bpffs, &keys.node_name)? {
                println!("detached: removed {}", dir.display());
            } else {
                println!("nothing to detach: {} does not exist", dir.display());
            }
            // Also when nothing was pinned: a mark left by an earlier
            // instance vouches for a capture that is not there.
            match enforcer::agent::unmark_attached(&dir)? {
                enforcer::agent::Unmarked::Removed(mark) => println!(
                    "removed {}: enforced.slice starts its workloads only once an agent attaches again",
                    mark.display()
                ),
                enforcer::agent::Unmarked::Kept { path, pins } => println!(
                    "kept {}: it is the mark of the instance pinned at {pins}, not of this one",
                    path.display()
                ),
                enforcer::agent::Unmarked::Absent => {}
            }
            Ok(())
        }
        Command::Run { config } => {
            let cfg = enforcer::settings::load(&config)?;
            init_logging(&cfg);
            let mut runtime = tokio::runtime::Builder::new_multi_thread();
            // The blocking pool (attestation's /proc reads, file I/O,
            // signing): bounded well below tokio's 512, so a burst of new
            // connections queues there instead of growing hundreds of
            // threads (the soak saw 335 on a, 512 on b).
            runtime.max_blocking_threads(MAX_BLOCKING_THREADS);
            // Threads a burst started go once idle for BLOCKING_KEEP_ALIVE
            // (tokio's default is 10 s). The periodic jobs run on a thread
            // of their own (`chores`): here, the pool hands each job to its
            // longest-idle thread, and a few a second kept them all.
            runtime.thread_keep_alive(BLOCKING_KEEP_ALIVE);
            // A worker about to park flushes its allocation cache when a
            // load has passed (`memory`).
            runtime.on_thread_park(enforcer::memory::quiet);
            if cfg.runtime.worker_threads > 0 {
                runtime.worker_threads(cfg.runtime.worker_threads);
            }
            let rt = runtime
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            let result = rt.block_on(enforcer::agent::run(cfg, &config));
            drop(rt);
            // The last lines (the drain's, "connection closed") before exit,
            // and before the error main prints.
            enforcer::logsink::flush();
            result
        }
    }
}
