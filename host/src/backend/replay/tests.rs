//! The replay backend without wasm: a recording of one image, answered as a puller sees it.

use super::*;
use crate::registry::NoProgress;

const MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

struct Image {
    recording: Recording,
    manifest: Descriptor,
    layer: Descriptor,
    diff_id: Digest,
}

fn desc(media_type: &str, bytes: &[u8]) -> Descriptor {
    Descriptor::of_bytes(media_type, bytes)
}

fn image() -> Image {
    let diff_id = Digest::sha256_of(b"layer tar");
    let layer = desc("application/vnd.oci.image.layer.v1.tar+gzip", b"layer gz");
    let config =
        format!(r#"{{"architecture":"amd64","os":"linux","rootfs":{{"type":"layers","diff_ids":["{diff_id}"]}}}}"#);
    let config_desc = desc("application/vnd.oci.image.config.v1+json", config.as_bytes());
    let manifest = serde_json::json!({
        "schemaVersion": 2, "mediaType": MANIFEST, "config": config_desc, "layers": [layer],
    })
    .to_string();
    let manifest_desc = desc(MANIFEST, manifest.as_bytes());
    let recording = Recording {
        request: RecordedRequest { reference: "127.0.0.1:5000/team/app:1.0".into(), ..Default::default() },
        resolved: vec![Resolved {
            name: "127.0.0.1:5000/team/app".into(),
            reference: "1.0".into(),
            root: manifest_desc.clone(),
        }],
        blobs: [(manifest_desc.digest.clone(), manifest.into_bytes()), (config_desc.digest, config.into_bytes())]
            .into_iter()
            .collect(),
    };
    Image { recording, manifest: manifest_desc, layer, diff_id }
}

fn repo() -> Repository {
    Repository::parse("127.0.0.1:5000/team/app").unwrap()
}

#[tokio::test]
async fn a_replay_answers_what_was_recorded_and_pretends_to_download_and_unpack() {
    let img = image();
    let replay = Replay::new(img.recording.clone());
    let lease = LeaseId("l".into());
    let sink = Sink::new(replay.clone(), lease.clone(), Arc::new(NoProgress), Credentials::anonymous());
    let root = replay.resolve(&repo(), "1.0", &sink).await.unwrap();
    assert_eq!(root, img.manifest);
    let by_digest = replay.resolve(&repo(), img.manifest.digest.as_str(), &sink).await;
    assert_eq!(by_digest.unwrap(), img.manifest);
    let other = replay.resolve(&repo(), "2.0", &sink).await.unwrap_err();
    assert!(other.to_string().contains("not resolved in the recording"), "{other}");

    let bytes = replay.read(&img.manifest.digest, 0, 1 << 20).await.unwrap();
    assert_eq!(bytes, img.recording.blobs[&img.manifest.digest]);
    assert!(matches!(replay.info(&img.layer.digest).await, Err(Error::NotFound(_))), "no layer before a fetch");
    assert!(matches!(replay.apply(&img.layer, &[]).await, Err(Error::NotFound(_))), "no apply before a fetch");

    replay.fetch(&repo(), &img.layer, &sink, None).await.unwrap();
    assert_eq!(replay.info(&img.layer.digest).await.unwrap().size, img.layer.size);
    assert!(matches!(replay.read(&img.layer.digest, 0, 10).await, Err(Error::NotFound(_))), "layers have no bytes");
    replay.prepare("k", "", &lease).await.unwrap();
    assert_eq!(replay.apply(&img.layer, &[]).await.unwrap(), img.diff_id);
    replay.commit(img.diff_id.as_str(), "k", &lease).await.unwrap();
    assert_eq!(replay.stat(img.diff_id.as_str()).await.unwrap().kind, SnapshotKind::Committed);
    assert!(matches!(replay.writer(&img.layer, &lease).await, Err(Error::FailedPrecondition(_))));
}

#[test]
fn a_recording_survives_a_round_trip_and_a_tampered_blob_is_refused() {
    let img = image();
    let dir = tempfile::tempdir().unwrap();
    img.recording.save(dir.path()).unwrap();
    assert!(dir.path().join("oci-layout").is_file() && dir.path().join("index.json").is_file());
    assert_eq!(Recording::load(dir.path()).unwrap(), img.recording);

    let blob = dir.path().join("blobs/sha256").join(img.manifest.digest.hex());
    std::fs::write(&blob, b"{}").unwrap();
    let err = Recording::load(dir.path()).unwrap_err();
    assert!(err.to_string().contains("has the digest"), "{err}");
}
