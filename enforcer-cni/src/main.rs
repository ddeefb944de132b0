//! `enforcer-cni`: a chained CNI plugin (CNI spec 1.0) that hands each new
//! pod's network namespace to the node's enforcer agent and returns only
//! once the agent serves it, so a pod never runs unprotected (DESIGN §1.9).
//!
//! - `ADD`: sends the netns and `K8S_POD_*` args to the agent on its unix
//!   socket and waits for its answer (`timeout_secs`); passes `prevResult`
//!   through. If the agent does not answer or refuses, ADD fails and the
//!   pod does not start — unless the network config sets
//!   `"fail_open": true` (for a rollout), which lets the pod start
//!   unprotected and says so on stderr.
//! - `DEL`: tells the agent, best effort (DEL succeeds without an agent:
//!   the agent also lets a pod go when its netns is gone).
//! - `CHECK`: fails unless the agent serves the pod.
//! - `VERSION`: the versions this plugin speaks.
//!
//! `enforcer-cni install --bin-dir D --conf-dir D [--socket P]` (the
//! DaemonSet's init container) copies this binary into the node's CNI
//! binary directory and appends the plugin to the node's first conflist;
//! with `--watch SECS` (the DaemonSet's `cni-watch` container) it then
//! checks that every SECS seconds and chains the plugin again when the
//! network plugin has written its conflist again.
//! `enforcer-cni uninstall --bin-dir D --conf-dir D` undoes it (the
//! uninstall DaemonSet, deploy/kubernetes/enforcer-uninstall.yaml): the
//! plugin taken out of every conflist that chains it, then the binary
//! removed, so that pods start again once no agent serves the node.
use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::Duration,
};

use serde_json::{Value, json};

const SUPPORTED: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0"];
const DEFAULT_SOCKET: &str = "/var/run/enforcer/cni.sock";
const DEFAULT_TIMEOUT_SECS: u64 = 30;

/// A CNI error: printed as the spec's error object, exit status 1.
struct CniError {
    code: u32,
    msg: String,
    details: String,
}

impl CniError {
    fn new(code: u32, msg: &str, details: impl Into<String>) -> Self {
        Self {
            code,
            msg: msg.to_owned(),
            details: details.into(),
        }
    }
}

// CNI spec error codes.
const INCOMPATIBLE_VERSION: u32 = 1;
const INVALID_ENV: u32 = 4;
const IO_FAILURE: u32 = 5;
const DECODE: u32 = 6;
const INVALID_CONFIG: u32 = 7;
const TRY_AGAIN: u32 = 11;
/// Plugin-specific: the agent refused to serve the pod.
const REFUSED: u32 = 100;

/// `install` or `uninstall`: the message printed on success.
type AdminCommand = fn(&[String]) -> Result<String, String>;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let admin: Option<(&str, AdminCommand)> = match args.first().map(String::as_str) {
        Some("install") => Some(("install", install)),
        Some("uninstall") => Some(("uninstall", uninstall)),
        _ => None,
    };
    if let Some((name, run)) = admin {
        match run(&args[1..]) {
            Ok(msg) => {
                println!("{msg}");
                std::process::exit(0)
            }
            Err(e) => {
                eprintln!("enforcer-cni {name}: {e}");
                std::process::exit(1)
            }
        }
    }
    let mut stdin = String::new();
    let version = match std::io::stdin().read_to_string(&mut stdin) {
        Ok(_) => serde_json::from_str::<Value>(&stdin)
            .ok()
            .and_then(|c| {
                c.get("cniVersion")
                    .and_then(Value::as_str)
                    .map(str::to_owned)
            })
            .unwrap_or_else(|| "1.0.0".to_owned()),
        Err(_) => "1.0.0".to_owned(),
    };
    match run(&stdin) {
        Ok(Some(out)) => {
            println!("{out}");
        }
        Ok(None) => {}
        Err(e) => {
            println!(
                "{}",
                json!({"cniVersion": version, "code": e.code, "msg": e.msg, "details": e.details})
            );
            std::process::exit(1);
        }
    }
}

fn env(name: &str) -> Result<String, CniError> {
    std::env::var(name)
        .map_err(|_| CniError::new(INVALID_ENV, "missing environment variable", name))
}

/// `K8S_POD_NAMESPACE=a;K8S_POD_NAME=b;K8S_POD_UID=c;IgnoreUnknown=1`
fn cni_arg(args: &str, key: &str) -> String {
    args.split(';')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v.to_owned())
        .unwrap_or_default()
}

fn run(stdin: &str) -> Result<Option<String>, CniError> {
    let command = env("CNI_COMMAND")?;
    if command == "VERSION" {
        return Ok(Some(
            json!({"cniVersion": "1.0.0", "supportedVersions": SUPPORTED}).to_string(),
        ));
    }
    let conf: Value = serde_json::from_str(stdin)
        .map_err(|e| CniError::new(DECODE, "the network config is not JSON", e.to_string()))?;
    let version = conf
        .get("cniVersion")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    if !SUPPORTED.contains(&version.as_str()) {
        return Err(CniError::new(
            INCOMPATIBLE_VERSION,
            "unsupported cniVersion",
            format!("{version:?}; supported: {SUPPORTED:?}"),
        ));
    }
    let socket = match conf.get("socket") {
        None => PathBuf::from(DEFAULT_SOCKET),
        Some(Value::String(s)) if !s.is_empty() => PathBuf::from(s),
        Some(other) => {
            return Err(CniError::new(
                INVALID_CONFIG,
                "\"socket\" must be a path",
                other.to_string(),
            ));
        }
    };
    let timeout = match conf.get("timeout_secs") {
        None => DEFAULT_TIMEOUT_SECS,
        Some(v) => v.as_u64().filter(|t| *t > 0).ok_or_else(|| {
            CniError::new(
                INVALID_CONFIG,
                "\"timeout_secs\" must be a positive integer",
                v.to_string(),
            )
        })?,
    };
    let fail_open = match conf.get("fail_open") {
        None => false,
        Some(Value::Bool(b)) => *b,
        Some(other) => {
            return Err(CniError::new(
                INVALID_CONFIG,
                "\"fail_open\" must be true or false",
                other.to_string(),
            ));
        }
    };
    let container_id = env("CNI_CONTAINERID")?;
    let args = std::env::var("CNI_ARGS").unwrap_or_default();
    let request = json!({
        "command": command,
        "container_id": container_id,
        "netns": std::env::var("CNI_NETNS").unwrap_or_default(),
        "pod_uid": cni_arg(&args, "K8S_POD_UID"),
        "pod_namespace": cni_arg(&args, "K8S_POD_NAMESPACE"),
        "pod_name": cni_arg(&args, "K8S_POD_NAME"),
    });
    match command.as_str() {
        "ADD" => {
            if std::env::var("CNI_NETNS").unwrap_or_default().is_empty() {
                return Err(CniError::new(INVALID_ENV, "ADD without CNI_NETNS", ""));
            }
            let prev = conf.get("prevResult").cloned().ok_or_else(|| {
                CniError::new(
                    INVALID_CONFIG,
                    "no prevResult: enforcer-cni is a chained plugin and runs after the one that sets up the pod's interface",
                    "",
                )
            })?;
            match ask(&socket, &request, Duration::from_secs(timeout)) {
                Ok(()) => {}
                Err(e) if fail_open => eprintln!(
                    "enforcer-cni: fail_open: the pod starts unprotected: {} ({})",
                    e.msg, e.details
                ),
                Err(e) => return Err(e),
            }
            let mut out = prev;
            if let Some(o) = out.as_object_mut() {
                o.insert("cniVersion".into(), Value::String(version));
            }
            Ok(Some(out.to_string()))
        }
        "DEL" => {
            if let Err(e) = ask(&socket, &request, Duration::from_secs(timeout)) {
                eprintln!(
                    "enforcer-cni: DEL not delivered (the agent lets the pod go when its netns is gone): {} ({})",
                    e.msg, e.details
                );
            }
            Ok(None)
        }
        "CHECK" => ask(&socket, &request, Duration::from_secs(timeout)).map(|()| None),
        other => Err(CniError::new(
            INVALID_ENV,
            "unknown CNI_COMMAND",
            other.to_owned(),
        )),
    }
}

/// One request to the agent, one answer.
fn ask(socket: &Path, request: &Value, timeout: Duration) -> Result<(), CniError> {
    let unreachable = |e: std::io::Error| {
        CniError::new(
            TRY_AGAIN,
            "the enforcer agent is not reachable",
            format!("{}: {e}", socket.display()),
        )
    };
    let mut stream = UnixStream::connect(socket).map_err(unreachable)?;
    stream
        .set_read_timeout(Some(timeout))
        .map_err(unreachable)?;
    stream
        .set_write_timeout(Some(timeout))
        .map_err(unreachable)?;
    let mut line = request.to_string();
    line.push('\n');
    stream.write_all(line.as_bytes()).map_err(unreachable)?;
    let mut answer = String::new();
    BufReader::new(stream.take(64 * 1024))
        .read_line(&mut answer)
        .map_err(|e| {
            CniError::new(
                IO_FAILURE,
                "no answer from the enforcer agent",
                format!("within {timeout:?}: {e}"),
            )
        })?;
    let answer: Value = serde_json::from_str(&answer).map_err(|e| {
        CniError::new(
            IO_FAILURE,
            "no answer from the enforcer agent",
            format!("{e}: {answer:?}"),
        )
    })?;
    if answer.get("ok").and_then(Value::as_bool) == Some(true) {
        Ok(())
    } else {
        Err(CniError::new(
            REFUSED,
            "the enforcer agent refused the pod",
            answer
                .get("error")
                .and_then(Value::as_str)
                .unwrap_or("no reason given")
                .to_owned(),
        ))
    }
}

/// The options of `install` and `uninstall`.
struct Opts {
    bin_dir: PathBuf,
    conf_dir: PathBuf,
    socket: Option<String>,
    fail_open: bool,
    watch: Option<u64>,
}

impl Opts {
    fn parse(args: &[String]) -> Result<Self, String> {
        let (mut bin_dir, mut conf_dir, mut socket) = (None, None, None);
        let (mut fail_open, mut watch) = (false, None);
        let mut it = args.iter();
        while let Some(a) = it.next() {
            let mut value = || it.next().cloned().ok_or(format!("{a} needs a value"));
            match a.as_str() {
                "--bin-dir" => bin_dir = Some(PathBuf::from(value()?)),
                "--conf-dir" => conf_dir = Some(PathBuf::from(value()?)),
                "--socket" => socket = Some(value()?),
                "--fail-open" => fail_open = true,
                "--watch" => {
                    let v = value()?;
                    watch = Some(
                        v.parse::<u64>()
                            .ok()
                            .filter(|s| *s > 0)
                            .ok_or(format!("--watch {v:?}: seconds, a positive integer"))?,
                    )
                }
                other => return Err(format!("unknown argument {other:?}")),
            }
        }
        Ok(Self {
            bin_dir: bin_dir.ok_or("--bin-dir is required")?,
            conf_dir: conf_dir.ok_or("--conf-dir is required")?,
            socket,
            fail_open,
            watch,
        })
    }
}

/// `install --bin-dir D --conf-dir D [--socket P] [--fail-open] [--watch SECS]`.
fn install(args: &[String]) -> Result<String, String> {
    let opts = Opts::parse(args)?;
    // The first run always copies, so it always says what it did.
    let done = opts.run(true)?.unwrap_or_default();
    let Some(secs) = opts.watch else {
        return Ok(done);
    };
    // A network plugin that writes its conflist again (at its own restart
    // or upgrade) drops the chained plugin, and the node's new pods would
    // then start without the agent serving them. Watched, it is chained
    // again within `secs`; the process runs until it is stopped.
    println!(
        "{done}; watching {} every {secs} s",
        opts.conf_dir.display()
    );
    let mut last_error = None;
    loop {
        std::thread::sleep(Duration::from_secs(secs));
        match opts.run(false) {
            Ok(Some(msg)) => {
                println!("{msg}");
                last_error = None;
            }
            Ok(None) => last_error = None,
            // Said once until it changes (a conflist mid-write, none yet).
            Err(e) if last_error.as_ref() != Some(&e) => {
                eprintln!("enforcer-cni install: {e}");
                last_error = Some(e);
            }
            Err(_) => {}
        }
    }
}

impl Opts {
    /// Copies the binary (`first`: always, so an upgrade replaces it;
    /// after: only when it is gone) and chains the plugin in the first
    /// conflist when it is not: what was done, `None` when nothing was.
    fn run(&self, first: bool) -> Result<Option<String>, String> {
        let target = self.bin_dir.join("enforcer-cni");
        let copied = first || !target.is_file();
        if copied {
            let me = std::env::current_exe().map_err(|e| format!("finding this binary: {e}"))?;
            // Copied beside, then renamed: a runtime never runs a
            // half-written binary.
            let tmp = self.bin_dir.join(".enforcer-cni.tmp");
            std::fs::copy(&me, &tmp).map_err(|e| format!("copying to {}: {e}", tmp.display()))?;
            std::fs::rename(&tmp, &target)
                .map_err(|e| format!("installing {}: {e}", target.display()))?;
        }
        let conflist = first_conflist(&self.conf_dir)?;
        let text = std::fs::read_to_string(&conflist)
            .map_err(|e| format!("reading {}: {e}", conflist.display()))?;
        let (updated, changed) = with_plugin(
            &text,
            self.socket.as_deref().unwrap_or(DEFAULT_SOCKET),
            self.fail_open,
        )
        .map_err(|e| format!("{}: {e}", conflist.display()))?;
        if changed {
            replace(&conflist, &updated)?;
        }
        if !first && !copied && !changed {
            return Ok(None);
        }
        Ok(Some(format!(
            "enforcer-cni {} as {}; {} {}",
            if first {
                "installed"
            } else {
                "installed again"
            },
            target.display(),
            conflist.display(),
            if changed {
                "now chains it"
            } else {
                "chains it already"
            }
        )))
    }
}

/// `uninstall --bin-dir D --conf-dir D`: every `*.conflist` in the conf
/// directory without `enforcer-cni` (rewritten whole, then renamed over the
/// old one), then the binary removed — in that order, so a runtime never
/// calls a plugin that is gone. Idempotent.
fn uninstall(args: &[String]) -> Result<String, String> {
    let opts = Opts::parse(args)?;
    if opts.socket.is_some() || opts.fail_open || opts.watch.is_some() {
        return Err("--socket, --fail-open and --watch are install's".into());
    }
    let (bin_dir, conf_dir) = (opts.bin_dir, opts.conf_dir);
    let mut unchained = Vec::new();
    for conflist in conflists(&conf_dir)? {
        let text = std::fs::read_to_string(&conflist)
            .map_err(|e| format!("reading {}: {e}", conflist.display()))?;
        let Some(updated) =
            without_plugin(&text).map_err(|e| format!("{}: {e}", conflist.display()))?
        else {
            continue;
        };
        replace(&conflist, &updated)?;
        unchained.push(conflist.display().to_string());
    }
    let target = bin_dir.join("enforcer-cni");
    let removed = match std::fs::remove_file(&target) {
        Ok(()) => true,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        Err(e) => return Err(format!("removing {}: {e}", target.display())),
    };
    Ok(format!(
        "enforcer-cni uninstalled: {}; {}",
        if unchained.is_empty() {
            format!("no conflist in {} chained it", conf_dir.display())
        } else {
            format!("no longer chained by {}", unchained.join(", "))
        },
        if removed {
            format!("{} removed", target.display())
        } else {
            format!("{} was not there", target.display())
        }
    ))
}

/// The conflist without `enforcer-cni` among its plugins, or `None` when
/// it had none. A conflist that is not one (not JSON, no `plugins` array)
/// is an error: it is not this plugin's to rewrite.
fn without_plugin(text: &str) -> Result<Option<String>, String> {
    let mut list: Value = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
    let plugins = list
        .get_mut("plugins")
        .and_then(Value::as_array_mut)
        .ok_or("no \"plugins\" array")?;
    let before = plugins.len();
    plugins.retain(|p| p.get("type").and_then(Value::as_str) != Some("enforcer-cni"));
    if plugins.len() == before {
        return Ok(None);
    }
    serde_json::to_string_pretty(&list)
        .map(Some)
        .map_err(|e| e.to_string())
}

/// The `*.conflist` files of `dir`, by name.
fn conflists(dir: &Path) -> Result<Vec<PathBuf>, String> {
    let mut lists: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| format!("reading {}: {e}", dir.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "conflist"))
        .collect();
    lists.sort();
    Ok(lists)
}

/// A conflist rewritten whole beside, then renamed over the old one: a
/// runtime never reads half of it.
fn replace(conflist: &Path, text: &str) -> Result<(), String> {
    let tmp = conflist.with_extension("conflist.enforcer-tmp");
    std::fs::write(&tmp, text).map_err(|e| format!("writing {}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, conflist).map_err(|e| format!("updating {}: {e}", conflist.display()))
}

/// The conflist a runtime uses: the first `*.conflist` by name.
fn first_conflist(dir: &Path) -> Result<PathBuf, String> {
    conflists(dir)?.into_iter().next().ok_or_else(|| {
        format!(
            "no *.conflist in {}: the node's network plugin is not installed yet",
            dir.display()
        )
    })
}

/// The conflist with `enforcer-cni` appended to its plugins (once).
fn with_plugin(text: &str, socket: &str, fail_open: bool) -> Result<(String, bool), String> {
    let mut list: Value = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
    let plugins = list
        .get_mut("plugins")
        .and_then(Value::as_array_mut)
        .ok_or("no \"plugins\" array")?;
    if plugins
        .iter()
        .any(|p| p.get("type").and_then(Value::as_str) == Some("enforcer-cni"))
    {
        return Ok((text.to_owned(), false));
    }
    plugins.push(json!({"type": "enforcer-cni", "socket": socket, "fail_open": fail_open}));
    let out = serde_json::to_string_pretty(&list).map_err(|e| e.to_string())?;
    Ok((out, true))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_args_are_read_from_cni_args() {
        let args = "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=cart-1;K8S_POD_INFRA_CONTAINER_ID=abc;K8S_POD_UID=0b6f2a34-1c1e-4b43-9c1d-1f1f1f1f1f1f";
        assert_eq!(cni_arg(args, "K8S_POD_NAMESPACE"), "shop");
        assert_eq!(cni_arg(args, "K8S_POD_NAME"), "cart-1");
        assert_eq!(
            cni_arg(args, "K8S_POD_UID"),
            "0b6f2a34-1c1e-4b43-9c1d-1f1f1f1f1f1f"
        );
        assert_eq!(cni_arg(args, "MISSING"), "");
    }

    #[test]
    fn the_plugin_is_appended_once() {
        let list = r#"{"cniVersion":"1.0.0","name":"k8s","plugins":[{"type":"bridge"},{"type":"portmap"}]}"#;
        let (once, changed) = with_plugin(list, "/run/x.sock", false).expect("valid");
        assert!(changed);
        let v: Value = serde_json::from_str(&once).expect("json");
        let types: Vec<_> = v["plugins"]
            .as_array()
            .expect("plugins")
            .iter()
            .map(|p| p["type"].as_str().unwrap_or_default().to_owned())
            .collect();
        assert_eq!(types, ["bridge", "portmap", "enforcer-cni"]);
        assert_eq!(v["plugins"][2]["socket"], "/run/x.sock");
        let (twice, changed) = with_plugin(&once, "/run/x.sock", false).expect("valid");
        assert!(!changed);
        assert_eq!(twice, once);
        assert!(with_plugin("{\"plugins\": 3}", "/s", false).is_err());
        assert!(with_plugin("not json", "/s", false).is_err());
    }

    #[test]
    fn uninstall_takes_out_only_the_plugin() {
        let list = r#"{"cniVersion":"1.0.0","name":"k8s","plugins":[{"type":"bridge"},{"type":"portmap"}]}"#;
        let (chained, _) = with_plugin(list, "/run/x.sock", false).expect("valid");
        let out = without_plugin(&chained)
            .expect("valid")
            .expect("it chained enforcer-cni");
        let (v, orig): (Value, Value) = (
            serde_json::from_str(&out).expect("json"),
            serde_json::from_str(list).expect("json"),
        );
        assert_eq!(v, orig, "the conflist as it was before install");
        assert_eq!(without_plugin(&out).expect("valid"), None, "idempotent");
        assert!(without_plugin("{\"plugins\": 3}").is_err());
        assert!(without_plugin("not json").is_err());
    }
}
