//! The sandbox suite: configure, start and live reload.

use super::*;

/// Polls the daemon's log, from byte `from`, until it reports a failed reload; returns what
/// it logged since `from`.
async fn wait_failed_reload(d: &SwapDaemon, from: usize) -> String {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let log = d.daemon.log();
        let new = log.get(from..).unwrap_or_default();
        if new.contains("reload failed") {
            return new.to_owned();
        }
        assert!(Instant::now() < deadline, "the daemon did not log a failed reload in 15 s:\n{new}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub(super) async fn a_reload_that_traps_or_loops_keeps_the_last_good_puller(b: Backend) {
    let port = pullbox_tests::service::free_port().unwrap();
    let d = hostile_daemon(b, &format!("metrics_address = \"127.0.0.1:{port}\"\n{SANDBOX}"));
    let idle = json!({"behavior": "idle"}).to_string();
    d.wait_for(Some(&idle)).await.unwrap();
    let garbage = d.settings_path().with_file_name("garbage.wasm");
    std::fs::write(&garbage, b"\0asm\x0d\0\x01\0 not really").unwrap();
    let cases = [
        (None, json!({"behavior": "loop-in-configure"}).to_string(), "CPU time limit"),
        (None, json!({"behavior": "trap-in-configure"}).to_string(), "unreachable"),
        (None, json!({"behavior": "no-such-behaviour"}).to_string(), "no-such-behaviour"),
        (Some(garbage.as_path()), idle.clone(), "cannot load puller"),
    ];
    for (puller, settings, needle) in &cases {
        let from = d.daemon.log().len();
        let t = Instant::now();
        d.swap(*puller, settings).unwrap();
        let logged = wait_failed_reload(&d, from).await;
        eprintln!("reload with {settings} refused after {:?}", t.elapsed());
        assert!(logged.contains(needle), "the failed reload with {settings} does not mention {needle:?}:\n{logged}");
        // Still the last good puller and settings, answering at once.
        assert_eq!(pullbox_tests::sandbox::whoami(d.daemon.socket()).await.unwrap().as_deref(), Some(idle.as_str()));
        still_serves(&d, &format!("a refused reload ({settings})")).await;
    }
    let out =
        std::process::Command::new("curl").args(["-sf", &format!("http://127.0.0.1:{port}/metrics")]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let failed = text
        .lines()
        .find_map(|l| l.strip_prefix("pullbox_puller_reloads_total{result=\"error\"} "))
        .and_then(|v| v.trim().parse::<u64>().ok());
    assert!(failed >= Some(cases.len() as u64), "failed reloads not counted: {failed:?}\n{text}");
    good_pull(&d, "refused reloads").await;
}

pub(super) fn the_daemon_does_not_start_with_a_configure_that_traps_or_loops(b: Backend) {
    let hostile = hostile().unwrap();
    for (behavior, needle) in [("loop-in-configure", "CPU time limit"), ("trap-in-configure", "unreachable")] {
        let t = Instant::now();
        let err = match SwapDaemon::start(b, &hostile, &json!({"behavior": behavior}).to_string(), SANDBOX) {
            Ok(_) => panic!("the daemon started with {behavior}"),
            Err(e) => format!("{e:#}"),
        };
        assert!(err.contains(needle), "{behavior}: {err}");
        assert!(t.elapsed() < Duration::from_secs(10), "{behavior}: start took {:?}", t.elapsed());
    }
}
