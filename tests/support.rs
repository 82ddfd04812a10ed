//! Shared helpers: where the project, its venv, its model and `../shared` are.

use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::Device;
use streamdet_actors::detect::Kernels;

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The default model, which `scripts/setup.sh` fetches.
pub fn default_model() -> PathBuf {
    let path = root().join("models/yolov12n.onnx");
    assert!(path.exists(), "{} is missing: run `bash scripts/setup.sh`", path.display());
    path
}

/// `../shared/models/NAME` when that folder exists (always in CI); `None` (and a note on
/// stderr) on a clone without it.
pub fn shared_model(name: &str) -> Option<PathBuf> {
    let path = root().join("../shared/models").join(name);
    if path.exists() {
        Some(path)
    } else {
        eprintln!("SKIPPED: {} is not here (no ../shared beside this clone)", path.display());
        None
    }
}

/// The Python of the project's venv (ONNX Runtime, scikit-image, matplotlib).
pub fn python() -> PathBuf {
    let path = std::env::var_os("STREAMDET_PYTHON").map(PathBuf::from).unwrap_or_else(|| root().join(".venv/bin/python"));
    assert!(path.exists(), "{} is missing: run `bash scripts/setup.sh`", path.display());
    path
}

/// Where the engine tests run the model. By default on the CPU, on both our kernels and candle's
/// operations; with `STREAMDET_TEST_DEVICE=cuda`, in a build with the `cuda` feature, on GPU 0
/// through candle's operations, the path `device = "cuda"` takes.
pub fn engine_targets() -> Vec<(Device, Kernels)> {
    match std::env::var("STREAMDET_TEST_DEVICE").as_deref() {
        Err(std::env::VarError::NotPresent) | Ok("cpu") => vec![(Device::Cpu, Kernels::Native), (Device::Cpu, Kernels::Generic)],
        Ok("cuda") => {
            let gpu = Device::new_cuda(0).unwrap_or_else(|e| panic!("STREAMDET_TEST_DEVICE=cuda needs a build with --features cuda and a GPU: {e}"));
            vec![(gpu, Kernels::Generic)]
        }
        other => panic!("STREAMDET_TEST_DEVICE must be cpu or cuda, not {other:?}"),
    }
}

/// How a test names one of [`engine_targets`] in what it prints.
pub fn target_name(device: &Device, kernels: Kernels) -> String {
    let device = if device.is_cuda() { "cuda" } else { "cpu" };
    format!("{device}, {kernels:?} kernels")
}

/// Runs a command and returns its stdout, failing the test with its stderr otherwise.
pub fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("utf-8 output")
}

/// The photos that ship with scikit-image and matplotlib.
pub fn photos() -> Vec<PathBuf> {
    let out = run_ok(Command::new(python()).arg(root().join("scripts/photos.py")));
    out.lines().map(PathBuf::from).collect()
}

pub fn write_f32(path: &Path, values: &[f32]) {
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    std::fs::write(path, bytes).expect("write f32 file");
}

pub fn read_f32(path: &Path) -> Vec<f32> {
    std::fs::read(path).expect("read f32 file").chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
}
