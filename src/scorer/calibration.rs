//! Calibration of a freshly loaded model on fixed built-in texts, for backends that quantize
//! with statistics of the activations (the CPU's int8 layers, `Backend::set_calibrating`): the
//! same texts on every load, so a model's int8 numbers depend only on the model and the
//! token limit, never on the corpus. The texts mix what mira scores (prose, code, Q&A,
//! markup, several scripts); they were written for this purpose and are not in any test set.

use anyhow::Result;

use super::Scorer;

/// The calibration texts (each truncated to the scorer's token limit).
const TEXTS: &[&str] = &[
    "Data selection for mid-training starts from a mixture of sources: crawled web pages, \
     documentation, question-and-answer threads with worked reasoning, and transcripts of agents \
     using tools. Each source has its own idea of quality. A tutorial is good when its steps can \
     be followed in order and its examples run; a forum answer is good when it addresses the \
     question asked, explains why, and admits what it does not know. Scoring every record with \
     one rubric rewards whatever that rubric happened to describe, so the pipeline first groups \
     sources by what their records look like, then lets a teacher model propose the dimensions \
     that matter for each group, and finally trains small students to score the whole corpus. \
     The expensive part is the last step, which touches every token once.",
    "fn merge_sorted(a: &[i64], b: &[i64]) -> Vec<i64> {\n    let (mut i, mut j) = (0, 0);\n    \
     let mut out = Vec::with_capacity(a.len() + b.len());\n    while i < a.len() && j < b.len() {\n\
     \x20       if a[i] <= b[j] { out.push(a[i]); i += 1; } else { out.push(b[j]); j += 1; }\n    }\n\
     \x20   out.extend_from_slice(&a[i..]);\n    out.extend_from_slice(&b[j..]);\n    out\n}\n\n\
     def histogram(values, bins=10):\n    lo, hi = min(values), max(values)\n    width = (hi - lo) \
     / bins or 1.0\n    counts = [0] * bins\n    for v in values:\n        counts[min(int((v - lo) \
     / width), bins - 1)] += 1\n    return counts\n\n# SELECT source, COUNT(*) AS n FROM records \
     WHERE tokens > 512 GROUP BY source ORDER BY n DESC;",
    "Q: Why does my training loss spike every few thousand steps?\nA: Check three things in \
     order. First, whether the spikes line up with the data loader reaching a new shard: a shard \
     of near-duplicate or very long documents shifts the batch statistics. Second, the learning \
     rate schedule; warm restarts produce exactly this pattern. Third, numerical issues: with \
     bf16 activations an attention logit above 65,504 is not the problem (that is f16's limit), \
     but a LayerNorm over a nearly constant row can still divide by a tiny variance. Log the \
     largest activation per layer for one spike before changing anything. In my case it was \
     the shard order, and shuffling at the document level fixed it (loss 2.31 -> 2.28).",
    "Die Auswahl der Trainingsdaten entscheidet oft mehr über die Qualität eines Modells als \
     seine Größe. La selección de datos no es un filtro único: cada fuente necesita sus propios \
     criterios. Le tri des documents se fait par groupes de sources semblables, puis chaque \
     groupe reçoit ses propres critères. Отбор данных начинается с группировки источников по \
     содержанию. 数据筛选首先按内容相似度对来源分组，然后为每一组生成评分标准。\
     データの選別は、まず内容の似た情報源をまとめることから始まる。 \
     데이터 선택은 출처를 내용에 따라 묶는 것에서 시작한다. तथ्य और तर्क दोनों की जाँच होनी \
     चाहिए। البيانات الجيدة تشرح الخطوات بوضوح وتذكر مصادرها.",
    "<!DOCTYPE html><html><head><title>Release notes 4.2</title></head><body><h1>What's new \
     </h1><ul><li>Streaming reader for <code>.jsonl.zst</code> files (up to 3x faster)</li>\
     <li>Fixed: resume after an interrupted run wrote duplicate rows</li></ul><table><tr><th>\
     metric</th><th>before</th><th>after</th></tr><tr><td>docs/s</td><td>1,204</td><td>3,877\
     </td></tr></table></body></html>\n{\"id\": \"rec-000173\", \"source\": \"forum/python\", \
     \"score\": 7.5, \"tags\": [\"asyncio\", \"timeout\"], \"accepted\": true, \"url\": null}\n\
     | step | tool call | result |\n|---|---|---|\n| 1 | `ls -la /data` | 14 files |\n| 2 | \
     `grep -c ERROR app.log` | 3 |",
    "Theorem. Every bounded monotone sequence of real numbers converges. Proof sketch: let \
     (a_n) be increasing and bounded above, and let L = sup a_n, which exists by completeness. \
     For any e > 0, L - e is not an upper bound, so a_N > L - e for some N, and then \
     L - e < a_n <= L for all n >= N. Hence |a_n - L| < e. Exercise: show that \
     x_{n+1} = sqrt(2 + x_n) with x_0 = 0 converges, and find its limit (2). Units check: \
     9.81 m/s^2 * 3 s = 29.43 m/s; E = mc^2 = 1 kg * (3e8 m/s)^2 = 9e16 J. ### ANSWER: 2",
];

impl Scorer {
    /// Run [`TEXTS`] through every engine whose backend calibrates, between the start and the
    /// end of its calibration; a no-op elsewhere.
    pub(super) fn calibrate(&self) -> Result<()> {
        let engines: Vec<_> = self
            .engines
            .iter()
            .filter(|e| e.set_calibrating(true))
            .collect();
        if engines.is_empty() {
            return Ok(());
        }
        let batches = self.packer.pack(&self.tokenize(TEXTS)?);
        for engine in engines {
            let run = batches
                .iter()
                .try_for_each(|b| self.forward_on(engine.as_ref(), b).map(drop));
            engine.set_calibrating(false);
            run?;
        }
        Ok(())
    }
}
