use super::*;
use proptest::prelude::*;
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

/// How long a test waits before concluding that a blocked call is really blocked. Only ever a
/// lower bound on observing "still blocked"; no assertion depends on speed.
const SETTLE: Duration = Duration::from_millis(100);
/// A generous hang guard for calls that must return.
const HANG_GUARD: Duration = Duration::from_secs(20);

fn small_window() -> BufferOptions {
    BufferOptions { dir: std::env::temp_dir(), window_bytes: 8192 }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
}

fn read_all(reader: &mut BufferReader) -> Vec<u8> {
    let mut out = Vec::new();
    reader.read_to_end(&mut out).expect("read to end");
    out
}

#[test]
fn sequential_write_then_read() {
    let mut writer = create(&BufferOptions::default()).unwrap();
    writer.append(b"hello ").unwrap();
    writer.append(b"world").unwrap();
    let buffer = writer.finish();
    assert_eq!(read_all(&mut buffer.reader()), b"hello world");
}

#[test]
fn read_blocks_until_bytes_arrive() {
    let mut writer = create(&BufferOptions::default()).unwrap();
    let mut reader = writer.buffer().reader();
    let (tx, rx) = mpsc::channel();
    let handle = thread::spawn(move || {
        let mut buf = [0u8; 16];
        let n = reader.read(&mut buf).unwrap();
        tx.send(buf[..n].to_vec()).unwrap();
    });
    assert!(rx.recv_timeout(SETTLE).is_err(), "read returned before any byte was written");
    writer.append(b"abc").unwrap();
    assert_eq!(rx.recv_timeout(HANG_GUARD).unwrap(), b"abc");
    handle.join().unwrap();
}

#[test]
fn read_returns_zero_only_after_finish() {
    let mut writer = create(&BufferOptions::default()).unwrap();
    writer.append(b"xy").unwrap();
    let mut reader = writer.buffer().reader();
    let mut buf = [0u8; 8];
    assert_eq!(reader.read(&mut buf).unwrap(), 2);
    let (tx, rx) = mpsc::channel();
    let handle = thread::spawn(move || tx.send(reader.read(&mut buf).unwrap()).unwrap());
    assert!(rx.recv_timeout(SETTLE).is_err(), "EOF reported before finish");
    writer.finish();
    assert_eq!(rx.recv_timeout(HANG_GUARD).unwrap(), 0);
    handle.join().unwrap();
}

#[test]
fn concurrent_chunked_write_and_read() {
    let data = pattern(3 << 20, 7);
    let mut writer = create(&small_window()).unwrap();
    let mut reader = writer.buffer().reader();
    let reader_thread = thread::spawn(move || {
        let mut out = Vec::new();
        let mut buf = vec![0u8; 1000];
        loop {
            let n = reader.read(&mut buf).unwrap();
            if n == 0 {
                break out;
            }
            out.extend_from_slice(&buf[..n]);
        }
    });
    for (i, chunk) in data.chunks(4099).enumerate() {
        writer.append(chunk).unwrap();
        if i % 97 == 0 {
            thread::sleep(Duration::from_millis(1));
        }
    }
    writer.finish();
    assert!(reader_thread.join().unwrap() == data);
}

#[test]
fn seek_set_and_current_and_tell() {
    let mut writer = create(&BufferOptions::default()).unwrap();
    writer.append(b"0123456789").unwrap();
    let mut reader = writer.buffer().reader();
    assert_eq!(reader.seek(SeekFrom::Start(4)).unwrap(), 4);
    let mut buf = [0u8; 3];
    reader.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"456");
    assert_eq!(reader.stream_position().unwrap(), 7);
    assert_eq!(reader.seek(SeekFrom::Current(-5)).unwrap(), 2);
    reader.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"234");
    assert!(reader.seek(SeekFrom::Current(-100)).is_err(), "seek before 0 must fail");
    assert_eq!(reader.position(), 5, "a failed seek leaves the position alone");
}

#[test]
fn seek_end_blocks_until_finish() {
    let mut writer = create(&BufferOptions::default()).unwrap();
    writer.append(b"abcdef").unwrap();
    let mut reader = writer.buffer().reader();
    let (tx, rx) = mpsc::channel();
    let handle = thread::spawn(move || {
        let pos = reader.seek(SeekFrom::End(-2)).unwrap();
        let mut rest = Vec::new();
        reader.read_to_end(&mut rest).unwrap();
        tx.send((pos, rest)).unwrap();
    });
    assert!(rx.recv_timeout(SETTLE).is_err(), "SeekFrom::End returned before EOF");
    writer.append(b"gh").unwrap();
    writer.finish();
    assert_eq!(rx.recv_timeout(HANG_GUARD).unwrap(), (6, b"gh".to_vec()));
    handle.join().unwrap();
}

#[test]
fn total_length_question_blocks_until_finish() {
    let mut writer = create(&BufferOptions::default()).unwrap();
    let buffer = writer.buffer().clone();
    let (tx, rx) = mpsc::channel();
    let handle = thread::spawn(move || tx.send(buffer.wait_len().unwrap()).unwrap());
    writer.append(&[1; 10]).unwrap();
    assert!(rx.recv_timeout(SETTLE).is_err());
    writer.finish();
    assert_eq!(rx.recv_timeout(HANG_GUARD).unwrap(), 10);
    handle.join().unwrap();
}

#[test]
fn written_counts_appended_bytes() {
    let mut writer = create(&BufferOptions::default()).unwrap();
    assert_eq!(writer.buffer().written(), 0);
    writer.append(&[0; 100]).unwrap();
    writer.append(&[]).unwrap();
    writer.append(&[0; 23]).unwrap();
    assert_eq!(writer.written(), 123);
    assert_eq!(writer.buffer().written(), 123);
    assert_eq!(writer.finish().written(), 123);
}

#[test]
fn reader_is_read_and_seek() {
    fn takes_read_seek<T: Read + Seek + Send>(_: &T) {}
    let writer = create(&BufferOptions::default()).unwrap();
    takes_read_seek(&writer.buffer().reader());
}

#[test]
fn temp_file_is_private_and_removed_with_last_handle() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let options = BufferOptions { dir: dir.path().to_path_buf(), ..Default::default() };
    let mut writer = create(&options).unwrap();
    writer.append(b"data").unwrap();
    let path = writer.buffer().path();
    assert!(path.file_name().unwrap().to_string_lossy().starts_with(TEMP_PREFIX));
    assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    let buffer = writer.finish();
    let reader = buffer.reader();
    drop(buffer);
    assert!(path.exists(), "a reader still holds the buffer");
    drop(reader);
    assert!(!path.exists(), "the temp file outlived its last handle");
}

#[test]
fn dropping_the_writer_without_finish_removes_the_file_too() {
    let dir = tempfile::tempdir().unwrap();
    let options = BufferOptions { dir: dir.path().to_path_buf(), ..Default::default() };
    let mut writer = create(&options).unwrap();
    writer.append(b"partial").unwrap();
    drop(writer);
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[test]
fn persist_renames_while_a_reader_keeps_reading() {
    let dir = tempfile::tempdir().unwrap();
    let options = BufferOptions { dir: dir.path().to_path_buf(), ..Default::default() };
    let mut writer = create(&options).unwrap();
    writer.append(b"first ").unwrap();
    let mut reader = writer.buffer().reader();
    let mut buf = [0u8; 6];
    reader.read_exact(&mut buf).unwrap();
    let kept = dir.path().join("kept.bin");
    writer.buffer().persist(&kept).unwrap();
    assert_eq!(writer.buffer().path(), kept);
    writer.append(b"second").unwrap();
    let buffer = writer.finish();
    assert_eq!(read_all(&mut reader), b"second");
    drop((buffer, reader));
    assert_eq!(std::fs::read(&kept).unwrap(), b"first second", "a persisted file is kept");
}

#[test]
fn abort_wakes_blocked_readers_with_an_error() {
    let mut writer = create(&BufferOptions::default()).unwrap();
    writer.append(b"ab").unwrap();
    let buffer = writer.buffer().clone();
    let (tx, rx) = mpsc::channel();
    let mut handles = Vec::new();
    for i in 0..3 {
        let mut reader = buffer.reader();
        let tx = tx.clone();
        handles.push(thread::spawn(move || {
            let result = if i == 0 {
                reader.seek(SeekFrom::End(0)).map(|_| 0)
            } else {
                reader.seek(SeekFrom::Start(2)).unwrap();
                reader.read(&mut [0u8; 4])
            };
            tx.send(result.map_err(|e| e.kind())).unwrap();
        }));
    }
    assert!(rx.recv_timeout(SETTLE).is_err(), "a reader returned before the abort");
    drop(writer);
    for _ in 0..3 {
        let result = rx.recv_timeout(HANG_GUARD).expect("a blocked reader was not woken");
        assert_eq!(result, Err(io::ErrorKind::ConnectionAborted));
    }
    let mut late = buffer.reader();
    assert!(late.read(&mut [0u8; 1]).is_err(), "reads after an abort fail at once");
    handles.into_iter().for_each(|h| h.join().unwrap());
}

#[test]
fn explicit_abort_fails_the_writer_and_readers() {
    let mut writer = create(&BufferOptions::default()).unwrap();
    writer.append(b"x").unwrap();
    writer.buffer().abort();
    assert!(writer.append(b"y").is_err());
    assert!(writer.buffer().reader().read(&mut [0u8; 1]).is_err());
    assert_eq!(writer.buffer().write_state(), WriteState::Aborted);
}

#[test]
fn many_readers_at_different_positions() {
    let data = pattern(200_000, 3);
    let mut writer = create(&small_window()).unwrap();
    let readers: Vec<_> = (0..8u64)
        .map(|i| {
            let mut reader = writer.buffer().reader();
            let start = i * 20_000;
            thread::spawn(move || {
                reader.seek(SeekFrom::Start(start)).unwrap();
                (start as usize, read_all(&mut reader))
            })
        })
        .collect();
    for chunk in data.chunks(3000) {
        writer.append(chunk).unwrap();
    }
    writer.finish();
    for handle in readers {
        let (start, got) = handle.join().unwrap();
        assert!(got == data[start..], "reader from {start} saw different bytes");
    }
}

#[test]
fn reads_across_many_remaps_and_window_slides() {
    let data = pattern(1 << 20, 11);
    let mut writer = create(&small_window()).unwrap();
    let buffer = writer.buffer().clone();
    let mut reader = buffer.reader();
    let mut got = Vec::new();
    let mut buf = [0u8; 777];
    for chunk in data.chunks(1500) {
        writer.append(chunk).unwrap();
        while reader.position() < writer.written() {
            let n = reader.read(&mut buf).unwrap();
            got.extend_from_slice(&buf[..n]);
            assert!(reader.mapped_len() <= 8192, "the window grew past its bound");
        }
    }
    assert!(got == data);
    // Jump backwards and forwards over the whole file.
    for &offset in &[0u64, 900_000, 5, 500_000, 1_048_000] {
        reader.seek(SeekFrom::Start(offset)).unwrap();
        let n = reader.read(&mut buf).unwrap();
        assert_eq!(&buf[..n], &data[offset as usize..offset as usize + n]);
    }
    assert_eq!(buffer.furthest_read(), data.len() as u64);
}

#[test]
fn discard_before_frees_blocks_and_later_reads_work() {
    use std::os::unix::fs::MetadataExt;
    let data = pattern(8 << 20, 5);
    let mut writer = create(&BufferOptions::default()).unwrap();
    writer.append(&data).unwrap();
    writer.buffer().file_sync_for_test();
    let path = writer.buffer().path();
    let blocks_before = std::fs::metadata(&path).unwrap().blocks();
    writer.buffer().discard_before(6 << 20).unwrap();
    let blocks_after = std::fs::metadata(&path).unwrap().blocks();
    assert!(blocks_after < blocks_before / 2, "punching 6 MiB of 8 MiB left {blocks_after} of {blocks_before} blocks");
    assert_eq!(std::fs::metadata(&path).unwrap().len(), data.len() as u64, "length kept");
    let mut reader = writer.buffer().reader();
    reader.seek(SeekFrom::Start(7 << 20)).unwrap();
    writer.append(b"tail").unwrap();
    writer.finish();
    let rest = read_all(&mut reader);
    assert!(rest[..(1 << 20)] == data[7 << 20..]);
    assert_eq!(&rest[1 << 20..], b"tail");
    reader.seek(SeekFrom::Start(100)).unwrap();
    assert_eq!(reader.read(&mut [0u8; 4]).unwrap_err().kind(), io::ErrorKind::InvalidInput);
}

impl Buffer {
    /// Flushes written pages so that `stat` counts their blocks (delayed allocation would
    /// otherwise make the block count before the punch meaningless).
    fn file_sync_for_test(&self) {
        self.shared.file.sync_all().unwrap();
    }
}

#[derive(Debug, Clone)]
enum Op {
    Append(Vec<u8>),
    Read(usize),
    Seek(u64),
    SeekBack(u64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => proptest::collection::vec(any::<u8>(), 0..5000).prop_map(Op::Append),
        4 => (1usize..6000).prop_map(Op::Read),
        1 => (0u64..40_000).prop_map(Op::Seek),
        1 => (0u64..3000).prop_map(Op::SeekBack),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    /// Random interleavings of appends, reads and seeks agree with an in-memory copy.
    #[test]
    fn agrees_with_an_in_memory_copy(ops in proptest::collection::vec(op(), 1..60), finish in any::<bool>()) {
        let mut writer = create(&small_window()).unwrap();
        let mut reader = writer.buffer().reader();
        let mut model: Vec<u8> = Vec::new();
        let mut pos = 0u64;
        for op in &ops {
            match op {
                Op::Append(bytes) => {
                    writer.append(bytes).unwrap();
                    model.extend_from_slice(bytes);
                }
                Op::Read(n) => {
                    // A read at or past the written length would block: the model only reads
                    // where bytes exist.
                    if pos < model.len() as u64 {
                        let mut buf = vec![0u8; *n];
                        let got = reader.read(&mut buf).unwrap();
                        prop_assert!(got > 0 && got <= *n);
                        let at = pos as usize;
                        prop_assert_eq!(&buf[..got], &model[at..at + got]);
                        pos += got as u64;
                    }
                }
                Op::Seek(to) => {
                    pos = reader.seek(SeekFrom::Start(*to)).unwrap();
                }
                Op::SeekBack(by) => {
                    let back = (*by).min(pos) as i64;
                    pos = reader.seek(SeekFrom::Current(-back)).unwrap();
                }
            }
            prop_assert_eq!(reader.position(), pos);
        }
        if finish {
            let buffer = writer.finish();
            let mut rest = Vec::new();
            reader.read_to_end(&mut rest).unwrap();
            let from = (pos as usize).min(model.len());
            prop_assert_eq!(&rest[..], &model[from..]);
            prop_assert_eq!(buffer.reader().seek(SeekFrom::End(0)).unwrap(), model.len() as u64);
        }
    }
}

#[test]
fn sweep_removes_only_files_no_buffer_holds() {
    let dir = tempfile::tempdir().unwrap();
    let options = BufferOptions { dir: dir.path().to_path_buf(), ..Default::default() };
    let mut live = create(&options).unwrap();
    live.append(b"in use").unwrap();
    let stale = dir.path().join(format!("{TEMP_PREFIX}left-by-a-crash"));
    std::fs::write(&stale, b"old upload").unwrap();
    let unrelated = dir.path().join("someone-elses.tmp");
    std::fs::write(&unrelated, b"keep").unwrap();
    assert_eq!(sweep_stale(dir.path()).unwrap(), 1);
    assert!(!stale.exists());
    assert!(live.buffer().path().exists(), "a live buffer's file stays");
    assert!(unrelated.exists(), "files without the prefix stay");
    live.append(b" still works").unwrap();
}

#[test]
fn lag_is_measured_from_the_furthest_reader_and_its_wait_ends_when_readers_move_on() {
    let runtime = actix::System::new();
    let mut writer = create(&small_window()).unwrap();
    let buffer = writer.buffer().clone();
    assert_eq!(buffer.lag(), None, "no reader: nobody can fall behind");
    let mut reader = buffer.reader();
    writer.append(&pattern(10_000, 1)).unwrap();
    assert_eq!(buffer.lag(), Some(10_000));

    // Behind by more than the limit: the wait goes on until the reader reads.
    let still_waiting = runtime.block_on(async { actix::clock::timeout(SETTLE, buffer.wait_lag_at_most(2_000)).await });
    assert!(still_waiting.is_err(), "a writer 10 000 bytes ahead must wait for a limit of 2 000");
    let catch_up = thread::spawn(move || {
        thread::sleep(SETTLE);
        let mut first = vec![0; 9_000];
        reader.read_exact(&mut first).unwrap();
        reader
    });
    runtime.block_on(async { actix::clock::timeout(HANG_GUARD, buffer.wait_lag_at_most(2_000)).await }).expect("the reader caught up");
    let mut reader = catch_up.join().unwrap();
    assert_eq!(buffer.lag(), Some(1_000));

    // A reader waiting beyond the written end (an index at the end of the file) is never behind.
    let (waiting_tx, waiting_rx) = mpsc::channel();
    let ahead = thread::spawn(move || {
        reader.seek(SeekFrom::Start(1 << 20)).unwrap();
        waiting_tx.send(()).unwrap();
        let mut byte = [0u8; 1];
        let n = reader.read(&mut byte).unwrap();
        (reader, n)
    });
    waiting_rx.recv_timeout(HANG_GUARD).unwrap();
    runtime.block_on(async { actix::clock::timeout(HANG_GUARD, buffer.wait_lag_at_most(0)).await }).expect("a reader ahead releases the writer");
    writer.append(&pattern(50_000, 2)).unwrap();
    assert_eq!(buffer.lag(), Some(0), "still short of the reader's position");
    writer.finish();
    let (reader, n) = ahead.join().unwrap();
    assert_eq!(n, 0, "EOF before the position the reader waited at");

    drop(reader);
    assert_eq!(buffer.lag(), None, "a dropped reader holds nobody back");
    runtime.block_on(async { actix::clock::timeout(HANG_GUARD, buffer.wait_lag_at_most(0)).await }).expect("no reader, no wait");
}
