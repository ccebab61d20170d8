//! The command line: argument types (clap derive), then for each command one validation
//! step that turns its flags and TOML into the library's validated config (a flag is an
//! override of its config key, checked as the file's own), then one call into the library,
//! where the command's body lives with its stage (`stage1::command`, `stage2::command`,
//! `train::command`, `eval::ruler::command`, `generator::command`, `pipeline::command`).

use crate::engine::config::{EngineConfig, GenerationParams, SamplingParams};
use crate::engine::weights::WeightFormat;
use crate::eval::ruler::command::RulerCommand;
use crate::eval::ruler::config::RulerConfig;
use crate::eval::ruler::run::RulerRun;
use crate::generator::command::GenerateCommand;
use crate::generator::{GeneratorSpec, LocalModel};
use crate::layout::RunLayout;
use crate::models;
use crate::pipeline::config::PipelineConfig;
use crate::shard::Shard;
use crate::stage1::command::Stage1Run;
use crate::stage1::config::{EdgeWeight, MetaSchema, Stage1Config};
use crate::stage2::command::SynthCommand;
use crate::stage2::config::Stage2Config;
use crate::train::config::TrainConfig;
use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use std::path::{Path, PathBuf};

#[derive(Parser, Debug)]
#[command(
    name = "wildlong",
    version,
    about = "Long-context instruction data synthesis, RoPE-scaled fine-tuning and RULER evaluation on local hardware",
    after_help = "Examples:\n  wildlong models fetch\n  wildlong models info default\n  wildlong generate --model default --chat --prompt \"What is the capital of France?\"\n  wildlong bench --model default --threads 2\n  wildlong eval ruler --model default --lengths 1024,2048,4096 --samples 5"
)]
pub struct Cli {
    /// CPU threads for candle (0 = the engine config's `threads`, else all physical cores).
    /// Sets RAYON_NUM_THREADS.
    #[arg(long, global = true, default_value_t = 0)]
    pub threads: usize,
    /// Folder holding fetched models.
    #[arg(
        long,
        global = true,
        default_value = "models",
        env = "WILDLONG_MODELS_DIR"
    )]
    pub models_dir: PathBuf,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Fetch or inspect models.
    #[command(subcommand)]
    Models(ModelsCommand),
    /// Generate text from prompts with the local engine.
    #[command(
        after_help = "Examples:\n  wildlong generate --model default --chat --prompt \"Name three primary colors.\"\n  wildlong generate --model default --chat --prompt \"Give a city and its country.\" --json-schema city.json\n  wildlong generate --model default --chat --batch-file prompts.jsonl --output out.jsonl\n\nA batch file has one JSON object per line: {\"id\": \"q1\", \"prompt\": \"...\"} or {\"id\": \"q2\", \"messages\": [{\"role\": \"user\", \"content\": \"...\"}]};\noptional per-line keys: max_tokens, temperature, top_p, top_k, seed. With --output, finished lines are appended\nand a rerun skips the ids already there."
    )]
    Generate(GenerateArgs),
    /// Measure prefill, decode, batched and prefix-cache throughput.
    Bench(BenchArgs),
    /// Stage 1: filter conversations and extract the meta-information of each user query.
    #[command(
        after_help = "Examples:\n  wildlong extract --model default --run runs/demo\n  wildlong extract --model default --run runs/wc --input hf://datasets/allenai/WildChat-1M/data/train-00000-of-00014.parquet --shard 2/8\n  wildlong extract --run runs/demo --filter-only\n\nWrites <run>/stage1/queries.jsonl, filter_stats.json and meta[.shard-k-of-n].jsonl (appended per batch;\na killed run resumes, a finished rerun does nothing)."
    )]
    Extract(Box<ExtractArgs>),
    /// Stage 1: normalise values and build one co-occurrence graph per document type.
    #[command(
        after_help = "Examples:\n  wildlong graph --run runs/demo\n  wildlong graph --run runs/demo --weight npmi --min-weight 0.1\n\nReads <run>/stage1/meta*.jsonl; writes normalized.jsonl, merges.json, graphs/<type>.{json,dot,graphml},\ngraph_summary.{json,md}."
    )]
    Graph(GraphArgs),
    /// Stage 1: sample paths through the graphs and turn them into instruction blueprints.
    #[command(
        after_help = "Examples:\n  wildlong sample --model default --run runs/demo\n  wildlong sample --run runs/demo --per-type 100 --paths-only\n\nWrites <run>/stage1/paths.jsonl, sample_stats.json and blueprints.jsonl (resumable)."
    )]
    Sample(Box<SampleArgs>),
    /// Stage 2: pair long documents with blueprints, rewrite and answer them over the full context.
    #[command(
        after_help = "Examples:\n  wildlong synth --model default --run runs/demo\n  wildlong synth --model default --run runs/demo --documents corpus/ --set assemble.buckets=[8192,16384]\n\nReads documents (default: the built-in sample corpus) and <run>/stage1/blueprints.jsonl; writes\n<run>/stage2/contexts.jsonl, data[.shard-k-of-n].jsonl, README.md (dataset card) and stats. Results are\nkept in a content-addressed store (<run>/stage2/store): a killed run resumes, a rerun generates nothing."
    )]
    Synth(Box<SynthArgs>),
    /// Fine-tune (LoRA or full, RoPE scaling) on `messages` JSONL, or plan its memory.
    #[command(
        after_help = "Examples:\n  wildlong train --run runs/demo\n  wildlong train --run runs/demo --config configs/train/smollm2-cpu.toml --set schedule.steps=20\n  wildlong train --plan --config configs/train/llama-3.1-8b-instruct-128k.toml --memory-gib 80\n\nReads the recipe's data.paths (default <run>/stage2/data.jsonl); writes <run>/train/log.jsonl (a line per\nstep and evaluation), checkpoints/step-N/ (a killed run resumes from the newest, exactly), adapter/ (PEFT),\nmerged/ (HF safetensors + config.json) and summary.json. A finished rerun does nothing."
    )]
    Train(Box<TrainArgs>),
    /// Evaluate models on long-context benchmarks.
    #[command(subcommand)]
    Eval(EvalCommand),
    /// The whole pipeline from one config: extract → graph → sample → synth → train → RULER
    /// before and after → report.
    #[command(
        after_help = "Examples:\n  wildlong run configs/demo.toml\n  wildlong run configs/pipeline/llama-3.1-8b-instruct.toml --set train.schedule.steps=200\n\nWrites every stage's outputs under run.dir, <run>/pipeline/<step>.json (each step's input hash and status),\nand <run>/report.{md,svg}. A rerun skips finished steps, resumes an interrupted one, and redoes (moving the old\noutputs to <run>/superseded/) a step whose settings changed, with every step after it."
    )]
    Run(PipelineArgs),
}

#[derive(Args, Debug)]
pub struct PipelineArgs {
    /// The pipeline config (see configs/demo.toml).
    pub config: PathBuf,
    /// Override one key, e.g. `--set train.schedule.steps=4` or `--set run.dir=\"runs/x\"` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Hide progress bars.
    #[arg(long)]
    pub no_progress: bool,
}

#[derive(Subcommand, Debug)]
pub enum EvalCommand {
    /// RULER: 13 synthetic long-context tasks at each length, scored as RULER scores them.
    #[command(
        after_help = "Examples:\n  wildlong eval ruler --model default --lengths 1024,2048,4096 --samples 5\n  wildlong eval ruler --model meta-llama/Llama-3.1-8B-Instruct --lengths 4096,8192,16384,32768 --tasks all --samples 100 --out runs/llama/eval-before\n  wildlong eval ruler --model meta-llama/Llama-3.1-8B-Instruct --adapter runs/llama/train/adapter --baseline runs/llama/eval-before/report.json --out runs/llama/eval-after\n\n  wildlong eval ruler --server http://127.0.0.1:8000/v1 --model meta-llama/Llama-3.1-8B-Instruct --tokenizer meta-llama/Llama-3.1-8B-Instruct --lengths 32768\n  wildlong eval ruler --model default --out runs/r --shard 2/4    (then, once all four are done: --merge)\n\nWrites <out>/<length>/<task>/{data,pred}.jsonl and <out>/report.{json,md,csv,svg}. A rerun with the same\nsettings reuses the samples (hashed cache) and the predictions already made; a killed run resumes."
    )]
    Ruler(Box<RulerArgs>),
    /// Short-context retention: MMLU, ARC and GSM8K as lm-evaluation-harness prompts and scores them.
    #[command(
        after_help = "Examples:\n  wildlong eval short --model default --data mmlu=hf://datasets/cais/mmlu/all/test-00000-of-00001.parquet --limit 200\n  wildlong eval short --model default --data gsm8k=hf://datasets/openai/gsm8k/main/test-00000-of-00001.parquet --fewshot 5 --fewshot-data gsm8k=hf://datasets/openai/gsm8k/main/train-00000-of-00001.parquet\n  wildlong eval short --model default --adapter runs/demo/train/adapter --data arc_challenge=ARC-Challenge-test.jsonl --baseline runs/short/report.json --out runs/short-after\n  wildlong eval short --server http://127.0.0.1:8000/v1 --model meta-llama/Llama-3.1-8B --data arc_easy=ARC-Easy-test.jsonl\n\nOn a server, options are scored as lm-eval's local-completions scores them: /v1/completions with echo and\nlogprobs (vLLM, SGLang; llama-cpp-python's echoed logprobs are shifted by one token for models without BOS).\n\nData in the tasks' released formats (HF Parquet or JSONL): MMLU question/subject/choices/answer, ARC\nquestion/choices{text,label}/answerKey, GSM8K question/answer. Writes <out>/<task>/pred.jsonl (appended; a\nkilled run resumes) and <out>/report.{json,md}."
    )]
    Short(Box<ShortArgs>),
    /// LongBench v2 as its pred.py runs it (0-shot prompt, head+tail truncation, chat template).
    #[command(
        after_help = "Examples:\n  wildlong eval longbench --model meta-llama/Llama-3.1-8B-Instruct --max-len 120000\n  wildlong eval longbench --server http://127.0.0.1:8000/v1 --model Qwen/Qwen2.5-7B-Instruct --tokenizer Qwen/Qwen2.5-7B-Instruct --max-len 120000\n\nReads THUDM/LongBench-v2's data.json (or a path, JSON or JSONL); writes <out>/pred.jsonl (appended; a\nkilled run resumes) and <out>/report.{json,md}: accuracy overall, easy/hard, short/medium/long."
    )]
    Longbench(Box<LongBenchArgs>),
    /// HELMET's recall (json_kv, its RULER files) and RAG (KILT) subsets on its released data.
    #[command(
        after_help = "Examples:\n  wildlong eval helmet --model meta-llama/Llama-3.1-8B-Instruct --max-len 131072 --limit 100 \\\n    --task json_kv=data/json_kv/test_k1800_dep6.jsonl \\\n    --task ruler_niah_mk_2=data/ruler/niah_multikey_2/validation_131072.jsonl \\\n    --task kilt_nq=data/kilt/nq-dev-multikilt_1000_k1000_dep6.jsonl --demos kilt_nq=data/kilt/nq-train-multikilt_1000_k3_dep6.jsonl\n\nData: HELMET's data.tar.gz (huggingface.co/datasets/princeton-nlp/HELMET). Writes <out>/<task>/pred.jsonl\n(appended; a killed run resumes) and <out>/report.{json,md}: each task's score and the recall and RAG averages."
    )]
    Helmet(Box<HelmetArgs>),
    /// Print the delta table of two RULER reports (after versus before).
    Compare {
        /// The new report.json.
        report: PathBuf,
        /// The baseline report.json.
        baseline: PathBuf,
    },
}

#[derive(Args, Debug)]
pub struct RulerArgs {
    #[command(flatten)]
    pub engine: EngineArgs,
    /// A PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors), merged at load.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Lengths in tokens (input + generation), comma-separated [default: the task config's].
    #[arg(long, value_delimiter = ',')]
    pub lengths: Vec<usize>,
    /// `all` or comma-separated task names (niah_single_1, …, vt, cwe, fwe, qa_1, qa_2).
    #[arg(long, default_value = "all")]
    pub tasks: String,
    /// Samples per task per length [default: the task config's, 500].
    #[arg(long)]
    pub samples: Option<usize>,
    #[arg(long)]
    pub seed: Option<u64>,
    /// Task table in RULER's synthetic.yaml shape [default: configs/eval/ruler.toml, built in].
    #[arg(long)]
    pub tasks_config: Option<PathBuf>,
    /// SQuAD v2 dev JSON for qa_1: a path or hf://datasets/OWNER/NAME/FILE [default: built-in set].
    #[arg(long)]
    pub qa_squad: Option<String>,
    /// HotpotQA dev (distractor) JSON for qa_2: a path or hf://datasets/OWNER/NAME/FILE [default: built-in set].
    #[arg(long)]
    pub qa_hotpotqa: Option<String>,
    /// Essays for the essay haystacks: RULER's PaulGrahamEssays.json (as its
    /// download_paulgraham_essay.py writes it) or plain text; a path or hf://… [default: built-in public-domain essays].
    #[arg(long)]
    pub essays: Option<String>,
    /// `ruler`: NVIDIA/RULER's generators call for call (comparable with published scores on
    /// RULER's sources); `wildlong`: tighter fill, varied depths [default: ruler when
    /// --essays, --qa-squad and --qa-hotpotqa are all given, else wildlong].
    #[arg(long, value_enum)]
    pub protocol: Option<crate::eval::ruler::config::Protocol>,
    /// Evaluation folder.
    #[arg(long, default_value = "runs/ruler")]
    pub out: PathBuf,
    /// Cache of generated samples, shared across runs (keyed by a hash of everything a sample depends on).
    #[arg(long, default_value = "runs/cache/ruler")]
    pub cache_dir: PathBuf,
    /// Use RULER's `base` template (plain text) instead of the model's chat template (the
    /// default under `--protocol ruler`, as in RULER's prepare.py).
    #[arg(long, conflicts_with = "chat")]
    pub no_chat_template: bool,
    /// Render prompts with the model's chat template (the default under `--protocol
    /// wildlong`).
    #[arg(long)]
    pub chat: bool,
    /// A report.json to compare against (e.g. before fine-tuning): prints and writes delta.md.
    #[arg(long)]
    pub baseline: Option<PathBuf>,
    /// Hide the progress bar.
    #[arg(long)]
    pub no_progress: bool,
    /// Write the samples (<out>/<length>/<task>/data.jsonl) and stop.
    #[arg(long, conflicts_with_all = ["baseline", "merge"])]
    pub prepare_only: bool,
    #[command(flatten)]
    pub server: ServerArgs,
    /// With --server: the model whose tokenizer and chat template fit the samples and render
    /// the prompts (the served model's own, as a models spec) [default: default].
    #[arg(long, default_value = "default")]
    pub tokenizer: String,
    #[command(flatten)]
    pub shards: EvalShardArgs,
}

/// An evaluation split among workers, shared by `eval ruler`, `eval short` and
/// `eval longbench`.
#[derive(Args, Debug)]
pub struct EvalShardArgs {
    /// This worker's share of the samples or items (k/n, 1-based): predictions go to
    /// pred.shard-k-of-n.jsonl and no report is written.
    #[arg(long, default_value = "1/1", conflicts_with = "merge")]
    pub shard: Shard,
    /// Score every shard's predictions in --out and write the report; fails, naming them, if
    /// any sample or item has none (nothing is generated).
    #[arg(long)]
    pub merge: bool,
}

#[derive(Args, Debug)]
pub struct LongBenchArgs {
    #[command(flatten)]
    pub engine: EngineArgs,
    #[command(flatten)]
    pub server: ServerArgs,
    /// With --server: the model whose tokenizer cuts the prompts (a models spec).
    #[arg(long, default_value = "default")]
    pub tokenizer: String,
    /// The items: LongBench v2's data.json, a path or hf://datasets/... (JSON array or JSONL).
    #[arg(long, default_value = "hf://datasets/THUDM/LongBench-v2/data.json")]
    pub data: String,
    /// The first N items only.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Prompt tokens kept (pred.py's model2maxlen; first and last halves) [default: the
    /// model's context − 128; required with --server].
    #[arg(long)]
    pub max_len: Option<usize>,
    /// pred.py samples at 0.1.
    #[arg(long, default_value_t = 0.1)]
    pub temperature: f64,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    #[arg(long, default_value = "runs/longbench")]
    pub out: PathBuf,
    #[arg(long)]
    pub no_progress: bool,
    #[command(flatten)]
    pub shards: EvalShardArgs,
}

#[derive(Args, Debug)]
pub struct HelmetArgs {
    #[command(flatten)]
    pub engine: EngineArgs,
    #[command(flatten)]
    pub server: ServerArgs,
    /// With --server: the model whose tokenizer measures and cuts the prompts (a models spec).
    #[arg(long, default_value = "default")]
    pub tokenizer: String,
    /// A dataset and its file, NAME=FILE (repeatable): json_kv, ruler_niah_mk_2, ruler_niah_mk_3,
    /// ruler_niah_mv, kilt_nq, kilt_triviaqa, kilt_hotpotqa, kilt_popqa_3, …; a path or hf://datasets/...
    #[arg(long = "task", value_name = "NAME=FILE", required = true)]
    pub tasks: Vec<String>,
    /// A RAG dataset's demonstrations, NAME=FILE (repeatable).
    #[arg(long = "demos", value_name = "NAME=FILE")]
    pub demos: Vec<String>,
    /// Demonstrations per prompt (HELMET's configs: 2).
    #[arg(long, default_value_t = 2)]
    pub shots: usize,
    /// N items of each task, drawn as HELMET's max_test_samples draws them (its configs: 100) [default: all, in file order].
    #[arg(long)]
    pub limit: Option<usize>,
    /// HELMET's --seed: which items --limit draws (demonstrations are drawn per question, seeded by its hash).
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// HELMET's input_max_length: prompt + generated tokens; longer contexts lose their tail.
    #[arg(long)]
    pub max_len: usize,
    /// Tokens to generate [default: HELMET's per dataset: json_kv 100, RULER 50 (mk_3 100), RAG 20].
    #[arg(long)]
    pub max_tokens: Option<usize>,
    #[arg(long, default_value = "runs/helmet")]
    pub out: PathBuf,
    #[arg(long)]
    pub no_progress: bool,
    #[command(flatten)]
    pub shards: EvalShardArgs,
}

/// A repeatable `--flag NAME=FILE` value split at its first `=`.
fn name_and_file<'a>(flag: &str, s: &'a str, shape: &str) -> Result<(&'a str, &'a str)> {
    s.split_once('=')
        .with_context(|| format!("{flag} {s:?}: expected {shape}"))
}

impl HelmetArgs {
    /// `--task` and `--demos` paired by name.
    pub fn tasks(&self) -> Result<Vec<crate::eval::helmet::Task>> {
        let split = |flag: &str, s: &str| -> Result<(String, String)> {
            let (n, f) = name_and_file(flag, s, "NAME=FILE")?;
            crate::eval::helmet::Kind::of(n).with_context(|| format!("{flag} {s}"))?;
            Ok((n.to_string(), f.to_string()))
        };
        let demos = self
            .demos
            .iter()
            .map(|d| split("--demos", d))
            .collect::<Result<std::collections::BTreeMap<_, _>>>()?;
        let tasks = self
            .tasks
            .iter()
            .map(|t| {
                let (name, data) = split("--task", t)?;
                Ok(crate::eval::helmet::Task {
                    demos: demos.get(&name).cloned(),
                    name,
                    data,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        for d in demos.keys() {
            if !tasks.iter().any(|t| &t.name == d) {
                anyhow::bail!("--demos {d}=…: no --task {d}");
            }
        }
        Ok(tasks)
    }
}

#[derive(Args, Debug)]
pub struct ShortArgs {
    #[command(flatten)]
    pub engine: EngineArgs,
    #[command(flatten)]
    pub server: ServerArgs,
    /// With --server: a local model whose tokenizer is read, as the other suites read one (a models spec); the options' log-likelihoods are summed over the server's own tokens of each continuation.
    #[arg(long, default_value = "default")]
    pub tokenizer: String,
    /// A PEFT LoRA adapter folder, merged at load.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// A task and its data, TASK=FILE (repeatable): mmlu, arc_easy, arc_challenge or gsm8k;
    /// a path or hf://datasets/OWNER/NAME/FILE.
    #[arg(long = "data", value_name = "TASK=FILE", required = true)]
    pub data: Vec<String>,
    /// Few-shot examples per prompt, the first N of each task's --fewshot-data.
    #[arg(long, default_value_t = 0)]
    pub fewshot: usize,
    /// Where a task's few-shot examples come from, TASK=FILE (repeatable).
    #[arg(long = "fewshot-data", value_name = "TASK=FILE")]
    pub fewshot_data: Vec<String>,
    /// Items per task: the first N of each file [default: all].
    #[arg(long)]
    pub limit: Option<usize>,
    /// GSM8K's generation limit (lm-eval's max_gen_toks).
    #[arg(long, default_value_t = 256)]
    pub max_gen_tokens: usize,
    /// Evaluation folder.
    #[arg(long, default_value = "runs/short")]
    pub out: PathBuf,
    /// A report.json to compare against: prints and writes delta.md.
    #[arg(long, conflicts_with = "shard")]
    pub baseline: Option<PathBuf>,
    /// Hide the progress bar.
    #[arg(long)]
    pub no_progress: bool,
    #[command(flatten)]
    pub shards: EvalShardArgs,
}

impl ShortArgs {
    /// `--data` and `--fewshot-data` pairs as the tasks to run, in the order given.
    fn tasks(&self) -> Result<Vec<crate::eval::short::run::TaskData>> {
        let split = |flag: &str, s: &str| -> Result<(String, String)> {
            let (t, f) = name_and_file(flag, s, "TASK=FILE")?;
            Ok((t.trim().to_string(), f.to_string()))
        };
        let data = self
            .data
            .iter()
            .map(|s| split("--data", s))
            .collect::<Result<Vec<_>>>()?;
        let fewshot = self
            .fewshot_data
            .iter()
            .map(|s| split("--fewshot-data", s))
            .collect::<Result<_>>()?;
        crate::eval::short::run::task_data(
            data,
            fewshot,
            |t| format!("--data {t}=…"),
            |t| format!("--fewshot-data {t}=…"),
        )
    }
}

/// The run folder and the stage's settings, shared by the stage commands.
#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    /// Run folder; each stage reads and writes its own subfolder (<run>/stage1, <run>/stage2, <run>/train).
    #[arg(long, default_value = "runs/demo")]
    pub run: PathBuf,
    /// This stage's settings [default: configs/stage1.toml, configs/stage2.toml or configs/train/smollm2-cpu.toml, built in].
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Override one config key, e.g. `--set filter.languages=["English","French"]`,
    /// `--set assemble.buckets=[8192]` or `--set schedule.steps=20` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
}

/// Options every stage-1 command shares.
#[derive(Args, Debug, Clone)]
pub struct Stage1Args {
    #[command(flatten)]
    pub run: RunArgs,
    /// Hide progress bars.
    #[arg(long)]
    pub no_progress: bool,
}

impl Stage1Args {
    /// The stage-1 config: the file (or built-in defaults), `--set`, then the command's own
    /// flags as overrides of their keys, validated once.
    fn load(&self, flags: Vec<String>) -> Result<Stage1Run> {
        let cfg = Stage1Config::load(self.run.config.as_deref(), &self.run.sets(flags))?;
        let schema = MetaSchema::load(cfg.schema.as_deref())?;
        Ok(Stage1Run {
            cfg,
            schema,
            dir: RunLayout::new(&self.run.run).stage1(),
            progress: !self.no_progress,
        })
    }
}

impl RunArgs {
    /// `--set` overrides, then the flags' (a flag wins over `--set` of the same key).
    fn sets(&self, flags: Vec<String>) -> Vec<String> {
        self.set.iter().cloned().chain(flags).collect()
    }
}

/// Collects flag values as `KEY=VALUE` overrides of a config, so that a flag is read and
/// validated exactly as the same key in the file would be.
#[derive(Default)]
struct Overrides(Vec<String>);

impl Overrides {
    fn set<T: serde::Serialize>(mut self, key: &str, value: Option<T>) -> Result<Self> {
        if let Some(v) = value {
            let v = toml::Value::try_from(v).with_context(|| format!("the value of {key}"))?;
            self.0.push(format!("{key}={v}"));
        }
        Ok(self)
    }
}

/// Generation on an OpenAI-compatible server instead of the local engine.
#[derive(Args, Debug, Clone)]
pub struct ServerArgs {
    /// Base URL of an OpenAI-compatible server (vLLM, SGLang, llama.cpp), e.g.
    /// http://127.0.0.1:8000/v1; `--model` is then the server's model name. The API key is
    /// read from $OPENAI_API_KEY when set.
    #[arg(long)]
    pub server: Option<String>,
    /// How JSON schemas are sent: json-schema (OpenAI, vLLM, SGLang, llama-server) or
    /// json-object (llama-cpp-python).
    #[arg(long, value_enum, default_value = "json-schema")]
    pub server_json_format: crate::generator::openai::JsonFormat,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 8)]
    pub server_concurrency: usize,
    /// Seconds before a request is retried.
    #[arg(long, default_value_t = 600.0)]
    pub server_timeout: f64,
    /// Retries after timeouts, connection errors, HTTP 429 and 5xx.
    #[arg(long, default_value_t = 3)]
    pub server_retries: usize,
}

impl ServerArgs {
    /// The client's settings when `--server` is given (its model set by the command).
    fn config(&self) -> Option<crate::generator::openai::OpenAiConfig> {
        self.server
            .as_ref()
            .map(|url| crate::generator::openai::OpenAiConfig {
                base_url: url.clone(),
                json_format: self.server_json_format,
                concurrency: self.server_concurrency,
                timeout_s: self.server_timeout,
                max_retries: self.server_retries,
                ..Default::default()
            })
    }
}

/// The generator a command asked for: the server when `--server` is given, else `--model`
/// in the local engine.
fn generator(
    engine: &EngineArgs,
    server: &ServerArgs,
    threads: usize,
    models_dir: &Path,
) -> Result<GeneratorSpec> {
    Ok(GeneratorSpec {
        model: engine.model.clone(),
        server: server.config(),
        engine: engine.engine_config(threads)?,
        models_dir: models_dir.to_path_buf(),
    })
}

#[derive(Args, Debug)]
pub struct ExtractArgs {
    #[command(flatten)]
    pub engine: EngineArgs,
    #[command(flatten)]
    pub server: ServerArgs,
    #[command(flatten)]
    pub stage1: Stage1Args,
    /// Conversations (JSONL/Parquet path, hf://datasets/OWNER/NAME/FILE, or `sample`); repeatable
    /// [default: the config's input.paths].
    #[arg(long)]
    pub input: Vec<String>,
    /// This worker's share: k/n takes every n-th query starting at the k-th (1-based).
    #[arg(long, default_value = "1/1")]
    pub shard: Shard,
    /// Only the first N filtered queries.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Stop at the first malformed input line instead of skipping it.
    #[arg(long)]
    pub strict: bool,
    /// Write queries.jsonl and filter_stats.json, then stop (no model needed).
    #[arg(long)]
    pub filter_only: bool,
}

#[derive(Args, Debug)]
pub struct TrainArgs {
    /// Training writes <run>/train; the recipe is --config [default: configs/train/smollm2-cpu.toml, built in].
    #[command(flatten)]
    pub run: RunArgs,
    /// Print the predicted peak memory and tokens per step, then stop; exits 1 (with settings
    /// that would fit) when the plan exceeds the device's memory.
    #[arg(long)]
    pub plan: bool,
    /// Device memory for --plan, in GiB [default: this machine's available memory; needed
    /// with --device cuda].
    #[arg(long)]
    pub memory_gib: Option<f64>,
    /// Hide the progress bar.
    #[arg(long)]
    pub no_progress: bool,
    /// cpu or cuda[:N] (a build with the `cuda` feature) [default: cpu]; with --plan, the
    /// device the plan is made for.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Stop after this many steps, as a kill would (for resume tests).
    #[arg(long, hide = true)]
    pub stop_after: Option<usize>,
}

#[derive(Args, Debug)]
pub struct GraphArgs {
    #[command(flatten)]
    pub stage1: Stage1Args,
    /// Edge weight [default: the config's, count].
    #[arg(long, value_enum)]
    pub weight: Option<EdgeWeight>,
    /// Prune edges whose weight is below this.
    #[arg(long)]
    pub min_weight: Option<f64>,
}

#[derive(Args, Debug)]
pub struct SampleArgs {
    #[command(flatten)]
    pub engine: EngineArgs,
    #[command(flatten)]
    pub server: ServerArgs,
    #[command(flatten)]
    pub stage1: Stage1Args,
    /// Blueprints per document type [default: the config's].
    #[arg(long)]
    pub per_type: Option<usize>,
    #[arg(long)]
    pub seed: Option<u64>,
    /// Write paths.jsonl and stop (no model needed).
    #[arg(long)]
    pub paths_only: bool,
}

#[derive(Args, Debug)]
pub struct SynthArgs {
    #[command(flatten)]
    pub engine: EngineArgs,
    #[command(flatten)]
    pub server: ServerArgs,
    /// With --server: the model whose tokenizer and chat template measure the prompts (the
    /// served model's own, as a models spec) [default: default].
    #[arg(long, default_value = "default")]
    pub tokenizer: String,
    #[command(flatten)]
    pub run: RunArgs,
    /// Documents: JSONL/Parquet files, folders of .txt/.md, hf://datasets/..., or `sample`
    /// (repeatable) [default: the config's documents.paths].
    #[arg(long)]
    pub documents: Vec<String>,
    /// Blueprints [default: <run>/stage1/blueprints.jsonl].
    #[arg(long)]
    pub blueprints: Option<PathBuf>,
    /// This worker's share of the contexts (k/n, 1-based).
    #[arg(long, default_value = "1/1")]
    pub shard: Shard,
    /// Merge the finished shards' outputs in <run>/stage2 into data.jsonl and the card
    /// (no model needed).
    #[arg(long)]
    pub merge: bool,
}

#[derive(Subcommand, Debug)]
pub enum ModelsCommand {
    /// Install the default model (SmolLM2-135M-Instruct Q4_1 GGUF) under the models folder,
    /// or download a Hugging Face model id into the HF cache.
    #[command(
        after_help = "Examples:\n  wildlong models fetch\n  wildlong models fetch HuggingFaceTB/SmolLM2-360M-Instruct"
    )]
    Fetch {
        /// `default`, or a Hugging Face model id (owner/name).
        #[arg(default_value = "default")]
        model: String,
    },
    /// Print architecture, sizes, context length, RoPE, tokenizer and chat template of a model,
    /// and the memory its weights take in each format on each device.
    #[command(
        after_help = "Examples:\n  wildlong models info default\n  wildlong models info path/to/model-folder\n  wildlong models info meta-llama/Llama-3.1-8B-Instruct\n  wildlong models info model-Q4_K_M.gguf --load --memory-gib 8\n\nWith --load, the weights are loaded (after the memory check every command makes) and the\nmemory they took is printed beside the prediction, then one JSON line."
    )]
    Info {
        #[arg(default_value = "default")]
        model: String,
        /// In-memory format of GGUF weights for the check and --load [default: exact].
        #[arg(long, value_enum)]
        weights: Option<WeightFormat>,
        /// Compute dtype of safetensors models: f32, f16, bf16 [default: f32].
        #[arg(long)]
        dtype: Option<String>,
        /// cpu, cuda[:N] or metal[:N] [default: cpu].
        #[arg(long)]
        device: Option<String>,
        /// Memory the load may use, GiB [default: what the device has free].
        #[arg(long)]
        memory_gib: Option<f64>,
        /// Load the weights and print the memory they took.
        #[arg(long)]
        load: bool,
    },
}

#[derive(Args, Debug, Clone)]
pub struct EngineArgs {
    /// `default`, a .gguf file, an HF folder (config.json + safetensors + tokenizer.json), or an HF model id.
    #[arg(long, default_value = "default")]
    pub model: String,
    /// Engine settings from a TOML file (see configs/engine-cpu.toml); flags override it.
    #[arg(long)]
    pub engine_config: Option<PathBuf>,
    /// In-memory format of GGUF weights [default: exact].
    #[arg(long, value_enum)]
    pub weights: Option<WeightFormat>,
    /// Compute dtype for safetensors models: f32, f16, bf16 [default: f32].
    #[arg(long)]
    pub dtype: Option<String>,
    /// Rows decoded together [default: 16].
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Prompt tokens per prefill step [default: 512].
    #[arg(long)]
    pub prefill_chunk: Option<usize>,
    /// Override the checkpoint's rope_theta.
    #[arg(long)]
    pub rope_theta: Option<f64>,
    /// Longest prompt + generation accepted [default: the model's context].
    #[arg(long)]
    pub max_context: Option<usize>,
    /// cpu, cuda[:N] or metal[:N] [default: cpu].
    #[arg(long)]
    pub device: Option<String>,
    /// Memory the model may use (weights, KV cache, working memory), GiB; a model that will
    /// not fit is refused before loading [default: what the device has free].
    #[arg(long)]
    pub memory_gib: Option<f64>,
}

impl EngineArgs {
    /// The engine configuration: defaults, then `--engine-config`, then the flags as
    /// overrides of their keys, validated once (a flag's mistake reads as the file's would).
    pub fn engine_config(&self, threads: usize) -> Result<EngineConfig> {
        let sets = Overrides::default()
            .set("weight_format", self.weights)?
            .set("dtype", self.dtype.as_ref())?
            .set("max_batch", self.batch_size)?
            .set("prefill_chunk", self.prefill_chunk)?
            .set("rope_theta", self.rope_theta)?
            .set("max_context", self.max_context)?
            .set("device", self.device.as_ref())?
            .set("memory_gib", self.memory_gib)?
            .set("threads", (threads > 0).then_some(threads))?;
        EngineConfig::load(self.engine_config.as_deref(), &sets.0)
    }
}

#[derive(Args, Debug)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub engine: EngineArgs,
    /// A PEFT LoRA adapter folder (e.g. `wildlong train`'s <run>/train/adapter), merged at load.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// The prompt (plain text, or the user message with --chat).
    #[arg(long, required_unless_present = "batch_file")]
    pub prompt: Option<String>,
    /// Render prompts with the model's chat template.
    #[arg(long)]
    pub chat: bool,
    /// System message (with --chat).
    #[arg(long)]
    pub system: Option<String>,
    #[arg(long, default_value_t = 256)]
    pub max_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    #[arg(long)]
    pub top_p: Option<f64>,
    #[arg(long)]
    pub top_k: Option<usize>,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// > 1 discourages repeating the last 64 generated tokens (HF's repetition_penalty).
    #[arg(long)]
    pub repetition_penalty: Option<f64>,
    /// Stop string (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
    /// Constrain the output to JSON valid against this JSON schema file.
    #[arg(long)]
    pub json_schema: Option<PathBuf>,
    /// JSONL file of prompts (see below).
    #[arg(long, conflicts_with = "prompt")]
    pub batch_file: Option<PathBuf>,
    /// Append results as JSONL here (resumable); default: print to stdout.
    #[arg(long)]
    pub output: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(flatten)]
    pub engine: EngineArgs,
    #[arg(long, default_value_t = 512)]
    pub prompt_tokens: usize,
    #[arg(long, default_value_t = 128)]
    pub new_tokens: usize,
    /// Rows of the batched-decode measurement.
    #[arg(long, default_value_t = 16)]
    pub batch: usize,
    /// Document length of the prefix-cache measurement (0 = skip).
    #[arg(long, default_value_t = 4096)]
    pub prefix_tokens: usize,
    #[arg(long, default_value_t = 8)]
    pub continuations: usize,
    /// Repetitions of each measurement (the median is reported).
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Write the JSON result here as well.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Measure LoRA training instead (r=16, α=32 on all seven projections, one row of this
    /// many tokens, every token counted, AdamW), as `hf_cpu_baseline.py` measures PyTorch + PEFT.
    #[arg(long)]
    pub train_seq: Option<usize>,
    /// With --train-seq: recompute each layer in the backward pass.
    #[arg(long)]
    pub checkpoint_layers: bool,
    /// With --train-seq: query rows per attention block.
    #[arg(long, default_value_t = 128)]
    pub attention_block: usize,
    /// With --train-seq --checkpoint-layers: tokens per MLP tile (0: the whole row).
    #[arg(long, default_value_t = 4096)]
    pub mlp_tile: usize,
    /// With --train-seq: optimizer steps (the first warms up and the median of the others is
    /// reported; 1: one step, timed as it is, for a peak-memory measurement at long rows).
    #[arg(long, default_value_t = 4)]
    pub train_steps: usize,
    /// The GPU benchmark (benches/gpu.sh) on a model of this shape with random bf16 weights
    /// made on the device: `llama-3.1-8b` (as benches/peers/hf_gpu_baseline.py builds it) or
    /// `tiny`. Prints one JSON line per measurement.
    #[arg(long)]
    pub synthetic: Option<String>,
    /// With --synthetic: prompt lengths of the prefill measurements.
    #[arg(long, default_value = "8192,32768")]
    pub prefill_lengths: String,
    /// With --synthetic: row lengths of the LoRA training measurements (empty: none).
    #[arg(long, default_value = "8192,32768")]
    pub train_lengths: String,
    /// With --synthetic: rows of logits per cross-entropy chunk in training.
    #[arg(long, default_value_t = 1024)]
    pub loss_chunk: usize,
}

impl Cli {
    /// The CPU threads this invocation runs with, validated: `--threads`, else the `threads`
    /// of the engine config the command reads (`--engine-config FILE`, or `pipeline`'s
    /// `[engine]` for `wildlong run`), else 0 (all physical cores).
    pub fn threads(&self, pipeline: Option<&PipelineConfig>) -> Result<usize> {
        if self.threads > 0 {
            crate::engine::config::check_threads(self.threads).context("--threads")?;
            return Ok(self.threads);
        }
        let engine = match &self.command {
            Command::Generate(a) => Some(&a.engine),
            Command::Bench(a) => Some(&a.engine),
            Command::Extract(a) => Some(&a.engine),
            Command::Sample(a) => Some(&a.engine),
            Command::Synth(a) => Some(&a.engine),
            Command::Eval(EvalCommand::Ruler(a)) => Some(&a.engine),
            Command::Eval(EvalCommand::Short(a)) => Some(&a.engine),
            Command::Eval(EvalCommand::Longbench(a)) => Some(&a.engine),
            Command::Eval(EvalCommand::Helmet(a)) => Some(&a.engine),
            _ => None,
        };
        Ok(match (engine, pipeline) {
            (Some(e), _) => e.engine_config(0)?.threads,
            (None, Some(p)) => p.engine.threads,
            (None, None) => 0,
        })
    }
}

pub fn run(mut cli: Cli) -> Result<()> {
    // A pipeline's config is read once: its `[engine]` sizes the pool, then it runs.
    let pipeline = match &cli.command {
        Command::Run(a) => Some(PipelineConfig::load(&a.config, &a.set)?),
        _ => None,
    };
    cli.threads = cli.threads(pipeline.as_ref())?;
    if cli.threads > 0 {
        // Candle sizes its parallel loops by RAYON_NUM_THREADS; nothing has started a pool yet.
        std::env::set_var("RAYON_NUM_THREADS", cli.threads.to_string());
    }
    // Run inside a worker of the pool so that every parallel matmul and attention call is
    // joined by this thread instead of handing work over and sleeping (a wake-up per call).
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(cli.threads)
        .build()
        .context("building the thread pool")?;
    pool.install(|| run_command(cli, pipeline))
}

/// Each command: its arguments validated into the library's types, then one call.
fn run_command(cli: Cli, pipeline: Option<PipelineConfig>) -> Result<()> {
    let (threads, models_dir) = (cli.threads, cli.models_dir.as_path());
    match cli.command {
        Command::Models(ModelsCommand::Fetch { model }) => {
            models::fetch_command(&model, models_dir)
        }
        Command::Models(ModelsCommand::Info {
            model,
            weights,
            dtype,
            device,
            memory_gib,
            load,
        }) => {
            let sets = Overrides::default()
                .set("weight_format", weights)?
                .set("dtype", dtype.as_ref())?
                .set("device", device.as_ref())?
                .set("memory_gib", memory_gib)?;
            let cfg = EngineConfig::load(None, &sets.0)?;
            models::info_command(&model, models_dir, &cfg, load)
        }
        Command::Generate(a) => {
            crate::generator::command::generate(&a.command(threads, models_dir)?)
        }
        Command::Bench(a) => crate::bench::run(&a, threads, models_dir),
        Command::Extract(a) => {
            let flags = Overrides::default()
                .set("input.paths", (!a.input.is_empty()).then_some(&a.input))?
                .set("input.strict", a.strict.then_some(true))?;
            let run = a.stage1.load(flags.0)?;
            let generator = generator(&a.engine, &a.server, threads, models_dir)?;
            // Not an override of input.limit: that key is part of the queries' fingerprint,
            // and a rerun with another --limit extracts more of the same queries.
            let limit = a.limit.or(run.cfg.input.limit);
            crate::stage1::command::extract(&run, &generator, a.shard, limit, a.filter_only)
        }
        Command::Graph(a) => {
            let flags = Overrides::default()
                .set("graph.weight", a.weight)?
                .set("graph.min_weight", a.min_weight)?;
            crate::stage1::command::graph(&a.stage1.load(flags.0)?)
        }
        Command::Sample(a) => {
            let flags = Overrides::default()
                .set("sample.per_type", a.per_type)?
                .set("sample.seed", a.seed)?;
            let run = a.stage1.load(flags.0)?;
            let generator = match a.paths_only {
                true => None,
                false => Some(generator(&a.engine, &a.server, threads, models_dir)?),
            };
            crate::stage1::command::sample(&run, generator.as_ref())
        }
        Command::Synth(a) => {
            let flags = Overrides::default().set(
                "documents.paths",
                (!a.documents.is_empty()).then_some(&a.documents),
            )?;
            let cfg = Stage2Config::load(a.run.config.as_deref(), &a.run.sets(flags.0))?;
            crate::stage2::command::synth(&SynthCommand {
                cfg,
                run: a.run.run.clone(),
                generator: generator(&a.engine, &a.server, threads, models_dir)?,
                tokenizer: a.tokenizer.clone(),
                blueprints: a.blueprints.clone(),
                shard: a.shard,
                merge: a.merge,
            })
        }
        Command::Train(a) => {
            let cfg = TrainConfig::load(a.run.config.as_deref(), &a.run.set)?;
            if a.plan {
                return crate::train::command::plan(&cfg, models_dir, &a.device, a.memory_gib);
            }
            crate::train::command::train(
                &cfg,
                &a.run.run,
                &crate::train::run::RunOptions {
                    models_dir: models_dir.to_path_buf(),
                    progress: !a.no_progress,
                    stop_after: a.stop_after,
                    device: a.device.clone(),
                },
            )
        }
        Command::Eval(EvalCommand::Ruler(a)) => crate::eval::ruler::command::ruler(RulerCommand {
            run: RulerRun {
                chat: a.chat_template()?,
                config: a.ruler_config()?,
                out: a.out.clone(),
                cache_dir: a.cache_dir.clone(),
                model: a.engine.model.clone(),
                adapter: a.adapter.as_ref().map(|p| p.display().to_string()),
                progress: !a.no_progress,
                prepare_only: a.prepare_only,
                shard: a.shards.shard,
                merge: a.shards.merge,
            },
            engine: a.engine.engine_config(threads)?,
            models_dir: models_dir.to_path_buf(),
            baseline: a.baseline.clone(),
            server: a.server.config(),
            tokenizer: a.tokenizer.clone(),
        }),
        Command::Eval(EvalCommand::Short(a)) => crate::eval::short::run::command(
            &crate::eval::short::run::ShortRun {
                tasks: a.tasks()?,
                fewshot: a.fewshot,
                limit: a.limit,
                max_gen_tokens: a.max_gen_tokens,
                out: a.out.clone(),
                model: a.engine.model.clone(),
                adapter: a.adapter.as_ref().map(|p| p.display().to_string()),
                progress: !a.no_progress,
                shard: a.shards.shard,
                merge: a.shards.merge,
            },
            a.server.config(),
            &a.tokenizer,
            &a.engine.engine_config(threads)?,
            models_dir,
            a.baseline.as_deref(),
        ),
        Command::Eval(EvalCommand::Longbench(a)) => crate::eval::longbench::command(
            &crate::eval::longbench::LongBenchRun {
                data: a.data.clone(),
                limit: a.limit,
                max_len: a.max_len,
                temperature: a.temperature,
                seed: a.seed,
                out: a.out.clone(),
                model: a.engine.model.clone(),
                progress: !a.no_progress,
                shard: a.shards.shard,
                merge: a.shards.merge,
            },
            a.server.config(),
            &a.tokenizer,
            &a.engine.engine_config(threads)?,
            models_dir,
        ),
        Command::Eval(EvalCommand::Helmet(a)) => crate::eval::helmet::command(
            &crate::eval::helmet::HelmetRun {
                tasks: a.tasks()?,
                shots: a.shots,
                limit: a.limit,
                seed: a.seed,
                max_len: a.max_len,
                max_tokens: a.max_tokens,
                out: a.out.clone(),
                model: a.engine.model.clone(),
                progress: !a.no_progress,
                shard: a.shards.shard,
                merge: a.shards.merge,
            },
            a.server.config(),
            &a.tokenizer,
            &a.engine.engine_config(threads)?,
            models_dir,
        ),
        Command::Eval(EvalCommand::Compare { report, baseline }) => {
            crate::eval::ruler::command::compare(&report, &baseline)
        }
        Command::Run(a) => {
            let mut cfg = pipeline.context("the pipeline config is read before the pool")?;
            if threads > 0 {
                cfg.engine.threads = threads;
            }
            crate::pipeline::command(
                &cfg,
                &crate::pipeline::Options {
                    models_dir: models_dir.to_path_buf(),
                    progress: !a.no_progress,
                    config_path: a.config.clone(),
                },
            )
        }
    }
}

impl RulerArgs {
    /// `--chat` / `--no-chat-template`, else the protocol's default: RULER's `base`
    /// template under `ruler`, the model's chat template under `wildlong`.
    pub fn chat_template(&self) -> Result<bool> {
        Ok(if self.chat {
            true
        } else if self.no_chat_template {
            false
        } else {
            self.ruler_config()?.protocol() == crate::eval::ruler::config::Protocol::Wildlong
        })
    }

    /// `--tasks`, `--lengths`, … over the task config.
    pub fn ruler_config(&self) -> Result<RulerConfig> {
        crate::eval::ruler::config::RulerSelection {
            tasks_config: self.tasks_config.clone(),
            lengths: (!self.lengths.is_empty()).then(|| self.lengths.clone()),
            samples: self.samples,
            seed: self.seed,
            qa_squad: self.qa_squad.clone(),
            qa_hotpotqa: self.qa_hotpotqa.clone(),
            essays: self.essays.clone(),
            protocol: self.protocol,
            tasks: match self.tasks.as_str() {
                "all" => Vec::new(),
                t => t.split(',').map(|s| s.trim().to_string()).collect(),
            },
        }
        .resolve("--tasks")
    }
}

impl GenerateArgs {
    /// The prompts' parameters and the engine, validated.
    fn command(&self, threads: usize, models_dir: &Path) -> Result<GenerateCommand> {
        let json_schema = match &self.json_schema {
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .with_context(|| format!("reading {}", p.display()))?;
                Some(
                    serde_json::from_str::<serde_json::Value>(&text)
                        .with_context(|| format!("{}: invalid JSON", p.display()))?,
                )
            }
            None => None,
        };
        Ok(GenerateCommand {
            model: LocalModel {
                spec: self.engine.model.clone(),
                adapter: self.adapter.clone(),
                engine: self.engine.engine_config(threads)?,
                models_dir: models_dir.to_path_buf(),
            },
            params: GenerationParams {
                max_tokens: self.max_tokens,
                sampling: SamplingParams {
                    temperature: self.temperature,
                    top_k: self.top_k,
                    top_p: self.top_p,
                    seed: self.seed,
                    repetition_penalty: self.repetition_penalty,
                },
                stop: self.stop.clone(),
                eos_token_ids: vec![],
                json_schema,
                ignore_eos: false,
            },
            prompts: match (&self.batch_file, &self.prompt) {
                (Some(file), _) => Err(file.clone()),
                (None, Some(p)) => Ok(p.clone()),
                (None, None) => anyhow::bail!("give --prompt or --batch-file"),
            },
            output: self.output.clone(),
            chat: self.chat.then(|| self.system.clone()),
        })
    }
}
