//! The architecture invariants of ARCHITECTURE.md, checked on the source
//! tree (as rust-analyzer's `tidy.rs` does): each test fails when the code
//! breaks the rule it names.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf()
}

/// Every `.rs` file under `dir`, as (path relative to `dir`, text).
fn sources(dir: &Path) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).expect("read_dir") {
            let p = entry.expect("entry").path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|e| e == "rs") {
                let rel = p.strip_prefix(dir).expect("under dir").display().to_string();
                out.push((rel, std::fs::read_to_string(&p).expect("read")));
            }
        }
    }
    out.sort();
    out
}

/// The code of a file without its `#[cfg(test)]` module (tests may reach
/// across modules) and without comments.
fn code(text: &str) -> String {
    let text = match text.find("#[cfg(test)]\nmod tests") {
        Some(i) => &text[..i],
        None => text,
    };
    text.lines().filter(|l| !l.trim_start().starts_with("//")).map(|l| format!("{l}\n")).collect()
}

/// The top-level module a file belongs to (`provider/ec2.rs` -> `provider`).
fn top_module(rel: &str) -> String {
    let first = rel.split('/').next().unwrap_or(rel);
    first.trim_end_matches(".rs").to_string()
}

/// The top-level modules each top-level module uses through `crate::`.
fn module_graph(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (rel, text) in sources(src) {
        if rel.starts_with("bin/") || rel == "main.rs" || rel == "lib.rs" {
            continue;
        }
        let me = top_module(&rel);
        let deps = graph.entry(me.clone()).or_default();
        let code = code(&text);
        for (i, _) in code.match_indices("crate::") {
            let name: String =
                code[i + 7..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
            if !name.is_empty() && name != me && name.chars().next().is_some_and(|c| c.is_lowercase()) {
                deps.insert(name);
            }
        }
    }
    graph
}

/// A cycle in `graph`, if any, as the list of modules on it.
fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        n: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(i) = path.iter().position(|p| p == n) {
            let mut cycle = path[i..].to_vec();
            cycle.push(n.to_string());
            return Some(cycle);
        }
        if done.contains(n) {
            return None;
        }
        path.push(n.to_string());
        for d in graph.get(n).into_iter().flatten() {
            if let Some(c) = visit(d, graph, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(n.to_string());
        None
    }
    let mut done = BTreeSet::new();
    for n in graph.keys() {
        if let Some(c) = visit(n, graph, &mut Vec::new(), &mut done) {
            return Some(c);
        }
    }
    None
}

#[test]
fn the_cycle_finder_finds_cycles() {
    let g: BTreeMap<String, BTreeSet<String>> = [
        ("a".to_string(), BTreeSet::from(["b".to_string()])),
        ("b".to_string(), BTreeSet::from(["c".to_string()])),
        ("c".to_string(), BTreeSet::from(["a".to_string()])),
    ]
    .into();
    assert_eq!(find_cycle(&g), Some(vec!["a".into(), "b".into(), "c".into(), "a".into()]));
    let g: BTreeMap<String, BTreeSet<String>> =
        [("a".to_string(), BTreeSet::from(["b".to_string()])), ("b".to_string(), BTreeSet::new())].into();
    assert_eq!(find_cycle(&g), None);
}

#[test]
fn no_module_imports_one_that_imports_it_back() {
    for krate in ["controller", "agent"] {
        let graph = module_graph(&root().join(krate).join("src"));
        assert!(graph.len() > 5, "{krate}: too few modules found: {graph:?}");
        if let Some(cycle) = find_cycle(&graph) {
            panic!("{krate}: import circle {}", cycle.join(" -> "));
        }
    }
}

#[test]
fn only_the_ec2_provider_uses_the_aws_sdk() {
    for krate in ["controller", "agent"] {
        let src = root().join(krate).join("src");
        for (rel, text) in sources(&src) {
            let allowed = krate == "controller" && rel.starts_with("provider/ec2");
            let code = code(&text);
            if !allowed {
                for needle in ["aws_sdk_", "aws_config", "aws_smithy"] {
                    assert!(!code.contains(needle), "{krate}/src/{rel} uses the AWS SDK ({needle})");
                }
            }
        }
    }
}

#[test]
fn generated_protobuf_types_stay_at_the_edges() {
    // Per crate: the modules that serve or call gRPC, and the one that
    // converts.
    for (krate, edges) in [
        ("controller", &["wire.rs", "grpc.rs", "admin.rs", "cli/client.rs"][..]),
        ("agent", &["wire.rs", "session.rs", "identity.rs"][..]),
    ] {
        let mut checked = 0;
        for (rel, text) in sources(&root().join(krate).join("src")) {
            if edges.contains(&rel.as_str()) || rel.starts_with("bin/") {
                continue;
            }
            checked += 1;
            assert!(!code(&text).contains("ddisco_proto"), "{krate}/src/{rel} uses the generated types");
        }
        assert!(checked > 5, "{krate}: too few files checked");
    }
}

/// The compiler keeps a node's state private to the registry
/// (`NodeRecord::state`); this keeps its other fields changed there too.
#[test]
fn only_the_registry_changes_a_nodes_record() {
    for (rel, text) in sources(&root().join("controller/src")) {
        if rel.starts_with("registry/") {
            continue;
        }
        let code = code(&text);
        // `rec.<field> = ...` (an assignment, not a comparison).
        for (i, _) in code.match_indices("rec.") {
            let rest = &code[i + 4..];
            let field: String = rest.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
            let after = rest[field.len()..].trim_start();
            let assigns = after.starts_with('=') && !after.starts_with("==");
            assert!(!assigns, "controller/src/{rel} sets a node's field `rec.{field}` outside the registry");
        }
    }
}

/// The core (ARCHITECTURE.md): plain data and decisions, no network. Its
/// modules use only each other, and no network crate.
const CORE: &[&str] = &[
    "model",
    "reconcile",
    "lifecycle",
    "autoscale",
    "autostop",
    "budget",
    "failures",
    "registry",
    "plan",
    "text",
    "history",
    "engine",
    "config",
    "pki",
];

#[test]
fn the_core_knows_no_network() {
    let src = root().join("controller/src");
    let graph = module_graph(&src);
    for m in CORE {
        let deps = graph.get(*m).unwrap_or_else(|| panic!("core module {m} not found"));
        for d in deps {
            assert!(CORE.contains(&d.as_str()), "core module {m} uses crate::{d}, which is not core");
        }
    }
    for (rel, text) in sources(&src) {
        if !CORE.contains(&top_module(&rel).as_str()) {
            continue;
        }
        for net in ["tonic::", "hyper::", "axum::", "aws_sdk", "aws_config", "tokio::net", "std::net::Tcp"] {
            assert!(!code(&text).contains(net), "core file controller/src/{rel} uses {net}");
        }
    }
}

#[test]
fn the_library_does_not_depend_on_the_cli() {
    for (rel, text) in sources(&root().join("controller/src")) {
        if rel.starts_with("cli/") || rel.starts_with("bin/") || rel == "main.rs" || rel == "lib.rs" {
            continue;
        }
        assert!(!code(&text).contains("crate::cli"), "controller/src/{rel} depends on the CLI");
    }
}

#[test]
fn the_agents_dependency_tree_has_no_aws_sdk_and_no_aws_lc() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let tree = |package: &str| {
        let out = Command::new(&cargo)
            .args(["tree", "--offline", "-p", package, "-e", "normal,build", "--prefix", "none"])
            .current_dir(root())
            .output()
            .expect("cargo tree");
        assert!(out.status.success(), "cargo tree -p {package}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let agent = tree("ddisco-agent");
    for bad in ["aws-lc", "aws-sdk", "aws-config", "aws-smithy"] {
        let hits: Vec<&str> = agent.lines().filter(|l| l.starts_with(bad)).collect();
        assert!(hits.is_empty(), "the agent's tree has {bad}: {hits:?}");
    }
    // The check can fail: the controller's tree has them.
    let controller = tree("ddisco-controller");
    assert!(controller.lines().any(|l| l.starts_with("aws-lc")), "cargo tree output changed shape");
}

#[test]
fn unsafe_code_is_forbidden_in_every_crate() {
    let ws = std::fs::read_to_string(root().join("Cargo.toml")).expect("Cargo.toml");
    assert!(ws.contains("[workspace.lints.rust]\nunsafe_code = \"forbid\""), "workspace lint missing");
    for krate in ["proto", "controller", "agent", "tests"] {
        let manifest = std::fs::read_to_string(root().join(krate).join("Cargo.toml")).expect("manifest");
        assert!(
            manifest.contains("[lints]\nworkspace = true"),
            "{krate}/Cargo.toml does not use the workspace lints"
        );
    }
}

/// Issue 22: `&name[..name.len().min(64)]` on a node's text panicked when
/// byte 64 fell inside a character, and stopped the controller. Text is
/// cut with `text::prefix` (controller) or on a checked boundary, never by
/// a byte range bounded with `.len().min(`.
#[test]
fn no_text_is_cut_by_a_raw_byte_range() {
    for krate in ["controller/src", "agent/src"] {
        for (rel, text) in sources(&root().join(krate)) {
            let code = code(&text);
            for (n, line) in code.lines().enumerate() {
                let raw = line.contains("[..") && line.contains(".len().min(");
                assert!(!raw, "{krate}/{rel}: line {} cuts by a byte range: {line}", n + 1);
            }
        }
    }
}
