//! Builds the kernel programs (`enforcer-ebpf`) with the nightly toolchain and
//! bpf-linker, and leaves the object at `$OUT_DIR/enforcer-ebpf`.
use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .ok_or_else(|| anyhow!("enforcer-user has no parent directory"))?
        .join("enforcer-ebpf");
    let root = root
        .to_str()
        .ok_or_else(|| anyhow!("non-UTF-8 path {}", root.display()))?
        .to_owned();
    println!("cargo:rerun-if-changed=../enforcer-common/src");
    // aya-build forwards every line the inner cargo prints as a warning; keep
    // only real diagnostics.
    // SAFETY: build scripts are single-threaded at this point.
    unsafe { std::env::set_var("CARGO_TERM_QUIET", "true") };
    aya_build::build_ebpf(
        [Package {
            name: "enforcer-ebpf",
            root_dir: &root,
            ..Default::default()
        }],
        Toolchain::Nightly,
    )
    .context(
        "building the kernel programs failed; run `cargo xtask setup` \
         (installs the nightly rust-src component, llvm-22-dev and bpf-linker)",
    )
}
