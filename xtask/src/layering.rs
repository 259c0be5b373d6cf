//! `cargo xtask layers`: checks that `profiler/src` keeps its floors.
//!
//! The floors are declared once, in the ```` ```layers ```` block of docs/architecture.md: one
//! line per floor, `N module module …`. A file belongs to the top-level module its path starts
//! with (`symbolize/elf.rs` → `symbolize`). A module may import from modules on lower floors
//! and from its own files; anything else is reported with the file, the line and both floors.
//! Files must not import each other in a circle, inside a folder either.
//!
//! What counts as an import: `use crate::…`, `use super::…`, `use self::…` (grouped braces
//! expanded) and `crate::…` / `super::…` paths in code. Comments, string and character
//! literals, and items under `#[cfg(test)]` are left out. The scanner is written by hand
//! rather than with `syn`: it needs only paths, and it must read a half-edited tree too.
use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};

/// Modules defined inline in lib.rs (generated protobuf code): the ground floor.
const INLINE_MODULES: &[&str] = &["pprof", "wire"];

/// The declared floors: module → floor.
pub fn parse_floors(doc: &str) -> Result<BTreeMap<String, u32>> {
    let mut lines = doc.lines();
    lines
        .by_ref()
        .find(|l| l.trim() == "```layers")
        .context("docs/architecture.md has no ```layers block")?;
    let mut floors = BTreeMap::new();
    for line in lines.take_while(|l| l.trim() != "```") {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let mut words = line.split_whitespace();
        let floor: u32 = words
            .next()
            .and_then(|w| w.parse().ok())
            .with_context(|| format!("layers block: `{line}` does not start with a floor number"))?;
        for module in words {
            if let Some(old) = floors.insert(module.to_owned(), floor) {
                bail!("layers block: module `{module}` is on floors {old} and {floor}");
            }
        }
    }
    Ok(floors)
}

/// Source text with comments, string and char literals blanked (newlines kept, so line
/// numbers hold).
fn strip(src: &str) -> String {
    let b = src.as_bytes();
    let mut out = String::with_capacity(src.len());
    let mut i = 0;
    let blank = |out: &mut String, text: &[u8]| {
        for &c in text {
            out.push(if c == b'\n' { '\n' } else { ' ' });
        }
    };
    while i < b.len() {
        let rest = &b[i..];
        if rest.starts_with(b"//") {
            let end = rest.iter().position(|&c| c == b'\n').unwrap_or(rest.len());
            blank(&mut out, &rest[..end]);
            i += end;
        } else if rest.starts_with(b"/*") {
            let mut depth = 0usize;
            let mut j = 0;
            while j < rest.len() {
                if rest[j..].starts_with(b"/*") {
                    depth += 1;
                    j += 2;
                } else if rest[j..].starts_with(b"*/") {
                    depth -= 1;
                    j += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    j += 1;
                }
            }
            blank(&mut out, &rest[..j.min(rest.len())]);
            i += j;
        } else if rest.starts_with(b"r\"") || rest.starts_with(b"r#") {
            let hashes = rest[1..].iter().take_while(|&&c| c == b'#').count();
            if rest.get(1 + hashes) != Some(&b'"') {
                out.push('r');
                i += 1;
                continue;
            }
            let close: Vec<u8> = std::iter::once(b'"')
                .chain(std::iter::repeat_n(b'#', hashes))
                .collect();
            let body = 2 + hashes;
            let end = rest[body..]
                .windows(close.len())
                .position(|w| w == close.as_slice())
                .map_or(rest.len(), |p| body + p + close.len());
            blank(&mut out, &rest[..end]);
            i += end;
        } else if rest[0] == b'"' {
            let mut j = 1;
            while j < rest.len() && rest[j] != b'"' {
                j += if rest[j] == b'\\' { 2 } else { 1 };
            }
            let end = (j + 1).min(rest.len());
            blank(&mut out, &rest[..end]);
            i += end;
        } else if rest[0] == b'\'' {
            // A char literal ('x', '\n', '\u{..}') or a lifetime ('a): only the former is blanked.
            let end = if rest.get(1) == Some(&b'\\') {
                rest[2..].iter().position(|&c| c == b'\'').map(|p| p + 3)
            } else if rest.get(2) == Some(&b'\'') {
                Some(3)
            } else {
                None
            };
            match end {
                Some(end) => {
                    blank(&mut out, &rest[..end]);
                    i += end;
                }
                None => {
                    out.push('\'');
                    i += 1;
                }
            }
        } else {
            // Every branch above stops on an ASCII byte, so `i` is on a character boundary.
            let c = src.get(i..).and_then(|r| r.chars().next()).unwrap_or(' ');
            out.push(c);
            i += c.len_utf8();
        }
    }
    out
}

/// `text` with every item under `#[cfg(test)]` blanked (the attribute up to the end of the
/// item: its closing brace, or its `;`).
fn without_tests(text: &str) -> String {
    let mut out: Vec<u8> = text.as_bytes().to_vec();
    let mut from = 0;
    while let Some(at) = text[from..].find("#[cfg(test)]").map(|p| from + p) {
        let b = text.as_bytes();
        let mut j = at + "#[cfg(test)]".len();
        let mut depth = 0usize;
        while j < b.len() {
            match b[j] {
                b'{' => depth += 1,
                b'}' => {
                    depth = depth.saturating_sub(1);
                    if depth == 0 {
                        j += 1;
                        break;
                    }
                }
                b';' if depth == 0 => {
                    j += 1;
                    break;
                }
                _ => {}
            }
            j += 1;
        }
        for c in &mut out[at..j.min(b.len())] {
            if *c != b'\n' {
                *c = b' ';
            }
        }
        from = j.min(b.len());
    }
    String::from_utf8(out).unwrap_or_default()
}

/// The paths a `use` tree names: `crate::{a::B, c::{d, e}}` → `crate::a::B`, `crate::c::d`,
/// `crate::c::e`.
fn expand(tree: &str) -> Vec<String> {
    // `x as y` keeps `x`: renames are cut before white space goes.
    let words: Vec<&str> = tree.split_whitespace().collect();
    let mut joined = String::new();
    let mut skip = false;
    for (i, word) in words.iter().enumerate() {
        if skip {
            // The new name, and whatever punctuation follows it (`y,` or `y}`).
            joined.extend(word.chars().skip_while(|c| c.is_alphanumeric() || *c == '_'));
            skip = false;
        } else if *word == "as" && i > 0 {
            skip = true;
        } else {
            joined.push_str(word);
        }
    }
    expand_joined(&joined)
}

fn expand_joined(tree: &str) -> Vec<String> {
    let Some(open) = tree.find('{') else {
        return vec![tree.trim_end_matches("::").to_owned()];
    };
    let prefix = &tree[..open];
    let inner = tree[open + 1..].strip_suffix('}').unwrap_or(&tree[open + 1..]);
    let mut parts = Vec::new();
    let (mut depth, mut start) = (0usize, 0);
    for (i, c) in inner.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                parts.push(&inner[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&inner[start..]);
    parts
        .into_iter()
        .filter(|p| !p.is_empty())
        .flat_map(|p| {
            expand_joined(p)
                .into_iter()
                .map(|sub| match sub.as_str() {
                    "self" => prefix.trim_end_matches("::").to_owned(),
                    _ => format!("{prefix}{sub}"),
                })
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Every crate-internal path a file names, with its line: `use` trees expanded, then the
/// `crate::`/`super::` paths in the rest of the code.
fn imports(code: &str) -> Vec<(usize, String)> {
    let line_of = |at: usize| code[..at].matches('\n').count() + 1;
    let mut found = Vec::new();
    let mut rest = code.to_owned();
    let mut search = 0;
    while let Some(at) = find_word(&rest[search..], "use").map(|p| search + p) {
        let tree_start = at + 3;
        let Some(end) = rest[tree_start..].find(';').map(|p| tree_start + p) else {
            break;
        };
        let tree = rest[tree_start..end].trim().to_owned();
        if tree.starts_with("crate::") || tree.starts_with("super::") || tree.starts_with("self::") {
            for path in expand(&tree) {
                found.push((line_of(at), path));
            }
        }
        // Blank the statement so its paths are not counted again below.
        let blanked: String = rest[at..end]
            .chars()
            .map(|c| if c == '\n' { '\n' } else { ' ' })
            .collect();
        rest.replace_range(at..end, &blanked);
        search = end;
    }
    for root in ["crate::", "super::"] {
        let mut from = 0;
        while let Some(at) = rest[from..].find(root).map(|p| from + p) {
            from = at + root.len();
            let before = rest[..at].chars().next_back();
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':') {
                continue;
            }
            let path: String = rest[at..]
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':')
                .collect();
            found.push((line_of(at), path.trim_end_matches(':').to_owned()));
        }
    }
    found
}

/// The first `word` in `text` standing alone (not part of an identifier).
fn find_word(text: &str, word: &str) -> Option<usize> {
    let mut from = 0;
    while let Some(at) = text[from..].find(word).map(|p| from + p) {
        let before = text[..at].chars().next_back();
        let after = text[at + word.len()..].chars().next();
        let ident = |c: Option<char>| c.is_some_and(|c| c.is_alphanumeric() || c == '_');
        if !ident(before) && !ident(after) {
            return Some(at);
        }
        from = at + word.len();
    }
    None
}

/// The module path of a file: `symbolize/elf.rs` → [symbolize, elf], `bpf/mod.rs` → [bpf].
fn module_path(file: &str) -> Vec<String> {
    let mut parts: Vec<String> = file
        .trim_end_matches(".rs")
        .split('/')
        .map(str::to_owned)
        .collect();
    if parts.last().is_some_and(|p| p == "mod") {
        parts.pop();
    }
    parts
}

/// The file a path names: the longest prefix of its module segments that is a file of `files`
/// (`crate::symbolize::FunctionName` → `symbolize/mod.rs`). `None` for the crate root itself.
fn resolve(path: &str, from: &str, files: &BTreeSet<String>) -> Option<String> {
    let mut segments: Vec<&str> = path.split("::").filter(|s| !s.is_empty()).collect();
    let own = module_path(from);
    let mut base: Vec<String> = match segments.first() {
        Some(&"crate") => Vec::new(),
        Some(&"super") => {
            let mut parent = own;
            parent.pop();
            parent
        }
        Some(&"self") => own,
        _ => return None,
    };
    segments.remove(0);
    while segments.first() == Some(&"super") {
        base.pop();
        segments.remove(0);
    }
    base.extend(segments.iter().map(|s| (*s).to_owned()));
    for len in (1..=base.len()).rev() {
        let stem = base[..len].join("/");
        for candidate in [format!("{stem}.rs"), format!("{stem}/mod.rs")] {
            if files.contains(&candidate) {
                return Some(candidate);
            }
        }
        if len == 1 && INLINE_MODULES.contains(&base[0].as_str()) {
            return Some(base[0].clone());
        }
    }
    None
}

/// What the check found.
#[derive(Debug, Default)]
pub struct Report {
    pub files: usize,
    pub floors: u32,
    pub errors: Vec<String>,
}

/// Checks `sources` (path under profiler/src → text) against `floors`.
pub fn check(floors: &BTreeMap<String, u32>, sources: &BTreeMap<String, String>) -> Report {
    let files: BTreeSet<String> = sources.keys().cloned().collect();
    let floor_of = |module: &str| -> Option<u32> {
        if INLINE_MODULES.contains(&module) {
            return Some(0);
        }
        floors.get(module).copied()
    };
    let mut report = Report {
        files: sources.len(),
        ..Report::default()
    };
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (file, text) in sources {
        let module = module_path(file).first().cloned().unwrap_or_default();
        let Some(floor) = floor_of(&module) else {
            report.errors.push(format!(
                "profiler/src/{file}: module `{module}` has no floor in docs/architecture.md"
            ));
            continue;
        };
        report.floors = report.floors.max(floor);
        let code = without_tests(&strip(text));
        for (line, path) in imports(&code) {
            let Some(target) = resolve(&path, file, &files) else {
                continue;
            };
            let target_module = module_path(&target).first().cloned().unwrap_or_default();
            if target_module != module {
                match floor_of(&target_module) {
                    Some(t) if t < floor => {}
                    Some(t) => report.errors.push(format!(
                        "profiler/src/{file}:{line}: {module} (floor {floor}) imports {path} ({target_module}, floor {t}): only lower floors may be imported"
                    )),
                    None => report.errors.push(format!(
                        "profiler/src/{file}:{line}: imports {path}, whose module `{target_module}` has no floor"
                    )),
                }
            }
            if target != *file {
                edges.entry(file.clone()).or_default().insert(target);
            }
        }
    }
    for circle in circles(&edges) {
        report
            .errors
            .push(format!("import circle: {}", circle.join(" -> ")));
    }
    report
}

/// Strongly connected components of more than one file (Tarjan's algorithm).
fn circles(edges: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    struct State<'a> {
        edges: &'a BTreeMap<String, BTreeSet<String>>,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on_stack: BTreeSet<&'a str>,
        out: Vec<Vec<String>>,
    }
    fn visit<'a>(s: &mut State<'a>, v: &'a str) {
        let n = s.index.len();
        s.index.insert(v, n);
        s.low.insert(v, n);
        s.stack.push(v);
        s.on_stack.insert(v);
        if let Some(targets) = s.edges.get(v) {
            for w in targets {
                let w = w.as_str();
                if !s.index.contains_key(w) {
                    visit(s, w);
                    let low = s.low[v].min(s.low[w]);
                    s.low.insert(v, low);
                } else if s.on_stack.contains(w) {
                    let low = s.low[v].min(s.index[w]);
                    s.low.insert(v, low);
                }
            }
        }
        if s.low[v] == s.index[v] {
            let mut component = Vec::new();
            while let Some(w) = s.stack.pop() {
                s.on_stack.remove(w);
                component.push(w.to_owned());
                if w == v {
                    break;
                }
            }
            if component.len() > 1 {
                component.sort();
                s.out.push(component);
            }
        }
    }
    let mut s = State {
        edges,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        out: Vec::new(),
    };
    for v in edges.keys() {
        if !s.index.contains_key(v.as_str()) {
            visit(&mut s, v);
        }
    }
    s.out
}

/// Reads the tree under `root` and checks it; prints the result. Fails on any error.
pub fn run(root: &Path) -> Result<()> {
    let doc = root.join("docs/architecture.md");
    let floors =
        parse_floors(&fs::read_to_string(&doc).with_context(|| format!("reading {}", doc.display()))?)?;
    let src = root.join("profiler/src");
    let mut sources = BTreeMap::new();
    let mut dirs = vec![src.clone()];
    while let Some(dir) = dirs.pop() {
        for entry in fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
            let path: PathBuf = entry?.path();
            if path.is_dir() {
                dirs.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let relative = path
                .strip_prefix(&src)?
                .to_str()
                .context("a non-UTF-8 file name under profiler/src")?
                .to_owned();
            if relative == "lib.rs" || relative == "main.rs" {
                continue;
            }
            let text = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
            sources.insert(relative, text);
        }
    }
    let report = check(&floors, &sources);
    for error in &report.errors {
        eprintln!("{error}");
    }
    if report.errors.is_empty() {
        println!(
            "layers: {} files, highest floor {}, no import circle, no upward import",
            report.files, report.floors
        );
        println!("layers: 1 passed, 0 failed");
        Ok(())
    } else {
        println!("layers: 0 passed, 1 failed");
        bail!("{} layering error(s), listed above", report.errors.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC: &str = "intro\n```layers\n# floor modules\n0 pprof wire\n1 units secret\n2 object\n\
                       3 symbolize\n4 bpf  # the loader\n```\nafter\n";

    fn tree(files: &[(&str, &str)]) -> BTreeMap<String, String> {
        files
            .iter()
            .map(|(p, t)| ((*p).to_owned(), (*t).to_owned()))
            .collect()
    }

    fn errors(files: &[(&str, &str)]) -> Vec<String> {
        check(&parse_floors(DOC).expect("floors"), &tree(files)).errors
    }

    #[test]
    fn floors_come_from_the_layers_block() {
        let floors = parse_floors(DOC).expect("floors");
        assert_eq!(floors.get("symbolize"), Some(&3));
        assert_eq!(floors.get("bpf"), Some(&4), "a comment after the modules");
        assert_eq!(floors.get("pprof"), Some(&0));
        assert!(parse_floors("no block").is_err());
        assert!(
            parse_floors("```layers\n1 a\n2 a\n```").is_err(),
            "a module on two floors"
        );
    }

    #[test]
    fn grouped_and_nested_use_trees_are_expanded() {
        let mut paths = expand("crate::{a::B, c::{d, e as f}, g}");
        paths.sort();
        assert_eq!(paths, ["crate::a::B", "crate::c::d", "crate::c::e", "crate::g"]);
        assert_eq!(expand("super::{self, x}"), ["super", "super::x"]);
    }

    #[test]
    fn downward_imports_pass_and_upward_ones_are_named() {
        let ok = errors(&[
            ("units.rs", "pub fn u() {}"),
            ("object.rs", "use crate::units::u;\nuse crate::pprof::Profile;"),
            ("symbolize/mod.rs", "pub mod elf;\nuse crate::{object::O, units};"),
            (
                "symbolize/elf.rs",
                "use super::{FunctionName, demangle};\nfn f() { crate::object::hex(); }",
            ),
            ("bpf/mod.rs", "use crate::symbolize::elf::ElfImage;"),
        ]);
        assert!(ok.is_empty(), "{ok:?}");
        let up = errors(&[
            ("object.rs", "\n\nuse crate::symbolize::elf::ElfImage;"),
            ("symbolize/mod.rs", ""),
            ("symbolize/elf.rs", ""),
        ]);
        assert_eq!(up.len(), 1, "{up:?}");
        assert!(
            up[0].starts_with(
                "profiler/src/object.rs:3: object (floor 2) imports crate::symbolize::elf::ElfImage"
            ),
            "{}",
            up[0]
        );
        let inline = errors(&[
            ("units.rs", "fn f() { let x = crate::bpf::load(); }"),
            ("bpf/mod.rs", ""),
        ]);
        assert_eq!(inline.len(), 1, "a path in code counts: {inline:?}");
    }

    #[test]
    fn a_same_floor_import_between_modules_is_refused() {
        let e = errors(&[("units.rs", "use crate::secret::S;"), ("secret.rs", "")]);
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(e[0].contains("floor 1"), "{e:?}");
    }

    #[test]
    fn a_circle_inside_a_folder_is_found() {
        let e = errors(&[
            ("symbolize/mod.rs", "mod a; mod b;"),
            ("symbolize/a.rs", "use super::b::B;"),
            ("symbolize/b.rs", "use super::a::A;"),
        ]);
        assert_eq!(e, ["import circle: symbolize/a.rs -> symbolize/b.rs"]);
    }

    #[test]
    fn tests_comments_and_strings_are_not_imports() {
        let e = errors(&[
            (
                "units.rs",
                "//! See [`crate::bpf::Session`].\n/// Uses crate::bpf::x\nconst S: &str = \"crate::bpf::y\";\n\
                 const R: &str = r#\"use crate::bpf::z;\"#;\nfn f<'a>(x: &'a str) -> char { 'c' }\n\
                 #[cfg(test)]\nmod tests {\n    use crate::bpf::Session;\n    fn t() { crate::bpf::load(); }\n}\n",
            ),
            ("bpf/mod.rs", ""),
        ]);
        assert!(e.is_empty(), "{e:?}");
    }

    #[test]
    fn text_beyond_ascii_keeps_lines_and_imports() {
        let e = errors(&[
            (
                "units.rs",
                "/// Größe → bytes\nconst Μ: char = 'µ'; fn f() -> &'static str { \"é\" }\nuse crate::bpf::Session;\n",
            ),
            ("bpf/mod.rs", ""),
        ]);
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(
            e[0].starts_with("profiler/src/units.rs:3: units (floor 1) imports crate::bpf::Session"),
            "{e:?}"
        );
    }

    #[test]
    fn a_module_without_a_floor_is_an_error() {
        let e = errors(&[("stray.rs", "")]);
        assert_eq!(
            e,
            ["profiler/src/stray.rs: module `stray` has no floor in docs/architecture.md"]
        );
    }
}
