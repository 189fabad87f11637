//! The sandbox suite: time.

use super::*;

pub(super) async fn time_in_host_imports_does_not_count_against_the_cpu_limit(b: Backend) {
    let slow = slow_server(Duration::from_millis(1500)).unwrap();
    let doc = json!({
        "behavior": "sleepy",
        "resolve": [format!("{}/slow/image:1", slow.addr())],
        "reads": 2000,
    })
    .to_string();
    let d = SwapDaemon::start(b, &hostile().unwrap(), &doc, "[sandbox]\ncpu_limit_ms = 300\n").unwrap();
    let mut c = cri::connect(d.daemon.socket()).await.unwrap();
    let t = Instant::now();
    let pulled = c
        .pull_image(pull_req(&app()))
        .await
        .unwrap_or_else(|e| panic!("sleepy was stopped: {e:?}\n{}", d.daemon.log()))
        .into_inner();
    let took = t.elapsed();
    eprintln!("sleepy: {took:?} for a pull with a CPU limit of 300 ms");
    assert_eq!(pulled.image_ref, fixture().app.manifest_digest);
    assert!(took >= Duration::from_millis(1500), "sleepy took only {took:?}: the slow server was not waited for");
}

pub(super) async fn looping_pullers_do_not_starve_other_requests(b: Backend) {
    let cpu = Duration::from_millis(3000);
    let d = SwapDaemon::start(
        b,
        &hostile().unwrap(),
        &json!({"behavior": "loop-in-pull"}).to_string(),
        &format!("[sandbox]\ncpu_limit_ms = {}\n", cpu.as_millis()),
    )
    .unwrap();
    // Distinct references, so that no pull waits for another of the same image.
    let started = Instant::now();
    // One more looping guest than the daemon's async runtime has worker threads (one per core).
    let n = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2) + 1;
    let loops: Vec<_> = (0..n)
        .map(|i| {
            let socket = d.daemon.socket().to_owned();
            tokio::spawn(async move {
                let mut c = cri::connect(&socket).await.unwrap();
                let t = Instant::now();
                let r = c.pull_image(pull_req(&format!("pullbox-hostile/loop-{i}:1"))).await;
                (r, t.elapsed())
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut c = cri::connect(d.daemon.socket()).await.unwrap();
    let mut worst = Duration::ZERO;
    for _ in 0..10 {
        let t = Instant::now();
        c.list_images(ListImagesRequest::default()).await.unwrap();
        c.image_status(ImageStatusRequest { image: spec(WHOAMI), verbose: false }).await.unwrap();
        c.image_fs_info(ImageFsInfoRequest {}).await.unwrap();
        worst = worst.max(t.elapsed());
    }
    let served = started.elapsed();
    eprintln!("while {n} guests loop: 10 x (ListImages, ImageStatus, ImageFsInfo), the slowest {worst:?}, all done {served:?} after the loops started");
    // An idle daemon answers in milliseconds; a starved one only once the loops end (after
    // `cpu`). 1 s leaves room for a loaded 2-core machine without blurring the two.
    assert!(worst < Duration::from_millis(1000), "a request took {worst:?} while guests looped");
    assert!(served < cpu, "the requests were answered only after {served:?}, when the loops were stopped");
    for l in loops {
        let (r, took) = l.await.unwrap();
        let status = r.expect_err("a looping pull succeeded");
        Expect::cpu(cpu).check("looping pull", &status, took);
    }
    good_pull(&d, "looping pulls").await;
}
