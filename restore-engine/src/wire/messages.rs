//! The messages frames carry (protobuf, prost), named by the frame's [`Kind`](super::Kind).

use prost::Message;

/// The connecting side's first frame, in the clear (it holds nothing secret; the keys derived
/// later bind it, so a change on the way makes the handshake fail).
#[derive(Clone, PartialEq, Message)]
pub struct Hello {
    #[prost(uint32, repeated, tag = "1")]
    pub versions: Vec<u32>,
    #[prost(bytes = "vec", tag = "2")]
    pub nonce: Vec<u8>,
    #[prost(bool, tag = "3")]
    pub insecure: bool,
    /// The connecting side's ephemeral X25519 public key (empty in an unauthenticated session).
    #[prost(bytes = "vec", tag = "4")]
    pub public_key: Vec<u8>,
}

/// Why a source connects.
#[derive(Clone, Copy, Debug, PartialEq, Eq, prost::Enumeration)]
#[repr(i32)]
pub enum Purpose {
    /// To migrate the container: pre-copy, images, commit.
    Migrate = 0,
    /// To ask how a migration ended ([`Outcome`]), after losing the migration's connection.
    Query = 1,
    /// To carry a share of a migration's page frames, beside its main connection
    /// ([`Intent::streams`]).
    Stream = 2,
}

/// Who connects, and why (what [`Proof`] carries).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Intent {
    pub migration_id: String,
    pub purpose: Option<Purpose>,
    pub container: String,
    /// The container's network address moves with it (`pclive migrate --move-address`): the
    /// receiving container must have been prepared for it (`pclive receive --move-address`).
    pub moves_address: bool,
    /// Migrate: how many connections of their own the page frames travel on (0: this one).
    /// Stream: which of them this connection is (from 0).
    pub streams: u32,
}

impl Intent {
    pub fn migrate(migration_id: &str, container: &str) -> Self {
        Intent {
            migration_id: migration_id.to_string(),
            purpose: Some(Purpose::Migrate),
            container: container.to_string(),
            moves_address: false,
            streams: 0,
        }
    }

    /// The same intent, with the page frames on `streams` connections of their own.
    pub fn with_streams(mut self, streams: u32) -> Self {
        self.streams = streams;
        self
    }

    /// Page stream `index` of migration `migration_id`.
    pub fn stream(migration_id: &str, index: u32) -> Self {
        Intent {
            migration_id: migration_id.to_string(),
            purpose: Some(Purpose::Stream),
            container: String::new(),
            moves_address: false,
            streams: index,
        }
    }

    pub fn is_stream(&self) -> bool {
        self.purpose == Some(Purpose::Stream)
    }

    /// The same intent, saying whether the container's address moves with it.
    pub fn moving_address(mut self, moves: bool) -> Self {
        self.moves_address = moves;
        self
    }

    pub fn query(migration_id: &str) -> Self {
        Intent {
            migration_id: migration_id.to_string(),
            purpose: Some(Purpose::Query),
            container: String::new(),
            moves_address: false,
            streams: 0,
        }
    }

    pub fn is_query(&self) -> bool {
        self.purpose == Some(Purpose::Query)
    }
}

/// The listening side's answer to [`Hello`], in the clear.
#[derive(Clone, PartialEq, Message)]
pub struct Challenge {
    #[prost(uint32, tag = "1")]
    pub version: u32,
    #[prost(bytes = "vec", tag = "2")]
    pub nonce: Vec<u8>,
    /// The listening side's ephemeral X25519 public key (empty in an unauthenticated session).
    #[prost(bytes = "vec", tag = "3")]
    pub public_key: Vec<u8>,
}

/// The connecting side's first encrypted frame: that it decrypts proves the sender holds the
/// key. It says what the connection is for.
#[derive(Clone, PartialEq, Message)]
pub struct Proof {
    /// Which migration the session is about (32 hex digits, chosen by the source).
    #[prost(string, tag = "1")]
    pub migration_id: String,
    #[prost(enumeration = "Purpose", tag = "2")]
    pub purpose: i32,
    /// The container's name on the source (for the destination's records and logs).
    #[prost(string, tag = "3")]
    pub container: String,
    /// The container's address moves with it ([`Intent::moves_address`]).
    #[prost(bool, tag = "4")]
    pub moves_address: bool,
    /// [`Intent::streams`].
    #[prost(uint32, tag = "5")]
    pub streams: u32,
}

/// The listening side's first encrypted frame: proves it holds the key too, and says on what
/// terms it receives ([`Terms`]).
#[derive(Clone, PartialEq, Message)]
pub struct Accept {
    #[prost(uint32, tag = "1")]
    pub version: u32,
    /// [`Terms::closes_connections`].
    #[prost(bool, tag = "2")]
    pub closes_connections: bool,
}

/// What the listening side tells the connecting side about how it will restore the container
/// (known to both ends of a session once the handshake is done).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Terms {
    /// The receiving container restores established TCP connections closed (`pclive receive
    /// --tcp-close`): their state is of no use there, so the source's final dump need not read
    /// it, nor lock each connection while it does.
    pub closes_connections: bool,
}

#[derive(Clone, PartialEq, Message)]
pub struct Reject {
    #[prost(string, tag = "1")]
    pub reason: String,
}

/// A run of consecutive pages of one task, described in a page frame's descriptor: its bytes
/// are the next `len` bytes of the frame's data section ([`super::pages`]), raw pages or, with
/// `lz4_len` set, an LZ4 block that decompresses to `lz4_len` bytes. (Tags 2 and 3 carried the
/// bytes inside the message up to protocol version 6.)
#[derive(Clone, PartialEq, Message)]
pub struct PageRun {
    #[prost(uint64, tag = "1")]
    pub vaddr: u64,
    #[prost(uint32, tag = "4")]
    pub lz4_len: u32,
    #[prost(uint32, tag = "5")]
    pub len: u32,
}

impl PageRun {
    /// Bytes of page data the run declares (what it takes once decompressed).
    pub fn declared_len(&self) -> u64 {
        if self.lz4_len == 0 {
            u64::from(self.len)
        } else {
            u64::from(self.lz4_len)
        }
    }
}

/// Pages of one task (pid in the container's namespace) from one pre-copy round: the
/// descriptor at the end of a page frame, after the bytes of its runs ([`super::pages`]).
#[derive(Clone, PartialEq, Message)]
pub struct Pages {
    #[prost(uint32, tag = "1")]
    pub pid: u32,
    #[prost(uint32, tag = "2")]
    pub round: u32,
    #[prost(message, repeated, tag = "3")]
    pub runs: Vec<PageRun>,
    #[prost(uint64, repeated, tag = "4")]
    pub zero_pages: Vec<u64>,
}

#[derive(Clone, PartialEq, Message)]
pub struct RoundEnd {
    #[prost(uint32, tag = "1")]
    pub round: u32,
    #[prost(uint64, tag = "2")]
    pub pages: u64,
    #[prost(uint64, tag = "3")]
    pub bytes: u64,
    /// The last round: the source is frozen and the images follow.
    #[prost(bool, tag = "4")]
    pub last: bool,
    /// What the source did with the container's filesystem (the last round says).
    #[prost(enumeration = "LayerSync", tag = "5")]
    pub layer: i32,
    /// [`LayerSync::Shared`]: the digest of the source's root filesystem while frozen
    /// ([`crate::layer::tree_digest`]), for the destination to compare with its own.
    #[prost(bytes = "vec", tag = "6")]
    pub layer_digest: Vec<u8>,
    /// With page streams ([`Intent::streams`]): the page frames of this round each stream
    /// carried, for the receiver to know when the round is complete.
    #[prost(uint64, repeated, tag = "7")]
    pub stream_frames: Vec<u64>,
}

/// What the source did with the container's writable filesystem.
#[derive(Clone, Copy, Debug, PartialEq, Eq, prost::Enumeration)]
#[repr(i32)]
pub enum LayerSync {
    /// Nothing (an engine without a filesystem to move: tests of the memory path).
    NotSent = 0,
    /// Its changes went out as [`LayerEntry`] frames, the last ones while frozen.
    Sent = 1,
    /// Both hosts see the same storage (`--shared-rootfs`): nothing was copied.
    Shared = 2,
}

/// What a [`LayerEntry`] is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, prost::Enumeration)]
#[repr(i32)]
pub enum LayerKind {
    Unspecified = 0,
    /// The path is gone (deleted, or an overlay whiteout): remove it, whatever it is.
    Remove = 1,
    Dir = 2,
    /// A regular file of `size` bytes; its changed blocks follow as [`LayerBlock`]s.
    File = 3,
    Symlink = 4,
    Fifo = 5,
    Socket = 6,
    CharDevice = 7,
    BlockDevice = 8,
    /// Another name of the file at `target` (sent earlier).
    HardLink = 9,
}

#[derive(Clone, PartialEq, Message)]
pub struct Xattr {
    #[prost(bytes = "vec", tag = "1")]
    pub name: Vec<u8>,
    #[prost(bytes = "vec", tag = "2")]
    pub value: Vec<u8>,
}

/// One path of the container's filesystem that changed since the last round, relative to its
/// root (`""` is the root itself; components are never empty, `.` or `..`).
#[derive(Clone, PartialEq, Message)]
pub struct LayerEntry {
    #[prost(bytes = "vec", tag = "1")]
    pub path: Vec<u8>,
    #[prost(enumeration = "LayerKind", tag = "2")]
    pub kind: i32,
    /// Permission bits (with setuid, setgid, sticky).
    #[prost(uint32, tag = "3")]
    pub mode: u32,
    #[prost(uint32, tag = "4")]
    pub uid: u32,
    #[prost(uint32, tag = "5")]
    pub gid: u32,
    #[prost(int64, tag = "6")]
    pub mtime_sec: i64,
    #[prost(uint32, tag = "7")]
    pub mtime_nsec: u32,
    /// A file's size.
    #[prost(uint64, tag = "8")]
    pub size: u64,
    /// A symlink's target, or the path a hard link names.
    #[prost(bytes = "vec", tag = "9")]
    pub target: Vec<u8>,
    /// A device's number.
    #[prost(uint64, tag = "10")]
    pub rdev: u64,
    #[prost(message, repeated, tag = "11")]
    pub xattrs: Vec<Xattr>,
    /// A directory whose every child is named in `children`: others are removed (an opaque
    /// overlay directory, or any directory of a whole root filesystem).
    #[prost(bool, tag = "12")]
    pub exact: bool,
    #[prost(bytes = "vec", repeated, tag = "13")]
    pub children: Vec<Vec<u8>>,
}

/// A block of the file named by the [`LayerEntry`] just before it: `data` at `offset`, or
/// `zero_len` bytes of zeros (a hole) when `data` is empty.
#[derive(Clone, PartialEq, Message)]
pub struct LayerBlock {
    #[prost(uint64, tag = "1")]
    pub offset: u64,
    #[prost(bytes = "vec", tag = "2")]
    pub data: Vec<u8>,
    #[prost(uint64, tag = "3")]
    pub zero_len: u64,
}

/// A chunk of a CRIU image file of the final dump.
#[derive(Clone, PartialEq, Message)]
pub struct ImageFile {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(uint64, tag = "2")]
    pub offset: u64,
    #[prost(bytes = "vec", tag = "3")]
    pub data: Vec<u8>,
    #[prost(bool, tag = "4")]
    pub last_chunk: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, prost::Enumeration)]
#[repr(i32)]
pub enum ControlCode {
    Unspecified = 0,
    /// Source → destination: every image is sent; restore now.
    ImagesDone = 1,
    /// Destination → source: every page is installed; the source may go.
    Committed = 2,
    /// Either way: give up; the source resumes.
    Abort = 3,
    Progress = 4,
    /// Destination → source: the restored container resumed here, then died before every page
    /// was installed (the message says how). The source stays frozen, in doubt.
    Lost = 5,
    /// Source → destination: the final answer (Committed, Abort, Lost or an [`Outcome`]) arrived.
    Ack = 6,
    /// Source → destination, on a page stream: the last round's frames are sent.
    StreamEnd = 7,
}

/// The [`ControlCode::Progress`] message the destination sends when the restored tasks run: the
/// end of the service's downtime.
pub const RESTORED: &str = "restored";

#[derive(Clone, PartialEq, Message)]
pub struct Control {
    #[prost(enumeration = "ControlCode", tag = "1")]
    pub code: i32,
    #[prost(string, tag = "2")]
    pub message: String,
}

/// The destination's answer to a [`Purpose::Query`] session: where the migration stands there.
#[derive(Clone, PartialEq, Message)]
pub struct Outcome {
    #[prost(string, tag = "1")]
    pub migration_id: String,
    /// False: this destination has no record of that migration.
    #[prost(bool, tag = "2")]
    pub known: bool,
    /// The destination's phase ([`crate::record::Phase`] by name).
    #[prost(string, tag = "3")]
    pub phase: String,
    #[prost(string, tag = "4")]
    pub reason: String,
}

/// Flow control: the receiver allows this many more payload bytes.
#[derive(Clone, PartialEq, Message)]
pub struct Credit {
    #[prost(uint64, tag = "1")]
    pub bytes: u64,
}
