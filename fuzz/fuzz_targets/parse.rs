//! Feeds arbitrary bytes to the Dockerfile parser; whatever parses is also turned into typed
//! instructions and dumped. Checks a round trip: rewriting every line ending as CRLF must not
//! change the tree.
#![no_main]

use kiln_frontend::instructions::parse_all;
use kiln_frontend::parser::{dump, parse};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(df) = parse(data) else { return };
    let _ = parse_all(&df);
    let text = dump(&df);
    // Keep clear of the 64 KiB line limit, which the extra `\r` could cross.
    if data.len() < 60_000 {
        let mut crlf = Vec::with_capacity(data.len() * 2);
        for b in data {
            if *b == b'\n' {
                crlf.push(b'\r');
            }
            crlf.push(*b);
        }
        match parse(&crlf) {
            Ok(again) => assert_eq!(dump(&again), text, "CRLF changed the tree"),
            Err(e) => panic!("CRLF version failed to parse: {e}"),
        }
    }
});
