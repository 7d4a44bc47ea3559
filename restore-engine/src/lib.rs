//! pclive restore engine.
//!
//! The engine speaks its own types; containerd and protobuf stay in the shim. It will hold the
//! CRIU image codec, the staging page store, the lazy-pages (userfaultfd) server and the migration
//! protocol. For now it offers the host capability report behind `pclive check`.

pub mod assemble;
pub mod destination;
pub mod host;
pub mod images;
pub mod lazy;
pub mod memory;
pub mod precopy;
pub mod staging;
pub mod uffd;
pub mod versions;
pub mod wire;

#[cfg(test)]
mod pipeline_tests;
#[cfg(test)]
mod testsupport;
