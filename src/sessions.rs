//! The service's record of sessions by id: each session's events, kept so that any number of
//! listeners — the upload's own response, `GET /sessions/{id}/events` — can follow it from any
//! point (`Last-Event-ID`), even when they arrive before the upload starts or a while after it
//! ended.
//!
//! Everything here that a client can make grow has a bound: the number of ids remembered, the
//! watchers per session and in total, the bytes of events a session keeps, and how long an id
//! waits for its upload.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use streamdet_actors::ErrorCode;
use streamdet_actors::actors::Event;
use streamdet_actors::annotate::{AnnotatedVideo, VideoFile};
use tokio::sync::Notify;

/// The bounds of a [`Registry`].
#[derive(Debug, Clone)]
pub struct RegistryLimits {
    /// Ids remembered at once (running, waited for, finished and replayable).
    pub max_entries: usize,
    pub max_watchers_per_session: usize,
    pub max_watchers: usize,
    /// How long a watched id waits for an upload to claim it.
    pub watch_wait: Duration,
    /// How long a finished session's events stay available, its id reserved.
    pub retention: Duration,
    /// Bytes of events a session keeps; the oldest frames go first.
    pub max_log_bytes: usize,
}

impl Default for RegistryLimits {
    fn default() -> Self {
        RegistryLimits {
            max_entries: 1024,
            max_watchers_per_session: 8,
            max_watchers: 256,
            watch_wait: Duration::from_secs(30),
            retention: Duration::from_secs(300),
            max_log_bytes: 8 << 20,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Someone is watching; no upload has claimed the id yet.
    Waiting,
    Live,
    Finished,
}

/// One session's events so far.
pub struct SessionLog {
    state: Mutex<LogState>,
    changed: Notify,
    /// Ends the running session (set by whoever started it).
    cancel: Mutex<Option<Box<dyn Fn() + Send + Sync>>>,
    /// Watchers following this log through `GET /sessions/{id}/events`.
    watchers: AtomicUsize,
    max_bytes: usize,
}

struct LogState {
    stage: Stage,
    /// Event 0 (`start`, or an early error), kept whatever the size.
    first: Option<Event>,
    /// Events `tail_start..`, in order; the last one is always kept.
    tail: VecDeque<(Event, usize)>,
    tail_start: usize,
    tail_bytes: usize,
    since: Instant,
}

impl LogState {
    fn len(&self) -> usize {
        if self.first.is_none() { 0 } else { self.tail_start + self.tail.len() }
    }
}

/// The approximate memory an event holds in the log: its JSON size.
fn event_bytes(event: &Event) -> usize {
    serde_json::to_vec(event).map_or(0, |v| v.len()) + std::mem::size_of::<Event>()
}

impl SessionLog {
    fn new(stage: Stage, max_bytes: usize) -> Arc<Self> {
        Arc::new(SessionLog {
            state: Mutex::new(LogState { stage, first: None, tail: VecDeque::new(), tail_start: 1, tail_bytes: 0, since: Instant::now() }),
            changed: Notify::new(),
            cancel: Mutex::new(None),
            watchers: AtomicUsize::new(0),
            max_bytes,
        })
    }

    fn lock(&self) -> MutexGuard<'_, LogState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends an event; the last one (`end` or `error`) finishes the log. Past the byte bound
    /// the oldest events after the first are dropped: a listener that far behind skips them.
    pub fn push(&self, event: Event) {
        let mut state = self.lock();
        if state.stage == Stage::Finished {
            return;
        }
        if event.is_last() {
            state.stage = Stage::Finished;
            state.since = Instant::now();
        }
        if state.first.is_none() {
            state.first = Some(event);
        } else {
            let size = event_bytes(&event);
            state.tail_bytes += size;
            state.tail.push_back((event, size));
            while state.tail_bytes > self.max_bytes && state.tail.len() > 1 {
                if let Some((_, size)) = state.tail.pop_front() {
                    state.tail_bytes -= size;
                    state.tail_start += 1;
                }
            }
        }
        drop(state);
        self.changed.notify_waiters();
    }

    /// How to end the session this log records (used at shutdown).
    pub fn set_cancel(&self, cancel: impl Fn() + Send + Sync + 'static) {
        *self.cancel.lock().unwrap_or_else(|p| p.into_inner()) = Some(Box::new(cancel));
    }

    /// Ends the log with an error event unless it already ended.
    pub fn close(&self, code: ErrorCode, message: &str) {
        self.push(Event::error(code, message));
    }

    /// The event at `index` or, when it was dropped, the first one kept after it, with its
    /// index; waits for it. `None` once the log finished before it.
    pub async fn next(&self, index: usize) -> Option<(usize, Event)> {
        loop {
            // Registered before the check, so a push between the check and the wait wakes it.
            let notified = self.changed.notified();
            {
                let state = self.lock();
                if index == 0 {
                    if let Some(first) = &state.first {
                        return Some((0, first.clone()));
                    }
                } else if index < state.len() {
                    let at = index.max(state.tail_start);
                    return state.tail.get(at - state.tail_start).map(|(event, _)| (at, event.clone()));
                }
                if state.stage == Stage::Finished {
                    return None;
                }
            }
            notified.await;
        }
    }

    /// Whether an upload has claimed this log.
    pub fn claimed(&self) -> bool {
        self.lock().stage != Stage::Waiting
    }
}

/// A watcher's place on a log; leaving frees it.
pub struct WatchSlot {
    log: Arc<SessionLog>,
    total: Arc<AtomicUsize>,
}

impl WatchSlot {
    pub fn log(&self) -> &Arc<SessionLog> {
        &self.log
    }
}

impl Drop for WatchSlot {
    fn drop(&mut self) {
        self.log.watchers.fetch_sub(1, Ordering::AcqRel);
        self.total.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Why an id cannot start an upload or be watched.
#[derive(Debug, PartialEq, Eq)]
pub enum Refused {
    /// The id belongs to a running session, or a finished one still in its replay window.
    InUse,
    /// A bound of the registry is reached.
    Full(&'static str),
}

pub struct Registry {
    logs: Mutex<HashMap<String, Arc<SessionLog>>>,
    watchers: Arc<AtomicUsize>,
    limits: RegistryLimits,
}

impl Registry {
    pub fn new(limits: RegistryLimits) -> Self {
        Registry { logs: Mutex::new(HashMap::new()), watchers: Arc::new(AtomicUsize::new(0)), limits }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Arc<SessionLog>>> {
        self.logs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Forgets finished sessions past their retention and watched ids that no upload claimed
    /// in time and nobody watches any more.
    fn expire(&self, logs: &mut HashMap<String, Arc<SessionLog>>) {
        logs.retain(|_, log| {
            let state = log.lock();
            match state.stage {
                Stage::Live => true,
                Stage::Finished => state.since.elapsed() < self.limits.retention,
                Stage::Waiting => log.watchers.load(Ordering::Acquire) > 0 || state.since.elapsed() < self.limits.watch_wait,
            }
        });
    }

    /// The log an upload with `id` writes to: a new one, or the one a watcher is waiting on.
    /// A running session with the same id, or a finished one still replayable, is a conflict.
    pub fn start(&self, id: &str) -> Result<Arc<SessionLog>, Refused> {
        let mut logs = self.lock();
        self.expire(&mut logs);
        if let Some(log) = logs.get(id) {
            let mut state = log.lock();
            return match state.stage {
                Stage::Live | Stage::Finished => Err(Refused::InUse),
                Stage::Waiting => {
                    state.stage = Stage::Live;
                    Ok(Arc::clone(log))
                }
            };
        }
        if logs.len() >= self.limits.max_entries {
            return Err(Refused::Full("sessions"));
        }
        let log = SessionLog::new(Stage::Live, self.limits.max_log_bytes);
        logs.insert(id.to_string(), Arc::clone(&log));
        Ok(log)
    }

    /// Ends every running session (each then reports its own error event).
    pub fn cancel_live(&self) {
        for log in self.lock().values() {
            let live = log.lock().stage == Stage::Live;
            if let Some(cancel) = log.cancel.lock().unwrap_or_else(|p| p.into_inner()).as_ref().filter(|_| live) {
                cancel();
            }
        }
    }

    /// A place on the log of `id`, which waits for an upload if none has started.
    pub fn watch(&self, id: &str) -> Result<WatchSlot, Refused> {
        let mut logs = self.lock();
        self.expire(&mut logs);
        if !logs.contains_key(id) && logs.len() >= self.limits.max_entries {
            return Err(Refused::Full("sessions"));
        }
        if self.watchers.fetch_add(1, Ordering::AcqRel) >= self.limits.max_watchers {
            self.watchers.fetch_sub(1, Ordering::AcqRel);
            return Err(Refused::Full("watchers"));
        }
        let log = Arc::clone(logs.entry(id.to_string()).or_insert_with(|| SessionLog::new(Stage::Waiting, self.limits.max_log_bytes)));
        if log.watchers.fetch_add(1, Ordering::AcqRel) >= self.limits.max_watchers_per_session {
            log.watchers.fetch_sub(1, Ordering::AcqRel);
            self.watchers.fetch_sub(1, Ordering::AcqRel);
            return Err(Refused::Full("watchers of this session"));
        }
        Ok(WatchSlot { log, total: Arc::clone(&self.watchers) })
    }

    /// Forgets what is past its time now (finished sessions' files go with them), as every
    /// `start` and `watch` also does.
    pub fn expire_now(&self) {
        let mut logs = self.lock();
        self.expire(&mut logs);
    }

    /// The annotated video of a finished session still in its replay window.
    pub fn video(&self, id: &str) -> Option<VideoFile> {
        let mut logs = self.lock();
        self.expire(&mut logs);
        let state = logs.get(id)?.lock();
        match state.tail.back().map(|(event, _)| event).or(state.first.as_ref()) {
            Some(Event::End { video: Some(AnnotatedVideo::Written { file, .. }), .. }) => Some(file.clone()),
            _ => None,
        }
    }

    /// Watchers connected now.
    pub fn watchers(&self) -> usize {
        self.watchers.load(Ordering::Acquire)
    }

    /// How long a watch waits for its upload.
    pub fn watch_wait(&self) -> Duration {
        self.limits.watch_wait
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(index: u64) -> Event {
        Event::Frame { index, pts: 0.0, detections: vec![] }
    }

    const ID: &str = "abcdefgh-0123456";

    #[actix_rt::test]
    async fn listeners_follow_from_any_point_and_stop_at_the_end() {
        let registry = Registry::new(RegistryLimits::default());
        let watched = registry.watch(ID).expect("room for a watcher");
        let log = registry.start(ID).expect("a watch does not block the upload");
        assert!(Arc::ptr_eq(watched.log(), &log));
        assert_eq!(registry.start(ID).err(), Some(Refused::InUse), "a live id is in use");
        log.push(frame(0));
        log.push(frame(1));
        let waiter = actix_rt::spawn({
            let log = Arc::clone(&log);
            async move { log.next(2).await }
        });
        log.push(Event::error(ErrorCode::Truncated, "cut"));
        assert!(matches!(waiter.await.unwrap(), Some((2, Event::Error { .. }))));
        assert_eq!(log.next(1).await, Some((1, frame(1))), "replay from an earlier point");
        assert_eq!(log.next(3).await, None, "nothing after the last event");
        assert_eq!(log.next(usize::MAX).await, None, "an absurd index replays nothing");
        log.push(frame(9));
        assert_eq!(log.next(3).await, None, "a finished log takes nothing more");
        assert_eq!(registry.start(ID).err(), Some(Refused::InUse), "a finished id stays reserved for its replay window");
    }

    #[actix_rt::test]
    async fn the_replay_log_keeps_the_first_and_last_events_within_its_bound() {
        let registry = Registry::new(RegistryLimits { max_log_bytes: 4096, ..Default::default() });
        let log = registry.start(ID).unwrap();
        for i in 0..10_000 {
            log.push(frame(i));
        }
        log.push(Event::error(ErrorCode::Timeout, "the end"));
        let state_bytes = log.lock().tail_bytes;
        assert!(state_bytes <= 4096, "{state_bytes} bytes kept");
        assert_eq!(log.next(0).await, Some((0, frame(0))), "the first event stays");
        let (skipped_to, _) = log.next(1).await.expect("a later event");
        assert!(skipped_to > 1000, "a listener far behind skips to what is kept ({skipped_to})");
        assert!(matches!(log.next(10_000).await, Some((10_000, Event::Error { .. }))), "the last event stays");
    }

    #[actix_rt::test]
    async fn watchers_and_ids_have_bounds_and_unclaimed_watches_expire() {
        let limits =
            RegistryLimits { max_entries: 2, max_watchers_per_session: 2, max_watchers: 3, watch_wait: Duration::from_millis(50), ..Default::default() };
        let registry = Registry::new(limits);
        let a = registry.watch("aaaaaaaaaaaaaaaa").unwrap();
        let _a2 = registry.watch("aaaaaaaaaaaaaaaa").unwrap();
        assert_eq!(registry.watch("aaaaaaaaaaaaaaaa").err(), Some(Refused::Full("watchers of this session")));
        let _b = registry.watch("bbbbbbbbbbbbbbbb").unwrap();
        assert_eq!(registry.watch("bbbbbbbbbbbbbbbb").err(), Some(Refused::Full("watchers")));
        assert_eq!(registry.start("cccccccccccccccc").err(), Some(Refused::Full("sessions")));
        assert_eq!(registry.watchers(), 3);
        drop(a);
        drop(_a2);
        drop(_b);
        assert_eq!(registry.watchers(), 0, "leaving frees the places");
        std::thread::sleep(Duration::from_millis(60));
        assert!(registry.start("cccccccccccccccc").is_ok(), "unwatched, unclaimed ids expire");
    }
}
