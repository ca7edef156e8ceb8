//! Fixed prompt suites for benchmarks: chat, code, agentic (JSON tool-call transcripts) and copy
//! (summarise/repeat text that is in the prompt).

pub const SUITES: &[&str] = &["chat", "code", "agentic", "copy"];

pub fn suite(name: &str) -> Option<&'static [&'static str]> {
    Some(match name {
        "chat" => &[
            "What is the capital of France, and what is it famous for?",
            "Give me three tips for staying focused while working from home.",
            "Explain photosynthesis to a ten-year-old.",
            "What are the pros and cons of electric cars?",
        ],
        "code" => &[
            "Write a Python function that checks whether a string is a palindrome, with a docstring and tests.",
            "Write a Rust function that returns the n-th Fibonacci number iteratively.",
            "Write a JavaScript function that debounces another function.",
            "Write a SQL query that returns the ten customers with the highest total order value.",
        ],
        "agentic" => &[
            "You can call tools by answering with JSON. Previous calls:\n{\"tool\": \"search\", \"arguments\": {\"query\": \"weather in Paris\"}}\n{\"tool\": \"search\", \"arguments\": {\"query\": \"weather in Berlin\"}}\n{\"tool\": \"search\", \"arguments\": {\"query\": \"weather in Rome\"}}\nNow call the search tool for the weather in Madrid, in the same JSON format.",
            "Tool results so far:\n{\"name\": \"get_price\", \"arguments\": {\"symbol\": \"AAPL\"}, \"result\": 187.2}\n{\"name\": \"get_price\", \"arguments\": {\"symbol\": \"MSFT\"}, \"result\": 411.5}\nWrite the next three calls, for GOOG, AMZN and NVDA, one JSON object per line in exactly this format.",
            "Here is a list of function calls:\ncall(\"open\", path=\"a.txt\")\ncall(\"read\", path=\"a.txt\")\ncall(\"close\", path=\"a.txt\")\nRepeat the same three calls for b.txt and then for c.txt.",
        ],
        "copy" => &[
            "Repeat the following text exactly: The committee met on Tuesday to review the budget. After a long discussion, it approved the new plan for the library, the park and the school.",
            "Summarize in one sentence, reusing the original wording: The committee met on Tuesday to review the budget. After a long discussion, it approved the new plan for the library, the park and the school.",
            "Copy this list and add one more fruit at the end: apples, bananas, cherries, dates, elderberries, figs, grapes.",
        ],
        _ => return None,
    })
}
