//! The configuration: `config.toml`, overridden by `STREAMDET_<SECTION>_<KEY>` environment
//! variables, overridden by command line flags (applied by the commands).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};
use streamdet_actors::actors::inference::BatchPolicy;
use streamdet_actors::annotate::AnnotateOptions;
use streamdet_actors::buffer::BufferOptions;
use streamdet_actors::decode::{DecodeOptions, FrameSelection};
use streamdet_actors::pipeline::PipelineOptions;
use streamdet_actors::track::{TrackParams, TrackingParams, parse_lines, parse_zones};

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: ServerConfig,
    pub model: ModelConfig,
    pub storage: StorageConfig,
    pub limits: LimitsConfig,
    pub decode: DecodeConfig,
    pub detect: DetectConfig,
    pub track: TrackConfig,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    pub listen: String,
    pub max_sessions: usize,
    pub max_upload_bytes: u64,
    pub max_lag_bytes: u64,
    pub batch_size: usize,
    pub batch_timeout_ms: u64,
    pub credits: usize,
    pub auth_token: String,
    pub cors_origins: String,
    pub idle_upload_timeout_s: u64,
    pub max_session_seconds: u64,
    pub shutdown_grace_s: u64,
    /// After SIGTERM, how long connections are still accepted while `/ready` answers 503.
    pub drain_delay_s: u64,
    /// Uploads one client may run at once (0: only `max_sessions` applies).
    pub max_sessions_per_client: usize,
    /// Bytes per second an upload must sustain over `min_upload_rate_window_s` (0: no minimum).
    pub min_upload_rate: u64,
    pub min_upload_rate_window_s: u64,
    /// Addresses of reverse proxies whose `X-Forwarded-For` names the client.
    pub trusted_proxies: String,
    /// Largest body of `POST /detect`.
    pub max_image_bytes: u64,
    /// `POST /detect` requests decoded and run at once; one more gets HTTP 429.
    pub max_image_requests: usize,
    /// How long a watch waits for an upload to claim its id.
    pub watch_wait_s: u64,
    /// Seconds between SSE comment lines on an idle stream.
    pub sse_keepalive_s: u64,
    pub max_watchers_per_session: usize,
    pub max_watchers: usize,
    /// Session ids remembered at once: running, waited for, or finished and replayable.
    pub max_registry_entries: usize,
    /// How long a finished session's events stay available (and its id reserved).
    pub replay_seconds: u64,
    /// Bytes of events a session keeps for replay; beyond it the oldest frames are dropped.
    pub replay_max_bytes: usize,
    /// This replica's name in the `X-Streamdet-Replica` header ("": the host name).
    pub replica: String,
    /// Largest annotated video (`annotate=1`) a session may write.
    pub max_annotated_bytes: u64,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    pub path: PathBuf,
    pub device: String,
    pub threads: usize,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    pub temp_dir: PathBuf,
    pub window_bytes: usize,
    pub persist_media: bool,
    pub media_dir: PathBuf,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    pub max_width: u32,
    pub max_height: u32,
    /// Largest image (width x height) `POST /detect` and `detect-image` decode.
    pub max_image_pixels: u64,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DecodeConfig {
    pub threads: usize,
}

/// ByteTrack's settings for sessions that track (`track=bytetrack`, `streamdet detect --track`).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TrackConfig {
    pub high_threshold: f32,
    pub low_threshold: f32,
    pub new_track_threshold: f32,
    pub match_threshold: f32,
    pub lost_track_seconds: f64,
}

impl Default for TrackConfig {
    fn default() -> Self {
        let paper = TrackParams::default();
        TrackConfig {
            high_threshold: paper.high_threshold,
            low_threshold: paper.low_threshold,
            new_track_threshold: paper.new_track_threshold,
            match_threshold: paper.match_threshold,
            lost_track_seconds: paper.lost_track_seconds,
        }
    }
}

impl TrackConfig {
    pub fn params(&self) -> TrackParams {
        TrackParams {
            high_threshold: self.high_threshold,
            low_threshold: self.low_threshold,
            new_track_threshold: self.new_track_threshold,
            match_threshold: self.match_threshold,
            lost_track_seconds: self.lost_track_seconds,
        }
    }

    /// What a request asks for: `track` (`bytetrack` or `none`), `lines` and `zones` (which
    /// need tracks, and imply them). `None`: no tracking.
    pub fn request(&self, track: Option<&str>, lines: Option<&str>, zones: Option<&str>) -> Result<Option<TrackingParams>, String> {
        let counting = lines.is_some() || zones.is_some();
        match track {
            None | Some("bytetrack") => {}
            Some("none") if counting => return Err("lines and zones need tracks: drop track=none".into()),
            Some("none") => return Ok(None),
            Some(other) => return Err(format!("track must be bytetrack or none, not {other:?}")),
        }
        if track.is_none() && !counting {
            return Ok(None);
        }
        let lines = lines.map(parse_lines).transpose()?.unwrap_or_default();
        let zones = zones.map(parse_zones).transpose()?.unwrap_or_default();
        Ok(Some(TrackingParams { track: self.params(), lines, zones }))
    }
}

/// Defaults of the detect routes' query parameters.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DetectConfig {
    pub conf: f32,
    pub iou: f32,
    pub stride: u64,
    /// 0: no frame-rate cap.
    pub fps: f64,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: "127.0.0.1:8080".into(),
            max_sessions: 4,
            max_upload_bytes: 2 << 30,
            max_lag_bytes: 256 << 20,
            batch_size: 1,
            batch_timeout_ms: 5,
            credits: 4,
            auth_token: String::new(),
            cors_origins: String::new(),
            idle_upload_timeout_s: 30,
            max_session_seconds: 3600,
            shutdown_grace_s: 10,
            drain_delay_s: 5,
            max_sessions_per_client: 2,
            min_upload_rate: 16 << 10,
            min_upload_rate_window_s: 30,
            trusted_proxies: String::new(),
            max_image_bytes: 32 << 20,
            max_image_requests: 4,
            watch_wait_s: 30,
            sse_keepalive_s: 15,
            max_watchers_per_session: 8,
            max_watchers: 256,
            max_registry_entries: 1024,
            replay_seconds: 300,
            replay_max_bytes: 8 << 20,
            replica: String::new(),
            max_annotated_bytes: 1 << 30,
        }
    }
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig { path: PathBuf::from("models/yolov12n.onnx"), device: "cpu".into(), threads: 0 }
    }
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig { temp_dir: PathBuf::new(), window_bytes: 32 << 20, persist_media: false, media_dir: PathBuf::from("media") }
    }
}

impl DetectConfig {
    /// The frames a video request processes when it names neither `stride` nor `fps`.
    pub fn default_selection(&self) -> FrameSelection {
        if self.fps > 0.0 {
            FrameSelection::Fps(self.fps)
        } else if self.stride > 1 {
            FrameSelection::Stride(self.stride)
        } else {
            FrameSelection::All
        }
    }
}

impl Default for DetectConfig {
    fn default() -> Self {
        DetectConfig { conf: 0.25, iou: 0.45, stride: 1, fps: 0.0 }
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig { max_width: 8192, max_height: 8192, max_image_pixels: 40_000_000 }
    }
}

const ENV_PREFIX: &str = "STREAMDET_";

impl Config {
    /// Reads `path` (an error if it is missing), or `./config.toml` when it exists, or nothing;
    /// then applies the `STREAMDET_*` variables of `env`.
    pub fn load(path: Option<&Path>, env: impl IntoIterator<Item = (String, String)>) -> anyhow::Result<Self> {
        let text = match path {
            Some(path) => std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?,
            None => std::fs::read_to_string("config.toml").unwrap_or_default(),
        };
        let mut table: toml::Table = text.parse().context("config.toml is not valid TOML")?;
        for (name, value) in env {
            let Some(key) = name.strip_prefix(ENV_PREFIX) else { continue };
            apply_env(&mut table, key, &value).with_context(|| format!("environment variable {name}"))?;
        }
        let config: Config = table.try_into().context("invalid configuration")?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> anyhow::Result<()> {
        if !matches!(self.model.device.as_str(), "cpu" | "cuda") {
            bail!("model.device must be \"cpu\" or \"cuda\", not {:?}", self.model.device);
        }
        if self.storage.window_bytes < 1 << 16 {
            bail!("storage.window_bytes must be at least 65536");
        }
        let server = &self.server;
        let positive = [
            ("max_sessions", server.max_sessions),
            ("batch_size", server.batch_size),
            ("credits", server.credits),
            ("max_image_requests", server.max_image_requests),
            ("max_watchers_per_session", server.max_watchers_per_session),
            ("max_watchers", server.max_watchers),
            ("max_registry_entries", server.max_registry_entries),
            ("replay_max_bytes", server.replay_max_bytes),
        ];
        if let Some((name, _)) = positive.iter().find(|(_, value)| *value == 0) {
            bail!("server.{name} must be positive");
        }
        if server.min_upload_rate > 0 && server.min_upload_rate_window_s == 0 {
            bail!("server.min_upload_rate_window_s must be positive when server.min_upload_rate is set");
        }
        if server.watch_wait_s == 0 || server.sse_keepalive_s == 0 || server.max_image_bytes == 0 {
            bail!("server.watch_wait_s, server.sse_keepalive_s and server.max_image_bytes must be positive");
        }
        self.trusted_proxies()?;
        if !is_replica_name(&server.replica) {
            bail!("server.replica must be at most 64 letters, digits and '.', '-', '_', ':', not {:?}", server.replica);
        }
        if self.limits.max_width == 0 || self.limits.max_height == 0 || self.limits.max_image_pixels == 0 {
            bail!("limits.max_width, limits.max_height and limits.max_image_pixels must be positive");
        }
        let d = &self.detect;
        if !(0.0..=1.0).contains(&d.conf) || !(0.0..=1.0).contains(&d.iou) {
            bail!("detect.conf and detect.iou must be between 0 and 1");
        }
        if d.stride == 0 || !d.fps.is_finite() || d.fps < 0.0 {
            bail!("detect.stride must be positive and detect.fps 0 or positive");
        }
        if d.stride > 1 && d.fps > 0.0 {
            bail!("set at most one of detect.stride (above 1) and detect.fps (above 0)");
        }
        let t = &self.track;
        let unit = |v: f32| (0.0..=1.0).contains(&v);
        if !(unit(t.low_threshold) && unit(t.high_threshold) && unit(t.new_track_threshold) && unit(t.match_threshold)) || t.low_threshold >= t.high_threshold {
            bail!("track thresholds must be between 0 and 1, with track.low_threshold under track.high_threshold");
        }
        if !(t.lost_track_seconds.is_finite() && t.lost_track_seconds > 0.0) {
            bail!("track.lost_track_seconds must be positive");
        }
        Ok(())
    }

    /// Origins allowed to call the API from a browser page.
    pub fn cors_origins(&self) -> Vec<String> {
        self.server.cors_origins.split(',').map(str::trim).filter(|o| !o.is_empty()).map(String::from).collect()
    }

    /// The reverse proxies whose `X-Forwarded-For` header is believed.
    pub fn trusted_proxies(&self) -> anyhow::Result<Vec<std::net::IpAddr>> {
        self.server
            .trusted_proxies
            .split(',')
            .map(str::trim)
            .filter(|a| !a.is_empty())
            .map(|a| a.parse().with_context(|| format!("server.trusted_proxies: {a:?} is not an IP address")))
            .collect()
    }

    /// The pipeline this configuration describes: buffers, decoder limits, batching, credits,
    /// upload limits and storage as the service runs them. Commands override what differs for
    /// them.
    pub fn pipeline_options(&self, model_name: String) -> PipelineOptions {
        let server = &self.server;
        PipelineOptions {
            model_name,
            buffer: BufferOptions { dir: self.temp_dir(), window_bytes: self.storage.window_bytes },
            decode: DecodeOptions { max_dimensions: (self.limits.max_width, self.limits.max_height), threads: self.decode.threads, ..Default::default() },
            batch: BatchPolicy { batch_size: server.batch_size, batch_timeout: Duration::from_millis(server.batch_timeout_ms) },
            credits: server.credits,
            max_upload_bytes: server.max_upload_bytes,
            max_lag_bytes: (server.max_lag_bytes > 0).then_some(server.max_lag_bytes),
            media_dir: self.storage.persist_media.then(|| self.storage.media_dir.clone()),
            observer: None,
            max_session_duration: Some(Duration::from_secs(server.max_session_seconds)),
        }
    }

    /// The name this replica gives itself in the `X-Streamdet-Replica` header: `server.replica`,
    /// or the host name when that is empty (or not a valid name).
    pub fn replica_name(&self) -> String {
        if !self.server.replica.is_empty() {
            return self.server.replica.clone();
        }
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .map(|name| name.trim().to_string())
            .filter(|name| !name.is_empty() && is_replica_name(name))
            .unwrap_or_else(|| "streamdet".into())
    }

    /// Where a session's annotated video goes, and how large it may grow.
    pub fn annotate_options(&self) -> AnnotateOptions {
        AnnotateOptions { dir: self.temp_dir(), max_bytes: self.server.max_annotated_bytes, url: None }
    }

    /// The temp directory to use: the configured one, or the system's.
    pub fn temp_dir(&self) -> PathBuf {
        if self.storage.temp_dir.as_os_str().is_empty() { std::env::temp_dir() } else { self.storage.temp_dir.clone() }
    }
}

/// Whether `name` can be a replica's name: short, and safe in a header and in logs.
fn is_replica_name(name: &str) -> bool {
    name.len() <= 64 && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-:".contains(&b))
}

/// Applies one `STREAMDET_*` variable (`key` is the part after the prefix). A variable whose
/// name starts with a known section (`SERVER_`, `MODEL_`, ...) must name one of its keys; its
/// value is parsed as that key's type (a token of digits stays a string where a string is
/// expected). Variables of no known section are not configuration and are left alone.
fn apply_env(table: &mut toml::Table, key: &str, value: &str) -> anyhow::Result<()> {
    let defaults = toml::Table::try_from(Config::default()).expect("the defaults serialise");
    let upper = key.to_ascii_uppercase();
    for (section, fields) in &defaults {
        let Some(fields) = fields.as_table() else { continue };
        let Some(field_name) = upper.strip_prefix(&format!("{}_", section.to_ascii_uppercase())) else { continue };
        let Some((field, default)) = fields.iter().find(|(f, _)| f.eq_ignore_ascii_case(field_name)) else {
            let known: Vec<&str> = fields.keys().map(String::as_str).collect();
            bail!("[{section}] has no key {:?} (known: {})", field_name.to_ascii_lowercase(), known.join(", "));
        };
        let parsed = match default {
            toml::Value::String(_) => toml::Value::String(value.to_string()),
            toml::Value::Integer(_) => {
                toml::Value::Integer(value.trim().parse().with_context(|| format!("{section}.{field} must be an integer, not {value:?}"))?)
            }
            toml::Value::Float(_) => {
                let number: f64 = value.trim().parse().with_context(|| format!("{section}.{field} must be a number, not {value:?}"))?;
                if !number.is_finite() {
                    bail!("{section}.{field} must be a finite number, not {value:?}");
                }
                toml::Value::Float(number)
            }
            toml::Value::Boolean(_) => toml::Value::Boolean(match value.trim().to_ascii_lowercase().as_str() {
                "true" | "1" | "yes" | "on" => true,
                "false" | "0" | "no" | "off" => false,
                _ => bail!("{section}.{field} must be true or false, not {value:?}"),
            }),
            other => bail!("{section}.{field} cannot be set from the environment ({})", other.type_str()),
        };
        let entry = table.entry(section.clone()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
        let Some(section_table) = entry.as_table_mut() else { bail!("[{section}] is not a table") };
        section_table.insert(field.clone(), parsed);
        return Ok(());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn the_shipped_file_equals_the_defaults() {
        let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("config.toml");
        assert_eq!(Config::load(Some(&shipped), env(&[])).unwrap(), Config::default());
    }

    #[test]
    fn environment_overrides_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "[model]\nthreads = 3\n").unwrap();
        let config = Config::load(Some(&path), env(&[("STREAMDET_MODEL_THREADS", "1"), ("STREAMDET_LIMITS_MAX_WIDTH", "4096"), ("OTHER", "x")])).unwrap();
        assert_eq!(config.model.threads, 1);
        assert_eq!(config.limits.max_width, 4096);
        let err = Config::load(Some(&path), env(&[("STREAMDET_SERVER_NOPE", "1")])).unwrap_err();
        assert!(format!("{err:#}").contains("\"nope\""), "the error names the key: {err:#}");
        for not_config in ["STREAMDET_CPU_KERNEL", "STREAMDET_MODEL", "STREAMDET_PYTHON", "STREAMDET_NOPE"] {
            assert!(Config::load(Some(&path), env(&[(not_config, "portable")])).is_ok(), "{not_config} is not configuration");
        }
        assert!(Config::load(Some(&path), env(&[("STREAMDET_MODEL_DEVICE", "tpu")])).is_err());
        for token in ["31415926535897", "true", "nan", "1e3"] {
            let config = Config::load(Some(&path), env(&[("STREAMDET_SERVER_AUTH_TOKEN", token)])).unwrap();
            assert_eq!(config.server.auth_token, token, "a string key keeps its text");
        }
        assert!(Config::load(Some(&path), env(&[("STREAMDET_SERVER_MAX_SESSIONS", "many")])).is_err());
        assert!(Config::load(Some(&path), env(&[("STREAMDET_DETECT_FPS", "nan")])).is_err());
        let config = Config::load(Some(&path), env(&[("STREAMDET_DETECT_FPS", "5"), ("STREAMDET_STORAGE_PERSIST_MEDIA", "true")])).unwrap();
        assert_eq!((config.detect.fps, config.storage.persist_media), (5.0, true), "an integer text fills a float key");
        assert_eq!(Config::load(Some(&path), env(&[("STREAMDET_SERVER_REPLICA", "r-1")])).unwrap().replica_name(), "r-1");
        assert!(Config::load(Some(&path), env(&[("STREAMDET_SERVER_REPLICA", "r1\r\nSet-Cookie: x")])).is_err(), "a name cannot break a header");
        assert!(!Config::default().replica_name().is_empty(), "the host name, or a fallback");
        std::fs::write(&path, "[model]\nthreds = 3\n").unwrap();
        assert!(Config::load(Some(&path), env(&[])).is_err(), "misspelt keys are errors");
    }
}
