//! The `mira` command line. It parses arguments and calls library functions; nothing more.

/// mimalloc keeps freed pages for reuse: with the system allocator every op's output (up to
/// tens of MB) came back from the kernel zeroed, 1.4M page faults and 14% of a CPU run's time
/// (BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};

use mira::corpus::{self, FieldNames};
use mira::engine::Precision;
use mira::pipeline::{self, Format, JobOptions, Output, Task};
use mira::{bench, engine, fidelity, Device, LoadOptions, Packer, Scorer};

mod select_cli;

#[derive(Parser)]
#[command(
    name = "mira",
    version,
    about = "Fast model-based data selection for LLM mid-training"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Write one pooled embedding per input record: {"id", "embedding": [...]}
    Embed(JobArgs),
    /// Write the classifier's scores per input record: {"id", "scores": {"<label>": x}}
    Score(JobArgs),
    /// Measure engine throughput (tokens/s, docs/s, batch latency)
    Bench(BenchArgs),
    /// List the backends and adapters available here
    Devices,
    /// MIRA 1: group sources by content (per-source mean embeddings, k-means) -> groups.json
    Group(select_cli::GroupArgs),
    /// MIRA 2: a teacher judges samples free-form; clustered judgments become rubric anchors
    Discover(select_cli::DiscoverArgs),
    /// MIRA 3: teacher scores per anchor (or ingest labels made elsewhere) -> labels.jsonl
    Label(select_cli::LabelArgs),
    /// MIRA 4: a student per group (frozen encoder + ridge head) and its validation report
    Distill(select_cli::DistillArgs),
    /// MIRA 5: mask (source, anchor) cells whose validation MAE/Spearman miss thresholds
    Reliability(select_cli::ReliabilityArgs),
    /// MIRA 6: score the corpus with the students and keep a token budget, with a report
    Select(select_cli::SelectArgs),
    /// All MIRA steps from one TOML config, resumable step by step
    Run(select_cli::RunArgs),
}

#[derive(Args)]
struct ModelArgs {
    /// Hugging Face checkpoint folder (config.json, model.safetensors, tokenizer.json)
    #[arg(long)]
    model: PathBuf,
    /// Truncation limit in tokens, special tokens included [default: the checkpoint's]
    #[arg(long)]
    max_tokens: Option<usize>,
    /// auto, cpu, wgpu[:N], cuda[:N] or cuda:all
    #[arg(long, default_value = "auto")]
    device: Device,
    /// Token budget of one packed batch [default: the device's, 4096 on CPU]
    #[arg(long)]
    batch_tokens: Option<usize>,
    /// Precision: auto (GPUs: f16 where the device has it, as every CUDA device does, else f32;
    /// CPU: f32), f32, f16, bf16 (CUDA sm_80+, for models whose activations overflow f16; the
    /// CPU) or int8 (CPU only: encoder linear layers with int8 weights, a scale per channel and
    /// 64 inputs, 8-bit activations with a scale and zero per token and 64 inputs, exact i32 sums
    /// per group). GPUs store f16/bf16 and sum in f32. On the CPU, bf16 runs `vdpbf16ps` (bf16
    /// products, f32 sums) where the CPU has AVX512_BF16 and is emulated elsewhere, as f16
    /// always is (weights rounded, f32 arithmetic; stderr says so). Check a precision on your
    /// data with `mira bench --precision P --against f32`
    #[arg(long, default_value = "auto")]
    precision: Precision,
    /// CUDA only: run batches of at most this many tokens as CUDA graphs once their shape
    /// (tokens, documents) repeats, one launch instead of ~10 per layer, for latency-bound small
    /// batches; 0 turns graphs off
    #[arg(long, default_value_t = mira::scorer::DEFAULT_CUDA_GRAPH_TOKENS, value_name = "TOKENS")]
    cuda_graphs: usize,
    /// Worker threads for the CPU backend and tokenization [default: all cores]
    #[arg(long)]
    threads: Option<usize>,
    /// For a PyTorchModelHubMixin classifier (NeMo Curator's: config.json with base_model): the
    /// base model's folder, with its config.json and tokenizer.json [default: base_model as a
    /// local path, else in the local Hugging Face cache]
    #[arg(long, value_name = "DIR")]
    base_model: Option<PathBuf>,
}

#[derive(Args)]
struct JobArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Input files (.jsonl/.json/.ndjson, optionally .gz or .zst), directories (read
    /// recursively) or glob patterns; one output line per record, in this order
    #[arg(long, required = true, num_args = 1..)]
    input: Vec<PathBuf>,
    /// One output JSONL file for all inputs (`-` for stdout); written atomically
    #[arg(
        long,
        required_unless_present = "output_dir",
        conflicts_with = "output_dir"
    )]
    output: Option<PathBuf>,
    /// One output per input file under this directory (mirroring the inputs' relative paths),
    /// each with a `.done` marker; a rerun skips finished files, so a killed job resumes
    #[arg(long)]
    output_dir: Option<PathBuf>,
    /// This worker's index among --world-size workers; it takes files[rank::world_size]
    /// [default: $SLURM_ARRAY_TASK_ID - $SLURM_ARRAY_TASK_MIN, else 0]
    #[arg(long)]
    rank: Option<usize>,
    /// Number of workers sharing the inputs [default: $SLURM_ARRAY_TASK_COUNT, else 1]
    #[arg(long)]
    world_size: Option<usize>,
    #[command(flatten)]
    fields: select_cli::Fields,
    /// Output rows: `jsonl` (id, source, scores or embedding), `parquet` (id, source, error and a
    /// float32 column per label, or an embedding list column) or `dolma` (attribute side-cars
    /// under <output-dir>/attributes/<experiment>/, for `dolma mix`; needs --experiment)
    /// [default: parquet when --output ends in .parquet, else jsonl]
    #[arg(long, value_parser = ["jsonl", "parquet", "dolma"])]
    format: Option<String>,
    /// dolma experiment name (attribute keys are <experiment>__<model>__<label>)
    #[arg(long, required_if_eq("format", "dolma"))]
    experiment: Option<String>,
    /// Model name in dolma attribute keys [default: the model folder's name]
    #[arg(long)]
    model_name: Option<String>,
    /// Copy every field of each JSON Lines input record into its output row (the results are
    /// added as `scores`/`embedding`/`error`, replacing fields of those names)
    #[arg(long)]
    keep_input: bool,
    /// Compression of per-file JSON Lines outputs (--output-dir): keep (as each input: .jsonl.gz
    /// in, .jsonl.gz out), none, gzip or zstd; a single --output is compressed by its name
    #[arg(long, default_value = "keep")]
    compression: corpus::OutputCompression,
    /// Stop at the first unusable record instead of writing it with an `error` field
    #[arg(long)]
    strict: bool,
    /// Write the job summary as JSON to this file
    #[arg(long)]
    stats: Option<PathBuf>,
}

#[derive(Args)]
struct BenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// JSONL corpus to benchmark on [default: synthetic documents with a realistic length mix]
    #[arg(long)]
    input: Option<PathBuf>,
    #[arg(long, default_value = "text")]
    text_field: String,
    /// Synthetic documents when no --input is given
    #[arg(long, default_value_t = 2000)]
    docs: usize,
    /// Give every synthetic document exactly this many tokens (for cost-versus-length curves)
    /// instead of the default log-normal length mix
    #[arg(long)]
    length: Option<usize>,
    /// Timed passes over the input (the best is reported)
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// Print one JSON object instead of text
    #[arg(long)]
    json: bool,
    /// Fidelity guard: also run the model at this precision (f32, say) on the same documents,
    /// report how far --precision lands from it (embedding cosine, per-label error and Spearman,
    /// overlap of a 50% token-budget selection) and both throughputs, and exit with status 1
    /// when a threshold is missed
    #[arg(long, value_name = "PRECISION")]
    against: Option<Precision>,
    /// Guard threshold: the lowest embedding cosine to the --against run any document may have
    #[arg(long, default_value_t = fidelity::Guard::default().min_cosine, requires = "against")]
    min_cosine: f64,
    /// Guard threshold: the largest difference of any label, as a share of that label's range
    /// over the documents in the --against run
    #[arg(long, default_value_t = fidelity::Guard::default().max_share_of_range, requires = "against")]
    max_label_error: f64,
    /// Guard threshold: the smallest share of the --against run's kept tokens that a 50%
    /// token-budget selection must also keep
    #[arg(long, default_value_t = fidelity::Guard::default().min_selection_overlap, requires = "against")]
    min_overlap: f64,
}

fn main() {
    if let Err(e) = run(Cli::parse()) {
        // `mira score ... --output - | head`: the reader left; that is how a pipeline ends,
        // not an error.
        if is_broken_pipe(&e) {
            std::process::exit(0);
        }
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// Whether an error comes from writing into a pipe whose reader has gone.
fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
            // Parquet and Arrow wrap the I/O error in their own types.
            || cause.to_string().contains("Broken pipe (os error 32)")
    })
}

/// `--threads`: the size of the global worker pool (CPU backend and tokenization).
fn set_threads(threads: Option<usize>) -> Result<()> {
    if let Some(n) = threads {
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global()
            .context("cannot set threads")?;
    }
    Ok(())
}

fn load(args: &ModelArgs) -> Result<Scorer> {
    set_threads(args.threads)?;
    load_at(args, args.precision)
}

/// Load the model at a given precision (the worker pool is already set up).
fn load_at(args: &ModelArgs, precision: Precision) -> Result<Scorer> {
    let packer = args.batch_tokens.map(|n| Packer {
        max_batch_tokens: n,
        ..Packer::default()
    });
    let scorer = Scorer::load_with(
        &args.model,
        args.device,
        LoadOptions {
            max_tokens: args.max_tokens,
            packer,
            precision,
            cuda_graph_tokens: args.cuda_graphs,
            base_model: args.base_model.clone(),
        },
    )?;
    if let Some(note) = scorer.device_note() {
        eprintln!("{note}");
    }
    // (Only for a value other than the default, which every run has.)
    let asked = args.cuda_graphs > 0 && args.cuda_graphs != mira::scorer::DEFAULT_CUDA_GRAPH_TOKENS;
    if asked && !scorer.device_name().starts_with("cuda:") {
        eprintln!(
            "note: --cuda-graphs applies to CUDA only; it has no effect on {}",
            scorer.device_name()
        );
    }
    Ok(scorer)
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Embed(a) => job(a, Task::Embed),
        Command::Score(a) => job(a, Task::Score),
        Command::Bench(a) => bench_cmd(a),
        Command::Group(a) => select_cli::group_cmd(a),
        Command::Discover(a) => select_cli::discover_cmd(a),
        Command::Label(a) => select_cli::label_cmd(a),
        Command::Distill(a) => select_cli::distill_cmd(a),
        Command::Reliability(a) => select_cli::reliability_cmd(a),
        Command::Select(a) => select_cli::select_cmd(a),
        Command::Run(a) => select_cli::run_cmd(a),
        Command::Devices => {
            for (name, status) in engine::list_devices() {
                println!("{name:6} {status}");
            }
            Ok(())
        }
    }
}

// Long: turns the score/embed flags into a job in the order they are documented; each flag is a
// line or two.
fn job(a: JobArgs, task: Task) -> Result<()> {
    let (rank, world_size) = sharding(a.rank, a.world_size)?;
    if world_size > 1 && a.output_dir.is_none() {
        bail!("sharding over {world_size} workers needs --output-dir (one output per input file)");
    }
    // The format follows the output's extension unless --format says otherwise.
    let format_name = a.format.clone().unwrap_or_else(|| {
        let parquet = a
            .output
            .as_ref()
            .is_some_and(|o| o.to_string_lossy().ends_with(".parquet"));
        if parquet { "parquet" } else { "jsonl" }.to_string()
    });
    let format = match format_name.as_str() {
        "dolma" => Format::Dolma {
            experiment: match a.experiment.clone() {
                Some(e) if !e.is_empty() && !e.contains(['/', '\\']) && e != ".." => e,
                Some(e) => bail!("--experiment '{e}' must be a plain name (it becomes a folder)"),
                None => bail!("--format dolma needs --experiment"),
            },
            model: a.model_name.clone().unwrap_or_else(|| {
                a.model
                    .model
                    .file_name()
                    .map_or("model".into(), |n| n.to_string_lossy().into_owned())
            }),
        },
        "parquet" => Format::Parquet,
        _ => Format::Jsonl,
    };
    // Outputs are never read back as inputs, nor written over them (`corpus::output`). dolma
    // side-cars go to ROOT/attributes/<experiment>, beside ROOT/documents.
    let output_dirs: Vec<PathBuf> = match (&format, &a.output_dir) {
        (Format::Dolma { experiment, .. }, Some(root)) => {
            vec![root.join("attributes").join(experiment)]
        }
        (_, dir) => dir.iter().cloned().collect(),
    };
    let inputs = corpus::shard(
        corpus::expand_inputs_excluding(&a.input, &output_dirs)?,
        rank,
        world_size,
    )?;
    let scorer = load(&a.model)?;
    let opts = JobOptions {
        format,
        fields: FieldNames {
            keep_input: a.keep_input,
            ..a.fields.names()
        },
        strict: a.strict,
        compression: a.compression,
        progress: std::io::stderr().is_terminal(),
        ..JobOptions::default()
    };
    let output = match (&a.output, &a.output_dir) {
        (_, Some(dir)) => Output::PerFile(dir.clone()),
        (Some(file), None) => Output::File(file.clone()),
        (None, None) => unreachable!("clap requires one of --output and --output-dir"),
    };
    let summary = pipeline::run_job(&scorer, task, &inputs, &output, &opts)?;
    let text = serde_json::to_string_pretty(&summary)?;
    if let Some(path) = &a.stats {
        corpus::write_atomic(path, text.as_bytes())?;
    }
    if summary.files_skipped > 0 {
        eprintln!(
            "{} of {} files already done, skipped",
            summary.files_skipped, summary.files
        );
    }
    eprintln!(
        "{} records ({} ok, {} with errors) in {:.2}s on {}: {:.1} docs/s, {:.0} tokens/s",
        summary.records,
        summary.ok,
        summary.records - summary.ok,
        summary.seconds,
        scorer.device_name(),
        summary.docs_per_s,
        summary.tokens_per_s
    );
    for (kind, n) in &summary.errors {
        eprintln!("  {kind}: {n}");
    }
    Ok(())
}

/// `--rank`/`--world-size`, defaulting to the SLURM array variables.
fn sharding(rank: Option<usize>, world_size: Option<usize>) -> Result<(usize, usize)> {
    let env = |name: &str| -> Result<Option<usize>> {
        match std::env::var(name) {
            Ok(v) => v
                .parse()
                .map(Some)
                .with_context(|| format!("{name}={v} is not a number")),
            Err(_) => Ok(None),
        }
    };
    let world_size = match world_size {
        Some(w) => w,
        None => env("SLURM_ARRAY_TASK_COUNT")?.unwrap_or(1),
    };
    let rank = match rank {
        Some(r) => r,
        None => match env("SLURM_ARRAY_TASK_ID")? {
            Some(id) => id
                .checked_sub(env("SLURM_ARRAY_TASK_MIN")?.unwrap_or(0))
                .context("SLURM_ARRAY_TASK_ID is below SLURM_ARRAY_TASK_MIN")?,
            None => 0,
        },
    };
    if world_size == 0 || rank >= world_size {
        bail!("--rank {rank} must be below --world-size {world_size}");
    }
    Ok((rank, world_size))
}

fn bench_cmd(a: BenchArgs) -> Result<()> {
    let scorer = load(&a.model)?;
    let (ids, input, tok_rate) = bench_input(&a, &scorer)?;
    let mut report = bench::run(&scorer, &ids, a.repeat, &input)?;
    report.tokenize_docs_per_s = tok_rate;
    let Some(against) = a.against else {
        if a.json {
            println!("{}", serde_json::to_string(&report)?);
        } else {
            print_bench(&report);
        }
        return Ok(());
    };
    let reference = load_at(&a.model, against)?;
    let ref_report = bench::run(&reference, &ids, a.repeat, &input)?;
    let names = (a.model.precision.to_string(), against.to_string());
    let fid = fidelity::compare(
        &scorer,
        &reference,
        &ids,
        (&names.0, &names.1),
        fidelity::Guard {
            min_cosine: a.min_cosine,
            max_share_of_range: a.max_label_error,
            min_selection_overlap: a.min_overlap,
        },
    )?;
    if a.json {
        let all = serde_json::json!({"bench": report, "against": ref_report, "fidelity": fid});
        println!("{all}");
    } else {
        print_bench(&report);
        println!("\nagainst    --precision {against}: {}", ref_report.device);
        println!(
            "throughput {:.0} tokens/s, {:.1} docs/s: {} runs {:.2}x as fast",
            ref_report.tokens_per_s,
            ref_report.docs_per_s,
            names.0,
            report.tokens_per_s / ref_report.tokens_per_s
        );
        print_fidelity(&fid);
    }
    if !fid.passed() {
        bail!(
            "precision {} misses the fidelity guard against {}: {}",
            names.0,
            names.1,
            fid.failures.join("; ")
        );
    }
    Ok(())
}

/// The token ids `mira bench` runs: the input file's texts, or synthetic documents; a name for
/// them; and the tokenizer's docs/s when there was text.
fn bench_input(a: &BenchArgs, scorer: &Scorer) -> Result<(Vec<Vec<u32>>, String, Option<f64>)> {
    Ok(match &a.input {
        Some(path) => {
            let fields = FieldNames {
                text: a.text_field.clone(),
                ..FieldNames::default()
            };
            let mut texts = Vec::new();
            for rec in corpus::open_input(path, &fields)? {
                if let Ok(t) = rec?.text {
                    texts.push(t);
                }
            }
            let t = std::time::Instant::now();
            let ids = scorer.tokenize(&texts)?;
            let rate = texts.len() as f64 / t.elapsed().as_secs_f64();
            (ids, path.display().to_string(), Some(rate))
        }
        None => {
            let docs =
                bench::synthetic_docs(a.docs, scorer.max_tokens(), scorer.vocab_size(), a.length)?;
            let what = match a.length {
                Some(n) => format!("synthetic ({} docs of {n} tokens)", a.docs),
                None => format!("synthetic ({} docs, log-normal lengths)", a.docs),
            };
            (docs, what, None)
        }
    })
}

fn print_bench(report: &bench::BenchReport) {
    println!("model      {}", report.model);
    println!("device     {}", report.device);
    println!(
        "input      {} ({} docs, {} tokens, max {} tokens/doc)",
        report.input, report.docs, report.tokens, report.max_tokens
    );
    println!(
        "batches    {} (budget {} tokens), best of {}",
        report.batches, report.batch_tokens, report.repeat
    );
    println!(
        "throughput {:.0} tokens/s, {:.1} docs/s ({:.3}s)",
        report.tokens_per_s, report.docs_per_s, report.seconds
    );
    println!(
        "latency    p50 {:.1} ms, p99 {:.1} ms per batch",
        report.batch_p50_ms, report.batch_p99_ms
    );
    if let Some(g) = report.cuda_graphs.filter(|g| *g != Default::default()) {
        println!(
            "graphs     {} recorded, {} forward passes replayed, {} batches op by op",
            g.recorded, g.replayed, g.direct
        );
    }
    println!(
        "compute    {:.1} MFLOP/token, {:.3} TFLOP/s achieved (model FLOPs, no padding)",
        report.model_flops_per_token / 1e6,
        report.tflops_per_s
    );
    if let Some(r) = report.tokenize_docs_per_s {
        println!("tokenize   {r:.0} docs/s (not included above)");
    }
}

fn print_fidelity(f: &fidelity::FidelityReport) {
    let e = &f.embedding;
    println!(
        "\nfidelity   {} against {} on {} docs ({} tokens)",
        f.precision, f.against, f.docs, f.tokens
    );
    println!(
        "embedding  cosine min {:.6}, p1 {:.6}, mean {:.6}; max abs {:.3e}",
        e.cosine_min, e.cosine_p1, e.cosine_mean, e.max_abs
    );
    for l in &f.labels {
        let rho = l.spearman.map_or("n/a".into(), |r| format!("{r:.5}"));
        println!(
            "label      {}: max abs {:.3e} ({:.3}% of its range), Spearman {rho}",
            l.label,
            l.max_abs,
            100.0 * l.share_of_range
        );
    }
    if let Some(o) = f.selection_overlap {
        println!(
            "selection  a 50% token budget keeps {:.2}% of the reference's tokens",
            100.0 * o
        );
    }
    println!(
        "guard      {}",
        if f.passed() {
            "passed".to_string()
        } else {
            format!("FAILED: {}", f.failures.join("; "))
        }
    );
}
