//! Receiving a migration: pre-copy rounds into the staging store (returning flow-control credit
//! as they are staged), then the final dump's image files. Everything that arrives is checked
//! before it is stored: page runs must be whole pages, image names plain file names, and what
//! the source sends must stay within the receiver's [`Limits`] (checked before anything is
//! decompressed or allocated for it).

use std::io::{Read, Write};
use std::path::Path;

use serde::Serialize;

use super::limits::{Budget, Limits};
pub use super::stage::ReceiveError;
use super::stage::{stage_frame, CreditReturn};
use super::streams::ReceiveStreams;
use crate::cancel::Cancel;
use crate::layer::Applier;
use crate::staging::StagingStore;
use crate::wire::pages::ReceivedPages;
use crate::wire::{
    Control, ControlCode, ImageFile, Kind, LayerBlock, LayerEntry, LayerSync, RoundEnd, Session,
    WireError,
};

/// Where the container's filesystem goes on the receiving end.
pub struct DestinationLayer {
    applier: Applier,
    /// The user said both hosts share the storage: nothing may arrive but a digest to check.
    shared: bool,
}

impl DestinationLayer {
    /// The source's filesystem is applied to `applier`'s root (or, `shared`, checked against
    /// it).
    pub fn new(applier: Applier, shared: bool) -> Self {
        DestinationLayer { applier, shared }
    }

    fn accepting(&mut self) -> Result<&mut Applier, ReceiveError> {
        if self.shared {
            return Err(ReceiveError::LayerMismatch(
                "the source sends the container's filesystem, but this receiver was told both hosts share it (--shared-rootfs): use --shared-rootfs on both hosts or on neither".into(),
            ));
        }
        Ok(&mut self.applier)
    }

    /// The last round said how the filesystem travelled: it must be how this end expects.
    fn check_last(&self, end: &RoundEnd) -> Result<(), ReceiveError> {
        let sync = LayerSync::try_from(end.layer).unwrap_or(LayerSync::NotSent);
        match (self.shared, sync) {
            (false, LayerSync::Sent) => Ok(()),
            (true, LayerSync::Shared) => {
                let ours = self.applier.digest()?;
                if ours == end.layer_digest {
                    Ok(())
                } else {
                    Err(ReceiveError::LayerMismatch(format!(
                        "--shared-rootfs, but {} here is not the source's root filesystem (their trees differ): the hosts do not share this storage; drop --shared-rootfs on both hosts to copy it",
                        self.applier.dir().display()
                    )))
                }
            }
            (false, LayerSync::Shared) => Err(ReceiveError::LayerMismatch(
                "the source was told both hosts share the container's root filesystem (--shared-rootfs) and sent none of it, but this receiver was not: use --shared-rootfs on both hosts or on neither".into(),
            )),
            (true, _) | (false, LayerSync::NotSent) => Err(ReceiveError::LayerMismatch(
                "the source did not say how the container's filesystem travels: is it an older pclive? Use the same pclive on both hosts".into(),
            )),
        }
    }
}

/// Receives image files into `dir` until `ImagesDone`. File names must be plain names (no
/// directories, no `..`): a hostile peer cannot write outside `dir`; files are created mode 0600
/// and a symlink planted in `dir` is not followed. The number and size of the files and each
/// write's offset are checked against `budget` before anything is written.
pub fn receive_images<S: Read + Write>(
    session: &mut Session<S>,
    dir: &Path,
    budget: &mut Budget,
) -> Result<u64, ReceiveError> {
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    let mut total = 0u64;
    loop {
        let frame = session.receive()?;
        match frame.kind {
            Kind::ImageFile => {
                let file: ImageFile = frame.decode()?;
                let plain = !file.name.is_empty()
                    && file.name != "."
                    && file.name != ".."
                    && !file.name.contains('/')
                    && !file.name.contains('\0');
                if !plain {
                    return Err(ReceiveError::ImageName(file.name));
                }
                budget.image_write(&file.name, file.offset, file.data.len() as u64)?;
                let path = dir.join(&file.name);
                let out = std::fs::OpenOptions::new()
                    .create(true)
                    .write(true)
                    .truncate(file.offset == 0)
                    .mode(0o600)
                    .custom_flags(libc::O_NOFOLLOW)
                    .open(&path)
                    .map_err(|source| ReceiveError::ImageFile {
                        name: file.name.clone(),
                        source,
                    })?;
                out.write_all_at(&file.data, file.offset)
                    .map_err(|source| ReceiveError::ImageFile {
                        name: file.name.clone(),
                        source,
                    })?;
                total += file.data.len() as u64;
            }
            Kind::Control => {
                let control: Control = frame.decode()?;
                match ControlCode::try_from(control.code) {
                    Ok(ControlCode::ImagesDone) => return Ok(total),
                    Ok(ControlCode::Abort) => return Err(ReceiveError::Aborted(control.message)),
                    _ => {
                        return Err(WireError::Unexpected {
                            expected: Kind::ImageFile,
                            found: Kind::Control,
                        }
                        .into())
                    }
                }
            }
            other => {
                return Err(WireError::Unexpected {
                    expected: Kind::ImageFile,
                    found: other,
                }
                .into())
            }
        }
    }
}

/// What the receiving end staged.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ReceiveReport {
    pub rounds: u32,
    pub pages: u64,
    pub zero_pages: u64,
    pub bytes: u64,
    /// What the staging store held at the end of the last round received.
    pub resident_bytes: u64,
    /// CPU this process spent on the last round received.
    pub round_cpu_seconds: f64,
    /// Paths of the container's filesystem applied, and their file data.
    pub layer_entries: u64,
    pub layer_bytes: u64,
}

/// Receives rounds into `store` until the last (frozen) round has arrived (the page frames on
/// `streams`, if any).
pub fn receive_rounds<S: Read + Write>(
    session: &mut Session<S>,
    streams: Option<&ReceiveStreams>,
    store: &mut StagingStore,
    limits: &Limits,
) -> Result<ReceiveReport, ReceiveError> {
    receive_rounds_reporting(
        session,
        streams,
        store,
        None,
        &Budget::new(limits),
        &Cancel::default(),
        |_, _| {},
    )
}

/// [`receive_rounds`], calling `on_round` with each round's end marker and the report so far.
/// Each frame is checked against `budget` before it is decoded, and the store after. The
/// container's filesystem goes to `layer` (without one, a source that sends it is refused).
/// With `streams`, the page frames arrive on them, and only there.
pub fn receive_rounds_reporting<S: Read + Write>(
    session: &mut Session<S>,
    streams: Option<&ReceiveStreams>,
    store: &mut StagingStore,
    layer: Option<&mut DestinationLayer>,
    budget: &Budget,
    cancel: &Cancel,
    on_round: impl FnMut(&RoundEnd, &ReceiveReport),
) -> Result<ReceiveReport, ReceiveError> {
    let Some(streams) = streams.filter(|s| !s.is_empty()) else {
        return receive_rounds_on(session, None, store, layer, budget, cancel, on_round);
    };
    streams.lend(store);
    let received = receive_rounds_on(
        session,
        Some(streams),
        store,
        layer,
        budget,
        cancel,
        on_round,
    );
    streams.take_back(store);
    // A stream's own error says more than what it caused on the main connection.
    match (received, streams.failure()) {
        (Err(_), Some(e)) => Err(e),
        (received, _) => received,
    }
}

#[allow(clippy::too_many_arguments)]
fn receive_rounds_on<S: Read + Write>(
    session: &mut Session<S>,
    streams: Option<&ReceiveStreams>,
    store: &mut StagingStore,
    mut layer: Option<&mut DestinationLayer>,
    budget: &Budget,
    cancel: &Cancel,
    mut on_round: impl FnMut(&RoundEnd, &ReceiveReport),
) -> Result<ReceiveReport, ReceiveError> {
    let mut report = ReceiveReport::default();
    let mut credit = CreditReturn::default();
    let mut cpu_at_round_start = crate::clock::process_cpu_seconds();
    loop {
        if let Some(reason) = cancel.reason() {
            return Err(ReceiveError::Cancelled(reason));
        }
        let frame = session.receive()?;
        match frame.kind {
            Kind::Pages if streams.is_none() => {
                let received = ReceivedPages::parse(&frame.payload)?;
                let staged = stage_frame(&received, store, budget)?;
                report.pages += staged.pages;
                report.zero_pages += staged.zero_pages;
                report.bytes += staged.bytes;
                let wire = received.wire_bytes();
                drop(received);
                session.recycle(frame.payload);
                credit.consumed(session, wire)?;
            }
            Kind::LayerEntry => {
                let entry: LayerEntry = frame.decode()?;
                let Some(layer) = layer.as_deref_mut() else {
                    return Err(ReceiveError::LayerMismatch(
                        "the source sends the container's filesystem, but this receiver has no root filesystem to apply it to".into(),
                    ));
                };
                layer.accepting()?.entry(entry)?;
                report.layer_entries += 1;
            }
            Kind::LayerBlock => {
                let block: LayerBlock = frame.decode()?;
                let Some(layer) = layer.as_deref_mut() else {
                    return Err(WireError::Unexpected {
                        expected: Kind::Pages,
                        found: Kind::LayerBlock,
                    }
                    .into());
                };
                report.layer_bytes += layer.accepting()?.block(&block)?;
                credit.consumed(session, block.data.len() as u64)?;
            }
            Kind::RoundEnd => {
                let end: RoundEnd = frame.decode()?;
                if let Some(layer) = layer.as_deref_mut() {
                    if !layer.shared {
                        layer.applier.end_round()?;
                    }
                    if end.last {
                        layer.check_last(&end)?;
                    }
                }
                report.rounds = end.round;
                report.resident_bytes = match streams {
                    Some(streams) => {
                        let staged = streams.end_round(&end, cancel)?;
                        report.pages += staged.pages;
                        report.zero_pages += staged.zero_pages;
                        report.bytes += staged.bytes;
                        staged.resident_bytes
                    }
                    None if !end.stream_frames.is_empty() => {
                        return Err(WireError::BadPageFrame(
                            "a round's end names page streams this migration does not have".into(),
                        )
                        .into())
                    }
                    None => store.footprint(),
                };
                let cpu = crate::clock::process_cpu_seconds();
                report.round_cpu_seconds = cpu - cpu_at_round_start;
                cpu_at_round_start = cpu;
                on_round(&end, &report);
                credit.flush(session)?;
                if end.last {
                    return Ok(report);
                }
            }
            other => {
                return Err(WireError::Unexpected {
                    expected: Kind::Pages,
                    found: other,
                }
                .into())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::send_images;
    use crate::wire::{accept, connect, Auth, Intent};
    use std::os::unix::net::UnixStream;
    use std::thread;

    #[test]
    fn image_files_travel_and_hostile_names_are_refused() {
        let src = tempfile::tempdir().unwrap();
        let dst = tempfile::tempdir().unwrap();
        std::fs::write(src.path().join("core-1.img"), vec![7u8; 3 << 20]).unwrap();
        std::fs::write(src.path().join("empty.img"), b"").unwrap();
        let (a, b) = UnixStream::pair().unwrap();
        let key = Auth::Key(vec![9; 32]);
        let k2 = key.clone();
        let dst_path = dst.path().to_owned();
        let receiver = thread::spawn(move || {
            let mut session = accept(b, &k2).unwrap();
            receive_images(
                &mut session,
                &dst_path,
                &mut Budget::new(&Limits::unlimited()),
            )
        });
        let mut session = connect(a, &key, &Intent::default()).unwrap();
        let sent = send_images(&mut session, src.path()).unwrap();
        assert_eq!(receiver.join().unwrap().unwrap(), sent);
        assert_eq!(
            std::fs::read(dst.path().join("core-1.img")).unwrap(),
            vec![7u8; 3 << 20]
        );
        assert!(dst.path().join("empty.img").exists());

        let (a, b) = UnixStream::pair().unwrap();
        let k2 = key.clone();
        let dst_path = dst.path().to_owned();
        let receiver = thread::spawn(move || {
            let mut session = accept(b, &k2).unwrap();
            receive_images(
                &mut session,
                &dst_path,
                &mut Budget::new(&Limits::unlimited()),
            )
        });
        let mut session = connect(a, &key, &Intent::default()).unwrap();
        session
            .send(
                Kind::ImageFile,
                &ImageFile {
                    name: "../escape".into(),
                    offset: 0,
                    data: vec![1],
                    last_chunk: true,
                },
            )
            .unwrap();
        assert!(matches!(
            receiver.join().unwrap(),
            Err(ReceiveError::ImageName(_))
        ));
        assert!(!dst.path().parent().unwrap().join("escape").exists());
    }
}
