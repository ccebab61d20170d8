//! The dataset card (`README.md` beside `data.jsonl`): counts, prompt-length histogram per
//! bucket, document-type mix, single/multi-document split and rejection reasons, all
//! computed from the pairs written (so the card's numbers are those of the file).

use crate::records::Pair;
use std::collections::BTreeMap;

pub fn render(pairs: &[Pair], rejected: &BTreeMap<String, usize>, model: &str) -> String {
    let mut s = String::from("# wildlong synthetic long-context dataset\n\n");
    s.push_str(&format!(
        "Long-context instruction–response pairs in the `messages` chat format (`data.jsonl`), made by\nwildlong stage 2 with `{model}`: stage-1 blueprints rewritten for real documents and answered over\nthe full context.\n\n"
    ));
    let multi = pairs.iter().filter(|p| p.metadata.multi_document).count();
    s.push_str(&format!(
        "## Counts\n\n| | pairs |\n|---|---:|\n| total | {} |\n| single document | {} |\n| multi-document | {} |\n\n",
        pairs.len(),
        pairs.len() - multi,
        multi
    ));
    let mut types: BTreeMap<&str, usize> = BTreeMap::new();
    let mut buckets: BTreeMap<usize, BTreeMap<usize, usize>> = BTreeMap::new();
    for p in pairs {
        *types.entry(p.metadata.document_type.as_str()).or_default() += 1;
        *buckets
            .entry(p.metadata.bucket)
            .or_default()
            .entry(p.metadata.prompt_tokens / 512 * 512)
            .or_default() += 1;
    }
    s.push_str("## Document types\n\n| type | pairs |\n|---|---:|\n");
    for (t, n) in &types {
        s.push_str(&format!("| {t} | {n} |\n"));
    }
    s.push_str(
        "\n## Prompt lengths (tokens, bins of 512)\n\n| bucket | bin | pairs |\n|---:|---:|---:|\n",
    );
    for (b, bins) in &buckets {
        for (bin, n) in bins {
            s.push_str(&format!("| {b} | {bin}–{} | {n} |\n", bin + 511));
        }
    }
    s.push_str("\n## Rejected\n\n| reason | count |\n|---|---:|\n");
    if rejected.is_empty() {
        s.push_str("| (none) | 0 |\n");
    }
    for (r, n) in rejected {
        s.push_str(&format!("| {r} | {n} |\n"));
    }
    s
}
