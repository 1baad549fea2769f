//! `RowsPtr`: a mutable buffer shared with pool threads that each write
//! their own rows (or ranges) of it. The one place the crates turn a `&mut`
//! buffer into a pointer that several threads may cut disjoint pieces from.

use std::marker::PhantomData;

/// A mutably borrowed buffer, handed to pool threads that write disjoint
/// ranges of it. Ranges are bounds-checked; disjointness is the caller's.
pub struct RowsPtr<'a, T> {
    ptr: *mut T,
    len: usize,
    _buf: PhantomData<&'a mut [T]>,
}

// SAFETY: a `RowsPtr` only hands out `&mut` to ranges its users promise are
// disjoint across threads (see `range`), so sharing it is sharing `&mut T`
// pieces, which is sound when `T: Send`.
unsafe impl<T: Send> Sync for RowsPtr<'_, T> {}
// SAFETY: as above.
unsafe impl<T: Send> Send for RowsPtr<'_, T> {}

impl<'a, T> RowsPtr<'a, T> {
    /// Borrows `buf` mutably for as long as the `RowsPtr` lives.
    pub fn new(buf: &'a mut [T]) -> Self {
        RowsPtr {
            ptr: buf.as_mut_ptr(),
            len: buf.len(),
            _buf: PhantomData,
        }
    }

    /// Values `start..start + len`.
    ///
    /// # Panics
    /// If the range is not inside the buffer.
    ///
    /// # Safety
    /// No other live reference (from this or another thread) covers any of
    /// these values.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn range(&self, start: usize, len: usize) -> &mut [T] {
        assert!(
            start.checked_add(len).is_some_and(|end| end <= self.len),
            "RowsPtr: range {start}+{len} outside a buffer of {}",
            self.len
        );
        // SAFETY: in bounds (asserted); unaliased per this function's contract.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(start), len) }
    }

    /// Row `i` of width `w`: values `i * w..(i + 1) * w`.
    ///
    /// # Safety
    /// As for [`RowsPtr::range`].
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn row(&self, i: usize, w: usize) -> &mut [T] {
        // SAFETY: forwarded contract.
        unsafe { self.range(i * w, w) }
    }
}
