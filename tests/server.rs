//! The HTTP service over real HTTP on loopback, with a full-duplex client: it reads the response
//! while it is still sending the upload, as a streaming client must.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::Duration;

use crate::decode::fixtures;

/// A `streamdet serve` on a free loopback port, stopped when dropped.
pub struct Server {
    pub(crate) child: Child,
    pub addr: String,
}

impl Server {
    /// Starts this build's server, or the one `STREAMDET_TEST_SERVER` names (to run the same
    /// HTTP tests against another build, such as the last release).
    pub fn start(env: &[(&str, &str)]) -> Server {
        Server::start_on("127.0.0.1:0", env)
    }

    /// Starts a server that listens on `listen` (a port of 0: any free port).
    pub fn start_on(listen: &str, env: &[(&str, &str)]) -> Server {
        let program = std::env::var_os("STREAMDET_TEST_SERVER").unwrap_or_else(|| env!("CARGO_BIN_EXE_streamdet").into());
        let mut cmd = Command::new(program);
        cmd.current_dir(crate::support::root()).args(["serve", "--listen", listen]).stdout(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().unwrap();
        let mut first = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut first).unwrap();
        let line: serde_json::Value = serde_json::from_str(&first).unwrap_or_else(|_| panic!("no listening line: {first:?}"));
        Server { child, addr: line["addr"].as_str().unwrap().to_string() }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Reads an HTTP/1.1 response head; returns the status code.
pub(crate) fn read_head(reader: &mut BufReader<TcpStream>) -> u16 {
    read_response_head(reader).0
}

/// Reads an HTTP/1.1 response head; returns the status code and the headers (names in lower
/// case).
pub(crate) fn read_response_head(reader: &mut BufReader<TcpStream>) -> (u16, std::collections::HashMap<String, String>) {
    let mut status = String::new();
    reader.read_line(&mut status).unwrap();
    let mut headers = std::collections::HashMap::new();
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        if line == "\r\n" || line.is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            headers.insert(name.trim().to_ascii_lowercase(), value.trim().to_string());
        }
    }
    (status.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0), headers)
}

/// Reads one chunk of a chunked body; `None` at the end.
pub(crate) fn read_chunk(reader: &mut BufReader<TcpStream>) -> Option<Vec<u8>> {
    let mut size = String::new();
    reader.read_line(&mut size).ok()?;
    let size = usize::from_str_radix(size.trim(), 16).ok()?;
    let mut data = vec![0u8; size + 2];
    reader.read_exact(&mut data).ok()?;
    data.truncate(size);
    (size > 0).then_some(data)
}

/// Starts a chunked upload of `body` to `path`: a thread sends `piece`-byte chunks with `pause`
/// between them and sets the returned flag after the last one.
pub(crate) fn upload(addr: &str, path: &str, body: Vec<u8>, piece: usize, pause: Duration) -> (BufReader<TcpStream>, Arc<AtomicBool>) {
    upload_with(addr, path, "", body, piece, pause)
}

pub(crate) fn upload_with(addr: &str, path: &str, headers: &str, body: Vec<u8>, piece: usize, pause: Duration) -> (BufReader<TcpStream>, Arc<AtomicBool>) {
    let stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let mut writer = stream.try_clone().unwrap();
    let done = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&done);
    let head = format!("POST {path} HTTP/1.1\r\nHost: {addr}\r\n{headers}Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n");
    thread::spawn(move || {
        if writer.write_all(head.as_bytes()).is_err() {
            return;
        }
        for chunk in body.chunks(piece) {
            let framed = [format!("{:x}\r\n", chunk.len()).as_bytes(), chunk, b"\r\n"].concat();
            if writer.write_all(&framed).is_err() {
                return;
            }
            thread::sleep(pause);
        }
        let _ = writer.write_all(b"0\r\n\r\n");
        flag.store(true, Ordering::SeqCst);
    });
    (BufReader::new(stream), done)
}

#[test]
fn detections_stream_back_while_the_upload_is_still_going() {
    let server = Server::start(&[]);
    let clip = std::fs::read(fixtures().join("photos.mp4")).unwrap();
    let (mut reader, upload_done) = upload(&server.addr, "/detect/video?stride=5", clip.clone(), 8 << 10, Duration::from_millis(25));
    assert_eq!(read_head(&mut reader), 200);
    let mut pending = Vec::new();
    let mut events: Vec<serde_json::Value> = Vec::new();
    let mut frame_before_upload_end = None;
    while let Some(chunk) = read_chunk(&mut reader) {
        pending.extend_from_slice(&chunk);
        while let Some(end) = pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            let event: serde_json::Value = serde_json::from_slice(&line).unwrap();
            if event["type"] == "frame" && frame_before_upload_end.is_none() {
                frame_before_upload_end = Some(!upload_done.load(Ordering::SeqCst));
            }
            events.push(event);
        }
    }
    assert_eq!(frame_before_upload_end, Some(true), "the first frame event came only after the whole upload");
    assert_eq!(events[0]["type"], "start");
    let frames: Vec<&serde_json::Value> = events.iter().filter(|e| e["type"] == "frame").collect();
    assert_eq!(frames.iter().map(|f| f["index"].as_u64().unwrap()).collect::<Vec<_>>(), [0, 5, 10, 15, 20, 25]);
    let has = |i: usize, class: &str| frames[i]["detections"].as_array().unwrap().iter().any(|d| d["class"] == class);
    assert!(has(1, "cat") && has(5, "person"), "{frames:?}");
    let end = events.last().unwrap();
    assert_eq!(end["type"], "end");
    assert_eq!(end["bytes"].as_u64(), Some(clip.len() as u64));
    assert_eq!(end["sha256"], sha256_hex(&clip));

    // What the session did shows in the metrics.
    let mut metrics = get(&server.addr, "/metrics", "");
    assert_eq!(read_head(&mut metrics), 200);
    let mut text = String::new();
    metrics.read_to_string(&mut text).unwrap();
    for expected in
        ["streamdet_frames_inferred_total 6", "streamdet_frames_decoded_total 30", "streamdet_sessions_total 1", "streamdet_inference_batch_seconds_count 6"]
    {
        assert!(text.contains(expected), "{expected:?} missing from:\n{text}");
    }
}

#[test]
fn moov_at_the_end_reports_every_frame_after_the_upload() {
    // A lag bound far below the clip's size must not stall it: the decoder waits for the index
    // at the end, ahead of the upload.
    let server = Server::start(&[("STREAMDET_SERVER_MAX_LAG_BYTES", "65536")]);
    let clip = std::fs::read(fixtures().join("moov_end.mp4")).unwrap();
    let (mut reader, upload_done) = upload(&server.addr, "/detect/video?stride=50", clip, 16 << 10, Duration::from_millis(10));
    assert_eq!(read_head(&mut reader), 200);
    let events = ndjson(&read_body(&mut reader));
    assert!(upload_done.load(Ordering::SeqCst));
    let frames: Vec<u64> = events.iter().filter(|e| e["type"] == "frame").map(|e| e["index"].as_u64().unwrap()).collect();
    assert_eq!(frames, [0, 50]);
    assert_eq!(events.last().unwrap()["frames_decoded"], 100);
}

pub(crate) fn request(addr: &str, head: &str, body: &[u8]) -> (u16, serde_json::Value) {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    stream.write_all(head.as_bytes()).unwrap();
    stream.write_all(body).unwrap();
    let mut reader = BufReader::new(stream);
    let status = read_head(&mut reader);
    let mut rest = Vec::new();
    let _ = reader.read_to_end(&mut rest);
    let json = serde_json::from_slice(&rest).unwrap_or(serde_json::Value::Null);
    (status, json)
}

#[test]
fn limits_and_bad_parameters_are_http_errors() {
    let server = Server::start(&[("STREAMDET_SERVER_MAX_SESSIONS", "1"), ("STREAMDET_SERVER_MAX_UPLOAD_BYTES", "1000000")]);
    let addr = &server.addr;
    let (status, body) = request(addr, &format!("GET /health HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"), b"");
    assert_eq!(status, 200);
    assert_eq!(body["model"]["name"], "yolov12n");

    let (status, body) = request(addr, &format!("POST /detect/video?conf=7 HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"), b"");
    assert_eq!((status, body["code"].as_str()), (400, Some("bad_parameter")));
    let (status, _) = request(addr, &format!("POST /detect/video?strid=3 HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"), b"");
    assert_eq!(status, 400, "unknown parameters are refused");

    let (status, body) = request(addr, &format!("POST /detect/video HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 5000000\r\nConnection: close\r\n\r\n"), b"");
    assert_eq!((status, body["code"].as_str()), (413, Some("too_large")));

    // One session is running (an upload that has not finished); a second one is refused.
    let clip = std::fs::read(fixtures().join("clip.ts")).unwrap();
    let (mut first, _) = upload(addr, "/detect/video", clip, 4 << 10, Duration::from_millis(200));
    assert_eq!(read_head(&mut first), 200);
    let (status, body) = request(addr, &format!("POST /detect/video HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"), b"");
    assert_eq!((status, body["code"].as_str()), (429, Some("too_many_sessions")));
}

#[test]
fn media_that_is_not_video_gets_415_before_the_stream() {
    let server = Server::start(&[]);
    for (name, code) in [("image.jpg", "unsupported_media"), ("audio.m4a", "no_video_stream")] {
        let body = std::fs::read(fixtures().join(name)).unwrap();
        let (mut reader, _) = upload(&server.addr, "/detect/video", body, 4 << 10, Duration::ZERO);
        assert_eq!(read_head(&mut reader), 415, "{name}");
        let mut rest = String::new();
        let _ = reader.read_to_string(&mut rest);
        assert!(rest.contains(code), "{name}: {rest}");
    }
}

/// The whole chunked body of a response.
pub(crate) fn read_body(reader: &mut BufReader<TcpStream>) -> String {
    let mut body = Vec::new();
    while let Some(chunk) = read_chunk(reader) {
        body.extend_from_slice(&chunk);
    }
    String::from_utf8(body).unwrap()
}

pub(crate) fn ndjson(body: &str) -> Vec<serde_json::Value> {
    body.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

#[test]
fn server_sent_events_when_asked() {
    let server = Server::start(&[]);
    let clip = std::fs::read(fixtures().join("clip.ts")).unwrap();
    let (mut reader, _) = upload_with(&server.addr, "/detect/video?stride=50", "Accept: text/event-stream\r\n", clip, 32 << 10, Duration::ZERO);
    assert_eq!(read_head(&mut reader), 200);
    let body = read_body(&mut reader);
    let messages: Vec<&str> = body.split("\n\n").filter(|m| !m.is_empty()).collect();
    assert_eq!(messages.len(), 4, "start, two frames, end: {body}");
    assert!(messages[0].starts_with("event: start\nid: 0\ndata: {"), "{}", messages[0]);
    assert!(messages[1].starts_with("event: frame\nid: 1\ndata: "), "{}", messages[1]);
    assert!(messages[3].starts_with("event: end\nid: 3\n"), "{}", messages[3]);
}

#[test]
fn four_uploads_at_once_and_a_fifth_is_refused() {
    let server = Server::start(&[("STREAMDET_SERVER_MAX_SESSIONS", "4"), ("STREAMDET_SERVER_MAX_SESSIONS_PER_CLIENT", "0")]);
    let clip = std::fs::read(fixtures().join("clip.ts")).unwrap();
    let uploads: Vec<_> = (0..4).map(|_| upload(&server.addr, "/detect/video?stride=25", clip.clone(), 16 << 10, Duration::from_millis(40))).collect();
    let mut readers: Vec<_> = uploads
        .into_iter()
        .map(|(mut r, _)| {
            assert_eq!(read_head(&mut r), 200);
            r
        })
        .collect();
    let addr = &server.addr;
    let (status, body) = request(addr, &format!("POST /detect/video HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"), b"");
    assert_eq!((status, body["code"].as_str()), (429, Some("too_many_sessions")));
    for reader in &mut readers {
        let events = ndjson(&read_body(reader));
        let frames: Vec<u64> = events.iter().filter(|e| e["type"] == "frame").map(|e| e["index"].as_u64().unwrap()).collect();
        assert_eq!(frames, [0, 25, 50, 75], "each session gets its own frames");
        assert_eq!(events.last().unwrap()["frames_decoded"], 100);
    }
}

#[test]
fn an_image_gets_its_detections() {
    let server = Server::start(&[]);
    let addr = &server.addr;
    let hopper = crate::support::photos().into_iter().find(|p| p.ends_with("grace_hopper.jpg")).unwrap();
    let jpeg = std::fs::read(hopper).unwrap();
    let head = format!("POST /detect HTTP/1.1\r\nHost: {addr}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", jpeg.len());
    let (status, body) = request(addr, &head, &jpeg);
    assert_eq!(status, 200);
    assert_eq!((body["width"].as_u64(), body["height"].as_u64()), (Some(512), Some(600)));
    assert!(body["detections"].as_array().unwrap().iter().any(|d| d["class"] == "person"), "{body}");
    // Rounded as video events are: confidence to three decimals, boxes to one.
    let rounded = |v: &serde_json::Value, scale: f64| v.as_f64().is_some_and(|x| (x * scale).round() / scale == x);
    for d in body["detections"].as_array().unwrap() {
        assert!(rounded(&d["confidence"], 1000.0) && d["box"].as_array().unwrap().iter().all(|v| rounded(v, 10.0)), "{d}");
    }
    let head = format!("POST /detect HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 11\r\nConnection: close\r\n\r\n");
    let (status, body) = request(addr, &head, b"not a photo");
    assert_eq!((status, body["code"].as_str()), (415, Some("unsupported_media")));
}

pub(crate) fn get(addr: &str, path: &str, headers: &str) -> BufReader<TcpStream> {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    stream.write_all(format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n{headers}Connection: close\r\n\r\n").as_bytes()).unwrap();
    BufReader::new(stream)
}

#[test]
fn a_watcher_can_arrive_before_the_upload_and_replay_after_it() {
    let server = Server::start(&[]);
    let addr = &server.addr;
    let id = "page-upload-0001";
    // The page's watcher connects first and waits.
    let mut watcher = get(addr, &format!("/sessions/{id}/events"), "");
    thread::sleep(Duration::from_millis(200));
    let clip = std::fs::read(fixtures().join("clip.ts")).unwrap();
    let (mut uploader, _) = upload(addr, &format!("/detect/video?stride=50&session={id}"), clip.clone(), 16 << 10, Duration::from_millis(20));
    assert_eq!(read_head(&mut uploader), 200);
    let (status, body) =
        request(addr, &format!("POST /detect/video?session={id} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"), b"");
    assert_eq!((status, body["code"].as_str()), (409, Some("conflict")), "the id is in use while the upload runs");
    assert_eq!(read_head(&mut watcher), 200);
    let watched = read_body(&mut watcher);
    let uploaded = ndjson(&read_body(&mut uploader));
    assert_eq!(uploaded.len(), 4, "start, two frames, end");
    for (i, kind) in ["start", "frame", "frame", "end"].iter().enumerate() {
        assert!(watched.contains(&format!("event: {kind}\nid: {i}\n")), "{watched}");
    }
    // After the end, Last-Event-ID replays what came after it.
    let mut late = get(addr, &format!("/sessions/{id}/events"), "Last-Event-ID: 1\r\n");
    assert_eq!(read_head(&mut late), 200);
    let replay = read_body(&mut late);
    assert!(replay.starts_with("event: frame\nid: 2\n") && replay.contains("event: end\nid: 3\n"), "{replay}");
    let mut bad = get(addr, "/sessions/short/events", "");
    assert_eq!(read_head(&mut bad), 400);
}

#[test]
fn bearer_token_and_cors_origins() {
    let server = Server::start(&[("STREAMDET_SERVER_AUTH_TOKEN", "s3cret"), ("STREAMDET_SERVER_CORS_ORIGINS", "https://app.example")]);
    let addr = &server.addr;
    let (status, _) = request(addr, &format!("GET /health HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"), b"");
    assert_eq!(status, 200, "health needs no token");
    let (status, body) = request(addr, &format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"), b"");
    assert_eq!((status, body["code"].as_str()), (401, Some("unauthorized")));
    let mut with_token = get(addr, "/metrics", "Authorization: Bearer s3cret\r\n");
    assert_eq!(read_head(&mut with_token), 200);
    let preflight = format!(
        "OPTIONS /detect/video HTTP/1.1\r\nHost: {addr}\r\nOrigin: https://app.example\r\nAccess-Control-Request-Method: POST\r\nConnection: close\r\n\r\n"
    );
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.write_all(preflight.as_bytes()).unwrap();
    let mut response = String::new();
    let _ = BufReader::new(stream).read_to_string(&mut response);
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(response.to_lowercase().contains("access-control-allow-origin: https://app.example"), "{response}");
}

#[test]
fn an_idle_upload_times_out() {
    let temp = tempfile::tempdir().unwrap();
    let server = Server::start(&[("STREAMDET_SERVER_IDLE_UPLOAD_TIMEOUT_S", "1"), ("STREAMDET_STORAGE_TEMP_DIR", temp.path().to_str().unwrap())]);
    let clip = std::fs::read(fixtures().join("clip.ts")).unwrap();
    // One 64 KiB chunk, then nothing for a long while.
    let (mut reader, _) = upload(&server.addr, "/detect/video", clip, 64 << 10, Duration::from_secs(30));
    assert_eq!(read_head(&mut reader), 200);
    let events = ndjson(&read_body(&mut reader));
    let last = events.last().unwrap();
    assert_eq!((last["type"].as_str(), last["code"].as_str()), (Some("error"), Some("timeout")), "{events:?}");
    let left = (0..50)
        .map(|_| {
            thread::sleep(Duration::from_millis(100));
            std::fs::read_dir(temp.path()).unwrap().count()
        })
        .find(|&n| n == 0);
    assert_eq!(left, Some(0), "the stalled upload's temp file is removed");
}

#[test]
fn sigterm_ends_running_sessions_with_an_error_and_removes_their_files() {
    let temp = tempfile::tempdir().unwrap();
    let mut server = Server::start(&[("STREAMDET_STORAGE_TEMP_DIR", temp.path().to_str().unwrap()), ("STREAMDET_SERVER_SHUTDOWN_GRACE_S", "1")]);
    let clip = std::fs::read(fixtures().join("clip.ts")).unwrap();
    let (mut reader, _) = upload(&server.addr, "/detect/video?stride=25", clip, 8 << 10, Duration::from_millis(300));
    assert_eq!(read_head(&mut reader), 200);
    let files = || std::fs::read_dir(temp.path()).unwrap().count();
    assert_eq!(files(), 1, "the running upload has its temp file");
    // SAFETY: kill sends a signal to our own child process.
    assert_eq!(unsafe { libc::kill(server.child.id() as i32, libc::SIGTERM) }, 0);
    // Draining: a load balancer's readiness check fails, liveness does not, and connections are
    // not kept open.
    thread::sleep(Duration::from_millis(200));
    let addr = &server.addr;
    let mut readiness = TcpStream::connect(addr).unwrap();
    readiness.write_all(format!("GET /ready HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes()).unwrap();
    let (status, headers) = read_response_head(&mut BufReader::new(readiness));
    assert_eq!((status, headers.get("connection").map(String::as_str)), (503, Some("close")));
    assert_eq!(request(addr, &format!("GET /health HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"), b"").0, 200);
    let events = ndjson(&read_body(&mut reader));
    let last = events.last().unwrap();
    assert_eq!(last["type"], "error", "{events:?}");
    assert!(last["message"].as_str().unwrap().contains("shutting down"), "{last}");
    let status = server.child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    assert_eq!(files(), 0, "temp files are removed at shutdown");
}

#[test]
fn every_documented_route_is_served() {
    let server = Server::start(&[]);
    let addr = &server.addr;
    let mut doc = get(addr, "/openapi.json", "");
    assert_eq!(read_head(&mut doc), 200);
    let mut text = String::new();
    doc.read_to_string(&mut text).unwrap();
    let spec: serde_json::Value = serde_json::from_str(&text).unwrap();
    for (path, operations) in spec["paths"].as_object().unwrap() {
        for method in operations.as_object().unwrap().keys() {
            // Requests that are valid in shape but not in content: every route must answer
            // with something other than "not found" or "method not allowed".
            let concrete = path.replace("{id}", "x");
            let head = format!("{} {concrete} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n", method.to_uppercase());
            let mut stream = TcpStream::connect(addr).unwrap();
            stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
            stream.write_all(head.as_bytes()).unwrap();
            let status = read_head(&mut BufReader::new(stream));
            assert!(status != 404 && status != 405 && status != 0, "{method} {path}: {status}");
        }
    }
}

#[test]
fn disconnects_oversize_streams_and_damage_end_sessions_without_leftovers() {
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path().to_str().unwrap();
    let server = Server::start(&[("STREAMDET_STORAGE_TEMP_DIR", dir), ("STREAMDET_SERVER_MAX_UPLOAD_BYTES", "300000")]);
    let addr = &server.addr;
    let files = || std::fs::read_dir(temp.path()).unwrap().count();
    let wait_until_no_files = || {
        for _ in 0..100 {
            if files() == 0 {
                return true;
            }
            thread::sleep(Duration::from_millis(100));
        }
        false
    };

    // A client that goes away mid-upload.
    let clip = std::fs::read(fixtures().join("clip.ts")).unwrap();
    let (mut reader, _) = upload(addr, "/detect/video?stride=25", clip.clone(), 8 << 10, Duration::from_millis(300));
    assert_eq!(read_head(&mut reader), 200);
    assert_eq!(files(), 1);
    reader.get_ref().shutdown(std::net::Shutdown::Both).unwrap();
    drop(reader);
    assert!(wait_until_no_files(), "the temp file of a disconnected client stays");

    // A chunked upload that grows past max_upload_bytes (no declared length).
    let (mut reader, _) = upload(addr, "/detect/video?stride=50", clip, 32 << 10, Duration::ZERO);
    // 413 when the limit is crossed before the container is identified, else an error event.
    match read_head(&mut reader) {
        413 => {}
        200 => {
            let events = ndjson(&read_body(&mut reader));
            assert_eq!(events.last().unwrap()["code"], "too_large", "{events:?}");
        }
        other => panic!("status {other} for an oversize upload"),
    }
    assert!(wait_until_no_files(), "an oversize upload leaves its temp file");

    // A truncated MP4: frames first, then the error.
    let truncated = std::fs::read(fixtures().join("truncated.mp4")).unwrap();
    let (mut reader, _) = upload(addr, "/detect/video?stride=20", truncated, 16 << 10, Duration::ZERO);
    assert_eq!(read_head(&mut reader), 200);
    let events = ndjson(&read_body(&mut reader));
    assert!(events.iter().filter(|e| e["type"] == "frame").count() >= 2, "{events:?}");
    assert_eq!(events.last().unwrap()["code"], "truncated");

    // Random bytes: 415. And the server still serves normally after all that.
    let random: Vec<u8> = (0..50_000u32).map(|i| (i.wrapping_mul(2654435761) >> 11) as u8).collect();
    let (mut reader, _) = upload(addr, "/detect/video", random, 8 << 10, Duration::ZERO);
    assert_eq!(read_head(&mut reader), 415);
    let (status, _) = request(addr, &format!("POST /detect/video?stride=0 HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"), b"");
    assert_eq!(status, 400);
    assert!(wait_until_no_files(), "no temp file is left behind");
    let (status, _) = request(addr, &format!("GET /health HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"), b"");
    assert_eq!(status, 200);
}

pub(crate) fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(data).iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn multipart_uploads_are_stored_by_hash_and_max_frames_stops_early() {
    let media = tempfile::tempdir().unwrap();
    let server = Server::start(&[("STREAMDET_STORAGE_PERSIST_MEDIA", "true"), ("STREAMDET_STORAGE_MEDIA_DIR", media.path().to_str().unwrap())]);
    let clip = std::fs::read(fixtures().join("faststart.mp4")).unwrap();

    // A browser form: a text field, then the file.
    let boundary = "----streamdet-test-boundary";
    let mut body = format!("--{boundary}\r\nContent-Disposition: form-data; name=\"note\"\r\n\r\nhello\r\n").into_bytes();
    body.extend(format!("--{boundary}\r\nContent-Disposition: form-data; name=\"video\"; filename=\"clip.mp4\"\r\nContent-Type: video/mp4\r\n\r\n").bytes());
    body.extend_from_slice(&clip);
    body.extend(format!("\r\n--{boundary}--\r\n").bytes());
    let headers = format!("Content-Type: multipart/form-data; boundary={boundary}\r\n");
    let (mut reader, _) = upload_with(&server.addr, "/detect/video?stride=50", &headers, body, 16 << 10, Duration::from_millis(5));
    assert_eq!(read_head(&mut reader), 200);
    let events = ndjson(&read_body(&mut reader));
    let frames: Vec<u64> = events.iter().filter(|e| e["type"] == "frame").map(|e| e["index"].as_u64().unwrap()).collect();
    assert_eq!(frames, [0, 50], "{events:?}");
    let end = events.last().unwrap();
    assert_eq!(end["sha256"], sha256_hex(&clip), "the hash covers the file part only");
    assert_eq!(end["bytes"].as_u64(), Some(clip.len() as u64));
    let stored = media.path().join(format!("{}.mp4", sha256_hex(&clip)));
    let stored_name = stored.file_name().unwrap().to_str().unwrap();
    assert_eq!(end["media_file"].as_str(), Some(stored_name), "the file's name under media_dir, never a server path");
    assert_eq!(std::fs::read(&stored).unwrap(), clip, "the stored upload is the file");

    // max_frames: two frames, then `end` while the rest of the upload is read and dropped.
    let (mut reader, upload_done) = upload(&server.addr, "/detect/video?max_frames=2", clip.clone(), 4 << 10, Duration::from_millis(30));
    assert_eq!(read_head(&mut reader), 200);
    let events = ndjson(&read_body(&mut reader));
    let frames: Vec<u64> = events.iter().filter(|e| e["type"] == "frame").map(|e| e["index"].as_u64().unwrap()).collect();
    assert_eq!(frames, [0, 1], "{events:?}");
    let end = events.last().unwrap();
    assert_eq!(end["type"], "end", "{events:?}");
    assert_eq!(end["frames_processed"], 2);
    // Usually the two frames are done long before the upload; on a loaded machine the upload
    // may win, and a complete upload is stored as usual (under the same name: same bytes).
    let partial = end["bytes"].as_u64().unwrap() < clip.len() as u64;
    assert_eq!(end.get("media_file").is_none(), partial, "only a complete upload is stored: {end}");
    for _ in 0..200 {
        if upload_done.load(Ordering::SeqCst) {
            break;
        }
        thread::sleep(Duration::from_millis(50));
    }
    assert!(upload_done.load(Ordering::SeqCst), "the server stopped reading the rest of the upload");
    assert_eq!(std::fs::read_dir(media.path()).unwrap().count(), 1, "one stored file per distinct upload");
    let (status, _) = request(
        &server.addr,
        &format!("POST /detect/video?max_frames=0 HTTP/1.1\r\nHost: {}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n", server.addr),
        b"",
    );
    assert_eq!(status, 400);
}

#[test]
fn a_decoder_that_falls_behind_holds_the_upload_back() {
    let temp = tempfile::tempdir().unwrap();
    let lag = 512 << 10;
    let server = Server::start(&[
        ("STREAMDET_STORAGE_TEMP_DIR", temp.path().to_str().unwrap()),
        ("STREAMDET_SERVER_MAX_LAG_BYTES", &lag.to_string()),
        ("STREAMDET_SERVER_CREDITS", "1"),
    ]);
    // 8 MB of MPEG-TS, every frame to the model: inference is far slower than loopback.
    let clip = std::fs::read(fixtures().join("live.ts")).unwrap();
    // (The client may well finish sending: the kernel's socket buffers hold megabytes.)
    let (mut reader, _) = upload(&server.addr, "/detect/video", clip.clone(), 64 << 10, Duration::ZERO);
    assert_eq!(read_head(&mut reader), 200);
    let mut frames = 0;
    let mut pending = Vec::new();
    while frames < 4 {
        pending.extend(read_chunk(&mut reader).expect("events"));
        frames = pending.split(|&b| b == b'\n').filter(|l| l.windows(7).any(|w| w == b"\"frame\"")).count();
    }
    let buffered: u64 = std::fs::read_dir(temp.path()).unwrap().map(|e| e.unwrap().metadata().unwrap().len()).sum();
    assert!(buffered < clip.len() as u64 / 2, "{buffered} bytes buffered for a lag bound of {lag}");
    reader.get_ref().shutdown(std::net::Shutdown::Both).unwrap();
}
