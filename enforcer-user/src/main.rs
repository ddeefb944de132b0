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
    /// Detach the kernel programs of the instance a config names and remove its
    /// bpffs pins. Captured connects then go direct again: use it to uninstall.
    Detach {
        #[arg(long, short)]
        config: PathBuf,
    },
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
