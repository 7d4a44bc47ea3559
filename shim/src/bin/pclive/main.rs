//! `pclive`: the command-line side of pclive. One file per subcommand.

mod check;
mod dirty_rate;
mod migrate;
mod options;
mod receive;

use std::process::ExitCode;

const HELP: &str = "\
pclive — live migration of containers between containerd hosts

USAGE:
    pclive migrate CONTAINER HOST:PORT (--key-file FILE | --insecure) [OPTIONS]
                              move a running container to the host listening on HOST:PORT
                              (see `pclive receive` there): pre-copy while it runs, a short
                              pause, restore there; on any failure it keeps running here
        --address SOCKET          containerd socket (default /run/containerd/containerd.sock)
        --namespace NS            containerd namespace (default default)
        --max-rounds N            pre-copy rounds at most (default 10)
        --target-downtime-ms MS   stop pre-copy when the rest fits this (default 300)
        --tracker content-hash|soft-dirty   dirty tracking (default: the best available)
        --work-dir DIR            keep the final dump's CRIU logs, images and report in DIR
                                  (default: a temporary directory, removed at the end)
        --compress                LZ4-compress pre-copy pages (pays on slow links with
                                  compressible memory; each run goes raw if it saves < 1/8)
        --json                    print the migration report as JSON
    pclive receive CONTAINER --listen ADDR:PORT (--key-file FILE | --insecure)
                   (--rootfs DIR | --image REF) [--eager] [--address SOCKET] [--namespace NS]
                   [--net-host] [--tcp-close]
                              create the receiving container; returns once the migrated
                              container runs here
        --eager                   restore eagerly: complete the final dump's images with the
                                  pre-copied memory, then a plain restore (every page in place
                                  before the tasks resume, no lazy-pages server). Default: lazy
                                  (the tasks resume at once, memory installed with userfaultfd)
        --net-host                the source container shares its host's network namespace
                                  (ctr run --net-host), so this one must too
        --tcp-close               restore established TCP connections closed (needed when the
                                  container's address does not move with it, e.g. host
                                  networking: its clients reconnect)
    pclive check [--json]     what this host offers pclive (tool versions, kernel features)
    pclive dirty-rate PID [--rounds N] [--interval-ms MS] [--tracker content-hash|soft-dirty] [--json]
                              how fast a process dirties its memory, measured with the tracker
                              pre-copy uses: tells whether a migration will converge
    pclive version            print the version
    pclive help               this text

Containers run with `ctr run --runtime io.containerd.pclive.v2 ...`. Checkpoint with
`ctr task checkpoint --image-path DIR [--exit] ID`; restore by creating a container with the
annotation io.containerd.pclive.restore.image-path=DIR, lazily (tasks resume at once, memory is
installed with userfaultfd) with io.containerd.pclive.restore.lazy-pages=true as well.

EXIT CODES:
    0  success
    1  failure; the message says what. A failed migration leaves the container running on the
       source (it resumes whatever went wrong before the destination committed)
    2  usage error
    3  containerd could not be reached: nothing was done";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        None | Some("help" | "--help" | "-h") => {
            println!("{HELP}");
            ExitCode::SUCCESS
        }
        Some("version" | "--version" | "-V") => {
            println!("pclive {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Some("check") => check::run(&args[1..]),
        Some("migrate") => migrate::run(&args[1..]),
        Some("receive") => receive::run(&args[1..]),
        Some("dirty-rate") => dirty_rate::run(&args[1..]),
        Some(other) => {
            eprintln!("pclive: unknown command '{other}'\n\n{HELP}");
            ExitCode::from(2)
        }
    }
}
