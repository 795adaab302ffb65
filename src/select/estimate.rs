//! What a batch of teacher requests will cost, before any is sent: `mira discover --estimate`
//! and `mira label --estimate` print it and exit.
//!
//! The request count is exact: the same sampling and the same requests the step would send.
//! Requests whose first attempt is already in the response cache are free and counted apart.
//! Prompt tokens are estimated from the characters of the messages (4 per token, plus 4 per
//! message for the chat template); completion tokens are bounded by each request's
//! `max_tokens`, so the cost is an upper bound on completions. Retries and replies asked for
//! again are not foreseeable and not included.

use super::teacher::{ChatRequest, Teacher};

/// Characters per prompt token assumed by the estimate.
pub const CHARS_PER_TOKEN: f64 = 4.0;
/// Template tokens per chat message assumed by the estimate.
const TOKENS_PER_MESSAGE: u64 = 4;

#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct Estimate {
    /// Requests the step makes.
    pub requests: u64,
    /// Of those, answered from the response cache (free).
    pub cached: u64,
    /// Of those, sent to the teacher.
    pub to_send: u64,
    /// Prompt tokens of the requests to send (estimated).
    pub prompt_tokens: u64,
    /// Completion tokens of the requests to send, at most.
    pub completion_tokens_at_most: u64,
    /// At the configured prices: estimated prompt tokens plus the completion bound.
    pub cost_at_most: f64,
}

impl Estimate {
    pub fn add(&mut self, other: &Estimate) {
        self.requests += other.requests;
        self.cached += other.cached;
        self.to_send += other.to_send;
        self.prompt_tokens += other.prompt_tokens;
        self.completion_tokens_at_most += other.completion_tokens_at_most;
        self.cost_at_most += other.cost_at_most;
    }
}

/// Estimated prompt tokens of one request.
pub fn prompt_tokens(req: &ChatRequest) -> u64 {
    let messages = req.messages();
    let items = messages.as_array().map(Vec::as_slice).unwrap_or(&[]);
    let chars: usize = items
        .iter()
        .filter_map(|m| m["content"].as_str())
        .map(|c| c.chars().count())
        .sum();
    (chars as f64 / CHARS_PER_TOKEN).ceil() as u64 + TOKENS_PER_MESSAGE * items.len() as u64
}

/// The estimate for `requests` asked of `teacher`.
pub fn estimate(teacher: &Teacher, requests: &[ChatRequest]) -> Estimate {
    let cfg = teacher.config();
    let mut e = Estimate {
        requests: requests.len() as u64,
        ..Default::default()
    };
    for r in requests {
        if teacher.is_cached(r) {
            e.cached += 1;
            continue;
        }
        e.to_send += 1;
        e.prompt_tokens += prompt_tokens(r);
        e.completion_tokens_at_most += u64::from(r.max_tokens);
    }
    e.cost_at_most = e.prompt_tokens as f64 * cfg.price_prompt_per_mtok / 1e6
        + e.completion_tokens_at_most as f64 * cfg.price_completion_per_mtok / 1e6;
    e
}
