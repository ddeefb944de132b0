//! Tokens used at `llm` destinations, per caller and model, over the
//! caller's current window (fixed windows aligned to the epoch, as long as
//! its budget's `window_secs`). Kept in `state_dir/llm-usage.json`, written
//! off the runtime threads soon after each change, so counters survive an
//! agent restart. A real tokenizer (o200k_base) counts streamed completion
//! tokens as they arrive.
use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::{Mutex, OnceLock},
    time::Duration,
};

use serde::{Deserialize, Serialize};
use tracing::warn;

use crate::policy::budgets::Used;

/// Distinct models counted per caller; past it, tokens go to `other`.
const MAX_MODELS: usize = 256;
/// Distinct callers counted; past it, callers whose window ended are
/// dropped, and then tokens go to `other`.
const MAX_SOURCES: usize = 65_536;
const OTHER: &str = "other";
/// How long after a change the counters are written.
const WRITE_DELAY: Duration = Duration::from_millis(100);
const FORMAT_VERSION: u32 = 1;

/// One model's tokens in a window.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Count {
    pub prompt: u64,
    pub completion: u64,
}

impl Count {
    fn total(self) -> u64 {
        self.prompt.saturating_add(self.completion)
    }
}

/// One caller's current window.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Window {
    pub window_secs: u64,
    /// Unix seconds; a multiple of `window_secs`.
    pub window_start: u64,
    pub models: HashMap<String, Count>,
}

impl Window {
    fn current(&self, window_secs: u64, now: u64) -> bool {
        self.window_secs == window_secs && self.window_start == start_of(window_secs, now)
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct File {
    version: u32,
    sources: HashMap<String, Window>,
}

/// The start (Unix seconds) of the window of `window_secs` holding `now`.
pub fn start_of(window_secs: u64, now: u64) -> u64 {
    now - now % window_secs.max(1)
}

/// Unix seconds now.
pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The counters of every caller.
pub struct Tokens {
    sources: Mutex<HashMap<String, Window>>,
    path: Option<PathBuf>,
    changed: tokio::sync::Notify,
}

impl Tokens {
    /// Counters kept in memory only (tests, benches).
    pub fn in_memory() -> Self {
        Self {
            sources: Mutex::default(),
            path: None,
            changed: tokio::sync::Notify::new(),
        }
    }

    /// The counters kept in `path`. A file that cannot be read as counters
    /// is an error (the agent does not start over silently with zeros).
    pub fn open(path: &Path) -> Result<Self, String> {
        let sources = match std::fs::read(path) {
            Ok(bytes) => {
                let f: File = serde_json::from_slice(&bytes).map_err(|e| {
                    format!(
                        "{}: not LLM token counters ({e}); move it aside to start from zero",
                        path.display()
                    )
                })?;
                if f.version != FORMAT_VERSION {
                    return Err(format!(
                        "{}: counters of format {} (this agent reads {FORMAT_VERSION})",
                        path.display(),
                        f.version
                    ));
                }
                f.sources
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => HashMap::new(),
            Err(e) => return Err(format!("{}: {e}", path.display())),
        };
        Ok(Self {
            sources: Mutex::new(sources),
            path: Some(path.to_owned()),
            changed: tokio::sync::Notify::new(),
        })
    }

    /// What `source` used in its current window: all models, and `model`.
    pub fn used(&self, source: &str, model: Option<&str>, window_secs: u64, now: u64) -> Used {
        let sources = self.sources.lock().unwrap_or_else(|p| p.into_inner());
        let Some(w) = sources.get(source).filter(|w| w.current(window_secs, now)) else {
            return Used::default();
        };
        Used {
            total: w.models.values().map(|c| c.total()).sum(),
            model: model.and_then(|m| w.models.get(m)).map_or(0, |c| c.total()),
        }
    }

    /// Adds (or, reconciling an estimate, takes away) tokens.
    pub fn add(
        &self,
        source: &str,
        model: &str,
        window_secs: u64,
        now: u64,
        prompt: i64,
        completion: i64,
    ) {
        if prompt == 0 && completion == 0 {
            return;
        }
        {
            let mut sources = self.sources.lock().unwrap_or_else(|p| p.into_inner());
            if sources.len() >= MAX_SOURCES && !sources.contains_key(source) {
                sources.retain(|_, w| w.current(w.window_secs, now));
            }
            let source = if sources.len() >= MAX_SOURCES && !sources.contains_key(source) {
                OTHER
            } else {
                source
            };
            let w = sources.entry(source.to_owned()).or_default();
            if !w.current(window_secs, now) {
                *w = Window {
                    window_secs,
                    window_start: start_of(window_secs, now),
                    models: HashMap::new(),
                };
            }
            let model = if w.models.len() >= MAX_MODELS && !w.models.contains_key(model) {
                OTHER
            } else {
                model
            };
            let c = w.models.entry(model.to_owned()).or_default();
            c.prompt = c.prompt.saturating_add_signed(prompt);
            c.completion = c.completion.saturating_add_signed(completion);
        }
        self.changed.notify_one();
    }

    /// Every caller's current window.
    pub fn snapshot(&self, now: u64) -> HashMap<String, Window> {
        self.sources
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|(_, w)| w.current(w.window_secs, now))
            .map(|(k, w)| (k.clone(), w.clone()))
            .collect()
    }

    /// Writes the counters after each change (at most every 100 ms), on the
    /// blocking pool; runs until the agent stops.
    pub async fn keep_written(self: std::sync::Arc<Self>) {
        let Some(path) = self.path.clone() else {
            return;
        };
        let mut failing = false;
        loop {
            self.changed.notified().await;
            tokio::time::sleep(WRITE_DELAY).await;
            let file = File {
                version: FORMAT_VERSION,
                sources: self.snapshot(now()),
            };
            let target = path.clone();
            let written = tokio::task::spawn_blocking(move || write_atomically(&target, &file))
                .await
                .map_err(|e| e.to_string())
                .and_then(|r| r);
            match written {
                Ok(()) => failing = false,
                Err(e) => {
                    if !failing {
                        warn!(path = %path.display(), error = %e,
                            "writing the LLM token counters failed; retrying on the next change");
                    }
                    failing = true;
                    // Try again with the next change, or in a second.
                    self.changed.notify_one();
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }
}

/// Writes `file` beside `path` and renames it over: a reader (or a crash)
/// sees the old counters or the new ones, never half of them.
fn write_atomically(path: &Path, file: &File) -> Result<(), String> {
    use std::io::Write as _;
    let text = serde_json::to_vec(file).map_err(|e| e.to_string())?;
    if let Some(dir) = path.parent() {
        use std::os::unix::fs::DirBuilderExt as _;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    let tmp = path.with_extension("json.tmp");
    let mut f = std::fs::File::create(&tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
    f.write_all(&text)
        .and_then(|()| f.sync_all())
        .map_err(|e| format!("{}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path).map_err(|e| format!("{}: {e}", path.display()))
}

static BPE: OnceLock<tiktoken_rs::CoreBPE> = OnceLock::new();

/// Loads the tokenizer (a fraction of a second; call on a blocking thread).
pub fn load_tokenizer() {
    if BPE.get().is_none() {
        match tiktoken_rs::o200k_base() {
            Ok(bpe) => {
                let _ = BPE.set(bpe);
            }
            Err(e) => {
                warn!(error = %e, "loading the o200k_base tokenizer failed; streamed tokens are estimated (4 bytes a token)")
            }
        }
    }
}

/// Tokens in `text` by o200k_base; until the tokenizer is loaded, an
/// estimate of one token per 4 bytes.
pub fn count(text: &str) -> u64 {
    match BPE.get() {
        Some(bpe) => bpe.encode_ordinary(text).len() as u64,
        None => text.len().div_ceil(4) as u64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_are_per_caller_model_and_window_and_survive_a_restart() {
        let dir = std::env::temp_dir().join(format!("enforcer-tokens-{}", std::process::id()));
        // The state directory is made when the counters are first written.
        let path = dir.join("state").join("llm-usage.json");
        let t = Tokens::open(&path).expect("no file yet");
        let now = 7_200 + 30;
        t.add("a", "m1", 3600, now, 10, 5);
        t.add("a", "m2", 3600, now, 1, 1);
        t.add("a", "m1", 3600, now, 0, -2);
        t.add("b", "m1", 60, now, 4, 0);
        assert_eq!(
            t.used("a", Some("m1"), 3600, now),
            Used {
                total: 15,
                model: 13
            }
        );
        // The next window starts from zero; a changed window too.
        assert_eq!(t.used("a", Some("m1"), 3600, 10_800).total, 0);
        assert_eq!(t.used("a", None, 60, now).total, 0);
        write_atomically(
            &path,
            &File {
                version: FORMAT_VERSION,
                sources: t.snapshot(now),
            },
        )
        .expect("written");
        let again = Tokens::open(&path).expect("read back");
        assert_eq!(again.used("a", Some("m2"), 3600, now).model, 2);
        assert_eq!(again.used("b", None, 60, now).total, 4);

        std::fs::write(&path, b"{half").expect("corrupt");
        let err = Tokens::open(&path).err().expect("refused");
        assert!(err.contains("llm-usage.json"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn models_past_the_bound_are_counted_together() {
        let t = Tokens::in_memory();
        for i in 0..(MAX_MODELS + 10) {
            t.add("a", &format!("m{i}"), 60, 0, 1, 0);
        }
        let w = t.snapshot(0).remove("a").expect("a");
        assert_eq!(w.models.len(), MAX_MODELS + 1);
        assert_eq!(w.models[OTHER].prompt, 10);
    }

    #[test]
    fn the_tokenizer_counts_real_tokens() {
        load_tokenizer();
        // o200k_base: "hello world" is two tokens.
        assert_eq!(count("hello world"), 2);
        assert_eq!(count(""), 0);
    }
}
