//! `make bench`: pullbox's pull against containerd's, side by side, in printed figures
//! (issue 8).
//!
//! 1. Builds its images once into `target/bench-images/<version>-x<scale>/` (an OCI layout,
//!    reused when present): `multi` (5 gzip layers of many small files and a few large ones),
//!    `big` (one gzip layer of about 1 GiB uncompressed) and `zstd` (2 zstd layers). File
//!    contents mix pseudo-random bytes and generated text, so compressed sizes mean something.
//!    The layers are written with the `tar` crate and compressed with flate2 (gzip, level 6,
//!    as Go's default) or the `zstd` CLI (level 3): umoci's unpack/repack per layer is far
//!    too slow for a gigabyte. `PULLBOX_BENCH_SCALE` (default 1) scales every size.
//!    `PULLBOX_BENCH_ONLY=list` skips everything but the `ListImages` measurement below (no
//!    images are built, no containerd is started); `PULLBOX_BENCH_LIST_CALLS` (default 21)
//!    sets how many `ListImages` calls it times. `PULLBOX_BENCH_ONLY=multi,zstd` (image tags)
//!    measures only those images' rows, and `PULLBOX_BENCH_TOOLS=tar,embedded` only the tools
//!    whose name contains one of the words; both skip part 4.
//! 2. Pushes them with `skopeo` to a fresh `docker-registry` on loopback.
//! 3. For each image, measures wall time and peak RSS (`/usr/bin/time -f '%e %M'` for
//!    processes; `VmHWM` from `/proc` for daemons, each started fresh per run) of:
//!    `pullbox pull` into a fresh embedded store (also with `--sync-fs`: one `syncfs` per
//!    snapshot before its commit); `pullbox serve` (backend containerd) over
//!    CRI `PullImage`; `ctr images pull --plain-http` (fresh containerd and namespace each
//!    run); `skopeo copy` to an OCI layout; `tar` extracting the layer files from local disk
//!    one after another and all in parallel (the lower bound, no fsync).
//! 4. 20 concurrent CRI pulls of `multi` through a counting proxy (blob GETs per blob) against
//!    one pull through the same proxy; `ListImages` over 1,000 images (distinct configs over
//!    one tiny layer, pushed with the registry API and pulled over CRI), and `ImageFsInfo`
//!    over the same daemon (answered from the background measurement).
//!
//! Every tool writes into a fresh journaled ext4, loop-mounted for the run ([`ScratchFs`]; it
//! is `TMPDIR`), not into the machine's own disk, which may be a journal-less ext4 whose inode
//! allocator slows down after the previous tool's files were deleted.
//!
//! Every pull starts from an empty store but with a warm compiled-puller cache (a
//! `pullbox images` or `ListImages` call first), as a node's daemon has. Everything runs on
//! one machine: the registry's reads come from the page cache.

use std::{
    fs,
    io::{self, BufWriter, Write},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::Arc,
    time::Instant,
};

use anyhow::{bail, ensure, Context, Result};
use k8s_cri::v1::{ImageFsInfoRequest, ImageSpec, ListImagesRequest, PullImageRequest};
use pullbox_tests::{containerd::Containerd, cri, fault_server::FaultServer, oci, registry::upload, Pullbox, Registry};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

/// Bumped when the images' recipe changes, so an old cache is not reused.
const RECIPE: &str = "v1";
const GZIP_LAYER: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
const ZSTD_LAYER: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
const MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const CONFIG: &str = "application/vnd.oci.image.config.v1+json";

// ---- content -------------------------------------------------------------------------

/// xorshift64*: fast, deterministic, good enough to defeat a compressor.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

const WORDS: &[&str] = &[
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "for",
    "return",
    "struct",
    "impl",
    "fn",
    "let",
    "mut",
    "self",
    "const",
    "static",
    "import",
    "from",
    "def",
    "class",
    "if",
    "else",
    "while",
    "int",
    "char",
    "void",
    "package",
    "main",
    "error",
    "value",
    "config",
    "layer",
    "image",
    "pull",
    "registry",
    "content",
    "snapshot",
    "digest",
    "manifest",
    "index",
    "license",
    "copyright",
    "version",
    "#include",
    "<stdio.h>",
    "printf",
    "{",
    "}",
    "(",
    ")",
    ";",
    "=",
    "==",
    "->",
    "0",
    "1",
    "42",
    "null",
    "true",
    "false",
    "string",
    "buffer",
    "length",
    "offset",
];

/// `len` bytes: 8 KiB blocks, each either random (binary, already-compressed data) or
/// generated text (source code, docs), half and half.
fn content(rng: &mut Rng, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 64);
    while out.len() < len {
        let block = (len - out.len()).min(8192);
        if rng.below(2) == 0 {
            let start = out.len();
            out.resize(start + block, 0);
            for chunk in out[start..].chunks_mut(8) {
                let v = rng.next().to_le_bytes();
                chunk.copy_from_slice(&v[..chunk.len()]);
            }
        } else {
            let end = out.len() + block;
            while out.len() < end {
                let r = rng.next();
                out.extend_from_slice(WORDS[(r % WORDS.len() as u64) as usize].as_bytes());
                out.push(if (r >> 32).is_multiple_of(11) { b'\n' } else { b' ' });
            }
            out.truncate(end);
        }
    }
    out
}

/// What one layer holds: `small` files of 512 B..`small_max`, spread over directories, and
/// `large` files of `large_size` bytes.
#[derive(Clone, Copy)]
struct Recipe {
    seed: u64,
    small: usize,
    small_max: usize,
    large: usize,
    large_size: usize,
}

/// Writes the layer's tar to `w`.
fn write_tar<W: Write>(r: Recipe, w: W) -> Result<W> {
    let mut rng = Rng(r.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let mut tar = tar::Builder::new(w);
    let dirs = (r.small / 100).max(1);
    let dir_entry = |tar: &mut tar::Builder<W>, path: &str| -> Result<()> {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(0o755);
        h.set_size(0);
        h.set_mtime(1_700_000_000);
        tar.append_data(&mut h, path, io::empty())?;
        Ok(())
    };
    let file = |tar: &mut tar::Builder<W>, path: &str, data: &[u8], mode: u32| -> Result<()> {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(mode);
        h.set_size(data.len() as u64);
        h.set_mtime(1_700_000_000);
        tar.append_data(&mut h, path, data)?;
        Ok(())
    };
    let top = format!("l{}", r.seed);
    dir_entry(&mut tar, &top)?;
    for d in 0..dirs {
        dir_entry(&mut tar, &format!("{top}/d{d}"))?;
    }
    for i in 0..r.small {
        let len = 512 + rng.below(r.small_max as u64 - 512) as usize;
        let data = content(&mut rng, len);
        file(&mut tar, &format!("{top}/d{}/f{i}.txt", i % dirs), &data, 0o644)?;
    }
    dir_entry(&mut tar, &format!("{top}/big"))?;
    for i in 0..r.large {
        let data = content(&mut rng, r.large_size);
        file(&mut tar, &format!("{top}/big/blob{i}.bin"), &data, 0o755)?;
    }
    Ok(tar.into_inner()?)
}

/// A writer that hashes and counts what passes through it.
struct Hashing<W> {
    inner: W,
    hash: Sha256,
    len: u64,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

fn hashing<W>(inner: W) -> Hashing<W> {
    Hashing { inner, hash: Sha256::new(), len: 0 }
}

fn digest_of(h: Sha256) -> String {
    format!("sha256:{}", hex::encode(h.finalize()))
}

/// A built layer: its blob descriptor and diff ID.
#[derive(Clone)]
struct Layer {
    media_type: &'static str,
    digest: String,
    size: u64,
    diff_id: String,
    unpacked: u64,
}

/// Builds one layer blob into `blobs/` of `layout`.
fn build_layer(layout: &Path, r: Recipe, zstd: bool) -> Result<Layer> {
    let tmp = layout.join(format!("tmp-layer-{}", r.seed));
    if zstd {
        let out = fs::File::create(&tmp)?;
        let mut child = Command::new("zstd")
            .args(["-3", "-q", "-c"])
            .stdin(Stdio::piped())
            .stdout(out)
            .spawn()
            .context("cannot run zstd")?;
        let stdin = BufWriter::with_capacity(1 << 20, child.stdin.take().unwrap());
        let mut w = write_tar(r, hashing(stdin))?;
        w.flush()?;
        let (diff_id, unpacked) = (digest_of(w.hash), w.len);
        drop(w.inner);
        ensure!(child.wait()?.success(), "zstd failed");
        let digest = oci::file_digest(&tmp)?;
        let size = fs::metadata(&tmp)?.len();
        fs::rename(&tmp, layout.join("blobs/sha256").join(oci::digest_hex(&digest)))?;
        return Ok(Layer { media_type: ZSTD_LAYER, digest, size, diff_id, unpacked });
    }
    let out = hashing(BufWriter::with_capacity(1 << 20, fs::File::create(&tmp)?));
    let gz = flate2::write::GzEncoder::new(out, flate2::Compression::new(6));
    let tarred = write_tar(r, hashing(gz))?;
    let (diff_id, unpacked) = (digest_of(tarred.hash), tarred.len);
    let mut out = tarred.inner.finish()?;
    out.flush()?;
    let (digest, size) = (digest_of(out.hash), out.len);
    drop(out.inner);
    fs::rename(&tmp, layout.join("blobs/sha256").join(oci::digest_hex(&digest)))?;
    Ok(Layer { media_type: GZIP_LAYER, digest, size, diff_id, unpacked })
}

fn write_blob(layout: &Path, bytes: &[u8]) -> Result<(String, u64)> {
    let digest = oci::sha256_digest(bytes);
    fs::write(layout.join("blobs/sha256").join(oci::digest_hex(&digest)), bytes)?;
    Ok((digest, bytes.len() as u64))
}

fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

/// Config and manifest for `layers`; returns the manifest's (digest, size, bytes).
fn image_json(layout: &Path, layers: &[Layer], label: &str) -> Result<(String, u64, Vec<u8>)> {
    let config = json!({
        "architecture": host_arch(),
        "os": "linux",
        "config": { "Cmd": ["/bin/sh"], "Labels": { "bench": label } },
        "rootfs": { "type": "layers", "diff_ids": layers.iter().map(|l| l.diff_id.clone()).collect::<Vec<_>>() },
    });
    let (cd, cs) = write_blob(layout, &serde_json::to_vec(&config)?)?;
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": MANIFEST,
        "config": { "mediaType": CONFIG, "digest": cd, "size": cs },
        "layers": layers.iter().map(|l| json!({ "mediaType": l.media_type, "digest": l.digest, "size": l.size })).collect::<Vec<_>>(),
    });
    let bytes = serde_json::to_vec(&manifest)?;
    let (md, ms) = write_blob(layout, &bytes)?;
    Ok((md, ms, bytes))
}

/// One benchmark image: its tag in the layout and its layers.
#[derive(Clone)]
struct Image {
    tag: &'static str,
    layers: Vec<Layer>,
}

impl Image {
    fn compressed(&self) -> u64 {
        self.layers.iter().map(|l| l.size).sum()
    }
    fn unpacked(&self) -> u64 {
        self.layers.iter().map(|l| l.unpacked).sum()
    }
}

fn scaled(n: usize, scale: f64) -> usize {
    ((n as f64 * scale).round() as usize).max(1)
}

/// Builds (or reuses) the layout with the three images.
fn build_images(scale: f64) -> Result<(PathBuf, Vec<Image>)> {
    let dir = Pullbox::workspace().join(format!("target/bench-images/{RECIPE}-x{scale}"));
    let meta = dir.join("bench.json");
    let decode = |v: &Value| -> Result<Vec<Image>> {
        let mut out = Vec::new();
        for (tag, layers) in v.as_object().context("bench.json")? {
            let tag: &'static str = Box::leak(tag.clone().into_boxed_str());
            let layers = layers
                .as_array()
                .context("layers")?
                .iter()
                .map(|l| Layer {
                    media_type: if l["mediaType"] == ZSTD_LAYER { ZSTD_LAYER } else { GZIP_LAYER },
                    digest: l["digest"].as_str().unwrap_or_default().to_owned(),
                    size: l["size"].as_u64().unwrap_or_default(),
                    diff_id: l["diffId"].as_str().unwrap_or_default().to_owned(),
                    unpacked: l["unpacked"].as_u64().unwrap_or_default(),
                })
                .collect();
            out.push(Image { tag, layers });
        }
        out.sort_by_key(|i| ["multi", "big", "zstd"].iter().position(|t| *t == i.tag));
        Ok(out)
    };
    if let Ok(bytes) = fs::read(&meta) {
        eprintln!("reusing images in {}", dir.display());
        return Ok((dir.clone(), decode(&serde_json::from_slice(&bytes)?)?));
    }
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(dir.join("blobs/sha256"))?;
    fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    let t = Instant::now();
    eprintln!("building benchmark images into {} (once)...", dir.display());

    // multi: ~3,000 files of 0.5-24 KiB (~36 MB) and 3 of 14 MiB per layer: ~78 MB, ~50 MB gzip.
    let multi = |i: u64| Recipe {
        seed: 100 + i,
        small: scaled(3000, scale),
        small_max: 24 << 10,
        large: 3,
        large_size: scaled(14 << 20, scale),
    };
    // big: 4,000 files of 0.5-64 KiB (~130 MB) and 56 of 16 MiB: ~1 GiB.
    let big = Recipe {
        seed: 200,
        small: scaled(4000, scale),
        small_max: 64 << 10,
        large: 56,
        large_size: scaled(16 << 20, scale),
    };
    let zstd = |i: u64| Recipe { seed: 300 + i, ..multi(i) };

    // Built in parallel: the big layer alone on one thread, the rest on the other.
    let (big_layer, rest) = std::thread::scope(|s| {
        let b = s.spawn(|| build_layer(&dir, big, false));
        let rest = (|| -> Result<(Vec<Layer>, Vec<Layer>)> {
            let m = (0..5).map(|i| build_layer(&dir, multi(i), false)).collect::<Result<Vec<_>>>()?;
            let z = (0..2).map(|i| build_layer(&dir, zstd(i), true)).collect::<Result<Vec<_>>>()?;
            Ok((m, z))
        })();
        (b.join().unwrap(), rest)
    });
    let (multi_layers, zstd_layers) = rest?;
    let images = vec![
        Image { tag: "multi", layers: multi_layers },
        Image { tag: "big", layers: vec![big_layer?] },
        Image { tag: "zstd", layers: zstd_layers },
    ];
    let mut index = Vec::new();
    let mut record = serde_json::Map::new();
    for image in &images {
        let (digest, size, _) = image_json(&dir, &image.layers, image.tag)?;
        index.push(json!({
            "mediaType": MANIFEST, "digest": digest, "size": size,
            "annotations": { "org.opencontainers.image.ref.name": image.tag },
        }));
        record.insert(
            image.tag.to_owned(),
            image
                .layers
                .iter()
                .map(|l| json!({ "mediaType": l.media_type, "digest": l.digest, "size": l.size, "diffId": l.diff_id, "unpacked": l.unpacked }))
                .collect(),
        );
    }
    fs::write(dir.join("index.json"), serde_json::to_vec(&json!({ "schemaVersion": 2, "manifests": index }))?)?;
    fs::write(&meta, serde_json::to_vec_pretty(&Value::Object(record))?)?;
    eprintln!("built in {:.1} s", t.elapsed().as_secs_f64());
    Ok((dir, images))
}

// ---- measuring -------------------------------------------------------------------------

/// One measurement: wall seconds, peak RSS of the tool (KiB), and of a daemon it drove.
#[derive(Clone, Copy, Default)]
struct Figure {
    wall: f64,
    rss_kib: u64,
    daemon_rss_kib: Option<u64>,
}

/// Runs `cmd` under `/usr/bin/time -f '%e %M'`; wall from our own clock, RSS from time.
fn timed(cmd: Command) -> Result<Figure> {
    let out = tempfile::NamedTempFile::new()?;
    let mut timed = Command::new("/usr/bin/time");
    timed.args(["-f", "%e %M", "-o"]).arg(out.path()).arg(cmd.get_program()).args(cmd.get_args());
    for (k, v) in cmd.get_envs() {
        match v {
            Some(v) => timed.env(k, v),
            None => timed.env_remove(k),
        };
    }
    if let Some(d) = cmd.get_current_dir() {
        timed.current_dir(d);
    }
    let t = Instant::now();
    let result = timed.stdout(Stdio::null()).stderr(Stdio::piped()).output()?;
    let wall = t.elapsed().as_secs_f64();
    if !result.status.success() {
        bail!("{:?} failed: {}", cmd, String::from_utf8_lossy(&result.stderr));
    }
    let text = fs::read_to_string(out.path())?;
    let rss = text.lines().last().and_then(|l| l.split_whitespace().nth(1)).and_then(|s| s.parse().ok()).unwrap_or(0);
    Ok(Figure { wall, rss_kib: rss, daemon_rss_kib: None })
}

/// `VmHWM` (peak RSS, KiB) of the process whose command line contains `needle`.
fn vm_hwm(needle: &str) -> Option<u64> {
    for entry in fs::read_dir("/proc").ok()?.flatten() {
        let pid = entry.file_name();
        if !pid.to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(cmdline) = fs::read(entry.path().join("cmdline")) else { continue };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if !cmdline.contains(needle) || cmdline.starts_with("/bin/sh") {
            continue;
        }
        let status = fs::read_to_string(entry.path().join("status")).ok()?;
        return status
            .lines()
            .find(|l| l.starts_with("VmHWM:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|s| s.parse().ok());
    }
    None
}

fn containerd_hwm(ctd: &Containerd) -> Option<u64> {
    vm_hwm(&format!("--config {}/config.toml", ctd.dir().display()))
}

fn spec(image: &str) -> Option<ImageSpec> {
    Some(ImageSpec { image: image.to_owned(), ..ImageSpec::default() })
}

/// `pullbox pull [ARGS] REFERENCE` into a fresh embedded store.
fn pullbox_cli(reference: &str, args: &[&str]) -> Result<Figure> {
    let root = tempfile::Builder::new().prefix("pbbench-").tempdir()?;
    let bin = Pullbox::bin()?;
    // Warm the compiled-puller cache, as any node's store has it.
    let warm = Command::new(&bin).arg("images").arg("--root").arg(root.path()).output()?;
    ensure!(warm.status.success(), "pullbox images: {}", String::from_utf8_lossy(&warm.stderr));
    let mut cmd = Command::new(&bin);
    cmd.arg("pull").arg("--root").arg(root.path()).args(args).arg(reference);
    for var in ["PULLBOX_ROOT", "PULLBOX_PULLER", "PULLBOX_SETTINGS", "PULLBOX_LOG", "PULLBOX_SYNC_FS"] {
        cmd.env_remove(var);
    }
    timed(cmd)
}

/// A CRI pull through `pullbox serve` on the containerd backend; with `proxy`, containerd
/// lists pullbox's snapshotter socket in `[proxy_plugins]` and pullbox's pulls use it
/// (`containerd.snapshotter = "pullbox"`: pullbox unpacks the layers into its own store).
async fn pullbox_containerd(reference: &str, run: usize, proxy: bool) -> Result<Figure> {
    let sockets = tempfile::Builder::new().prefix("pbsn-").tempdir_in("/tmp")?;
    let snapshotter = sockets.path().join("run").join("s.sock");
    let ctd = if proxy { Containerd::start_with_proxy("pullbox", &snapshotter)? } else { Containerd::start()? };
    let mut config = format!(
        "backend = \"containerd\"\n[containerd]\naddress = {:?}\nnamespace = \"bench{run}\"\n",
        ctd.socket().display().to_string()
    );
    if proxy {
        let address = snapshotter.display().to_string();
        config.push_str(&format!("snapshotter = \"pullbox\"\n[snapshotter]\naddress = {address:?}\n"));
    }
    let daemon = cri::Daemon::start(&config)?;
    let mut client = cri::connect(daemon.socket()).await?;
    client.list_images(ListImagesRequest::default()).await?; // warm the puller
    let t = Instant::now();
    client
        .pull_image(PullImageRequest { image: spec(reference), ..PullImageRequest::default() })
        .await
        .map_err(|e| anyhow::anyhow!("{e:?}\n{}", daemon.log()))?;
    let wall = t.elapsed().as_secs_f64();
    let rss = vm_hwm(&format!("--config {}/config.toml", daemon.dir().display())).unwrap_or(0);
    Ok(Figure { wall, rss_kib: rss, daemon_rss_kib: containerd_hwm(&ctd) })
}

fn ctr_pull(reference: &str, run: usize) -> Result<Figure> {
    let ctd = Containerd::start()?;
    let mut cmd = Command::new(pullbox_tests::containerd::CTR_BIN);
    cmd.arg("--address").arg(ctd.socket()).args([
        "-n",
        &format!("ctr{run}"),
        "images",
        "pull",
        "--plain-http",
        reference,
    ]);
    let mut f = timed(cmd)?;
    f.daemon_rss_kib = containerd_hwm(&ctd);
    Ok(f)
}

fn skopeo_copy(reference: &str) -> Result<Figure> {
    let dir = tempfile::Builder::new().prefix("pbbench-skopeo-").tempdir()?;
    let mut cmd = Command::new("skopeo");
    cmd.args(["--insecure-policy", "copy", "--quiet", "--preserve-digests", "--src-tls-verify=false"])
        .arg(format!("docker://{reference}"))
        .arg(format!("oci:{}:x", dir.path().display()));
    timed(cmd)
}

/// `tar` extracting each layer blob into its own directory: `parallel` all at once.
fn tar_extract(layout: &Path, image: &Image, parallel: bool) -> Result<Figure> {
    let dir = tempfile::Builder::new().prefix("pbbench-tar-").tempdir()?;
    let mut script = String::new();
    for (i, l) in image.layers.iter().enumerate() {
        let blob = layout.join("blobs/sha256").join(oci::digest_hex(&l.digest));
        let z = if l.media_type == ZSTD_LAYER { "--zstd" } else { "-z" };
        script.push_str(&format!(
            "mkdir {d}/{i} && tar {z} -xf {b} -C {d}/{i}{sep}\n",
            d = dir.path().display(),
            b = blob.display(),
            sep = if parallel { " &" } else { " || exit 1" }
        ));
    }
    if parallel {
        script.push_str("wait\n");
    }
    let mut cmd = Command::new("/bin/sh");
    cmd.arg("-c").arg(script);
    timed(cmd)
}

// ---- the scratch filesystem ---------------------------------------------------------------

/// The size of the scratch filesystem: the largest image unpacked by one tool, its blobs and
/// the registry's copy fit many times over (outputs are deleted after each measurement).
const SCRATCH_BYTES: u64 = 24 << 30;

/// A fresh ext4 filesystem (with a journal, as `mkfs.ext4` makes it and as nodes run) in a
/// sparse file under `target/`, loop-mounted in `/tmp`; every tool writes into it (it becomes
/// `TMPDIR`). Unmounted and deleted on drop.
///
/// Why not the machine's own disk: its ext4 may run without a journal (this machine's does),
/// and there ext4 refuses to reuse an inode freed in the last 60 seconds (300 more while its
/// table block is dirty; `recently_deleted` in `fs/ext4/ialloc.c`), checking each candidate
/// in turn. A tool that creates 15,000 files right after the previous tool's output was
/// deleted then spends a third of its time in that scan (measured with `perf`: pullbox's
/// `multi` pull varied from 2.5 to 4.9 s by it), and which tool pays depends on the order.
struct ScratchFs {
    image: PathBuf,
    mount: PathBuf,
}

impl ScratchFs {
    fn create() -> Result<ScratchFs> {
        let image = Pullbox::workspace().join("target/bench-scratch.ext4");
        let mount = PathBuf::from(format!("/tmp/pbbench-fs-{}", std::process::id()));
        let _ = fs::remove_file(&image);
        fs::File::create(&image)?.set_len(SCRATCH_BYTES)?;
        fs::create_dir_all(&mount)?;
        let scratch = ScratchFs { image, mount };
        // Inode tables and journal written now, not by a background thread during the runs.
        let mut mkfs = Command::new("mkfs.ext4");
        mkfs.args(["-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0"]).arg(&scratch.image);
        pullbox_tests::process::tool(&mut mkfs)?;
        let mut mount = Command::new("mount");
        mount.args(["-o", "loop"]).arg(&scratch.image).arg(&scratch.mount);
        pullbox_tests::process::tool(&mut mount)?;
        Ok(scratch)
    }
}

impl Drop for ScratchFs {
    /// Unmounts once the services that used it are gone (their supervisors delete their
    /// directories after they exit): tries for 10 s, then detaches it lazily.
    fn drop(&mut self) {
        let umount = |lazy: bool| {
            let mut cmd = Command::new("umount");
            cmd.args(lazy.then_some("-l")).arg(&self.mount).stderr(Stdio::null());
            cmd.status().is_ok_and(|s| s.success())
        };
        let deadline = Instant::now() + std::time::Duration::from_secs(10);
        while !umount(false) {
            if Instant::now() > deadline {
                umount(true);
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
        let _ = fs::remove_dir(&self.mount);
        let _ = fs::remove_file(&self.image);
    }
}

// ---- the table -------------------------------------------------------------------------

fn mb(kib: u64) -> String {
    format!("{:.0} MB", kib as f64 * 1024.0 / 1e6)
}

struct Row {
    image: String,
    tool: &'static str,
    fig: Figure,
    /// Every run's wall time, in order.
    walls: Vec<f64>,
}

async fn pull_one(proxy: &str, reference: &str, n: usize) -> Result<f64> {
    let daemon = cri::Daemon::start("")?;
    let client = cri::connect(daemon.socket()).await?;
    client.clone().list_images(ListImagesRequest::default()).await?;
    let reference = format!("{proxy}/{reference}");
    let t = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..n {
        let mut c = cri::connect(daemon.socket()).await?;
        let r = reference.clone();
        tasks.push(tokio::spawn(async move {
            c.pull_image(PullImageRequest { image: spec(&r), ..PullImageRequest::default() }).await
        }));
    }
    for task in tasks {
        task.await?.map_err(|e| anyhow::anyhow!("{e:?}\n{}", daemon.log()))?;
    }
    Ok(t.elapsed().as_secs_f64())
}

/// How many `ListImages` calls [`list_images_1000`] times: `PULLBOX_BENCH_LIST_CALLS`, default 21.
fn list_calls() -> usize {
    std::env::var("PULLBOX_BENCH_LIST_CALLS").ok().and_then(|s| s.parse().ok()).unwrap_or(21).max(1)
}

/// 1,000 images (distinct configs, one shared tiny layer) pulled over CRI into an embedded
/// daemon; returns (time to pull them all, ListImages median, ListImages max, count,
/// ImageFsInfo median, ImageFsInfo max).
async fn list_images_1000(registry: &Registry) -> Result<(f64, f64, f64, usize, f64, f64)> {
    const N: usize = 1000;
    let addr = registry.addr();
    let scratch = tempfile::tempdir()?;
    fs::create_dir_all(scratch.path().join("blobs/sha256"))?;
    let mut tar = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_size(6);
    h.set_mode(0o644);
    tar.append_data(&mut h, "hello", &b"hello\n"[..])?;
    let tar_bytes = tar.into_inner()?;
    let diff_id = oci::sha256_digest(&tar_bytes);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&tar_bytes)?;
    let layer_bytes = gz.finish()?;
    let layer = Layer {
        media_type: GZIP_LAYER,
        digest: oci::sha256_digest(&layer_bytes),
        size: layer_bytes.len() as u64,
        diff_id,
        unpacked: 0,
    };
    upload(addr, "bench/many", &layer_bytes)?;
    let t = Instant::now();
    for i in 0..N {
        let (_, _, manifest) = image_json(scratch.path(), std::slice::from_ref(&layer), &format!("n{i}"))?;
        let m: Value = serde_json::from_slice(&manifest)?;
        let config = fs::read(
            scratch.path().join("blobs/sha256").join(oci::digest_hex(m["config"]["digest"].as_str().unwrap())),
        )?;
        upload(addr, "bench/many", &config)?;
        registry.put_manifest("bench/many", &format!("t{i}"), MANIFEST, &manifest)?;
    }
    eprintln!("pushed {N} images in {:.1} s", t.elapsed().as_secs_f64());
    let daemon = Arc::new(cri::Daemon::start("")?);
    let client = cri::connect(daemon.socket()).await?;
    client.clone().list_images(ListImagesRequest::default()).await?;
    let t = Instant::now();
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..8 {
        let (mut c, next, addr, daemon) = (client.clone(), next.clone(), addr.to_owned(), daemon.clone());
        workers.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= N {
                    return Ok::<_, anyhow::Error>(());
                }
                c.pull_image(PullImageRequest {
                    image: spec(&format!("{addr}/bench/many:t{i}")),
                    ..PullImageRequest::default()
                })
                .await
                .map_err(|e| anyhow::anyhow!("{e:?}\n{}", daemon.log()))?;
            }
        }));
    }
    for w in workers {
        w.await??;
    }
    let pull_all = t.elapsed().as_secs_f64();
    let mut times = Vec::new();
    let mut count = 0;
    for _ in 0..list_calls() {
        let t = Instant::now();
        let r = client.clone().list_images(ListImagesRequest::default()).await?.into_inner();
        times.push(t.elapsed().as_secs_f64() * 1e3);
        count = r.images.len();
    }
    times.sort_by(f64::total_cmp);
    let mut fs_times = Vec::new();
    for _ in 0..list_calls() {
        let t = Instant::now();
        client.clone().image_fs_info(ImageFsInfoRequest {}).await?;
        fs_times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    fs_times.sort_by(f64::total_cmp);
    Ok((
        pull_all,
        times[times.len() / 2],
        times[times.len() - 1],
        count,
        fs_times[fs_times.len() / 2],
        fs_times[fs_times.len() - 1],
    ))
}

/// Runs [`list_images_1000`] and prints its figures.
async fn list_images_report(registry: &Registry) -> Result<()> {
    let (pull_all, median, max, count, fs_median, fs_max) = list_images_1000(registry).await?;
    println!(
        "ListImages over {count} images (embedded daemon): median {median:.2} ms, max {max:.2} ms of {} calls; \
         pulling them (8 at a time) took {pull_all:.1} s",
        list_calls()
    );
    println!(
        "ImageFsInfo over {count} images (embedded daemon): median {fs_median:.2} ms, max {fs_max:.2} ms of {} calls",
        list_calls()
    );
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    let scale: f64 = std::env::var("PULLBOX_BENCH_SCALE").ok().and_then(|s| s.parse().ok()).unwrap_or(1.0);
    let runs: usize = std::env::var("PULLBOX_BENCH_RUNS").ok().and_then(|s| s.parse().ok()).unwrap_or(1);
    let started = Instant::now();
    if std::env::var("PULLBOX_BENCH_ONLY").is_ok_and(|v| v == "list") {
        return list_images_report(&Registry::start()?).await;
    }
    // `PULLBOX_BENCH_ONLY=multi,zstd` and `PULLBOX_BENCH_TOOLS=tar,embedded`: a part of the table.
    let words = |var: &str| -> Option<Vec<String>> {
        std::env::var(var).ok().map(|v| v.split(',').map(|w| w.trim().to_owned()).filter(|w| !w.is_empty()).collect())
    };
    let only_images = words("PULLBOX_BENCH_ONLY");
    let only_tools = words("PULLBOX_BENCH_TOOLS");
    let partial = only_images.is_some() || only_tools.is_some();
    let (layout, mut images) = build_images(scale)?;
    let scratch = ScratchFs::create()?;
    // Every tool's output, the daemons' roots and containerd's directories go there. Set
    // before any thread of this process reads the environment.
    std::env::set_var("TMPDIR", &scratch.mount);
    eprintln!("scratch filesystem: ext4 on {} at {}", scratch.image.display(), scratch.mount.display());
    if let Some(tags) = &only_images {
        images.retain(|i| tags.iter().any(|t| t == i.tag));
        ensure!(!images.is_empty(), "PULLBOX_BENCH_ONLY names none of multi, big, zstd (or list)");
    }
    let wanted = |tool: &str| only_tools.as_ref().is_none_or(|ws| ws.iter().any(|w| tool.contains(w.as_str())));
    let registry = Registry::start()?;
    for image in &images {
        oci::skopeo_copy(
            &format!("oci:{}:{}", layout.display(), image.tag),
            &format!("docker://{}/bench/{}:1", registry.addr(), image.tag),
            &[],
        )?;
    }
    eprintln!("pushed to {} ({:.1} s so far)", registry.addr(), started.elapsed().as_secs_f64());

    let mut rows: Vec<Row> = Vec::new();
    let mut run_id = 0;
    for image in &images {
        let reference = format!("{}/bench/{}:1", registry.addr(), image.tag);
        let name = format!(
            "{} ({} layer{}, {:.0} MB {}, {:.0} MB unpacked)",
            image.tag,
            image.layers.len(),
            if image.layers.len() == 1 { "" } else { "s" },
            image.compressed() as f64 / 1e6,
            if image.layers[0].media_type == ZSTD_LAYER { "zstd" } else { "gzip" },
            image.unpacked() as f64 / 1e6
        );
        // Each tool `runs` times; the row keeps the fastest wall and the largest RSS.
        let mut best = |tool: &'static str, f: Figure| {
            if let Some(r) = rows.iter_mut().find(|r| r.image == name && r.tool == tool) {
                r.walls.push(f.wall);
                r.fig.wall = r.fig.wall.min(f.wall);
                r.fig.rss_kib = r.fig.rss_kib.max(f.rss_kib);
                r.fig.daemon_rss_kib = r.fig.daemon_rss_kib.max(f.daemon_rss_kib);
            } else {
                rows.push(Row { image: name.clone(), tool, walls: vec![f.wall], fig: f });
            }
        };
        for _ in 0..runs {
            run_id += 1;
            eprintln!("[{:.0} s] {} run {run_id}", started.elapsed().as_secs_f64(), image.tag);
            if wanted("tar, one after another") {
                best("tar, one after another", tar_extract(&layout, image, false)?);
            }
            if wanted("tar, all in parallel") {
                best("tar, all in parallel", tar_extract(&layout, image, true)?);
            }
            if wanted("ctr images pull") {
                best("ctr images pull", ctr_pull(&reference, run_id)?);
            }
            if wanted("pullbox pull (embedded)") {
                best("pullbox pull (embedded)", pullbox_cli(&reference, &[])?);
            }
            if wanted("pullbox pull --sync-fs (embedded)") {
                best("pullbox pull --sync-fs (embedded)", pullbox_cli(&reference, &["--sync-fs"])?);
            }
            if wanted("pullbox serve -> containerd") {
                best("pullbox serve -> containerd", pullbox_containerd(&reference, run_id, false).await?);
            }
            if wanted("pullbox serve -> containerd (pullbox snapshotter)") {
                best(
                    "pullbox serve -> containerd (pullbox snapshotter)",
                    pullbox_containerd(&reference, run_id, true).await?,
                );
            }
            if wanted("skopeo copy (download only)") {
                best("skopeo copy (download only)", skopeo_copy(&reference)?);
            }
        }
    }

    println!();
    println!(
        "pullbox pull benchmark: {} cores, scale {scale}, best of {runs} run(s); RSS = peak resident set (daemon: VmHWM)",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
    );
    println!(
        "{:<58} {:<50} {:>8} {:>8} {:>8} {:>9} {:>12}  every run's wall s",
        "image", "tool", "wall s", "×ctr", "×par.tar", "RSS", "containerd"
    );
    for r in &rows {
        let ctr = rows.iter().find(|x| x.image == r.image && x.tool == "ctr images pull").map(|x| x.fig.wall);
        let par = rows.iter().find(|x| x.image == r.image && x.tool == "tar, all in parallel").map(|x| x.fig.wall);
        println!(
            "{:<58} {:<50} {:>8.2} {:>8.2} {:>8.2} {:>9} {:>12}  {}",
            r.image,
            r.tool,
            r.fig.wall,
            ctr.map_or(f64::NAN, |c| r.fig.wall / c),
            par.map_or(f64::NAN, |p| r.fig.wall / p),
            mb(r.fig.rss_kib),
            r.fig.daemon_rss_kib.map(mb).unwrap_or_default(),
            r.walls.iter().map(|w| format!("{w:.2}")).collect::<Vec<_>>().join(" ")
        );
    }

    if partial {
        println!();
        println!("total benchmark time {:.0} s (a part of the table only)", started.elapsed().as_secs_f64());
        return Ok(());
    }
    // 20 concurrent pulls of one image through a counting proxy, against one pull.
    let multi = &images[0];
    let proxy = FaultServer::proxy(registry.addr())?;
    let single = pull_one(proxy.addr(), "bench/multi:1", 1).await?;
    let single_gets = proxy.requests().iter().filter(|r| r.method == "GET" && r.path.contains("/blobs/")).count();
    let proxy = FaultServer::proxy(registry.addr())?;
    let twenty = pull_one(proxy.addr(), "bench/multi:1", 20).await?;
    let requests = proxy.requests();
    let mut per_blob = Vec::new();
    for l in &multi.layers {
        per_blob.push(requests.iter().filter(|r| r.method == "GET" && r.path.contains(&l.digest)).count());
    }
    let blob_gets = requests.iter().filter(|r| r.method == "GET" && r.path.contains("/blobs/")).count();
    println!();
    println!(
        "20 concurrent CRI pulls of multi (embedded, through a counting HTTP/1.1 proxy, one connection per request):"
    );
    println!(
        "  1 pull: {single:.2} s ({single_gets} blob GETs); 20 pulls: {twenty:.2} s = {:.2}× one pull",
        twenty / single
    );
    println!(
        "  blob GETs in the 20 pulls: {blob_gets} (layer GETs per layer: {per_blob:?}); all requests: {}",
        requests.len()
    );

    println!();
    list_images_report(&registry).await?;
    println!();
    println!("total benchmark time {:.0} s", started.elapsed().as_secs_f64());
    Ok(())
}
