//! Test harness: a private containerd 2.x daemon per test (own root, state, socket and
//! namespace), driven with the real `ctr`, running containers with the pclive shim and real runc
//! and CRIU. Everything a test creates is torn down when its [`Containerd`] drops, also when the
//! test panics.

#![allow(dead_code)]

pub mod migration;

use std::fs;
use std::io::Write;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread::sleep;
use std::time::{Duration, Instant};

pub const RUNTIME: &str = "io.containerd.pclive.v2";
pub const RESTORE_ANNOTATION: &str = containerd_shim_pclive::annotations::RESTORE_IMAGE_PATH;

static NEXT: AtomicU32 = AtomicU32::new(0);

/// The pclive shim binary cargo built for these tests.
pub fn shim_binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_containerd-shim-pclive-v2"))
}

/// A workload binary of the workspace (testdata/workloads), built next to the shim.
pub fn workload_binary(name: &str) -> PathBuf {
    let path = shim_binary().parent().unwrap().join(name);
    assert!(
        path.is_file(),
        "{} is missing: build the workspace binaries first (cargo build --release --workspace --bins; scripts/test.sh does)",
        path.display()
    );
    path
}

fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "the end-to-end tests run containers and need root (run scripts/test.sh as root)"
    );
}

/// Which binaries the daemon (and so the shim, runc and CRIU) can find on its PATH.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Tools {
    /// The host's PATH plus the shim.
    All,
    /// Only the shim: runc and CRIU are "not installed".
    ShimOnly,
    /// The shim and runc, but no CRIU.
    NoCriu,
}

/// A private containerd daemon.
pub struct Containerd {
    pub dir: PathBuf,
    pub address: String,
    pub namespace: String,
    /// The cgroup (under each controller) that holds this daemon's containers: ctr's are in
    /// the namespace's, CRI pods in the cgroup parent a test gives them (this one).
    pub cgroup_root: String,
    config: PathBuf,
    path_env: String,
    daemon: Option<Child>,
}

impl Containerd {
    pub fn start() -> Self {
        Self::start_with(Tools::All)
    }

    pub fn start_with(tools: Tools) -> Self {
        Self::start_configured(tools, None)
    }

    /// A containerd whose CRI plugin runs pods with the runtime handler `pclive` (the
    /// configuration docs/kubernetes.md gives), with `sandbox_image` as the pods' sandbox
    /// (import it before the first pod). Its namespace is the CRI's, `k8s.io`; pods belong
    /// in the cgroup parent [`Containerd::cgroup_root`].
    pub fn start_cri(sandbox_image: &str) -> Self {
        Self::start_configured(Tools::All, Some(sandbox_image))
    }

    fn start_configured(tools: Tools, cri_sandbox_image: Option<&str>) -> Self {
        require_root();
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let tag = format!("p{}n{n}", std::process::id());
        // Short paths: unix socket addresses are limited to 108 bytes.
        let dir = PathBuf::from(format!("/tmp/pclive-e2e-{tag}"));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("bin")).unwrap();
        symlink(shim_binary(), dir.join("bin/containerd-shim-pclive-v2")).unwrap();
        let path_env = match tools {
            Tools::All => format!(
                "{}:{}",
                dir.join("bin").display(),
                std::env::var("PATH").unwrap_or_default()
            ),
            Tools::ShimOnly => dir.join("bin").display().to_string(),
            Tools::NoCriu => {
                symlink(find_on_path("runc"), dir.join("bin/runc")).unwrap();
                dir.join("bin").display().to_string()
            }
        };
        let address = dir.join("containerd.sock").display().to_string();
        let config = dir.join("config.toml");
        // The configuration the scripts' daemons get (scripts/lib/containerd.sh).
        let lib = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/lib/containerd.sh");
        let out = Command::new("bash")
            .arg("-c")
            .arg(r#". "$1" && containerd_config "$2""#)
            .arg("bash")
            .arg(&lib)
            .arg(&dir)
            .env("CRI_SANDBOX_IMAGE", cri_sandbox_image.unwrap_or(""))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "containerd_config failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        fs::write(&config, out.stdout).unwrap();
        // The host's pclive settings: annotations may name files in this test's directory, and
        // containers may receive migrations.
        fs::write(
            dir.join("pclive-config.toml"),
            format!(
                "[annotations]\nread_dirs = [\"{d}\"]\nwrite_dirs = [\"{d}\"]\nallow_receive = true\nallow_insecure = true\n",
                d = dir.display()
            ),
        )
        .unwrap();
        let mut this = Containerd {
            dir,
            address,
            namespace: match cri_sandbox_image {
                None => format!("pclive-{tag}"),
                Some(_) => "k8s.io".to_string(),
            },
            cgroup_root: format!("pclive-{tag}"),
            config,
            path_env,
            daemon: None,
        };
        this.launch();
        this
    }

    fn launch(&mut self) {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("containerd.log"))
            .unwrap();
        let child = Command::new(find_on_path("containerd"))
            .arg("--config")
            .arg(&self.config)
            .env("PATH", &self.path_env)
            .env("PCLIVE_STATE_DIR", self.state_base())
            .env("PCLIVE_CONFIG", self.pclive_config())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start containerd (is it installed? run scripts/setup.sh)");
        self.daemon = Some(child);
        wait_for("containerd to serve", Duration::from_secs(20), || {
            self.ctr(&["version"]).status.success()
        });
    }

    /// Stops the daemon (SIGTERM) and starts it again on the same state: running tasks must
    /// survive, as with any containerd shim.
    pub fn restart(&mut self) {
        self.stop_daemon();
        self.launch();
    }

    fn stop_daemon(&mut self) {
        if let Some(mut child) = self.daemon.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default()
    }

    /// `ctr --address … --namespace … ARGS`.
    pub fn ctr_command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(find_on_path("ctr"));
        cmd.args(["--address", &self.address, "--namespace", &self.namespace])
            .args(args)
            .stdin(Stdio::null());
        cmd
    }

    pub fn ctr(&self, args: &[&str]) -> Output {
        self.ctr_command(args).output().expect("run ctr")
    }

    /// Runs ctr and requires success; returns stdout.
    pub fn ctr_ok(&self, args: &[&str]) -> String {
        let out = self.ctr(args);
        assert!(
            out.status.success(),
            "ctr {args:?} failed ({}):\nstdout: {}\nstderr: {}\n--- containerd log tail ---\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            tail(&self.log(), 30)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs ctr and requires failure; returns stderr.
    pub fn ctr_err(&self, args: &[&str]) -> String {
        let out = self.ctr(args);
        assert!(
            !out.status.success(),
            "ctr {args:?} should have failed:\nstdout: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    /// A fresh rootfs (busybox + memcheck) for one container.
    pub fn rootfs(&self, name: &str) -> PathBuf {
        self.rootfs_with(name, &[])
    }

    /// A fresh rootfs with busybox, memcheck and these host binaries (and their libraries).
    pub fn rootfs_with(&self, name: &str, binaries: &[&Path]) -> PathBuf {
        let out = self.dir.join("rootfs").join(name);
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../testdata/build-rootfs.sh");
        let status = Command::new("bash")
            .arg(script)
            .arg(&out)
            .arg(workload_binary("memcheck"))
            .args(binaries)
            .status()
            .unwrap();
        assert!(status.success(), "build-rootfs.sh failed");
        out
    }

    /// Imports `rootfs` as the OCI image `reference` (testdata/build-image.sh), so containers
    /// run from the overlayfs snapshotter as users' do.
    pub fn import_image(&self, rootfs: &Path, reference: &str) {
        self.import_image_with_cmd(rootfs, reference, r#"["/bin/sh"]"#)
    }

    /// [`Containerd::import_image`] with the image's command (a JSON array).
    pub fn import_image_with_cmd(&self, rootfs: &Path, reference: &str, cmd: &str) {
        let archive = self.dir.join("image.tar");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../testdata/build-image.sh");
        let status = Command::new("bash")
            .arg(script)
            .arg(rootfs)
            .arg(reference)
            .arg(&archive)
            .arg(cmd)
            .status()
            .unwrap();
        assert!(status.success(), "build-image.sh failed");
        self.ctr_ok(&["image", "import", &archive.display().to_string()]);
    }

    /// `ctr run -d --null-io` of a pclive container from `rootfs`.
    pub fn run_detached(&self, id: &str, rootfs: &Path, extra: &[&str], cmd: &[&str]) {
        let rootfs = rootfs.display().to_string();
        let mut args = vec!["run", "-d", "--null-io", "--runtime", RUNTIME];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["--rootfs", &rootfs, id]);
        args.extend_from_slice(cmd);
        self.ctr_ok(&args);
    }

    /// Starts recording containerd's events (`ctr events`) for the rest of the test.
    pub fn record_events(&self) -> EventLog {
        let path = self.dir.join("events.txt");
        let child = self
            .ctr_command(&["events"])
            .stdout(fs::File::create(&path).unwrap())
            .spawn()
            .unwrap();
        // Give the subscription a moment, so the first events are not missed.
        sleep(Duration::from_millis(300));
        EventLog {
            path,
            _recorder: Guarded(Some(child)),
        }
    }

    /// The bundle directory containerd made for a task.
    pub fn bundle(&self, id: &str) -> PathBuf {
        self.dir
            .join("state/io.containerd.runtime.v2.task")
            .join(&self.namespace)
            .join(id)
    }

    /// `ctr task checkpoint --exit` into `images` (work files beside it), then removes the
    /// stopped task and its container so that the images can be restored under any id.
    pub fn checkpoint_and_remove(&self, id: &str, images: &Path) {
        let images = images.display().to_string();
        let work = format!("{images}-work");
        self.ctr_ok(&[
            "task",
            "checkpoint",
            "--exit",
            "--image-path",
            &images,
            "--work-path",
            &work,
            id,
        ]);
        self.wait_status(id, "STOPPED");
        self.ctr_ok(&["task", "rm", id]);
        self.ctr_ok(&["container", "rm", id]);
    }

    /// The task's (pid, status) from `ctr task ls`.
    pub fn task(&self, id: &str) -> Option<(u32, String)> {
        let out = self.ctr_ok(&["task", "ls"]);
        out.lines().skip(1).find_map(|line| {
            let mut cols = line.split_whitespace();
            (cols.next()? == id).then(|| {
                let pid = cols.next().and_then(|p| p.parse().ok()).unwrap_or(0);
                (pid, cols.next().unwrap_or("").to_string())
            })
        })
    }

    pub fn wait_status(&self, id: &str, want: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.task(id).is_none_or(|(_, s)| s != want) {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for task {id} to be {want}; tasks:\n{}\n--- containerd log tail ---\n{}",
                String::from_utf8_lossy(&self.ctr(&["task", "ls"]).stdout),
                tail(&self.log(), 40)
            );
            sleep(Duration::from_millis(50));
        }
    }

    /// The memory limit file of the cgroup ctr gives a container (`/<namespace>/<id>`), for
    /// cgroup v1 or v2.
    pub fn memory_limit_file(&self, id: &str) -> PathBuf {
        let unified = Path::new("/sys/fs/cgroup/cgroup.controllers").exists();
        let base = if unified {
            PathBuf::from("/sys/fs/cgroup")
        } else {
            PathBuf::from("/sys/fs/cgroup/memory")
        };
        base.join(&self.namespace).join(id).join(if unified {
            "memory.max"
        } else {
            "memory.limit_in_bytes"
        })
    }

    /// Shim processes this daemon started that are still alive.
    pub fn live_shims(&self) -> Vec<i32> {
        processes_with_args(&["-address", &self.address])
    }

    fn remove_everything(&self) {
        let ids = self.ctr(&["container", "ls", "-q"]);
        for id in String::from_utf8_lossy(&ids.stdout).split_whitespace() {
            let _ = self.ctr(&["task", "kill", "-s", "SIGKILL", id]);
            let _ = self.ctr(&["task", "resume", id]);
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if self.ctr(&["task", "rm", "-f", id]).status.success() || self.task(id).is_none() {
                    break;
                }
                sleep(Duration::from_millis(50));
            }
            let _ = self.ctr(&["container", "rm", id]);
        }
    }
}

impl Containerd {
    /// This host's pclive settings (tests may rewrite them; the shim reads them at each Create).
    pub fn pclive_config(&self) -> PathBuf {
        self.dir.join("pclive-config.toml")
    }

    /// This host's copy of the migration key (root's, 0600; the same bytes on every host).
    pub fn key(&self) -> String {
        let path = self.dir.join("migration.key");
        write_private(&path, b"0123456789abcdef0123456789abcdef");
        path.display().to_string()
    }
}

impl Containerd {
    /// Lazy-pages servers of this host's containers still running: a receive that ended
    /// without the source's acknowledgement keeps answering its questions for minutes (by
    /// design); at the end of a test they are ours to stop.
    pub fn stop_lingering_servers(&self) {
        let dir = format!("{}/", self.dir.display());
        let ours = |pid: &i32| {
            let raw = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let args: Vec<String> = raw
                .split(|b| *b == 0)
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            args.iter().any(|a| a.starts_with(&dir))
        };
        for pid in processes_with_args(&["lazy-pages-server"])
            .into_iter()
            .filter(ours)
        {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        if self.daemon.is_some() {
            self.remove_everything();
        }
        self.stop_daemon();
        self.stop_lingering_servers();
        // Shims started by this daemon that did not shut down (a bug, reported by the tests
        // that check shutdown) are ours to stop.
        for pid in self.live_shims() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        // Mounts left under our directory (rootfs of a crashed task), then the files.
        if let Ok(mounts) = fs::read_to_string("/proc/self/mounts") {
            let mut ours: Vec<&str> = mounts
                .lines()
                .filter_map(|l| l.split_whitespace().nth(1))
                .filter(|m| Path::new(m).starts_with(&self.dir))
                .collect();
            ours.sort_by_key(|m| std::cmp::Reverse(m.len()));
            for m in ours {
                let _ = nix::mount::umount2(m, nix::mount::MntFlags::MNT_DETACH);
            }
        }
        let _ = fs::remove_dir_all(&self.dir);
        // runc state and the namespace's cgroups.
        let runc_root = containerd_shim_pclive::paths::runc_root(&self.address, &self.namespace);
        if let Some(per_daemon) = runc_root.parent() {
            let _ = fs::remove_dir_all(per_daemon);
        }
        if let Ok(controllers) = fs::read_dir("/sys/fs/cgroup") {
            for controller in controllers.flatten() {
                let ns_dir = controller.path().join(&self.cgroup_root);
                if let Ok(children) = fs::read_dir(&ns_dir) {
                    for child in children.flatten() {
                        if child.path().is_dir() {
                            let _ = fs::remove_dir(child.path());
                        }
                    }
                }
                let _ = fs::remove_dir(&ns_dir);
            }
        }
    }
}

impl Containerd {
    /// Where this host's shims record migrations (PCLIVE_STATE_DIR; `--state-dir` of pclive).
    pub fn state_base(&self) -> PathBuf {
        self.dir.join("pclive")
    }

    /// A test bed host's containerd: ctr's containers in a namespace of the test bed's, CRI
    /// pods (namespace k8s.io) below the host's cgroup; `scripts/testbed.sh down` removes both.
    fn external_host(state: &Path, name: &str, host: &str, cri: bool) -> Self {
        let (namespace, cgroup_root) = if cri {
            ("k8s.io".into(), format!("pclive-testbed-{name}-{host}"))
        } else {
            let namespace = format!("pclive-{name}-{host}");
            (namespace.clone(), namespace)
        };
        Self::external(state.join(host), namespace, cgroup_root)
    }

    /// A handle on a containerd somebody else runs, whose containers' cgroups are below
    /// `cgroup_root`.
    fn external(dir: PathBuf, namespace: String, cgroup_root: String) -> Self {
        Containerd {
            address: dir.join("containerd.sock").display().to_string(),
            config: dir.join("config.toml"),
            dir,
            cgroup_root,
            namespace,
            path_env: String::new(),
            daemon: None,
        }
    }
}

/// Two emulated hosts (scripts/testbed.sh): network namespaces joined by a tc-limited veth
/// link, a containerd in each running this build's shim. Torn down on drop.
pub struct TwoHosts {
    name: String,
    bin: PathBuf,
    pub src: Containerd,
    pub dst: Containerd,
    /// The destination host's address on the link.
    pub dst_ip: String,
}

impl TwoHosts {
    pub fn up(rate: &str) -> Self {
        Self::up_with_env(rate, &[])
    }

    /// [`TwoHosts::up`] with more environment for both hosts' containerd (and their shims),
    /// e.g. PCLIVE_FAILPOINTS.
    pub fn up_with_env(rate: &str, env: &[(&str, &Path)]) -> Self {
        Self::up_configured(rate, env, None)
    }

    /// Two hosts whose containerd's CRI plugin runs pods with the runtime handler `pclive`,
    /// sandboxed by `sandbox_image` (import it on each host); their namespace is `k8s.io`.
    pub fn up_cri(rate: &str, sandbox_image: &str) -> Self {
        Self::up_configured(rate, &[], Some(sandbox_image))
    }

    fn up_configured(rate: &str, env: &[(&str, &Path)], cri: Option<&str>) -> Self {
        require_root();
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let name = format!("t{}x{n}", std::process::id() % 100_000);
        let bin = PathBuf::from(format!("/tmp/pclive-tb-bin-{name}"));
        let _ = fs::remove_dir_all(&bin);
        fs::create_dir_all(&bin).unwrap();
        symlink(shim_binary(), bin.join("containerd-shim-pclive-v2")).unwrap();
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/testbed.sh");
        let path = format!(
            "{}:{}",
            bin.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let out = Command::new("bash")
            .arg(&script)
            .args(["up", "--name", &name, "--rate", rate])
            .args(cri.map(|image| ["--cri", image]).iter().flatten())
            .env("PATH", &path)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .output()
            .unwrap();
        let state = PathBuf::from("/run/pclive-testbed").join(&name);
        let hosts = TwoHosts {
            src: Containerd::external_host(&state, &name, "src", cri.is_some()),
            dst: Containerd::external_host(&state, &name, "dst", cri.is_some()),
            dst_ip: String::from_utf8_lossy(&out.stdout)
                .lines()
                .find(|l| l.starts_with("dst:"))
                .and_then(|l| l.split_whitespace().nth(4))
                .map(|a| a.trim_end_matches(',').to_string())
                .unwrap_or_default(),
            name,
            bin,
        };
        assert!(
            out.status.success() && !hosts.dst_ip.is_empty(),
            "testbed up failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        hosts
    }
}

impl TwoHosts {
    /// Cuts the link between the hosts (the source side of the veth pair goes down).
    pub fn cut_link(&self) {
        let status = Command::new("ip")
            .args([
                "-n",
                &format!("{}-src", self.name),
                "link",
                "set",
                &format!("{}s", self.name),
                "down",
            ])
            .status()
            .unwrap();
        assert!(status.success(), "cannot cut the link");
    }
}

impl TwoHosts {
    /// The test bed's name (scripts/testbed.sh --name).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `pclive` for one host (`src` or `dst`), run in that host's network namespace (`resolve`
    /// talks to the other host).
    pub fn pclive(&self, src: bool) -> Command {
        let (host, side) = if src {
            (&self.src, "src")
        } else {
            (&self.dst, "dst")
        };
        let mut command = Command::new("nsenter");
        command
            .arg(format!("--net=/run/netns/{}-{side}", self.name))
            .arg(env!("CARGO_BIN_EXE_pclive"))
            .env("CONTAINERD_ADDRESS", &host.address)
            .env("CONTAINERD_NAMESPACE", &host.namespace)
            .env("PCLIVE_STATE_DIR", host.state_base());
        command
    }

    /// The directory whose shim binary the hosts' containerd run.
    pub fn bin_dir(&self) -> &Path {
        &self.bin
    }

    /// Brings a cut link back.
    pub fn restore_link(&self) {
        let status = Command::new("ip")
            .args([
                "-n",
                &format!("{}-src", self.name),
                "link",
                "set",
                &format!("{}s", self.name),
                "up",
            ])
            .status()
            .unwrap();
        assert!(status.success(), "cannot restore the link");
    }
}

impl TwoHosts {
    /// The address `last` on the test bed's pod network (10.216.N.last; the client namespace
    /// is 10.216.N.254 there).
    pub fn pod_address(&self, last: u8) -> String {
        let n = self.dst_ip.split('.').nth(2).unwrap();
        format!("10.216.{n}.{last}")
    }

    /// A pod network namespace on `host` (`src` or `dst`) with `address` on its eth0, up or
    /// down (scripts/testbed.sh pod); its path. `down` removes it with the test bed.
    pub fn pod(&self, host: &str, pod: &str, address: &str, up: bool) -> PathBuf {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/testbed.sh");
        let out = Command::new("bash")
            .arg(script)
            .args(["pod", host, "--name", &self.name, pod, address])
            .args(if up { None } else { Some("--down") })
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "testbed pod failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        PathBuf::from(format!("/run/netns/{}-{host}-{pod}", self.name))
    }
}

/// Seconds since the Unix epoch (to compare with the times reports carry).
pub fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// Waits until a TCP connection to `address` from the network namespace `netns` (a name under
/// /run/netns) succeeds.
pub fn wait_reachable(what: &str, netns: &str, address: std::net::SocketAddr) {
    wait_for(what, Duration::from_secs(30), || {
        in_netns(netns.to_string(), move || {
            std::net::TcpStream::connect_timeout(&address, Duration::from_secs(1)).is_ok()
        })
        .join()
        .unwrap()
    });
}

/// Whether interface `dev` of the network namespace at `netns` is up.
pub fn link_is_up(netns: &Path, dev: &str) -> bool {
    let out = Command::new("nsenter")
        .arg(format!("--net={}", netns.display()))
        .args(["ip", "-o", "link", "show", dev])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "no interface {dev} in {}",
        netns.display()
    );
    let text = String::from_utf8_lossy(&out.stdout);
    text.split('<')
        .nth(1)
        .and_then(|flags| flags.split('>').next())
        .is_some_and(|flags| flags.split(',').any(|f| f == "UP"))
}

impl Drop for TwoHosts {
    fn drop(&mut self) {
        self.src.remove_everything();
        self.dst.remove_everything();
        self.src.stop_lingering_servers();
        self.dst.stop_lingering_servers();
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/testbed.sh");
        let _ = Command::new("bash")
            .arg(script)
            .args(["down", "--name", &self.name])
            .output();
        let _ = fs::remove_dir_all(&self.bin);
    }
}

/// containerd's events, recorded while the test runs.
pub struct EventLog {
    path: PathBuf,
    _recorder: Guarded,
}

impl EventLog {
    /// Waits until every topic (e.g. `/tasks/oom`) has been published.
    pub fn wait_for_topics(&self, topics: &[&str]) {
        wait_for(
            &format!("the events {topics:?}"),
            Duration::from_secs(10),
            || {
                let seen = fs::read_to_string(&self.path).unwrap_or_default();
                topics.iter().all(|t| seen.contains(t))
            },
        );
    }
}

/// pids of processes whose argv contains `needle` as consecutive arguments.
pub fn processes_with_args(needle: &[&str]) -> Vec<i32> {
    let mut found = Vec::new();
    let Ok(entries) = fs::read_dir("/proc") else {
        return found;
    };
    for entry in entries.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(raw) = fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<String> = raw
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if args
            .windows(needle.len())
            .any(|w| w.iter().zip(needle).all(|(a, b)| a == b))
        {
            found.push(pid);
        }
    }
    found
}

/// Runs `f` on a thread of its own inside network namespace `ns` (/run/netns/NS), and the
/// threads `f` starts.
pub fn in_netns<T: Send + 'static>(
    ns: String,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    std::thread::spawn(move || {
        use std::os::fd::AsRawFd;
        let netns = fs::File::open(format!("/run/netns/{ns}")).unwrap();
        // SAFETY: setns(2) on a descriptor that lives across the call; it moves only this
        // thread (and the threads it starts), which exists for `f`.
        let rc = unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
        f()
    })
}

pub fn find_on_path(binary: &str) -> PathBuf {
    std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .map(|dir| Path::new(dir).join(binary))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("{binary} not found on PATH: run scripts/setup.sh"))
}

pub fn wait_for(what: &str, timeout: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !condition() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        sleep(Duration::from_millis(50));
    }
}

pub fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Reads a small file the container writes into its rootfs (e.g. a counter).
pub fn read_number(path: &Path) -> Option<u64> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// memcheck's status line: `pass=N pages=N writes=N errors=0 counter=N`, or `CORRUPT ...`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemcheckStatus {
    pub pass: u64,
    pub pages: u64,
    pub writes: u64,
    pub errors: u64,
}

pub fn memcheck_status(path: &Path) -> Option<MemcheckStatus> {
    let text = fs::read_to_string(path).ok()?;
    assert!(
        !text.starts_with("CORRUPT"),
        "memcheck found corrupt memory: {text}"
    );
    let field = |name: &str| -> Option<u64> {
        text.split_whitespace()
            .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
            .and_then(|v| v.parse().ok())
    };
    Some(MemcheckStatus {
        pass: field("pass")?,
        pages: field("pages")?,
        writes: field("writes")?,
        errors: field("errors")?,
    })
}

/// A child process (e.g. an attached `ctr run`) that is killed if the test fails before it ends.
pub struct Guarded(pub Option<Child>);

impl Guarded {
    pub fn wait_code(mut self, timeout: Duration) -> i32 {
        let mut child = self.0.take().unwrap();
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status.code().unwrap_or(-1);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("process did not exit within {timeout:?}");
            }
            sleep(Duration::from_millis(20));
        }
    }

    /// [`Guarded::wait_code`] and what the process printed on its (piped) stdout, read as it
    /// comes so that a long output cannot block it.
    pub fn wait_output(mut self, timeout: Duration) -> (i32, String) {
        let mut stdout = self
            .0
            .as_mut()
            .unwrap()
            .stdout
            .take()
            .expect("stdout piped");
        let reader = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = std::io::Read::read_to_string(&mut stdout, &mut text);
            text
        });
        let code = self.wait_code(timeout);
        (code, reader.join().unwrap())
    }

    pub fn write_stdin(&mut self, data: &[u8]) {
        let child = self.0.as_mut().unwrap();
        let mut stdin = child.stdin.take().expect("stdin piped");
        stdin.write_all(data).unwrap();
        // Dropping stdin closes it: EOF for the container.
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Writes a file only root may read (as key files must be: pclive refuses others).
pub fn write_private(path: &Path, bytes: &[u8]) {
    use std::os::unix::fs::OpenOptionsExt;
    let _ = fs::remove_file(path);
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .unwrap_or_else(|e| panic!("cannot create {}: {e}", path.display()));
    std::io::Write::write_all(&mut file, bytes).unwrap();
}

/// A fault configuration file (PCLIVE_FAILPOINTS) holding `lines`, removed when the guard
/// drops.
pub fn failpoints_file(lines: &str) -> (PathBuf, RemoveOnDrop) {
    let path = std::env::temp_dir().join(format!(
        "pclive-failpoints-{}-{}",
        std::process::id(),
        migration::free_port()
    ));
    fs::write(&path, lines).unwrap();
    (path.clone(), RemoveOnDrop(path))
}

/// A file removed when dropped (a test's fault configuration, say).
pub struct RemoveOnDrop(pub PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}
