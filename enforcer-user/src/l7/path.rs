//! Request paths normalized before policy reads them, as Istio normalizes
//! them before its authorization policies and OPA-Envoy do (its
//! `meshConfig.pathNormalization`); the normalized path is also the one the
//! server gets, so a rule on `/admin` is not passed by `/%61dmin`,
//! `/public/../admin` or `//admin` on their way to a server that reads all
//! three as `/admin`. RFC 3986 normalization is fluent-uri's.

use std::borrow::Cow;

use crate::config::PathNormalization;

/// A path the normalizer cannot read (not RFC 3986: a raw `"`, `{`, `\`, a
/// bad escape…): refused rather than decided as sent.
#[derive(Debug, thiserror::Error)]
#[error("the path is not an RFC 3986 path ({0}): send it percent-encoded")]
pub struct PathError(String);

/// `path` (no query) normalized as `mode` says; `None` when it is unchanged
/// or not an origin-form path (`*`, a CONNECT's authority).
pub fn normalize(path: &str, mode: PathNormalization) -> Result<Option<String>, PathError> {
    if mode == PathNormalization::None || !path.starts_with('/') || already_normal(path) {
        return Ok(None);
    }
    let mut p = Cow::Borrowed(path);
    if mode == PathNormalization::DecodeAndMergeSlashes && p.contains('%') {
        // An encoded slash or backslash is a slash (as Envoy reads `\`).
        let mut out = String::with_capacity(p.len());
        let mut rest = &*p;
        while let Some(at) = rest.find('%') {
            out.push_str(&rest[..at]);
            let esc = rest.get(at..at + 3).unwrap_or(&rest[at..]);
            if esc.eq_ignore_ascii_case("%2f") || esc.eq_ignore_ascii_case("%5c") {
                out.push('/');
            } else {
                out.push_str(esc);
            }
            rest = &rest[at + esc.len()..];
        }
        out.push_str(rest);
        p = Cow::Owned(out);
    }
    let uri = format!("http://h{p}");
    let parsed = fluent_uri::Uri::parse(uri.as_str()).map_err(|e| PathError(e.to_string()))?;
    let normal = parsed.normalize();
    let mut out = normal.path().as_str().to_owned();
    if mode != PathNormalization::Base && out.contains("//") {
        let mut merged = String::with_capacity(out.len());
        for c in out.chars() {
            if !(c == '/' && merged.ends_with('/')) {
                merged.push(c);
            }
        }
        out = merged;
    }
    Ok((out != path).then_some(out))
}

/// A path no mode changes, found without allocating (nearly every path):
/// only RFC 3986 path characters, no escape, no empty or dot segment.
fn already_normal(path: &str) -> bool {
    let bytes = path.as_bytes();
    bytes
        .iter()
        .all(|&b| b.is_ascii_alphanumeric() || b"/-._~!$&'()*+,;=:@".contains(&b))
        && !path.contains("//")
        && !path.split('/').any(|seg| seg == "." || seg == "..")
}

#[cfg(test)]
mod tests {
    use super::*;
    use PathNormalization::*;

    #[test]
    fn paths_are_normalized_as_istio_names_it() {
        let n = |p: &str, m| normalize(p, m).map(|o| o.unwrap_or_else(|| p.to_owned()));
        let table: &[(&str, PathNormalization, &str)] = &[
            // Unchanged.
            ("/docs/1", Base, "/docs/1"),
            ("/", MergeSlashes, "/"),
            ("/a%2Fb", MergeSlashes, "/a%2Fb"),
            ("/%61dmin", None, "/%61dmin"),
            // Unreserved characters decoded; other escapes upper-cased.
            ("/%61dmin", Base, "/admin"),
            ("/%7euser/%2f", Base, "/~user/%2F"),
            ("/caf%C3%A9", Base, "/caf%C3%A9"),
            // Dot segments removed, also encoded ones; no climbing past /.
            ("/public/../admin", Base, "/admin"),
            ("/public/%2e%2E/admin", Base, "/admin"),
            ("/./admin/.", Base, "/admin/"),
            ("/../../admin", Base, "/admin"),
            // Slashes.
            ("//admin", Base, "//admin"),
            ("//admin", MergeSlashes, "/admin"),
            ("/a///b//", MergeSlashes, "/a/b/"),
            ("/public/..//admin", MergeSlashes, "/admin"),
            ("/a%2Fb", DecodeAndMergeSlashes, "/a/b"),
            ("/public/..%2fadmin", DecodeAndMergeSlashes, "/admin"),
            ("/a%5C%5cb", DecodeAndMergeSlashes, "/a/b"),
        ];
        for (path, mode, want) in table {
            match n(path, *mode) {
                Ok(got) => assert_eq!(&got, want, "{path} ({mode:?})"),
                Err(e) => panic!("{path} ({mode:?}): {e}"),
            }
        }
        // The fast path agrees with the normalizer on every path above.
        for (path, mode, _) in table {
            if already_normal(path) {
                assert_eq!(
                    n(path, Base).ok().as_deref(),
                    Some(*path),
                    "{path} ({mode:?})"
                );
            }
        }
        assert!(already_normal("/v1/chat/completions"));
        assert!(!already_normal("/a/./b") && !already_normal("/a/..") && !already_normal("/a%41"));
        // Not origin-form: left alone.
        assert_eq!(normalize("*", Base).ok(), Some(Option::None));
        assert_eq!(normalize("", MergeSlashes).ok(), Some(Option::None));
        // Not RFC 3986: refused.
        for bad in ["/a b", "/a\"b", "/a{b}", "/a\\b", "/a%zz", "/a%"] {
            assert!(normalize(bad, MergeSlashes).is_err(), "{bad}");
        }
        assert!(normalize("/a%2", DecodeAndMergeSlashes).is_err());
    }
}
