//! The store suite: READY only.

use super::*;

/// What was damaged, and how.
type Damage<'a> = (&'a str, &'a dyn Fn(&Pullbox));

#[test]
fn images_damaged_behind_pullboxs_back_are_not_ready_and_a_pull_repairs_them() {
    let f = fixture();
    let chain = f.app.chain_id();
    // Snapshot ids in a fresh store: layer 1 is 1, layer 3 (the top) is 3.
    let damages: [Damage; 4] = [
        ("top snapshot's directory deleted", &|pb| fs::remove_dir_all(pb.root().join("snapshots/3")).unwrap()),
        ("middle snapshot's directory deleted", &|pb| fs::remove_dir_all(pb.root().join("snapshots/2/fs")).unwrap()),
        ("config blob deleted", &|pb| fs::remove_file(pb.blob_path(f.app.id())).unwrap()),
        ("top snapshot removed (record and directory)", &|pb| {
            let backend = pullbox::backend::embedded::open(pb.root()).unwrap();
            let rt = tokio::runtime::Runtime::new().unwrap();
            rt.block_on(backend.snapshots.remove(&chain)).unwrap();
        }),
    ];
    for (what, damage) in damages {
        let pb = pullbox();
        let id = pb.pull(&[], &f.app.reference);
        damage(&pb);
        assert!(listed(&pb).is_empty(), "{what}: the image is still listed");
        let out = pb.run("inspect", [&f.app.reference]);
        out.assert_failure().assert_stderr_contains("not found");
        if is_root() {
            let dir = tempfile::tempdir().unwrap();
            pb.run("mount", [&f.app.reference, &dir.path().display().to_string()]).assert_failure();
        }

        assert_eq!(pb.pull(&[], &f.app.reference), id, "{what}: the re-pull");
        assert_eq!(listed(&pb), vec![id.clone()], "{what}: not listed after the re-pull");
        assert_eq!(pb.inspect(&f.app.reference)["chainId"], chain.as_str());
        pb.run("gc", NO_ARGS).assert_success();
        assert_only_app(&pb);
        assert_app_mounts(&pb, &f.app.reference);
    }
}
