//! A tar reader that bounds what a hostile archive can make the host hold in memory.
//!
//! The `tar` crate reads GNU long names (`L`), long link names (`K`) and PAX extended headers
//! (`x`) into memory whole, whatever size their header announces: a 1 MiB gzip layer can carry
//! a 1 GiB "name" and take the daemon to gigabytes of memory before any check sees it. This
//! reader walks the archive itself, block by block, and uses the `tar` crate only to decode the
//! fields of each 512-byte header ([`tar::Header`], [`tar::GnuExtSparseHeader`],
//! [`tar::PaxExtensions`]). Its [`Archive::next_entry`] returns an [`Entry`] (the header with
//! its long names, PAX records and sparse map folded in); the entry's data is then read with
//! [`Archive::read_data`], or skipped by the next call.
//!
//! Limits, as Go's `archive/tar` (containerd's reader) sets them:
//!
//! - [`MAX_SPECIAL`] (1 MiB): a long name, a long link name, a PAX extended header (local or
//!   global) and the extension blocks of an old-GNU sparse map are each refused when larger,
//!   before a byte of them is buffered. Real names stop at `PATH_MAX` (4 KiB) and real PAX
//!   headers hold a few records, so nothing real comes near it.
//!
//! What is read: the ustar, GNU and PAX formats; old-GNU sparse files (type `S`, their map in
//! the header and its extension blocks), whose holes [`Entry::sparse`] describes so that the
//! unpacker never writes them. PAX records override the header's path, link path and size, as
//! in Go; the `uid`, `gid`, time and `SCHILY.xattr.*` records are left to the caller
//! ([`Entry::pax`]). The archive ends at its first zero block (or at the end of the stream on a
//! header boundary); [`Archive::into_inner`] hands back the stream positioned after that block.

use std::io::{self, Read};

use tar::{EntryType, GnuExtSparseHeader, GnuSparseHeader, Header, PaxExtensions};

/// The largest long name, long link name, PAX extended header or old-GNU sparse map accepted
/// (Go's `archive/tar` `maxSpecialFileSize`).
pub(crate) const MAX_SPECIAL: u64 = 1 << 20;

/// The size of a tar block.
const BLOCK: u64 = 512;

/// Why an archive cannot be read.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ArchiveError {
    /// The stream under the archive failed (decompression, a download, a size limit).
    #[error("reading the archive at byte {offset}")]
    Read {
        offset: u64,
        #[source]
        source: io::Error,
    },
    /// The archive is not a valid tar stream.
    #[error("malformed archive at byte {offset}: {reason}")]
    Malformed { offset: u64, reason: String },
    /// A header record is larger than [`MAX_SPECIAL`].
    #[error("{what} of {size} bytes at byte {offset} exceeds the limit of {limit} bytes")]
    TooLarge { what: &'static str, offset: u64, size: u64, limit: u64 },
}

/// The stored data of an old-GNU sparse file: `blocks` of (offset in the file, length), in
/// order, whose lengths add up to the stored size; everything else up to `real_size` is a hole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Sparse {
    pub(crate) real_size: u64,
    pub(crate) blocks: Vec<(u64, u64)>,
}

/// One member of the archive, with what the extension headers before it said about it.
pub(crate) struct Entry {
    /// The member's own header.
    pub(crate) header: Header,
    /// Its name: PAX `path`, else the GNU long name, else the header's (ustar prefix included).
    pub(crate) path: Vec<u8>,
    /// Its link target: PAX `linkpath`, else the GNU long link name, else the header's.
    pub(crate) link: Option<Vec<u8>>,
    /// The raw PAX records that apply to it (validated), for [`PaxExtensions`].
    pub(crate) pax: Option<Vec<u8>>,
    /// Bytes of data stored in the archive (PAX `size` overrides the header's).
    pub(crate) size: u64,
    /// For an old-GNU sparse file: where its stored bytes go.
    pub(crate) sparse: Option<Sparse>,
}

impl Entry {
    pub(crate) fn entry_type(&self) -> EntryType {
        self.header.entry_type()
    }

    /// The PAX records, if any (already validated by the reader).
    pub(crate) fn pax_records(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.pax
            .iter()
            .flat_map(|p| PaxExtensions::new(p).filter_map(Result::ok))
            .map(|r| (r.key_bytes(), r.value_bytes()))
    }
}

/// A tar stream read member by member.
pub(crate) struct Archive<R> {
    inner: R,
    /// Bytes consumed from `inner`.
    offset: u64,
    /// Data bytes of the current member not read yet, and the padding after them.
    left: u64,
    pad: u64,
    ended: bool,
}

impl<R: Read> Archive<R> {
    pub(crate) fn new(inner: R) -> Archive<R> {
        Archive { inner, offset: 0, left: 0, pad: 0, ended: false }
    }

    /// The stream after the archive's end marker.
    pub(crate) fn into_inner(self) -> R {
        self.inner
    }

    /// Where in the stream the reader is.
    #[cfg(test)]
    pub(crate) fn offset(&self) -> u64 {
        self.offset
    }

    /// Reads the current member's data; 0 at its end.
    pub(crate) fn read_data(&mut self, buf: &mut [u8]) -> Result<usize, ArchiveError> {
        if self.left == 0 || buf.is_empty() {
            return Ok(0);
        }
        let want = buf.len().min(usize::try_from(self.left).unwrap_or(usize::MAX));
        let n = loop {
            match self.inner.read(&mut buf[..want]) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(self.read_error(e)),
            }
        };
        if n == 0 {
            return Err(self.malformed("the archive ends inside a member's data"));
        }
        self.offset += n as u64;
        self.left -= n as u64;
        Ok(n)
    }

    /// The next member, after skipping what is left of the current one; `None` at the end.
    pub(crate) fn next_entry(&mut self) -> Result<Option<Entry>, ArchiveError> {
        if self.ended {
            return Ok(None);
        }
        self.skip(self.left + self.pad)?;
        (self.left, self.pad) = (0, 0);
        let mut long_name: Option<Vec<u8>> = None;
        let mut long_link: Option<Vec<u8>> = None;
        let mut pax: Option<Vec<u8>> = None;
        loop {
            let start = self.offset;
            let Some(header) = self.read_header()? else {
                self.ended = true;
                if long_name.is_some() || long_link.is_some() || pax.is_some() {
                    return Err(self.malformed("extension headers without the member they describe"));
                }
                return Ok(None);
            };
            let kind = header.entry_type();
            let stored = header.entry_size().map_err(|e| self.malformed(format!("header size: {e}")))?;
            let special = |what| (kind, what);
            let what = match kind {
                EntryType::GNULongName => Some(special("GNU long name")),
                EntryType::GNULongLink => Some(special("GNU long link name")),
                EntryType::XHeader => Some(special("PAX extended header")),
                EntryType::XGlobalHeader => Some(special("PAX global header")),
                _ => None,
            };
            if let Some((kind, what)) = what {
                let bytes = self.read_special(what, start, stored)?;
                let slot = match kind {
                    EntryType::GNULongName => &mut long_name,
                    EntryType::GNULongLink => &mut long_link,
                    EntryType::XHeader => {
                        validate_pax(&bytes).map_err(|reason| self.malformed(reason))?;
                        &mut pax
                    }
                    // Global records apply to the whole archive; like containerd, nothing
                    // here uses them.
                    _ => continue,
                };
                if slot.is_some() {
                    return Err(self.malformed(format!("two {what}s for one member")));
                }
                *slot = Some(bytes);
                continue;
            }

            let record = |key: &[u8]| -> Option<&[u8]> {
                pax.as_deref().and_then(|p| {
                    PaxExtensions::new(p)
                        .filter_map(Result::ok)
                        .filter(|r| r.key_bytes() == key)
                        .last()
                        .map(|r| r.value_bytes())
                })
            };
            let path = match (record(b"path"), &long_name) {
                (Some(p), _) => p.to_vec(),
                (None, Some(name)) => until_nul(name).to_vec(),
                (None, None) => header.path_bytes().into_owned(),
            };
            let link = match (record(b"linkpath"), &long_link) {
                (Some(p), _) => Some(p.to_vec()),
                (None, Some(name)) => Some(until_nul(name).to_vec()),
                (None, None) => header.link_name_bytes().map(|l| l.into_owned()),
            };
            let size = match record(b"size") {
                Some(v) => std::str::from_utf8(v)
                    .ok()
                    .and_then(|v| v.parse::<u64>().ok())
                    .ok_or_else(|| self.malformed("PAX size record is not a number"))?,
                None => stored,
            };
            let sparse =
                if kind == EntryType::GNUSparse { Some(self.read_sparse_map(&header, start, size)?) } else { None };
            self.left = size;
            self.pad = padding(size);
            return Ok(Some(Entry { header, path, link, pax, size, sparse }));
        }
    }

    /// Reads one header block; `None` at the end of the archive.
    fn read_header(&mut self) -> Result<Option<Header>, ArchiveError> {
        let mut header = Header::new_old();
        let n = self.read_block(header.as_mut_bytes())?;
        if n == 0 {
            return Ok(None);
        }
        if n < BLOCK as usize {
            return Err(self.malformed("the archive ends inside a header"));
        }
        let bytes = header.as_bytes();
        if bytes.iter().all(|&b| b == 0) {
            return Ok(None);
        }
        let sum: u32 =
            bytes[..148].iter().chain(&bytes[156..]).map(|&b| u32::from(b)).sum::<u32>() + 8 * u32::from(b' ');
        match header.cksum() {
            Ok(cksum) if cksum == sum => Ok(Some(header)),
            _ => Err(self.malformed("header checksum mismatch")),
        }
    }

    /// Reads a whole block into `buf` (512 bytes); returns how many bytes there were (fewer
    /// only at the end of the stream).
    fn read_block(&mut self, buf: &mut [u8]) -> Result<usize, ArchiveError> {
        let mut n = 0;
        while n < buf.len() {
            match self.inner.read(&mut buf[n..]) {
                Ok(0) => break,
                Ok(m) => n += m,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.read_error(e)),
            }
        }
        self.offset += n as u64;
        Ok(n)
    }

    /// Reads the data of an extension header of `size` bytes, refusing it over [`MAX_SPECIAL`]
    /// before reading it.
    fn read_special(&mut self, what: &'static str, start: u64, size: u64) -> Result<Vec<u8>, ArchiveError> {
        if size > MAX_SPECIAL {
            return Err(ArchiveError::TooLarge { what, offset: start, size, limit: MAX_SPECIAL });
        }
        let mut bytes = vec![0; size as usize];
        let mut n = 0;
        while n < bytes.len() {
            match self.inner.read(&mut bytes[n..]) {
                Ok(0) => return Err(self.malformed(format!("the archive ends inside a {what}"))),
                Ok(m) => {
                    n += m;
                    self.offset += m as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.read_error(e)),
            }
        }
        self.skip(padding(size))?;
        Ok(bytes)
    }

    /// The sparse map of an old-GNU sparse member: four slots in its header, then extension
    /// blocks while the last one says more follow (at most [`MAX_SPECIAL`] of them).
    fn read_sparse_map(&mut self, header: &Header, start: u64, stored: u64) -> Result<Sparse, ArchiveError> {
        let gnu = header.as_gnu().ok_or_else(|| self.malformed("a sparse member without a GNU header"))?;
        let real_size = gnu.real_size().map_err(|e| self.malformed(format!("sparse real size: {e}")))?;
        let mut blocks = Vec::new();
        let mut add = |slot: &GnuSparseHeader, this: &Self| -> Result<(), ArchiveError> {
            if slot.is_empty() {
                return Ok(());
            }
            let bad = |e: io::Error| this.malformed(format!("sparse map: {e}"));
            blocks.push((slot.offset().map_err(bad)?, slot.length().map_err(bad)?));
            Ok(())
        };
        for slot in &gnu.sparse {
            add(slot, self)?;
        }
        let mut extended = gnu.is_extended();
        let mut map_bytes = 0u64;
        while extended {
            map_bytes += BLOCK;
            if map_bytes > MAX_SPECIAL {
                return Err(ArchiveError::TooLarge {
                    what: "old-GNU sparse map",
                    offset: start,
                    size: map_bytes,
                    limit: MAX_SPECIAL,
                });
            }
            let mut ext = GnuExtSparseHeader::new();
            if self.read_block(ext.as_mut_bytes())? < BLOCK as usize {
                return Err(self.malformed("the archive ends inside a sparse map"));
            }
            for slot in ext.sparse() {
                add(slot, self)?;
            }
            extended = ext.is_extended();
        }
        let sparse = Sparse { real_size, blocks };
        validate_sparse(&sparse, stored).map_err(|reason| self.malformed(format!("sparse map: {reason}")))?;
        Ok(sparse)
    }

    /// Reads and drops `n` bytes.
    fn skip(&mut self, n: u64) -> Result<(), ArchiveError> {
        let copied = io::copy(&mut (&mut self.inner).take(n), &mut io::sink()).map_err(|e| self.read_error(e))?;
        self.offset += copied;
        if copied < n {
            return Err(self.malformed("the archive ends inside a member"));
        }
        Ok(())
    }

    fn malformed(&self, reason: impl Into<String>) -> ArchiveError {
        ArchiveError::Malformed { offset: self.offset, reason: reason.into() }
    }

    fn read_error(&self, source: io::Error) -> ArchiveError {
        ArchiveError::Read { offset: self.offset, source }
    }
}

/// The padding after `size` bytes of data, up to the next block.
fn padding(size: u64) -> u64 {
    (BLOCK - size % BLOCK) % BLOCK
}

/// A GNU long name or link name ends at its first NUL, as Go reads it.
fn until_nul(bytes: &[u8]) -> &[u8] {
    bytes.iter().position(|&b| b == 0).map_or(bytes, |end| &bytes[..end])
}

/// Every record of a PAX header must parse.
fn validate_pax(bytes: &[u8]) -> Result<(), String> {
    for record in PaxExtensions::new(bytes) {
        record.map_err(|e| format!("PAX extended header: {e}"))?;
    }
    Ok(())
}

/// A sparse map's blocks are in order, do not overlap, end within the real size, and hold
/// exactly the stored bytes.
fn validate_sparse(sparse: &Sparse, stored: u64) -> Result<(), String> {
    let mut end = 0u64;
    let mut total = 0u64;
    for &(offset, length) in &sparse.blocks {
        if offset < end {
            return Err("blocks out of order or overlapping".into());
        }
        end = offset.checked_add(length).ok_or("a block ends past 2^64")?;
        total = total.checked_add(length).ok_or("more data than 2^64 bytes")?;
    }
    if end > sparse.real_size {
        return Err(format!("a block ends at {end}, past the file's size {}", sparse.real_size));
    }
    if total != stored {
        return Err(format!("the blocks hold {total} bytes, the archive stores {stored}"));
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A header block of `kind` for `name` with `size` bytes of data, checksummed.
    pub(crate) fn header(kind: EntryType, name: &[u8], size: u64) -> Header {
        let mut h = Header::new_gnu();
        h.set_entry_type(kind);
        h.as_gnu_mut().unwrap().name[..name.len()].copy_from_slice(name);
        h.set_size(size);
        h.set_mode(0o644);
        h.set_mtime(0);
        h.set_cksum();
        h
    }

    /// A reader that yields `header`, then `n` bytes of `fill`, without holding them.
    pub(crate) fn huge(header: Header, fill: u8, n: u64) -> impl Read {
        io::Cursor::new(header.as_bytes().to_vec()).chain(io::repeat(fill).take(n))
    }

    #[test]
    fn refuses_oversized_extension_headers_without_reading_them() {
        for (kind, what) in [
            (EntryType::GNULongName, "GNU long name"),
            (EntryType::GNULongLink, "GNU long link name"),
            (EntryType::XHeader, "PAX extended header"),
            (EntryType::XGlobalHeader, "PAX global header"),
        ] {
            // 1 TiB announced: refused at once, nothing buffered.
            let mut archive = Archive::new(huge(header(kind, b"././@LongLink", 1 << 40), b'a', 1 << 40));
            match archive.next_entry() {
                Err(ArchiveError::TooLarge { what: w, size, limit, .. }) => {
                    assert_eq!((w, size, limit), (what, 1 << 40, MAX_SPECIAL))
                }
                other => panic!("{what}: {:?}", other.map(|e| e.map(|e| e.path))),
            }
            assert_eq!(archive.offset(), BLOCK, "{what}: only the header was read");
        }
        // Exactly at the limit is fine.
        let mut name = vec![b'n'; MAX_SPECIAL as usize];
        name[MAX_SPECIAL as usize - 1] = 0;
        let mut tar = header(EntryType::GNULongName, b"././@LongLink", MAX_SPECIAL).as_bytes().to_vec();
        tar.extend_from_slice(&name);
        tar.extend_from_slice(header(EntryType::Regular, b"short", 0).as_bytes());
        tar.extend_from_slice(&[0; 1024]);
        let mut archive = Archive::new(&tar[..]);
        let entry = archive.next_entry().unwrap().unwrap();
        assert_eq!(entry.path.len(), MAX_SPECIAL as usize - 1);
        assert!(archive.next_entry().unwrap().is_none());
    }

    #[test]
    fn folds_long_names_and_pax_records_into_the_entry() {
        let mut b = tar::Builder::new(Vec::new());
        b.append_pax_extensions([("path", &b"pax/name"[..]), ("size", b"3"), ("uid", b"7")]).unwrap();
        let mut h = header(EntryType::Regular, b"header-name", 0);
        h.set_cksum();
        b.append(&h, &b"abc"[..]).unwrap();
        let mut h = header(EntryType::Symlink, b"", 0);
        b.append_link(&mut h, "l".repeat(300), "t".repeat(200)).unwrap();
        let tar = b.into_inner().unwrap();
        let mut archive = Archive::new(&tar[..]);
        let e = archive.next_entry().unwrap().unwrap();
        assert_eq!((e.path.as_slice(), e.size), (&b"pax/name"[..], 3));
        assert!(e.pax_records().any(|(k, v)| k == b"uid" && v == b"7"));
        let mut data = [0; 8];
        assert_eq!(archive.read_data(&mut data).unwrap(), 3);
        assert_eq!(&data[..3], b"abc");
        let e = archive.next_entry().unwrap().unwrap();
        assert_eq!((e.path, e.link), ("l".repeat(300).into_bytes(), Some("t".repeat(200).into_bytes())));
        assert!(archive.next_entry().unwrap().is_none());
    }

    /// An old-GNU sparse member of `real_size` bytes whose data blocks are `blocks`.
    pub(crate) fn sparse_member(name: &[u8], real_size: u64, blocks: &[(u64, &[u8])]) -> Vec<u8> {
        let stored: u64 = blocks.iter().map(|(_, d)| d.len() as u64).sum();
        let mut h = header(EntryType::GNUSparse, name, stored);
        let gnu = h.as_gnu_mut().unwrap();
        gnu.set_real_size(real_size);
        for (slot, (offset, data)) in gnu.sparse.iter_mut().zip(blocks) {
            slot.set_offset(*offset);
            slot.set_length(data.len() as u64);
        }
        h.set_cksum();
        let mut out = h.as_bytes().to_vec();
        for (_, data) in blocks {
            out.extend_from_slice(data);
        }
        out.resize(out.len().next_multiple_of(512), 0);
        out
    }

    #[test]
    fn reads_sparse_maps_and_refuses_bad_ones() {
        let mut tar = sparse_member(b"sparse", 1 << 32, &[(4096, b"x"), ((1 << 32) - 1, b"y")]);
        tar.extend_from_slice(&[0; 1024]);
        let mut archive = Archive::new(&tar[..]);
        let e = archive.next_entry().unwrap().unwrap();
        assert_eq!(e.sparse, Some(Sparse { real_size: 1 << 32, blocks: vec![(4096, 1), ((1 << 32) - 1, 1)] }));
        assert_eq!(e.size, 2);
        assert!(archive.next_entry().unwrap().is_none());

        for (blocks, why) in
            [(vec![(10u64, &b"ab"[..]), (11, b"c")], "overlapping"), (vec![(100, b"z")], "past the file's size")]
        {
            let tar = sparse_member(b"bad", 50, &blocks);
            let err = Archive::new(&tar[..]).next_entry().err().unwrap();
            assert!(err.to_string().contains(why), "{err}");
        }
    }

    #[test]
    fn refuses_endless_sparse_maps() {
        let mut h = header(EntryType::GNUSparse, b"endless", 0);
        h.as_gnu_mut().unwrap().set_real_size(0);
        h.as_gnu_mut().unwrap().set_is_extended(true);
        h.set_cksum();
        let mut ext = GnuExtSparseHeader::new();
        ext.set_is_extended(true);
        let endless = io::Cursor::new(h.as_bytes().to_vec()).chain(RepeatBlock(ext.as_bytes().to_vec(), 0));
        let err = Archive::new(endless).next_entry().err().unwrap();
        assert!(matches!(err, ArchiveError::TooLarge { what: "old-GNU sparse map", .. }), "{err}");
    }

    /// One block, forever.
    struct RepeatBlock(Vec<u8>, usize);

    impl Read for RepeatBlock {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = buf.len().min(self.0.len() - self.1);
            buf[..n].copy_from_slice(&self.0[self.1..self.1 + n]);
            self.1 = (self.1 + n) % self.0.len();
            Ok(n)
        }
    }

    #[test]
    fn malformed_archives_are_errors() {
        let mut h = header(EntryType::Regular, b"f", 0);
        h.as_mut_bytes()[0] = b'g';
        assert!(matches!(Archive::new(&h.as_bytes()[..]).next_entry(), Err(ArchiveError::Malformed { .. })));
        let short = header(EntryType::Regular, b"f", 100).as_bytes()[..300].to_vec();
        assert!(matches!(Archive::new(&short[..]).next_entry(), Err(ArchiveError::Malformed { .. })));
        let dangling = header(EntryType::GNULongName, b"././@LongLink", 0).as_bytes().to_vec();
        assert!(Archive::new(&dangling[..]).next_entry().is_err());
        // Data cut short.
        let cut = header(EntryType::Regular, b"f", 100).as_bytes().to_vec();
        let mut archive = Archive::new(&cut[..]);
        archive.next_entry().unwrap().unwrap();
        assert!(matches!(archive.read_data(&mut [0; 10]), Err(ArchiveError::Malformed { .. })));
    }
}
