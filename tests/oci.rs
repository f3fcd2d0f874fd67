//! Container runtimes through `shiftfs-runtime`: real runc and crun from Debian, a canonical
//! busybox image, user-namespaced containers. Each test has its own run directory
//! (`SHIFTFS_RUN_DIR`) and runtime state root, so tests never see each other's containers.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

// ---------------------------------------------------------------------------------------------
// Fixtures

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Runtime {
    Runc,
    Crun,
}

/// Where the image lives: ext4 (the kernel can idmap it) or ramfs (it cannot: FUSE).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ImageFs {
    Ext4,
    Ramfs,
}

fn require_runtime(rt: Runtime) -> bool {
    require_root()
        && match rt {
            Runtime::Runc => require_tool("runc", "runc"),
            Runtime::Crun => require_tool("crun", "crun") && require_tool("unshare", "util-linux"),
        }
        && require_tool("mkfs.ext4", "e2fsprogs")
        && busybox_static().is_some()
}

/// A static busybox (Debian's busybox-static; a dynamic one would need a libc in the image).
fn busybox_static() -> Option<PathBuf> {
    let busybox = PathBuf::from("/bin/busybox");
    // ldd fails, or prints nothing, for a static executable.
    let is_static = busybox.exists()
        && Command::new("ldd")
            .arg(&busybox)
            .output()
            .is_ok_and(|o| !o.status.success() || o.stdout.is_empty());
    if !is_static {
        skip("needs a static /bin/busybox for the image (apt-get install busybox-static)");
        return None;
    }
    Some(busybox)
}

/// A file system mounted for a test; Drop unmounts it (lazily, so a failing test still cleans up).
struct FsMount(PathBuf);

impl FsMount {
    #[track_caller]
    fn new(kind: ImageFs, at: &Path, scratch: &Path) -> Self {
        fs::create_dir_all(at).unwrap();
        match kind {
            ImageFs::Ext4 => {
                let img = scratch.join("image.ext4");
                run(&mut sh(&format!(
                    "truncate -s 64M {0} && mkfs.ext4 -q -F {0}",
                    q(&img)
                )))
                .assert_ok();
                run(Command::new("mount")
                    .arg("-o")
                    .arg("loop")
                    .arg(&img)
                    .arg(at))
                .assert_ok();
            }
            ImageFs::Ramfs => {
                run(Command::new("mount").args(["-t", "ramfs", "ramfs"]).arg(at)).assert_ok();
            }
        }
        fs::set_permissions(at, fs::Permissions::from_mode(0o755)).unwrap();
        Self(at.to_path_buf())
    }
}

impl Drop for FsMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// A canonical image: busybox and the directories a runtime needs, all owned by 0:0.
fn build_image(root: &Path) {
    for d in ["bin", "proc", "sys", "dev", "etc", "tmp", "root"] {
        mkdir(&root.join(d), 0o755, 0, 0);
    }
    fs::set_permissions(root.join("tmp"), fs::Permissions::from_mode(0o1777)).unwrap();
    fs::copy("/bin/busybox", root.join("bin/busybox")).unwrap();
    // Every applet as a link, so the container's shell finds `stat`, `touch` and the rest.
    let list = run(Command::new("/bin/busybox").arg("--list"));
    list.assert_ok();
    for applet in list.stdout.lines().filter(|a| *a != "busybox") {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).unwrap();
    }
    std::os::unix::fs::chown(root, Some(0), Some(0)).unwrap();
}

/// Force-deletes, on Drop, every container left in a runtime state root (a failing test's
/// containers would otherwise keep running); the test directory's own cleanup then removes
/// the mounts. Declared before the directory in [`Env`], so it runs first.
struct Containers {
    runtime: PathBuf,
    root: PathBuf,
}

impl Drop for Containers {
    fn drop(&mut self) {
        // runc and crun keep one directory per container in their state root.
        for e in fs::read_dir(&self.root).into_iter().flatten().flatten() {
            let _ = Command::new(&self.runtime)
                .arg("--root")
                .arg(&self.root)
                .args(["delete", "--force"])
                .arg(e.file_name())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// Everything one test needs: its directory, run dir, runtime state root and image.
struct Env {
    _containers: Containers,
    dir: TestDir,
    rt: Runtime,
    run_dir: PathBuf,
    state_root: PathBuf,
    /// A script that runs crun the way it works on this machine (see `crun_wrapper`).
    crun_script: Option<PathBuf>,
    /// Dropped last: other tests wait until this one's containers and mounts are gone.
    _serial: Serial,
}

/// podman's tests run alone: run beside the other tests (whose runtimes and FUSE daemons make
/// mount namespaces, copies of the host's mounts), `podman rm` failed now and then with
/// "unlinkat .../userdata/shm: device or resource busy".
static PODMAN_ALONE: std::sync::RwLock<()> = std::sync::RwLock::new(());

#[allow(dead_code)] // held for its Drop only
enum Serial {
    Shared(std::sync::RwLockReadGuard<'static, ()>),
    Alone(std::sync::RwLockWriteGuard<'static, ()>),
}

impl Env {
    fn new(name: &str, rt: Runtime) -> Self {
        let serial = Serial::Shared(PODMAN_ALONE.read().unwrap_or_else(|e| e.into_inner()));
        Self::with_serial(name, rt, serial)
    }

    /// For podman's tests: no other test of this file runs meanwhile.
    fn alone(name: &str) -> Self {
        let serial = Serial::Alone(PODMAN_ALONE.write().unwrap_or_else(|e| e.into_inner()));
        Self::with_serial(name, Runtime::Runc, serial)
    }

    fn with_serial(name: &str, rt: Runtime, _serial: Serial) -> Self {
        let dir = TestDir::new(name);
        let run_dir = dir.path().join("run");
        let state_root = dir.path().join("runtime-state");
        let crun_script = (rt == Runtime::Crun).then(|| crun_wrapper(dir.path()));
        let _containers = Containers {
            runtime: crun_script
                .clone()
                .unwrap_or_else(|| PathBuf::from("/usr/sbin/runc")),
            root: state_root.clone(),
        };
        Self {
            _containers,
            _serial,
            dir,
            rt,
            run_dir,
            state_root,
            crun_script,
        }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// The real runtime the wrapper is to run.
    fn real_runtime(&self) -> PathBuf {
        match &self.crun_script {
            Some(s) => s.clone(),
            None => PathBuf::from("/usr/sbin/runc"),
        }
    }

    /// `shiftfs-runtime --root STATE ARGS...` (as an engine calls it), with this test's run dir.
    fn wrapper<I: IntoIterator<Item = S>, S: AsRef<std::ffi::OsStr>>(&self, args: I) -> Command {
        let mut c = Command::new(BIN);
        c.arg0("shiftfs-runtime")
            .arg("--root")
            .arg(&self.state_root)
            .args(args)
            .env("SHIFTFS_RUN_DIR", &self.run_dir)
            .env("SHIFTFS_RUNTIME", self.real_runtime())
            // The machine's /etc/shiftfs/runtime.toml is not this test's: only a file the
            // test writes here counts.
            .env("SHIFTFS_RUNTIME_CONFIG", self.path().join("runtime.toml"))
            .current_dir("/");
        c
    }

    /// `shiftfs ARGS` with this test's run dir.
    fn shiftfs<I: IntoIterator<Item = S>, S: AsRef<std::ffi::OsStr>>(&self, args: I) -> Command {
        let mut c = shiftfs(args);
        c.env("SHIFTFS_RUN_DIR", &self.run_dir);
        c
    }

    /// A bundle for `id` whose container runs `script` as its root, in a user namespace
    /// mapped `0 HOST 65536`.
    fn bundle(&self, id: &str, image: &Path, host: u32, script: &str) -> PathBuf {
        let b = self.path().join(format!("bundle-{id}"));
        fs::create_dir(&b).unwrap();
        let spec_cmd = match self.rt {
            Runtime::Runc => "runc",
            Runtime::Crun => "crun",
        };
        run(Command::new(spec_cmd).arg("spec").current_dir(&b)).assert_ok();
        let path = b.join("config.json");
        let mut c: Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
        c["root"] = json!({"path": image, "readonly": false});
        c["process"]["terminal"] = json!(false);
        c["process"]["args"] = json!(["/bin/busybox", "sh", "-c", script]);
        c["process"]["env"] = json!(["PATH=/bin"]);
        // `spec` grants almost nothing; a container's root normally may chown (podman's set).
        let caps = json!([
            "CAP_CHOWN",
            "CAP_DAC_OVERRIDE",
            "CAP_FOWNER",
            "CAP_FSETID",
            "CAP_KILL",
            "CAP_SETGID",
            "CAP_SETUID",
            "CAP_SETPCAP",
            "CAP_NET_BIND_SERVICE",
            "CAP_SYS_CHROOT",
            "CAP_SETFCAP",
            "CAP_AUDIT_WRITE",
            "CAP_MKNOD"
        ]);
        for set in ["bounding", "effective", "permitted"] {
            c["process"]["capabilities"][set] = caps.clone();
        }
        let ns = c["linux"]["namespaces"].as_array_mut().unwrap();
        ns.retain(|n| n["type"] != "user" && n["type"] != "cgroup");
        ns.push(json!({"type": "user"}));
        let map = json!([{"containerID": 0, "hostID": host, "size": 65536}]);
        c["linux"]["uidMappings"] = map.clone();
        c["linux"]["gidMappings"] = map;
        fs::write(&path, serde_json::to_vec_pretty(&c).unwrap()).unwrap();
        b
    }

    /// Adds an OCI idmapped bind mount of `source` at `dest` to a bundle.
    fn add_idmapped_volume(&self, bundle: &Path, source: &Path, dest: &str, host: u32) {
        let path = bundle.join("config.json");
        let mut c: Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
        let map = json!([{"containerID": 0, "hostID": host, "size": 65536}]);
        c["mounts"].as_array_mut().unwrap().push(json!({
            "destination": dest, "type": "bind", "source": source,
            "options": ["rbind", "rw", "idmap"],
            "uidMappings": map, "gidMappings": map,
        }));
        fs::write(&path, serde_json::to_vec_pretty(&c).unwrap()).unwrap();
    }

    /// The container's init pid, from the real runtime.
    fn init_pid(&self, id: &str) -> u32 {
        let out = run(Command::new(self.real_runtime())
            .arg("--root")
            .arg(&self.state_root)
            .args(["state", id]));
        out.assert_ok();
        let v: Value = serde_json::from_str(&out.stdout).unwrap();
        v["pid"].as_u64().unwrap() as u32
    }

    /// Nothing of this test mounted or running, and no container directory left.
    #[track_caller]
    fn assert_clean(&self) {
        assert_no_leaks(self.path());
        let left: Vec<_> = fs::read_dir(self.run_dir.join("oci"))
            .map(|d| d.flatten().map(|e| e.file_name()).collect())
            .unwrap_or_default();
        assert!(left.is_empty(), "container directories left: {left:?}");
    }
}

/// crun 1.8.1 refuses this machine's hybrid cgroup layout ("cgroups in hybrid mode not
/// supported, drop all controllers from cgroupv2": the v2 hierarchy holds hugetlb). In a
/// private mount namespace with a cgroup2 mounted over /sys/fs/cgroup, and without cgroup
/// management, it runs: the script every crun call goes through.
fn crun_wrapper(dir: &Path) -> PathBuf {
    let path = dir.join("crun-private-cgroup2");
    fs::write(
        &path,
        "#!/bin/sh\nexec unshare -m sh -c 'mount -t cgroup2 none /sys/fs/cgroup && exec crun --cgroup-manager=disabled \"$@\"' crun \"$@\"\n",
    )
    .unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
    path
}

/// Waits until `path` exists (written by a container).
#[track_caller]
fn wait_for_file(path: &Path, timeout: Duration) -> String {
    let start = Instant::now();
    loop {
        if let Ok(s) = fs::read_to_string(path)
            && s.ends_with('\n')
        {
            return s;
        }
        assert!(
            start.elapsed() < timeout,
            "{} did not appear within {timeout:?}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The uid a process runs as on the host.
fn host_uid(pid: u32) -> u32 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

// ---------------------------------------------------------------------------------------------
// Two containers from one image

/// What each container does: write a file as its root and one as its user 1000, then stay.
fn container_script(me: &str) -> String {
    format!(
        "cd /tmp && touch {me} && touch {me}-user && chown 1000:1000 {me}-user && \
         echo done > {me}.done && exec sleep 600"
    )
}

fn two_containers(rt: Runtime, image_fs: ImageFs) {
    if !require_runtime(rt) {
        return;
    }
    let env = Env::new("oci-two", rt);
    let src = env.path().join("image");
    let _fs = FsMount::new(image_fs, &src, env.path());
    build_image(&src);
    let a = env.bundle("a", &src, 100000, &container_script("a"));
    let b = env.bundle("b", &src, 200000, &container_script("b"));

    for (id, bundle) in [("a", &a), ("b", &b)] {
        run(env.wrapper(["create", "--bundle"]).arg(bundle).arg(id)).assert_ok();
    }
    // Both are created before either starts: they run at the same time.
    for id in ["a", "b"] {
        run(&mut env.wrapper(["start", id])).assert_ok();
    }
    let list = run(&mut env.shiftfs(["list"]));
    list.assert_ok();
    // On ramfs a kernel idmapped mount of one shared idmappable FUSE mount of the image
    // (`share=idmap`, the default where the kernel can idmap FUSE mounts), which `list` shows
    // as a fuse mount of the image.
    let want_backend = "kernel";
    if image_fs == ImageFs::Ramfs {
        assert!(
            list.stdout
                .lines()
                .any(|l| l.contains(" fuse ") && l.contains(src.to_str().unwrap())),
            "the shared FUSE mount of the image:\n{list}"
        );
    }
    for id in ["a", "b"] {
        let line = list
            .stdout
            .lines()
            .find(|l| l.contains(&format!("/oci/{id}/rootfs")))
            .unwrap_or_else(|| panic!("no mount of container {id} listed:\n{list}"));
        let cells: Vec<&str> = line.split_whitespace().collect();
        assert!(cells.contains(&id), "CONTAINER column names {id}: {line}");
        assert!(
            cells.contains(&want_backend),
            "backend {want_backend}: {line}"
        );
    }

    for id in ["a", "b"] {
        wait_for_file(&src.join(format!("tmp/{id}.done")), Duration::from_secs(30));
    }
    // Asked only now that both wrote, so the check does not depend on the two roots sharing
    // caches (they do by default; with share=off see the fuse_options test).
    for (me, other, host) in [("a", "b", 100000), ("b", "a", 200000)] {
        let mut exec = env.wrapper(["exec", me, "/bin/busybox", "stat", "-c", "%n %u %g"]);
        exec.args(["/", "/tmp"]).args(
            [me, &format!("{me}-user"), other, &format!("{other}-user")]
                .map(|f| format!("/tmp/{f}")),
        );
        let out = run(&mut exec);
        out.assert_ok();
        assert_eq!(
            out.stdout,
            format!(
                "/ 0 0\n/tmp 0 0\n/tmp/{me} 0 0\n/tmp/{me}-user 1000 1000\n\
                 /tmp/{other} 0 0\n/tmp/{other}-user 1000 1000\n"
            ),
            "container {me} sees its root as its own and the other's files with image ids"
        );
        assert_eq!(
            host_uid(env.init_pid(me)),
            host,
            "container {me} runs as host {host}"
        );
        // On disk: canonical ids, whichever container wrote them.
        assert_eq!(stat_ids(src.join(format!("tmp/{me}"))), (0, 0));
        assert_eq!(stat_ids(src.join(format!("tmp/{me}-user"))), (1000, 1000));
    }
    // The host sees each container's root under that container's ids.
    assert_eq!(stat_ids(env.run_dir.join("oci/a/rootfs")), (100000, 100000));
    assert_eq!(stat_ids(env.run_dir.join("oci/b/rootfs")), (200000, 200000));

    // A running container's mounts are never collected.
    let gc = run(&mut env.shiftfs(["gc"]));
    gc.assert_ok();
    assert!(
        !gc.stdout.contains("cleaned"),
        "gc took a live container:\n{gc}"
    );
    assert_eq!(
        mounts_under(&env.run_dir.join("oci")).len(),
        2,
        "both roots still mounted"
    );

    for id in ["a", "b"] {
        run(&mut env.wrapper(["delete", "--force", id])).assert_ok();
    }
    drop(_fs);
    env.assert_clean();
    env.dir.finish();
}

#[test]
fn runc_two_containers_one_image_on_ext4_kernel() {
    two_containers(Runtime::Runc, ImageFs::Ext4);
}

#[test]
fn runc_two_containers_one_image_on_ramfs_fuse() {
    two_containers(Runtime::Runc, ImageFs::Ramfs);
}

#[test]
fn crun_two_containers_one_image_on_ext4_kernel() {
    two_containers(Runtime::Crun, ImageFs::Ext4);
}

#[test]
fn crun_two_containers_one_image_on_ramfs_fuse() {
    two_containers(Runtime::Crun, ImageFs::Ramfs);
}

// ---------------------------------------------------------------------------------------------
// A volume the kernel cannot idmap

/// `runtime_idmaps`: the configuration says the runtime makes idmapped mounts (crun 1.8.1
/// does, without a `features` command to say so); the volume then reaches it as an
/// idmappable FUSE mount, which it idmaps itself.
fn idmapped_volume_on_ramfs(rt: Runtime, runtime_idmaps: bool) {
    if !require_runtime(rt) {
        return;
    }
    let env = Env::new("oci-volume", rt);
    if runtime_idmaps {
        fs::write(env.path().join("runtime.toml"), "runtime_idmaps = true\n").unwrap();
    }
    let src = env.path().join("image");
    let _img = FsMount::new(ImageFs::Ext4, &src, env.path());
    build_image(&src);
    mkdir(&src.join("data"), 0o755, 0, 0);
    let vol = env.path().join("volume");
    let _vol = FsMount::new(ImageFs::Ramfs, &vol, env.path());
    file(&vol.join("by-root"), b"r\n", 0o644, 0, 0);
    file(&vol.join("by-user"), b"u\n", 0o644, 1000, 1000);
    let b = env.bundle(
        "v",
        &src,
        100000,
        "stat -c '%n %u %g' /data/by-root /data/by-user && echo hi > /data/new && \
         chown 1000:1000 /data/by-user && stat -c '%n %u %g' /data/new",
    );
    env.add_idmapped_volume(&b, &vol, "/data", 100000);

    // `run` in the foreground: the runtime deletes the container when it ends.
    let out = run(env.wrapper(["run", "--bundle"]).arg(&b).arg("v"));
    out.assert_ok();
    assert_eq!(
        out.stdout,
        // With runtime_idmaps the wrapper's mount is unshifted: without the runtime's own
        // idmapped mount of it every owner would show as 65534.
        "/data/by-root 0 0\n/data/by-user 1000 1000\n/data/new 0 0\n",
        "the volume shows image ids inside the container:\n{out}"
    );
    assert_eq!(stat_ids(vol.join("new")), (0, 0), "written with image ids");
    assert_eq!(fs::read(vol.join("new")).unwrap(), b"hi\n");
    assert_eq!(stat_ids(vol.join("by-user")), (1000, 1000));
    // Nothing was written through the image's mount point on the way.
    assert!(fs::read_dir(src.join("data")).unwrap().next().is_none());
    drop((_img, _vol));
    env.assert_clean();
    env.dir.finish();
}

#[test]
fn runc_idmapped_volume_on_ramfs() {
    idmapped_volume_on_ramfs(Runtime::Runc, false);
}

#[test]
fn crun_idmapped_volume_on_ramfs() {
    idmapped_volume_on_ramfs(Runtime::Crun, false);
}

#[test]
fn crun_idmapped_volume_on_ramfs_through_an_idmappable_mount() {
    idmapped_volume_on_ramfs(Runtime::Crun, true);
}

// ---------------------------------------------------------------------------------------------
// Killed containers and a killed wrapper

fn sigkilled_container_then_delete_leaves_nothing(rt: Runtime) {
    if !require_runtime(rt) {
        return;
    }
    let env = Env::new("oci-kill", rt);
    let src = env.path().join("image");
    let _fs = FsMount::new(ImageFs::Ramfs, &src, env.path());
    build_image(&src);
    let b = env.bundle("k", &src, 100000, "exec sleep 600");
    run(env
        .wrapper(["run", "--detach", "--bundle"])
        .arg(&b)
        .arg("k"))
    .assert_ok();
    let pid = env.init_pid("k");
    assert_eq!(host_uid(pid), 100000);
    assert_eq!(mounts_under(&env.run_dir.join("oci")).len(), 1);
    assert_eq!(
        shiftfs_pids_mentioning(&env.run_dir).len(),
        1,
        "one FUSE daemon"
    );
    kill_and_wait(&[pid]);
    // Stopped, but the runtime still knows it: gc leaves it to `delete`.
    let gc = run(&mut env.shiftfs(["gc"]));
    assert!(gc.stdout.contains("kept container k"), "{gc}");
    assert_eq!(mounts_under(&env.run_dir.join("oci")).len(), 1);
    run(&mut env.wrapper(["delete", "k"])).assert_ok();
    drop(_fs);
    env.assert_clean();
    env.dir.finish();
}

#[test]
fn runc_sigkilled_container_then_delete_leaves_nothing() {
    sigkilled_container_then_delete_leaves_nothing(Runtime::Runc);
}

#[test]
fn crun_sigkilled_container_then_delete_leaves_nothing() {
    sigkilled_container_then_delete_leaves_nothing(Runtime::Crun);
}

#[test]
fn runc_killed_wrapper_is_cleaned_up_by_gc() {
    if !require_runtime(Runtime::Runc) || !require_tool("setsid", "util-linux") {
        return;
    }
    let env = Env::new("oci-gc", Runtime::Runc);
    let src = env.path().join("image");
    let _fs = FsMount::new(ImageFs::Ramfs, &src, env.path());
    build_image(&src);
    let b = env.bundle("w", &src, 100000, "exec sleep 600");
    // A runtime that hangs in `create`: the wrapper is killed while it waits.
    let slow = env.path().join("slow-runc");
    let started = env.path().join("create-started");
    fs::write(
        &slow,
        format!(
            "#!/bin/sh\ncase \" $* \" in *\" create \"*) touch {}; exec sleep 600;; esac\n\
             exec runc \"$@\"\n",
            q(&started)
        ),
    )
    .unwrap();
    fs::set_permissions(&slow, fs::Permissions::from_mode(0o755)).unwrap();
    let mut cmd = env.wrapper(["create", "--bundle"]);
    cmd.arg(&b)
        .arg("w")
        .env("SHIFTFS_RUNTIME", &slow)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0);
    let mut children = Children::default();
    children.push(cmd.spawn().unwrap());
    let wrapper = children.0[0].id();
    let start = Instant::now();
    while !started.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the slow runtime never ran"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        mounts_under(&env.run_dir.join("oci")).len(),
        1,
        "root mounted before the runtime ran"
    );
    // While the wrapper works on it, gc keeps it.
    let gc = run(&mut env.shiftfs(["gc"]));
    assert!(
        gc.stdout
            .contains("kept container w: a shiftfs-runtime call is working on it"),
        "{gc}"
    );

    // SIGKILL the wrapper and the runtime it started (its process group).
    rustix::process::kill_process_group(
        rustix::process::Pid::from_raw(wrapper as i32).unwrap(),
        rustix::process::Signal::KILL,
    )
    .unwrap();
    drop(children);
    assert_eq!(
        mounts_under(&env.run_dir.join("oci")).len(),
        1,
        "left mounted by the killed wrapper"
    );
    let gc = run(&mut env.shiftfs(["gc"]));
    gc.assert_ok();
    assert!(gc.stdout.contains("cleaned up container w"), "{gc}");
    drop(_fs);
    env.assert_clean();
    env.dir.finish();
}

fn delete_force_of_a_running_container_leaves_nothing(rt: Runtime) {
    if !require_runtime(rt) {
        return;
    }
    let env = Env::new("oci-force", rt);
    let src = env.path().join("image");
    let _fs = FsMount::new(ImageFs::Ramfs, &src, env.path());
    build_image(&src);
    let b = env.bundle("f", &src, 100000, "exec sleep 600");
    run(env.wrapper(["run", "-d", "--bundle"]).arg(&b).arg("f")).assert_ok();
    let pid = env.init_pid("f");
    // `delete` without --force refuses a running container, and its mounts stay.
    run(&mut env.wrapper(["delete", "f"])).assert_fails();
    assert_eq!(mounts_under(&env.run_dir.join("oci")).len(), 1);
    run(&mut env.wrapper(["delete", "--force", "f"])).assert_ok();
    assert!(wait_gone(&[pid], Duration::from_secs(5)));
    drop(_fs);
    env.assert_clean();
    env.dir.finish();
}

#[test]
fn runc_delete_force_of_a_running_container_leaves_nothing() {
    delete_force_of_a_running_container_leaves_nothing(Runtime::Runc);
}

#[test]
fn crun_delete_force_of_a_running_container_leaves_nothing() {
    delete_force_of_a_running_container_leaves_nothing(Runtime::Crun);
}

// ---------------------------------------------------------------------------------------------
// podman

/// The hard limit `name` (a row of /proc/self/limits) of this process: podman asks the runtime
/// for far higher open-file and process limits than this VM grants (no CAP_SYS_RESOURCE), and
/// runc then fails with "error setting rlimit type 7: operation not permitted".
/// `podman --runtime RUNTIME run -d --name NAME` of a container mapped `0:100000:65536`,
/// with this machine's limits (the image and command follow).
fn podman_run(runtime: &Path, name: &str) -> Command {
    let nofile = hard_limit("Max open files");
    // Seen here: podman runs conmon and the runtime with a process limit of 32768, below ours.
    let nproc = hard_limit("Max processes")
        .parse::<u64>()
        .map_or(32768, |n| n.min(32768));
    let mut cmd = Command::new("podman");
    cmd.arg("--runtime")
        .arg(runtime)
        .args(["run", "-d", "--name", name, "--network", "none"])
        .args(["--uidmap", "0:100000:65536", "--gidmap", "0:100000:65536"])
        .arg(format!("--ulimit=nofile={nofile}:{nofile}"))
        .arg(format!("--ulimit=nproc={nproc}:{nproc}"));
    cmd
}

fn hard_limit(name: &str) -> String {
    let limits = fs::read_to_string("/proc/self/limits").unwrap();
    let line = limits.lines().find(|l| l.starts_with(name)).unwrap();
    line[name.len()..]
        .split_whitespace()
        .nth(1)
        .unwrap()
        .to_string()
}

/// `podman rm NAME` of a stopped container. podman 4.3's own cleanup of a container that
/// just stopped races with it now and then ("unlinkat .../userdata/shm: device or resource
/// busy"); a retry after that race is what a user would do.
#[track_caller]
fn podman_rm(name: &str) {
    let mut out = run(Command::new("podman").args(["rm", name]));
    for _ in 0..10 {
        if out.ok() || !out.stderr.contains("device or resource busy") {
            break;
        }
        std::thread::sleep(Duration::from_millis(300));
        out = run(Command::new("podman").args(["rm", name]));
        // The failed attempt may have gone far enough to forget the container.
        if out.stderr.contains("no such container") {
            return;
        }
    }
    out.assert_ok();
}

/// `podman rm -f NAME` on Drop, so a failing test leaves no container.
struct PodmanContainer(String);

impl Drop for PodmanContainer {
    fn drop(&mut self) {
        let _ = Command::new("podman")
            .args(["rm", "-f", "-t", "0", &self.0])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

#[test]
fn podman_runs_a_shifted_rootfs_through_the_wrapper() {
    if !require_runtime(Runtime::Runc) || !require_tool("podman", "podman") {
        return;
    }
    let env = Env::alone("oci-podman");
    let src = env.path().join("image");
    let _fs = FsMount::new(ImageFs::Ramfs, &src, env.path());
    build_image(&src);
    // Engines call the runtime by path; the wrapper is this binary under its runtime name.
    let link = env.path().join("shiftfs-runtime");
    std::os::unix::fs::symlink(BIN, &link).unwrap();
    let name = format!("shiftfs-test-{}", std::process::id());
    let guard = PodmanContainer(name.clone());
    // podman does not hand its environment to the runtime: this uses the default run dir.
    let out = run(podman_run(&link, &name).arg("--rootfs").arg(&src).args([
        "/bin/sh",
        "-c",
        "touch /tmp/p && chown 1000:1000 /tmp/p && echo > /tmp/p.done && exec sleep 600",
    ]));
    out.assert_ok();
    let cid = out.stdout.trim().to_string();
    wait_for_file(&src.join("tmp/p.done"), Duration::from_secs(30));
    let rootfs = PathBuf::from(format!("/run/shiftfs/oci/{cid}/rootfs"));
    let list = run(&mut shiftfs(["list"]));
    let line = list
        .stdout
        .lines()
        .find(|l| l.starts_with(rootfs.to_str().unwrap()))
        .unwrap_or_else(|| panic!("no shifted root for podman's container {cid}:\n{list}"));
    assert!(line.contains(&cid), "{line}");
    assert!(
        list.stdout
            .lines()
            .any(|l| l.contains(" fuse ") && l.contains(src.to_str().unwrap())),
        "a FUSE mount of the image serves it:\n{list}"
    );

    let exec =
        run(Command::new("podman").args(["exec", &name, "stat", "-c", "%n %u %g", "/", "/tmp/p"]));
    exec.assert_ok();
    assert_eq!(exec.stdout, "/ 0 0\n/tmp/p 1000 1000\n", "{exec}");
    assert_eq!(
        stat_ids(src.join("tmp/p")),
        (1000, 1000),
        "image ids on disk"
    );
    let pid = run(Command::new("podman").args(["inspect", "-f", "{{.State.Pid}}", &name]));
    assert_eq!(host_uid(pid.stdout.trim().parse().unwrap()), 100000);

    // SIGKILL: podman's cleanup calls the runtime's delete, which unmounts.
    run(Command::new("podman").args(["kill", "-s", "KILL", &name])).assert_ok();
    run(Command::new("podman").args(["wait", &name])).assert_ok();
    podman_rm(&name);
    drop(guard);
    assert!(
        !rootfs.parent().unwrap().exists(),
        "container directory left behind"
    );
    assert!(mount_at(&rootfs).is_none(), "root still mounted");
    assert!(
        shiftfs_pids_mentioning(rootfs.parent().unwrap()).is_empty(),
        "daemon left behind"
    );
    drop(_fs);
    env.assert_clean();
    env.dir.finish();
}

#[test]
fn runc_a_root_not_owned_by_0_is_left_to_the_runtime() {
    if !require_runtime(Runtime::Runc) {
        return;
    }
    let env = Env::new("oci-shifted", Runtime::Runc);
    let src = env.path().join("image");
    let _fs = FsMount::new(ImageFs::Ext4, &src, env.path());
    build_image(&src);
    // An image already shifted on disk for this container (what `shiftfs shift` makes).
    run(Command::new("chown")
        .args(["-hR", "100000:100000"])
        .arg(&src))
    .assert_ok();
    let b = env.bundle("s", &src, 100000, "stat -c '%u %g' /");
    let out = run(env.wrapper(["run", "--bundle"]).arg(&b).arg("s"));
    out.assert_ok();
    assert_eq!(out.stdout, "0 0\n", "{out}");
    assert!(
        !env.run_dir.join("oci").exists(),
        "nothing prepared for a root that needs no shift"
    );
    drop(_fs);
    env.assert_clean();
    env.dir.finish();
}

#[test]
fn runc_the_next_create_cleans_up_after_a_container_deleted_behind_its_back() {
    if !require_runtime(Runtime::Runc) {
        return;
    }
    let env = Env::new("oci-reuse", Runtime::Runc);
    let src = env.path().join("image");
    let _fs = FsMount::new(ImageFs::Ramfs, &src, env.path());
    build_image(&src);
    let b = env.bundle("r", &src, 100000, "exec sleep 600");
    run(env.wrapper(["run", "-d", "--bundle"]).arg(&b).arg("r")).assert_ok();
    let first = env.init_pid("r");
    let daemons = shiftfs_pids_mentioning(&env.run_dir);
    assert_eq!(daemons.len(), 1);
    // runc itself, not the wrapper: the mounts stay behind, for a dead container.
    run(Command::new("runc")
        .arg("--root")
        .arg(&env.state_root)
        .args(["delete", "--force", "r"]))
    .assert_ok();
    assert!(wait_gone(&[first], Duration::from_secs(5)));
    assert_eq!(
        mounts_under(&env.run_dir.join("oci")).len(),
        1,
        "left behind by runc"
    );
    // The same id again: the wrapper sees the old one is gone, cleans up, and starts afresh.
    run(env.wrapper(["run", "-d", "--bundle"]).arg(&b).arg("r")).assert_ok();
    assert!(
        wait_gone(&daemons, Duration::from_secs(5)),
        "old daemon stopped"
    );
    assert_eq!(
        mounts_under(&env.run_dir.join("oci")).len(),
        1,
        "one root, the new one"
    );
    assert_ne!(env.init_pid("r"), first);
    run(&mut env.wrapper(["delete", "--force", "r"])).assert_ok();
    drop(_fs);
    env.assert_clean();
    env.dir.finish();
}

#[test]
fn runc_gc_never_unmounts_a_root_a_process_still_uses() {
    if !require_runtime(Runtime::Runc) || !require_tool("unshare", "util-linux") {
        return;
    }
    let env = Env::new("oci-busy", Runtime::Runc);
    // A FUSE mount of its own (not one shared idmappable mount of the image under a kernel
    // idmapped one): its device number then tells who works in it.
    fs::write(
        env.path().join("runtime.toml"),
        "fuse_options = \"share=off\"\n",
    )
    .unwrap();
    let src = env.path().join("image");
    let _fs = FsMount::new(ImageFs::Ramfs, &src, env.path());
    build_image(&src);
    let b = env.bundle("u", &src, 100000, "exec sleep 600");
    run(env.wrapper(["create", "--bundle"]).arg(&b).arg("u")).assert_ok();
    let rootfs = env.run_dir.join("oci/u/rootfs");
    // A process that lives in the shifted root through its own mount namespace's copy, as a
    // container process outliving its init would: unmounting ours would not be refused as busy.
    let mut children = Children::default();
    children.push(
        Command::new("unshare")
            .args(["-m", "--propagation", "private", "chroot"])
            .arg(&rootfs)
            .args(["/bin/sleep", "600"])
            .stdin(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let user = children.0[0].id();
    let start = Instant::now();
    while fs::read_link(format!("/proc/{user}/exe")).is_ok_and(|e| !e.ends_with("busybox")) {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "chroot never ran"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // The runtime forgets the container (its init dies with it).
    run(Command::new("runc")
        .arg("--root")
        .arg(&env.state_root)
        .args(["delete", "--force", "u"]))
    .assert_ok();
    let gc = run(&mut env.shiftfs(["gc"]));
    assert!(
        gc.stdout.contains("kept container u") && gc.stdout.contains("still works in it"),
        "{gc}"
    );
    assert!(
        mount_at(&rootfs).is_some(),
        "the root stays while it is used"
    );
    drop(children);
    let gc = run(&mut env.shiftfs(["gc"]));
    assert!(gc.stdout.contains("cleaned up container u"), "{gc}");
    drop(_fs);
    env.assert_clean();
    env.dir.finish();
}

#[test]
fn runc_a_read_only_root_is_shifted_read_only() {
    if !require_runtime(Runtime::Runc) {
        return;
    }
    let env = Env::new("oci-ro", Runtime::Runc);
    let src = env.path().join("image");
    let _fs = FsMount::new(ImageFs::Ext4, &src, env.path());
    build_image(&src);
    let b = env.bundle(
        "ro",
        &src,
        100000,
        "touch /x 2>/dev/null && echo wrote || echo refused",
    );
    let path = b.join("config.json");
    let mut c: Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
    c["root"]["readonly"] = json!(true);
    fs::write(&path, serde_json::to_vec(&c).unwrap()).unwrap();
    run(env.wrapper(["create", "--bundle"]).arg(&b).arg("ro")).assert_ok();
    let mount = mount_at(&env.run_dir.join("oci/ro/rootfs")).expect("root mounted");
    assert!(mount.mount_options.contains(&"ro".to_string()), "{mount:?}");
    run(&mut env.wrapper(["delete", "ro"])).assert_ok();
    let out = run(env.wrapper(["run", "--bundle"]).arg(&b).arg("ro"));
    assert_eq!(out.stdout, "refused\n", "{out}");
    assert!(!src.join("x").exists());
    drop(_fs);
    env.assert_clean();
    env.dir.finish();
}

#[test]
fn runc_fuse_options_from_the_config_file_let_containers_see_each_others_changes() {
    if !require_runtime(Runtime::Runc) {
        return;
    }
    let env = Env::new("oci-coherent", Runtime::Runc);
    let src = env.path().join("image");
    let _fs = FsMount::new(ImageFs::Ramfs, &src, env.path());
    build_image(&src);
    // Each root a FUSE mount of its own (share=off): without attr_timeout=0 each would cache
    // the miss of the name it polls for a day.
    fs::write(
        env.path().join("runtime.toml"),
        "fuse_options = \"share=off,attr_timeout=0\"\n",
    )
    .unwrap();
    let script = |me: &str, other: &str| {
        format!(
            "touch /tmp/{me} && while [ ! -e /tmp/{other} ]; do sleep 0.1; done && \
             stat -c '%n %u %g' /tmp/{other} > /tmp/{me}.out && exec sleep 600"
        )
    };
    let a = env.bundle("a", &src, 100000, &script("a", "b"));
    let b = env.bundle("b", &src, 200000, &script("b", "a"));
    for (id, bundle) in [("a", &a), ("b", &b)] {
        run(env.wrapper(["run", "-d", "--bundle"]).arg(bundle).arg(id)).assert_ok();
    }
    for (me, other) in [("a", "b"), ("b", "a")] {
        let out = wait_for_file(&src.join(format!("tmp/{me}.out")), Duration::from_secs(30));
        assert_eq!(out, format!("/tmp/{other} 0 0\n"));
    }
    for id in ["a", "b"] {
        run(&mut env.wrapper(["delete", "--force", id])).assert_ok();
    }
    drop(_fs);
    env.assert_clean();
    env.dir.finish();
}

/// `podman rmi -f IMAGE` on Drop.
struct PodmanImage(String);

impl Drop for PodmanImage {
    fn drop(&mut self) {
        let _ = Command::new("podman")
            .args(["rmi", "-f", &self.0])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

#[test]
fn podman_imported_image_with_uidmap_goes_to_the_runtime_unchanged() {
    if !require_runtime(Runtime::Runc) || !require_tool("podman", "podman") {
        return;
    }
    let env = Env::alone("oci-podman-import");
    let src = env.dir.dir("image");
    build_image(&src);
    let tar = env.path().join("image.tar");
    run(Command::new("tar")
        .arg("-C")
        .arg(&src)
        .arg("-cf")
        .arg(&tar)
        .arg("."))
    .assert_ok();
    let image = format!("localhost/shiftfs-test-{}:latest", std::process::id());
    let _image = PodmanImage(image.clone());
    run(Command::new("podman")
        .args(["import", "-q"])
        .arg(&tar)
        .arg(&image))
    .assert_ok();
    let link = env.path().join("shiftfs-runtime");
    std::os::unix::fs::symlink(BIN, &link).unwrap();
    let name = format!("shiftfs-test-import-{}", std::process::id());
    let _guard = PodmanContainer(name.clone());
    let out = run(podman_run(&link, &name).args([&image, "/bin/sleep", "600"]));
    out.assert_ok();
    let cid = out.stdout.trim().to_string();
    // containers/storage gave the container a copy chowned for its map: nothing to shift.
    let exec = run(Command::new("podman").args(["exec", &name, "stat", "-c", "%u %g", "/"]));
    assert_eq!(exec.stdout, "0 0\n", "{exec}");
    assert!(
        !Path::new(&format!("/run/shiftfs/oci/{cid}")).exists(),
        "the wrapper shifted a root podman had shifted already"
    );
    run(Command::new("podman").args(["kill", "-s", "KILL", &name])).assert_ok();
    run(Command::new("podman").args(["wait", &name])).assert_ok();
    podman_rm(&name);
    env.assert_clean();
    env.dir.finish();
}

#[test]
fn runc_ctrl_c_on_a_foreground_run_still_cleans_up() {
    if !require_runtime(Runtime::Runc) {
        return;
    }
    let env = Env::new("oci-ctrlc", Runtime::Runc);
    let src = env.path().join("image");
    let _fs = FsMount::new(ImageFs::Ramfs, &src, env.path());
    build_image(&src);
    let b = env.bundle(
        "i",
        &src,
        100000,
        "trap 'exit 0' INT; echo > /tmp/ready; while true; do sleep 0.1; done",
    );
    let mut cmd = env.wrapper(["run", "--bundle"]);
    cmd.arg(&b)
        .arg("i")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .process_group(0);
    let mut children = Children::default();
    children.push(cmd.spawn().unwrap());
    wait_for_file(&src.join("tmp/ready"), Duration::from_secs(30));
    assert_eq!(mounts_under(&env.run_dir.join("oci")).len(), 1);
    // What a terminal does on Ctrl-C: SIGINT to the whole foreground process group.
    let wrapper = children.0[0].id();
    rustix::process::kill_process_group(
        rustix::process::Pid::from_raw(wrapper as i32).unwrap(),
        rustix::process::Signal::INT,
    )
    .unwrap();
    let status = wait_timeout(&mut children.0[0], Duration::from_secs(30)).expect("wrapper hung");
    assert!(status.success(), "the container's exit status: {status}");
    drop(children);
    drop(_fs);
    env.assert_clean();
    env.dir.finish();
}

#[test]
fn a_runtime_that_cannot_run_leaves_nothing_mounted() {
    if !require_runtime(Runtime::Runc) {
        return;
    }
    let env = Env::new("oci-norun", Runtime::Runc);
    let src = env.path().join("image");
    let _fs = FsMount::new(ImageFs::Ramfs, &src, env.path());
    build_image(&src);
    let b = env.bundle("n", &src, 100000, "true");
    let broken = env.path().join("not-executable");
    fs::write(&broken, "#!/bin/sh\n").unwrap();
    fs::set_permissions(&broken, fs::Permissions::from_mode(0o644)).unwrap();
    let out = run(env
        .wrapper(["create", "--bundle"])
        .arg(&b)
        .arg("n")
        .env("SHIFTFS_RUNTIME", &broken));
    out.assert_fails();
    assert!(
        out.stderr.contains("cannot run the runtime") && out.stderr.contains("not-executable"),
        "{out}"
    );
    drop(_fs);
    env.assert_clean();
    env.dir.finish();
}
