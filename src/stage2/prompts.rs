//! Stage 2's prompts, versioned: the adaptive rewrite of a blueprint for concrete
//! document(s), and the answer. Both put the document block first so that every request
//! over one context continues the same prefilled prefix.

use crate::engine::chat::Message;

pub const VERSION: &str = "synth-v1";

pub const SYSTEM: &str = "You are a careful assistant. You read the documents the user gives you and answer only from them.";

/// The user turn: the documents, a blank line, then `request`.
pub fn user_turn(documents: &str, request: &str) -> Vec<Message> {
    vec![
        Message::new("system", SYSTEM),
        Message::new("user", format!("{documents}\n\n{request}")),
    ]
}

/// The rewrite request that follows the documents.
pub fn rewrite_request(
    document_type: &str,
    documents: usize,
    task_family: Option<&str>,
    blueprint: &str,
) -> String {
    let what = if documents == 1 {
        format!("the {document_type} above")
    } else {
        format!("the {documents} documents above (each a {document_type})")
    };
    let mut s = format!(
        "Here is a request a user once wrote for a document like this:\n\"{blueprint}\"\nRewrite it into one concrete request about {what}, answerable from them alone, naming their actual content."
    );
    if let Some(f) = task_family {
        s.push_str(&format!(
            " The request must need every document: a {f} task."
        ));
    }
    s.push_str(" Answer with JSON: {\"instruction\": \"...\"}");
    s
}

pub const CLASSIFY_VERSION: &str = "classify-v1";

/// Asks which taxonomy type a document is, from its beginning.
pub fn classify_turn(head: &str, types: &[&str]) -> Vec<Message> {
    vec![
        Message::new(
            "system",
            "You sort documents into types. You answer with JSON only.",
        ),
        Message::new(
            "user",
            format!(
                "Here is the beginning of a document:\n\n{head}\n\nWhich type of document is it? Choose one of: {}. Answer with JSON: {{\"document_type\": \"...\"}}",
                types.join(", ")
            ),
        ),
    ]
}

/// The instruction alone, without the documents (the closed-book check).
pub fn closed_book_turn(instruction: &str) -> Vec<Message> {
    vec![
        Message::new("system", "You are a helpful assistant."),
        Message::new("user", instruction),
    ]
}
