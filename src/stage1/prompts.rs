//! Every LLM prompt of stage 1, versioned: the meta-information extraction prompt and the
//! blueprint prompt. A change to a prompt's text bumps its version, which is recorded in
//! every record made with it (and a run folder refuses to mix versions).

use crate::engine::chat::Message;
use crate::records::PathStep;
use crate::stage1::config::MetaSchema;

pub const EXTRACT_VERSION: &str = "extract-v2";

pub const EXTRACT_SYSTEM: &str = "You analyse requests that users send to an AI assistant. You describe each request with short, general phrases and answer with one JSON object.";

/// The extraction user message: field list, then the query (last, so that everything before
/// it is the same for every query and is prefilled once).
pub fn extract_user(schema: &MetaSchema, max_chars: usize, query: &str) -> String {
    let mut s = format!(
        "Describe the request below with these fields (each a short phrase of at most {max_chars} characters; write \"none\" when the request does not say):\n"
    );
    for f in &schema.fields {
        s.push_str(&format!("- {}: {}\n", f.name, f.description));
    }
    s.push_str("\nRequest:\n");
    s.push_str(query);
    s
}

/// The extraction chat: system, one user/assistant pair per worked example (the answer as
/// compact JSON in field order), then the query.
pub fn extract_messages(schema: &MetaSchema, max_chars: usize, query: &str) -> Vec<Message> {
    let mut m = vec![Message::new("system", EXTRACT_SYSTEM)];
    for e in &schema.examples {
        m.push(Message::new(
            "user",
            extract_user(schema, max_chars, &e.query),
        ));
        let mut obj = serde_json::Map::new();
        for f in &schema.fields {
            obj.insert(f.name.clone(), e.meta[&f.name].clone().into());
        }
        m.push(Message::new(
            "assistant",
            serde_json::Value::Object(obj).to_string(),
        ));
    }
    m.push(Message::new("user", extract_user(schema, max_chars, query)));
    m
}

pub const BLUEPRINT_VERSION: &str = "blueprint-v2";

pub const BLUEPRINT_SYSTEM: &str = "You write realistic requests that people send to an AI assistant together with a long document they paste.";

/// The blueprint user message: the document type and the path's (field, value) pairs.
pub fn blueprint_user(document_type: &str, path: &[PathStep]) -> String {
    let doc = if document_type == "other" {
        "document".to_string()
    } else {
        document_type.to_string()
    };
    let mut s = format!(
        "A user pastes a {doc} and asks the assistant to do something with it. Write the user's request. It must fit all of these:\n"
    );
    for step in path {
        s.push_str(&format!(
            "- {}: {}\n",
            step.field.replace('_', " "),
            step.value
        ));
    }
    s.push_str(&format!(
        "Refer to the document as \"the {doc}\" and do not include the document itself. Answer with JSON: {{\"instruction\": \"...\"}}"
    ));
    s
}

/// The blueprint chat: system, one worked example, then the path.
pub fn blueprint_messages(document_type: &str, path: &[PathStep]) -> Vec<Message> {
    let step = |f: &str, v: &str| PathStep {
        field: f.into(),
        value: v.into(),
    };
    let example = [
        step("task", "list the obligations of each party"),
        step("user_profile", "small business owner"),
        step("output_format", "table"),
        step("tone", "plain and practical"),
    ];
    vec![
        Message::new("system", BLUEPRINT_SYSTEM),
        Message::new("user", blueprint_user("legal contract", &example)),
        Message::new(
            "assistant",
            r#"{"instruction": "I run a small bakery and I'm about to sign the legal contract below with a new supplier. Can you put what each side has to do in a simple table, in plain words, so I know what I'm agreeing to?"}"#,
        ),
        Message::new("user", blueprint_user(document_type, path)),
    ]
}
