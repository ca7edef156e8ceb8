//! Chat templates: the GGUF's `tokenizer.chat_template` rendered with minijinja the way Hugging
//! Face's `apply_chat_template` renders it (trim_blocks, lstrip_blocks, Python string methods,
//! `raise_exception`, `strftime_now`, `tojson`).

use std::path::Path;

use minijinja::{Environment, Error as JinjaError, ErrorKind, Value, context};

use crate::gguf::{GgufFile, MetaValue};

#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    #[error("invalid chat template: {0}")]
    Template(String),
    #[error("the chat template refused the conversation: {0}")]
    Render(String),
    #[error("cannot read the chat template: {0}")]
    Model(#[from] crate::EngineError),
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

const CHATML: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

const GEMMA_TURNS: &str = "{{ bos_token }}{% for message in messages %}{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}{% if role == 'system' %}{% set role = 'user' %}{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}";

pub struct ChatTemplate {
    env: Environment<'static>,
    bos: String,
    eos: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate").finish_non_exhaustive()
    }
}

impl ChatTemplate {
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<ChatTemplate, ChatError> {
        let mut env = Environment::new();
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| ChatError::Template(e.to_string()))?;
        env.set_syntax(syntax);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> Result<Value, JinjaError> {
            Err(JinjaError::new(ErrorKind::InvalidOperation, msg))
        });
        env.add_function("strftime_now", |fmt: String| -> String { strftime_now(&fmt) });
        // HF training-only markers; they render their body unchanged.
        let source = source.replace("{% generation %}", "").replace("{% endgeneration %}", "");
        env.add_template_owned("chat", source).map_err(|e| ChatError::Template(e.to_string()))?;
        Ok(ChatTemplate { env, bos: bos_token.to_string(), eos: eos_token.to_string() })
    }

    /// The template embedded in a GGUF file, or `None` if it has none.
    pub fn from_gguf(path: &Path) -> Result<Option<ChatTemplate>, ChatError> {
        let file = GgufFile::open(path)?;
        let Some(source) = file.get_str("tokenizer.chat_template") else { return Ok(None) };
        let token = |key: &str| -> String {
            let id = file.get(key).and_then(MetaValue::as_u64);
            let tokens = file.get("tokenizer.ggml.tokens").and_then(MetaValue::as_array);
            match (id, tokens) {
                (Some(id), Some(t)) => t.get(id as usize).and_then(MetaValue::as_str).unwrap_or("").to_string(),
                _ => String::new(),
            }
        };
        let (bos, eos) = (token("tokenizer.ggml.bos_token_id"), token("tokenizer.ggml.eos_token_id"));
        ChatTemplate::new(source, &bos, &eos).map(Some)
    }

    /// ChatML (`<|im_start|>role\ncontent<|im_end|>\n`).
    pub fn chatml() -> ChatTemplate {
        ChatTemplate::new(CHATML, "", "").expect("built-in template parses")
    }

    /// A template for a model that ships none, chosen by architecture.
    pub fn fallback_for(arch: &str) -> Result<ChatTemplate, ChatError> {
        Ok(match arch {
            a if a.starts_with("gemma") => ChatTemplate::new(GEMMA_TURNS, "<bos>", "<eos>")?,
            _ => ChatTemplate::chatml(),
        })
    }

    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String, ChatError> {
        let messages = serde_json::to_value(messages).expect("messages serialize");
        self.render_json(&messages, None, add_generation_prompt)
    }

    /// Render OpenAI-shaped messages (and tools) as JSON values.
    pub fn render_json(
        &self,
        messages: &serde_json::Value,
        tools: Option<&serde_json::Value>,
        add_generation_prompt: bool,
    ) -> Result<String, ChatError> {
        let tmpl = self.env.get_template("chat").expect("template was added");
        let ctx = context! {
            messages => Value::from(minijinja::value::Serde(messages)),
            tools => tools.map(|t| Value::from(minijinja::value::Serde(t))),
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos.clone(),
            eos_token => self.eos.clone(),
        };
        tmpl.render(ctx).map_err(|e| ChatError::Render(e.to_string()))
    }
}

/// `strftime` for the few formats chat templates use (dates only, UTC).
fn strftime_now(fmt: &str) -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let days = (secs / 86_400) as i64;
    // Civil-from-days (proleptic Gregorian), Howard Hinnant's algorithm.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    fmt.replace("%Y", &y.to_string())
        .replace("%m", &format!("{m:02}"))
        .replace("%d", &format!("{d:02}"))
        .replace("%B", MONTHS[(m - 1) as usize])
        .replace("%b", &MONTHS[(m - 1) as usize][..3])
}
