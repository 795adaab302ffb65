//! Teacher-client throughput against an instant local mock server (issue #21): requests/s of
//! `Teacher::ask_all` with the response cache on, fresh and then all cached, at a given
//! concurrency. The client must never be what holds back a vLLM or SGLang server.
//!
//! `cargo run --release --example teacher_throughput -- [requests=20000] [concurrency=256]`

#[path = "../tests/common/mock_teacher.rs"]
#[allow(dead_code)]
mod mock_teacher;

use std::time::Instant;

use mira::select::teacher::{ChatRequest, Teacher, TeacherConfig};

fn main() -> anyhow::Result<()> {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("a number"))
        .collect();
    let n = args.first().copied().unwrap_or(20_000);
    let concurrency = args.get(1).copied().unwrap_or(256);
    let server = mock_teacher::MockTeacher::start(|_| "{\"ok\": true}".to_string());
    let cache = tempfile::tempdir()?;
    let mut cfg = TeacherConfig::new(&server.url, "mock");
    cfg.concurrency = concurrency;
    cfg.cache_dir = Some(cache.path().to_path_buf());
    let requests: Vec<ChatRequest> = (0..n)
        .map(|i| ChatRequest {
            system: "You are an expert data curator.".into(),
            user: format!("Score document {i}: a few hundred characters of text would go here."),
            schema: Some(serde_json::json!({"type": "object"})),
            max_tokens: 200,
            ..Default::default()
        })
        .collect();
    let parse = |reply: &str| -> anyhow::Result<()> {
        anyhow::ensure!(reply.contains("ok"), "not ok");
        Ok(())
    };
    for pass in ["fresh", "cached"] {
        let teacher = Teacher::new(cfg.clone())?;
        let t = Instant::now();
        let replies = teacher.ask_all(&requests, pass, parse);
        let secs = t.elapsed().as_secs_f64();
        let failed = replies.iter().filter(|r| r.is_err()).count();
        let s = teacher.stats();
        println!(
            "{pass}: {n} requests, concurrency {concurrency}: {secs:.2}s, {:.0} requests/s, {} sent, {} cache hits, {failed} failed",
            n as f64 / secs,
            s.http_requests,
            s.cache_hits
        );
    }
    println!("mock server answered {}", server.answered());
    Ok(())
}
