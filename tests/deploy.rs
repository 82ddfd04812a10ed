//! Two replicas behind the load balancers of `deploy/` (nginx, HAProxy), each proxy run with its
//! file from `deploy/` as it is but for ports and paths: streaming through the proxy, a
//! session's upload and watchers on one replica, a replica killed mid-way, and draining or full
//! replicas taken out of rotation. `scripts/setup.sh` installs nginx-light and haproxy.
//!
//! Run with `--nocapture` to see the time to the first detection through each proxy against
//! direct, and the latency each proxy adds to an event.

use std::collections::HashMap;
use std::io::{BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::decode::fixtures;
use crate::server::{Server, get, read_chunk, read_response_head, upload_with};

#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    Nginx,
    Haproxy,
}

/// A load balancer from `deploy/` in front of two replicas, stopped when dropped.
struct Proxy {
    child: Child,
    addr: String,
    /// The proxy's files and log, removed with it.
    _dir: tempfile::TempDir,
}

impl Proxy {
    fn start(kind: Kind, replicas: [&str; 2]) -> Proxy {
        let dir = tempfile::tempdir().unwrap();
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let file = |name: &str, edits: &[(&str, String)]| {
            let mut text = std::fs::read_to_string(crate::support::root().join("deploy").join(name)).unwrap();
            for (from, to) in [("127.0.0.1:8081", replicas[0].to_string()), ("127.0.0.1:8082", replicas[1].to_string())].iter().chain(edits) {
                assert!(text.contains(from), "deploy/{name} no longer has {from:?}: update this test");
                text = text.replace(from, to);
            }
            text
        };
        let path = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
        let log = std::fs::File::create(dir.path().join("proxy.log")).unwrap();
        let mut command = match kind {
            Kind::Nginx => {
                std::fs::write(dir.path().join("streamdet.conf"), file("nginx.conf", &[("listen 8080;", format!("listen {port};"))])).unwrap();
                // What Debian's /etc/nginx/nginx.conf holds, with this test's paths.
                let user = if running_as_root() { "user root;" } else { "" };
                let main = format!(
                    "{user}\npid {pid};\nerror_log {log} notice;\nevents {{ worker_connections 512; }}\nhttp {{\n  access_log {access};\n  client_body_temp_path {tmp}/body;\n  proxy_temp_path {tmp}/proxy;\n  fastcgi_temp_path {tmp}/fastcgi;\n  uwsgi_temp_path {tmp}/uwsgi;\n  scgi_temp_path {tmp}/scgi;\n  include {site};\n}}\n",
                    pid = path("nginx.pid"),
                    log = path("error.log"),
                    access = path("access.log"),
                    tmp = dir.path().display(),
                    site = path("streamdet.conf"),
                );
                std::fs::write(dir.path().join("nginx.conf"), main).unwrap();
                let mut command = Command::new(program("nginx"));
                command.args(["-p", &path(""), "-c", &path("nginx.conf"), "-g", "daemon off;"]);
                command
            }
            Kind::Haproxy => {
                // HAProxy logs to a syslog socket: this test's own, whose lines go to access.log.
                let syslog = std::os::unix::net::UnixDatagram::bind(dir.path().join("log.sock")).unwrap();
                let mut access = std::fs::File::create(dir.path().join("access.log")).unwrap();
                thread::spawn(move || {
                    let mut line = [0u8; 4096];
                    while let Ok(n) = syslog.recv(&mut line) {
                        let _ = access.write_all(&line[..n]).and_then(|()| access.write_all(b"\n"));
                    }
                });
                let edits = [("bind :8080", format!("bind :{port}")), ("/run/haproxy/admin.sock", path("admin.sock")), ("/dev/log", path("log.sock"))];
                std::fs::write(dir.path().join("haproxy.cfg"), file("haproxy.cfg", &edits)).unwrap();
                let mut command = Command::new(program("haproxy"));
                command.args(["-f", &path("haproxy.cfg"), "-db"]);
                command
            }
        };
        let child =
            command.stdout(Stdio::null()).stderr(log).spawn().unwrap_or_else(|e| panic!("{kind:?} could not start ({e}); scripts/setup.sh installs it"));
        let addr = format!("127.0.0.1:{port}");
        let started = Instant::now();
        while TcpStream::connect(&addr).is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "{kind:?} did not listen: {}",
                std::fs::read_to_string(dir.path().join("proxy.log")).unwrap_or_default()
            );
            thread::sleep(Duration::from_millis(50));
        }
        Proxy { child, addr, _dir: dir }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if thread::panicking() {
            for log in ["proxy.log", "error.log", "access.log"] {
                if let Ok(text) = std::fs::read_to_string(self._dir.path().join(log)) {
                    eprintln!("--- {log}:\n{text}");
                }
            }
        }
        // SIGTERM, so that nginx's master stops its workers too.
        // SAFETY: kill sends a signal to our own child process.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        for _ in 0..50 {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn running_as_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("Uid:")).map(|l| l.split_whitespace().nth(1) == Some("0")))
        .unwrap_or(false)
}

/// Debian puts the proxies in /usr/sbin, which is not on every user's PATH.
fn program(name: &str) -> PathBuf {
    let sbin = Path::new("/usr/sbin").join(name);
    if sbin.exists() { sbin } else { PathBuf::from(name) }
}

/// A replica as `deploy/` expects it: its own name, the proxy trusted for client addresses.
fn replica(name: &str, listen: &str) -> Server {
    Server::start_on(
        listen,
        &[
            ("STREAMDET_SERVER_REPLICA", name),
            ("STREAMDET_SERVER_TRUSTED_PROXIES", "127.0.0.1"),
            ("STREAMDET_SERVER_MAX_SESSIONS", "3"),
            // Every test client is 127.0.0.1.
            ("STREAMDET_SERVER_MAX_SESSIONS_PER_CLIENT", "0"),
            ("STREAMDET_SERVER_SHUTDOWN_GRACE_S", "30"),
        ],
    )
}

/// One event of a stream: when it arrived, whether the upload had finished by then, the event.
struct Arrival {
    at: Instant,
    upload_finished: bool,
    event: Value,
}

/// Reads a response's events (NDJSON, or SSE without its comment lines) to the end of the
/// stream, or until the connection breaks.
fn read_events(reader: &mut BufReader<TcpStream>, sse: bool, upload_done: Option<&AtomicBool>) -> Vec<Arrival> {
    let separator: &[u8] = if sse { b"\n\n" } else { b"\n" };
    let mut pending = Vec::new();
    let mut events = Vec::new();
    while let Some(chunk) = read_chunk(reader) {
        let at = Instant::now();
        let upload_finished = upload_done.is_some_and(|done| done.load(Ordering::SeqCst));
        pending.extend_from_slice(&chunk);
        while let Some(end) = pending.windows(separator.len()).position(|w| w == separator) {
            let message: Vec<u8> = pending.drain(..end + separator.len()).collect();
            let text = String::from_utf8(message).unwrap();
            let json = if sse { text.lines().find_map(|l| l.strip_prefix("data: ")).map(str::to_string) } else { Some(text) };
            if let Some(json) = json.filter(|j| !j.trim().is_empty()) {
                events.push(Arrival { at, upload_finished, event: serde_json::from_str(&json).unwrap() });
            }
        }
    }
    events
}

fn last_type(events: &[Arrival]) -> Option<&str> {
    events.last().and_then(|a| a.event["type"].as_str())
}

/// Starts an upload to `path`; returns the status, the replica that answered and the reader.
fn start_upload(addr: &str, path: &str, body: Vec<u8>, piece: usize, pause: Duration) -> (u16, String, BufReader<TcpStream>, Arc<AtomicBool>) {
    let (mut reader, done) = upload_with(addr, path, "", body, piece, pause);
    let (status, headers) = read_response_head(&mut reader);
    let replica = headers.get("x-streamdet-replica").cloned().unwrap_or_default();
    (status, replica, reader, done)
}

/// A quick upload that runs one frame; returns the status and the replica that answered.
fn quick_session(addr: &str, query: &str) -> (u16, String) {
    let clip = std::fs::read(fixtures().join("clip.ts")).unwrap();
    let (status, replica, mut reader, _) = start_upload(addr, &format!("/detect/video?max_frames=1{query}"), clip, 64 << 10, Duration::ZERO);
    if status == 200 {
        assert_eq!(last_type(&read_events(&mut reader, false, None)), Some("end"));
    }
    (status, replica)
}

fn watch(addr: &str, id: &str) -> (u16, String, BufReader<TcpStream>) {
    watch_path(addr, &format!("/sessions/{id}/events"))
}

fn watch_path(addr: &str, path: &str) -> (u16, String, BufReader<TcpStream>) {
    let mut reader = get(addr, path, "Accept: text/event-stream\r\n");
    let (status, headers) = read_response_head(&mut reader);
    (status, headers.get("x-streamdet-replica").cloned().unwrap_or_default(), reader)
}

fn ready(addr: &str) -> (u16, Value) {
    crate::server::request(addr, &format!("GET /ready HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"), b"")
}

/// A throttled upload of the photo clip; returns how long after its first byte the first frame
/// event came, having checked that it came before the upload's last byte.
fn time_to_first_detection(addr: &str) -> Duration {
    let clip = std::fs::read(fixtures().join("photos.mp4")).unwrap();
    let started = Instant::now();
    let (status, _, mut reader, done) = start_upload(addr, "/detect/video?stride=5", clip, 8 << 10, Duration::from_millis(25));
    assert_eq!(status, 200);
    let events = read_events(&mut reader, false, Some(&done));
    let first = events.iter().find(|a| a.event["type"] == "frame").expect("a frame event");
    assert!(!first.upload_finished, "the first detection came only after the upload ended");
    assert_eq!(last_type(&events), Some("end"));
    first.at - started
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// Long enough for HAProxy's health check (`inter 1s fall 2`) to take a replica out.
const HAPROXY_CHECK_DELAY: Duration = Duration::from_millis(3500);

/// Everything `deploy/` promises, through one proxy.
fn replicas_behind(kind: Kind) {
    let mut replicas = [replica("r1", "127.0.0.1:0"), replica("r2", "127.0.0.1:0")];
    let addrs: Vec<String> = replicas.iter().map(|r| r.addr.clone()).collect();
    let proxy = Proxy::start(kind, [&addrs[0], &addrs[1]]);
    let tag = format!("{kind:?}").to_lowercase();
    let replica_addr = |name: &str| addrs[usize::from(name == "r2")].clone();

    // The request body streams through the proxy: the first detection comes before the
    // upload ends, as it does direct. (Each replica runs a session first, so that neither
    // timing includes a cold model.)
    for addr in &addrs {
        assert_eq!(quick_session(addr, "").0, 200);
    }
    let direct = time_to_first_detection(&addrs[0]);
    let through = time_to_first_detection(&proxy.addr);

    // A watcher through the proxy reaches the replica that will hold the upload and gets its
    // events while the upload goes on; a second watcher, direct, measures what the proxy adds.
    let id = format!("{tag}-stream-00000001");
    let (status, holder, mut via_proxy) = watch(&proxy.addr, &id);
    assert_eq!(status, 200);
    let (status, _, mut direct_watch) = watch(&replica_addr(&holder), &id);
    assert_eq!(status, 200);
    let clip = std::fs::read(fixtures().join("photos.mp4")).unwrap();
    let (status, uploaded_to, mut upload, done) =
        start_upload(&proxy.addr, &format!("/detect/video?stride=5&session={id}"), clip, 8 << 10, Duration::from_millis(25));
    assert_eq!((status, uploaded_to.as_str()), (200, holder.as_str()), "the upload and its watcher reach the same replica");
    let proxied = {
        let done = Arc::clone(&done);
        thread::spawn(move || read_events(&mut via_proxy, true, Some(&done)))
    };
    let direct_events = thread::spawn(move || read_events(&mut direct_watch, true, None));
    assert_eq!(last_type(&read_events(&mut upload, false, None)), Some("end"));
    let proxied = proxied.join().unwrap();
    let direct_events = direct_events.join().unwrap();
    assert!(proxied.iter().any(|a| a.event["type"] == "frame" && !a.upload_finished), "the watcher through {kind:?} got no event during the upload");
    assert_eq!(proxied.len(), direct_events.len());
    assert_eq!(last_type(&proxied), Some("end"));
    // Milliseconds by which each event reached the proxy's watcher after the direct one.
    let added: Vec<f64> =
        proxied.iter().zip(&direct_events).map(|(p, d)| (p.at.duration_since(d.at).as_secs_f64() - d.at.duration_since(p.at).as_secs_f64()) * 1e3).collect();
    println!(
        "{kind:?}: first detection {:.0} ms through the proxy, {:.0} ms direct; per event the proxy adds {:.2} ms (median of {})",
        through.as_secs_f64() * 1e3,
        direct.as_secs_f64() * 1e3,
        median(added.clone()),
        added.len()
    );

    // Twenty sessions: each one's watcher and upload meet on one replica, and both replicas
    // get some.
    let mut per_replica: HashMap<String, usize> = HashMap::new();
    for i in 0..20 {
        let id = format!("{tag}-affinity-{i:06}");
        // Half the watchers repeat the id in the query, as the page does.
        let path = if i % 2 == 0 { format!("/sessions/{id}/events") } else { format!("/sessions/{id}/events?session={id}") };
        let (status, watched_on, mut watcher) = watch_path(&proxy.addr, &path);
        assert_eq!(status, 200);
        let (status, uploaded_to) = quick_session(&proxy.addr, &format!("&session={id}"));
        assert_eq!(status, 200);
        assert_eq!(watched_on, uploaded_to, "session {id}: watcher and upload on different replicas");
        assert_eq!(last_type(&read_events(&mut watcher, true, None)), Some("end"), "session {id}");
        *per_replica.entry(uploaded_to).or_default() += 1;
    }
    assert_eq!(per_replica.len(), 2, "20 sessions all went to one replica: {per_replica:?}");
    let (status, ..) = watch_path(&proxy.addr, &format!("/sessions/{tag}-affinity-000001/events?session={tag}-affinity-000002"));
    assert_eq!(status, 400, "the query may only repeat the path's id");

    // A session's annotated video comes from the replica that ran the session.
    for i in 0..2 {
        let clip = std::fs::read(fixtures().join("clip.ts")).unwrap();
        let path = format!("/detect/video?max_frames=2&annotate=1&session={tag}-annotated-{i:06}");
        let (status, ran_on, mut reader, _) = start_upload(&proxy.addr, &path, clip, 64 << 10, Duration::ZERO);
        assert_eq!(status, 200);
        let end = read_events(&mut reader, false, None).pop().expect("events").event;
        let url = end["video"]["url"].as_str().unwrap_or_else(|| panic!("no video: {end}")).to_string();
        let mut video = get(&proxy.addr, &url, "");
        let (status, headers) = read_response_head(&mut video);
        assert_eq!((status, headers.get("x-streamdet-replica")), (200, Some(&ran_on)), "{url}");
    }

    // A full replica says so on /ready (its liveness stays 200); HAProxy's health check then
    // sends uploads without an id to the other one. (nginx has no active health check.)
    let slow = |addr: &str, piece: usize, pause_ms: u64| {
        let clip = std::fs::read(fixtures().join("clip.ts")).unwrap();
        start_upload(addr, "/detect/video?stride=25", clip, piece, Duration::from_millis(pause_ms))
    };
    let holding: Vec<_> = (0..3).map(|_| slow(&addrs[0], 4 << 10, 100)).collect();
    assert!(holding.iter().all(|(status, ..)| *status == 200));
    let (status, body) = ready(&addrs[0]);
    assert_eq!((status, body["status"].as_str()), (503, Some("full")));
    assert_eq!(crate::server::request(&addrs[0], &format!("GET /health HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n", addrs[0]), b"").0, 200);
    if kind == Kind::Haproxy {
        thread::sleep(HAPROXY_CHECK_DELAY);
        for _ in 0..4 {
            assert_eq!(quick_session(&proxy.addr, ""), (200, "r2".to_string()), "HAProxy sent an upload to the full replica");
        }
    }
    drop(holding);
    let freed = Instant::now();
    while ready(&addrs[0]).0 != 200 {
        assert!(freed.elapsed() < Duration::from_secs(10), "the sessions of clients that left still hold r1");
        thread::sleep(Duration::from_millis(100));
    }

    // r1 is killed with sessions running on both replicas: r1's clients see their streams end
    // without an `end`, r2's sessions finish, and new sessions go to r2.
    let mut running = Vec::new();
    for i in 0..12 {
        let clip = std::fs::read(fixtures().join("clip.ts")).unwrap();
        let path = format!("/detect/video?stride=25&session={tag}-killed-{i:08}");
        let (status, on, reader, _) = start_upload(&proxy.addr, &path, clip, 16 << 10, Duration::from_millis(100));
        // A replica whose slots are all taken answers 429: the next id may hash to the other.
        assert!(status == 200 || status == 429, "{status}");
        if status == 200 {
            running.push((on, reader));
        }
        if running.iter().any(|(on, _)| on == "r1") && running.iter().any(|(on, _)| on == "r2") {
            break;
        }
    }
    assert!(running.iter().any(|(on, _)| on == "r1") && running.iter().any(|(on, _)| on == "r2"), "sessions on both replicas");
    replicas[0].child.kill().unwrap();
    replicas[0].child.wait().unwrap();
    for (on, mut reader) in running {
        let events = read_events(&mut reader, false, None);
        if on == "r1" {
            assert_ne!(last_type(&events), Some("end"), "a session of the killed replica cannot have ended well");
        } else {
            assert_eq!(last_type(&events), Some("end"), "the survivor's session finishes");
        }
    }
    for i in 0..4 {
        assert_eq!(quick_session(&proxy.addr, &format!("&session={tag}-after-kill-{i:06}")), (200, "r2".to_string()));
        assert_eq!(quick_session(&proxy.addr, ""), (200, "r2".to_string()));
    }

    // r1 comes back on its address, and the proxy sends it work again.
    replicas[0] = replica("r1", &addrs[0]);
    let back = Instant::now();
    while quick_session(&proxy.addr, "").1 != "r1" {
        assert!(back.elapsed() < Duration::from_secs(30), "{kind:?} never sent work to the restarted replica");
        thread::sleep(Duration::from_millis(500));
    }

    // r2 gets SIGTERM. Its running session and that session's watcher go on to the end. For
    // drain_delay_s (5 s) it serves as before but /ready says 503 (liveness stays 200), and
    // HAProxy's health check takes it out; then it closes its port, and nginx, which has no
    // health check, takes it out at the first refused connection. No client sees an error.
    // A session whose id the proxy sends to r2, found by watching ids until one lands there.
    let (id, mut draining_watch) = (0..64)
        .find_map(|i| {
            let id = format!("{tag}-draining-{i:06}");
            let (status, on, watcher) = watch(&proxy.addr, &id);
            (status == 200 && on == "r2").then_some((id, watcher))
        })
        .expect("an id that hashes to r2");
    let clip = std::fs::read(fixtures().join("clip.ts")).unwrap();
    let path = format!("/detect/video?stride=25&session={id}");
    let (status, on, mut draining_upload, _) = start_upload(&proxy.addr, &path, clip, 4 << 10, Duration::from_millis(100));
    assert_eq!((status, on.as_str()), (200, "r2"));
    // SAFETY: kill sends a signal to our own child process.
    assert_eq!(unsafe { libc::kill(replicas[1].child.id() as i32, libc::SIGTERM) }, 0);
    thread::sleep(Duration::from_millis(300));
    let (status, body) = ready(&addrs[1]);
    assert_eq!((status, body["status"].as_str()), (503, Some("draining")));
    assert_eq!(quick_session(&addrs[1], ""), (200, "r2".to_string()), "a draining replica still serves");
    match kind {
        Kind::Haproxy => thread::sleep(HAPROXY_CHECK_DELAY),
        Kind::Nginx => {
            let closing = Instant::now();
            while TcpStream::connect(&addrs[1]).is_ok() {
                assert!(closing.elapsed() < Duration::from_secs(10), "the draining replica never closed its port");
                thread::sleep(Duration::from_millis(100));
            }
        }
    }
    for _ in 0..4 {
        assert_eq!(quick_session(&proxy.addr, ""), (200, "r1".to_string()), "an upload went to the draining replica");
    }
    assert_eq!(last_type(&read_events(&mut draining_upload, false, None)), Some("end"), "the draining replica finishes its session");
    assert_eq!(last_type(&read_events(&mut draining_watch, true, None)), Some("end"), "and its watcher sees the end");
    let exited = Instant::now();
    while replicas[1].child.try_wait().unwrap().is_none() {
        assert!(exited.elapsed() < Duration::from_secs(10), "the drained replica did not exit");
        thread::sleep(Duration::from_millis(100));
    }
    println!("{kind:?}: the 20 sessions per replica: {per_replica:?}");
}

#[test]
fn replicas_behind_nginx() {
    replicas_behind(Kind::Nginx);
}

#[test]
fn replicas_behind_haproxy() {
    replicas_behind(Kind::Haproxy);
}

#[test]
fn the_systemd_unit_is_valid() {
    // systemd-analyze checks every directive, and that the program exists: the unit's binary path
    // becomes this build's.
    let dir = tempfile::tempdir().unwrap();
    let unit = std::fs::read_to_string(crate::support::root().join("deploy/streamdet@.service")).unwrap();
    assert!(unit.contains("/usr/local/bin/streamdet serve"));
    let unit = unit.replace("/usr/local/bin/streamdet", env!("CARGO_BIN_EXE_streamdet"));
    let path = dir.path().join("streamdet@8081.service");
    std::fs::write(&path, unit).unwrap();
    let out = Command::new("systemd-analyze").arg("verify").arg(&path).output().expect("systemd-analyze (Debian's systemd package)");
    let messages = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && messages.trim().is_empty(), "{messages}");
}
