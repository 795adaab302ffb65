//! The JSON value in a model's reply, found tolerantly: fenced, surrounded by prose, or cut
//! off by the token limit.

use serde_json::Value;

/// The JSON value in a model's reply, tolerantly: the whole text; else the text inside a
/// ```` ``` ```` fence; else the first balanced `{...}` or `[...]`; else (a reply cut off by
/// the token limit) the longest prefix made valid by closing its open strings and brackets.
pub fn extract_json(text: &str) -> Option<Value> {
    let t = text.trim();
    if let Ok(v) = serde_json::from_str::<Value>(t) {
        return Some(v);
    }
    if let Some(start) = t.find("```") {
        let rest = &t[start + 3..];
        let rest = rest.trim_start_matches(|c: char| c.is_ascii_alphabetic());
        if let Some(end) = rest.find("```") {
            if let Ok(v) = serde_json::from_str::<Value>(rest[..end].trim()) {
                return Some(v);
            }
        }
    }
    let start = t.find(['{', '['])?;
    let body = &t[start..];
    match JsonScan::run(body) {
        JsonScan { end: Some(i), .. } => serde_json::from_str(&body[..=i]).ok(),
        _ => repair_truncated(body),
    }
}

/// A string-aware scan of JSON text: where the first top-level value closes, or else the
/// brackets (as their closers) and string left open at the end.
struct JsonScan {
    end: Option<usize>,
    open: Vec<char>,
    in_str: bool,
}

impl JsonScan {
    fn run(text: &str) -> JsonScan {
        let mut open = Vec::new();
        let mut in_str = false;
        let mut escaped = false;
        for (i, c) in text.char_indices() {
            if in_str {
                match c {
                    _ if escaped => escaped = false,
                    '\\' => escaped = true,
                    '"' => in_str = false,
                    _ => {}
                }
                continue;
            }
            match c {
                '"' => in_str = true,
                '{' => open.push('}'),
                '[' => open.push(']'),
                '}' | ']' => {
                    open.pop();
                    if open.is_empty() {
                        return JsonScan {
                            end: Some(i),
                            open,
                            in_str,
                        };
                    }
                }
                _ => {}
            }
        }
        JsonScan {
            end: None,
            open,
            in_str,
        }
    }
}

/// Close a JSON text cut off mid-way: drop a dangling partial token, close the open string and
/// brackets. Returns the parsed value if that yields valid JSON.
fn repair_truncated(body: &str) -> Option<Value> {
    let mut cut = body.len();
    // Try progressively shorter prefixes ending at a structural boundary.
    for _ in 0..64 {
        let prefix = &body[..cut];
        let JsonScan {
            mut open, in_str, ..
        } = JsonScan::run(prefix);
        let mut fixed = prefix.trim_end().trim_end_matches(',').to_string();
        if in_str {
            fixed.push('"');
        }
        while let Some(c) = open.pop() {
            fixed.push(c);
        }
        if let Ok(v) = serde_json::from_str::<Value>(&fixed) {
            return Some(v);
        }
        // Back off to the previous comma or opening bracket.
        match prefix[..prefix.len().saturating_sub(1)].rfind([',', '{', '[']) {
            Some(p) if p > 0 => cut = if &prefix[p..=p] == "," { p } else { p + 1 },
            _ => return None,
        }
    }
    None
}
