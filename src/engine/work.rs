//! The work a run's sources share: the bundles left to read, in order, and the tasks they
//! belong to.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use super::rows::TaskContext;
use crate::input::bundles::WorkItem;

/// The bundles left to read and the tasks they belong to.
pub struct WorkQueue {
    pub queue: Mutex<VecDeque<WorkItem>>,
    pub tasks: Vec<TaskContext>,
    task_by_resource: HashMap<String, u32>,
}

impl WorkQueue {
    /// The queue of `work` for `tasks`.
    pub fn new(work: Vec<WorkItem>, tasks: Vec<TaskContext>) -> WorkQueue {
        let task_by_resource = tasks
            .iter()
            .map(|t| (t.resource_type.clone(), t.task))
            .collect();
        WorkQueue {
            queue: Mutex::new(work.into()),
            tasks,
            task_by_resource,
        }
    }

    /// The task that reads a resource type.
    pub fn task_for(&self, resource_type: &str) -> Option<&TaskContext> {
        self.task_by_resource
            .get(resource_type)
            .map(|&i| &self.tasks[i as usize])
    }
}
