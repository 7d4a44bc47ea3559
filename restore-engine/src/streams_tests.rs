//! Page streams (`--streams N`) end to end without containerd: a running writer pre-copied over
//! TCP to a real [`Receiver`] on three streams besides the main connection; a round's page
//! staged only after the previous round is complete on every stream; and what a receiver
//! refuses: streams that do not add up to what the round's end says, a stream of another
//! migration, streams that never come.

use std::os::unix::net::UnixStream;
use std::thread;
use std::time::Duration;

use crate::cancel::Cancel;
use crate::destination::limits::{Budget, Limits};
use crate::destination::receive::{receive_rounds, receive_rounds_reporting, ReceiveError};
use crate::destination::{DestinationError, ReceiveStreams, Receiver};
use crate::memory::HashTracker;
use crate::page;
use crate::policy::ConvergencePolicy;
use crate::record::Store;
use crate::source::streams::PageStreams;
use crate::source::{self, Sender, TaskIds};
use crate::staging::{PageRef, StagingStore};
use crate::testsupport::{assert_staged, region_of, Writer};
use crate::wire::pages::PageFrame;
use crate::wire::{accept, connect, Auth, Control, ControlCode, Intent, Kind, RoundEnd, Session};

fn key() -> Auth {
    Auth::Key(vec![0x17; 32])
}

/// A receiver on a free loopback port (handshakes and streams given `wait`); its address.
fn receiver(store: &Store, wait: Duration) -> (Receiver, String) {
    crate::testsupport::loopback_receiver(store, &key(), |options| options.handshake_timeout = wait)
}

#[test]
fn a_writer_migrates_over_three_page_streams_with_its_memory_intact() {
    let writer = Writer::start();
    let dir = tempfile::tempdir().unwrap();
    let (mut receiver, address) = receiver(&Store::new(dir.path()), Duration::from_secs(10));
    let (id, pid) = (crate::record::new_migration_id().unwrap(), writer.pid);
    let tasks = [TaskIds {
        host_pid: pid as u32,
        ns_pid: 1,
    }];
    let source = thread::spawn(move || {
        let intent = Intent::migrate(&id, "writer").with_streams(3);
        let mut session = source::connect(&address, &key(), &intent).unwrap();
        let streams = (0..3)
            .map(|i| source::connect(&address, &key(), &Intent::stream(&id, i)).unwrap())
            .collect();
        let policy = ConvergencePolicy {
            max_rounds: 4,
            ..Default::default()
        };
        Sender::new(&mut session)
            .streams(Some(PageStreams::start(streams).unwrap()))
            .run(
                || Ok(tasks.to_vec()),
                &mut HashTracker::default(),
                &mut crate::memory::NoQuiesce,
                &policy,
                || {
                    crate::testsupport::stop(pid);
                    Ok(())
                },
                |_| {},
            )
            .unwrap()
    });
    let mut session = receiver.accept_source(|_| {}).unwrap();
    let lanes = receiver.take_streams();
    assert_eq!(lanes.len(), 3, "the three streams were accepted");
    let streams = ReceiveStreams::start(lanes, &Limits::unlimited(), &Cancel::default()).unwrap();
    let mut store = StagingStore::default();
    let mut ends = Vec::new();
    let received = receive_rounds_reporting(
        &mut session,
        Some(&streams),
        &mut store,
        None,
        &Budget::new(&Limits::unlimited()),
        &Cancel::default(),
        |end, _| ends.push(end.stream_frames.clone()),
    )
    .unwrap();
    let report = source.join().unwrap();
    assert!(report.rounds.len() >= 2, "{report:?}");
    assert_eq!(
        received.pages,
        report.rounds.iter().map(|r| r.pages).sum::<u64>()
    );
    // The first round (the whole region: 4096 pages, several frames) used every stream.
    assert!(ends[0].iter().all(|&frames| frames > 0), "{ends:?}");
    assert_staged(&store, &writer, &region_of(&writer));
}

/// A main session and `n` streams over socket pairs, the receiving ends started.
fn streams_over_pairs(n: usize) -> (Session<UnixStream>, Vec<Session<UnixStream>>, Receiving) {
    let key = key();
    let mut sources = Vec::new();
    let mut destinations = Vec::new();
    for _ in 0..=n {
        let (a, b) = UnixStream::pair().unwrap();
        let k = key.clone();
        let accepting = thread::spawn(move || accept(b, &k).unwrap());
        sources.push(connect(a, &key, &Intent::default()).unwrap());
        destinations.push(accepting.join().unwrap());
    }
    let main = destinations.remove(0);
    let receiving = thread::spawn(move || {
        let mut main = main;
        let streams =
            ReceiveStreams::start(destinations, &Limits::unlimited(), &Cancel::default()).unwrap();
        let mut store = StagingStore::default();
        let result = receive_rounds(&mut main, Some(&streams), &mut store, &Limits::unlimited());
        (store, result.map(drop))
    });
    let main = sources.remove(0);
    (main, sources, receiving)
}

type Receiving = thread::JoinHandle<(StagingStore, Result<(), ReceiveError>)>;

const ADDR: u64 = 0x7000_0000;

fn send_page(stream: &mut Session<UnixStream>, round: u32, fill: u8) {
    let mut frame = PageFrame::default();
    frame.start(1, round);
    frame.push_run(ADDR, &[fill; page::SIZE], false);
    stream.send_pages(&mut frame).unwrap();
}

fn end_round<S: std::io::Read + std::io::Write>(
    main: &mut Session<S>,
    round: u32,
    last: bool,
    frames: &[u64],
) {
    main.send(
        Kind::RoundEnd,
        &RoundEnd {
            round,
            last,
            stream_frames: frames.to_vec(),
            ..Default::default()
        },
    )
    .unwrap();
}

fn end_stream(stream: &mut Session<UnixStream>) {
    let _ = stream.send(
        Kind::Control,
        &Control {
            code: ControlCode::StreamEnd as i32,
            message: String::new(),
        },
    );
}

#[test]
fn a_later_rounds_page_waits_until_the_earlier_round_is_complete_on_every_stream() {
    let (mut main, mut streams, receiving) = streams_over_pairs(2);
    // The page of round 2 comes first, on stream 1; round 1's copy of it comes later on
    // stream 0. Staged in arrival order, the older copy would win.
    send_page(&mut streams[1], 2, 0xbb);
    thread::sleep(Duration::from_millis(200));
    send_page(&mut streams[0], 1, 0xaa);
    end_round(&mut main, 1, false, &[1, 0]);
    end_round(&mut main, 2, true, &[0, 1]);
    streams.iter_mut().for_each(end_stream);
    let (store, result) = receiving.join().unwrap();
    result.unwrap();
    match store.get(1, ADDR) {
        Some(PageRef::Data(data)) => assert!(data.iter().all(|&b| b == 0xbb), "round 1's copy won"),
        other => panic!("the page was not staged: {:?}", other.is_some()),
    }
}

#[test]
fn streams_that_do_not_add_up_to_the_rounds_end_are_refused() {
    // A stream carried more frames than the round's end says.
    let (mut main, mut streams, receiving) = streams_over_pairs(2);
    send_page(&mut streams[0], 1, 1);
    send_page(&mut streams[0], 1, 2);
    thread::sleep(Duration::from_millis(200));
    end_round(&mut main, 1, true, &[1, 0]);
    let (_, result) = receiving.join().unwrap();
    let error = result.unwrap_err().to_string();
    assert!(error.contains("carried 2 frames of round 1"), "{error}");

    // The round's end names another number of streams.
    let (mut main, _streams, receiving) = streams_over_pairs(2);
    end_round(&mut main, 1, true, &[0, 0, 0]);
    let error = receiving.join().unwrap().1.unwrap_err().to_string();
    assert!(error.contains("names frames of 3 streams"), "{error}");

    // A stream ends before it sent what the round's end says it carried.
    let (mut main, mut streams, receiving) = streams_over_pairs(2);
    end_stream(&mut streams[1]);
    end_round(&mut main, 1, true, &[0, 1]);
    let error = receiving.join().unwrap().1.unwrap_err().to_string();
    assert!(
        error.contains("page stream 1 ended after 0 of the 1"),
        "{error}"
    );

    // A frame of a round that already ended.
    let (mut main, mut streams, receiving) = streams_over_pairs(1);
    end_round(&mut main, 1, false, &[0]);
    thread::sleep(Duration::from_millis(200));
    send_page(&mut streams[0], 1, 3);
    thread::sleep(Duration::from_millis(200));
    end_round(&mut main, 2, true, &[0]);
    let error = receiving.join().unwrap().1.unwrap_err().to_string();
    assert!(
        error.contains("page stream 0") && error.contains("after that round ended"),
        "{error}"
    );
}

#[test]
fn a_receiver_takes_only_the_streams_of_its_migration_and_waits_for_them_briefly() {
    let dir = tempfile::tempdir().unwrap();
    let (mut receiver, address) = receiver(&Store::new(dir.path()), Duration::from_secs(2));
    let id = crate::record::new_migration_id().unwrap();
    let other = crate::record::new_migration_id().unwrap();
    let source = thread::spawn(move || {
        let intent = Intent::migrate(&id, "writer").with_streams(2);
        let mut main = source::connect(&address, &key(), &intent).unwrap();
        let _ours = source::connect(&address, &key(), &Intent::stream(&id, 0)).unwrap();
        // A stream of another migration is turned away, and so is a second stream 0.
        let mut theirs = source::connect(&address, &key(), &Intent::stream(&other, 1)).unwrap();
        let mut again = source::connect(&address, &key(), &Intent::stream(&id, 0)).unwrap();
        let turned_away = |s: &mut Session<std::net::TcpStream>| {
            s.expect::<Control>(Kind::Control).unwrap().message
        };
        let answers = (turned_away(&mut theirs), turned_away(&mut again));
        // Stream 1 never comes: the source is told why.
        (
            answers,
            main.expect::<Control>(Kind::Control).unwrap().message,
        )
    });
    let error = match receiver.accept_source(|_| {}) {
        Err(e) => e,
        Ok(_) => panic!("a migration without its streams began"),
    };
    assert!(matches!(error, DestinationError::Streams(_)), "{error}");
    let ((theirs, again), told) = source.join().unwrap();
    assert!(theirs.contains("taken by another migration"), "{theirs}");
    assert!(again.contains("taken by another migration"), "{again}");
    assert!(told.contains("1 of the 2 announced arrived"), "{told}");
    assert!(
        receiver.txn().phase().is_none(),
        "nothing was recorded for a migration that did not begin"
    );
}

#[test]
fn a_stream_that_ends_after_its_credit_came_back_loses_no_frame() {
    // More than half the credit window on one TCP stream: the receiver returns credit that the
    // sending thread never needs to read. Closing with it unread resets the connection, and a
    // reset discards what the receiver has not read yet (the last frames and the stream's end).
    const FRAMES: usize = 6;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    let receiving = thread::spawn(move || {
        // The receiver stalls once it has returned credit, as a receiver populating fresh
        // memory does: the source's last frames are then still in its socket when it closes.
        let mut sessions: Vec<_> = (0..2)
            .map(|_| {
                let stream = Stalling {
                    inner: listener.accept().unwrap().0,
                    read: 0,
                };
                accept(stream, &key()).unwrap()
            })
            .collect();
        let mut main = sessions.remove(0);
        let streams =
            ReceiveStreams::start(sessions, &Limits::unlimited(), &Cancel::default()).unwrap();
        let report = receive_rounds(
            &mut main,
            Some(&streams),
            &mut StagingStore::default(),
            &Limits::unlimited(),
        );
        // The source waits for this end to close its streams, then for the main connection.
        report.map(|r| r.bytes)
    });
    let connect_to = || {
        connect(
            std::net::TcpStream::connect(address).unwrap(),
            &key(),
            &Intent::default(),
        )
        .unwrap()
    };
    let mut main = connect_to();
    let mut streams = PageStreams::start(vec![connect_to()]).unwrap();
    let batch = vec![0x5au8; crate::wire::pages::BATCH_BYTES];
    for i in 0..FRAMES {
        let mut frame = PageFrame::default();
        frame.start(1, 1);
        frame.push_run(ADDR + (i * batch.len()) as u64, &batch, false);
        streams.dispatch(&mut frame).unwrap();
    }
    end_round(&mut main, 1, true, &streams.end_round());
    streams.finish().unwrap();
    assert_eq!(
        receiving.join().unwrap().unwrap(),
        (FRAMES * batch.len()) as u64
    );
}

/// A connection whose reads stall for half a second once, after 36 MiB.
struct Stalling {
    inner: std::net::TcpStream,
    read: usize,
}

impl std::io::Read for Stalling {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        const AFTER: usize = 36 << 20;
        let n = self.inner.read(buf)?;
        if self.read < AFTER && self.read + n >= AFTER {
            thread::sleep(Duration::from_millis(500));
        }
        self.read += n;
        Ok(n)
    }
}

impl std::io::Write for Stalling {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.inner.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}
