//! The engine's migration pipeline end to end, without containerd, runc or CRIU: a running
//! writer process is pre-copied round by round over an authenticated session into the
//! receiver's staging store, frozen for the last round, its (stand-in) lazy-dump images follow,
//! and the receiver's lazy-pages server installs every page into a stand-in restored task (a
//! region of this test process at the writer's addresses). The result must equal the frozen
//! writer's memory byte for byte, and the receiver commits.

use std::fs;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::mpsc;
use std::thread;

use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};

use crate::destination::txn::GateRefused;
use crate::destination::{gate, receive_and_serve, Cancel, DestinationTxn, Limits};
use crate::events::ServerEvent;
use crate::grant::Grant;
use crate::lazy::socket::{RESTORE_FINISHED, SOCKET_NAME};
use crate::lazy::ServerConfig;
use crate::page::SIZE_U64 as PAGE;
use crate::record::{Phase, Role, Store};
use crate::source::{self, send_images};
use crate::testsupport::{params, Writer, WriterHooks};
use crate::wire::{accept, connect, Auth, Control, ControlCode, Intent, Kind};

#[test]
fn a_running_process_migrates_through_precopy_images_and_lazy_install() {
    let writer = Writer::start();
    // This process's memory gets a userfaultfd below: no other test may fork meanwhile.
    let _no_forks = crate::testsupport::own_memory_uffd();
    let (base, len, pid) = (writer.base, writer.len, writer.pid);
    let dir = tempfile::tempdir().unwrap();
    let (dst_images, work) = (dir.path().join("dst-images"), dir.path().join("work"));
    for d in [&dst_images, &work] {
        fs::create_dir(d).unwrap();
    }

    // Destination: rounds into the staging store, then the images, then the lazy server.
    let (a, b) = UnixStream::pair().unwrap();
    let key = Auth::Key(b"a pre-shared key of 32 bytes....".to_vec());
    let dst_key = key.clone();
    let (ready_tx, ready_rx) = mpsc::channel();
    let (dst_images2, work2) = (dst_images.clone(), work.clone());
    let dst_store = Store::new(&dir.path().join("dst-state"));
    let txn = DestinationTxn::new(dst_store.clone());
    let dst_txn = txn.clone();
    let destination = thread::spawn(move || {
        let mut session = accept(b, &dst_key).unwrap();
        let intent = session.intent().clone();
        dst_txn
            .begin(&intent.migration_id, &intent.container, "test")
            .unwrap();
        let config = ServerConfig::new(dst_images2, work2);
        let mut verdicts = 0;
        let stats = receive_and_serve(
            &mut session,
            None,
            &Limits::unlimited(),
            &config,
            &Grant::default(),
            None,
            None,
            &dst_txn,
            &Cancel::default(),
            |event| {
                if matches!(event, ServerEvent::Ready { .. }) {
                    let _ = ready_tx.send(());
                }
            },
            |_| {
                verdicts += 1;
                Ok(())
            },
        )
        .unwrap();
        assert_eq!(verdicts, 1, "the commit waits for one verdict");
        stats
    });

    // Source: rounds while the writer runs, freeze, last round, images, then it waits for the
    // destination's "restored" and commit.
    let source_work = dir.path().join("source");
    let params = params(&source_work, &key);
    let intent = Intent::migrate(&params.migration_id, &params.container);
    let session = connect(a, &key, &intent).unwrap();
    let (src_store, id) = (params.store.clone(), params.migration_id.clone());
    let mut hooks = WriterHooks::new(&writer);
    let source = thread::spawn(move || {
        let report = source::migrate_over(session, &params, &mut hooks);
        (report, hooks.frozen, hooks.resumed)
    });

    // The "restored task": the writer's addresses in this process, registered for lazy faults.
    writer.map_stand_in();
    let uffd = crate::uffd::open_like_criu().unwrap();
    uffd.register_missing(base, len as u64).unwrap();
    ready_rx.recv().unwrap();
    let restorer = UnixStream::connect(work.join(SOCKET_NAME)).unwrap();
    let mut writer_end = &restorer;
    io::Write::write_all(&mut writer_end, &1i32.to_le_bytes()).unwrap();
    let byte = [0u8; 1];
    let fds = [uffd.as_raw()];
    sendmsg::<()>(
        restorer.as_raw_fd(),
        &[io::IoSlice::new(&byte)],
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::empty(),
        None,
    )
    .unwrap();
    drop(uffd);
    // CRIU's post-restore action script: the tasks resume only once the gate recorded it.
    assert_eq!(gate::ask(&dst_images, "post-restore").unwrap(), "go");
    assert_eq!(txn.phase(), Some(Phase::Running));
    io::Write::write_all(&mut writer_end, &RESTORE_FINISHED.to_le_bytes()).unwrap();

    // The destination said the tasks run, then (fill complete) it committed.
    let (report, frozen, resumed) = source.join().unwrap();
    let report = report.unwrap();
    assert!(
        frozen && !resumed,
        "committed: the source stays frozen for its runtime to remove"
    );
    assert!(report.restored_unix.is_some(), "{report:?}");
    let report = report.precopy;
    // Both ends recorded the commit; the destination knows the source has it.
    let src_record = src_store.read(&id, Role::Source).unwrap().unwrap();
    assert_eq!(src_record.phase, Phase::Committed);
    let phases: Vec<Phase> = src_record.history.iter().map(|s| s.phase).collect();
    assert_eq!(
        phases,
        [
            Phase::Precopy,
            Phase::Frozen,
            Phase::ImagesSent,
            Phase::DestinationRunning,
            Phase::Committed
        ]
    );
    let dst_record = dst_store.read(&id, Role::Destination).unwrap().unwrap();
    assert_eq!(dst_record.phase, Phase::Committed);
    assert!(dst_record.acknowledged);
    let stats = destination.join().unwrap();
    assert!(report.rounds.len() >= 2 && report.rounds.last().unwrap().frozen);
    assert_eq!(
        stats.bytes, len as u64,
        "every page of the region was installed"
    );

    // Byte for byte: the installed region equals the frozen writer's memory.
    let mut frozen = vec![0u8; len];
    let local = libc::iovec {
        iov_base: frozen.as_mut_ptr().cast(),
        iov_len: len,
    };
    let remote = libc::iovec {
        iov_base: base as *mut libc::c_void,
        iov_len: len,
    };
    // SAFETY: reads the stopped child's region into `frozen`, which holds `len` bytes.
    let n = unsafe { libc::process_vm_readv(pid, &local, 1, &remote, 1, 0) };
    assert_eq!(n, len as isize);
    // SAFETY: the region is mapped (above) and every page is installed.
    let installed = unsafe { std::slice::from_raw_parts(base as *const u8, len) };
    let first_difference = installed.iter().zip(&frozen).position(|(a, b)| a != b);
    assert_eq!(
        first_difference, None,
        "installed memory differs from the source"
    );
    drop(writer);
}

#[test]
fn a_failing_destination_tells_the_source_to_abort_and_why() {
    use crate::wire::RoundEnd;

    let dir = tempfile::tempdir().unwrap();
    let (empty_images, dst_images, work) = (
        dir.path().join("src"),
        dir.path().join("dst"),
        dir.path().join("work"),
    );
    for d in [&empty_images, &dst_images, &work] {
        fs::create_dir(d).unwrap();
    }
    let (a, b) = UnixStream::pair().unwrap();
    let key = Auth::Key(vec![3; 32]);
    let dst_key = key.clone();
    let dst_store = Store::new(&dir.path().join("dst-state"));
    let txn = DestinationTxn::new(dst_store.clone());
    let id = crate::record::new_migration_id().unwrap();
    txn.begin(&id, "app", "test").unwrap();
    let dst_txn = txn.clone();
    let destination = thread::spawn(move || {
        let mut session = accept(b, &dst_key).unwrap();
        let config = ServerConfig::new(dst_images, work);
        receive_and_serve(
            &mut session,
            None,
            &Limits::unlimited(),
            &config,
            &Grant::default(),
            None,
            None,
            &dst_txn,
            &Cancel::default(),
            |_| {},
            |_| Ok(()),
        )
    });
    let mut session = connect(a, &key, &Intent::default()).unwrap();
    session
        .send(
            Kind::RoundEnd,
            &RoundEnd {
                round: 1,
                pages: 0,
                bytes: 0,
                last: true,
                ..Default::default()
            },
        )
        .unwrap();
    // A final dump without pstree.img: the destination cannot restore it.
    send_images(&mut session, &empty_images).unwrap();
    let answer: Control = session.expect(Kind::Control).unwrap();
    assert_eq!(answer.code, ControlCode::Abort as i32);
    assert!(answer.message.contains("pstree.img"), "{}", answer.message);
    assert!(destination.join().unwrap().is_err());
    // Recorded before the source was told; the restored tasks may never resume now.
    let record = dst_store.read(&id, Role::Destination).unwrap().unwrap();
    assert_eq!(record.phase, Phase::Aborted);
    assert!(matches!(
        txn.decide_resume(),
        Err(GateRefused::Phase(Phase::Aborted))
    ));
}

/// The eager variant: the same pre-copy, then the receiver completes the lazy dump's images from
/// its staging store; the assembled pages file must equal the frozen writer byte for byte. The
/// restore's outcome decides between "restored" + commit and abort.
#[test]
fn a_running_process_migrates_into_complete_images_for_an_eager_restore() {
    use crate::destination::{receive_and_restore_eagerly, RestoreOutcome};
    use crate::images::{read_pagemap, PE_PRESENT};

    for outcome in [
        RestoreOutcome::Restored,
        RestoreOutcome::Failed {
            reason: "runc restore: no such file".into(),
        },
    ] {
        let writer = Writer::start();
        let (base, len, pid) = (writer.base, writer.len, writer.pid);
        let dir = tempfile::tempdir().unwrap();
        let (src_work, dst_images) = (dir.path().join("src"), dir.path().join("dst"));
        fs::create_dir(&dst_images).unwrap();
        let (a, b) = UnixStream::pair().unwrap();
        let key = Auth::Key(vec![7; 32]);
        let dst_key = key.clone();
        let (dst_images2, outcome2) = (dst_images.clone(), outcome.clone());
        let dst_store = Store::new(&dir.path().join("dst-state"));
        let destination = thread::spawn(move || {
            let mut session = accept(b, &dst_key).unwrap();
            let txn = DestinationTxn::new(dst_store);
            let intent = session.intent().clone();
            txn.begin(&intent.migration_id, &intent.container, "test")
                .unwrap();
            let mut assembled = false;
            let result = receive_and_restore_eagerly(
                &mut session,
                None,
                &Limits::unlimited(),
                &dst_images2,
                &Grant::default(),
                None,
                &txn,
                &Cancel::default(),
                |event| assembled |= matches!(event, ServerEvent::Assembled(_)),
                || {
                    // What the shim's restore would read: every page is in the images now.
                    let map = read_pagemap(&dst_images2, 1).unwrap();
                    assert!(map.ranges.iter().all(|r| r.flags == PE_PRESENT), "{map:?}");
                    // CRIU's post-restore action script asks the gate (a restore that fails
                    // fails before it).
                    if outcome2 == RestoreOutcome::Restored {
                        assert_eq!(gate::ask(&dst_images2, "post-restore").unwrap(), "go");
                    }
                    outcome2
                },
            );
            assert!(assembled);
            result
        });

        let params = params(&src_work, &key);
        let intent = Intent::migrate(&params.migration_id, &params.container);
        let session = connect(a, &key, &intent).unwrap();
        let mut hooks = WriterHooks::new(&writer);
        let migrated = source::migrate_over(session, &params, &mut hooks);
        let result = destination.join().unwrap();
        assert!(hooks.frozen);
        if let RestoreOutcome::Failed { reason } = &outcome {
            let err = migrated.unwrap_err().to_string();
            assert!(err.contains(reason.as_str()), "{err}");
            assert!(hooks.resumed, "an aborted migration resumes the source");
            assert!(result.is_err());
            continue;
        }
        let migrated = migrated.unwrap();
        assert!(!hooks.resumed && migrated.restored_unix.is_some());
        let report = result.unwrap();
        assert_eq!(report.tasks, 1);

        // The assembled pages, laid out at their addresses (holes are zero), equal the frozen
        // writer's memory.
        let map = read_pagemap(&dst_images, 1).unwrap();
        let pages = fs::read(dst_images.join(format!("pages-{}.img", map.pages_id))).unwrap();
        let mut assembled = vec![0u8; len];
        for r in &map.ranges {
            let at = (r.vaddr - base) as usize;
            let n = (r.nr_pages * PAGE) as usize;
            let from = r.file_offset as usize;
            assembled[at..at + n].copy_from_slice(&pages[from..from + n]);
        }
        let mut frozen = vec![0u8; len];
        let local = libc::iovec {
            iov_base: frozen.as_mut_ptr().cast(),
            iov_len: len,
        };
        let remote = libc::iovec {
            iov_base: base as *mut libc::c_void,
            iov_len: len,
        };
        // SAFETY: reads the stopped child's region into `frozen`, which holds `len` bytes.
        let n = unsafe { libc::process_vm_readv(pid, &local, 1, &remote, 1, 0) };
        assert_eq!(n, len as isize);
        let first_difference = assembled.iter().zip(&frozen).position(|(a, b)| a != b);
        assert_eq!(
            first_difference, None,
            "assembled memory differs from the source"
        );
        drop(writer);
    }
}
