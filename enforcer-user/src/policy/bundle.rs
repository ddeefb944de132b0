//! OPA bundles as OPA reads them: a gzip'd tar of `.rego` modules,
//! `data.json` / `data.yaml` documents (placed by directory), a `.manifest`
//! (`revision`, `roots`, `rego_version`) and, when signed, a
//! `.signatures.json` (`signing`). Read within limits on the compressed
//! size, the inflated size and the number of files, so a gzip bomb is
//! refused without being inflated (docs/policy.md, "Bundles").
use std::{collections::BTreeMap, io::Read as _};

use serde::Deserialize;

use super::{
    LoadError,
    load::{PolicyFile, is_policy_file},
    signing::Verifier,
};

/// Bounds on what a bundle may hold (`policy.bundle.max_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// The bundle as fetched or read (gzip'd).
    pub max_bytes: u64,
    /// All files inflated, together.
    pub max_uncompressed_bytes: u64,
    pub max_files: usize,
}

impl Default for Limits {
    fn default() -> Self {
        use crate::config::{
            DEFAULT_BUNDLE_MAX_BYTES, DEFAULT_BUNDLE_MAX_FILES,
            DEFAULT_BUNDLE_MAX_UNCOMPRESSED_BYTES,
        };
        Self {
            max_bytes: DEFAULT_BUNDLE_MAX_BYTES,
            max_uncompressed_bytes: DEFAULT_BUNDLE_MAX_UNCOMPRESSED_BYTES,
            max_files: DEFAULT_BUNDLE_MAX_FILES,
        }
    }
}

/// How bundles are read: limits and signature verification.
#[derive(Default)]
pub struct Options {
    /// The bundle's name in decision logs (`bundles`) and metrics.
    pub name: String,
    pub limits: Limits,
    /// Keys to verify signed bundles with; a signed bundle without them is
    /// refused, as OPA does.
    pub verifier: Option<Verifier>,
    /// Refuse bundles without `.signatures.json`.
    pub require_signature: bool,
    /// Read a signed bundle without verifying it (`enforcer policy test`
    /// only; never the agent).
    pub skip_verification: bool,
}

/// `.manifest`, as far as enforcer acts on it.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
pub struct Manifest {
    #[serde(default)]
    pub revision: String,
    /// The data paths (`a/b`) this bundle owns; unset means everything.
    #[serde(default)]
    pub roots: Option<Vec<String>>,
    #[serde(default)]
    pub rego_version: Option<i64>,
    #[serde(default)]
    file_rego_versions: Option<serde_json::Value>,
    #[serde(default)]
    wasm: Option<Vec<serde_json::Value>>,
}

impl Manifest {
    /// The roots, normalized as OPA does (no leading or trailing `/`); `[""]`
    /// (everything) when unset.
    pub fn roots(&self) -> Vec<String> {
        match &self.roots {
            None => vec![String::new()],
            Some(r) => r.iter().map(|r| r.trim_matches('/').to_owned()).collect(),
        }
    }

    fn check(&self) -> Result<(), String> {
        match self.rego_version {
            None | Some(1) => {}
            Some(0) => {
                return Err(
                    "rego_version 0: enforcer evaluates Rego v1 only; convert the modules with `opa fmt --v0-v1` and build the bundle again".into(),
                );
            }
            Some(v) => return Err(format!("rego_version {v} is not 0 or 1")),
        }
        if self.file_rego_versions.is_some() {
            return Err(
                "file_rego_versions: per-file Rego versions are not supported; enforcer evaluates Rego v1 only".into(),
            );
        }
        if self.wasm.as_ref().is_some_and(|w| !w.is_empty()) {
            return Err(
                "the manifest names Wasm modules; enforcer evaluates Rego, not Wasm".into(),
            );
        }
        let roots = self.roots();
        for (i, a) in roots.iter().enumerate() {
            for b in &roots[i + 1..] {
                if root_contains(a, b) || root_contains(b, a) {
                    return Err(format!("manifest has overlapped roots: {a:?} and {b:?}"));
                }
            }
        }
        Ok(())
    }
}

/// `root` contains `path` (both `/`-separated; the empty root contains all).
pub fn root_contains(root: &str, path: &str) -> bool {
    if root.is_empty() {
        return true;
    }
    let (r, p): (Vec<&str>, Vec<&str>) = (root.split('/').collect(), path.split('/').collect());
    r.len() <= p.len() && r.iter().zip(&p).all(|(a, b)| a == b)
}

/// A bundle read and, if signed, verified.
pub struct Bundle {
    /// The `.rego`, `data.json` and `data.yaml` files.
    pub files: Vec<PolicyFile>,
    pub manifest: Manifest,
    pub signed: bool,
}

/// Reads a bundle. `name` names it in errors.
pub fn read(name: &str, bytes: &[u8], opts: &Options) -> Result<Bundle, LoadError> {
    let err = |message: String| LoadError::File {
        path: name.to_owned(),
        message,
    };
    let limits = opts.limits;
    if bytes.len() as u64 > limits.max_bytes {
        return Err(err(format!(
            "the bundle is {} bytes, over policy.bundle.max_bytes ({})",
            bytes.len(),
            limits.max_bytes
        )));
    }
    // The inflated stream is read through a bound one byte over the limit:
    // reaching it refuses the bundle, whatever the headers claim.
    let inflated = flate2::read::GzDecoder::new(bytes).take(limits.max_uncompressed_bytes + 1);
    let mut archive = tar::Archive::new(inflated);
    let mut all: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let mut signatures: Option<Vec<u8>> = None;
    let mut total: u64 = 0;
    for entry in archive
        .entries()
        .map_err(|e| err(format!("not a .tar.gz bundle: {e}")))?
    {
        let mut entry = entry.map_err(|e| err(corrupt(e, limits)))?;
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
        if all.len() + usize::from(signatures.is_some()) >= limits.max_files {
            return Err(err(format!(
                "more than policy.bundle.max_files ({}) files",
                limits.max_files
            )));
        }
        let size = entry.header().size().unwrap_or(u64::MAX);
        if total.saturating_add(size) > limits.max_uncompressed_bytes {
            return Err(err(format!(
                "{path}: inflated, the bundle is over policy.bundle.max_uncompressed_bytes ({})",
                limits.max_uncompressed_bytes
            )));
        }
        let mut contents = Vec::new();
        entry
            .read_to_end(&mut contents)
            .map_err(|e| err(format!("{path}: {}", corrupt(e, limits))))?;
        total += contents.len() as u64;
        // A second entry of the same name would replace a verified one.
        if path == ".signatures.json" {
            if signatures.replace(contents).is_some() {
                return Err(err(format!("entry {path:?} appears twice")));
            }
        } else if all.insert(path.clone(), contents).is_some() {
            return Err(err(format!("entry {path:?} appears twice")));
        }
    }
    let signed = signatures.is_some();
    match (&signatures, &opts.verifier) {
        (Some(_), _) if opts.skip_verification => {}
        (Some(sigs), Some(v)) => v
            .verify(sigs, &all)
            .map_err(|m| err(format!("signature refused: {m}")))?,
        (Some(_), None) => {
            return Err(err(
                "the bundle is signed but no verification key is configured (policy.keys)".into(),
            ));
        }
        (None, _) if opts.require_signature => {
            return Err(err(
                "the bundle has no .signatures.json and policy.bundle.require_signature is set"
                    .into(),
            ));
        }
        (None, _) => {}
    }
    let manifest = match all.get(".manifest") {
        Some(m) => {
            serde_json::from_slice::<Manifest>(m).map_err(|e| err(format!(".manifest: {e}")))?
        }
        None => Manifest::default(),
    };
    manifest
        .check()
        .map_err(|m| err(format!(".manifest: {m}")))?;
    let files = all
        .into_iter()
        .filter(|(p, _)| is_policy_file(p))
        .map(|(path, contents)| PolicyFile { path, contents })
        .collect();
    Ok(Bundle {
        files,
        manifest,
        signed,
    })
}

/// A read error, saying when it is the inflated-size bound that cut it.
fn corrupt(e: std::io::Error, limits: Limits) -> String {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        format!(
            "truncated, or over policy.bundle.max_uncompressed_bytes ({}) inflated: {e}",
            limits.max_uncompressed_bytes
        )
    } else {
        format!("corrupt bundle: {e}")
    }
}

#[cfg(test)]
pub mod tests {
    use super::*;
    use crate::policy::signing::{Key, tests as sig};
    use std::collections::HashMap;

    /// A gzip'd tar of `files`, in order, named as given (`opa build`
    /// writes `/data.json`, with a leading slash, which the tar crate
    /// would refuse to set).
    pub fn tarball(files: &[(&str, &[u8])]) -> Vec<u8> {
        let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        let mut t = tar::Builder::new(gz);
        for (path, data) in files {
            let mut h = tar::Header::new_gnu();
            h.as_old_mut().name[..path.len()].copy_from_slice(path.as_bytes());
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_entry_type(tar::EntryType::Regular);
            h.set_cksum();
            t.append(&h, *data).expect("append");
        }
        t.into_inner().expect("tar").finish().expect("gz")
    }

    const REGO: &[u8] = b"package enforcer.authz\n\nimport rego.v1\n\ndefault allow := false\n";

    /// Why `bytes` is refused (empty when it is read).
    fn refusal(bytes: &[u8], opts: &Options) -> String {
        read("b", bytes, opts)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    }

    fn limited(limits: Limits) -> Options {
        Options {
            limits,
            ..Options::default()
        }
    }

    #[test]
    fn manifest_is_read_and_checked() {
        let opts = Options::default();
        let b = read(
            "b",
            &tarball(&[
                (
                    "/.manifest",
                    br#"{"revision": "v7", "roots": ["enforcer/"]}"#,
                ),
                ("/enforcer/authz.rego", REGO),
                ("/enforcer/data.yaml", b"ai: {on: true}\n"),
                ("/README.md", b"not loaded"),
            ]),
            &opts,
        )
        .expect("read");
        assert_eq!(b.manifest.revision, "v7");
        assert_eq!(b.manifest.roots(), ["enforcer"]);
        let paths: Vec<&str> = b.files.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(paths, ["enforcer/authz.rego", "enforcer/data.yaml"]);
        for (manifest, want) in [
            (&br#"{"rego_version": 0}"#[..], "opa fmt --v0-v1"),
            (br#"{"roots": ["a", "a/b"]}"#, "overlapped roots"),
            (
                br#"{"wasm": [{"entrypoint": "a", "module": "/p.wasm"}]}"#,
                "Wasm",
            ),
            (br#"{"revision": 7}"#, ".manifest"),
        ] {
            let e = refusal(
                &tarball(&[(".manifest", manifest), ("p.rego", REGO)]),
                &opts,
            );
            assert!(e.contains(want), "{e:?} should say {want:?}");
        }
    }

    /// A bundle that inflates past the bound is refused without being
    /// inflated: 64 MiB of zeros, ~64 KiB gzip'd, against a 1 MiB bound.
    #[test]
    fn gzip_bomb_and_too_many_files_are_refused() {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        {
            let mut t = tar::Builder::new(&mut gz);
            let mut h = tar::Header::new_gnu();
            let size: u64 = 64 << 20;
            h.set_size(size);
            h.set_mode(0o644);
            h.set_cksum();
            t.append_data(&mut h, "data.json", std::io::repeat(0).take(size))
                .expect("append");
            t.finish().expect("tar");
        }
        let bomb = gz.finish().expect("gz");
        assert!(bomb.len() < 1 << 20, "{} bytes", bomb.len());
        let opts = limited(Limits {
            max_uncompressed_bytes: 1 << 20,
            ..Limits::default()
        });
        let e = refusal(&bomb, &opts);
        assert!(e.contains("max_uncompressed_bytes"), "{e}");

        // Entries are counted together: two files under the bound, over it.
        let opts = limited(Limits {
            max_uncompressed_bytes: 4096,
            ..Limits::default()
        });
        let big = vec![b' '; 3000];
        let e = refusal(
            &tarball(&[("a/data.json", &big), ("b/data.json", &big)]),
            &opts,
        );
        assert!(e.contains("max_uncompressed_bytes"), "{e}");

        let many: Vec<(String, &[u8])> = (0..20).map(|i| (format!("p{i}.rego"), REGO)).collect();
        let many: Vec<(&str, &[u8])> = many.iter().map(|(p, d)| (p.as_str(), *d)).collect();
        let opts = limited(Limits {
            max_files: 10,
            ..Limits::default()
        });
        let e = refusal(&tarball(&many), &opts);
        assert!(e.contains("max_files"), "{e}");
        let opts = limited(Limits {
            max_bytes: 100,
            ..Limits::default()
        });
        let e = refusal(&tarball(&many), &opts);
        assert!(e.contains("max_bytes"), "{e}");
    }

    #[test]
    fn signed_bundles_verify_and_tampered_ones_are_refused() {
        let (enc, public) = sig::es256();
        let files = BTreeMap::from([
            (".manifest".to_owned(), br#"{"revision": "r1"}"#.to_vec()),
            ("enforcer/authz.rego".to_owned(), REGO.to_vec()),
        ]);
        let sigs = sig::sign(
            &files,
            jsonwebtoken::Algorithm::ES256,
            &enc,
            Some("k"),
            None,
        );
        let verifier = || {
            Verifier::new(
                HashMap::from([(
                    "k".to_owned(),
                    Key::new("ES256", &public, None).expect("key"),
                )]),
                None,
                None,
                &[],
            )
            .expect("verifier")
        };
        let opts = Options {
            verifier: Some(verifier()),
            require_signature: true,
            ..Options::default()
        };
        let signed = |rego: &[u8], extra: Option<(&str, &[u8])>| {
            let mut f = vec![
                (".manifest", &br#"{"revision": "r1"}"#[..]),
                ("enforcer/authz.rego", rego),
                (".signatures.json", &sigs[..]),
            ];
            f.extend(extra);
            tarball(&f)
        };
        let b = read("b", &signed(REGO, None), &opts).expect("verifies");
        assert!(b.signed);
        assert_eq!(b.manifest.revision, "r1");
        let evil = b"package enforcer.authz\n\nimport rego.v1\n\ndefault allow := true\n";
        for (what, bytes, want) in [
            ("tampered module", signed(evil, None), "digest mismatch"),
            (
                "module added",
                signed(REGO, Some(("x.rego", evil))),
                "not included",
            ),
            (
                "module smuggled under the signed name",
                signed(REGO, Some(("enforcer/authz.rego", evil))),
                "appears twice",
            ),
            (
                "signature removed",
                tarball(&[("enforcer/authz.rego", REGO)]),
                "require_signature",
            ),
        ] {
            let e = refusal(&bytes, &opts);
            assert!(e.contains(want), "{what}: {e:?} should say {want:?}");
        }
        // Signed, but no keys configured: refused, as OPA does.
        let e = refusal(&signed(REGO, None), &Options::default());
        assert!(e.contains("no verification key"), "{e}");
    }
}
