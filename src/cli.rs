//! Command-line interface: argument types (clap derive) and one function per command.

use crate::engine::chat::Message;
use crate::engine::config::{EngineConfig, GenerationParams, SamplingParams};
use crate::engine::generate::{Completion, Engine, Request};
use crate::engine::weights::WeightFormat;
use crate::eval::ruler::config::RulerConfig;
use crate::eval::ruler::data::Assets;
use crate::eval::ruler::report::Report;
use crate::eval::ruler::run::RulerRun;
use crate::models;
use crate::shard::Shard;
use crate::stage1::config::{EdgeWeight, MetaSchema, Stage1Config};
use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use std::io::Write;
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
    /// Measure prefill, decode, batched and shared-prefix throughput.
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
        after_help = "Examples:\n  wildlong eval ruler --model default --lengths 1024,2048,4096 --samples 5\n  wildlong eval ruler --model meta-llama/Llama-3.1-8B-Instruct --lengths 4096,8192,16384,32768 --tasks all --samples 100 --out runs/llama/eval-before\n  wildlong eval ruler --model meta-llama/Llama-3.1-8B-Instruct --adapter runs/llama/train/adapter --baseline runs/llama/eval-before/report.json --out runs/llama/eval-after\n\nWrites <out>/<length>/<task>/{data,pred}.jsonl and <out>/report.{json,md,csv,svg}. A rerun with the same\nsettings reuses the samples (hashed cache) and the predictions already made; a killed run resumes."
    )]
    Ruler(Box<RulerArgs>),
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
    /// Evaluation folder.
    #[arg(long, default_value = "runs/ruler")]
    pub out: PathBuf,
    /// Cache of generated samples, shared across runs (keyed by a hash of everything a sample depends on).
    #[arg(long, default_value = "runs/cache/ruler")]
    pub cache_dir: PathBuf,
    /// Use RULER's `base` template (plain text) instead of the model's chat template.
    #[arg(long)]
    pub no_chat_template: bool,
    /// A report.json to compare against (e.g. before fine-tuning): prints and writes delta.md.
    #[arg(long)]
    pub baseline: Option<PathBuf>,
    /// Hide the progress bar.
    #[arg(long)]
    pub no_progress: bool,
    /// Write the samples (<out>/<length>/<task>/data.jsonl) and stop.
    #[arg(long, conflicts_with = "baseline")]
    pub prepare_only: bool,
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
    fn load(&self) -> Result<(Stage1Config, MetaSchema, PathBuf)> {
        let cfg = Stage1Config::load(self.run.config.as_deref(), &self.run.set)?;
        let schema = MetaSchema::load(cfg.schema.as_deref())?;
        Ok((
            cfg,
            schema,
            crate::layout::RunLayout::new(&self.run.run).stage1(),
        ))
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

/// The local engine, or the server when `--server` is given.
fn load_llm(
    engine: &EngineArgs,
    server: &ServerArgs,
    threads: usize,
    models_dir: &Path,
) -> Result<crate::generator::Llm> {
    let server = server
        .server
        .as_ref()
        .map(|url| crate::generator::openai::OpenAiConfig {
            base_url: url.clone(),
            json_format: server.server_json_format,
            concurrency: server.server_concurrency,
            timeout_s: server.server_timeout,
            max_retries: server.server_retries,
            ..Default::default()
        });
    crate::generator::Llm::open(
        server,
        &engine.model,
        models_dir,
        &engine.engine_config(threads)?,
    )
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
    /// Device memory for --plan, in GiB [default: this machine's available memory].
    #[arg(long)]
    pub memory_gib: Option<f64>,
    /// Hide the progress bar.
    #[arg(long)]
    pub no_progress: bool,
    /// cpu or cuda[:N] (a build with the `cuda` feature) [default: cpu].
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
    /// Print architecture, sizes, context length, RoPE, tokenizer and chat template of a model.
    #[command(
        after_help = "Examples:\n  wildlong models info default\n  wildlong models info path/to/model-folder\n  wildlong models info meta-llama/Llama-3.1-8B-Instruct"
    )]
    Info {
        #[arg(default_value = "default")]
        model: String,
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
}

impl EngineArgs {
    /// The engine configuration: defaults, then `--engine-config`, then flags.
    pub fn engine_config(&self, threads: usize) -> Result<EngineConfig> {
        let mut c = match &self.engine_config {
            Some(p) => EngineConfig::from_toml_file(p)?,
            None => EngineConfig::default(),
        };
        if let Some(v) = self.weights {
            c.weight_format = v;
        }
        if let Some(v) = &self.dtype {
            c.dtype = v.clone();
        }
        if let Some(v) = self.batch_size {
            c.max_batch = v;
        }
        if let Some(v) = self.prefill_chunk {
            c.prefill_chunk = v;
        }
        c.rope_theta = self.rope_theta.or(c.rope_theta);
        c.max_context = self.max_context.or(c.max_context);
        if let Some(v) = &self.device {
            c.device = v.clone();
        }
        if threads > 0 {
            c.threads = threads;
        }
        c.validate().context("engine settings")?;
        Ok(c)
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
    /// Document length of the shared-prefix measurement (0 = skip).
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
    #[arg(long, default_value_t = 256)]
    pub attention_block: usize,
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
    /// of the engine config the command reads (`--engine-config FILE`, a pipeline's
    /// `[engine]`), else 0 (all physical cores).
    pub fn threads(&self) -> Result<usize> {
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
            Command::Run(a) => {
                let cfg = crate::pipeline::config::PipelineConfig::load(&a.config, &a.set)?;
                return Ok(cfg.engine.threads);
            }
            _ => None,
        };
        Ok(match engine {
            Some(e) => e.engine_config(0)?.threads,
            None => 0,
        })
    }
}

pub fn run(mut cli: Cli) -> Result<()> {
    cli.threads = cli.threads()?;
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
    pool.install(|| run_command(cli))
}

fn run_command(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Models(ModelsCommand::Fetch { model }) => fetch(&model, &cli.models_dir),
        Command::Models(ModelsCommand::Info { model }) => {
            let files = models::resolve(&model, &cli.models_dir)?;
            let located = models::locate(files, &EngineConfig::default())?;
            print!("{}", located.describe());
            Ok(())
        }
        Command::Generate(args) => generate(args, cli.threads, &cli.models_dir),
        Command::Bench(args) => crate::bench::run(&args, cli.threads, &cli.models_dir),
        Command::Extract(args) => extract(*args, cli.threads, &cli.models_dir),
        Command::Graph(args) => graph(args),
        Command::Synth(args) => synth(*args, cli.threads, &cli.models_dir),
        Command::Train(args) => train(*args, &cli.models_dir),
        Command::Sample(args) => sample(*args, cli.threads, &cli.models_dir),
        Command::Eval(EvalCommand::Ruler(args)) => eval_ruler(*args, cli.threads, &cli.models_dir),
        Command::Run(args) => pipeline(args, cli.threads, &cli.models_dir),
        Command::Eval(EvalCommand::Compare { report, baseline }) => {
            let new = Report::load(&report)?;
            let base = Report::load(&baseline)?;
            print!("{}", new.delta(&base));
            Ok(())
        }
    }
}

impl RulerArgs {
    /// `--tasks`, `--lengths`, … over the task config.
    pub fn ruler_config(&self) -> Result<RulerConfig> {
        crate::eval::ruler::config::RulerSelection {
            tasks_config: self.tasks_config.clone(),
            lengths: (!self.lengths.is_empty()).then(|| self.lengths.clone()),
            samples: self.samples,
            seed: self.seed,
            qa_squad: self.qa_squad.clone(),
            qa_hotpotqa: self.qa_hotpotqa.clone(),
            tasks: match self.tasks.as_str() {
                "all" => Vec::new(),
                t => t.split(',').map(|s| s.trim().to_string()).collect(),
            },
        }
        .resolve("--tasks")
    }
}

fn eval_ruler(args: RulerArgs, threads: usize, models_dir: &Path) -> Result<()> {
    let cfg = args.ruler_config()?;
    let assets = Assets::for_config(&cfg)?;
    let baseline = args.baseline.as_deref().map(Report::load).transpose()?;
    let ecfg = args.engine.engine_config(threads)?;
    let engine = models::load_engine_with_adapter(
        &args.engine.model,
        args.adapter.as_deref(),
        models_dir,
        &ecfg,
    )?;
    let run = RulerRun {
        config: cfg,
        out: args.out.clone(),
        cache_dir: args.cache_dir.clone(),
        model: args.engine.model.clone(),
        adapter: args.adapter.as_ref().map(|p| p.display().to_string()),
        chat: !args.no_chat_template,
        progress: !args.no_progress,
        prepare_only: args.prepare_only,
    };
    let Some(report) = run.run(&engine, &assets)? else {
        println!("samples written under {}", args.out.display());
        return Ok(());
    };
    print!("{}", report.markdown());
    println!(
        "\nreports: {}/report.{{json,md,csv,svg}}",
        args.out.display()
    );
    if let Some(base) = baseline {
        let d = report.delta(&base);
        crate::records::write_atomic(&args.out.join("delta.md"), d.as_bytes())?;
        print!("\n{d}");
    }
    Ok(())
}

fn extract(args: ExtractArgs, threads: usize, models_dir: &Path) -> Result<()> {
    use crate::stage1::extract::{prepare_queries, Extraction};
    let (mut cfg, schema, dir) = args.stage1.load()?;
    if !args.input.is_empty() {
        cfg.input.paths = args.input.clone();
    }
    cfg.input.strict |= args.strict;
    if args.filter_only {
        prepare_queries(&cfg, &dir)?;
        print!(
            "{}",
            std::fs::read_to_string(dir.join(crate::layout::stage1::FILTER_STATS))?
        );
        return Ok(());
    }
    let llm = load_llm(&args.engine, &args.server, threads, models_dir)?;
    let run = Extraction {
        cfg: &cfg,
        schema: &schema,
        dir: dir.clone(),
        model: args.engine.model.clone(),
        shard: args.shard,
        limit: args.limit.or(cfg.input.limit),
        progress: !args.stage1.no_progress,
    };
    let stats = run.run(&llm)?;
    let filter: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(
        dir.join(crate::layout::stage1::FILTER_STATS),
    )?)?;
    println!(
        "filter: {} queries kept; dropped by reason: {}",
        filter["kept"], filter["dropped"]
    );
    println!(
        "extract: {} records, {} rejected -> {}",
        stats.records,
        stats.rejects,
        run.meta_path().display()
    );
    if stats.queries_this_run > 0 {
        println!(
            "  {} queries in {:.1} s: {:.1} queries/min",
            stats.queries_this_run,
            stats.seconds,
            stats.queries_this_run as f64 * 60.0 / stats.seconds.max(1e-9)
        );
    }
    println!("document types:");
    let mut types: Vec<_> = stats.document_types.iter().collect();
    types.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    for (t, n) in types {
        println!("  {n:>6}  {t}");
    }
    Ok(())
}

fn graph(args: GraphArgs) -> Result<()> {
    let (mut cfg, schema, dir) = args.stage1.load()?;
    if let Some(w) = args.weight {
        cfg.graph.weight = w;
    }
    if let Some(w) = args.min_weight {
        cfg.graph.min_weight = w;
    }
    let summaries = crate::stage1::graph::run(&cfg, &schema, &dir)?;
    println!(
        "{:<24} {:>8} {:>7} {:>7}",
        "document type", "queries", "nodes", "edges"
    );
    for s in &summaries {
        println!(
            "{:<24} {:>8} {:>7} {:>7}",
            s.document_type, s.queries, s.nodes, s.edges
        );
    }
    println!("graphs and summary in {}", dir.display());
    Ok(())
}

fn sample(args: SampleArgs, threads: usize, models_dir: &Path) -> Result<()> {
    let (mut cfg, _schema, dir) = args.stage1.load()?;
    if let Some(n) = args.per_type {
        cfg.sample.per_type = n;
    }
    if let Some(s) = args.seed {
        cfg.sample.seed = s;
    }
    cfg.validate()?;
    let llm = match args.paths_only {
        true => None,
        false => Some(load_llm(&args.engine, &args.server, threads, models_dir)?),
    };
    let (paths, n) = crate::stage1::sample::run(
        llm.as_ref(),
        &args.engine.model,
        &cfg.sample,
        &dir,
        !args.stage1.no_progress,
    )?;
    println!("{paths} paths -> {}", dir.join("paths.jsonl").display());
    if llm.is_some() {
        println!(
            "{n} new blueprints -> {}",
            dir.join("blueprints.jsonl").display()
        );
    }
    Ok(())
}

fn synth(args: SynthArgs, threads: usize, models_dir: &Path) -> Result<()> {
    use crate::stage2::{output, run::SynthJob};
    let mut cfg =
        crate::stage2::config::Stage2Config::load(args.run.config.as_deref(), &args.run.set)?;
    if !args.documents.is_empty() {
        cfg.documents.paths = args.documents.clone();
    }
    if args.merge {
        let dir = crate::layout::RunLayout::new(&args.run.run).stage2();
        let (pairs, stats) =
            output::merge(&dir, cfg.gates.near_duplicate_threshold, cfg.generate.seed)?;
        // The card names the model that made the pairs.
        let model = pairs
            .first()
            .map_or(args.engine.model.clone(), |p| p.metadata.model.clone());
        let path = output::finish(&dir, "", &pairs, &stats, &cfg, &model)?;
        println!("merged {} pairs -> {}", pairs.len(), path.display());
        return Ok(());
    }
    let blueprints = args
        .blueprints
        .clone()
        .unwrap_or_else(|| crate::stage2::run::default_blueprints(&args.run.run));
    if !blueprints.is_file() {
        // Before a model is loaded.
        bail!(
            "{}: no blueprints (run `wildlong sample` first, or pass --blueprints)",
            blueprints.display()
        );
    }
    let llm = load_llm(&args.engine, &args.server, threads, models_dir)?;
    let out = crate::stage2::run::run(&SynthJob {
        llm: &llm,
        model: args.engine.model.clone(),
        tokenizer: args.tokenizer.clone(),
        cfg: &cfg,
        run: args.run.run.clone(),
        blueprints,
        shard: args.shard,
        models_dir: models_dir.to_path_buf(),
        engine: args.engine.engine_config(threads)?,
    })?;
    println!(
        "{} documents, {} contexts; {} pairs -> {} ({} generated, {} from the store); rejected: {:?}",
        out.documents,
        out.contexts,
        out.pairs,
        out.data.display(),
        out.stats.generated,
        out.stats.reused,
        out.stats.rejected
    );
    if out.stats.generated > 0 {
        println!(
            "  {} contexts in {:.1} s: {:.2} pairs/min",
            out.stats.contexts,
            out.seconds,
            out.pairs as f64 * 60.0 / out.seconds
        );
    }
    Ok(())
}

fn pipeline(args: PipelineArgs, threads: usize, models_dir: &Path) -> Result<()> {
    let mut cfg = crate::pipeline::config::PipelineConfig::load(&args.config, &args.set)?;
    if threads > 0 {
        cfg.engine.threads = threads;
    }
    let t0 = std::time::Instant::now();
    let out = crate::pipeline::run(
        &cfg,
        &crate::pipeline::Options {
            models_dir: models_dir.to_path_buf(),
            progress: !args.no_progress,
            config_path: args.config.clone(),
        },
    )?;
    let ran = out.actions.iter().filter(|a| a.1 != "skipped").count();
    println!(
        "{ran} of {} steps run in {:.0} s; report: {} (+ report.svg)",
        out.actions.len(),
        t0.elapsed().as_secs_f64(),
        out.report.display()
    );
    Ok(())
}

fn fetch(model: &str, models_dir: &Path) -> Result<()> {
    if model == "default" {
        let m = models::default_manifest()?;
        let p = models::fetch_manifest(&m, models_dir)?;
        println!("{} ready at {} (sha256 verified)", m.name, p.display());
        return Ok(());
    }
    let files = models::resolve_hub(model)?;
    println!("{model} ready: {files:?}");
    Ok(())
}

/// One prompt of a batch file.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchLine {
    id: Option<serde_json::Value>,
    prompt: Option<String>,
    messages: Option<Vec<Message>>,
    max_tokens: Option<usize>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    top_k: Option<usize>,
    seed: Option<u64>,
}

struct Job {
    id: String,
    prompt_text: String,
    request: Request,
}

fn id_string(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn generate(args: GenerateArgs, threads: usize, models_dir: &Path) -> Result<()> {
    let schema = match &args.json_schema {
        Some(p) => {
            let text =
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            Some(
                serde_json::from_str::<serde_json::Value>(&text)
                    .with_context(|| format!("{}: invalid JSON", p.display()))?,
            )
        }
        None => None,
    };
    let base = GenerationParams {
        max_tokens: args.max_tokens,
        sampling: SamplingParams {
            temperature: args.temperature,
            top_k: args.top_k,
            top_p: args.top_p,
            seed: args.seed,
            repetition_penalty: args.repetition_penalty,
        },
        stop: args.stop.clone(),
        eos_token_ids: vec![],
        json_schema: schema,
        ignore_eos: false,
    };
    let lines: Vec<(String, BatchLine)> = match &args.batch_file {
        Some(path) => read_batch_file(path)?,
        None => vec![(
            "0".into(),
            BatchLine {
                id: None,
                prompt: args.prompt.clone(),
                messages: None,
                max_tokens: None,
                temperature: None,
                top_p: None,
                top_k: None,
                seed: None,
            },
        )],
    };
    let done_ids = match &args.output {
        Some(out) if out.exists() => completed_ids(out)?,
        _ => Default::default(),
    };
    let engine_config = args.engine.engine_config(threads)?;
    let engine = models::load_engine_with_adapter(
        &args.engine.model,
        args.adapter.as_deref(),
        models_dir,
        &engine_config,
    )?;
    let mut jobs = Vec::new();
    for (id, line) in lines {
        if done_ids.contains(&id) {
            continue;
        }
        let mut params = base.clone();
        params.max_tokens = line.max_tokens.unwrap_or(params.max_tokens);
        params.sampling.temperature = line.temperature.unwrap_or(params.sampling.temperature);
        params.sampling.top_p = line.top_p.or(params.sampling.top_p);
        params.sampling.top_k = line.top_k.or(params.sampling.top_k);
        params.sampling.seed = line.seed.unwrap_or(params.sampling.seed);
        let (prompt_text, prompt) = build_prompt(&engine, &args, line.prompt, line.messages)
            .with_context(|| format!("prompt `{id}`"))?;
        jobs.push(Job {
            id,
            prompt_text,
            request: Request { prompt, params },
        });
    }
    if jobs.is_empty() {
        eprintln!("nothing to do: every prompt already has a result in the output file");
        return Ok(());
    }
    let bar =
        (jobs.len() > 1).then(|| crate::records::progress_bar(true, jobs.len() as u64, "prompts"));
    let mut out: Box<dyn Write> = match &args.output {
        Some(p) => Box::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .with_context(|| format!("opening {}", p.display()))?,
        ),
        None => Box::new(std::io::stdout()),
    };
    let requests: Vec<Request> = jobs.iter().map(|j| j.request.clone()).collect();
    let single = jobs.len() == 1 && args.output.is_none() && args.batch_file.is_none();
    let mut write_err = None;
    engine.generate(&requests, |i, c: &Completion| {
        if let Some(b) = &bar {
            b.inc(1);
        }
        let r = if single {
            writeln!(out, "{}", c.text)
        } else {
            let rec = serde_json::json!({
                "id": jobs[i].id, "prompt": jobs[i].prompt_text, "completion": c.text,
                "finish_reason": c.finish_reason, "prompt_tokens": c.prompt_tokens, "completion_tokens": c.tokens.len(),
            });
            writeln!(out, "{rec}").and_then(|_| out.flush())
        };
        if let Err(e) = r {
            write_err.get_or_insert(e);
        }
    })?;
    if let Some(b) = bar {
        b.finish();
    }
    if let Some(e) = write_err {
        return Err(e).context("writing results");
    }
    Ok(())
}

fn build_prompt(
    engine: &Engine,
    args: &GenerateArgs,
    prompt: Option<String>,
    messages: Option<Vec<Message>>,
) -> Result<(String, Vec<u32>)> {
    let messages = match (messages, prompt) {
        (Some(m), None) => Some(m),
        (None, Some(p)) if args.chat => {
            let mut m = Vec::new();
            if let Some(s) = &args.system {
                m.push(Message::new("system", s.clone()));
            }
            m.push(Message::new("user", p));
            Some(m)
        }
        (None, Some(p)) => return Ok((p.clone(), engine.tokenizer.encode(&p, true)?)),
        (Some(_), Some(_)) => bail!("give either `prompt` or `messages`, not both"),
        (None, None) => bail!("needs `prompt` or `messages`"),
    };
    let messages = messages.unwrap_or_default();
    let text = messages
        .last()
        .map(|m| m.content.clone())
        .unwrap_or_default();
    Ok((text, engine.chat_prompt(&messages)?))
}

fn read_batch_file(path: &Path) -> Result<Vec<(String, BatchLine)>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut out = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let l: BatchLine = serde_json::from_str(line)
            .with_context(|| format!("{}:{}: invalid batch line", path.display(), n + 1))?;
        if l.prompt.is_none() && l.messages.is_none() {
            bail!("{}:{}: needs `prompt` or `messages`", path.display(), n + 1);
        }
        let id =
            l.id.as_ref()
                .map(id_string)
                .unwrap_or_else(|| (n + 1).to_string());
        if !seen.insert(id.clone()) {
            bail!("{}:{}: duplicate id `{id}`", path.display(), n + 1);
        }
        out.push((id, l));
    }
    if out.is_empty() {
        bail!("{}: no prompts", path.display());
    }
    Ok(out)
}

/// Ids already present in an append-only output file; a torn last line (killed run) is cut off.
fn completed_ids(path: &Path) -> Result<std::collections::HashSet<String>> {
    let lines: Vec<serde_json::Value> = crate::records::read_jsonl_resumable(path)?;
    Ok(lines
        .iter()
        .filter_map(|v| v.get("id").map(id_string))
        .collect())
}

fn train(args: TrainArgs, models_dir: &Path) -> Result<()> {
    use crate::train::plan::{available_cpu_memory_gib, fitting_settings, Plan};
    let cfg = crate::train::config::TrainConfig::load(args.run.config.as_deref(), &args.run.set)?;
    if args.plan {
        let shape = models::model_config(&cfg.model, models_dir)?;
        let plan = Plan::estimate(&shape, &cfg);
        let memory = match args.memory_gib {
            Some(m) => m,
            None => available_cpu_memory_gib()?,
        };
        print!("{}", plan.render(Some(memory)));
        println!("{}", serde_json::to_string(&plan)?);
        if plan.peak_gib() > memory {
            let fix = fitting_settings(&shape, &cfg, memory);
            if fix.is_empty() {
                bail!(
                    "the plan needs {:.2} GiB, more than the {memory:.2} GiB available, and no setting tried fits",
                    plan.peak_gib()
                );
            }
            bail!(
                "the plan needs {:.2} GiB, more than the {memory:.2} GiB available; these settings fit: {}",
                plan.peak_gib(),
                fix.iter().map(|s| format!("--set {s}")).collect::<Vec<_>>().join(" ")
            );
        }
        println!("fits: {:.2} of {memory:.2} GiB", plan.peak_gib());
        return Ok(());
    }
    let summary = crate::train::run::train(
        &cfg,
        &args.run.run,
        &crate::train::run::RunOptions {
            models_dir: models_dir.to_path_buf(),
            progress: !args.no_progress,
            stop_after: args.stop_after,
            device: args.device.clone(),
        },
    )?;
    println!("{}", serde_json::to_string_pretty(&summary)?);
    Ok(())
}
