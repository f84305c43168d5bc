//! Large byte buffers kept for reuse instead of being given back to the system.
//!
//! Each bundle's de-identified rows are written into a buffer about as large as the bundle
//! (megabytes), which lives until its batch is written. The allocator maps such a buffer
//! fresh from the kernel and unmaps it when freed, so every byte of every row used to be
//! written into a page the kernel had just zeroed: two thirds of an NDJSON run's page faults.
//! A buffer freed here waits for the next bundle instead, its pages still mapped.
//!
//! Pooled bytes are real memory, so the budget counts them and takes them back first when a
//! reservation needs room (see `MemoryBudget::try_reserve_with_buffer`): the pool never holds
//! back reading, and peak RSS keeps following the budget.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// Buffers smaller than this come from the allocator's own heap and are not worth keeping.
pub const MIN_POOLED_CAPACITY: usize = 128 << 10;

/// A pool of empty byte buffers, shared by one run's sources and sinks.
#[derive(Debug)]
pub struct BufferPool {
    state: Mutex<Pooled>,
    max_bytes: u64,
    /// No bundle is left to read: buffers are freed, not kept, until one is again.
    closed: AtomicBool,
}

#[derive(Debug, Default)]
struct Pooled {
    buffers: Vec<Vec<u8>>,
    bytes: u64,
}

impl BufferPool {
    /// A pool keeping at most `max_bytes` of buffers.
    pub fn new(max_bytes: u64) -> BufferPool {
        BufferPool {
            state: Mutex::new(Pooled::default()),
            max_bytes,
            closed: AtomicBool::new(false),
        }
    }

    /// Keeps `buffer` (emptied) for reuse if it is large and the pool has room; frees it
    /// otherwise.
    pub fn recycle(&self, mut buffer: Vec<u8>) {
        let capacity = buffer.capacity() as u64;
        if buffer.capacity() < MIN_POOLED_CAPACITY || self.closed.load(Ordering::Acquire) {
            return;
        }
        buffer.clear();
        let mut state = self.state.lock().unwrap();
        if state.bytes + capacity > self.max_bytes {
            // Freed (unmapped) outside the lock.
            drop(state);
            return;
        }
        state.bytes += capacity;
        state.buffers.push(buffer);
    }

    /// The smallest pooled buffer holding at least `capacity` bytes, if there is one no more
    /// than twice as large (a larger one would hold memory the rows do not need).
    pub fn take(&self, capacity: usize) -> Option<Vec<u8>> {
        let mut state = self.state.lock().unwrap();
        let (found, _) = state
            .buffers
            .iter()
            .enumerate()
            .map(|(i, b)| (i, b.capacity()))
            .filter(|&(_, c)| c >= capacity && c / 2 <= capacity)
            .min_by_key(|&(_, c)| c)?;
        let buffer = state.buffers.swap_remove(found);
        state.bytes -= buffer.capacity() as u64;
        Some(buffer)
    }

    /// Gives a buffer taken by [`BufferPool::take`] back, over the pool's limit if need be
    /// (it was in the pool a moment ago).
    pub fn put_back(&self, buffer: Vec<u8>) {
        let mut state = self.state.lock().unwrap();
        state.bytes += buffer.capacity() as u64;
        state.buffers.push(buffer);
    }

    /// Takes pooled buffers out, oldest first, until at most `keep` bytes are pooled; the
    /// caller frees them (outside its own locks).
    pub fn shrink_to(&self, keep: u64) -> Vec<Vec<u8>> {
        let mut state = self.state.lock().unwrap();
        let mut evicted = Vec::new();
        while state.bytes > keep && !state.buffers.is_empty() {
            let buffer = state.buffers.remove(0);
            state.bytes -= buffer.capacity() as u64;
            evicted.push(buffer);
        }
        evicted
    }

    /// Frees every pooled buffer and keeps none until [`BufferPool::open`]: once the input is
    /// read, pooled memory would only sit beside the end of the run's writes (a Delta table's
    /// last batches and the joining of its files), over what the budget counts for them.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        drop(self.shrink_to(0));
    }

    /// Keeps buffers again (there is input to read).
    pub fn open(&self) {
        if self.closed.load(Ordering::Acquire) {
            self.closed.store(false, Ordering::Release);
        }
    }

    /// Bytes pooled now.
    pub fn bytes(&self) -> u64 {
        self.state.lock().unwrap().bytes
    }
}

/// A handle that gives a buffer back to its run's pool when the buffer's owner is done with it
/// (cloned into every chunk of rows that holds a pooled buffer).
#[derive(Debug, Clone)]
pub struct Recycler(pub(crate) Arc<BufferPool>);

impl Recycler {
    /// See [`BufferPool::recycle`].
    pub fn recycle(&self, buffer: Vec<u8>) {
        self.0.recycle(buffer);
    }

    /// See [`BufferPool::take`].
    pub fn take(&self, capacity: usize) -> Option<Vec<u8>> {
        self.0.take(capacity)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_buffers_come_back_empty_and_small_ones_are_freed() {
        let pool = BufferPool::new(1 << 30);
        let mut big = Vec::with_capacity(1 << 20);
        big.extend_from_slice(b"rows");
        let address = big.as_ptr();
        pool.recycle(big);
        pool.recycle(Vec::with_capacity(1024));
        assert_eq!(pool.bytes(), 1 << 20);
        assert!(pool.take(2 << 20).is_none(), "none large enough");
        assert!(pool.take(1000).is_none(), "none small enough");
        let again = pool.take(600 << 10).expect("the pooled buffer");
        assert_eq!(again.as_ptr(), address, "the same memory");
        assert!(again.is_empty());
        assert_eq!(pool.bytes(), 0);
    }

    #[test]
    fn a_closed_pool_keeps_nothing_until_opened_again() {
        let pool = BufferPool::new(1 << 30);
        pool.recycle(Vec::with_capacity(1 << 20));
        pool.close();
        assert_eq!(pool.bytes(), 0, "freed when closed");
        pool.recycle(Vec::with_capacity(1 << 20));
        assert_eq!(pool.bytes(), 0, "not kept while closed");
        pool.open();
        pool.recycle(Vec::with_capacity(1 << 20));
        assert_eq!(pool.bytes(), 1 << 20);
    }

    #[test]
    fn the_smallest_buffer_that_fits_is_taken() {
        let pool = BufferPool::new(1 << 30);
        for size in [4 << 20, 1 << 20, 2 << 20] {
            pool.recycle(Vec::with_capacity(size));
        }
        assert_eq!(pool.take(1536 << 10).unwrap().capacity(), 2 << 20);
        assert_eq!(pool.take(1 << 20).unwrap().capacity(), 1 << 20);
        assert_eq!(pool.take(3 << 20).unwrap().capacity(), 4 << 20);
        assert_eq!(pool.bytes(), 0);
    }

    #[test]
    fn the_pool_keeps_no_more_than_its_limit_and_shrinks_oldest_first() {
        let pool = BufferPool::new(3 << 20);
        for _ in 0..5 {
            pool.recycle(Vec::with_capacity(1 << 20));
        }
        assert_eq!(pool.bytes(), 3 << 20);
        let newest = pool.take(1 << 20).unwrap();
        let newest_address = newest.as_ptr();
        pool.put_back(newest);
        assert_eq!(pool.shrink_to(1 << 20).len(), 2);
        assert_eq!(pool.bytes(), 1 << 20);
        let kept = pool.take(1 << 20).unwrap();
        assert_eq!(kept.as_ptr(), newest_address, "the newest is kept");
        pool.put_back(kept);
        assert_eq!(pool.shrink_to(0).len(), 1);
        assert_eq!(pool.bytes(), 0);
    }
}
