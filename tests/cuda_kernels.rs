//! Every CUDA kernel file compiles to PTX with NVRTC for sm_80 (A100) and sm_90 (H100/H200), for
//! each storage type, and defines its entry points; a broken program is reported with NVRTC's
//! log. Needs no GPU: NVRTC comes from the PyPI wheel nvidia-cuda-nvrtc (scripts/test.sh installs
//! it and puts it on LD_LIBRARY_PATH). Without NVRTC the tests print SKIPPED, except under CI.

use mira::engine::backend::cuda::kernels::{
    compile_program, compile_ptx, nvrtc_present, KernelFile, Storage, COMMON,
};

fn have_nvrtc() -> bool {
    if nvrtc_present() {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!("NVRTC not found under CI: scripts/test.sh installs nvidia-cuda-nvrtc");
    }
    eprintln!("SKIPPED: NVRTC (libnvrtc.so.13) not found; run scripts/test.sh");
    false
}

#[test]
fn every_kernel_compiles_for_sm80_and_sm90() {
    if !have_nvrtc() {
        return;
    }
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels");
    let mut files: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    let mut known: Vec<String> = KernelFile::ALL
        .iter()
        .map(|f| format!("{}.cu", f.name()))
        .collect();
    known.push("common.cuh".into());
    known.sort();
    assert_eq!(files, known, "every file in kernels/ is compiled here");
    assert_eq!(
        std::fs::read_to_string(dir.join("common.cuh")).unwrap(),
        COMMON
    );
    for file in KernelFile::ALL {
        assert_eq!(
            std::fs::read_to_string(dir.join(format!("{}.cu", file.name()))).unwrap(),
            file.source_file()
        );
        for storage in Storage::ALL {
            for arch in ["sm_80", "sm_90"] {
                let ptx = compile_ptx(file, storage, arch).unwrap_or_else(|e| panic!("{e:#}"));
                assert!(ptx.contains(&format!(".target {arch}")), "{arch}");
                for entry in file.entry_points() {
                    assert!(
                        ptx.contains(&format!(".entry {entry}(")),
                        "{}.cu ({storage:?}, {arch}) has no entry {entry}",
                        file.name()
                    );
                }
            }
        }
    }
}

#[test]
fn a_broken_kernel_is_reported_with_the_compiler_log() {
    if !have_nvrtc() {
        return;
    }
    let src = format!(
        "#define MIRA_BF16 1\n{COMMON}extern \"C\" __global__ void k(T* x) {{ x[0] = undefined_name; }}"
    );
    let err = compile_program(&src, "broken.cu", "sm_90")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("broken.cu") && err.contains("undefined_name"),
        "{err}"
    );
}
