//! The processes a benchmark runs: our own server and model timer (this executable), ONNX
//! Runtime's timing script and the Python re-creation of the seed service. A peer that is not
//! installed is reported as skipped, with the reason.

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// Where the peers are and what runs them.
#[derive(Debug, Clone)]
pub struct PeerPaths {
    /// The Python that has onnxruntime (and, for the seed, fastapi, uvicorn, av, pillow).
    pub python: PathBuf,
    /// `ort_bench.py`.
    pub ort_bench: PathBuf,
    /// `openvino_bench.py`: the same measurement with OpenVINO's CPU plugin.
    pub openvino_bench: PathBuf,
    /// The seed service's `server.py`.
    pub seed_server: PathBuf,
}

impl PeerPaths {
    pub fn new(python: PathBuf, peers_dir: &Path) -> Self {
        PeerPaths {
            python,
            ort_bench: peers_dir.join("ort_bench.py"),
            openvino_bench: peers_dir.join("openvino_bench.py"),
            seed_server: peers_dir.join("seed_ref/server.py"),
        }
    }

    fn python_has(&self, modules: &str) -> Result<(), String> {
        let ok = Command::new(&self.python).args(["-c", &format!("import {modules}")]).stderr(Stdio::null()).status().is_ok_and(|s| s.success());
        if ok { Ok(()) } else { Err(format!("{} cannot import {modules} (run scripts/setup.sh)", self.python.display())) }
    }

    /// Why the tracking measurement cannot run, if it cannot: it needs motmetrics (the ground
    /// truth and the scoring) and supervision (the peer's ByteTrack).
    pub fn mot_missing(&self) -> Option<String> {
        self.python_has("motmetrics, supervision").err()
    }

    /// Why ONNX Runtime cannot be timed, if it cannot.
    pub fn ort_missing(&self) -> Option<String> {
        if !self.ort_bench.exists() {
            return Some(format!("{} not found", self.ort_bench.display()));
        }
        self.python_has("onnxruntime, numpy").err()
    }

    /// Why OpenVINO cannot be timed, if it cannot.
    pub fn openvino_missing(&self) -> Option<String> {
        if !self.openvino_bench.exists() {
            return Some(format!("{} not found", self.openvino_bench.display()));
        }
        self.python_has("openvino, numpy").err()
    }

    /// Why the seed service cannot run, if it cannot.
    pub fn seed_missing(&self) -> Option<String> {
        if !self.seed_server.exists() {
            return Some(format!("{} not found", self.seed_server.display()));
        }
        self.python_has("fastapi, uvicorn, av, onnxruntime, numpy, PIL").err()
    }
}

/// The last line of a command's standard output, parsed as JSON.
fn json_output(cmd: &mut Command) -> anyhow::Result<serde_json::Value> {
    let output = cmd.stderr(Stdio::piped()).output().with_context(|| format!("cannot run {cmd:?}"))?;
    if !output.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&output.stderr).trim());
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout.lines().rev().find(|l| l.trim_start().starts_with('{')).context("no JSON line in the output")?;
    Ok(serde_json::from_str(line)?)
}

/// `streamdet` itself, run on the CPU whatever the configuration names: the harness compares it
/// with CPU runtimes at their thread counts (a GPU's figures come from `bench-model` and
/// `scripts/gpu-peers.py`).
fn streamdet_on_cpu() -> anyhow::Result<Command> {
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.env("STREAMDET_MODEL_DEVICE", "cpu");
    Ok(cmd)
}

/// Median milliseconds per call of our engine: `streamdet bench-model` in a fresh process.
pub fn our_model_ms(model: &Path, batch: usize, threads: usize, runs: usize) -> anyhow::Result<f64> {
    let mut cmd = streamdet_on_cpu()?;
    cmd.args(["bench-model", "--model"]).arg(model);
    cmd.args(["--batch", &batch.to_string(), "--threads", &threads.to_string(), "--runs", &runs.to_string()]);
    json_output(&mut cmd)?["median_ms"].as_f64().context("no median_ms")
}

/// A model runtime timed by a script of `../shared/peers` on the same file, input and threads.
#[derive(Debug, Clone, Copy)]
pub enum ModelPeer {
    OnnxRuntime,
    OpenVino,
}

/// Median milliseconds per call of a peer runtime on the same file and thread count.
pub fn peer_model_ms(peers: &PeerPaths, peer: ModelPeer, model: &Path, batch: usize, threads: usize, runs: usize) -> anyhow::Result<f64> {
    let script = match peer {
        ModelPeer::OnnxRuntime => &peers.ort_bench,
        ModelPeer::OpenVino => &peers.openvino_bench,
    };
    let mut cmd = Command::new(&peers.python);
    cmd.arg(script).arg(model);
    cmd.args(["--batch", &batch.to_string(), "--threads", &threads.to_string(), "--runs", &runs.to_string()]);
    json_output(&mut cmd)?["median_ms"].as_f64().context("no median_ms")
}

/// A server process, killed when dropped.
pub struct ServerProcess {
    child: Child,
    pub addr: SocketAddr,
}

impl ServerProcess {
    /// `streamdet serve` on a free loopback port with `env` overrides.
    pub fn ours(model: &Path, threads: usize, env: &[(&str, String)]) -> anyhow::Result<Self> {
        let mut cmd = streamdet_on_cpu()?;
        cmd.args(["serve", "--listen", "127.0.0.1:0", "--model"]).arg(model).args(["--threads", &threads.to_string()]);
        cmd.envs(env.iter().map(|(k, v)| (*k, v.as_str()))).stdout(Stdio::piped()).stderr(Stdio::null());
        let mut child = cmd.spawn().context("cannot start streamdet serve")?;
        let mut line = String::new();
        let stdout = child.stdout.take().context("no stdout")?;
        BufReader::new(stdout).read_line(&mut line)?;
        let listening: serde_json::Value = serde_json::from_str(&line).with_context(|| format!("streamdet serve said {line:?}"))?;
        let addr = listening["addr"].as_str().context("no address")?.parse()?;
        Ok(ServerProcess { child, addr })
    }

    /// The seed service on a free loopback port, once its health route answers.
    pub fn seed(peers: &PeerPaths, model: &Path, threads: usize) -> anyhow::Result<Self> {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let child = Command::new(&peers.python)
            .arg(&peers.seed_server)
            .args(["--port", &port.to_string()])
            .env("MODEL", model)
            .env("ORT_THREADS", threads.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot start the seed service")?;
        let server = ServerProcess { child, addr: SocketAddr::from(([127, 0, 0, 1], port)) };
        let deadline = Instant::now() + Duration::from_secs(120);
        while Instant::now() < deadline {
            if server.health_ok() {
                return Ok(server);
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        bail!("the seed service did not answer /health within 120 s")
    }

    fn health_ok(&self) -> bool {
        use std::io::{Read, Write};
        let Ok(mut stream) = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1)) else { return false };
        let request = format!("GET /health HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n", self.addr);
        let mut response = String::new();
        stream.write_all(request.as_bytes()).is_ok() && stream.read_to_string(&mut response).is_ok() && response.starts_with("HTTP/1.1 200")
    }

    /// The process's peak resident set size so far, in bytes.
    pub fn peak_rss(&self) -> Option<u64> {
        peak_rss_of(&format!("/proc/{}/status", self.child.id()))
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `VmHWM` of a `/proc/.../status` file, in bytes.
pub fn peak_rss_of(status_path: &str) -> Option<u64> {
    let status = std::fs::read_to_string(status_path).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Resets this process's peak RSS to its current RSS (Linux: `5` to clear_refs).
pub fn reset_own_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// The CPU's model name, from /proc/cpuinfo.
pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| info.lines().find(|l| l.starts_with("model name")).and_then(|l| l.split(':').nth(1)).map(|s| s.trim().to_string()))
        .unwrap_or_else(|| "unknown".into())
}
