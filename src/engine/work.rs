//! The work a run's sources share: the bundles left to read, in order, and the tasks they
//! belong to. A stream (a compressed file, a CSV, an S3 object) is read one bundle at a time by
//! whichever worker holds it, which hands it back to the front of the queue before processing
//! its bundle: every core processes the bundles of one large stream, and lines keep their
//! numbers because the stream is still read in order.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use super::rows::TaskContext;
use crate::input::bundles::WorkItem;

/// The bundles left to read and the tasks they belong to.
pub struct WorkQueue {
    queue: Mutex<Queue>,
    pub tasks: Vec<TaskContext>,
    task_by_resource: HashMap<String, u32>,
}

struct Queue {
    items: VecDeque<WorkItem>,
    /// Streams a worker is reading a bundle of, which come back unless they ended.
    streams_in_hand: usize,
}

/// What a worker finds in the queue.
pub enum Taken {
    Item(WorkItem),
    /// Nothing now, but a stream being read will come back.
    Later,
    /// Nothing left.
    Empty,
}

impl WorkQueue {
    /// The queue of `work` for `tasks`.
    pub fn new(work: Vec<WorkItem>, tasks: Vec<TaskContext>) -> WorkQueue {
        let task_by_resource = tasks
            .iter()
            .flat_map(|t| {
                std::iter::once(&t.resource_type)
                    .chain(&t.more_resource_types)
                    .map(|r| (r.clone(), t.task))
            })
            .collect();
        WorkQueue {
            queue: Mutex::new(Queue {
                items: work.into(),
                streams_in_hand: 0,
            }),
            tasks,
            task_by_resource,
        }
    }

    /// The next item; a stream taken counts as in hand until given back or finished.
    pub fn take(&self) -> Taken {
        let mut queue = self.queue.lock().unwrap();
        match queue.items.pop_front() {
            Some(item) => {
                if item.is_stream() {
                    queue.streams_in_hand += 1;
                }
                Taken::Item(item)
            }
            None if queue.streams_in_hand > 0 => Taken::Later,
            None => Taken::Empty,
        }
    }

    /// Puts an item taken back at the front (a stream with bundles left, or an item that
    /// waits for memory).
    pub fn give_back(&self, item: WorkItem) {
        let mut queue = self.queue.lock().unwrap();
        if item.is_stream() {
            queue.streams_in_hand -= 1;
        }
        queue.items.push_front(item);
    }

    /// A stream taken has ended (or could not be opened).
    pub fn stream_finished(&self) {
        self.queue.lock().unwrap().streams_in_hand -= 1;
    }

    /// Applies `f` to every item left, for estimates.
    pub fn for_each(&self, mut f: impl FnMut(&WorkItem)) {
        self.queue.lock().unwrap().items.iter().for_each(&mut f);
    }

    /// The task that reads a resource type.
    pub fn task_for(&self, resource_type: &str) -> Option<&TaskContext> {
        self.task_by_resource
            .get(resource_type)
            .map(|&i| &self.tasks[i as usize])
    }
}

/// A table batch cut by its sink, to be encoded and written by whichever worker is free: the
/// sink of a table cuts its batches in order (`--batch-size`, dedup by id), and every worker
/// helps write them, so one large table keeps every core busy.
pub struct WriteJob {
    /// The table it writes, for the message if it panics.
    pub table: String,
    pub run: Box<dyn FnOnce() + Send>,
}

/// The batches cut and not yet taken by a worker.
#[derive(Default)]
pub struct WriteJobs {
    jobs: Mutex<VecDeque<WriteJob>>,
}

impl WriteJobs {
    pub fn push(&self, job: WriteJob) {
        self.jobs.lock().unwrap().push_back(job);
    }

    /// The oldest job, if any.
    pub fn take(&self) -> Option<WriteJob> {
        self.jobs.lock().unwrap().pop_front()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::input::InputFile;
    use crate::store::ObjectLocation;

    fn stream() -> WorkItem {
        let root = ObjectLocation::local(std::path::Path::new("/input")).unwrap();
        let file = InputFile {
            object: root.object("Patient.ndjson.gz"),
            resource_type: "Patient".into(),
            size: 1,
        };
        WorkItem::Stream {
            file: Arc::new(file),
        }
    }

    #[test]
    fn a_stream_in_hand_keeps_workers_waiting_until_it_ends() {
        let work = WorkQueue::new(vec![stream()], Vec::new());
        let Taken::Item(item) = work.take() else {
            panic!("the stream is there")
        };
        // Another worker finds nothing yet, but is not done: the stream comes back.
        assert!(matches!(work.take(), Taken::Later));
        work.give_back(item);
        let Taken::Item(_) = work.take() else {
            panic!("the stream came back")
        };
        work.stream_finished();
        assert!(matches!(work.take(), Taken::Empty));
    }
}
