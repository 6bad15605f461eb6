#!/usr/bin/env bash
# The crate in a browser, end to end: builds tests/browser/attention/ for
# wasm32 (the crate on wgpu's BrowserWebGpu backend), writes
# wasm-bindgen's glue, runs attention.html in a headless browser's WebGPU
# and fails unless every case of the report passed against the f64
# reference. The browser is FLASH_ATTN_BROWSER: chromium (the default;
# Dawn, on a machine without a GPU its fallback adapter SwiftShader) or
# firefox (wgpu; lavapipe here; FLASH_ATTN_FIREFOX, which
# tests/browser/firefox/setup.sh provides). Installs what is missing: the
# wasm32 target, wasm-bindgen's command (the version the harness pins, a
# few minutes to build), Debian's Chromium. Takes 5-10 minutes on a
# 2-core machine; not part of CI (README, "In a browser").
set -euo pipefail
cd "$(dirname "$0")/../.."

bindgen_version=0.2.130
browser=${FLASH_ATTN_BROWSER:-chromium}
rustup target list --installed | grep -qx wasm32-unknown-unknown || rustup target add wasm32-unknown-unknown
if [ "$(wasm-bindgen --version 2>/dev/null | cut -d' ' -f2)" != "$bindgen_version" ]; then
    cargo install wasm-bindgen-cli --version "$bindgen_version"
fi
if [ "$browser" = chromium ] && ! command -v "${FLASH_ATTN_CHROMIUM:-chromium}" >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi

out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
echo "== building tests/browser/attention for wasm32"
CARGO_TARGET_DIR=target/browser cargo build --release --locked --target wasm32-unknown-unknown \
    --manifest-path tests/browser/attention/Cargo.toml
wasm-bindgen --target web --out-dir "$out/pkg" \
    target/browser/wasm32-unknown-unknown/release/flash_attn_browser_check.wasm
echo "== running it in headless $browser"
python3 tests/browser/run_page.py attention.html "$out" --browser "$browser" --timeout 1500 > "$out/report.json"
python3 - "$out/report.json" <<'JUDGE'
import json, sys
report = json.load(open(sys.argv[1]))
if "error" in report:
    sys.exit(f"the page failed: {report['error']}")
print(f"{report['browser']}, adapter {report['adapter'] or '(unnamed)'} ({report['backend']}, {report['device_type']})")
failed = 0
for case in report["cases"]:
    ok = case.get("passed") is True
    failed += not ok
    if "max_err_out" in case:
        errors = f"max |err| out {case['max_err_out']:.2e}"
        if "max_err_lse" in case:
            errors += f", lse {case['max_err_lse']:.2e}"
        if "max_err_stored" in case:
            errors += f", stored values {case['max_err_stored']:.2e}"
    elif "max_relative_err" in case:
        errors = f"max |err| of dq, dk, dv {case['max_relative_err']:.2e} of the largest gradient"
    else:
        errors = case.get("error", "")
    print(f"{'ok  ' if ok else 'FAIL'} {case['case']}: {errors}" + (f"  [{case['kernel']}]" if "kernel" in case else ""))
print(f"{len(report['cases']) - failed} of {len(report['cases'])} cases passed")
sys.exit(1 if failed else 0)
JUDGE
