//! Which of wgpu's runtime checks the crate's kernels compile without
//! ([`crate::Gpu::skip_shader_runtime_checks_of`]): one at a time, to
//! measure what each costs.

/// wgpu's shader runtime checks the kernels skip. The default skips none.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct SkippedChecks {
    /// Index clamps on arrays (and on storage buffers where the driver
    /// lacks robust buffer access 2):
    /// [`wgpu::ShaderRuntimeChecks::bounds_checks`].
    pub bounds: bool,
    /// The counter that bounds every loop:
    /// [`wgpu::ShaderRuntimeChecks::force_loop_bounding`].
    pub loop_bounding: bool,
    /// Guards on integer division and remainder:
    /// [`wgpu::ShaderRuntimeChecks::int_div_checks`].
    pub division: bool,
}

impl SkippedChecks {
    /// Every check skipped ([`crate::Gpu::skip_shader_runtime_checks`]).
    pub const ALL: SkippedChecks = SkippedChecks {
        bounds: true,
        loop_bounding: true,
        division: true,
    };

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
    /// `division`.
    pub fn from_names(names: &str) -> Result<SkippedChecks, String> {
        let mut skipped = SkippedChecks::default();
        for name in names.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            match name {
                "bounds" => skipped.bounds = true,
                "loops" => skipped.loop_bounding = true,
                "division" => skipped.division = true,
                other => {
                    return Err(format!(
                        "unknown runtime check {other:?} (bounds, loops, division)"
                    ));
                }
            }
        }
        Ok(skipped)
    }

    /// The skipped checks by those names, comma-separated ("" for none).
    pub fn names(self) -> String {
        [
            (self.bounds, "bounds"),
            (self.loop_bounding, "loops"),
            (self.division, "division"),
        ]
        .iter()
        .filter(|(skipped, _)| *skipped)
        .map(|(_, name)| *name)
        .collect::<Vec<_>>()
        .join(",")
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
        let err = SkippedChecks::from_names("bounds,clamps").unwrap_err();
        assert!(err.contains("\"clamps\""), "{err}");
    }
}
