//! The `streamdet` command line, run as a user runs it.

use std::process::Command;

use crate::support;

fn streamdet() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_streamdet"));
    cmd.current_dir(support::root());
    cmd
}

#[test]
fn detect_image_prints_one_line_per_image() {
    let photos = support::photos();
    let hopper = photos.iter().find(|p| p.ends_with("grace_hopper.jpg")).unwrap();
    let chelsea = photos.iter().find(|p| p.ends_with("chelsea.png")).unwrap();
    let out = streamdet().arg("detect-image").arg(hopper).arg(chelsea).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<serde_json::Value> = String::from_utf8(out.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["type"], "image");
    assert_eq!((lines[0]["width"].as_u64(), lines[0]["height"].as_u64()), (Some(512), Some(600)));
    let classes =
        |v: &serde_json::Value| -> Vec<String> { v["detections"].as_array().unwrap().iter().map(|d| d["class"].as_str().unwrap().to_string()).collect() };
    assert!(classes(&lines[0]).contains(&"person".to_string()), "{:?}", lines[0]);
    assert!(classes(&lines[1]).contains(&"cat".to_string()), "{:?}", lines[1]);
    let b = &lines[0]["detections"][0]["box"];
    assert!(b[2].as_f64().unwrap() <= 512.0 && b[3].as_f64().unwrap() <= 600.0, "boxes are clamped to the image");
}

#[test]
fn detect_image_class_filter_and_bad_input() {
    let photos = support::photos();
    let hopper = photos.iter().find(|p| p.ends_with("grace_hopper.jpg")).unwrap();
    let out = streamdet().args(["detect-image", "--classes", "cat"]).arg(hopper).output().unwrap();
    assert!(out.status.success());
    let line: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(line["detections"].as_array().unwrap().iter().all(|d| d["class"] == "cat"));

    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.png");
    std::fs::write(&junk, b"not an image at all").unwrap();
    let out = streamdet().arg("detect-image").arg(&junk).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let line: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(line["type"], "error");

    let out = streamdet().args(["detect-image", "--conf", "7"]).arg(hopper).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "a bad parameter is a usage error");
    let out = streamdet().args(["detect-image", "--classes", "unicorn"]).arg(hopper).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "an unknown class is a usage error");
}

#[test]
fn bench_model_profiles_operator_types_and_steps() {
    let out = streamdet().args(["bench-model", "--runs", "2", "--warmup", "1", "--profile", "steps"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<serde_json::Value> = String::from_utf8(out.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.iter().map(|l| l["type"].as_str().unwrap()).collect::<Vec<_>>(), ["bench", "profile", "steps"]);
    let steps = lines[2]["steps"].as_array().unwrap();
    // Every step is counted in its operator type's entry, and the steps come in the plan's order.
    for (op, entry) in lines[1]["ops"].as_object().unwrap() {
        assert_eq!(entry["steps"].as_u64(), Some(steps.iter().filter(|s| s["op"] == *op).count() as u64), "{op}");
    }
    let indices: Vec<u64> = steps.iter().map(|s| s["index"].as_u64().unwrap()).collect();
    assert!(indices.windows(2).all(|w| w[0] < w[1]), "{indices:?}");
    assert!(steps.iter().all(|s| s["ms"].as_f64().is_some_and(|ms| ms >= 0.0)));
    // The default model's first step: its stem convolution, on the letterboxed frame.
    assert_eq!((&steps[0]["op"], &steps[0]["layer"]), (&serde_json::json!("Conv kxk"), &serde_json::json!("3->16 k3 s2")));
    assert_eq!(steps[0]["input"], serde_json::json!([1, 3, 640, 640]));
    // A plain --profile prints the operator types only.
    let out = streamdet().args(["bench-model", "--runs", "1", "--warmup", "0", "--profile"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let types: Vec<String> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["type"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(types, ["bench", "profile"]);
}

/// `scripts/as-avx2.sh` hides AVX-512 and AMX from what it runs, threads and children included,
/// so that streamdet, ONNX Runtime and OpenVINO compare their AVX2 kernels on an AVX-512
/// machine: streamdet under it reports, and so runs, its AVX2 kernels.
#[cfg(target_arch = "x86_64")]
#[test]
fn as_avx2_runs_the_avx2_kernels() {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    if !cpuinfo.split_whitespace().any(|flag| flag == "cpuid_fault") {
        eprintln!("SKIPPED: no CPUID faulting on this machine (cpuid_fault), which scripts/as-avx2.sh needs");
        return;
    }
    if !std::arch::is_x86_feature_detected!("avx2") || !std::arch::is_x86_feature_detected!("fma") {
        eprintln!("SKIPPED: no AVX2 and FMA on this CPU");
        return;
    }
    let kernels = |cmd: &mut Command| -> String {
        let out = cmd.args(["bench-model", "--runs", "1", "--warmup", "0"]).env_remove("STREAMDET_CPU_KERNEL").output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let line: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        line["kernels"].as_str().unwrap().to_string()
    };
    let native = kernels(&mut streamdet());
    let capped = kernels(Command::new("bash").current_dir(support::root()).arg("scripts/as-avx2.sh").arg(env!("CARGO_BIN_EXE_streamdet")));
    assert_eq!(capped, "avx2", "under scripts/as-avx2.sh (natively: {native})");
    if std::arch::is_x86_feature_detected!("avx512f") {
        assert!(native.starts_with("avx512"), "this CPU has AVX-512, yet streamdet runs {native}");
    } else {
        assert_eq!(native, "avx2");
    }
}
