//! The service's record of sessions by id: each session's events, kept so that any number of
//! listeners — the upload's own response, `GET /sessions/{id}/events` — can follow it from any
//! point (`Last-Event-ID`), even when they arrive before the upload starts or a while after it
//! ended.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use streamdet_actors::actors::Event;
use tokio::sync::Notify;

/// How long a finished session's events, or a watch that no upload joined, stay available.
const RETENTION: Duration = Duration::from_secs(300);

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
}

struct LogState {
    stage: Stage,
    events: Vec<Event>,
    since: Instant,
}

impl SessionLog {
    fn new(stage: Stage) -> Arc<Self> {
        Arc::new(SessionLog {
            state: Mutex::new(LogState { stage, events: Vec::new(), since: Instant::now() }),
            changed: Notify::new(),
            cancel: Mutex::new(None),
        })
    }

    fn lock(&self) -> MutexGuard<'_, LogState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends an event; the last one (`end` or `error`) finishes the log.
    pub fn push(&self, event: Event) {
        let mut state = self.lock();
        if state.stage == Stage::Finished {
            return;
        }
        if event.is_last() {
            state.stage = Stage::Finished;
            state.since = Instant::now();
        }
        state.events.push(event);
        drop(state);
        self.changed.notify_waiters();
    }

    /// How to end the session this log records (used at shutdown).
    pub fn set_cancel(&self, cancel: impl Fn() + Send + Sync + 'static) {
        *self.cancel.lock().unwrap_or_else(|p| p.into_inner()) = Some(Box::new(cancel));
    }

    /// Ends the log with an error event unless it already ended.
    pub fn close(&self, code: &str, message: &str) {
        self.push(Event::error(code, message));
    }

    /// The event at `index`, waiting for it; `None` once the log finished before it.
    pub async fn next(&self, index: usize) -> Option<Event> {
        loop {
            // Registered before the check, so a push between the check and the wait wakes it.
            let notified = self.changed.notified();
            {
                let state = self.lock();
                if let Some(event) = state.events.get(index) {
                    return Some(event.clone());
                }
                if state.stage == Stage::Finished {
                    return None;
                }
            }
            notified.await;
        }
    }
}

/// Why an id cannot start an upload.
#[derive(Debug, PartialEq, Eq)]
pub struct InUse;

#[derive(Default)]
pub struct Registry {
    logs: Mutex<HashMap<String, Arc<SessionLog>>>,
}

impl Registry {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, Arc<SessionLog>>> {
        self.logs.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn expire(logs: &mut HashMap<String, Arc<SessionLog>>) {
        logs.retain(|_, log| {
            let state = log.lock();
            state.stage == Stage::Live || state.since.elapsed() < RETENTION
        });
    }

    /// The log an upload with `id` writes to: a new one, or the one a watcher is waiting on.
    /// A live session with the same id is a conflict.
    pub fn start(&self, id: &str) -> Result<Arc<SessionLog>, InUse> {
        let mut logs = self.lock();
        Self::expire(&mut logs);
        if let Some(log) = logs.get(id) {
            let mut state = log.lock();
            match state.stage {
                Stage::Live => return Err(InUse),
                Stage::Waiting => {
                    state.stage = Stage::Live;
                    return Ok(Arc::clone(log));
                }
                Stage::Finished => {}
            }
        }
        let log = SessionLog::new(Stage::Live);
        logs.insert(id.to_string(), Arc::clone(&log));
        Ok(log)
    }

    /// Ends every running session (each then reports its own error event).
    pub fn cancel_live(&self) {
        for log in self.lock().values() {
            let live = log.lock().stage == Stage::Live;
            if live {
                if let Some(cancel) = log.cancel.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
                    cancel();
                }
            }
        }
    }

    /// The log to follow for `id`, waiting for an upload if none has started.
    pub fn watch(&self, id: &str) -> Arc<SessionLog> {
        let mut logs = self.lock();
        Self::expire(&mut logs);
        Arc::clone(logs.entry(id.to_string()).or_insert_with(|| SessionLog::new(Stage::Waiting)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(index: u64) -> Event {
        Event::Frame { index, pts: 0.0, detections: vec![] }
    }

    #[actix_rt::test]
    async fn listeners_follow_from_any_point_and_stop_at_the_end() {
        let registry = Registry::default();
        let watched = registry.watch("abcdefgh");
        let log = registry.start("abcdefgh").expect("a watch does not block the upload");
        assert!(Arc::ptr_eq(&watched, &log));
        assert!(matches!(registry.start("abcdefgh"), Err(InUse)), "a live id is in use");
        log.push(frame(0));
        log.push(frame(1));
        let waiter = actix_rt::spawn({
            let log = Arc::clone(&log);
            async move { log.next(2).await }
        });
        log.push(Event::error("truncated", "cut"));
        assert!(matches!(waiter.await.unwrap(), Some(Event::Error { .. })));
        assert_eq!(log.next(1).await, Some(frame(1)), "replay from an earlier point");
        assert_eq!(log.next(3).await, None, "nothing after the last event");
        log.push(frame(9));
        assert_eq!(log.next(3).await, None, "a finished log takes nothing more");
        assert!(registry.start("abcdefgh").is_ok(), "a finished session's id can be used again");
    }
}
