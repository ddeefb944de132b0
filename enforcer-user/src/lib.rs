//! enforcer node agent: captures workload connections in the kernel, attests
//! the workloads and proxies their traffic. See `docs/ARCHITECTURE.md`.
pub mod admin;
pub mod agent;
pub mod attest;
pub mod capture;
pub mod config;
pub mod handover;
pub mod identity;
pub mod l7;
pub mod policy;
pub mod proxy;
pub mod tls;
pub mod tunnel;
