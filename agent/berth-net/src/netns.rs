//! Named network namespaces, bound at `<dir>/<name>` like `ip netns` does
//! (`/run/netns` on a node), made without forking the multi-threaded agent:
//! a short-lived thread unshares its own network namespace and bind-mounts
//! `/proc/thread-self/ns/net` onto the name.

use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags};
use nix::sched::CloneFlags;

/// `NSFS_MAGIC` from `<linux/magic.h>`: the file system of namespace files.
const NSFS_MAGIC: i64 = 0x6e73_6673;

#[derive(Debug, Clone)]
pub struct NetnsDir {
    dir: PathBuf,
}

impl NetnsDir {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Whether `name` is a bound network namespace (not just a leftover file).
    pub fn exists(&self, name: &str) -> bool {
        is_namespace(&self.path(name))
    }

    /// Creates the namespace unless it is already bound there. Returns
    /// whether it was created.
    pub fn ensure(&self, name: &str) -> io::Result<bool> {
        let path = self.path(name);
        if is_namespace(&path) {
            return Ok(false);
        }
        std::fs::create_dir_all(&self.dir)?;
        // A leftover plain file from a crash between create and mount is reused.
        File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)?;
        let target = path.clone();
        let bound = std::thread::Builder::new()
            .name("berth-netns".into())
            .spawn(move || -> io::Result<()> {
                nix::sched::unshare(CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
                nix::mount::mount(
                    Some("/proc/thread-self/ns/net"),
                    &target,
                    None::<&str>,
                    MsFlags::MS_BIND,
                    None::<&str>,
                )
                .map_err(io::Error::from)
            })?
            .join()
            .map_err(|_| io::Error::other("the namespace thread panicked"))?;
        if let Err(e) = bound {
            let _ = std::fs::remove_file(&path);
            return Err(io::Error::new(
                e.kind(),
                format!("network namespace {}: {e}", path.display()),
            ));
        }
        Ok(true)
    }

    /// Unbinds and removes the name; the namespace itself goes when its
    /// last process leaves. A name that is not there is not an error.
    pub fn remove(&self, name: &str) -> io::Result<()> {
        let path = self.path(name);
        match nix::mount::umount2(&path, MntFlags::MNT_DETACH) {
            Ok(()) | Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => {}
            Err(e) => return Err(io::Error::from(e)),
        }
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Names in the directory, bound or not.
    pub fn list(&self) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut names: Vec<String> = entries
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .collect();
        names.sort();
        names
    }

    /// Runs `f` on a thread that has entered the namespace `name`. Netlink
    /// sockets opened by `f` stay in that namespace.
    pub fn run_in<T: Send + 'static>(
        &self,
        name: &str,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> io::Result<T> {
        let path = self.path(name);
        if !is_namespace(&path) {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("{} is not a network namespace", path.display()),
            ));
        }
        let file = File::open(&path)?;
        std::thread::Builder::new()
            .name("berth-netns".into())
            .spawn(move || -> io::Result<T> {
                nix::sched::setns(file.as_fd(), CloneFlags::CLONE_NEWNET)
                    .map_err(io::Error::from)?;
                Ok(f())
            })?
            .join()
            .map_err(|_| io::Error::other("the namespace thread panicked"))?
    }
}

fn is_namespace(path: &Path) -> bool {
    nix::sys::statfs::statfs(path)
        .map(|s| s.filesystem_type().0 == NSFS_MAGIC)
        .unwrap_or(false)
}
