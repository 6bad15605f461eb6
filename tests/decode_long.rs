//! One decode step of Llama-3.1-70B's attention (64 query heads over 8 KV
//! heads, d=128) over a 128K-token cache: 1 GiB of f32 K and V, eight
//! times lavapipe's 128 MiB storage-binding limit, so the cache spreads
//! over several buffers. Checked against the reference on a sample of
//! query heads (one per KV head group it touches). Takes ~30 s on lavapipe;
//! CI runs it with the rest.

mod common;

use common::gpu;
use common::random::{normal_vec, seeded};
use wgpu_flash_attn::{
    AttentionConfig, AttentionShape, DecodeArgs, KvCache, KvCacheConfig, KvLayout, Lse, Tensor,
    TensorShape, reference,
};

const CONTEXT: usize = 128 * 1024;
const HEADS_Q: usize = 64;
const HEADS_KV: usize = 8;
const HEAD_DIM: usize = 128;
/// Tokens per append: 32 MiB of K per call.
const CHUNK: usize = 8192;
/// Query heads checked against the reference, from three KV groups.
const SAMPLED_HEADS: [usize; 3] = [0, 21, 63];

#[test]
fn llama_70b_decode_over_128k_cached_tokens() {
    let Some(gpu) = gpu() else { return };
    let group = HEADS_Q / HEADS_KV;
    let mut cache = KvCache::new(
        gpu,
        KvCacheConfig::new(
            1,
            HEADS_KV,
            HEAD_DIM,
            KvLayout::Contiguous { capacity: CONTEXT },
        ),
    )
    .unwrap();
    let binding = gpu.info().limits.max_storage_buffer_binding_size;
    if cache.bytes() / 2 > binding {
        assert!(
            cache.segment_count() > 1,
            "{} bytes in one binding of {binding}",
            cache.bytes()
        );
    }
    eprintln!(
        "cache: {} MiB of K and V in {} segments (binding limit {} MiB)",
        cache.bytes() >> 20,
        cache.segment_count(),
        binding >> 20
    );

    // Host copies of the sampled KV heads only: [CONTEXT, HEAD_DIM] each.
    let kv_heads: Vec<usize> = SAMPLED_HEADS.iter().map(|h| h / group).collect();
    let mut host_k = vec![Vec::with_capacity(CONTEXT * HEAD_DIM); kv_heads.len()];
    let mut host_v = vec![Vec::with_capacity(CONTEXT * HEAD_DIM); kv_heads.len()];
    let mut rng = seeded(0x5eed_128c);
    let chunk_shape = TensorShape::new(1, CHUNK, HEADS_KV, HEAD_DIM);
    for _ in 0..CONTEXT / CHUNK {
        let k = normal_vec(&mut rng, chunk_shape.elements(), 1.0);
        let v = normal_vec(&mut rng, chunk_shape.elements(), 1.0);
        let kt = Tensor::from_f32(gpu, chunk_shape, &k).unwrap();
        let vt = Tensor::from_f32(gpu, chunk_shape, &v).unwrap();
        gpu.run(|e| cache.append(gpu, e, &kt, &vt, None)).unwrap();
        for token in 0..CHUNK {
            for (slot, &head) in kv_heads.iter().enumerate() {
                let at = (token * HEADS_KV + head) * HEAD_DIM;
                host_k[slot].extend_from_slice(&k[at..at + HEAD_DIM]);
                host_v[slot].extend_from_slice(&v[at..at + HEAD_DIM]);
            }
        }
        gpu.wait().unwrap();
    }
    assert_eq!(cache.lens(), &[CONTEXT]);

    let q_shape = TensorShape::new(1, 1, HEADS_Q, HEAD_DIM);
    let q = normal_vec(&mut rng, q_shape.elements(), 1.0);
    let q_t = Tensor::from_f32(gpu, q_shape, &q).unwrap();
    let out = Tensor::filled(gpu, q_shape, f32::NAN).unwrap();
    let lse = Lse::new(gpu, 1, HEADS_Q, 1).unwrap();
    let config = AttentionConfig::new().causal(true);
    let started = std::time::Instant::now();
    let plan = gpu
        .run(|e| {
            gpu.decode(
                e,
                &DecodeArgs {
                    q: &q_t,
                    cache: &cache,
                    out: &out,
                    lse: Some(&lse),
                },
                &config,
            )
        })
        .unwrap();
    let got = out.to_f32_vec(gpu).unwrap();
    let got_lse = lse.to_vec(gpu).unwrap();
    eprintln!(
        "decode step: {:?} (wall clock, first call), {plan:?}",
        started.elapsed()
    );
    assert!(
        got.iter().all(|x| !x.is_nan()),
        "every output element written"
    );

    for (slot, &head) in SAMPLED_HEADS.iter().enumerate() {
        let shape = AttentionShape {
            batch: 1,
            seq_q: 1,
            seq_kv: CONTEXT,
            heads_q: 1,
            heads_kv: 1,
            head_dim: HEAD_DIM,
            head_dim_v: HEAD_DIM,
        };
        let q_head = &q[head * HEAD_DIM..(head + 1) * HEAD_DIM];
        let want =
            reference::attention(&shape, q_head, &host_k[slot], &host_v[slot], &config).unwrap();
        let got_head = &got[head * HEAD_DIM..(head + 1) * HEAD_DIM];
        let err = got_head
            .iter()
            .zip(&want.out)
            .map(|(g, w)| (f64::from(*g) - w).abs())
            .fold(0.0, f64::max);
        let lse_err = (f64::from(got_lse[head]) - want.lse[0]).abs();
        assert!(
            err <= 1e-4 && lse_err <= 1e-4,
            "head {head}: out error {err:.2e}, lse error {lse_err:.2e}"
        );
    }
}
