//! Durability off a build's critical path.
//!
//! A build step's layer blob must be fsynced before it is visible under its digest, and a cache
//! record must not name a blob that a crash could lose. Neither has to hold up the next step,
//! which reads the step's snapshot, not its blob. [`Durable`] hands both to one background
//! thread that works in queue order: it fsyncs each queued blob and renames it into place
//! (one directory fsync per batch), then runs the actions queued after it (the cache-index
//! writes naming it). [`Durable::flush`] waits for everything queued; a build calls it before
//! anything outside the build (an image record, an export) may refer to its blobs.
//!
//! Invariants:
//! - a blob is visible under its digest only after its fsync, as for [`crate::content`];
//! - an action runs only after every blob queued before it is durable and visible, and no action
//!   runs once a blob has failed (the failure is reported by the next flush);
//! - dropping a [`Durable`] finishes the queue, so no blob or action outlives it half-done.

use std::path::PathBuf;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Mutex;
use std::thread::JoinHandle;

use crate::content::{ContentError, Unsynced};
use crate::paths::sync_dir_of;

/// An action that must follow the blobs queued before it.
type Action = Box<dyn FnOnce() -> Result<(), BoxError> + Send>;
type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A failure of the background work, reported by [`Durable::flush`].
#[derive(Debug, thiserror::Error)]
pub enum DurableError {
    #[error("failed to store a layer blob")]
    Blob(#[source] ContentError),
    #[error(transparent)]
    Action(BoxError),
}

enum Job {
    Blob(Unsynced),
    Then(Action),
    Flush(Sender<Option<DurableError>>),
}

/// The background writer of one build. See the module docs.
pub struct Durable {
    tx: Mutex<Option<Sender<Job>>>,
    worker: Mutex<Option<JoinHandle<()>>>,
    /// The queue's state when there is no worker (it never started, or it died): jobs then run
    /// on the caller's thread, and a failure still holds back later actions and reaches flush.
    inline: Mutex<State>,
}

impl std::fmt::Debug for Durable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Durable").finish_non_exhaustive()
    }
}

impl Default for Durable {
    fn default() -> Durable {
        Durable::new()
    }
}

impl Durable {
    /// Starts the writer thread. Should the thread not start, every call does its work inline.
    pub fn new() -> Durable {
        let (tx, rx) = mpsc::channel();
        let worker = std::thread::Builder::new()
            .name("kiln-durable".into())
            .spawn(move || work(rx))
            .ok();
        Durable {
            tx: Mutex::new(worker.as_ref().map(|_| tx)),
            worker: Mutex::new(worker),
            inline: Mutex::new(State::default()),
        }
    }

    /// Queues `blob` to be fsynced and renamed into place.
    pub fn commit(&self, blob: Unsynced) {
        self.send(Job::Blob(blob));
    }

    /// Queues `action` to run once every blob queued so far is durable. It is skipped when one
    /// of them failed.
    pub fn then(&self, action: impl FnOnce() -> Result<(), BoxError> + Send + 'static) {
        self.send(Job::Then(Box::new(action)));
    }

    /// Waits until everything queued so far is done. Returns the first failure since the last
    /// flush; after a failure, later actions stay skipped.
    pub fn flush(&self) -> Result<(), DurableError> {
        let (tx, rx) = mpsc::channel();
        self.send(Job::Flush(tx));
        match rx.recv() {
            Ok(None) => Ok(()),
            Ok(Some(e)) => Err(e),
            // The worker died (a panicking action): its queue is lost. Say so, or a build
            // would report success for records it never wrote.
            Err(_) => Err(DurableError::Action("the background writer stopped".into())),
        }
    }

    fn send(&self, job: Job) {
        let (job, worker_died) = {
            let mut guard = match self.tx.lock() {
                Ok(g) => g,
                Err(p) => p.into_inner(),
            };
            match guard.as_ref() {
                Some(tx) => match tx.send(job) {
                    Ok(()) => return,
                    Err(mpsc::SendError(job)) => {
                        // Its queue went with it: nothing queued later may be trusted.
                        guard.take();
                        (job, true)
                    }
                },
                None => (job, false),
            }
        };
        // No worker: do it here, in order (the caller's thread is the queue).
        let mut state = self.inline.lock().unwrap_or_else(|p| p.into_inner());
        if worker_died {
            state.fail(DurableError::Action("the background writer stopped".into()));
        }
        state.run(vec![job]);
    }
}

impl Drop for Durable {
    fn drop(&mut self) {
        if let Ok(mut tx) = self.tx.lock() {
            tx.take();
        }
        if let Some(worker) = self.worker.lock().ok().and_then(|mut w| w.take()) {
            let _ = worker.join();
        }
    }
}

#[derive(Default)]
struct State {
    /// The first failure not yet reported by a flush.
    failure: Option<DurableError>,
    /// Set by the first failure: actions are skipped from then on.
    poisoned: bool,
}

impl State {
    /// Runs a batch of jobs: blobs first (the batch's renames persisted by one directory fsync),
    /// then actions and flushes in queue order. Every action and flush in the batch was queued
    /// after the batch's first blob or later, so finishing all blobs first keeps the order
    /// promise.
    fn run(&mut self, batch: Vec<Job>) {
        let mut renamed: Option<PathBuf> = None;
        let mut rest = Vec::new();
        let mut blobs = Vec::new();
        for job in batch {
            match job {
                // Dropped when poisoned: its temp file is removed. The same content durable
                // already: nothing to sync.
                Job::Blob(blob) if self.poisoned || blob.already_stored() => drop(blob),
                Job::Blob(blob) => blobs.push(blob),
                other => rest.push(other),
            }
        }
        // The batch's blobs are fsynced side by side, then renamed in queue order.
        for synced in crate::content::sync_side_by_side(blobs) {
            if self.poisoned {
                continue;
            }
            let committed = synced.and_then(|staged| {
                let dest = staged.dest().to_path_buf();
                staged.commit_unsynced_dir().map(|(_, r)| r.then_some(dest))
            });
            match committed {
                Ok(Some(dest)) => renamed = Some(dest),
                Ok(None) => {}
                Err(e) => self.fail(DurableError::Blob(e)),
            }
        }
        if let Some(dest) = renamed {
            sync_dir_of(&dest);
        }
        for job in rest {
            match job {
                Job::Then(action) => {
                    if !self.poisoned {
                        if let Err(e) = action() {
                            self.fail(DurableError::Action(e));
                        }
                    }
                }
                Job::Flush(reply) => {
                    let _ = reply.send(self.failure.take());
                }
                Job::Blob(_) => {}
            }
        }
    }

    fn fail(&mut self, e: DurableError) {
        self.poisoned = true;
        if self.failure.is_none() {
            self.failure = Some(e);
        }
    }
}

fn work(rx: Receiver<Job>) {
    let mut state = State::default();
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        batch.extend(rx.try_iter());
        state.run(batch);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::content::ContentStore;
    use std::io::Write;
    use std::sync::Arc;

    fn unsynced(store: &ContentStore, data: &[u8]) -> Unsynced {
        let mut w = store.writer().unwrap();
        w.write_all(data).unwrap();
        w.finish_unsynced(None).unwrap()
    }

    #[test]
    fn blobs_appear_in_order_before_the_actions_queued_after_them() {
        let dir = tempfile::tempdir().unwrap();
        let store = ContentStore::at(dir.path()).unwrap();
        let durable = Durable::new();
        let mut seen = Vec::new();
        let log = Arc::new(Mutex::new(Vec::new()));
        for i in 0..20u32 {
            let blob = unsynced(&store, format!("blob {i}").as_bytes());
            let digest = blob.digest();
            assert!(!store.contains(&digest), "visible before its fsync");
            durable.commit(blob);
            let (store, log) = (store.clone(), log.clone());
            durable.then(move || {
                // The blob queued before this action is in place when it runs.
                log.lock().unwrap().push((i, store.contains(&digest)));
                Ok(())
            });
            seen.push(digest);
        }
        durable.flush().unwrap();
        assert_eq!(
            *log.lock().unwrap(),
            (0..20).map(|i| (i, true)).collect::<Vec<_>>()
        );
        for d in &seen {
            assert!(store.contains(d));
        }
        assert_eq!(std::fs::read_dir(store.ingest_dir()).unwrap().count(), 0);
    }

    #[test]
    fn a_failed_action_is_reported_and_stops_later_actions() {
        let durable = Durable::new();
        let ran = Arc::new(Mutex::new(Vec::new()));
        durable.then(|| Err("index full".into()));
        let r = ran.clone();
        durable.then(move || {
            r.lock().unwrap().push(1);
            Ok(())
        });
        let err = durable.flush().unwrap_err();
        assert_eq!(err.to_string(), "index full");
        assert!(ran.lock().unwrap().is_empty());
        // Reported once; the queue goes on being drained.
        durable.flush().unwrap();
    }

    #[test]
    fn after_the_worker_dies_no_action_runs_and_flush_fails() {
        let durable = Durable::new();
        durable.then(|| panic!("an action panics"));
        assert!(durable.flush().is_err());
        let ran = Arc::new(Mutex::new(false));
        let r = ran.clone();
        durable.then(move || {
            *r.lock().unwrap() = true;
            Ok(())
        });
        assert!(durable.flush().is_err());
        assert!(!*ran.lock().unwrap(), "a record after a lost queue was written");
    }

    #[test]
    fn a_blob_already_stored_is_dropped_and_drop_finishes_the_queue() {
        let dir = tempfile::tempdir().unwrap();
        let store = ContentStore::at(dir.path()).unwrap();
        let first = unsynced(&store, b"same");
        let digest = first.digest();
        let second = unsynced(&store, b"same");
        {
            let durable = Durable::new();
            durable.commit(first);
            durable.commit(second);
        }
        assert!(store.contains(&digest));
        assert_eq!(std::fs::read(store.path(&digest)).unwrap(), b"same");
        assert_eq!(std::fs::read_dir(store.ingest_dir()).unwrap().count(), 0);
    }
}
