//! A caching device allocator: freed buffers go back to a pool keyed by their rounded size
//! and are handed out again without a driver call; [`Allocator::trim`] returns them.

use crate::CudaError;
use cudarc::driver::{CudaSlice, CudaStream};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Sizes are rounded up to a multiple of this many bytes (and 16-byte aligned by the driver).
const GRANULE: usize = 512;

/// The pool of free device buffers, by rounded size.
#[derive(Default)]
struct Pool {
    free: HashMap<usize, Vec<CudaSlice<u8>>>,
    cached_bytes: usize,
}

/// A caching allocator on one stream.
#[derive(Clone)]
pub struct Allocator {
    stream: Arc<CudaStream>,
    pool: Arc<Mutex<Pool>>,
}

/// A device buffer of `len` bytes; returns to its allocator's pool when dropped.
pub struct Buffer {
    slice: Option<CudaSlice<u8>>,
    len: usize,
    pool: Arc<Mutex<Pool>>,
}

impl Buffer {
    /// Its length in bytes as requested.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True for a zero-length buffer.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The device memory (possibly longer than [`Buffer::len`]), to pass to kernels.
    pub fn slice(&self) -> &CudaSlice<u8> {
        self.slice
            .as_ref()
            .unwrap_or_else(|| unreachable!("taken only on drop"))
    }

    /// Mutable device memory.
    pub fn slice_mut(&mut self) -> &mut CudaSlice<u8> {
        self.slice
            .as_mut()
            .unwrap_or_else(|| unreachable!("taken only on drop"))
    }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        if let Some(s) = self.slice.take() {
            let mut p = self.pool.lock().unwrap_or_else(|e| e.into_inner());
            p.cached_bytes += s.len();
            p.free.entry(s.len()).or_default().push(s);
        }
    }
}

impl Allocator {
    /// An empty pool allocating on `stream`.
    pub fn new(stream: Arc<CudaStream>) -> Allocator {
        Allocator {
            stream,
            pool: Arc::default(),
        }
    }

    /// A buffer of at least `len` bytes, from the pool if one of that rounded size is free.
    /// Its contents are unspecified.
    pub fn alloc(&self, len: usize) -> Result<Buffer, CudaError> {
        let size = len.div_ceil(GRANULE).max(1) * GRANULE;
        let reused = {
            let mut p = self.pool.lock().unwrap_or_else(|e| e.into_inner());
            let s = p.free.get_mut(&size).and_then(Vec::pop);
            if s.is_some() {
                p.cached_bytes -= size;
            }
            s
        };
        let slice = match reused {
            Some(s) => s,
            // SAFETY: u8 has no invalid bit patterns; callers write before they read, or read
            // unspecified bytes on purpose (poisoned outputs are written explicitly).
            None => unsafe { self.stream.alloc::<u8>(size) }?,
        };
        Ok(Buffer {
            slice: Some(slice),
            len,
            pool: self.pool.clone(),
        })
    }

    /// Bytes held in the pool, free for reuse.
    pub fn cached_bytes(&self) -> usize {
        self.pool
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .cached_bytes
    }

    /// Frees every pooled buffer.
    pub fn trim(&self) {
        let mut p = self.pool.lock().unwrap_or_else(|e| e.into_inner());
        p.free.clear();
        p.cached_bytes = 0;
    }
}
