//! An instant OpenAI-compatible chat server on 127.0.0.1 for tests and the teacher-client
//! throughput bench (`examples/teacher_throughput.rs`): HTTP/1.1 keep-alive, one thread per
//! connection, and a reply computed from the request by the caller's function. It counts the
//! requests it answered. Bounded: it stops when dropped, or after 10 minutes.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// The reply content for a request (the request's JSON body), and the reply's OpenAI-style
/// `logprobs` object (`Value::Null` for none).
pub type Reply = dyn Fn(&Value) -> (String, Value) + Send + Sync;

pub struct MockTeacher {
    pub url: String,
    pub answered: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl Drop for MockTeacher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// The user message a request ends with.
pub fn last_user(req: &Value) -> &str {
    req["messages"]
        .as_array()
        .and_then(|m| m.last())
        .and_then(|m| m["content"].as_str())
        .unwrap_or("")
}

impl MockTeacher {
    pub fn start(reply: impl Fn(&Value) -> String + Send + Sync + 'static) -> MockTeacher {
        MockTeacher::start_with_logprobs(move |req| (reply(req), Value::Null))
    }

    /// A server whose replies also carry `choices[0].logprobs`.
    pub fn start_with_logprobs(
        reply: impl Fn(&Value) -> (String, Value) + Send + Sync + 'static,
    ) -> MockTeacher {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let url = format!("http://{}/v1", listener.local_addr().unwrap());
        let answered = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let reply: Arc<Reply> = Arc::new(reply);
        let (a, s) = (answered.clone(), stop.clone());
        std::thread::spawn(move || {
            let start = Instant::now();
            while !s.load(Ordering::SeqCst) && start.elapsed() < Duration::from_secs(600) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let (a, r, s) = (a.clone(), reply.clone(), s.clone());
                        std::thread::spawn(move || serve_connection(stream, &a, &*r, &s));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(2)),
                }
            }
        });
        MockTeacher {
            url,
            answered,
            stop,
        }
    }

    pub fn answered(&self) -> u64 {
        self.answered.load(Ordering::SeqCst)
    }
}

/// The body of the next HTTP request on a connection (`None` once the client closes it).
pub fn read_request(reader: &mut impl BufRead) -> Option<Vec<u8>> {
    let mut len = 0usize;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return None;
        }
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            len = v.trim().parse().unwrap_or(0);
        }
        if line == "\r\n" {
            break;
        }
    }
    let mut body = vec![0u8; len];
    reader.read_exact(&mut body).ok()?;
    Some(body)
}

/// Answer requests on one connection until the client closes it.
fn serve_connection(stream: TcpStream, answered: &AtomicU64, reply: &Reply, stop: &AtomicBool) {
    stream.set_nonblocking(false).unwrap();
    let _ = stream.set_nodelay(true);
    let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut out = stream;
    while !stop.load(Ordering::SeqCst) {
        let Some(body) = read_request(&mut reader) else {
            return;
        };
        let req: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        let (content, logprobs) = reply(&req);
        let completion_tokens = content.len() as u64 / 4 + 1;
        let prompt_tokens = body.len() as u64 / 4 + 1;
        let text = json!({
            "choices": [{"message": {"role": "assistant", "content": content}, "finish_reason": "stop",
                         "logprobs": logprobs}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}
        })
        .to_string();
        let head = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            text.len()
        );
        answered.fetch_add(1, Ordering::SeqCst);
        if out.write_all(head.as_bytes()).is_err() || out.write_all(text.as_bytes()).is_err() {
            return;
        }
    }
}
