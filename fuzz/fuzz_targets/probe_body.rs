//! What a Dask or Disco master answers to the probes its agent relays
//! (name, body), read by the engines: no panic (the Disco node counts once
//! overflowed), whatever the JSON.
#![no_main]
use ddisco_controller::config::{Config, EngineKind};
use ddisco_controller::engine::Engine;
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

fn engines() -> &'static (Box<dyn Engine>, Box<dyn Engine>) {
    static E: OnceLock<(Box<dyn Engine>, Box<dyn Engine>)> = OnceLock::new();
    E.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap().keep();
        let pki = std::sync::Arc::new(
            ddisco_controller::pki::Pki::load_or_create(&dir, "fuzz", &["127.0.0.1".into()]).unwrap(),
        );
        let of = |engine| {
            let cfg = Config { state_dir: dir.clone(), engine, ..Config::default() };
            ddisco_controller::engine::from_config(&cfg, "COOKIE".into(), pki.clone(), None)
        };
        (of(EngineKind::Dask), of(EngineKind::Disco))
    })
}

fuzz_target!(|input: (u8, String)| {
    let (which, body) = input;
    let names = ["counts", "joblist", "nodeinfo", "safe_gc_blacklist", "gc_start", "other"];
    let name = names[which as usize % names.len()];
    let (dask, disco) = engines();
    let _ = dask.probed(name, &body);
    let _ = disco.probed(name, &body);
});
