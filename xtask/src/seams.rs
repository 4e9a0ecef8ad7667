//! The shape rules of the tree, checked by this crate's tests so they stay kept: no module
//! imports a module that imports it back (inside one crate, through any number of steps), and
//! no production function is longer than [`MAX_FN_LINES`].
//!
//! Both read the sources as text, which is enough for how this workspace is written: module
//! edges are `crate::<module>` paths outside comments, and production code is everything in a
//! crate's `src/` above its `#[cfg(test)]` module (test modules sit at the bottom of a file).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The longest a production function may be, from `fn` to its closing brace.
pub const MAX_FN_LINES: usize = 100;

/// The `.rs` files under `dir`, recursively.
fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.filter_map(Result::ok) {
        let p = e.path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// A file's production part: up to its `#[cfg(test)]` line, without comment lines.
fn production(text: &str) -> Vec<&str> {
    text.lines()
        .take_while(|l| !l.trim_start().starts_with("#[cfg(test)]"))
        .collect()
}

/// The crates of the workspace at `root` (folders with a `Cargo.toml` and a `src/`).
fn crates(root: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(root)
        .map(|d| d.filter_map(Result::ok).map(|e| e.path()).collect())
        .unwrap_or_default();
    out.retain(|p| p.join("Cargo.toml").is_file() && p.join("src").is_dir());
    out.sort();
    out
}

/// The top-level module a file of `src` belongs to (`None` for the crate root).
fn top_module(src: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).ok()?;
    let first = rel.components().next()?.as_os_str().to_str()?;
    let name = first.strip_suffix(".rs").unwrap_or(first);
    (!matches!(name, "lib" | "main")).then(|| name.to_owned())
}

/// Which top-level modules each top-level module of the crate at `src` names.
fn module_edges(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let modules: BTreeSet<String> = files.iter().filter_map(|f| top_module(src, f)).collect();
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for f in &files {
        let (Some(me), Ok(text)) = (top_module(src, f), std::fs::read_to_string(f)) else {
            continue;
        };
        for line in production(&text) {
            if line.trim_start().starts_with("//") {
                continue;
            }
            for name in named_modules(line) {
                if name != me && modules.contains(&name) {
                    edges.entry(me.clone()).or_default().insert(name);
                }
            }
        }
    }
    edges
}

/// The modules a line names as `crate::m` or inside `crate::{a, b::{c, d}}`.
fn named_modules(line: &str) -> Vec<String> {
    let ident = |s: &str| -> String {
        s.trim_start()
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect()
    };
    let mut out = Vec::new();
    for (i, _) in line.match_indices("crate::") {
        let rest = &line[i + "crate::".len()..];
        let Some(group) = rest.strip_prefix('{') else {
            out.push(ident(rest));
            continue;
        };
        // The first name of each item at the group's own level.
        let (mut depth, mut item_start) = (0usize, true);
        for (k, c) in group.char_indices() {
            match c {
                '{' => depth += 1,
                '}' if depth == 0 => break,
                '}' => depth -= 1,
                ',' if depth == 0 => item_start = true,
                c if item_start && !c.is_whitespace() => {
                    out.push(ident(&group[k..]));
                    item_start = false;
                }
                _ => {}
            }
        }
    }
    out.retain(|m| !m.is_empty());
    out
}

/// Circles in a module graph: each strongly connected set of two or more modules.
fn circles(edges: &BTreeMap<String, BTreeSet<String>>) -> Vec<BTreeSet<String>> {
    let reach = |from: &String| -> BTreeSet<String> {
        let mut seen = BTreeSet::new();
        let mut todo = vec![from.clone()];
        while let Some(m) = todo.pop() {
            for n in edges.get(&m).into_iter().flatten() {
                if seen.insert(n.clone()) {
                    todo.push(n.clone());
                }
            }
        }
        seen
    };
    let reaches: BTreeMap<&String, BTreeSet<String>> =
        edges.keys().map(|m| (m, reach(m))).collect();
    let mut out: Vec<BTreeSet<String>> = Vec::new();
    for (m, r) in &reaches {
        let circle: BTreeSet<String> = r
            .iter()
            .filter(|n| reaches.get(n).is_some_and(|back| back.contains(*m)))
            .cloned()
            .collect();
        if circle.len() > 1 && !out.contains(&circle) {
            out.push(circle);
        }
    }
    out
}

/// A line with string and char literals and a trailing comment taken out (for brace counts).
fn code_only(line: &str) -> String {
    let b = line.as_bytes();
    let (mut out, mut i) = (String::new(), 0);
    while i < b.len() {
        match b[i] {
            b'/' if b.get(i + 1) == Some(&b'/') => break,
            b'"' => {
                i += 1;
                while i < b.len() && b[i] != b'"' {
                    i += if b[i] == b'\\' { 2 } else { 1 };
                }
                i += 1;
            }
            b'\'' if b.get(i + 2) == Some(&b'\'') || b.get(i + 1) == Some(&b'\\') => {
                i += 2;
                while i < b.len() && b[i] != b'\'' {
                    i += 1;
                }
                i += 1;
            }
            c => {
                out.push(c as char);
                i += 1;
            }
        }
    }
    out
}

/// The name of the function a line declares, if it does.
fn declared_fn(line: &str) -> Option<&str> {
    let mut words = line.split_whitespace().peekable();
    while let Some(w) = words.next() {
        match w {
            "fn" => {
                return words
                    .next()
                    .map(|n| n.split(['(', '<']).next().unwrap_or(n))
            }
            w if w.starts_with("pub") => {}
            "const" | "async" | "unsafe" | "extern" => {}
            w if w.starts_with('"') => {}
            _ => return None,
        }
    }
    None
}

/// `(line, length, name)` of every function of `lines` longer than `limit`.
fn long_functions(lines: &[&str], limit: usize) -> Vec<(usize, usize, String)> {
    let mut out = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let Some(name) = declared_fn(line) else {
            continue;
        };
        let (mut depth, mut opened) = (0i64, false);
        for (j, l) in lines.iter().enumerate().skip(i) {
            let s = code_only(l);
            if !opened && s.contains(';') && !s.contains('{') {
                break;
            }
            depth += s.matches('{').count() as i64 - s.matches('}').count() as i64;
            opened |= s.contains('{');
            if opened && depth <= 0 {
                if j - i + 1 > limit {
                    out.push((i + 1, j - i + 1, name.to_owned()));
                }
                break;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root() -> PathBuf {
        crate::image::root()
    }

    #[test]
    fn no_module_imports_one_that_imports_it_back() {
        let mut found = Vec::new();
        for krate in crates(&root()) {
            for circle in circles(&module_edges(&krate.join("src"))) {
                found.push(format!("{}: {circle:?}", krate.display()));
            }
        }
        assert!(found.is_empty(), "module circles: {found:#?}");
    }

    #[test]
    fn no_production_function_is_over_the_limit() {
        let mut found = Vec::new();
        for krate in crates(&root()) {
            let mut files = Vec::new();
            rust_files(&krate.join("src"), &mut files);
            for f in files {
                let text = std::fs::read_to_string(&f).expect("readable source");
                for (line, len, name) in long_functions(&production(&text), MAX_FN_LINES) {
                    found.push(format!("{}:{line} {name} ({len} lines)", f.display()));
                }
            }
        }
        assert!(
            found.is_empty(),
            "functions over {MAX_FN_LINES} lines: {found:#?}"
        );
    }

    #[test]
    fn the_checks_see_circles_and_long_functions() {
        let mut edges = BTreeMap::new();
        for (a, b) in [("a", "b"), ("b", "c"), ("c", "a"), ("c", "d")] {
            edges
                .entry(a.to_owned())
                .or_insert_with(BTreeSet::new)
                .insert(b.to_owned());
        }
        let found = circles(&edges);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].len(), 3);
        assert_eq!(
            named_modules("use crate::{pool::{Pool, X}, util}; crate::link::run()"),
            ["pool", "util", "link"]
        );
        let body: Vec<String> = std::iter::once("pub async fn big() {".to_owned())
            .chain((0..120).map(|_| "    let s = \"}\"; // }".to_owned()))
            .chain(std::iter::once("}".to_owned()))
            .collect();
        let lines: Vec<&str> = body.iter().map(String::as_str).collect();
        assert_eq!(long_functions(&lines, 100), [(1, 122, "big".to_owned())]);
        assert!(long_functions(&lines, 200).is_empty());
        assert_eq!(declared_fn("    fn f(x: u8);"), Some("f"));
        assert_eq!(declared_fn("let fn_name = 1;"), None);
    }
}
