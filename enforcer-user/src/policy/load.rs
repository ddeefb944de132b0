//! Loading a policy set: a directory of `.rego` and `data.json` /
//! `data.yaml` files, or an OPA bundle (`bundle`). A data file in directory
//! `a/b` is placed at `data.a.b`, as OPA does; a bundle's manifest roots
//! bound where its modules and data may go.
use std::path::{Path, PathBuf};

use regorus::{Engine, Value};

/// What went wrong loading a policy set, naming the file.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{path}: {message}")]
    File { path: String, message: String },
    #[error("{path}: does not compile: {message}")]
    Compile { path: String, message: String },
    #[error("{0}: contains no .rego file")]
    Empty(String),
    #[error("policy check failed: {0}")]
    Check(String),
    /// The policy uses something enforcer refuses or cannot run as OPA
    /// would (docs/policy.md, "Semantics").
    #[error("{path}:{line}: refused: {message}")]
    Refused {
        path: String,
        line: u32,
        message: String,
    },
}

impl From<super::rewrite::Refused> for LoadError {
    fn from(r: super::rewrite::Refused) -> Self {
        Self::Refused {
            path: r.file,
            line: r.line,
            message: r.message,
        }
    }
}

/// One file of a policy set.
#[derive(Clone)]
pub struct PolicyFile {
    /// Path relative to the set's root, `/`-separated.
    pub path: String,
    pub contents: Vec<u8>,
}

/// The files of a policy set, what its manifest says about them, and their
/// digest (what a poll compares and the logs show), computed once.
pub struct PolicySet {
    files: Vec<PolicyFile>,
    roots: Vec<String>,
    bundle: Option<BundleRevision>,
    digest: String,
}

/// A bundle's name and its manifest revision, as OPA's decision logs show
/// them (`bundles: {name: {revision}}`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BundleRevision {
    pub name: String,
    pub revision: String,
}

impl PolicySet {
    /// `roots`: where modules and data may go (`a/b`; `""` is everywhere);
    /// `bundle`: set when the files came as an OPA bundle.
    pub fn new(files: Vec<PolicyFile>, roots: Vec<String>, bundle: Option<BundleRevision>) -> Self {
        use sha2::Digest as _;
        let mut h = sha2::Sha256::new();
        for f in &files {
            h.update(f.path.as_bytes());
            h.update([0]);
            h.update(&f.contents);
            h.update([0]);
        }
        if let Some(b) = &bundle {
            h.update(b.revision.as_bytes());
        }
        let digest = hex::encode(&h.finalize()[..8]);
        Self {
            files,
            roots,
            bundle,
            digest,
        }
    }

    /// Files without a manifest (a directory): no roots, no bundle.
    pub fn plain(files: Vec<PolicyFile>) -> Self {
        Self::new(files, vec![String::new()], None)
    }

    /// A bundle that was read (and verified), named `name`.
    pub fn from_bundle(name: &str, b: super::bundle::Bundle) -> Self {
        let revision = BundleRevision {
            name: name.to_owned(),
            revision: b.manifest.revision.clone(),
        };
        Self::new(b.files, b.manifest.roots(), Some(revision))
    }

    pub fn files(&self) -> &[PolicyFile] {
        &self.files
    }

    pub fn roots(&self) -> &[String] {
        &self.roots
    }

    pub fn bundle(&self) -> Option<&BundleRevision> {
        self.bundle.as_ref()
    }

    /// A digest of the files (and the revision): what changed between polls.
    pub fn digest(&self) -> &str {
        &self.digest
    }

    pub fn into_files(self) -> Vec<PolicyFile> {
        self.files
    }
}

/// A file a policy set is made of: a module, or a data document.
pub fn is_policy_file(path: &str) -> bool {
    let base = path.rsplit('/').next().unwrap_or(path);
    base.ends_with(".rego") || base == "data.json" || base == "data.yaml"
}

/// All `.rego`, `data.json` and `data.yaml` files under `dir`, in a stable order, each
/// once. Entries whose names start with `..` are skipped: they are the
/// kubelet's internals in a ConfigMap or Secret volume (`..data`, the
/// timestamped directory it points to), whose files also appear at the top
/// level through symlinks; Kubernetes does not allow keys that start with
/// `..`. Symlinked directories are followed once.
pub fn read_dir(dir: &Path) -> Result<Vec<PolicyFile>, LoadError> {
    let mut out = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let mut stack = vec![PathBuf::from(dir)];
    while let Some(d) = stack.pop() {
        if let Ok(real) = d.canonicalize()
            && !seen.insert(real)
        {
            continue;
        }
        let entries = std::fs::read_dir(&d).map_err(|e| LoadError::File {
            path: d.display().to_string(),
            message: e.to_string(),
        })?;
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().starts_with("..") {
                continue;
            }
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p
                .file_name()
                .is_some_and(|n| is_policy_file(&n.to_string_lossy()))
            {
                let contents = std::fs::read(&p).map_err(|e| LoadError::File {
                    path: p.display().to_string(),
                    message: e.to_string(),
                })?;
                let rel = p
                    .strip_prefix(dir)
                    .unwrap_or(&p)
                    .to_string_lossy()
                    .into_owned();
                out.push(PolicyFile {
                    path: rel,
                    contents,
                });
            }
        }
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(out)
}

/// Compiles files (no manifest) into an engine. `origin` names the set in
/// errors.
pub fn compile(origin: &str, files: &[PolicyFile]) -> Result<Engine, LoadError> {
    compile_set(origin, files, &[String::new()]).map(|c| c.engine)
}

/// A compiled policy set.
pub struct Compiled {
    pub engine: Engine,
    /// Some module calls a builtin whose value is not a function of the
    /// input (`time.now_ns`…): decisions must not be cached.
    pub volatile: bool,
    /// The parts of `input` the set can read (prefixes, none under
    /// another); `None`: any part.
    pub input_reads: Option<Vec<Vec<super::rewrite::Seg>>>,
    /// Paths it only tests for truth, none under a read.
    pub input_truths: Vec<Vec<super::rewrite::Seg>>,
}

/// Compiles a policy set, each module rewritten to OPA's semantics first
/// (`rewrite`), with regorus's strict builtin errors (an error denies).
/// Modules and data outside `roots` are refused, as OPA does.
pub fn compile_set(
    origin: &str,
    files: &[PolicyFile],
    roots: &[String],
) -> Result<Compiled, LoadError> {
    let mut engine = Engine::new();
    engine.set_strict_builtin_errors(true);
    let mut modules = Vec::new();
    for f in files {
        let shown = format!("{origin}/{}", f.path);
        let text = std::str::from_utf8(&f.contents).map_err(|_| LoadError::File {
            path: shown.clone(),
            message: "not UTF-8".into(),
        })?;
        if f.path.ends_with(".rego") {
            let rewritten = super::rewrite::rewrite(&shown, text)?;
            let package = rewritten
                .package
                .trim_start_matches("data.")
                .replace('.', "/");
            if !rewritten.package.is_empty()
                && !roots
                    .iter()
                    .any(|r| super::bundle::root_contains(r, &package))
            {
                return Err(LoadError::File {
                    path: shown,
                    message: format!(
                        "manifest roots {roots:?} do not permit package {}",
                        rewritten.package
                    ),
                });
            }
            modules.push((shown, rewritten));
        } else {
            let value = if f.path.ends_with(".yaml") {
                Value::from_yaml_str(text).map_err(|e| LoadError::File {
                    path: shown.clone(),
                    message: format!("not YAML: {e}"),
                })?
            } else {
                Value::from_json_str(text).map_err(|e| LoadError::File {
                    path: shown.clone(),
                    message: format!("not JSON: {e}"),
                })?
            };
            // data.json in a/b/ lives at data.a.b
            let dir = f.path.rsplit_once('/').map(|(d, _)| d).unwrap_or("");
            let mut at: Vec<String> = dir
                .split('/')
                .filter(|c| !c.is_empty())
                .map(str::to_owned)
                .collect();
            check_data_roots(&value, &mut at, roots).map_err(|message| LoadError::File {
                path: shown.clone(),
                message,
            })?;
            let mut wrapped = value;
            for comp in at.iter().rev() {
                let mut obj = Value::new_object();
                if let Ok(map) = obj.as_object_mut() {
                    map.insert(Value::from(comp.as_str()), wrapped);
                }
                wrapped = obj;
            }
            engine.add_data(wrapped).map_err(|e| LoadError::File {
                path: shown.clone(),
                message: format!("cannot merge into data: {e}"),
            })?;
        }
    }
    if modules.is_empty() {
        return Err(LoadError::Empty(origin.to_owned()));
    }
    super::rewrite::check_calls(&modules)?;
    let volatile = modules.iter().any(|(_, m)| m.volatile);
    let input_reads = input_reads(modules.iter().map(|(_, m)| m.input_reads.as_deref()));
    let input_truths = match &input_reads {
        None => Vec::new(),
        Some(reads) => {
            let mut t: Vec<_> = modules
                .iter()
                .flat_map(|(_, m)| m.input_truths.iter().cloned())
                .filter(|p| !reads.iter().any(|r| p.starts_with(r)))
                .collect();
            t.sort();
            t.dedup();
            t
        }
    };
    for (shown, m) in modules {
        engine
            .add_policy(shown.clone(), m.text)
            .map_err(|e| LoadError::Compile {
                path: shown,
                message: e.to_string(),
            })?;
    }
    Ok(Compiled {
        engine,
        volatile,
        input_reads,
        input_truths,
    })
}

/// The union of the modules' reads of `input`, each path once and none
/// under another; `None` when some module may read any part.
fn input_reads<'a>(
    modules: impl Iterator<Item = Option<&'a [Vec<super::rewrite::Seg>]>>,
) -> Option<Vec<Vec<super::rewrite::Seg>>> {
    let mut all = Vec::new();
    for m in modules {
        all.extend_from_slice(m?);
    }
    all.sort();
    all.dedup();
    // Sorted, a path comes right after the prefixes it extends.
    let mut kept: Vec<Vec<super::rewrite::Seg>> = Vec::new();
    for p in all {
        if !kept.iter().any(|k| p.starts_with(k)) {
            kept.push(p);
        }
    }
    Some(kept)
}

/// Data at `path` is inside a root, or is an object whose members are
/// (OPA's check: an object above a root is walked into, anything else
/// outside every root is refused).
fn check_data_roots(value: &Value, path: &mut Vec<String>, roots: &[String]) -> Result<(), String> {
    let here = path.join("/");
    if roots.iter().any(|r| super::bundle::root_contains(r, &here)) {
        return Ok(());
    }
    if let Ok(map) = value.as_object()
        && roots.iter().any(|r| super::bundle::root_contains(&here, r))
    {
        for (k, v) in map.iter() {
            let key = match k {
                Value::String(s) => s.to_string(),
                other => other.to_string(),
            };
            path.push(key);
            let r = check_data_roots(v, path, roots);
            path.pop();
            r?;
        }
        return Ok(());
    }
    Err(format!(
        "manifest roots {roots:?} do not permit data at path /{here}"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A ConfigMap volume exactly as the kubelet writes one: the files in a
    /// timestamped directory, `..data` pointing at it, and a symlink per
    /// top-level entry through `..data`.
    fn configmap_volume(root: &Path, files: &[(&str, &str)]) {
        use std::os::unix::fs::symlink;
        let stamp = "..2026_11_24_07_00_00.123456789";
        for (path, text) in files {
            let p = root.join(stamp).join(path);
            std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
            std::fs::write(&p, text).expect("write");
        }
        symlink(stamp, root.join("..data")).expect("..data");
        let mut tops: Vec<&str> = files
            .iter()
            .map(|(p, _)| p.split('/').next().unwrap_or(p))
            .collect();
        tops.dedup();
        for top in tops {
            symlink(format!("..data/{top}"), root.join(top)).expect("top symlink");
        }
    }

    #[test]
    fn configmap_volume_is_loaded_once_with_data_under_its_directory() {
        let root = std::env::temp_dir().join(format!("enforcer-cm-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).expect("root");
        // The shipped DaemonSet maps each key under enforcer/ (items: path).
        configmap_volume(
            &root,
            &[
                (
                    "enforcer/authz.rego",
                    "package enforcer.authz\n\nimport rego.v1\n\nallow if data.enforcer.ai.on\n",
                ),
                ("enforcer/data.json", r#"{"ai": {"on": true}}"#),
            ],
        );
        let files = read_dir(&root).expect("read");
        let paths: Vec<&str> = files.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(paths, ["enforcer/authz.rego", "enforcer/data.json"]);
        let mut engine = compile("cm", &files).expect("compile");
        let v = engine
            .eval_rule("data.enforcer.authz.allow".into())
            .expect("eval");
        assert_eq!(v, Value::from(true), "data.json must be at data.enforcer");
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn manifest_roots_bound_modules_and_data() {
        let compile_in = |files: &[(&str, &str)], roots: &[&str]| {
            let files: Vec<PolicyFile> = files
                .iter()
                .map(|(p, t)| PolicyFile {
                    path: (*p).to_owned(),
                    contents: t.as_bytes().to_vec(),
                })
                .collect();
            let roots: Vec<String> = roots.iter().map(|r| (*r).to_owned()).collect();
            compile_set("b", &files, &roots)
        };
        let authz = "package enforcer.authz\nimport rego.v1\nallow if data.enforcer.on\n";
        // Inside the root: a module, data by directory, data at the top
        // level whose members are all under the root.
        for files in [
            vec![
                ("enforcer/authz.rego", authz),
                ("enforcer/data.json", r#"{"on": true}"#),
            ],
            vec![
                ("enforcer/authz.rego", authz),
                ("data.json", r#"{"enforcer": {"on": true}}"#),
            ],
        ] {
            let c = compile_in(&files, &["enforcer"]).expect("inside the roots");
            let mut e = c.engine;
            assert_eq!(
                e.eval_rule("data.enforcer.authz.allow".into())
                    .expect("eval"),
                Value::from(true)
            );
        }
        for (files, want) in [
            (
                vec![
                    ("authz.rego", authz),
                    ("x.rego", "package other\nimport rego.v1\ny := 1\n"),
                ],
                "do not permit package data.other",
            ),
            (
                vec![
                    ("authz.rego", authz),
                    ("data.json", r#"{"enforcer": {"on": true}, "secrets": 1}"#),
                ],
                "do not permit data at path /secrets",
            ),
            (
                vec![("authz.rego", authz), ("elsewhere/data.yaml", "on: true\n")],
                "do not permit data at path /elsewhere",
            ),
        ] {
            let e = compile_in(&files, &["enforcer"])
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(e.contains(want), "{e:?} should say {want:?}");
        }
    }
}
