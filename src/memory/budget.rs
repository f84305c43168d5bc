//! One byte budget for the whole process. Sources reserve before they read a bundle and the table
//! sinks release after the rows are written, so input is only read as fast as it is written.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::buffer_pool::{BufferPool, Recycler};
use super::human_bytes;

/// Memory one owner holds for the whole run outside any reservation (the codebook's id
/// mappings, the Delta tables' routing keys). It grows with the input, not with the batch, so
/// the budget leaves that much less room for rows in flight. Clones share one count.
#[derive(Clone, Default, Debug)]
pub struct HeldMemory(Arc<AtomicU64>);

impl HeldMemory {
    /// Replaces the count (an owner that measures itself whole).
    pub fn set(&self, bytes: u64) {
        self.0.store(bytes, Ordering::Relaxed);
    }

    /// Moves the count by the change in one of several owners sharing it, from `before` to
    /// `after` bytes.
    pub fn change(&self, before: u64, after: u64) {
        if after >= before {
            self.0.fetch_add(after - before, Ordering::Relaxed);
        } else {
            self.0.fetch_sub(before - after, Ordering::Relaxed);
        }
    }

    /// The bytes held now.
    pub fn bytes(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// The global memory budget.
pub struct MemoryBudget {
    limit: u64,
    used: Mutex<u64>,
    /// Memory held for the whole run outside any reservation, by owner.
    held: Mutex<Vec<(&'static str, HeldMemory)>>,
    /// The codebook's share of `held`.
    codebook: HeldMemory,
    /// Held memory has passed half the budget (said once).
    held_warned: AtomicBool,
    /// Bumped whenever a reservation is refused; sinks flush early when they see it change.
    pressure: AtomicU64,
    /// Reserved bytes whose rows are with a writer (released once written or staged).
    writing: AtomicU64,
    peak: AtomicU64,
    oversized: AtomicU64,
    sinks: Mutex<Vec<Box<dyn Fn() + Send>>>,
    /// Row buffers kept for the next bundles, counted as used until a reservation needs their
    /// room.
    pool: Arc<BufferPool>,
}

/// The outcome of a reservation request.
#[derive(Debug, PartialEq, Eq)]
pub enum Reservation {
    Granted,
    /// Granted although larger than the whole budget: nothing else was in flight.
    GrantedAlone,
    Refused,
}

impl MemoryBudget {
    /// A budget of `limit` bytes.
    pub fn new(limit: u64) -> MemoryBudget {
        let codebook = HeldMemory::default();
        MemoryBudget {
            limit,
            used: Mutex::new(0),
            held: Mutex::new(vec![(
                "the codebook's Patient and Encounter id mappings",
                codebook.clone(),
            )]),
            codebook,
            held_warned: AtomicBool::new(false),
            pressure: AtomicU64::new(0),
            writing: AtomicU64::new(0),
            peak: AtomicU64::new(0),
            oversized: AtomicU64::new(0),
            sinks: Mutex::new(Vec::new()),
            pool: Arc::new(BufferPool::new(limit / 2)),
        }
    }

    /// The budget's size in bytes.
    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Reserves `bytes`. A request that does not fit is granted only when nothing else is
    /// reserved, so an oversized bundle is processed alone instead of deadlocking (and so is
    /// every bundle once held memory fills the budget).
    pub fn try_reserve(&self, bytes: u64) -> Reservation {
        self.reserve(bytes, None).0
    }

    /// Reserves `bytes` for a bundle, with an empty buffer of at least `capacity` bytes for its
    /// rows, which counts inside the reservation: a pooled one where there is one (its pooled
    /// bytes become part of the reservation), else a new one. No buffer when refused.
    pub fn try_reserve_with_buffer(
        &self,
        bytes: u64,
        capacity: usize,
    ) -> (Reservation, Option<Vec<u8>>) {
        let (outcome, pooled) = self.reserve(bytes, Some(capacity));
        let buffer = match outcome {
            Reservation::Refused => None,
            _ => Some(pooled.unwrap_or_else(|| Vec::with_capacity(capacity))),
        };
        (outcome, buffer)
    }

    fn reserve(&self, bytes: u64, capacity: Option<usize>) -> (Reservation, Option<Vec<u8>>) {
        let held = self.held();
        let mut used = self.used.lock().unwrap();
        if capacity.is_some() {
            self.pool.open();
        }
        let taken = capacity.and_then(|c| self.pool.take(c));
        let needed = *used + held + bytes;
        // Pooled buffers give way to a reservation they alone keep out.
        let evicted = if needed <= self.limit || *used == 0 {
            self.pool.shrink_to(self.limit.saturating_sub(needed))
        } else {
            Vec::new()
        };
        let pooled = self.pool.bytes();
        let outcome = if needed + pooled <= self.limit {
            Reservation::Granted
        } else if *used == 0 {
            if bytes > self.limit {
                self.oversized.fetch_add(1, Ordering::Relaxed);
            }
            Reservation::GrantedAlone
        } else {
            Reservation::Refused
        };
        if outcome == Reservation::Refused {
            if let Some(buffer) = taken {
                self.pool.put_back(buffer);
            }
            drop(used);
            drop(evicted);
            self.pressure.fetch_add(1, Ordering::AcqRel);
            for wake in self.sinks.lock().unwrap().iter() {
                wake();
            }
            return (outcome, None);
        }
        *used += bytes;
        self.peak
            .fetch_max(*used + held + pooled, Ordering::Relaxed);
        drop(used);
        drop(evicted);
        (outcome, taken)
    }

    /// An empty buffer of at least `capacity` bytes, pooled or new, for memory the caller has
    /// already reserved.
    pub fn take_buffer(&self, capacity: usize) -> Vec<u8> {
        self.pool
            .take(capacity)
            .unwrap_or_else(|| Vec::with_capacity(capacity))
    }

    /// A handle that gives finished row buffers back to this budget's pool.
    pub fn recycler(&self) -> Recycler {
        Recycler(self.pool.clone())
    }

    /// Frees the pooled buffers and keeps no more until a bundle is reserved again: the input
    /// is all read (see [`BufferPool::close`]).
    pub fn close_pool(&self) {
        self.pool.close();
    }

    /// Bytes of buffers pooled for reuse.
    pub fn pooled(&self) -> u64 {
        self.pool.bytes()
    }

    /// Counts `held` (named by `what` in the warning) as memory held for the whole run: sources
    /// then have that much less to reserve, so peak RSS keeps following the budget.
    pub fn count_held(&self, what: &'static str, held: HeldMemory) {
        self.held.lock().unwrap().push((what, held));
    }

    /// Memory held for the whole run, by every owner counted.
    pub fn held(&self) -> u64 {
        self.held
            .lock()
            .unwrap()
            .iter()
            .map(|(_, h)| h.bytes())
            .sum()
    }

    /// A warning, the first time held memory passes half the budget: rows then get little
    /// room, and a run whose held memory fills the budget reads one bundle at a time.
    pub fn check_held(&self) -> Option<String> {
        let held = self.held.lock().unwrap();
        let total: u64 = held.iter().map(|(_, h)| h.bytes()).sum();
        if total <= self.limit / 2 || self.held_warned.swap(true, Ordering::AcqRel) {
            return None;
        }
        let parts: Vec<String> = held
            .iter()
            .filter(|(_, h)| h.bytes() > 0)
            .map(|(what, h)| format!("{what} {}", human_bytes(h.bytes())))
            .collect();
        Some(format!(
            "warning: memory held for the whole run ({}) takes {} of the {} memory budget; a \
             larger --memory keeps the run fast",
            parts.join(", "),
            human_bytes(total),
            human_bytes(self.limit)
        ))
    }

    /// Counts `bytes` that arrived already made (rows another process of a cluster run read,
    /// for a table written here), over the limit if need be: they are in memory whether or not
    /// they fit, and this process's own reading then waits until they are written.
    pub fn count_arrived(&self, bytes: u64) {
        let mut used = self.used.lock().unwrap();
        *used += bytes;
        self.peak.fetch_max(*used + self.held(), Ordering::Relaxed);
    }

    /// Returns bytes to the budget.
    pub fn release(&self, bytes: u64) {
        let mut used = self.used.lock().unwrap();
        *used = used.saturating_sub(bytes);
    }

    /// Marks reserved bytes as handed to a writer: they will come back without another flush.
    pub fn start_writing(&self, bytes: u64) {
        self.writing.fetch_add(bytes, Ordering::AcqRel);
    }

    /// Returns bytes whose write (or staging) has finished to the budget.
    pub fn release_written(&self, bytes: u64) {
        self.writing.fetch_sub(bytes, Ordering::AcqRel);
        self.release(bytes);
    }

    /// True when at least half of the reserved bytes are already being written. Cutting more
    /// batches then frees little sooner (the writers are busy) but makes small batches: with
    /// Delta, whose commits run beside the workers, a source retrying every 2 ms had sinks cut
    /// procedures into 1 MB files that the end of the run then compacted.
    pub fn mostly_writing(&self) -> bool {
        let used = self.used();
        used > 0 && self.writing.load(Ordering::Acquire) * 2 >= used
    }

    /// Counts the codebook's id mappings as held memory (at the start of a run and after every
    /// codebook save), saying so once held memory takes more than half the budget.
    pub fn hold_codebook(&self, held_bytes: u64) {
        self.codebook.set(held_bytes);
        if let Some(warning) = self.check_held() {
            crate::say!("{warning}");
        }
    }

    /// Bytes currently reserved (held memory not included).
    pub fn used(&self) -> u64 {
        *self.used.lock().unwrap()
    }

    /// The highest reservation level seen.
    pub fn peak(&self) -> u64 {
        self.peak.load(Ordering::Relaxed)
    }

    /// How many bundles were larger than the whole budget.
    pub fn oversized_count(&self) -> u64 {
        self.oversized.load(Ordering::Relaxed)
    }

    /// A counter that changes whenever a source had to wait for memory.
    pub fn pressure(&self) -> u64 {
        self.pressure.load(Ordering::Acquire)
    }

    /// Registers how to wake a sink when a source is waiting for memory.
    pub fn register_sink(&self, wake: impl Fn() + Send + 'static) {
        self.sinks.lock().unwrap().push(Box::new(wake));
    }
}

/// Parses sizes like `256MiB`, `2GB`, `1g`, `500000` (bytes).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num
        .parse()
        .map_err(|_| format!("'{text}' is not a size (try 512MiB or 2GiB)"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        _ => return Err(format!("'{text}': unknown size unit (use KiB, MiB or GiB)")),
    };
    let bytes = (value * mult as f64) as u64;
    if bytes < (16 << 20) {
        return Err(format!(
            "'{text}' is too small: the memory budget must be at least 16MiB"
        ));
    }
    Ok(bytes)
}

/// The default budget: a sixteenth of physical memory, between 256 MiB and 352 MiB. Throughput
/// stops growing with the budget well below that (1 GB export, 2 workers: NDJSON and Parquet
/// as fast at 352 MiB as at 4 GiB), and peak RSS, which adds the binary, mapped input pages and
/// allocator slack to the budget, stays under a third of the reference tool's (at 384 MiB,
/// NDJSON peaked at up to 436 MiB against a limit of 428).
/// Delta re-runs used to want more (each MERGE reads the whole table, and a small budget meant
/// many small MERGEs); they now stage MERGE batches on disk and merge `--batch-size` rows at a
/// time whatever the budget (`docs/performance.md`).
pub fn default_budget() -> u64 {
    (physical_memory() / 16).clamp(256 << 20, 352 << 20)
}

/// The machine's memory in bytes (8 GiB when it cannot be read).
pub fn physical_memory() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map(|kb| kb * 1024)
        .unwrap_or(8 << 30)
}

/// Makes glibc's allocator give freed memory back to the system once 1 MiB is free at the top
/// of a heap (its default adapts upwards to 32 MiB per arena and more), so peak RSS follows the
/// memory budget. Measured on 1 GB with `--memory 256MiB`: peak RSS 378 MiB before, 333 MiB
/// after, with no loss of speed (`docs/performance.md`).
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; it is called before any thread starts.
    unsafe {
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 20);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_are_bounded_but_oversized_work_runs_alone() {
        let b = MemoryBudget::new(100);
        assert_eq!(b.try_reserve(60), Reservation::Granted);
        assert_eq!(b.try_reserve(60), Reservation::Refused);
        assert_eq!(b.pressure(), 1);
        b.release(60);
        assert_eq!(b.try_reserve(500), Reservation::GrantedAlone);
        assert_eq!(b.try_reserve(1), Reservation::Refused);
        b.release(500);
        assert_eq!(b.used(), 0);
        assert_eq!(b.peak(), 500);
    }

    #[test]
    fn memory_being_written_holds_back_early_writes_until_it_returns() {
        let b = MemoryBudget::new(100);
        assert!(!b.mostly_writing(), "nothing reserved");
        assert_eq!(b.try_reserve(40), Reservation::Granted);
        assert_eq!(b.try_reserve(40), Reservation::Granted);
        b.start_writing(30);
        assert!(!b.mostly_writing(), "30 of 80 on their way out");
        b.start_writing(10);
        assert!(b.mostly_writing(), "40 of 80 on their way out");
        b.release_written(40);
        assert_eq!(b.used(), 40);
        assert!(!b.mostly_writing(), "the written bytes came back");
    }

    #[test]
    fn held_memory_narrows_what_can_be_reserved() {
        let b = MemoryBudget::new(100);
        let keys = HeldMemory::default();
        b.count_held("routing keys", keys.clone());
        b.codebook.set(30);
        keys.change(0, 20);
        assert_eq!(b.held(), 50);
        assert!(
            b.check_held().is_none(),
            "half the budget is not yet a warning"
        );
        assert_eq!(b.try_reserve(40), Reservation::Granted);
        assert_eq!(b.try_reserve(20), Reservation::Refused);
        assert_eq!(b.peak(), 90);
        b.release(40);
        // Held memory alone never blocks a bundle, and does not make it oversized.
        keys.change(20, 120);
        let warning = b.check_held().expect("a warning past half the budget");
        assert!(warning.contains("--memory"), "{warning}");
        assert!(
            warning.contains("routing keys 120 B"),
            "names each owner: {warning}"
        );
        assert!(b.check_held().is_none(), "said once");
        assert_eq!(b.try_reserve(40), Reservation::GrantedAlone);
        assert_eq!(b.oversized_count(), 0);
        keys.change(120, 0);
        assert_eq!(b.held(), 30, "an owner that lets go gives its room back");
    }

    #[test]
    fn pooled_buffers_count_until_a_reservation_needs_their_room() {
        let b = MemoryBudget::new(4 << 20);
        let (outcome, rows) = b.try_reserve_with_buffer(1 << 20, 1 << 20);
        assert_eq!(outcome, Reservation::Granted);
        let rows = rows.expect("a buffer with the reservation");
        assert!(rows.capacity() >= 1 << 20);
        let address = rows.as_ptr();
        b.recycler().recycle(rows);
        b.release(1 << 20);
        assert_eq!(b.pooled(), 1 << 20);
        assert_eq!(b.used(), 0);

        // The next bundle gets the same memory; its pooled bytes become its reservation's.
        let (_, rows) = b.try_reserve_with_buffer(1 << 20, 1 << 20);
        let rows = rows.unwrap();
        assert_eq!(rows.as_ptr(), address);
        assert_eq!(b.pooled(), 0);
        assert_eq!(b.used(), 1 << 20);
        b.release(1 << 20);

        // Pooled bytes take at most half the budget and give way to a reservation that fits
        // once they are freed (the oldest first).
        let b = MemoryBudget::new(8 << 20);
        for _ in 0..3 {
            b.recycler().recycle(Vec::with_capacity(2 << 20));
        }
        assert_eq!(b.pooled(), 4 << 20, "half the budget");
        assert_eq!(b.try_reserve(5 << 20), Reservation::Granted);
        assert_eq!(b.pooled(), 2 << 20, "one buffer gave way");
        assert_eq!(b.peak(), 7 << 20, "pooled bytes are counted");

        // A reservation refused anyway leaves the pool alone.
        assert_eq!(b.try_reserve(4 << 20), Reservation::Refused);
        assert_eq!(b.pooled(), 2 << 20);
    }

    #[test]
    fn the_default_budget_stays_within_its_bounds() {
        let budget = default_budget();
        assert!(((256 << 20)..=(352 << 20)).contains(&budget), "{budget}");
    }

    #[test]
    fn sizes_parse_with_units() {
        assert_eq!(parse_size("256MiB").unwrap(), 256 << 20);
        assert_eq!(parse_size("2g").unwrap(), 2 << 30);
        assert!(parse_size("10k").is_err());
        assert!(parse_size("lots").is_err());
    }
}
