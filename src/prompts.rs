//! Fixed prompt suites for benchmarks: chat, code, agentic (JSON tool-call transcripts) and copy
//! (summarise/repeat text that is in the prompt).

include!("../fixtures/prompts/suites.rs");

pub const SUITES: &[&str] = &["chat", "code", "agentic", "copy"];

pub fn suite(name: &str) -> Option<&'static [&'static str]> {
    Some(match name {
        "chat" => SUITE_CHAT,
        "code" => SUITE_CODE,
        "agentic" => SUITE_AGENTIC,
        "copy" => SUITE_COPY,
        _ => return None,
    })
}
