//! The migration transaction without containerd, runc or CRIU: a forked writer is migrated over
//! TCP to a real [`Receiver`], whose side is played step by step, so that the connection can be
//! lost exactly where it matters. The source must resume only when the destination cannot run
//! the container, must learn a commit it missed by asking, and must stay frozen and in doubt
//! when it cannot learn or the destination lost the container.

use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use crate::destination::limits::{Budget, Limits};
use crate::destination::receive::{receive_images, receive_rounds};
use crate::destination::Receiver;
use crate::record::{Phase, Role, Store};
use crate::source::{self, MigrateParams, SourceError};
use crate::staging::StagingStore;
use crate::testsupport::{params, Writer, WriterHooks};
use crate::wire::{Auth, Control, ControlCode, Kind};

fn key() -> Auth {
    Auth::Key(vec![0x42; 32])
}

/// A receiver on a free loopback port; its address.
fn receiver(store: &Store, linger: Duration) -> (Receiver, String) {
    crate::testsupport::loopback_receiver(store, &key(), |options| options.linger = linger)
}

struct Run {
    params: MigrateParams,
    source: thread::JoinHandle<(Result<source::MigrationReport, SourceError>, bool, bool)>,
    _writer: Writer,
    _dir: tempfile::TempDir,
}

/// Starts the source migrating a fresh writer to `address`.
fn start_source(address: &str) -> Run {
    let writer = Writer::start();
    let dir = tempfile::tempdir().unwrap();
    let mut params = params(&dir.path().join("source"), &key());
    params.destination = address.to_string();
    let mut hooks = WriterHooks::new(&writer);
    let p = params.clone();
    let source = thread::spawn(move || {
        let result = source::migrate(&p, &mut hooks);
        (result, hooks.frozen, hooks.resumed)
    });
    Run {
        params,
        source,
        _writer: writer,
        _dir: dir,
    }
}

fn source_phase(params: &MigrateParams) -> Phase {
    params
        .store
        .read(&params.migration_id, Role::Source)
        .unwrap()
        .unwrap()
        .phase
}

#[test]
fn the_source_learns_a_commit_it_missed_by_asking() {
    let dst_dir = tempfile::tempdir().unwrap();
    let store = Store::new(dst_dir.path());
    let (mut receiver, address) = receiver(&store, Duration::from_secs(30));
    let run = start_source(&address);
    let mut session = receiver.accept_source(|_| {}).unwrap();
    let images = dst_dir.path().join("images");
    std::fs::create_dir(&images).unwrap();
    receive_rounds(
        &mut session,
        None,
        &mut StagingStore::default(),
        &Limits::unlimited(),
    )
    .unwrap();
    receive_images(
        &mut session,
        &images,
        &mut Budget::new(&Limits::unlimited()),
    )
    .unwrap();
    // The connection is lost right after the images; the destination goes on alone.
    drop(session);
    let txn = receiver.txn().clone();
    txn.enter(Phase::Restoring, None).unwrap();
    txn.decide_resume().unwrap();
    thread::sleep(Duration::from_millis(1500));
    txn.enter(Phase::Committed, None).unwrap();
    receiver.linger();

    let (result, frozen, resumed) = run.source.join().unwrap();
    let report = result.unwrap();
    assert!(report.learnt_by_query && frozen && !resumed);
    assert_eq!(source_phase(&run.params), Phase::Committed);
    let record = store
        .read(&run.params.migration_id, Role::Destination)
        .unwrap()
        .unwrap();
    assert!(record.acknowledged, "the source acknowledged the answer");
}

#[test]
fn a_destination_that_lost_the_container_leaves_the_source_frozen_in_doubt() {
    let dst_dir = tempfile::tempdir().unwrap();
    let store = Store::new(dst_dir.path());
    let (mut receiver, address) = receiver(&store, Duration::from_secs(5));
    let run = start_source(&address);
    let mut session = receiver.accept_source(|_| {}).unwrap();
    let images = dst_dir.path().join("images");
    std::fs::create_dir(&images).unwrap();
    receive_rounds(
        &mut session,
        None,
        &mut StagingStore::default(),
        &Limits::unlimited(),
    )
    .unwrap();
    receive_images(
        &mut session,
        &images,
        &mut Budget::new(&Limits::unlimited()),
    )
    .unwrap();
    let txn = receiver.txn().clone();
    txn.enter(Phase::Restoring, None).unwrap();
    txn.decide_resume().unwrap();
    assert_eq!(
        txn.fail("its init was killed by signal 9").unwrap(),
        Phase::Lost
    );
    session
        .send(
            Kind::Control,
            &Control {
                code: ControlCode::Lost as i32,
                message: "its init was killed by signal 9".into(),
            },
        )
        .unwrap();
    let ack: Control = session.expect(Kind::Control).unwrap();
    assert_eq!(ack.code, ControlCode::Ack as i32);

    let (result, frozen, resumed) = run.source.join().unwrap();
    let err = result.unwrap_err();
    assert!(matches!(err, SourceError::InDoubt { .. }), "{err}");
    assert!(err.to_string().contains("signal 9"), "{err}");
    assert!(
        frozen && !resumed,
        "never resumed on its own after the point of no return"
    );
    assert_eq!(source_phase(&run.params), Phase::InDoubt);
    drop(session);
    receiver.linger();
}

#[test]
fn an_unanswered_question_leaves_the_source_in_doubt() {
    let dst_dir = tempfile::tempdir().unwrap();
    let store = Store::new(dst_dir.path());
    let (mut receiver, address) = receiver(&store, Duration::ZERO);
    let run = start_source(&address);
    let mut session = receiver.accept_source(|_| {}).unwrap();
    let images = dst_dir.path().join("images");
    std::fs::create_dir(&images).unwrap();
    receive_rounds(
        &mut session,
        None,
        &mut StagingStore::default(),
        &Limits::unlimited(),
    )
    .unwrap();
    receive_images(
        &mut session,
        &images,
        &mut Budget::new(&Limits::unlimited()),
    )
    .unwrap();
    // The destination vanishes with the images (nobody answers on its address any more).
    drop(session);
    receiver.linger();

    let (result, frozen, resumed) = run.source.join().unwrap();
    let err = result.unwrap_err();
    assert!(matches!(err, SourceError::InDoubt { .. }), "{err}");
    assert!(frozen && !resumed);
    let record = run
        .params
        .store
        .read(&run.params.migration_id, Role::Source)
        .unwrap()
        .unwrap();
    assert!(record.in_doubt(), "{record:?}");
    assert!(
        record
            .reason
            .as_deref()
            .unwrap_or("")
            .contains("could not say"),
        "{record:?}"
    );
}

#[test]
fn a_destination_gone_before_the_images_lets_the_source_resume() {
    let dst_dir = tempfile::tempdir().unwrap();
    let store = Store::new(dst_dir.path());
    let (mut receiver, address) = receiver(&store, Duration::ZERO);
    let run = start_source(&address);
    let (tx, rx) = mpsc::channel();
    let session = receiver.accept_source(|_| {}).unwrap();
    // The destination dies during pre-copy.
    drop(session);
    receiver.linger();
    let _ = tx.send(());
    rx.recv().unwrap();

    let (result, _frozen, resumed) = run.source.join().unwrap();
    assert!(result.is_err());
    let phase = source_phase(&run.params);
    assert_eq!(phase, Phase::Resumed);
    // Resumed if it was frozen; never left frozen.
    let record = run
        .params
        .store
        .read(&run.params.migration_id, Role::Source)
        .unwrap()
        .unwrap();
    let was_frozen = record.history.iter().any(|s| s.phase == Phase::Frozen);
    assert_eq!(resumed, was_frozen);
}
