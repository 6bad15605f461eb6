//! Which of wgpu's runtime checks the crate's kernels compile without
//! ([`crate::Gpu::skip_shader_runtime_checks_of`]): by default the loop
//! counters of the kernels whose loops are proven finite; others one at a
//! time, to measure what each costs.

/// wgpu's shader runtime checks the kernels skip. `default()` skips none;
/// a [`crate::Gpu`] starts from [`SkippedChecks::CRATE_DEFAULT`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct SkippedChecks {
    /// Index clamps on arrays (and on storage buffers where the driver
    /// lacks robust buffer access 2):
    /// [`wgpu::ShaderRuntimeChecks::bounds_checks`].
    pub bounds: bool,
    /// The counter that bounds every loop:
    /// [`wgpu::ShaderRuntimeChecks::force_loop_bounding`]. Skipped only in
    /// kernels whose every loop the crate proves finite from their text
    /// (every kernel it ships, a test checks; a file replaced through
    /// [`crate::Gpu::override_shader_file`] may not be), whatever this
    /// says.
    pub loop_bounding: bool,
    /// Guards on integer division and remainder:
    /// [`wgpu::ShaderRuntimeChecks::int_div_checks`].
    pub division: bool,
}

impl SkippedChecks {
    /// What a [`crate::Gpu`] skips until told otherwise: the loop
    /// counters, in the kernels whose loops are proven finite (the proof:
    /// src/shaders/loop_audit.rs; the limits it rests on:
    /// [`crate::MAX_SEQUENCE_LEN`]). They cost the register-blocked
    /// forward 16 registers a lane on NVIDIA's compiler (Mesa's NAK: 144
    /// against 128, 12 against 16 warps a multiprocessor; BENCHMARKS.md,
    /// 2026-12-05) and keep drivers from unrolling small loops; on
    /// lavapipe nothing measurable. Index clamps and division guards stay.
    pub const CRATE_DEFAULT: SkippedChecks = SkippedChecks {
        bounds: false,
        loop_bounding: true,
        division: false,
    };

    /// Every check skipped ([`crate::Gpu::skip_shader_runtime_checks`]).
    pub const ALL: SkippedChecks = SkippedChecks {
        bounds: true,
        loop_bounding: true,
        division: true,
    };

    /// These checks as `wgsl` compiles with them: without its loop
    /// counters only where every loop is proven finite
    /// ([`crate::unproven_loop`]; wgpu's condition for dropping them),
    /// whatever this asks.
    pub fn for_kernel(self, wgsl: &str) -> SkippedChecks {
        SkippedChecks {
            loop_bounding: self.loop_bounding && crate::shaders::unproven_loop(wgsl).is_none(),
            ..self
        }
    }

    /// Whether any check is skipped.
    pub fn any(self) -> bool {
        self.bounds || self.loop_bounding || self.division
    }

    /// The checks wgpu keeps. wgpu's other checks (ray queries, mesh
    /// shaders) concern no kernel of the crate; they follow `bounds`.
    ///
    /// # Safety
    /// As [`wgpu::Device::create_shader_module_trusted`] for each check
    /// skipped.
    pub(crate) unsafe fn to_wgpu(self) -> wgpu::ShaderRuntimeChecks {
        // SAFETY: forwarded to the caller.
        let mut checks = unsafe { wgpu::ShaderRuntimeChecks::all(!self.bounds) };
        checks.force_loop_bounding = !self.loop_bounding;
        checks.int_div_checks = !self.division;
        checks
    }

    /// The names `flash-bench --skip-checks` takes: `bounds`, `loops`,
    /// `division`, comma-separated, or `none` (every check on).
    pub fn from_names(names: &str) -> Result<SkippedChecks, String> {
        let mut skipped = SkippedChecks::default();
        for name in names.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            match name {
                "none" => {}
                "bounds" => skipped.bounds = true,
                "loops" => skipped.loop_bounding = true,
                "division" => skipped.division = true,
                other => {
                    return Err(format!(
                        "unknown runtime check {other:?} (bounds, loops, division, or none)"
                    ));
                }
            }
        }
        Ok(skipped)
    }

    /// The skipped checks by those names, comma-separated ("none" for
    /// none).
    pub fn names(self) -> String {
        let names = [
            (self.bounds, "bounds"),
            (self.loop_bounding, "loops"),
            (self.division, "division"),
        ]
        .iter()
        .filter(|(skipped, _)| *skipped)
        .map(|(_, name)| *name)
        .collect::<Vec<_>>()
        .join(",");
        if names.is_empty() {
            "none".to_string()
        } else {
            names
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_map_to_wgpus_flags() {
        for bits in 0..8u8 {
            let skipped = SkippedChecks {
                bounds: bits & 1 != 0,
                loop_bounding: bits & 2 != 0,
                division: bits & 4 != 0,
            };
            assert_eq!(SkippedChecks::from_names(&skipped.names()), Ok(skipped));
            assert_eq!(skipped.any(), bits != 0);
            // SAFETY: only inspected, never compiled with.
            let wgpu = unsafe { skipped.to_wgpu() };
            assert_eq!(wgpu.bounds_checks, !skipped.bounds);
            assert_eq!(wgpu.force_loop_bounding, !skipped.loop_bounding);
            assert_eq!(wgpu.int_div_checks, !skipped.division);
        }
        assert_eq!(
            SkippedChecks::from_names("bounds,loops,division"),
            Ok(SkippedChecks::ALL)
        );
        assert_eq!(
            SkippedChecks::from_names("none"),
            Ok(SkippedChecks::default())
        );
        assert_eq!(SkippedChecks::default().names(), "none");
        assert_eq!(SkippedChecks::CRATE_DEFAULT.names(), "loops");
        let err = SkippedChecks::from_names("bounds,clamps").unwrap_err();
        assert!(err.contains("\"clamps\""), "{err}");
    }
}
