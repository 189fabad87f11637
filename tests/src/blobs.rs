//! Blobs a test writes through pullbox's backend traits: descriptors of given bytes,
//! deterministic incompressible bytes, and a chunked write that checks what was committed.

use pullbox::{
    backend::{Backend, LeaseId},
    oci::Descriptor,
};

/// The descriptor of `data` as a blob of `media_type`.
pub fn descriptor(media_type: &str, data: &[u8]) -> Descriptor {
    Descriptor::of_bytes(media_type, data)
}

/// Deterministic bytes that do not compress (xorshift64).
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8
        })
        .collect()
}

/// Writes `data` as the blob `desc` under `lease`, in chunks of `chunk` bytes, and checks
/// what the backend says it committed.
pub async fn write_blob(b: &Backend, desc: &Descriptor, data: &[u8], lease: &LeaseId, chunk: usize) {
    let mut w = b.content.writer(desc, lease).await.unwrap();
    assert_eq!(w.offset(), 0);
    for c in data.chunks(chunk) {
        w.write(c).await.unwrap();
    }
    let info = w.commit().await.unwrap();
    assert_eq!((info.digest.clone(), info.size), (desc.digest.clone(), data.len() as u64));
}
