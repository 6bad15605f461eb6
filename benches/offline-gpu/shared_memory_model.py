#!/usr/bin/env python3
"""What NVIDIA's shared memory allows the register-blocked forward
(shaders/flash_blocked.wgsl), layout by layout: the cycles its reads of
workgroup memory take per cycle of FMAs, for one subgroup of 32 lanes at
head dim 128 in f32 (the products' reads only: Q K^T's and P V's; staging
and the softmax add a little).

The rules, as NVIDIA's engineers describe the hardware (developer forum
answers about Volta to Hopper; not a published specification):
  - shared memory returns 128 bytes a cycle to an SM, one 32-bit register
    per lane of a subgroup: a 16-byte read by 32 lanes takes 4 cycles, one
    per quarter-subgroup of 8 lanes, each as many cycles as its worst bank
    conflict (distinct 16-byte addresses on one bank);
  - where lanes n and n ^ 1 (or n and n ^ 2) read one address, for the
    whole subgroup, a pair is served at once: half-subgroups, 2 cycles;
  - an SM retires 4 subgroup FMAs a cycle (128 lanes).
A ratio above 1 bounds the kernel at 1/ratio of the FMA ceiling, however
well the rest is hidden. Against an H100's sweep of the plain order
(2026-12-05, BENCHMARKS.md) no layout ran past its bound, and the one-row
layouts ran close to it (64x4x1 at 92 %).

  python3 benches/offline-gpu/shared_memory_model.py

The address formulas are the kernel's (twins of flash_blocked.wgsl's
indexing, plain order as before 2026-12-06, paired as since).
"""

D4 = DV4 = 32  # head dim 128, in vec4s
BANKS = 32


def cycles(addresses):
    """Cycles of one 16-byte read; `addresses` are 32 lanes' word offsets."""
    paired = any(
        all(addresses[n] == addresses[n ^ bit] for n in range(32)) for bit in (1, 2)
    )
    group = 16 if paired else 8
    total = 0
    for start in range(0, 32, group):
        per_bank = {}
        for address in set(addresses[start : start + group]):
            for word in range(4):
                bank = (address + word) % BANKS
                per_bank[bank] = per_bank.get(bank, 0) + 1
        total += max(per_bank.values())
    return total


def ratio(row_lanes, key_lanes, rows, paired):
    """Shared-memory cycles per FMA cycle of one tile, averaged over the
    workgroup's subgroups."""
    cols = -(-DV4 // key_lanes)
    k_stride = D4 + 1
    pair = paired and row_lanes % 2 == 0 and key_lanes % 2 == 0
    q_stride = D4 | 1 if paired else D4
    p_stride = key_lanes | 1 if paired else key_lanes

    def lanes(lid):
        if pair:
            return (lid // (2 * key_lanes)) * 2 + lid % 2, (lid // 2) % key_lanes
        return lid // key_lanes, lid % key_lanes

    def q_at(a, r):
        slot = r * row_lanes + a if paired else a * rows + r
        return slot * q_stride

    def p_at(a, r):
        slot = r * row_lanes + a if paired else a * rows + r
        return slot * p_stride

    subgroups = max(1, row_lanes * key_lanes // 32)
    scores = products = 0
    for s in range(subgroups):
        ab = [lanes(min(s * 32 + i, row_lanes * key_lanes - 1)) for i in range(32)]
        # One head-dim step of Q K^T: four keys' K by key lane, rows' Q.
        for j in range(4):
            scores += cycles([4 * (j * key_lanes + b) * k_stride for a, b in ab])
        for r in range(rows):
            scores += cycles([4 * q_at(a, r) for a, b in ab])
        # One four-key step of P V: rows' P, four keys' V columns.
        for r in range(rows):
            products += cycles([4 * p_at(a, r) for a, b in ab])
        for c in range(cols):
            for k in range(4):
                products += cycles([4 * (k * DV4 + b + key_lanes * c) for a, b in ab])
    memory = (scores * D4 + products * key_lanes) / subgroups
    fmas = 16 * rows * D4 + 16 * rows * cols * key_lanes  # per lane and tile
    return memory / (fmas / 4)


# An H100, B4 H16 N4096 d128 causal f32, plain order (2026-12-05).
H100_MS = {
    (16, 8, 2): 23.00,
    (64, 4, 1): 27.74,
    (16, 16, 1): 27.87,
    (32, 2, 1): 33.19,
    (64, 2, 1): 33.29,
    (32, 4, 1): 35.55,
    (8, 8, 4): 35.78,
    (16, 4, 2): 42.65,
    (4, 16, 4): 48.55,
    (8, 8, 2): 51.64,
}
H100_BEST_PERCENT = 21.9  # 16x8x2's share of the FMA ceiling

if __name__ == "__main__":
    print("layout    H100 ms  % FMA   plain: cycles/FMA, bound   paired: cycles/FMA, bound")
    for layout, ms in sorted(H100_MS.items(), key=lambda item: item[1]):
        percent = H100_BEST_PERCENT * H100_MS[(16, 8, 2)] / ms
        plain = ratio(*layout, paired=False)
        paired = ratio(*layout, paired=True)
        name = "x".join(map(str, layout))
        print(
            f"{name:9} {ms:7.2f} {percent:6.1f} {plain:12.2f} {100 / max(plain, 1):8.0f} %"
            f" {paired:14.2f} {100 / max(paired, 1):8.0f} %"
        )
