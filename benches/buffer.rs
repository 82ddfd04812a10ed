//! Buffer throughput: append 1 GiB in 64 KiB chunks while a reader thread reads all of it through
//! the mapped view. Prints GB/s (criterion's throughput line) and the process's peak RSS, which
//! must stay far below the file's size: the buffer never holds the file in memory.
//!
//! `cargo bench --bench buffer` (set `STREAMDET_BENCH_BYTES` to change the 1 GiB).

use std::io::Read;
use std::thread;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput};
use streamdet_actors::buffer::{self, BufferOptions};

const CHUNK: usize = 64 << 10;

fn total_bytes() -> u64 {
    std::env::var("STREAMDET_BENCH_BYTES").ok().and_then(|v| v.parse().ok()).unwrap_or(1 << 30)
}

/// One upload: returns the time from the first append to the reader's last byte.
fn stream_once(total: u64) -> Duration {
    let mut writer = buffer::create(&BufferOptions::default()).expect("create buffer");
    let mut reader = writer.buffer().reader();
    let start = Instant::now();
    let reader_thread = thread::spawn(move || {
        let mut buf = vec![0u8; CHUNK];
        let mut seen = 0u64;
        loop {
            let n = reader.read(&mut buf).expect("read");
            if n == 0 {
                break seen;
            }
            seen += n as u64;
        }
    });
    let chunk: Vec<u8> = (0..CHUNK).map(|i| i as u8).collect();
    let mut sent = 0u64;
    while sent < total {
        let n = (total - sent).min(CHUNK as u64) as usize;
        writer.append(&chunk[..n]).expect("append");
        sent += n as u64;
    }
    writer.finish();
    let seen = reader_thread.join().expect("reader thread");
    assert_eq!(seen, total);
    start.elapsed()
}

/// Peak resident set size of this process, from /proc.
fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

fn reset_peak_rss() {
    // Writing 5 to clear_refs resets VmHWM to the current RSS.
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

fn main() {
    let total = total_bytes();
    let mut criterion = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(15))
        .configure_from_args();
    reset_peak_rss();
    let mut group = criterion.benchmark_group("buffer");
    group.throughput(Throughput::Bytes(total));
    group.bench_function("append_and_mapped_read_64KiB_chunks", |b| {
        b.iter_custom(|iters| (0..iters).map(|_| stream_once(total)).sum())
    });
    group.finish();
    let once = stream_once(total);
    println!(
        "buffer: {:.2} GB/s for {} MiB in 64 KiB chunks (one more run), peak RSS {} MiB",
        total as f64 / once.as_secs_f64() / 1e9,
        total >> 20,
        peak_rss_bytes().map_or("unknown".into(), |b| (b >> 20).to_string()),
    );
    criterion.final_summary();
}
