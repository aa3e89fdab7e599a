//! The kernel's layers, checked on its own source: every `crate::…` path
//! in a context's code names a context of a lower layer (or its own), so
//! the contexts' import graph has no cycle and nothing imports upward.
//! Test code (`#[cfg(test)] mod …` at the end of a file) is not held to
//! it. The crates around the kernel are kept apart by Cargo itself, and
//! `scripts/check-layers` checks what the kernel's dependency tree holds.

use std::{collections::BTreeSet, path::Path};

/// Lowest first. A context may import its own modules and those of lower
/// layers; two contexts of one layer may not import each other.
const LAYERS: &[&[&str]] = &[
    // The crate root's helpers (time, backoff) and the shared errors.
    &["lib", "error"],
    // Trace context, the test pause hook, the health port.
    &["trace", "pause", "health"],
    // The value types: accounts and linked platform accounts.
    &["model"],
    // Domain events, built from the model.
    &["events"],
    // Revocation state and rate limits.
    &["revocation", "ratelimit"],
    // Access and refresh tokens: checked against revocation, they write events.
    &["tokens"],
    // The use cases.
    &["accounts", "authz", "platforms"],
];

fn layer_of(context: &str) -> Option<usize> {
    LAYERS.iter().position(|layer| layer.contains(&context))
}

/// The context a source file belongs to: `accounts/service.rs` → `accounts`,
/// `events.rs` → `events`, `lib.rs` → `lib`.
fn context_of(relative: &Path) -> String {
    let first = relative
        .components()
        .next()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .unwrap_or_default();
    first.trim_end_matches(".rs").to_owned()
}

/// The top-level names a source text reaches through `crate::`: `crate::a::b`
/// gives `a`, `use crate::{a::x, b}` gives `a` and `b`. Line comments and the
/// test module at the end are left out.
fn crate_paths(source: &str) -> BTreeSet<String> {
    let code: String = source
        .split("#[cfg(test)]\nmod ")
        .next()
        .unwrap_or_default()
        .lines()
        .map(|line| line.split("//").next().unwrap_or_default())
        .collect::<Vec<_>>()
        .join("\n");
    let mut names = BTreeSet::new();
    let ident = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect()
    };
    for (at, _) in code.match_indices("crate::") {
        let rest = code[at + "crate::".len()..].trim_start();
        if let Some(group) = rest.strip_prefix('{') {
            // The group's top-level entries, up to its closing brace.
            let mut depth = 0usize;
            let mut entry_start = true;
            for (i, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => entry_start = true,
                    c if c.is_whitespace() => {}
                    _ if entry_start && depth == 0 => {
                        entry_start = false;
                        names.insert(ident(&group[i..]));
                    }
                    _ => {}
                }
            }
        } else {
            names.insert(ident(rest));
        }
    }
    names.retain(|n| !n.is_empty());
    names
}

/// Every import of `source` (in `context`) that breaks the layering.
fn violations(context: &str, source: &str, modules: &BTreeSet<String>) -> Vec<String> {
    let Some(own) = layer_of(context) else {
        return vec![format!("{context} is in no layer: add it to LAYERS")];
    };
    crate_paths(source)
        .into_iter()
        // A name that is not a module is an item of the crate root.
        .map(|name| {
            if modules.contains(&name) {
                name
            } else {
                "lib".to_owned()
            }
        })
        .filter(|target| target != context)
        .filter_map(|target| match layer_of(&target) {
            Some(layer) if layer < own => None,
            Some(layer) if layer == own => Some(format!(
                "{context} imports {target}, of its own layer (a cycle waiting to happen)"
            )),
            Some(_) => Some(format!("{context} imports {target}, of a higher layer")),
            None => Some(format!("{target} is in no layer: add it to LAYERS")),
        })
        .collect()
}

fn sources(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn every_context_imports_only_lower_layers() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&root, &mut files);
    let modules: BTreeSet<String> = files
        .iter()
        .map(|f| context_of(f.strip_prefix(&root).unwrap()))
        .collect();
    let mut found = Vec::new();
    for file in &files {
        let relative = file.strip_prefix(&root).unwrap();
        let context = context_of(relative);
        if context == "layers" {
            continue; // this test
        }
        let source = std::fs::read_to_string(file).unwrap();
        for v in violations(&context, &source, &modules) {
            found.push(format!("{}: {v}", relative.display()));
        }
    }
    assert!(
        files.len() > 20,
        "the walk found the sources: {}",
        files.len()
    );
    assert!(found.is_empty(), "{found:#?}");
}

#[test]
fn the_check_sees_upward_and_sideways_imports() {
    let modules: BTreeSet<String> = ["accounts", "error", "model", "tokens", "authz"]
        .into_iter()
        .map(String::from)
        .collect();
    let upward =
        "use crate::{\n    accounts::service::AccountService,\n    error::BackendError,\n};";
    assert_eq!(
        violations("model", upward, &modules),
        ["model imports accounts, of a higher layer"]
    );
    assert_eq!(
        violations("authz", "fn f() { crate::accounts::x() }", &modules),
        ["authz imports accounts, of its own layer (a cycle waiting to happen)"]
    );
    let fine = "use crate::{error::{BackendError, FieldViolation}, model::account::User};\n\
                // crate::accounts in a comment\nfn t() -> i64 { crate::unix_now() }\n\
                #[cfg(test)]\nmod tests { use crate::accounts::X; }";
    assert!(violations("tokens", fine, &modules).is_empty());
}
