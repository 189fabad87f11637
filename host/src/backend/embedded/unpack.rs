//! Tar extraction onto a snapshot's upper directory that is safe against hostile archives.
//!
//! [`unpack`] applies one layer's (uncompressed) tar stream onto a directory, converting OCI
//! whiteouts into overlayfs's as it goes, as containerd's applier does when it writes straight
//! into an overlay upper directory:
//!
//! - `.wh.<name>` becomes an overlayfs whiteout (a character device 0:0) named `<name>`;
//! - `.wh..wh..opq` sets `trusted.overlay.opaque=y` on its directory;
//! - other `.wh..wh.` names are aufs bookkeeping and are skipped.
//!
//! Safety, the reason this module exists instead of `tar::Entry::unpack_in`:
//!
//! - Names are cleaned as containerd does: taken relative to the root, `.` dropped, `..`
//!   popped but never above the root. `../x` and `/x` land at `<root>/x`.
//! - Every entry is created relative to a directory file descriptor opened from the root
//!   without following a symlink in any component (`openat2` with `RESOLVE_NO_SYMLINKS |
//!   RESOLVE_BENEATH`, else component by component with `O_NOFOLLOW`). containerd resolves
//!   such a symlink within the root; we refuse the entry (`BadLayer`), which real image layers
//!   never need, since a tar of a filesystem never has an entry below a symlink.
//! - Files are created with `O_CREAT | O_EXCL | O_NOFOLLOW` after whatever was at the name is
//!   removed (a directory replacing a directory merges instead), so writing to an existing
//!   symlink never writes through it. Device nodes and FIFOs are never opened: their mode is
//!   set through an `O_PATH | O_NOFOLLOW` descriptor of the node itself. Every other metadata
//!   call works on an open descriptor or passes `AT_SYMLINK_NOFOLLOW`: nothing follows a link.
//! - Hard link targets are cleaned and walked the same way and must already exist in this
//!   layer's directory; `linkat` without `AT_SYMLINK_FOLLOW` links a symlink itself.
//! - A whiteout below a non-directory that this layer put there (a directory the layer turned
//!   into a file or a symlink, which umoci writes as the new entry plus whiteouts of the old
//!   children) has nothing left to hide and is skipped; nothing is followed to reach it.
//! - `trusted.overlay.*` extended attributes in the archive are dropped: they would let a
//!   layer forge overlayfs metadata (opacity, redirects) about the layers below it.
//!
//! Bounds, so that a crafted layer costs what its bytes cost and no more (the archive reader,
//! [`super::archive`], bounds long names, PAX headers and sparse maps to 1 MiB each; the
//! stream's size cap, [`LayerTooLarge`], is the layer pipeline's: [`super::pipeline`]):
//!
//! - [`MAX_PATH`] (4095 bytes: `PATH_MAX` less its NUL) on a cleaned path, and [`MAX_DEPTH`]
//!   (1024 components) on its depth, for entries and hard link targets. Real trees stay far
//!   below both (deep `node_modules` reach a few dozen levels); above them a path no longer
//!   fits one system call, and every walk of the tree (unpacking, collecting, deleting) costs
//!   in proportion to depth.
//! - [`MAX_DIRS`] (2^20) directories per layer, listed or created as missing parents: the
//!   unpacker remembers each one (its times, or that it was created), so this bounds its
//!   memory (about 100 MiB at the cap); real layers hold tens of thousands.
//! - Old-GNU sparse files are written sparse: only their stored blocks are written, and the
//!   file is extended to its real size, so a 1-byte archive member of 4 GiB takes one block of
//!   disk, as in the archive.
//! - Names in error messages are cut to [`SHOWN_NAME`] bytes.
//!
//! Parent directories an archive does not list are created, as containerd's applier creates
//! them when given the layers below (`WithParents`): with the mode, owner and times of the
//! same directory in the nearest lower layer that has it (so the overlay view keeps them),
//! 0755 and root's when none has. The lower layers are only read, walked like the upper one.
//! A layer unpacked before the layers below it exist ([`unpack_staged`], while it downloads)
//! records the parents it created instead, and [`inherit_parents`] gives them that metadata
//! once it is moved onto its snapshot: the result is the same tree.
//!
//! Metadata: modes (setuid, setgid and sticky included), owners (when running as root),
//! modification and access times (nanoseconds from PAX records), and PAX `SCHILY.xattr.*`
//! attributes on files and directories are preserved. Owners are set before modes and
//! attributes, because `chown` clears setuid bits and file capabilities. Directory times are
//! set after the whole archive, deepest first, because adding children changes them. Device
//! nodes are created only as root (skipped otherwise, as containerd does in a user namespace).
//!
//! Errors name the layer and the entry: [`Error::BadLayer`] for what the archive says or is,
//! [`Error::ResourceExhausted`] for a cap, [`Error::Io`] for the host's own failures (a full
//! disk, named with the directory being written, reads as resource exhaustion), via
//! [`Unpacker::fs_error`].

use std::{
    cell::RefCell,
    collections::HashMap,
    ffi::{OsStr, OsString},
    fs::File,
    io::{self, Read, Write},
    os::{
        fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd},
        unix::{
            ffi::{OsStrExt, OsStringExt},
            fs::FileExt,
        },
    },
    path::{Path, PathBuf},
};

use rustix::{
    fs::{self as rfs, AtFlags, FileType, Gid, Mode, OFlags, ResolveFlags, Timespec, Timestamps, Uid, XattrFlags},
    io::Errno,
};
use tar::EntryType;

use super::{
    archive::{Archive, ArchiveError, Entry},
    fsutil::remove_at,
};
use crate::error::{Error, Result};

/// A layer's uncompressed stream went past the cap: the error inside the `io::Error` that the
/// layer stream ([`super::pipeline::layer_stream`]) returns, for the unpacker to find
/// ([`LayerTooLarge::find`]) and report as resource exhaustion.
#[derive(Debug, thiserror::Error)]
#[error("the layer's uncompressed size exceeds the limit of {limit} bytes (max_layer_bytes)")]
pub(crate) struct LayerTooLarge {
    pub(crate) limit: u64,
}

impl LayerTooLarge {
    /// The cap error inside `e`, if that is what `e` is.
    pub(crate) fn find(e: &io::Error) -> Option<&LayerTooLarge> {
        e.get_ref().and_then(|inner| inner.downcast_ref())
    }
}

/// The prefix that marks an OCI whiteout.
const WHITEOUT_PREFIX: &[u8] = b".wh.";
/// The prefix of aufs metadata names, which are not whiteouts.
const WHITEOUT_META_PREFIX: &[u8] = b".wh..wh.";
/// The name that makes its directory opaque.
const OPAQUE_MARKER: &[u8] = b".wh..wh..opq";
/// overlayfs's opaque-directory attribute (set to `y`).
const OPAQUE_XATTR: &str = "trusted.overlay.opaque";
/// overlayfs's own attributes: never taken from an archive.
const OVERLAY_XATTR_PREFIX: &[u8] = b"trusted.overlay.";
/// How PAX records carry extended attributes (GNU tar's and Go's spelling).
const PAX_XATTR_PREFIX: &[u8] = b"SCHILY.xattr.";
/// Copy buffer size: large enough to amortize syscalls, small enough to not matter.
const COPY_BUF: usize = 128 * 1024;

/// The longest cleaned path accepted, in bytes: `PATH_MAX` (4096) less the terminating NUL.
pub(crate) const MAX_PATH: usize = 4095;
/// The deepest cleaned path accepted, in components.
pub(crate) const MAX_DEPTH: usize = 1024;
/// The most directories one layer may list or create.
pub(crate) const MAX_DIRS: usize = 1 << 20;
/// How much of a name an error message shows.
const SHOWN_NAME: usize = 256;

/// Opening a directory along a path: never follow a symlink, never leak the fd to children.
const DIR_FLAGS: OFlags = OFlags::RDONLY.union(OFlags::DIRECTORY).union(OFlags::NOFOLLOW).union(OFlags::CLOEXEC);
/// Resolving a whole path in one `openat2`: inside the directory, no symlink anywhere.
const RESOLVE: ResolveFlags = ResolveFlags::BENEATH.union(ResolveFlags::NO_SYMLINKS).union(ResolveFlags::NO_MAGICLINKS);

/// Applies the tar stream `archive` onto the directory `root`, whose lower layers (nearest
/// first) are `lowers`; `layer` names the layer in errors. Returns the reader, positioned after
/// the archive's end-of-archive marker (the caller may have more bytes to consume from it).
pub(crate) fn unpack<R: Read>(archive: R, root: &Path, lowers: &[PathBuf], layer: &str) -> Result<R> {
    let lowers = lowers.iter().map(|l| open_root(l)).collect::<Result<_>>()?;
    let mut unpacker = Unpacker::new(root, Parents::Inherit(lowers), layer)?;
    unpacker.run(archive)
}

/// The parent directories a layer unpacked by [`unpack_staged`] created without listing them.
#[derive(Debug, Default)]
pub(crate) struct CreatedParents(Tree<()>);

/// [`unpack`] for a layer whose lower layers are not known yet: the parent directories it
/// creates get the defaults and are returned, for [`inherit_parents`] to finish.
pub(crate) fn unpack_staged<R: Read>(archive: R, root: &Path, layer: &str) -> Result<(R, CreatedParents)> {
    let mut unpacker = Unpacker::new(root, Parents::Record(RefCell::default()), layer)?;
    let rest = unpacker.run(archive)?;
    let Parents::Record(created) = unpacker.parents else { unreachable!("recording parents") };
    Ok((rest, CreatedParents(created.into_inner())))
}

/// Gives the directories `created` under `root` (a layer [`unpack_staged`] unpacked, now on
/// its snapshot) the metadata [`unpack`] would have given them with `lowers` below.
pub(crate) fn inherit_parents(root: &Path, lowers: &[PathBuf], created: &CreatedParents, layer: &str) -> Result<()> {
    let lowers = lowers.iter().map(|l| open_root(l)).collect::<Result<_>>()?;
    let mut unpacker = Unpacker::new(root, Parents::Inherit(lowers), layer)?;
    // Parents before their children, as they were created.
    for node in created.0.valued() {
        let path = created.0.path(node);
        // Gone or replaced by a non-directory since: nothing to give metadata to.
        if let Ok(dir) = unpacker.open_dir(&path, false) {
            unpacker.inherit(&path, dir.as_fd()).map_err(|()| unpacker.too_many_dirs(&display(&path)))?;
        }
    }
    unpacker.set_dir_times()
}

/// Opens a directory the unpacker works on or reads.
fn open_root(dir: &Path) -> Result<OwnedFd> {
    rfs::open(dir, DIR_FLAGS, Mode::empty())
        .map_err(|e| Error::Io { context: format!("opening {}", dir.display()), source: e.into() })
}

/// A path inside the root: cleaned, never empty components, never `.` or `..`.
type Components = Vec<OsString>;

/// Cleans an archive path relative to the root, as containerd does (`filepath.Join("/",
/// name)`): `..` never climbs above the root, absolute paths are taken relative to it.
fn clean(raw: &[u8]) -> Components {
    let mut out: Components = Vec::new();
    for part in raw.split(|&b| b == b'/') {
        match part {
            b"" | b"." => {}
            b".." => {
                out.pop();
            }
            name => out.push(OsString::from_vec(name.to_vec())),
        }
    }
    out
}

/// Checks a cleaned path against [`MAX_PATH`] and [`MAX_DEPTH`].
fn check_path(path: &[OsString]) -> Result<(), String> {
    if path.len() > MAX_DEPTH {
        return Err(format!("path of {} components exceeds the limit of {MAX_DEPTH} components", path.len()));
    }
    let bytes = path.iter().map(|c| c.len()).sum::<usize>() + path.len().saturating_sub(1);
    if bytes > MAX_PATH {
        return Err(format!("path of {bytes} bytes exceeds the limit of {MAX_PATH} bytes (PATH_MAX)"));
    }
    Ok(())
}

/// The path's bytes, `/`-separated, for one system call.
fn joined(components: &[impl AsRef<OsStr>]) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, c) in components.iter().enumerate() {
        if i > 0 {
            out.push(b'/');
        }
        out.extend_from_slice(c.as_ref().as_bytes());
    }
    out
}

fn display(components: &[impl AsRef<OsStr>]) -> String {
    shown(&joined(components))
}

/// A name for a message: lossy UTF-8, cut to [`SHOWN_NAME`] bytes.
fn shown(raw: &[u8]) -> String {
    if raw.len() <= SHOWN_NAME {
        return String::from_utf8_lossy(raw).into_owned();
    }
    format!("{}... ({} bytes)", String::from_utf8_lossy(&raw[..SHOWN_NAME]), raw.len())
}

/// Directories by path, each with a value (or none), compact: a node per directory, named
/// once; a child's index is always greater than its parent's, so walking the indexes backwards
/// visits children before parents.
#[derive(Debug)]
pub(crate) struct Tree<T> {
    /// Parent index and value of each node; node 0 is the root.
    nodes: Vec<(usize, Option<T>)>,
    names: Vec<OsString>,
    children: HashMap<(usize, OsString), usize>,
}

impl<T> Default for Tree<T> {
    fn default() -> Self {
        Tree { nodes: vec![(0, None)], names: vec![OsString::new()], children: HashMap::new() }
    }
}

impl<T> Tree<T> {
    /// The node of `path`, created with its parents when absent; `None` past [`MAX_DIRS`].
    fn node(&mut self, path: &[impl AsRef<OsStr>]) -> Option<usize> {
        let mut at = 0;
        for name in path {
            let key = (at, name.as_ref().to_owned());
            at = match self.children.get(&key) {
                Some(&child) => child,
                None => {
                    if self.nodes.len() > MAX_DIRS {
                        return None;
                    }
                    let child = self.nodes.len();
                    self.nodes.push((at, None));
                    self.names.push(key.1.clone());
                    self.children.insert(key, child);
                    child
                }
            };
        }
        Some(at)
    }

    /// Sets the value of `path`; `false` past [`MAX_DIRS`].
    fn set(&mut self, path: &[impl AsRef<OsStr>], value: T) -> bool {
        match self.node(path) {
            Some(node) => {
                self.nodes[node].1 = Some(value);
                true
            }
            None => false,
        }
    }

    /// Clears the value of `path`, if it has a node.
    fn clear(&mut self, path: &[impl AsRef<OsStr>]) {
        let mut at = 0;
        for name in path {
            match self.children.get(&(at, name.as_ref().to_owned())) {
                Some(&child) => at = child,
                None => return,
            }
        }
        self.nodes[at].1 = None;
    }

    /// The nodes with a value, parents first.
    fn valued(&self) -> impl DoubleEndedIterator<Item = usize> + '_ {
        (1..self.nodes.len()).filter(|&i| self.nodes[i].1.is_some())
    }

    fn value(&self, node: usize) -> Option<&T> {
        self.nodes[node].1.as_ref()
    }

    fn path(&self, mut node: usize) -> Components {
        let mut out = Vec::new();
        while node != 0 {
            out.push(self.names[node].clone());
            node = self.nodes[node].0;
        }
        out.reverse();
        out
    }
}

/// The metadata of one entry, from its header and PAX records.
struct Meta {
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: Timespec,
    atime: Option<Timespec>,
    xattrs: Vec<(OsString, Vec<u8>)>,
}

impl Meta {
    fn read(entry: &Entry) -> Result<Meta, String> {
        let header = &entry.header;
        let raw = header.as_old();
        let mode = numeric(header.mode().map(u64::from), &raw.mode, "mode")? as u32 & 0o7777;
        let mut uid = numeric(header.uid(), &raw.uid, "uid")?;
        let mut gid = numeric(header.gid(), &raw.gid, "gid")?;
        let mtime = numeric(header.mtime(), &raw.mtime, "mtime")?;
        let mut mtime = Timespec { tv_sec: i64::try_from(mtime).map_err(|_| "mtime out of range")?, tv_nsec: 0 };
        let mut atime = None;
        let mut xattrs = Vec::new();
        for (key, value) in entry.pax_records() {
            let text = || std::str::from_utf8(value).map_err(|_| format!("PAX record {}: not UTF-8", shown(key)));
            let number = |v: &str| {
                v.parse::<u64>().map_err(|_| format!("PAX record {}: bad number {}", shown(key), shown(v.as_bytes())))
            };
            match key {
                b"uid" => uid = number(text()?)?,
                b"gid" => gid = number(text()?)?,
                b"mtime" => mtime = pax_time(text()?)?,
                b"atime" => atime = Some(pax_time(text()?)?),
                _ => {
                    if let Some(name) = key.strip_prefix(PAX_XATTR_PREFIX) {
                        xattrs.push((OsString::from_vec(name.to_vec()), value.to_vec()));
                    }
                }
            }
        }
        // -1 is "no change" to chown: never a real owner.
        let id =
            |v: u64, what| u32::try_from(v).ok().filter(|&v| v != u32::MAX).ok_or(format!("{what} {v} out of range"));
        Ok(Meta { mode, uid: id(uid, "uid")?, gid: id(gid, "gid")?, mtime, atime, xattrs })
    }

    fn times(&self) -> Timestamps {
        Timestamps { last_access: self.atime.unwrap_or(self.mtime), last_modification: self.mtime }
    }
}

/// A numeric header field. A blank one (all NUL or space) reads as 0, as Go's `archive/tar`
/// (containerd's reader) reads it.
fn numeric(value: io::Result<u64>, raw: &[u8], what: &str) -> Result<u64, String> {
    match value {
        Ok(v) => Ok(v),
        Err(_) if raw.iter().all(|&b| b == 0 || b == b' ') => Ok(0),
        Err(e) => Err(format!("{what}: {e}")),
    }
}

/// Parses a PAX time, `seconds[.fraction]`, possibly negative.
fn pax_time(s: &str) -> Result<Timespec, String> {
    let bad = || format!("bad PAX time {}", shown(s.as_bytes()));
    let (negative, digits) = match s.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, s),
    };
    let (secs, frac) = digits.split_once('.').unwrap_or((digits, ""));
    if secs.is_empty() || !secs.bytes().all(|b| b.is_ascii_digit()) || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let secs: i64 = secs.parse().map_err(|_| bad())?;
    let nanos: i64 = format!("{:0<9}", &frac[..frac.len().min(9)]).parse().map_err(|_| bad())?;
    Ok(match (negative, nanos) {
        (false, _) => Timespec { tv_sec: secs, tv_nsec: nanos },
        (true, 0) => Timespec { tv_sec: -secs, tv_nsec: 0 },
        (true, _) => Timespec { tv_sec: -secs - 1, tv_nsec: 1_000_000_000 - nanos },
    })
}

/// A node to set metadata on: an open file or directory, or a name in a directory for what
/// must not be opened (device nodes and FIFOs) or cannot be (symlinks, which have no mode).
#[derive(Clone, Copy)]
enum Node<'a> {
    Fd(BorrowedFd<'a>),
    At(BorrowedFd<'a>, &'a OsStr),
    Symlink(BorrowedFd<'a>, &'a OsStr),
}

/// Where walking a path failed, and how.
struct WalkError {
    at: String,
    errno: Errno,
}

/// Where the parent directories an archive does not list get their metadata.
enum Parents {
    /// From the layers below, nearest first (read only), as they are created.
    Inherit(Vec<OwnedFd>),
    /// Later: the ones created are recorded (and forgotten when an entry replaces them).
    Record(RefCell<Tree<()>>),
}

/// What a lower layer has at a path.
enum Lower {
    Dir(OwnedFd),
    /// Nothing: the next layer down decides.
    Absent,
    /// A non-directory on the way or there: it hides the layers below.
    Hidden,
}

/// The state of one extraction.
struct Unpacker<'a> {
    root: OwnedFd,
    /// The root's path, for messages about the host's failures.
    root_path: PathBuf,
    parents: Parents,
    layer: &'a str,
    /// Running as root: owners and device nodes are applied.
    privileged: bool,
    /// Directories whose times are set at the end (the last entry for a directory wins).
    dirs: RefCell<Tree<Timestamps>>,
    buf: Vec<u8>,
}

impl Unpacker<'_> {
    fn new<'a>(root: &Path, parents: Parents, layer: &'a str) -> Result<Unpacker<'a>> {
        Ok(Unpacker {
            root: open_root(root)?,
            root_path: root.to_owned(),
            parents,
            layer,
            privileged: rustix::process::geteuid().is_root(),
            dirs: RefCell::default(),
            buf: vec![0; COPY_BUF],
        })
    }

    /// Unpacks every entry, then sets directory times; returns the reader after the archive.
    fn run<R: Read>(&mut self, archive: R) -> Result<R> {
        let mut archive = Archive::new(archive);
        while let Some(entry) = archive.next_entry().map_err(|e| self.archive_error(None, e))? {
            self.entry(&entry, &mut archive)?;
        }
        self.set_dir_times()?;
        Ok(archive.into_inner())
    }

    fn bad(&self, entry: &str, reason: impl std::fmt::Display) -> Error {
        Error::BadLayer { layer: self.layer.to_owned(), reason: format!("{entry}: {reason}") }
    }

    /// A failure to read the archive, while at `entry` (or between entries): the size cap is
    /// resource exhaustion, anything else a bad layer.
    fn archive_error(&self, entry: Option<&str>, e: ArchiveError) -> Error {
        let at = entry.map(|e| format!("{e}: ")).unwrap_or_default();
        if let ArchiveError::Read { source, offset } = &e {
            if let Some(cap) = LayerTooLarge::find(source) {
                return Error::ResourceExhausted(format!("layer {}: {at}at byte {offset}: {cap}", self.layer));
            }
        }
        let reason = std::iter::successors(Some(&e as &dyn std::error::Error), |e| e.source())
            .map(|e| e.to_string())
            .collect::<Vec<_>>()
            .join(": ");
        Error::BadLayer { layer: self.layer.to_owned(), reason: format!("{at}{reason}") }
    }

    /// A failed filesystem operation on `entry`: the host's fault (`Io`, so a full disk reads
    /// as resource exhaustion, naming the directory written to) when the error is the host's,
    /// the archive's otherwise.
    fn fs_error(&self, entry: &str, op: &str, e: impl Into<io::Error>) -> Error {
        let e: io::Error = e.into();
        let host = [Errno::NOSPC, Errno::DQUOT, Errno::IO, Errno::ROFS, Errno::NOMEM, Errno::MFILE, Errno::NFILE];
        if host.iter().any(|errno| e.raw_os_error() == Some(errno.raw_os_error())) {
            Error::Io {
                context: format!("layer {}: {entry}: {op} in {}", self.layer, self.root_path.display()),
                source: e,
            }
        } else {
            self.bad(entry, format_args!("{op}: {e}"))
        }
    }

    /// Opens the directory at `path` below the root without following a symlink: in one
    /// `openat2` when it exists, else one component at a time, creating missing components
    /// when `create` (with the metadata of the layers below, see [`Unpacker::inherit`]; 0755
    /// as containerd when they have none).
    fn open_dir(&self, path: &[impl AsRef<OsStr>], create: bool) -> Result<OwnedFd, WalkError> {
        if path.is_empty() {
            return rfs::openat(&self.root, ".", DIR_FLAGS, Mode::empty())
                .map_err(|errno| WalkError { at: ".".into(), errno });
        }
        if let Ok(dir) = rfs::openat2(&self.root, joined(path), DIR_FLAGS, Mode::empty(), RESOLVE) {
            return Ok(dir);
        }
        let fail = |i: usize, errno| WalkError { at: display(&path[..=i]), errno };
        let mut dir = rfs::openat(&self.root, ".", DIR_FLAGS, Mode::empty())
            .map_err(|errno| WalkError { at: ".".into(), errno })?;
        for (i, name) in path.iter().enumerate() {
            let name = name.as_ref();
            let mut next = rfs::openat(&dir, name, DIR_FLAGS, Mode::empty());
            if create && matches!(next, Err(Errno::NOENT)) {
                rfs::mkdirat(&dir, name, Mode::from_raw_mode(0o755)).map_err(|e| fail(i, e))?;
                next = rfs::openat(&dir, name, DIR_FLAGS, Mode::empty());
                if let Ok(created) = &next {
                    let recorded = match &self.parents {
                        Parents::Inherit(_) => self.inherit(&path[..=i], created.as_fd()).is_ok(),
                        Parents::Record(created) => created.borrow_mut().set(&path[..=i], ()),
                    };
                    if !recorded {
                        return Err(fail(i, Errno::NOMEM));
                    }
                }
            }
            // O_DIRECTORY reports a symlink as "not a directory": say what it is.
            let is_symlink = || {
                rfs::statat(&dir, name, AtFlags::SYMLINK_NOFOLLOW)
                    .is_ok_and(|st| FileType::from_raw_mode(st.st_mode) == FileType::Symlink)
            };
            dir = next.map_err(|e| fail(i, if e == Errno::NOTDIR && is_symlink() { Errno::LOOP } else { e }))?;
        }
        Ok(dir)
    }

    /// What the lower layer `lower` has at `path`, walked without following symlinks.
    fn lower_at(lower: &OwnedFd, path: &[impl AsRef<OsStr>]) -> Lower {
        let classify = |r: rustix::io::Result<OwnedFd>| match r {
            Ok(dir) => Lower::Dir(dir),
            Err(Errno::NOENT) => Lower::Absent,
            Err(_) => Lower::Hidden,
        };
        match rfs::openat2(lower, joined(path), DIR_FLAGS, Mode::empty(), RESOLVE) {
            Ok(dir) => return Lower::Dir(dir),
            Err(e @ (Errno::NOENT | Errno::NOTDIR | Errno::LOOP)) => return classify(Err(e)),
            // No openat2 (or another failure): walk.
            Err(_) => {}
        }
        let mut dir = match rfs::openat(lower, ".", DIR_FLAGS, Mode::empty()) {
            Ok(d) => d,
            Err(_) => return Lower::Hidden,
        };
        for name in path {
            match classify(rfs::openat(&dir, name.as_ref(), DIR_FLAGS, Mode::empty())) {
                Lower::Dir(next) => dir = next,
                other => return other,
            }
        }
        Lower::Dir(dir)
    }

    /// Gives the directory `created` at `path` (just made, not listed in the archive) the mode,
    /// owner and times of the same directory in the nearest lower layer that has one there; a
    /// lower layer with a non-directory there (a file, a whiteout, a symlink) ends the search,
    /// as it hides the layers below it. Best effort: a failure leaves the defaults. Fails only
    /// past [`MAX_DIRS`].
    fn inherit(&self, path: &[impl AsRef<OsStr>], created: BorrowedFd<'_>) -> Result<(), ()> {
        let Parents::Inherit(lowers) = &self.parents else { return Ok(()) };
        for lower in lowers {
            let dir = match Self::lower_at(lower, path) {
                Lower::Dir(dir) => dir,
                Lower::Absent => continue,
                Lower::Hidden => return Ok(()),
            };
            let Ok(st) = rfs::fstat(&dir) else { return Ok(()) };
            let owner = if self.privileged {
                rfs::fchown(created, Some(Uid::from_raw(st.st_uid)), Some(Gid::from_raw(st.st_gid)))
            } else {
                Ok(())
            };
            let mode = rfs::fchmod(created, Mode::from_raw_mode(st.st_mode & 0o7777));
            if let Err(e) = owner.and(mode) {
                let shown = display(path);
                tracing::debug!(layer = self.layer, dir = shown, error = %e, "cannot copy a parent's metadata from below");
                return Ok(());
            }
            // The field types of `stat` differ between architectures.
            #[allow(clippy::unnecessary_cast)]
            let times = Timestamps {
                last_access: Timespec { tv_sec: st.st_atime as i64, tv_nsec: st.st_atime_nsec as i64 },
                last_modification: Timespec { tv_sec: st.st_mtime as i64, tv_nsec: st.st_mtime_nsec as i64 },
            };
            return if self.dirs.borrow_mut().set(path, times) { Ok(()) } else { Err(()) };
        }
        Ok(())
    }

    /// The error for too many directories.
    fn too_many_dirs(&self, entry: &str) -> Error {
        Error::ResourceExhausted(format!(
            "layer {}: {entry}: more than {MAX_DIRS} directories in one layer (the limit)",
            self.layer
        ))
    }

    /// The error for a failed [`Unpacker::open_dir`] while unpacking `entry`; `what` says
    /// whose path it was, when not the entry's own.
    fn walk_error(&self, entry: &str, what: &str, e: WalkError) -> Error {
        let at = e.at;
        match e.errno {
            Errno::LOOP => self.bad(entry, format_args!("{what}{at} is a symbolic link, which is not followed")),
            Errno::NOTDIR => self.bad(entry, format_args!("{what}{at} is not a directory")),
            Errno::NOENT => self.bad(entry, format_args!("{what}{at} is not in this layer")),
            Errno::NOMEM => self.too_many_dirs(entry),
            errno => self.fs_error(entry, &format!("opening {at}"), errno),
        }
    }

    /// Clears `name` in `dir` for a new entry: removes whatever is there, except that an
    /// existing directory is kept when `merge_dir` (a directory entry over a directory).
    /// Returns whether a directory was kept.
    fn make_room(&self, entry: &str, dir: &OwnedFd, name: &OsStr, merge_dir: bool) -> Result<bool> {
        match rfs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
            Err(Errno::NOENT) => Ok(false),
            Err(e) => Err(self.fs_error(entry, "inspecting the existing entry", e)),
            Ok(st) if merge_dir && FileType::from_raw_mode(st.st_mode) == FileType::Directory => Ok(true),
            Ok(_) => {
                remove_at(dir.as_fd(), name).map_err(|e| self.fs_error(entry, "removing the existing entry", e))?;
                Ok(false)
            }
        }
    }

    fn entry<R: Read>(&mut self, entry: &Entry, archive: &mut Archive<R>) -> Result<()> {
        let kind = entry.entry_type();
        let shown = shown(&entry.path);
        let path = clean(&entry.path);
        check_path(&path).map_err(|reason| self.bad(&shown, reason))?;
        // The root itself ("./"): containerd leaves it alone too.
        let Some((name, parents)) = path.split_last() else { return Ok(()) };
        let meta = Meta::read(entry).map_err(|e| self.bad(&shown, e))?;
        let name = name.as_os_str();
        let is_whiteout = name.as_bytes().starts_with(WHITEOUT_PREFIX);
        let parent = match self.open_dir(parents, true) {
            Ok(parent) => parent,
            // Below a file or symlink this layer made of a directory: already hidden.
            Err(e) if is_whiteout && matches!(e.errno, Errno::NOTDIR | Errno::LOOP) => {
                tracing::debug!(layer = self.layer, entry = shown, "skipping a whiteout below a non-directory");
                return Ok(());
            }
            Err(e) => return Err(self.walk_error(&shown, "", e)),
        };

        if is_whiteout {
            return self.whiteout(&shown, &parent, name, &meta);
        }
        let skipped_device = matches!(kind, EntryType::Char | EntryType::Block) && !self.privileged;
        if let (Parents::Record(created), false) = (&self.parents, skipped_device) {
            // The entry takes the name: its own metadata from now on, or no directory at all.
            created.borrow_mut().clear(&path);
        }
        match kind {
            EntryType::Directory => {
                if !self.make_room(&shown, &parent, name, true)? {
                    rfs::mkdirat(&parent, name, Mode::from_raw_mode(0o700))
                        .map_err(|e| self.fs_error(&shown, "creating the directory", e))?;
                }
                let dir = rfs::openat(&parent, name, DIR_FLAGS, Mode::empty())
                    .map_err(|e| self.fs_error(&shown, "opening the directory", e))?;
                self.set_metadata(&shown, Node::Fd(dir.as_fd()), &meta)?;
                self.set_xattrs(&shown, dir.as_fd(), &meta)?;
                if !self.dirs.borrow_mut().set(&path, meta.times()) {
                    return Err(self.too_many_dirs(&shown));
                }
            }
            EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => {
                self.make_room(&shown, &parent, name, false)?;
                let fd = rfs::openat(
                    &parent,
                    name,
                    OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::from_raw_mode(0o600),
                )
                .map_err(|e| self.fs_error(&shown, "creating the file", e))?;
                let mut file = File::from(fd);
                match &entry.sparse {
                    None => self.copy(&shown, archive, entry.size, &mut |buf, _| file.write_all(buf))?,
                    Some(sparse) => {
                        // Each stored block at its offset; the holes between stay holes.
                        for &(offset, length) in &sparse.blocks {
                            self.copy(&shown, archive, length, &mut |buf, done| file.write_all_at(buf, offset + done))?;
                        }
                        file.set_len(sparse.real_size)
                            .map_err(|e| self.fs_error(&shown, "extending the sparse file", e))?;
                    }
                }
                self.set_metadata(&shown, Node::Fd(file.as_fd()), &meta)?;
                self.set_xattrs(&shown, file.as_fd(), &meta)?;
                self.set_times(&shown, Node::Fd(file.as_fd()), &meta.times())?;
            }
            EntryType::Symlink => {
                let target = entry.link.as_deref().ok_or_else(|| self.bad(&shown, "symbolic link without a target"))?;
                let target = OsStr::from_bytes(target);
                self.make_room(&shown, &parent, name, false)?;
                rfs::symlinkat(target, &parent, name)
                    .map_err(|e| self.fs_error(&shown, "creating the symbolic link", e))?;
                let node = Node::Symlink(parent.as_fd(), name);
                self.set_metadata(&shown, node, &meta)?;
                self.set_times(&shown, node, &meta.times())?;
            }
            EntryType::Link => self.hardlink(&shown, entry, &parent, name)?,
            EntryType::Char | EntryType::Block | EntryType::Fifo => {
                let file_type = match kind {
                    EntryType::Char => FileType::CharacterDevice,
                    EntryType::Block => FileType::BlockDevice,
                    _ => FileType::Fifo,
                };
                if file_type != FileType::Fifo && !self.privileged {
                    tracing::debug!(layer = self.layer, entry = shown, "skipping a device node: not running as root");
                    return Ok(());
                }
                let header = &entry.header;
                let number =
                    |n: io::Result<Option<u32>>| n.map(Option::unwrap_or_default).map_err(|e| self.bad(&shown, e));
                let dev = rfs::makedev(number(header.device_major())?, number(header.device_minor())?);
                self.make_room(&shown, &parent, name, false)?;
                rfs::mknodat(&parent, name, file_type, Mode::from_raw_mode(0o600), dev)
                    .map_err(|e| self.fs_error(&shown, "creating the node", e))?;
                let node = Node::At(parent.as_fd(), name);
                self.set_metadata(&shown, node, &meta)?;
                self.set_times(&shown, node, &meta.times())?;
            }
            other => return Err(self.bad(&shown, format_args!("unsupported entry type {other:?}"))),
        }
        Ok(())
    }

    /// Copies the next `len` bytes of the entry's data to `write` (given each chunk and the
    /// bytes written before it), telling the archive's errors from the host's.
    fn copy<R: Read>(
        &mut self,
        shown: &str,
        archive: &mut Archive<R>,
        len: u64,
        write: &mut dyn FnMut(&[u8], u64) -> io::Result<()>,
    ) -> Result<()> {
        let mut done = 0u64;
        while done < len {
            let want = self.buf.len().min(usize::try_from(len - done).unwrap_or(usize::MAX));
            let n = archive.read_data(&mut self.buf[..want]).map_err(|e| self.archive_error(Some(shown), e))?;
            if n == 0 {
                return Err(self.bad(shown, "the archive ends inside the entry's data"));
            }
            write(&self.buf[..n], done).map_err(|e| self.fs_error(shown, "writing data", e))?;
            done += n as u64;
        }
        Ok(())
    }

    /// A hard link: the target is cleaned and walked like any path and must exist in this
    /// layer's directory.
    fn hardlink(&self, shown: &str, entry: &Entry, parent: &OwnedFd, name: &OsStr) -> Result<()> {
        let raw = entry.link.as_deref().ok_or_else(|| self.bad(shown, "hard link without a target"))?;
        let target = clean(raw);
        check_path(&target).map_err(|reason| self.bad(shown, format_args!("hard link target: {reason}")))?;
        let Some((target_name, target_parents)) = target.split_last() else {
            return Err(self.bad(shown, "hard link to the root directory"));
        };
        let shown_target = display(&target);
        let target_dir = self
            .open_dir(target_parents, false)
            .map_err(|e| self.walk_error(shown, &format!("hard link target {shown_target}: "), e))?;
        match rfs::statat(&target_dir, target_name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Directory => {
                return Err(self.bad(shown, format_args!("hard link to directory {shown_target}")))
            }
            Ok(_) => {}
            Err(Errno::NOENT) => {
                return Err(self.bad(shown, format_args!("hard link target {shown_target} is not in this layer")))
            }
            Err(e) => return Err(self.fs_error(shown, "inspecting the hard link target", e)),
        }
        self.make_room(shown, parent, name, false)?;
        rfs::linkat(&target_dir, target_name, parent, name, AtFlags::empty())
            .map_err(|e| self.fs_error(shown, &format!("linking to {shown_target}"), e))
    }

    /// An OCI whiteout entry, converted to overlayfs's form.
    fn whiteout(&self, shown: &str, parent: &OwnedFd, name: &OsStr, meta: &Meta) -> Result<()> {
        let name = name.as_bytes();
        if name == OPAQUE_MARKER {
            return rfs::fsetxattr(parent, OPAQUE_XATTR, b"y", XattrFlags::empty())
                .map_err(|e| self.fs_error(shown, "marking the directory opaque", e));
        }
        if name.starts_with(WHITEOUT_META_PREFIX) {
            return Ok(());
        }
        let hidden = &name[WHITEOUT_PREFIX.len()..];
        if matches!(hidden, b"" | b"." | b"..") {
            return Err(self.bad(shown, "whiteout without a name"));
        }
        let hidden = OsStr::from_bytes(hidden);
        self.make_room(shown, parent, hidden, false)?;
        rfs::mknodat(parent, hidden, FileType::CharacterDevice, Mode::empty(), rfs::makedev(0, 0))
            .map_err(|e| self.fs_error(shown, "creating the whiteout", e))?;
        self.set_owner(shown, Node::At(parent.as_fd(), hidden), meta)
    }

    fn set_owner(&self, shown: &str, node: Node<'_>, meta: &Meta) -> Result<()> {
        if !self.privileged {
            return Ok(());
        }
        let (uid, gid) = (Some(Uid::from_raw(meta.uid)), Some(Gid::from_raw(meta.gid)));
        match node {
            Node::Fd(fd) => rfs::fchown(fd, uid, gid),
            Node::At(dir, name) | Node::Symlink(dir, name) => {
                rfs::chownat(dir, name, uid, gid, AtFlags::SYMLINK_NOFOLLOW)
            }
        }
        .map_err(|e| self.fs_error(shown, "setting the owner", e))
    }

    /// Owner, then mode (`chmod` after `chown`, which clears setuid bits).
    fn set_metadata(&self, shown: &str, node: Node<'_>, meta: &Meta) -> Result<()> {
        self.set_owner(shown, node, meta)?;
        let mode = Mode::from_raw_mode(meta.mode);
        match node {
            Node::Fd(fd) => rfs::fchmod(fd, mode),
            Node::At(dir, name) => chmod_node(dir, name, mode),
            Node::Symlink(..) => Ok(()),
        }
        .map_err(|e| self.fs_error(shown, "setting the mode", e))
    }

    /// Extended attributes from PAX records, after the owner (which clears capabilities).
    fn set_xattrs(&self, shown: &str, fd: BorrowedFd<'_>, meta: &Meta) -> Result<()> {
        for (name, value) in &meta.xattrs {
            if name.as_bytes().starts_with(OVERLAY_XATTR_PREFIX) {
                tracing::debug!(
                    layer = self.layer,
                    entry = shown,
                    ?name,
                    "dropping an overlayfs attribute from the archive"
                );
                continue;
            }
            match rfs::fsetxattr(fd, name.as_os_str(), value, XattrFlags::empty()) {
                Ok(()) => {}
                // The filesystem does not support it, or (unprivileged) may not set it.
                Err(Errno::NOTSUP) => {}
                Err(Errno::PERM) if !self.privileged => {}
                Err(e) => {
                    let attribute = shown_attr(name);
                    return Err(self.fs_error(shown, &format!("setting attribute {attribute}"), e));
                }
            }
        }
        Ok(())
    }

    fn set_times(&self, shown: &str, node: Node<'_>, times: &Timestamps) -> Result<()> {
        match node {
            Node::Fd(fd) => rfs::futimens(fd, times),
            Node::At(dir, name) | Node::Symlink(dir, name) => {
                rfs::utimensat(dir, name, times, AtFlags::SYMLINK_NOFOLLOW)
            }
        }
        .map_err(|e| self.fs_error(shown, "setting times", e))
    }

    /// Sets directory times last, children before parents; a directory a later entry replaced
    /// is skipped.
    fn set_dir_times(&mut self) -> Result<()> {
        let dirs = std::mem::take(self.dirs.get_mut());
        for node in dirs.valued().rev() {
            let path = dirs.path(node);
            if let (Ok(dir), Some(times)) = (self.open_dir(&path, false), dirs.value(node)) {
                self.set_times(&display(&path), Node::Fd(dir.as_fd()), times)?;
            }
        }
        Ok(())
    }
}

fn shown_attr(name: &OsStr) -> String {
    shown(name.as_bytes())
}

/// Sets the mode of the node `name` in `dir` (a device node or FIFO: never opened for I/O)
/// without following a symlink: through an `O_PATH | O_NOFOLLOW` descriptor of the node
/// itself, by its `/proc/self/fd` entry (`fchmod` refuses `O_PATH` descriptors, and
/// `fchmodat` has no working `AT_SYMLINK_NOFOLLOW` before Linux 6.6's `fchmodat2`).
fn chmod_node(dir: BorrowedFd<'_>, name: &OsStr, mode: Mode) -> rustix::io::Result<()> {
    let node = rfs::openat(dir, name, OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC, Mode::empty())?;
    if FileType::from_raw_mode(rfs::fstat(&node)?.st_mode) == FileType::Symlink {
        return Err(Errno::LOOP);
    }
    rfs::chmod(format!("/proc/self/fd/{}", node.as_raw_fd()), mode)
}

#[cfg(test)]
pub(crate) mod tests {
    use std::{
        fs,
        os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt},
        path::PathBuf,
    };

    use rustix::fs::Mode;

    use super::*;

    /// Builds tar archives in tests, including hostile ones the `tar` builder would refuse.
    pub(crate) struct Tar(tar::Builder<Vec<u8>>);

    impl Tar {
        pub(crate) fn new() -> Tar {
            Tar(tar::Builder::new(Vec::new()))
        }

        /// Appends an entry with a raw name (and link name), unchecked.
        fn raw(
            &mut self,
            kind: EntryType,
            name: &str,
            link: &str,
            mode: u32,
            data: &[u8],
            edit: impl FnOnce(&mut tar::Header),
        ) -> &mut Tar {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(kind);
            h.set_mode(mode);
            h.set_size(data.len() as u64);
            h.set_mtime(1_600_000_000);
            h.set_uid(0);
            h.set_gid(0);
            let gnu = h.as_gnu_mut().unwrap();
            gnu.name[..name.len()].copy_from_slice(name.as_bytes());
            gnu.linkname[..link.len()].copy_from_slice(link.as_bytes());
            edit(&mut h);
            h.set_cksum();
            self.0.append(&h, data).unwrap();
            self
        }

        pub(crate) fn file(&mut self, name: &str, data: &[u8]) -> &mut Tar {
            self.raw(EntryType::Regular, name, "", 0o644, data, |_| {})
        }

        pub(crate) fn file_with(
            &mut self,
            name: &str,
            mode: u32,
            data: &[u8],
            edit: impl FnOnce(&mut tar::Header),
        ) -> &mut Tar {
            self.raw(EntryType::Regular, name, "", mode, data, edit)
        }

        pub(crate) fn dir(&mut self, name: &str, mode: u32) -> &mut Tar {
            self.raw(EntryType::Directory, name, "", mode, b"", |_| {})
        }

        pub(crate) fn symlink(&mut self, name: &str, target: &str) -> &mut Tar {
            self.raw(EntryType::Symlink, name, target, 0o777, b"", |_| {})
        }

        pub(crate) fn hardlink(&mut self, name: &str, target: &str) -> &mut Tar {
            self.raw(EntryType::Link, name, target, 0o644, b"", |_| {})
        }

        pub(crate) fn node(&mut self, kind: EntryType, name: &str, mode: u32, major: u32, minor: u32) -> &mut Tar {
            self.raw(kind, name, "", mode, b"", |h| {
                h.set_device_major(major).unwrap();
                h.set_device_minor(minor).unwrap();
            })
        }

        /// A file with PAX records (xattrs, precise times).
        pub(crate) fn pax_file(&mut self, name: &str, records: &[(&str, &[u8])], data: &[u8]) -> &mut Tar {
            self.0.append_pax_extensions(records.iter().copied()).unwrap();
            self.file(name, data)
        }

        /// A file whose name is in a PAX `path` record (any length).
        pub(crate) fn pax_path_file(&mut self, name: &str, data: &[u8]) -> &mut Tar {
            self.0.append_pax_extensions([("path", name.as_bytes())]).unwrap();
            self.file("placeholder", data)
        }

        pub(crate) fn finish(&mut self) -> Vec<u8> {
            std::mem::replace(&mut self.0, tar::Builder::new(Vec::new())).into_inner().unwrap()
        }
    }

    /// A layer directory inside a sandbox directory, so escapes land in the sandbox, visibly.
    struct Sandbox {
        _dir: tempfile::TempDir,
        outside: PathBuf,
        root: PathBuf,
    }

    fn sandbox() -> Sandbox {
        let dir = tempfile::tempdir().unwrap();
        let outside = dir.path().join("outside");
        let root = dir.path().join("a/b/layer");
        fs::create_dir_all(&outside).unwrap();
        fs::create_dir_all(&root).unwrap();
        Sandbox { outside, root, _dir: dir }
    }

    fn apply(root: &Path, tar: Vec<u8>) -> Result<()> {
        unpack(&tar[..], root, &[], "sha256:test").map(|_| ())
    }

    /// Every path under `dir`, relative, sorted.
    fn tree(dir: &Path) -> Vec<String> {
        let mut out = Vec::new();
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in fs::read_dir(&d).unwrap() {
                let p = e.unwrap().path();
                out.push(p.strip_prefix(dir).unwrap().display().to_string());
                if fs::symlink_metadata(&p).unwrap().is_dir() {
                    stack.push(p);
                }
            }
        }
        out.sort();
        out
    }

    fn xattr(path: &Path, name: &str) -> Option<Vec<u8>> {
        let mut buf = vec![0u8; 256];
        let n = rfs::lgetxattr(path, name, &mut buf[..]).ok()?;
        buf.truncate(n);
        Some(buf)
    }

    #[test]
    fn cleans_paths_like_containerd() {
        let c = |s: &str| display(&clean(s.as_bytes()));
        assert_eq!(c("./a/b/"), "a/b");
        assert_eq!(c("../../etc/passwd"), "etc/passwd");
        assert_eq!(c("/abs/./x/../y"), "abs/y");
        assert_eq!(c("a/../../.."), "");
    }

    #[test]
    fn blank_numeric_fields_read_as_zero() {
        let failed = || Err(io::Error::other("not a number"));
        assert_eq!(numeric(failed(), b"\0\0 \0", "uid"), Ok(0));
        assert!(numeric(failed(), b"12x", "uid").unwrap_err().starts_with("uid: "));
        assert_eq!(numeric(Ok(7), b"7", "uid"), Ok(7));
    }

    #[test]
    fn pax_times_parse() {
        assert_eq!(pax_time("12.5").unwrap(), Timespec { tv_sec: 12, tv_nsec: 500_000_000 });
        assert_eq!(pax_time("7").unwrap(), Timespec { tv_sec: 7, tv_nsec: 0 });
        assert_eq!(pax_time("-1.25").unwrap(), Timespec { tv_sec: -2, tv_nsec: 750_000_000 });
        assert!(pax_time("1.2.3").is_err() && pax_time("").is_err() && pax_time("x").is_err());
    }

    #[test]
    fn unpacks_files_dirs_links_and_metadata() {
        let s = sandbox();
        let tar = Tar::new()
            .dir("./", 0o755)
            .dir("bin/", 0o755)
            .file_with("bin/su", 0o4755, b"#!setuid", |h| {
                h.set_uid(1000);
                h.set_gid(2000);
            })
            .dir("tmp/", 0o1777)
            .file("tmp/x", b"x")
            .symlink("bin/sh", "/bin/busybox")
            .hardlink("bin/su2", "./bin/su")
            .file("implicit/parent/file", b"deep")
            .node(EntryType::Fifo, "fifo", 0o640, 0, 0)
            .node(EntryType::Char, "null", 0o666, 1, 3)
            .pax_file(
                "precise",
                &[
                    ("mtime", b"1234.5"),
                    ("SCHILY.xattr.user.pullbox", b"yes"),
                    ("SCHILY.xattr.trusted.overlay.redirect", b"/x"),
                ],
                b"p",
            )
            .finish();
        apply(&s.root, tar).unwrap();
        let r = &s.root;

        let su = fs::metadata(r.join("bin/su")).unwrap();
        assert_eq!(fs::read(r.join("bin/su")).unwrap(), b"#!setuid");
        assert_eq!(su.mode() & 0o7777, 0o4755, "setuid kept after chown");
        assert_eq!((su.uid(), su.gid()), (1000, 2000));
        assert_eq!(su.mtime(), 1_600_000_000);
        assert_eq!(fs::metadata(r.join("bin/su2")).unwrap().ino(), su.ino(), "hard link");
        let tmp = fs::metadata(r.join("tmp")).unwrap();
        assert_eq!(tmp.mode() & 0o7777, 0o1777, "sticky bit");
        assert_eq!(tmp.mtime(), 1_600_000_000, "directory time set after its children");
        assert_eq!(fs::read_link(r.join("bin/sh")).unwrap(), Path::new("/bin/busybox"));
        assert_eq!(fs::read(r.join("implicit/parent/file")).unwrap(), b"deep");
        assert_eq!(fs::metadata(r.join("implicit")).unwrap().mode() & 0o777, 0o755);
        let fifo = fs::symlink_metadata(r.join("fifo")).unwrap();
        assert!(fifo.file_type().is_fifo());
        assert_eq!(fifo.mode() & 0o777, 0o640);
        let null = fs::symlink_metadata(r.join("null")).unwrap();
        assert!(null.file_type().is_char_device());
        assert_eq!(null.rdev(), rfs::makedev(1, 3));
        let precise = fs::metadata(r.join("precise")).unwrap();
        assert_eq!((precise.mtime(), precise.mtime_nsec()), (1234, 500_000_000));
        if let Some(v) = xattr(&r.join("precise"), "user.pullbox") {
            assert_eq!(v, b"yes");
        }
        assert_eq!(xattr(&r.join("precise"), "trusted.overlay.redirect"), None, "overlay xattrs are dropped");
    }

    #[test]
    fn converts_whiteouts_and_opaque_dirs() {
        let s = sandbox();
        let tar = Tar::new()
            .dir("etc/", 0o755)
            .file("etc/.wh.old.conf", b"")
            .dir("var/cache/", 0o755)
            .file("var/cache/.wh..wh..opq", b"")
            .file("var/cache/fresh", b"new")
            .file(".wh..wh.plnk", b"")
            .finish();
        apply(&s.root, tar).unwrap();
        let wh = fs::symlink_metadata(s.root.join("etc/old.conf")).unwrap();
        assert!(wh.file_type().is_char_device());
        assert_eq!(wh.rdev(), 0);
        assert!(!s.root.join("etc/.wh.old.conf").exists());
        assert_eq!(xattr(&s.root.join("var/cache"), "trusted.overlay.opaque").as_deref(), Some(&b"y"[..]));
        assert_eq!(fs::read(s.root.join("var/cache/fresh")).unwrap(), b"new");
        assert_eq!(tree(&s.root), ["etc", "etc/old.conf", "var", "var/cache", "var/cache/fresh"]);
    }

    #[test]
    fn entries_replace_what_was_there() {
        let s = sandbox();
        fs::create_dir_all(s.root.join("d/keep")).unwrap();
        fs::create_dir_all(s.root.join("was-dir/sub")).unwrap();
        fs::write(s.root.join("was-dir/sub/f"), b"old").unwrap();
        fs::write(s.root.join("was-file"), b"old").unwrap();
        let tar = Tar::new()
            .dir("d/", 0o750)
            .file("d/new", b"n")
            .file("was-dir", b"now a file")
            .dir("was-file/", 0o755)
            .file("twice", b"first")
            .file("twice", b"second")
            .finish();
        apply(&s.root, tar).unwrap();
        assert!(s.root.join("d/keep").is_dir(), "directories merge");
        assert_eq!(fs::metadata(s.root.join("d")).unwrap().permissions().mode() & 0o777, 0o750);
        assert_eq!(fs::read(s.root.join("was-dir")).unwrap(), b"now a file");
        assert!(s.root.join("was-file").is_dir());
        assert_eq!(fs::read(s.root.join("twice")).unwrap(), b"second");
    }

    #[test]
    fn dot_dot_and_absolute_names_stay_inside() {
        let s = sandbox();
        let tar = Tar::new()
            .file("../../../outside/escape", b"1")
            .file("/abs", b"2")
            .file("a/../../b/../../c", b"3")
            .finish();
        apply(&s.root, tar).unwrap();
        assert_eq!(tree(&s.outside), Vec::<String>::new());
        assert_eq!(fs::read(s.root.join("outside/escape")).unwrap(), b"1");
        assert_eq!(fs::read(s.root.join("abs")).unwrap(), b"2");
        assert_eq!(fs::read(s.root.join("c")).unwrap(), b"3");
        assert_eq!(
            tree(s.root.parent().unwrap()),
            ["layer", "layer/abs", "layer/c", "layer/outside", "layer/outside/escape"]
        );
    }

    #[test]
    fn never_writes_through_symlinks() {
        let s = sandbox();
        let victim = s.outside.join("victim");
        fs::write(&victim, b"original").unwrap();
        let outside = s.outside.display().to_string();

        // A file below a symlinked directory is refused.
        let tar = Tar::new().symlink("link", &outside).file("link/pwned", b"x").finish();
        let err = apply(&s.root, tar).unwrap_err();
        assert!(
            matches!(&err, Error::BadLayer { reason, .. } if reason.contains("link/pwned") && reason.contains("symbolic link")),
            "{err}"
        );
        // Relative climbing links too.
        let tar = Tar::new().symlink("up", "../../../outside").dir("up/d/", 0o755).finish();
        assert!(matches!(apply(&s.root, tar), Err(Error::BadLayer { .. })));
        // A file over a symlink replaces the symlink rather than writing through it.
        let tar = Tar::new().symlink("v", &victim.display().to_string()).file("v", b"overwritten").finish();
        apply(&s.root, tar).unwrap();
        assert_eq!(fs::read(s.root.join("v")).unwrap(), b"overwritten");
        assert!(!fs::symlink_metadata(s.root.join("v")).unwrap().is_symlink());
        // Whiteouts below a symlink are skipped (the symlink hides everything below it), never
        // followed.
        let tar = Tar::new().symlink("o", &outside).file("o/.wh..wh..opq", b"").file("o/.wh.victim", b"").finish();
        apply(&s.root, tar).unwrap();

        assert_eq!(fs::read(&victim).unwrap(), b"original");
        assert_eq!(tree(&s.outside), ["victim"]);
        assert_eq!(xattr(&s.outside, "trusted.overlay.opaque"), None);
    }

    #[test]
    fn hard_links_stay_inside_the_layer() {
        let s = sandbox();
        let passwd_links = fs::metadata("/etc/passwd").unwrap().nlink();
        let victim = s.outside.join("victim");
        fs::write(&victim, b"secret").unwrap();

        for target in ["/etc/passwd", "../../../../../../../etc/passwd"] {
            let err = apply(&s.root, Tar::new().hardlink("passwd", target).finish()).unwrap_err();
            assert!(matches!(&err, Error::BadLayer { reason, .. } if reason.contains("not in this layer")), "{err}");
        }
        // Through a symlink to the outside.
        let tar = Tar::new().symlink("out", &s.outside.display().to_string()).hardlink("h", "out/victim").finish();
        assert!(matches!(apply(&s.root, tar), Err(Error::BadLayer { .. })));
        // To a symlink in the layer: links the symlink itself, not its target.
        let tar = Tar::new().symlink("s", &victim.display().to_string()).hardlink("h2", "s").finish();
        apply(&s.root, tar).unwrap();
        assert!(fs::symlink_metadata(s.root.join("h2")).unwrap().is_symlink());

        assert_eq!(fs::metadata("/etc/passwd").unwrap().nlink(), passwd_links);
        assert_eq!(fs::metadata(&victim).unwrap().nlink(), 1);
        assert!(!s.root.join("passwd").exists() && !s.root.join("h").exists());
    }

    #[test]
    fn whiteouts_below_what_replaced_a_directory_are_skipped() {
        let s = sandbox();
        // umoci's way of turning a directory into a file: the file, then whiteouts of the
        // directory's old children.
        let tar = Tar::new()
            .file("opt/was-dir", b"now a file")
            .file("opt/was-dir/.wh.child", b"")
            .symlink("lib", "usr/lib")
            .file("lib/.wh.old", b"")
            .file("lib/.wh..wh..opq", b"")
            .finish();
        apply(&s.root, tar).unwrap();
        assert_eq!(fs::read(s.root.join("opt/was-dir")).unwrap(), b"now a file");
        assert!(fs::symlink_metadata(s.root.join("lib")).unwrap().is_symlink());
        assert_eq!(tree(&s.root), ["lib", "opt", "opt/was-dir"]);
    }

    #[test]
    fn created_parents_take_their_metadata_from_the_layers_below() {
        let s = sandbox();
        let (lower, lowest) = (s.outside.join("lower"), s.outside.join("lowest"));
        fs::create_dir_all(lower.join("etc")).unwrap();
        fs::create_dir_all(lowest.join("srv/data")).unwrap();
        fs::create_dir_all(lowest.join("etc")).unwrap();
        fs::create_dir_all(lowest.join("gone")).unwrap();
        fs::write(lower.join("gone"), b"a file hides the directory below").unwrap();
        let perm = |p: &Path, mode| fs::set_permissions(p, fs::Permissions::from_mode(mode)).unwrap();
        perm(&lower.join("etc"), 0o750);
        perm(&lowest.join("etc"), 0o700);
        perm(&lowest.join("srv"), 0o711);
        perm(&lowest.join("srv/data"), 0o1770);
        let tar = Tar::new()
            .file("etc/new", b"n")
            .file("srv/data/new", b"n")
            .file("gone/new", b"n")
            .file("fresh/new", b"n")
            .finish();
        unpack(&tar[..], &s.root, &[lower.clone(), lowest.clone()], "sha256:test").unwrap();
        let mode = |p: &str| fs::metadata(s.root.join(p)).unwrap().mode() & 0o7777;
        assert_eq!(mode("etc"), 0o750, "the nearest lower layer wins");
        assert_eq!((mode("srv"), mode("srv/data")), (0o711, 0o1770));
        assert_eq!(mode("gone"), 0o755, "a file in a lower layer hides the directory below it");
        assert_eq!(mode("fresh"), 0o755);
        let lower_mtime = fs::metadata(lowest.join("srv/data")).unwrap().mtime();
        assert_eq!(fs::metadata(s.root.join("srv/data")).unwrap().mtime(), lower_mtime);
    }

    #[test]
    fn a_layer_unpacked_before_its_lowers_exist_ends_up_the_same() {
        let s = sandbox();
        let lower = s.outside.join("lower");
        fs::create_dir_all(lower.join("srv/data")).unwrap();
        fs::create_dir_all(lower.join("opt")).unwrap();
        let perm = |p: &Path, mode| fs::set_permissions(p, fs::Permissions::from_mode(mode)).unwrap();
        perm(&lower.join("srv"), 0o711);
        perm(&lower.join("srv/data"), 0o1770);
        perm(&lower.join("opt"), 0o700);
        // `opt` is created as a parent, then listed (0750): the listing wins.
        let tar = Tar::new()
            .file("srv/data/new", b"n")
            .file("opt/x", b"x")
            .dir("opt/", 0o750)
            .file("fresh/new", b"n")
            .finish();
        let direct = s.outside.join("direct");
        fs::create_dir_all(&direct).unwrap();
        unpack(&tar[..], &direct, std::slice::from_ref(&lower), "sha256:test").unwrap();

        let (_, created) = unpack_staged(&tar[..], &s.root, "sha256:test").unwrap();
        let mode = |root: &Path, p: &str| fs::metadata(root.join(p)).unwrap().mode() & 0o7777;
        assert_eq!(mode(&s.root, "srv/data"), 0o755, "defaults until the lowers are known");
        inherit_parents(&s.root, std::slice::from_ref(&lower), &created, "sha256:test").unwrap();
        assert_eq!(tree(&s.root), tree(&direct));
        for p in ["srv", "srv/data", "opt", "fresh"] {
            assert_eq!(mode(&s.root, p), mode(&direct, p), "{p}");
        }
        assert_eq!((mode(&s.root, "srv/data"), mode(&s.root, "opt")), (0o1770, 0o750));
        let mtime = |root: &Path, p: &str| fs::metadata(root.join(p)).unwrap().mtime();
        assert_eq!(mtime(&s.root, "srv/data"), mtime(&lower, "srv/data"));
    }

    #[test]
    fn corrupt_archives_are_bad_layers() {
        let s = sandbox();
        let mut tar = Tar::new().file("f", &[1u8; 2000]).finish();
        tar.truncate(1200);
        let err = apply(&s.root, tar).unwrap_err();
        assert!(matches!(&err, Error::BadLayer { layer, .. } if layer == "sha256:test"), "{err}");
    }

    #[test]
    fn oversized_extension_headers_are_refused_naming_the_limit() {
        use crate::backend::embedded::archive::{
            tests::{header, huge},
            MAX_SPECIAL,
        };
        let s = sandbox();
        // A 1 GiB long name, streamed: refused before it is read.
        let bomb = huge(header(EntryType::GNULongName, b"././@LongLink", 1 << 30), b'a', 1 << 30);
        let err = unpack(bomb, &s.root, &[], "sha256:test").err().unwrap();
        let limit = MAX_SPECIAL.to_string();
        assert!(
            matches!(&err, Error::BadLayer { reason, .. } if reason.contains("GNU long name") && reason.contains(&limit)),
            "{err}"
        );
        let bomb = huge(header(EntryType::XHeader, b"PaxHeaders/x", 1 << 30), b'1', 1 << 30);
        let err = unpack(bomb, &s.root, &[], "sha256:test").err().unwrap();
        assert!(matches!(&err, Error::BadLayer { reason, .. } if reason.contains("PAX extended header")), "{err}");
        assert_eq!(tree(&s.root), Vec::<String>::new());
    }

    #[test]
    fn paths_too_long_or_too_deep_are_refused() {
        let s = sandbox();
        let deep = "d/".repeat(MAX_DEPTH + 1);
        let long = format!("{}/f", "n".repeat(200)).repeat(25);
        for (name, why) in [(deep.as_str(), "components"), (long.as_str(), "PATH_MAX")] {
            let err = apply(&s.root, Tar::new().pax_path_file(name, b"x").finish()).unwrap_err();
            assert!(matches!(&err, Error::BadLayer { reason, .. } if reason.contains(why)), "{err}");
            assert!(err.to_string().len() < 1024, "the name is cut in messages: {err}");
        }
        // Just under both limits: fine.
        let ok = format!("{}f", "d/".repeat(MAX_DEPTH - 1));
        apply(&s.root, Tar::new().pax_path_file(&ok, b"x").finish()).unwrap();
        // A hard link to a path over the limits is refused too.
        let mut t = Tar::new();
        t.0.append_pax_extensions([("linkpath", "x/".repeat(MAX_DEPTH + 1).as_bytes())]).unwrap();
        let tar = t.hardlink("h", "").finish();
        assert!(
            matches!(apply(&s.root, tar), Err(Error::BadLayer { reason, .. }) if reason.contains("hard link target"))
        );
    }

    #[test]
    fn sparse_files_stay_sparse() {
        use crate::backend::embedded::archive::tests::sparse_member;
        let s = sandbox();
        let real = 4u64 << 30;
        let mut tar = sparse_member(b"sparse", real, &[(0, b"head"), (1 << 20, b"middle"), (real - 1, b"z")]);
        tar.extend_from_slice(&Tar::new().file("after", b"after").finish());
        apply(&s.root, tar).unwrap();
        let meta = fs::metadata(s.root.join("sparse")).unwrap();
        assert_eq!(meta.len(), real);
        assert!(meta.blocks() * 512 < 1 << 20, "{} bytes allocated", meta.blocks() * 512);
        let file = File::open(s.root.join("sparse")).unwrap();
        let at = |offset, len| {
            let mut buf = vec![0; len];
            file.read_exact_at(&mut buf, offset).unwrap();
            buf
        };
        assert_eq!(at(0, 6), b"head\0\0");
        assert_eq!(at((1 << 20) - 1, 8), b"\0middle\0");
        assert_eq!(at(real - 2, 2), b"\0z");
        assert_eq!(fs::read(s.root.join("after")).unwrap(), b"after");
    }

    #[test]
    fn the_size_cap_is_resource_exhaustion() {
        use crate::{backend::embedded::pipeline::layer_stream, oci::Compression};
        let s = sandbox();
        let tar = Tar::new().file("small", b"ok").file("big", &[7u8; 64 * 1024]).finish();
        let digest = crate::oci::Digest::sha256_of(&tar);
        let stream = layer_stream(io::Cursor::new(tar.clone()), Compression::None, &digest, 8192).unwrap();
        let err = unpack(stream, &s.root, &[], "sha256:test").err().unwrap();
        assert!(
            matches!(&err, Error::ResourceExhausted(m) if m.contains("big") && m.contains("8192") && m.contains("max_layer_bytes")),
            "{err}"
        );
        assert_eq!(err.code(), crate::error::Code::ResourceExhausted);
        let stream = layer_stream(io::Cursor::new(tar.clone()), Compression::None, &digest, tar.len() as u64).unwrap();
        unpack(stream, &s.root, &[], "sha256:test").unwrap();
    }

    #[test]
    fn node_modes_never_follow_symlinks() {
        let s = sandbox();
        let victim = s.outside.join("victim");
        fs::write(&victim, b"v").unwrap();
        fs::set_permissions(&victim, fs::Permissions::from_mode(0o600)).unwrap();
        std::os::unix::fs::symlink(&victim, s.root.join("link")).unwrap();
        let root = open_root(&s.root).unwrap();
        assert_eq!(chmod_node(root.as_fd(), OsStr::new("link"), Mode::from_raw_mode(0o777)), Err(Errno::LOOP));
        assert_eq!(fs::metadata(&victim).unwrap().mode() & 0o777, 0o600);
        // A FIFO gets its whole mode, whatever the umask.
        let tar = Tar::new().node(EntryType::Fifo, "fifo", 0o666, 0, 0).finish();
        apply(&s.root, tar).unwrap();
        assert_eq!(fs::symlink_metadata(s.root.join("fifo")).unwrap().mode() & 0o777, 0o666);
    }

    #[test]
    fn deep_implicit_parents_cost_linear_memory_and_time() {
        // Entries each under their own chain of 1000 directories the archive never lists (the
        // time is mostly the filesystem's: mkdir, and deleting the tree afterwards).
        let s = sandbox();
        let lower = s.outside.join("lower");
        fs::create_dir_all(lower.join("c0")).unwrap();
        let mut tar = Tar::new();
        for i in 0..3 {
            tar.pax_path_file(&format!("c{i}/{}f", "d/".repeat(1000)), b"x");
        }
        let tar = tar.finish();
        let started = std::time::Instant::now();
        unpack(&tar[..], &s.root, std::slice::from_ref(&lower), "sha256:test").unwrap();
        let staged = s.outside.join("staged");
        fs::create_dir_all(&staged).unwrap();
        let (_, created) = unpack_staged(&tar[..], &staged, "sha256:test").unwrap();
        assert_eq!(created.0.valued().count(), 3 * 1001);
        inherit_parents(&staged, std::slice::from_ref(&lower), &created, "sha256:test").unwrap();
        assert!(started.elapsed() < std::time::Duration::from_secs(20), "{:?}", started.elapsed());
        assert!(s.root.join(format!("c2/{}f", "d/".repeat(1000))).exists());
        assert!(staged.join(format!("c2/{}f", "d/".repeat(1000))).exists());
    }
}
