//! The sandbox suite: load-time checks.

use super::cli::pullbox;
use super::*;

/// A component that does not fit the world is refused by `policy check`, `pull --puller` and
/// `serve`, each naming what is wrong.
pub(super) fn components_that_do_not_fit_are_refused_naming_what_is_wrong(b: Backend) {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let same = |_: &str, t: String| t;
    let extra_wit = "package pullbox:image@0.2.0;\n\
        interface shell { exec: func(command: string) -> string; }\n\
        world extra-import { include puller-world; import shell; }\n\
        world wasi-import { include puller-world; import wasi:cli/environment@0.2.0; }\n\
        world no-export { import log; import content; }\n";
    let wasi =
        "package wasi:cli@0.2.0;\ninterface environment { get-environment: func() -> list<tuple<string, string>>; }\n";
    let base =
        wit_copy(&w.join("wit"), same, &[("hostile-test.wit", extra_wit), ("deps/wasi-cli/environment.wit", wasi)])
            .unwrap();
    let lacking = wit_copy(
        &w.join("wit-lacking"),
        |name, t| {
            if name == "world.wit" {
                drop_function(&t, "remove-image")
            } else {
                t
            }
        },
        &[],
    )
    .unwrap();
    let extra_fn = wit_copy(
        &w.join("wit-extra-fn"),
        |name, t| {
            if name == "content.wit" {
                t.replacen("max-read: func() -> u32;", "max-read: func() -> u32;\n    exec: func(command: string);", 1)
            } else {
                t
            }
        },
        &[],
    )
    .unwrap();
    let wrong_type = wit_copy(
        &w.join("wit-wrong-type"),
        |name, t| {
            if name == "world.wit" {
                t.replace("configure: func(settings: string)", "configure: func(settings: u32)")
            } else {
                t
            }
        },
        &[],
    )
    .unwrap();
    let next_version =
        wit_copy(&w.join("wit-next"), |_, t| t.replace("pullbox:image@0.2.0", "pullbox:image@0.3.0"), &[]).unwrap();
    let out = w.join("out");
    std::fs::create_dir_all(&out).unwrap();
    let keep = |t: String| t;
    let cases: Vec<(PathBuf, &[&str])> = vec![
        (build_component(&base, "extra-import", &out, keep).unwrap(), &["pullbox:image/shell@0.2.0"]),
        (build_component(&base, "wasi-import", &out, keep).unwrap(), &["wasi:cli/environment@0.2.0"]),
        (build_component(&base, "no-export", &out, keep).unwrap(), &["pullbox:image/puller@0.2.0"]),
        (build_component(&lacking, "puller-world", &w.join("out-lacking"), keep).unwrap(), &["remove-image"]),
        (build_component(&extra_fn, "puller-world", &w.join("out-extra-fn"), keep).unwrap(), &["exec"]),
        (build_component(&wrong_type, "puller-world", &w.join("out-wrong-type"), keep).unwrap(), &["configure"]),
        (build_component(&next_version, "puller-world", &w.join("out-next"), keep).unwrap(), &["@0.3.0"]),
    ];
    let pb = pullbox(b);
    // Every case is checked before the test fails, so one run lists every gap.
    let mut wrong = Vec::new();
    for (component, needles) in &cases {
        for (what, out) in [
            ("policy check", pb.run("policy", ["check".as_ref(), component.as_os_str()])),
            ("pull --puller", pb.run("pull", ["--puller".as_ref(), component.as_os_str(), app().as_ref()])),
        ] {
            eprintln!("{what} {}: {}", component.display(), out.stderr.trim());
            if out.success() || needles.iter().any(|n| !out.stderr.contains(n)) || out.stderr.contains("unreachable") {
                wrong.push(format!(
                    "{what} {}: wanted a refusal naming {needles:?} before running it:\n{out}",
                    component.display()
                ));
            }
        }
        let config = format!("puller = {:?}", component.display().to_string());
        match cri::Daemon::start(&pb.store().daemon_config(&config)) {
            Ok(_) => wrong.push(format!("serve started with {}", component.display())),
            Err(e) => {
                let err = format!("{e:#}");
                if needles.iter().any(|n| !err.contains(n)) {
                    wrong.push(format!("serve with {}: wanted {needles:?}: {err}", component.display()));
                }
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n\n"));
    pb.assert_clean("refused components");
}

/// A WIT text with the function `name` (one line) removed.
fn drop_function(wit: &str, name: &str) -> String {
    let mut out = String::new();
    let mut skip_docs = Vec::new();
    for line in wit.lines() {
        if line.trim_start().starts_with("///") {
            skip_docs.push(line);
            continue;
        }
        if line.trim_start().starts_with(&format!("{name}: func")) {
            skip_docs.clear();
            continue;
        }
        for d in skip_docs.drain(..) {
            out.push_str(d);
            out.push('\n');
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// Memories and tables that a component declares up front count against the limits at
/// instantiation.
#[test]
fn oversized_memories_and_tables_are_refused_at_instantiation() {
    let work = tempfile::tempdir().unwrap();
    let wit = wit_copy(&work.path().join("wit"), |_, t| t, &[]).unwrap();
    // 256 MiB of initial memory; the default limit is 64 MiB.
    let big_memory =
        build_component(&wit, "puller-world", &work.path().join("mem"), |t| replace_memory(&t, "(memory (;0;) 4096)"))
            .unwrap();
    // A table of ten million entries.
    let big_table = build_component(&wit, "puller-world", &work.path().join("table"), |t| {
        add_before_first_func(&t, "  (table (;9;) 10000000 funcref)\n")
    })
    .unwrap();
    let pb = pullbox(Backend::Embedded);
    for (component, needle) in [(big_memory, "memory"), (big_table, "table")] {
        let out = pb.run("policy", ["check".as_ref(), component.as_os_str()]);
        eprintln!("policy check {}: {}", component.display(), out.stderr.trim());
        out.assert_failure().assert_stderr_contains(needle);
        assert!(!out.stderr.contains("unreachable"), "the component was run: {out}");
    }
}

/// The dummy module's memory declaration replaced by `decl`.
fn replace_memory(wat: &str, decl: &str) -> String {
    let mut out = String::new();
    let mut done = false;
    for line in wat.lines() {
        if !done && line.trim_start().starts_with("(memory ") {
            out.push_str(&format!("  {decl}\n"));
            done = true;
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    assert!(done, "no memory in the dummy module:\n{wat}");
    out
}

/// `text` inserted before the module's first function definition (after imports and types).
fn add_before_first_func(wat: &str, text: &str) -> String {
    let i = wat.find("\n  (func ").expect("no function in the dummy module");
    format!("{}\n{}{}", &wat[..i], text, &wat[i + 1..])
}
