//! The store suite: hostile archives.

use super::*;

/// A check of what a sanitized hostile image left in the store.
type Check = Box<dyn Fn(&Pullbox)>;

/// What a hostile image must lead to.
enum Expect {
    /// The pull fails; stderr names this entry (a substring of it).
    Refused(String),
    /// The pull succeeds; the check looks at the store's snapshot directories.
    Sanitized(Check),
}

/// The snapshot `fs` directory holding `name` at its top, if any.
pub(super) fn in_layers(pb: &Pullbox, name: &str) -> Option<PathBuf> {
    pb.snapshot_fs_dirs().unwrap().into_iter().map(|d| d.join(name)).find(|p| fs::symlink_metadata(p).is_ok())
}

#[test]
fn hostile_archives_are_refused_or_sanitized_and_nothing_lands_outside_the_store() {
    let f = fixture();
    let n = nonce();
    let work = tempfile::tempdir().unwrap();
    let outside = work.path().join(format!("{n}-outside"));
    fs::create_dir(&outside).unwrap();
    let victim = outside.join("victim");
    fs::write(&victim, b"original").unwrap();
    let outside_s = outside.display().to_string();
    let up = "../".repeat(16);
    let passwd = (fs::metadata("/etc/passwd").unwrap().nlink(), file_digest(Path::new("/etc/passwd")).unwrap());
    let long = format!("{}-{n}", "x".repeat(300));

    let cases: Vec<(&str, Vec<Vec<u8>>, Expect)> = vec![
        (
            "dotdot-and-absolute",
            vec![HostileTar::new()
                .file(&format!("{up}{n}-dotdot"), b"1")
                .file(&format!("/{n}-absolute"), b"2")
                .file(&format!("./a/../../../{n}-climb"), b"3")
                .finish()],
            Expect::Sanitized(Box::new({
                let n = n.clone();
                move |pb| {
                    for name in ["dotdot", "absolute", "climb"] {
                        assert!(
                            in_layers(pb, &format!("{n}-{name}")).is_some(),
                            "{name} was not kept inside the image"
                        );
                    }
                }
            })),
        ),
        (
            "write-through-absolute-symlink",
            vec![HostileTar::new()
                .symlink(&format!("{n}-link"), &outside_s)
                .file(&format!("{n}-link/pwned"), b"x")
                .finish()],
            Expect::Refused(format!("{n}-link/pwned")),
        ),
        (
            "write-through-relative-symlink",
            vec![HostileTar::new()
                .symlink(&format!("{n}-up"), &format!("{up}{}", outside_s.trim_start_matches('/')))
                .dir(&format!("{n}-up/made-outside/"))
                .finish()],
            Expect::Refused(format!("{n}-up/made-outside")),
        ),
        (
            // The upper layer gets a directory of its own there, which hides the symlink below.
            "symlink-in-a-lower-layer",
            vec![
                HostileTar::new().symlink(&format!("{n}-lower"), &outside_s).finish(),
                HostileTar::new().file(&format!("{n}-lower/kept-inside"), b"x").finish(),
            ],
            Expect::Sanitized(Box::new({
                let n = n.clone();
                move |pb| {
                    let dirs = pb.snapshot_fs_dirs().unwrap();
                    let top = dirs.last().unwrap().join(format!("{n}-lower"));
                    assert!(fs::symlink_metadata(&top).unwrap().is_dir(), "{}", top.display());
                    assert_eq!(fs::read(top.join("kept-inside")).unwrap(), b"x");
                }
            })),
        ),
        (
            "hardlink-to-an-absolute-path",
            vec![HostileTar::new().hardlink(&format!("{n}-stolen"), &victim.display().to_string()).finish()],
            Expect::Refused(format!("{n}-stolen")),
        ),
        (
            "hardlink-climbing-out",
            vec![HostileTar::new().hardlink(&format!("{n}-passwd"), &format!("{up}etc/passwd")).finish()],
            Expect::Refused(format!("{n}-passwd")),
        ),
        (
            "hardlink-through-a-symlink",
            vec![HostileTar::new()
                .symlink(&format!("{n}-out"), &outside_s)
                .hardlink(&format!("{n}-h"), &format!("{n}-out/victim"))
                .finish()],
            Expect::Refused(format!("{n}-h")),
        ),
        (
            "duplicate-and-replaced-entries",
            vec![HostileTar::new()
                .file(&format!("{n}-dup"), b"first")
                .file(&format!("{n}-dup"), b"second")
                .symlink(&format!("{n}-s"), &victim.display().to_string())
                .file(&format!("{n}-s"), b"replaces the symlink")
                .dir(&format!("{n}-d/"))
                .file(&format!("{n}-d/x"), b"x")
                .file(&format!("{n}-d"), b"replaces the directory")
                .finish()],
            Expect::Sanitized(Box::new({
                let n = n.clone();
                move |pb| {
                    let read = |name: &str| fs::read(in_layers(pb, &format!("{n}-{name}")).unwrap()).unwrap();
                    assert_eq!(read("dup"), b"second");
                    assert_eq!(read("s"), b"replaces the symlink");
                    assert_eq!(read("d"), b"replaces the directory");
                }
            })),
        ),
        ("overlong-name", vec![HostileTar::new().file(&long, b"x").finish()], Expect::Refused(long[..60].to_owned())),
        (
            "whiteout-of-dotdot",
            vec![HostileTar::new().dir(&format!("{n}-w/")).file(&format!("{n}-w/.wh.."), b"").finish()],
            Expect::Refused(format!("{n}-w/.wh..")),
        ),
    ];

    for (case, layers, expect) in cases {
        let reference = push_image(&f.registry, &format!("hostile/{case}:1"), &layers, work.path()).unwrap();
        let pb = pullbox();
        let out = pb.run("pull", [&reference]);
        match &expect {
            Expect::Refused(entry) => {
                out.assert_failure().assert_stderr_contains(entry);
                assert!(listed(&pb).is_empty(), "{case}");
                let inv = inventory(&pb);
                assert!(inv.is_empty(), "{case}: a refused pull left {inv:#?}");
            }
            Expect::Sanitized(check) => {
                out.assert_success();
                check(&pb);
                if is_root() {
                    // The mounted view shows the same.
                    let _m = Mounted::new(&pb, &reference).unwrap();
                }
            }
        }
        // Nowhere a `..` could reach from a snapshot directory holds one of the names.
        let snapshots = pb.root().join("snapshots");
        let mut dirs: Vec<PathBuf> = pb.root().ancestors().map(Path::to_path_buf).collect();
        dirs.push(snapshots.clone());
        dirs.extend(inventory(&pb).snapshots.iter().map(|id| snapshots.join(id.to_string())));
        dirs.extend([work.path().to_path_buf(), PathBuf::from("/etc"), std::env::temp_dir()]);
        let refs: Vec<&Path> = dirs.iter().map(PathBuf::as_path).collect();
        let escaped: Vec<PathBuf> = find_named(&refs, &n)
            .into_iter()
            .filter(|p| p != &outside && !p.starts_with(work.path().join("layout-")))
            .collect();
        assert!(escaped.is_empty(), "{case}: written outside the snapshots: {escaped:?}");
        assert_eq!(fs::read_dir(&outside).unwrap().count(), 1, "{case}: the outside directory changed");
        assert_eq!(fs::read(&victim).unwrap(), b"original", "{case}");
        assert_eq!(fs::metadata(&victim).unwrap().nlink(), 1, "{case}: linked to the victim");
        let now = (fs::metadata("/etc/passwd").unwrap().nlink(), file_digest(Path::new("/etc/passwd")).unwrap());
        assert_eq!(now, passwd, "{case}: /etc/passwd changed");
    }
}

#[test]
#[ignore = "needs root: mounts the store's images (make test-integration as root runs it)"]
fn a_layer_cannot_forge_overlay_opacity() {
    require_root();
    let f = fixture();
    let work = tempfile::tempdir().unwrap();
    let mut top = HostileTar::new();
    // `trusted.overlay.opaque=y` in a PAX record would hide the lower layer's directory.
    let mut pax = tar::Builder::new(Vec::new());
    pax.append_pax_extensions([("SCHILY.xattr.trusted.overlay.opaque", &b"y"[..])]).unwrap();
    let mut layer = pax.into_inner().unwrap();
    layer.truncate(layer.len() - 1024); // drop the end-of-archive marker
    layer.extend(top.dir("kept/").file("kept/new", b"new").finish());
    let base = HostileTar::new().dir("kept/").file("kept/old", b"old").finish();
    let reference = push_image(&f.registry, "hostile/forged-opacity:1", &[base, layer], work.path()).unwrap();
    let pb = pullbox();
    pb.pull(&[], &reference);
    let m = Mounted::new(&pb, &reference).unwrap();
    assert_eq!(fs::read(m.path().join("kept/old")).unwrap(), b"old", "the forged attribute hid a lower layer");
    assert_eq!(fs::read(m.path().join("kept/new")).unwrap(), b"new");
}
