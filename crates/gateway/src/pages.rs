//! The two HTML pages, embedded in the binary (no CDN, no build step): the web chat at `/` and
//! the swarm dashboard at `/swarm`.

use axum::response::Html;

const CHAT_HTML: &str = include_str!("../static/chat.html");
const SWARM_HTML: &str = include_str!("../static/swarm.html");

pub async fn chat() -> Html<&'static str> {
    Html(CHAT_HTML)
}

pub async fn swarm() -> Html<&'static str> {
    Html(SWARM_HTML)
}
