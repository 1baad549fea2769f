//! Software prefetch: asks the CPU to bring a slice into its L2 cache ahead
//! of use. Attention walks a sequence's KV cache as many small blocks; the
//! weights streaming through the caches between two layers evict them, and
//! the hardware prefetcher does not cross from one block to the next, so
//! each block would otherwise start with a full memory latency.

/// Bytes per cache line assumed when stepping through a slice.
#[cfg(target_arch = "x86_64")]
const LINE: usize = 64;

/// Hints that `data` will be read soon (into L2). A hint only: it never
/// faults and changes no result; on targets without a prefetch hint it does
/// nothing.
#[inline]
pub fn prefetch<T>(data: &[T]) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_MM_HINT_T1, _mm_prefetch};
        let p = data.as_ptr().cast::<i8>();
        let bytes = std::mem::size_of_val(data);
        let mut off = 0;
        while off < bytes {
            // SAFETY: a prefetch is a hint that never faults; the address is
            // inside `data` (SSE is part of the x86_64 baseline).
            unsafe { _mm_prefetch::<_MM_HINT_T1>(p.wrapping_add(off)) };
            off += LINE;
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = data;
}

#[cfg(test)]
mod tests {
    use super::prefetch;

    #[test]
    fn any_slice_is_accepted() {
        let v: Vec<u8> = (0..1000).map(|i| i as u8).collect();
        prefetch::<u8>(&[]);
        prefetch(&v[3..3]);
        prefetch(&v[1..999]);
        prefetch(&[0.5f32; 17]);
        // A hint changes nothing.
        assert!(v.iter().enumerate().all(|(i, &b)| b == i as u8));
    }
}
