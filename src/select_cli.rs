//! The selection subcommands of the `mira` command line (group, discover, label, distill,
//! reliability, select, run). Parsing only; the work is in `mira::select`.

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args;

use mira::corpus::{self, FieldNames};
use mira::select::discover::{self, DiscoverOptions};
use mira::select::distill::{self, DistillOptions};
use mira::select::features::FeatureChoice;
use mira::select::group::{self, GroupOptions};
use mira::select::label::{self, IngestOptions, LabelOptions};
use mira::select::reliability::{self, Thresholds};
use mira::select::retain::{self, SelectOptions};
use mira::select::run::{self, RunConfig};
use mira::select::teacher::{Teacher, TeacherConfig};
use mira::select::Groups;
use mira::{Device, Scorer};

fn progress() -> bool {
    std::io::stderr().is_terminal()
}

#[derive(Args, Clone)]
pub struct Fields {
    #[arg(long, default_value = "text")]
    text_field: String,
    #[arg(long, default_value = "id")]
    id_field: String,
    #[arg(long, default_value = "source")]
    source_field: String,
}

impl Fields {
    pub fn names(&self) -> FieldNames {
        corpus::TextFields {
            text: self.text_field.clone(),
            id: self.id_field.clone(),
            source: self.source_field.clone(),
        }
        .names()
    }
}

#[derive(Args)]
pub struct EncoderArgs {
    /// Encoder checkpoint folder for embeddings and students [default: all-MiniLM-L6-v2 as
    /// fetched by scripts/fetch_model.sh]
    #[arg(long, default_value = ".data/models/all-MiniLM-L6-v2")]
    encoder: PathBuf,
    /// auto, cpu, wgpu[:N], cuda[:N] or cuda:all
    #[arg(long, default_value = "auto")]
    device: Device,
}

impl EncoderArgs {
    fn load(&self) -> Result<Scorer> {
        let s = Scorer::load(&self.encoder, self.device)?;
        if let Some(note) = s.device_note() {
            eprintln!("{note}");
        }
        Ok(s)
    }
}

#[derive(Args)]
pub struct TeacherArgs {
    /// OpenAI-compatible base URL, up to /v1 (e.g. http://127.0.0.1:8080/v1)
    #[arg(long, env = "MIRA_TEACHER_URL")]
    teacher_url: String,
    /// Model name sent to the teacher
    #[arg(long, env = "MIRA_TEACHER_MODEL")]
    teacher_model: String,
    /// API key (sent as a Bearer token)
    #[arg(long, env = "OPENAI_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Requests in flight at once
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
    /// Retries per request on 429, 5xx, time-outs and dropped connections
    #[arg(long, default_value_t = 6)]
    max_retries: u32,
    /// Seconds before one request times out
    #[arg(long, default_value_t = 300.0)]
    timeout: f64,
    /// Response cache (a rerun pays nothing twice)
    #[arg(long, default_value = ".mira-cache/teacher")]
    cache_dir: PathBuf,
    /// Disable the response cache
    #[arg(long)]
    no_cache: bool,
    /// Price per million prompt tokens, for the cost in the summary
    #[arg(long, default_value_t = 0.0)]
    price_prompt: f64,
    /// Price per million completion tokens
    #[arg(long, default_value_t = 0.0)]
    price_completion: f64,
    /// Print what the step would ask (requests, how many are cached, estimated prompt tokens,
    /// completion tokens at most, cost at the prices given) and exit without asking
    #[arg(long)]
    estimate: bool,
}

impl TeacherArgs {
    fn teacher(&self) -> Result<Teacher> {
        let mut c = TeacherConfig::from_user(
            (&self.teacher_url, &self.teacher_model),
            self.api_key.clone(),
            (self.concurrency, self.timeout),
            (self.price_prompt, self.price_completion),
            [
                "--concurrency",
                "--timeout",
                "--price-prompt",
                "--price-completion",
            ],
        )?;
        c.max_retries = self.max_retries;
        c.cache_dir = (!self.no_cache).then(|| self.cache_dir.clone());
        c.progress = progress();
        Teacher::new(c)
    }
}

/// `--estimate`: print the estimate for `requests` as JSON.
fn print_estimate(
    teacher: &Teacher,
    requests: &[mira::select::teacher::ChatRequest],
) -> Result<()> {
    let e = mira::select::estimate::estimate(teacher, requests);
    println!("{}", serde_json::to_string_pretty(&e)?);
    Ok(())
}

#[derive(Args)]
pub struct GroupArgs {
    #[command(flatten)]
    encoder: EncoderArgs,
    /// Corpus files, directories or globs
    #[arg(long, required = true, num_args = 1..)]
    input: Vec<PathBuf>,
    /// groups.json to write (groups.md is written beside it)
    #[arg(long, default_value = "groups.json")]
    output: PathBuf,
    /// Number of groups [default: chosen by silhouette]
    #[arg(long)]
    k: Option<usize>,
    /// Largest k tried when choosing by silhouette
    #[arg(long, default_value_t = 8)]
    max_k: usize,
    /// Records embedded per source
    #[arg(long, default_value_t = 64)]
    per_source: usize,
    #[command(flatten)]
    fields: Fields,
}

pub fn group_cmd(a: GroupArgs) -> Result<()> {
    let scorer = a.encoder.load()?;
    let files = corpus::expand_inputs(&a.input)?;
    let opts = GroupOptions {
        k: a.k,
        max_k: a.max_k,
        per_source: a.per_source,
        fields: a.fields.names(),
        ..Default::default()
    };
    let g = group::group_sources(&scorer, &files, &opts)?;
    group::write(&g, &a.output)?;
    eprintln!(
        "{} sources in {} groups -> {}",
        g.groups.len(),
        g.k,
        a.output.display()
    );
    println!("{}", serde_json::to_string_pretty(&g.members)?);
    Ok(())
}

#[derive(Args)]
pub struct DiscoverArgs {
    #[command(flatten)]
    encoder: EncoderArgs,
    #[command(flatten)]
    teacher: TeacherArgs,
    #[arg(long, required = true, num_args = 1..)]
    input: Vec<PathBuf>,
    #[arg(long, default_value = "groups.json")]
    groups: PathBuf,
    /// Folder for rubrics/<group>.jsonl (and the raw judgments beside them)
    #[arg(long, default_value = "rubrics")]
    output_dir: PathBuf,
    /// Records the teacher judges per group
    #[arg(long, default_value_t = 32)]
    records_per_group: usize,
    /// Anchors per group
    #[arg(long, default_value_t = 15)]
    anchors: usize,
    #[command(flatten)]
    fields: Fields,
}

pub fn discover_cmd(a: DiscoverArgs) -> Result<()> {
    let teacher = a.teacher.teacher()?;
    let groups = Groups::load(&a.groups)?;
    let files = corpus::expand_inputs(&a.input)?;
    let opts = DiscoverOptions {
        records_per_group: a.records_per_group,
        anchors: a.anchors,
        fields: a.fields.names(),
        ..Default::default()
    };
    if a.teacher.estimate {
        return print_estimate(&teacher, &discover::requests(&files, &groups, &opts)?);
    }
    let scorer = a.encoder.load()?;
    let s = discover::discover(&teacher, &scorer, &files, &groups, &a.output_dir, &opts)?;
    println!("{}", serde_json::to_string_pretty(&s)?);
    Ok(())
}

#[derive(Args)]
pub struct LabelArgs {
    /// Corpus to sample and send to the teacher
    #[arg(long, num_args = 1.., required_unless_present = "ingest", conflicts_with = "ingest")]
    input: Vec<PathBuf>,
    /// Instead of asking a teacher, read labels produced elsewhere: datatrove inference output
    /// (metadata.rollout_results) or score-column files (score, int_score, label); JSONL or
    /// Parquet
    #[arg(long, num_args = 1..)]
    ingest: Vec<PathBuf>,
    /// groups.json (optional with --ingest: without it every record is in group `all`)
    #[arg(long)]
    groups: Option<PathBuf>,
    /// Rubrics folder from `mira discover`
    #[arg(long, default_value = "rubrics")]
    rubrics: PathBuf,
    /// labels.jsonl to write
    #[arg(long, default_value = "labels.jsonl")]
    output: PathBuf,
    #[arg(long, default_value_t = 200)]
    records_per_group: usize,
    /// Share of records in the validation split
    #[arg(long, default_value_t = 0.2)]
    validation_fraction: f64,
    /// How the teacher's replies become scores: `reply` (one request per record, a rationale and
    /// a 0-10 score per anchor) or `probabilities` (one request per anchor, the expected 1-5
    /// digit under the teacher's top_logprobs, mapped to 0-10)
    #[arg(long, default_value = "reply")]
    scoring: String,
    /// --ingest format: auto, datatrove or score-columns
    #[arg(long, default_value = "auto")]
    label_format: String,
    /// --ingest score columns, in order of preference
    #[arg(long, num_args = 1.., default_values = ["score", "int_score", "label"])]
    label_column: Vec<String>,
    /// --ingest: make every present label column an anchor (not only the first)
    #[arg(long)]
    all_columns: bool,
    /// --ingest: allowed label range MIN,MAX (labels outside are an error)
    #[arg(long, default_value = "0,10")]
    label_range: String,
    #[command(flatten)]
    fields: Fields,
    #[command(flatten)]
    teacher: Option<TeacherArgs>,
}

pub fn label_cmd(a: LabelArgs) -> Result<()> {
    mira::checked::in_range(
        "--validation-fraction",
        a.validation_fraction,
        0.0,
        1.0,
        true,
        true,
    )?;
    let groups = a.groups.as_ref().map(|p| Groups::load(p)).transpose()?;
    if !a.ingest.is_empty() {
        let range: Vec<f64> = a
            .label_range
            .split(',')
            .map(|v| v.trim().parse::<f64>())
            .collect::<Result<_, _>>()
            .map_err(|e| anyhow::anyhow!("--label-range '{}': {e}", a.label_range))?;
        if range.len() != 2 || !range.iter().all(|v| v.is_finite()) || range[0] >= range[1] {
            bail!(
                "--label-range '{}' must be MIN,MAX with MIN < MAX",
                a.label_range
            );
        }
        let opts = IngestOptions {
            format: a.label_format.parse()?,
            columns: a.label_column.clone(),
            all_columns: a.all_columns,
            range: (range[0], range[1]),
            validation_fraction: a.validation_fraction,
            fields: a.fields.names(),
        };
        let rows = label::ingest(&corpus::expand_inputs(&a.ingest)?, groups.as_ref(), &opts)?;
        label::write_labels(&a.output, &rows)?;
        eprintln!("{} label rows -> {}", rows.len(), a.output.display());
        return Ok(());
    }
    let Some(groups) = groups else {
        bail!("labelling with a teacher needs --groups (from `mira group`)");
    };
    let Some(t) = &a.teacher else {
        bail!("labelling needs a teacher (--teacher-url, --teacher-model) or --ingest");
    };
    let teacher = t.teacher()?;
    let opts = LabelOptions {
        records_per_group: a.records_per_group,
        validation_fraction: a.validation_fraction,
        fields: a.fields.names(),
        scoring: a.scoring.parse()?,
        ..Default::default()
    };
    let files = corpus::expand_inputs(&a.input)?;
    if t.estimate {
        return print_estimate(
            &teacher,
            &label::requests(&files, &groups, &a.rubrics, &opts)?,
        );
    }
    let s = label::label(&teacher, &files, &groups, &a.rubrics, &a.output, &opts)?;
    println!("{}", serde_json::to_string_pretty(&s)?);
    Ok(())
}

#[derive(Args)]
pub struct DistillArgs {
    #[command(flatten)]
    encoder: EncoderArgs,
    #[arg(long, default_value = "labels.jsonl")]
    labels: PathBuf,
    /// Folder for students/<group>/ and validation.json / validation.md
    #[arg(long, default_value = "students")]
    output_dir: PathBuf,
    /// What each student's head reads: auto (per group, lowest validation MAE), pooler
    /// (a BertForSequenceClassification student), cls or mean (a sentence-transformers
    /// student with a Dense head)
    #[arg(long, default_value = "auto")]
    feature: FeatureChoice,
    /// Tokens of a document each student reads, special tokens included: its head is fitted at
    /// this truncation and its folder says so [default: the encoder's max_position_embeddings,
    /// which transformers' pipeline and AutoTokenizer defaults also reach]
    #[arg(long)]
    max_tokens: Option<usize>,
}

pub fn distill_cmd(a: DistillArgs) -> Result<()> {
    let scorer = a.encoder.load()?;
    let rows = label::read_labels(&a.labels)?;
    let opts = DistillOptions {
        feature: a.feature,
        max_tokens: a.max_tokens,
        ..DistillOptions::default()
    };
    let v = distill::distill(&scorer, &rows, &a.output_dir, &opts)?;
    println!("{}", serde_json::to_string_pretty(&v.students)?);
    eprintln!("report: {}", a.output_dir.join("validation.md").display());
    Ok(())
}

#[derive(Args)]
pub struct ReliabilityArgs {
    /// validation.json from `mira distill`
    #[arg(long, default_value = "students/validation.json")]
    validation: PathBuf,
    #[arg(long, default_value = "reliability.json")]
    output: PathBuf,
    /// Mask cells whose validation MAE is above this (labels' scale)
    #[arg(long, default_value_t = Thresholds::default().max_mae)]
    max_mae: f64,
    /// Mask cells whose validation Spearman is below this
    #[arg(long, default_value_t = Thresholds::default().min_spearman)]
    min_spearman: f64,
    /// Mask cells with fewer validation records than this
    #[arg(long, default_value_t = Thresholds::default().min_count)]
    min_count: usize,
}

pub fn reliability_cmd(a: ReliabilityArgs) -> Result<()> {
    mira::checked::non_negative("--max-mae", a.max_mae)?;
    mira::checked::in_range("--min-spearman", a.min_spearman, -1.0, 1.0, false, false)?;
    let v = distill::read_validation(&a.validation)?;
    let t = Thresholds {
        max_mae: a.max_mae,
        min_spearman: a.min_spearman,
        min_count: a.min_count,
    };
    let r = reliability::mask(&v, &t);
    reliability::write(&r, &a.output)?;
    let masked = r.cells.iter().filter(|c| c.masked).count();
    eprintln!(
        "{masked} of {} (source, anchor) cells masked -> {}",
        r.cells.len(),
        a.output.display()
    );
    println!("{}", serde_json::to_string_pretty(&r.unmasked)?);
    Ok(())
}

#[derive(Args)]
pub struct SelectArgs {
    #[arg(long, required = true, num_args = 1..)]
    input: Vec<PathBuf>,
    #[arg(long, default_value = "groups.json")]
    groups: PathBuf,
    /// Students folder from `mira distill`
    #[arg(long, default_value = "students")]
    students: PathBuf,
    #[arg(long, default_value = "reliability.json")]
    reliability: PathBuf,
    /// Output folder: kept/ (the selected corpus, same format as the input), scores/,
    /// report.md, report/*.svg, selection.json
    #[arg(long)]
    output_dir: PathBuf,
    /// Share of tokens to keep
    #[arg(long, default_value_t = 0.5)]
    budget: f64,
    /// Where the cutoff is computed: group, global or source
    #[arg(long, default_value = "group")]
    cutoff: String,
    /// Fraction of anchor scores trimmed from each end before averaging
    #[arg(long, default_value_t = 0.1)]
    trim: f64,
    /// Records of sources in no group: error, keep or drop
    #[arg(long, default_value = "error")]
    unknown_source: String,
    /// auto, cpu, wgpu[:N], cuda[:N] or cuda:all
    #[arg(long, default_value = "auto")]
    device: Device,
    /// Precision: auto, f32, f16, bf16 or int8 (CPU only), as for `mira score`
    #[arg(long, default_value = "auto")]
    precision: mira::engine::Precision,
    /// Token budget of one packed batch [default: the device's]
    #[arg(long)]
    batch_tokens: Option<usize>,
    /// Worker threads for the CPU backend and tokenization [default: all cores]
    #[arg(long)]
    threads: Option<usize>,
    /// Which pass to run: all (one process), or score and keep (per rank), cutoff and report
    /// (once, after every rank's previous pass) for a sharded selection
    #[arg(long, default_value = "all")]
    pass: retain::Pass,
    /// This worker's index among --world-size workers (score and keep passes)
    /// [default: $SLURM_ARRAY_TASK_ID - $SLURM_ARRAY_TASK_MIN, else 0]
    #[arg(long)]
    rank: Option<usize>,
    /// Number of workers sharing the inputs [default: $SLURM_ARRAY_TASK_COUNT, else 1]
    #[arg(long)]
    world_size: Option<usize>,
    #[command(flatten)]
    fields: Fields,
}

pub fn select_cmd(a: SelectArgs) -> Result<()> {
    let shard = crate::sharding(a.rank, a.world_size)?;
    crate::set_threads(a.threads)?;
    let groups = Groups::load(&a.groups)?;
    let rel = reliability::Reliability::load(&a.reliability)?;
    let files = corpus::expand_inputs_excluding(&a.input, std::slice::from_ref(&a.output_dir))?;
    let opts = SelectOptions {
        budget: a.budget,
        cutoff: a.cutoff.parse()?,
        trim: a.trim,
        unknown: a.unknown_source.parse()?,
        fields: a.fields.names(),
        device: a.device,
        load: mira::LoadOptions {
            precision: a.precision,
            packer: a.batch_tokens.map(|n| mira::Packer {
                max_batch_tokens: n,
                ..Default::default()
            }),
            ..Default::default()
        },
        shard,
        progress: progress(),
        ..Default::default()
    };
    let sel = retain::run_pass(
        a.pass,
        &files,
        &groups,
        &a.students,
        &rel,
        &a.output_dir,
        &opts,
    )?;
    match sel {
        Some(sel) => {
            println!(
                "{}",
                serde_json::to_string_pretty(&retain::summary_json(&sel))?
            );
            eprintln!("report: {}", a.output_dir.join("report.md").display());
        }
        None => eprintln!(
            "select: {:?} pass done (rank {} of {})",
            a.pass, shard.0, shard.1
        ),
    }
    Ok(())
}

#[derive(Args)]
pub struct RunArgs {
    /// The run's TOML config (see configs/sample-run.toml)
    config: PathBuf,
}

pub fn run_cmd(a: RunArgs) -> Result<()> {
    let cfg = RunConfig::load(&a.config)?;
    let sel = run::run(&cfg, progress())?;
    println!(
        "{}",
        serde_json::to_string_pretty(&retain::summary_json(&sel))?
    );
    Ok(())
}
