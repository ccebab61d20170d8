//! Stage 2 so far: the sample corpus (real, long, licensed), document reading and bad input,
//! the type heuristic, and assembly to token budgets (fit, fill, same-type bundles with
//! delimiters, quotas, histogram, seeds) with the default model's tokenizer.

use crate::common::*;
use std::collections::HashSet;
use wildlong::config::{AssembleConfig, MetaSchema, Stage2Config};
use wildlong::stage2::assemble::{assemble, delimiter};
use wildlong::stage2::documents::{heuristic_type, Document, DocumentReader};

fn corpus() -> Vec<Document> {
    let e = default_engine();
    let schema = MetaSchema::builtin();
    let mut r = DocumentReader::new(&e.tokenizer, &schema, 4000);
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
    let mut r = DocumentReader::new(&e.tokenizer, &schema, 4000);
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
    let mut r = DocumentReader::new(&e.tokenizer, &schema, 4000);
    r.read(empty.to_str().unwrap()).unwrap();
    assert!(format!("{:#}", r.finish().unwrap_err()).contains("no usable documents"));
    // Parquet without a text column (conversations are not documents).
    let mut r = DocumentReader::new(&e.tokenizer, &schema, 4000);
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
    use wildlong::stage2::synth::answer_gate;
    let doc = "Revenue was 4200 in 2023 and the tenant pays 15 per cent.";
    assert_eq!(answer_gate("  ", Eos, doc, 3), Some("empty_answer"));
    assert_eq!(
        answer_gate("I'm sorry, I can't help.", Eos, doc, 3),
        Some("refusal")
    );
    assert_eq!(
        answer_gate("Revenue was high and", Length, doc, 3),
        Some("answer_cut_off")
    );
    assert_eq!(answer_gate("Yes.", Eos, doc, 3), Some("too_short"));
    assert_eq!(
        answer_gate("Revenue was 4300 in 2023.", Eos, doc, 3),
        Some("ungrounded_number")
    );
    assert_eq!(
        answer_gate("Revenue was 4200 in 2023, a 5 point rise.", Eos, doc, 3),
        None
    );
}

#[test]
fn synthesis_pairs_fit_their_bucket_and_resume_from_the_store() {
    use wildlong::config::{Shard, Stage2GenerateConfig};
    use wildlong::records::{Blueprint, Store};
    use wildlong::stage2::synth::Synth;
    let e = default_engine();
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
    let gen = Stage2GenerateConfig {
        instructions_per_context: 1,
        max_answer_tokens: 48,
        max_instruction_chars: 200,
        ..Stage2GenerateConfig::default()
    };
    let synth = |store: &std::path::Path| Synth {
        engine: e,
        model: "default".into(),
        cfg: &gen,
        store: Store::open(store).unwrap(),
    };
    let s1 = synth(&d.path().join("store"));
    let (pairs, stats) = s1
        .run(&ctx, &blueprints, Shard::default(), d.path())
        .unwrap();
    assert_eq!(stats.contexts, 2);
    assert_eq!(stats.generated, 4, "{stats:?}");
    assert_eq!(
        pairs.len() + stats.rejected.values().sum::<usize>(),
        2,
        "{stats:?}"
    );
    for p in &pairs {
        assert_eq!(p.messages.len(), 2);
        let c = ctx
            .iter()
            .find(|c| c.documents[0].id == p.metadata.document_ids[0])
            .unwrap();
        assert!(p.messages[0].content.starts_with(&c.text));
        assert!(p.metadata.prompt_tokens < c.bucket);
        assert_eq!(p.metadata.multi_document, c.is_multi());
        assert_eq!(p.metadata.conversation_ids, ["c1"]);
        assert_eq!(p.metadata.prompt_version, "synth-v1");
    }
    let written = std::fs::read_to_string(d.path().join("data.jsonl")).unwrap();
    assert_eq!(written.lines().count(), pairs.len());
    // A second run reads every result from the store: nothing generated, same pairs.
    let (again, stats2) = synth(&d.path().join("store"))
        .run(&ctx, &blueprints, Shard::default(), d.path())
        .unwrap();
    assert_eq!(stats2.generated, 0);
    assert_eq!(stats2.reused, 4);
    assert_eq!(again, pairs);
}

fn blueprint_file(dir: &std::path::Path) -> std::path::PathBuf {
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
            "assemble.buckets=[2048]".into(),
            "--set".into(),
            "assemble.per_bucket=2".into(),
            "--set".into(),
            "generate.instructions_per_context=1".into(),
            "--set".into(),
            "generate.max_answer_tokens=32".into(),
            "--set".into(),
            "generate.min_answer_words=1".into(),
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
    assert!(
        out.contains(&format!("{kept} from the store")) || kept == 4,
        "{out}"
    );
    assert_eq!(
        std::fs::read_to_string(killed.join("stage2/data.jsonl")).unwrap(),
        reference
    );
    // Missing blueprints: a clear error.
    let o = wildlong(&["synth", "--run", d.path().join("none").to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("run `wildlong sample` first"));
}
