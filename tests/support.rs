//! Shared helpers: where the project, its venv, its model and `../shared` are.

use std::path::{Path, PathBuf};
use std::process::Command;

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
