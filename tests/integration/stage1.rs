//! Stage 1: input reading and bad input, the query filter and MinHash, document-type
//! mapping, normalisation, graphs (exact counts, PMI/NPMI by hand, pruning, export),
//! path sampling (seeded, field-distinct, quotas, transition frequencies), and extraction
//! on the default model (schema-valid outputs, resume after SIGKILL, shards).

use crate::common::*;
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::Path;
use wildlong::records::{read_jsonl_resumable, Blueprint};
use wildlong::shard::Shard;
use wildlong::stage1::config::{
    EdgeWeight, GraphConfig, MetaSchema, NormalizeConfig, SampleConfig, Stage1Config,
};
use wildlong::stage1::extract::{prepare_queries, MetaRecord};
use wildlong::stage1::filter::Query;
use wildlong::stage1::graph::{npmi, pmi, TypeGraph};
use wildlong::stage1::input::Source;
use wildlong::stage1::normalize::{normalize, NormalizedRecord};
use wildlong::stage1::sample::{sample_paths, walk};
use wildlong::text::{estimated_jaccard, MinHasher};

#[test]
fn builtin_configs_parse_and_spell_out_the_defaults() {
    assert_eq!(Stage1Config::builtin(), Stage1Config::default());
    Stage1Config::builtin().validate().unwrap();
    let s = MetaSchema::builtin();
    s.validate().unwrap();
    assert_eq!(s.fields.len(), 13);
    assert_eq!(
        &s.field_names()[..8],
        [
            "document_type",
            "task",
            "user_intent",
            "user_profile",
            "language_style",
            "context",
            "required_knowledge",
            "output_format"
        ]
    );
    assert!(s.document_types.len() >= 20);
}

#[test]
fn unknown_config_keys_are_rejected_with_the_key() {
    let d = tempdir();
    let p = d.path().join("s1.toml");
    std::fs::write(&p, "[filter]\nlangauges = [\"English\"]\n").unwrap();
    let e = format!("{:#}", Stage1Config::from_toml_file(&p).unwrap_err());
    assert!(e.contains("langauges") && e.contains("s1.toml"), "{e}");
    std::fs::write(&p, "[sample]\nmin_fields = 5\nmax_fields = 4\n").unwrap();
    let e = format!("{:#}", Stage1Config::from_toml_file(&p).unwrap_err());
    assert!(e.contains("min_fields"), "{e}");
}

#[test]
fn free_text_document_types_map_onto_the_taxonomy() {
    let s = MetaSchema::builtin();
    for (raw, want) in [
        ("Contract", "legal contract"),
        ("an NDA", "legal contract"),
        ("Legal Contracts", "legal contract"),
        ("python code snippet", "source code"),
        ("meeting notes", "meeting transcript"),
        ("quarterly earnings reports", "financial report"),
        ("Research paper.", "research paper"),
        ("stack trace", "log file"),
        ("emial thread", "email thread"),
        ("xyzzy", "other"),
        ("", "other"),
        ("bulletin", "other"),
    ] {
        assert_eq!(s.map_document_type(raw), want, "{raw:?}");
    }
}

fn filter_cfg(paths: &[&str]) -> Stage1Config {
    let mut c = Stage1Config::default();
    c.input.paths = paths.iter().map(|s| s.to_string()).collect();
    c
}

fn read_queries(dir: &Path) -> Vec<Query> {
    read_jsonl_resumable(&dir.join("queries.jsonl")).unwrap()
}

fn filter_stats(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("filter_stats.json")).unwrap()).unwrap()
}

#[test]
fn sample_set_is_large_enough_and_every_filter_drops_its_rows() {
    let d = tempdir();
    prepare_queries(&filter_cfg(&["sample"]), d.path()).unwrap();
    let q = read_queries(d.path());
    assert_eq!(q.len(), 303);
    let s = filter_stats(d.path());
    let dropped: BTreeMap<String, usize> = serde_json::from_value(s["dropped"].clone()).unwrap();
    let want: BTreeMap<String, usize> = [
        ("exact_duplicate", 2),
        ("language", 3),
        ("multi_turn", 2),
        ("near_duplicate", 2),
        ("redacted", 1),
        ("too_short", 2),
        ("toxic", 1),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    assert_eq!(dropped, want);
    // The header documents the set as illustrative and its types.
    let header: serde_json::Value =
        serde_json::from_str(wildlong::stage1::input::SAMPLE.lines().next().unwrap()).unwrap();
    assert!(header["_header"]["description"]
        .as_str()
        .unwrap()
        .starts_with("ILLUSTRATIVE DATA"));
    assert!(
        header["_header"]["document_types"]
            .as_array()
            .unwrap()
            .len()
            >= 12
    );
    let ids: HashSet<&str> = q.iter().map(|q| q.id.as_str()).collect();
    assert_eq!(ids.len(), q.len());
    // `first` keeps the first user turn of multi-turn conversations.
    let mut c = filter_cfg(&["sample"]);
    c.filter.turns = wildlong::stage1::config::TurnPolicy::First;
    c.filter.languages.clear();
    let d2 = tempdir();
    prepare_queries(&c, d2.path()).unwrap();
    assert_eq!(read_queries(d2.path()).len(), 303 + 2 + 3);
}

fn true_jaccard(a: &str, b: &str, k: usize) -> f64 {
    let sh = |t: &str| -> HashSet<String> {
        let l = t.to_lowercase();
        let w: Vec<&str> = l
            .split(|c: char| !c.is_alphanumeric())
            .filter(|w| !w.is_empty())
            .collect();
        w.windows(k).map(|x| x.join(" ")).collect()
    };
    let (x, y) = (sh(a), sh(b));
    x.intersection(&y).count() as f64 / x.union(&y).count() as f64
}

#[test]
fn minhash_estimates_jaccard_similarity() {
    let h = MinHasher::new(256, 3, 9);
    let words: Vec<String> = (0..60).map(|i| format!("w{i}")).collect();
    let base = words.join(" ");
    // Pairs sharing a varying number of words: estimates within 0.12 of the truth
    // (standard error at 256 permutations is at most 0.031).
    for keep in [60, 55, 45, 30, 15, 0] {
        let other: Vec<String> = words
            .iter()
            .enumerate()
            .map(|(i, w)| if i < keep { w.clone() } else { format!("x{i}") })
            .collect();
        let other = other.join(" ");
        let est = estimated_jaccard(&h.signature(&base), &h.signature(&other));
        let truth = true_jaccard(&base, &other, 3);
        assert!((est - truth).abs() < 0.12, "keep {keep}: {est} vs {truth}");
    }
    // Case, spacing and punctuation do not matter.
    assert_eq!(
        h.signature("Hello,  World again!"),
        h.signature("hello world again")
    );
}

#[test]
fn jsonl_bad_lines_are_reported_counted_and_skipped_or_fatal_when_strict() {
    let d = tempdir();
    let p = d.path().join("conv.jsonl");
    let good = |id: &str, text: &str| {
        serde_json::json!({"conversation_hash": id, "language": "English",
            "conversation": [{"role": "user", "content": text}, {"role": "assistant", "content": "ok"}]})
        .to_string()
    };
    let mut bytes = Vec::new();
    bytes.extend(good("a", "Summarize this annual report for the board please.").as_bytes());
    bytes.extend(b"\n{not json\n");
    bytes.extend(b"{\"language\": \"English\"}\n");
    bytes.extend(b"{\"conversation\": [{\"role\": \"user\", \"content\": \"caf\xe9 au lait recipe please, for four people\"}]}\n");
    bytes.extend(b"{\"conversation\": [{\"role\": \"user\"}]}\n");
    bytes.extend(
        good(
            "b",
            "Explain the key clauses of this employment contract to me.",
        )
        .as_bytes(),
    );
    bytes.extend(b"\n");
    std::fs::write(&p, &bytes).unwrap();
    let spec = p.to_str().unwrap();
    let out = d.path().join("run");
    prepare_queries(&filter_cfg(&[spec]), &out).unwrap();
    assert_eq!(read_queries(&out).len(), 2);
    let s = filter_stats(&out);
    let input = &s["sources"][0][1]["input"];
    assert_eq!(input["malformed"], 4);
    let ex: Vec<String> = serde_json::from_value(input["malformed_examples"].clone()).unwrap();
    assert!(ex[0].contains("conv.jsonl:2:"), "{ex:?}");
    assert!(
        ex[1].contains(":3:") && ex[1].contains("conversation"),
        "{ex:?}"
    );
    assert!(ex[2].contains(":4:") && ex[2].contains("UTF-8"), "{ex:?}");
    assert!(ex[3].contains(":5:") && ex[3].contains("content"), "{ex:?}");
    assert_eq!(s["dropped"]["malformed"], 4);

    // Strict: the first bad line stops the run, and the earlier queries.jsonl survives.
    let before = std::fs::read_to_string(out.join("queries.jsonl")).unwrap();
    let mut c = filter_cfg(&[spec]);
    c.input.strict = true;
    let e = format!("{:#}", prepare_queries(&c, &out).unwrap_err());
    assert!(e.contains("conv.jsonl:2:") && e.contains("strict"), "{e}");
    assert_eq!(
        std::fs::read_to_string(out.join("queries.jsonl")).unwrap(),
        before
    );
    // CLI: non-zero exit and the message.
    let o = wildlong(&[
        "extract",
        "--filter-only",
        "--strict",
        "--run",
        d.path().join("cli").to_str().unwrap(),
        "--input",
        spec,
    ])
    .output()
    .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("conv.jsonl:2:"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn empty_missing_and_wrong_parquet_inputs_are_clear_errors() {
    let d = tempdir();
    let empty = d.path().join("empty.jsonl");
    std::fs::write(&empty, "").unwrap();
    let run = d.path().join("run");
    let cases = [
        (empty.to_str().unwrap().to_string(), "no conversations"),
        (
            d.path().join("missing.jsonl").to_str().unwrap().to_string(),
            "no such file",
        ),
        (
            fixture("stage1/wrong_columns.parquet")
                .to_str()
                .unwrap()
                .to_string(),
            "no `conversation` column (found: text, label)",
        ),
    ];
    for (spec, want) in cases {
        let e = format!(
            "{:#}",
            prepare_queries(&filter_cfg(&[&spec]), &run).unwrap_err()
        );
        assert!(e.contains(want) && e.contains(&spec), "{e}");
        let o = wildlong(&[
            "extract",
            "--filter-only",
            "--run",
            run.to_str().unwrap(),
            "--input",
            &spec,
        ])
        .output()
        .unwrap();
        assert_eq!(o.status.code(), Some(1));
        assert!(String::from_utf8_lossy(&o.stderr).contains(want));
    }
    // Not Parquet at all, though named so.
    let fake = d.path().join("fake.parquet");
    std::fs::write(&fake, "hello").unwrap();
    let e = format!(
        "{:#}",
        prepare_queries(&filter_cfg(&[fake.to_str().unwrap()]), &run).unwrap_err()
    );
    assert!(e.contains("fake.parquet: not a Parquet file"), "{e}");
}

#[test]
fn parquet_in_wildchat_layout_is_read_and_filtered() {
    let src = Source::resolve(fixture("stage1/wildchat_tiny.parquet").to_str().unwrap()).unwrap();
    let mut convs = Vec::new();
    let stats = src
        .for_each(false, |c| {
            convs.push(c);
            Ok(())
        })
        .unwrap();
    assert_eq!(stats.rows, 5);
    assert_eq!(convs[0].id, "h1");
    assert_eq!(convs[3].turns.len(), 4);
    assert!(convs[4].toxic);
    assert_eq!(convs[2].language.as_deref(), Some("French"));
    let d = tempdir();
    prepare_queries(
        &filter_cfg(&[fixture("stage1/wildchat_tiny.parquet").to_str().unwrap()]),
        d.path(),
    )
    .unwrap();
    let ids: Vec<String> = read_queries(d.path()).into_iter().map(|q| q.id).collect();
    assert_eq!(ids, ["h1", "h2"]);
}

#[test]
fn shards_partition_the_queries() {
    let mut seen = Vec::new();
    for k in 1..=3 {
        let s: Shard = format!("{k}/3").parse().unwrap();
        seen.extend((0..10).filter(|&i| s.owns(i)));
    }
    seen.sort();
    assert_eq!(seen, (0..10).collect::<Vec<_>>());
    for bad in ["0/3", "4/3", "1/0", "2", "a/b"] {
        assert!(bad.parse::<Shard>().is_err(), "{bad}");
    }
}

fn rec(id: &str, ty: &str, vals: &[(&str, &str)]) -> NormalizedRecord {
    NormalizedRecord {
        id: id.into(),
        document_type: ty.into(),
        values: vals
            .iter()
            .map(|(f, v)| (f.to_string(), v.to_string()))
            .collect(),
    }
}

/// Four queries: task a ×3, b ×1; tone x ×2, y ×2; domain p ×2.
fn hand_records() -> Vec<NormalizedRecord> {
    vec![
        rec("r1", "t", &[("task", "a"), ("tone", "x"), ("domain", "p")]),
        rec("r2", "t", &[("task", "a"), ("tone", "x")]),
        rec("r3", "t", &[("task", "b"), ("tone", "y"), ("domain", "p")]),
        rec("r4", "t", &[("task", "a"), ("tone", "y")]),
    ]
}

fn graph_of(records: &[NormalizedRecord], cfg: &GraphConfig) -> TypeGraph {
    let refs: Vec<&NormalizedRecord> = records.iter().collect();
    TypeGraph::build("t", &refs, cfg)
}

fn edge(g: &TypeGraph, a: (&str, &str), b: (&str, &str)) -> Option<(usize, f64)> {
    let (x, y) = (g.node(a.0, a.1)?, g.node(b.0, b.1)?);
    g.graph
        .find_edge(x, y)
        .map(|e| (g.graph[e].count, g.graph[e].weight))
}

#[test]
fn graph_counts_and_pmi_npmi_match_hand_computation() {
    let r = hand_records();
    let cfg = |weight, min_weight, min_edge_count| GraphConfig {
        weight,
        min_weight,
        min_edge_count,
        ..GraphConfig::default()
    };
    let g = graph_of(&r, &cfg(EdgeWeight::Count, 0.0, 1));
    assert_eq!(g.queries, 4);
    assert_eq!(g.graph.node_count(), 5);
    assert_eq!(g.graph.edge_count(), 7);
    let counts: BTreeMap<String, usize> = g
        .graph
        .node_weights()
        .map(|n| (format!("{}={}", n.field, n.value), n.count))
        .collect();
    assert_eq!(
        counts,
        [
            ("domain=p", 2),
            ("task=a", 3),
            ("task=b", 1),
            ("tone=x", 2),
            ("tone=y", 2)
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    );
    assert_eq!(edge(&g, ("task", "a"), ("tone", "x")), Some((2, 2.0)));
    assert_eq!(edge(&g, ("task", "a"), ("tone", "y")), Some((1, 1.0)));
    assert_eq!(edge(&g, ("tone", "x"), ("tone", "y")), None);
    assert_eq!(edge(&g, ("task", "b"), ("tone", "x")), None);

    // PMI(a, x) = ln(2·4 / (3·2)) = ln(4/3); NPMI = ln(4/3) / ln 2.
    let close = |a: f64, b: f64| (a - b).abs() < 1e-12;
    assert!(close(pmi(2, 3, 2, 4), (4.0f64 / 3.0).ln()));
    assert!(close(npmi(2, 3, 2, 4), 0.415_037_499_278_843_8));
    // NPMI(b, y) = ln 2 / ln 4 = 0.5; NPMI(a, y) = ln(2/3) / ln 4.
    assert!(close(npmi(1, 1, 2, 4), 0.5));
    assert!(close(npmi(1, 3, 2, 4), (2.0f64 / 3.0).ln() / 4.0f64.ln()));
    // A pair in every query has NPMI 1.
    assert!(close(npmi(4, 4, 4, 4), 1.0));

    let g = graph_of(&r, &cfg(EdgeWeight::Npmi, -1.0, 1));
    let (_, w) = edge(&g, ("task", "a"), ("tone", "x")).unwrap();
    assert!(close(w, 0.415_037_499_278_843_8));
    // Pruning: NPMI ≥ 0 drops the two negative pairs (a,y) and (a,p): 7 − 2 edges.
    let g = graph_of(&r, &cfg(EdgeWeight::Npmi, 0.0, 1));
    assert_eq!(g.graph.edge_count(), 5);
    assert_eq!(edge(&g, ("task", "a"), ("tone", "y")), None);
    assert_eq!(edge(&g, ("task", "a"), ("domain", "p")), None);
    let g = graph_of(&r, &cfg(EdgeWeight::Pmi, 0.5, 1));
    // PMI ≥ 0.5 keeps (b,y) and (b,p) = ln 2; (a,x) = ln 4/3, (x,p) = (y,p) = ln 1 = 0.
    assert_eq!(g.graph.edge_count(), 2);
    assert!(close(
        edge(&g, ("task", "b"), ("domain", "p")).unwrap().1,
        2.0f64.ln()
    ));
    // Count threshold: only (a, x) is seen twice.
    let g = graph_of(&r, &cfg(EdgeWeight::Count, 0.0, 2));
    assert_eq!(g.graph.edge_count(), 1);
    assert_eq!(g.graph.node_count(), 5);
}

#[test]
fn graphs_save_reload_and_export() {
    let d = tempdir();
    let g = graph_of(&hand_records(), &GraphConfig::default());
    let p = d.path().join("t.json");
    g.save_json(&p).unwrap();
    let back = TypeGraph::load_json(&p).unwrap();
    assert_eq!(back.graph.node_count(), 5);
    assert_eq!(back.graph.edge_count(), 7);
    let nodes: Vec<_> = back.graph.node_weights().cloned().collect();
    assert_eq!(nodes, g.graph.node_weights().cloned().collect::<Vec<_>>());
    assert_eq!(nodes[1].sources, ["r1", "r2", "r4"]);
    let dot = g.to_dot();
    assert!(
        dot.starts_with("graph {") && dot.contains("task: a (3)"),
        "{dot}"
    );
    assert_eq!(dot.matches(" -- ").count(), 7);
    let gml = g.to_graphml();
    assert!(gml.contains("<graphml"));
    assert_eq!(gml.matches("<node ").count(), 5);
    assert_eq!(gml.matches("<edge ").count(), 7);
    // The same graph writes the same bytes: petgraph-graphml declares its keys in hash-set
    // order (another order each time), so they are written sorted.
    let keys: Vec<&str> = gml.lines().filter(|l| l.contains("<key ")).collect();
    assert_eq!(keys.len(), 5, "{gml}");
    assert!(keys.windows(2).all(|w| w[0] <= w[1]), "{keys:?}");
    assert!((0..20).all(|_| g.to_graphml() == gml));
    // A damaged file is an error naming it.
    std::fs::write(&p, "{\"nodes\": 3}").unwrap();
    let e = format!("{:#}", TypeGraph::load_json(&p).unwrap_err());
    assert!(e.contains("t.json"), "{e}");
}

#[test]
fn normalisation_cleans_merges_and_applies_support() {
    let meta = |id: &str, task: &str, tone: &str| MetaRecord {
        id: id.into(),
        document_type: "news article".into(),
        meta: [("document_type", "news"), ("task", task), ("tone", tone)]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        provenance: serde_json::from_value(serde_json::json!({"model": "m", "prompt_version": "v",
            "schema_hash": "h", "seed": 1, "query_truncated": false, "prompt_tokens": 1,
            "generated_tokens": 1}))
        .unwrap(),
    };
    let records = vec![
        meta("1", "Summarize the article.", "Neutral"),
        meta("2", "  summarize   the article", "neutral"),
        meta("3", "summarise the article", "N/A"),
        meta(
            "4",
            "list the key facts of this very long article about the city council vote",
            "formal",
        ),
    ];
    let cfg = NormalizeConfig {
        max_value_words: 8,
        min_support: 2,
        ..NormalizeConfig::default()
    };
    let (out, report) = normalize(&records, &cfg);
    // "summarise" merges into "summarize the article" (similarity 20/21 ≥ 0.9).
    assert_eq!(out[2].values["task"], "summarize the article");
    assert_eq!(out[0].values["task"], "summarize the article");
    let m = &report.fields["task"].merges[0];
    assert_eq!(m.canonical, "summarize the article");
    assert_eq!(m.count, 3);
    assert_eq!(m.merged[0].value, "summarise the article");
    assert!((m.merged[0].similarity - 0.9524).abs() < 1e-4);
    // The 8-word cap leaves a value seen once: below support 2, dropped.
    assert!(!out[3].values.contains_key("task"));
    assert_eq!(report.fields["task"].below_support, 1);
    assert_eq!(report.fields["tone"].null_values, 1);
    assert_eq!(out[0].values["tone"], "neutral");
    assert!(!out[2].values.contains_key("tone"));
    assert!(!out[0].values.contains_key("document_type"));
    assert_eq!(
        wildlong::stage1::normalize::clean_value(
            "One two three four five six seven eight nine ten eleven",
            &NormalizeConfig::default()
        )
        .unwrap(),
        "one two three four five six seven eight nine ten"
    );
}

fn sample_cfg(min: usize, max: usize, per_type: usize) -> SampleConfig {
    SampleConfig {
        min_fields: min,
        max_fields: max,
        per_type,
        ..SampleConfig::default()
    }
}

#[test]
fn walks_follow_edge_weights() {
    // task t co-occurs with tone x once, domain p twice, format f five times.
    let mut r = vec![rec("1", "t", &[("task", "t"), ("tone", "x")])];
    for i in 0..2 {
        r.push(rec(
            &format!("p{i}"),
            "t",
            &[("task", "t"), ("domain", "p")],
        ));
    }
    for i in 0..5 {
        r.push(rec(
            &format!("f{i}"),
            "t",
            &[("task", "t"), ("format", "f")],
        ));
    }
    let g = graph_of(&r, &GraphConfig::default());
    let start = g.node("task", "t").unwrap();
    let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(3);
    let n = 20_000;
    let mut freq: BTreeMap<String, usize> = BTreeMap::new();
    for _ in 0..n {
        let p = walk(&g, start, 2, &mut rng);
        *freq.entry(g.graph[p[1]].value.clone()).or_default() += 1;
    }
    // Expected 1/8, 2/8, 5/8; tolerance 0.015 is over 4 standard errors (≤ 0.0035).
    for (v, want) in [("x", 0.125), ("p", 0.25), ("f", 0.625)] {
        let got = freq[v] as f64 / n as f64;
        assert!((got - want).abs() < 0.015, "{v}: {got} vs {want}");
    }
}

#[test]
fn walks_never_repeat_a_field() {
    // From t the walk may reach tone x; from x the only new field is domain p, never task u.
    let r = vec![
        rec("1", "t", &[("task", "t"), ("tone", "x"), ("domain", "p")]),
        rec("2", "t", &[("task", "u"), ("tone", "x")]),
        rec("3", "t", &[("task", "u"), ("tone", "x")]),
        rec("4", "t", &[("task", "u"), ("tone", "x")]),
    ];
    let g = graph_of(&r, &GraphConfig::default());
    let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(1);
    let start = g.node("task", "t").unwrap();
    for _ in 0..500 {
        let p = walk(&g, start, 3, &mut rng);
        let fields: Vec<&str> = p.iter().map(|&n| g.graph[n].field.as_str()).collect();
        let distinct: HashSet<&&str> = fields.iter().collect();
        assert_eq!(distinct.len(), fields.len(), "{fields:?}");
        assert_eq!(p.len(), 3);
    }
}

/// A denser graph: 40 queries with values drawn from small pools.
fn dense_records() -> Vec<NormalizedRecord> {
    (0..40)
        .map(|i| {
            rec(
                &i.to_string(),
                "t",
                &[
                    (
                        "task",
                        ["summarize", "compare", "extract", "explain"][i % 4],
                    ),
                    ("tone", ["formal", "casual", "neutral"][i % 3]),
                    (
                        "domain",
                        ["law", "finance", "medicine", "software", "news"][i % 5],
                    ),
                    ("output_format", ["table", "bullets"][i % 2]),
                    (
                        "user_profile",
                        ["student", "manager", "lawyer"][(i / 3) % 3],
                    ),
                    ("output_length", ["short", "long"][(i / 5) % 2]),
                ],
            )
        })
        .collect()
}

#[test]
fn path_sampling_is_seeded_distinct_bounded_and_meets_quotas() {
    let g = graph_of(&dense_records(), &GraphConfig::default());
    let cfg = sample_cfg(3, 6, 30);
    let (a, sa) = sample_paths(&g, &cfg, 30);
    let (b, _) = sample_paths(&g, &cfg, 30);
    assert_eq!(a, b, "same seed, same paths");
    assert_eq!(a.len(), 30, "{sa:?}");
    assert_eq!(sa.paths, 30);
    let other = SampleConfig {
        seed: 8,
        ..cfg.clone()
    };
    assert_ne!(sample_paths(&g, &other, 30).0, a);
    let mut sets = HashSet::new();
    for p in &a {
        assert!((3..=6).contains(&p.len()));
        assert_eq!(g.graph[p[0]].field, "task");
        let fields: BTreeSet<&str> = p.iter().map(|&n| g.graph[n].field.as_str()).collect();
        assert_eq!(fields.len(), p.len(), "a field repeats");
        assert!(
            sets.insert(p.iter().map(|n| n.index()).collect::<BTreeSet<_>>()),
            "duplicate path"
        );
        // Every step follows an edge.
        for w in p.windows(2) {
            assert!(g.graph.find_edge(w[0], w[1]).is_some());
        }
    }
    // A quota larger than the distinct paths available stops after the attempts budget.
    let tiny = graph_of(&hand_records(), &GraphConfig::default());
    let (p, s) = sample_paths(&tiny, &sample_cfg(3, 3, 100), 100);
    assert!(p.len() < 100 && s.attempts == 100 * 50, "{s:?}");
    let distinct: HashSet<Vec<usize>> = p
        .iter()
        .map(|x| x.iter().map(|n| n.index()).collect())
        .collect();
    assert_eq!(distinct.len(), p.len());
}

#[test]
fn sample_command_applies_per_type_quotas() {
    use wildlong::stage1::sample::sample_all;
    let d = tempdir();
    let mut recs = dense_records();
    for r in dense_records() {
        recs.push(NormalizedRecord {
            id: format!("b{}", r.id),
            document_type: "u".into(),
            ..r
        });
    }
    let graphs = wildlong::stage1::graph::build_all(&recs, &GraphConfig::default());
    let mut cfg = sample_cfg(3, 5, 7);
    cfg.quotas.insert("u".into(), 3);
    let paths = sample_all(&graphs, &cfg, d.path()).unwrap();
    let per: BTreeMap<&str, usize> = paths.iter().fold(BTreeMap::new(), |mut m, p| {
        *m.entry(p.document_type.as_str()).or_default() += 1;
        m
    });
    assert_eq!(per["t"], 7);
    assert_eq!(per["u"], 3);
    let lines = std::fs::read_to_string(d.path().join("paths.jsonl")).unwrap();
    assert_eq!(lines.lines().count(), 10);
    assert!(paths.iter().all(|p| !p.conversation_ids.is_empty()));
}

fn meta_lines(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let n = p.file_name().unwrap().to_str().unwrap();
            n.starts_with("meta") && n.ends_with(".jsonl")
        })
        .flat_map(|p| {
            std::fs::read_to_string(p)
                .unwrap()
                .lines()
                .map(String::from)
                .collect::<Vec<_>>()
        })
        .collect();
    v.sort();
    v
}

#[test]
fn killed_extraction_resumes_and_shards_give_the_same_records() {
    let _limit = time_limit(8);
    let d = tempdir();
    let run = |dir: &Path, extra: &[&str]| {
        let mut a = vec![
            "extract",
            "--model",
            "default",
            "--run",
            dir.to_str().unwrap(),
            "--limit",
            "3",
            "--batch-size",
            "2",
            "--no-progress",
        ];
        a.extend_from_slice(extra);
        wildlong(&a)
    };
    let whole = d.path().join("whole");
    ok(&run(&whole, &[]).output().unwrap());
    let reference = meta_lines(&whole.join("stage1"));
    assert_eq!(reference.len(), 3);
    // The schema it extracted with is recorded for stage 2.
    let schema = wildlong::stage1::config::MetaSchema::of_stage1(&whole.join("stage1")).unwrap();
    assert!(whole.join("stage1/meta_schema.toml").is_file());
    assert_eq!(schema, wildlong::stage1::config::MetaSchema::builtin());

    let killed = d.path().join("killed");
    let meta = killed.join("stage1/meta.jsonl");
    let mut child = run(&killed, &[]).spawn().unwrap();
    let t0 = std::time::Instant::now();
    while std::fs::read_to_string(&meta)
        .map(|s| s.lines().count())
        .unwrap_or(0)
        < 1
    {
        assert!(t0.elapsed().as_secs() < 600, "no record after 10 minutes");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let before = std::fs::read_to_string(&meta).unwrap();
    let n_before = before.lines().count();
    assert!((1..3).contains(&n_before), "{n_before}");
    // A write torn by the kill.
    std::fs::write(&meta, format!("{before}{{\"id\": \"to")).unwrap();
    ok(&run(&killed, &[]).output().unwrap());
    let after = std::fs::read_to_string(&meta).unwrap();
    assert!(after.starts_with(&before), "earlier records were rewritten");
    assert_eq!(meta_lines(&killed.join("stage1")), reference);
    // A finished rerun changes nothing.
    let out = ok(&run(&killed, &[]).output().unwrap());
    assert!(out.contains("3 records"), "{out}");
    assert_eq!(std::fs::read_to_string(&meta).unwrap(), after);

    // Two shards together give the same records.
    let sharded = d.path().join("sharded");
    ok(&run(&sharded, &["--shard", "1/2"]).output().unwrap());
    ok(&run(&sharded, &["--shard", "2/2"]).output().unwrap());
    assert!(sharded.join("stage1/meta.shard-1-of-2.jsonl").is_file());
    assert_eq!(meta_lines(&sharded.join("stage1")), reference);

    // Another model into the same folder is refused.
    let other = tiny_fixture("llama3");
    let o = wildlong(&[
        "extract",
        "--model",
        other.path().to_str().unwrap(),
        "--run",
        whole.to_str().unwrap(),
        "--limit",
        "4",
    ])
    .output()
    .unwrap();
    assert!(!o.status.success());
}

#[test]
fn end_to_end_on_the_default_model_over_the_sample_queries() {
    // A fixed subset: the first 16 queries the filter keeps (all 303 in scripts/stage1_full.sh).
    let _limit = time_limit(12);
    let d = tempdir();
    let run = d.path().to_str().unwrap();
    let out = ok(&wildlong(&[
        "extract",
        "--model",
        "default",
        "--run",
        run,
        "--limit",
        "16",
        "--batch-size",
        "4",
        "--no-progress",
    ])
    .output()
    .unwrap());
    println!("{out}");
    assert!(out.contains("document types:"), "{out}");
    let dir = d.path().join("stage1");
    let records: Vec<MetaRecord> = read_jsonl_resumable(&dir.join("meta.jsonl")).unwrap();
    assert_eq!(
        records.len(),
        16,
        "100% of outputs parse against the schema"
    );
    assert!(!dir.join("rejects.jsonl").exists());
    let schema = MetaSchema::builtin();
    let cap = Stage1Config::default().extract.max_value_chars;
    let taxonomy: HashSet<&str> = schema
        .document_types
        .iter()
        .map(|t| t.name.as_str())
        .chain(["other"])
        .collect();
    for r in &records {
        assert_eq!(r.meta.len(), 13, "{r:?}");
        for f in schema.field_names() {
            let v = &r.meta[f];
            assert!(!v.is_empty() && v.chars().count() <= cap, "{f}: {v:?}");
        }
        assert!(
            taxonomy.contains(r.document_type.as_str()),
            "{}",
            r.document_type
        );
        assert_eq!(
            r.document_type,
            schema.map_document_type(&r.meta["document_type"])
        );
        assert_eq!(
            r.provenance.prompt_version,
            wildlong::stage1::prompts::EXTRACT_VERSION
        );
        assert_eq!(r.provenance.model, "default");
    }

    let out = ok(&wildlong(&["graph", "--run", run]).output().unwrap());
    println!("{out}");
    assert!(dir.join("graph_summary.md").is_file());
    assert!(dir.join("merges.json").is_file());
    let out = ok(&wildlong(&[
        "sample",
        "--model",
        "default",
        "--run",
        run,
        "--per-type",
        "2",
        "--batch-size",
        "4",
        "--no-progress",
    ])
    .output()
    .unwrap());
    println!("{out}");
    let bps: Vec<Blueprint> = read_jsonl_resumable(&dir.join("blueprints.jsonl")).unwrap();
    assert!(!bps.is_empty());
    for b in &bps {
        assert!((3..=6).contains(&b.path.len()), "{b:?}");
        assert_eq!(b.path[0].field, "task");
        assert!(b.instruction.chars().count() >= 20);
        assert!(!b.provenance.conversation_ids.is_empty());
    }
    let per: BTreeMap<&str, usize> = bps.iter().fold(BTreeMap::new(), |mut m, b| {
        *m.entry(b.document_type.as_str()).or_default() += 1;
        m
    });
    assert!(per.values().all(|&n| n <= 2), "{per:?}");
}

#[test]
fn set_overrides_are_checked_like_file_keys() {
    let c = Stage1Config::load(
        None,
        &[
            "graph.weight=npmi".into(),
            "filter.languages=[\"English\", \"French\"]".into(),
            "sample.per_type=5".into(),
        ],
    )
    .unwrap();
    assert_eq!(c.graph.weight, EdgeWeight::Npmi);
    assert_eq!(c.filter.languages, ["English", "French"]);
    assert_eq!(c.sample.per_type, 5);
    let e = format!(
        "{:#}",
        Stage1Config::load(None, &["graph.wieght=pmi".into()]).unwrap_err()
    );
    assert!(
        e.contains("unknown field `wieght`") && e.contains("`weight`"),
        "{e}"
    );
    let e = format!(
        "{:#}",
        Stage1Config::load(None, &["sample.min_fields=9".into()]).unwrap_err()
    );
    assert!(e.contains("min_fields"), "{e}");
    let o = wildlong(&[
        "extract",
        "--filter-only",
        "--set",
        "filter.turns=sometimes",
    ])
    .output()
    .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("sometimes"));
}
