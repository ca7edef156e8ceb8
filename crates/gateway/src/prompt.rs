//! Prompts: chat messages (and tools) through the model's own GGUF chat template, then tokens; and
//! tool calls parsed back out of generated text.
//!
//! Tools are rendered by the template itself when it knows about them (Qwen, Llama 3.x: their
//! templates read `tools`). A template that ignores `tools` (SmolLM2's plain ChatML) gets them as a
//! system-prompt section in the Hermes format that most open models were tuned on: the function
//! signatures inside `<tools>…</tools>` and the instruction to answer with
//! `<tool_call>{"name": …, "arguments": …}</tool_call>`. Past tool calls and tool results in the
//! conversation are written in the same format for such templates.

use std::path::Path;

use serde_json::{Value, json};
use specswarm_engine::chat::ChatTemplate;
use specswarm_engine::tokenizer::Tokenizer;

use crate::backend::{BackendError, Prompt};

/// Opening tag of a tool call in generated text.
pub const TOOL_CALL_OPEN: &str = "<tool_call>";
/// Closing tag of a tool call in generated text.
pub const TOOL_CALL_CLOSE: &str = "</tool_call>";

/// A model's tokenizer and chat template: what turns a [`Prompt`] into token ids.
pub struct PromptFormat {
    pub tokenizer: Tokenizer,
    template: ChatTemplate,
}

impl std::fmt::Debug for PromptFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PromptFormat").finish_non_exhaustive()
    }
}

impl PromptFormat {
    /// Tokenizer and chat template of a GGUF file (a fallback template by architecture if it ships none).
    pub fn from_gguf(path: &Path) -> Result<PromptFormat, String> {
        let tokenizer = Tokenizer::from_gguf(path).map_err(|e| e.to_string())?;
        let arch = specswarm_engine::gguf::GgufFile::open(path)
            .map_err(|e| e.to_string())?
            .get_str("general.architecture")
            .unwrap_or("")
            .to_string();
        let template = match ChatTemplate::from_gguf(path).map_err(|e| e.to_string())? {
            Some(t) => t,
            None => ChatTemplate::fallback_for(&arch).map_err(|e| e.to_string())?,
        };
        Ok(PromptFormat { tokenizer, template })
    }

    /// The prompt as text (chat templates applied), for tests and logs.
    pub fn render(&self, prompt: &Prompt) -> Result<String, BackendError> {
        match prompt {
            Prompt::Text(t) => Ok(t.clone()),
            Prompt::Chat { messages, tools, assistant_prefix } => {
                let mut text = self.render_chat(messages, tools.as_ref())?;
                text.push_str(assistant_prefix);
                Ok(text)
            }
        }
    }

    /// Token ids of the prompt.
    pub fn encode(&self, prompt: &Prompt) -> Result<Vec<u32>, BackendError> {
        let tok = &self.tokenizer;
        let bad = |e: specswarm_engine::tokenizer::TokenizerError| BackendError::Invalid(e.to_string());
        match prompt {
            Prompt::Text(t) => tok.encode(t, true, false).map_err(bad),
            Prompt::Chat { .. } => {
                let text = self.render(prompt)?;
                let mut ids = tok.encode(&text, false, true).map_err(bad)?;
                if let Some(bos) = tok.bos_id().filter(|&b| tok.add_bos() && ids.first() != Some(&b)) {
                    ids.insert(0, bos);
                }
                Ok(ids)
            }
        }
    }

    fn render_chat(&self, messages: &[Value], tools: Option<&Value>) -> Result<String, BackendError> {
        let render = |msgs: &[Value], tools: Option<&Value>| {
            self.template
                .render_json(&Value::Array(msgs.to_vec()), tools, true)
                .map_err(|e| BackendError::Invalid(e.to_string()))
        };
        let has_tool_turns = messages.iter().any(|m| m.get("tool_calls").is_some() || m["role"] == "tool");
        let Some(tools) = tools.filter(|t| t.as_array().is_some_and(|a| !a.is_empty())) else {
            return if has_tool_turns {
                render(&hermes_messages(messages, None), None)
            } else {
                render(messages, None)
            };
        };
        // Does the template read `tools`? Render a probe with and without them.
        let probe = [json!({"role": "user", "content": "x"})];
        let aware = render(&probe, Some(tools))? != render(&probe, None)?;
        if aware { render(messages, Some(tools)) } else { render(&hermes_messages(messages, Some(tools)), None) }
    }
}

/// The tools section of a system prompt, Hermes style.
pub fn tools_system_prompt(tools: &Value) -> String {
    let mut s = String::from(
        "You are a function calling AI model. You may call one or more functions to assist with the user query. \
         Here are the available tools:\n<tools>\n",
    );
    for t in tools.as_array().into_iter().flatten() {
        s.push_str(&t.to_string());
        s.push('\n');
    }
    s.push_str(
        "</tools>\nTo call a function, answer with a JSON object with the function name and arguments inside \
         <tool_call></tool_call> tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call>",
    );
    s
}

/// Messages rewritten for a template that knows nothing of tools: the tool list joins the system
/// prompt, assistant tool calls become `<tool_call>` text, tool results `<tool_response>` text.
fn hermes_messages(messages: &[Value], tools: Option<&Value>) -> Vec<Value> {
    let mut out: Vec<Value> = Vec::with_capacity(messages.len() + 1);
    if let Some(tools) = tools {
        let section = tools_system_prompt(tools);
        match messages.first() {
            Some(m) if m["role"] == "system" => {
                let content = format!("{}\n\n{section}", m["content"].as_str().unwrap_or(""));
                out.push(json!({"role": "system", "content": content}));
            }
            _ => out.push(json!({"role": "system", "content": section})),
        }
    }
    let skip = usize::from(tools.is_some() && messages.first().is_some_and(|m| m["role"] == "system"));
    for m in &messages[skip..] {
        let role = m["role"].as_str().unwrap_or("user");
        let content = m["content"].as_str().unwrap_or("");
        if let Some(calls) = m.get("tool_calls").and_then(Value::as_array) {
            let mut text = content.to_string();
            for c in calls {
                let f = &c["function"];
                let args = match &f["arguments"] {
                    Value::String(s) => serde_json::from_str(s).unwrap_or(Value::String(s.clone())),
                    v => v.clone(),
                };
                if !text.is_empty() {
                    text.push('\n');
                }
                text.push_str(&format!(
                    "{TOOL_CALL_OPEN}\n{}\n{TOOL_CALL_CLOSE}",
                    json!({"name": f["name"], "arguments": args})
                ));
            }
            out.push(json!({"role": role, "content": text}));
        } else if role == "tool" {
            out.push(json!({"role": "tool", "content": format!("<tool_response>\n{content}\n</tool_response>")}));
        } else {
            out.push(json!({"role": role, "content": content}));
        }
    }
    out
}

/// A tool call found in generated text.
#[derive(Clone, Debug, PartialEq)]
pub struct ParsedToolCall {
    pub name: String,
    /// Always a JSON object.
    pub arguments: Value,
}

/// Tool calls in `text`: each `<tool_call>{…}</tool_call>` (the closing tag may be cut off), or,
/// with no tags, a text that is one bare JSON object. Each must name one of `tool_names` and carry
/// object `arguments` (or `parameters`; a JSON-encoded string is decoded). Returns the text before
/// the first call and the calls, or `None` when the text holds no valid call.
pub fn parse_tool_calls(text: &str, tool_names: &[String]) -> Option<(String, Vec<ParsedToolCall>)> {
    let mut calls = Vec::new();
    let content;
    if let Some(first) = text.find(TOOL_CALL_OPEN) {
        content = text[..first].trim().to_string();
        let mut rest = &text[first..];
        while let Some(i) = rest.find(TOOL_CALL_OPEN) {
            let body = &rest[i + TOOL_CALL_OPEN.len()..];
            let (inner, next) = match body.find(TOOL_CALL_CLOSE) {
                Some(j) => (&body[..j], &body[j + TOOL_CALL_CLOSE.len()..]),
                None => (body, ""),
            };
            calls.push(one_call(inner, tool_names)?);
            rest = next;
        }
    } else {
        content = String::new();
        let t = text.trim();
        let t = t.strip_prefix("```json").or_else(|| t.strip_prefix("```")).unwrap_or(t).trim_start();
        if !t.starts_with('{') {
            return None;
        }
        calls.push(one_call(t, tool_names)?);
    }
    if calls.is_empty() { None } else { Some((content, calls)) }
}

fn one_call(s: &str, tool_names: &[String]) -> Option<ParsedToolCall> {
    let s = s.trim_start();
    // The first JSON value; whatever follows it (a closing tag, chatter) is ignored.
    let v: Value = serde_json::Deserializer::from_str(s).into_iter::<Value>().next()?.ok()?;
    let name = v.get("name")?.as_str()?.to_string();
    if !tool_names.contains(&name) {
        return None;
    }
    let args = v.get("arguments").or_else(|| v.get("parameters")).cloned().unwrap_or_else(|| json!({}));
    let args = match args {
        Value::String(s) => serde_json::from_str(&s).ok()?,
        a => a,
    };
    args.is_object().then_some(ParsedToolCall { name, arguments: args })
}

/// Whether `text` (generated so far) may still turn into a tool call, so streaming must hold it
/// back: it starts (after whitespace) with a prefix of `<tool_call>`, or with `{`.
pub fn may_be_tool_call(text: &str) -> bool {
    let t = text.trim_start();
    t.is_empty() || t.starts_with('{') || TOOL_CALL_OPEN.starts_with(t) || t.starts_with(TOOL_CALL_OPEN)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names() -> Vec<String> {
        vec!["get_weather".to_string()]
    }

    #[test]
    fn parses_tagged_bare_and_string_arguments() {
        let (c, calls) = parse_tool_calls(
            "ok <tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>",
            &names(),
        )
        .unwrap();
        assert_eq!(c, "ok");
        assert_eq!(calls, vec![ParsedToolCall { name: "get_weather".into(), arguments: json!({"city": "Paris"}) }]);
        let (_, calls) =
            parse_tool_calls(" {\"name\": \"get_weather\", \"arguments\": \"{\\\"city\\\": 1}\"} trailing", &names())
                .unwrap();
        assert_eq!(calls[0].arguments, json!({"city": 1}));
        // Cut-off closing tag, two calls.
        let two = "<tool_call>{\"name\":\"get_weather\",\"arguments\":{}}</tool_call><tool_call>{\"name\":\"get_weather\",\"parameters\":{\"a\":2}}";
        assert_eq!(parse_tool_calls(two, &names()).unwrap().1.len(), 2);
    }

    #[test]
    fn rejects_unknown_names_bad_json_and_prose() {
        assert!(
            parse_tool_calls("<tool_call>{\"name\": \"rm_rf\", \"arguments\": {}}</tool_call>", &names()).is_none()
        );
        assert!(
            parse_tool_calls("<tool_call>{\"name\": \"get_weather\", \"arguments\": {</tool_call>", &names()).is_none()
        );
        assert!(parse_tool_calls("The weather is nice.", &names()).is_none());
        assert!(parse_tool_calls("{\"name\": \"get_weather\", \"arguments\": [1]}", &names()).is_none());
    }

    #[test]
    fn hold_back_rule() {
        assert!(may_be_tool_call("  <tool"));
        assert!(may_be_tool_call("{\"na"));
        assert!(may_be_tool_call("<tool_call>{"));
        assert!(!may_be_tool_call("Hello"));
        assert!(!may_be_tool_call("<b>"));
    }

    #[test]
    fn hermes_rewrite_of_a_round_trip() {
        let tools =
            json!([{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]);
        let msgs = vec![
            json!({"role": "system", "content": "Be brief."}),
            json!({"role": "user", "content": "Weather in Paris?"}),
            json!({"role": "assistant", "content": "", "tool_calls": [{"id": "c1", "type": "function",
                "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}]}),
            json!({"role": "tool", "tool_call_id": "c1", "content": "18C"}),
        ];
        let out = hermes_messages(&msgs, Some(&tools));
        assert_eq!(out.len(), 4);
        assert!(out[0]["content"].as_str().unwrap().starts_with("Be brief.\n\n"));
        assert!(out[0]["content"].as_str().unwrap().contains("\"get_weather\""));
        assert_eq!(
            out[2]["content"],
            "<tool_call>\n{\"arguments\":{\"city\":\"Paris\"},\"name\":\"get_weather\"}\n</tool_call>"
        );
        assert_eq!(out[3]["content"], "<tool_response>\n18C\n</tool_response>");
    }
}
