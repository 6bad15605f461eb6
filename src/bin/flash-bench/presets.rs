//! Attention shapes of well-known models, for tests and benchmarks.
//!
//! Each preset fixes heads, head dim and masking; the sequence lengths are
//! the model's typical ones and can be scaled down for tests with
//! [`Preset::with_seq`].
//!
//! flash-bench's module; tests/semantics.rs includes the file with `#[path]`.

use wgpu_flash_attn::{AttentionConfig, AttentionShape};

/// One model's attention call.
#[derive(Debug, Clone)]
pub struct Preset {
    pub name: &'static str,
    pub shape: AttentionShape,
    pub causal: bool,
}

impl Preset {
    pub fn config(&self) -> AttentionConfig {
        AttentionConfig::new().causal(self.causal)
    }

    /// The same model at other sequence lengths (batch kept).
    pub fn with_seq(&self, seq_q: usize, seq_kv: usize) -> Preset {
        Preset {
            shape: AttentionShape {
                seq_q,
                seq_kv,
                ..self.shape
            },
            ..self.clone()
        }
    }
}

fn preset(
    name: &'static str,
    seq: (usize, usize),
    heads: (usize, usize),
    head_dim: usize,
    causal: bool,
) -> Preset {
    Preset {
        name,
        shape: AttentionShape {
            batch: 1,
            seq_q: seq.0,
            seq_kv: seq.1,
            heads_q: heads.0,
            heads_kv: heads.1,
            head_dim,
            head_dim_v: head_dim,
        },
        causal,
    }
}

/// The seed models: Transformer-base (encoder self-attention, decoder causal
/// self-attention, cross-attention), BERT-base, ViT-B/16, a GPT-style
/// decoder, and Llama-3.1-70B's grouped-query attention (64 query heads over
/// 8 KV heads; this preset was named after the 405B model, which has 128
/// query heads over the same 8, until 2026-12-05).
pub fn seed_models() -> Vec<Preset> {
    vec![
        preset("transformer-base encoder", (512, 512), (8, 8), 64, false),
        preset("transformer-base decoder", (512, 512), (8, 8), 64, true),
        preset("transformer-base cross", (512, 640), (8, 8), 64, false),
        preset("bert-base", (512, 512), (12, 12), 64, false),
        preset("vit-b/16", (197, 197), (12, 12), 64, false),
        preset("gpt decoder", (1024, 1024), (12, 12), 64, true),
        preset("llama-3.1-70b", (2048, 2048), (64, 8), 128, true),
    ]
}
