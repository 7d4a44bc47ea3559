//! containerd-shim-pclive: the containerd shim v2 of runtime `io.containerd.pclive.v2`.
//!
//! `service` is the edge (ttrpc, protobuf); `task` the core over typed `runc` command lines
//! (one container operation per file); `io` the container stdio; `cgroups` statistics and OOM
//! events; `annotations` every pclive annotation, `config` the host's settings (`/etc/pclive/config.toml`) and
//! `confine` what annotations may name under them; `migrate` the source side of a migration,
//! `lazy_restore` and `eager_restore` the destination's (they run and supervise the engine's
//! server process).

pub mod annotations;
pub mod cgroups;
pub mod config;
pub mod confine;
pub mod cri_options;
pub mod eager_restore;
pub mod grant;
pub mod io;
pub mod lazy_restore;
pub mod logger;
pub mod metrics;
pub mod migrate;
pub mod netns;
pub mod network_lock;
pub mod nofollow;
pub mod paths;
pub mod reaper;
pub mod receive;
pub mod release;
pub mod rootfs;
pub mod runc;
pub mod seizable;
pub mod service;
pub mod task;
pub mod tools;
