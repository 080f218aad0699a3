//! Any text as a config file: validation returns a set or located errors, never panics.
#![no_main]

use isthmus_core::config::{load_files, SourceFile};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let file = SourceFile { name: "fuzz.yaml".into(), contents: text.into() };
    if let Err(errors) = load_files(&[file]) {
        assert!(!errors.0.is_empty());
        for e in &errors.0 {
            assert_eq!(e.file, "fuzz.yaml");
        }
    }
});
