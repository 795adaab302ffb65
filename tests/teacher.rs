//! The teacher client against a scripted local HTTP server (127.0.0.1 only, bounded): 429,
//! 500, hangs, malformed or truncated JSON, dropped connections, a server that rejects
//! `response_format`; retries, per-request errors, nothing lost, and the on-disk cache so a
//! restarted run pays nothing twice.

mod common;

use std::collections::HashMap;
use std::io::{BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Result};
use mira::select::teacher::{extract_json, ChatRequest, Teacher, TeacherConfig};
use serde_json::{json, Value};

/// What the server does with one request.
#[derive(Clone)]
enum Act {
    Reply(String),
    Status(u16, String),
    Hang(Duration),
    /// Announce a longer body than is sent, then close.
    Truncated,
    /// Close without answering.
    Drop,
    /// 429 with this `Retry-After` header.
    RetryAfter(String),
}

type Script = dyn Fn(&Value, usize) -> Act + Send + Sync;

struct Server {
    url: String,
    /// Requests seen per user message.
    hits: Arc<Mutex<HashMap<String, usize>>>,
    stop: Arc<AtomicBool>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

fn completion(content: &str) -> String {
    json!({
        "choices": [{"message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
    })
    .to_string()
}

fn serve(script: impl Fn(&Value, usize) -> Act + Send + Sync + 'static) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let url = format!("http://{}/v1", listener.local_addr().unwrap());
    let hits = Arc::new(Mutex::new(HashMap::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let script: Arc<Script> = Arc::new(script);
    let (h, s) = (hits.clone(), stop.clone());
    std::thread::spawn(move || {
        // Bounded: stops when the test drops the server, or after 5 minutes.
        let start = std::time::Instant::now();
        while !s.load(Ordering::SeqCst) && start.elapsed() < Duration::from_secs(300) {
            match listener.accept() {
                Ok((stream, _)) => {
                    let (h, sc) = (h.clone(), script.clone());
                    std::thread::spawn(move || handle(stream, &h, &*sc));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
    });
    Server { url, hits, stop }
}

fn handle(stream: TcpStream, hits: &Mutex<HashMap<String, usize>>, script: &Script) {
    stream.set_nonblocking(false).unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let Some(body) = common::mock_teacher::read_request(&mut reader) else {
        return;
    };
    let req: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let key = req["messages"][1]["content"]
        .as_str()
        .unwrap_or("")
        .to_string();
    let n = {
        let mut m = hits.lock().unwrap();
        let e = m.entry(key).or_insert(0);
        *e += 1;
        *e
    };
    let mut out = stream;
    let respond = |out: &mut TcpStream, status: u16, body: &str| {
        let _ = write!(
            out,
            "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
    };
    match script(&req, n) {
        Act::Reply(content) => respond(&mut out, 200, &completion(&content)),
        Act::Status(code, body) => respond(&mut out, code, &body),
        Act::Hang(d) => std::thread::sleep(d),
        Act::Truncated => {
            let full = completion("{\"ok\": true}");
            let _ = write!(
                out,
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{}",
                full.len() + 50,
                &full[..full.len() / 2]
            );
        }
        Act::Drop => {}
        Act::RetryAfter(after) => {
            let body = "{\"error\": \"slow down\"}";
            let _ = write!(
                out,
                "HTTP/1.1 429 X\r\nRetry-After: {after}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    }
}

fn config(url: &str) -> TeacherConfig {
    let mut c = TeacherConfig::new(url, "test-model");
    c.backoff = Duration::from_millis(10);
    c.timeout = Duration::from_millis(1500);
    c.max_retries = 4;
    c
}

fn req(user: &str) -> ChatRequest {
    ChatRequest {
        system: "judge".into(),
        user: user.into(),
        schema: Some(json!({"type": "object"})),
        max_tokens: 50,
        ..Default::default()
    }
}

fn parse_ok(reply: &str) -> Result<bool> {
    match extract_json(reply) {
        Some(v) if v["ok"] == true => Ok(true),
        _ => bail!("not an ok reply"),
    }
}

#[test]
fn transient_failures_are_retried_until_an_answer() {
    // Each prompt fails in its own way on the first hits, then answers.
    let server = serve(|req, n| {
        let user = req["messages"][1]["content"].as_str().unwrap();
        match (user, n) {
            ("rate", 1 | 2) => Act::Status(429, "{\"error\": \"slow down\"}".into()),
            ("boom", 1) => Act::Status(500, "oops".into()),
            ("busy", 1) => Act::Status(503, "busy".into()),
            ("hang", 1) => Act::Hang(Duration::from_secs(4)),
            ("cut", 1) => Act::Truncated,
            ("drop", 1) => Act::Drop,
            _ => Act::Reply("{\"ok\": true}".into()),
        }
    });
    let t = Teacher::new(config(&server.url)).unwrap();
    let users = ["rate", "boom", "busy", "hang", "cut", "drop", "fine"];
    let reqs: Vec<ChatRequest> = users.iter().map(|u| req(u)).collect();
    let out = t.ask_all(&reqs, "test", parse_ok);
    assert_eq!(out.len(), users.len());
    for (u, r) in users.iter().zip(&out) {
        assert!(r.as_ref().is_ok_and(|v| *v), "{u}: {r:?}");
    }
    let st = t.stats();
    assert_eq!(st.retries, 7, "{st:?}"); // 2 + 1 + 1 + 1 + 1 + 1
    assert_eq!(st.failures, 0);
    assert_eq!(st.prompt_tokens, 10 * users.len() as u64);
    let hits = server.hits.lock().unwrap();
    assert_eq!(hits["rate"], 3);
    assert_eq!(hits["fine"], 1);
}

#[test]
fn unusable_replies_are_asked_again_and_persistent_failures_reported_per_request() {
    let server = serve(|req, n| {
        let user = req["messages"][1]["content"].as_str().unwrap();
        match (user, n) {
            // Malformed, then truncated JSON, then a good answer.
            ("flaky", 1) => Act::Reply("sure! {\"ok\": tru".into()),
            ("flaky", 2) => Act::Reply("{\"nope\": 1".into()),
            ("dead", _) => Act::Status(500, "always broken".into()),
            ("bad", _) => Act::Status(400, "{\"error\": \"bad request\"}".into()),
            _ => Act::Reply("```json\n{\"ok\": true}\n```".into()),
        }
    });
    let t = Teacher::new(config(&server.url)).unwrap();
    let reqs = vec![req("flaky"), req("dead"), req("fenced"), req("bad")];
    let out = t.ask_all(&reqs, "test", parse_ok);
    assert!(out[0].as_ref().is_ok_and(|v| *v), "{:?}", out[0]);
    let dead = out[1].as_ref().unwrap_err().to_string();
    assert!(
        dead.contains("HTTP 500") && dead.contains("gave up after 4 retries"),
        "{dead}"
    );
    assert!(out[2].as_ref().is_ok_and(|v| *v), "fenced JSON is accepted");
    let bad = out[3].as_ref().unwrap_err().to_string();
    assert!(bad.contains("HTTP 400"), "{bad}");
    let hits = server.hits.lock().unwrap();
    assert_eq!(
        hits["flaky"], 3,
        "two unusable replies, then a third attempt"
    );
    assert_eq!(hits["dead"], 5, "1 + 4 retries");
    assert_eq!(hits["bad"], 1, "a 400 is not retried");
    let st = t.stats();
    assert_eq!(st.rejected_replies, 2);
    assert_eq!(st.failures, 2);
}

#[test]
fn a_restarted_run_pays_nothing_twice() {
    let cache = tempfile::tempdir().unwrap();
    // First run: even-numbered prompts fail for good (the server is down for them).
    let down = Arc::new(AtomicBool::new(true));
    let d = down.clone();
    let server = serve(move |req, _| {
        let user = req["messages"][1]["content"].as_str().unwrap();
        let i: usize = user.trim_start_matches('p').parse().unwrap();
        if i.is_multiple_of(2) && d.load(Ordering::SeqCst) {
            Act::Status(503, "down".into())
        } else {
            Act::Reply("{\"ok\": true}".into())
        }
    });
    let mut cfg = config(&server.url);
    cfg.cache_dir = Some(cache.path().to_path_buf());
    cfg.max_retries = 1;
    let reqs: Vec<ChatRequest> = (0..10).map(|i| req(&format!("p{i}"))).collect();
    let first = Teacher::new(cfg.clone())
        .unwrap()
        .ask_all(&reqs, "run 1", parse_ok);
    assert_eq!(first.iter().filter(|r| r.is_ok()).count(), 5);
    // Nothing lost: every request has a result, the failures say why.
    assert!(first
        .iter()
        .filter_map(|r| r.as_ref().err())
        .all(|e| e.to_string().contains("503")));

    down.store(false, Ordering::SeqCst);
    let before: HashMap<String, usize> = server.hits.lock().unwrap().clone();
    let t2 = Teacher::new(cfg).unwrap();
    let second = t2.ask_all(&reqs, "run 2", parse_ok);
    assert!(second.iter().all(|r| r.is_ok()));
    let after = server.hits.lock().unwrap().clone();
    for i in 0..10 {
        let k = format!("p{i}");
        let extra = after[&k] - before[&k];
        // Answered prompts come from the cache; only the failed ones are asked again, once.
        assert_eq!(extra, if i % 2 == 0 { 1 } else { 0 }, "{k}");
    }
    let st = t2.stats();
    assert_eq!((st.cache_hits, st.http_requests), (5, 5), "{st:?}");
    assert_eq!(
        st.prompt_tokens, 50,
        "only fresh requests are counted as paid"
    );
}

/// A `Retry-After` that is no wait (negative, infinite, not a number, a date) is ignored and
/// the client's own backoff applies; before, `-1`, `inf` and `nan` panicked the client.
#[test]
fn nonsense_retry_after_headers_fall_back_to_backoff() {
    let server = serve(|req, n| {
        let user = req["messages"][1]["content"].as_str().unwrap().to_string();
        if n == 1 {
            Act::RetryAfter(user)
        } else {
            Act::Reply("{\"ok\": true}".into())
        }
    });
    let t = Teacher::new(config(&server.url)).unwrap();
    let headers = [
        "-1",
        "inf",
        "nan",
        "-inf",
        "1e999",
        "Wed, 21 Oct 2015 07:28:00 GMT",
    ];
    let reqs: Vec<ChatRequest> = headers.iter().map(|h| req(h)).collect();
    let started = std::time::Instant::now();
    let out = t.ask_all(&reqs, "test", parse_ok);
    assert!(out.iter().all(|r| r.as_ref().is_ok_and(|v| *v)), "{out:?}");
    assert_eq!(t.stats().retries, headers.len() as u64);
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "no week-long sleep"
    );
}

/// Unusable replies are not cached: a rerun against a healthy server asks again for exactly
/// the requests whose every attempt failed, and answered ones come from the cache.
#[test]
fn unusable_replies_are_not_cached() {
    let cache = tempfile::tempdir().unwrap();
    let healthy = Arc::new(AtomicBool::new(false));
    let h = healthy.clone();
    let server = serve(move |req, _| {
        let user = req["messages"][1]["content"].as_str().unwrap();
        if user.starts_with("junk") && !h.load(Ordering::SeqCst) {
            Act::Reply("{\"ok\": tr".into())
        } else {
            Act::Reply("{\"ok\": true}".into())
        }
    });
    let mut cfg = config(&server.url);
    cfg.cache_dir = Some(cache.path().to_path_buf());
    let reqs: Vec<ChatRequest> = ["junk0", "fine0", "junk1"].iter().map(|u| req(u)).collect();
    let first = Teacher::new(cfg.clone())
        .unwrap()
        .ask_all(&reqs, "run 1", parse_ok);
    assert_eq!(first.iter().filter(|r| r.is_ok()).count(), 1);
    healthy.store(true, Ordering::SeqCst);
    let t2 = Teacher::new(cfg).unwrap();
    let second = t2.ask_all(&reqs, "run 2", parse_ok);
    assert!(second.iter().all(|r| r.is_ok()), "{second:?}");
    let st = t2.stats();
    assert_eq!((st.cache_hits, st.http_requests), (1, 2), "{st:?}");
}

/// A request accepted at a later attempt is answered on a rerun from that attempt's cached reply:
/// nothing is paid again, and the answer is the same even where the server would now answer the
/// first attempt differently (llama-server under concurrency is not deterministic).
#[test]
fn a_rerun_repeats_the_reply_accepted_at_a_later_attempt() {
    let cache = tempfile::tempdir().unwrap();
    let server = serve(|_, n| match n {
        1 => Act::Reply("{\"ok\": tr".into()),
        n => Act::Reply(format!("{{\"ok\": true, \"hit\": {n}}}")),
    });
    let mut cfg = config(&server.url);
    cfg.cache_dir = Some(cache.path().to_path_buf());
    let parse_hit = |reply: &str| -> Result<u64> {
        parse_ok(reply)?;
        Ok(extract_json(reply).unwrap()["hit"].as_u64().unwrap())
    };
    let reqs = [req("flaky")];
    let t1 = Teacher::new(cfg.clone()).unwrap();
    let first = t1.ask_all(&reqs, "run 1", parse_hit);
    assert_eq!(
        first[0].as_ref().unwrap(),
        &2,
        "accepted at the second attempt"
    );
    assert_eq!(t1.stats().rejected_replies, 1);
    let t2 = Teacher::new(cfg).unwrap();
    assert!(t2.is_cached(&reqs[0]), "the estimate counts it as cached");
    let second = t2.ask_all(&reqs, "run 2", parse_hit);
    assert_eq!(second[0].as_ref().unwrap(), &2, "the same reply");
    let st = t2.stats();
    assert_eq!((st.cache_hits, st.http_requests), (1, 0), "{st:?}");
    assert_eq!(server.hits.lock().unwrap()["flaky"], 2);
}

#[test]
fn a_server_that_rejects_response_format_is_asked_without_it() {
    let server = serve(|req, _| {
        if req.get("response_format").is_some() {
            Act::Status(
                400,
                "{\"error\": \"response_format is not supported\"}".into(),
            )
        } else {
            Act::Reply("Here you go: {\"ok\": true} hope it helps".into())
        }
    });
    let mut cfg = config(&server.url);
    cfg.concurrency = 1;
    let t = Teacher::new(cfg).unwrap();
    let out = t.ask_all(&[req("a"), req("b")], "test", parse_ok);
    assert!(out.iter().all(|r| r.as_ref().is_ok_and(|v| *v)), "{out:?}");
    // json_schema -> json_object -> none, then every later request goes straight to none.
    let hits = server.hits.lock().unwrap();
    assert_eq!((hits["a"], hits["b"]), (3, 1), "{hits:?}");
    assert_eq!(t.stats().retries, 0);
}

#[test]
fn tolerant_json_extraction() {
    assert_eq!(extract_json("{\"a\": 1}").unwrap(), json!({"a": 1}));
    assert_eq!(
        extract_json("Sure:\n```json\n{\"a\": [1, 2]}\n```").unwrap(),
        json!({"a": [1, 2]})
    );
    assert_eq!(
        extract_json("The answer is {\"a\": \"}\"} ok").unwrap(),
        json!({"a": "}"})
    );
    // Cut off by the token limit: the complete part survives.
    let cut =
        extract_json("{\"x\": {\"score\": 7, \"rationale\": \"good\"}, \"y\": {\"sc").unwrap();
    assert_eq!(cut["x"]["score"], 7);
    assert!(extract_json("no json here").is_none());
    assert_eq!(extract_json("[1, 2, 3]").unwrap(), json!([1, 2, 3]));
}

#[test]
fn bad_base_url_is_a_clear_error() {
    let e = Teacher::new(TeacherConfig::new("localhost:8080", "m"))
        .err()
        .unwrap();
    assert!(e.to_string().contains("must start with http://"), "{e}");
}

#[test]
fn labelling_fails_loudly_when_the_teacher_answers_nothing() {
    use mira::select::label::{label, read_labels, LabelOptions};
    use mira::select::{write_rubric, Anchor, Groups};
    use std::collections::BTreeMap;
    let server = serve(|_, _| Act::Status(500, "down".into()));
    let d = tempfile::tempdir().unwrap();
    let corpus = d.path().join("c.jsonl");
    std::fs::write(&corpus, "{\"id\":\"a\",\"text\":\"one\",\"source\":\"s\"}\n{\"id\":\"b\",\"text\":\"two\",\"source\":\"s\"}\n").unwrap();
    let groups = Groups::from_sources(BTreeMap::from([("s".to_string(), "g0".to_string())]));
    let anchor = Anchor {
        name: "clarity".into(),
        definition: "is it clear".into(),
        exemplars: vec![],
        cluster_size: 1,
        teacher_name: "Clarity".into(),
    };
    write_rubric(&d.path().join("g0.jsonl"), &[anchor]).unwrap();
    let mut cfg = config(&server.url);
    cfg.max_retries = 1;
    let t = Teacher::new(cfg).unwrap();
    let files = mira::corpus::expand_inputs(&[corpus]).unwrap();
    let out = d.path().join("labels.jsonl");
    let e = label(
        &t,
        &files,
        &groups,
        d.path(),
        &out,
        &LabelOptions::default(),
    )
    .unwrap_err();
    assert!(
        e.to_string().contains("labelled none of 2 records") && e.to_string().contains("HTTP 500"),
        "{e}"
    );
    // Nothing lost: both records are in the file, each with its error.
    let rows = read_labels(&out).unwrap();
    assert_eq!(rows.len(), 2);
    assert!(rows
        .iter()
        .all(|r| r.error.is_some() && r.scores.is_empty()));
}

#[test]
fn a_reply_that_is_not_an_object_steps_down_to_no_format() {
    // The server takes json_object but not json_schema; a request whose schema is a bare integer
    // must then go without a format (json_object would force a reply starting with `{`).
    let formats = Arc::new(Mutex::new(Vec::new()));
    let seen = formats.clone();
    let server = serve(move |req, _| {
        let format = req["response_format"]["type"].clone();
        seen.lock().unwrap().push(format.clone());
        if format == "json_schema" {
            Act::Status(400, "{\"error\": \"json_schema is not supported\"}".into())
        } else {
            Act::Reply("4".into())
        }
    });
    let t = Teacher::new(config(&server.url)).unwrap();
    let digit = ChatRequest {
        schema: Some(json!({"type": "integer", "minimum": 1, "maximum": 5})),
        ..req("a")
    };
    let out = t.ask_all(&[digit], "test", |r| Ok(r.trim().parse::<u8>()?));
    assert_eq!(out[0].as_ref().unwrap(), &4);
    assert_eq!(
        *formats.lock().unwrap(),
        vec![json!("json_schema"), Value::Null],
        "json_schema, then no response_format"
    );
}
