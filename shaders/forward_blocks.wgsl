// Pieces the two block-tiled forward kernels (flash_blocked.wgsl,
// flash_coop.wgsl) share: scoring four keys of one row, and where a
// finished row's output goes. src/shaders/ prepends this file to both,
// after flash_attention.wgsl's shared declarations.

// The keys a block of query rows visits: some row sees [lo, hi] (the tiles
// to visit; none when the block has no real row), every row sees
// [all_lo, all_hi] (tiles inside need no visibility test). `first` and
// `last` are the block's first and last real query rows.
struct BlockKeys {
    lo: i32,
    hi: i32,
    all_lo: i32,
    all_hi: i32,
}

fn block_keys(first: i32, last: i32, diag: i32, seq_kv: u32, no_rows: bool) -> BlockKeys {
    var keys = BlockKeys(0, i32(seq_kv) - 1, 0, i32(seq_kv) - 1);
    if (no_rows) {
        keys.hi = -1;
    }
    if (has_flag(FLAG_WINDOW_LEFT)) {
        keys.lo = max(keys.lo, first + diag - i32(p.window_left));
        keys.all_lo = max(keys.all_lo, last + diag - i32(p.window_left));
    }
    if (has_flag(FLAG_WINDOW_RIGHT)) {
        keys.hi = min(keys.hi, last + diag + i32(p.window_right));
        keys.all_hi = min(keys.all_hi, first + diag + i32(p.window_right));
    }
    return keys;
}

// Whether every row of the block sees every key of the full tile of
// `n_keys` keys from `kv0` (before any mask).
fn tile_all_visible(keys: BlockKeys, kv0: i32, n_keys: u32) -> bool {
    return n_keys == BLOCK_N && kv0 >= keys.all_lo && kv0 + i32(BLOCK_N) - 1 <= keys.all_hi;
}

// Four keys' scores of one row and which of them the row sees.
struct ScoredQuad {
    s: vec4<f32>,
    seen: vec4<bool>,
}

// The score epilogue of four keys at `key_pos` for a row at key-axis
// position `row_pos` whose visible keys are `bounds` (inclusive): scale,
// softcap and ALiBi (`slope`), then, unless the whole tile is visible to
// every row of the block (`unmasked`), the row's key range and the mask;
// hidden keys score MIN_SCORE. Keys past a tile's end lie past every
// row's last visible key, so they are hidden too.
fn score_quad(
    dots: vec4<f32>,
    row_pos: i32,
    key_pos: vec4<i32>,
    slope: f32,
    bounds: vec2<i32>,
    unmasked: bool,
// #if MASK
    mask_state: u32,
    mask_row: u32,
// #endif
) -> ScoredQuad {
    var s = finish_scores(dots, row_pos, key_pos, slope);
    var seen = vec4<bool>(true);
    if (!unmasked) {
        seen = (key_pos >= vec4<i32>(bounds.x)) & (key_pos <= vec4<i32>(bounds.y));
// #if MASK
        if (mask_state == 1u) {
            if (mp.kind == 0u) {
                // -inf hides a key; its bits say so whatever the score
                // (even a NaN from a hidden key's K).
                let bits = mask_bias_bits(mask_row, key_pos.x);
                seen = seen & (bits != vec4<u32>(NEG_INF_BITS));
                s += bitcast<vec4<f32>>(bits);
            } else {
                seen = seen & mask_bits(mask_row, key_pos.x);
            }
        }
// #endif
        s = select(vec4<f32>(MIN_SCORE), s, seen);
    }
    return ScoredQuad(s, seen);
}

// #if MASK
// The block-sparse state of the key tile from `kv0` for the block of row
// tile `row_tile` of (batch, head): 0 no key attended (skipped), 1 apply
// the mask, 2 every key attended; 1 for a dense mask.
fn tile_mask_state(batch: u32, head: u32, row_tile: u32, kv0: i32) -> u32 {
    if (mp.use_tiles == 0u) {
        return 1u;
    }
    return tile_states[batch * mp.tile_batch_stride + head * mp.tile_head_stride + row_tile * mp.key_tiles + u32(kv0) / BLOCK_N];
}
// #endif

// Where a finished row's output goes: O from vec4 `o_base` on, or (a key
// chunk that is not its sequence's last, CARRY_OUT) the f32 carry from
// `c_base` on.
struct RowOutput {
    o_base: u32,
    c_base: u32,
    to_carry: bool,
}

fn row_output(seq: SequenceRows, batch: u32, o_row: u32, head: u32) -> RowOutput {
    let o_base = batch * p.o.batch + o_row * p.o.seq + head * p.o.head + p.o.offset;
// #if MASK
    return RowOutput(o_base, 0u, false);
// #else
    return RowOutput(o_base, carry_base(batch, o_row, head), (seq.carry & CARRY_OUT) != 0u);
// #endif
}

// Writes vec4 column `col` of a finished row.
fn store_row(out: RowOutput, col: u32, value: vec4<f32>) {
// #if MASK
    store_o(out.o_base + col, value);
// #else
    if (out.to_carry) {
        carry[out.c_base + col] = value;
    } else {
        store_o(out.o_base + col, value);
    }
// #endif
}
