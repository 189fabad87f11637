//! The CRI socket's HTTP/2 shim: serves clients whose `:authority` is not a URI authority.
//!
//! grpc C-core clients (Python `grpcio` from 1.57 on, C++, Ruby, ...) and grpc-java send the
//! unix socket's path, percent-encoded or not (`%2Frun%2Fpullbox%2Fpullbox.sock`), as the
//! `:authority` of every request on a unix socket. The `h2` crate under tonic checks the field
//! with `http::uri::Authority` while it decodes the request, before anything of pullbox runs,
//! and resets the stream with `PROTOCOL_ERROR` ("malformed authority"); no setting of `h2`,
//! `hyper` or tonic changes that, up to h2 0.4.21 and http 1.6 (the upstream fix, a pull
//! request to `h2`, has been open since 2020). containerd's CRI (grpc-go) serves these clients,
//! so kubelet-side tooling written in those languages must work against pullbox too.
//!
//! [`NormalizeAuthority`] wraps each accepted connection before `h2` sees it. Frames from the
//! client pass through byte for byte, except header blocks (`HEADERS` and its `CONTINUATION`s):
//! those are HPACK-decoded with the client's compression context and encoded afresh, with an
//! `:authority` that is not a valid URI authority replaced by [`REPLACEMENT`] (what grpc-go
//! and kubelet send on unix sockets: a socket names no host, so the field carries nothing).
//! Everything the server sends passes through untouched. HPACK coding is `loona-hpack`'s.
//!
//! Because header blocks share one compression context per direction, every block is
//! re-encoded, not only those that carry a bad authority: the server's decoder then follows
//! this shim's encoder. That encoder keeps no dynamic table ([`ENCODER_TABLE_SIZE`] is 0), so
//! it never refers to an entry the server might not hold, whatever table size the server uses.
//!
//! Input the shim cannot follow (a malformed `HEADERS` frame, an HPACK error, a frame between a
//! `HEADERS` and its `CONTINUATION`, a client `PUSH_PROMISE`, a header block over
//! [`MAX_HEADER_BLOCK`]) ends the connection with an `InvalidData` read error: `h2` would answer
//! every one of these with a connection error too.
//!
//! Constants:
//! - [`MAX_FRAME`] = 16,384: the initial `SETTINGS_MAX_FRAME_SIZE`, which every HTTP/2 peer
//!   accepts; re-encoded blocks are split into frames of at most this size.
//! - [`DECODER_TABLE_SIZE`] = 4,096: the initial `SETTINGS_HEADER_TABLE_SIZE`. The client sizes
//!   its HPACK table from the server's SETTINGS, and tonic's server never changes it.
//! - [`MAX_HEADER_BLOCK`] = 64 KiB, for the encoded block and the decoded list alike (sizes as
//!   HTTP/2 counts them: name + value + 32 per field). hyper's server refuses header lists over
//!   16 KiB by default; four times that lets every request hyper would judge reach it, while a
//!   block of references to one large table entry cannot make the shim decode megabytes.

use std::{
    io,
    pin::Pin,
    task::{ready, Context, Poll},
};

use bytes::{Buf, BufMut, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The `:authority` put in place of one that is not a URI authority.
pub const REPLACEMENT: &str = "localhost";

/// The largest frame the shim writes (see the module docs).
pub const MAX_FRAME: usize = 16_384;

/// The HPACK table size the client's encoder may use (see the module docs).
pub const DECODER_TABLE_SIZE: usize = 4_096;

/// The HPACK table size of the shim's encoder: none, so it never refers to a table entry.
pub const ENCODER_TABLE_SIZE: usize = 0;

/// The largest header block, encoded or decoded, that the shim passes on.
pub const MAX_HEADER_BLOCK: usize = 64 * 1024;

/// The client connection preface (`PRI * HTTP/2.0...`), passed through unread.
const PREFACE_LEN: usize = 24;

/// The length of an HTTP/2 frame header.
const FRAME_HEADER_LEN: usize = 9;

// Frame types and flags (RFC 9113 section 6).
const HEADERS: u8 = 0x1;
const PUSH_PROMISE: u8 = 0x5;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// The stream dependency and weight of a `HEADERS` frame with `PRIORITY`.
const PRIORITY_LEN: usize = 5;

/// Why the shim gave up on a connection.
#[derive(Debug, thiserror::Error)]
pub enum ShimError {
    #[error("HTTP/2 header block of {0} bytes is larger than {MAX_HEADER_BLOCK}")]
    BlockTooLarge(usize),
    #[error("HTTP/2 HEADERS frame on stream {0} is too short for its padding or priority")]
    MalformedHeaders(u32),
    #[error("HTTP/2 frame of type {kind:#x} on stream {stream} where a CONTINUATION of stream {expected} belongs")]
    Interleaved { kind: u8, stream: u32, expected: u32 },
    #[error("HTTP/2 CONTINUATION on stream {0} without a HEADERS frame before it")]
    StrayContinuation(u32),
    #[error("HTTP/2 PUSH_PROMISE from a client")]
    PushPromise,
    #[error("HPACK: {0}")]
    Hpack(#[from] loona_hpack::decoder::DecoderError),
}

/// A server-side connection whose incoming header blocks get a valid `:authority`.
pub struct NormalizeAuthority<S> {
    io: S,
    rewriter: Rewriter,
    /// Rewritten bytes not yet read by the server.
    out: BytesMut,
    /// The client closed its side (or the shim gave up): nothing more comes.
    done: bool,
}

impl<S> NormalizeAuthority<S> {
    /// Wraps the accepted connection `io`.
    pub fn new(io: S) -> NormalizeAuthority<S> {
        NormalizeAuthority { io, rewriter: Rewriter::new(), out: BytesMut::new(), done: false }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for NormalizeAuthority<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if !this.out.is_empty() {
                let n = this.out.len().min(buf.remaining());
                buf.put_slice(&this.out[..n]);
                this.out.advance(n);
                return Poll::Ready(Ok(()));
            }
            if this.done {
                return Poll::Ready(Ok(()));
            }
            let read = ready!(tokio_util::io::poll_read_buf(Pin::new(&mut this.io), cx, &mut this.rewriter.input))?;
            if read == 0 {
                this.done = true;
                continue;
            }
            if let Err(e) = this.rewriter.process(&mut this.out) {
                this.done = true;
                tracing::debug!("HTTP/2 shim ends a CRI connection: {e}");
                return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, e)));
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for NormalizeAuthority<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

impl<S: tonic::transport::server::Connected> tonic::transport::server::Connected for NormalizeAuthority<S> {
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

/// The client-to-server byte stream's rewriter, without I/O.
struct Rewriter {
    /// Bytes received and not yet handled.
    input: BytesMut,
    /// Bytes of the preface still to pass through.
    preface: usize,
    /// Payload bytes of the current pass-through frame still to pass through.
    passing: usize,
    /// A header block waiting for its `CONTINUATION` frames.
    block: Option<Block>,
    decoder: loona_hpack::Decoder<'static>,
    encoder: loona_hpack::Encoder<'static>,
}

/// A header block being collected.
struct Block {
    stream: u32,
    /// The `HEADERS` frame's `END_STREAM` flag.
    end_stream: bool,
    /// The `HEADERS` frame's priority fields, when it had the `PRIORITY` flag.
    priority: Option<[u8; PRIORITY_LEN]>,
    /// The HPACK-encoded fragments so far, without padding.
    fragment: Vec<u8>,
}

impl Rewriter {
    fn new() -> Rewriter {
        let mut decoder = loona_hpack::Decoder::new();
        decoder.set_max_allowed_table_size(DECODER_TABLE_SIZE);
        let mut encoder = loona_hpack::Encoder::new();
        encoder.set_max_table_size(ENCODER_TABLE_SIZE);
        Rewriter { input: BytesMut::new(), preface: PREFACE_LEN, passing: 0, block: None, decoder, encoder }
    }

    /// Moves what it can of `input` to `out`, rewriting complete header blocks; keeps an
    /// incomplete frame header or header frame for the next call.
    fn process(&mut self, out: &mut BytesMut) -> Result<(), ShimError> {
        loop {
            let verbatim = if self.preface > 0 { &mut self.preface } else { &mut self.passing };
            if *verbatim > 0 {
                let n = (*verbatim).min(self.input.len());
                if n == 0 {
                    return Ok(());
                }
                out.extend_from_slice(&self.input.split_to(n));
                *verbatim -= n;
                continue;
            }
            if self.input.len() < FRAME_HEADER_LEN {
                return Ok(());
            }
            let head = &self.input[..FRAME_HEADER_LEN];
            let len = usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2]);
            let (kind, flags) = (head[3], head[4]);
            let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
            match kind {
                HEADERS | CONTINUATION => {
                    if len > MAX_HEADER_BLOCK {
                        return Err(ShimError::BlockTooLarge(len));
                    }
                    if self.input.len() < FRAME_HEADER_LEN + len {
                        self.input.reserve(FRAME_HEADER_LEN + len - self.input.len());
                        return Ok(());
                    }
                    let frame = self.input.split_to(FRAME_HEADER_LEN + len);
                    self.header_frame(kind, flags, stream, &frame[FRAME_HEADER_LEN..], out)?;
                }
                PUSH_PROMISE => return Err(ShimError::PushPromise),
                _ => {
                    if let Some(block) = &self.block {
                        return Err(ShimError::Interleaved { kind, stream, expected: block.stream });
                    }
                    out.extend_from_slice(&self.input.split_to(FRAME_HEADER_LEN));
                    self.passing = len;
                }
            }
        }
    }

    /// Takes one `HEADERS` or `CONTINUATION` frame; writes the block once it is complete.
    fn header_frame(
        &mut self,
        kind: u8,
        flags: u8,
        stream: u32,
        payload: &[u8],
        out: &mut BytesMut,
    ) -> Result<(), ShimError> {
        if kind == HEADERS {
            if let Some(block) = &self.block {
                return Err(ShimError::Interleaved { kind, stream, expected: block.stream });
            }
            let mut rest = payload;
            if flags & PADDED != 0 {
                let (&pad, tail) = rest.split_first().ok_or(ShimError::MalformedHeaders(stream))?;
                let keep = tail.len().checked_sub(usize::from(pad)).ok_or(ShimError::MalformedHeaders(stream))?;
                rest = &tail[..keep];
            }
            let priority = if flags & PRIORITY != 0 {
                let (fields, tail) = rest.split_first_chunk().ok_or(ShimError::MalformedHeaders(stream))?;
                rest = tail;
                Some(*fields)
            } else {
                None
            };
            self.block = Some(Block { stream, end_stream: flags & END_STREAM != 0, priority, fragment: rest.to_vec() });
        } else {
            let block = match &mut self.block {
                Some(block) if block.stream == stream => block,
                Some(block) => return Err(ShimError::Interleaved { kind, stream, expected: block.stream }),
                None => return Err(ShimError::StrayContinuation(stream)),
            };
            block.fragment.extend_from_slice(payload);
            if block.fragment.len() > MAX_HEADER_BLOCK {
                return Err(ShimError::BlockTooLarge(block.fragment.len()));
            }
        }
        if flags & END_HEADERS != 0 {
            let block = self.block.take().expect("a block is open");
            self.write_block(&block, out)?;
        }
        Ok(())
    }

    /// Decodes a complete header block, fixes its `:authority` and writes it as frames.
    fn write_block(&mut self, block: &Block, out: &mut BytesMut) -> Result<(), ShimError> {
        let mut fields = Vec::new();
        let mut size = 0;
        self.decoder.decode_with_cb(&block.fragment, |name, value| {
            size += name.len() + value.len() + 32;
            if size <= MAX_HEADER_BLOCK {
                fields.push((name.into_owned(), value.into_owned()));
            }
        })?;
        if size > MAX_HEADER_BLOCK {
            return Err(ShimError::BlockTooLarge(size));
        }
        for (name, value) in &mut fields {
            if name == b":authority" && http::uri::Authority::try_from(value.as_slice()).is_err() {
                *value = REPLACEMENT.as_bytes().to_vec();
            }
        }
        let encoded = self.encoder.encode(fields.iter().map(|(n, v)| (n.as_slice(), v.as_slice())));

        let prefix = block.priority.as_ref().map_or(&[][..], |p| &p[..]);
        let first = encoded.len().min(MAX_FRAME - prefix.len());
        let (head, mut rest) = encoded.split_at(first);
        let mut flags = if block.end_stream { END_STREAM } else { 0 };
        if block.priority.is_some() {
            flags |= PRIORITY;
        }
        if rest.is_empty() {
            flags |= END_HEADERS;
        }
        put_frame_header(out, prefix.len() + head.len(), HEADERS, flags, block.stream);
        out.extend_from_slice(prefix);
        out.extend_from_slice(head);
        while !rest.is_empty() {
            let (chunk, tail) = rest.split_at(rest.len().min(MAX_FRAME));
            rest = tail;
            let flags = if rest.is_empty() { END_HEADERS } else { 0 };
            put_frame_header(out, chunk.len(), CONTINUATION, flags, block.stream);
            out.extend_from_slice(chunk);
        }
        Ok(())
    }
}

/// Writes a frame header.
fn put_frame_header(out: &mut BytesMut, len: usize, kind: u8, flags: u8, stream: u32) {
    out.put_uint(len as u64, 3);
    out.put_u8(kind);
    out.put_u8(flags);
    out.put_u32(stream);
}

#[cfg(test)]
mod tests {
    use super::*;

    const PREFACE: &[u8; PREFACE_LEN] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    const SOCKET_AUTHORITY: &str = "%2Frun%2Fpullbox%2Fpullbox.sock";

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut out = BytesMut::new();
        put_frame_header(&mut out, payload.len(), kind, flags, stream);
        out.extend_from_slice(payload);
        out.to_vec()
    }

    fn request(authority: &str, extra: usize) -> Vec<(Vec<u8>, Vec<u8>)> {
        let mut fields: Vec<(Vec<u8>, Vec<u8>)> = [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", "/runtime.v1.ImageService/ListImages"),
            (":authority", authority),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
        ]
        .iter()
        .map(|(n, v)| (n.as_bytes().to_vec(), v.as_bytes().to_vec()))
        .collect();
        if extra > 0 {
            fields.push((b"x-big".to_vec(), vec![b'a'; extra]));
        }
        fields
    }

    fn encode(encoder: &mut loona_hpack::Encoder<'_>, fields: &[(Vec<u8>, Vec<u8>)]) -> Vec<u8> {
        encoder.encode(fields.iter().map(|(n, v)| (n.as_slice(), v.as_slice())))
    }

    /// Runs `input` through a rewriter in chunks of `chunk` bytes.
    fn rewrite(input: &[u8], chunk: usize) -> Result<Vec<u8>, ShimError> {
        let mut r = Rewriter::new();
        let mut out = BytesMut::new();
        for piece in input.chunks(chunk) {
            r.input.extend_from_slice(piece);
            r.process(&mut out)?;
        }
        Ok(out.to_vec())
    }

    /// The frames of `bytes` after the preface: (type, flags, stream, payload).
    fn frames(mut bytes: &[u8]) -> Vec<(u8, u8, u32, Vec<u8>)> {
        assert_eq!(&bytes[..PREFACE_LEN], PREFACE);
        bytes = &bytes[PREFACE_LEN..];
        let mut all = Vec::new();
        while !bytes.is_empty() {
            let len = usize::from(bytes[0]) << 16 | usize::from(bytes[1]) << 8 | usize::from(bytes[2]);
            let stream = u32::from_be_bytes(bytes[5..9].try_into().unwrap());
            all.push((bytes[3], bytes[4], stream, bytes[9..9 + len].to_vec()));
            bytes = &bytes[9 + len..];
        }
        all
    }

    /// A literal field with incremental indexing whose name is static entry `name`.
    fn indexed_literal(name: u8, value: &str) -> Vec<u8> {
        [[0x40 | name, value.len() as u8].as_slice(), value.as_bytes()].concat()
    }

    #[test]
    fn a_socket_path_authority_becomes_localhost_and_the_rest_passes_through() {
        // Two requests as grpc C-core encodes them: the first adds `:path`, `:authority` and
        // `te` to the dynamic table, the second refers to them (62 = newest), so the
        // rewriter must follow the client's compression context.
        const PATH: &str = "/runtime.v1.ImageService/ListImages";
        let first = [
            [0x83, 0x86].as_slice(), // :method POST, :scheme http
            &indexed_literal(4, PATH),
            &indexed_literal(1, SOCKET_AUTHORITY),
            &[[0x40, 2].as_slice(), b"te", &[8], b"trailers"].concat(),
        ]
        .concat();
        let second = [0x83, 0x86, 0x80 | 64, 0x80 | 63, 0x80 | 62];
        let fields = |authority: &str| -> Vec<(Vec<u8>, Vec<u8>)> {
            [(":method", "POST"), (":scheme", "http"), (":path", PATH), (":authority", authority), ("te", "trailers")]
                .iter()
                .map(|(n, v)| (n.as_bytes().to_vec(), v.as_bytes().to_vec()))
                .collect()
        };
        assert_eq!(loona_hpack::Decoder::new().decode(&first).unwrap(), fields(SOCKET_AUTHORITY));

        let settings = frame(0x4, 0, 0, &[0, 3, 0, 0, 0, 100]);
        let data = frame(0x0, END_STREAM, 1, &[0, 0, 0, 0, 0]);
        let mut input = PREFACE.to_vec();
        input.extend(&settings);
        input.extend(frame(HEADERS, END_HEADERS | PADDED, 1, &[[3].as_slice(), &first, &[0; 3]].concat()));
        input.extend(&data);
        let priority = [0, 0, 0, 1, 15];
        input.extend(frame(HEADERS, END_HEADERS | END_STREAM | PRIORITY, 3, &[priority.as_slice(), &second].concat()));

        for chunk in [1, 7, input.len()] {
            let out = rewrite(&input, chunk).unwrap();
            let got = frames(&out);
            assert_eq!(got.len(), 4, "chunk {chunk}");
            assert_eq!(frame(got[0].0, got[0].1, got[0].2, &got[0].3), settings, "SETTINGS verbatim");
            assert_eq!(frame(got[2].0, got[2].1, got[2].2, &got[2].3), data, "DATA verbatim");
            assert_eq!((got[1].0, got[1].1, got[1].2), (HEADERS, END_HEADERS, 1), "padding dropped");
            assert_eq!((got[3].0, got[3].1, got[3].2), (HEADERS, END_HEADERS | END_STREAM | PRIORITY, 3));
            assert_eq!(got[3].3[..PRIORITY_LEN], priority, "priority kept");

            let mut server = loona_hpack::Decoder::new();
            assert_eq!(server.decode(&got[1].3).unwrap(), fields(REPLACEMENT));
            assert_eq!(server.decode(&got[3].3[PRIORITY_LEN..]).unwrap(), fields(REPLACEMENT));
        }
    }

    #[test]
    fn a_valid_authority_is_kept() {
        let block = encode(&mut loona_hpack::Encoder::new(), &request("localhost:10010", 0));
        let input = [PREFACE.as_slice(), &frame(HEADERS, END_HEADERS, 1, &block)].concat();
        let out = rewrite(&input, 5).unwrap();
        let got = frames(&out);
        assert_eq!(loona_hpack::Decoder::new().decode(&got[0].3).unwrap(), request("localhost:10010", 0));
    }

    #[test]
    fn continuations_are_joined_and_large_blocks_split_again() {
        let fields = request(SOCKET_AUTHORITY, 40_000);
        let block = encode(&mut loona_hpack::Encoder::new(), &fields);
        let (a, rest) = block.split_at(10);
        let (b, c) = rest.split_at(20_000);
        let input = [
            PREFACE.as_slice(),
            &frame(HEADERS, END_STREAM, 1, a),
            &frame(CONTINUATION, 0, 1, b),
            &frame(CONTINUATION, END_HEADERS, 1, c),
        ]
        .concat();
        let out = rewrite(&input, 4096).unwrap();
        let got = frames(&out);
        assert_eq!(
            got.iter().map(|f| (f.0, f.1)).collect::<Vec<_>>(),
            [(HEADERS, END_STREAM), (CONTINUATION, 0), (CONTINUATION, END_HEADERS),]
        );
        assert!(got.iter().all(|f| f.3.len() <= MAX_FRAME));
        let joined: Vec<u8> = got.iter().flat_map(|f| f.3.clone()).collect();
        assert_eq!(loona_hpack::Decoder::new().decode(&joined).unwrap(), request(REPLACEMENT, 40_000));
    }

    #[test]
    fn what_h2_would_refuse_ends_the_connection() {
        let block = encode(&mut loona_hpack::Encoder::new(), &request(SOCKET_AUTHORITY, 0));
        let ping = frame(0x6, 0, 0, &[0; 8]);
        let cases: [(&str, Vec<u8>); 5] = [
            ("frame inside a block", [frame(HEADERS, 0, 1, &block), ping.clone()].concat()),
            ("stray continuation", frame(CONTINUATION, END_HEADERS, 1, &block)),
            ("padding longer than the frame", frame(HEADERS, END_HEADERS | PADDED, 1, &[200, 1, 2])),
            ("push promise", frame(PUSH_PROMISE, END_HEADERS, 1, &block)),
            ("hpack garbage", frame(HEADERS, END_HEADERS, 1, &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff])),
        ];
        for (what, frames) in cases {
            assert!(rewrite(&[PREFACE.as_slice(), &frames].concat(), 3).is_err(), "{what}");
        }
        // A header list that decodes to more than the cap: a large entry, then many
        // one-byte references to it.
        let mut client = loona_hpack::Encoder::new();
        let big = encode(&mut client, &[(b"x-big".to_vec(), vec![b'a'; 3000])]);
        let refs = vec![0x80 | 62; 100];
        let input = [PREFACE.as_slice(), &frame(HEADERS, END_HEADERS, 1, &big), &frame(HEADERS, END_HEADERS, 3, &refs)]
            .concat();
        assert!(matches!(rewrite(&input, input.len()), Err(ShimError::BlockTooLarge(_))));
        let huge = frame(HEADERS, END_HEADERS, 1, &vec![0; MAX_HEADER_BLOCK + 1]);
        assert!(matches!(rewrite(&[PREFACE.as_slice(), &huge[..20]].concat(), 20), Err(ShimError::BlockTooLarge(_))));
    }

    /// End to end with the `h2` server tonic uses: reset without the shim, served with it.
    #[tokio::test]
    async fn h2_serves_a_socket_path_authority_through_the_shim() {
        /// The request's authority as the server got it, or the error code of the server's
        /// RST_STREAM.
        async fn serve(shim: bool) -> Result<String, u32> {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let (mut client, server) = tokio::io::duplex(64 * 1024);
            let server = async move {
                let io: Box<dyn AsyncReadWrite> =
                    if shim { Box::new(NormalizeAuthority::new(server)) } else { Box::new(server) };
                let mut conn = h2::server::handshake(io).await.unwrap();
                let (request, _respond) = conn.accept().await.unwrap().unwrap();
                request.uri().authority().map_or(String::new(), |a| a.to_string())
            };
            let client = async move {
                let block = encode(&mut loona_hpack::Encoder::new(), &request(SOCKET_AUTHORITY, 0));
                let input =
                    [PREFACE.as_slice(), &frame(0x4, 0, 0, &[]), &frame(HEADERS, END_HEADERS | END_STREAM, 1, &block)]
                        .concat();
                client.write_all(&input).await.unwrap();
                loop {
                    let mut head = [0; FRAME_HEADER_LEN];
                    client.read_exact(&mut head).await.unwrap();
                    let mut payload = vec![0; usize::from(head[1]) << 8 | usize::from(head[2])];
                    client.read_exact(&mut payload).await.unwrap();
                    if head[3] == 0x3 {
                        return u32::from_be_bytes(payload[..4].try_into().unwrap());
                    }
                }
            };
            let answer = async {
                tokio::select! {
                    authority = server => Ok(authority),
                    reset = client => Err(reset),
                }
            };
            tokio::time::timeout(std::time::Duration::from_secs(5), answer).await.expect("an answer")
        }
        const PROTOCOL_ERROR: u32 = 0x1;
        assert_eq!(serve(false).await, Err(PROTOCOL_ERROR), "h2 alone resets the stream");
        assert_eq!(serve(true).await.as_deref(), Ok(REPLACEMENT));
    }

    trait AsyncReadWrite: AsyncRead + AsyncWrite + Unpin + Send {}
    impl<T: AsyncRead + AsyncWrite + Unpin + Send> AsyncReadWrite for T {}
}
