//! Every `.wgsl` file in shaders/ parses and validates with naga (the front end wgpu uses), as
//! f32 and as f16 storage, for every head size the attention shaders (plain and disentangled) are
//! built for; and each shader's workgroup memory fits the WebGPU default limit of 16 KiB. Needs
//! no adapter.

use mira::engine::backend::wgpu::shaders::{key_tile, source, Op, COMMON, MAX_HEAD_DIM};

fn validate(name: &str, src: &str) -> naga::Module {
    let module = naga::front::wgsl::parse_str(src)
        .unwrap_or_else(|e| panic!("{name}: {}", e.emit_to_string(src)));
    naga::valid::Validator::new(
        naga::valid::ValidationFlags::all(),
        naga::valid::Capabilities::all(),
    )
    .validate(&module)
    .unwrap_or_else(|e| panic!("{name}: {}", e.emit_to_string(src)));
    module
}

fn workgroup_bytes(module: &naga::Module) -> u32 {
    let mut layouter = naga::proc::Layouter::default();
    layouter.update(module.to_ctx()).unwrap();
    module
        .global_variables
        .iter()
        .filter(|(_, g)| g.space == naga::AddressSpace::WorkGroup)
        .map(|(_, g)| layouter[g.ty].size)
        .sum()
}

#[test]
fn every_shader_file_is_an_op_and_validates() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("shaders");
    let mut files: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".wgsl"))
        .collect();
    files.sort();
    let mut ops: Vec<String> = Op::ALL
        .iter()
        .flat_map(|o| std::iter::once(o.file_name()).chain(o.part().map(|(name, _)| name)))
        .map(String::from)
        .collect();
    ops.push("common.wgsl".into());
    ops.sort();
    ops.dedup();
    assert_eq!(
        files, ops,
        "every file in shaders/ is an op the backend builds"
    );
    for file in &files {
        // The file on disk, exactly (the build embeds the same bytes).
        let text = std::fs::read_to_string(dir.join(file)).unwrap();
        if file == "common.wgsl" {
            assert_eq!(text, COMMON);
        } else {
            let embedded = Op::ALL
                .iter()
                .find_map(|o| match o.part() {
                    Some((name, part)) if name == file => Some(part),
                    _ => (o.file_name() == file).then(|| o.file()),
                })
                .unwrap();
            assert_eq!(text, embedded, "{file}");
        }
    }
    for op in Op::ALL {
        let variants: Vec<u32> = if matches!(op, Op::Attention | Op::AttentionDisentangled) {
            vec![8, 16, 32, 64, 96, 128, MAX_HEAD_DIM]
        } else {
            vec![0]
        };
        for f16 in [false, true] {
            for &v in &variants {
                let name = format!("{} (f16={f16}, variant {v})", op.name());
                let module = validate(&name, &source(op, f16, v));
                let bytes = workgroup_bytes(&module);
                assert!(bytes <= 16384, "{name}: {bytes} bytes of workgroup memory");
            }
        }
    }
    assert_eq!(key_tile(32), 60);
}

/// The validator is not vacuous: a type error in a shader is reported.
#[test]
fn a_broken_shader_is_rejected() {
    let broken = source(Op::Geglu, false, 0).replace("p.inner + i]", "p.inner + 1.5]");
    assert!(naga::front::wgsl::parse_str(&broken)
        .ok()
        .and_then(|m| naga::valid::Validator::new(
            naga::valid::ValidationFlags::all(),
            naga::valid::Capabilities::all()
        )
        .validate(&m)
        .ok())
        .is_none());
}
