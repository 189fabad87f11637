//! `make demo`: pullbox's main job on a machine without internet.
//!
//! Starts Debian's `docker-registry` on a free loopback port, builds the test images from
//! `busybox-static` and generated files with `umoci` and pushes them with `skopeo` (the same
//! fixture the integration tests use), then runs the real `pullbox` binary with the default
//! puller against it: `pull`, `images`, `inspect`. The store root is the first argument
//! (default `target/demo-root`) and is kept, so the pulled image can be looked at afterwards.

use std::{path::PathBuf, process::Command};

use anyhow::{ensure, Context, Result};
use pullbox_tests::{Fixture, Pullbox};

fn main() -> Result<()> {
    let root = std::env::args_os().nth(1).map(PathBuf::from).unwrap_or_else(|| PathBuf::from("target/demo-root"));
    eprintln!("==> starting a registry and pushing a 3-layer image built with umoci");
    let fixture = Fixture::build()?;
    let reference = fixture.reference("team/app:1.0");
    let bin = Pullbox::bin()?;
    let run = |args: &[&str]| -> Result<()> {
        eprintln!("==> pullbox {}", args.join(" "));
        let status = Command::new(&bin)
            .args(args)
            .arg("--root")
            .arg(&root)
            .status()
            .with_context(|| format!("cannot run {}", bin.display()))?;
        ensure!(status.success(), "pullbox {} failed ({status})", args.join(" "));
        Ok(())
    };
    run(&["pull", &reference])?;
    run(&["images"])?;
    run(&["inspect", &reference])?;
    eprintln!("==> done: the image is in {}", root.display());
    Ok(())
}
