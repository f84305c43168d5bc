//! Memory accounting below every layer that holds rows: the run's global budget, with its
//! back-pressure and the memory held for the whole run, and how sizes are written in messages.

pub mod budget;
pub mod buffer_pool;

pub use budget::{HeldMemory, MemoryBudget, Reservation, physical_memory};
pub use buffer_pool::Recycler;

/// `1.5 MiB`-style sizes for messages.
pub fn human_bytes(n: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1024.0 && i < units.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", units[i])
    }
}
