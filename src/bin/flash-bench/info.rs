//! `flash-bench info`: every adapter wgpu finds.

use anyhow::{Result, bail};
use wgpu_flash_attn::{
    AttentionShape, BackwardPlan, CacheShape, DType, DecodeLanes, DecodeOptions, DecodePlan, Error,
    ForwardPlan, GpuInfo, KvDType, Tier,
};

use crate::measure::bytes;
use crate::options::GlobalArgs;
use crate::options_json::{dtype_name, tier_name};
use crate::report::{AdapterJson, write_json};

pub fn run(global: &GlobalArgs) -> Result<bool> {
    let options = global.adapter_options();
    let found: Vec<(AdapterJson, GpuInfo)> = options
        .enumerate()
        .iter()
        .map(|a| {
            (
                AdapterJson::new(&a.get_info(), a.features(), &a.limits()),
                GpuInfo::of_adapter(a, &options),
            )
        })
        .filter(|(a, _)| {
            options
                .adapter_name
                .as_ref()
                .is_none_or(|wanted| a.name.to_lowercase().contains(&wanted.to_lowercase()))
        })
        .collect();
    let (adapters, infos): (Vec<AdapterJson>, Vec<GpuInfo>) = found.into_iter().unzip();
    if adapters.is_empty() {
        bail!(
            "no adapter found for backends {:?}{}; without a GPU on Debian/Ubuntu: \
             apt-get install mesa-vulkan-drivers libvulkan1",
            options.backends,
            options
                .adapter_name
                .as_ref()
                .map_or(String::new(), |n| format!(" matching {n:?}"))
        );
    }
    for (adapter, info) in adapters.iter().zip(&infos) {
        println!(
            "{}\n{}\n{}\n{}\n{}",
            adapter.name,
            adapter.describe(),
            forward_tiers(info),
            backward_tiers(info),
            decode_plans(info)
        );
    }
    println!(
        "every adapter: kernels compile without wgpu's loop counters (each kernel's loops \
         proven finite, or it keeps them) and with its index clamps and division guards \
         (--skip-checks none keeps every check; README, \"How the kernel adapts\")"
    );
    if let Some(path) = &global.json {
        write_json(path, &adapters)?;
    }
    Ok(true)
}

/// Head dims the tier table shows.
const TABLE_HEAD_DIMS: [usize; 4] = [64, 128, 256, 576];

/// Which forward tier each storage type and head dim gets on this adapter,
/// with its blocks, and why the other tiers are not chosen: the planner's
/// own answers (`ForwardPlan`), so they cannot drift from what runs.
/// Storage types that plan alike share a line.
fn forward_tiers(info: &GpuInfo) -> String {
    let mut lines = vec![format!(
        "  forward tiers ({:?} adapter; cooperative matrices where a CPU adapter has them (on GPUs only when forced, \
         until their tests pass on one), else \
         register-blocked on hardware GPUs, per-row tiers on CPU adapters):",
        info.adapter.device_type
    )];
    for head_dim in TABLE_HEAD_DIMS {
        let mut rows: Vec<(Vec<&str>, String)> = Vec::new();
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            let line = tier_line(info, head_dim, dtype);
            match rows.iter_mut().find(|(_, existing)| *existing == line) {
                Some((dtypes, _)) => dtypes.push(dtype_name(dtype)),
                None => rows.push((vec![dtype_name(dtype)], line)),
            }
        }
        for (dtypes, line) in rows {
            lines.push(format!("    d={head_dim} {}: {line}", dtypes.join("/")));
        }
    }
    lines.join("\n")
}

/// The tier a `head_dim` forward in `dtype` gets, and why the others not.
fn tier_line(info: &GpuInfo, head_dim: usize, dtype: DType) -> String {
    let shape = AttentionShape::self_attention(1, 4096, 8, head_dim);
    let chosen = match ForwardPlan::for_call(info, &shape, dtype, None) {
        Ok(plan) => format!(
            "{}{} ({} rows x {} keys per block, {} invocations, {} workgroup memory)",
            tier_name(plan.tier()),
            if plan.f16_products() {
                " with f16 products"
            } else {
                ""
            },
            plan.block_m(),
            plan.block_n(),
            plan.workgroup_size(),
            bytes(plan.workgroup_bytes())
        ),
        Err(err) => format!("none: {err}"),
    };
    let unavailable: Vec<String> = [
        Tier::CooperativeMatrix,
        Tier::RegisterBlocked,
        Tier::SubgroupBroadcast,
    ]
    .into_iter()
    .filter_map(
        |tier| match ForwardPlan::for_call(info, &shape, dtype, Some(tier)) {
            Err(Error::TierUnavailable { reason, .. }) => {
                Some(format!("{} unavailable: {reason}", tier_name(tier)))
            }
            _ => None,
        },
    )
    .collect();
    if unavailable.is_empty() {
        chosen
    } else {
        format!("{chosen}; {}", unavailable.join("; "))
    }
}

/// The backward's gradient passes per head dim (f32): the default tier and
/// what forcing the register-blocked passes gives, from the planner
/// (`BackwardPlan`).
fn backward_tiers(info: &GpuInfo) -> String {
    let mut lines = vec![
        "  backward (f32; register-blocked passes by default on hardware GPUs, elsewhere when forced):"
            .to_string(),
    ];
    for head_dim in [64, 128, 256] {
        let shape = AttentionShape::self_attention(1, 4096, 8, head_dim);
        let default = match BackwardPlan::for_call(info, &shape, DType::F32, None) {
            Ok(plan) => format!(
                "{} ({} invocations, {} keys or rows per workgroup)",
                tier_name(plan.tier()),
                plan.workgroup_size(),
                plan.rows_per_workgroup()
            ),
            Err(err) => format!("none: {err}"),
        };
        let forced = Some(Tier::RegisterBlocked);
        let blocked = match BackwardPlan::for_call(info, &shape, DType::F32, forced)
            .map(|plan| plan.blocked_tiling())
        {
            Ok(Some(t)) => format!(
                "{}x{}x{} ({} keys x {} rows per block, {} invocations, {} workgroup memory)",
                t.row_lanes,
                t.key_lanes,
                t.rows,
                t.block_n(),
                t.block_m(),
                t.workgroup_size(),
                bytes(t.workgroup_bytes())
            ),
            Ok(None) => "none".to_string(),
            Err(err) => format!("none: {err}"),
        };
        lines.push(format!(
            "    d={head_dim}: {default}; forced RegisterBlocked: {blocked}"
        ));
    }
    lines.join("\n")
}

/// Serving shapes the decode table shows: (name, query heads, KV heads,
/// K and V head dims).
const DECODE_SHAPES: [(&str, usize, usize, usize, usize); 3] = [
    ("Llama-3.1-70B (64 q / 8 kv, d=128)", 64, 8, 128, 128),
    ("Llama-3.1-405B (128 q / 8 kv, d=128)", 128, 8, 128, 128),
    (
        "DeepSeek-V3 MLA (128 q / 1 latent kv, 576/512)",
        128,
        1,
        576,
        512,
    ),
];

/// How one new token decodes over a 32K-token f16 cache of each serving
/// shape: the planner's lane layout, the query rows one workgroup holds
/// (on GPUs as many as a lane keeps in registers), and the key splits.
fn decode_plans(info: &GpuInfo) -> String {
    let mut lines = vec!["  decode (one token over a 32K-token f16 cache):".to_string()];
    for (name, heads_q, heads_kv, head_dim, head_dim_v) in DECODE_SHAPES {
        let cache = CacheShape {
            batch: 1,
            heads_kv,
            head_dim,
            head_dim_v,
            longest: 32768,
            segments: 1,
            dtype: KvDType::F16,
        };
        let line = match DecodePlan::for_call(info, &cache, 1, heads_q, &DecodeOptions::default()) {
            Ok(plan) => {
                let layout = match plan.lanes() {
                    Some(DecodeLanes::HeadDim) => "lanes over the head dim",
                    Some(DecodeLanes::KeyTiles) => "key tiles",
                    Some(DecodeLanes::Keys) => "lanes over keys",
                    None => "K/V tiles in workgroup memory",
                };
                format!(
                    "{}, {layout}, {} query rows per workgroup x {} per KV head, {} splits of {} keys",
                    tier_name(plan.tier()),
                    plan.rows_per_workgroup,
                    plan.row_tiles,
                    plan.splits,
                    plan.split_keys
                )
            }
            Err(err) => format!("none: {err}"),
        };
        lines.push(format!("    {name}: {line}"));
    }
    lines.join("\n")
}
