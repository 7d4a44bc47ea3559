//! Durable records of migrations: each end writes the phase of every migration it takes part in
//! *before* it acts on it (atomic write: a temporary file, fsync, rename, fsync of the
//! directory), so that a crash or restart anywhere resolves the same way, and `pclive status`
//! can say where a migration stands.
//!
//! One JSON file per migration and role, `<state dir>/migrations/<id>.<role>.json`.
//!
//! The phases, and what each promises (docs/design-notes.md has the state machines):
//!
//! | role        | phase                 | the container                                        |
//! |-------------|-----------------------|------------------------------------------------------|
//! | source      | `precopy`             | runs here                                            |
//! | source      | `frozen`              | frozen here; resumes here on any failure             |
//! | source      | `images-sent`         | frozen here; the destination may run it: never resumes here on its own |
//! | source      | `destination-running` | runs on the destination (its memory still filling)   |
//! | source      | `committed`           | runs on the destination; this copy is being removed  |
//! | source      | `done`                | runs on the destination; this copy is gone (final)   |
//! | source      | `resumed`             | the migration failed before the destination ran it; runs here (final) |
//! | source      | `in-doubt`            | frozen here; the outcome is unknown or needs an operator (`pclive resolve`) |
//! | source      | `source-lost`         | the source's shim died and containerd stopped this copy (final) |
//! | destination | `listening`           | not here yet                                         |
//! | destination | `receiving`           | not here yet; pre-copy under way                     |
//! | destination | `restoring`           | being restored here; never resumed yet                |
//! | destination | `running`             | resumed here (the point of no return); filling memory |
//! | destination | `committed`           | runs here with every page installed (final)          |
//! | destination | `aborted`             | never resumed here; the source was told to resume (final) |
//! | destination | `lost`                | resumed here, then died before every page was installed (final) |

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Which end of a migration a record describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    Source,
    Destination,
}

impl Role {
    fn name(self) -> &'static str {
        match self {
            Role::Source => "source",
            Role::Destination => "destination",
        }
    }
}

/// Where a migration stands (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    // Source.
    Precopy,
    Frozen,
    ImagesSent,
    DestinationRunning,
    Committed,
    Done,
    Resumed,
    InDoubt,
    SourceLost,
    // Destination.
    Listening,
    Receiving,
    Restoring,
    Running,
    Aborted,
    Lost,
}

impl Phase {
    /// Nothing more will happen to this migration at this end.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            Phase::Done | Phase::Resumed | Phase::SourceLost | Phase::Aborted | Phase::Lost
        ) || self == Phase::Committed
    }

    pub fn name(self) -> &'static str {
        match self {
            Phase::Precopy => "precopy",
            Phase::Frozen => "frozen",
            Phase::ImagesSent => "images-sent",
            Phase::DestinationRunning => "destination-running",
            Phase::Committed => "committed",
            Phase::Done => "done",
            Phase::Resumed => "resumed",
            Phase::InDoubt => "in-doubt",
            Phase::SourceLost => "source-lost",
            Phase::Listening => "listening",
            Phase::Receiving => "receiving",
            Phase::Restoring => "restoring",
            Phase::Running => "running",
            Phase::Aborted => "aborted",
            Phase::Lost => "lost",
        }
    }

    /// Parses [`Phase::name`].
    pub fn parse(name: &str) -> Option<Phase> {
        ALL_PHASES.iter().copied().find(|p| p.name() == name)
    }
}

const ALL_PHASES: [Phase; 15] = [
    Phase::Precopy,
    Phase::Frozen,
    Phase::ImagesSent,
    Phase::DestinationRunning,
    Phase::Committed,
    Phase::Done,
    Phase::Resumed,
    Phase::InDoubt,
    Phase::SourceLost,
    Phase::Listening,
    Phase::Receiving,
    Phase::Restoring,
    Phase::Running,
    Phase::Aborted,
    Phase::Lost,
];

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One phase change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Step {
    pub phase: Phase,
    pub unix: f64,
}

/// What one end knows about one migration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub migration_id: String,
    pub container: String,
    pub role: Role,
    /// The other end (host:port of the destination, or the source's address).
    pub peer: String,
    pub phase: Phase,
    /// Why the migration is in this phase, when it did not go as planned.
    pub reason: Option<String>,
    pub history: Vec<Step>,
    /// Destination: the source has the final outcome (it acknowledged it).
    #[serde(default)]
    pub acknowledged: bool,
    /// Source: an operator's decision on an in-doubt migration (`resume-source` or
    /// `discard-source`), recorded before it is carried out.
    #[serde(default)]
    pub resolution: Option<String>,
    /// Source: the key file that authenticated the migration (for `pclive resolve`).
    #[serde(default)]
    pub key_file: Option<String>,
    /// Source: the final phase the destination reported (`committed`, `aborted` or `lost`),
    /// recorded when it said so; `pclive resolve` relies on it when the destination can no
    /// longer be asked.
    #[serde(default)]
    pub destination_said: Option<Phase>,
    /// Source: the container's network interfaces taken down for the final dump because its
    /// address moves to the destination (`--move-address`), recorded before they went down;
    /// whoever resumes this copy brings them up again first.
    #[serde(default)]
    pub moved_links: Vec<String>,
}

impl Record {
    pub fn new(migration_id: &str, container: &str, role: Role, peer: &str, phase: Phase) -> Self {
        Record {
            migration_id: migration_id.to_string(),
            container: container.to_string(),
            role,
            peer: peer.to_string(),
            phase,
            reason: None,
            history: vec![Step {
                phase,
                unix: crate::clock::unix_now(),
            }],
            acknowledged: false,
            resolution: None,
            key_file: None,
            destination_said: None,
            moved_links: Vec::new(),
        }
    }

    /// Moves to `phase` (with a reason, if it did not go as planned).
    pub fn enter(&mut self, phase: Phase, reason: Option<String>) {
        self.phase = phase;
        if reason.is_some() {
            self.reason = reason;
        }
        self.history.push(Step {
            phase,
            unix: crate::clock::unix_now(),
        });
    }

    /// The source is frozen and its fate is unknown or needs an operator.
    pub fn in_doubt(&self) -> bool {
        self.role == Role::Source && self.phase == Phase::InDoubt
    }

    pub fn started_unix(&self) -> f64 {
        self.history.first().map_or(0.0, |s| s.unix)
    }

    pub fn updated_unix(&self) -> f64 {
        self.history.last().map_or(0.0, |s| s.unix)
    }
}

/// A fresh migration id: 16 random bytes in hex.
pub fn new_migration_id() -> io::Result<String> {
    let mut bytes = [0u8; 16];
    fs::File::open("/dev/urandom").and_then(|mut f| io::Read::read_exact(&mut f, &mut bytes))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("cannot record the migration's phase in {path}: {source}. The migration stops here: a phase that is not on disk must not be acted on")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot read migration record {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("migration record {path} is corrupt: {source}")]
    Corrupt {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{0:?} is not a migration id (32 hex digits)")]
    BadId(String),
}

/// The records of one host's containerd instance.
#[derive(Debug, Clone)]
pub struct Store {
    dir: PathBuf,
}

fn valid_id(id: &str) -> bool {
    id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit())
}

impl Store {
    /// The records under `state_dir` (created on the first write).
    pub fn new(state_dir: &Path) -> Self {
        Store {
            dir: state_dir.join("migrations"),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, id: &str, role: Role) -> Result<PathBuf, RecordError> {
        if !valid_id(id) {
            return Err(RecordError::BadId(id.to_string()));
        }
        Ok(self.dir.join(format!("{id}.{}.json", role.name())))
    }

    /// Writes `record` durably: when this returns, a crash cannot lose it or leave it torn.
    pub fn write(&self, record: &Record) -> Result<(), RecordError> {
        let path = self.path(&record.migration_id, record.role)?;
        let err = |source| RecordError::Write {
            path: path.clone(),
            source,
        };
        crate::fault::point("record::write").map_err(err)?;
        fs::create_dir_all(&self.dir).map_err(err)?;
        let tmp = path.with_extension("json.tmp");
        let json = serde_json::to_vec_pretty(record).expect("a record always serialises");
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(err)?;
        file.write_all(&json).map_err(err)?;
        file.sync_all().map_err(err)?;
        drop(file);
        fs::rename(&tmp, &path).map_err(err)?;
        fs::File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(err)?;
        Ok(())
    }

    /// The record of migration `id` at this end, if any.
    pub fn read(&self, id: &str, role: Role) -> Result<Option<Record>, RecordError> {
        let path = self.path(id, role)?;
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|source| RecordError::Corrupt { path, source }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(RecordError::Read { path, source }),
        }
    }

    /// Every record, oldest first (unreadable files are reported, not skipped).
    pub fn list(&self) -> Result<Vec<Record>, RecordError> {
        let entries = match fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => {
                return Err(RecordError::Read {
                    path: self.dir.clone(),
                    source,
                })
            }
        };
        let mut records = Vec::new();
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().and_then(|e| e.to_str()) != Some("json") {
                continue;
            }
            let bytes = fs::read(&path).map_err(|source| RecordError::Read {
                path: path.clone(),
                source,
            })?;
            records.push(
                serde_json::from_slice::<Record>(&bytes)
                    .map_err(|source| RecordError::Corrupt { path, source })?,
            );
        }
        records.sort_by(|a, b| a.started_unix().total_cmp(&b.started_unix()));
        Ok(records)
    }

    /// The newest record of `container` in `role`.
    pub fn latest(&self, container: &str, role: Role) -> Result<Option<Record>, RecordError> {
        Ok(self
            .list()?
            .into_iter()
            .rev()
            .find(|r| r.container == container && r.role == role))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_survive_a_round_trip_and_list_newest_last() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path());
        assert!(store.list().unwrap().is_empty());
        let id = new_migration_id().unwrap();
        let mut record = Record::new(&id, "app", Role::Source, "10.0.0.2:7411", Phase::Precopy);
        store.write(&record).unwrap();
        record.enter(Phase::InDoubt, Some("lost contact".into()));
        store.write(&record).unwrap();
        let read = store.read(&id, Role::Source).unwrap().unwrap();
        assert_eq!(read, record);
        assert!(read.in_doubt());
        assert_eq!(read.history.len(), 2);
        assert_eq!(store.read(&id, Role::Destination).unwrap(), None);
        let later = Record::new(
            &new_migration_id().unwrap(),
            "app",
            Role::Source,
            "x",
            Phase::Precopy,
        );
        store.write(&later).unwrap();
        assert_eq!(
            store
                .latest("app", Role::Source)
                .unwrap()
                .unwrap()
                .migration_id,
            later.migration_id
        );
        // No temporary file is left behind.
        let names: Vec<String> = fs::read_dir(store.dir())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(names.iter().all(|n| n.ends_with(".json")), "{names:?}");
    }

    #[test]
    fn hostile_ids_and_corrupt_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path());
        for bad in ["../../etc/passwd", "", "zz", &"a".repeat(33)] {
            assert!(matches!(
                store.read(bad, Role::Source),
                Err(RecordError::BadId(_))
            ));
        }
        fs::create_dir_all(store.dir()).unwrap();
        fs::write(
            store.dir().join(format!("{}.source.json", "0".repeat(32))),
            b"{not json",
        )
        .unwrap();
        assert!(matches!(store.list(), Err(RecordError::Corrupt { .. })));
    }

    #[test]
    fn phases_have_names_and_final_ones_are_known() {
        for phase in ALL_PHASES {
            assert_eq!(Phase::parse(phase.name()), Some(phase));
        }
        assert!(Phase::Committed.is_final() && Phase::Lost.is_final());
        assert!(!Phase::InDoubt.is_final() && !Phase::Running.is_final());
    }
}
