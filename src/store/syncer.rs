//! Local files made durable and put in place off the threads that wrote them.
//!
//! A file written whole ([`super::ObjectWriter`]) appears under its name only once its data is
//! on disk: `fsync`, then rename. The `fsync` waits for the disk to write the file back (tens
//! of milliseconds for a batch file of megabytes), and on a worker that wait was a core left
//! idle: 0.49 s of the two workers' time in an NDJSON run of the realistic 1 GB export
//! (`docs/performance.md`). A [`Syncer`] does those waits on a thread of its own, one file
//! after the other in the order they were handed over, while the writers go back to work as
//! soon as their bytes are with the kernel. Whoever needs the files in place waits for the
//! syncer to be idle ([`Syncer::wait`]).

use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

type Job = Box<dyn FnOnce() + Send>;

/// Jobs handed over and not finished yet.
#[derive(Default)]
struct Pending {
    count: Mutex<usize>,
    idle: Condvar,
}

impl Pending {
    fn finished_one(&self) {
        let mut count = self.count.lock().unwrap();
        *count -= 1;
        if *count == 0 {
            self.idle.notify_all();
        }
    }
}

/// One thread that finishes files (any job, in fact) in the order they were handed over.
pub struct Syncer {
    queue: Mutex<Option<mpsc::Sender<Job>>>,
    pending: Arc<Pending>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Syncer {
    /// Starts the syncer's thread.
    pub fn new() -> Syncer {
        let (queue, jobs) = mpsc::channel::<Job>();
        let pending = Arc::new(Pending::default());
        let finished = pending.clone();
        let thread = std::thread::Builder::new()
            .name("file-syncer".into())
            .spawn(move || {
                for job in jobs {
                    // A job that panics answers its caller as it unwinds (its report's drop);
                    // the files after it are still finished.
                    let _ = crate::panic_guard::catch(job);
                    finished.finished_one();
                }
            })
            .expect("starting the file syncer's thread");
        Syncer {
            queue: Mutex::new(Some(queue)),
            pending,
            thread: Mutex::new(Some(thread)),
        }
    }

    /// Runs `job` on the syncer's thread after every job handed over before it (here, should
    /// that thread be gone).
    pub fn run(&self, job: impl FnOnce() + Send + 'static) {
        *self.pending.count.lock().unwrap() += 1;
        let job: Job = Box::new(job);
        let refused = match self.queue.lock().unwrap().as_ref() {
            Some(queue) => queue.send(job).err().map(|mpsc::SendError(job)| job),
            None => Some(job),
        };
        if let Some(job) = refused {
            let _ = crate::panic_guard::catch(job);
            self.pending.finished_one();
        }
    }

    /// Waits until every job handed over so far has finished.
    pub fn wait(&self) {
        let count = self.pending.count.lock().unwrap();
        drop(self.pending.idle.wait_while(count, |c| *c > 0).unwrap());
    }
}

impl Default for Syncer {
    fn default() -> Self {
        Syncer::new()
    }
}

impl Drop for Syncer {
    fn drop(&mut self) {
        self.queue.lock().unwrap().take();
        if let Some(thread) = self.thread.lock().unwrap().take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn jobs_run_in_order_and_wait_returns_once_all_are_done() {
        let syncer = Syncer::new();
        let done = Arc::new(Mutex::new(Vec::new()));
        for i in 0..20 {
            let done = done.clone();
            syncer.run(move || {
                std::thread::sleep(Duration::from_millis(if i % 2 == 0 { 5 } else { 0 }));
                done.lock().unwrap().push(i);
            });
        }
        syncer.wait();
        assert_eq!(*done.lock().unwrap(), (0..20).collect::<Vec<_>>());
        // Waiting with nothing pending returns at once.
        syncer.wait();
    }

    #[test]
    fn a_job_that_panics_does_not_stop_the_ones_after_it() {
        let syncer = Syncer::new();
        let done = Arc::new(Mutex::new(0));
        syncer.run(|| panic!("a broken job"));
        let after = done.clone();
        syncer.run(move || *after.lock().unwrap() += 1);
        syncer.wait();
        assert_eq!(*done.lock().unwrap(), 1);
    }

    #[test]
    fn dropping_the_syncer_finishes_what_was_handed_over() {
        let syncer = Syncer::new();
        let done = Arc::new(Mutex::new(0));
        for _ in 0..5 {
            let done = done.clone();
            syncer.run(move || {
                std::thread::sleep(Duration::from_millis(2));
                *done.lock().unwrap() += 1;
            });
        }
        drop(syncer);
        assert_eq!(*done.lock().unwrap(), 5);
    }
}
