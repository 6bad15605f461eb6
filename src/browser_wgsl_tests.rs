//! Every kernel's WGSL through a browser's WebGPU compiler (headless
//! Chromium: Dawn's Tint), as the crate hands it to a browser. naga, which
//! compiles the kernels everywhere else, accepts WGSL that the
//! specification forbids and browsers refuse: relational and bitwise
//! operators mixed without parentheses (`a >= b & c`), constant
//! expressions that evaluate to an infinity, subgroup built-ins without
//! `enable subgroups;`, a subgroup operation after a branch on a
//! subgroup-uniform value the uniformity analysis cannot see. Until
//! 2026-12-06, 2,439 of the 2,476 kernels below failed in Chromium for the
//! first two. One specialization per code shape, as shipped (the rest
//! differ in constants); not the matrix kernels (no browser offers
//! cooperative matrices), and f16 arithmetic only where the browser's
//! adapter has `shader-f16`.
//!
//! tests/browser/run_page.py drives the browser (wgsl.html); Chromium and
//! chromedriver come from FLASH_ATTN_CHROMIUM / FLASH_ATTN_CHROMEDRIVER or
//! the PATH (Debian: `apt-get install chromium chromium-driver`). Without
//! them the test says SKIPPED, unless `FLASH_ATTN_REQUIRE_BROWSER=1`,
//! which makes that a failure (CI's Vulkan pass sets it).

use std::path::Path;
use std::process::Command;

use serde_json::{Value, json};

use crate::shader_contract_tests::{one_per_code_shape, shipped_specializations};

/// A module the browser must refuse (it mixes `>=` and `&` without
/// parentheses, and folds `bitcast<f32>(0x7f800000u)`, an infinity, as a
/// constant): a checker that passes it checks nothing.
const CANARY: &str = "canary: WGSL the specification forbids";
const CANARY_SOURCE: &str = "
@group(0) @binding(0) var<storage, read_write> out: array<f32>;
@compute @workgroup_size(1)
fn main() {
    let k = vec4<i32>(1, 2, 3, 4);
    let visible = k >= vec4<i32>(2) & k <= vec4<i32>(3);
    out[0] = select(0.0, bitcast<f32>(0x7f800000u), visible.x);
}
";

/// Why the browser cannot run here, if it cannot.
fn browser_missing() -> Option<String> {
    let tool =
        |variable: &str, name: &str| std::env::var(variable).unwrap_or_else(|_| name.to_string());
    for (what, program) in [
        ("python3", "python3".to_string()),
        ("Chromium", tool("FLASH_ATTN_CHROMIUM", "chromium")),
        (
            "chromedriver",
            tool("FLASH_ATTN_CHROMEDRIVER", "chromedriver"),
        ),
    ] {
        let runs = Command::new(&program)
            .arg("--version")
            .output()
            .is_ok_and(|out| out.status.success());
        if !runs {
            return Some(format!(
                "{what} does not run ({program}; Debian: apt-get install chromium chromium-driver, \
                 or FLASH_ATTN_CHROMIUM / FLASH_ATTN_CHROMEDRIVER)"
            ));
        }
    }
    None
}

#[test]
fn every_kernel_compiles_in_a_browser() {
    if let Some(why) = browser_missing() {
        assert!(
            std::env::var("FLASH_ATTN_REQUIRE_BROWSER").as_deref() != Ok("1"),
            "{why}, and FLASH_ATTN_REQUIRE_BROWSER=1"
        );
        eprintln!("SKIPPED: {why}");
        return;
    }
    let specs = shipped_specializations();
    let mut kernels = vec![json!({
        "label": CANARY,
        "entry": "main",
        "source": CANARY_SOURCE,
        "needs_f16": false,
        "needs_subgroups": false,
    })];
    for spec in one_per_code_shape(&specs) {
        if spec.needs_cooperative_matrices() {
            continue;
        }
        let source = spec.browser_source().expect("the kernel generates");
        kernels.push(json!({
            "label": spec.label(),
            "entry": spec.kernel().entry_point(),
            "needs_f16": source.contains("enable f16;"),
            "needs_subgroups": spec.needs_subgroups(),
            "source": source,
        }));
    }
    let dir = std::env::temp_dir().join(format!("flash-attn-browser-wgsl-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a temporary folder");
    std::fs::write(
        dir.join("kernels.json"),
        Value::from(kernels.clone()).to_string(),
    )
    .expect("the kernels are written");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser/run_page.py");
    let output = Command::new("python3")
        .arg(&script)
        .arg("wgsl.html")
        .arg(&dir)
        .output()
        .expect("the checker starts");
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        output.status.success(),
        "{} failed: {}",
        script.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    let result: Value = serde_json::from_slice(&output.stdout).expect("the checker prints JSON");
    assert!(
        result.get("error").is_none(),
        "the page failed: {}",
        result["error"]
    );
    let results = result["results"].as_array().expect("one result per kernel");
    assert_eq!(
        results.len(),
        kernels.len(),
        "every kernel was compiled or skipped"
    );

    let errors_of = |entry: &Value| -> Vec<String> {
        entry["errors"]
            .as_array()
            .map(|errors| {
                errors
                    .iter()
                    .map(|e| e.as_str().unwrap_or_default().to_string())
                    .collect()
            })
            .unwrap_or_default()
    };
    let canary = &results[0];
    assert_eq!(canary["label"], CANARY);
    assert!(
        !errors_of(canary).is_empty(),
        "the browser accepted WGSL the specification forbids: the check is not checking"
    );
    let skipped: Vec<&Value> = results[1..]
        .iter()
        .filter(|r| r.get("skipped").is_some())
        .collect();
    let failed: Vec<String> = results[1..]
        .iter()
        .filter(|r| !errors_of(r).is_empty())
        .map(|r| {
            format!(
                "{}: {}",
                r["label"].as_str().unwrap_or("?"),
                errors_of(r).join("; ")
            )
        })
        .collect();
    eprintln!(
        "{} ({}, {}): {} kernels compiled, {} failed, {} skipped ({})",
        result["browser"].as_str().unwrap_or("the browser"),
        result["adapter"].as_str().unwrap_or("?"),
        result["features"],
        results.len() - 1 - failed.len() - skipped.len(),
        failed.len(),
        skipped.len(),
        skipped
            .first()
            .map_or("none", |s| s["skipped"].as_str().unwrap_or("?"))
    );
    assert!(failed.is_empty(), "{}", failed.join("\n"));
    assert!(results.len() - 1 > skipped.len(), "nothing was compiled");
}
