//! Compile-time checks that need no GPU: every kernel, hand-written or generated, compiles
//! with NVRTC for sm_80 and sm_90; `ptxas -v` for sm_90 shows no local-memory spills in the
//! attention, GEMV and fused kernels. Needs the CUDA tools (`scripts/fetch-cuda-tools`); without
//! them the tests print a notice and pass, unless `KILN_REQUIRE_NVRTC=1` (CI).

mod common;

use common::{generated_kernels, toolkit_or_skip};
use kiln_cuda::codegen::Kernel;
use kiln_cuda::compile::{compile, compile_fresh, KernelSource};
use kiln_cuda::{ptxas, Arch};

fn all_sources(arch: Arch) -> Vec<KernelSource> {
    let mut v: Vec<KernelSource> = Kernel::all(arch)
        .into_iter()
        .map(|k| k.source(arch).unwrap())
        .collect();
    v.extend(
        generated_kernels(arch)
            .iter()
            .map(|(_, e)| e.source(arch).unwrap()),
    );
    v
}

#[test]
fn every_kernel_compiles_for_sm80_and_sm90() {
    if toolkit_or_skip("every_kernel_compiles_for_sm80_and_sm90").is_none() {
        return;
    }
    // One thread per architecture (the machine has two cores).
    let failures: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = Arch::ALL
            .into_iter()
            .map(|arch| {
                s.spawn(move || {
                    all_sources(arch)
                        .iter()
                        .filter_map(|src| {
                            let c = match compile_fresh(src, arch) {
                                Ok(c) => c,
                                Err(e) => return Some(e.to_string()),
                            };
                            let missing: Vec<&String> = src
                                .entries
                                .iter()
                                .filter(|e| !c.ptx.contains(&format!(".entry {e}(")))
                                .collect();
                            (!missing.is_empty())
                                .then(|| format!("{} for {arch}: no entry {missing:?}", src.name))
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| {
                h.join()
                    .unwrap_or_else(|_| vec!["a compile thread panicked".into()])
            })
            .collect()
    });
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn cached_ptx_is_the_fresh_compilation() {
    if toolkit_or_skip("cached_ptx_is_the_fresh_compilation").is_none() {
        return;
    }
    let src = Kernel::Argmax(kiln_ir::DType::BF16)
        .source(Arch::Sm90)
        .unwrap();
    let fresh = compile_fresh(&src, Arch::Sm90).unwrap();
    let first = compile(&src, Arch::Sm90).unwrap();
    assert_eq!(first.ptx, fresh.ptx);
    assert_eq!(first.key, fresh.key);
    assert!(std::sync::Arc::ptr_eq(
        &first,
        &compile(&src, Arch::Sm90).unwrap()
    ));
    let other = Kernel::Argmax(kiln_ir::DType::F32)
        .source(Arch::Sm90)
        .unwrap();
    assert_ne!(compile(&other, Arch::Sm90).unwrap().key, first.key);
}

#[test]
fn fp8_kernels_exist_only_from_sm89() {
    assert!(Kernel::Gemv(kiln_ir::DType::F8E4M3)
        .source(Arch::Sm80)
        .is_err());
    assert!(Kernel::Gemv(kiln_ir::DType::F8E4M3)
        .source(Arch::Sm90)
        .is_ok());
    assert!(Kernel::AttentionPrefill(96).source(Arch::Sm90).is_err());
}

/// The attention, GEMV, norm and fused kernels `ptxas` checks, with labels for the table.
fn ptxas_checked() -> Vec<(String, KernelSource)> {
    let arch = ptxas::CHECK_ARCH;
    let mut v: Vec<(String, KernelSource)> = Kernel::all(arch)
        .into_iter()
        .filter(|k| {
            matches!(
                k,
                Kernel::AttentionPrefill(_)
                    | Kernel::AttentionDecode(_)
                    | Kernel::Gemv(_)
                    | Kernel::Rowwise(kiln_ir::DType::BF16)
            )
        })
        .map(|k| (String::new(), k.source(arch).unwrap()))
        .collect();
    v.extend(
        generated_kernels(arch)
            .into_iter()
            .map(|(label, e)| (label, e.source(arch).unwrap())),
    );
    v
}

#[test]
fn ptxas_sm90_no_spills() {
    let Some(tk) = toolkit_or_skip("ptxas_sm90_no_spills") else {
        return;
    };
    let mut rows = vec![];
    for (label, src) in ptxas_checked() {
        let c = compile(&src, ptxas::CHECK_ARCH).unwrap();
        let res = ptxas::resources(tk, &c).unwrap();
        assert_eq!(res.len(), src.entries.len(), "{}: {res:?}", src.name);
        for r in res {
            assert!(
                r.spill_stores == 0 && r.spill_loads == 0,
                "{} spills: {r:?}",
                src.name
            );
            let name = if label.is_empty() {
                format!("`{}`", r.kernel)
            } else {
                label.clone()
            };
            rows.push(format!(
                "| {name} | {} | {} | {} |",
                r.registers, r.shared, r.stack
            ));
        }
    }
    println!("| kernel (sm_90) | registers | shared memory (B) | stack (B) |");
    println!("|---|---|---|---|");
    println!("{}", rows.join("\n"));
}
