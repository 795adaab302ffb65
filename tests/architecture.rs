//! The rules of docs/ARCHITECTURE.md, checked on the source tree. Import and I/O rules: each
//! rule is a list of paths that some part of `src/` must not name; a rule broken by a change
//! fails here with the file, line and rule (comments and `#[cfg(test)]` modules, at each file's
//! end, are not checked). Size rules: no file over ~600 lines, no function over 80 lines without
//! a `// Long: <reason>` comment above it.

use std::path::{Path, PathBuf};

/// Every `.rs` file below `dir`.
fn sources(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(sources(&p));
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
    out.sort();
    out
}

/// The lines of a file that are code: up to its `#[cfg(test)]` module, comments removed.
fn code_lines(path: &Path) -> Vec<(usize, String)> {
    let text = std::fs::read_to_string(path).unwrap();
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let t = line.trim_start();
        if t.starts_with("#[cfg(test)]") {
            break;
        }
        if t.starts_with("//") {
            continue;
        }
        let code = match line.find("//") {
            Some(at) if !line[..at].contains('"') => &line[..at],
            _ => line,
        };
        out.push((i + 1, code.to_string()));
    }
    out
}

struct Rule {
    what: &'static str,
    /// Files the rule covers: paths below `src/` starting with one of these.
    applies_to: &'static [&'static str],
    /// Except these.
    except: &'static [&'static str],
    forbidden: &'static [&'static str],
}

const CONCRETE_BACKENDS: &[&str] = &[
    "backend::cpu",
    "backend::cuda",
    "backend::wgpu",
    "CpuBackend",
    "CudaBackend",
    "WgpuBackend",
    "::wgpu::",
    "cudarc",
];

const RULES: &[Rule] = &[
    Rule {
        what: "outside the engine, no code names a concrete backend: the device registry (engine/device.rs) builds them",
        applies_to: &[""],
        except: &["engine/"],
        forbidden: CONCRETE_BACKENDS,
    },
    Rule {
        what: "models see only the Backend trait and the engine's shared types",
        applies_to: &["model/"],
        except: &[],
        forbidden: &["engine::device", "set_graph_tokens", "crate::scorer", "crate::corpus", "crate::pipeline", "crate::select"],
    },
    Rule {
        what: "backends never parse configs or know models, text or corpora",
        applies_to: &["engine/"],
        except: &[],
        forbidden: &["crate::model", "crate::scorer", "crate::corpus", "crate::text", "crate::select", "crate::pipeline", "serde_json::from"],
    },
    Rule {
        what: "corpus code knows nothing of models, engines or tokenizers",
        applies_to: &["corpus/"],
        except: &[],
        forbidden: &["crate::model", "crate::engine", "crate::scorer", "crate::text", "crate::select", "crate::pipeline", "Scorer"],
    },
    Rule {
        what: "text code knows nothing of models, engines or corpora",
        applies_to: &["text/"],
        except: &[],
        forbidden: &["crate::model", "crate::engine", "crate::scorer", "crate::corpus", "crate::select"],
    },
    Rule {
        what: "files are written only through corpus::output (OutputFile, write_atomic)",
        applies_to: &[""],
        except: &["corpus/output.rs"],
        forbidden: &["File::create", "fs::write(", "fs::copy(", "fs::rename(", "OpenOptions::new"],
    },
    Rule {
        what: "Duration from seconds only through checked::seconds (negative or huge values panic)",
        applies_to: &[""],
        except: &["checked.rs"],
        forbidden: &["from_secs_f64(", "from_secs_f32("],
    },
];

/// Whether `line` names `pattern` as a path of its own: not as the tail of a longer name
/// (`OutputFile::create` does not name `File::create`).
fn names(line: &str, pattern: &str) -> bool {
    line.match_indices(pattern).any(|(at, _)| {
        !line[..at]
            .chars()
            .next_back()
            .is_some_and(|c| c.is_alphanumeric() || c == '_')
    })
}

fn violations() -> Vec<String> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut found = Vec::new();
    for path in sources(&src) {
        let rel = path
            .strip_prefix(&src)
            .unwrap()
            .to_string_lossy()
            .replace('\\', "/");
        for rule in RULES {
            let covered = rule.applies_to.iter().any(|p| rel.starts_with(p))
                && !rule.except.iter().any(|p| rel.starts_with(p));
            if !covered {
                continue;
            }
            for (n, line) in code_lines(&path) {
                for f in rule.forbidden {
                    if names(&line, f) {
                        found.push(format!(
                            "src/{rel}:{n}: `{f}` breaks the rule: {}",
                            rule.what
                        ));
                    }
                }
            }
        }
    }
    found
}

#[test]
fn the_import_and_io_rules_hold() {
    let v = violations();
    assert!(v.is_empty(), "{} violations:\n{}", v.len(), v.join("\n"));
}

/// The checker itself can fail: a line that breaks a rule is found.
#[test]
fn a_broken_rule_is_found() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("x.rs");
    std::fs::write(&f, "// use crate::engine::backend::cuda;\nuse crate::engine::backend::cuda::CudaBackend; // here\n#[cfg(test)]\nmod tests { use cudarc; }\n").unwrap();
    let lines = code_lines(&f);
    let hits: Vec<usize> = lines
        .iter()
        .filter(|(_, l)| CONCRETE_BACKENDS.iter().any(|b| names(l, b)))
        .map(|(n, _)| *n)
        .collect();
    assert_eq!(hits, vec![2]);
    assert!(names("let f = File::create(p);", "File::create"));
    assert!(!names("let f = OutputFile::create(p);", "File::create"));
}

/// Longest function body (signature to closing brace) allowed without a reason.
const MAX_FN_LINES: usize = 80;
/// Longest file in `src/`, tests included.
const MAX_FILE_LINES: usize = 620;

/// Functions of `text` over [`MAX_FN_LINES`] lines with no `// Long: <reason>` comment among the
/// comments and attributes right above them, as `(line, name, length)`.
fn long_functions(text: &str) -> Vec<(usize, String, usize)> {
    let lines: Vec<&str> = text.lines().collect();
    let mut found = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let t = line.trim_start();
        let rest = ["pub(crate) ", "pub(super) ", "pub "]
            .iter()
            .find_map(|p| t.strip_prefix(p))
            .unwrap_or(t);
        let rest = rest.strip_prefix("unsafe ").unwrap_or(rest);
        let Some(sig) = rest.strip_prefix("fn ") else {
            continue;
        };
        let name: String = sig
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        // A declaration without a body (a trait's) ends with `;` before any `{`.
        let Some(open) = (i..lines.len()).find(|&j| {
            let l = lines[j].trim_end();
            l.ends_with('{') || l.ends_with(';')
        }) else {
            continue;
        };
        if lines[open].trim_end().ends_with(';') {
            continue;
        }
        let indent = &line[..line.len() - t.len()];
        let close = format!("{indent}}}");
        let Some(end) = (open..lines.len()).find(|&j| lines[j].trim_end() == close) else {
            continue;
        };
        let length = end - i + 1;
        let mut above = i;
        let mut reason = false;
        while above > 0 {
            let a = lines[above - 1].trim_start();
            if !(a.starts_with("//") || a.starts_with("#[")) {
                break;
            }
            reason |= a.starts_with("// Long: ");
            above -= 1;
        }
        if length > MAX_FN_LINES && !reason {
            found.push((i + 1, name, length));
        }
    }
    found
}

#[test]
fn long_functions_say_why_and_files_stay_small() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut found = Vec::new();
    for path in sources(&src) {
        let text = std::fs::read_to_string(&path).unwrap();
        for (line, name, length) in long_functions(&text) {
            found.push(format!(
                "{}:{line}: fn {name} is {length} lines (over {MAX_FN_LINES}): split it, or say why above it with `// Long: <reason>`",
                path.display()
            ));
        }
        let n = text.lines().count();
        if n > MAX_FILE_LINES {
            found.push(format!(
                "{}: {n} lines (over {MAX_FILE_LINES}): split it by concern",
                path.display()
            ));
        }
    }
    assert!(found.is_empty(), "{}", found.join("\n"));
}

/// The length check itself can fail: a long function without a reason is found, one with a
/// reason and a long trait declaration are not.
#[test]
fn a_long_function_is_found() {
    let body = "    let x = 1;\n".repeat(MAX_FN_LINES);
    let text = format!(
        "/// Doc.\npub fn long_one() {{\n{body}}}\n\n/// Doc.\n// Long: a reason.\n#[inline]\nfn long_two() {{\n{body}}}\n\ntrait T {{\n    fn decl(\n        &self,\n    ) -> u32;\n}}\nfn short() {{\n}}\n"
    );
    let found = long_functions(&text);
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!((found[0].0, found[0].1.as_str()), (2, "long_one"));
    assert_eq!(found[0].2, MAX_FN_LINES + 2);
}
