//! The module dependency rule of `src/` (docs/architecture.md, "Who may import whom"), checked
//! on every test run: no import cycle between the crate's top-level modules, and the leaf
//! modules import only what the rule allows.
//!
//! A node is a top-level module with its submodules (`src/config.rs` and `src/config/*` are
//! `config`). An edge is any path to another module in code: `use crate::x`, `crate::x::f()`
//! inside a function, `#[serde(with = "crate::x::...")]`, and `super::x` that climbs to the
//! crate root. Comments (doc links included) are not dependencies and are ignored. The
//! checker's own tests below run it on small synthetic sources and graphs, so it cannot pass
//! by finding nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// `from -> to -> [where]` ("src/x.rs:12").
type Graph = BTreeMap<String, BTreeMap<String, Vec<String>>>;

/// Modules that import no other module of the crate.
const NO_CRATE_IMPORTS: &[&str] = &["config", "offsets", "record", "connectivity"];

/// What each shared module may import: these are the modules the pipeline stages meet on, so
/// they must not reach back into a stage.
const ALLOWED: &[(&str, &[&str])] = &[
    // The source, the scheduler and the worker all depend on it; it depends on none of them.
    ("pipeline", &["record", "offsets"]),
    // Used by every Kafka client (source, dlq, lag); knows nothing of the pipeline.
    ("kafka_client", &["config", "connectivity"]),
    ("retry", &["config"]),
];

#[test]
fn src_has_no_import_cycle() {
    let graph = graph_of_crate();
    assert!(
        graph.len() > 10,
        "the checker found the crate's modules: {:?}",
        graph.keys()
    );
    if let Some(cycle) = find_cycle(&graph) {
        panic!("import cycle in src/: {}", describe(&graph, &cycle));
    }
}

#[test]
fn leaf_modules_import_only_what_the_rule_allows() {
    let graph = graph_of_crate();
    let mut wrong = Vec::new();
    let rules = NO_CRATE_IMPORTS
        .iter()
        .map(|m| (*m, &[][..]))
        .chain(ALLOWED.iter().copied());
    for (module, allowed) in rules {
        let Some(edges) = graph.get(module) else {
            wrong.push(format!(
                "{module}: no such module in src/ (update tests/architecture.rs)"
            ));
            continue;
        };
        for (to, at) in edges {
            if !allowed.contains(&to.as_str()) {
                wrong.push(format!("{module} imports {to} at {}", at.join(", ")));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "the module dependency rule is broken:\n{}",
        wrong.join("\n")
    );
}

/// The pipeline stages meet only in `pipeline` (and are wired by `app`): none imports another,
/// so each can be built and tested alone.
const STAGES: &[&str] = &["source", "scheduler", "worker"];

#[test]
fn pipeline_stages_import_none_of_each_other() {
    let graph = graph_of_crate();
    let mut wrong = Vec::new();
    for from in STAGES {
        for to in STAGES {
            if let Some(at) = graph.get(*from).and_then(|e| e.get(*to)) {
                wrong.push(format!("{from} imports {to} at {}", at.join(", ")));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "stages must meet in crate::pipeline instead:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn the_checker_sees_the_known_edges() {
    // Guards the parser against silently finding nothing: these edges exist today.
    let graph = graph_of_crate();
    for (from, to) in [
        ("source", "pipeline"),
        ("scheduler", "pipeline"),
        ("worker", "pipeline"),
        ("dlq", "kafka_client"),
        ("breaker", "config"), // only through #[serde(with = "crate::config::duration")]
        ("app", "worker"),
    ] {
        assert!(
            graph.get(from).is_some_and(|e| e.contains_key(to)),
            "{from} -> {to} not found; the graph: {graph:#?}"
        );
    }
}

// ---- the checker ---------------------------------------------------------------------------

/// The repository as cargo names it when it runs the tests, read at run time: a build cached
/// from a checkout at another path must still read this checkout's files.
fn repo_root() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR").map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from)
}

fn graph_of_crate() -> Graph {
    let src = repo_root().join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let sources: Vec<(String, String)> = files
        .iter()
        .map(|f| {
            let rel = f
                .strip_prefix(&src)
                .expect("under src/")
                .to_string_lossy()
                .replace('\\', "/");
            let text = std::fs::read_to_string(f).unwrap_or_else(|e| panic!("reading {}: {e}", f.display()));
            (rel, text)
        })
        .collect();
    graph_of(&sources)
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let entries = std::fs::read_dir(dir).unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()));
    for entry in entries {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The graph of `(path under src/, text)` files. `lib.rs` (the root, which declares every
/// module) and `main.rs` (a separate crate) are not nodes.
fn graph_of(sources: &[(String, String)]) -> Graph {
    let nodes: BTreeSet<String> = sources
        .iter()
        .map(|(rel, _)| top_module(rel))
        .filter(|m| m != "lib" && m != "main")
        .collect();
    let mut graph = Graph::new();
    for (rel, text) in sources {
        let from = top_module(rel);
        if !nodes.contains(&from) {
            continue;
        }
        graph.entry(from.clone()).or_default();
        for (line, to) in references(rel, &strip_comments(text)) {
            if to != from && nodes.contains(&to) {
                let edges = graph.entry(from.clone()).or_default();
                edges.entry(to).or_default().push(format!("src/{rel}:{line}"));
            }
        }
    }
    graph
}

/// `config/env.rs` and `config.rs` are `config`.
fn top_module(rel: &str) -> String {
    let first = rel.split('/').next().unwrap_or(rel);
    first.strip_suffix(".rs").unwrap_or(first).to_string()
}

/// The module path of a file: `dedup/key.rs` is `[dedup, key]`, `config.rs` is `[config]`.
fn file_module_path(rel: &str) -> Vec<String> {
    let trimmed = rel.strip_suffix(".rs").unwrap_or(rel);
    let mut path: Vec<String> = trimmed.split('/').map(str::to_string).collect();
    if path.last().is_some_and(|l| l == "mod") {
        path.pop();
    }
    path
}

/// The text with every comment replaced by spaces (line breaks kept, so line numbers hold).
/// String and char literals are kept: `#[serde(with = "crate::x")]` is a real dependency, and
/// a `//` inside a string is not a comment.
fn strip_comments(text: &str) -> String {
    let c: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let blank = |ch: char| if ch == '\n' { '\n' } else { ' ' };
    let mut i = 0;
    while i < c.len() {
        let next = c.get(i + 1).copied();
        if c[i] == '/' && next == Some('/') {
            while i < c.len() && c[i] != '\n' {
                out.push(' ');
                i += 1;
            }
        } else if c[i] == '/' && next == Some('*') {
            let mut depth = 0;
            while i < c.len() {
                if c[i] == '/' && c.get(i + 1) == Some(&'*') {
                    depth += 1;
                    out.push_str("  ");
                    i += 2;
                } else if c[i] == '*' && c.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    out.push_str("  ");
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    out.push(blank(c[i]));
                    i += 1;
                }
            }
        } else if c[i] == 'r' && (next == Some('"') || next == Some('#')) && raw_string_start(&c, i) {
            // Raw string r"..." / r#"..."#: copied as is, up to the matching quote and hashes.
            let mut j = i + 1;
            let mut hashes = 0;
            while c.get(j) == Some(&'#') {
                hashes += 1;
                j += 1;
            }
            if c.get(j) != Some(&'"') {
                out.push(c[i]);
                i += 1;
                continue;
            }
            j += 1;
            while j < c.len() && !(c[j] == '"' && (1..=hashes).all(|k| c.get(j + k) == Some(&'#'))) {
                j += 1;
            }
            let end = (j + 1 + hashes).min(c.len());
            out.extend(&c[i..end]);
            i = end;
        } else if c[i] == '"' {
            out.push('"');
            i += 1;
            while i < c.len() && c[i] != '"' {
                if c[i] == '\\' && i + 1 < c.len() {
                    out.push(c[i]);
                    i += 1;
                }
                out.push(c[i]);
                i += 1;
            }
            if i < c.len() {
                out.push('"');
                i += 1;
            }
        } else if c[i] == '\'' {
            // A char literal ('"', '\'', '\u{1F600}') or a lifetime ('a): only literals are
            // skipped whole, so that a quote inside one does not open a string.
            let end = if next == Some('\\') {
                (i + 2..c.len()).find(|&j| c[j] == '\'').map(|j| j + 1)
            } else if c.get(i + 2) == Some(&'\'') {
                Some(i + 3)
            } else {
                None
            };
            let end = end.unwrap_or(i + 1).min(c.len());
            out.extend(&c[i..end]);
            i = end;
        } else {
            out.push(c[i]);
            i += 1;
        }
    }
    out
}

/// Whether the `r` at `i` starts a raw string (`r"`, `r#"`, `br"`), not ends an identifier.
fn raw_string_start(c: &[char], i: usize) -> bool {
    let ident = |j: usize| c[j].is_alphanumeric() || c[j] == '_';
    i == 0 || !ident(i - 1) || (c[i - 1] == 'b' && (i == 1 || !ident(i - 2)))
}

/// `(line, top-level module)` for every path in `code` (comments already stripped) that names
/// another top-level module: `crate::x`, `crate::{x, y::z}`, and `super::…::x` climbing to the
/// crate root from the file's module (inline `mod name { … }` blocks counted).
fn references(rel: &str, code: &str) -> Vec<(usize, String)> {
    let tokens = tokenize(code);
    let file_path = file_module_path(rel);
    // Inline modules open at a brace depth; their names extend the module path.
    let mut inline: Vec<(String, usize)> = Vec::new();
    let mut depth = 0usize;
    let mut found = Vec::new();
    let mut i = 0;
    while i < tokens.len() {
        let (line, tok) = (tokens[i].0, tokens[i].1.as_str());
        match tok {
            "{" => depth += 1,
            "}" => {
                depth = depth.saturating_sub(1);
                if inline.last().is_some_and(|(_, d)| *d == depth) {
                    inline.pop();
                }
            }
            "mod" if tokens.get(i + 2).is_some_and(|t| t.1 == "{") => {
                if let Some((_, name)) = tokens.get(i + 1) {
                    inline.push((name.clone(), depth));
                }
            }
            "crate" if !is_path_continuation(&tokens, i) && tok_at(&tokens, i + 1) == "::" => {
                found.extend(path_heads(&tokens, i + 2).into_iter().map(|m| (line, m)));
            }
            "super" if !is_path_continuation(&tokens, i) => {
                let mut climbs = 0;
                let mut j = i;
                while tok_at(&tokens, j) == "super" && tok_at(&tokens, j + 1) == "::" {
                    climbs += 1;
                    j += 2;
                }
                let here = file_path.len() + inline.len();
                if climbs == here {
                    found.extend(path_heads(&tokens, j).into_iter().map(|m| (line, m)));
                }
                i = j.max(i + 1);
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    found
}

/// Whether the token at `i` follows `::` (e.g. `$crate` or `foo::crate`): not a path start.
fn is_path_continuation(tokens: &[(usize, String)], i: usize) -> bool {
    i > 0 && tokens[i - 1].1 == "::"
}

fn tok_at(tokens: &[(usize, String)], i: usize) -> &str {
    tokens.get(i).map_or("", |t| t.1.as_str())
}

/// The first segment(s) of a path starting at token `i`: `x` for `x::…`, and each top-level
/// name of a group `{x, y::{…}, z as w}`.
fn path_heads(tokens: &[(usize, String)], i: usize) -> Vec<String> {
    if tok_at(tokens, i) != "{" {
        return tokens.get(i).map(|t| vec![t.1.clone()]).unwrap_or_default();
    }
    let mut heads = Vec::new();
    let mut depth = 0;
    let mut expect_head = true;
    for (_, tok) in &tokens[i..] {
        match tok.as_str() {
            "{" => {
                depth += 1;
                if depth > 1 {
                    expect_head = false;
                }
            }
            "}" => {
                depth -= 1;
                if depth == 0 {
                    break;
                }
            }
            "," if depth == 1 => expect_head = true,
            t if depth == 1 && expect_head => {
                heads.push(t.to_string());
                expect_head = false;
            }
            _ => {}
        }
    }
    heads
}

/// Identifiers, `::`, braces and commas with their line; strings are split on the same
/// characters so that `"crate::config::duration"` yields `crate`, `::`, `config`, ….
fn tokenize(code: &str) -> Vec<(usize, String)> {
    let mut tokens = Vec::new();
    for (n, line) in code.lines().enumerate() {
        let c: Vec<char> = line.chars().collect();
        let mut i = 0;
        while i < c.len() {
            if c[i].is_alphanumeric() || c[i] == '_' {
                let start = i;
                while i < c.len() && (c[i].is_alphanumeric() || c[i] == '_') {
                    i += 1;
                }
                tokens.push((n + 1, c[start..i].iter().collect()));
            } else if c[i] == ':' && c.get(i + 1) == Some(&':') {
                tokens.push((n + 1, "::".into()));
                i += 2;
            } else {
                if matches!(c[i], '{' | '}' | ',' | '*') {
                    tokens.push((n + 1, c[i].to_string()));
                }
                i += 1;
            }
        }
    }
    tokens
}

/// A cycle `[a, b, …, a]` if the graph has one.
fn find_cycle(graph: &Graph) -> Option<Vec<String>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        Open,
        Done,
    }
    fn visit(
        node: &str,
        graph: &Graph,
        marks: &mut BTreeMap<String, Mark>,
        stack: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        match marks.get(node) {
            Some(Mark::Done) => return None,
            Some(Mark::Open) => {
                let start = stack.iter().position(|n| n == node).unwrap_or(0);
                let mut cycle = stack[start..].to_vec();
                cycle.push(node.to_string());
                return Some(cycle);
            }
            None => {}
        }
        marks.insert(node.to_string(), Mark::Open);
        stack.push(node.to_string());
        for next in graph.get(node).into_iter().flat_map(|e| e.keys()) {
            if let Some(cycle) = visit(next, graph, marks, stack) {
                return Some(cycle);
            }
        }
        stack.pop();
        marks.insert(node.to_string(), Mark::Done);
        None
    }
    let mut marks = BTreeMap::new();
    graph.keys().find_map(|n| visit(n, graph, &mut marks, &mut Vec::new()))
}

/// `a -> b (src/a.rs:3) -> a (src/b.rs:9)`.
fn describe(graph: &Graph, cycle: &[String]) -> String {
    let mut out = cycle[0].clone();
    for pair in cycle.windows(2) {
        let at = graph
            .get(&pair[0])
            .and_then(|e| e.get(&pair[1]))
            .and_then(|w| w.first())
            .map_or(String::new(), |w| format!(" ({w})"));
        out.push_str(&format!(" -> {}{at}", pair[1]));
    }
    out
}

// ---- the checker's own tests ---------------------------------------------------------------

fn files(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter().map(|(p, t)| (p.to_string(), t.to_string())).collect()
}

fn edges(graph: &Graph) -> Vec<(String, String)> {
    graph
        .iter()
        .flat_map(|(from, e)| e.keys().map(move |to| (from.clone(), to.clone())))
        .collect()
}

fn pair(a: &str, b: &str) -> (String, String) {
    (a.to_string(), b.to_string())
}

#[test]
fn checker_finds_a_cycle_of_four_and_names_it_with_the_lines() {
    let graph = graph_of(&files(&[
        ("dlq.rs", "use crate::source::connection_config;\n"),
        ("source.rs", "use crate::scheduler::{InFlight, Input};\n"),
        ("scheduler.rs", "fn f() {\n    crate::worker::run();\n}\n"),
        ("worker.rs", "use crate::dlq::DeadLetters;\n"),
        ("record.rs", ""),
    ]));
    let cycle = find_cycle(&graph).expect("the cycle is found");
    assert_eq!(cycle.len(), 5, "{cycle:?}");
    assert_eq!(cycle.first(), cycle.last());
    let text = describe(&graph, &cycle);
    for part in [
        "dlq",
        "source",
        "scheduler",
        "worker",
        "src/scheduler.rs:2",
        "src/worker.rs:1",
    ] {
        assert!(text.contains(part), "{text}");
    }
}

#[test]
fn checker_finds_a_two_module_cycle_through_a_submodule_and_a_serde_attribute() {
    let graph = graph_of(&files(&[
        ("config.rs", "pub use crate::dedup::DedupConfig;\n"),
        ("config/duration.rs", ""),
        (
            "dedup/config.rs",
            "#[serde(with = \"crate::config::duration\")]\nstruct D;\n",
        ),
        ("dedup.rs", "mod config;\n"),
    ]));
    assert_eq!(edges(&graph), [pair("config", "dedup"), pair("dedup", "config")]);
    assert!(find_cycle(&graph).is_some());
}

#[test]
fn checker_passes_a_layered_graph() {
    let graph = graph_of(&files(&[
        ("pipeline.rs", "use crate::record::Record;\n"),
        ("source.rs", "use crate::{pipeline::Input, record};\n"),
        ("scheduler.rs", "use crate::pipeline::{InFlight, Input};\n"),
        ("worker.rs", "use crate::pipeline::JobRunner;\nuse crate::dlq;\n"),
        ("dlq.rs", "use crate::record::Record;\n"),
        ("record.rs", ""),
        ("lib.rs", "pub mod dlq;\npub mod worker;\n"),
    ]));
    assert_eq!(find_cycle(&graph), None, "{graph:#?}");
    assert!(!graph.contains_key("lib"), "the crate root is not a node");
    assert_eq!(graph["worker"].keys().collect::<Vec<_>>(), ["dlq", "pipeline"]);
}

#[test]
fn comments_and_doc_links_are_not_dependencies_but_strings_are() {
    let code = r#"//! Runs on [`crate::worker::Worker`].
/* a block comment: crate::dlq /* nested: crate::lag */ still a comment: crate::admin */
/// See [`crate::source`].
const URL: &str = "http://x"; use crate::record::Record;
const Q: char = '"'; use crate::offsets;
fn f<'a>(s: &'a str) { let _ = "//"; crate::metrics::inc(); }
#[serde(with = "crate::config::duration")]
struct S;
"#;
    let found: Vec<(usize, String)> = references("scheduler.rs", &strip_comments(code));
    assert_eq!(
        found,
        [
            (4, "record".to_string()),
            (5, "offsets".to_string()),
            (6, "metrics".to_string()),
            (7, "config".to_string())
        ]
    );
}

#[test]
fn use_groups_over_several_lines_name_each_top_level_module() {
    let code = "use crate::{\n    dedup::{Decision, Gate},\n    metrics::{self, Metrics},\n    record as rec,\n};\n";
    let found: Vec<String> = references("worker.rs", code).into_iter().map(|(_, m)| m).collect();
    assert_eq!(found, ["dedup", "metrics", "record"]);
}

#[test]
fn super_counts_only_when_it_climbs_to_the_crate_root() {
    // In src/dedup/key.rs, `super::` is dedup and `super::super::` the crate root.
    let nested = "use super::DedupConfig;\nuse super::super::record::Record;\n";
    assert_eq!(references("dedup/key.rs", nested), [(2, "record".to_string())]);
    // In src/worker.rs, `super::` at the top is the crate root, in `mod tests` it is worker.
    let top = "use super::dlq::DeadLetters;\nmod tests {\n    use super::*;\n    use super::super::metrics;\n}\nuse super::record;\n";
    assert_eq!(
        references("worker.rs", top),
        [
            (1, "dlq".to_string()),
            (4, "metrics".to_string()),
            (6, "record".to_string())
        ]
    );
}
