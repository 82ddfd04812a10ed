//! `streamdet bench --quick --tiny`: every stage runs on tiny inputs and the report, the JSON
//! and the charts hold numbers (the figures themselves are not judged here).

use std::process::Command;

#[test]
fn the_benchmark_harness_writes_a_report_with_numbers_and_charts() {
    let out = tempfile::tempdir().unwrap();
    let printed = crate::support::run_ok(
        Command::new(env!("CARGO_BIN_EXE_streamdet"))
            .current_dir(crate::support::root())
            .args(["bench", "--quick", "--tiny", "--out"])
            .arg(out.path())
            // A configuration that names the GPU: the harness still measures the CPU engine
            // against the CPU peers (in a build without CUDA, a process that opened the GPU
            // would fail).
            .env("STREAMDET_MODEL_DEVICE", "cuda"),
    );
    let line: serde_json::Value = serde_json::from_str(printed.trim().lines().last().unwrap()).unwrap();
    assert_eq!(line["type"], "report");
    let report = std::fs::read_to_string(out.path().join("REPORT.md")).unwrap();
    println!("{report}");
    for section in ["## Buffer", "## Decode", "## Model", "## End to end over HTTP", "## Pipeline overhead", "## Memory", "## Tracking"] {
        assert!(report.contains(section), "{section} missing");
    }
    let results: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.path().join("results.json")).unwrap()).unwrap();
    let positive = |v: &serde_json::Value| v.as_f64().is_some_and(|x| x > 0.0 && x.is_finite());
    assert!(positive(&results["buffer"]["gib_per_s"]));
    assert!(positive(&results["decode"]["ours_fps"]));
    assert!(positive(&results["model"][0]["ours_ms"]));
    assert!(positive(&results["overhead"]["pipeline_fps"]) && positive(&results["overhead"]["annotated_fps"]));
    assert!(positive(&results["memory"][0]["peak_rss_mib"]));
    let e2e = results["end_to_end"].as_array().unwrap();
    assert_eq!(e2e.len(), 6, "three containers at two upload rates");
    assert!(e2e.iter().all(|row| positive(&row["ours"]["total_s"]) && row["ours"]["frames"].as_u64() > Some(0)));
    // Peers present are measured; absent ones are listed as skipped, never silently left out.
    let skipped = results["skipped"].as_array().unwrap();
    let named = |needle: &str| skipped.iter().any(|s| s.as_str().unwrap_or("").contains(needle));
    assert!(results["model"][0]["ort_ms"].is_number() || named("ONNX Runtime"));
    assert!(results["model"][0]["openvino_ms"].is_number() || named("OpenVINO"));
    assert!(e2e[0]["seed"].is_object() || named("seed"));
    assert!(!results["concurrency"].as_array().unwrap().is_empty() || named("concurrent uploads"));
    for chart in ["timeline.svg", "model.svg"] {
        let svg = std::fs::read_to_string(out.path().join(chart)).unwrap();
        assert!(svg.starts_with("<svg") && svg.len() > 2000, "{chart} is not a chart");
    }
    if !results["concurrency"].as_array().unwrap().is_empty() {
        assert!(out.path().join("concurrency.svg").exists());
    }
}
