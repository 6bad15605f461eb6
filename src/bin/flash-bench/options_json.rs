//! An attention call's options as JSON: one field per option, so that a
//! result file can be filtered and compared by option without parsing text.

use serde::Serialize;
use wgpu_flash_attn::{Alibi, AttentionConfig, DType, Tier};

/// The options of one call, as flash-bench writes them.
#[derive(Debug, Clone, Serialize)]
pub struct OptionsJson {
    pub causal: bool,
    /// Keys visible left of the query's position; `null` is unbounded.
    pub window_left: Option<i64>,
    /// Keys visible right of the query's position; `null` is unbounded.
    pub window_right: Option<i64>,
    /// `null` is the default 1/sqrt(head_dim).
    pub scale: Option<f32>,
    pub softcap: Option<f32>,
    pub alibi: Option<AlibiJson>,
    /// Attention-sink logits, one per query head; `null` is no sinks.
    pub sinks: Option<Vec<f32>>,
    /// The tier forced by the caller; `null` lets the planner choose.
    pub tier: Option<&'static str>,
    /// The forward's products from f16 operands as the caller set them
    /// (AttentionConfig::f16_products; null: the planner's choice, which
    /// the case's own `f16_products` reports).
    pub f16_products: Option<bool>,
    /// The register-blocked layout given (`run --blocked-layout`),
    /// ROW_LANESxKEY_LANESxROWS; `null` is the planner's.
    pub blocked_layout: Option<String>,
    pub coop_layout: Option<String>,
    /// Attention dropout rate and mask seed; `null` is no dropout.
    pub dropout: Option<DropoutJson>,
    /// Storage type of Q, K, V and O.
    pub dtype: &'static str,
}

/// Attention dropout (AttentionConfig::dropout).
#[derive(Debug, Clone, Serialize)]
pub struct DropoutJson {
    pub p: f32,
    pub seed: u64,
}

/// ALiBi slopes and their layout.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "layout", rename_all = "snake_case")]
pub enum AlibiJson {
    /// One slope per query head.
    PerHead { slopes: Vec<f32> },
    /// One slope per batch entry and query head.
    PerBatchHead { slopes: Vec<f32> },
}

impl OptionsJson {
    pub fn new(config: &AttentionConfig, dtype: DType) -> Self {
        OptionsJson {
            causal: config.causal,
            window_left: config.window_left,
            window_right: config.window_right,
            scale: config.scale,
            softcap: config.softcap,
            alibi: config.alibi.as_ref().map(|alibi| match alibi {
                Alibi::PerHead(slopes) => AlibiJson::PerHead {
                    slopes: slopes.clone(),
                },
                Alibi::PerBatchHead(slopes) => AlibiJson::PerBatchHead {
                    slopes: slopes.clone(),
                },
            }),
            sinks: config.sinks.clone(),
            tier: config.tier.map(tier_name),
            f16_products: config.f16_products,
            blocked_layout: config.blocked_layout.map(|l| l.to_string()),
            coop_layout: config.coop_layout.map(|l| l.to_string()),
            dropout: config.dropout.map(|d| DropoutJson {
                p: d.p,
                seed: d.seed,
            }),
            dtype: dtype_name(dtype),
        }
    }
}

/// A tier by its library name, as the results' `tier` field has it.
pub fn tier_name(tier: Tier) -> &'static str {
    match tier {
        Tier::Portable => "Portable",
        Tier::SubgroupBroadcast => "SubgroupBroadcast",
        Tier::RegisterBlocked => "RegisterBlocked",
        Tier::CooperativeMatrix => "CooperativeMatrix",
    }
}

/// A storage type in lower case, as the results' `dtype` field has it.
pub fn dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::F32 => "f32",
        DType::F16 => "f16",
        DType::BF16 => "bf16",
    }
}

#[cfg(test)]
mod tests {
    use wgpu_flash_attn::{Alibi, AttentionConfig, DType, Tier};

    use super::OptionsJson;

    /// The library's options may grow (its API is being reworked), and a
    /// new option missing here would silently vanish from every result
    /// file: the JSON must name every field the config's Debug text does.
    #[test]
    fn every_config_field_has_a_json_field() {
        let debug = format!("{:?}", AttentionConfig::default());
        // `AttentionConfig { causal: false, window_left: None, .. }`: at the
        // default every value is one word, so the fields split at ", ".
        let inner = debug
            .split_once(" { ")
            .and_then(|(_, rest)| rest.strip_suffix(" }"))
            .unwrap_or_else(|| panic!("unexpected Debug text {debug}"));
        let mut config_fields: Vec<&str> = inner
            .split(", ")
            .map(|field| field.split_once(": ").map_or(field, |(name, _)| name))
            .collect();
        config_fields.sort_unstable();
        let json = serde_json::to_value(OptionsJson::new(&AttentionConfig::default(), DType::F32))
            .unwrap();
        let mut json_fields: Vec<&str> = json
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .filter(|&key| key != "dtype")
            .collect();
        json_fields.sort_unstable();
        assert_eq!(json_fields, config_fields);
    }

    #[test]
    fn options_are_written_as_values() {
        let config = AttentionConfig::new()
            .causal(true)
            .window(Some(128), None)
            .scale(0.5)
            .softcap(30.0)
            .alibi(Alibi::PerHead(vec![0.5, 0.25]))
            .sinks(vec![-1.5, 2.0])
            .dropout(0.25, 9)
            .tier(Tier::Portable);
        let json = serde_json::to_value(OptionsJson::new(&config, DType::BF16)).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "causal": true,
                "window_left": 128,
                "window_right": null,
                "scale": 0.5,
                "softcap": 30.0,
                "alibi": {"layout": "per_head", "slopes": [0.5, 0.25]},
                "sinks": [-1.5, 2.0],
                "tier": "Portable",
                "f16_products": null,
                "blocked_layout": null,
                "coop_layout": null,
                "dropout": {"p": 0.25, "seed": 9},
                "dtype": "bf16",
            })
        );
    }
}
