//! The events a shim owes containerd, in the shim's terms (service.rs publishes them as
//! containerd's protobuf events).

use std::path::PathBuf;

use super::process::ExitInfo;
use crate::io::StdioConfig;

/// Events containerd expects from a shim.
#[derive(Debug, Clone)]
pub enum TaskEvent {
    Create {
        id: String,
        bundle: PathBuf,
        stdio: StdioConfig,
        pid: u32,
        checkpoint: String,
    },
    Start {
        id: String,
        pid: u32,
    },
    Exit {
        id: String,
        exec_id: Option<String>,
        pid: u32,
        exit: ExitInfo,
    },
    ExecAdded {
        id: String,
        exec_id: String,
    },
    ExecStarted {
        id: String,
        exec_id: String,
        pid: u32,
    },
    Paused {
        id: String,
    },
    Resumed {
        id: String,
    },
    Oom {
        id: String,
    },
    Checkpointed {
        id: String,
    },
    Delete {
        id: String,
        pid: u32,
        exit: Option<ExitInfo>,
    },
}

/// Where the shim sends task events.
pub trait EventSink: Send + Sync {
    fn publish(&self, event: TaskEvent);
}
