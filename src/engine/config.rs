//! How the timely runtime is laid out (workers now; processes and hosts for cluster runs later).
//! Kept in one place so a multi-process run only changes this file.

/// Engine layout for a run.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Worker threads in this process.
    pub workers: usize,
}

impl EngineConfig {
    /// The default: one worker per core.
    pub fn default_workers() -> usize {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    }

    /// The timely configuration for this layout.
    pub fn timely_config(&self) -> timely::Config {
        if self.workers <= 1 {
            timely::Config::thread()
        } else {
            timely::Config::process(self.workers)
        }
    }
}
