//! `flash-bench check FILE.safetensors`: runs the GPU kernel on a user's own
//! q, k, v and compares it with their expected `out` and with the f64
//! reference; with `--backward`, also the gradients given their `do`. A
//! `sinks` tensor in the file is applied as the call's attention sinks. V
//! may have a head dim of its own (`head_dim_v`, e.g. 128 beside q and k's
//! 192); `out` then has it too.

use std::path::PathBuf;

use anyhow::{Context, Result, anyhow, bail};
use clap::Args;
use half::{bf16, f16};
use safetensors::{Dtype, SafeTensors, tensor::TensorView};
use serde::Serialize;
use wgpu_flash_attn::{AttentionConfig, AttentionShape, Gpu, reference};

use crate::options::AttentionFlags;
use crate::options_json::OptionsJson;
use crate::report::{AdapterJson, write_json};

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// safetensors file with `q`, `k` ([batch, seq, heads, head_dim]) and
    /// `v` (shaped like k but for its last dim, head_dim_v, which may
    /// differ), F32, F16 or BF16; optionally the expected `out` ([batch,
    /// seq_q, heads_q, head_dim_v]), and optionally `sinks` (`[heads_q]`: one
    /// attention-sink logit per query head, applied to the GPU call and
    /// the reference alike).
    pub file: PathBuf,
    #[command(flatten)]
    pub flags: AttentionFlags,
    /// Write the GPU output as F32 tensor `out` ([batch, seq_q, heads_q,
    /// head_dim_v]) to this safetensors file.
    #[arg(long, value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// Largest accepted |difference|, for both comparisons (default: 1e-4
    /// against the reference; against `out`, 1e-4 / 2e-3 / 1.6e-2 for the
    /// coarsest of F32 / F16 / BF16 among the file's tensors).
    #[arg(long, value_parser = parse_atol)]
    pub atol: Option<f64>,
    /// Also run the backward: the file has `do` (the output's gradient,
    /// shaped like `out`) and optionally the expected `dq`, `dk`, `dv`; each
    /// gradient is compared with the f64 reference backward and the file's,
    /// with the tolerance scaled by the largest reference gradient (at
    /// least 1). With `sinks`, also their gradient `dsinks` (`[heads_q]`,
    /// optionally expected in the file). `--output` then also writes `dq`,
    /// `dk`, `dv` (and `dsinks` with sinks). The GPU backward takes head
    /// dims up to 256 (q/k and v each).
    #[arg(long)]
    pub backward: bool,
}

/// A tensor widened to f32, with the dtype it was stored in.
struct HostTensor {
    dtype: Dtype,
    shape: [usize; 4],
    data: Vec<f32>,
}

fn read_tensor(file: &SafeTensors<'_>, name: &str) -> Result<Option<HostTensor>> {
    let Some(view) = find_tensor(file, name)? else {
        return Ok(None);
    };
    let shape: [usize; 4] = view.shape().try_into().map_err(|_| {
        anyhow!(
            "tensor {name} has shape {:?}; expected 4 dimensions [batch, seq, heads, head_dim]",
            view.shape()
        )
    })?;
    Ok(Some(HostTensor {
        dtype: view.dtype(),
        shape,
        data: widen(name, &view)?,
    }))
}

/// A 1-d tensor of one value per query head (`sinks`, `dsinks`), widened
/// to f32, with the dtype it was stored in.
struct HeadVector {
    dtype: Dtype,
    data: Vec<f32>,
}

fn read_head_vector(
    file: &SafeTensors<'_>,
    name: &str,
    heads_q: usize,
) -> Result<Option<HeadVector>> {
    let Some(view) = find_tensor(file, name)? else {
        return Ok(None);
    };
    if view.shape() != [heads_q] {
        bail!(
            "tensor {name} has shape {:?}; expected [{heads_q}], one value per query head",
            view.shape()
        );
    }
    Ok(Some(HeadVector {
        dtype: view.dtype(),
        data: widen(name, &view)?,
    }))
}

fn find_tensor<'data>(file: &SafeTensors<'data>, name: &str) -> Result<Option<TensorView<'data>>> {
    match file.tensor(name) {
        Ok(view) => Ok(Some(view)),
        Err(safetensors::SafeTensorError::TensorNotFound(_)) => Ok(None),
        Err(err) => Err(anyhow!("tensor {name}: {err}")),
    }
}

/// The tensor's values as f32 (exact for F16 and BF16).
/// A tolerance: finite and at least 0 (an infinite one would accept NaN
/// results, whose error is infinite).
fn parse_atol(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(x) if x.is_finite() && x >= 0.0 => Ok(x),
        Ok(x) => Err(format!("{x}: a tolerance is finite and >= 0")),
        Err(e) => Err(format!("{text:?}: {e}")),
    }
}

/// The tensor's values as f32; a NaN or infinity is refused (attention of
/// such inputs, or a comparison with such a result, says nothing).
fn widen(name: &str, view: &TensorView<'_>) -> Result<Vec<f32>> {
    let values = widen_values(name, view)?;
    if let Some((index, x)) = values.iter().enumerate().find(|(_, x)| !x.is_finite()) {
        bail!("tensor {name} holds {x} at element {index}; every value must be finite");
    }
    Ok(values)
}

fn widen_values(name: &str, view: &TensorView<'_>) -> Result<Vec<f32>> {
    let bytes = view.data();
    Ok(match view.dtype() {
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        other => bail!("tensor {name} is {other:?}; expected F32, F16 or BF16"),
    })
}

/// Default tolerance against a result stored in `dtype`.
fn storage_tolerance(dtype: Dtype) -> f64 {
    match dtype {
        Dtype::F16 => 2e-3,
        Dtype::BF16 => 1.6e-2,
        _ => 1e-4,
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    pub max_abs_err: f64,
    pub rel_l2_err: f64,
    pub atol: f64,
    pub passed: bool,
}

fn compare(got: &[f32], want: impl Iterator<Item = f64>, atol: f64) -> Comparison {
    let (mut max_abs, mut diff2, mut norm2) = (0.0f64, 0.0f64, 0.0f64);
    for (g, w) in got.iter().zip(want) {
        let d = f64::from(*g) - w;
        // A NaN anywhere must fail: fold it in as an infinite error.
        max_abs = if d.is_nan() {
            f64::INFINITY
        } else {
            max_abs.max(d.abs())
        };
        diff2 += d * d;
        norm2 += w * w;
    }
    let rel_l2_err = if norm2 > 0.0 {
        (diff2 / norm2).sqrt()
    } else {
        diff2.sqrt()
    };
    Comparison {
        max_abs_err: max_abs,
        rel_l2_err,
        atol,
        passed: max_abs <= atol,
    }
}

/// One gradient's comparisons (`--backward`).
#[derive(Debug, Clone, Serialize)]
struct GradientCheck {
    name: &'static str,
    vs_reference: Comparison,
    vs_file: Option<Comparison>,
}

#[derive(Debug, Clone, Serialize)]
struct CheckReport {
    file: String,
    adapter: AdapterJson,
    shape: AttentionShape,
    dtypes: Vec<String>,
    options: OptionsJson,
    vs_reference: Comparison,
    vs_file_out: Option<Comparison>,
    /// With `--backward`: dq, dk and dv, then dsinks when the file has sinks.
    gradients: Vec<GradientCheck>,
    passed: bool,
}

/// Bad input and failures to run are errors (exit 2); `Ok(false)` means a
/// result outside the tolerance (exit 1).
pub fn run(gpu: &Gpu, args: &CheckArgs, json: Option<&std::path::Path>) -> Result<bool> {
    let bytes =
        std::fs::read(&args.file).with_context(|| format!("reading {}", args.file.display()))?;
    let file = SafeTensors::deserialize(&bytes)
        .map_err(|e| anyhow!("{}: not a safetensors file: {e}", args.file.display()))?;
    let required = |name| {
        read_tensor(&file, name)?
            .ok_or_else(|| anyhow!("{}: no tensor named {name:?}", args.file.display()))
    };
    let (q, k, v) = (required("q")?, required("k")?, required("v")?);
    let expected = read_tensor(&file, "out")?;
    if k.shape[..3] != v.shape[..3] {
        bail!(
            "k is {:?} but v is {:?}; batch, seq and heads must match (head dims may differ)",
            k.shape,
            v.shape
        );
    }
    let shape = AttentionShape {
        batch: q.shape[0],
        seq_q: q.shape[1],
        heads_q: q.shape[2],
        head_dim: q.shape[3],
        head_dim_v: v.shape[3],
        seq_kv: k.shape[1],
        heads_kv: k.shape[2],
    };
    if k.shape[0] != shape.batch || k.shape[3] != shape.head_dim {
        bail!(
            "q is {:?} and k is {:?}: batch and head_dim must match",
            q.shape,
            k.shape
        );
    }
    let o_dims = shape.o_shape().as_array();
    if let Some(out) = &expected
        && out.shape != o_dims
    {
        bail!(
            "out is {:?}; it must be {o_dims:?} ([batch, seq_q, heads_q] of q, head dim of v)",
            out.shape
        );
    }
    let sinks = read_head_vector(&file, "sinks", shape.heads_q)?;
    let mut config = args.flags.config();
    if let Some(sinks) = &sinks {
        config = config.sinks(sinks.data.clone());
    }
    if args.backward {
        // Refused before the forward runs: head dims over 256.
        if let Err(err @ wgpu_flash_attn::Error::HeadDimUnsupported { .. }) =
            wgpu_flash_attn::BackwardPlan::for_call(
                gpu.info(),
                &shape,
                wgpu_flash_attn::DType::F32,
                config.tier,
            )
        {
            bail!(
                "--backward: {err} (here q and k have head dim {}, v {})",
                shape.head_dim,
                shape.head_dim_v
            );
        }
    }
    // f16 and bf16 inputs widen to f32 exactly, so the GPU result is held
    // to f32 accuracy against the reference on the same values.
    let result = gpu.attention_host(&shape, &q.data, &k.data, &v.data, &config)?;
    let want = reference::attention(&shape, &q.data, &k.data, &v.data, &config)?;
    let gradients = if args.backward {
        check_gradients(gpu, &file, args, &shape, &config, [&q, &k, &v])?
    } else {
        Vec::new()
    };
    let sink_dtype = sinks.as_ref().map(|s| s.dtype);
    let vs_reference = compare(
        &result.out,
        want.out.iter().copied(),
        args.atol.unwrap_or(1e-4),
    );
    let vs_file_out = expected.as_ref().map(|out| {
        let coarsest = [q.dtype, k.dtype, v.dtype, out.dtype]
            .into_iter()
            .chain(sink_dtype)
            .map(storage_tolerance)
            .fold(0.0, f64::max);
        compare(
            &result.out,
            out.data.iter().map(|&x| f64::from(x)),
            args.atol.unwrap_or(coarsest),
        )
    });
    let dtypes: Vec<String> = [("q", q.dtype), ("k", k.dtype), ("v", v.dtype)]
        .into_iter()
        .chain(expected.as_ref().map(|o| ("out", o.dtype)))
        .chain(sink_dtype.map(|d| ("sinks", d)))
        .map(|(name, dtype)| format!("{name}: {dtype:?}"))
        .collect();

    println!("adapter: {}", gpu.info().summary());
    println!(
        "{}: {}{} ({}){}",
        args.file.display(),
        crate::options::case_name(&shape, &args.flags.describe()),
        if sinks.is_some() { " sinks" } else { "" },
        dtypes.join(", "),
        if expected.is_none() { ", no `out`" } else { "" }
    );
    let line = |what: &str, c: &Comparison| {
        println!(
            "{what:<22} max |err| {:.3e}  rel L2 {:.3e}  (atol {:.1e}) {}",
            c.max_abs_err,
            c.rel_l2_err,
            c.atol,
            if c.passed { "ok" } else { "OUTSIDE TOLERANCE" }
        );
    };
    line("GPU vs f64 reference", &vs_reference);
    if let Some(c) = &vs_file_out {
        line("GPU vs file's out", c);
    }
    for (gradient, _) in &gradients {
        line(
            &format!("{} vs f64 reference", gradient.name),
            &gradient.vs_reference,
        );
        if let Some(c) = &gradient.vs_file {
            line(&format!("{} vs file's", gradient.name), c);
        }
    }
    if let Some(path) = &args.output {
        let mut outputs = vec![("out", o_dims.to_vec(), &result.out)];
        for (gradient, data) in &gradients {
            let dims = match gradient.name {
                "dq" => q.shape.to_vec(),
                "dk" => k.shape.to_vec(),
                "dv" => v.shape.to_vec(),
                _ => vec![shape.heads_q],
            };
            outputs.push((gradient.name, dims, data));
        }
        let bytes: Vec<Vec<u8>> = outputs
            .iter()
            .map(|(_, _, data)| data.iter().flat_map(|x| x.to_le_bytes()).collect())
            .collect();
        let mut views = Vec::new();
        for ((name, dims, _), data) in outputs.iter().zip(&bytes) {
            let view = TensorView::new(Dtype::F32, dims.clone(), data)
                .map_err(|e| anyhow!("building the output tensor {name}: {e}"))?;
            views.push((*name, view));
        }
        let names: Vec<&str> = views.iter().map(|(name, _)| *name).collect();
        safetensors::serialize_to_file(views, None, path)
            .map_err(|e| anyhow!("writing {}: {e}", path.display()))?;
        println!(
            "wrote GPU results (F32 {}) to {}",
            names.join(", "),
            path.display()
        );
    }
    let passed = vs_reference.passed
        && vs_file_out.as_ref().is_none_or(|c| c.passed)
        && gradients
            .iter()
            .all(|(g, _)| g.vs_reference.passed && g.vs_file.as_ref().is_none_or(|c| c.passed));
    if let Some(path) = json {
        write_json(
            path,
            &CheckReport {
                file: args.file.display().to_string(),
                adapter: AdapterJson::of_device(gpu.info()),
                shape,
                dtypes,
                // The kernel runs on the inputs widened to f32.
                options: OptionsJson::new(&config, wgpu_flash_attn::DType::F32),
                vs_reference,
                vs_file_out,
                gradients: gradients.into_iter().map(|(g, _)| g).collect(),
                passed,
            },
        )?;
    }
    Ok(passed)
}

/// `--backward`: the GPU's dq, dk, dv (and dsinks when `config` has
/// sinks) for the file's `do` against the reference backward and the
/// file's expected gradients, each with the GPU's values (for `--output`).
fn check_gradients(
    gpu: &Gpu,
    file: &SafeTensors<'_>,
    args: &CheckArgs,
    shape: &AttentionShape,
    config: &AttentionConfig,
    [q, k, v]: [&HostTensor; 3],
) -> Result<Vec<(GradientCheck, Vec<f32>)>> {
    let d_out = read_tensor(file, "do")?.ok_or_else(|| {
        anyhow!(
            "{}: --backward needs a tensor named \"do\"",
            args.file.display()
        )
    })?;
    let o_dims = shape.o_shape().as_array();
    if d_out.shape != o_dims {
        bail!(
            "do is {:?}; it must be shaped like out {o_dims:?}",
            d_out.shape
        );
    }
    let expected_dsinks = read_head_vector(file, "dsinks", shape.heads_q)?;
    if expected_dsinks.is_some() && config.sinks.is_none() {
        bail!(
            "{}: the file has `dsinks` but no `sinks`",
            args.file.display()
        );
    }
    // The sinks' own storage type bounds the file's results like the inputs'.
    let sink_dtype = file.tensor("sinks").ok().map(|view| view.dtype());
    let got =
        gpu.attention_backward_host(shape, [&q.data, &k.data, &v.data, &d_out.data], config)?;
    let want = reference::attention_backward(
        shape,
        [&q.data, &k.data, &v.data, &d_out.data],
        config,
        None,
    )?;
    let mut gradients = Vec::new();
    for (name, got, want, like) in [
        ("dq", got.dq, &want.dq, q),
        ("dk", got.dk, &want.dk, k),
        ("dv", got.dv, &want.dv, v),
    ] {
        let expected = read_tensor(file, name)?;
        if let Some(expected) = &expected
            && expected.shape != like.shape
        {
            bail!(
                "{name} is {:?}; it must be {:?}",
                expected.shape,
                like.shape
            );
        }
        gradients.push((name, got, want, expected.map(|t| (t.dtype, t.data))));
    }
    if config.sinks.is_some() {
        let expected = expected_dsinks.map(|t| (t.dtype, t.data));
        gradients.push(("dsinks", got.dsinks, &want.dsinks, expected));
    }
    let mut checks = Vec::new();
    for (name, got, want, expected) in gradients {
        if got.len() != want.len() {
            bail!(
                "the GPU backward returned {} values of {name}; the reference {}",
                got.len(),
                want.len()
            );
        }
        // Gradients are not unit-scale: tolerances scale with the largest.
        let magnitude = want.iter().fold(1.0f64, |m, w| m.max(w.abs()));
        let vs_reference = compare(
            &got,
            want.iter().copied(),
            args.atol.unwrap_or(1e-4 * magnitude),
        );
        let vs_file = expected.as_ref().map(|(dtype, expected)| {
            let coarsest = [q.dtype, k.dtype, v.dtype, d_out.dtype, *dtype]
                .into_iter()
                .chain(sink_dtype)
                .map(storage_tolerance)
                .fold(0.0, f64::max);
            compare(
                &got,
                expected.iter().map(|&x| f64::from(x)),
                args.atol.unwrap_or(coarsest * magnitude),
            )
        });
        checks.push((
            GradientCheck {
                name,
                vs_reference,
                vs_file,
            },
            got,
        ));
    }
    Ok(checks)
}
