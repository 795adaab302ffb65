//! The WGSL sources in `shaders/`, embedded at build time, and how a pipeline's source is put
//! together: a type header (f32 or f16 storage), `common.wgsl`, the op's file, and for attention
//! the head size and key-tile constants and the relative terms (none, or attention_rel.wgsl's).

/// One compute shader per engine op.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    Matmul,
    Embed,
    LayerNorm,
    Attention,
    /// DeBERTa's: attention.wgsl with attention_rel.wgsl's relative-position terms.
    AttentionDisentangled,
    Rope,
    Geglu,
    Pool,
}

pub const COMMON: &str = include_str!("../../../../shaders/common.wgsl");

impl Op {
    pub const ALL: [Op; 8] = [
        Op::Matmul,
        Op::Embed,
        Op::LayerNorm,
        Op::Attention,
        Op::AttentionDisentangled,
        Op::Rope,
        Op::Geglu,
        Op::Pool,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Op::Matmul => "matmul",
            Op::Embed => "embed",
            Op::LayerNorm => "layernorm",
            Op::Attention => "attention",
            Op::AttentionDisentangled => "attention_disentangled",
            Op::Rope => "rope",
            Op::Geglu => "geglu",
            Op::Pool => "pool",
        }
    }

    /// The name of the op's own file in shaders/.
    pub fn file_name(self) -> &'static str {
        match self {
            Op::Matmul => "matmul.wgsl",
            Op::Embed => "embed.wgsl",
            Op::LayerNorm => "layernorm.wgsl",
            Op::Attention | Op::AttentionDisentangled => "attention.wgsl",
            Op::Rope => "rope.wgsl",
            Op::Geglu => "geglu.wgsl",
            Op::Pool => "pool.wgsl",
        }
    }

    /// A second file the op's source appends (name and text): the disentangled attention's
    /// relative terms.
    pub fn part(self) -> Option<(&'static str, &'static str)> {
        (self == Op::AttentionDisentangled).then_some((
            "attention_rel.wgsl",
            include_str!("../../../../shaders/attention_rel.wgsl"),
        ))
    }

    /// The op's own WGSL file.
    pub fn file(self) -> &'static str {
        match self {
            Op::Matmul => include_str!("../../../../shaders/matmul.wgsl"),
            Op::Embed => include_str!("../../../../shaders/embed.wgsl"),
            Op::LayerNorm => include_str!("../../../../shaders/layernorm.wgsl"),
            Op::Attention | Op::AttentionDisentangled => {
                include_str!("../../../../shaders/attention.wgsl")
            }
            Op::Rope => include_str!("../../../../shaders/rope.wgsl"),
            Op::Geglu => include_str!("../../../../shaders/geglu.wgsl"),
            Op::Pool => include_str!("../../../../shaders/pool.wgsl"),
        }
    }

    /// Group-0 storage bindings in order: `true` where the shader writes.
    pub fn bindings(self) -> &'static [bool] {
        match self {
            Op::Matmul => &[false, false, false, true],
            Op::Embed => &[false, false, false, false, false, false, false, true],
            Op::LayerNorm => &[true, false, false, false, true],
            Op::Attention => &[false, false, false, true],
            Op::AttentionDisentangled => &[false, false, false, true, false, false, false],
            Op::Rope => &[true, false, false],
            Op::Geglu => &[false, true],
            Op::Pool => &[false, false, true],
        }
    }
}

/// Keys per attention tile for a head size: K and V tiles together use at most 15 KiB of
/// workgroup memory, under the WebGPU default limit of 16 KiB with room for the rest.
pub fn key_tile(head_dim: u32) -> u32 {
    (1920 / head_dim.max(1)).clamp(1, 64)
}

/// The largest head size the attention shader is built for.
pub const MAX_HEAD_DIM: u32 = 256;

/// Plain attention's relative term: none.
const NO_REL: &str = "fn rel_score(q: ptr<function, array<f32, HEAD_DIM>>, qi: u32, key: u32, j: u32, head: u32) -> f32 {\n    return 0.0;\n}\n";

/// The full source of `op`'s pipeline. `variant` is the head size for attention (ignored
/// otherwise).
pub fn source(op: Op, f16: bool, variant: u32) -> String {
    let mut s = String::new();
    if f16 {
        s.push_str("enable f16;\nalias T = f16;\n");
    } else {
        s.push_str("alias T = f32;\n");
    }
    match op {
        Op::Attention | Op::AttentionDisentangled => s.push_str(&format!(
            "const HEAD_DIM: u32 = {variant}u;\nconst BK: u32 = {}u;\n",
            key_tile(variant)
        )),
        _ => {}
    }
    match op.part() {
        Some((_, part)) => s.push_str(part),
        None if op == Op::Attention => s.push_str(NO_REL),
        None => {}
    }
    s.push_str(COMMON);
    s.push_str(op.file());
    s
}
