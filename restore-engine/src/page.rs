//! The page: the unit in which pclive reads, sends, stages and installs memory, and in which
//! CRIU's pagemap images count. pclive works in 4 KiB base pages (x86-64, and arm64 kernels
//! built with 4 KiB pages); [`check_kernel`] refuses a kernel with another base page size.

/// Bytes per page.
pub const SIZE: usize = 4096;
/// [`SIZE`] as a `u64`, for address arithmetic.
pub const SIZE_U64: u64 = SIZE as u64;

/// The kernel's base page size.
pub fn kernel_page_size() -> u64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    size.max(0) as u64
}

/// Whether this kernel's pages are the ones pclive works in.
pub fn check_kernel() -> Result<(), String> {
    match kernel_page_size() {
        SIZE_U64 => Ok(()),
        other => Err(format!(
            "this kernel uses {other}-byte pages; pclive supports {SIZE}-byte pages only"
        )),
    }
}

/// Whether `addr` is the first byte of a page.
pub fn is_aligned(addr: u64) -> bool {
    addr % SIZE_U64 == 0
}

#[cfg(test)]
mod tests {
    #[test]
    fn this_kernel_uses_the_page_size_pclive_works_in() {
        super::check_kernel().unwrap();
    }
}
