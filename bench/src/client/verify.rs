//! `verify`: the server holds exactly the values the runs left (version 0 without a state file).

use std::path::Path;
use std::time::Instant;

use serde::Serialize;

use super::{conn_error, pipelined, Batch, ClientError, Workload, BATCH, BULK_TIMEOUT};
use crate::conn::{self, Conn};
use crate::resp::{encode_command, Value};
use crate::state::{KeyVersions, StateFile};
use crate::values::{is_value_of, key_name};

#[derive(Debug, Serialize)]
pub struct VerifyReport {
    pub checked: u64,
    pub mismatches: u64,
    pub missing: u64,
    pub dbsize: i64,
    pub seconds: f64,
}

impl VerifyReport {
    /// Whether the data set is intact: every key present with an acceptable value.
    pub fn ok(&self, records: u64) -> bool {
        self.mismatches == 0 && self.missing == 0 && self.dbsize >= records as i64
    }
}

/// Mismatched keys printed to stderr, to start a diagnosis without flooding the terminal.
const SHOWN_MISMATCHES: u64 = 10;

pub fn verify(
    endpoint: &str,
    workload: &Workload,
    state_path: Option<&Path>,
) -> Result<VerifyReport, ClientError> {
    let started = Instant::now();
    let versions = match state_path {
        Some(path) => {
            let state = StateFile::read(path)?;
            check_matches(&state, workload)?;
            state.versions
        }
        None => KeyVersions::loaded(workload.records as usize),
    };
    let addr = conn::resolve(endpoint).map_err(conn_error(endpoint))?;
    let mut conn = Conn::connect(addr, BULK_TIMEOUT).map_err(conn_error(endpoint))?;
    let mut dbsize_command = Vec::new();
    encode_command(&mut dbsize_command, &[b"DBSIZE"]);
    let dbsize = match conn
        .request(&dbsize_command, BULK_TIMEOUT)
        .map_err(conn_error(endpoint))?
    {
        Value::Integer(n) => n,
        other => return Err(conn_error(endpoint)(conn::unexpected(other))),
    };
    if dbsize != workload.records as i64 {
        eprintln!(
            "verify: DBSIZE is {dbsize}, {} keys expected",
            workload.records
        );
    }

    let mut report = VerifyReport {
        checked: 0,
        mismatches: 0,
        missing: 0,
        dbsize,
        seconds: 0.0,
    };
    let batches = (0..workload.records).step_by(BATCH as usize).map(|first| {
        let last = (first + BATCH).min(workload.records);
        let names: Vec<String> = (first..last).map(key_name).collect();
        let mut args: Vec<&[u8]> = vec![b"MGET"];
        args.extend(names.iter().map(|n| n.as_bytes()));
        let mut commands = Vec::new();
        encode_command(&mut commands, &args);
        Batch {
            commands,
            replies: 1,
            context: first,
        }
    });
    pipelined(&mut conn, batches, |first, mut replies| {
        let items = match replies.pop() {
            Some(Value::Array(Some(items))) => items,
            Some(other) => return Err(conn::unexpected(other)),
            None => unreachable!("one reply per MGET"),
        };
        for (offset, item) in items.into_iter().enumerate() {
            let index = first + offset as u64;
            report.checked += 1;
            let bad = match item {
                Value::Bulk(Some(actual)) => {
                    let acceptable = versions.acceptable(index as usize);
                    let ok = acceptable.clone().any(|version| {
                        is_value_of(workload.seed, index, version, &actual, workload.value_size)
                    });
                    if !ok {
                        report.mismatches += 1;
                    }
                    (!ok).then(|| format!("wrong value (expected version {acceptable:?})"))
                }
                _ => {
                    report.missing += 1;
                    Some("missing".to_string())
                }
            };
            if let Some(what) = bad {
                if report.mismatches + report.missing <= SHOWN_MISMATCHES {
                    eprintln!("verify: {}: {what}", key_name(index));
                }
            }
        }
        Ok(())
    })
    .map_err(conn_error(endpoint))?;
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

fn check_matches(state: &StateFile, workload: &Workload) -> Result<(), ClientError> {
    let checks = [
        ("records", state.versions.len() as u64, workload.records),
        ("seed", state.seed, workload.seed),
        ("value size", state.value_size, workload.value_size as u64),
    ];
    for (what, file, given) in checks {
        if file != given {
            return Err(ClientError::StateMismatch { what, file, given });
        }
    }
    Ok(())
}
