//! The op checks shared by the GPU backends' tests (`wgpu_ops.rs`, `cuda_ops.rs`): every op
//! against the CPU op on fresh random inputs at awkward sizes (not multiples of any tile). The
//! backend under test should poison its outputs (NaN) so a value an op forgets to write fails.

use super::{assert_matches, Prec, Rng};
use mira::engine::backend::cpu::CpuBackend;
use mira::engine::backend::{Backend, EmbeddingTables, Ntk, RelativeKey, Rotary};
use mira::engine::{Activation, Batch, LinearKind, Pooling};

const ACTS: [Activation; 6] = Activation::ALL;

fn batch(lens: &[usize], vocab: u32) -> Batch {
    let seqs: Vec<Vec<u32>> = lens
        .iter()
        .enumerate()
        .map(|(s, &l)| {
            (0..l as u32)
                .map(|t| (t * 7 + s as u32 * 3) % vocab)
                .collect()
        })
        .collect();
    Batch::from_sequences(seqs.iter().enumerate().map(|(d, s)| (d, &s[..])))
}

/// Upload the same host matrix to both backends.
fn pair<B: Backend>(
    gpu: &B,
    data: &[f32],
    rows: usize,
    cols: usize,
) -> (<CpuBackend as Backend>::Tensor, B::Tensor) {
    (
        CpuBackend::default()
            .weight(data.to_vec(), rows, cols)
            .unwrap(),
        gpu.weight(data.to_vec(), rows, cols).unwrap(),
    )
}

pub fn linear_every_activation_and_awkward_shape<B: Backend>(gpu: &B, prec: Prec) {
    let mut rng = Rng(0x11ea);
    // k = 0 is the bias alone (on CUDA, the bias goes through bias_act rather than cuBLASLt).
    for &(m, k, n) in &[
        (1, 1, 1),
        (37, 45, 70),
        (130, 67, 129),
        (65, 384, 1537),
        (9, 0, 37),
    ] {
        for (i, &act) in ACTS.iter().enumerate() {
            let with_bias = i % 2 == 0 || m == 1;
            let x = rng.vec(m * k, 1.0);
            let w = rng.vec(n * k, 1.0 / (k as f64).sqrt());
            let b = rng.vec(n, 0.5);
            let (xc, xg) = pair(gpu, &x, m, k);
            let (wc, wg) = pair(gpu, &w, n, k);
            let (bc, bg) = pair(gpu, &b, 1, n);
            let want = CpuBackend::default()
                .linear(&xc, &wc, with_bias.then_some(&bc), act)
                .unwrap();
            let got = gpu.linear(&xg, &wg, with_bias.then_some(&bg), act).unwrap();
            assert_matches(
                &gpu.download(&got).unwrap(),
                want.data(),
                prec,
                &format!("linear {m}x{k}x{n} {act:?} bias={with_bias}"),
            );
        }
    }
}

/// `linear_weight` (an encoder layer's weight) on a GPU is stored as any weight: the layer
/// matches the CPU's f32 linear.
pub fn linear_weights_are_plain_weights<B: Backend>(gpu: &B, prec: Prec) {
    let mut rng = Rng(0x1a7e);
    let (m, k, n) = (37, 45, 70);
    let x = rng.vec(m * k, 1.0);
    let w = rng.vec(n * k, 1.0 / (k as f64).sqrt());
    let (xc, xg) = pair(gpu, &x, m, k);
    let wc = CpuBackend::default().weight(w.clone(), n, k).unwrap();
    let wg = gpu
        .linear_weight(w, n, k, LinearKind::FeedForwardDown)
        .unwrap();
    let want = CpuBackend::default()
        .linear(&xc, &wc, None, Activation::Gelu)
        .unwrap();
    let got = gpu.linear(&xg, &wg, None, Activation::Gelu).unwrap();
    assert_matches(
        &gpu.download(&got).unwrap(),
        want.data(),
        prec,
        "linear through linear_weight",
    );
}

/// Embedding tables on `be` from host data `[word, position, token type, gamma, beta]`.
fn tables<B: Backend>(
    be: &B,
    host: [&Vec<f32>; 5],
    vocab: usize,
    max_pos: usize,
    h: usize,
    extras: bool,
) -> EmbeddingTables<B::Tensor> {
    let up = |d: &Vec<f32>, r: usize| be.weight(d.clone(), r, h).unwrap();
    EmbeddingTables {
        word: up(host[0], vocab),
        position: extras.then(|| up(host[1], max_pos)),
        token_type: extras.then(|| up(host[2], 1)),
        norm_weight: up(host[3], 1),
        norm_bias: extras.then(|| up(host[4], 1)),
        eps: 1e-12,
    }
}

pub fn embed_with_and_without_positions_types_and_bias<B: Backend>(gpu: &B, prec: Prec) {
    let mut rng = Rng(0xe3bed);
    for &(h, with_extras) in &[(45usize, true), (384, false), (768, true), (769, true)] {
        let (vocab, max_pos) = (23usize, 300usize);
        let word = rng.vec(vocab * h, 1.0);
        let pos = rng.vec(max_pos * h, 0.5);
        let tt = rng.vec(h, 0.5);
        let gamma = rng.vec(h, 1.0);
        let beta = rng.vec(h, 0.2);
        let host = [&word, &pos, &tt, &gamma, &beta];
        let tc = tables(&CpuBackend::default(), host, vocab, max_pos, h, with_extras);
        let tg = tables(gpu, host, vocab, max_pos, h, with_extras);
        let b = batch(&[1, 70, 3, 129], vocab as u32);
        let want = CpuBackend::default()
            .embed(
                &CpuBackend::default()
                    .upload_batch(&b, vocab, max_pos)
                    .unwrap(),
                &tc,
            )
            .unwrap();
        let got = gpu
            .embed(&gpu.upload_batch(&b, vocab, max_pos).unwrap(), &tg)
            .unwrap();
        assert_matches(
            &gpu.download(&got).unwrap(),
            want.data(),
            prec,
            &format!("embed h={h} extras={with_extras}"),
        );
    }
}

pub fn residual_layernorms_in_every_mode<B: Backend>(gpu: &B, prec: Prec) {
    let mut rng = Rng(0x1a7e);
    // One warp per row on CUDA: 8 (one vector), 384, 1024 (the widest); one block per row: the
    // others (odd widths, or past 1,024).
    for &cols in &[1usize, 8, 45, 384, 769, 1024, 4096] {
        let rows = 67;
        let x = rng.vec(rows * cols, 2.0);
        let r = rng.vec(rows * cols, 2.0);
        let gamma = rng.vec(cols, 1.0);
        let beta = rng.vec(cols, 0.3);
        let (rc, rg) = pair(gpu, &r, rows, cols);
        let (gc, gg) = pair(gpu, &gamma, 1, cols);
        let (bc, bg) = pair(gpu, &beta, 1, cols);
        for with_bias in [true, false] {
            let what = format!("{cols} cols, bias={with_bias}");
            let (bc, bg) = (with_bias.then_some(&bc), with_bias.then_some(&bg));
            // Post-norm, in place.
            let (xc, xg) = pair(gpu, &x, rows, cols);
            let want = CpuBackend::default()
                .add_layernorm(xc, &rc, &gc, bc, 1e-5)
                .unwrap();
            let got = gpu.add_layernorm(xg, &rg, &gg, bg, 1e-5).unwrap();
            assert_matches(
                &gpu.download(&got).unwrap(),
                want.data(),
                prec,
                &format!("add_layernorm {what}"),
            );
            // Pre-norm step: the residual stream and its normalised copy.
            let (mut xc, mut xg) = pair(gpu, &x, rows, cols);
            let want = CpuBackend::default()
                .add_norm(&mut xc, &rc, &gc, bc, 1e-5)
                .unwrap();
            let got = gpu.add_norm(&mut xg, &rg, &gg, bg, 1e-5).unwrap();
            assert_matches(
                &gpu.download(&got).unwrap(),
                want.data(),
                prec,
                &format!("add_norm {what}"),
            );
            assert_matches(
                &gpu.download(&xg).unwrap(),
                xc.data(),
                prec,
                &format!("add_norm residual {what}"),
            );
            // Plain.
            let (xc, xg) = pair(gpu, &x, rows, cols);
            let want = CpuBackend::default().layernorm(&xc, &gc, bc, 1e-5).unwrap();
            let got = gpu.layernorm(&xg, &gg, bg, 1e-5).unwrap();
            assert_matches(
                &gpu.download(&got).unwrap(),
                want.data(),
                prec,
                &format!("layernorm {what}"),
            );
        }
    }
}

/// DeBERTa's terms with the content-to-position and position-to-content tables switched on or
/// off, scaled by one plus the terms on, as a config's `pos_att_type` would.
fn relative_terms<'a, T>(
    pos_key: &'a T,
    pos_query: &'a T,
    (c2p, p2c): (bool, bool),
    (span, buckets, max_relative): (usize, usize, usize),
) -> mira::engine::backend::Disentangled<'a, T> {
    mira::engine::backend::Disentangled {
        pos_key: c2p.then_some(pos_key),
        pos_query: p2c.then_some(pos_query),
        span,
        buckets,
        max_relative,
        scale_factor: 1 + c2p as usize + p2c as usize,
    }
}

/// DeBERTa's disentangled attention against the CPU's: log-bucketed (v3-like), plain clamped
/// and v3-base's relative ranges; each term alone and both; head sizes 8-80; ragged batches
/// around the 64-query block, a lone token, and a 600-token sequence whose distances pass
/// v3-base's bucket range (512) and the table's last row. A later batch with longer sequences
/// than the first grows the backend's cached index table.
pub fn disentangled_attention_at_every_term_and_range<B: Backend>(gpu: &B, prec: Prec) {
    let mut rng = Rng(0xdeb);
    let cpu = CpuBackend::default();
    // (span, buckets, max_relative), (heads, d), sequence lengths.
    let cases: [(RelativeKey, (usize, usize), &[usize]); 6] = [
        ((8, 8, 32), (3, 8), &[5, 63, 64]),
        ((8, 8, 32), (2, 64), &[65, 1, 130]),
        ((16, 0, 16), (1, 80), &[1, 40]),
        ((16, 0, 16), (2, 32), &[65, 1, 130]),
        ((256, 256, 512), (2, 16), &[5, 63, 64]),
        ((256, 256, 512), (1, 16), &[600, 7]),
    ];
    for ((span, buckets, max_relative), (heads, d), lens) in cases {
        let h = heads * d;
        let b = batch(lens, 50);
        let t = b.ids.len();
        let (qc, qg) = pair(gpu, &rng.vec(t * 3 * h, 1.0), t, 3 * h);
        let (kc, kg) = pair(gpu, &rng.vec(2 * span * h, 1.0), 2 * span, h);
        let (pc, pg) = pair(gpu, &rng.vec(2 * span * h, 1.0), 2 * span, h);
        let bc = cpu.upload_batch(&b, 50, 1024).unwrap();
        let bg = gpu.upload_batch(&b, 50, 1024).unwrap();
        let rel = (span, buckets, max_relative);
        for (c2p, p2c) in [(true, true), (true, false), (false, true)] {
            let want = cpu
                .attention_disentangled(&qc, &bc, heads, &relative_terms(&kc, &pc, (c2p, p2c), rel))
                .unwrap();
            let got = gpu
                .attention_disentangled(&qg, &bg, heads, &relative_terms(&kg, &pg, (c2p, p2c), rel))
                .unwrap();
            assert_matches(
                &gpu.download(&got).unwrap(),
                want.data(),
                prec,
                &format!(
                    "disentangled heads={heads} d={d} lens={lens:?} rel=({span}, {buckets}, \
                     {max_relative}) c2p={c2p} p2c={p2c}"
                ),
            );
        }
    }
    // The relative table covers the longest sequence, not the largest position id: a batch
    // whose positions all read 0 (which nothing forbids) attends as the CPU does.
    let mut b = batch(&[130, 3], 50);
    b.positions.iter_mut().for_each(|p| *p = 0);
    let (h, t) = (16, b.ids.len());
    let (qc, qg) = pair(gpu, &rng.vec(t * 3 * h, 1.0), t, 3 * h);
    // (Terms no earlier case used, so no cached table hides a short one.)
    let (kc, kg) = pair(gpu, &rng.vec(2 * 4 * h, 1.0), 2 * 4, h);
    let rel = (4, 4, 16);
    let want = cpu
        .attention_disentangled(
            &qc,
            &cpu.upload_batch(&b, 50, 512).unwrap(),
            1,
            &relative_terms(&kc, &kc, (true, true), rel),
        )
        .unwrap();
    let got = gpu
        .attention_disentangled(
            &qg,
            &gpu.upload_batch(&b, 50, 512).unwrap(),
            1,
            &relative_terms(&kg, &kg, (true, true), rel),
        )
        .unwrap();
    assert_matches(
        &gpu.download(&got).unwrap(),
        want.data(),
        prec,
        "disentangled with every position 0",
    );
    // A table of the wrong shape is an error naming it, as on the CPU.
    let b = batch(&[4], 50);
    let bg = gpu.upload_batch(&b, 50, 512).unwrap();
    let qkv = gpu.weight(rng.vec(4 * 48, 1.0), 4, 48).unwrap();
    let bad = gpu.weight(rng.vec(3 * 16, 1.0), 3, 16).unwrap();
    let rel = mira::engine::backend::Disentangled {
        pos_key: Some(&bad),
        pos_query: None,
        span: 4,
        buckets: 0,
        max_relative: 4,
        scale_factor: 2,
    };
    let err = match gpu.attention_disentangled(&qkv, &bg, 2, &rel) {
        Ok(_) => panic!("a [3, 16] pos_key for span 4 was accepted"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        err.contains("pos_key is [3, 16], expected [8, 16]"),
        "{err}"
    );
}

pub fn varlen_attention_global_and_windowed_at_several_head_sizes<B: Backend>(gpu: &B, prec: Prec) {
    let mut rng = Rng(0xa77e);
    // Sequences shorter than, equal to and longer than a 64-query block, and a lone token.
    let lens = [1usize, 63, 64, 65, 130, 3, 200];
    for &(heads, d) in &[
        (3usize, 32usize),
        (2, 64),
        (1, 8),
        (2, 96),
        (1, 128),
        (2, 16),
    ] {
        let h = heads * d;
        let b = batch(&lens, 50);
        let t = b.ids.len();
        let qkv = rng.vec(t * 3 * h, 1.0);
        let (qc, qg) = pair(gpu, &qkv, t, 3 * h);
        let bc = CpuBackend::default().upload_batch(&b, 50, 512).unwrap();
        let bg = gpu.upload_batch(&b, 50, 512).unwrap();
        for window in [None, Some(8), Some(6), Some(128)] {
            let want = CpuBackend::default()
                .attention(&qc, &bc, heads, window)
                .unwrap();
            let got = gpu.attention(&qg, &bg, heads, window).unwrap();
            assert_matches(
                &gpu.download(&got).unwrap(),
                want.data(),
                prec,
                &format!("attention heads={heads} d={d} window={window:?}"),
            );
        }
    }
}

pub fn rope_at_sequence_positions<B: Backend>(gpu: &B, prec: Prec) {
    let mut rng = Rng(0x40be);
    let ntk = Some(Ntk {
        factor: 2.0,
        mixed_b: None,
    });
    for &(heads, d, theta, ntk) in &[
        (2usize, 16usize, 10_000f32, None),
        (3, 64, 160_000.0, None),
        (2, 32, 500_000.0, ntk),
    ] {
        let rotary = Rotary { theta, ntk };
        let h = heads * d;
        let b = batch(&[5, 300, 1, 77], 50);
        let t = b.ids.len();
        let qkv = rng.vec(t * 3 * h, 1.0);
        let (qc, qg) = pair(gpu, &qkv, t, 3 * h);
        let want = CpuBackend::default()
            .rope(
                qc,
                &CpuBackend::default().upload_batch(&b, 50, 512).unwrap(),
                heads,
                rotary,
            )
            .unwrap();
        let got = gpu
            .rope(qg, &gpu.upload_batch(&b, 50, 512).unwrap(), heads, rotary)
            .unwrap();
        assert_matches(
            &gpu.download(&got).unwrap(),
            want.data(),
            prec,
            &format!("rope heads={heads} d={d} theta={theta} ntk={ntk:?}"),
        );
    }
}

pub fn geglu_every_activation<B: Backend>(gpu: &B, prec: Prec) {
    let mut rng = Rng(0x9e91);
    // Odd widths, and widths the CUDA kernel takes 16 bytes at a time (multiples of 8).
    for &(rows, inner) in &[(1usize, 1usize), (77, 1153), (3, 8), (33, 1152)] {
        let x = rng.vec(rows * 2 * inner, 3.0);
        let (xc, xg) = pair(gpu, &x, rows, 2 * inner);
        for act in ACTS {
            let want = CpuBackend::default().geglu(&xc, act).unwrap();
            let got = gpu.geglu(&xg, act).unwrap();
            assert_matches(
                &gpu.download(&got).unwrap(),
                want.data(),
                prec,
                &format!("geglu {rows}x{inner} {act:?}"),
            );
        }
    }
}

pub fn cls_and_mean_pooling<B: Backend>(gpu: &B, prec: Prec) {
    let mut rng = Rng(0x9001);
    let b = batch(&[1, 70, 3, 129, 2], 50);
    let (t, h) = (b.ids.len(), 385);
    let x = rng.vec(t * h, 1.0);
    let (xc, xg) = pair(gpu, &x, t, h);
    let bc = CpuBackend::default().upload_batch(&b, 50, 512).unwrap();
    let bg = gpu.upload_batch(&b, 50, 512).unwrap();
    for mode in [Pooling::Cls, Pooling::Mean, Pooling::ClsAndMean] {
        let want = CpuBackend::default().pool(&xc, &bc, mode).unwrap();
        let got = gpu.pool(&xg, &bg, mode).unwrap();
        assert_matches(
            &gpu.download(&got).unwrap(),
            want.data(),
            prec,
            &format!("pool {mode:?}"),
        );
    }
}

pub fn malformed_batches_and_shapes_are_errors<B: Backend>(gpu: &B, _prec: Prec) {
    let b = batch(&[4, 2], 50);
    assert!(
        gpu.upload_batch(&b, 3, 512).is_err(),
        "ids beyond the vocabulary"
    );
    assert!(
        gpu.upload_batch(&b, 50, 2).is_err(),
        "positions beyond the table"
    );
    let x = gpu.weight(vec![0.5; 6 * 4], 6, 4).unwrap();
    let w = gpu.weight(vec![0.5; 3 * 5], 3, 5).unwrap();
    let err = gpu
        .linear(&x, &w, None, Activation::None)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("columns"), "{err}");
    let bg = gpu.upload_batch(&b, 50, 512).unwrap();
    let qkv = gpu.weight(vec![0.5; 6 * 9], 6, 9).unwrap();
    let err = gpu.attention(&qkv, &bg, 2, None).err().unwrap().to_string();
    assert!(err.contains("heads"), "{err}");
    let qkv = gpu.weight(vec![0.5; 6 * 12], 6, 12).unwrap();
    let err = gpu
        .attention(&qkv, &bg, 2, Some(0))
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("window"), "{err}");
}

/// A batch of many short sequences needs more attention workgroups than fit one grid dimension
/// on adapters with small limits; and 1-token sequences exercise the block list's edges.
pub fn many_single_token_sequences<B: Backend>(gpu: &B, prec: Prec) {
    let mut rng = Rng(0x5);
    let lens = vec![1usize; 3000];
    let b = batch(&lens, 50);
    let (heads, d) = (2, 32);
    let qkv = rng.vec(b.ids.len() * 3 * heads * d, 1.0);
    let (qc, qg) = pair(gpu, &qkv, b.ids.len(), 3 * heads * d);
    let want = CpuBackend::default()
        .attention(
            &qc,
            &CpuBackend::default().upload_batch(&b, 50, 512).unwrap(),
            heads,
            None,
        )
        .unwrap();
    let got = gpu
        .attention(&qg, &gpu.upload_batch(&b, 50, 512).unwrap(), heads, None)
        .unwrap();
    assert_matches(
        &gpu.download(&got).unwrap(),
        want.data(),
        prec,
        "attention over 3,000 one-token sequences",
    );
}
