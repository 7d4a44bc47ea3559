//! `load`: writes every key at version 0, pipelined.

use std::time::Instant;

use serde::Serialize;

use super::{conn_error, pipelined, Batch, ClientError, Workload, BATCH, BULK_TIMEOUT};
use crate::conn::{self, Conn, ConnError};
use crate::resp::{encode_command, Value};
use crate::values::{fill_value, key_name};

#[derive(Debug, Serialize)]
pub struct LoadReport {
    pub records: u64,
    pub seconds: f64,
}

pub fn load(endpoint: &str, workload: &Workload) -> Result<LoadReport, ClientError> {
    let started = Instant::now();
    let addr = conn::resolve(endpoint).map_err(conn_error(endpoint))?;
    let mut conn = Conn::connect(addr, BULK_TIMEOUT).map_err(conn_error(endpoint))?;
    let mut value = Vec::with_capacity(workload.value_size);
    let batches = (0..workload.records).step_by(BATCH as usize).map(|first| {
        let last = (first + BATCH).min(workload.records);
        let mut commands = Vec::with_capacity((last - first) as usize * (workload.value_size + 64));
        for index in first..last {
            value.clear();
            fill_value(workload.seed, index, 0, workload.value_size, &mut value);
            encode_command(&mut commands, &[b"SET", key_name(index).as_bytes(), &value]);
        }
        Batch {
            commands,
            replies: (last - first) as usize,
            context: last,
        }
    });
    let mut last_report = Instant::now();
    pipelined(&mut conn, batches, |done, replies| {
        if let Some(bad) = replies
            .into_iter()
            .find(|r| *r != Value::Simple(b"OK".to_vec()))
        {
            return Err(conn::unexpected(bad));
        }
        if last_report.elapsed().as_secs() >= 2 {
            last_report = Instant::now();
            eprintln!(
                "load: {done}/{} keys ({:.0}%), {:.1}s",
                workload.records,
                100.0 * done as f64 / workload.records as f64,
                started.elapsed().as_secs_f64()
            );
        }
        Ok(())
    })
    .map_err(|e: ConnError| conn_error(endpoint)(e))?;
    Ok(LoadReport {
        records: workload.records,
        seconds: started.elapsed().as_secs_f64(),
    })
}
