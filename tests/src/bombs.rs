//! Layer bombs: hostile layers whose uncompressed form is huge (a 1 GiB long name, a 1 GiB PAX
//! header, a file of zeros larger than the disk) or pathological (a 20,000-level path, a
//! sparse file of 4 GiB), made cheaply.
//!
//! Key items: [`Bomb`] builds a gzip layer from parts, where a [`Part::Repeat`] of any size
//! costs one compressed megabyte-member repeated (gzip streams may be concatenated, and
//! pullbox's and Go's readers both read every member), so a 1 GiB layer is a 1 MiB blob made
//! in milliseconds and never held uncompressed; its diff ID is hashed as it is made.
//! [`long_name`], [`pax_record`], [`deep_path`], [`sparse_file`], [`zeros`]: the layers of the
//! store suite's bomb tests. [`deep_tree`] makes a directory chain deeper than `PATH_MAX`
//! allows to name, as a container may make one in its writable layer.

use std::io::Write;
use std::path::Path;
use std::process::Command;

use anyhow::{ensure, Result};
use sha2::{Digest, Sha256};
use tar::{EntryType, Header};

use crate::hostile::GzipLayer;

/// The uncompressed size of one repeated member.
const CHUNK: usize = 1 << 20;

/// A piece of a layer's uncompressed stream.
pub enum Part {
    Bytes(Vec<u8>),
    /// `count` bytes of `byte` (a whole number of MiB).
    Repeat(u8, u64),
}

/// A gzip layer made of [`Part`]s.
#[derive(Default)]
pub struct Bomb {
    gz: Vec<u8>,
    hash: Sha256,
    size: u64,
}

fn gzip_member(data: &[u8]) -> Result<Vec<u8>> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    e.write_all(data)?;
    Ok(e.finish()?)
}

impl Bomb {
    pub fn new() -> Bomb {
        Bomb::default()
    }

    pub fn part(mut self, part: Part) -> Result<Bomb> {
        match part {
            Part::Bytes(bytes) => {
                self.gz.extend(gzip_member(&bytes)?);
                self.hash.update(&bytes);
                self.size += bytes.len() as u64;
            }
            Part::Repeat(byte, count) => {
                ensure!(count % CHUNK as u64 == 0, "repeat a whole number of MiB");
                let chunk = vec![byte; CHUNK];
                let member = gzip_member(&chunk)?;
                for _ in 0..count / CHUNK as u64 {
                    self.gz.extend_from_slice(&member);
                    self.hash.update(&chunk);
                }
                self.size += count;
            }
        }
        Ok(self)
    }

    /// The layer (with the archive's end marker appended).
    pub fn finish(self) -> Result<GzipLayer> {
        let bomb = self.part(Part::Bytes(vec![0; 1024]))?;
        Ok(GzipLayer { gz: bomb.gz, diff_id: format!("sha256:{}", hex::encode(bomb.hash.finalize())) })
    }

    /// Bytes of uncompressed stream so far.
    pub fn size(&self) -> u64 {
        self.size
    }
}

/// A header block of `kind` for `name` with `size` bytes of data.
pub fn header(kind: EntryType, name: &str, size: u64) -> Header {
    let mut h = Header::new_gnu();
    h.set_entry_type(kind);
    h.as_gnu_mut().unwrap().name[..name.len()].copy_from_slice(name.as_bytes());
    h.set_size(size);
    h.set_mode(0o644);
    h.set_mtime(1_700_000_000);
    h.set_uid(0);
    h.set_gid(0);
    h.set_cksum();
    h
}

/// A regular file `name` holding `data`, padded.
pub fn file(name: &str, data: &[u8]) -> Vec<u8> {
    let mut out = header(EntryType::Regular, name, data.len() as u64).as_bytes().to_vec();
    out.extend_from_slice(data);
    out.resize(out.len().next_multiple_of(512), 0);
    out
}

/// A GNU long name (`L`) of `size` bytes, then a file.
pub fn long_name(size: u64) -> Result<GzipLayer> {
    Bomb::new()
        .part(Part::Bytes(header(EntryType::GNULongName, "././@LongLink", size).as_bytes().to_vec()))?
        .part(Part::Repeat(b'n', size))?
        .part(Part::Bytes(file("after-the-name", b"x")))?
        .finish()
}

/// A PAX extended header of `size` bytes holding one `path` record, then a file.
pub fn pax_record(size: u64) -> Result<GzipLayer> {
    let prefix = format!("{size} path=");
    ensure!(size % CHUNK as u64 == 0);
    let mut first = prefix.into_bytes();
    first.resize(CHUNK, b'p');
    *first.last_mut().unwrap() = b'/';
    Bomb::new()
        .part(Part::Bytes(header(EntryType::XHeader, "PaxHeaders/bomb", size).as_bytes().to_vec()))?
        .part(Part::Bytes(first))?
        .part(Part::Repeat(b'p', size - CHUNK as u64))?
        .part(Part::Bytes(file("after-the-record", b"x")))?
        .finish()
}

/// A regular file below `levels` directories, named in a PAX `path` record.
pub fn deep_path(levels: usize) -> Result<GzipLayer> {
    let mut tar = tar::Builder::new(Vec::new());
    let path = format!("{}deep-file", "d/".repeat(levels));
    tar.append_pax_extensions([("path", path.as_bytes())])?;
    let mut data = tar.into_inner()?;
    // Without the end-of-archive blocks `into_inner` wrote.
    data.truncate(data.len() - 1024);
    data.extend(file("placeholder", b"deep"));
    Bomb::new().part(Part::Bytes(data))?.finish()
}

/// An old-GNU sparse file `name` of `real_size` bytes storing one byte, `x`, at its end.
pub fn sparse_file(name: &str, real_size: u64) -> Result<GzipLayer> {
    let mut h = header(EntryType::GNUSparse, name, 1);
    let gnu = h.as_gnu_mut().unwrap();
    gnu.set_real_size(real_size);
    gnu.sparse[0].set_offset(real_size - 1);
    gnu.sparse[0].set_length(1);
    h.set_cksum();
    let mut data = h.as_bytes().to_vec();
    data.push(b'x');
    data.resize(1024, 0);
    data.extend(file("beside-the-sparse-file", b"ok"));
    Bomb::new().part(Part::Bytes(data))?.finish()
}

/// A regular file `name` of `size` zero bytes (a whole number of MiB).
pub fn zeros(name: &str, size: u64) -> Result<GzipLayer> {
    Bomb::new()
        .part(Part::Bytes(header(EntryType::Regular, name, size).as_bytes().to_vec()))?
        .part(Part::Repeat(0, size))?
        .finish()
}

/// Makes a chain of `levels` directories named `d` under `dir` (deeper than `PATH_MAX` can
/// name: `mkdir -p` walks it with relative paths).
pub fn deep_tree(dir: &Path, levels: usize) -> Result<()> {
    let chain = "d/".repeat(levels);
    let out = Command::new("mkdir").arg("-p").arg(&chain).current_dir(dir).output()?;
    ensure!(out.status.success(), "mkdir -p of {levels} levels: {}", String::from_utf8_lossy(&out.stderr));
    Ok(())
}
