//! The service against a hostile client, over real HTTP: image bombs, oversized and endless
//! bodies, watchers that never see an upload or leave without a word, guessed and reused session
//! ids, trickling uploads, cross-site requests, odd configuration, broken forms. Each test
//! names the attack; the server must answer it and go on serving everyone else.

use std::io::Write;
use std::net::TcpStream;
use std::thread;
use std::time::{Duration, Instant};

use crate::decode::fixtures;
use crate::server::{Server, get, ndjson, read_body, read_head, request, upload, upload_with};

fn health(addr: &str) -> serde_json::Value {
    let (status, body) = request(addr, &format!("GET /health HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"), b"");
    assert_eq!(status, 200, "the server stopped answering /health");
    body
}

fn post(addr: &str, path: &str, headers: &str, body: &[u8]) -> (u16, serde_json::Value) {
    let head = format!("POST {path} HTTP/1.1\r\nHost: {addr}\r\n{headers}Content-Length: {}\r\nConnection: close\r\n\r\n", body.len());
    request(addr, &head, body)
}

/// CRC-32 (IEEE), for PNG chunks.
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
        }
    }
    !crc
}

/// A PNG whose header declares `width` x `height` RGBA at 16 bits, with a little image data.
fn png_bomb(width: u32, height: u32) -> Vec<u8> {
    let chunk = |kind: &[u8], data: &[u8]| {
        let mut out = (data.len() as u32).to_be_bytes().to_vec();
        out.extend_from_slice(kind);
        out.extend_from_slice(data);
        out.extend_from_slice(&crc32(&[kind, data].concat()).to_be_bytes());
        out
    };
    let mut ihdr = width.to_be_bytes().to_vec();
    ihdr.extend_from_slice(&height.to_be_bytes());
    ihdr.extend_from_slice(&[16, 6, 0, 0, 0]);
    // A stored (uncompressed) zlib stream of zeros: a row's worth of data, no more.
    let zeros = vec![0u8; 1024];
    let mut idat = vec![0x78, 0x01, 0x01];
    idat.extend_from_slice(&(zeros.len() as u16).to_le_bytes());
    idat.extend_from_slice(&(!(zeros.len() as u16)).to_le_bytes());
    idat.extend_from_slice(&zeros);
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    png.extend(chunk(b"IHDR", &ihdr));
    png.extend(chunk(b"IDAT", &idat));
    png.extend(chunk(b"IEND", b""));
    png
}

/// A baseline JPEG whose frame header (SOF0) says `width` x `height`, three components.
fn jpeg_bomb(width: u16, height: u16) -> Vec<u8> {
    let real = std::fs::read(fixtures().join("image.jpg")).unwrap();
    let sof = real.windows(2).position(|w| w == [0xFF, 0xC0]).expect("a baseline JPEG");
    let mut bomb = real.clone();
    bomb[sof + 5..sof + 7].copy_from_slice(&height.to_be_bytes());
    bomb[sof + 7..sof + 9].copy_from_slice(&width.to_be_bytes());
    bomb
}

/// The resident set of a process, in MiB: now and its peak.
fn rss_mib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status.lines().find(|l| l.starts_with(name)).and_then(|l| l.split_whitespace().nth(1)).and_then(|kb| kb.parse::<u64>().ok()).unwrap_or(0) / 1024
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn open_descriptors(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

/// Polls `check` for up to `limit`, returning whether it came true.
fn eventually(limit: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if check() {
            return true;
        }
        thread::sleep(Duration::from_millis(100));
    }
    check()
}

#[test]
fn image_bombs_are_refused_from_their_headers_and_the_server_lives_on() {
    let server = Server::start(&[]);
    let addr = &server.addr;
    let pid = server.child.id();
    for (name, bomb) in
        [("PNG 60000x60000 RGBA16", png_bomb(60000, 60000)), ("JPEG 30000x30000", jpeg_bomb(30000, 30000)), ("PNG 20000x20000", png_bomb(20000, 20000))]
    {
        let (status, body) = post(addr, "/detect", "", &bomb);
        assert_eq!((status, body["code"].as_str()), (413, Some("too_large")), "{name}: {body}");
        assert!(body["message"].as_str().unwrap().contains("pixels"), "{name}: the message says why: {body}");
    }
    let (_, peak) = rss_mib(pid);
    println!("image bombs: server peak RSS {peak} MiB");
    assert!(peak < 1024, "the bombs took {peak} MiB");
    // A real photo still works.
    let jpeg = std::fs::read(fixtures().join("image.jpg")).unwrap();
    let (status, body) = post(addr, "/detect", "", &jpeg);
    assert_eq!(status, 200, "{body}");
    health(addr);
}

#[test]
fn image_bodies_and_image_requests_have_bounds() {
    let server = Server::start(&[("STREAMDET_SERVER_MAX_IMAGE_BYTES", "100000"), ("STREAMDET_SERVER_MAX_IMAGE_REQUESTS", "1")]);
    let addr = &server.addr;
    // A declared length over the limit is refused before the body is read.
    let head = format!("POST /detect HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 1073741824\r\nConnection: close\r\n\r\n");
    let (status, body) = request(addr, &head, b"");
    assert_eq!((status, body["code"].as_str()), (413, Some("too_large")));
    // A chunked body that crosses it is cut off there.
    let (mut reader, _) = upload(addr, "/detect", vec![7u8; 400_000], 16 << 10, Duration::ZERO);
    assert_eq!(read_head(&mut reader), 413);
    // One image request at a time: a second one, while the first is still sending, gets 429.
    let mut slow = TcpStream::connect(addr).unwrap();
    slow.write_all(format!("POST /detect HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 50000\r\nConnection: close\r\n\r\n").as_bytes()).unwrap();
    slow.write_all(&[0u8; 1000]).unwrap();
    thread::sleep(Duration::from_millis(300));
    let jpeg = std::fs::read(fixtures().join("image.jpg")).unwrap();
    let (status, body) = post(addr, "/detect", "", &jpeg);
    assert_eq!((status, body["code"].as_str()), (429, Some("too_many_sessions")), "{body}");
    drop(slow);
    assert!(eventually(Duration::from_secs(10), || post(addr, "/detect", "", &jpeg).0 == 200), "the permit comes back when the client leaves");

    // An image that trickles in loses its permit to the minimum upload rate.
    let server = Server::start(&[("STREAMDET_SERVER_MIN_UPLOAD_RATE", "50000"), ("STREAMDET_SERVER_MIN_UPLOAD_RATE_WINDOW_S", "1")]);
    let (mut reader, _) = upload(&server.addr, "/detect", jpeg, 500, Duration::from_millis(100));
    assert_eq!(read_head(&mut reader), 408, "a 5 KB/s image upload");
}

#[test]
fn watchers_of_ids_no_upload_claims_end_and_leave_no_descriptors() {
    let server = Server::start(&[
        ("STREAMDET_SERVER_WATCH_WAIT_S", "1"),
        ("STREAMDET_SERVER_SSE_KEEPALIVE_S", "1"),
        ("STREAMDET_SERVER_MAX_WATCHERS", "40"),
        ("STREAMDET_SERVER_MAX_WATCHERS_PER_SESSION", "2"),
    ]);
    let addr = &server.addr;
    let pid = server.child.id();
    // A watch nobody uploads to ends with a timeout event.
    let mut watcher = get(addr, "/sessions/nobody-uploads-this-id/events", "");
    assert_eq!(read_head(&mut watcher), 200);
    let body = read_body(&mut watcher);
    assert!(body.contains("event: error") && body.contains("\"code\":\"timeout\""), "{body}");

    // Watchers of one id, and of all ids, are bounded.
    let _a = get(addr, "/sessions/one-id-two-watchers/events", "");
    let _b = get(addr, "/sessions/one-id-two-watchers/events", "");
    thread::sleep(Duration::from_millis(200));
    let mut third = get(addr, "/sessions/one-id-two-watchers/events", "");
    assert_eq!(read_head(&mut third), 429);

    // Clients that connect and leave at once: their descriptors go within seconds.
    let baseline = open_descriptors(pid);
    for i in 0..300 {
        let mut stream = TcpStream::connect(addr).unwrap();
        let _ = stream.write_all(format!("GET /sessions/hang-up-watcher-{i:05}/events HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes());
        drop(stream);
    }
    let settled = eventually(Duration::from_secs(20), || open_descriptors(pid) <= baseline + 5);
    assert!(settled, "descriptors: {} before, {} after 300 watchers that hung up", baseline, open_descriptors(pid));
    health(addr);
}

#[test]
fn session_ids_are_long_reserved_after_the_end_and_replays_are_strict() {
    let server = Server::start(&[]);
    let addr = &server.addr;
    let empty = |path: &str| format!("POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
    let (status, body) = request(addr, &empty("/detect/video?session=abcdefgh"), b"");
    assert_eq!((status, body["code"].as_str()), (400, Some("bad_parameter")), "8-character ids are too easy to guess");

    let id = "0b3d6f2a-5c1e-4e8a-9f7d-2c4b6a8e0f13";
    let clip = std::fs::read(fixtures().join("clip.ts")).unwrap();
    let (mut reader, _) = upload(addr, &format!("/detect/video?stride=50&session={id}"), clip.clone(), 64 << 10, Duration::ZERO);
    assert_eq!(read_head(&mut reader), 200);
    let events = ndjson(&read_body(&mut reader));
    let end = events.last().unwrap();
    assert_eq!(end["type"], "end");
    assert!(end.get("media_file").is_none(), "no path without persist_media: {end}");
    // The finished id cannot be taken over while its events can still be replayed.
    let (mut second, _) = upload(addr, &format!("/detect/video?session={id}"), clip, 64 << 10, Duration::ZERO);
    assert_eq!(read_head(&mut second), 409);

    // Last-Event-ID: an absurd value replays nothing, a malformed one is a 400.
    let mut late = get(addr, &format!("/sessions/{id}/events"), "Last-Event-ID: 18446744073709551615\r\n");
    assert_eq!(read_head(&mut late), 200);
    assert_eq!(read_body(&mut late), "", "nothing comes after an id past the end");
    for bad in ["-1", "1e3", "99999999999999999999999"] {
        let mut watch = get(addr, &format!("/sessions/{id}/events"), &format!("Last-Event-ID: {bad}\r\n"));
        assert_eq!(read_head(&mut watch), 400, "{bad}");
    }
    let mut replay = get(addr, &format!("/sessions/{id}/events"), "Last-Event-ID: 2\r\n");
    assert_eq!(read_head(&mut replay), 200);
    assert!(read_body(&mut replay).starts_with("event: end\nid: 3\n"));
}

#[test]
fn trickling_uploads_lose_their_slot_to_the_minimum_rate() {
    let temp = tempfile::tempdir().unwrap();
    let server = Server::start(&[
        ("STREAMDET_SERVER_MAX_SESSIONS", "1"),
        ("STREAMDET_SERVER_MIN_UPLOAD_RATE", "50000"),
        ("STREAMDET_SERVER_MIN_UPLOAD_RATE_WINDOW_S", "2"),
        ("STREAMDET_STORAGE_TEMP_DIR", temp.path().to_str().unwrap()),
    ]);
    let addr = &server.addr;
    let clip = std::fs::read(fixtures().join("clip.ts")).unwrap();
    // About 10 KB/s: fast enough for the idle timeout, far under the minimum rate.
    let (mut slow, _) = upload(addr, "/detect/video?stride=50", clip.clone(), 1000, Duration::from_millis(100));
    assert_eq!(read_head(&mut slow), 200);
    let events = ndjson(&read_body(&mut slow));
    let last = events.last().unwrap();
    assert_eq!((last["type"].as_str(), last["code"].as_str()), (Some("error"), Some("timeout")), "{events:?}");
    assert!(last["message"].as_str().unwrap().contains("bytes/s"), "{last}");
    // The slot is free again, and the trickler's temp file is gone.
    assert!(eventually(Duration::from_secs(5), || std::fs::read_dir(temp.path()).unwrap().count() == 0));
    let (mut next, _) = upload(addr, "/detect/video?stride=50", clip, 64 << 10, Duration::ZERO);
    assert_eq!(read_head(&mut next), 200);
    assert_eq!(ndjson(&read_body(&mut next)).last().unwrap()["type"], "end");
}

#[test]
fn one_client_cannot_take_every_session() {
    let server = Server::start(&[("STREAMDET_SERVER_MAX_SESSIONS", "4"), ("STREAMDET_SERVER_MAX_SESSIONS_PER_CLIENT", "2")]);
    let addr = &server.addr;
    let clip = std::fs::read(fixtures().join("clip.ts")).unwrap();
    let running: Vec<_> = (0..2)
        .map(|_| {
            let (mut reader, _) = upload(addr, "/detect/video?stride=50", clip.clone(), 4 << 10, Duration::from_millis(100));
            assert_eq!(read_head(&mut reader), 200);
            reader
        })
        .collect();
    let (status, body) = request(addr, &format!("POST /detect/video HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"), b"");
    assert_eq!((status, body["code"].as_str()), (429, Some("too_many_sessions")), "{body}");
    assert!(body["message"].as_str().unwrap().contains("client"), "{body}");
    drop(running);
}

#[test]
fn pages_of_other_sites_cannot_spend_the_server() {
    let server = Server::start(&[]);
    let addr = &server.addr;
    let clip = std::fs::read(fixtures().join("clip.ts")).unwrap();
    for content_type in ["text/plain", "multipart/form-data; boundary=x"] {
        let headers = format!("Origin: https://evil.example\r\nContent-Type: {content_type}\r\n");
        let (status, body) = post(addr, "/detect/video", &headers, &clip[..10_000]);
        assert_eq!((status, body["code"].as_str()), (403, Some("forbidden")), "{content_type}");
    }
    let (status, _) = post(addr, "/detect", "Origin: null\r\n", b"x");
    assert_eq!(status, 403);
    // The page's own requests, and clients that send no Origin, are served.
    let own = format!("Origin: http://{addr}\r\n");
    let (mut reader, _) = upload_with(addr, "/detect/video?stride=50", &own, clip.clone(), 64 << 10, Duration::ZERO);
    assert_eq!(read_head(&mut reader), 200);
    assert_eq!(ndjson(&read_body(&mut reader)).last().unwrap()["type"], "end");
    let (mut reader, _) = upload(addr, "/detect/video?stride=50", clip, 64 << 10, Duration::ZERO);
    assert_eq!(read_head(&mut reader), 200);
}

#[test]
fn environment_values_keep_their_key_type_and_the_auth_scheme_is_case_insensitive() {
    let server = Server::start(&[("STREAMDET_SERVER_AUTH_TOKEN", "31415926535897"), ("STREAMDET_CPU_KERNEL", "portable")]);
    let addr = &server.addr;
    for scheme in ["Bearer", "bearer", "BEARER"] {
        let mut metrics = get(addr, "/metrics", &format!("Authorization: {scheme} 31415926535897\r\n"));
        assert_eq!(read_head(&mut metrics), 200, "{scheme}");
    }
    let mut wrong = get(addr, "/metrics", "Authorization: Bearer 3141592653589\r\n");
    assert_eq!(read_head(&mut wrong), 401);
    // A variable that names a section but no key of it stops the server with a message naming it.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_streamdet"))
        .current_dir(crate::support::root())
        .args(["serve", "--listen", "127.0.0.1:0"])
        .env("STREAMDET_SERVER_MAX_SESION", "3")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("max_sesion"), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn broken_forms_get_400_before_any_stream() {
    let server = Server::start(&[]);
    let addr = &server.addr;
    let boundary = "----streamdet-boundary";
    let no_file = format!("--{boundary}\r\nContent-Disposition: form-data; name=\"note\"\r\n\r\nhello\r\n--{boundary}--\r\n");
    let (status, body) = post(addr, "/detect/video", &format!("Content-Type: multipart/form-data; boundary={boundary}\r\n"), no_file.as_bytes());
    assert_eq!((status, body["code"].as_str()), (400, Some("bad_parameter")), "no file part: {body}");
    let (status, body) = post(addr, "/detect/video", "Content-Type: multipart/form-data\r\n", no_file.as_bytes());
    assert_eq!((status, body["code"].as_str()), (400, Some("bad_parameter")), "no boundary: {body}");
    // Text parts before the file count towards the byte limit.
    let server = Server::start(&[("STREAMDET_SERVER_MAX_UPLOAD_BYTES", "100000")]);
    let addr = &server.addr;
    let mut big = format!("--{boundary}\r\nContent-Disposition: form-data; name=\"note\"\r\n\r\n").into_bytes();
    big.extend(vec![b'a'; 300_000]);
    big.extend(format!("\r\n--{boundary}--\r\n").bytes());
    let headers = format!("Content-Type: multipart/form-data; boundary={boundary}\r\n");
    let (mut reader, _) = upload_with(addr, "/detect/video", &headers, big, 16 << 10, Duration::ZERO);
    assert_eq!(read_head(&mut reader), 413);
}

/// Many uploads, some cut off, some watched by clients that hang up: afterwards the server
/// holds no more descriptors, temp files or memory than before, give or take.
#[test]
fn soak_two_hundred_uploads_leave_nothing_behind() {
    let temp = tempfile::tempdir().unwrap();
    let server = Server::start(&[
        ("STREAMDET_STORAGE_TEMP_DIR", temp.path().to_str().unwrap()),
        ("STREAMDET_SERVER_MAX_SESSIONS", "8"),
        ("STREAMDET_SERVER_MAX_SESSIONS_PER_CLIENT", "0"),
        ("STREAMDET_SERVER_SSE_KEEPALIVE_S", "1"),
    ]);
    let addr = server.addr.clone();
    let pid = server.child.id();
    let clip = std::fs::read(fixtures().join("faststart.mp4")).unwrap();
    let one = |i: usize| {
        let id = format!("soak-session-{i:06}");
        match i % 4 {
            // Cut off mid-way: half the body, then the client is gone.
            0 => {
                let mut stream = TcpStream::connect(&addr).unwrap();
                let head = format!("POST /detect/video?max_frames=1&session={id} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: {}\r\n\r\n", clip.len());
                stream.write_all(head.as_bytes()).unwrap();
                stream.write_all(&clip[..clip.len() / 2]).unwrap();
                thread::sleep(Duration::from_millis(20));
            }
            // Watched by a client that hangs up at once.
            1 => {
                let mut watcher = TcpStream::connect(&addr).unwrap();
                watcher.write_all(format!("GET /sessions/{id}/events HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes()).unwrap();
                let (mut reader, _) = upload(&addr, &format!("/detect/video?max_frames=1&session={id}"), clip.clone(), 64 << 10, Duration::ZERO);
                drop(watcher);
                assert_eq!(read_head(&mut reader), 200);
                let _ = read_body(&mut reader);
            }
            _ => {
                let (mut reader, _) = upload(&addr, "/detect/video?max_frames=1", clip.clone(), 64 << 10, Duration::ZERO);
                assert_eq!(read_head(&mut reader), 200);
                let events = ndjson(&read_body(&mut reader));
                assert_eq!(events.last().unwrap()["type"], "end", "{events:?}");
            }
        }
    };
    // Warm up (the model's buffers, the thread pools), then measure.
    for i in 0..8 {
        one(1000 + i);
    }
    assert!(eventually(Duration::from_secs(30), || health(&addr)["sessions_active"] == 0));
    let (fd_before, (rss_before, _)) = (open_descriptors(pid), rss_mib(pid));
    thread::scope(|scope| {
        for worker in 0..4 {
            let one = &one;
            scope.spawn(move || (0..50).for_each(|i| one(worker * 50 + i)));
        }
    });
    assert!(eventually(Duration::from_secs(60), || health(&addr)["sessions_active"] == 0), "sessions still running");
    let settled = eventually(Duration::from_secs(20), || open_descriptors(pid) <= fd_before + 5);
    let (fd_after, (rss_after, rss_peak)) = (open_descriptors(pid), rss_mib(pid));
    println!("soak: 200 uploads; descriptors {fd_before} -> {fd_after}; RSS {rss_before} -> {rss_after} MiB (peak {rss_peak} MiB)");
    assert!(settled, "descriptors {fd_before} -> {fd_after}");
    assert!(eventually(Duration::from_secs(10), || std::fs::read_dir(temp.path()).unwrap().count() == 0), "temp files left");
    assert!(rss_after < rss_before + 150, "RSS grew from {rss_before} to {rss_after} MiB");
    health(&addr);
}

#[test]
fn videos_that_grow_past_the_limits_or_use_other_codecs_are_refused() {
    let server = Server::start(&[("STREAMDET_LIMITS_MAX_WIDTH", "512"), ("STREAMDET_LIMITS_MAX_HEIGHT", "512")]);
    let addr = &server.addr;
    // 64x64, then a new SPS says 1024x1024: the small frames, then `too_large`.
    let switch = std::fs::read(fixtures().join("switch.h264")).unwrap();
    let (mut reader, _) = upload(addr, "/detect/video?stride=10", switch, 16 << 10, Duration::ZERO);
    assert_eq!(read_head(&mut reader), 200);
    let events = ndjson(&read_body(&mut reader));
    let frames: Vec<u64> = events.iter().filter(|e| e["type"] == "frame").map(|e| e["index"].as_u64().unwrap()).collect();
    assert_eq!(frames, [0, 10, 20], "only the small frames reach the model: {events:?}");
    assert_eq!(events.last().unwrap()["code"], "too_large", "{events:?}");
    // A first frame over the limit, and codecs outside the allow-list, never start a stream.
    for (name, status, code) in [("huge_first.h264", 413, "too_large"), ("png.mkv", 415, "unsupported_codec"), ("rawvideo.mkv", 415, "unsupported_codec")] {
        let body = std::fs::read(fixtures().join(name)).unwrap();
        let (mut reader, _) = upload(addr, "/detect/video", body, 64 << 10, Duration::ZERO);
        let got = read_head(&mut reader);
        let rest = String::from_utf8_lossy(&read_rest(&mut reader)).into_owned();
        assert_eq!(got, status, "{name}: {rest}");
        assert!(rest.contains(code), "{name}: {rest}");
    }
    health(addr);
}

#[test]
fn avi_and_flv_uploads_stream_their_detections() {
    let server = Server::start(&[]);
    let addr = &server.addr;
    for (name, container, codec) in [("mpeg4.avi", "avi", "mpeg4"), ("mjpeg.avi", "avi", "mjpeg"), ("clip.flv", "flv", "h264")] {
        let body = std::fs::read(fixtures().join(name)).unwrap();
        let (mut reader, _) = upload(addr, "/detect/video?stride=50", body, 16 << 10, Duration::from_millis(5));
        assert_eq!(read_head(&mut reader), 200, "{name}");
        let events = ndjson(&read_body(&mut reader));
        assert_eq!(events[0]["media"]["container"], container, "{name}: {:?}", events[0]);
        assert_eq!(events[0]["media"]["codec"], codec, "{name}");
        let frames: Vec<u64> = events.iter().filter(|e| e["type"] == "frame").map(|e| e["index"].as_u64().unwrap()).collect();
        assert_eq!(frames, [0, 50], "{name}: {events:?}");
        assert_eq!(events.last().unwrap()["type"], "end", "{name}");
    }
}

/// What is left of a response after its head.
fn read_rest(reader: &mut std::io::BufReader<TcpStream>) -> Vec<u8> {
    let mut rest = Vec::new();
    let _ = std::io::Read::read_to_end(reader, &mut rest);
    rest
}
