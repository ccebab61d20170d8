//! `wildlong graph`: one undirected co-occurrence graph per document type (petgraph).
//! Nodes are (field, value) pairs with the number of queries holding them; an edge joins two
//! values that occur in the same query, weighted by that count, PMI or NPMI, and edges below
//! the thresholds are pruned. Graphs are saved as JSON (reloadable), DOT and GraphML, with a
//! summary of nodes, edges and top values per field per type.

use crate::records::write_atomic;
use crate::stage1::config::{EdgeWeight, GraphConfig, MetaSchema};
use crate::stage1::normalize::NormalizedRecord;
use anyhow::{bail, Context, Result};
use petgraph::graph::{NodeIndex, UnGraph};
use petgraph::visit::EdgeRef;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Node {
    pub field: String,
    pub value: String,
    /// Queries of this type holding the value.
    pub count: usize,
    /// Conversation ids of the first queries holding it (provenance).
    pub sources: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Edge {
    /// Queries holding both values.
    pub count: usize,
    pub weight: f64,
}

/// The graph of one document type.
#[derive(Debug, Clone)]
pub struct TypeGraph {
    pub document_type: String,
    /// Queries of this type (N in PMI).
    pub queries: usize,
    pub weighting: EdgeWeight,
    pub graph: UnGraph<Node, Edge>,
}

/// The saved form of a [`TypeGraph`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct GraphFile {
    document_type: String,
    queries: usize,
    weighting: EdgeWeight,
    nodes: Vec<Node>,
    /// (node index, node index, edge).
    edges: Vec<(usize, usize, Edge)>,
}

/// PMI of a pair seen `c` times among `n` queries, its values `a` and `b` times:
/// ln(p(x,y) / (p(x) p(y))).
pub fn pmi(c: usize, a: usize, b: usize, n: usize) -> f64 {
    ((c as f64 * n as f64) / (a as f64 * b as f64)).ln()
}

/// NPMI: PMI / −ln p(x,y), in [−1, 1]; 1 when the pair occurs in every query.
pub fn npmi(c: usize, a: usize, b: usize, n: usize) -> f64 {
    let h = -(c as f64 / n as f64).ln();
    if h <= 0.0 {
        1.0
    } else {
        pmi(c, a, b, n) / h
    }
}

impl TypeGraph {
    /// Builds the graph of `records` (all of one document type).
    pub fn build(document_type: &str, records: &[&NormalizedRecord], cfg: &GraphConfig) -> Self {
        let n = records.len();
        let mut index: BTreeMap<(String, String), usize> = BTreeMap::new();
        for r in records {
            for (f, v) in &r.values {
                index.insert((f.clone(), v.clone()), 0);
            }
        }
        // Node ids in (field, value) order: the same input gives the same graph.
        let mut nodes: Vec<Node> = Vec::with_capacity(index.len());
        for (i, ((f, v), slot)) in index.iter_mut().enumerate() {
            *slot = i;
            nodes.push(Node {
                field: f.clone(),
                value: v.clone(),
                count: 0,
                sources: Vec::new(),
            });
        }
        let mut pairs: BTreeMap<(usize, usize), usize> = BTreeMap::new();
        for r in records {
            let ids: Vec<usize> = r
                .values
                .iter()
                .map(|(f, v)| index[&(f.clone(), v.clone())])
                .collect();
            for &i in &ids {
                nodes[i].count += 1;
                if nodes[i].sources.len() < cfg.sources_per_node {
                    nodes[i].sources.push(r.id.clone());
                }
            }
            for (a, &i) in ids.iter().enumerate() {
                for &j in &ids[a + 1..] {
                    *pairs.entry((i.min(j), i.max(j))).or_default() += 1;
                }
            }
        }
        let mut graph = UnGraph::with_capacity(nodes.len(), pairs.len());
        let counts: Vec<usize> = nodes.iter().map(|x| x.count).collect();
        for node in nodes {
            graph.add_node(node);
        }
        for ((i, j), c) in pairs {
            let weight = match cfg.weight {
                EdgeWeight::Count => c as f64,
                EdgeWeight::Pmi => pmi(c, counts[i], counts[j], n),
                EdgeWeight::Npmi => npmi(c, counts[i], counts[j], n),
            };
            if c >= cfg.min_edge_count && weight >= cfg.min_weight {
                graph.add_edge(
                    NodeIndex::new(i),
                    NodeIndex::new(j),
                    Edge { count: c, weight },
                );
            }
        }
        Self {
            document_type: document_type.to_string(),
            queries: n,
            weighting: cfg.weight,
            graph,
        }
    }

    pub fn node(&self, field: &str, value: &str) -> Option<NodeIndex> {
        self.graph
            .node_indices()
            .find(|&i| self.graph[i].field == field && self.graph[i].value == value)
    }

    fn to_file(&self) -> GraphFile {
        GraphFile {
            document_type: self.document_type.clone(),
            queries: self.queries,
            weighting: self.weighting,
            nodes: self.graph.node_weights().cloned().collect(),
            edges: self
                .graph
                .edge_references()
                .map(|e| (e.source().index(), e.target().index(), e.weight().clone()))
                .collect(),
        }
    }

    pub fn save_json(&self, path: &Path) -> Result<()> {
        write_atomic(path, serde_json::to_string(&self.to_file())?.as_bytes())
    }

    pub fn load_json(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let f: GraphFile = serde_json::from_str(&text)
            .with_context(|| format!("{}: not a wildlong graph file", path.display()))?;
        let mut graph = UnGraph::with_capacity(f.nodes.len(), f.edges.len());
        let n = f.nodes.len();
        for node in f.nodes {
            graph.add_node(node);
        }
        for (a, b, e) in f.edges {
            if a >= n || b >= n {
                bail!(
                    "{}: edge ({a}, {b}) names a node that does not exist",
                    path.display()
                );
            }
            graph.add_edge(NodeIndex::new(a), NodeIndex::new(b), e);
        }
        Ok(Self {
            document_type: f.document_type,
            queries: f.queries,
            weighting: f.weighting,
            graph,
        })
    }

    pub fn to_dot(&self) -> String {
        let g = self.graph.map(
            |_, n| format!("{}: {} ({})", n.field, n.value, n.count),
            |_, e| format!("{:.4}", e.weight),
        );
        format!("{}", petgraph::dot::Dot::new(&g))
    }

    pub fn to_graphml(&self) -> String {
        let xml = petgraph_graphml::GraphMl::new(&self.graph)
            .pretty_print(true)
            .export_node_weights(Box::new(|n: &Node| {
                vec![
                    ("field".into(), n.field.as_str().into()),
                    ("value".into(), n.value.as_str().into()),
                    ("count".into(), n.count.to_string().into()),
                ]
            }))
            .export_edge_weights(Box::new(|e: &Edge| {
                vec![
                    ("count".into(), e.count.to_string().into()),
                    ("weight".into(), e.weight.to_string().into()),
                ]
            }))
            .to_string();
        sorted_keys(&xml)
    }
}

/// petgraph-graphml declares the `<key>`s from a hash set, in another order every run; they
/// are sorted here so that the same graph always writes the same bytes.
fn sorted_keys(xml: &str) -> String {
    let mut lines: Vec<&str> = xml.lines().collect();
    let is_key = |l: &str| l.trim_start().starts_with("<key ");
    if let Some(start) = lines.iter().position(|l| is_key(l)) {
        let len = lines[start..].iter().take_while(|l| is_key(l)).count();
        lines[start..start + len].sort_unstable();
    }
    let mut out = lines.join("\n");
    if xml.ends_with('\n') {
        out.push('\n');
    }
    out
}

/// File-name form of a document type.
pub fn slug(t: &str) -> String {
    t.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect()
}

/// Document types with fewer than `min` queries become `other`.
pub fn merge_rare_types(records: &mut [NormalizedRecord], min: usize) -> Vec<String> {
    let mut counts: HashMap<String, usize> = HashMap::new();
    for r in records.iter() {
        *counts.entry(r.document_type.clone()).or_default() += 1;
    }
    let mut rare: Vec<String> = counts
        .into_iter()
        .filter(|(t, c)| *c < min && t != "other")
        .map(|(t, _)| t)
        .collect();
    rare.sort();
    for r in records.iter_mut() {
        if rare.contains(&r.document_type) {
            r.document_type = "other".into();
        }
    }
    rare
}

/// One graph per document type, in type order.
pub fn build_all(records: &[NormalizedRecord], cfg: &GraphConfig) -> Vec<TypeGraph> {
    let mut by_type: BTreeMap<&str, Vec<&NormalizedRecord>> = BTreeMap::new();
    for r in records {
        by_type.entry(r.document_type.as_str()).or_default().push(r);
    }
    by_type
        .into_iter()
        .map(|(t, rs)| TypeGraph::build(t, &rs, cfg))
        .collect()
}

/// Per-type figures of `graph_summary.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TypeSummary {
    pub document_type: String,
    pub file: String,
    pub queries: usize,
    pub nodes: usize,
    pub edges: usize,
    /// field → up to 5 (value, count), most frequent first.
    pub top_values: BTreeMap<String, Vec<(String, usize)>>,
}

pub fn summarize(g: &TypeGraph, file: &str) -> TypeSummary {
    let mut top: BTreeMap<String, Vec<(String, usize)>> = BTreeMap::new();
    for n in g.graph.node_weights() {
        top.entry(n.field.clone())
            .or_default()
            .push((n.value.clone(), n.count));
    }
    for v in top.values_mut() {
        v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        v.truncate(5);
    }
    TypeSummary {
        document_type: g.document_type.clone(),
        file: file.to_string(),
        queries: g.queries,
        nodes: g.graph.node_count(),
        edges: g.graph.edge_count(),
        top_values: top,
    }
}

/// Writes every graph (JSON, DOT, GraphML) under `<dir>/graphs/` and the summary files.
pub fn save_all(graphs: &[TypeGraph], dir: &Path, schema: &MetaSchema) -> Result<Vec<TypeSummary>> {
    let gdir = dir.join(crate::layout::stage1::GRAPHS);
    std::fs::create_dir_all(&gdir).with_context(|| format!("creating {}", gdir.display()))?;
    let mut summaries = Vec::new();
    for g in graphs {
        let s = slug(&g.document_type);
        g.save_json(&gdir.join(format!("{s}.json")))?;
        write_atomic(&gdir.join(format!("{s}.dot")), g.to_dot().as_bytes())?;
        write_atomic(
            &gdir.join(format!("{s}.graphml")),
            g.to_graphml().as_bytes(),
        )?;
        summaries.push(summarize(g, &format!("graphs/{s}.json")));
    }
    write_atomic(
        &dir.join(crate::layout::stage1::GRAPH_SUMMARY),
        serde_json::to_string_pretty(&summaries)?.as_bytes(),
    )?;
    let mut md = String::from(
        "# Stage 1 graphs\n\n| document type | queries | nodes | edges |\n|---|---:|---:|---:|\n",
    );
    for s in &summaries {
        md.push_str(&format!(
            "| {} | {} | {} | {} |\n",
            s.document_type, s.queries, s.nodes, s.edges
        ));
    }
    for s in &summaries {
        md.push_str(&format!("\n## {}\n\n", s.document_type));
        for f in schema.field_names() {
            if let Some(v) = s.top_values.get(f) {
                let list: Vec<String> = v.iter().map(|(v, c)| format!("{v} ({c})")).collect();
                md.push_str(&format!("- **{f}**: {}\n", list.join("; ")));
            }
        }
    }
    write_atomic(
        &dir.join(crate::layout::stage1::GRAPH_SUMMARY_MD),
        md.as_bytes(),
    )?;
    Ok(summaries)
}

/// The graphs saved by [`save_all`].
pub fn load_all(dir: &Path) -> Result<Vec<TypeGraph>> {
    let path = dir.join(crate::layout::stage1::GRAPH_SUMMARY);
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("reading {} (run `wildlong graph` first)", path.display()))?;
    let summaries: Vec<TypeSummary> = serde_json::from_str(&text)
        .with_context(|| format!("{}: not a graph summary", path.display()))?;
    summaries
        .iter()
        .map(|s| TypeGraph::load_json(&dir.join(PathBuf::from(&s.file))))
        .collect()
}

/// `wildlong graph`: normalises every meta record of `<dir>`, merges rare types into
/// `other`, builds and saves the graphs (`normalized.jsonl`, `merges.json`, `graphs/`,
/// `graph_summary.{json,md}`).
pub fn run(
    cfg: &crate::stage1::config::Stage1Config,
    schema: &MetaSchema,
    dir: &Path,
) -> Result<Vec<TypeSummary>> {
    let meta = crate::stage1::extract::read_all_meta(dir)?;
    let (mut records, report) = crate::stage1::normalize::normalize(&meta, &cfg.normalize);
    let rare = merge_rare_types(&mut records, cfg.graph.min_type_queries);
    if !rare.is_empty() {
        tracing::info!("document types merged into `other`: {}", rare.join(", "));
    }
    crate::records::write_jsonl_atomic(&dir.join(crate::layout::stage1::NORMALIZED), &records)?;
    write_atomic(
        &dir.join(crate::layout::stage1::MERGES),
        serde_json::to_string_pretty(&report)?.as_bytes(),
    )?;
    let graphs = build_all(&records, &cfg.graph);
    save_all(&graphs, dir, schema)
}
