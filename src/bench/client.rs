//! The benchmark's HTTP client: uploads a file with chunked transfer encoding, optionally at a
//! fixed rate, while it reads the NDJSON response — full duplex, as a streaming client must be
//! to see detections before its upload ends. It records a timeline: bytes sent and frames
//! received against time since the first byte.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use serde::Serialize;

/// Paces a sender to `rate` bytes per second: after `sent` bytes, `elapsed` into the upload,
/// how long to wait before sending more.
#[derive(Debug, Clone, Copy)]
pub struct Pacer {
    /// Bytes per second; `None`: as fast as the connection takes them.
    pub rate: Option<f64>,
}

impl Pacer {
    pub fn delay(&self, sent: u64, elapsed: Duration) -> Duration {
        match self.rate {
            Some(rate) if rate > 0.0 => Duration::from_secs_f64(sent as f64 / rate).saturating_sub(elapsed),
            _ => Duration::ZERO,
        }
    }
}

/// Bytes sent and frames received against seconds since the first byte was sent.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Timeline {
    /// (seconds, bytes sent so far)
    pub sent: Vec<(f64, u64)>,
    /// (seconds, frame events received so far)
    pub frames: Vec<(f64, u64)>,
}

/// A recorder shared by the sending thread and the reading one.
#[derive(Clone)]
pub struct TimelineRecorder {
    start: Instant,
    inner: Arc<Mutex<Timeline>>,
}

impl TimelineRecorder {
    pub fn new(start: Instant) -> Self {
        TimelineRecorder { start, inner: Arc::default() }
    }

    fn now(&self) -> f64 {
        self.start.elapsed().as_secs_f64()
    }

    pub fn sent(&self, total: u64) {
        let t = self.now();
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).sent.push((t, total));
    }

    pub fn frames(&self, total: u64) {
        let t = self.now();
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).frames.push((t, total));
    }

    pub fn finish(self) -> Timeline {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// What one upload measured.
#[derive(Debug, Clone, Serialize)]
pub struct UploadOutcome {
    pub status: u16,
    /// First byte sent to the last byte handed to the socket.
    pub upload_seconds: f64,
    /// First byte sent to the first frame event received.
    pub first_frame_seconds: Option<f64>,
    /// First byte sent to the last line received.
    pub total_seconds: f64,
    pub frames: u64,
    /// The `error` event's message, or the body of a non-200 response.
    pub error: Option<String>,
    #[serde(skip)]
    pub timeline: Timeline,
}

/// One upload of the file `body` to `addr` at `path` (with its query).
pub struct Upload<'a> {
    pub addr: SocketAddr,
    pub path: &'a str,
    pub body: &'a Path,
    pub pacer: Pacer,
    pub chunk: usize,
}

impl Upload<'_> {
    pub fn run(&self) -> std::io::Result<UploadOutcome> {
        let stream = TcpStream::connect(self.addr)?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(Duration::from_secs(600)))?;
        let mut writer = stream.try_clone()?;
        let head = format!(
            "POST {} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/octet-stream\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
            self.path, self.addr
        );
        let start = Instant::now();
        let recorder = TimelineRecorder::new(start);
        let mut file = std::fs::File::open(self.body)?;
        let (pacer, piece, sender_recorder) = (self.pacer, self.chunk.max(1), recorder.clone());
        let sender = thread::spawn(move || -> Option<f64> {
            writer.write_all(head.as_bytes()).ok()?;
            let mut sent = 0u64;
            sender_recorder.sent(0);
            let mut buffer = vec![0u8; piece];
            loop {
                let n = file.read(&mut buffer).ok()?;
                if n == 0 {
                    break;
                }
                let chunk = &buffer[..n];
                thread::sleep(pacer.delay(sent, start.elapsed()));
                let framed = [format!("{:x}\r\n", chunk.len()).as_bytes(), chunk, b"\r\n"].concat();
                // A server that answered early (an error) may close: stop sending.
                writer.write_all(&framed).ok()?;
                sent += chunk.len() as u64;
                sender_recorder.sent(sent);
            }
            writer.write_all(b"0\r\n\r\n").ok()?;
            Some(start.elapsed().as_secs_f64())
        });
        let mut reader = BufReader::new(stream);
        let (status, chunked) = read_head(&mut reader)?;
        let mut outcome =
            UploadOutcome { status, upload_seconds: 0.0, first_frame_seconds: None, total_seconds: 0.0, frames: 0, error: None, timeline: Timeline::default() };
        let mut body = BodyReader { reader, chunked, done: false };
        let mut pending = Vec::new();
        let mut raw = Vec::new();
        while let Some(data) = body.next_piece()? {
            if status != 200 {
                raw.extend_from_slice(&data);
                continue;
            }
            pending.extend_from_slice(&data);
            while let Some(end) = pending.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = pending.drain(..=end).collect();
                let Ok(event) = serde_json::from_slice::<serde_json::Value>(&line) else { continue };
                match event["type"].as_str() {
                    Some("frame") => {
                        outcome.frames += 1;
                        outcome.first_frame_seconds.get_or_insert(start.elapsed().as_secs_f64());
                        recorder.frames(outcome.frames);
                    }
                    Some("error") => outcome.error = Some(event["message"].as_str().unwrap_or("error").to_string()),
                    _ => {}
                }
                outcome.total_seconds = start.elapsed().as_secs_f64();
            }
        }
        if status != 200 {
            outcome.error = Some(format!("HTTP {status}: {}", String::from_utf8_lossy(&raw).trim()));
        }
        if outcome.total_seconds == 0.0 {
            outcome.total_seconds = start.elapsed().as_secs_f64(); // no line came
        }
        outcome.upload_seconds = sender.join().ok().flatten().unwrap_or(f64::NAN);
        outcome.timeline = recorder.finish();
        Ok(outcome)
    }
}

/// Reads the status line and headers; returns the status and whether the body is chunked.
fn read_head(reader: &mut impl BufRead) -> std::io::Result<(u16, bool)> {
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let status = line.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let mut chunked = false;
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" || line == "\n" {
            break;
        }
        let lower = line.to_ascii_lowercase();
        if lower.starts_with("transfer-encoding:") && lower.contains("chunked") {
            chunked = true;
        }
    }
    Ok((status, chunked))
}

/// A response body, chunked or delimited by the connection's end.
struct BodyReader<R> {
    reader: R,
    chunked: bool,
    done: bool,
}

impl<R: BufRead> BodyReader<R> {
    fn next_piece(&mut self) -> std::io::Result<Option<Vec<u8>>> {
        if self.done {
            return Ok(None);
        }
        if !self.chunked {
            let mut data = vec![0u8; 64 << 10];
            let n = self.reader.read(&mut data)?;
            data.truncate(n);
            self.done = n == 0;
            return Ok((n > 0).then_some(data));
        }
        let mut size = String::new();
        self.reader.read_line(&mut size)?;
        let size = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16).unwrap_or(0);
        if size == 0 {
            self.done = true;
            return Ok(None);
        }
        let mut data = vec![0u8; size + 2];
        self.reader.read_exact(&mut data)?;
        data.truncate(size);
        Ok(Some(data))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn the_pacer_spreads_bytes_over_time_at_its_rate() {
        let pacer = Pacer { rate: Some(1000.0) };
        assert_eq!(pacer.delay(0, Duration::ZERO), Duration::ZERO);
        assert_eq!(pacer.delay(500, Duration::from_millis(200)), Duration::from_millis(300));
        assert_eq!(pacer.delay(500, Duration::from_secs(1)), Duration::ZERO, "behind schedule: no wait");
        assert_eq!(Pacer { rate: None }.delay(1 << 30, Duration::ZERO), Duration::ZERO);
    }

    #[test]
    fn the_recorder_keeps_both_series_in_order() {
        let recorder = TimelineRecorder::new(Instant::now());
        let other = recorder.clone();
        recorder.sent(0);
        other.frames(1);
        recorder.sent(100);
        other.frames(2);
        let timeline = recorder.finish();
        assert_eq!(timeline.sent.iter().map(|s| s.1).collect::<Vec<_>>(), [0, 100]);
        assert_eq!(timeline.frames.iter().map(|s| s.1).collect::<Vec<_>>(), [1, 2]);
        assert!(timeline.sent.windows(2).all(|w| w[0].0 <= w[1].0));
    }

    /// A server that answers one frame line per 1000 bytes it receives, while still receiving,
    /// then an end line: the client must see frames before its upload ends.
    #[test]
    fn the_client_reads_events_while_it_uploads() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut writer = stream.try_clone().unwrap();
            let mut reader = BufReader::new(stream);
            let mut line = String::new();
            while reader.read_line(&mut line).unwrap() > 0 && line != "\r\n" {
                line.clear();
            }
            writer.write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n").unwrap();
            let send = |w: &mut TcpStream, text: &str| w.write_all(format!("{:x}\r\n{text}\r\n", text.len()).as_bytes()).unwrap();
            let mut body = BodyReader { reader, chunked: true, done: false };
            let mut received = 0;
            while let Some(piece) = body.next_piece().unwrap() {
                received += piece.len();
                send(&mut writer, "{\"type\":\"frame\",\"index\":0}\n");
            }
            send(&mut writer, &format!("{{\"type\":\"end\",\"bytes\":{received}}}\n"));
            writer.write_all(b"0\r\n\r\n").unwrap();
            received
        });
        let body = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(body.path(), vec![7u8; 10_000]).unwrap();
        let upload = Upload { addr, path: "/detect/video", body: body.path(), pacer: Pacer { rate: Some(100_000.0) }, chunk: 1000 };
        let outcome = upload.run().unwrap();
        assert_eq!(server.join().unwrap(), 10_000);
        assert_eq!(outcome.status, 200);
        assert_eq!(outcome.frames, 10);
        let first = outcome.first_frame_seconds.unwrap();
        assert!(first < outcome.upload_seconds, "first frame at {first} s, upload done at {} s", outcome.upload_seconds);
        assert_eq!(outcome.timeline.sent.last().unwrap().1, 10_000);
        assert_eq!(outcome.timeline.frames.len(), 10);
        assert!(outcome.error.is_none());
    }
}
