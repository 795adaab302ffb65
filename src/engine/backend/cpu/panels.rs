//! What the CPU's packed-weight GEMMs (`int8.rs`, `bf16.rs`) share: a weight packed in panels of
//! [`NR`] output channels, rayon tasks of [`MC`] rows, and the tile-height dispatch of their
//! micro-kernels. The rest is bf16's: its panels interleave k-pairs (k-pair `t` of a panel holds
//! `[w(c, 2t), w(c, 2t+1)]` for c = 0..16; [`pack`]), activations stay row-major with an even
//! stride `kp`, and [`gemm`] is its loop nest: each task walks every panel, so its activation rows
//! stay in L2 while the panels stream through; a micro-kernel fills an [`MR`]×16 tile of sums,
//! and the caller's `store` turns a tile row into outputs. int8 packs k-quads for its 8-bit
//! operands and has its own nest (`int8.rs`), blocked over K, since its f32 sums carry from one
//! scale group to the next.

use rayon::prelude::*;

/// Output channels per packed panel.
pub const NR: usize = 16;
/// Rows per micro-kernel tile.
pub const MR: usize = 6;
/// Rows per rayon task: a multiple of `MR` whose activations stay in L2.
pub const MC: usize = 8 * MR;

/// `path::<R>(args)` for a tile of `rows` (1..=MR) rows: the micro-kernels take the tile height
/// as a const generic, so each height is its own unrolled function.
macro_rules! by_rows {
    ($rows:expr, $($kernel:ident)::+ ($($arg:expr),*)) => {
        match $rows {
            6 => $($kernel)::+::<6>($($arg),*),
            5 => $($kernel)::+::<5>($($arg),*),
            4 => $($kernel)::+::<4>($($arg),*),
            3 => $($kernel)::+::<3>($($arg),*),
            2 => $($kernel)::+::<2>($($arg),*),
            _ => $($kernel)::+::<1>($($arg),*),
        }
    };
    // `path[P](args)`: the same with a second const generic after the height.
    ($rows:expr, $($kernel:ident)::+ [$extra:expr] ($($arg:expr),*)) => {
        match $rows {
            6 => $($kernel)::+::<6, $extra>($($arg),*),
            5 => $($kernel)::+::<5, $extra>($($arg),*),
            4 => $($kernel)::+::<4, $extra>($($arg),*),
            3 => $($kernel)::+::<3, $extra>($($arg),*),
            2 => $($kernel)::+::<2, $extra>($($arg),*),
            _ => $($kernel)::+::<1, $extra>($($arg),*),
        }
    };
}
pub(crate) use by_rows;

/// K rounded up to a whole number of pairs.
pub fn padded_k(k: usize) -> usize {
    k.next_multiple_of(2)
}

/// Where weight `(j, p)` of a `[n, k]` weight sits in its packed panels (`kp = padded_k(k)`).
#[inline(always)]
fn at(kp: usize, j: usize, p: usize) -> usize {
    let (panel, c) = (j / NR, j % NR);
    panel * kp * NR + (p / 2) * 2 * NR + c * 2 + p % 2
}

/// Pack `w` (`[n, k]`, row-major) into panels of k-pairs, each value through `f`.
pub fn pack<E: Copy + Default>(w: &[f32], n: usize, k: usize, f: impl Fn(f32) -> E) -> Vec<E> {
    let kp = padded_k(k);
    let mut packed = vec![E::default(); n.div_ceil(NR) * kp * NR];
    for j in 0..n {
        for (p, &v) in w[j * k..(j + 1) * k].iter().enumerate() {
            packed[at(kp, j, p)] = f(v);
        }
    }
    packed
}

/// The `[n, k]` row-major values of a weight [`pack`] packed, each through `f`.
pub fn unpack<E: Copy>(packed: &[E], n: usize, k: usize, f: impl Fn(E) -> f32) -> Vec<f32> {
    let kp = padded_k(k);
    (0..n * k)
        .map(|i| f(packed[at(kp, i / k, i % k)]))
        .collect()
}

/// The reduction of the 512-bit bf16 micro-kernel (`bf16.rs`), where one register holds a
/// whole k-pair of a panel: k-pairs `0..pairs` go alternately to the `even` and `odd` chains of
/// each of the `R` rows (two independent accumulators per row hide the dot-product
/// instruction's latency), `mac(acc, row, t, panel(t))` adding k-pair `t` of a row. Inlined into
/// each kernel, whose closures carry its target features.
#[inline(always)]
pub fn two_chains<V: Copy, B: Copy, const R: usize>(
    pairs: usize,
    even: &mut [V; R],
    odd: &mut [V; R],
    panel: impl Fn(usize) -> B,
    mac: impl Fn(V, usize, usize, B) -> V,
) {
    let mut t = 0;
    while t + 1 < pairs {
        let (b0, b1) = (panel(t), panel(t + 1));
        for (r, (e, o)) in even.iter_mut().zip(odd.iter_mut()).enumerate() {
            *e = mac(*e, r, t, b0);
            *o = mac(*o, r, t + 1, b1);
        }
        t += 2;
    }
    if t < pairs {
        let b0 = panel(t);
        for (r, e) in even.iter_mut().enumerate() {
            *e = mac(*e, r, t, b0);
        }
    }
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
