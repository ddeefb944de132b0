//! Loading a policy set: a directory of `.rego` and `data.json` files, or an
//! OPA bundle (`.tar.gz` with the same layout, as OPA bundle servers serve).
//! A `data.json` in directory `a/b` is placed at `data.a.b`, as OPA does.
use std::{
    io::Read as _,
    path::{Path, PathBuf},
};

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

/// All `.rego` and `data.json` files under `dir`, in a stable order, each
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
            } else if p.extension().is_some_and(|x| x == "rego")
                || p.file_name().is_some_and(|n| n == "data.json")
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

/// The `.rego` and `data.json` files of an OPA bundle (gzip'd tar).
pub fn read_bundle(name: &str, bytes: &[u8]) -> Result<Vec<PolicyFile>, LoadError> {
    let err = |message: String| LoadError::File {
        path: name.to_owned(),
        message,
    };
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(bytes));
    let mut out = Vec::new();
    for entry in archive
        .entries()
        .map_err(|e| err(format!("not a .tar.gz bundle: {e}")))?
    {
        let mut entry = entry.map_err(|e| err(format!("corrupt bundle: {e}")))?;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let path = entry
            .path()
            .map_err(|e| err(e.to_string()))?
            .to_string_lossy()
            .trim_start_matches("./")
            .trim_start_matches('/')
            .to_owned();
        if path.split('/').any(|c| c == "..") {
            return Err(err(format!("entry {path:?} escapes the bundle")));
        }
        if path.ends_with(".rego") || path == "data.json" || path.ends_with("/data.json") {
            let mut contents = Vec::new();
            entry
                .read_to_end(&mut contents)
                .map_err(|e| err(format!("{path}: {e}")))?;
            out.push(PolicyFile { path, contents });
        }
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(out)
}

/// Compiles a policy set into an engine. `origin` names the set in errors.
pub fn compile(origin: &str, files: &[PolicyFile]) -> Result<Engine, LoadError> {
    compile_set(origin, files).map(|c| c.engine)
}

/// A compiled policy set.
pub struct Compiled {
    pub engine: Engine,
    /// Some module calls a builtin whose value is not a function of the
    /// input (`time.now_ns`…): decisions must not be cached.
    pub volatile: bool,
}

/// Compiles a policy set, each module rewritten to OPA's semantics first
/// (`rewrite`), with regorus's strict builtin errors (an error denies).
pub fn compile_set(origin: &str, files: &[PolicyFile]) -> Result<Compiled, LoadError> {
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
            modules.push((shown, rewritten));
        } else {
            let value = Value::from_json_str(text).map_err(|e| LoadError::File {
                path: shown.clone(),
                message: format!("not JSON: {e}"),
            })?;
            // data.json in a/b/ lives at data.a.b
            let mut wrapped = value;
            let dir = f.path.rsplit_once('/').map(|(d, _)| d).unwrap_or("");
            for comp in dir.split('/').filter(|c| !c.is_empty()).rev() {
                let mut obj = Value::new_object();
                if let Ok(map) = obj.as_object_mut() {
                    map.insert(Value::from(comp), wrapped);
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
    for (shown, m) in modules {
        engine
            .add_policy(shown.clone(), m.text)
            .map_err(|e| LoadError::Compile {
                path: shown,
                message: e.to_string(),
            })?;
    }
    Ok(Compiled { engine, volatile })
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
}
