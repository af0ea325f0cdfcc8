//! No two files of a crate import each other in a circle (issue 10: five files
//! of tunnel-relay once did). Reads the sources as text: every `crate::a::b`
//! path outside comments and test modules is an edge from the file to the
//! deepest module file it names; a cycle among those files fails the test
//! with the files in it. No namespaces, no binaries.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Module path (`managed::control_loop`) → the file's source.
fn modules(src: &Path) -> BTreeMap<String, String> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }
    let mut files = Vec::new();
    walk(src, &mut files);
    let mut out = BTreeMap::new();
    for f in files {
        let rel = f.strip_prefix(src).unwrap().with_extension("");
        let mut parts: Vec<String> = rel
            .components()
            .map(|c| c.as_os_str().to_string_lossy().into_owned())
            .collect();
        if matches!(
            parts.last().map(String::as_str),
            Some("mod" | "lib" | "main")
        ) {
            parts.pop();
        }
        if rel == Path::new("main") || rel.starts_with("bin") {
            continue; // binaries sit on top; nothing imports them
        }
        let text = std::fs::read_to_string(&f).unwrap();
        // Tests may use anything; they are not part of the module graph.
        let text = text.split("#[cfg(test)]").next().unwrap_or_default();
        let code: String = text
            .lines()
            .filter(|l| !l.trim_start().starts_with("//"))
            .collect::<Vec<_>>()
            .join("\n");
        out.insert(parts.join("::"), code);
    }
    out
}

/// `crate::a::b::C` paths in `code`, as module-path candidates.
fn crate_paths(code: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = code;
    while let Some(i) = rest.find("crate::") {
        rest = &rest[i + "crate::".len()..];
        let path: String = rest
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == ':')
            .collect();
        out.push(path.trim_end_matches(':').to_string());
    }
    out
}

/// A cycle in `graph`, if any (the files on it, in order).
fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        v: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<String, u8>,
        stack: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        state.insert(v.to_string(), 1);
        stack.push(v.to_string());
        for w in graph.get(v).into_iter().flatten() {
            match state.get(w.as_str()).copied().unwrap_or(0) {
                0 => {
                    if let Some(c) = visit(w, graph, state, stack) {
                        return Some(c);
                    }
                }
                1 => {
                    let at = stack.iter().position(|s| s == w).unwrap();
                    return Some(stack[at..].to_vec());
                }
                _ => {}
            }
        }
        stack.pop();
        state.insert(v.to_string(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for v in graph.keys() {
        if state.get(v.as_str()).copied().unwrap_or(0) == 0 {
            if let Some(c) = visit(v, graph, &mut state, &mut Vec::new()) {
                return Some(c);
            }
        }
    }
    None
}

#[test]
fn no_file_imports_itself_through_others() {
    let root = weft_tests::workspace_root();
    for krate in ["proto", "tunnel-relay", "mesh", "worker-agent", "cli"] {
        let mods = modules(&root.join(krate).join("src"));
        assert!(!mods.is_empty(), "{krate}: no sources found");
        let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (m, code) in &mods {
            for path in crate_paths(code) {
                // The deepest module file the path names.
                let parts: Vec<&str> = path.split("::").collect();
                let target = (1..=parts.len())
                    .rev()
                    .map(|k| parts[..k].join("::"))
                    .find(|c| mods.contains_key(c));
                if let Some(t) = target.filter(|t| t != m && !t.is_empty()) {
                    graph.entry(m.clone()).or_default().insert(t);
                }
            }
        }
        if let Some(cycle) = find_cycle(&graph) {
            panic!(
                "{krate}: these files import each other in a circle: {}",
                cycle.join(" -> ")
            );
        }
    }
}

#[test]
fn a_circle_is_found() {
    let g: BTreeMap<String, BTreeSet<String>> = [
        ("a", vec!["b"]),
        ("b", vec!["c"]),
        ("c", vec!["a"]),
        ("d", vec!["a"]),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.into_iter().map(String::from).collect()))
    .collect();
    let c = find_cycle(&g).unwrap();
    assert_eq!(c.len(), 3, "{c:?}");
    let acyclic: BTreeMap<String, BTreeSet<String>> = [("a", vec!["b"]), ("b", vec![])]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.into_iter().map(String::from).collect()))
        .collect();
    assert_eq!(find_cycle(&acyclic), None);
}
