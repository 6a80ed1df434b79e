//! libFuzzer entry point: runs the registry target named by the environment
//! variable MICROVM_FUZZ_TARGET (tools/fuzz sets it).
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;

fn target() -> &'static fuzz_targets::Target {
    static TARGET: OnceLock<&'static fuzz_targets::Target> = OnceLock::new();
    TARGET.get_or_init(|| {
        let name = std::env::var("MICROVM_FUZZ_TARGET").unwrap_or_default();
        fuzz_targets::find(&name).unwrap_or_else(|| {
            eprintln!("unknown fuzz target {name:?}; known: {}", fuzz_targets::names().join(", "));
            std::process::exit(2)
        })
    })
}

fuzz_target!(|data: &[u8]| (target().run)(data));
