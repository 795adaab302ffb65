//! The loop nest shared by the CPU's packed-weight GEMMs (`int8.rs`, `bf16.rs`): a weight packed
//! in panels of [`NR`] output channels with k-pairs interleaved (k-pair `t` of a panel holds
//! `[w(c, 2t), w(c, 2t+1)]` for c = 0..16), activations row-major with an even stride `kp`. Rayon
//! tasks take blocks of [`MC`] rows and walk every panel, so a task's activation rows stay in L2
//! while the panels stream through; a micro-kernel fills an [`MR`]×16 tile of sums, and the
//! caller's `store` turns a tile row into outputs.

use rayon::prelude::*;

/// Output channels per packed panel.
pub const NR: usize = 16;
/// Rows per micro-kernel tile.
pub const MR: usize = 6;
/// Rows per rayon task: a multiple of `MR` whose activations stay in L2.
const MC: usize = 8 * MR;

/// K rounded up to a whole number of pairs.
pub fn padded_k(k: usize) -> usize {
    k.next_multiple_of(2)
}

/// Pack `w` (`[n, k]`, row-major) into panels, each value through `f`.
pub fn pack<E: Copy + Default>(
    w: &[f32],
    n: usize,
    k: usize,
    f: impl Fn(usize, f32) -> E,
) -> Vec<E> {
    let kp = padded_k(k);
    let mut packed = vec![E::default(); n.div_ceil(NR) * kp * NR];
    for j in 0..n {
        let (panel, c) = (j / NR, j % NR);
        for (p, &v) in w[j * k..(j + 1) * k].iter().enumerate() {
            packed[panel * kp * NR + (p / 2) * 2 * NR + c * 2 + p % 2] = f(j, v);
        }
    }
    packed
}

/// `out` (`[m, n]`) from activations `a` (`[m, kp]`) and a packed weight of `n` channels:
/// `tile(a_rows, panel, rows, tile)` computes a tile's sums, `store(row, first_col, sums, out)`
/// writes the `out.len()` outputs of one tile row.
#[allow(clippy::too_many_arguments)] // the GEMM's operands and its two callbacks
pub fn gemm<E: Sync, A: Copy + Default>(
    m: usize,
    n: usize,
    kp: usize,
    a: &[E],
    packed: &[E],
    out: &mut [f32],
    tile: impl Fn(&[E], &[E], usize, &mut [[A; NR]; MR]) + Sync,
    store: impl Fn(usize, usize, &[A; NR], &mut [f32]) + Sync,
) {
    assert_eq!(out.len(), m * n, "output does not match [{m}, {n}]");
    assert!(a.len() >= m * kp && packed.len() >= n.div_ceil(NR) * kp * NR);
    if m == 0 || n == 0 {
        return;
    }
    out.par_chunks_mut(MC * n)
        .enumerate()
        .for_each(|(block, out)| {
            let row0 = block * MC;
            let rows = out.len() / n;
            let mut sums = [[A::default(); NR]; MR];
            for panel in 0..n.div_ceil(NR) {
                let b = &packed[panel * kp * NR..(panel + 1) * kp * NR];
                let cols = NR.min(n - panel * NR);
                for r0 in (0..rows).step_by(MR) {
                    let mr = MR.min(rows - r0);
                    tile(
                        &a[(row0 + r0) * kp..(row0 + r0 + mr) * kp],
                        b,
                        mr,
                        &mut sums,
                    );
                    for (r, acc) in sums[..mr].iter().enumerate() {
                        let o = &mut out[(r0 + r) * n + panel * NR..][..cols];
                        store(row0 + r0 + r, panel * NR, acc, o);
                    }
                }
            }
        });
}
