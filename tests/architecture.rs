//! The import and I/O rules of docs/ARCHITECTURE.md, checked on the source tree: each rule is
//! a list of paths that some part of `src/` must not name. A rule broken by a change fails here
//! with the file, line and rule. Comments and `#[cfg(test)]` modules (at each file's end) are
//! not checked.

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
