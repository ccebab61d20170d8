//! Stage 2: the sample corpus (real, long, licensed), document reading and bad input, the
//! type heuristic and the LLM classifier, decontamination, the too-long policy, assembly to
//! token budgets (fit, fill, same-type bundles with delimiters, quotas, histogram, seeds)
//! with the default model's tokenizer, the quality gates, synthesis with the default model
//! (store, resume after SIGKILL, shards merged), Parquet output.

use crate::common::*;
use std::collections::HashSet;
use wildlong::stage1::config::MetaSchema;
use wildlong::stage2::assemble::{assemble, delimiter};
use wildlong::stage2::config::{AssembleConfig, DocumentsConfig, Stage2Config};
use wildlong::stage2::documents::{heuristic_type, Document, DocumentReader};

fn corpus() -> Vec<Document> {
    let e = default_engine();
    let schema = MetaSchema::builtin();
    let docs_cfg = DocumentsConfig::default();
    let mut r = DocumentReader::new(&e.tokenizer, &schema, &docs_cfg);
    r.read("sample").unwrap();
    r.finish().unwrap().0
}

#[test]
fn builtin_stage2_config_spells_out_the_defaults() {
    assert_eq!(Stage2Config::builtin(), Stage2Config::default());
    Stage2Config::builtin().validate().unwrap();
    let e = format!(
        "{:#}",
        Stage2Config::load(None, &["assemble.buckets=[512]".into()]).unwrap_err()
    );
    assert!(e.contains("reserve_tokens"), "{e}");
}

#[test]
fn sample_corpus_is_long_licensed_and_varied() {
    let docs = corpus();
    assert!(docs.len() >= 24, "{}", docs.len());
    let types: HashSet<&str> = docs.iter().map(|d| d.document_type.as_str()).collect();
    assert!(types.len() >= 4, "{types:?}");
    for d in &docs {
        assert!(d.tokens >= 4096, "{}: {} tokens", d.id, d.tokens);
        assert!(d.source.is_some() && d.licence.is_some(), "{}", d.id);
        assert_eq!(d.type_from, "given");
    }
    // The first-pass heuristic: on code and legal text it is right or says `other`, and
    // right on most; it claims neither for prose and manuals.
    let (mut right, mut total) = (0, 0);
    for d in &docs {
        let h = heuristic_type(&d.text[..4000.min(d.text.len())]);
        match d.document_type.as_str() {
            "source code" | "legal contract" => {
                assert!(h == d.document_type || h == "other", "{}: {h}", d.id);
                total += 1;
                right += usize::from(h == d.document_type);
            }
            _ => assert_eq!(h, "other", "{}", d.id),
        }
    }
    assert!(right * 4 >= total * 3, "{right} of {total}");
}

#[test]
fn unusable_documents_are_counted_not_fatal() {
    let e = default_engine();
    let schema = MetaSchema::builtin();
    let docs_cfg = DocumentsConfig::default();
    let d = tempdir();
    std::fs::write(
        d.path().join("a.txt"),
        "The lease runs for two years. The tenant shall pay rent monthly.",
    )
    .unwrap();
    std::fs::write(d.path().join("empty.md"), "  \n").unwrap();
    std::fs::write(d.path().join("bad.txt"), b"caf\xe9").unwrap();
    std::fs::write(d.path().join("ignored.bin"), b"\x00\x01").unwrap();
    let jsonl = d.path().join("docs.jsonl");
    std::fs::write(
        &jsonl,
        "{\"_header\": {}}\n{\"id\": 7, \"text\": \"Quarterly revenue rose 4%.\", \"document_type\": \"10-K\"}\n{\"title\": \"no text\"}\n{\"text\": 5}\nnot json\n",
    )
    .unwrap();
    let mut r = DocumentReader::new(&e.tokenizer, &schema, &docs_cfg);
    r.read(d.path().to_str().unwrap()).unwrap();
    r.read(jsonl.to_str().unwrap()).unwrap();
    let (docs, stats) = r.finish().unwrap();
    let ids: Vec<&str> = docs.iter().map(|d| d.id.as_str()).collect();
    assert_eq!(ids, ["a.txt", "7"]);
    assert_eq!(docs[1].document_type, "financial report");
    assert_eq!(stats.skipped["empty"], 1);
    assert_eq!(stats.skipped["not UTF-8"], 1);
    assert_eq!(
        stats.skipped.values().sum::<usize>(),
        5,
        "{:?}",
        stats.skipped
    );
    assert!(stats
        .examples
        .iter()
        .any(|x| x.contains("docs.jsonl:3") && x.contains("text")));
    // Nothing usable: a clear error.
    let empty = d.path().join("empty.jsonl");
    std::fs::write(&empty, "").unwrap();
    let mut r = DocumentReader::new(&e.tokenizer, &schema, &docs_cfg);
    r.read(empty.to_str().unwrap()).unwrap();
    assert!(format!("{:#}", r.finish().unwrap_err()).contains("no usable documents"));
    // Parquet without a text column (conversations are not documents).
    let mut r = DocumentReader::new(&e.tokenizer, &schema, &docs_cfg);
    let p = fixture("stage1/wildchat_tiny.parquet");
    let err = format!("{:#}", r.read(p.to_str().unwrap()).unwrap_err());
    assert!(
        err.contains("no `text` column (found: conversation_hash"),
        "{err}"
    );
}

#[test]
fn contexts_fit_and_fill_their_budgets() {
    let e = default_engine();
    let mut docs = corpus();
    docs.push(Document {
        id: "tiny".into(),
        title: None,
        document_type: "novel".into(),
        type_from: "given".into(),
        source: None,
        licence: None,
        tokens: 12,
        text: "A short note that fits no bucket.".into(),
    });
    let cfg = AssembleConfig::default();
    let (ctx, stats) = assemble(&e.tokenizer, &docs, &cfg).unwrap();
    assert_eq!(stats.too_short_for_every_bucket, 1);
    for &bucket in &cfg.buckets {
        let b = &stats.buckets[&bucket];
        assert_eq!(b.wanted, 8);
        assert_eq!(b.multi, 2, "{b:?}");
        assert_eq!(b.single + b.multi + b.shortfall, 8);
        assert_eq!(b.shortfall, 0);
        assert_eq!(b.histogram.values().sum::<usize>(), 8);
    }
    let mut ids = HashSet::new();
    for c in &ctx {
        assert!(ids.insert(c.id.clone()));
        let budget = c.bucket - cfg.reserve_tokens;
        assert_eq!(c.budget, budget);
        let n = e.tokenizer.encode(&c.text, false).unwrap().len();
        assert_eq!(n, c.tokens);
        assert!(n <= budget, "{}: {n} > {budget}", c.id);
        assert!(
            n as f64 >= budget as f64 * (1.0 - cfg.fill_tolerance),
            "{}: {n} of {budget}",
            c.id
        );
        assert!(c.documents.iter().all(|p| p.id != "tiny"));
        if c.is_multi() {
            assert!((2..=5).contains(&c.documents.len()));
            assert!(c.task_family.is_some());
            let mut at = 0;
            for (i, p) in c.documents.iter().enumerate() {
                let d = docs.iter().find(|d| d.id == p.id).unwrap();
                assert_eq!(d.document_type, c.document_type, "bundles hold one type");
                let tag = delimiter(i + 1, &p.id);
                let pos = c.text[at..]
                    .find(&tag)
                    .unwrap_or_else(|| panic!("{tag:?} missing"))
                    + at;
                at = pos + tag.len();
            }
            assert!(c.text.starts_with("Document 1 (id: "));
            assert!(!c
                .text
                .contains(&format!("Document {} (id:", c.documents.len() + 1)));
        } else {
            assert!(!c.text.starts_with("Document 1 (id: "));
            let d = docs.iter().find(|d| d.id == c.documents[0].id).unwrap();
            assert!(d.text.starts_with(&c.text[..200]));
        }
    }
    // Seeded.
    let (again, _) = assemble(&e.tokenizer, &docs, &cfg).unwrap();
    assert_eq!(
        again.iter().map(|c| &c.id).collect::<Vec<_>>(),
        ctx.iter().map(|c| &c.id).collect::<Vec<_>>()
    );
    let other = AssembleConfig {
        seed: 12,
        ..cfg.clone()
    };
    let (o, _) = assemble(&e.tokenizer, &docs, &other).unwrap();
    assert_ne!(
        o.iter().map(|c| &c.id).collect::<Vec<_>>(),
        ctx.iter().map(|c| &c.id).collect::<Vec<_>>()
    );
}

#[test]
fn answer_gates_reject_by_reason() {
    use wildlong::engine::generate::FinishReason::{Eos, Length};
    use wildlong::stage2::gates::answer_gate;
    let doc = "Revenue was 4200 in 2023 and the tenant pays 15 per cent. Mr. Holt of Acme Corp signed: \"the lessee shall keep the premises in good repair\".";
    let gate = |a: &str, f| answer_gate(a, f, doc, "What did Holt sign?", 3, 0.25);
    assert_eq!(gate("  ", Eos), Some("empty_answer"));
    assert_eq!(gate("I'm sorry, I can't help.", Eos), Some("refusal"));
    assert_eq!(gate("Revenue was high and", Length), Some("answer_cut_off"));
    assert_eq!(gate("Yes.", Eos), Some("too_short"));
    assert_eq!(
        gate("Revenue was 4300 in 2023.", Eos),
        Some("ungrounded_number")
    );
    assert_eq!(gate("Revenue was 4200 in 2023, a 5 point rise.", Eos), None);
    // Quotes of three or more words must be in the documents (case and spacing aside).
    assert_eq!(
        gate(
            "Holt agreed that “the  Lessee shall keep the premises” tidy.",
            Eos
        ),
        None
    );
    assert_eq!(
        gate("Holt agreed that \"the lessee must paint the walls\".", Eos),
        Some("ungrounded_quote")
    );
    // Names not at a sentence start: in the documents or the instruction; one missing of
    // four is within the 25% allowed, two are not.
    assert_eq!(
        gate("It was signed by Holt for Acme Corp in Dublin.", Eos),
        None
    );
    assert_eq!(
        gate("It was signed by Holt in Dublin with Smith.", Eos),
        Some("ungrounded_name")
    );
    assert_eq!(gate("The lease. Revenue rose: Tenants pay.", Eos), None);
}

#[test]
fn names_and_quotes_are_found_where_they_stand() {
    use wildlong::stage2::gates::{names, quotes};
    let n = names("The report by Alice Smith cites NASA.\n- Budgets rose. See Table 3 and I agree.\n1. Bob's plan");
    let got: Vec<&str> = n.iter().map(String::as_str).collect();
    assert_eq!(got, ["Alice", "NASA", "Smith", "Table"]);
    assert_eq!(
        quotes("He said \"go now\" and “stay here for ever” then \"ok\""),
        ["stay here for ever"]
    );
}

#[test]
fn token_f1_follows_squads_definition() {
    use wildlong::text::token_f1;
    // SQuAD v1.1 evaluate.py: lowercase, punctuation deleted, articles dropped.
    assert!((token_f1("The cat sat.", "a cat sat on the mat") - 2.0 / 3.0).abs() < 1e-12);
    assert_eq!(token_f1("Paris", "paris!"), 1.0);
    assert_eq!(token_f1("the", "a"), 0.0);
    assert_eq!(token_f1("", "x"), 0.0);
    // Repeated words count once per occurrence in the reference.
    assert!((token_f1("dog dog dog", "dog cat") - 0.4).abs() < 1e-12);
}

#[test]
fn decontamination_finds_ruler_sources_and_spares_the_corpus() {
    use wildlong::stage2::gates::Decontaminator;
    let d = Decontaminator::ruler(13, None, None).unwrap();
    // A passage of the essay haystack, re-wrapped and re-cased, inside other text.
    let haystack = wildlong::eval::ruler::data::Assets::load(None, None).unwrap();
    let passage = haystack.essay_words[5000..5040].join("\n").to_uppercase();
    assert!(d.shared(&format!("Intro words here. {passage} Outro.")) >= 20);
    // A SQuAD paragraph and a HotpotQA question.
    let para = &haystack.squad.docs[3];
    assert!(d.shared(para) > 0);
    let q = haystack
        .hotpotqa
        .qas
        .iter()
        .find(|q| q.query.split_whitespace().count() >= 13)
        .unwrap();
    assert!(d.shared(&q.query) > 0);
    assert_eq!(
        d.shared(
            "A new sentence of our own that nobody has ever written down before today, surely."
        ),
        0
    );
    // The sample corpus does not overlap (no Sherlock Holmes in it), so nothing is skipped.
    let e = default_engine();
    let schema = MetaSchema::builtin();
    let cfg = DocumentsConfig::default();
    let mut r = DocumentReader::new(&e.tokenizer, &schema, &cfg);
    r.decontaminate = Some(&d);
    r.read("sample").unwrap();
    let dir = tempdir();
    let f = dir.path().join("docs.jsonl");
    std::fs::write(
        &f,
        serde_json::json!({"id": "leak", "text": format!("Notes.\n{passage}\nMore notes."), "document_type": "novel"}).to_string() + "\n",
    )
    .unwrap();
    r.read(f.to_str().unwrap()).unwrap();
    let (docs, stats) = r.finish().unwrap();
    assert!(docs.len() >= 24 && docs.iter().all(|d| d.id != "leak"));
    assert_eq!(stats.skipped, [("contaminated".to_string(), 1)].into());
}

#[test]
fn documents_longer_than_the_context_are_cut_or_skipped_by_policy() {
    use wildlong::stage2::config::TooLongPolicy;
    let e = default_engine();
    let schema = MetaSchema::builtin();
    for policy in [TooLongPolicy::Truncate, TooLongPolicy::Skip] {
        let cfg = DocumentsConfig {
            too_long: policy,
            ..DocumentsConfig::default()
        };
        let mut r = DocumentReader::new(&e.tokenizer, &schema, &cfg);
        r.max_context = 8192;
        r.read("sample").unwrap();
        let n_long = r.documents.iter().filter(|d| d.tokens > 8192).count();
        let (docs, stats) = r.finish().unwrap();
        match policy {
            TooLongPolicy::Truncate => {
                assert!(n_long > 0);
                assert_eq!(stats.longer_than_context, n_long);
                assert!(stats.skipped.is_empty());
            }
            TooLongPolicy::Skip => {
                assert!(docs.iter().all(|d| d.tokens <= 8192));
                assert!(stats.skipped["longer_than_context"] > 0);
                assert_eq!(stats.longer_than_context, 0);
            }
        }
    }
}

#[test]
fn the_llm_types_what_the_heuristic_cannot_place() {
    use wildlong::generator::Llm;
    use wildlong::records::Store;
    use wildlong::stage2::config::DocumentClassifier;
    let e = load(
        &default_model_path(),
        wildlong::engine::config::EngineConfig::default(),
    );
    let llm = Llm::Local(Box::new(e));
    let tok = &llm.local().unwrap().tokenizer;
    let schema = MetaSchema::builtin();
    let d = tempdir();
    let docs = d.path().join("docs");
    std::fs::create_dir(&docs).unwrap();
    std::fs::write(
        docs.join("story.txt"),
        "Chapter One\n\nThe rain had not stopped for three days when Margaret finally opened the letter from her brother. She read it twice by the window, then folded it and put it in the drawer with the others.",
    )
    .unwrap();
    std::fs::write(
        docs.join("lib.py"),
        "import os\nimport sys\n\ndef main():\n    for p in sys.argv[1:]:\n        print(os.path.getsize(p))\n\nif __name__ == '__main__':\n    main()\n",
    )
    .unwrap();
    std::fs::rename(docs.join("lib.py"), docs.join("lib.txt")).unwrap();
    let store = Store::open(&d.path().join("store")).unwrap();
    let names: HashSet<String> = schema
        .document_types
        .iter()
        .map(|t| t.name.clone())
        .collect();
    for classifier in [
        DocumentClassifier::Heuristic,
        DocumentClassifier::Llm,
        DocumentClassifier::Llm,
    ] {
        let cfg = DocumentsConfig {
            classifier,
            ..DocumentsConfig::default()
        };
        let mut r = DocumentReader::new(tok, &schema, &cfg);
        r.read(docs.to_str().unwrap()).unwrap();
        r.classify(&llm, "default", &store).unwrap();
        let (got, stats) = r.finish().unwrap();
        // The heuristic places the program; the story is left to the LLM.
        assert_eq!(got[0].id, "lib.txt");
        assert_eq!(
            (got[0].document_type.as_str(), got[0].type_from.as_str()),
            ("source code", "heuristic")
        );
        match classifier {
            DocumentClassifier::Heuristic => {
                assert_eq!(
                    (got[1].document_type.as_str(), got[1].type_from.as_str()),
                    ("other", "heuristic")
                );
            }
            DocumentClassifier::Llm => {
                assert_eq!(got[1].type_from, "llm");
                assert!(
                    names.contains(&got[1].document_type),
                    "{}",
                    got[1].document_type
                );
                assert_eq!(stats.typed_by_llm, 1);
            }
        }
    }
    // The answer is stored under the request: the third pass asked nothing new.
    assert_eq!(
        std::fs::read_dir(d.path().join("store")).unwrap().count(),
        1
    );
}

#[test]
fn parquet_output_holds_the_pairs() {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    use wildlong::engine::chat::Message;
    use wildlong::records::{Pair, PairMetadata};
    let pair = |i: usize, multi: bool| Pair {
        id: format!("p{i}"),
        messages: vec![
            Message::new("user", format!("Document text {i}\n\nWhat is it?")),
            Message::new(
                "assistant",
                format!("Answer {i} with “quotes” and ünïcode."),
            ),
        ],
        metadata: PairMetadata {
            context_id: format!("c{i}"),
            document_ids: vec!["a".into(), "b".into()],
            document_type: "novel".into(),
            bucket: 4096,
            prompt_tokens: 3000 + i,
            multi_document: multi,
            task_family: None,
            blueprint_id: "bp".into(),
            blueprint_path: vec![],
            blueprint_instruction: "Summarize.".into(),
            instruction: "What is it?".into(),
            conversation_ids: vec!["c1".into()],
            model: "default".into(),
            prompt_version: "synth-v1".into(),
            seed: 7,
            closed_book_f1: Some(0.25),
            hash: "h".into(),
        },
    };
    let mut pairs = vec![pair(0, false), pair(1, true)];
    pairs[1].messages.push(Message::new("user", "And then?"));
    let d = tempdir();
    let path = d.path().join("data.parquet");
    wildlong::stage2::output::write_parquet(&path, &pairs).unwrap();
    let r = SerializedFileReader::new(std::fs::File::open(&path).unwrap()).unwrap();
    assert_eq!(r.metadata().file_metadata().num_rows(), 2);
    let rows: Vec<serde_json::Value> = r
        .get_row_iter(None)
        .unwrap()
        .map(|r| r.unwrap().to_json_value())
        .collect();
    for (row, p) in rows.iter().zip(&pairs) {
        assert_eq!(row["id"], p.id.as_str());
        let msgs: Vec<Message> = serde_json::from_value(row["messages"].clone()).unwrap();
        assert_eq!(msgs, p.messages);
        assert_eq!(row["bucket"], 4096);
        assert_eq!(row["prompt_tokens"], p.metadata.prompt_tokens as u64);
        assert_eq!(row["multi_document"], p.metadata.multi_document);
        let meta: PairMetadata = serde_json::from_str(row["metadata"].as_str().unwrap()).unwrap();
        assert_eq!(meta, p.metadata);
    }
}

#[test]
fn synthesis_pairs_fit_their_bucket_and_resume_from_the_store() {
    let _limit = time_limit(5);
    use wildlong::generator::Llm;
    use wildlong::records::{Blueprint, Store};
    use wildlong::shard::Shard;
    use wildlong::stage2::config::Stage2GenerateConfig;
    use wildlong::stage2::synth::Synth;
    let llm = Llm::Local(Box::new(load(
        &default_model_path(),
        wildlong::engine::config::EngineConfig::default(),
    )));
    let e = llm.local().unwrap();
    let docs = corpus();
    let cfg = AssembleConfig {
        buckets: vec![2048],
        per_bucket: 2,
        multi_document_share: 0.5,
        max_documents: 2,
        ..AssembleConfig::default()
    };
    let (ctx, _) = assemble(&e.tokenizer, &docs, &cfg).unwrap();
    assert_eq!(ctx.len(), 2);
    let d = tempdir();
    let blueprints: Vec<Blueprint> =
        wildlong::records::read_jsonl_resumable(&blueprint_file(d.path())).unwrap();
    let stage2 = Stage2Config {
        generate: Stage2GenerateConfig {
            instructions_per_context: 1,
            max_answer_tokens: 48,
            max_instruction_chars: 200,
            ..Stage2GenerateConfig::default()
        },
        ..Stage2Config::default()
    };
    let synth = |store: &std::path::Path| Synth {
        llm: &llm,
        tokenizer: &e.tokenizer,
        template: e.chat_template.as_ref().unwrap(),
        model: "default".into(),
        cfg: &stage2,
        decontaminate: None,
        store: Store::open(store).unwrap(),
    };
    let s1 = synth(&d.path().join("store"));
    let (pairs, stats) = s1
        .run(&ctx, &blueprints, Shard::default(), d.path())
        .unwrap();
    assert_eq!(stats.contexts, 2);
    // Two rewrites, two answers, and a closed-book answer for each that passed the gates.
    let passed = pairs.len()
        + stats.rejected.get("closed_book").unwrap_or(&0)
        + stats
            .rejected
            .get("near_duplicate_instruction")
            .unwrap_or(&0);
    assert_eq!(stats.generated, 4 + passed, "{stats:?}");
    assert_eq!(
        pairs.len() + stats.rejected.values().sum::<usize>(),
        2,
        "{stats:?}"
    );
    for p in &pairs {
        assert_eq!(p.messages.len(), 2);
        let c = ctx.iter().find(|c| c.id == p.metadata.context_id).unwrap();
        assert_eq!(p.metadata.document_ids[0], c.documents[0].id);
        assert!(p.messages[0].content.starts_with(&c.text));
        assert!(p.messages[0].content.ends_with(&p.metadata.instruction));
        assert!(p.metadata.closed_book_f1.unwrap() < 0.5);
        assert!(p.metadata.prompt_tokens < c.bucket);
        assert_eq!(p.metadata.multi_document, c.is_multi());
        assert_eq!(p.metadata.conversation_ids, ["c1"]);
        assert_eq!(p.metadata.prompt_version, "synth-v1");
    }
    let written = std::fs::read_to_string(d.path().join("data.jsonl")).unwrap();
    assert_eq!(written.lines().count(), pairs.len());
    // Each context's answer took its documents from the prefix cache its rewrite filled
    // (the two contexts ran side by side).
    let docs = stats.document_cache.unwrap();
    assert!(docs.prompt_tokens > 1000, "{docs:?}");
    assert!(docs.hit_rate >= 0.9, "{docs:?}");
    // One row at a time (the contexts' requests finish in another order): the same pairs.
    let one_row = Llm::Local(Box::new(load(
        &default_model_path(),
        wildlong::engine::config::EngineConfig {
            max_batch: 1,
            ..Default::default()
        },
    )));
    std::fs::create_dir_all(d.path().join("one-row")).unwrap();
    let (sequential, _) = Synth {
        llm: &one_row,
        ..synth(&d.path().join("store-one-row"))
    }
    .run(
        &ctx,
        &blueprints,
        Shard::default(),
        &d.path().join("one-row"),
    )
    .unwrap();
    assert_eq!(sequential, pairs);
    // A second run reads every result from the store: nothing generated, same pairs.
    let (again, stats2) = synth(&d.path().join("store"))
        .run(&ctx, &blueprints, Shard::default(), d.path())
        .unwrap();
    assert_eq!(stats2.generated, 0);
    assert_eq!(stats2.reused, stats.generated);
    assert_eq!(again, pairs);
}

pub(crate) fn blueprint_file(dir: &std::path::Path) -> std::path::PathBuf {
    let p = dir.join("blueprints.jsonl");
    let lines: Vec<String> = ["novel", "source code", "technical manual", "legal contract"]
        .iter()
        .map(|t| {
            serde_json::json!({
                "id": format!("bp-{t}"), "document_type": t,
                "path": [{"field": "task", "value": "summarize key points"}],
                "instruction": format!("Summarize the main points of this {t} in a few sentences."),
                "provenance": {"model": "m", "prompt_version": "v", "seed": 1,
                    "conversation_ids": ["c1"], "weighting": "count"}
            })
            .to_string()
        })
        .collect();
    std::fs::write(&p, lines.join("\n") + "\n").unwrap();
    p
}

#[test]
fn killed_synthesis_resumes_to_the_same_dataset() {
    let _limit = time_limit(8);
    let d = tempdir();
    let bp = blueprint_file(d.path());
    let args = |run: &std::path::Path| {
        vec![
            "synth".to_string(),
            "--model".into(),
            "default".into(),
            "--run".into(),
            run.to_str().unwrap().into(),
            "--blueprints".into(),
            bp.to_str().unwrap().into(),
            "--set".into(),
            "assemble.buckets=[1024]".into(),
            "--set".into(),
            "assemble.reserve_tokens=384".into(),
            "--set".into(),
            "assemble.per_bucket=2".into(),
            "--set".into(),
            "generate.instructions_per_context=1".into(),
            "--set".into(),
            "generate.max_answer_tokens=32".into(),
            "--set".into(),
            "gates.min_answer_words=1".into(),
            "--batch-size".into(),
            "1".into(),
        ]
    };
    let run = |dir: &std::path::Path| {
        let a = args(dir);
        wildlong(&a.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let whole = d.path().join("whole");
    ok(&run(&whole).output().unwrap());
    let reference = std::fs::read_to_string(whole.join("stage2/data.jsonl")).unwrap();
    let card = std::fs::read_to_string(whole.join("stage2/README.md")).unwrap();
    let n = reference.lines().count();
    // What became of every context (kept, or rejected and why): the default model's answers
    // at these small budgets are mostly cut off, so the rejections carry the comparison.
    let outcome = |run: &std::path::Path| {
        let v: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(run.join("stage2/synth_stats.json")).unwrap(),
        )
        .unwrap();
        (
            v["contexts"].clone(),
            v["pairs"].clone(),
            v["rejected"].clone(),
        )
    };
    let reference_outcome = outcome(&whole);
    assert_eq!(reference_outcome.0, 2);
    assert!(card.contains(&format!("| total | {n} |")), "{card}");

    let killed = d.path().join("killed");
    let store = killed.join("stage2/store");
    let mut child = run(&killed).spawn().unwrap();
    let count = |p: &std::path::Path| {
        std::fs::read_dir(p)
            .map(|r| {
                r.filter_map(|e| e.ok())
                    .map(|e| std::fs::read_dir(e.path()).map(|x| x.count()).unwrap_or(0))
                    .sum::<usize>()
            })
            .unwrap_or(0)
    };
    let t0 = std::time::Instant::now();
    while count(&store) < 1 {
        assert!(t0.elapsed().as_secs() < 600, "no result after 10 minutes");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let kept = count(&store);
    let out = ok(&run(&killed).output().unwrap());
    assert!(out.contains(&format!("{kept} from the store")), "{out}");
    assert_eq!(
        std::fs::read_to_string(killed.join("stage2/data.jsonl")).unwrap(),
        reference
    );
    assert_eq!(outcome(&killed), reference_outcome);
    // Two shards, then the merge: the same dataset and card as one run.
    let sharded = d.path().join("sharded");
    for k in ["1/2", "2/2"] {
        let mut a = args(&sharded);
        a.extend(["--shard".to_string(), k.to_string()]);
        ok(&wildlong(&a.iter().map(String::as_str).collect::<Vec<_>>())
            .output()
            .unwrap());
    }
    assert!(sharded.join("stage2/data.shard-2-of-2.jsonl").is_file());
    let merge = ["synth", "--merge", "--run", sharded.to_str().unwrap()];
    let out = ok(&wildlong(&merge).output().unwrap());
    assert!(out.contains(&format!("merged {n} pairs")), "{out}");
    assert_eq!(
        std::fs::read_to_string(sharded.join("stage2/data.jsonl")).unwrap(),
        reference
    );
    assert_eq!(
        std::fs::read_to_string(sharded.join("stage2/README.md")).unwrap(),
        card
    );
    // A missing shard is named.
    std::fs::remove_file(sharded.join("stage2/data.shard-1-of-2.jsonl")).unwrap();
    let o = wildlong(&merge).output().unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("shards [2] of 2 found"));
    // Missing blueprints: a clear error.
    let o = wildlong(&["synth", "--run", d.path().join("none").to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("run `wildlong sample` first"));
}

#[test]
fn synthesis_types_documents_with_the_schema_stage_one_extracted_with() {
    // Stage 2 used the built-in schema whatever stage 1 ran with, so a custom taxonomy sent
    // every document to `other`, where no blueprint waits.
    let _limit = time_limit(5);
    use wildlong::generator::Llm;
    use wildlong::stage1::config::DocumentTypeSpec;
    use wildlong::stage2::config::Stage2GenerateConfig;
    use wildlong::stage2::run::{run, SynthJob};
    let d = tempdir();
    let stage1 = d.path().join("stage1");
    std::fs::create_dir_all(&stage1).unwrap();
    let mut schema = MetaSchema::builtin();
    schema.document_types = vec![DocumentTypeSpec {
        name: "recipe".into(),
        aliases: vec!["cookbook".into()],
    }];
    assert_eq!(MetaSchema::builtin().map_document_type("cookbook"), "other");
    // As extraction records it.
    schema.save_in(&stage1).unwrap();
    assert_eq!(MetaSchema::of_stage1(&stage1).unwrap(), schema);
    let blueprints = stage1.join("blueprints.jsonl");
    let bp = serde_json::json!({
        "id": "bp-recipe", "document_type": "recipe",
        "path": [{"field": "task", "value": "list ingredients"}],
        "instruction": "List the ingredients this text names.",
        "provenance": {"model": "m", "prompt_version": "v", "seed": 1,
            "conversation_ids": ["c1"], "weighting": "count"}
    });
    std::fs::write(&blueprints, format!("{bp}\n")).unwrap();
    let docs = d.path().join("docs.jsonl");
    let text = &corpus()[0].text;
    let doc = serde_json::json!({"id": "r1", "text": text, "document_type": "cookbook"});
    std::fs::write(&docs, format!("{doc}\n")).unwrap();
    let cfg = Stage2Config {
        documents: DocumentsConfig {
            paths: vec![docs.display().to_string()],
            ..DocumentsConfig::default()
        },
        assemble: AssembleConfig {
            buckets: vec![1024],
            per_bucket: 1,
            reserve_tokens: 256,
            multi_document_share: 0.0,
            ..AssembleConfig::default()
        },
        generate: Stage2GenerateConfig {
            instructions_per_context: 1,
            max_answer_tokens: 16,
            ..Stage2GenerateConfig::default()
        },
        ..Stage2Config::default()
    };
    let engine = wildlong::engine::config::EngineConfig::default();
    let llm = Llm::Local(Box::new(load(&default_model_path(), engine.clone())));
    let out = run(&SynthJob {
        llm: &llm,
        model: "default".into(),
        tokenizer: "default".into(),
        cfg: &cfg,
        run: d.path().to_path_buf(),
        blueprints,
        shard: wildlong::shard::Shard::whole(),
        models_dir: root().join("models"),
        engine,
    })
    .unwrap();
    let stats: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(d.path().join("stage2/documents_stats.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(stats["types"], serde_json::json!({"recipe": 1}), "{stats}");
    assert_eq!(out.contexts, 1);
    // The recipe context met the recipe blueprint: its instruction was rewritten.
    assert!(out.stats.generated >= 1, "{:?}", out.stats);
}
