//! Every kernel's WGSL through a browser's WebGPU compiler (headless
//! Chromium: Dawn's Tint; or Firefox: its own naga), as the crate hands it
//! to a browser. naga, which compiles the kernels everywhere else, accepts
//! WGSL that the specification forbids and Chromium refuses: relational
//! and bitwise operators mixed without parentheses (`a >= b & c`),
//! constant expressions that evaluate to an infinity, subgroup built-ins
//! without `enable subgroups;`, a subgroup operation after a branch on a
//! subgroup-uniform value the uniformity analysis cannot see. Until
//! 2026-12-06, 2,439 of the 2,476 kernels below failed in Chromium for the
//! first two. One specialization per code shape, as shipped (the rest
//! differ in constants); not the matrix kernels (no browser offers
//! cooperative matrices), and f16 arithmetic only where the browser's
//! adapter has `shader-f16`.
//!
//! tests/browser/run_page.py drives the browser (wgsl.html). The browser
//! is `FLASH_ATTN_BROWSER`: `chromium` (the default; FLASH_ATTN_CHROMIUM
//! or the PATH, Debian: `apt-get install chromium`) or `firefox` (wgpu's
//! naga; FLASH_ATTN_FIREFOX or the PATH: a release with WebGPU on Linux,
//! which tests/browser/firefox/setup.sh provides). Without it the test
//! says SKIPPED, unless `FLASH_ATTN_REQUIRE_BROWSER=1`, which makes that a
//! failure (CI's Vulkan pass sets it, for Chromium).

use std::path::Path;
use std::process::Command;

use serde_json::{Value, json};

use crate::shader_contract_tests::{one_per_code_shape, shipped_specializations};

/// A module every WGSL compiler must refuse (a `u32` stored into an `f32`
/// array): a checker that passes it checks nothing.
const INVALID_CANARY: &str = "canary: WGSL no compiler accepts";
const INVALID_CANARY_SOURCE: &str = "
@group(0) @binding(0) var<storage, read_write> out: array<f32>;
@compute @workgroup_size(1)
fn main() {
    out[0] = 1u;
}
";

/// A module the specification forbids that naga (so Firefox) accepts: it
/// mixes `>=` and `&` without parentheses, and folds
/// `bitcast<f32>(0x7f800000u)`, an infinity, as a constant. Chromium must
/// refuse it; for Firefox the test reports what it did.
const FORBIDDEN_CANARY: &str = "canary: WGSL the specification forbids";
const FORBIDDEN_CANARY_SOURCE: &str = "
@group(0) @binding(0) var<storage, read_write> out: array<f32>;
@compute @workgroup_size(1)
fn main() {
    let k = vec4<i32>(1, 2, 3, 4);
    let visible = k >= vec4<i32>(2) & k <= vec4<i32>(3);
    out[0] = select(0.0, bitcast<f32>(0x7f800000u), visible.x);
}
";

/// The browser FLASH_ATTN_BROWSER names (Chromium by default), and the
/// program that runs it.
fn browser() -> (String, String) {
    let name = std::env::var("FLASH_ATTN_BROWSER").unwrap_or_else(|_| "chromium".to_string());
    let variable = format!("FLASH_ATTN_{}", name.to_uppercase());
    let program = std::env::var(variable).unwrap_or_else(|_| name.clone());
    (name, program)
}

/// Why the browser cannot run here, if it cannot.
fn browser_missing() -> Option<String> {
    let (name, program) = browser();
    let how = match name.as_str() {
        "chromium" => "Debian: apt-get install chromium, or FLASH_ATTN_CHROMIUM",
        "firefox" => "tests/browser/firefox/setup.sh, then FLASH_ATTN_FIREFOX",
        _ => return Some(format!("FLASH_ATTN_BROWSER={name}: chromium or firefox")),
    };
    for program in ["python3", program.as_str()] {
        let runs = Command::new(program)
            .arg("--version")
            .output()
            .is_ok_and(|out| out.status.success());
        if !runs {
            return Some(format!("{program} does not run ({how})"));
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
    let canary = |label: &str, source: &str| {
        json!({
            "label": label,
            "entry": "main",
            "source": source,
            "needs_f16": false,
            "needs_subgroups": false,
        })
    };
    let mut kernels = vec![
        canary(INVALID_CANARY, INVALID_CANARY_SOURCE),
        canary(FORBIDDEN_CANARY, FORBIDDEN_CANARY_SOURCE),
    ];
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
        .args(["--browser", &browser().0])
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
    assert_eq!(results[0]["label"], INVALID_CANARY);
    assert!(
        !errors_of(&results[0]).is_empty(),
        "the browser accepted WGSL no compiler accepts: the check is not checking"
    );
    assert_eq!(results[1]["label"], FORBIDDEN_CANARY);
    let forbidden_refused = !errors_of(&results[1]).is_empty();
    assert!(
        forbidden_refused || browser().0 != "chromium",
        "Chromium accepted WGSL the specification forbids: the check is not checking"
    );
    let results = &results[2..];
    let skipped: Vec<&Value> = results
        .iter()
        .filter(|r| r.get("skipped").is_some())
        .collect();
    let failed: Vec<String> = results
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
        "{} ({}, {}): {} kernels compiled, {} failed, {} skipped ({}); WGSL the specification \
         forbids {}",
        result["browser"].as_str().unwrap_or("the browser"),
        result["adapter"].as_str().unwrap_or("?"),
        result["features"],
        results.len() - failed.len() - skipped.len(),
        failed.len(),
        skipped.len(),
        skipped
            .first()
            .map_or("none", |s| s["skipped"].as_str().unwrap_or("?")),
        if forbidden_refused {
            "refused"
        } else {
            "accepted"
        }
    );
    assert!(failed.is_empty(), "{}", failed.join("\n"));
    assert!(results.len() > skipped.len(), "nothing was compiled");
}
