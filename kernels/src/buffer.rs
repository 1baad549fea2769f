//! `AlignedBytes`: the byte buffer behind weights and quantized activations.
//! It starts on a 64-byte boundary (full-width SIMD loads of aligned offsets
//! never split a cache line). Large buffers are backed by transparent huge
//! pages on Linux: streaming weights through 4 KiB pages costs a TLB miss every
//! 4 KiB, which on this kind of VM cut sequential read bandwidth from ~29 to
//! ~18 GB/s in a measurement. Buffers of 2 MiB or more get their own 2 MiB
//! aligned allocation; buffers from 64 KiB up (a model's many small matrices)
//! are carved from shared 32 MiB huge-page chunks, each freed when the last
//! buffer in it is dropped.

use std::alloc::{Layout, alloc, dealloc, handle_alloc_error};
use std::ptr::NonNull;
use std::sync::{Arc, Mutex};

/// Alignment of every buffer.
const LINE: usize = 64;
/// Size (and alignment) from which a buffer has its own huge-page allocation.
const HUGE: usize = 2 << 20;
/// Size from which a smaller buffer is carved from a shared huge-page chunk.
const ARENA_MIN: usize = 64 << 10;
/// Size of a shared chunk.
const CHUNK: usize = 32 << 20;

/// Who owns the memory of an `AlignedBytes`.
enum Backing {
    /// Nothing (length 0).
    Empty,
    /// Its own allocation of `cap` bytes aligned to `align`.
    Own { align: usize },
    /// A region of a shared chunk.
    Arena(Arc<Chunk>),
}

/// A zero-initialised, aligned, fixed-capacity byte buffer.
pub(crate) struct AlignedBytes {
    ptr: NonNull<u8>,
    len: usize,
    cap: usize,
    backing: Backing,
}

/// A huge-page chunk that arena buffers are carved from.
struct Chunk {
    ptr: NonNull<u8>,
}

// SAFETY: the chunk is plain memory; each region is owned by exactly one
// `AlignedBytes`, which alone reads or writes it.
unsafe impl Send for Chunk {}
// SAFETY: as above.
unsafe impl Sync for Chunk {}

impl Drop for Chunk {
    fn drop(&mut self) {
        // SAFETY: allocated in `Chunk::new` with this size and alignment.
        unsafe {
            dealloc(
                self.ptr.as_ptr(),
                Layout::from_size_align_unchecked(CHUNK, HUGE),
            )
        };
    }
}

impl Chunk {
    fn new() -> Chunk {
        let ptr = raw_alloc(CHUNK, HUGE);
        advise_huge(ptr.as_ptr(), CHUNK);
        Chunk { ptr }
    }
}

/// The chunk new arena buffers come from, and how many bytes of it are used.
static ARENA: Mutex<Option<(Arc<Chunk>, usize)>> = Mutex::new(None);

/// Allocate `size` bytes aligned to `align` (size > 0), aborting on failure.
fn raw_alloc(size: usize, align: usize) -> NonNull<u8> {
    let layout = Layout::from_size_align(size, align).expect("buffer size overflows isize");
    // SAFETY: `layout` has non-zero size.
    let raw = unsafe { alloc(layout) };
    NonNull::new(raw).unwrap_or_else(|| handle_alloc_error(layout))
}

// SAFETY: `AlignedBytes` uniquely owns its allocation, like `Vec<u8>`.
unsafe impl Send for AlignedBytes {}
// SAFETY: shared access only reads (`&self` methods never write).
unsafe impl Sync for AlignedBytes {}

impl Default for AlignedBytes {
    fn default() -> Self {
        AlignedBytes {
            ptr: NonNull::new(std::ptr::without_provenance_mut(LINE)).expect("non-null"),
            len: 0,
            cap: 0,
            backing: Backing::Empty,
        }
    }
}

/// Ask the kernel to back `len` bytes at `ptr` with transparent huge pages.
#[cfg(target_os = "linux")]
fn advise_huge(ptr: *mut u8, len: usize) {
    // SAFETY: the range is a live allocation owned by the caller; madvise
    // with MADV_HUGEPAGE only changes paging policy (errors are ignored: the
    // buffer then simply uses normal pages).
    unsafe {
        libc::madvise(ptr.cast(), len, libc::MADV_HUGEPAGE);
    }
}

#[cfg(not(target_os = "linux"))]
fn advise_huge(_ptr: *mut u8, _len: usize) {}

impl AlignedBytes {
    /// `len` zero bytes.
    pub(crate) fn zeroed(len: usize) -> AlignedBytes {
        if len == 0 {
            return AlignedBytes::default();
        }
        let cap = len.next_multiple_of(LINE);
        let (ptr, backing) = if len >= HUGE {
            let cap = len.next_multiple_of(HUGE);
            let ptr = raw_alloc(cap, HUGE);
            advise_huge(ptr.as_ptr(), cap);
            (ptr, Backing::Own { align: HUGE })
        } else if len >= ARENA_MIN {
            let mut arena = ARENA.lock().unwrap_or_else(|e| e.into_inner());
            if arena.as_ref().is_none_or(|(_, used)| used + cap > CHUNK) {
                *arena = Some((Arc::new(Chunk::new()), 0));
            }
            let (chunk, used) = arena.as_mut().expect("arena chunk");
            // SAFETY: used + cap <= CHUNK, inside the chunk's allocation.
            let ptr = unsafe { NonNull::new_unchecked(chunk.ptr.as_ptr().add(*used)) };
            *used += cap;
            (ptr, Backing::Arena(Arc::clone(chunk)))
        } else {
            (raw_alloc(cap, LINE), Backing::Own { align: LINE })
        };
        let cap = match backing {
            Backing::Own { align } => len.next_multiple_of(align),
            _ => cap,
        };
        // SAFETY: `ptr` is valid for `cap` bytes owned by this buffer; zeroing
        // initialises them (after any huge-page advice, so the first touch
        // faults in huge pages).
        unsafe { ptr.as_ptr().write_bytes(0, cap) };
        AlignedBytes {
            ptr,
            len,
            cap,
            backing,
        }
    }

    /// Set the length to `len` bytes, reallocating (zeroed) only when it grows
    /// past the capacity. Contents are unspecified afterwards but initialised.
    pub(crate) fn resize(&mut self, len: usize) {
        if len <= self.cap {
            self.len = len;
        } else {
            *self = AlignedBytes::zeroed(len);
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` is valid and initialised for `cap >= len` bytes (or
        // dangling and aligned with len 0).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    pub(crate) fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`, and `&mut self` guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    pub(crate) fn as_i8(&self) -> &[i8] {
        let s = self.as_slice();
        // SAFETY: i8 and u8 have the same size, alignment and validity.
        unsafe { std::slice::from_raw_parts(s.as_ptr().cast::<i8>(), s.len()) }
    }

    pub(crate) fn as_i8_mut(&mut self) -> &mut [i8] {
        let s = self.as_mut_slice();
        // SAFETY: i8 and u8 have the same size, alignment and validity.
        unsafe { std::slice::from_raw_parts_mut(s.as_mut_ptr().cast::<i8>(), s.len()) }
    }
}

impl Clone for AlignedBytes {
    fn clone(&self) -> Self {
        let mut c = AlignedBytes::zeroed(self.len);
        c.as_mut_slice().copy_from_slice(self.as_slice());
        c
    }
}

impl Drop for AlignedBytes {
    fn drop(&mut self) {
        match std::mem::replace(&mut self.backing, Backing::Empty) {
            Backing::Empty => {}
            Backing::Own { align } => {
                // SAFETY: allocated in `zeroed` with exactly this size and alignment.
                unsafe {
                    dealloc(
                        self.ptr.as_ptr(),
                        Layout::from_size_align_unchecked(self.cap, align),
                    )
                };
            }
            Backing::Arena(chunk) => {
                let mut arena = ARENA.lock().unwrap_or_else(|e| e.into_inner());
                drop(chunk);
                // When the current chunk holds no live buffer any more, reuse
                // it from the start instead of keeping dead regions.
                if let Some((cur, used)) = arena.as_mut()
                    && Arc::strong_count(cur) == 1
                {
                    *used = 0;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arena_buffers_do_not_overlap() {
        let bufs: Vec<AlignedBytes> = (0..40)
            .map(|i| AlignedBytes::zeroed(ARENA_MIN + 64 * i))
            .collect();
        let mut bufs = bufs;
        for (i, b) in bufs.iter_mut().enumerate() {
            b.as_mut_slice().fill(i as u8);
        }
        for (i, b) in bufs.iter().enumerate() {
            assert!(b.as_slice().iter().all(|&x| x == i as u8));
        }
        drop(bufs);
        let b = AlignedBytes::zeroed(3 * ARENA_MIN);
        assert!(b.as_slice().iter().all(|&x| x == 0));
    }

    #[test]
    fn zeroed_aligned_and_resizable() {
        for len in [0, 1, 63, 64, 1000, ARENA_MIN, ARENA_MIN + 3, HUGE, HUGE + 5] {
            let mut b = AlignedBytes::zeroed(len);
            assert_eq!(b.len(), len);
            assert!(b.as_slice().iter().all(|&x| x == 0));
            assert_eq!(b.as_slice().as_ptr() as usize % LINE, 0, "len {len}");
            if len >= HUGE {
                assert_eq!(b.as_slice().as_ptr() as usize % HUGE, 0);
            }
            b.as_mut_slice()
                .iter_mut()
                .enumerate()
                .for_each(|(i, x)| *x = i as u8);
            let c = b.clone();
            assert_eq!(c.as_slice(), b.as_slice());
            b.resize(len / 2);
            assert_eq!(b.len(), len / 2);
            b.resize(len + 100);
            assert_eq!(b.len(), len + 100);
        }
    }
}
