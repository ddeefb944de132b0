//! OPA bundle signatures: `.signatures.json` holds one JWT whose payload lists
//! every file of the bundle with its digest; the JWT is verified with a
//! configured key (`policy.keys`) and every file against its digest, exactly
//! as OPA's default verifier does (docs/policy.md, "Signed bundles"):
//!
//! - the key is the configured `policy.bundle.keyid`, else the JWT header's
//!   `kid`, else the payload's deprecated `keyid`; its algorithm must be the
//!   header's `alg`;
//! - the payload `scope` must equal `policy.bundle.scope`, else the key's
//!   `scope` (both unset: no scope in the payload);
//! - every file of the bundle but `.signatures.json` and the
//!   `exclude_files` globs must be listed with a matching digest, and every
//!   listed file must be in the bundle;
//! - `data.json`, `data.yaml` and `.manifest` are hashed in OPA's structured
//!   form (object keys sorted, no whitespace), anything else as bytes.
use std::collections::{BTreeMap, HashMap};

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use serde_json::value::RawValue;
use sha2::Digest as _;

/// One verification key (`[policy.keys.<id>]`).
pub struct Key {
    pub algorithm: Algorithm,
    key: DecodingKey,
    pub scope: Option<String>,
}

impl Key {
    /// `algorithm` as OPA names it (`RS256`, `ES256`, `HS256`…); `material`
    /// a PEM public key (or certificate) for RS/PS/ES, the shared secret's
    /// bytes for HS.
    pub fn new(algorithm: &str, material: &[u8], scope: Option<String>) -> Result<Self, String> {
        let algorithm: Algorithm = algorithm.parse().map_err(|_| {
            format!(
                "algorithm {algorithm:?} is not one of RS256 RS384 RS512 PS256 PS384 PS512 ES256 ES384 HS256 HS384 HS512"
            )
        })?;
        let key = match algorithm {
            Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => {
                if material.is_empty() {
                    return Err("the HMAC secret is empty".into());
                }
                DecodingKey::from_secret(material)
            }
            Algorithm::RS256
            | Algorithm::RS384
            | Algorithm::RS512
            | Algorithm::PS256
            | Algorithm::PS384
            | Algorithm::PS512 => DecodingKey::from_rsa_pem(material)
                .map_err(|e| format!("not a PEM RSA public key: {e}"))?,
            Algorithm::ES256 | Algorithm::ES384 => DecodingKey::from_ec_pem(material)
                .map_err(|e| format!("not a PEM EC public key: {e}"))?,
            Algorithm::EdDSA => DecodingKey::from_ed_pem(material)
                .map_err(|e| format!("not a PEM Ed25519 public key: {e}"))?,
            other => return Err(format!("algorithm {other:?} is not supported")),
        };
        Ok(Self {
            algorithm,
            key,
            scope,
        })
    }
}

/// How bundles are verified (`[policy.bundle]` and `[policy.keys]`).
pub struct Verifier {
    pub keys: HashMap<String, Key>,
    /// The key to use whatever the JWT names (OPA's `signing.keyid`).
    pub keyid: Option<String>,
    pub scope: Option<String>,
    exclude: Option<globset::GlobSet>,
}

#[derive(Deserialize)]
struct SignaturesFile {
    #[serde(default)]
    signatures: Vec<String>,
    #[serde(default)]
    plugin: String,
}

#[derive(Deserialize)]
struct Payload {
    #[serde(default)]
    files: Vec<FileInfo>,
    #[serde(default)]
    keyid: String,
    #[serde(default)]
    scope: String,
}

#[derive(Deserialize)]
struct FileInfo {
    name: String,
    hash: String,
    algorithm: String,
}

/// The JWT header, read before its key is known (`kid`).
#[derive(Deserialize)]
struct Header {
    #[serde(default)]
    kid: Option<String>,
}

impl Verifier {
    pub fn new(
        keys: HashMap<String, Key>,
        keyid: Option<String>,
        scope: Option<String>,
        exclude_files: &[String],
    ) -> Result<Self, String> {
        if let Some(id) = &keyid
            && !keys.contains_key(id)
        {
            return Err(format!("keyid {id:?} is not one of policy.keys"));
        }
        let exclude = if exclude_files.is_empty() {
            None
        } else {
            let mut set = globset::GlobSetBuilder::new();
            for pattern in exclude_files {
                // Go's filepath.Match: `*` does not cross `/`.
                let glob = globset::GlobBuilder::new(pattern)
                    .literal_separator(true)
                    .build()
                    .map_err(|e| format!("exclude_files {pattern:?}: {e}"))?;
                set.add(glob);
            }
            Some(set.build().map_err(|e| e.to_string())?)
        };
        Ok(Self {
            keys,
            keyid,
            scope,
            exclude,
        })
    }

    /// Checks `.signatures.json` against `files` (every regular file of the
    /// bundle but `.signatures.json`, by path without a leading `/`).
    pub fn verify(
        &self,
        signatures: &[u8],
        files: &BTreeMap<String, Vec<u8>>,
    ) -> Result<(), String> {
        let sc: SignaturesFile = serde_json::from_slice(signatures)
            .map_err(|e| format!(".signatures.json is not valid: {e}"))?;
        if !sc.plugin.is_empty() {
            return Err(format!(
                ".signatures.json names the verification plugin {:?}; enforcer has OPA's default verifier only",
                sc.plugin
            ));
        }
        let token = match sc.signatures.as_slice() {
            [] => return Err(".signatures.json: missing JWT (expected exactly one)".into()),
            [t] => t,
            _ => {
                return Err(
                    ".signatures.json: multiple JWTs not supported (expected exactly one)".into(),
                );
            }
        };
        let payload = self.verify_token(token)?;
        let mut listed: HashMap<&str, &FileInfo> =
            payload.files.iter().map(|f| (f.name.as_str(), f)).collect();
        for (path, bytes) in files {
            let excluded = self.exclude.as_ref().is_some_and(|g| g.is_match(path));
            let listing = listed.remove(path.as_str());
            if excluded {
                continue;
            }
            let Some(info) = listing else {
                return Err(format!("file {path} not included in bundle signature"));
            };
            let want = hex::decode(&info.hash)
                .map_err(|_| format!("{path}: the signed digest is not hex"))?;
            let got = digest(&info.algorithm, path, bytes)?;
            if want != got {
                return Err(format!(
                    "{path}: digest mismatch (signed {}, got {})",
                    info.hash,
                    hex::encode(&got)
                ));
            }
        }
        if !listed.is_empty() {
            let mut extra: Vec<&str> = listed.into_keys().collect();
            extra.sort_unstable();
            return Err(format!(
                "file(s) {extra:?} specified in bundle signatures but not found in the bundle"
            ));
        }
        Ok(())
    }

    /// Verifies the JWT with its key; returns its payload.
    fn verify_token(&self, token: &str) -> Result<Payload, String> {
        let mut parts = token.split('.');
        let (Some(h), Some(p), Some(_), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err("the signature is not a compact JWT (three parts)".into());
        };
        let b64 = |s: &str| {
            use base64::Engine as _;
            base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(s)
        };
        let header: Header = b64(h)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or("the JWT header is not base64url JSON")?;
        let unverified: Payload = b64(p)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or("the JWT payload is not base64url JSON with a files list")?;
        let keyid = self
            .keyid
            .clone()
            .or(header.kid.filter(|k| !k.is_empty()))
            .or(Some(unverified.keyid).filter(|k| !k.is_empty()))
            .ok_or("verification key ID is empty (no policy.bundle.keyid, no kid in the JWT)")?;
        let key = self.keys.get(&keyid).ok_or_else(|| {
            format!("verification key corresponding to ID {keyid:?} not found in policy.keys")
        })?;
        let mut validation = Validation::new(key.algorithm);
        validation.required_spec_claims.clear();
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.validate_aud = false;
        let data = jsonwebtoken::decode::<Payload>(token, &key.key, &validation)
            .map_err(|e| format!("the bundle signature does not verify with key {keyid:?}: {e}"))?;
        let scope = self.scope.as_deref().or(key.scope.as_deref()).unwrap_or("");
        if data.claims.scope != scope {
            return Err(format!(
                "scope mismatch: the signature has scope {:?}, {scope:?} is required",
                data.claims.scope
            ));
        }
        Ok(data.claims)
    }
}

/// A file's digest as OPA computes it for signatures.
fn digest(algorithm: &str, path: &str, bytes: &[u8]) -> Result<Vec<u8>, String> {
    let canonical;
    let input: &[u8] = if is_structured(path) {
        canonical = canonical_form(path, bytes)?;
        canonical.as_bytes()
    } else {
        bytes
    };
    Ok(match algorithm {
        "SHA-256" => sha2::Sha256::digest(input).to_vec(),
        "SHA-224" => sha2::Sha224::digest(input).to_vec(),
        "SHA-384" => sha2::Sha384::digest(input).to_vec(),
        "SHA-512" => sha2::Sha512::digest(input).to_vec(),
        "SHA-512-224" => sha2::Sha512_224::digest(input).to_vec(),
        "SHA-512-256" => sha2::Sha512_256::digest(input).to_vec(),
        "" => return Err(format!("no hashing algorithm provided for file {path}")),
        other => {
            return Err(format!(
                "{path}: hashing algorithm {other:?} is refused (SHA-2 family only)"
            ));
        }
    })
}

/// OPA hashes these files in structured form.
fn is_structured(path: &str) -> bool {
    let base = path.rsplit('/').next().unwrap_or(path);
    matches!(base, "data.json" | "data.yaml" | ".manifest")
}

/// The text OPA hashes for a structured file: objects with keys in byte
/// order, `{`, `"k":v`, `,`, `}`; arrays likewise; strings as Go's JSON
/// encoder writes them (no HTML escaping); numbers as written.
pub fn canonical_form(path: &str, bytes: &[u8]) -> Result<String, String> {
    let json;
    let text = if path.ends_with(".yaml") {
        let text = std::str::from_utf8(bytes).map_err(|_| format!("{path}: not UTF-8"))?;
        json = regorus::Value::from_yaml_str(text)
            .and_then(|v| v.to_json_str())
            .map_err(|e| format!("{path}: not YAML: {e}"))?;
        json.as_str()
    } else {
        std::str::from_utf8(bytes).map_err(|_| format!("{path}: not UTF-8"))?
    };
    let raw: &RawValue =
        serde_json::from_str(text).map_err(|e| format!("{path}: not JSON: {e}"))?;
    let mut out = String::with_capacity(text.len());
    walk(raw, &mut out).map_err(|e| format!("{path}: {e}"))?;
    Ok(out)
}

fn walk(raw: &RawValue, out: &mut String) -> Result<(), serde_json::Error> {
    let text = raw.get();
    match text.as_bytes().first() {
        Some(b'{') => {
            let map: BTreeMap<String, &RawValue> = serde_json::from_str(text)?;
            out.push('{');
            for (i, (k, v)) in map.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                go_string(k, out)?;
                out.push(':');
                walk(v, out)?;
            }
            out.push('}');
        }
        Some(b'[') => {
            let items: Vec<&RawValue> = serde_json::from_str(text)?;
            out.push('[');
            for (i, v) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                walk(v, out)?;
            }
            out.push(']');
        }
        Some(b'"') => {
            let s: String = serde_json::from_str(text)?;
            go_string(&s, out)?;
        }
        // Numbers as written (OPA decodes them as json.Number), literals.
        _ => out.push_str(text),
    }
    Ok(())
}

/// A string as Go's `encoding/json` writes it with HTML escaping off:
/// serde_json's escaping plus U+2028 and U+2029.
fn go_string(s: &str, out: &mut String) -> Result<(), serde_json::Error> {
    let quoted = serde_json::to_string(s)?;
    for c in quoted.chars() {
        match c {
            '\u{2028}' => out.push_str("\\u2028"),
            '\u{2029}' => out.push_str("\\u2029"),
            c => out.push(c),
        }
    }
    Ok(())
}

#[cfg(test)]
pub mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header as JwtHeader};

    /// Signs `files` as `opa sign` does; `claims` adds to the payload.
    pub fn sign(
        files: &BTreeMap<String, Vec<u8>>,
        alg: Algorithm,
        key: &EncodingKey,
        kid: Option<&str>,
        scope: Option<&str>,
    ) -> Vec<u8> {
        let listed: Vec<serde_json::Value> = files
            .iter()
            .map(|(name, bytes)| {
                let d = digest("SHA-256", name, bytes).expect("digest");
                serde_json::json!({"name": name, "hash": hex::encode(d), "algorithm": "SHA-256"})
            })
            .collect();
        let mut payload = serde_json::json!({"files": listed});
        if let Some(s) = scope {
            payload["scope"] = s.into();
        }
        let mut header = JwtHeader::new(alg);
        header.kid = kid.map(str::to_owned);
        let token = jsonwebtoken::encode(&header, &payload, key).expect("sign");
        serde_json::to_vec(&serde_json::json!({"signatures": [token]})).expect("json")
    }

    pub fn es256() -> (EncodingKey, Vec<u8>) {
        let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let enc = EncodingKey::from_ec_pem(kp.serialize_pem().as_bytes()).expect("enc");
        (enc, kp.public_key_pem().into_bytes())
    }

    fn files() -> BTreeMap<String, Vec<u8>> {
        BTreeMap::from([
            (
                "enforcer/authz.rego".to_owned(),
                b"package enforcer.authz\n".to_vec(),
            ),
            (
                "enforcer/data.json".to_owned(),
                br#"{"b": [1.50, "x"], "a": {"z": null, "y": true}}"#.to_vec(),
            ),
            (".manifest".to_owned(), br#"{"revision": "r1"}"#.to_vec()),
        ])
    }

    #[test]
    fn structured_files_hash_in_opas_canonical_form() {
        let c = canonical_form(
            "data.json",
            br#"{ "b": [1.50, "x\u2028<&>"], "a": {"z": null, "y": true, "\u0001": 1e3} }"#,
        )
        .expect("canonical");
        assert_eq!(
            c,
            r#"{"a":{"\u0001":1e3,"y":true,"z":null},"b":[1.50,"x\u2028<&>"]}"#
        );
        let y = canonical_form("data.yaml", b"b: [x]\na: {c: true}\n").expect("yaml");
        assert_eq!(y, r#"{"a":{"c":true},"b":["x"]}"#);
    }

    /// Table: what a verifier accepts and refuses, each with its reason.
    #[test]
    fn verification_table() {
        let (es_enc, es_pub) = es256();
        let (other_enc, _) = es256();
        let hs_enc = EncodingKey::from_secret(b"shared secret");
        let verifier = |scope: Option<&str>| {
            Verifier::new(
                HashMap::from([
                    (
                        "es".to_owned(),
                        Key::new("ES256", &es_pub, scope.map(str::to_owned)).expect("key"),
                    ),
                    (
                        "hs".to_owned(),
                        Key::new("HS256", b"shared secret", None).expect("key"),
                    ),
                ]),
                None,
                None,
                &[],
            )
            .expect("verifier")
        };
        let f = files();
        let good = sign(&f, Algorithm::ES256, &es_enc, Some("es"), None);
        assert_eq!(verifier(None).verify(&good, &f), Ok(()));
        let hs = sign(&f, Algorithm::HS256, &hs_enc, Some("hs"), None);
        assert_eq!(verifier(None).verify(&hs, &f), Ok(()));

        let mut tampered = f.clone();
        tampered.insert(
            "enforcer/authz.rego".into(),
            b"package enforcer.authz\ndefault allow := true\n".to_vec(),
        );
        let mut extra = f.clone();
        extra.insert("enforcer/evil.rego".into(), b"package x\n".to_vec());
        let mut missing = f.clone();
        missing.remove(".manifest");
        // Whitespace in a structured file does not change its digest.
        let mut reformatted = f.clone();
        reformatted.insert(
            "enforcer/data.json".into(),
            br#"{"a":{"y":true,"z":null},"b":[1.50,"x"]}"#.to_vec(),
        );
        assert_eq!(verifier(None).verify(&good, &reformatted), Ok(()));

        // (what, .signatures.json, files, scope required, the error says)
        type Case<'a> = (
            &'a str,
            Vec<u8>,
            &'a BTreeMap<String, Vec<u8>>,
            Option<&'a str>,
            &'a str,
        );
        let cases: Vec<Case> = vec![
            (
                "tampered module",
                good.clone(),
                &tampered,
                None,
                "digest mismatch",
            ),
            (
                "unsigned extra module",
                good.clone(),
                &extra,
                None,
                "not included in bundle signature",
            ),
            (
                "signed file removed",
                good.clone(),
                &missing,
                None,
                "not found in the bundle",
            ),
            (
                "another key, same kid",
                sign(&f, Algorithm::ES256, &other_enc, Some("es"), None),
                &f,
                None,
                "does not verify",
            ),
            (
                "alg confusion: HS256 keyed with the ES public key",
                sign(
                    &f,
                    Algorithm::HS256,
                    &EncodingKey::from_secret(&es_pub),
                    Some("es"),
                    None,
                ),
                &f,
                None,
                "does not verify",
            ),
            (
                "unknown kid",
                sign(&f, Algorithm::ES256, &es_enc, Some("nope"), None),
                &f,
                None,
                "not found in policy.keys",
            ),
            (
                "no kid",
                sign(&f, Algorithm::ES256, &es_enc, None, None),
                &f,
                None,
                "key ID is empty",
            ),
            (
                "scope required, none signed",
                good.clone(),
                &f,
                Some("write"),
                "scope mismatch",
            ),
            (
                "no JWT",
                br#"{"signatures": []}"#.to_vec(),
                &f,
                None,
                "missing JWT",
            ),
            (
                "two JWTs",
                br#"{"signatures": ["a.b.c", "a.b.c"]}"#.to_vec(),
                &f,
                None,
                "multiple JWTs",
            ),
            (
                "plugin",
                br#"{"signatures": ["a.b.c"], "plugin": "x"}"#.to_vec(),
                &f,
                None,
                "plugin",
            ),
            ("garbage", b"\x00\xff".to_vec(), &f, None, "not valid"),
        ];
        for (what, sigs, files, scope, want) in cases {
            match verifier(scope).verify(&sigs, files) {
                Ok(()) => panic!("{what}: verified, must be refused"),
                Err(e) => assert!(e.contains(want), "{what}: {e:?} does not say {want:?}"),
            }
        }
        // The scope, when signed and configured alike, verifies.
        let scoped = sign(&f, Algorithm::ES256, &es_enc, Some("es"), Some("write"));
        assert_eq!(verifier(Some("write")).verify(&scoped, &f), Ok(()));
        // exclude_files leaves a file out of the check.
        let v = Verifier::new(
            HashMap::from([(
                "es".to_owned(),
                Key::new("ES256", &es_pub, None).expect("key"),
            )]),
            Some("es".into()),
            None,
            &["enforcer/*.md".to_owned()],
        )
        .expect("verifier");
        let mut with_readme = f.clone();
        with_readme.insert("enforcer/README.md".into(), b"anything".to_vec());
        assert_eq!(v.verify(&good, &with_readme), Ok(()));
    }

    #[test]
    fn bad_keys_are_refused_with_the_reason() {
        let refused = |alg: &str, k: &[u8]| Key::new(alg, k, None).err().unwrap_or_default();
        assert!(refused("XS256", b"k").contains("not one of"));
        assert!(refused("RS256", b"not pem").contains("PEM RSA"));
        assert!(refused("HS256", b"").contains("empty"));
        assert!(
            Verifier::new(HashMap::new(), Some("k".into()), None, &[])
                .err()
                .is_some_and(|e| e.contains("not one of policy.keys"))
        );
    }
}
