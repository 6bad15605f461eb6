//! Every kernel's SPIR-V, as a Vulkan driver gets it, through SPIRV-Tools'
//! validator (`spirv-val`): naga's words for the matrix kernel broke the
//! Vulkan memory model's rules and spirv-val rejected them (2026-12-06),
//! which nothing else in the tests saw and which a driver may compile to
//! anything. One specialization per code shape (the rest differ in
//! constants), as they ship (wgpu's checks but the loop counters, which the
//! crate drops), for a Vulkan 1.3 device.
//!
//! The validator comes from `FLASH_ATTN_SPIRV_VAL` (a path) or `spirv-val`
//! on the PATH (Debian's `spirv-tools`); without one the test says
//! SKIPPED, unless `FLASH_ATTN_REQUIRE_SPIRV_VAL=1`, which makes that a
//! failure. A validator older than `SPV_KHR_cooperative_matrix` (Debian
//! 12's) cannot read the matrix kernels: those are then counted as not
//! validated. CI runs this in its matrix pass with Debian trixie's
//! validator, which reads them all (`.ci/matrix-units spirv-val`, which
//! requires it).

use std::io::Write;
use std::process::{Command, Stdio};

use rayon::prelude::*;

use crate::shader_contract_tests::{one_per_code_shape, shipped_specializations};
use crate::shaders::Specialization;
use crate::spirv::{SpirvTarget, from_wgsl};

/// What spirv-val says of `words`: `None` when valid.
fn validate(validator: &str, words: &[u32]) -> Option<String> {
    let mut child = Command::new(validator)
        .args(["--target-env", "vulkan1.3", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spirv-val starts");
    child
        .stdin
        .take()
        .expect("a pipe")
        .write_all(bytemuck::cast_slice(words))
        .expect("spirv-val reads the module");
    let output = child.wait_with_output().expect("spirv-val ends");
    (!output.status.success()).then(|| {
        let said = String::from_utf8_lossy(&output.stderr);
        let said = said.trim();
        if said.is_empty() {
            String::from_utf8_lossy(&output.stdout).trim().to_string()
        } else {
            said.to_string()
        }
    })
}

/// The validator to use, or why there is none.
fn validator() -> Result<String, String> {
    let name = std::env::var("FLASH_ATTN_SPIRV_VAL").unwrap_or_else(|_| "spirv-val".to_string());
    match Command::new(&name).arg("--version").output() {
        Ok(out) if out.status.success() => Ok(name),
        _ => Err(format!(
            "no SPIR-V validator: {name} does not run (apt-get install spirv-tools, or \
             FLASH_ATTN_SPIRV_VAL=/path/to/spirv-val)"
        )),
    }
}

/// The words of `spec` as the crate hands them to a Vulkan 1.3 driver.
fn words_of(spec: &Specialization) -> Vec<u32> {
    let source = spec.source().expect("the kernel generates");
    let skipped = crate::SkippedChecks::CRATE_DEFAULT.for_kernel(&source);
    from_wgsl(
        &source,
        spec.kernel().entry_point(),
        &SpirvTarget::VULKAN_1_3,
        skipped,
    )
    .expect("naga writes SPIR-V")
}

#[test]
fn every_kernels_spirv_passes_the_validator() {
    let validator = match validator() {
        Ok(validator) => validator,
        Err(why) if std::env::var("FLASH_ATTN_REQUIRE_SPIRV_VAL").as_deref() == Ok("1") => {
            panic!("{why}, and FLASH_ATTN_REQUIRE_SPIRV_VAL=1")
        }
        Err(why) => {
            eprintln!("SKIPPED: {why}");
            return;
        }
    };
    let specs = shipped_specializations();
    let chosen = one_per_code_shape(&specs);
    let results: Vec<(&Specialization, Option<String>)> = chosen
        .par_iter()
        .map(|spec| (*spec, validate(&validator, &words_of(spec))))
        .collect();
    // An old validator does not know the matrix extension's capability
    // (6022, CooperativeMatrixKHR): such kernels are not validated here.
    let unreadable = |why: &Option<String>| {
        why.as_deref()
            .is_some_and(|w| w.contains("Invalid capability operand: 6022"))
    };
    let unread: Vec<String> = results
        .iter()
        .filter(|(_, why)| unreadable(why))
        .map(|(spec, _)| spec.label())
        .collect();
    assert!(
        unread.iter().all(|label| label.starts_with("flash_coop")),
        "only the matrix kernels use the capability: {unread:?}"
    );
    if !unread.is_empty() {
        eprintln!(
            "SKIPPED: {} matrix kernels: {validator} predates SPV_KHR_cooperative_matrix \
             (SPIRV-Tools 2025 reads them)",
            unread.len()
        );
    }
    let invalid: Vec<String> = results
        .iter()
        .filter(|(_, why)| why.is_some() && !unreadable(why))
        .map(|(spec, why)| format!("{}: {}", spec.label(), why.as_deref().unwrap_or_default()))
        .collect();
    eprintln!(
        "spirv-val: {} kernels valid of {} read ({} specializations shipped)",
        results.len() - unread.len() - invalid.len(),
        results.len() - unread.len(),
        specs.len()
    );
    assert!(invalid.is_empty(), "{}", invalid.join("\n"));
    assert!(results.len() > unread.len(), "nothing was validated");
}

/// The validator is not lenient: naga's own words for the matrix kernel
/// (its `storageBarrier()` at device scope without the capability the
/// Vulkan memory model asks for that) and a module cut short are refused
/// (where the validator reads matrix kernels at all).
#[test]
fn the_validator_refuses_what_it_should() {
    let Ok(validator) = validator() else {
        eprintln!("SKIPPED: no SPIR-V validator (see every_kernels_spirv_passes_the_validator)");
        return;
    };
    let specs = shipped_specializations();
    let plain = specs
        .iter()
        .find(|s| !s.needs_cooperative_matrices())
        .expect("a kernel");
    let mut cut = words_of(plain);
    cut.truncate(cut.len() - 3);
    assert!(
        validate(&validator, &cut).is_some(),
        "a truncated module passed"
    );
    let matrix = specs
        .iter()
        .find(|s| s.needs_cooperative_matrices())
        .expect("a matrix kernel");
    let source = matrix.source().unwrap();
    let (module, info) = crate::spirv::parse(&source).unwrap();
    let nagas = crate::spirv::nagas_own_words(&module, &info);
    match validate(&validator, &nagas) {
        Some(why) if why.contains("6022") => {
            eprintln!("SKIPPED (matrix kernel): {validator} predates SPV_KHR_cooperative_matrix")
        }
        Some(why) => assert!(why.contains("VulkanMemoryModelDeviceScope"), "{why}"),
        None => panic!("naga's matrix kernel passed: naga may now follow the memory model"),
    }
}
