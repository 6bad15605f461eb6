//! The flash-bench binary end to end: `check` round-trips safetensors files
//! written with the safetensors crate (as another framework would write
//! them), exit codes follow the documented contract, and `run --json`
//! carries the promised fields.
#![cfg(feature = "cli")]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{Inputs, gpu};
use half::{bf16, f16};
use safetensors::{Dtype, SafeTensors, tensor::TensorView};
use wgpu_flash_attn::{
    AttentionConfig, AttentionShape, BlockedLayout, DType, Error, ForwardPlan, NaivePlan, reference,
};

fn flash_bench(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_flash-bench"))
        .args(args)
        .output()
        .expect("flash-bench starts")
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("flash-bench-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

/// Runs flash-bench with `--json` into a scratch file named `name`,
/// asserts exit 0 and returns the output and the parsed report.
fn json_report(name: &str, args: &[&str]) -> (Output, serde_json::Value) {
    let json = scratch(name);
    let mut args = args.to_vec();
    args.extend(["--json", json.to_str().unwrap()]);
    let output = flash_bench(&args);
    assert_eq!(output.status.code(), Some(0), "{}", stdout(&output));
    let report = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    (output, report)
}

fn encode(dtype: Dtype, values: &[f32]) -> Vec<u8> {
    match dtype {
        Dtype::F32 => values.iter().flat_map(|x| x.to_le_bytes()).collect(),
        Dtype::F16 => values
            .iter()
            .flat_map(|&x| f16::from_f32(x).to_le_bytes())
            .collect(),
        Dtype::BF16 => values
            .iter()
            .flat_map(|&x| bf16::from_f32(x).to_le_bytes())
            .collect(),
        other => panic!("no encoder for {other:?}"),
    }
}

fn decode(dtype: Dtype, bytes: &[u8]) -> Vec<f32> {
    match dtype {
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect(),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        other => panic!("no decoder for {other:?}"),
    }
}

/// Writes q, k, v (and `out` if given) in `dtype`; returns the values the
/// file really holds (rounded to the dtype) for q, k, v.
fn write_file(
    path: &Path,
    shape: &AttentionShape,
    dtype: Dtype,
    inputs: &Inputs,
    out: Option<&[f32]>,
    skip: Option<&str>,
) -> Inputs {
    let (q_dims, kv_dims) = qk_dims(shape);
    let mut tensors = vec![
        ("q", q_dims, encode(dtype, &inputs.q)),
        ("k", kv_dims, encode(dtype, &inputs.k)),
        ("v", v_dims(shape), encode(dtype, &inputs.v)),
    ];
    if let Some(out) = out {
        tensors.push(("out", o_dims(shape), encode(dtype, out)));
    }
    tensors.retain(|(name, _, _)| Some(*name) != skip);
    let views: Vec<(&str, TensorView<'_>)> = tensors
        .iter()
        .map(|(name, dims, bytes)| (*name, TensorView::new(dtype, dims.clone(), bytes).unwrap()))
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
    Inputs {
        q: decode_round(dtype, &inputs.q),
        k: decode_round(dtype, &inputs.k),
        v: decode_round(dtype, &inputs.v),
    }
}

fn decode_round(dtype: Dtype, values: &[f32]) -> Vec<f32> {
    match dtype {
        Dtype::BF16 => values.iter().map(|&x| bf16::from_f32(x).to_f32()).collect(),
        _ => decode(dtype, &encode(dtype, values)),
    }
}

fn shape() -> AttentionShape {
    AttentionShape {
        batch: 2,
        seq_q: 37,
        seq_kv: 53,
        heads_q: 4,
        heads_kv: 2,
        head_dim: 32,
        head_dim_v: 32,
    }
}

fn reference_out(shape: &AttentionShape, inputs: &Inputs, config: &AttentionConfig) -> Vec<f32> {
    reference::attention(shape, &inputs.q, &inputs.k, &inputs.v, config)
        .unwrap()
        .out
        .iter()
        .map(|&x| x as f32)
        .collect()
}

fn stdout(output: &Output) -> String {
    format!(
        "{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

#[test]
fn check_round_trips_f32_file_and_writes_the_gpu_output() {
    let Some(_) = gpu() else { return };
    let shape = shape();
    let config = AttentionConfig::new().causal(true);
    let inputs = Inputs::draw(&shape, 0x5eed_0c01, 1.0);
    let want = reference_out(&shape, &inputs, &config);
    let file = scratch("f32.safetensors");
    let written = scratch("f32-out.safetensors");
    write_file(&file, &shape, Dtype::F32, &inputs, Some(&want), None);
    let output = flash_bench(&[
        "check",
        file.to_str().unwrap(),
        "--causal",
        "--output",
        written.to_str().unwrap(),
    ]);
    assert_eq!(output.status.code(), Some(0), "{}", stdout(&output));
    let bytes = std::fs::read(&written).unwrap();
    let file = SafeTensors::deserialize(&bytes).unwrap();
    let out = file.tensor("out").unwrap();
    assert_eq!(out.dtype(), Dtype::F32);
    assert_eq!(out.shape(), [2, 37, 4, 32]);
    let got = decode(Dtype::F32, out.data());
    let worst = common::max_abs_diff(&got, &want, "written out");
    assert!(worst <= 1e-4, "written out differs by {worst}");
}

#[test]
fn check_accepts_half_precision_files_within_their_tolerance() {
    let Some(_) = gpu() else { return };
    let shape = shape();
    let config = AttentionConfig::new().window(Some(8), Some(2));
    for dtype in [Dtype::F16, Dtype::BF16] {
        let inputs = Inputs::draw(&shape, 0x5eed_0c02, 1.0);
        let file = scratch(&format!("{dtype:?}.safetensors"));
        // The expected output another framework would store: computed from
        // the rounded inputs, then rounded to the file's dtype.
        let held = write_file(&file, &shape, dtype, &inputs, None, None);
        let want = reference_out(&shape, &held, &config);
        write_file(&file, &shape, dtype, &inputs, Some(&want), None);
        let output = flash_bench(&["check", file.to_str().unwrap(), "--window", "8,2"]);
        assert_eq!(
            output.status.code(),
            Some(0),
            "{dtype:?}: {}",
            stdout(&output)
        );
    }
}

#[test]
fn check_exits_1_outside_tolerance_and_2_on_bad_input() {
    let Some(_) = gpu() else { return };
    let shape = shape();
    let config = AttentionConfig::new();
    let inputs = Inputs::draw(&shape, 0x5eed_0c03, 1.0);
    let mut wrong = reference_out(&shape, &inputs, &config);
    wrong[17] += 0.01;
    let file = scratch("wrong.safetensors");
    write_file(&file, &shape, Dtype::F32, &inputs, Some(&wrong), None);
    let output = flash_bench(&["check", file.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(1), "{}", stdout(&output));
    assert!(stdout(&output).contains("OUTSIDE TOLERANCE"));
    // The same difference passes with a looser --atol.
    let output = flash_bench(&["check", file.to_str().unwrap(), "--atol", "0.02"]);
    assert_eq!(output.status.code(), Some(0), "{}", stdout(&output));

    let missing = scratch("missing-v.safetensors");
    write_file(&missing, &shape, Dtype::F32, &inputs, None, Some("v"));
    let output = flash_bench(&["check", missing.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(2), "{}", stdout(&output));
    assert!(stdout(&output).contains("no tensor named \"v\""));

    let odd = AttentionShape {
        head_dim: 12,
        ..shape
    };
    let odd_inputs = Inputs::draw(&odd, 1, 1.0);
    let unsupported = scratch("head-dim-12.safetensors");
    write_file(&unsupported, &odd, Dtype::F32, &odd_inputs, None, None);
    let output = flash_bench(&["check", unsupported.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(2), "{}", stdout(&output));
    assert!(stdout(&output).contains("12"), "{}", stdout(&output));
}

#[test]
fn run_json_has_every_promised_field() {
    let Some(_) = gpu() else { return };
    let (_, report) = json_report(
        "run.json",
        &[
            "run",
            "--seq-q",
            "64",
            "--seq-kv",
            "80",
            "--heads-q",
            "4",
            "--heads-kv",
            "2",
            "--head-dim",
            "32",
            "--window",
            "-1,0",
            "--impl",
            "naive",
            "--iters",
            "2",
        ],
    );
    assert!(report["ceilings"]["fma_gflops"].as_f64().unwrap() > 0.0);
    assert!(report["ceilings"]["copy_gb_per_s"].as_f64().unwrap() > 0.0);
    assert!(report["adapter"]["name"].is_string());
    assert!(report["timer"].is_string());
    let case = &report["cases"][0];
    assert_eq!(case["shape"]["seq_kv"], 80);
    assert_eq!(case["passed"], true);
    // The options are JSON fields (`--window -1,0`), not Debug text.
    let options = &case["options"];
    assert_eq!(options["causal"], false, "{options}");
    assert!(options["window_left"].is_null(), "{options}");
    assert_eq!(options["window_right"], 0, "{options}");
    for unset in ["scale", "softcap", "alibi", "tier", "f16_products"] {
        assert!(options[unset].is_null(), "{unset} in {options}");
    }
    assert_eq!(options["dtype"], "f32", "{options}");
    // What the planner chose (f32 storage: never f16 products).
    assert_eq!(case["f16_products"], false);
    let result = &case["results"][0];
    assert_eq!(result["impl"], "naive");
    assert_eq!(result["runs"], 2);
    for field in ["median_ms", "gflops", "pct_of_fma_ceiling", "max_abs_err"] {
        assert!(
            result[field].as_f64().is_some_and(|x| x > 0.0),
            "{field} missing or not positive in {result}"
        );
    }

    let output = flash_bench(&["run", "--window", "-2,0"]);
    assert_eq!(output.status.code(), Some(2), "{}", stdout(&output));
}

#[test]
fn decode_and_masks_report_validated_figures() {
    let Some(_) = gpu() else { return };
    // Decoding and masks compile their kernels ahead on CPU adapters (small
    // calls on zeros, one device per core): none of those calls may fail.
    let compiled_ahead = |output: &Output| {
        assert!(
            !stdout(output).contains("compile-ahead call failed"),
            "{}",
            stdout(output)
        );
    };
    let (output, report) = json_report(
        "decode.json",
        &[
            "decode",
            "--cache",
            "300,1000",
            "--heads-q",
            "8",
            "--heads-kv",
            "2",
            "--head-dim",
            "64",
            "--seq-q",
            "2",
            "--iters",
            "1",
        ],
    );
    compiled_ahead(&output);
    let cases = report["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 2);
    for case in cases {
        for field in ["decode_ms", "gb_per_s", "pct_of_copy_ceiling", "prefill_ms"] {
            assert!(
                case[field].as_f64().is_some_and(|x| x > 0.0),
                "{field} missing or not positive in {case}"
            );
        }
        assert!(case["max_abs_err"].as_f64().unwrap() <= 1e-4);
    }

    // f16 queries and outputs over an f32, a bf16 and an fp8 cache: validated
    // within the tolerance past the output's f16 rounding; the prefill
    // kernel is compared for f32 queries only.
    let json = scratch("decode-f16-queries.json");
    let output = flash_bench(&[
        "decode",
        "--cache",
        "300",
        "--heads-q",
        "8",
        "--heads-kv",
        "2",
        "--head-dim",
        "64",
        "--kv-dtype",
        "f32,bf16,fp8",
        "--storage-error",
        "--q-dtype",
        "f16",
        "--iters",
        "1",
        "--json",
        json.to_str().unwrap(),
    ]);
    assert_eq!(output.status.code(), Some(0), "{}", stdout(&output));
    compiled_ahead(&output);
    assert!(stdout(&output).contains("q:f16"), "{}", stdout(&output));
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let cases = report["cases"].as_array().unwrap();
    let types: Vec<&str> = cases
        .iter()
        .map(|c| c["kv_dtype"].as_str().unwrap())
        .collect();
    assert_eq!(types, ["f32", "bf16", "fp8"]);
    // What each narrower type's storage costs the output, against the
    // reference over the f32 values appended: bf16's 8 mantissa bits lose
    // less than fp8's 3; an f32 cache has nothing to report.
    let storage_rms: Vec<Option<f64>> = cases
        .iter()
        .map(|c| c["storage_error_rms"].as_f64())
        .collect();
    assert_eq!(storage_rms[0], None, "{cases:?}");
    let (bf16, fp8) = (storage_rms[1].unwrap(), storage_rms[2].unwrap());
    assert!(0.0 < bf16 && bf16 < fp8, "bf16 {bf16:.2e}, fp8 {fp8:.2e}");
    for case in cases {
        assert_eq!(case["q_dtype"], "f16", "{case}");
        assert_eq!(case["within_tolerance"], true, "{case}");
        assert!(case["prefill_ms"].is_null(), "{case}");
        // At most the tolerance plus f16's rounding of outputs below 1.
        assert!(
            case["max_abs_err"].as_f64().unwrap() <= 1e-4 + 2f64.powi(-11),
            "{case}"
        );
    }

    // Continuous-batching steps: sequence 0's 40-token prompt chunk in one
    // ragged call, validated (the first and the last sequence) against
    // the reference; `others` gives the rest of the batch.
    let prompt_chunk_step = |name: &str, others: &[&str]| {
        let mut args = vec![
            "decode",
            "--cache",
            "300",
            "--heads-q",
            "8",
            "--heads-kv",
            "2",
            "--head-dim",
            "64",
            "--prompt-chunk",
            "40",
            "--iters",
            "1",
        ];
        args.extend_from_slice(others);
        let (output, report) = json_report(name, &args);
        let case = report["cases"][0].clone();
        assert_eq!(case["prompt_chunk"], 40, "{case}");
        assert_eq!(case["within_tolerance"], true, "{case}");
        assert!(case["max_abs_err"].as_f64().unwrap() <= 1e-4, "{case}");
        assert!(case["prefill_ms"].is_null(), "{case}");
        (output, case)
    };
    // Beside two sequences decoding one token, paged.
    let (output, _) = prompt_chunk_step(
        "decode-prompt-chunk.json",
        &["--batch", "3", "--page-size", "16"],
    );
    compiled_ahead(&output);
    assert!(stdout(&output).contains("q40+1 "), "{}", stdout(&output));
    // Alone: the other sequence sits the step out (no rows to validate).
    let (output, _) = prompt_chunk_step(
        "decode-prompt-chunk-alone.json",
        &["--batch", "2", "--seq-q", "0"],
    );
    assert!(stdout(&output).contains("q40+0 "), "{}", stdout(&output));

    // Speculative token trees: each sequence's six query tokens a draft
    // tree, timed beside the causal step in the same run, both validated.
    let (output, report) = json_report(
        "decode-token-tree.json",
        &[
            "decode",
            "--cache",
            "300",
            "--batch",
            "2",
            "--heads-q",
            "8",
            "--heads-kv",
            "2",
            "--head-dim",
            "64",
            "--seq-q",
            "6",
            "--token-tree",
            "--iters",
            "1",
        ],
    );
    compiled_ahead(&output);
    assert!(stdout(&output).contains("q6 tree "), "{}", stdout(&output));
    let cases = report["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 2);
    for (case, tree) in cases.iter().zip([false, true]) {
        assert_eq!(case["token_tree"], tree, "{case}");
        assert_eq!(case["within_tolerance"], true, "{case}");
        assert!(case["max_abs_err"].as_f64().unwrap() <= 1e-4, "{case}");
    }
    let output = flash_bench(&["decode", "--token-tree", "--prompt-chunk", "40"]);
    assert_eq!(output.status.code(), Some(2), "{}", stdout(&output));
    assert!(
        stdout(&output).contains("cannot be used with"),
        "{}",
        stdout(&output)
    );

    // A sliding window over a paged cache whose pages behind it go back
    // to the pool: 300 tokens in 19 pages, the query at 299 sees from 199,
    // so the 12 pages before 192 are released, 7 kept; two key channels
    // 20x the others; validated.
    let (output, report) = json_report(
        "decode-window.json",
        &[
            "decode",
            "--cache",
            "300",
            "--batch",
            "2",
            "--heads-q",
            "8",
            "--heads-kv",
            "2",
            "--head-dim",
            "64",
            "--page-size",
            "16",
            "--window",
            "100",
            "--release-behind-window",
            "--key-outliers",
            "2",
            "--iters",
            "1",
        ],
    );
    compiled_ahead(&output);
    assert!(
        stdout(&output).contains("kv300 d64 w100 outliers2 paged16"),
        "{}",
        stdout(&output)
    );
    let case = &report["cases"][0];
    assert_eq!(case["window"], 100, "{case}");
    assert_eq!(case["pages_kept"], serde_json::json!([7, 19]), "{case}");
    assert_eq!(case["within_tolerance"], true, "{case}");
    let output = flash_bench(&["decode", "--window", "100", "--release-behind-window"]);
    assert_eq!(output.status.code(), Some(2), "{}", stdout(&output));
    assert!(
        stdout(&output).contains("--page-size"),
        "{}",
        stdout(&output)
    );

    // A latent cache (MLA): values are the keys' prefixes, one pool read.
    let json = scratch("decode-latent.json");
    let output = flash_bench(&[
        "decode",
        "--cache",
        "300",
        "--heads-q",
        "8",
        "--heads-kv",
        "1",
        "--head-dim",
        "192",
        "--latent-values",
        "128",
        "--kv-dtype",
        "f32,int8",
        "--iters",
        "1",
        "--json",
        json.to_str().unwrap(),
    ]);
    assert_eq!(output.status.code(), Some(0), "{}", stdout(&output));
    compiled_ahead(&output);
    assert!(
        stdout(&output).contains("d192/128 latent"),
        "{}",
        stdout(&output)
    );
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let cases = report["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 2);
    for case in cases {
        assert_eq!(case["head_dim_v"], 128);
        assert_eq!(case["latent"], true);
        assert!(case["max_abs_err"].as_f64().unwrap() <= 1e-4, "{case}");
    }
    // The f32 case reads one pool of 300 tokens x 192 f32s in its time.
    let f32_case = &cases[0];
    let bytes =
        f32_case["gb_per_s"].as_f64().unwrap() * f32_case["decode_ms"].as_f64().unwrap() * 1e6;
    assert!((bytes - 300.0 * 192.0 * 4.0).abs() < 1.0, "{bytes} bytes");

    let (output, report) = json_report(
        "masks.json",
        &[
            "masks",
            "--bert-batch",
            "2",
            "--longformer-seq",
            "512",
            "--window",
            "64",
            "--iters",
            "1",
            "--backward",
            // A long sequence beside short ones, one of a single token.
            "--packed-lens",
            "100,1,17,64",
        ],
    );
    compiled_ahead(&output);
    let runs = report["runs"].as_array().unwrap();
    let variants: Vec<&str> = runs
        .iter()
        .map(|r| r["variant"].as_str().unwrap())
        .collect();
    assert_eq!(
        variants,
        [
            "dense boolean mask",
            "valid lengths",
            "dense boolean mask",
            "valid lengths",
            "padded, valid lengths",
            "packed, cu_seqlens",
            "padded, valid lengths",
            "packed, cu_seqlens",
            "dense boolean mask",
            "block-sparse"
        ]
    );
    let packed: Vec<&str> = runs
        .iter()
        .map(|r| r["case"].as_str().unwrap())
        .filter(|case| case.starts_with("packed"))
        .collect();
    assert_eq!(
        packed,
        [
            "packed forward, causal seqs 100+1+17+64 H12 d64",
            "packed forward, causal seqs 100+1+17+64 H12 d64",
            "packed backward, causal seqs 100+1+17+64 H12 d64",
            "packed backward, causal seqs 100+1+17+64 H12 d64",
        ]
    );
    for run in runs {
        assert!(run["median_ms"].as_f64().unwrap() > 0.0);
        // Forward: absolute; backward: relative to the largest gradient.
        let backward = run["case"].as_str().unwrap().contains("backward");
        let bound = if backward { 2e-5 } else { 1e-4 };
        assert!(run["max_abs_err"].as_f64().unwrap() <= bound, "{run}");
    }
}

/// Bad flags exit 2 with the reason and no panic: a negative softcap is a
/// value (refused as invalid, not taken for a flag), zero timed runs is
/// refused.
#[test]
fn bad_flags_exit_2_with_the_reason() {
    let Some(_) = gpu() else { return };
    let small = ["run", "--seq-q", "16", "--heads-q", "1", "--head-dim", "8"];
    let run_small = |extra: &[&'static str]| -> Vec<&'static str> {
        small.iter().copied().chain(extra.iter().copied()).collect()
    };
    let decode_small = |extra: &[&'static str]| -> Vec<&'static str> {
        let base = [
            "decode",
            "--cache",
            "64",
            "--heads-q",
            "1",
            "--heads-kv",
            "1",
        ];
        base.iter()
            .copied()
            .chain(["--head-dim", "8", "--iters", "1"])
            .chain(extra.iter().copied())
            .collect()
    };
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (run_small(&["--softcap", "-1"]), "softcap"),
        (run_small(&["--iters", "0"]), "at least 1 timed run"),
        // A huge count would run for ever.
        (run_small(&["--iters", "18446744073709551615"]), "at most"),
        // Every tier listed skipped (f16 products need f16 storage): no run.
        (
            run_small(&["--tier", "blocked-f16,blocked-f16"]),
            "nothing to run",
        ),
        // An output whose directory does not exist, before anything runs.
        (
            run_small(&["--json", "/nonexistent-dir/out.json"]),
            "does not exist",
        ),
        (decode_small(&["--page-size", "0"]), "power of two"),
        (decode_small(&["--prompt-chunk", "0"]), "at least 1"),
        (decode_small(&["--seq-q", "0"]), "sit the step out"),
        (
            decode_small(&["--key-outliers", "9"]),
            "--key-outliers 9: a key vector has 8 elements",
        ),
        // One past MAX_SEQUENCE_LEN (2^29).
        (
            decode_small(&["--cache", "536870913"]),
            "at most 536870912 (max_sequence_len)",
        ),
        (vec!["masks", "--iters", "0"], "at least 1 timed run"),
        (
            vec!["masks", "--backward", "--packed-lens", "64,0"],
            "at least 1 token",
        ),
        (
            vec!["masks", "--backward", "--packed-lens", "8193"],
            "at most 8192",
        ),
        // The packed batch is the backward's case.
        (vec!["masks", "--packed-lens", "64"], "--backward"),
    ];
    for (args, reason) in cases {
        let output = flash_bench(&args);
        let text = format!(
            "{}{}",
            stdout(&output),
            String::from_utf8_lossy(&output.stderr)
        );
        assert_eq!(output.status.code(), Some(2), "{args:?}: {text}");
        assert!(text.to_lowercase().contains(reason), "{args:?}: {text}");
        assert!(!text.contains("panicked"), "{args:?}: {text}");
    }
}

/// `check` refuses a file with a non-finite value (naming the tensor and
/// the element) and a tolerance that is not finite and >= 0, with exit 2:
/// neither is a disagreement of the GPU's.
#[test]
fn check_refuses_non_finite_values_and_tolerances() {
    let Some(_) = gpu() else { return };
    let shape = shape();
    let config = AttentionConfig::new();
    let inputs = Inputs::draw(&shape, 0x5eed_0c0f, 1.0);
    let want = reference_out(&shape, &inputs, &config);
    let file = scratch("finite.safetensors");
    write_file(&file, &shape, Dtype::F32, &inputs, Some(&want), None);
    for atol in ["--atol=inf", "--atol=nan", "--atol=-1"] {
        let output = flash_bench(&["check", file.to_str().unwrap(), atol]);
        assert_eq!(
            output.status.code(),
            Some(2),
            "--atol {atol}: {}",
            stdout(&output)
        );
        assert!(stdout(&output).contains("tolerance"), "{}", stdout(&output));
    }
    for (name, bad) in [("k", f32::NAN), ("out", f32::INFINITY)] {
        let mut poisoned = Inputs::draw(&shape, 0x5eed_0c0f, 1.0);
        let mut out = want.clone();
        match name {
            "k" => poisoned.k[5] = bad,
            _ => out[5] = bad,
        }
        let file = scratch(&format!("non-finite-{name}.safetensors"));
        write_file(&file, &shape, Dtype::F32, &poisoned, Some(&out), None);
        let output = flash_bench(&["check", file.to_str().unwrap()]);
        let text = stdout(&output);
        assert_eq!(output.status.code(), Some(2), "{name}: {text}");
        assert!(
            text.contains(&format!("tensor {name} holds")) && text.contains("element 5"),
            "{name}: {text}"
        );
        assert!(!text.contains("panicked"), "{text}");
    }
}

#[test]
fn linear_attention_sweeps_beside_flash_and_plots_time() {
    let Some(_) = gpu() else { return };
    let (json, plot) = (scratch("linear.json"), scratch("linear.svg"));
    let output = flash_bench(&[
        "sweep",
        "--impl",
        "flash,linear",
        "--seq",
        "64,130",
        "--heads-q",
        "2",
        "--head-dim",
        "32",
        "--causal",
        "--iters",
        "1",
        "--json",
        json.to_str().unwrap(),
        "--plot",
        plot.to_str().unwrap(),
    ]);
    assert_eq!(output.status.code(), Some(0), "{}", stdout(&output));
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    for case in report["cases"].as_array().unwrap() {
        let seq = case["shape"]["seq_kv"].as_f64().unwrap();
        let linear = case["results"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["impl"] == "linear")
            .expect("a linear result");
        assert_eq!(linear["status"], "ok", "{linear}");
        assert!(linear["max_abs_err"].as_f64().unwrap() <= 1e-4, "{linear}");
        // 4 x N x d x d_v per head, causal or not.
        assert_eq!(
            linear["flops"].as_f64().unwrap(),
            4.0 * seq * 32.0 * 32.0 * 2.0
        );
    }
    let svg = std::fs::read_to_string(&plot).unwrap();
    assert!(svg.contains("median time (ms, log scale)"), "{svg}");
    assert!(svg.contains(">linear<") && svg.contains(">flash<"), "{svg}");

    // Options linear attention does not have are reported, not ignored;
    // with nothing else asked for, nothing ran: exit 2.
    let output = flash_bench(&[
        "run",
        "--impl",
        "linear",
        "--seq-q",
        "64",
        "--heads-q",
        "2",
        "--head-dim",
        "32",
        "--softcap",
        "5",
        "--iters",
        "1",
    ]);
    assert_eq!(output.status.code(), Some(2), "{}", stdout(&output));
    assert!(
        stdout(&output).contains("nothing was measured"),
        "{}",
        stdout(&output)
    );
    assert!(
        stdout(&output).contains("skipped: linear attention takes no window"),
        "{}",
        stdout(&output)
    );
}

/// One safetensors entry: name, dims, f32 values.
type Entry<'a> = (&'static str, Vec<usize>, &'a [f32]);

/// The `[batch, seq, heads, head_dim]` dims of Q (and dQ) and of K (and
/// dK) of `shape`; with one head dim, also of O, dO and of V, dV.
fn qk_dims(shape: &AttentionShape) -> (Vec<usize>, Vec<usize>) {
    (
        vec![shape.batch, shape.seq_q, shape.heads_q, shape.head_dim],
        vec![shape.batch, shape.seq_kv, shape.heads_kv, shape.head_dim],
    )
}

/// The dims of V (and dV): K's with the value head dim.
fn v_dims(shape: &AttentionShape) -> Vec<usize> {
    vec![shape.batch, shape.seq_kv, shape.heads_kv, shape.head_dim_v]
}

/// The dims of O (and dO): Q's with the value head dim.
fn o_dims(shape: &AttentionShape) -> Vec<usize> {
    vec![shape.batch, shape.seq_q, shape.heads_q, shape.head_dim_v]
}

/// The q, k and v entries of a check file for `shape`, then `more`.
fn qkv_entries<'a>(
    shape: &AttentionShape,
    inputs: &'a Inputs,
    more: Vec<Entry<'a>>,
) -> Vec<Entry<'a>> {
    let (q_dims, kv_dims) = qk_dims(shape);
    let mut entries = vec![
        ("q", q_dims, &inputs.q[..]),
        ("k", kv_dims, &inputs.k[..]),
        ("v", v_dims(shape), &inputs.v[..]),
    ];
    entries.extend(more);
    entries
}

/// Writes `tensors` (name, dims, f32 values) as one F32 safetensors file.
fn write_f32_tensors(path: &Path, tensors: &[Entry<'_>]) {
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, _, values)| encode(Dtype::F32, values))
        .collect();
    let views: Vec<(&str, TensorView<'_>)> = tensors
        .iter()
        .zip(&bytes)
        .map(|((name, dims, _), bytes)| {
            (
                *name,
                TensorView::new(Dtype::F32, dims.clone(), bytes).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

#[test]
fn check_backward_compares_each_gradient_and_writes_them() {
    let Some(_) = gpu() else { return };
    let shape = shape();
    let config = AttentionConfig::new().causal(true);
    let inputs = Inputs::draw(&shape, 0x5eed_0c10, 1.0);
    let d_out = Inputs::draw(&shape, 0x5eed_0c11, 1.0).q;
    let want = reference::attention_backward(
        &shape,
        [&inputs.q, &inputs.k, &inputs.v, &d_out],
        &config,
        None,
    )
    .unwrap();
    let narrow = |x: &[f64]| -> Vec<f32> { x.iter().map(|&v| v as f32).collect() };
    let (dq, dk, dv) = (narrow(&want.dq), narrow(&want.dk), narrow(&want.dv));
    let (q_dims, kv_dims) = qk_dims(&shape);
    let mut tensors = qkv_entries(
        &shape,
        &inputs,
        vec![
            ("do", q_dims.clone(), &d_out),
            ("dq", q_dims.clone(), &dq),
            ("dk", kv_dims.clone(), &dk),
            ("dv", kv_dims.clone(), &dv),
        ],
    );
    let file = scratch("backward.safetensors");
    let written = scratch("backward-out.safetensors");
    write_f32_tensors(&file, &tensors);
    let output = flash_bench(&[
        "check",
        file.to_str().unwrap(),
        "--causal",
        "--backward",
        "--output",
        written.to_str().unwrap(),
    ]);
    assert_eq!(output.status.code(), Some(0), "{}", stdout(&output));
    for name in ["dq", "dk", "dv"] {
        assert!(stdout(&output).contains(&format!("{name} vs f64 reference")));
        assert!(stdout(&output).contains(&format!("{name} vs file's")));
    }
    let bytes = std::fs::read(&written).unwrap();
    let file_out = SafeTensors::deserialize(&bytes).unwrap();
    for (name, want, dims) in [
        ("dq", &dq, &q_dims),
        ("dk", &dk, &kv_dims),
        ("dv", &dv, &kv_dims),
    ] {
        let tensor = file_out.tensor(name).unwrap();
        assert_eq!(tensor.shape(), dims.as_slice());
        let got = decode(Dtype::F32, tensor.data());
        let worst = common::max_abs_diff(&got, want, &format!("written {name}"));
        assert!(worst <= 1e-4, "written {name} differs by {worst}");
    }

    // A wrong expected gradient: exit 1.
    let mut wrong_dk = dk.clone();
    wrong_dk[5] += 0.05;
    tensors[5].2 = &wrong_dk;
    write_f32_tensors(&file, &tensors);
    let output = flash_bench(&["check", file.to_str().unwrap(), "--causal", "--backward"]);
    assert_eq!(output.status.code(), Some(1), "{}", stdout(&output));
    assert!(stdout(&output).contains("OUTSIDE TOLERANCE"));

    // No `do`: exit 2 with the reason.
    let without_do: Vec<_> = tensors.iter().filter(|t| t.0 != "do").cloned().collect();
    write_f32_tensors(&file, &without_do);
    let output = flash_bench(&["check", file.to_str().unwrap(), "--backward"]);
    assert_eq!(output.status.code(), Some(2), "{}", stdout(&output));
    assert!(stdout(&output).contains("\"do\""), "{}", stdout(&output));
}

/// One attention-sink logit per query head of `shape()`, of both signs and
/// large enough to move every row.
fn sinks_for(shape: &AttentionShape) -> Vec<f32> {
    (0..shape.heads_q)
        .map(|h| [0.5, -1.0, 2.5, 0.0][h % 4])
        .collect()
}

#[test]
fn check_applies_the_files_sinks() {
    let Some(_) = gpu() else { return };
    let shape = shape();
    let sinks = sinks_for(&shape);
    let config = AttentionConfig::new().causal(true).sinks(sinks.clone());
    let inputs = Inputs::draw(&shape, 0x5eed_0c20, 1.0);
    let want = reference_out(&shape, &inputs, &config);
    let (q_dims, _) = qk_dims(&shape);
    let mut tensors = qkv_entries(
        &shape,
        &inputs,
        vec![
            ("out", q_dims, &want),
            ("sinks", vec![shape.heads_q], &sinks),
        ],
    );
    let file = scratch("sinks.safetensors");
    let json = scratch("sinks-check.json");
    write_f32_tensors(&file, &tensors);
    let output = flash_bench(&[
        "check",
        file.to_str().unwrap(),
        "--causal",
        "--json",
        json.to_str().unwrap(),
    ]);
    assert_eq!(output.status.code(), Some(0), "{}", stdout(&output));
    assert!(stdout(&output).contains("sinks"), "{}", stdout(&output));
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let recorded: Vec<f64> = report["options"]["sinks"]
        .as_array()
        .unwrap_or_else(|| panic!("no sinks in {report}"))
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    let given: Vec<f64> = sinks.iter().map(|&x| f64::from(x)).collect();
    assert_eq!(recorded, given);

    // The sinks are applied, not ignored: the output without them is
    // outside the tolerance.
    let plain = reference_out(&shape, &inputs, &AttentionConfig::new().causal(true));
    tensors[3].2 = &plain;
    write_f32_tensors(&file, &tensors);
    let output = flash_bench(&["check", file.to_str().unwrap(), "--causal"]);
    assert_eq!(output.status.code(), Some(1), "{}", stdout(&output));
}

#[test]
fn check_backward_compares_the_sink_gradients() {
    let Some(_) = gpu() else { return };
    let shape = shape();
    let sinks = sinks_for(&shape);
    let config = AttentionConfig::new().causal(true).sinks(sinks.clone());
    let inputs = Inputs::draw(&shape, 0x5eed_0c21, 1.0);
    let d_out = Inputs::draw(&shape, 0x5eed_0c22, 1.0).q;
    let want = reference::attention_backward(
        &shape,
        [&inputs.q, &inputs.k, &inputs.v, &d_out],
        &config,
        None,
    )
    .unwrap();
    assert_eq!(want.dsinks.len(), shape.heads_q);
    let dsinks: Vec<f32> = want.dsinks.iter().map(|&x| x as f32).collect();
    let (q_dims, _) = qk_dims(&shape);
    let tensors = qkv_entries(
        &shape,
        &inputs,
        vec![
            ("do", q_dims, &d_out),
            ("sinks", vec![shape.heads_q], &sinks),
            ("dsinks", vec![shape.heads_q], &dsinks),
        ],
    );
    let file = scratch("sinks-backward.safetensors");
    let written = scratch("sinks-backward-out.safetensors");
    write_f32_tensors(&file, &tensors);
    let output = flash_bench(&[
        "check",
        file.to_str().unwrap(),
        "--causal",
        "--backward",
        "--output",
        written.to_str().unwrap(),
    ]);
    assert_eq!(output.status.code(), Some(0), "{}", stdout(&output));
    for name in ["dq", "dk", "dv", "dsinks"] {
        assert!(
            stdout(&output).contains(&format!("{name} vs f64 reference")),
            "{}",
            stdout(&output)
        );
    }
    assert!(stdout(&output).contains("dsinks vs file's"));
    let bytes = std::fs::read(&written).unwrap();
    let file_out = SafeTensors::deserialize(&bytes).unwrap();
    let tensor = file_out.tensor("dsinks").unwrap();
    assert_eq!(tensor.shape(), [shape.heads_q]);
    let magnitude = dsinks.iter().fold(1.0f32, |m, x| m.max(x.abs()));
    for (g, w) in decode(Dtype::F32, tensor.data()).iter().zip(&dsinks) {
        assert!(
            (g - w).abs() <= 1e-4 * magnitude,
            "written dsinks {g} vs {w}"
        );
    }
}

#[test]
fn check_refuses_sinks_of_the_wrong_shape_in_one_line() {
    let Some(_) = gpu() else { return };
    let shape = shape();
    let inputs = Inputs::draw(&shape, 0x5eed_0c23, 1.0);
    let long = vec![0.5f32; shape.heads_q + 1];
    let file = scratch("sinks-wrong.safetensors");
    for dims in [vec![shape.heads_q + 1], vec![1, shape.heads_q + 1]] {
        write_f32_tensors(
            &file,
            &qkv_entries(&shape, &inputs, vec![("sinks", dims.clone(), &long)]),
        );
        let output = flash_bench(&["check", file.to_str().unwrap()]);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(
            output.status.code(),
            Some(2),
            "{dims:?}: {}",
            stdout(&output)
        );
        assert!(stderr.contains("sinks"), "{dims:?}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "{dims:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{dims:?}: {stderr}");
    }
}

/// `flash-bench run --backward` on a small causal GQA shape with `extra`
/// flags (exit 0 asserted); its JSON report.
fn run_backward_report(seq_q: &str, extra: &[&str], json_name: &str) -> serde_json::Value {
    let json = scratch(json_name);
    let mut args = vec![
        "run",
        "--seq-q",
        seq_q,
        "--heads-q",
        "4",
        "--heads-kv",
        "2",
        "--head-dim",
        "32",
        "--causal",
        "--backward",
        "--iters",
        "1",
        "--json",
        json.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let output = flash_bench(&args);
    assert_eq!(output.status.code(), Some(0), "{}", stdout(&output));
    serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap()
}

#[test]
fn run_sinks_validates_forward_and_backward() {
    let Some(_) = gpu() else { return };
    let report = run_backward_report("40", &["--sinks"], "run-sinks.json");
    let case = &report["cases"][0];
    assert!(case["name"].as_str().unwrap().contains("sinks"), "{case}");
    let sinks = case["options"]["sinks"].as_array().expect("sinks recorded");
    assert_eq!(sinks.len(), 4, "{case}");
    assert!(sinks.iter().all(|s| s.as_f64().is_some_and(f64::is_finite)));
    assert_forward_and_backward_validated(case);
}

/// The case's flash and backward rows passed validation within 1e-4.
fn assert_forward_and_backward_validated(case: &serde_json::Value) {
    for implementation in ["flash", "backward"] {
        let result = case["results"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["impl"] == implementation)
            .unwrap_or_else(|| panic!("no {implementation} row in {case}"));
        assert_eq!(result["status"], "ok", "{result}");
        assert!(result["max_abs_err"].as_f64().unwrap() <= 1e-4, "{result}");
    }
}

/// `--dropout P --dropout-seed S`: the reference draws the same mask, so
/// forward and backward are validated; the options record both.
#[test]
fn run_dropout_validates_forward_and_backward() {
    let Some(_) = gpu() else { return };
    let extra = ["--dropout", "0.2", "--dropout-seed", "7"];
    let report = run_backward_report("40", &extra, "run-dropout.json");
    let case = &report["cases"][0];
    assert!(
        case["name"].as_str().unwrap().contains("dropout=0.2"),
        "{case}"
    );
    let dropout = &case["options"]["dropout"];
    assert!(
        (dropout["p"].as_f64().unwrap() - 0.2).abs() < 1e-6,
        "{dropout}"
    );
    assert_eq!(dropout["seed"], 7, "{dropout}");
    assert_forward_and_backward_validated(case);
    let output = flash_bench(&["run", "--seq-q", "8", "--dropout", "1.5"]);
    assert_eq!(output.status.code(), Some(2), "{}", stdout(&output));
}

#[test]
fn run_backward_reports_a_validated_backward_row() {
    let Some(_) = gpu() else { return };
    let report = run_backward_report("96", &[], "backward.json");
    let results = report["cases"][0]["results"].as_array().unwrap();
    let backward = results
        .iter()
        .find(|r| r["impl"] == "backward")
        .expect("a backward row");
    let forward = results.iter().find(|r| r["impl"] == "flash").unwrap();
    assert_eq!(backward["status"], "ok");
    assert!(backward["max_abs_err"].as_f64().unwrap() <= 1e-4);
    // FlashAttention's count: 2.5 x the forward's FLOPs.
    let ratio = backward["flops"].as_f64().unwrap() / forward["flops"].as_f64().unwrap();
    assert!((ratio - 2.5).abs() < 1e-9, "{ratio}");
    let note = backward["note"].as_str().unwrap();
    assert!(note.contains("backward / forward"), "{note}");
}

/// DeepSeek MLA prefill's head dims, small: q and k 192 wide, v 128.
fn mla_shape() -> AttentionShape {
    AttentionShape {
        batch: 1,
        seq_q: 24,
        seq_kv: 40,
        heads_q: 2,
        heads_kv: 2,
        head_dim: 192,
        head_dim_v: 128,
    }
}

/// The last line of stderr is the whole of it, and no panic.
fn assert_one_line_error(output: &Output, reason: &str) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{}", stdout(output));
    assert!(stderr.contains(reason), "{reason:?} not in {stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn check_takes_a_value_head_dim_of_its_own() {
    let Some(_) = gpu() else { return };
    let shape = mla_shape();
    let config = AttentionConfig::new().causal(true);
    let inputs = Inputs::draw(&shape, 0x5eed_0c30, 1.0);
    let want = reference_out(&shape, &inputs, &config);
    assert_eq!(want.len(), shape.o_shape().elements());
    let file = scratch("mla.safetensors");
    let written = scratch("mla-out.safetensors");
    write_f32_tensors(
        &file,
        &qkv_entries(&shape, &inputs, vec![("out", o_dims(&shape), &want)]),
    );
    let output = flash_bench(&[
        "check",
        file.to_str().unwrap(),
        "--causal",
        "--output",
        written.to_str().unwrap(),
    ]);
    assert_eq!(output.status.code(), Some(0), "{}", stdout(&output));
    assert!(stdout(&output).contains("d192/128"), "{}", stdout(&output));
    assert!(stdout(&output).contains("GPU vs file's out"));
    let bytes = std::fs::read(&written).unwrap();
    let file_out = SafeTensors::deserialize(&bytes).unwrap();
    let out = file_out.tensor("out").unwrap();
    assert_eq!(out.shape(), [1, 24, 2, 128]);
    let worst = common::max_abs_diff(&decode(Dtype::F32, out.data()), &want, "written out");
    assert!(worst <= 1e-4, "written out differs by {worst}");

    // The GPU backward takes the uneven pair: dq and dk 192 wide, dv 128,
    // each against the reference.
    let d_out = vec![0.5f32; shape.o_shape().elements()];
    write_f32_tensors(
        &file,
        &qkv_entries(&shape, &inputs, vec![("do", o_dims(&shape), &d_out)]),
    );
    let output = flash_bench(&[
        "check",
        file.to_str().unwrap(),
        "--causal",
        "--backward",
        "--output",
        written.to_str().unwrap(),
    ]);
    assert_eq!(output.status.code(), Some(0), "{}", stdout(&output));
    let bytes = std::fs::read(&written).unwrap();
    let gradients = SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(gradients.tensor("dq").unwrap().shape(), [1, 24, 2, 192]);
    assert_eq!(gradients.tensor("dk").unwrap().shape(), [1, 40, 2, 192]);
    assert_eq!(gradients.tensor("dv").unwrap().shape(), [1, 40, 2, 128]);

    // Past 256 it is refused before anything runs: one line, exit 2.
    let wide = AttentionShape {
        head_dim: 264,
        ..shape
    };
    let inputs = Inputs::draw(&wide, 0x5eed_0c32, 1.0);
    let d_out = vec![0.5f32; wide.o_shape().elements()];
    write_f32_tensors(
        &file,
        &qkv_entries(&wide, &inputs, vec![("do", o_dims(&wide), &d_out)]),
    );
    let output = flash_bench(&["check", file.to_str().unwrap(), "--backward"]);
    assert_one_line_error(&output, "--backward");
}

#[test]
fn check_refuses_a_v_of_other_heads_or_an_out_of_q_width_in_one_line() {
    let Some(_) = gpu() else { return };
    let shape = mla_shape();
    let inputs = Inputs::draw(&shape, 0x5eed_0c31, 1.0);
    let file = scratch("mla-wrong.safetensors");
    // v with one head where k has two.
    let (q_dims, kv_dims) = qk_dims(&shape);
    let one_head = &inputs.v[..shape.seq_kv * shape.head_dim_v];
    write_f32_tensors(
        &file,
        &[
            ("q", q_dims.clone(), &inputs.q),
            ("k", kv_dims, &inputs.k),
            ("v", vec![1, shape.seq_kv, 1, shape.head_dim_v], one_head),
        ],
    );
    let output = flash_bench(&["check", file.to_str().unwrap()]);
    assert_one_line_error(&output, "v is");
    // An expected `out` as wide as q, not v.
    let wide = vec![0.0f32; shape.q_shape().elements()];
    write_f32_tensors(
        &file,
        &qkv_entries(&shape, &inputs, vec![("out", q_dims, &wide)]),
    );
    let output = flash_bench(&["check", file.to_str().unwrap()]);
    assert_one_line_error(&output, "out is");
}

#[test]
fn run_takes_a_value_head_dim_forward_and_backward() {
    let Some(_) = gpu() else { return };
    let json = scratch("run-mla.json");
    let output = flash_bench(&[
        "run",
        "--seq-q",
        "24",
        "--heads-q",
        "2",
        "--head-dim",
        "192",
        "--head-dim-v",
        "128",
        "--backward",
        "--iters",
        "1",
        "--json",
        json.to_str().unwrap(),
    ]);
    assert_eq!(output.status.code(), Some(0), "{}", stdout(&output));
    assert!(
        stdout(&output).contains("B1 H2 N24 d192/128"),
        "{}",
        stdout(&output)
    );
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let case = &report["cases"][0];
    assert_eq!(case["shape"]["head_dim"], 192, "{case}");
    assert_eq!(case["shape"]["head_dim_v"], 128, "{case}");
    // 2 x (192 + 128) FLOPs per (query, key), 2 heads, 24 x 24 pairs.
    let flops = 2.0 * (192.0 + 128.0) * 2.0 * 24.0 * 24.0;
    assert_eq!(case["flops"].as_f64().unwrap(), flops, "{case}");
    let results = case["results"].as_array().unwrap();
    let flash = results.iter().find(|r| r["impl"] == "flash").unwrap();
    assert_eq!(flash["status"], "ok", "{flash}");
    assert!(flash["max_abs_err"].as_f64().unwrap() <= 1e-4, "{flash}");
    assert_eq!(flash["flops"].as_f64().unwrap(), flops, "{flash}");
    // The output is [1, 24, 2, 128] f32.
    assert_eq!(flash["gpu_bytes"], 24 * 2 * 128 * 4, "{flash}");
    let backward = results.iter().find(|r| r["impl"] == "backward").unwrap();
    assert_eq!(backward["status"], "ok", "{backward}");
    assert!(
        backward["max_abs_err"].as_f64().unwrap() <= 1e-4,
        "{backward}"
    );

    // Past 256 the backward is a row of its own, not a failed run.
    let output = flash_bench(&[
        "run",
        "--seq-q",
        "8",
        "--heads-q",
        "1",
        "--head-dim",
        "320",
        "--backward",
        "--iters",
        "1",
        "--json",
        json.to_str().unwrap(),
    ]);
    assert_eq!(output.status.code(), Some(0), "{}", stdout(&output));
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let results = report["cases"][0]["results"].as_array().unwrap();
    let backward = results.iter().find(|r| r["impl"] == "backward").unwrap();
    assert_eq!(backward["status"], "skipped", "{backward}");
    assert!(
        backward["note"]
            .as_str()
            .unwrap()
            .contains("unsupported by the GPU backward"),
        "{backward}"
    );
}

#[test]
fn run_refuses_an_unsupported_value_head_dim_in_one_line() {
    let Some(_) = gpu() else { return };
    let output = flash_bench(&[
        "run",
        "--seq-q",
        "16",
        "--heads-q",
        "1",
        "--head-dim",
        "8",
        "--head-dim-v",
        "100",
        "--iters",
        "1",
    ]);
    assert_one_line_error(&output, "head dim 100");
}

/// A case held to the bound of weights rounded to f16: its tolerance is
/// the f32 one plus 2^-11 of the largest |v|, which for the tens of
/// thousands of N(0, 1) draws of these tests' shapes is 3 to 6.
fn assert_weights_bound(case: &serde_json::Value) {
    let tolerance = case["tolerance"].as_f64().unwrap();
    let unit = 2f64.powi(-11);
    assert!(
        tolerance > 1e-4 + 3.0 * unit && tolerance < 1e-4 + 6.0 * unit,
        "{case}"
    );
}

/// `--tier blocked,blocked-f16` times the register-blocked kernel with f32
/// and with f16 products in one run, the second held to the bound of
/// weights rounded to f16 (1e-4 plus 2^-11 of the largest |v|, beyond the
/// output's rounding) and reported as such; an adapter without SHADER_F16
/// skips it with the reason.
#[test]
fn run_compares_f16_products_with_f32_arithmetic() {
    let Some(gpu) = gpu() else { return };
    let (output, report) = json_report(
        "f16-products.json",
        &[
            "run",
            "--seq-q",
            "48",
            "--heads-q",
            "4",
            "--head-dim",
            "64",
            "--dtype",
            "f16",
            "--tier",
            "blocked,blocked-f16",
            "--iters",
            "1",
        ],
    );
    let cases = report["cases"].as_array().unwrap();
    for case in cases {
        assert_eq!(case["passed"], true, "{case}");
        assert_eq!(case["tier"], "RegisterBlocked", "{case}");
    }
    if !gpu.info().has_f16() {
        assert_eq!(cases.len(), 1);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            stderr.contains("skipped") && stderr.contains("SHADER_F16"),
            "{stderr}"
        );
        return;
    }
    assert_eq!(cases.len(), 2);
    assert_eq!(cases[0]["options"]["f16_products"], false);
    assert_eq!(cases[0]["f16_products"], false);
    assert_eq!(cases[0]["tolerance"], 1e-4);
    let products = &cases[1];
    assert_eq!(products["options"]["f16_products"], true);
    assert_eq!(products["f16_products"], true);
    assert!(products["name"].as_str().unwrap().ends_with("f16-products"));
    assert_weights_bound(products);
}

/// An f16 case on the default tier passes, held to the bound of the kernel
/// it runs: where that kernel rounds the weights to f16 before `P V`
/// (cooperative matrices, as in CI's Mesa 26.1 pass, or f16 products) the
/// tolerance adds 2^-11 of the largest |v|, elsewhere it is the plain 1e-4
/// (both beyond the output's own rounding). Such a case at N=64 is off by
/// ~4.8e-4 on lavapipe's matrices: the plain tolerance called it FAILED.
#[test]
fn run_holds_f16_cases_to_their_kernels_bound() {
    let Some(_) = gpu() else { return };
    let (_, report) = json_report(
        "f16-default.json",
        &[
            "run",
            "--seq-q",
            "64",
            "--heads-q",
            "8",
            "--head-dim",
            "64",
            "--dtype",
            "f16",
            "--iters",
            "1",
        ],
    );
    let cases = report["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 1);
    let case = &cases[0];
    assert_eq!(case["passed"], true, "{case}");
    let tolerance = case["tolerance"].as_f64().unwrap();
    if case["tier"] == "CooperativeMatrix" || case["f16_products"] == true {
        assert_weights_bound(case);
    } else {
        assert_eq!(tolerance, 1e-4, "{case}");
    }
}

/// `run --blocked-layout` times each register-blocked layout as a case of
/// its own (validated like any other), after the planner's choice; a layout
/// the adapter cannot hold is reported and skipped, one outside the
/// kernel's range is a bad flag (exit 2).
#[test]
fn run_times_register_blocked_layouts() {
    let Some(_) = gpu() else { return };
    let json = scratch("layouts.json");
    let output = flash_bench(&[
        "run",
        "--seq-q",
        "40",
        "--heads-q",
        "4",
        "--head-dim",
        "32",
        "--causal",
        "--blocked-layout",
        "4x4x2,256x256x1,2x8x3",
        "--iters",
        "1",
        "--json",
        json.to_str().unwrap(),
    ]);
    assert_eq!(output.status.code(), Some(0), "{}", stdout(&output));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("skipped: register-blocked layout 256x256x1"),
        "{stderr}"
    );
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let cases = report["cases"].as_array().unwrap();
    let layouts: Vec<&serde_json::Value> = cases
        .iter()
        .map(|c| &c["options"]["blocked_layout"])
        .collect();
    assert_eq!(
        layouts,
        [&serde_json::Value::Null, &"4x4x2".into(), &"2x8x3".into()]
    );
    for case in &cases[1..] {
        assert_eq!(case["passed"], true, "{case}");
        assert_eq!(case["tier"], "RegisterBlocked", "{case}");
    }
    let output = flash_bench(&["run", "--seq-q", "8", "--blocked-layout", "8x8x9"]);
    assert_eq!(output.status.code(), Some(2), "{}", stdout(&output));
    assert!(String::from_utf8_lossy(&output.stderr).contains("rows must be 1 to 8"));
}

/// `run --tier blocked-f16 --blocked-layout L` times L with f16 products,
/// whose f16 tiles let a layout too large in f32 fit (16x8x4 at d=128 on
/// lavapipe's 32 KiB: its f32 Q block alone is 33 KiB, so no tile passes
/// help); `--tier blocked` times it without, or skips it with the reason
/// where its f32 tiles do not fit.
#[test]
fn run_layouts_take_f16_products_from_the_listed_tier() {
    let Some(gpu) = gpu() else { return };
    let shape = AttentionShape::self_attention(1, 48, 2, 128);
    let layout = BlockedLayout {
        row_lanes: 16,
        key_lanes: 8,
        rows: 4,
    };
    let fits = |products| {
        let config = AttentionConfig::new()
            .blocked_layout(layout)
            .f16_products(products);
        ForwardPlan::for_config(gpu.info(), &shape, DType::F16, &config).is_ok()
    };
    for (tier, products) in [("blocked-f16", true), ("blocked", false)] {
        if products && !gpu.info().has_f16() {
            eprintln!(
                "SKIPPED: --tier blocked-f16 on {}: it lacks SHADER_F16",
                gpu.info().summary()
            );
            continue;
        }
        let (output, report) = json_report(
            &format!("layout-{tier}.json"),
            &[
                "run",
                "--seq-q",
                "48",
                "--heads-q",
                "2",
                "--head-dim",
                "128",
                "--dtype",
                "f16",
                "--tier",
                tier,
                "--blocked-layout",
                "16x8x4",
                "--iters",
                "1",
            ],
        );
        let cases = report["cases"].as_array().unwrap();
        let timed: Vec<&serde_json::Value> = cases
            .iter()
            .filter(|c| c["options"]["blocked_layout"] == "16x8x4")
            .collect();
        assert_eq!(
            timed.len(),
            usize::from(fits(products)),
            "{tier}: {cases:?}"
        );
        match timed.first() {
            Some(case) => {
                assert_eq!(case["passed"], true, "{case}");
                assert_eq!(case["f16_products"], products, "{case}");
                let name = case["name"].as_str().unwrap();
                assert_eq!(name.ends_with("16x8x4 f16-products"), products, "{name}");
            }
            None => {
                let stderr = String::from_utf8_lossy(&output.stderr);
                assert!(
                    stderr.contains("skipped: register-blocked layout 16x8x4")
                        && stderr.contains("workgroup memory"),
                    "{stderr}"
                );
            }
        }
    }
    // On lavapipe the two differ: only f16 tiles fit.
    if gpu.info().has_f16() && gpu.info().limits.max_compute_workgroup_storage_size == 32 * 1024 {
        assert!(fits(true) && !fits(false));
    }
}

/// `run --tier a,b,c` measures each tier in one run (one validated case
/// each), reporting a listed tier the adapter lacks instead of failing;
/// `info` prints the planner's tier per head dim and storage type.
#[test]
fn run_compares_listed_tiers_and_info_names_them() {
    let Some(gpu) = gpu() else { return };
    // The run's shape, in f32 (flash-bench's default storage).
    let run_shape = AttentionShape {
        batch: 1,
        seq_q: 40,
        seq_kv: 40,
        heads_q: 8,
        heads_kv: 2,
        head_dim: 32,
        head_dim_v: 32,
    };
    let [seq, heads_q, heads_kv, head_dim] = [
        run_shape.seq_q,
        run_shape.heads_q,
        run_shape.heads_kv,
        run_shape.head_dim,
    ]
    .map(|n| n.to_string());
    let (output, report) = json_report(
        "tiers.json",
        &[
            "run",
            "--seq-q",
            &seq,
            "--heads-q",
            &heads_q,
            "--heads-kv",
            &heads_kv,
            "--head-dim",
            &head_dim,
            "--causal",
            "--tier",
            "portable,blocked,coop",
            "--iters",
            "1",
        ],
    );
    let tiers: Vec<&str> = report["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|case| {
            assert_eq!(case["passed"], true, "{case}");
            case["tier"].as_str().unwrap()
        })
        .collect();
    // The tier runs in f32 where the device multiplies f32 matrices
    // (emulated, Apple's), not on f16-only matrix units.
    let has_coop = wgpu_flash_attn::ForwardPlan::for_call(
        gpu.info(),
        &run_shape,
        wgpu_flash_attn::DType::F32,
        Some(wgpu_flash_attn::Tier::CooperativeMatrix),
    )
    .is_ok();
    if has_coop {
        assert_eq!(tiers, ["Portable", "RegisterBlocked", "CooperativeMatrix"]);
    } else {
        assert_eq!(tiers, ["Portable", "RegisterBlocked"]);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            stderr.contains("skipped") && stderr.contains("CooperativeMatrix"),
            "{stderr}"
        );
    }

    let output = flash_bench(&["info"]);
    assert_eq!(output.status.code(), Some(0), "{}", stdout(&output));
    let text = stdout(&output);
    let plan = wgpu_flash_attn::ForwardPlan::new(
        gpu.info(),
        &AttentionShape::self_attention(1, 4096, 8, 64),
    )
    .unwrap();
    assert!(text.contains("forward tiers"), "{text}");
    // f32's line (storage types that plan alike share it).
    let line = text
        .lines()
        .find(|line| line.trim_start().starts_with("d=64 f32"))
        .unwrap_or_else(|| panic!("no d=64 f32 line in {text}"));
    assert!(line.contains(&format!(": {:?} (", plan.tier())), "{line}");
    // The backward's d=64 line: its default tier, and the layout forcing
    // the register-blocked passes gives.
    let shape = AttentionShape::self_attention(1, 4096, 8, 64);
    let default = wgpu_flash_attn::BackwardPlan::for_call(
        gpu.info(),
        &shape,
        wgpu_flash_attn::DType::F32,
        None,
    );
    let forced = Some(wgpu_flash_attn::Tier::RegisterBlocked);
    let blocked = wgpu_flash_attn::BackwardPlan::for_call(
        gpu.info(),
        &shape,
        wgpu_flash_attn::DType::F32,
        forced,
    )
    .unwrap()
    .blocked_tiling()
    .unwrap();
    let line = text
        .lines()
        .find(|line| line.trim_start().starts_with("d=64:"))
        .unwrap_or_else(|| panic!("no backward d=64 line in {text}"));
    assert!(
        line.contains(&format!(": {:?} (", default.unwrap().tier()))
            && line.contains(&format!(
                "forced RegisterBlocked: {}x{}x{} (",
                blocked.row_lanes, blocked.key_lanes, blocked.rows
            )),
        "{line}"
    );
    // MLA's decode line: the planner's rows per workgroup, row tiles and
    // key splits.
    let cache = wgpu_flash_attn::CacheShape {
        batch: 1,
        heads_kv: 1,
        head_dim: 576,
        head_dim_v: 512,
        longest: 32768,
        segments: 1,
        dtype: wgpu_flash_attn::KvDType::F16,
    };
    let mla = wgpu_flash_attn::DecodePlan::for_call(
        gpu.info(),
        &cache,
        1,
        128,
        &wgpu_flash_attn::DecodeOptions::default(),
    )
    .unwrap();
    let line = text
        .lines()
        .find(|line| line.trim_start().starts_with("DeepSeek-V3 MLA"))
        .unwrap_or_else(|| panic!("no MLA decode line in {text}"));
    assert!(
        line.contains(&format!(": {:?}, ", mla.tier()))
            && line.contains(&format!(
                ", {} query rows per workgroup x {} per KV head, {} splits of {} keys",
                mla.rows_per_workgroup, mla.row_tiles, mla.splits, mla.split_keys
            )),
        "{line}"
    );
}

/// The smallest power of two from `from` up that `is_past` (a limit of the
/// adapter), if one is at most 2^22.
fn first_seq_past(from: usize, is_past: impl Fn(usize) -> bool) -> Option<usize> {
    (from.trailing_zeros()..=22)
        .map(|log2| 1usize << log2)
        .find(|&seq| is_past(seq))
}

/// `n` bytes as flash-bench prints sizes ("128.1 MiB", "4.0 GiB").
fn printed_bytes(n: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let power = (0..units.len() as u32 - 1)
        .rev()
        .find(|&p| n >= 1 << (10 * p))
        .unwrap_or(0);
    match power {
        0 => format!("{n} B"),
        _ => format!(
            "{:.1} {}",
            n as f64 / (1u64 << (10 * power)) as f64,
            units[power as usize]
        ),
    }
}

/// Runs `flash-bench run --impl naive` on `args`, asserts it exits 0 with
/// the case passed, and returns the naive row.
fn naive_row(json_name: &str, args: &[&str]) -> serde_json::Value {
    let mut args = [&["run", "--impl", "naive", "--iters", "1"], args].concat();
    let json = scratch(json_name);
    args.extend(["--json", json.to_str().unwrap()]);
    let output = flash_bench(&args);
    assert_eq!(output.status.code(), Some(0), "{}", stdout(&output));
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let case = &report["cases"][0];
    assert_eq!(case["passed"], true, "{case}");
    let results = case["results"].as_array().unwrap();
    assert_eq!(results.len(), 1, "{case}");
    assert_eq!(results[0]["impl"], "naive", "{case}");
    results[0].clone()
}

/// A naive baseline that cannot run is its row's "does not fit", with the
/// numbers, and the run goes on (exit 0): a score matrix past one binding,
/// and K past one binding (the naive kernel binds K and V whole; the flash
/// forward runs such keys in chunks).
#[test]
fn run_reports_a_naive_baseline_past_the_binding_as_does_not_fit() {
    let Some(gpu) = gpu() else { return };
    let limits = &gpu.info().limits;
    let binding = limits
        .max_storage_buffer_binding_size
        .min(limits.max_buffer_size);

    let head_dim = 32;
    let head_dim_arg = head_dim.to_string();

    // One head's score matrix (seq x seq f32) past the binding.
    let square = |seq: usize| AttentionShape::self_attention(1, seq, 1, head_dim);
    let seq = first_seq_past(1024, |seq| {
        matches!(
            NaivePlan::new(gpu.info(), &square(seq)),
            Err(Error::ScoresTooLarge { .. })
        )
    })
    .expect("a score matrix of at most 2^22 squared f32 is past the binding");
    let seq_arg = seq.to_string();
    let naive = naive_row(
        "naive-scores.json",
        &[
            "--seq-q",
            &seq_arg,
            "--heads-q",
            "1",
            "--head-dim",
            &head_dim_arg,
        ],
    );
    assert_eq!(naive["status"], "does_not_fit", "{naive}");
    assert!(naive["median_ms"].is_null(), "{naive}");
    let matrix = (seq * seq * 4) as u64;
    let note = naive["note"].as_str().unwrap();
    assert!(
        note.starts_with(&format!(
            "score matrix needs {} per head",
            printed_bytes(matrix)
        )) && note.ends_with(&format!(
            "over the {} binding limit",
            printed_bytes(binding)
        )),
        "{note}"
    );
    // The row still says what the call would allocate: O and the matrix.
    assert_eq!(
        naive["gpu_bytes"].as_u64(),
        Some(matrix + (seq * head_dim * 4) as u64),
        "{naive}"
    );
    assert!(matrix > binding);

    // One query over keys whose K (and V) are past the binding.
    // 1024 keys (128 KiB) past the binding.
    let seq_kv = binding as usize / (head_dim * 4) + 1024;
    let k_bytes = seq_kv * head_dim * 4;
    if k_bytes > 1 << 30 {
        eprintln!(
            "SKIPPED: K past this adapter's {binding}-byte binding would take over 1 GiB \
             of host memory per tensor"
        );
        return;
    }
    let seq_kv_arg = seq_kv.to_string();
    let naive = naive_row(
        "naive-kv.json",
        &[
            "--seq-q",
            "1",
            "--seq-kv",
            &seq_kv_arg,
            "--heads-q",
            "1",
            "--head-dim",
            &head_dim_arg,
        ],
    );
    assert_eq!(naive["status"], "does_not_fit", "{naive}");
    let note = naive["note"].as_str().unwrap();
    assert!(
        note == format!(
            "k is {}, over the {} binding limit",
            printed_bytes(k_bytes as u64),
            printed_bytes(binding)
        ),
        "{note}"
    );
}

/// `shader-stats` compiles each kernel asked for on a second Vulkan device,
/// as wgpu's SPIR-V and without its runtime checks, and prints what the
/// driver reports (lavapipe reports no statistics: the kernels must still
/// compile); off Vulkan it is an error naming the backend.
#[test]
fn shader_stats_compiles_every_kernel_asked_for() {
    let Some(gpu) = gpu() else { return };
    let out_dir = scratch("kernels");
    let output = flash_bench(&[
        "shader-stats",
        "--out-dir",
        out_dir.to_str().unwrap(),
        "--seq-q",
        "40",
        "--head-dim",
        "32",
        "--tier",
        "blocked,portable",
        "--blocked-layout",
        "4x4x2,256x256x1",
    ]);
    let text = stdout(&output);
    if gpu.info().adapter.backend != wgpu::Backend::Vulkan {
        assert_eq!(output.status.code(), Some(2), "{text}");
        assert!(String::from_utf8_lossy(&output.stderr).contains("asks a Vulkan driver"));
        return;
    }
    assert_eq!(output.status.code(), Some(0), "{text}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("skipped: register-blocked layout 256x256x1"),
        "{stderr}"
    );
    let kernels: Vec<&str> = text.split("\n== ").skip(1).collect();
    let names: Vec<&str> = kernels
        .iter()
        .map(|k| k.split(':').next().unwrap())
        .collect();
    assert_eq!(
        names,
        ["RegisterBlocked", "Portable", "RegisterBlocked 4x4x2"]
    );
    // The kernels' text and SPIR-V, as written for other tools.
    assert_kernel_files(
        &out_dir,
        &["RegisterBlocked", "Portable", "RegisterBlocked-4x4x2"],
    );
    for kernel in kernels {
        for variant in ["  checked", "  default (without loops)"] {
            let lines: Vec<&str> = kernel
                .lines()
                .filter(|line| {
                    line.starts_with(&format!("{variant}:"))
                        || line.starts_with(&format!("{variant} "))
                })
                .collect();
            assert!(!lines.is_empty(), "no {variant} line: {kernel}");
            for line in lines {
                // Either compiled without statistics, or statistics.
                assert!(line.contains("compiled (") || line.contains('='), "{line}");
            }
        }
    }
}

/// `--shader-dir` compiles the kernels from the directory's same-named
/// WGSL files: a copy of the register-blocked kernel validates like the
/// built-in one; a broken copy is the run's error, with the compiler's
/// message; a file the crate does not have is a bad flag (exit 2).
#[test]
fn shader_dir_replaces_the_crates_wgsl_files() {
    let Some(_) = gpu() else { return };
    let dir = |name: &str, file: &str, text: &str| {
        let dir = scratch(name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(file), text).unwrap();
        dir
    };
    let kernel = include_str!("../shaders/flash_blocked.wgsl");
    let run = |dir: &Path| {
        flash_bench(&[
            "--shader-dir",
            dir.to_str().unwrap(),
            "run",
            "--seq-q",
            "40",
            "--head-dim",
            "32",
            "--tier",
            "blocked",
            "--iters",
            "1",
        ])
    };
    let copy = run(&dir(
        "copy",
        "flash_blocked.wgsl",
        &format!("{kernel}// a copy\n"),
    ));
    assert_eq!(copy.status.code(), Some(0), "{}", stdout(&copy));
    assert!(
        String::from_utf8_lossy(&copy.stderr).contains("with flash_blocked.wgsl replaced"),
        "{}",
        stdout(&copy)
    );
    assert!(stdout(&copy).contains(" ok"), "{}", stdout(&copy));
    let cut = kernel.len() / 2;
    let broken = run(&dir("broken", "flash_blocked.wgsl", &kernel[..cut]));
    assert_eq!(broken.status.code(), Some(2), "{}", stdout(&broken));
    assert!(
        String::from_utf8_lossy(&broken.stderr).contains("flash_blocked.wgsl:main"),
        "{}",
        stdout(&broken)
    );
    let unknown = run(&dir("unknown", "tuned.wgsl", kernel));
    assert_eq!(unknown.status.code(), Some(2), "{}", stdout(&unknown));
    assert!(
        String::from_utf8_lossy(&unknown.stderr)
            .contains("\"tuned.wgsl\" is not one of the crate's shader files"),
        "{}",
        stdout(&unknown)
    );
}

/// Each kernel's WGSL (with its entry point) and SPIR-V (with every
/// runtime check, and as the crate compiles it by default: without the
/// loop counters; starting with SPIR-V's magic number), as `shader-stats
/// --out-dir` writes them for other tools.
fn assert_kernel_files(out_dir: &Path, stems: &[&str]) {
    for stem in stems {
        let wgsl = std::fs::read_to_string(out_dir.join(format!("{stem}.wgsl"))).unwrap();
        assert!(wgsl.contains("fn main("), "{stem}.wgsl");
        let mut sizes = Vec::new();
        for suffix in ["", "-without-loops"] {
            let spirv = std::fs::read(out_dir.join(format!("{stem}{suffix}.spv"))).unwrap();
            assert_eq!(
                spirv[..4],
                0x0723_0203u32.to_le_bytes(),
                "{stem}{suffix}.spv"
            );
            sizes.push(spirv.len());
        }
        // Every kernel here has loops: their counters are gone by default.
        assert!(sizes[1] < sizes[0], "{stem}: SPIR-V {sizes:?} bytes");
    }
}

/// `shader-stats --decode-lanes` compiles decoding's kernel for each lane
/// layout asked for, and only those (no forward kernel was asked for); a
/// layout the adapter cannot hold is reported and skipped.
#[test]
fn shader_stats_compiles_the_decode_layouts_asked_for() {
    let Some(gpu) = gpu() else { return };
    let backend = gpu.info().adapter.backend;
    if backend != wgpu::Backend::Vulkan {
        // (shader_stats_compiles_every_kernel_asked_for checks the error.)
        eprintln!("SKIPPED: shader-stats asks a Vulkan driver; this pass runs on {backend:?}");
        return;
    }
    let out_dir = scratch("decode-kernels");
    // Llama-3.1-70B's decode step at two KV heads, over an int8 cache.
    let output = flash_bench(&[
        "shader-stats",
        "--out-dir",
        out_dir.to_str().unwrap(),
        "--seq-q",
        "1",
        "--seq-kv",
        "4096",
        "--heads-q",
        "16",
        "--heads-kv",
        "2",
        "--head-dim",
        "128",
        "--kv-dtype",
        "int8",
        "--decode-lanes",
        "head-dim,keys",
    ]);
    let text = stdout(&output);
    assert_eq!(output.status.code(), Some(0), "{text}");
    let headers: Vec<&str> = text.lines().filter(|l| l.starts_with("== ")).collect();
    assert_eq!(headers.len(), 2, "{text}");
    for (header, (name, variant)) in headers.iter().zip([
        ("decode head-dim:", "SUBGROUP_KV"),
        ("decode keys:", "KEY_LANES"),
    ]) {
        assert!(header.starts_with(&format!("== {name}")), "{text}");
        assert!(header.contains(variant), "{text}");
    }
    assert_kernel_files(&out_dir, &["decode-head-dim", "decode-keys"]);

    // MLA's 576-wide latent with key tiles needs more workgroup memory than
    // lavapipe has: skipped with the planner's reason, and as nothing else
    // was asked for, exit 2.
    let mla = flash_bench(&[
        "shader-stats",
        "--seq-q",
        "1",
        "--seq-kv",
        "1024",
        "--heads-q",
        "16",
        "--heads-kv",
        "1",
        "--head-dim",
        "576",
        "--head-dim-v",
        "512",
        "--decode-lanes",
        "key-tiles",
    ]);
    let stderr = String::from_utf8_lossy(&mla.stderr);
    assert_eq!(mla.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("skipped: decode lanes KeyTiles"),
        "{stderr}"
    );
    assert!(stderr.contains("workgroup memory"), "{stderr}");
}
