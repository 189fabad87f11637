//! The store suite: leases and garbage collection after kill -9.

use super::*;

/// Starts a pull of `app` through a proxy that holds layer 2 halfway, and waits until the
/// pull holds everything a crash can leave: committed blobs, the committed snapshot of layer
/// 1, the active snapshot layer 2 is to be unpacked into, and layer 2's partial ingest. Then
/// kills it with SIGKILL.
fn kill_a_pull_midway(pb: &Pullbox) {
    let f = fixture();
    let proxy = proxy();
    let layer2 = &f.app.layers[1];
    let half = layer2.size / 2;
    proxy.hold(&layer2.digest, half);
    let reference = format!("{}/{}:1.0", proxy.addr(), f.app.path());
    let mut pull = Background::pull(pb, &[], &reference);
    wait_for(&mut pull.child, "layer 2 is half downloaded (the only download left) and its snapshot prepared", || {
        let inv = inventory(pb);
        proxy.held() == 1
            && Inventory::ingest_bytes(pb.root()) >= half
            && inv.snapshots.len() == 2
            && inv.ingests.len() == 1
    });
    pull.child.kill().unwrap();
    pull.child.wait().unwrap();
    let inv = inventory(pb);
    assert_eq!(inv.ingests.len(), 1, "{inv:#?}");
    assert!(!inv.staging.is_empty(), "layer 2 was being unpacked as it downloaded: {inv:#?}");
    assert!(inv.blobs.contains(&f.app.layers[0].digest) && inv.blobs.contains(f.app.id()), "{inv:#?}");
}

#[test]
fn gc_removes_what_a_killed_pull_left_and_a_re_pull_succeeds() {
    let f = fixture();
    let pb = pullbox();
    kill_a_pull_midway(&pb);
    assert!(listed(&pb).is_empty());
    // Two snapshots, and the layers that were being unpacked as they downloaded.
    let snapshots = 2 + inventory(&pb).staging.len();

    let out = pb.run("gc", NO_ARGS);
    out.assert_success();
    assert!(
        out.stdout.contains(&format!(", {snapshots} snapshots, 1 ingests, 1 leases;")),
        "gc must report what it removed:\n{out}"
    );
    let inv = inventory(&pb);
    assert!(inv.is_empty(), "orphans left after gc: {inv:#?}");

    pb.pull(&[], &f.app.reference);
    assert_only_app(&pb);
    assert_app_mounts(&pb, &f.app.reference);
}

#[test]
fn the_next_pull_removes_what_a_killed_pull_left() {
    let f = fixture();
    let pb = pullbox();
    kill_a_pull_midway(&pb);
    // Mark the killed pull's snapshot directories. Ids alone cannot tell them apart from the
    // re-pull's: when the kill lands inside the transaction that creates a snapshot, its
    // directory exists but its id was never committed, and the next snapshot reuses that id.
    const MARK: &str = "left-by-the-killed-pull";
    for id in inventory(&pb).snapshots {
        fs::write(pb.root().join("snapshots").join(id.to_string()).join(MARK), b"").unwrap();
    }

    pb.pull(&[], &f.app.reference);
    let inv = assert_only_app(&pb);
    let left: Vec<_> = inv
        .snapshots
        .iter()
        .filter(|id| pb.root().join("snapshots").join(id.to_string()).join(MARK).exists())
        .collect();
    assert!(left.is_empty(), "the killed pull's snapshots {left:?} were not collected: {inv:#?}");
    let out = pb.run("gc", NO_ARGS);
    out.assert_success();
    assert!(out.stdout.contains("removed 0 blobs, 0 snapshots, 0 ingests, 0 leases"), "{out}");
    assert_app_mounts(&pb, &f.app.reference);
}
