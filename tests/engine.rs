//! The detection engine against ONNX Runtime, the oracle: raw output tensors on fresh random
//! inputs for every architecture, and detections on real photos.

use std::path::Path;
use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

use candle_core::{Device, Tensor};
use streamdet_actors::detect::{self, DetectError, DetectParams, Detector, Kernels, ModelFrame};

use crate::support::{self, python, read_f32, run_ok, write_f32};

/// Runs ONNX Runtime on `input` (NCHW) and returns its output and output shape.
fn onnx_runtime(model: &Path, input: &[f32], shape: [usize; 4]) -> (Vec<f32>, Vec<usize>) {
    let dir = tempfile::tempdir().unwrap();
    let (inp, out) = (dir.path().join("in.f32"), dir.path().join("out.f32"));
    write_f32(&inp, input);
    let dims = shape.map(|d| d.to_string()).join(",");
    let printed = run_ok(Command::new(python()).arg(support::root().join("scripts/ort_oracle.py")).arg(model).arg(&inp).arg(dims).arg(&out));
    let out_shape = printed.trim().split(',').map(|d| d.parse().unwrap()).collect();
    (read_f32(&out), out_shape)
}

fn random_input(len: usize, seed: u64) -> Vec<f32> {
    let mut s = seed | 1;
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 24) as f32
        })
        .collect()
}

fn fresh_seed() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos() as u64
}

/// Compares our raw output with ONNX Runtime's on each of [`support::engine_targets`] (our CPU
/// kernels and candle's operations, or candle's operations on a GPU): box rows within 0.05 px,
/// scores within 1e-3.
fn check_raw_parity(model: &Path, batch: usize) {
    for (device, kernels) in support::engine_targets() {
        check_raw_parity_with(model, batch, device, kernels, 0);
    }
}

fn check_raw_parity_with(model: &Path, batch: usize, device: Device, kernels: Kernels, threads: usize) {
    let place = support::target_name(&device, kernels);
    let detector = Detector::load_with(model, device, threads, kernels).unwrap();
    let detect::Size { width: w, height: h } = detector.input_size();
    let seed = fresh_seed();
    let input = random_input(batch * 3 * h * w, seed);
    let tensor = Tensor::from_vec(input.clone(), (batch, 3, h, w), &Device::Cpu).unwrap();
    let started = std::time::Instant::now();
    let ours_tensor = detector.run_raw(&tensor).unwrap().to_device(&Device::Cpu).unwrap();
    let ms = started.elapsed().as_secs_f64() * 1e3;
    let ours: Vec<f32> = ours_tensor.flatten_all().unwrap().to_vec1().unwrap();
    let (theirs, shape) = onnx_runtime(model, &input, [batch, 3, h, w]);
    assert_eq!(ours_tensor.dims(), shape.as_slice(), "output shape");
    let anchors = shape[2];
    let (mut box_diff, mut score_diff) = (0f32, 0f32);
    for (i, (a, b)) in ours.iter().zip(&theirs).enumerate() {
        let row = (i / anchors) % shape[1];
        let d = (a - b).abs();
        assert!(d.is_finite(), "non-finite output at {i}: {a} vs {b}");
        if row < 4 { box_diff = box_diff.max(d) } else { score_diff = score_diff.max(d) }
    }
    eprintln!(
        "parity {} ({place}, CPU kernels {}, {ms:.0} ms, batch {batch}, seed {seed}): max |box diff| {box_diff:.5} px, max |score diff| {score_diff:.2e}",
        model.file_name().unwrap().to_string_lossy(),
        detect::cpu_kernels()
    );
    assert!(box_diff <= 0.05, "boxes differ by {box_diff} px");
    assert!(score_diff <= 1e-3, "scores differ by {score_diff}");
}

#[test]
fn raw_output_matches_onnx_runtime_default_model() {
    check_raw_parity(&support::default_model(), 1);
}

#[test]
fn raw_output_matches_onnx_runtime_yolov8n() {
    if let Some(model) = support::shared_model("yolov8n-random-640.onnx") {
        check_raw_parity(&model, 1);
    }
}

#[test]
fn raw_output_matches_onnx_runtime_yolo11n() {
    if let Some(model) = support::shared_model("yolo11n-random-640.onnx") {
        check_raw_parity(&model, 1);
    }
}

#[test]
fn raw_output_matches_onnx_runtime_yolo11n_dynamic_batch() {
    if let Some(model) = support::shared_model("yolo11n-random-dynamic.onnx") {
        let detector = Detector::load(&model, Device::Cpu).unwrap();
        assert_eq!(detector.batch_mode(), detect::BatchMode::Dynamic);
        check_raw_parity(&model, 2);
    }
}

/// Four frames on two threads run as two calls of two frames side by side, each on one
/// thread (the CPU kernels take a dynamic batch frame by frame).
#[test]
fn a_batch_shared_out_among_the_threads_matches_onnx_runtime() {
    if let Some(model) = support::shared_model("yolo11n-random-dynamic.onnx") {
        check_raw_parity_with(&model, 4, Device::Cpu, Kernels::Native, 2);
    }
}

/// On a CPU with AVX-512, the AVX2 kernels (what a CPU without it runs: other instructions,
/// other tiles, tensors kept in blocks of 8 channels) against ONNX Runtime as well: this test
/// binary again, its parity tests alone, with the kernels capped at AVX2 (the choice is made
/// once per process). A CPU without AVX-512 runs them in the other tests already.
#[test]
fn the_avx2_kernels_match_onnx_runtime_on_an_avx512_cpu() {
    if std::env::var("STREAMDET_TEST_DEVICE").as_deref() == Ok("cuda") {
        eprintln!("SKIPPED: the parity tests run on the GPU (STREAMDET_TEST_DEVICE=cuda)");
        return;
    }
    if std::env::var_os("STREAMDET_CPU_KERNEL").is_some() {
        eprintln!("SKIPPED: the kernels are capped already (STREAMDET_CPU_KERNEL), so the other tests run them");
        return;
    }
    if !(std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")) {
        eprintln!("SKIPPED: no AVX-512 on this CPU (or no AVX2): the other tests run its best kernels, the AVX2 ones where it has them");
        return;
    }
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["engine::raw_output_matches_onnx_runtime", "engine::photo_detections_match_onnx_runtime", "--nocapture"])
        .env("STREAMDET_CPU_KERNEL", "avx2")
        .env("STREAMDET_AMX", "off")
        .output()
        .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "the parity tests on the AVX2 kernels failed:\n{stdout}\n{stderr}");
    let passed: usize = stdout
        .lines()
        .find_map(|l| l.strip_prefix("test result: ok. ")?.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no test result in:\n{stdout}"));
    // The four architectures' raw outputs and the photos, or the default model's alone where
    // `../shared` is missing.
    assert!(passed >= 2, "{passed} parity tests ran:\n{stdout}");
    let native = stderr.lines().filter(|l| l.starts_with("parity ") && l.contains("Native kernels")).collect::<Vec<_>>();
    assert!(!native.is_empty() && native.iter().all(|l| l.contains("CPU kernels avx2,")), "the capped run's kernels:\n{stderr}");
    eprintln!("{}", native.join("\n"));
}

fn iou(a: &[f32; 4], b: &[f32; 4]) -> f32 {
    let w = (a[2].min(b[2]) - a[0].max(b[0])).max(0.0);
    let h = (a[3].min(b[3]) - a[1].max(b[1])).max(0.0);
    let area = |r: &[f32; 4]| (r[2] - r[0]) * (r[3] - r[1]);
    w * h / (area(a) + area(b) - w * h)
}

#[test]
fn photo_detections_match_onnx_runtime() {
    for (device, kernels) in support::engine_targets() {
        photo_detections_match_onnx_runtime_with(device, kernels);
    }
}

fn photo_detections_match_onnx_runtime_with(device: Device, kernels: Kernels) {
    let place = support::target_name(&device, kernels);
    let model = support::default_model();
    let detector = Detector::load_with(&model, device, 0, kernels).unwrap();
    let params = DetectParams::default();
    let mut classes_seen = Vec::new();
    for photo in support::photos() {
        let (rgb, w, h) = detect::read_image(&photo).unwrap();
        let (model_rgb, letterbox) = detect::letterbox_rgb(&rgb, w, h, detector.input_size());
        let frames = [ModelFrame { rgb: model_rgb, letterbox }];
        let ours = detector.detect(&frames, &params).unwrap().remove(0);
        // ONNX Runtime on the very same input tensor, through the same post-processing.
        let input = detector.input_tensor(&frames).unwrap();
        let detect::Size { width: iw, height: ih } = detector.input_size();
        let (raw, shape) = onnx_runtime(&model, &input.flatten_all().unwrap().to_vec1().unwrap(), [1, 3, ih, iw]);
        let raw = Tensor::from_vec(raw, shape, &Device::Cpu).unwrap();
        let theirs = detector.detections(&raw, &frames, &params).unwrap().remove(0);
        let name = photo.file_name().unwrap().to_string_lossy();
        eprintln!("{name} ({place}): ours {:?}", ours.iter().map(|d| (&d.class_name, d.confidence)).collect::<Vec<_>>());
        assert_eq!(ours.len(), theirs.len(), "{name}: {ours:?} vs {theirs:?}");
        for (a, b) in ours.iter().zip(&theirs) {
            assert_eq!(a.class_id, b.class_id, "{name}");
            assert!((a.confidence - b.confidence).abs() <= 0.01, "{name}: {a:?} vs {b:?}");
            assert!(iou(&a.bbox, &b.bbox) >= 0.95, "{name}: {a:?} vs {b:?}");
        }
        classes_seen.extend(ours.into_iter().map(|d| (name.to_string(), d.class_name)));
    }
    let saw = |photo: &str, class: &str| classes_seen.iter().any(|(p, c)| p == photo && c == class);
    assert!(saw("grace_hopper.jpg", "person"), "{classes_seen:?}");
    assert!(saw("chelsea.png", "cat"), "{classes_seen:?}");
    assert!(saw("astronaut.png", "person"), "{classes_seen:?}");
}

#[test]
fn truncated_and_foreign_files_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(support::default_model()).unwrap();
    let truncated = dir.path().join("truncated.onnx");
    std::fs::write(&truncated, &bytes[..bytes.len() / 3]).unwrap();
    let err = Detector::load(&truncated, Device::Cpu).unwrap_err();
    assert!(matches!(err, DetectError::BadModel { .. }), "{err}");

    let text = dir.path().join("notes.onnx");
    std::fs::write(&text, "this is a text file, not a model\n".repeat(50)).unwrap();
    let err = Detector::load(&text, Device::Cpu).unwrap_err();
    assert!(err.to_string().contains("not"), "{err}");

    let missing = Detector::load(&dir.path().join("missing.onnx"), Device::Cpu).unwrap_err();
    assert!(matches!(missing, DetectError::Io { .. }), "{missing}");
}

#[test]
fn an_operator_we_lack_is_named_in_the_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("einsum.onnx");
    let script = r#"
import sys, onnx
from onnx import helper, TensorProto
x = helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 64, 64])
y = helper.make_tensor_value_info("output0", TensorProto.FLOAT, [1, 3, 64, 64])
node = helper.make_node("Einsum", ["images"], ["output0"], name="the_einsum", equation="ij->ij")
model = helper.make_model(helper.make_graph([node], "g", [x], [y]))
onnx.save(model, sys.argv[1])
"#;
    run_ok(Command::new(python()).arg("-c").arg(script).arg(&path));
    let err = Detector::load(&path, Device::Cpu).unwrap_err();
    let message = err.to_string();
    assert!(matches!(err, DetectError::Unsupported { .. }), "{message}");
    assert!(message.contains("the_einsum") && message.contains("Einsum"), "{message}");
}

#[test]
fn an_image_that_is_not_an_image_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("photo.jpg");
    std::fs::write(&path, b"\xff\xd8\xff\xe0 not really a jpeg").unwrap();
    assert!(matches!(detect::read_image(&path), Err(DetectError::BadImage { .. })));
    std::fs::write(&path, b"plain text").unwrap();
    assert!(matches!(detect::read_image(&path), Err(DetectError::BadImage { .. })));
}

#[test]
fn a_model_without_class_names_numbers_the_classes_its_output_has() {
    let bytes = std::fs::read(support::default_model()).unwrap();
    // The metadata entry's key, as protobuf writes it (field 1, length 5): renamed, the model
    // has no `names` left.
    let key = b"\x0a\x05names";
    let at = bytes.windows(key.len()).position(|w| w == key).expect("the default model has names");
    let mut unnamed = bytes;
    unnamed[at + key.len() - 1] = b'Z';
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("unnamed.onnx");
    std::fs::write(&path, unnamed).unwrap();
    let detector = Detector::load(&path, Device::Cpu).unwrap();
    assert_eq!(detector.class_names().len(), 80, "the output's class rows");
    assert_eq!((detector.class_names()[0].as_str(), detector.class_names()[79].as_str()), ("0", "79"));
    let hopper = support::photos().into_iter().find(|p| p.ends_with("grace_hopper.jpg")).unwrap();
    let (rgb, w, h) = detect::read_image(&hopper).unwrap();
    let (model_rgb, letterbox) = detect::letterbox_rgb(&rgb, w, h, detector.input_size());
    let found = detector.detect(&[ModelFrame { rgb: model_rgb, letterbox }], &DetectParams::default()).unwrap().remove(0);
    assert!(found.iter().any(|d| d.class_id == 0 && d.class_name == "0"), "{found:?}");
}
