//! flash-bench: checks that attention is correct on this machine's adapter
//! and measures how close to the adapter's own ceilings it runs.
//!
//! `flash-bench` alone runs the suite (seed-model presets); `info`, `run`,
//! `sweep`, `check`, `decode` and `masks` are described by `flash-bench help`. Results go to
//! stdout, progress to stderr. Exit status: 0 when every result agrees with
//! the reference, 1 when one does not, 2 on bad input or when nothing could
//! run.

mod backward;
mod ceiling;
mod ceiling_kernels;
mod check;
mod compile_ahead;
mod decode;
mod info;
mod masks;
mod measure;
mod options;
mod options_json;
mod plot;
mod presets;
mod random;
mod report;
mod shader_files;
mod shader_stats;
mod timing;

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use wgpu_flash_attn::{AttentionShape, DType, ForwardPlan, Gpu};

use ceiling::CeilingProbes;
use measure::{Bench, CEILING_WORKGROUPS, Case};
use options::{AttentionFlags, DTypeArg, GlobalArgs, Impl, ShapeArgs, TierArg, case_name};
use presets::seed_models;
use report::{AdapterJson, Ceilings, Report};
use timing::TimingPlan;

#[derive(Debug, Parser)]
#[command(
    name = "flash-bench",
    version,
    about = "Validate and benchmark wgpu-flash-attn on this machine's GPU",
    long_about = "Validate and benchmark wgpu-flash-attn on this machine's GPU.\n\n\
                  Without a subcommand: the adapter, its measured FMA and copy ceilings, then \
                  the seed-model presets, each validated against the f64 CPU reference and \
                  timed with the flash kernel, the naive baseline and the CPU reference."
)]
struct Cli {
    #[command(flatten)]
    global: GlobalArgs,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// List every adapter wgpu finds, with the features and limits that matter.
    Info,
    /// Validate and time one configuration.
    Run(RunArgs),
    /// One shape or preset over a list of sequence lengths.
    Sweep(SweepArgs),
    /// Check the kernel against q, k, v (and expected out) from a safetensors file.
    Check(check::CheckArgs),
    /// One decode step over KV caches of several lengths (split-KV), against
    /// the prefill kernel and the copy ceiling.
    Decode(decode::DecodeCmdArgs),
    /// A BERT-base batch with padding and a Longformer layout at N=4096:
    /// valid lengths and block-sparse masks against dense boolean masks.
    Masks(masks::MasksArgs),
    /// What the Vulkan driver compiles the kernels into (registers, spills,
    /// instructions: the driver's pipeline statistics), per forward tier and
    /// register-blocked layout and per decode lane layout, with and without
    /// wgpu's runtime checks.
    ShaderStats(shader_stats::ShaderStatsArgs),
}

#[derive(Debug, Args)]
struct RunArgs {
    #[command(flatten)]
    shape: ShapeArgs,
    #[command(flatten)]
    flags: AttentionFlags,
    /// Storage type of Q, K, V and O (arithmetic is f32 in every case).
    #[arg(long, value_enum, default_value_t = DTypeArg::F32)]
    dtype: DTypeArg,
    #[arg(long = "impl", value_enum, default_value_t = Impl::Flash)]
    implementation: Impl,
    /// Force a kernel tier (default: the best this adapter offers); a
    /// comma-separated list runs the case once per tier, in one run
    /// (`--tier portable,blocked`).
    #[arg(long, value_enum, value_delimiter = ',')]
    tier: Vec<TierArg>,
    /// Register-blocked workgroup layouts to time, each a case of its own
    /// on that tier after the --tier cases: ROW_LANESxKEY_LANESxROWS, a
    /// comma-separated list (`--blocked-layout 16x8x2,8x8x4`); a layout the
    /// adapter cannot hold is reported and skipped. With f16 products where
    /// --tier lists blocked-f16 and not blocked, without where it lists
    /// blocked and not blocked-f16, else as the planner chooses (f16 tiles
    /// let larger layouts fit).
    #[arg(long, value_delimiter = ',', value_parser = crate::options::parse_layout)]
    blocked_layout: Vec<wgpu_flash_attn::BlockedLayout>,
    /// Cooperative-matrix blocks to time, each a case of its own on that
    /// tier after the --tier cases: ROW_TILESxKEY_TILES (matrix-sized
    /// tiles), a comma-separated list (`--coop-layout 4x4,4x2,2x4`); a
    /// block the adapter cannot hold is reported and skipped.
    #[arg(long, value_delimiter = ',', value_parser = crate::options::parse_coop_layout)]
    coop_layout: Vec<wgpu_flash_attn::CoopLayout>,
    /// Timed runs after the validating first run (at least 1).
    #[arg(long, default_value_t = 5, value_parser = crate::options::parse_iters)]
    iters: usize,
    /// Also time the backward pass (dQ, dK, dV) after the forward, and its
    /// ratio to the forward's time.
    #[arg(long)]
    backward: bool,
    /// Attention sinks: one seeded N(0, 1) logit per query head, in the
    /// forward, the reference it is validated against and (with
    /// --backward) the backward, whose sink gradients are validated too.
    #[arg(long)]
    sinks: bool,
    /// At most N keys per dispatch of the flash forward: longer key ranges
    /// run in chunks (as they do anyway past one storage binding or a
    /// software adapter's loop cap).
    #[arg(long, value_name = "N", value_parser = crate::options::parse_positive)]
    keys_per_dispatch: Option<usize>,
}

#[derive(Debug, Args)]
struct SweepArgs {
    /// A seed-model preset (substring of its name, e.g. "bert"); otherwise
    /// the shape flags.
    #[arg(long)]
    preset: Option<String>,
    #[command(flatten)]
    shape: ShapeArgs,
    #[command(flatten)]
    flags: AttentionFlags,
    /// Sequence lengths (queries and keys).
    #[arg(long, value_delimiter = ',', default_value = "512,1024,2048,4096")]
    seq: Vec<usize>,
    /// Implementations to compare.
    #[arg(
        long = "impl",
        value_enum,
        value_delimiter = ',',
        default_value = "flash,naive"
    )]
    implementations: Vec<Impl>,
    /// Timed runs (at least 1).
    #[arg(long, default_value_t = 3, value_parser = crate::options::parse_iters)]
    iters: usize,
}

/// The suite's CPU reference is timed only up to this many FLOPs (a few
/// seconds on two cores).
const SUITE_CPU_BUDGET: f64 = 1.5e9;
/// Copy ceiling buffer: well past CPU caches and most GPU L2s.
const COPY_BYTES: u64 = 256 << 20;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(&cli) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::from(2)
        }
    }
}

/// Refuses an output file whose directory does not exist before anything
/// runs (a long run would otherwise end in exit 2, hiding its results).
fn check_output_paths(cli: &Cli) -> Result<()> {
    let check_output = match &cli.command {
        Some(Command::Check(args)) => args.output.as_deref(),
        _ => None,
    };
    for path in [
        cli.global.json.as_deref(),
        cli.global.plot.as_deref(),
        check_output,
    ]
    .into_iter()
    .flatten()
    {
        let dir = path.parent().filter(|dir| !dir.as_os_str().is_empty());
        if let Some(dir) = dir.filter(|dir| !dir.is_dir()) {
            anyhow::bail!(
                "{}: directory {} does not exist",
                path.display(),
                dir.display()
            );
        }
    }
    Ok(())
}

/// Ok(false) when a result disagreed with the reference.
fn run(cli: &Cli) -> Result<bool> {
    check_output_paths(cli)?;
    match &cli.command {
        Some(Command::Info) => return info::run(&cli.global),
        Some(Command::ShaderStats(args)) => return shader_stats::run(&cli.global, args),
        _ => {}
    }
    let setup = cli.global.device_setup()?;
    let gpu = setup.open()?;
    if let Some(line) = setup.describe() {
        eprintln!("{line}");
    }
    match &cli.command {
        Some(Command::Check(args)) => check::run(&gpu, args, cli.global.json.as_deref()),
        Some(Command::Decode(args)) => decode::run(&gpu, &setup, args, cli.global.json.as_deref()),
        Some(Command::Masks(args)) => masks::run(&gpu, &setup, args, cli.global.json.as_deref()),
        Some(Command::Run(args)) => {
            let shape = args.shape.shape();
            let dtype = args.dtype.dtype();
            let seed = 1;
            let mut config = args.flags.config();
            let mut flags = args.flags.describe();
            if args.sinks {
                // (Before the sinks are drawn: one per query head.)
                let limit = gpu.info().limits.max_compute_workgroups_per_dimension;
                anyhow::ensure!(
                    shape.heads_q <= limit as usize,
                    "{} query heads: a forward dispatches at most {limit} along the heads",
                    shape.heads_q
                );
                config = config.sinks(seeded_sinks(seed, shape.heads_q));
                flags.push_str(" sinks");
            }
            if let Some(keys) = args.keys_per_dispatch {
                flags.push_str(&format!(" {keys}-key dispatches"));
            }
            let tiers: Vec<Option<TierArg>> = if args.tier.is_empty() {
                vec![None]
            } else {
                args.tier.iter().copied().map(Some).collect()
            };
            // In a list, a tier this adapter lacks is reported and skipped
            // (alone, it is the error it is).
            let listed = tiers.len();
            let tiers: Vec<Option<TierArg>> = tiers
                .into_iter()
                .filter(|tier| {
                    let Some(tier) = tier.filter(|_| listed > 1) else {
                        return true;
                    };
                    match tier.plan(gpu.info(), &shape, dtype) {
                        Err(
                            err @ (wgpu_flash_attn::Error::TierUnavailable { .. }
                            | wgpu_flash_attn::Error::DTypeUnsupported { .. }),
                        ) => {
                            eprintln!("skipped: {err}");
                            false
                        }
                        _ => true,
                    }
                })
                .collect();
            // Each layout the adapter holds, on the register-blocked tier:
            // with f16 products where the tiers listed name `blocked-f16`
            // and not `blocked`, without where they name `blocked` and not
            // `blocked-f16`, else as the planner chooses.
            let listed_tier = |tier| args.tier.contains(&tier);
            let layout_products = match (
                listed_tier(TierArg::BlockedF16),
                listed_tier(TierArg::Blocked),
            ) {
                (true, false) => Some(true),
                (false, true) => Some(false),
                _ => None,
            };
            let layout_cases: Vec<(wgpu_flash_attn::AttentionConfig, String)> = args
                .blocked_layout
                .iter()
                .filter_map(|&layout| {
                    let mut config = config
                        .clone()
                        .tier(wgpu_flash_attn::Tier::RegisterBlocked)
                        .blocked_layout(layout);
                    if let Some(products) = layout_products {
                        config = config.f16_products(products);
                    }
                    match ForwardPlan::for_config(gpu.info(), &shape, dtype, &config) {
                        Ok(plan) => {
                            let products = options::products_suffix(plan.f16_products());
                            Some((config, format!(" RegisterBlocked {layout}{products}")))
                        }
                        Err(err) => {
                            eprintln!("skipped: register-blocked layout {layout}: {err}");
                            None
                        }
                    }
                })
                .collect();
            let coop_cases: Vec<(wgpu_flash_attn::AttentionConfig, String)> = args
                .coop_layout
                .iter()
                .filter_map(|&layout| {
                    let config = config.clone().coop_layout(layout);
                    match ForwardPlan::for_config(gpu.info(), &shape, dtype, &config) {
                        Ok(_) => Some((config, format!(" CooperativeMatrix {layout}"))),
                        Err(err) => {
                            eprintln!("skipped: cooperative-matrix block {layout}: {err}");
                            None
                        }
                    }
                })
                .collect();
            let tier_cases = tiers.into_iter().map(|tier| match tier {
                Some(tier) => (tier.apply(config.clone()), format!(" {}", tier.label())),
                None => (config.clone(), String::new()),
            });
            let cases = tier_cases
                .chain(layout_cases)
                .chain(coop_cases)
                .map(|(config, tier_label)| Case {
                    name: format!(
                        "{}{}{tier_label}",
                        case_name(&shape, &flags),
                        dtype_suffix(dtype)
                    ),
                    shape,
                    config,
                    impls: if args.backward && args.implementation != Impl::Backward {
                        vec![args.implementation, Impl::Backward]
                    } else {
                        vec![args.implementation]
                    },
                    seed,
                    dtype,
                    keys_per_dispatch: args.keys_per_dispatch,
                })
                .collect::<Vec<_>>();
            anyhow::ensure!(
                !cases.is_empty(),
                "nothing to run: every tier and layout listed was skipped on this adapter"
            );
            let report = measure_all(&gpu, &setup, cli, cases, args.iters, f64::INFINITY)?;
            anyhow::ensure!(
                report.reported_any(),
                "nothing was measured: every implementation asked for was skipped (the table says why)"
            );
            Ok(report.failures() == 0)
        }
        Some(Command::Sweep(args)) => {
            let (base, flags, label) = match &args.preset {
                Some(name) => {
                    let preset = seed_models()
                        .into_iter()
                        .find(|p| p.name.contains(name.as_str()))
                        .with_context(|| {
                            let names: Vec<&str> = seed_models().iter().map(|p| p.name).collect();
                            format!("no preset matches {name:?}; presets: {}", names.join(", "))
                        })?;
                    let mut flags = args.flags.clone();
                    flags.causal |= preset.causal;
                    (preset.shape, flags, format!("{} ", preset.name))
                }
                None => (args.shape.shape(), args.flags.clone(), String::new()),
            };
            let cases = args
                .seq
                .iter()
                .enumerate()
                .map(|(index, &seq)| {
                    let shape = AttentionShape {
                        seq_q: seq,
                        seq_kv: seq,
                        ..base
                    };
                    Case {
                        name: format!("{label}{}", case_name(&shape, &flags.describe())),
                        shape,
                        config: flags.config(),
                        impls: args.implementations.clone(),
                        seed: 100 + index as u64,
                        dtype: DType::F32,
                        keys_per_dispatch: None,
                    }
                })
                .collect();
            let report = measure_all(&gpu, &setup, cli, cases, args.iters, SUITE_CPU_BUDGET)?;
            Ok(report.failures() == 0)
        }
        None => {
            let report = measure_all(&gpu, &setup, cli, suite(), 5, SUITE_CPU_BUDGET)?;
            Ok(report.failures() == 0)
        }
        Some(Command::Info | Command::ShaderStats(_)) => unreachable!("handled above"),
    }
}

/// The seed-model presets at lengths that keep the whole run near a minute
/// on a software adapter, then the shape of the project's speed targets.
fn suite() -> Vec<Case> {
    let all = vec![Impl::Flash, Impl::Naive, Impl::Cpu];
    let mut cases: Vec<Case> = seed_models()
        .into_iter()
        .map(|preset| {
            // Llama-3.1-70B's 64 heads at d=128: 512 tokens here.
            if preset.shape.seq_q > 1024 {
                preset.with_seq(512, 512)
            } else {
                preset
            }
        })
        .enumerate()
        .map(|(index, preset)| Case {
            name: format!("{} {}", preset.name, case_name(&preset.shape, "")),
            shape: preset.shape,
            config: preset.config(),
            impls: all.clone(),
            seed: 1000 + index as u64,
            dtype: DType::F32,
            keys_per_dispatch: None,
        })
        .collect();
    for (index, causal) in [false, true].into_iter().enumerate() {
        let shape = AttentionShape::self_attention(1, 2048, 8, 64);
        // The non-causal row also times linear attention on the same
        // inputs: a different function, for its cost beside softmax; the
        // causal row times the backward (training's usual case).
        let mut impls = all.clone();
        impls.push(if causal { Impl::Backward } else { Impl::Linear });
        cases.push(Case {
            name: format!(
                "target {}",
                case_name(&shape, if causal { " causal" } else { "" })
            ),
            shape,
            config: wgpu_flash_attn::AttentionConfig::new().causal(causal),
            impls,
            seed: 2000 + index as u64,
            dtype: DType::F32,
            keys_per_dispatch: None,
        });
    }
    // The same shape with half-precision storage, flash only: f16 and bf16
    // against the f32 row above.
    for (index, dtype) in [DType::F16, DType::BF16].into_iter().enumerate() {
        let shape = AttentionShape::self_attention(1, 2048, 8, 64);
        cases.push(Case {
            name: format!("target {}{}", case_name(&shape, ""), dtype_suffix(dtype)),
            shape,
            config: wgpu_flash_attn::AttentionConfig::new(),
            impls: vec![Impl::Flash],
            seed: 3000 + index as u64,
            dtype,
            keys_per_dispatch: None,
        });
    }
    cases
}

/// `run --sinks`: one N(0, 1) sink logit per query head, from a stream of
/// its own (the case's inputs are drawn from `seed`, the backward's dO from
/// `seed + 1`).
fn seeded_sinks(seed: u64, heads_q: usize) -> Vec<f32> {
    random::normal_vec(&mut random::seeded(seed + 2), heads_q, 1.0)
}

/// " f16" / " bf16" for case names; nothing for f32.
fn dtype_suffix(dtype: DType) -> String {
    match dtype {
        DType::F32 => String::new(),
        other => format!(" {}", format!("{other:?}").to_lowercase()),
    }
}

/// Ceilings, then every case with a progress bar; prints the table and
/// writes JSON and the plot if asked.
fn measure_all(
    gpu: &Gpu,
    setup: &options::DeviceSetup,
    cli: &Cli,
    cases: Vec<Case>,
    iters: usize,
    cpu_budget_flops: f64,
) -> Result<Report> {
    let steps: usize = cases.iter().map(|c| c.impls.len()).sum();
    let progress = ProgressBar::new(steps as u64 + 1);
    progress.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} {msg}")
            .expect("the template is valid"),
    );
    progress.enable_steady_tick(Duration::from_millis(200));
    if compile_ahead::worthwhile(gpu) {
        progress.set_message("compiling kernels, one device per core");
        compile_ahead::compile_ahead(gpu, setup, &cases);
    }
    progress.set_message("FMA and copy ceilings");
    let probes = CeilingProbes::new(gpu)?;
    let fma = probes.measure_fma(CEILING_WORKGROUPS, TimingPlan { warmup: 1, runs: 5 })?;
    let copy = probes.measure_copy(COPY_BYTES, TimingPlan { warmup: 1, runs: 5 })?;
    progress.inc(1);

    let bench = Bench {
        gpu,
        probes: &probes,
        progress: progress.clone(),
        iters,
        cpu_runs: if cpu_budget_flops.is_finite() {
            1
        } else {
            iters
        },
        cpu_budget_flops,
    };
    let mut reports = Vec::new();
    for case in &cases {
        reports.push(
            bench
                .run_case(case)
                .with_context(|| format!("case {}", case.name))?,
        );
    }
    progress.finish_and_clear();

    let mut report = Report {
        tool: "flash-bench",
        version: env!("CARGO_PKG_VERSION"),
        command: std::env::args().collect::<Vec<_>>().join(" "),
        adapter: AdapterJson::of_device(gpu.info()),
        timer: format!(
            "{}, median of {iters} runs after a validating run{} (CPU: wall clock)",
            fma.timing.timer,
            timing::warm_up_note(gpu)
        ),
        ceilings: Ceilings {
            fma_gflops: fma.gflops,
            fma_measurements: vec![fma.gflops],
            copy_gb_per_s: copy.gb_per_s,
            copy_bytes: copy.bytes,
        },
        cases: reports,
    };
    report.finish();
    report.print_header();
    report.print_table();
    if let Some(path) = &cli.global.json {
        report.write_json(path)?;
        eprintln!("wrote {}", path.display());
    }
    if let Some(path) = &cli.global.plot {
        write_plot(
            &report,
            path,
            matches!(cli.command, Some(Command::Sweep(_))),
        )?;
        eprintln!("wrote {}", path.display());
    }
    if report.failures() > 0 {
        eprintln!(
            "{} case(s) disagreed with the reference (tolerance {:e})",
            report.failures(),
            measure::TOLERANCE
        );
    }
    Ok(report)
}

fn write_plot(report: &Report, path: &Path, sweep: bool) -> Result<()> {
    // Linear attention computes another function: only cost compares, so
    // a sweep with it plots time; otherwise throughput against the ceiling.
    let with_linear = report
        .cases
        .iter()
        .any(|case| case.result(Impl::Linear).is_some());
    let y_axis = if with_linear {
        plot::YAxis::Time
    } else {
        plot::YAxis::Throughput
    };
    let series = [Impl::Flash, Impl::Naive, Impl::Linear, Impl::Cpu]
        .into_iter()
        .filter_map(|implementation| {
            let points: Vec<(f64, f64)> = report
                .cases
                .iter()
                .filter_map(|case| {
                    let result = case.result(implementation)?;
                    let y = match y_axis {
                        plot::YAxis::Throughput => result.gflops?,
                        plot::YAxis::Time => result.median_ms?,
                    };
                    Some((case.shape.seq_kv as f64, y))
                })
                .collect();
            (!points.is_empty()).then(|| plot::Series {
                label: implementation.to_string(),
                points,
            })
        })
        .collect();
    let chart = plot::Chart {
        title: match y_axis {
            plot::YAxis::Throughput => format!("{}: attention throughput", report.adapter.name),
            plot::YAxis::Time => format!("{}: time per call", report.adapter.name),
        },
        series,
        ceiling: (y_axis == plot::YAxis::Throughput).then(|| {
            (
                format!("FMA ceiling {:.0}", report.ceilings.fma_gflops),
                report.ceilings.fma_gflops,
            )
        }),
        connect: sweep,
        y_axis,
    };
    std::fs::write(path, plot::render_svg(&chart))
        .with_context(|| format!("writing {}", path.display()))
}
