//! `scoring = "probabilities"` for `mira label`: one request per (record, anchor), and the
//! anchor's score is the expected value of the teacher's next-token distribution over the
//! digits of a 1-5 scale, mapped to 0-10 (the G-Eval recipe).
//!
//! Why: a sampled integer from a small or undecided judge collapses to one value (SmolLM2-135M
//! writes 0 on every anchor for most records), while the probabilities behind it still order
//! documents. Each request asks for one digit, constrained by an integer schema where the server
//! supports one, with `top_logprobs`; the reply position used is the first whose sampled token is
//! a scale digit (else the first position), and the digits among its most likely tokens are
//! renormalised. The document comes before the criterion in the prompt, so a server with prompt
//! caching (llama-server, vLLM, SGLang) reuses the document's prefix across a record's anchors.
//!
//! Needs a server that returns `top_logprobs` in OpenAI's chat format
//! (`choices[0].logprobs.content[].top_logprobs`: vLLM, SGLang, llama-server, OpenAI); a reply
//! without them is an error that says so, and is not asked again. A reply asked again because no
//! digit had probability is sampled at temperature 0.7, like every retry; servers that report
//! probabilities after temperature then score it from a flatter distribution.

use std::fmt;
use std::str::FromStr;

use anyhow::{anyhow, bail, Result};
use serde_json::{json, Map, Value};

use super::teacher::{ChatRequest, Teacher};
use super::{clip, source_of, Anchor};

/// How `mira label` turns a teacher's replies into scores.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Scoring {
    /// One request per record: a rationale and an integer 0-10 per anchor, in one JSON reply.
    #[default]
    Reply,
    /// One request per (record, anchor): the expected 1-5 digit under the teacher's
    /// probabilities, mapped to 0-10.
    Probabilities,
}

impl FromStr for Scoring {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Scoring> {
        match s {
            "reply" => Ok(Scoring::Reply),
            "probabilities" => Ok(Scoring::Probabilities),
            other => bail!("scoring '{other}': expected 'reply' or 'probabilities'"),
        }
    }
}

impl fmt::Display for Scoring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Scoring::Reply => "reply",
            Scoring::Probabilities => "probabilities",
        })
    }
}

/// The error of a request that asked for `top_logprobs` and got a reply without them.
pub const NO_LOGPROBS: &str = "the teacher returned no logprobs (choices[0].logprobs.content) for \
a request that asked for top_logprobs; scoring = \"probabilities\" (--scoring probabilities) needs \
a server that returns them (vLLM, SGLang, llama-server, OpenAI), else use scoring = \"reply\" \
(--scoring reply)";

/// The scale the teacher answers on: single digits in every tokenizer.
pub const SCALE: std::ops::RangeInclusive<u8> = 1..=5;

/// How many of the most likely tokens each reply position reports (OpenAI's maximum).
pub const TOP_LOGPROBS: u8 = 20;

pub const RATE_SYSTEM: &str = "You are an expert data curator rating documents that may be used \
to train a language model. Rate how well the document meets one quality criterion. Reply with \
one digit only.";

/// The request for one anchor of one record.
pub fn rate_request(anchor: &Anchor, source: &str, text: &str, max_chars: usize) -> ChatRequest {
    let user = format!(
        "Source: {source}\n\nDocument:\n<<<\n{}\n>>>\n\nCriterion: {}: {}\n\nHow well does the \
         document meet this criterion? Reply with one digit from {} (not at all) to {} (fully).",
        clip(text, max_chars),
        anchor.name,
        anchor.definition,
        SCALE.start(),
        SCALE.end(),
    );
    ChatRequest {
        system: RATE_SYSTEM.to_string(),
        user,
        schema: Some(json!({"type": "integer", "minimum": SCALE.start(), "maximum": SCALE.end()})),
        // A digit, with room for a leading space or quote where no grammar constrains it.
        max_tokens: 4,
        top_logprobs: Some(TOP_LOGPROBS),
        ..Default::default()
    }
}

/// What decides a `probabilities` request apart from the record and anchor (the `mira run`
/// label step's fingerprint includes it, so a changed prompt labels again).
pub fn request_fingerprint() -> Value {
    let anchor = Anchor {
        name: String::new(),
        definition: String::new(),
        exemplars: Vec::new(),
        cluster_size: 0,
        teacher_name: String::new(),
    };
    let r = rate_request(&anchor, "", "", 0);
    json!({"messages": r.messages(), "schema": r.schema, "max_tokens": r.max_tokens,
           "top_logprobs": r.top_logprobs, "scale": [SCALE.start(), SCALE.end()]})
}

/// The scale digit a token stands for, ignoring surrounding whitespace and quotes.
fn digit(token: &str) -> Option<u8> {
    let t = token.trim().trim_matches(['"', '\'']);
    let d: u8 = t.parse().ok()?;
    (t.len() == 1 && SCALE.contains(&d)).then_some(d)
}

/// One anchor's score from a reply made by [`Teacher`] with logprobs
/// ([`super::teacher::with_logprobs`]): 0-10, and the renormalised digit probabilities with
/// the share of probability the digits had (for the rationale).
pub fn expected_score(reply: &str) -> Result<(f64, String)> {
    let v: Value = serde_json::from_str(reply).map_err(|e| anyhow!("not a logprobs reply: {e}"))?;
    let tokens = v["tokens"].as_array().map(Vec::as_slice).unwrap_or(&[]);
    if tokens.is_empty() {
        bail!("{NO_LOGPROBS}");
    }
    let at = tokens
        .iter()
        .position(|t| t["token"].as_str().and_then(digit).is_some())
        .unwrap_or(0);
    let mut p = [0.0f64; 5];
    for alt in tokens[at]["top"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or(&[])
    {
        let (Some(d), Some(lp)) = (
            alt["token"].as_str().and_then(digit),
            alt["logprob"].as_f64(),
        ) else {
            continue;
        };
        if lp.is_finite() {
            p[usize::from(d - SCALE.start())] += lp.exp();
        }
    }
    let mass: f64 = p.iter().sum();
    if mass.is_nan() || mass <= 0.0 {
        bail!(
            "no probability on the digits {}-{} among the reply's most likely tokens: {}",
            SCALE.start(),
            SCALE.end(),
            clip(v["content"].as_str().unwrap_or(""), 80)
        );
    }
    let mean: f64 = p
        .iter()
        .enumerate()
        .map(|(i, pi)| pi / mass * (i as f64 + f64::from(*SCALE.start())))
        .sum();
    let span = f64::from(SCALE.end() - SCALE.start());
    let score = 10.0 * (mean - f64::from(*SCALE.start())) / span;
    let shares: Vec<String> = p.iter().map(|pi| format!("{:.2}", pi / mass)).collect();
    let why = format!(
        "p({}..{}) = {}; digit mass {:.3}",
        SCALE.start(),
        SCALE.end(),
        shares.join(" "),
        mass
    );
    Ok(((score * 1e4).round() / 1e4, why))
}

/// Every request for a group's records, record by record, anchor by anchor (so one record's
/// requests are adjacent and share the document's prompt prefix).
pub fn rate_requests(
    anchors: &[Anchor],
    recs: &[crate::corpus::Record],
    max_chars: usize,
) -> Vec<ChatRequest> {
    recs.iter()
        .flat_map(|r| {
            let (source, text) = (source_of(r), r.text.as_deref().unwrap().to_string());
            anchors
                .iter()
                .map(move |a| rate_request(a, &source, &text, max_chars))
        })
        .collect()
}

/// Per record: the scores and rationales of every anchor, or why the record has none (every
/// anchor that failed, with its first error).
pub type RecordScores = Result<(Map<String, Value>, Map<String, Value>)>;

/// Score a group's records on each of its anchors by probabilities.
pub fn score_records(
    teacher: &Teacher,
    anchors: &[Anchor],
    recs: &[crate::corpus::Record],
    max_chars: usize,
    what: &str,
) -> Vec<RecordScores> {
    let reqs = rate_requests(anchors, recs, max_chars);
    let replies = teacher.ask_all(&reqs, what, expected_score);
    let mut out = Vec::with_capacity(recs.len());
    let mut replies = replies.into_iter();
    for _ in recs {
        let (mut scores, mut why, mut failed) = (Map::new(), Map::new(), Vec::new());
        for a in anchors {
            match replies.next().expect("one reply per (record, anchor)") {
                Ok((s, w)) => {
                    scores.insert(a.name.clone(), json!(s));
                    why.insert(a.name.clone(), json!(w));
                }
                Err(e) => failed.push(format!("{}: {e:#}", a.name)),
            }
        }
        out.push(if failed.is_empty() {
            Ok((scores, why))
        } else {
            Err(anyhow!("no score for {}", failed.join("; ")))
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(sampled: &[&str], top: &[(&str, f64)]) -> String {
        let top: Vec<Value> = top
            .iter()
            .map(|(t, p)| json!({"token": t, "logprob": p.ln()}))
            .collect();
        let tokens: Vec<Value> = sampled
            .iter()
            .map(|t| json!({"token": t, "logprob": -0.1, "top": top}))
            .collect();
        json!({"content": sampled.concat(), "tokens": tokens}).to_string()
    }

    #[test]
    fn the_score_is_the_expected_digit_mapped_to_0_10() {
        // Half on 2, half on 4: expected 3, the middle of 1-5, is 5.0 on 0-10.
        let (s, why) = expected_score(&reply(&["4"], &[("2", 0.5), ("4", 0.5)])).unwrap();
        assert!((s - 5.0).abs() < 1e-9, "{s}");
        assert!(why.contains("p(1..5) = 0.00 0.50 0.00 0.50 0.00"), "{why}");
        // Only the digits count, renormalised: 0.3 on "1", 0.1 on " 5", the rest on words.
        let r = reply(
            &["1"],
            &[("1", 0.3), ("The", 0.5), (" 5", 0.1), ("10", 0.1)],
        );
        let (s, _) = expected_score(&r).unwrap();
        // E = (0.3 * 1 + 0.1 * 5) / 0.4 = 2; (2 - 1) / 4 * 10 = 2.5.
        assert!((s - 2.5).abs() < 1e-9, "{s}");
        // Tokens that spell the same digit add up.
        let (s, _) = expected_score(&reply(&["5"], &[("5", 0.25), (" 5", 0.25)])).unwrap();
        assert_eq!(s, 10.0);
    }

    #[test]
    fn the_first_digit_position_is_used() {
        // A leading quote token, then the digit: the digit's alternatives decide.
        let quote =
            json!({"token": "\"", "logprob": -0.1, "top": [{"token": "\"", "logprob": 0.0}]});
        let digit = json!({"token": "3", "logprob": -0.1,
                           "top": [{"token": "3", "logprob": 0.0}]});
        let r = json!({"content": "\"3", "tokens": [quote, digit]}).to_string();
        assert_eq!(expected_score(&r).unwrap().0, 5.0);
    }

    #[test]
    fn replies_without_probabilities_on_the_scale_are_refused() {
        let none = json!({"content": "3", "tokens": []}).to_string();
        let e = expected_score(&none).unwrap_err().to_string();
        assert!(
            e.contains("no logprobs") && e.contains("scoring = \"reply\""),
            "{e}"
        );
        let words = reply(&["The"], &[("The", 0.9), ("0", 0.05), ("7", 0.05)]);
        let e = expected_score(&words).unwrap_err().to_string();
        assert!(e.contains("no probability on the digits 1-5"), "{e}");
        assert!(expected_score("3").is_err());
    }

    #[test]
    fn scoring_names_round_trip() {
        for s in [Scoring::Reply, Scoring::Probabilities] {
            assert_eq!(s.to_string().parse::<Scoring>().unwrap(), s);
        }
        assert!("logits".parse::<Scoring>().is_err());
    }
}
