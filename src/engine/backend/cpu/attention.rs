//! Varlen multi-head attention on the CPU, one (sequence, head) at a time.
//!
//! The trick: repack the head's K as Kᵀ and V in panels 32 columns wide (`[keys/32][d][32]` and
//! `[d/32][keys][32]`), contiguous and zero-padded to the register tile, so both products become
//! register-tiled micro-kernels that LLVM vectorises: `S = Q·Kᵀ` accumulates an 8×32 tile of
//! scores over `d` (two vector loads of one Kᵀ panel, eight broadcasts of Q, sixteen FMAs per
//! step with AVX-512), and `O = P·V` accumulates an 8×32 tile of outputs over the keys, streaming
//! one V panel. Each micro-kernel reads its panel sequentially: rows of a plain `[d, keys]` Kᵀ or
//! of V read in place in the `[T, 3H]` rows lie a power of two (or 3H) floats apart, and at 512
//! keys a Kᵀ tile's 64 rows fell into four of L1's 64 sets and were re-read from L2 at every step.
//! Queries go in blocks of `QBLOCK` rows so the score block stays in L2, and a sliding window only
//! packs and visits the keys the block can see.

use super::math;

/// Query rows per block: the score block is `QBLOCK × keys` floats.
const QBLOCK: usize = 64;
/// Register tiles: at most `TR` rows of queries (8 with AVX-512, 2 with AVX2, else 4) by `TC` columns (keys
/// for Q·Kᵀ, head dims for P·V); query rows are padded to a multiple of `TR`.
const TR: usize = 8;
const TC: usize = 32;
/// Keys per chunk of a V panel in P·V: `KC × TC` floats (16 KB) stay in L1.
const KC: usize = 128;
// Padded query rows must stay inside the block (`inv_sum` has QBLOCK entries).
const _: () = assert!(QBLOCK.is_multiple_of(TR));

fn round_up(n: usize, m: usize) -> usize {
    n.div_ceil(m) * m
}

/// Per-thread scratch, reused across tasks.
#[derive(Default)]
pub struct Scratch {
    q: Vec<f32>,
    kt: Vec<f32>,
    v: Vec<f32>,
    s: Vec<f32>,
    o: Vec<f32>,
    /// Disentangled attention: the bias block, the query and key sides, relative indices.
    bias: Vec<f32>,
    c2p: Vec<f32>,
    p2c: Vec<f32>,
    index: Vec<usize>,
}

/// DeBERTa's relative tables for one head ([`crate::engine::backend::Disentangled`]).
pub struct RelView<'a> {
    /// `[2·span, H]` rows; this head's columns start at `HeadView::col`.
    pub pos_key: Option<&'a [f32]>,
    pub pos_query: Option<&'a [f32]>,
    pub span: usize,
    pub buckets: usize,
    pub max_relative: usize,
}

/// One head of one sequence.
pub struct HeadView<'a> {
    /// The batch's `[T, 3H]` qkv rows of this sequence, starting at its first token.
    pub qkv: &'a [f32],
    /// Row stride of `qkv` (3H).
    pub stride: usize,
    /// Column of this head's Q block (K is at `+ h`, V at `+ 2h`).
    pub col: usize,
    pub h: usize,
    pub d: usize,
    pub len: usize,
    pub scale: f32,
    pub window: Option<usize>,
    /// Disentangled attention's relative terms (global attention only).
    pub rel: Option<RelView<'a>>,
}

/// `dst[m, n] = scale · lhs[m, k] · tableᵀ` for one head: `lhs` rows `lhs_rs` apart, `table`
/// the `[n, H]` relative table read at this head's columns (`table[r·h + p]`, from `col`). One
/// GEMM per (sequence, head), single-threaded: the caller already runs heads in parallel.
#[allow(clippy::too_many_arguments)] // a strided GEMM's operands, one each
fn times_table(
    dst: &mut Vec<f32>,
    lhs: &[f32],
    lhs_rs: usize,
    m: usize,
    k: usize,
    table: &[f32],
    h: usize,
    n: usize,
    scale: f32,
) {
    dst.clear();
    dst.resize(m * n, 0.0);
    assert!(m == 0 || (lhs.len() >= (m - 1) * lhs_rs + k && table.len() >= (n - 1) * h + k));
    // SAFETY: dst is [m, n] row-major; lhs element (i, p) is lhs[i·lhs_rs + p] and table element
    // (p, r) of the [k, n] right operand is table[r·h + p], both inside the slices (checked above).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            false,
            lhs.as_ptr(),
            1,
            lhs_rs as isize,
            table.as_ptr(),
            h as isize,
            1,
            0.0,
            scale,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// The key side of the relative terms (`k_j · pos_query[r] · scale`, `[len, 2·span]`) and the
/// relative index of every distance (`index[i - j + len - 1]`).
fn prepare_rel(hv: &HeadView, rel: &RelView, scratch: &mut Scratch) {
    let (d, len, width) = (hv.d, hv.len, 2 * rel.span);
    scratch.index.clear();
    scratch.index.extend((0..2 * len - 1).map(|k| {
        // Distance k - (len - 1) = i - j, as the pair (i, j) = (k, len - 1).
        crate::engine::backend::relative_index(k, len - 1, rel.span, rel.buckets, rel.max_relative)
    }));
    scratch.p2c.clear();
    if let Some(pq) = rel.pos_query {
        let keys = &hv.qkv[hv.col + hv.h..];
        times_table(
            &mut scratch.p2c,
            keys,
            hv.stride,
            len,
            d,
            &pq[hv.col..],
            hv.h,
            width,
            hv.scale,
        );
    }
}

/// The bias block of rows `q0..q0 + rows` over every key (`[rows_p, keys_p]`, zero-padded):
/// `c2p[i][r] + p2c[j][r]` at `r = index(i - j)`. `q` holds the block's pre-scaled queries.
fn rel_bias(
    hv: &HeadView,
    rel: &RelView,
    q0: usize,
    rows: usize,
    keys_p: usize,
    scratch: &mut Scratch,
) {
    let (d, len, width) = (hv.d, hv.len, 2 * rel.span);
    let (rows_p, dp) = (round_up(rows, TR), round_up(d, TC));
    let Scratch {
        q,
        bias,
        c2p,
        p2c,
        index,
        ..
    } = scratch;
    c2p.clear();
    if let Some(pk) = rel.pos_key {
        // The block's queries are pre-scaled.
        times_table(c2p, q, dp, rows, d, &pk[hv.col..], hv.h, width, 1.0);
    }
    bias.clear();
    bias.resize(rows_p * keys_p, 0.0);
    for i in 0..rows {
        let row = &mut bias[i * keys_p..i * keys_p + len];
        for (j, b) in row.iter_mut().enumerate() {
            let r = index[q0 + i + len - 1 - j];
            let mut v = 0.0;
            if !c2p.is_empty() {
                v += c2p[i * width + r];
            }
            if !p2c.is_empty() {
                v += p2c[j * width + r];
            }
            *b = v;
        }
    }
}

/// Attend one head of one sequence; `out(row, values)` receives each query row's `d` outputs.
///
/// Compiled for the CPU: 8-row tiles with AVX-512 (16 accumulators of its 32 registers), 2-row
/// tiles with AVX2 and FMA (8 accumulators, 4 registers of the tile row and a broadcast within
/// its 16: 4-row tiles needed 16 accumulators and spilled them to the stack at every step, and
/// attention ran 1.4x slower; BENCHMARKS), 4-row without. The tile height changes which outputs a pass computes
/// together, not the order of any sum, so every variant gives the same values.
pub fn attend(hv: &HeadView, scratch: &mut Scratch, out: impl FnMut(usize, &[f32])) {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
        fn avx512(hv: &HeadView, scratch: &mut Scratch, out: impl FnMut(usize, &[f32])) {
            attend_tiles::<true, 8, true>(hv, scratch, out)
        }
        #[target_feature(enable = "avx2,fma")]
        fn avx2(hv: &HeadView, scratch: &mut Scratch, out: impl FnMut(usize, &[f32])) {
            attend_tiles::<true, 2, false>(hv, scratch, out)
        }
        let fma = std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma");
        if fma
            && std::is_x86_feature_detected!("avx512f")
            && std::is_x86_feature_detected!("avx512vl")
        {
            // SAFETY: the CPU has every feature `avx512` enables, checked just above.
            return unsafe { avx512(hv, scratch, out) };
        }
        if fma {
            // SAFETY: the CPU has AVX2 and FMA, checked above.
            return unsafe { avx2(hv, scratch, out) };
        }
    }
    attend_tiles::<false, 4, false>(hv, scratch, out)
}

/// [`attend`] with `R`-row register tiles; `WIDE`: the softmax in AVX-512 intrinsics
/// (`math::exp_row_avx512`, the same values as the portable code).
#[inline(always)]
fn attend_tiles<const FMA: bool, const R: usize, const WIDE: bool>(
    hv: &HeadView,
    scratch: &mut Scratch,
    mut out: impl FnMut(usize, &[f32]),
) {
    let (d, len) = (hv.d, hv.len);
    let dp = round_up(d, TC);
    if let Some(rel) = &hv.rel {
        prepare_rel(hv, rel, scratch);
    }
    for q0 in (0..len).step_by(QBLOCK) {
        let rows = QBLOCK.min(len - q0);
        let rows_p = round_up(rows, TR);
        let (k0, k1) = match hv.window {
            Some(w) => (q0.saturating_sub(w / 2), (q0 + rows + w / 2).min(len)),
            None => (0, len),
        };
        let keys = k1 - k0;
        let keys_p = round_up(keys, TC);
        // Pack K and V only when the key range changes (always, for windows; once, otherwise).
        if q0 == 0 || hv.window.is_some() {
            pack_kv(hv, k0, keys, keys_p, dp, scratch);
        }
        // Q block, pre-scaled, [rows_p, dp] zero-padded (only the padding is cleared when the
        // head size is whole: the rows are written in full below).
        if d == dp {
            grow(&mut scratch.q, rows_p * dp);
            scratch.q[rows * dp..rows_p * dp].fill(0.0);
        } else {
            scratch.q.clear();
            scratch.q.resize(rows_p * dp, 0.0);
        }
        for r in 0..rows {
            let src = &hv.qkv[(q0 + r) * hv.stride + hv.col..][..d];
            for (dst, s) in scratch.q[r * dp..r * dp + d].iter_mut().zip(src) {
                *dst = s * hv.scale;
            }
        }
        match &hv.rel {
            Some(rel) => rel_bias(hv, rel, q0, rows, keys_p, scratch),
            None => scratch.bias.clear(),
        }
        // Scores and outputs are overwritten in full by `block`: grow, never clear.
        grow(&mut scratch.s, rows_p * keys_p);
        grow(&mut scratch.o, rows_p * dp);
        let Scratch {
            q,
            kt,
            v,
            s,
            o,
            bias,
            ..
        } = scratch;
        block_tiles::<FMA, R, WIDE>(Block {
            q,
            kt,
            v,
            bias,
            s,
            o,
            rows_p,
            dp,
            keys,
            keys_p,
            offset: q0 as isize - k0 as isize,
            window: hv.window.unwrap_or(0) as isize,
        });
        for r in 0..rows {
            out(q0 + r, &o[r * dp..r * dp + d]);
        }
    }
}

fn grow(v: &mut Vec<f32>, n: usize) {
    if v.len() < n {
        v.resize(n, 0.0);
    }
}

/// Pack this head's keys `k0..k0 + keys`: Kᵀ in panels `[keys_p/TC][dp][TC]` (panel `t`, row `p`
/// holds dimension `p` of keys `t·TC..(t + 1)·TC`) and V in panels `[dp/TC][keys_p][TC]` (panel
/// `c`, row `j` holds dimensions `c·TC..(c + 1)·TC` of key `j`), zero-padded.
#[inline(always)]
fn pack_kv(hv: &HeadView, k0: usize, keys: usize, keys_p: usize, dp: usize, scratch: &mut Scratch) {
    let d = hv.d;
    let (kt, v) = (&mut scratch.kt, &mut scratch.v);
    if d == dp {
        // Every value of the real keys is written below: zero only the padded keys, the last
        // Kᵀ panel's columns and each V panel's rows past `keys` (a full clear of both was 1% of
        // a MiniLM forward).
        grow(kt, dp * keys_p);
        grow(v, keys_p * dp);
        if keys < keys_p {
            let (last, pad) = ((keys / TC) * dp * TC, keys % TC);
            for row in kt[last..dp * keys_p].chunks_exact_mut(TC) {
                row[pad..].fill(0.0);
            }
            for panel in v[..keys_p * dp].chunks_exact_mut(keys_p * TC) {
                panel[keys * TC..].fill(0.0);
            }
        }
    } else {
        for buf in [&mut *kt, &mut *v] {
            buf.clear();
            buf.resize(dp * keys_p, 0.0);
        }
    }
    pack_kt(hv, k0, keys, dp, kt);
    for j in 0..keys {
        let row = &hv.qkv[(k0 + j) * hv.stride + hv.col + 2 * hv.h..][..d];
        for (ct, src) in row.chunks(TC).enumerate() {
            let dst = &mut v[(ct * keys_p + j) * TC..][..TC];
            match (dst.first_chunk_mut::<TC>(), src.first_chunk::<TC>()) {
                (Some(dst), Some(src)) => *dst = *src,
                _ => dst[..src.len()].copy_from_slice(src),
            }
        }
    }
}

/// Write keys `k0..k0 + keys` of this head into the Kᵀ panels, 16 keys by 16 dimensions at a
/// time: each block is read as 16 rows and written as 16 columns. Left to itself, LLVM turns the
/// one-value-at-a-time transpose into AVX-512 scatters, which took 12% of the attention's time.
#[inline(always)]
#[allow(clippy::needless_range_loop)] // the transpose reads best indexed, as it was measured
fn pack_kt(hv: &HeadView, k0: usize, keys: usize, dp: usize, kt: &mut [f32]) {
    const B: usize = 16;
    const _: () = assert!(TC.is_multiple_of(B));
    let d = hv.d;
    let key = |j: usize| &hv.qkv[(k0 + j) * hv.stride + hv.col + hv.h..][..d];
    let at = |j: usize, p: usize| (j / TC) * dp * TC + p * TC + j % TC;
    let (whole_keys, whole_dims) = (keys - keys % B, d - d % B);
    for j0 in (0..whole_keys).step_by(B) {
        for p0 in (0..whole_dims).step_by(B) {
            let mut block = [[0f32; B]; B];
            for jj in 0..B {
                let src: &[f32; B] = key(j0 + jj)[p0..p0 + B].try_into().unwrap();
                for p in 0..B {
                    block[p][jj] = src[p];
                }
            }
            for (p, column) in block.iter().enumerate() {
                kt[at(j0, p0 + p)..][..B].copy_from_slice(column);
            }
        }
    }
    // The edges, one value at a time.
    for j in 0..keys {
        let from = if j < whole_keys { whole_dims } else { 0 };
        for (p, &x) in key(j).iter().enumerate().skip(from) {
            kt[at(j, p)] = x;
        }
    }
}

/// One query block's operands, all padded: `q` `[rows_p, dp]` (pre-scaled), `kt` and `v` as
/// [`pack_kv`] lays them out, `bias` `[rows_p, keys_p]` or empty, and the score and output
/// blocks. `offset` = first query row − first key row; `window` = 0 for global attention.
struct Block<'a> {
    q: &'a [f32],
    kt: &'a [f32],
    v: &'a [f32],
    bias: &'a [f32],
    s: &'a mut [f32],
    o: &'a mut [f32],
    rows_p: usize,
    dp: usize,
    keys: usize,
    keys_p: usize,
    offset: isize,
    window: isize,
}

/// Scores (plus `bias` when not empty), window mask, softmax and P·V for one query block, in
/// `TR`×32 register tiles. Each tile reads its rows through slices of known length, so the
/// inner loops carry no bounds checks.
// Long: one block's three steps in one body, as BENCHMARKS measured it; with P·V in a function
// of its own the d = 64 case ran 0.85-1.0x as fast (criterion, alternated, inside the noise).
#[inline(always)]
fn block_tiles<const FMA: bool, const TR: usize, const WIDE: bool>(b: Block) {
    let Block {
        q,
        kt,
        v,
        bias,
        s,
        o,
        rows_p,
        dp,
        keys,
        keys_p,
        offset,
        window,
    } = b;
    // S = Q · Kᵀ in TR×32 tiles, one Kᵀ panel at a time: it stays in L1 while every query tile
    // of the block reads it.
    for (jt, panel) in kt.chunks_exact(dp * TC).take(keys_p / TC).enumerate() {
        for i in (0..rows_p).step_by(TR) {
            let qs: [&[f32]; TR] = std::array::from_fn(|r| &q[(i + r) * dp..][..dp]);
            let mut acc = [[0f32; TC]; TR];
            for (p, krow) in panel.chunks_exact(TC).enumerate() {
                // Copies, so the tile row lives in registers across the TR rows.
                let k: [f32; TC] = krow.try_into().unwrap();
                for r in 0..TR {
                    let qv = qs[r][p];
                    for c in 0..TC {
                        acc[r][c] = math::madd::<FMA>(qv, k[c], acc[r][c]);
                    }
                }
            }
            for r in 0..TR {
                s[(i + r) * keys_p + jt * TC..][..TC].copy_from_slice(&acc[r]);
            }
        }
    }
    // Mask and exponentiate each row over the real keys; padded keys get weight 0.
    let mut inv_sum = [0f32; QBLOCK];
    for i in 0..rows_p {
        let row = &mut s[i * keys_p..(i + 1) * keys_p];
        if !bias.is_empty() {
            for (x, b) in row[..keys].iter_mut().zip(&bias[i * keys_p..]) {
                *x += b;
            }
        }
        if window > 0 {
            let qi = i as isize + offset;
            for (j, x) in row[..keys].iter_mut().enumerate() {
                if (qi - j as isize).abs() > window / 2 {
                    *x = f32::NEG_INFINITY;
                }
            }
        }
        // Unnormalised: P·V rows are divided by the sum afterwards (one pass fewer over S).
        let real = &mut row[..keys];
        #[cfg(target_arch = "x86_64")]
        let sum = if WIDE {
            // SAFETY: `WIDE` is set only by `attend`'s AVX-512 variant, after checking the CPU.
            unsafe { math::exp_row_avx512(real) }
        } else {
            math::exp_row::<FMA>(real)
        };
        #[cfg(not(target_arch = "x86_64"))]
        let sum = math::exp_row::<FMA>(real);
        inv_sum[i] = 1.0 / sum;
        row[keys..].iter_mut().for_each(|x| *x = 0.0);
    }
    // O = P · V in TR×32 tiles over the head dimension, one V panel at a time, its keys in
    // chunks of KC that stay in L1 while every query tile of the block reads them. A tile's
    // partial sums wait in `o` between chunks (stored and reloaded exactly, so the sum over the
    // keys runs in the same order as in one pass).
    for (ct, panel) in v.chunks_exact(keys_p * TC).take(dp / TC).enumerate() {
        let c0 = ct * TC;
        for k0 in (0..keys).step_by(KC) {
            let k1 = (k0 + KC).min(keys);
            for i in (0..rows_p).step_by(TR) {
                let mut acc = [[0f32; TC]; TR];
                if k0 > 0 {
                    for (r, a) in acc.iter_mut().enumerate() {
                        *a = o[(i + r) * dp + c0..][..TC].try_into().unwrap();
                    }
                }
                let ps: [&[f32]; TR] =
                    std::array::from_fn(|r| &s[(i + r) * keys_p + k0..][..k1 - k0]);
                for (j, vrow) in panel[k0 * TC..k1 * TC].chunks_exact(TC).enumerate() {
                    let vv: [f32; TC] = vrow.try_into().unwrap();
                    for r in 0..TR {
                        let pv = ps[r][j];
                        for c in 0..TC {
                            acc[r][c] = math::madd::<FMA>(pv, vv[c], acc[r][c]);
                        }
                    }
                }
                for r in 0..TR {
                    // Normalised after the last chunk.
                    let inv = if k1 == keys { inv_sum[i + r] } else { 1.0 };
                    for (dst, a) in o[(i + r) * dp + c0..][..TC].iter_mut().zip(acc[r]) {
                        *dst = a * inv;
                    }
                }
            }
        }
    }
}

/// Copy one head's output row: fixed-size copies for the usual head sizes, inlined, where
/// `copy_from_slice` of a runtime length is a `memcpy` call per row.
#[inline(always)]
pub fn copy_head(dst: &mut [f32], src: &[f32]) {
    fn fixed<const N: usize>(dst: &mut [f32], src: &[f32]) -> bool {
        if dst.len() != N {
            return false;
        }
        match (dst.first_chunk_mut::<N>(), src.first_chunk::<N>()) {
            (Some(dst), Some(src)) => {
                *dst = *src;
                true
            }
            _ => false,
        }
    }
    if !(fixed::<32>(dst, src) || fixed::<64>(dst, src) || fixed::<128>(dst, src)) {
        dst.copy_from_slice(src);
    }
}
