//! The house rules of the source tree, checked on every crate of the workspace:
//! - no import cycle between modules: within each module, its children (files or folders) may
//!   use their ancestors, but the graph of "child A uses child B" among siblings has no cycle;
//! - no source file longer than ~800 lines, tests aside (the part before `#[cfg(test)]`).
//!
//! The parser is deliberately small: it follows `crate::`, `super::` and `self::` paths and the
//! children a module declares (`mod x;`), which is how this code base refers to its modules.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

const MAX_LINES: usize = 800;

/// A crate: its root file and its modules (path from the root → source file).
struct Crate {
    name: String,
    modules: BTreeMap<Vec<String>, PathBuf>,
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

/// Modules declared by `file` (module path `path`), recursively.
fn collect(path: Vec<String>, file: &Path, modules: &mut BTreeMap<Vec<String>, PathBuf>) {
    let text = fs::read_to_string(file).unwrap();
    let dir = if file.ends_with("mod.rs") || file.ends_with("lib.rs") || file.ends_with("main.rs") {
        file.parent().unwrap().to_owned()
    } else {
        file.with_extension("")
    };
    modules.insert(path.clone(), file.to_owned());
    for line in text.lines() {
        let line = line.trim();
        let Some(rest) = line
            .strip_prefix("pub mod ")
            .or_else(|| line.strip_prefix("pub(crate) mod "))
            .or_else(|| line.strip_prefix("mod "))
        else {
            continue;
        };
        let Some(name) = rest.strip_suffix(';') else {
            continue; // an inline module (tests)
        };
        let mut child = path.clone();
        child.push(name.to_string());
        let as_file = dir.join(format!("{name}.rs"));
        let as_dir = dir.join(name).join("mod.rs");
        let found = if as_file.exists() { as_file } else { as_dir };
        assert!(found.exists(), "{}: mod {name} has no file", file.display());
        collect(child, &found, modules);
    }
}

fn crates() -> Vec<Crate> {
    let ws = workspace();
    let roots = [
        ("restore-engine", "restore-engine/src/lib.rs"),
        ("shim", "shim/src/lib.rs"),
        ("shim: pclive", "shim/src/bin/pclive/main.rs"),
        ("bench", "bench/src/lib.rs"),
    ];
    roots
        .iter()
        .map(|(name, root)| {
            let mut modules = BTreeMap::new();
            collect(Vec::new(), &ws.join(root), &mut modules);
            Crate {
                name: name.to_string(),
                modules,
            }
        })
        .collect()
}

/// The code of a file without its `#[cfg(test)]` part.
fn code_of(text: &str) -> &str {
    match text.find("#[cfg(test)]") {
        Some(at) => &text[..at],
        None => text,
    }
}

/// `code` without `//` comments (doc links are not imports).
fn without_comments(code: &str) -> String {
    code.lines()
        .map(|line| match line.find("//") {
            Some(at) if !line[..at].contains('"') => &line[..at],
            _ => line,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// Every path (as segments) that starts with `crate`, `super` or `self` in `code`, with `use`
/// groups (`use crate::{a::b, c}`) expanded.
fn paths(code: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let bytes: Vec<char> = code.chars().collect();
    let mut i = 0;
    while i < bytes.len() {
        let starts_word = i == 0 || !is_ident(bytes[i - 1]) && bytes[i - 1] != ':';
        if starts_word {
            for head in ["crate::", "super::", "self::"] {
                let h: Vec<char> = head.chars().collect();
                if bytes[i..].starts_with(&h) {
                    let (found, end) = parse_tree(&bytes, i);
                    out.extend(found);
                    i = end;
                    break;
                }
            }
        }
        i += 1;
    }
    out
}

/// Parses `a::b::{c, d::e}` from `at`; returns the expanded paths and where it ended.
fn parse_tree(s: &[char], mut at: usize) -> (Vec<Vec<String>>, usize) {
    let mut prefix = Vec::new();
    loop {
        let start = at;
        while at < s.len() && is_ident(s[at]) {
            at += 1;
        }
        if at > start {
            prefix.push(s[start..at].iter().collect::<String>());
        }
        if s[at..].starts_with(&[':', ':']) {
            at += 2;
            if at < s.len() && s[at] == '{' {
                at += 1;
                let mut all = Vec::new();
                loop {
                    while at < s.len() && (s[at].is_whitespace() || s[at] == ',') {
                        at += 1;
                    }
                    if at >= s.len() || s[at] == '}' {
                        break;
                    }
                    let (inner, end) = parse_tree(s, at);
                    for p in inner {
                        let mut full = prefix.clone();
                        full.extend(p);
                        all.push(full);
                    }
                    at = end;
                    // Skip `as name` and anything up to the next separator.
                    while at < s.len() && s[at] != ',' && s[at] != '}' {
                        at += 1;
                    }
                }
                return (all, at + 1);
            }
            continue;
        }
        return (vec![prefix], at);
    }
}

/// The module a path refers to, seen from module `from`: the longest known module prefix.
fn target(c: &Crate, from: &[String], path: &[String]) -> Option<Vec<String>> {
    let mut base: Vec<String> = from.to_vec();
    let mut rest = path;
    match rest.first().map(String::as_str) {
        Some("crate") => {
            base.clear();
            rest = &rest[1..];
        }
        Some("self") => rest = &rest[1..],
        Some("super") => {
            while rest.first().map(String::as_str) == Some("super") {
                base.pop()?;
                rest = &rest[1..];
            }
        }
        _ => return None,
    }
    let mut best = base.clone();
    let mut candidate = base;
    for segment in rest {
        candidate.push(segment.clone());
        if c.modules.contains_key(&candidate) {
            best = candidate.clone();
        } else {
            break;
        }
    }
    Some(best)
}

fn is_ancestor(a: &[String], b: &[String]) -> bool {
    a.len() <= b.len() && b[..a.len()] == *a
}

/// A cycle in `graph`, if any.
fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<String, u8>,
        stack: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        state.insert(node.to_string(), 1);
        stack.push(node.to_string());
        for next in graph.get(node).into_iter().flatten() {
            match state.get(next.as_str()).copied().unwrap_or(0) {
                1 => {
                    let at = stack.iter().position(|n| n == next).unwrap();
                    let mut cycle = stack[at..].to_vec();
                    cycle.push(next.clone());
                    return Some(cycle);
                }
                0 => {
                    if let Some(cycle) = visit(next, graph, state, stack) {
                        return Some(cycle);
                    }
                }
                _ => {}
            }
        }
        stack.pop();
        state.insert(node.to_string(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for node in graph.keys() {
        if state.get(node.as_str()).copied().unwrap_or(0) == 0 {
            let mut stack = Vec::new();
            if let Some(cycle) = visit(node, graph, &mut state, &mut stack) {
                return Some(cycle);
            }
        }
    }
    None
}

#[test]
fn no_import_cycle_between_modules() {
    let mut problems = Vec::new();
    for c in crates() {
        // For each module, the graph among its children.
        let mut graphs: BTreeMap<Vec<String>, BTreeMap<String, BTreeSet<String>>> = BTreeMap::new();
        for (module, file) in &c.modules {
            let text = fs::read_to_string(file).unwrap();
            for path in paths(&without_comments(code_of(&text))) {
                let Some(to) = target(&c, module, &path) else {
                    continue;
                };
                if is_ancestor(&to, module) || is_ancestor(module, &to) {
                    continue; // a child using its ancestors, or a module using its children
                }
                let common = module.iter().zip(&to).take_while(|(a, b)| a == b).count();
                graphs
                    .entry(module[..common].to_vec())
                    .or_default()
                    .entry(module[common].clone())
                    .or_default()
                    .insert(to[common].clone());
            }
        }
        for (parent, graph) in &graphs {
            if let Some(cycle) = find_cycle(graph) {
                problems.push(format!(
                    "{}: modules under `{}` import each other: {}",
                    c.name,
                    if parent.is_empty() {
                        "crate".to_string()
                    } else {
                        parent.join("::")
                    },
                    cycle.join(" → ")
                ));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn no_source_file_is_longer_than_800_lines_tests_aside() {
    let mut long = Vec::new();
    for c in crates() {
        for file in c.modules.values() {
            let text = fs::read_to_string(file).unwrap();
            let lines = code_of(&text).lines().count();
            if lines > MAX_LINES {
                long.push(format!("{} ({lines} lines)", file.display()));
            }
        }
    }
    assert!(
        long.is_empty(),
        "split these files by role: {}",
        long.join(", ")
    );
}

/// The checker itself finds a cycle (a test that cannot fail asserts nothing).
#[test]
fn the_cycle_finder_finds_cycles_and_expands_use_groups() {
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    graph.entry("a".into()).or_default().insert("b".into());
    graph.entry("b".into()).or_default().insert("c".into());
    assert_eq!(find_cycle(&graph), None);
    graph.entry("c".into()).or_default().insert("a".into());
    assert_eq!(
        find_cycle(&graph),
        Some(vec!["a".into(), "b".into(), "c".into(), "a".into()])
    );
    let found = paths("use crate::{lazy::{self, Chunk}, wire::Auth as A};\nsuper::x::y(1)");
    let found: Vec<String> = found.iter().map(|p| p.join("::")).collect();
    assert_eq!(
        found,
        vec![
            "crate::lazy::self",
            "crate::lazy::Chunk",
            "crate::wire::Auth",
            "super::x::y"
        ]
    );
}
