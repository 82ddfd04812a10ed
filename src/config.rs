//! The configuration: `config.toml`, overridden by `STREAMDET_<SECTION>_<KEY>` environment
//! variables, overridden by command line flags (applied by the commands).

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: ServerConfig,
    pub model: ModelConfig,
    pub storage: StorageConfig,
    pub limits: LimitsConfig,
    pub decode: DecodeConfig,
    pub detect: DetectConfig,
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
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DecodeConfig {
    pub threads: usize,
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

impl Default for Config {
    fn default() -> Self {
        Config {
            server: ServerConfig::default(),
            model: ModelConfig::default(),
            storage: StorageConfig::default(),
            limits: LimitsConfig::default(),
            decode: DecodeConfig::default(),
            detect: DetectConfig::default(),
        }
    }
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

impl Default for DetectConfig {
    fn default() -> Self {
        DetectConfig { conf: 0.25, iou: 0.45, stride: 1, fps: 0.0 }
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig { max_width: 8192, max_height: 8192 }
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
            if key == "MODEL" {
                continue; // the --model flag's own variable, handled by the command line
            }
            set_override(&mut table, key, &value).with_context(|| format!("environment variable {name}"))?;
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
        if self.server.max_sessions == 0 || self.server.batch_size == 0 || self.server.credits == 0 {
            bail!("server.max_sessions, server.batch_size and server.credits must be positive");
        }
        if self.limits.max_width == 0 || self.limits.max_height == 0 {
            bail!("limits.max_width and limits.max_height must be positive");
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
        Ok(())
    }

    /// Origins allowed to call the API from a browser page.
    pub fn cors_origins(&self) -> Vec<String> {
        self.server.cors_origins.split(',').map(str::trim).filter(|o| !o.is_empty()).map(String::from).collect()
    }

    /// The temp directory to use: the configured one, or the system's.
    pub fn temp_dir(&self) -> PathBuf {
        if self.storage.temp_dir.as_os_str().is_empty() { std::env::temp_dir() } else { self.storage.temp_dir.clone() }
    }
}

/// Sets `SECTION_KEY` (matched case-insensitively against the known sections and keys of the
/// defaults) to `value`, parsed as a TOML number or boolean when it is one, a string otherwise.
fn set_override(table: &mut toml::Table, key: &str, value: &str) -> anyhow::Result<()> {
    let defaults = toml::Table::try_from(Config::default()).expect("the defaults serialise");
    for (section, fields) in &defaults {
        let Some(fields) = fields.as_table() else { continue };
        for field in fields.keys() {
            if format!("{section}_{field}").eq_ignore_ascii_case(key) {
                let parsed = value
                    .parse::<i64>()
                    .map(toml::Value::Integer)
                    .or_else(|_| value.parse::<f64>().map(toml::Value::Float))
                    .or_else(|_| value.parse::<bool>().map(toml::Value::Boolean))
                    .unwrap_or_else(|_| toml::Value::String(value.to_string()));
                let entry = table.entry(section.clone()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
                let Some(section_table) = entry.as_table_mut() else { bail!("[{section}] is not a table") };
                section_table.insert(field.clone(), parsed);
                return Ok(());
            }
        }
    }
    bail!("no configuration key matches")
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
        assert!(Config::load(Some(&path), env(&[("STREAMDET_NOPE", "1")])).is_err(), "unknown variables are errors");
        assert!(Config::load(Some(&path), env(&[("STREAMDET_MODEL_DEVICE", "tpu")])).is_err());
        std::fs::write(&path, "[model]\nthreds = 3\n").unwrap();
        assert!(Config::load(Some(&path), env(&[])).is_err(), "misspelt keys are errors");
    }
}
