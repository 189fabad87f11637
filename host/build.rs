//! Generates the server side of containerd's `containerd.services.snapshots.v1.Snapshots`
//! service, which `containerd-client` builds only the client of. The messages are the ones
//! `containerd-client` already generated from containerd's protos; only the service trait and
//! its tower glue are generated here, with tonic-build's manual builder (no protoc needed).
//! The route names match the proto (`/containerd.services.snapshots.v1.Snapshots/<Method>`);
//! the unit tests of `pullbox::snapshotter` call every method through `containerd-client`'s
//! generated client, which proves they do.

use tonic_build::manual::{Builder, Method, Service};

/// Where `containerd-client` keeps the snapshots service's messages.
const MESSAGES: &str = "::containerd_client::services::v1::snapshots";

/// (method, request message, response message, server-streaming) as in `snapshots.proto`.
const METHODS: &[(&str, &str, &str, bool)] = &[
    ("Prepare", "PrepareSnapshotRequest", "PrepareSnapshotResponse", false),
    ("View", "ViewSnapshotRequest", "ViewSnapshotResponse", false),
    ("Mounts", "MountsRequest", "MountsResponse", false),
    ("Commit", "CommitSnapshotRequest", "Empty", false),
    ("Remove", "RemoveSnapshotRequest", "Empty", false),
    ("Stat", "StatSnapshotRequest", "StatSnapshotResponse", false),
    ("Update", "UpdateSnapshotRequest", "UpdateSnapshotResponse", false),
    ("List", "ListSnapshotsRequest", "ListSnapshotsResponse", true),
    ("Usage", "UsageRequest", "UsageResponse", false),
    ("Cleanup", "CleanupRequest", "Empty", false),
];

fn snake(name: &str) -> String {
    name.to_ascii_lowercase()
}

fn message(name: &str) -> String {
    if name == "Empty" {
        // `google.protobuf.Empty`, which prost maps to `()`: a path is needed here.
        "crate::snapshotter::Empty".to_owned()
    } else {
        format!("{MESSAGES}::{name}")
    }
}

fn main() {
    let mut service = Service::builder().name("Snapshots").package("containerd.services.snapshots.v1");
    for &(name, input, output, streaming) in METHODS {
        let mut method = Method::builder()
            .name(snake(name))
            .route_name(name)
            .input_type(message(input))
            .output_type(message(output))
            .codec_path("::tonic_prost::ProstCodec");
        if streaming {
            method = method.server_streaming();
        }
        service = service.method(method.build());
    }
    Builder::new().build_client(false).build_server(true).compile(&[service.build()]);
    println!("cargo:rerun-if-changed=build.rs");
}
