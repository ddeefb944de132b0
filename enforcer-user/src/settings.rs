//! The configuration the agent runs with: the file read and checked by
//! `config`, which checks what it owns, then each part whose meaning another
//! module owns checked by that module — the policy source
//! (`policy::source`), the L7 destinations (`l7`), the registration entries
//! (`attest`). `config` depends on no other module of the agent; this one
//! ties them together. `enforcer check`, `run`, the config reload and
//! `policy eval` all load through here.

use std::path::Path;

use crate::config::{Config, ConfigError};

/// Reads, parses and checks a config file.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let cfg = Config::read(path)?;
    check(&cfg, path)?;
    Ok(cfg)
}

/// Parses and checks a config file's text (`path` names it in errors).
pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
    let cfg = Config::from_toml(path, text)?;
    check(&cfg, path)?;
    Ok(cfg)
}

/// The checks other modules own, of a config `config` has checked.
fn check(cfg: &Config, path: &Path) -> Result<(), ConfigError> {
    if !cfg.policy.source.is_empty() {
        crate::policy::source::PolicySource::parse(&cfg.policy.source)
            .map_err(|m| ConfigError::invalid(path, "policy.source", m))?;
    }
    crate::l7::Routes::from_config(cfg, path)?;
    let td = spiffe::TrustDomain::new(&cfg.identity.trust_domain).map_err(|e| {
        ConfigError::invalid(
            path,
            "identity.trust_domain",
            format!("{:?}: {e}", cfg.identity.trust_domain),
        )
    })?;
    crate::attest::Entries::parse(&cfg.identity.entries, td.as_ref())
        .map_err(|e| ConfigError::invalid(path, "identity.entries", e.to_string()))?;
    Ok(())
}
