//! The teacher: any OpenAI-compatible chat-completions endpoint (vLLM, SGLang, llama.cpp's
//! `llama-server`, OpenAI).
//!
//! - Bounded concurrency (`concurrency` worker threads), results in request order.
//! - Retries with exponential backoff (and `Retry-After`) on 429, 5xx, time-outs and dropped
//!   connections; other 4xx fail that request at once.
//! - Structured output: requests carry a JSON schema (`response_format: json_schema`); a server
//!   that rejects it is asked again with `json_object`, then with no `response_format`, and the
//!   client remembers the level that worked. Replies are parsed tolerantly ([`extract_json`]).
//! - Logprobs: a request with `top_logprobs` asks for them (`logprobs: true`), and its caller
//!   parses the reply text together with each reply token's most likely alternatives
//!   ([`with_logprobs`]); `mira label --scoring probabilities` scores from them.
//! - A reply the caller cannot use (malformed or truncated JSON) is asked for again, as a new
//!   *attempt*, up to `max_attempts` per request.
//! - An on-disk cache keyed by the request (model, messages, sampling parameters, attempt), so a
//!   killed run resumes without paying twice; a rerun answers from the accepted reply of any
//!   attempt. Only replies the caller could use are cached, so a rerun asks again for whatever
//!   failed. Token counts and cost in [`TeacherStats`].

use std::path::PathBuf;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::cache::{Key, ReplyCache};
pub use super::reply_json::extract_json;

/// Where and how to reach the teacher.
#[derive(Debug, Clone)]
pub struct TeacherConfig {
    /// Base URL up to `/v1` (e.g. `http://127.0.0.1:8080/v1`); `/chat/completions` is appended.
    pub base_url: String,
    pub model: String,
    pub api_key: Option<String>,
    /// Requests in flight at once.
    pub concurrency: usize,
    /// Transport-level retries per attempt (429, 5xx, time-outs, dropped connections).
    pub max_retries: u32,
    /// Fresh attempts when a reply is unusable (malformed or truncated JSON).
    pub max_attempts: u32,
    /// Time limit of one HTTP request.
    pub timeout: Duration,
    /// First backoff delay; doubles per retry (capped at 60 s), with jitter.
    pub backoff: Duration,
    pub temperature: f64,
    /// Response cache directory; `None` disables caching.
    pub cache_dir: Option<PathBuf>,
    /// Prices in currency units per million prompt / completion tokens (0: not counted).
    pub price_prompt_per_mtok: f64,
    pub price_completion_per_mtok: f64,
    pub progress: bool,
}

impl TeacherConfig {
    /// Settings from what a user wrote (`mira` flags or a `mira run` `[teacher]` section), the
    /// one way both build a teacher: the numbers are checked and named in errors as the user
    /// wrote them (`names`: the concurrency, time-out and two price settings), an empty API key
    /// is none.
    pub fn from_user(
        (base_url, model): (&str, &str),
        api_key: Option<String>,
        (concurrency, timeout_s): (usize, f64),
        (price_prompt, price_completion): (f64, f64),
        names: [&str; 4],
    ) -> Result<TeacherConfig> {
        let mut c = TeacherConfig::new(base_url, model);
        c.api_key = api_key.filter(|k| !k.is_empty());
        c.concurrency = crate::checked::count(names[0], concurrency, 1, 1 << 16)?;
        c.timeout = crate::checked::seconds(names[1], timeout_s)?;
        c.price_prompt_per_mtok = crate::checked::non_negative(names[2], price_prompt)?;
        c.price_completion_per_mtok = crate::checked::non_negative(names[3], price_completion)?;
        Ok(c)
    }

    pub fn new(base_url: &str, model: &str) -> TeacherConfig {
        TeacherConfig {
            base_url: base_url.trim_end_matches('/').to_string(),
            model: model.to_string(),
            api_key: None,
            concurrency: 4,
            max_retries: 6,
            max_attempts: 3,
            timeout: Duration::from_secs(300),
            backoff: Duration::from_millis(500),
            temperature: 0.0,
            cache_dir: None,
            price_prompt_per_mtok: 0.0,
            price_completion_per_mtok: 0.0,
            progress: false,
        }
    }
}

/// One chat request: a system message, worked examples (user, assistant) shown before the
/// user message, the JSON schema the reply should follow.
#[derive(Debug, Clone, Default)]
pub struct ChatRequest {
    pub system: String,
    pub examples: Vec<(String, String)>,
    pub user: String,
    pub schema: Option<Value>,
    pub max_tokens: u32,
    /// Ask for the `n` most likely tokens at each reply position (`logprobs`, `top_logprobs`);
    /// the text handed to the caller's parser is then [`with_logprobs`]'s JSON.
    pub top_logprobs: Option<u8>,
}

impl ChatRequest {
    /// The chat messages, in order.
    pub fn messages(&self) -> Value {
        let mut m = vec![json!({"role": "system", "content": self.system})];
        for (u, a) in &self.examples {
            m.push(json!({"role": "user", "content": u}));
            m.push(json!({"role": "assistant", "content": a}));
        }
        m.push(json!({"role": "user", "content": self.user}));
        Value::Array(m)
    }
}

/// The text a caller parses when its request asked for logprobs: `{"content": <reply text>,
/// "tokens": [{"token", "logprob", "top": [{"token", "logprob"}, …]}, …]}`, one entry per
/// reply token, in order, from the OpenAI-style `choices[0].logprobs` (`tokens` is empty when
/// the server sent none, and the parser says so).
pub fn with_logprobs(content: &str, logprobs: &Value) -> String {
    let pair = |t: &Value| json!({"token": t["token"], "logprob": t["logprob"]});
    let tokens: Vec<Value> = logprobs["content"]
        .as_array()
        .map(|c| {
            c.iter()
                .map(|t| {
                    let top: Vec<Value> = t["top_logprobs"]
                        .as_array()
                        .map(|a| a.iter().map(pair).collect())
                        .unwrap_or_default();
                    json!({"token": t["token"], "logprob": t["logprob"], "top": top})
                })
                .collect()
        })
        .unwrap_or_default();
    json!({"content": content, "tokens": tokens}).to_string()
}

/// The longest pause between two tries of a request, whatever the server asks for.
const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// Counts over a teacher's life (fresh requests only are paid; cache hits are free).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct TeacherStats {
    /// Logical requests asked of [`Teacher::ask`].
    pub requests: u64,
    /// HTTP requests sent (including retries).
    pub http_requests: u64,
    pub cache_hits: u64,
    pub retries: u64,
    /// Replies that were unusable and asked for again.
    pub rejected_replies: u64,
    /// Requests that failed for good.
    pub failures: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub cost: f64,
}

impl TeacherStats {
    /// What happened after `before` was taken (per-step counts from a shared teacher).
    pub fn since(&self, before: &TeacherStats) -> TeacherStats {
        TeacherStats {
            requests: self.requests - before.requests,
            http_requests: self.http_requests - before.http_requests,
            cache_hits: self.cache_hits - before.cache_hits,
            retries: self.retries - before.retries,
            rejected_replies: self.rejected_replies - before.rejected_replies,
            failures: self.failures - before.failures,
            prompt_tokens: self.prompt_tokens - before.prompt_tokens,
            completion_tokens: self.completion_tokens - before.completion_tokens,
            cost: self.cost - before.cost,
        }
    }
}

/// The message of the progress bar: tokens/s and spend since the batch started, refreshed at
/// most five times a second.
struct Progress {
    start: Instant,
    before: TeacherStats,
    last: Mutex<Instant>,
}

impl Progress {
    fn new(before: TeacherStats) -> Progress {
        let start = Instant::now();
        Progress {
            start,
            before,
            last: Mutex::new(start),
        }
    }

    fn show(&self, bar: &indicatif::ProgressBar, stats: impl Fn() -> TeacherStats) {
        if bar.is_hidden() {
            return;
        }
        {
            let mut last = self.last.lock().unwrap();
            if last.elapsed() < Duration::from_millis(200) {
                return;
            }
            *last = Instant::now();
        }
        let s = stats().since(&self.before);
        let secs = self.start.elapsed().as_secs_f64().max(1e-3);
        bar.set_message(format!(
            "{:.0} tok/s, spend {:.4}",
            (s.prompt_tokens + s.completion_tokens) as f64 / secs,
            s.cost
        ));
    }
}

/// The response-format levels tried in order.
const FORMAT_SCHEMA: u8 = 0;
const FORMAT_OBJECT: u8 = 1;
const FORMAT_NONE: u8 = 2;

pub struct Teacher {
    cfg: TeacherConfig,
    cache: Option<ReplyCache>,
    agent: ureq::Agent,
    format_level: AtomicU8,
    stats: Mutex<TeacherStats>,
}

enum Failure {
    /// Worth retrying after a pause.
    Transient(String, Option<Duration>),
    /// The server rejected `response_format`: step down a level.
    FormatRejected(String),
    Fatal(String),
}

impl Teacher {
    pub fn new(cfg: TeacherConfig) -> Result<Teacher> {
        if !(cfg.base_url.starts_with("http://") || cfg.base_url.starts_with("https://")) {
            bail!(
                "teacher base URL '{}' must start with http:// or https://",
                cfg.base_url
            );
        }
        let cache = match &cfg.cache_dir {
            Some(dir) => Some(ReplyCache::open(dir)?),
            None => None,
        };
        // One idle connection kept per worker, so every worker reuses its connection.
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(cfg.timeout))
            .http_status_as_error(false)
            .max_idle_connections(cfg.concurrency.max(1) + 4)
            .max_idle_connections_per_host(cfg.concurrency.max(1) + 4)
            .build()
            .into();
        Ok(Teacher {
            cfg,
            cache,
            agent,
            format_level: AtomicU8::new(FORMAT_SCHEMA),
            stats: Mutex::new(TeacherStats::default()),
        })
    }

    pub fn config(&self) -> &TeacherConfig {
        &self.cfg
    }

    pub fn stats(&self) -> TeacherStats {
        self.stats.lock().unwrap().clone()
    }

    /// Ask every request (at most `concurrency` in flight) and parse each reply with `parse`;
    /// results come back in request order. A reply `parse` rejects is asked for again as a new
    /// attempt; a request that fails for good yields its error (the others go on).
    pub fn ask_all<T: Send>(
        &self,
        requests: &[ChatRequest],
        what: &str,
        parse: impl Fn(&str) -> Result<T> + Sync,
    ) -> Vec<Result<T>> {
        let bar = self.progress_bar(requests.len() as u64, what);
        let progress = Progress::new(self.stats());
        let next = Mutex::new(0usize);
        let results: Mutex<Vec<Option<Result<T>>>> =
            Mutex::new((0..requests.len()).map(|_| None).collect());
        std::thread::scope(|s| {
            for _ in 0..self.cfg.concurrency.max(1).min(requests.len().max(1)) {
                s.spawn(|| loop {
                    let i = {
                        let mut n = next.lock().unwrap();
                        let i = *n;
                        *n += 1;
                        i
                    };
                    if i >= requests.len() {
                        break;
                    }
                    let r = self.ask(&requests[i], &parse);
                    results.lock().unwrap()[i] = Some(r);
                    bar.inc(1);
                    progress.show(&bar, || self.stats());
                });
            }
        });
        bar.finish_and_clear();
        results
            .into_inner()
            .unwrap()
            .into_iter()
            .map(|r| r.expect("every request answered"))
            .collect()
    }

    /// The progress bar of [`Teacher::ask_all`]: requests done, requests/s, ETA; the message
    /// shows tokens/s and spend ([`Progress`]).
    fn progress_bar(&self, total: u64, what: &str) -> indicatif::ProgressBar {
        if !self.cfg.progress {
            return indicatif::ProgressBar::hidden();
        }
        let bar = indicatif::ProgressBar::with_draw_target(
            Some(total),
            indicatif::ProgressDrawTarget::stderr(),
        );
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{prefix} {bar:25} {pos}/{len} {per_sec} {msg} eta {eta}",
            )
            .expect("valid template"),
        );
        bar.set_prefix(what.to_string());
        bar
    }

    /// One logical request: the cached reply of any attempt that `parse` accepts, else fresh
    /// attempts until it accepts one.
    pub fn ask<T>(&self, req: &ChatRequest, parse: impl Fn(&str) -> Result<T>) -> Result<T> {
        self.stats.lock().unwrap().requests += 1;
        let attempts = self.cfg.max_attempts.max(1);
        // A rerun takes the reply accepted last time, whichever attempt it came from, so it pays
        // nothing and repeats the same answer even where the server would now answer attempt 0
        // differently (llama-server's batching under concurrency is not deterministic). Only
        // replies that parsed are cached, so a request whose every attempt failed is asked
        // again (against a healthier server, or with a better parser); an entry written by an
        // older mira that does not parse is passed over.
        for attempt in 0..attempts {
            if let Some(Ok(v)) = self.cached(req, attempt).map(|c| parse(&c)) {
                self.stats.lock().unwrap().cache_hits += 1;
                return Ok(v);
            }
        }
        let mut last_err = anyhow!("no attempt made");
        for attempt in 0..attempts {
            let (content, entry) = match self.complete(req, attempt) {
                Ok(reply) => reply,
                Err(e) => {
                    self.stats.lock().unwrap().failures += 1;
                    return Err(e);
                }
            };
            match parse(&content) {
                Ok(v) => {
                    if let Some(cache) = &self.cache {
                        cache.put(&self.cache_key(req, attempt), entry.to_string().as_bytes())?;
                    }
                    return Ok(v);
                }
                Err(e) => {
                    self.stats.lock().unwrap().rejected_replies += 1;
                    last_err = e.context(format!(
                        "unusable reply (attempt {}): {}",
                        attempt + 1,
                        preview(&content)
                    ));
                }
            }
        }
        self.stats.lock().unwrap().failures += 1;
        Err(last_err)
    }

    /// The cache key: everything that decides the answer, not where the server lives.
    fn cache_key(&self, req: &ChatRequest, attempt: u32) -> Key {
        let mut key = json!({
            "model": self.cfg.model,
            "messages": req.messages(),
            "schema": req.schema,
            "max_tokens": req.max_tokens,
            "temperature": self.cfg.temperature,
            "attempt": attempt,
        });
        // Requests without logprobs keep the keys they always had.
        if let Some(n) = req.top_logprobs {
            key["top_logprobs"] = json!(n);
        }
        Sha256::digest(key.to_string().as_bytes()).into()
    }

    /// Whether some attempt of `req` is in the response cache (what [`Teacher::ask`] answers
    /// from without asking the server).
    pub fn is_cached(&self, req: &ChatRequest) -> bool {
        (0..self.cfg.max_attempts.max(1)).any(|attempt| self.cached(req, attempt).is_some())
    }

    /// The cached reply text of one attempt, if there is one.
    fn cached(&self, req: &ChatRequest, attempt: u32) -> Option<String> {
        let bytes = self.cache.as_ref()?.get(&self.cache_key(req, attempt))?;
        let v = serde_json::from_slice::<Value>(&bytes).ok()?;
        v["content"].as_str().map(str::to_string)
    }

    /// The reply text of one attempt from the server, and the cache entry to keep if it parses.
    fn complete(&self, req: &ChatRequest, attempt: u32) -> Result<(String, Value)> {
        let reply = self.post_with_retries(req, attempt)?;
        let content = reply["choices"][0]["message"]["content"]
            .as_str()
            .ok_or_else(|| {
                anyhow!(
                    "reply has no choices[0].message.content: {}",
                    preview(&reply.to_string())
                )
            })?
            .to_string();
        let content = match req.top_logprobs {
            Some(_) => with_logprobs(&content, &reply["choices"][0]["logprobs"]),
            None => content,
        };
        {
            let mut st = self.stats.lock().unwrap();
            let pt = reply["usage"]["prompt_tokens"].as_u64().unwrap_or(0);
            let ct = reply["usage"]["completion_tokens"].as_u64().unwrap_or(0);
            st.prompt_tokens += pt;
            st.completion_tokens += ct;
            st.cost += pt as f64 * self.cfg.price_prompt_per_mtok / 1e6
                + ct as f64 * self.cfg.price_completion_per_mtok / 1e6;
        }
        let lp = &reply["choices"][0]["logprobs"]["content"];
        if req.top_logprobs.is_some() && lp.as_array().is_none_or(Vec::is_empty) {
            // What the server can do, not what it sampled: asking again cannot help.
            bail!("{}", super::expected_scores::NO_LOGPROBS);
        }
        let entry = json!({
            "model": self.cfg.model,
            "attempt": attempt,
            "content": content,
            "finish_reason": reply["choices"][0]["finish_reason"],
            "usage": reply["usage"],
        });
        Ok((content, entry))
    }

    fn body(&self, req: &ChatRequest, attempt: u32, level: u8) -> Value {
        // Later attempts sample (a deterministic server would repeat an unusable reply).
        let temperature = if attempt == 0 {
            self.cfg.temperature
        } else {
            self.cfg.temperature.max(0.7)
        };
        let mut body = json!({
            "model": self.cfg.model,
            "messages": req.messages(),
            "temperature": temperature,
            "max_tokens": req.max_tokens,
            "seed": attempt,
        });
        if let Some(n) = req.top_logprobs {
            body["logprobs"] = json!(true);
            body["top_logprobs"] = json!(n);
        }
        // `json_object` would force a reply that is not an object (a bare digit) to start with
        // `{`: such requests step down from their schema to no format at all.
        let object_reply = req.schema.as_ref().is_none_or(|s| s["type"] == "object");
        match (level, &req.schema) {
            (FORMAT_SCHEMA, Some(schema)) => {
                body["response_format"] = json!({
                    "type": "json_schema",
                    "json_schema": {"name": "reply", "schema": schema},
                })
            }
            (FORMAT_SCHEMA, None) | (FORMAT_OBJECT, _) if object_reply => {
                body["response_format"] = json!({"type": "json_object"})
            }
            _ => {}
        }
        body
    }

    fn post_with_retries(&self, req: &ChatRequest, attempt: u32) -> Result<Value> {
        let mut retry = 0u32;
        loop {
            let level = self.format_level.load(Ordering::Relaxed);
            let body = self.body(req, attempt, level);
            self.stats.lock().unwrap().http_requests += 1;
            match self.post(&body) {
                Ok(v) => return Ok(v),
                Err(Failure::FormatRejected(msg)) if level < FORMAT_NONE => {
                    // Step down once for everyone; no pause, not counted as a retry.
                    let _ = self.format_level.compare_exchange(
                        level,
                        level + 1,
                        Ordering::Relaxed,
                        Ordering::Relaxed,
                    );
                    log::debug(&format!(
                        "teacher rejected response_format ({msg}); stepping down"
                    ));
                }
                Err(Failure::FormatRejected(msg)) | Err(Failure::Fatal(msg)) => bail!("{msg}"),
                Err(Failure::Transient(msg, after)) => {
                    if retry >= self.cfg.max_retries {
                        bail!("{msg} (gave up after {} retries)", retry);
                    }
                    let base = self.cfg.backoff.as_secs_f64() * 2f64.powi(retry as i32);
                    let jitter =
                        1.0 + (super::stats::keyed_hash(retry as u64, &msg) % 1000) as f64 / 4000.0;
                    let wait = after
                        .map(|d| d.as_secs_f64())
                        .unwrap_or(base * jitter)
                        .min(MAX_BACKOFF.as_secs_f64());
                    std::thread::sleep(crate::checked::clamped_seconds(wait, MAX_BACKOFF));
                    retry += 1;
                    self.stats.lock().unwrap().retries += 1;
                }
            }
        }
    }

    fn post(&self, body: &Value) -> Result<Value, Failure> {
        let url = format!("{}/chat/completions", self.cfg.base_url);
        let started = Instant::now();
        let mut request = self
            .agent
            .post(&url)
            .header("Content-Type", "application/json");
        if let Some(key) = &self.cfg.api_key {
            request = request.header("Authorization", &format!("Bearer {key}"));
        }
        let mut resp = match request.send(body.to_string().as_bytes()) {
            Ok(r) => r,
            Err(e) => {
                return Err(Failure::Transient(
                    format!("{url}: {e} after {:.1}s", started.elapsed().as_secs_f64()),
                    None,
                ))
            }
        };
        let status = resp.status().as_u16();
        let retry_after = resp
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| crate::checked::retry_after(v, MAX_BACKOFF));
        let text = match resp.body_mut().read_to_string() {
            Ok(t) => t,
            Err(e) => {
                return Err(Failure::Transient(
                    format!("{url}: reading reply: {e}"),
                    None,
                ))
            }
        };
        match status {
            200..=299 => serde_json::from_str::<Value>(&text).map_err(|e| {
                // A cut-off body is a transport failure, not the model's answer.
                Failure::Transient(
                    format!("{url}: reply is not JSON ({e}): {}", preview(&text)),
                    None,
                )
            }),
            429 | 408 | 500..=599 => Err(Failure::Transient(
                format!("{url}: HTTP {status}: {}", preview(&text)),
                retry_after,
            )),
            400 | 422
                if body.get("response_format").is_some()
                    && (text.contains("response_format")
                        || text.contains("json_schema")
                        || text.contains("grammar")) =>
            {
                Err(Failure::FormatRejected(format!(
                    "HTTP {status}: {}",
                    preview(&text)
                )))
            }
            _ => Err(Failure::Fatal(format!(
                "{url}: HTTP {status}: {}",
                preview(&text)
            ))),
        }
    }
}

mod log {
    pub fn debug(msg: &str) {
        if std::env::var_os("MIRA_DEBUG").is_some() {
            eprintln!("mira: {msg}");
        }
    }
}

fn preview(s: &str) -> String {
    let s = s.trim();
    if s.chars().count() <= 200 {
        s.to_string()
    } else {
        format!("{}…", s.chars().take(200).collect::<String>())
    }
}
