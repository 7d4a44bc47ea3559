//! Kubernetes' view: containerd's CRI plugin runs a pod with the runtime handler `pclive` (the
//! configuration docs/kubernetes.md gives), driven through the CRI gRPC API as the kubelet
//! drives it (the `k8s-cri` client): sandbox, container, exec, stats, kubelet's checkpoint API
//! and a restore from that checkpoint, stop and removal.

mod common;

use std::fs;
use std::time::Duration;

use common::*;
use containerd_client::tonic;
use containerd_client::tonic::transport::Channel;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::*;

const IMAGE: &str = "localhost/pclive-cri-busybox:1";
const HANDLER: &str = "pclive";

/// A local OCI registry (Debian's docker-registry) on a free loopback port, its storage in the
/// test's directory; stopped on drop. containerd restores a checkpoint archive on top of its
/// base image pulled by digest, so the workload's image must come from a registry.
struct Registry {
    address: String,
    _daemon: Guarded,
}

impl Registry {
    fn start(dir: &std::path::Path) -> Self {
        let port = common::migration::free_port();
        let address = format!("localhost:{port}");
        let config = dir.join("registry.yml");
        fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n",
                dir.join("registry").display()
            ),
        )
        .unwrap();
        let daemon = std::process::Command::new(find_on_path("docker-registry"))
            .arg("serve")
            .arg(&config)
            .stdin(std::process::Stdio::null())
            .stdout(fs::File::create(dir.join("registry.log")).unwrap())
            .stderr(fs::File::create(dir.join("registry.err")).unwrap())
            .spawn()
            .expect("start docker-registry (scripts/setup.sh installs it)");
        let daemon = Guarded(Some(daemon));
        wait_for("the registry to listen", Duration::from_secs(20), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        Registry {
            address,
            _daemon: daemon,
        }
    }
}

/// The CRI client on a current-thread runtime: the test stays synchronous, as the others.
struct Cri {
    rt: tokio::runtime::Runtime,
    client: RuntimeServiceClient<Channel>,
    /// containerd's log, quoted when a call fails.
    log: std::path::PathBuf,
}

impl Cri {
    fn connect(containerd: &Containerd) -> Self {
        Self::connect_to(&containerd.address, containerd.dir.join("containerd.log"))
    }

    fn connect_to(address: &str, log: std::path::PathBuf) -> Self {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let channel = rt
            .block_on(containerd_client::connect(address))
            .expect("connect to containerd's socket");
        Cri {
            rt,
            client: RuntimeServiceClient::new(channel),
            log,
        }
    }

    /// Runs one call; a failure names the call and carries containerd's message.
    fn call<T, F>(&mut self, what: &str, f: impl FnOnce(RuntimeServiceClient<Channel>) -> F) -> T
    where
        F: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let client = self.client.clone();
        match self.rt.block_on(f(client)) {
            Ok(response) => response.into_inner(),
            Err(status) => panic!(
                "CRI {what} failed: {}\n--- containerd log ---\n{}",
                status.message(),
                tail(&fs::read_to_string(&self.log).unwrap_or_default(), 30)
            ),
        }
    }
}

/// The image's command, which the pods' sandbox runs.
const SLEEP: &str = r#"["/bin/sleep","100000000"]"#;

/// A loop that counts in /tmp/count, 20 times a second.
const COUNTER: &str = "i=0; while :; do i=$((i+1)); echo $i > /tmp/count; sleep 0.05; done";

fn namespaces() -> Option<NamespaceOption> {
    // The node's network: these hosts have no CNI plugins (as a hostNetwork pod).
    Some(NamespaceOption {
        network: NamespaceMode::Node as i32,
        pid: NamespaceMode::Container as i32,
        ipc: NamespaceMode::Pod as i32,
        ..Default::default()
    })
}

/// A hostNetwork pod run with the pclive handler, as the kubelet runs one.
struct Pod {
    id: String,
    config: PodSandboxConfig,
}

impl Pod {
    fn run(cri: &mut Cri, containerd: &Containerd, name: &str) -> Self {
        let config = PodSandboxConfig {
            metadata: Some(PodSandboxMetadata {
                name: name.into(),
                uid: format!("pclive-cri-test-{name}"),
                namespace: "default".into(),
                attempt: 0,
            }),
            // A hostNetwork pod shares the host's UTS namespace: no hostname of its own.
            log_directory: containerd.dir.join("pods").display().to_string(),
            linux: Some(LinuxPodSandboxConfig {
                // Below the host's cgroup, which the harness removes.
                cgroup_parent: format!("/{}", containerd.cgroup_root),
                security_context: Some(LinuxSandboxSecurityContext {
                    namespace_options: namespaces(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let id = {
            let config = config.clone();
            cri.call("RunPodSandbox", |mut c| async move {
                c.run_pod_sandbox(RunPodSandboxRequest {
                    config: Some(config),
                    runtime_handler: HANDLER.into(),
                })
                .await
            })
            .pod_sandbox_id
        };
        let sandbox = containerd.ctr_ok(&["container", "info", &id]);
        assert!(
            sandbox.contains(RUNTIME),
            "the sandbox does not run with {RUNTIME}: {sandbox}"
        );
        Pod { id, config }
    }

    /// CreateContainer of the counter loop from `image`, with these annotations.
    fn create(
        &self,
        cri: &mut Cri,
        name: &str,
        image: &str,
        annotations: &[(&str, &str)],
    ) -> String {
        let config = ContainerConfig {
            metadata: Some(ContainerMetadata {
                name: name.into(),
                attempt: 0,
            }),
            image: Some(ImageSpec {
                image: image.into(),
                ..Default::default()
            }),
            command: ["/bin/sh", "-c", COUNTER].map(String::from).to_vec(),
            annotations: annotations
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            log_path: format!("{name}.log"),
            linux: Some(LinuxContainerConfig {
                security_context: Some(LinuxContainerSecurityContext {
                    namespace_options: namespaces(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let (pod, sandbox) = (self.id.clone(), self.config.clone());
        cri.call("CreateContainer", |mut c| async move {
            c.create_container(CreateContainerRequest {
                pod_sandbox_id: pod,
                config: Some(config),
                sandbox_config: Some(sandbox),
            })
            .await
        })
        .container_id
    }

    /// StopPodSandbox and RemovePodSandbox (its containers go with it); then the runtime has
    /// no pod and no container left.
    fn remove(self, cri: &mut Cri) {
        let id = self.id.clone();
        cri.call("StopPodSandbox", |mut c| async move {
            c.stop_pod_sandbox(StopPodSandboxRequest { pod_sandbox_id: id })
                .await
        });
        let id = self.id;
        cri.call("RemovePodSandbox", |mut c| async move {
            c.remove_pod_sandbox(RemovePodSandboxRequest { pod_sandbox_id: id })
                .await
        });
        let left = cri.call("ListContainers", |mut c| async move {
            c.list_containers(ListContainersRequest::default()).await
        });
        assert!(
            left.containers.is_empty(),
            "containers left: {:?}",
            left.containers
        );
        let pods = cri.call("ListPodSandbox", |mut c| async move {
            c.list_pod_sandbox(ListPodSandboxRequest::default()).await
        });
        assert!(pods.items.is_empty(), "pods left: {:?}", pods.items);
    }
}

fn start(cri: &mut Cri, id: &str) {
    let id = id.to_string();
    cri.call("StartContainer", |mut c| async move {
        c.start_container(StartContainerRequest { container_id: id })
            .await
    });
}

fn state(cri: &mut Cri, id: &str) -> ContainerState {
    let id = id.to_string();
    let status = cri.call("ContainerStatus", |mut c| async move {
        c.container_status(ContainerStatusRequest {
            container_id: id,
            verbose: false,
        })
        .await
    });
    status
        .status
        .and_then(|s| ContainerState::try_from(s.state).ok())
        .expect("no container state")
}

/// The counter the container's loop keeps in /tmp/count, read with ExecSync (the loop
/// rewrites the file 20 times a second: a read may find it empty or missing, and is repeated).
fn count(cri: &mut Cri, id: &str) -> u64 {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let id = id.to_string();
        let out = cri.call("ExecSync", |mut c| async move {
            c.exec_sync(ExecSyncRequest {
                container_id: id,
                cmd: vec!["cat".into(), "/tmp/count".into()],
                timeout: 10,
            })
            .await
        });
        let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if out.exit_code == 0 {
            if let Ok(n) = text.parse() {
                return n;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no count in /tmp/count: exit {}, {text:?}, {}",
            out.exit_code,
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn wait_count_above(cri: &mut Cri, id: &str, above: u64) -> u64 {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let n = count(cri, id);
        if n > above {
            return n;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the counter of {id} stays at {n} (wanted more than {above})"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_pod_runs_checkpoints_and_restores_with_the_pclive_handler_through_the_cri_api() {
    let containerd = Containerd::start_cri(IMAGE);
    let rootfs = containerd.rootfs("cri-image");
    // One image serves as the pods' sandbox (its command sleeps) and as the workload's.
    containerd.import_image_with_cmd(&rootfs, IMAGE, SLEEP);
    let mut cri = Cri::connect(&containerd);
    let version = cri.call("Version", |mut c| async move {
        c.version(VersionRequest::default()).await
    });
    assert_eq!(version.runtime_name, "containerd");

    // The workload's image, pushed to a registry and pulled through the CRI as the kubelet
    // would: its reference then carries the digest a restore pulls it by.
    let registry = Registry::start(&containerd.dir);
    let image = format!("{}/pclive/busybox:1", registry.address);
    containerd.ctr_ok(&["image", "tag", IMAGE, &image]);
    containerd.ctr_ok(&["image", "push", "--plain-http", &image]);
    containerd.ctr_ok(&["image", "rm", &image]);
    {
        let channel = cri
            .rt
            .block_on(containerd_client::connect(&containerd.address))
            .unwrap();
        let mut images = ImageServiceClient::new(channel);
        let pull = PullImageRequest {
            image: Some(ImageSpec {
                image: image.clone(),
                ..Default::default()
            }),
            ..Default::default()
        };
        cri.rt
            .block_on(images.pull_image(pull))
            .unwrap_or_else(|e| {
                panic!(
                    "CRI PullImage failed: {}\n--- containerd log ---\n{}",
                    e.message(),
                    tail(&containerd.log(), 20)
                )
            });
    }

    let pod = Pod::run(&mut cri, &containerd, "counter");
    let app = pod.create(&mut cri, "app", &image, &[]);
    start(&mut cri, &app);
    let info = containerd.ctr_ok(&["container", "info", &app]);
    assert!(
        info.contains(RUNTIME),
        "the container does not run with {RUNTIME}"
    );
    // Counted 30 times (1.5 s): a restarted copy would count from 1 again.
    let before = wait_count_above(&mut cri, &app, 30);

    // kubelet's view of the container: the shim's stats, converted by the CRI plugin.
    let stats = {
        let app = app.clone();
        cri.call("ContainerStats", |mut c| async move {
            c.container_stats(ContainerStatsRequest { container_id: app })
                .await
        })
        .stats
        .expect("no stats")
    };
    let memory = stats
        .memory
        .and_then(|m| m.working_set_bytes)
        .map(|v| v.value)
        .unwrap_or(0);
    assert!(memory > 0, "no memory working set in the stats: {stats:?}");
    assert!(
        stats
            .cpu
            .and_then(|c| c.usage_core_nano_seconds)
            .is_some_and(|v| v.value > 0),
        "no CPU usage in the stats"
    );

    // kubelet's checkpoint API (Forensic Container Checkpointing): the container keeps running.
    let archive = containerd.dir.join("app-checkpoint.tar");
    {
        let (app, location) = (app.clone(), archive.display().to_string());
        cri.call("CheckpointContainer", |mut c| async move {
            c.checkpoint_container(CheckpointContainerRequest {
                container_id: app,
                location,
                timeout: 60,
            })
            .await
        });
    }
    assert!(
        fs::metadata(&archive).is_ok_and(|m| m.len() > 0),
        "no checkpoint archive at {}",
        archive.display()
    );
    let at_checkpoint = count(&mut cri, &app);
    assert!(at_checkpoint >= before);
    wait_count_above(&mut cri, &app, at_checkpoint);
    assert_eq!(state(&mut cri, &app), ContainerState::ContainerRunning);

    // A restore as containerd does it for runc: a container whose image is the archive.
    let restored = pod.create(&mut cri, "restored", &archive.display().to_string(), &[]);
    start(&mut cri, &restored);
    let first = count(&mut cri, &restored);
    assert!(
        first >= before,
        "the restored counter starts at {first}: not from the checkpoint (was {before} before it)"
    );
    wait_count_above(&mut cri, &restored, first);

    for id in [&app, &restored] {
        let id = id.to_string();
        cri.call("StopContainer", |mut c| async move {
            c.stop_container(StopContainerRequest {
                container_id: id,
                timeout: 1,
            })
            .await
        });
    }
    assert_eq!(state(&mut cri, &app), ContainerState::ContainerExited);
    pod.remove(&mut cri);
}

/// A pod's container moves live to a receiving pod on the other host, as the node agent of
/// docs/kubernetes.md would move it: the receiving pod's container carries the receive
/// annotations (the handler passes `io.containerd.pclive.*` through), its StartContainer waits
/// for the migration, and `pclive migrate` sends the source's container there.
#[test]
fn a_pods_container_migrates_live_to_a_receiving_pod_on_the_other_host() {
    let hosts = TwoHosts::up_cri("10gbit", IMAGE);
    for host in [&hosts.src, &hosts.dst] {
        let rootfs = host.rootfs("cri-image");
        host.import_image_with_cmd(&rootfs, IMAGE, SLEEP);
    }
    let (mut src, mut dst) = (Cri::connect(&hosts.src), Cri::connect(&hosts.dst));
    let source_pod = Pod::run(&mut src, &hosts.src, "counter");
    let app = source_pod.create(&mut src, "app", IMAGE, &[]);
    start(&mut src, &app);
    let before = wait_count_above(&mut src, &app, 30);

    let receiving_pod = Pod::run(&mut dst, &hosts.dst, "counter-moved");
    let listen = format!("{}:{}", hosts.dst_ip, common::migration::free_port());
    let key = hosts.dst.key();
    let receiver = receiving_pod.create(
        &mut dst,
        "app",
        IMAGE,
        &[
            (containerd_shim_pclive::annotations::RECEIVE_LISTEN, &listen),
            (containerd_shim_pclive::annotations::RECEIVE_KEY_FILE, &key),
        ],
    );
    // The kubelet's StartContainer returns once the migration is restored.
    let starting = {
        let (address, log, id) = (
            hosts.dst.address.clone(),
            hosts.dst.dir.join("containerd.log"),
            receiver.clone(),
        );
        std::thread::spawn(move || start(&mut Cri::connect_to(&address, log), &id))
    };
    // The CRI gives every container /etc/hosts, /etc/resolv.conf and /dev/shm from the
    // node: the receiving pod has its own (docs/kubernetes.md, volumes).
    let report = common::migration::migrate_with(
        &hosts.src,
        &app,
        &listen,
        &hosts.src.key(),
        &["--external-mounts-ok"],
    )
    .unwrap_or_else(|e| {
        panic!(
            "the migration failed: {e}\n--- destination log ---\n{}",
            tail(&hosts.dst.log(), 40)
        )
    });
    starting
        .join()
        .expect("StartContainer of the receiving container failed");
    assert_eq!(state(&mut dst, &receiver), ContainerState::ContainerRunning);
    let first = count(&mut dst, &receiver);
    assert!(
        first >= before,
        "the moved counter is at {first}: not where the source left it (above {before})"
    );
    wait_count_above(&mut dst, &receiver, first);
    // The source is gone when pclive migrate returns; the CRI learns it from containerd's exit
    // event, a moment later (the suite once looked before it had).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while state(&mut src, &app) != ContainerState::ContainerExited
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        state(&mut src, &app),
        ContainerState::ContainerExited,
        "the source's container still runs 10 s after the migration ({report})"
    );
    source_pod.remove(&mut src);
    receiving_pod.remove(&mut dst);
}
