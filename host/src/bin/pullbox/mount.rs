//! `mount REF DIR` and `unmount DIR`: an image's root filesystem, read-only, at a directory,
//! as `ctr images mount` / `ctr images unmount` do.
//!
//! `mount` looks the image up (only a READY image is found), creates a *view* snapshot of its
//! top snapshot (the chain ID) under a detached lease, one that outlives this process, and
//! mounts the view's mounts at DIR: a read-only bind mount for a one-layer image, an overlay
//! with only `lowerdir`s (read-only by construction) otherwise. Both are `nosuid,nodev`
//! ([`MOUNT_FLAGS`]): an image's setuid binaries and device nodes are files to look at, never a
//! way to gain privileges or reach the host's devices. The view and its lease keep
//! the image's snapshots from being collected while the mount exists, even if the image is
//! removed meanwhile. A record in `<root>/mounts/<sha256 of DIR>.json` names the view and the
//! lease, so `unmount` can unmount and then remove both. After a reboot the mount is gone and
//! the embedded backend ends the lease; `unmount` then only cleans up the record.
//!
//! Mounting needs root (`CAP_SYS_ADMIN`); without it both commands fail up front with a
//! message that says so. overlayfs takes at most one page of options: when the `lowerdir` list
//! is longer (images of very many layers), the directories are given relative to their common
//! parent and the mount is made from there, as containerd does.

use std::{
    ffi::CString,
    io::{self, Write},
    os::unix::fs::{DirBuilderExt, OpenOptionsExt},
    path::{Path, PathBuf},
};

use anyhow::{bail, Context};
use pullbox::{
    backend::{Backend, LeaseId},
    error::Error,
    oci::{Digest, Mount},
    service::ImageService,
};
use rustix::mount::{MountFlags, UnmountFlags};
use serde::{Deserialize, Serialize};

/// The flags of every mount: read-only, setuid bits and device nodes without effect.
const MOUNT_FLAGS: MountFlags = MountFlags::RDONLY.union(MountFlags::NOSUID).union(MountFlags::NODEV);

/// overlayfs reads its options from one page.
const MAX_OPTIONS: usize = 4096 - 1;

/// What `mount` recorded for `unmount`.
#[derive(Debug, Serialize, Deserialize)]
struct Record {
    /// The mount point, canonical.
    dir: PathBuf,
    /// The image ID mounted.
    image: String,
    /// The view snapshot's key.
    snapshot: String,
    /// The detached lease holding the view.
    lease: String,
}

/// `pullbox mount IMAGE DIR`.
pub async fn mount(service: &ImageService, root: &Path, image: &str, dir: &Path) -> anyhow::Result<()> {
    require_root("mount")?;
    let dir = dir.canonicalize().with_context(|| format!("mount point {}", dir.display()))?;
    if !dir.is_dir() {
        bail!("mount point {} is not a directory", dir.display());
    }
    let record_path = record_path(root, &dir)?;
    if record_path.exists() {
        bail!("{} is already a pullbox mount; `pullbox unmount {0}` first", dir.display());
    }
    let Some(info) = service.status(image).await? else {
        bail!("image {image:?} not found (or not complete: pull it again)");
    };

    let backend = service.backend();
    let lease = backend.leases.create_detached().await.context("creating the mount's lease")?;
    let key = format!("pullbox-mount-{}", uuid::Uuid::new_v4().simple());
    let record = Record { dir: dir.clone(), image: info.id.clone(), snapshot: key.clone(), lease: lease.0.clone() };
    let mounted = async {
        let mounts = backend
            .snapshots
            .view(&key, &info.chain_id, &lease)
            .await
            .with_context(|| format!("creating a view of snapshot {}", info.chain_id))?;
        write_record(&record_path, &record)?;
        let target = dir.clone();
        tokio::task::spawn_blocking(move || mount_all(&mounts, &target)).await?
    }
    .await;
    if let Err(e) = mounted {
        release(backend, &key, &lease).await;
        let _ = std::fs::remove_file(&record_path);
        return Err(e.context(format!("mounting {image} at {}", dir.display())));
    }
    println!("{}", dir.display());
    Ok(())
}

/// `pullbox unmount DIR`.
pub async fn unmount(backend: &Backend, root: &Path, dir: &Path) -> anyhow::Result<()> {
    require_root("unmount")?;
    // The mount point of a mount that is gone (a reboot) may be gone too.
    let dir = dir.canonicalize().or_else(|_| std::path::absolute(dir)).with_context(|| format!("{}", dir.display()))?;
    let record_path = record_path(root, &dir)?;
    let record: Record = match std::fs::read(&record_path) {
        Ok(bytes) => serde_json::from_slice(&bytes).with_context(|| format!("reading {}", record_path.display()))?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            bail!("{} is not mounted by pullbox (with this store root)", dir.display())
        }
        Err(e) => return Err(e).with_context(|| format!("reading {}", record_path.display())),
    };
    match rustix::mount::unmount(&dir, UnmountFlags::empty()) {
        Ok(()) => {}
        // Not a mount point any more (unmounted by hand, or a reboot): clean up the rest.
        Err(rustix::io::Errno::INVAL) => {
            tracing::warn!(dir = %dir.display(), "not mounted; removing what pullbox kept for it")
        }
        Err(rustix::io::Errno::BUSY) => bail!("cannot unmount {}: it is busy (in use by a process)", dir.display()),
        Err(e) => return Err(io::Error::from(e)).with_context(|| format!("unmounting {}", dir.display())),
    }
    release(backend, &record.snapshot, &LeaseId(record.lease.clone())).await;
    std::fs::remove_file(&record_path).with_context(|| format!("removing {}", record_path.display()))?;
    println!("{}", dir.display());
    Ok(())
}

/// Fails unless this process may mount.
pub fn require_root(command: &str) -> anyhow::Result<()> {
    if !rustix::process::geteuid().is_root() {
        bail!("`pullbox {command}` needs root: overlay and bind mounts need CAP_SYS_ADMIN");
    }
    Ok(())
}

/// Removes a mount's view and lease, best effort: what is left is collected once the lease is
/// gone.
async fn release(backend: &Backend, key: &str, lease: &LeaseId) {
    match backend.snapshots.remove(key).await {
        Ok(()) | Err(Error::NotFound(_)) => {}
        Err(e) => tracing::warn!(snapshot = key, "cannot remove the mount's view: {}", e.chain()),
    }
    match backend.leases.delete(lease).await {
        Ok(()) | Err(Error::NotFound(_)) => {}
        Err(e) => tracing::warn!(lease = lease.0, "cannot delete the mount's lease: {}", e.chain()),
    }
}

/// Where the record of the mount at `dir` lives.
fn record_path(root: &Path, dir: &Path) -> anyhow::Result<PathBuf> {
    let root = root.canonicalize().with_context(|| format!("store root {}", root.display()))?;
    let name = Digest::sha256_of(dir.as_os_str().as_encoded_bytes());
    Ok(root.join("mounts").join(format!("{}.json", name.hex())))
}

/// Writes a record atomically, readable by the store's owner alone.
fn write_record(path: &Path, record: &Record) -> anyhow::Result<()> {
    let dir = path.parent().expect("a record has a directory");
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    file.write_all(&serde_json::to_vec_pretty(record)?).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// Mounts a view's mounts (one, for the overlayfs snapshotter) read-only at `target`.
fn mount_all(mounts: &[Mount], target: &Path) -> anyhow::Result<()> {
    let [m] = mounts else { bail!("expected one mount for the view, got {}", mounts.len()) };
    let flags = |e: rustix::io::Errno, what: &str| -> anyhow::Error {
        let e = io::Error::from(e);
        anyhow::Error::new(e).context(format!("{what} {} at {}", m.source, target.display()))
    };
    match m.kind.as_str() {
        "bind" => {
            let bind = if m.options.iter().any(|o| o == "rbind") {
                rustix::mount::mount_bind_recursive(m.source.as_str(), target)
            } else {
                rustix::mount::mount_bind(m.source.as_str(), target)
            };
            bind.map_err(|e| flags(e, "bind-mounting"))?;
            // A bind mount takes its flags from a remount.
            if let Err(e) = rustix::mount::mount_remount(target, MountFlags::BIND | MOUNT_FLAGS, "") {
                let _ = rustix::mount::unmount(target, UnmountFlags::empty());
                return Err(flags(e, "making read-only (nosuid, nodev) the bind mount of"));
            }
            Ok(())
        }
        "overlay" => {
            let options: Vec<&str> =
                m.options.iter().map(String::as_str).filter(|o| !matches!(*o, "ro" | "rw")).collect();
            let data = options.join(",");
            if data.len() <= MAX_OPTIONS {
                return overlay(&data, target).map_err(|e| flags(e, "mounting overlay"));
            }
            let (base, short) = relative_lowerdirs(&options)
                .with_context(|| format!("overlay options of {} bytes are too long", data.len()))?;
            if short.len() > MAX_OPTIONS {
                bail!("overlay options of {} bytes are too long even relative to {}", short.len(), base.display());
            }
            // The working directory is the process's: nothing else runs in this command now.
            let cwd = std::env::current_dir().context("reading the working directory")?;
            std::env::set_current_dir(&base).with_context(|| format!("entering {}", base.display()))?;
            let result = overlay(&short, target);
            std::env::set_current_dir(&cwd).with_context(|| format!("returning to {}", cwd.display()))?;
            result.map_err(|e| flags(e, "mounting overlay"))
        }
        other => bail!("cannot mount a {other:?} mount"),
    }
}

fn overlay(data: &str, target: &Path) -> rustix::io::Result<()> {
    let data = CString::new(data).map_err(|_| rustix::io::Errno::INVAL)?;
    rustix::mount::mount("overlay", target, "overlay", MOUNT_FLAGS, data.as_c_str())
}

/// The overlay options with every `lowerdir` entry relative to the entries' common parent,
/// and that parent.
fn relative_lowerdirs(options: &[&str]) -> anyhow::Result<(PathBuf, String)> {
    let lowers: Vec<&str> =
        options.iter().find_map(|o| o.strip_prefix("lowerdir=")).context("no lowerdir")?.split(':').collect();
    let mut base = Path::new(lowers[0]).parent().context("lowerdir without a parent")?.to_path_buf();
    while !lowers.iter().all(|l| Path::new(l).starts_with(&base)) {
        base = base.parent().context("lowerdirs without a common parent")?.to_path_buf();
    }
    let relative: Vec<String> = lowers
        .iter()
        .map(|l| Path::new(l).strip_prefix(&base).map(|p| p.display().to_string()))
        .collect::<Result<_, _>>()?;
    let rest = options.iter().filter(|o| !o.starts_with("lowerdir=")).map(|o| o.to_string());
    let all: Vec<String> = std::iter::once(format!("lowerdir={}", relative.join(":"))).chain(rest).collect();
    Ok((base, all.join(",")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_lowerdir_lists_become_relative() {
        let (base, data) =
            relative_lowerdirs(&["lowerdir=/s/snapshots/3/fs:/s/snapshots/2/fs:/s/snapshots/1/fs"]).unwrap();
        assert_eq!(base, Path::new("/s/snapshots"));
        assert_eq!(data, "lowerdir=3/fs:2/fs:1/fs");
    }
}
