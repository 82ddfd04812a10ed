//! What a benchmark run found, and how it is written: `results.json` (everything), `REPORT.md`
//! (tables: ours, the peer, the ratio) and SVG charts.

use std::fmt::Write as _;
use std::path::Path;

use plotters::prelude::*;
use serde::Serialize;

use super::client::Timeline;

#[derive(Debug, Clone, Default, Serialize)]
pub struct Results {
    pub machine: Machine,
    /// How the inputs were made and how often each figure was repeated.
    pub settings: Vec<String>,
    pub buffer: Option<BufferResult>,
    pub decode: Option<DecodeResult>,
    pub model: Vec<ModelRow>,
    pub end_to_end: Vec<EndToEndRow>,
    pub overhead: Option<OverheadResult>,
    pub concurrency: Vec<ConcurrencyRow>,
    pub memory: Vec<MemoryRow>,
    pub tracking: Vec<TrackingRow>,
    /// One upload's timeline per server, for the signature chart.
    pub timelines: Vec<NamedTimeline>,
    /// Peers or stages that did not run, and why.
    pub skipped: Vec<String>,
}

/// One MOTChallenge sequence: our tracker and the peer on the same detections with the same
/// settings (the peer's defaults), and ours with config.toml's; means over the seeds.
#[derive(Debug, Clone, Serialize)]
pub struct TrackingRow {
    pub sequence: String,
    pub ours: MotScore,
    pub peer: MotScore,
    pub ours_configured: MotScore,
    /// Our tracker's time per frame (the update alone, with the sequence's detections).
    pub ours_us_per_frame: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct MotScore {
    pub mota: f64,
    pub idf1: f64,
    /// Identity switches.
    pub idsw: f64,
    pub seeds: Vec<u64>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Machine {
    pub cpu: String,
    pub cores: usize,
    pub threads: usize,
    /// streamdet's CPU kernels in this run (`avx512+amx`, `avx512`, `avx2`, `portable`).
    pub kernels: String,
    pub version: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct BufferResult {
    pub bytes: u64,
    pub gib_per_s: f64,
    pub peak_rss_mib: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct DecodeResult {
    pub clip: String,
    pub frames: u64,
    pub ours_fps: f64,
    pub ffmpeg_fps: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ModelRow {
    pub model: String,
    pub batch: usize,
    pub ours_ms: f64,
    pub ort_ms: Option<f64>,
    pub openvino_ms: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Measured {
    pub first_frame_s: Option<f64>,
    pub total_s: f64,
    pub frames: u64,
    pub fps: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct EndToEndRow {
    pub container: String,
    /// "full speed" or "2 MB/s".
    pub rate: String,
    pub ours: Measured,
    pub seed: Option<Measured>,
}

#[derive(Debug, Clone, Serialize)]
pub struct OverheadResult {
    pub frames: u64,
    pub detector_fps: f64,
    pub pipeline_fps: f64,
    /// The pipeline writing an annotated video (`annotate=1`) as well.
    pub annotated_fps: f64,
    /// The annotator's own time (drawing and encoding, in its thread) per frame.
    pub annotate_ms_per_frame: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ConcurrencyRow {
    pub uploads: usize,
    /// Frames of several sessions run in one model call (batch_size 4) or one at a time.
    pub batching: bool,
    pub aggregate_fps: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct MemoryRow {
    pub upload_bytes: u64,
    pub idle_rss_mib: f64,
    pub peak_rss_mib: f64,
    pub seconds: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct NamedTimeline {
    pub server: String,
    pub label: String,
    pub timeline: Timeline,
}

fn ratio(ours: f64, theirs: Option<f64>) -> String {
    match theirs {
        Some(t) if t > 0.0 => format!("{:.2}", ours / t),
        _ => "–".into(),
    }
}

fn opt(value: Option<f64>, digits: usize) -> String {
    value.map_or("skipped".into(), |v| format!("{v:.digits$}"))
}

/// REPORT.md's text.
pub fn markdown(results: &Results, command: &str) -> String {
    let mut md = String::new();
    let m = &results.machine;
    let _ = writeln!(md, "# streamdet benchmark report\n");
    let _ = writeln!(md, "Made by `{command}` (streamdet {}).\n", m.version);
    let _ = writeln!(md, "Machine: {}, {} cores; model threads: {}; streamdet's CPU kernels: {}.\n", m.cpu, m.cores, m.threads, m.kernels);
    let _ = writeln!(
        md,
        "Each peer ran in the same invocation as ours, interleaved; figures are medians. Ratios are ours divided by the peer's (below 1 is faster for times, above 1 is faster for rates).\n"
    );
    if !results.settings.is_empty() {
        let _ = writeln!(md, "Inputs and repetitions:\n");
        for s in &results.settings {
            let _ = writeln!(md, "- {s}");
        }
        md.push('\n');
    }
    if let Some(b) = &results.buffer {
        let _ = writeln!(md, "## Buffer\n\nAppend {} MiB in 64 KiB chunks while a reader reads it through the mapped window.\n", b.bytes >> 20);
        let _ = writeln!(md, "| throughput | peak RSS of the process |\n|---|---|\n| {:.2} GiB/s | {:.0} MiB |\n", b.gib_per_s, b.peak_rss_mib);
    }
    if let Some(d) = &results.decode {
        let _ = writeln!(
            md,
            "## Decode\n\nDecode and letterbox-convert to 640x640 RGB ({}; {} frames), next to the ffmpeg CLI decoding and scaling the same clip to a null output.\n",
            d.clip, d.frames
        );
        let _ = writeln!(md, "| streamdet frames/s | ffmpeg CLI frames/s | time ratio |\n|---|---|---|");
        let time_ratio = d.ffmpeg_fps.map(|f| f / d.ours_fps);
        let _ = writeln!(md, "| {:.0} | {} | {} |\n", d.ours_fps, opt(d.ffmpeg_fps, 0), opt(time_ratio, 2));
    }
    if !results.model.is_empty() {
        let _ = writeln!(
            md,
            "## Model\n\nLatency of one call on random input, ours (`streamdet bench-model`), ONNX Runtime (`ort_bench.py`) and OpenVINO (`openvino_bench.py`, CPU plugin, fp32, latency hint), same file, same input, same threads; a ratio is our time over theirs.\n"
        );
        let _ = writeln!(md, "| model | batch | streamdet ms | ONNX Runtime ms | ratio | OpenVINO ms | ratio |\n|---|---|---|---|---|---|---|");
        for r in &results.model {
            let _ = writeln!(
                md,
                "| {} | {} | {:.1} | {} | {} | {} | {} |",
                r.model,
                r.batch,
                r.ours_ms,
                opt(r.ort_ms, 1),
                ratio(r.ours_ms, r.ort_ms),
                opt(r.openvino_ms, 1),
                ratio(r.ours_ms, r.openvino_ms)
            );
        }
        md.push_str("\n![model latency](model.svg)\n\n");
    }
    if !results.end_to_end.is_empty() {
        let _ = writeln!(
            md,
            "## End to end over HTTP\n\nOne upload at a time over loopback, by the same full-duplex client, to streamdet and to the Python seed service. Time to first detection (first frame event) and total time count from the first byte sent.\n"
        );
        let _ = writeln!(
            md,
            "| container | upload | first detection s (ours / seed) | total s (ours / seed) | frames/s (ours / seed) | total ratio |\n|---|---|---|---|---|---|"
        );
        for r in &results.end_to_end {
            let seed = r.seed.as_ref();
            let _ = writeln!(
                md,
                "| {} | {} | {} / {} | {:.2} / {} | {:.1} / {} | {} |",
                r.container,
                r.rate,
                opt(r.ours.first_frame_s, 2),
                opt(seed.and_then(|s| s.first_frame_s), 2),
                r.ours.total_s,
                opt(seed.map(|s| s.total_s), 2),
                r.ours.fps,
                opt(seed.map(|s| s.fps), 1),
                ratio(r.ours.total_s, seed.map(|s| s.total_s)),
            );
        }
        md.push_str("\n![bytes received and frames detected during one upload](timeline.svg)\n\n");
    }
    if let Some(o) = &results.overhead {
        let overhead = (o.detector_fps / o.pipeline_fps - 1.0) * 100.0;
        let _ = writeln!(
            md,
            "## Pipeline overhead\n\nThe whole pipeline in process (buffer, decoder, inference actors) against the detector alone on the same {} decoded frames.\n",
            o.frames
        );
        let _ = writeln!(
            md,
            "| detector alone frames/s | pipeline frames/s | overhead | pipeline writing the annotated video, frames/s | annotator's time per frame |\n|---|---|---|---|---|\n| {:.2} | {:.2} | {:.1} % | {:.2} | {:.1} ms |\n",
            o.detector_fps, o.pipeline_fps, overhead, o.annotated_fps, o.annotate_ms_per_frame
        );
    }
    if !results.concurrency.is_empty() {
        let _ = writeln!(
            md,
            "## Concurrent uploads\n\nAggregate frames/s of N simultaneous uploads on the dynamic-batch YOLO11n export, batching across sessions on (batch_size 4) and off (1).\n"
        );
        let _ = writeln!(md, "| uploads | batching off | batching on |\n|---|---|---|");
        let mut counts: Vec<usize> = results.concurrency.iter().map(|r| r.uploads).collect();
        counts.sort_unstable();
        counts.dedup();
        for n in counts {
            let get = |on: bool| results.concurrency.iter().find(|r| r.uploads == n && r.batching == on).map(|r| r.aggregate_fps);
            let _ = writeln!(md, "| {n} | {} | {} |", opt(get(false), 2), opt(get(true), 2));
        }
        md.push_str("\n![aggregate frames per second against concurrent uploads](concurrency.svg)\n\n");
    }
    if !results.memory.is_empty() {
        let _ = writeln!(
            md,
            "## Memory\n\nPeak RSS of the server while one upload of this size streams through it at full speed (a fresh server each; idle = after loading the model).\n"
        );
        let _ = writeln!(md, "| upload | idle RSS | peak RSS | seconds |\n|---|---|---|---|");
        for r in &results.memory {
            let _ = writeln!(md, "| {} MiB | {:.0} MiB | {:.0} MiB | {:.1} |", r.upload_bytes >> 20, r.idle_rss_mib, r.peak_rss_mib, r.seconds);
        }
        md.push('\n');
    }
    if !results.tracking.is_empty() {
        let seeds = results.tracking[0].ours.seeds.len();
        let _ = writeln!(
            md,
            "## Tracking\n\nstreamdet's ByteTrack and supervision's (Python, the peer) on the same detections, made from the MOTChallenge ground truth that `motmetrics` ships (`scripts/mot_eval.py`: boxes jittered, 15 % dropped, false positives added), scored by motmetrics; means over {seeds} seeds. Both with supervision's default thresholds; the last columns are ours with config.toml's `[track]` (the ByteTrack paper's).\n"
        );
        let _ = writeln!(
            md,
            "| sequence | MOTA | peer MOTA | IDF1 | peer IDF1 | ID switches | peer ID switches | µs per frame | MOTA, paper's | IDF1, paper's |\n|---|---|---|---|---|---|---|---|---|---|"
        );
        for r in &results.tracking {
            let _ = writeln!(
                md,
                "| {} | {:.3} | {:.3} | {:.3} | {:.3} | {:.1} | {:.1} | {:.1} | {:.3} | {:.3} |",
                r.sequence,
                r.ours.mota,
                r.peer.mota,
                r.ours.idf1,
                r.peer.idf1,
                r.ours.idsw,
                r.peer.idsw,
                r.ours_us_per_frame,
                r.ours_configured.mota,
                r.ours_configured.idf1
            );
        }
        md.push('\n');
    }
    if !results.skipped.is_empty() {
        let _ = writeln!(md, "## Skipped\n");
        for s in &results.skipped {
            let _ = writeln!(md, "- {s}");
        }
        md.push('\n');
    }
    md
}

/// Writes results.json, REPORT.md and the charts into `dir`.
pub fn write_all(results: &Results, dir: &Path, command: &str) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("results.json"), serde_json::to_string_pretty(results)? + "\n")?;
    std::fs::write(dir.join("REPORT.md"), markdown(results, command))?;
    if !results.timelines.is_empty() {
        timeline_chart(&results.timelines, &dir.join("timeline.svg"))?;
    }
    if !results.concurrency.is_empty() {
        concurrency_chart(&results.concurrency, &dir.join("concurrency.svg"))?;
    }
    if !results.model.is_empty() {
        model_chart(&results.model, &dir.join("model.svg"))?;
    }
    Ok(())
}

type ChartResult = Result<(), Box<dyn std::error::Error>>;

fn chart_error(e: Box<dyn std::error::Error>) -> anyhow::Error {
    anyhow::anyhow!("drawing a chart: {e}")
}

const PALETTE: [RGBColor; 4] = [RGBColor(0, 114, 178), RGBColor(213, 94, 0), RGBColor(0, 158, 115), RGBColor(204, 121, 167)];

/// Bytes received (solid, left axis, MB) and frames detected (dashed points, right axis) against
/// time, one colour per server.
pub fn timeline_chart(timelines: &[NamedTimeline], path: &Path) -> anyhow::Result<()> {
    let draw = || -> ChartResult {
        let root = SVGBackend::new(path, (900, 480)).into_drawing_area();
        root.fill(&WHITE)?;
        let end = |t: &Timeline| t.sent.iter().chain(&t.frames).map(|p| p.0).fold(0.0, f64::max);
        let t_max = timelines.iter().map(|n| end(&n.timeline)).fold(0.1, f64::max) * 1.05;
        let mb_max = timelines.iter().flat_map(|n| n.timeline.sent.last()).map(|p| p.1 as f64 / 1e6).fold(0.1, f64::max) * 1.1;
        let frames_max = timelines.iter().flat_map(|n| n.timeline.frames.last()).map(|p| p.1 as f64).fold(1.0, f64::max) * 1.1;
        let title = timelines.first().map_or(String::new(), |n| format!("One upload ({}): bytes sent and frames detected", n.label));
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .right_y_label_area_size(60)
            .build_cartesian_2d(0.0..t_max, 0.0..mb_max)?
            .set_secondary_coord(0.0..t_max, 0.0..frames_max);
        chart.configure_mesh().x_desc("seconds since the first byte").y_desc("MB uploaded").draw()?;
        chart.configure_secondary_axes().y_desc("frames detected").draw()?;
        for (i, named) in timelines.iter().enumerate() {
            let colour = PALETTE[i % PALETTE.len()];
            let sent = named.timeline.sent.iter().map(|&(t, b)| (t, b as f64 / 1e6));
            chart
                .draw_series(LineSeries::new(sent, colour.stroke_width(2)))?
                .label(format!("{}: MB uploaded", named.server))
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], colour.stroke_width(2)));
            let frames = named.timeline.frames.iter().map(|&(t, n)| (t, n as f64));
            chart
                .draw_secondary_series(frames.map(|p| Circle::new(p, 3, colour.filled())))?
                .label(format!("{}: frames detected", named.server))
                .legend(move |(x, y)| Circle::new((x + 10, y), 3, colour.filled()));
        }
        chart.configure_series_labels().position(SeriesLabelPosition::UpperLeft).background_style(WHITE.mix(0.85)).border_style(BLACK).draw()?;
        root.present()?;
        Ok(())
    };
    draw().map_err(chart_error)
}

/// Aggregate frames/s against concurrent uploads, batching on and off.
pub fn concurrency_chart(rows: &[ConcurrencyRow], path: &Path) -> anyhow::Result<()> {
    let draw = || -> ChartResult {
        let root = SVGBackend::new(path, (700, 420)).into_drawing_area();
        root.fill(&WHITE)?;
        let n_max = rows.iter().map(|r| r.uploads).max().unwrap_or(1) as f64;
        let fps_max = rows.iter().map(|r| r.aggregate_fps).fold(0.1, f64::max) * 1.2;
        let mut chart = ChartBuilder::on(&root)
            .caption("Aggregate frames/s against concurrent uploads", ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(0.5..n_max + 0.5, 0.0..fps_max)?;
        chart
            .configure_mesh()
            .x_labels(n_max as usize)
            .x_label_formatter(&|x| format!("{x:.0}"))
            .x_desc("simultaneous uploads")
            .y_desc("frames/s, all sessions")
            .draw()?;
        for (i, batching) in [false, true].into_iter().enumerate() {
            let colour = PALETTE[i];
            let points: Vec<(f64, f64)> = rows.iter().filter(|r| r.batching == batching).map(|r| (r.uploads as f64, r.aggregate_fps)).collect();
            let label = if batching { "batching across sessions (batch_size 4)" } else { "one frame per call" };
            chart
                .draw_series(LineSeries::new(points.clone(), colour.stroke_width(2)))?
                .label(label)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], colour.stroke_width(2)));
            chart.draw_series(points.into_iter().map(|p| Circle::new(p, 4, colour.filled())))?;
        }
        chart.configure_series_labels().position(SeriesLabelPosition::LowerRight).background_style(WHITE.mix(0.85)).border_style(BLACK).draw()?;
        root.present()?;
        Ok(())
    };
    draw().map_err(chart_error)
}

/// Model latency, ours next to ONNX Runtime, one pair of bars per model and batch.
/// One runtime's bars in the model chart: its name, where its bar sits in a group, its colour,
/// its figure.
type ModelBar = (&'static str, f64, RGBColor, fn(&ModelRow) -> Option<f64>);

pub fn model_chart(rows: &[ModelRow], path: &Path) -> anyhow::Result<()> {
    let draw = || -> ChartResult {
        let root = SVGBackend::new(path, (760, 420)).into_drawing_area();
        root.fill(&WHITE)?;
        let ms_max = rows.iter().flat_map(|r| [Some(r.ours_ms), r.ort_ms, r.openvino_ms]).flatten().fold(1.0, f64::max) * 1.2;
        let labels: Vec<String> = rows.iter().map(|r| format!("{} b{}", r.model, r.batch)).collect();
        let mut chart = ChartBuilder::on(&root)
            .caption("Model latency per call (lower is faster)", ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(0.0..rows.len() as f64, 0.0..ms_max)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(rows.len() * 2 + 1)
            .x_label_formatter(&|x| {
                let i = x.floor() as usize;
                if (x - x.floor() - 0.5).abs() < 0.01 { labels.get(i).cloned().unwrap_or_default() } else { String::new() }
            })
            .y_desc("milliseconds")
            .draw()?;
        let bars: [ModelBar; 3] = [
            ("streamdet", 0.08, PALETTE[0], |r| Some(r.ours_ms)),
            ("ONNX Runtime", 0.36, PALETTE[1], |r| r.ort_ms),
            ("OpenVINO", 0.64, PALETTE[2], |r| r.openvino_ms),
        ];
        for (name, offset, colour, value) in bars {
            let values: Vec<(usize, f64)> = rows.iter().enumerate().filter_map(|(i, r)| value(r).map(|v| (i, v))).collect();
            chart
                .draw_series(values.into_iter().map(|(i, v)| {
                    let x0 = i as f64 + offset;
                    Rectangle::new([(x0, 0.0), (x0 + 0.26, v)], colour.filled())
                }))?
                .label(name)
                .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], colour.filled()));
        }
        chart.configure_series_labels().position(SeriesLabelPosition::UpperLeft).background_style(WHITE.mix(0.85)).border_style(BLACK).draw()?;
        root.present()?;
        Ok(())
    };
    draw().map_err(chart_error)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Results {
        let timeline = Timeline { sent: vec![(0.0, 0), (1.0, 2_000_000), (2.0, 4_000_000)], frames: vec![(0.4, 1), (1.2, 2), (2.5, 3)] };
        Results {
            machine: Machine { cpu: "Test CPU".into(), cores: 2, threads: 2, kernels: "avx2".into(), version: "0.1.0".into() },
            settings: vec!["tiny inputs".into()],
            buffer: Some(BufferResult { bytes: 16 << 20, gib_per_s: 1.5, peak_rss_mib: 30.0 }),
            decode: Some(DecodeResult { clip: "1 s 1080p".into(), frames: 30, ours_fps: 175.0, ffmpeg_fps: Some(180.0) }),
            model: vec![
                ModelRow { model: "yolov12n".into(), batch: 1, ours_ms: 150.0, ort_ms: Some(80.0), openvino_ms: Some(100.0) },
                ModelRow { model: "yolo11n".into(), batch: 4, ours_ms: 400.0, ort_ms: None, openvino_ms: None },
            ],
            end_to_end: vec![EndToEndRow {
                container: "MP4 faststart".into(),
                rate: "2 MB/s".into(),
                ours: Measured { first_frame_s: Some(0.4), total_s: 2.5, frames: 3, fps: 1.2 },
                seed: Some(Measured { first_frame_s: Some(2.1), total_s: 5.0, frames: 3, fps: 0.6 }),
            }],
            overhead: Some(OverheadResult { frames: 30, detector_fps: 7.0, pipeline_fps: 6.7, annotated_fps: 6.5, annotate_ms_per_frame: 4.2 }),
            concurrency: vec![
                ConcurrencyRow { uploads: 1, batching: false, aggregate_fps: 7.0 },
                ConcurrencyRow { uploads: 2, batching: false, aggregate_fps: 7.5 },
                ConcurrencyRow { uploads: 1, batching: true, aggregate_fps: 7.1 },
                ConcurrencyRow { uploads: 2, batching: true, aggregate_fps: 8.5 },
            ],
            memory: vec![MemoryRow { upload_bytes: 64 << 20, idle_rss_mib: 90.0, peak_rss_mib: 180.0, seconds: 3.0 }],
            tracking: vec![TrackingRow {
                sequence: "TUD-Campus".into(),
                ours: MotScore { mota: 0.812, idf1: 0.86, idsw: 1.0, seeds: vec![1, 2] },
                peer: MotScore { mota: 0.809, idf1: 0.857, idsw: 1.5, seeds: vec![1, 2] },
                ours_configured: MotScore { mota: 0.785, idf1: 0.842, idsw: 1.0, seeds: vec![1, 2] },
                ours_us_per_frame: 5.5,
            }],
            timelines: vec![
                NamedTimeline { server: "streamdet".into(), label: "MP4 faststart at 2 MB/s".into(), timeline: timeline.clone() },
                NamedTimeline { server: "seed".into(), label: "MP4 faststart at 2 MB/s".into(), timeline },
            ],
            skipped: vec!["ONNX Runtime at batch 4: not installed".into()],
        }
    }

    #[test]
    fn the_report_holds_every_table_with_ratios() {
        let md = markdown(&sample(), "streamdet bench --quick");
        for expected in [
            "Test CPU, 2 cores",
            "| 1.50 GiB/s | 30 MiB |",
            "| 175 | 180 | 1.03 |",
            "| yolov12n | 1 | 150.0 | 80.0 | 1.88 | 100.0 | 1.50 |",
            "| yolo11n | 4 | 400.0 | skipped | – | skipped | – |",
            "| MP4 faststart | 2 MB/s | 0.40 / 2.10 | 2.50 / 5.00 | 1.2 / 0.6 | 0.50 |",
            "| 1 | 7.00 | 7.10 |\n| 2 | 7.50 | 8.50 |",
            "| 64 MiB | 90 MiB | 180 MiB | 3.0 |",
            "| TUD-Campus | 0.812 | 0.809 | 0.860 | 0.857 | 1.0 | 1.5 | 5.5 | 0.785 | 0.842 |",
            "4.5 %",
            "- ONNX Runtime at batch 4: not installed",
            "![model latency](model.svg)",
        ] {
            assert!(md.contains(expected), "{expected:?} missing from:\n{md}");
        }
    }

    #[test]
    fn charts_and_json_are_written() {
        let dir = tempfile::tempdir().unwrap();
        write_all(&sample(), dir.path(), "streamdet bench").unwrap();
        for name in ["timeline.svg", "concurrency.svg", "model.svg"] {
            let svg = std::fs::read_to_string(dir.path().join(name)).unwrap();
            assert!(svg.starts_with("<svg") && svg.contains("<polyline") || svg.contains("<rect"), "{name} is not a chart");
            assert!(svg.len() > 2000, "{name} is nearly empty");
        }
        let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.path().join("results.json")).unwrap()).unwrap();
        assert_eq!(json["model"][0]["ours_ms"], 150.0);
        assert_eq!(json["timelines"][0]["timeline"]["frames"][2][1], 3);
    }
}
