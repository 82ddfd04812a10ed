//! The stages over real HTTP: end-to-end uploads against the seed service, concurrent uploads,
//! and the server's memory while large uploads stream through.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::bail;

use super::Bench;
use super::client::{Pacer, Upload, UploadOutcome};
use super::media::{self, Container};
use super::peers::ServerProcess;
use super::report::*;
use super::stats::{MIB, median, summarize};

impl Bench {
    pub(super) fn end_to_end(&mut self) -> anyhow::Result<()> {
        let spec = self.plan.e2e_clip.clone();
        let master = self.master("e2e", &spec)?;
        let clips: Vec<(Container, PathBuf)> = Container::ALL.iter().map(|&c| Ok((c, self.remuxed(&master, c)?))).collect::<anyhow::Result<_>>()?;
        let seed_missing = self.peers.seed_missing();
        if let Some(why) = &seed_missing {
            self.skip(format!("the Python seed service: {why}"));
        }
        let rates = [("full speed", None), ("2 MB/s", Some(2e6))];
        let mut progress = self.progress.stage("end to end", (self.plan.reps * clips.len() * rates.len()) as u64);
        let ours = ServerProcess::ours(
            &self.model,
            self.threads,
            &[("STREAMDET_SERVER_MAX_SESSIONS", "8".into()), ("STREAMDET_SERVER_MAX_SESSIONS_PER_CLIENT", "0".into())],
        )?;
        let seed = match seed_missing {
            None => Some(ServerProcess::seed(&self.peers, &self.model, self.threads)?),
            Some(_) => None,
        };
        let path = format!("/detect/video?stride={}", self.plan.e2e_stride);
        // Per (container, rate): our runs and the seed's.
        let mut runs: Vec<(Vec<UploadOutcome>, Vec<UploadOutcome>)> = vec![Default::default(); clips.len() * rates.len()];
        for rep in 0..self.plan.reps {
            for (ci, (container, clip)) in clips.iter().enumerate() {
                for (ri, (rate_name, rate)) in rates.iter().enumerate() {
                    let upload = |addr| Upload { addr, path: &path, body: clip, pacer: Pacer { rate: *rate }, chunk: 64 << 10 };
                    let outcome = upload(ours.addr).run()?;
                    if let Some(error) = &outcome.error {
                        bail!("streamdet failed on {} at {rate_name}: {error}", container.label());
                    }
                    let slot = &mut runs[ci * rates.len() + ri];
                    if rep == 0 && *container == Container::Faststart && rate.is_some() {
                        self.results.timelines.push(timeline("streamdet", container, rate_name, &outcome));
                    }
                    slot.0.push(outcome);
                    if let Some(seed) = &seed {
                        let outcome = upload(seed.addr).run()?;
                        if let Some(error) = &outcome.error {
                            self.results.skipped.push(format!("seed service on {} at {rate_name}: {error}", container.label()));
                        } else {
                            if rep == 0 && *container == Container::Faststart && rate.is_some() {
                                self.results.timelines.push(timeline("seed (Python)", container, rate_name, &outcome));
                            }
                            slot.1.push(outcome);
                        }
                    }
                    progress.step(&format!("{} at {rate_name}", container.label()));
                }
            }
        }
        for (ci, (container, _)) in clips.iter().enumerate() {
            for (ri, (rate_name, _)) in rates.iter().enumerate() {
                let (ours, seed) = &runs[ci * rates.len() + ri];
                self.results.end_to_end.push(EndToEndRow {
                    container: container.label().into(),
                    rate: rate_name.to_string(),
                    ours: summarize(ours),
                    seed: (!seed.is_empty()).then(|| summarize(seed)),
                });
            }
        }
        progress.finish();
        Ok(())
    }

    pub(super) fn concurrency(&mut self) -> anyhow::Result<()> {
        let Some(batch_model) = self.batch_model.clone() else {
            self.skip("concurrent uploads: the dynamic-batch export (--batch-model) was not found".into());
            return Ok(());
        };
        let spec = self.plan.concurrency_clip.clone();
        let clip = self.remuxed(&self.master("concurrency", &spec)?, Container::Faststart)?;
        let counts = self.plan.concurrency.clone();
        let mut progress = self.progress.stage("concurrency", (2 * counts.len() * self.plan.reps) as u64);
        let path = format!("/detect/video?stride={}", self.plan.concurrency_stride);
        for batching in [false, true] {
            let env = [
                ("STREAMDET_SERVER_MAX_SESSIONS", counts.iter().max().copied().unwrap_or(1).to_string()),
                // Every upload comes from this one client.
                ("STREAMDET_SERVER_MAX_SESSIONS_PER_CLIENT", "0".to_string()),
                ("STREAMDET_SERVER_BATCH_SIZE", if batching { "4" } else { "1" }.to_string()),
                ("STREAMDET_SERVER_BATCH_TIMEOUT_MS", "10".to_string()),
            ];
            let server = ServerProcess::ours(&batch_model, self.threads, &env)?;
            for &n in &counts {
                let mut rates = Vec::new();
                for _ in 0..self.plan.reps {
                    let start = Instant::now();
                    let outcomes: Vec<anyhow::Result<UploadOutcome>> = std::thread::scope(|scope| {
                        let handles: Vec<_> = (0..n)
                            .map(|_| {
                                let upload = Upload { addr: server.addr, path: &path, body: &clip, pacer: Pacer { rate: None }, chunk: 64 << 10 };
                                scope.spawn(move || upload.run().map_err(anyhow::Error::from))
                            })
                            .collect();
                        handles.into_iter().map(|h| h.join().unwrap_or_else(|_| Err(anyhow::anyhow!("an upload thread panicked")))).collect()
                    });
                    let seconds = start.elapsed().as_secs_f64();
                    let mut frames = 0;
                    for outcome in outcomes {
                        let outcome = outcome?;
                        if let Some(error) = outcome.error {
                            bail!("{n} concurrent uploads: {error}");
                        }
                        frames += outcome.frames;
                    }
                    rates.push(frames as f64 / seconds);
                    progress.step(&format!("{n} uploads, batching {}", if batching { "on" } else { "off" }));
                }
                self.results.concurrency.push(ConcurrencyRow { uploads: n, batching, aggregate_fps: median(rates) });
            }
        }
        progress.finish();
        Ok(())
    }

    pub(super) fn memory(&mut self) -> anyhow::Result<()> {
        let sizes = self.plan.memory_sizes.clone();
        let mut progress = self.progress.stage("memory", 1 + sizes.len() as u64);
        let spec = self.plan.memory_source.clone();
        let source = self.master("memory-source", &spec)?;
        progress.step("source clip made");
        for bytes in sizes {
            let file = self.media_dir.join(format!("{}-memory-{}MiB.ts", self.plan.name, bytes >> 20));
            if !file.exists() {
                media::repeat_to_size(&source, bytes, &file)?;
            }
            let env = [("STREAMDET_SERVER_MAX_UPLOAD_BYTES", (bytes * 2).to_string())];
            let server = ServerProcess::ours(&self.model, self.threads, &env)?;
            let idle = server.peak_rss().unwrap_or(0) as f64 / MIB;
            let upload = Upload { addr: server.addr, path: "/detect/video?fps=0.5", body: &file, pacer: Pacer { rate: None }, chunk: 256 << 10 };
            let outcome = upload.run()?;
            if let Some(error) = outcome.error {
                bail!("the {} MiB upload failed: {error}", bytes >> 20);
            }
            let peak = server.peak_rss().unwrap_or(0) as f64 / MIB;
            let upload_bytes = std::fs::metadata(&file)?.len();
            self.results.memory.push(MemoryRow { upload_bytes, idle_rss_mib: idle, peak_rss_mib: peak, seconds: outcome.total_seconds });
            progress.step(&format!("{} MiB", bytes >> 20));
        }
        progress.finish();
        Ok(())
    }
}

fn timeline(server: &str, container: &Container, rate: &str, outcome: &UploadOutcome) -> NamedTimeline {
    NamedTimeline { server: server.into(), label: format!("{} at {rate}", container.label()), timeline: outcome.timeline.clone() }
}
