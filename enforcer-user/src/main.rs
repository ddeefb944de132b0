use std::path::PathBuf;

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
    /// Manage the embedded CA.
    #[command(subcommand)]
    Ca(CaCommand),
    /// Detach the kernel programs of the instance a config names and remove its
    /// bpffs pins. Captured connects then go direct again: use it to uninstall.
    Detach {
        #[arg(long, short)]
        config: PathBuf,
    },
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
            let cfg = Config::load(&config)?;
            let (ca, _) = enforcer::agent::load_identity(&cfg)?;
            print!("{}", ca.cert_pem());
            Ok(())
        }
    }
}

fn init_logging(cfg: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&cfg.log.level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
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

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { config } => {
            Config::load(&config)?;
            println!("{}: ok", config.display());
            Ok(())
        }
        Command::Ca(cmd) => ca(cmd),
        Command::Detach { config } => {
            let cfg = Config::load(&config)?;
            let dir = enforcer::capture::pin_dir(&cfg.capture.bpffs, &cfg.node_name);
            if enforcer::capture::detach(&cfg.capture.bpffs, &cfg.node_name)? {
                println!("detached: removed {}", dir.display());
            } else {
                println!("nothing to detach: {} does not exist", dir.display());
            }
            Ok(())
        }
        Command::Run { config } => {
            let cfg = Config::load(&config)?;
            init_logging(&cfg);
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            rt.block_on(enforcer::agent::run(cfg, &config))
        }
    }
}
