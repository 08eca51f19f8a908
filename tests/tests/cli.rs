//! The command line as a user meets it: bad configs, exit codes, help.

use ddisco_tests::bin;
use std::process::{Command, Output};

fn run(args: &[&str], cwd: &std::path::Path) -> Output {
    Command::new(bin("ddisco-controller")).args(args).current_dir(cwd).output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn bad_configs_name_the_file_and_key_and_launch_nothing() {
    let d = tempfile::tempdir().unwrap();
    let cases: &[(&str, &str, &str)] = &[
        ("unknown.toml", "num_slavez = 3\n", "key `num_slavez`"),
        ("type.toml", "num_slaves = \"three\"\n", "key `num_slaves`"),
        ("negative.toml", "num_slaves = -2\n", "key `num_slaves`: must be 0 or more"),
        ("mult.toml", "slave_multiplier = 0\n", "key `slave_multiplier`: must be greater than 0"),
        ("mult2.toml", "master_multiplier = -1.5\n", "key `master_multiplier`"),
        ("syntax.toml", "num_slaves = = 3\n", "not valid TOML"),
        ("missing.json", r#"{"NUM_SLAVES": 2}"#, "key `BASE_PACKAGES`: required"),
        (
            "jsontype.json",
            &ORIGINAL.replace("\"NUM_SLAVES\": 2", "\"NUM_SLAVES\": \"2\""),
            "key `NUM_SLAVES`",
        ),
    ];
    for (file, text, want) in cases {
        let path = d.path().join(file);
        std::fs::write(&path, text).unwrap();
        let out = run(&["serve", "--config", path.to_str().unwrap()], d.path());
        assert_eq!(out.status.code(), Some(2), "{file}: {}", stderr(&out));
        let err = stderr(&out);
        assert!(err.contains(path.to_str().unwrap()), "{file}: no file name in {err}");
        assert!(err.contains(want), "{file}: want {want:?} in {err}");
    }
    assert!(!d.path().join(".ddisco").exists(), "a bad config created state");
}

/// The original disposabledisco config.json (tests/fixtures).
const ORIGINAL: &str = include_str!("../fixtures/original-config.json");

#[test]
fn original_config_json_is_accepted_with_notes() {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("config.json"), ORIGINAL).unwrap();
    // No controller runs: status parses the config, then says so (exit 3).
    let out = run(&["status", "--config", "config.json"], d.path());
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(err.contains("credential chain"), "{err}");
    assert!(err.contains("PROVIDER"), "{err}");
    assert!(err.contains("no controller is running"), "{err}");
    assert!(!err.contains("not-a-real-secret"), "the secret was echoed: {err}");
}

#[test]
fn init_prints_a_config_that_loads() {
    let d = tempfile::tempdir().unwrap();
    let out = run(&["init"], d.path());
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    for key in [
        "provider",
        "region",
        "tag_key",
        "num_slaves",
        "master_multiplier",
        "slave_multiplier",
        "base_packages",
        "additional_packages",
        "pip_requirements",
        "ami",
        "max_bid",
        "instance_type",
        "master_instance_type",
        "slave_instance_type",
        "key_name",
        "security_groups",
        "mgmt_key",
        "post_init",
        "listen",
        "advertise",
        "heartbeat_interval_secs",
        "heartbeat_timeout_secs",
        "state_dir",
    ] {
        assert!(text.lines().any(|l| l.starts_with(&format!("{key} ="))), "init lacks {key}");
    }
    std::fs::write(d.path().join("ddisco.toml"), &text).unwrap();
    // Found by default in the current folder; no controller: exit 3.
    let out = run(&["status"], d.path());
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    let out = run(&["init", "-o", "ddisco.toml"], d.path());
    assert!(!out.status.success(), "init overwrote a file");
}

#[test]
fn commands_without_a_controller_say_so() {
    let d = tempfile::tempdir().unwrap();
    for args in [&["status"][..], &["scale", "3"], &["status", "--json"]] {
        let out = run(args, d.path());
        assert_eq!(out.status.code(), Some(3), "{args:?}");
        assert!(stderr(&out).contains("no controller is running"), "{args:?}: {}", stderr(&out));
    }
    // destroy without --yes off a terminal refuses; with --yes and nothing there, succeeds.
    let out = run(&["destroy"], d.path());
    assert_eq!(out.status.code(), Some(2));
    let out = run(&["destroy", "--yes"], d.path());
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("nothing to terminate"));
}

#[test]
fn every_command_explains_itself() {
    let d = tempfile::tempdir().unwrap();
    let out = run(&["--help"], d.path());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(text.contains("Exit codes:"), "{text}");
    for cmd in ["init", "serve", "scale", "status", "destroy", "completions"] {
        let out = run(&[cmd, "--help"], d.path());
        assert!(out.status.success(), "{cmd}");
        assert!(String::from_utf8_lossy(&out.stdout).len() > 100, "{cmd} --help is too thin");
    }
}

#[test]
fn shell_completions_are_printed() {
    let d = tempfile::tempdir().unwrap();
    for shell in ["bash", "zsh", "fish"] {
        let out = run(&["completions", shell], d.path());
        assert!(out.status.success(), "{shell}: {}", stderr(&out));
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("ddisco-controller") && text.contains("scale") && text.contains("destroy"),
            "{shell}"
        );
    }
    let out = run(&["completions", "tcsh"], d.path());
    assert_eq!(out.status.code(), Some(2), "unknown shell is a usage error");
}
