//! pclive restore engine: everything of a live migration that is not containerd's or runc's.
//! The engine speaks its own types; containerd, ttrpc and protobuf of containerd stay in the
//! shim, which supplies runc and CRIU operations as hooks ([`source::SourceHooks`]) and runs the
//! lazy-pages server ([`server`]) as a child process.
//!
//! Roles, each in one place:
//! - [`source`]: the sending end (pre-copy rounds, the freeze, the final dump's images, waiting
//!   for the destination's commit); [`policy`] decides when pre-copy stops;
//! - [`destination`]: the receiving end (listener, rounds into the [`staging`] store, image
//!   files, then serve lazily or [`assemble`] for an eager restore, commit or abort);
//! - [`server`]: the lazy-pages server process; [`lazy`]: its page installer (CRIU's socket,
//!   userfaultfd via [`uffd`]); [`events`]: what it reports to the shim;
//! - [`wire`]: the migration protocol; [`memory`]: reading a running task's memory and its dirty
//!   pages; [`images`]: CRIU's image files; [`page`]: the page size;
//! - [`host`] and [`versions`]: what a host offers (`pclive check`).
//!
//! The path of a page: [`memory`] (tracker) → [`source::rounds`] → [`wire`] → network →
//! [`destination::receive`] → [`staging`] → [`lazy`] (filler) → [`uffd`] → the restored task.

pub mod assemble;
pub mod cancel;
pub mod clock;
pub mod destination;
pub mod events;
pub mod fault;
pub mod fixups;
pub mod grant;
pub mod host;
pub mod images;
pub mod layer;
pub mod lazy;
pub mod memory;
pub mod page;
pub mod policy;
pub mod procfs;
pub mod record;
pub mod server;
pub mod source;
pub mod staging;
pub mod uffd;
pub mod versions;
pub mod wire;

#[cfg(test)]
mod pipeline_tests;
#[cfg(test)]
mod streams_tests;
#[cfg(test)]
mod testsupport;
#[cfg(test)]
mod transaction_tests;
