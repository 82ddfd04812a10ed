//! `streamdet decode FILE|-`: decodes a video through the growing buffer, as the service does,
//! and prints one JSON line per selected frame and an `end` line.

use std::io::{Read, Write};
use std::process::ExitCode;
use std::thread;

use serde_json::json;
use streamdet_actors::buffer::{self, BufferOptions, BufferWriter};
use streamdet_actors::decode::{DecodeOptions, Decoder};

use super::Failure;
use super::SelectionArgs;
use crate::config::Config;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// A video file, or `-` to read standard input as it arrives.
    input: String,
    #[command(flatten)]
    selection: SelectionArgs,
}

/// Appends everything `source` yields to `writer`; a read error aborts the buffer (dropping
/// the writer unfinished), which the decoder sees as a cancelled upload.
fn feed(mut source: impl Read, mut writer: BufferWriter) -> std::io::Result<()> {
    let mut chunk = vec![0u8; 64 << 10];
    loop {
        let n = match source.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        writer.append(&chunk[..n])?;
    }
    writer.finish();
    Ok(())
}

pub fn run(args: Args, config: &Config) -> Result<ExitCode, Failure> {
    let selection = args.selection.selection(config)?;
    let live = args.input == "-";
    let source: Box<dyn Read + Send> = if live {
        Box::new(std::io::stdin())
    } else {
        match std::fs::File::open(&args.input) {
            Ok(file) => Box::new(file),
            Err(err) => return Err(Failure::Runtime(anyhow::anyhow!("cannot open {}: {err}", args.input))),
        }
    };
    let writer = buffer::create(&BufferOptions { dir: config.temp_dir(), window_bytes: config.storage.window_bytes })?;
    let reader = writer.buffer().reader();
    let buffer = writer.buffer().clone();
    let feeder = thread::spawn(move || feed(source, writer));
    let options = DecodeOptions {
        selection,
        live,
        max_dimensions: (config.limits.max_width, config.limits.max_height),
        threads: config.decode.threads,
        ..Default::default()
    };
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let result = (|| -> Result<serde_json::Value, streamdet_actors::decode::DecodeError> {
        let mut decoder = Decoder::open(reader, options)?;
        let mut failure = None;
        loop {
            match decoder.next_frame() {
                Ok(Some(f)) => {
                    let line = json!({"type": "frame", "index": f.index, "pts": f.pts, "keyframe": f.keyframe});
                    // A closed stdout (`| head`) ends the run like an abort.
                    if writeln!(out, "{line}").is_err() {
                        decoder.buffer().abort();
                        break;
                    }
                }
                Ok(None) => break,
                Err(err) => {
                    failure = Some(err);
                    break;
                }
            }
        }
        match failure {
            Some(err) => Err(err),
            None => {
                let media = decoder.media();
                let stats = decoder.stats();
                Ok(json!({
                    "type": "end", "container": media.container, "codec": media.codec,
                    "width": media.width, "height": media.height,
                    "frames": stats.frames, "selected": stats.selected, "corrupt_packets": stats.corrupt_packets,
                }))
            }
        }
    })();
    let code = match result {
        Ok(end) => {
            writeln!(out, "{end}")?;
            ExitCode::SUCCESS
        }
        Err(err) => {
            // Stop the feeder: nothing more will be read.
            buffer.abort();
            writeln!(out, "{}", json!({"type": "error", "code": err.code(), "message": err.to_string()}))?;
            eprintln!("streamdet: {err}");
            ExitCode::from(1)
        }
    };
    drop(out);
    // The feeder ends by itself at EOF; after an early error its next append fails (aborted).
    match feeder.join() {
        Ok(Err(err)) if code == ExitCode::SUCCESS => Err(Failure::Runtime(anyhow::anyhow!("reading the input: {err}"))),
        _ => Ok(code),
    }
}
