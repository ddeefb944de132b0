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

/// Additions to one caller's window not yet in the file (signed: a
/// server's `usage` may replace a larger running count).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Pending {
    window_secs: u64,
    window_start: u64,
    models: HashMap<String, (i64, i64)>,
}

#[derive(Default)]
struct State {
    /// What budgets read: the file as last merged, plus `pending`.
    sources: HashMap<String, Window>,
    /// Added here since the last merge into the file.
    pending: HashMap<String, Pending>,
    /// The file as this agent last wrote or read it (its identity, size and
    /// modification time): another change means another agent wrote it.
    seen: Option<(u64, u64, i64, i64)>,
}

/// The counters of every caller.
///
/// Two agents can count at once: during a hitless upgrade the old agent
/// still meters the answers it drains while the new one meters new
/// requests. Neither overwrites the other: each merges its own additions
/// into the file under an exclusive lock (`llm-usage.json.lock`), reading
/// what the other added, and a change the other made is read within a
/// second even when this agent counts nothing.
pub struct Tokens {
    state: Mutex<State>,
    path: Option<PathBuf>,
    changed: tokio::sync::Notify,
}

/// How often the file is checked for another agent's additions.
const RELOAD_EVERY: Duration = Duration::from_secs(1);

impl Tokens {
    /// Counters kept in memory only (tests, benches).
    pub fn in_memory() -> Self {
        Self {
            state: Mutex::default(),
            path: None,
            changed: tokio::sync::Notify::new(),
        }
    }

    /// The counters kept in `path`. A file that cannot be read as counters
    /// is an error (the agent does not start over silently with zeros).
    pub fn open(path: &Path) -> Result<Self, String> {
        let (sources, seen) = read_file(path)?;
        Ok(Self {
            state: Mutex::new(State {
                sources,
                pending: HashMap::new(),
                seen,
            }),
            path: Some(path.to_owned()),
            changed: tokio::sync::Notify::new(),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// What `source` used in its current window of `window_secs`: in all,
    /// and of `model`.
    pub fn used(&self, source: &str, model: Option<&str>, window_secs: u64, now: u64) -> Used {
        let state = self.state();
        let Some(w) = state
            .sources
            .get(source)
            .filter(|w| w.current(window_secs, now))
        else {
            return Used::default();
        };
        Used {
            total: w.models.values().map(|c| c.total()).sum(),
            model: model.and_then(|m| w.models.get(m)).map_or(0, |c| c.total()),
        }
    }

    /// Adds tokens (negative: a correction) to `source`'s `model` in its
    /// window of `window_secs` holding `now`; a window that ended starts
    /// over.
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
            let mut state = self.state();
            let sources = &mut state.sources;
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
            let (window_start, model) = (w.window_start, model.to_owned());
            let p = state.pending.entry(source.to_owned()).or_default();
            if (p.window_secs, p.window_start) != (window_secs, window_start) {
                *p = Pending {
                    window_secs,
                    window_start,
                    models: HashMap::new(),
                };
            }
            let d = p.models.entry(model).or_default();
            d.0 = d.0.saturating_add(prompt);
            d.1 = d.1.saturating_add(completion);
        }
        self.changed.notify_one();
    }

    /// Every caller's current window.
    pub fn snapshot(&self, now: u64) -> HashMap<String, Window> {
        self.state()
            .sources
            .iter()
            .filter(|(_, w)| w.current(w.window_secs, now))
            .map(|(k, w)| (k.clone(), w.clone()))
            .collect()
    }

    /// Merges this agent's additions into the file (and the file's into
    /// this agent's counters), on the chores thread. On failure the
    /// additions stay pending for the next try.
    pub async fn flush(self: &std::sync::Arc<Self>) -> Result<(), String> {
        if self.path.is_none() {
            return Ok(());
        }
        let this = self.clone();
        crate::chores::run(move || this.merge_into_file())
            .await
            .map_err(|e| e.to_string())?
    }

    fn merge_into_file(&self) -> Result<(), String> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        let pending = std::mem::take(&mut self.state().pending);
        let merged = (|| {
            let _lock = lock_file(path)?;
            let (mut sources, seen) = read_file(path)?;
            if pending.is_empty() {
                // Only reading what another agent added.
                return Ok((sources, seen));
            }
            let now = now();
            merge(&mut sources, &pending);
            sources.retain(|_, w| w.current(w.window_secs, now));
            let file = File {
                version: FORMAT_VERSION,
                sources,
            };
            write_atomically(path, &file)?;
            Ok::<_, String>((file.sources, stamp(path)))
        })();
        let mut state = self.state();
        match merged {
            Ok((mut sources, seen)) => {
                // What was added while the file was being written.
                merge(&mut sources, &state.pending);
                state.sources = sources;
                state.seen = seen;
                Ok(())
            }
            Err(e) => {
                let later = std::mem::replace(&mut state.pending, pending);
                for (source, p) in later {
                    add_pending(&mut state.pending, source, p);
                }
                Err(e)
            }
        }
    }

    /// Whether the file changed since this agent last wrote or read it.
    async fn changed_elsewhere(self: &std::sync::Arc<Self>) -> bool {
        let Some(path) = self.path.clone() else {
            return false;
        };
        let now = crate::chores::run(move || stamp(&path))
            .await
            .ok()
            .flatten();
        now.is_some() && now != self.state().seen
    }

    /// Merges the counters into the file after each change (at most every
    /// 100 ms) and reads another agent's changes within a second; runs until
    /// the agent stops.
    pub async fn keep_written(self: std::sync::Arc<Self>) {
        let Some(path) = self.path.clone() else {
            return;
        };
        let mut failing = false;
        loop {
            tokio::select! {
                () = self.changed.notified() => tokio::time::sleep(WRITE_DELAY).await,
                () = tokio::time::sleep(RELOAD_EVERY) => {
                    if !self.changed_elsewhere().await {
                        continue;
                    }
                }
            }
            match self.flush().await {
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

/// Adds `p` into `pending[source]` (a newer window replaces an older one).
fn add_pending(pending: &mut HashMap<String, Pending>, source: String, p: Pending) {
    let into = pending.entry(source).or_default();
    if (into.window_secs, into.window_start) != (p.window_secs, p.window_start) {
        if into.models.is_empty() || p.window_start >= into.window_start {
            *into = p;
        }
        return;
    }
    for (model, (dp, dc)) in p.models {
        let d = into.models.entry(model).or_default();
        d.0 = d.0.saturating_add(dp);
        d.1 = d.1.saturating_add(dc);
    }
}

/// Adds additions to counters: into the same window; a pending window newer
/// than the counters' replaces them; additions to an older window are
/// dropped (that window is over).
fn merge(sources: &mut HashMap<String, Window>, pending: &HashMap<String, Pending>) {
    for (source, p) in pending {
        let w = sources.entry(source.clone()).or_default();
        if (w.window_secs, w.window_start) != (p.window_secs, p.window_start) {
            if w.models.is_empty() || p.window_start >= w.window_start {
                *w = Window {
                    window_secs: p.window_secs,
                    window_start: p.window_start,
                    models: HashMap::new(),
                };
            } else {
                continue;
            }
        }
        for (model, &(dp, dc)) in &p.models {
            let c = w.models.entry(model.clone()).or_default();
            c.prompt = c.prompt.saturating_add_signed(dp);
            c.completion = c.completion.saturating_add_signed(dc);
        }
    }
}

/// The counters in `path` (none when it does not exist), and its stamp.
#[allow(clippy::type_complexity)]
fn read_file(
    path: &Path,
) -> Result<(HashMap<String, Window>, Option<(u64, u64, i64, i64)>), String> {
    match std::fs::read(path) {
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
            Ok((f.sources, stamp(path)))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok((HashMap::new(), None)),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

/// The file's inode, size and modification time.
fn stamp(path: &Path) -> Option<(u64, u64, i64, i64)> {
    use std::os::unix::fs::MetadataExt as _;
    let m = std::fs::metadata(path).ok()?;
    Some((m.ino(), m.size(), m.mtime(), m.mtime_nsec()))
}

/// An exclusive lock on `<path>.lock`, held until dropped (another agent
/// merging at the same moment waits for it).
fn lock_file(path: &Path) -> Result<std::fs::File, String> {
    use std::os::unix::fs::OpenOptionsExt as _;
    make_parent(path)?;
    let lock = path.with_extension("json.lock");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&lock)
        .map_err(|e| format!("{}: {e}", lock.display()))?;
    f.lock().map_err(|e| format!("{}: {e}", lock.display()))?;
    Ok(f)
}

/// Makes `path`'s directory (0700) when it is missing.
fn make_parent(path: &Path) -> Result<(), String> {
    use std::os::unix::fs::DirBuilderExt as _;
    match path.parent() {
        Some(dir) => std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| format!("{}: {e}", dir.display())),
        None => Ok(()),
    }
}

fn write_atomically(path: &Path, file: &File) -> Result<(), String> {
    use std::io::Write as _;
    let text = serde_json::to_vec(file).map_err(|e| e.to_string())?;
    make_parent(path)?;
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

/// Deltas this short (in bytes) are remembered with their count.
const REMEMBERED_LEN: usize = 32;
/// At most this many per thread; all are forgotten when it is reached.
const REMEMBERED: usize = 4096;

thread_local! {
    /// Short texts this thread counted, with their counts: a stream's
    /// deltas are mostly a token each, and mostly the same few thousand.
    static COUNTED: std::cell::RefCell<std::collections::HashMap<Box<str>, u32>> =
        std::cell::RefCell::new(std::collections::HashMap::new());
}

/// Tokens in one streamed delta: [`count`], remembered for short texts on
/// this thread (a runtime worker's; each text's count is its own, so a
/// remembered one is exact). The tokenizer's regex and its rank table are
/// most of what metering a chunk costs, and after the 5–50 ms between two
/// chunks they are out of the CPU's caches.
pub fn count_delta(text: &str) -> u64 {
    if text.len() > REMEMBERED_LEN || BPE.get().is_none() {
        return count(text);
    }
    COUNTED.with_borrow_mut(|counted| {
        if let Some(&n) = counted.get(text) {
            return u64::from(n);
        }
        let n = count(text);
        if counted.len() >= REMEMBERED {
            counted.clear();
        }
        counted.insert(text.into(), u32::try_from(n).unwrap_or(u32::MAX));
        n
    })
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
    fn two_agents_counting_at_once_lose_nothing() {
        // A hitless upgrade: the old agent meters the answers it drains
        // while the new one, started from the file, meters new requests.
        let dir = std::env::temp_dir().join(format!("enforcer-tokens2-{}", std::process::id()));
        let path = dir.join("llm-usage.json");
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        let now = now();
        let old = std::sync::Arc::new(Tokens::open(&path).expect("no file yet"));
        old.add("a", "m", 3600, now, 10, 5);
        rt.block_on(old.flush()).expect("written");
        let new = std::sync::Arc::new(Tokens::open(&path).expect("read"));
        assert_eq!(new.used("a", None, 3600, now).total, 15);
        // Both count; each merges into the file in turn.
        old.add("a", "m", 3600, now, 0, 100);
        new.add("a", "m", 3600, now, 7, 3);
        new.add("b", "m", 3600, now, 1, 1);
        rt.block_on(new.flush()).expect("new merged");
        rt.block_on(old.flush()).expect("old merged");
        assert_eq!(old.used("a", None, 3600, now).total, 125, "old sees new's");
        // The new agent reads the old one's additions without adding any.
        assert!(rt.block_on(new.changed_elsewhere()));
        rt.block_on(new.flush()).expect("read");
        assert_eq!(new.used("a", None, 3600, now).total, 125);
        assert_eq!(new.used("b", None, 3600, now).total, 2);
        assert!(!rt.block_on(new.changed_elsewhere()), "nothing new since");
        // A corrective (negative) addition, and what a restart reads.
        new.add("a", "m", 3600, now, 0, -20);
        rt.block_on(new.flush()).expect("merged");
        let restarted = Tokens::open(&path).expect("read back");
        assert_eq!(restarted.used("a", Some("m"), 3600, now).model, 105);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn additions_to_an_ended_window_are_dropped_and_a_newer_window_replaces() {
        let mut sources = HashMap::new();
        let pending = |start: u64, n: i64| Pending {
            window_secs: 60,
            window_start: start,
            models: HashMap::from([("m".to_owned(), (n, 0))]),
        };
        merge(
            &mut sources,
            &HashMap::from([("a".to_owned(), pending(120, 5))]),
        );
        merge(
            &mut sources,
            &HashMap::from([("a".to_owned(), pending(60, 7))]),
        );
        assert_eq!(sources["a"].window_start, 120);
        assert_eq!(
            sources["a"].models["m"].prompt, 5,
            "the ended window's tokens dropped"
        );
        merge(
            &mut sources,
            &HashMap::from([("a".to_owned(), pending(180, 2))]),
        );
        assert_eq!(sources["a"].window_start, 180);
        assert_eq!(
            sources["a"].models["m"].prompt, 2,
            "a new window starts from zero"
        );
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

    #[test]
    fn a_remembered_delta_counts_as_the_tokenizer_does_and_the_memory_is_bounded() {
        load_tokenizer();
        let texts = [
            " hello",
            "hello world",
            " antidisestablishmentarianism",
            "",
            "é",
            &"x".repeat(REMEMBERED_LEN + 1),
        ];
        for _ in 0..2 {
            for t in texts {
                assert_eq!(count_delta(t), count(t), "{t:?}");
            }
        }
        // Short ones are remembered, a long one is not.
        assert_eq!(COUNTED.with_borrow(|c| c.len()), texts.len() - 1);
        for i in 0..REMEMBERED + 10 {
            let t = format!(" w{i}");
            assert_eq!(count_delta(&t), count(&t));
        }
        assert!(COUNTED.with_borrow(|c| c.len()) <= REMEMBERED);
    }
}
