//! pclive benchmarks (issue #5): a Redis client that loads, loads-while-migrating (with a
//! downtime probe) and verifies a data set, and the report generator for the results.

pub mod args;
pub mod client;
pub mod conn;
pub mod follow;
pub mod report;
pub mod resp;
pub mod state;
pub mod stats;
pub mod values;
