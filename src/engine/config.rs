//! How the timely runtime is laid out: worker threads in this process and, for a cluster run,
//! the processes it is one of (`docs/cluster.md`). Timely's own argument parsing is compiled
//! out of our build, so the communication layer is built here from our flags.

use std::any::Any;
use std::time::Duration;

use anyhow::{Result, anyhow};
use timely::communication::allocator::ProcessBuilder;
use timely::communication::allocator::zero_copy::initialize::initialize_networking_from_sockets;
use timely::communication::{AllocatorBuilder, Hooks};

use super::cluster;

/// Engine layout for a run.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Worker threads in this process.
    pub workers: usize,
    /// The processes of a cluster run (None: this process alone).
    pub cluster: Option<ClusterConfig>,
}

/// One process's view of a cluster run.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// `host:port` of every process, in process order (a timely hostfile's lines).
    pub addresses: Vec<String>,
    /// This process's place in `addresses`.
    pub process: usize,
    /// How long to wait for every other process to connect.
    pub connect_timeout: Duration,
}

impl EngineConfig {
    /// The default: one worker per core.
    pub fn default_workers() -> usize {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    }

    /// This process's index and the number of processes.
    pub fn process(&self) -> (usize, usize) {
        match &self.cluster {
            Some(c) => (c.process, c.addresses.len()),
            None => (0, 1),
        }
    }

    /// The communication layer of this layout, connected: one allocator per worker thread, and
    /// what must live as long as they do. A cluster process connects to every other one first,
    /// waiting at most the connect timeout.
    pub fn allocators(&self) -> Result<(Vec<AllocatorBuilder>, Box<dyn Any + Send>)> {
        let threads = self.workers.max(1);
        let Some(cluster) = &self.cluster else {
            let config = match threads {
                1 => timely::CommunicationConfig::Thread,
                n => timely::CommunicationConfig::Process(n),
            };
            return config.try_build().map_err(|e| anyhow!(e));
        };
        let sockets =
            cluster::connect(&cluster.addresses, cluster.process, cluster.connect_timeout)?;
        let hooks = Hooks::default();
        let local = ProcessBuilder::new_typed_vector(threads, hooks.refill.clone(), None);
        let (builders, guard) =
            initialize_networking_from_sockets(local, sockets, cluster.process, threads, hooks)?;
        Ok((
            builders.into_iter().map(AllocatorBuilder::Tcp).collect(),
            Box::new(guard),
        ))
    }
}
