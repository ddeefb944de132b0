//! Registration entries: a SPIFFE ID and the selectors a workload must all
//! have to be given it.
use spiffe::SpiffeId;

pub use crate::config::EntryConfig;

/// A validated entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub spiffe_id: SpiffeId,
    pub selectors: Vec<String>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EntryError {
    #[error("entry {index}: spiffe_id {id:?} is not a SPIFFE ID: {reason}")]
    BadId {
        index: usize,
        id: String,
        reason: String,
    },
    #[error("entry {index} ({id}): trust domain {got:?} is not this node's trust domain {want:?}")]
    ForeignTrustDomain {
        index: usize,
        id: String,
        got: String,
        want: String,
    },
    #[error("entry {index} ({id}): needs at least one selector")]
    NoSelectors { index: usize, id: String },
    #[error("entry {index} ({id}): selector {selector:?} is not of the form type:key:value")]
    BadSelector {
        index: usize,
        id: String,
        selector: String,
    },
}

/// The registration entries in force.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Entries(Vec<Entry>);

impl Entries {
    pub fn parse(list: &[EntryConfig], trust_domain: &str) -> Result<Self, EntryError> {
        let mut out = Vec::with_capacity(list.len());
        for (index, e) in list.iter().enumerate() {
            let spiffe_id = SpiffeId::new(&e.spiffe_id).map_err(|err| EntryError::BadId {
                index,
                id: e.spiffe_id.clone(),
                reason: err.to_string(),
            })?;
            if spiffe_id.trust_domain_name() != trust_domain {
                return Err(EntryError::ForeignTrustDomain {
                    index,
                    id: e.spiffe_id.clone(),
                    got: spiffe_id.trust_domain_name().to_owned(),
                    want: trust_domain.to_owned(),
                });
            }
            if e.selectors.is_empty() {
                return Err(EntryError::NoSelectors {
                    index,
                    id: e.spiffe_id.clone(),
                });
            }
            for s in &e.selectors {
                let mut parts = s.splitn(3, ':');
                let ok = matches!((parts.next(), parts.next(), parts.next()),
                    (Some(t), Some(k), Some(v)) if !t.is_empty() && !k.is_empty() && !v.is_empty());
                if !ok {
                    return Err(EntryError::BadSelector {
                        index,
                        id: e.spiffe_id.clone(),
                        selector: s.clone(),
                    });
                }
            }
            out.push(Entry {
                spiffe_id,
                selectors: e.selectors.clone(),
            });
        }
        Ok(Self(out))
    }

    /// The SPIFFE ID for a workload with `selectors`: among the entries whose
    /// selectors are all present, the one with the most selectors (the most
    /// specific); on a tie, the first in the configuration.
    pub fn identify(&self, selectors: &[String]) -> Option<&SpiffeId> {
        let mut best: Option<&Entry> = None;
        for e in &self.0 {
            if e.selectors.iter().all(|s| selectors.contains(s))
                && best.is_none_or(|b| e.selectors.len() > b.selectors.len())
            {
                best = Some(e);
            }
        }
        best.map(|e| &e.spiffe_id)
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: &str, sel: &[&str]) -> EntryConfig {
        EntryConfig {
            spiffe_id: id.into(),
            selectors: sel.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn all_selectors_must_match_and_most_specific_wins() {
        let e = Entries::parse(
            &[
                entry("spiffe://ai.example.org/any-root", &["unix:uid:0"]),
                entry(
                    "spiffe://ai.example.org/agent/support",
                    &["unix:uid:0", "systemd:unit:support-agent.service"],
                ),
            ],
            "ai.example.org",
        )
        .expect("valid");
        let w = |s: &[&str]| s.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert_eq!(
            e.identify(&w(&[
                "unix:uid:0",
                "systemd:unit:support-agent.service",
                "unix:gid:0"
            ]))
            .map(|i| i.to_string()),
            Some("spiffe://ai.example.org/agent/support".into())
        );
        assert_eq!(
            e.identify(&w(&["unix:uid:0"])).map(|i| i.to_string()),
            Some("spiffe://ai.example.org/any-root".into())
        );
        assert_eq!(e.identify(&w(&["unix:uid:1000"])), None);
    }

    #[test]
    fn invalid_entries_are_named() {
        let err = Entries::parse(&[entry("http://x/y", &["unix:uid:0"])], "x").unwrap_err();
        assert!(matches!(err, EntryError::BadId { index: 0, .. }), "{err}");
        let err =
            Entries::parse(&[entry("spiffe://other.org/y", &["unix:uid:0"])], "x.org").unwrap_err();
        assert!(err.to_string().contains("other.org"), "{err}");
        let err = Entries::parse(&[entry("spiffe://x.org/y", &[])], "x.org").unwrap_err();
        assert!(matches!(err, EntryError::NoSelectors { .. }));
        let err = Entries::parse(&[entry("spiffe://x.org/y", &["uid0"])], "x.org").unwrap_err();
        assert!(err.to_string().contains("uid0"));
    }
}
